"""Shared test setup: make the repository root importable and locate the reference fixtures."""
import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

REFERENCE_DIR = "/work/shared/reference"


@pytest.fixture
def reference_dir() -> str:
    """Folder with the original implementation's fixtures; tests needing it skip when absent."""
    if not os.path.isdir(REFERENCE_DIR):
        pytest.skip(f"reference fixtures not found at {REFERENCE_DIR}")
    return REFERENCE_DIR
