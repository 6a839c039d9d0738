"""Small helpers shared by the model and the scripts: sizes, devices, seeding, checkpoints."""
from __future__ import annotations

import ctypes
import os
import pickle
import random
import sys
import tempfile
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn


class UsageError(ValueError):
    """A flag value the program cannot use; the message names the flag."""


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, unsafe or does not fit the configured model."""


def num_divisible_by_2(number: int) -> int:
    """How many times ``number`` can be halved without remainder (the number of stride-2 levels it allows)."""
    if number <= 0:
        raise ValueError(f"expected a positive size, got {number}")
    count = 0
    while number % 2 == 0:
        number //= 2
        count += 1
    return count


def count_parameters(net: nn.Module) -> int:
    """Trainable parameters, each shared tensor counted once (the original's ``print_network`` number)."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; otherwise ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UsageError(f"--device {name!r} is not a device (use auto, cpu, cuda, cuda:N or mps)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: MPS is not available on this machine")
    return device


def configure_backends(device: torch.device, tf32: bool = False) -> None:
    """Process-wide numerics and tuning for ``device``; a no-op off CUDA.

    CUDA: cuDNN picks the fastest convolution algorithm per input shape (``cudnn.benchmark``), and float32
    convolutions and matrix products use TF32 tensor cores only when ``tf32`` is set. PyTorch enables TF32
    for cuDNN convolutions by default; that rounds their operands to 10 mantissa bits (~1e-3 relative), which
    the original (PyTorch 1.0, before TF32) never did, so plain float32 is the default here.
    """
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    # The allow_tf32 switches set both the old and the per-operator (fp32_precision) settings consistently;
    # setting only the new ones for convolutions makes later reads of allow_tf32 raise on torch >= 2.9.
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_rng_state() -> dict[str, Any]:
    """Every random state a training run draws from, in a form ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state = {
        "python": _python_state_to_tensor(random.getstate()),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what ``get_rng_state`` saved."""
    random.setstate(_tensor_to_python_state(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _python_state_to_tensor(state: tuple) -> torch.Tensor:
    version, internal, gauss = state
    if gauss is not None:
        raise RuntimeError("python's random module holds a cached gaussian; not expected in training")
    return torch.tensor([version, *internal], dtype=torch.int64)


def _tensor_to_python_state(values: torch.Tensor) -> tuple:
    items = [int(v) for v in values.tolist()]
    return items[0], tuple(items[1:]), None


def save_checkpoint(path: str, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` with ``torch.save`` atomically: a temporary file in the same folder, then a rename,
    so an interrupted write never leaves a truncated checkpoint under ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".pth", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(dict(payload), handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path: str, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by this project or by the original code.

    Uses ``weights_only=True``: tensors, numbers, strings and containers only, so a file that would run code
    when unpickled is refused and nothing in it runs.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path}: refused by the safe loader (weights_only=True): {first}") \
            from err
    except Exception as err:  # noqa: BLE001 - any failure to parse the bytes means the file is damaged
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path}: unreadable or truncated ({first})") from err
    if not isinstance(payload, dict) or "model" not in payload:
        raise CheckpointError(f"checkpoint {path}: expected a dict with a 'model' state_dict")
    return payload


# --save_memory: heap blocks of this size and up get their own mappings, returned to the OS when freed.
MMAP_THRESHOLD_BYTES = 1 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers


def return_freed_blocks_to_os() -> bool:
    """Make glibc serve allocations of ``MMAP_THRESHOLD_BYTES`` and up from their own memory mappings.

    glibc otherwise raises that threshold as large blocks are freed (up to 32 MB) and keeps freed heap
    blocks resident for reuse; with the many tensor sizes of a training step the unusable gaps add ~0.9 GB
    to the peak RSS at 512 px. Mapped blocks are given back at once but must be zero-filled by the kernel
    when mapped again, which costs time (README, Performance). Returns False, changing nothing, where the
    C library is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    # Also a free stretch of that size at the top of the heap is given back (it would stay otherwise).
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, MMAP_THRESHOLD_BYTES))
