"""Shared test setup: make the repository root importable and locate the reference fixtures."""
import os
import sys

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

# Fixtures written by the original implementation: ../shared/reference beside the repository (as laid out
# for developers and CI), or wherever DEEPVOXELS_REFERENCE points.
REFERENCE_DIR = os.environ.get("DEEPVOXELS_REFERENCE",
                               os.path.join(os.path.dirname(REPO_ROOT), "shared", "reference"))


def require_reference() -> str:
    """The folder of the original implementation's fixtures. The parity tests need it: when it is missing they
    fail with one line saying where it was expected, unless DEEPVOXELS_SKIP_PARITY=1 opts out (then they skip)."""
    if os.path.isdir(REFERENCE_DIR):
        return REFERENCE_DIR
    if os.environ.get("DEEPVOXELS_SKIP_PARITY") == "1":
        pytest.skip(f"parity fixtures not found at {REFERENCE_DIR} (DEEPVOXELS_SKIP_PARITY=1)")
    pytest.fail(f"parity fixtures not found at {REFERENCE_DIR}: put the original's fixtures there, point "
                "DEEPVOXELS_REFERENCE at them, or set DEEPVOXELS_SKIP_PARITY=1 to skip the parity tests",
                pytrace=False)


@pytest.fixture
def reference_dir() -> str:
    return require_reference()


# The device the device-aware tests run on: CPU unless DEEPVOXELS_TEST_DEVICE names another (``cuda``,
# ``cuda:1``), e.g. ``DEEPVOXELS_TEST_DEVICE=cuda make test`` on a GPU machine.
TEST_DEVICE = os.environ.get("DEEPVOXELS_TEST_DEVICE", "cpu")


@pytest.fixture
def device():
    """``torch.device(TEST_DEVICE)``. On CUDA: full float32 (no TF32, as run_deepvoxels defaults to) and
    deterministic cuDNN algorithms and scatter-adds while the test runs, so that bit-identity tests mean
    the same as on CPU."""
    try:
        dev = torch.device(TEST_DEVICE)
    except RuntimeError:
        pytest.fail(f"DEEPVOXELS_TEST_DEVICE={TEST_DEVICE!r} is not a device (use cpu, cuda or cuda:N)")
    if dev.type != "cuda":
        yield dev
        return
    if not torch.cuda.is_available():
        pytest.fail(f"DEEPVOXELS_TEST_DEVICE={TEST_DEVICE}, but CUDA is not available")
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32,
             torch.backends.cuda.matmul.allow_tf32, torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled())
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield dev
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32,
         torch.backends.cuda.matmul.allow_tf32) = saved[:4]
        torch.use_deterministic_algorithms(saved[4], warn_only=saved[5])
