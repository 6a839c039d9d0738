"""Small helpers shared by the model and the scripts: sizes, devices, seeding, initialisation."""
from __future__ import annotations

import contextlib
import random
from typing import Iterator

import numpy as np
import torch
from torch import nn


class UsageError(ValueError):
    """A flag value the program cannot use; the message names the flag."""


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


@contextlib.contextmanager
def cudnn_heuristics() -> Iterator[None]:
    """cuDNN's heuristic choice of convolution algorithms inside the block, instead of autotuning.

    Autotuning (``configure_backends``) times every algorithm once per new input shape: it pays for the
    training step, which repeats one shape for the whole run, but rendering meets new shapes (a batch of views,
    the last smaller batch, one view in the viewer) only a few times, so there it costs more than it saves.
    """
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def skip_initialisation() -> Iterator[None]:
    """Layers built inside the block keep their parameters as allocated, undrawn. For a model whose every
    parameter and buffer a checkpoint then overwrites (a strict ``load_state_dict``), the random draws are
    wasted work: seconds for the paper's 199 M parameters."""
    names = ("kaiming_uniform_", "uniform_", "normal_", "zeros_", "ones_")
    saved = {name: getattr(nn.init, name) for name in names}
    for name in names:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


@contextlib.contextmanager
def batchnorm_init_of_pytorch_1_0() -> Iterator[None]:
    """BatchNorm layers built inside the block start as in PyTorch 1.0: scale (gamma) uniform in [0, 1),
    shift 0. PyTorch >= 1.2 starts the scale at 1. The draw happens where 1.0 made it, during construction,
    so a seeded model draws the same numbers as the original did on 1.0 (the other layer types the model
    uses start the same way in 1.0 and now)."""
    norm_base = nn.modules.batchnorm._NormBase
    modern = norm_base.reset_parameters

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.uniform_(self.weight)
            nn.init.zeros_(self.bias)

    norm_base.reset_parameters = reset_parameters
    try:
        yield
    finally:
        norm_base.reset_parameters = modern
