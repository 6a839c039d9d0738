"""Shared test setup: make the repository root importable and locate the reference fixtures."""
import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

# Fixtures written by the original implementation: ../shared/reference beside the repository (as laid out
# for developers and CI), or wherever DEEPVOXELS_REFERENCE points.
REFERENCE_DIR = os.environ.get("DEEPVOXELS_REFERENCE",
                               os.path.join(os.path.dirname(REPO_ROOT), "shared", "reference"))


@pytest.fixture
def reference_dir() -> str:
    """Folder with the original implementation's fixtures; tests needing it skip when absent."""
    if not os.path.isdir(REFERENCE_DIR):
        pytest.skip(f"reference fixtures not found at {REFERENCE_DIR}")
    return REFERENCE_DIR
