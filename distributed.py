"""Data-parallel training under torchrun: one process per device, each training on its share of the views.

Without torchrun (WORLD_SIZE unset or 1) every function here is a no-op or returns its input, so the
training script calls them unconditionally.
"""
from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

import util


@dataclass
class Context:
    """Where this process stands in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_flag: str) -> tuple[Context, torch.device]:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU); pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context(), util.resolve_device(device_flag)
    import torch.distributed as dist
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_flag == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = util.resolve_device(device_flag)
        if device.type == "cuda":
            device = torch.device(f"cuda:{local_rank}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Context(rank=dist.get_rank(), world=dist.get_world_size()), device


def shutdown() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def seed_rank(ctx: Context, seed: int, step: int) -> None:
    """Each rank draws its own triplets and dropout masks (from the same initial weights); a resumed run
    continues a fresh stream, so under torchrun --resume does not restore the random state."""
    if ctx.enabled:
        np.random.seed([seed, ctx.rank, step])
        torch.manual_seed(int(np.random.randint(2 ** 31)))


def wrap(ctx: Context, module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` in DistributedDataParallel under torchrun, else ``module`` itself.

    Buffers are not broadcast from rank 0: the grid and the BatchNorm statistics are averaged after each step
    instead (``average_buffers``), so every rank's update counts.
    """
    if not ctx.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                      else {"broadcast_buffers": False})
    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None, **no_buffer_sync)


def no_sync(module: nn.Module) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync`` for passes whose backward must not arm the module's gradient all-reduce."""
    return module.no_sync() if hasattr(module, "no_sync") else contextlib.nullcontext()


def all_true(ctx: Context, flag: torch.Tensor) -> bool:
    """True when ``flag`` holds on every rank: all ranks take the same branch, or collectives would hang."""
    if ctx.enabled:
        import torch.distributed as dist
        flag = flag.to(torch.int32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.reshape(-1)[0])


def any_true(ctx: Context, flag: bool, device: torch.device) -> bool:
    """True when ``flag`` holds on some rank (a stop requested on one rank stops all at the same step)."""
    if not ctx.enabled:
        return flag
    return not all_true(ctx, torch.tensor([not flag], device=device))


def average_buffers(ctx: Context, nets: Sequence[nn.Module], grid: torch.Tensor) -> None:
    """Make the replicas one model again after a step: the mean of the updated grids and of the BatchNorm
    running statistics over the ranks (parameters are already equal through DDP's gradient all-reduce)."""
    if not ctx.enabled:
        return
    buffers = [grid]
    for net in nets:
        buffers += [b for name, b in net.named_buffers() if name.endswith(("running_mean", "running_var"))]
    _all_reduce_mean_(buffers, ctx.world)


def _all_reduce_mean_(tensors: Sequence[torch.Tensor], world: int) -> None:
    """Average float tensors across ranks in place, with one flattened all-reduce."""
    import torch.distributed as dist
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for t in tensors:
        n = t.numel()
        t.data.copy_(flat[offset:offset + n].view_as(t))
        offset += n


def shard(order: list[Any], ctx: Context) -> list[Any]:
    """Rank r takes every world-th item of a shared order (a distributed sampler)."""
    return order[ctx.rank::ctx.world]
