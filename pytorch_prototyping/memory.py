"""Training-memory savers that leave every computed value unchanged (``run_deepvoxels.py --save_memory``).

``recompute_in_backward``: activation checkpointing for layers with BatchNorm and dropout: the
recomputation draws the same dropout masks and leaves the running statistics updated once.

``recompute_padding``: a padding layer followed by a convolution makes autograd keep two copies of each
activation: the padding's input (the previous layer's output, already kept by its own backward) and the
padded copy the convolution saves for its weight gradient. At the paper's 512 px setting the padded copies
are about a gigabyte per training step. Inside the context, a padded tensor that a backward function wants
to keep is replaced by a recipe (the padding layer and its input), and the backward pass pads again when it
needs the tensor: an exact copy of what the forward pass made, so gradients are bit for bit the same.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Callable, Iterator, Optional

import torch
from torch import nn

# Padding layers whose output is a pure function of their input (no parameters, no randomness).
PADDING_LAYERS = (nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d,
                  nn.ReplicationPad2d, nn.ReplicationPad3d, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d,
                  nn.ConstantPad3d)


class _Repad:
    """A saved padded tensor, kept as the padding layer, its input and the view the backward asked for."""

    __slots__ = ("layer", "source", "source_version", "size", "stride", "offset", "padded_stride")

    def __init__(self, layer: nn.Module, source: torch.Tensor, source_version: int, view: torch.Tensor,
                 padded_stride: tuple[int, ...]):
        self.layer, self.source, self.source_version = layer, source, source_version
        self.size, self.stride, self.offset = view.size(), view.stride(), view.storage_offset()
        self.padded_stride = padded_stride

    def rebuild(self) -> torch.Tensor:
        if self.source._version != self.source_version:
            raise RuntimeError(f"the input of {self.layer} was modified in place after the forward pass; "
                               "its padded copy cannot be rebuilt for the backward pass")
        with torch.no_grad():
            padded = self.layer(self.source)
        if padded.stride() != self.padded_stride:  # the view below assumes the forward's memory layout
            raise RuntimeError(f"{self.layer} produced a different memory layout when padding again")
        return padded.as_strided(self.size, self.stride, self.offset)


@contextlib.contextmanager
def recompute_padding(module: nn.Module) -> Iterator[None]:
    """Within the block, tensors saved for backward that are outputs of ``module``'s padding layers are
    re-padded in the backward pass instead of being kept (see the module docstring).

    Does nothing when gradients are off. The backward pass may run after the block has ended.
    """
    layers = [m for m in module.modules() if isinstance(m, PADDING_LAYERS)]
    if not torch.is_grad_enabled() or not layers:
        yield
        return
    # Storage address of each live padded output -> (weak reference to it, its layer, the layer's input).
    # The weak reference tells a live entry from an address that has since been reused by another tensor.
    outputs: dict[int, tuple[weakref.ref, nn.Module, torch.Tensor, int]] = {}

    def remember(layer: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        source = inputs[0]
        outputs[output.untyped_storage().data_ptr()] = (weakref.ref(output), layer, source.detach(),
                                                        source._version)

    def pack(saved: torch.Tensor):
        entry = outputs.get(saved.untyped_storage().data_ptr()) if outputs else None
        if entry is None:
            return saved
        ref, layer, source, version = entry
        padded = ref()
        if padded is None or padded.untyped_storage().data_ptr() != saved.untyped_storage().data_ptr():
            return saved
        return _Repad(layer, source, version, saved, padded.stride())

    def unpack(packed):
        return packed.rebuild() if isinstance(packed, _Repad) else packed

    handles = [layer.register_forward_hook(remember) for layer in layers]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def keep_norm_statistics(module: nn.Module) -> Iterator[None]:
    """Within the block, BatchNorm running statistics of ``module`` are left as they were on entry."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats and m.running_mean is not None]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (mean, var, count) in zip(norms, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)


class _RunOnceThenRecompute:
    """Calls ``fn``; on every later call (the backward's recomputation) the BatchNorm statistics of
    ``modules`` are kept, so they are updated once per forward pass, exactly as without recomputation."""

    def __init__(self, fn: Callable, modules: nn.Module):
        self.fn, self.modules, self.calls = fn, modules, 0

    def __call__(self, *args):
        self.calls += 1
        if self.calls == 1:
            return self.fn(*args)
        with keep_norm_statistics(self.modules):
            return self.fn(*args)


def recompute_in_backward(fn: Callable, *args: torch.Tensor, modules: Optional[nn.Module] = None):
    """``fn(*args)`` without keeping its activations: the backward pass calls ``fn`` again.

    ``modules`` holds every BatchNorm that ``fn`` runs (``fn`` itself when it is a module). The
    recomputation sees the same dropout masks (the RNG state is restored for it) and the same batch
    statistics, so outputs and gradients are bit for bit those of ``fn(*args)``; BatchNorm running
    statistics are updated once. Costs one more forward pass of ``fn``. Plain ``fn(*args)`` without grad.
    """
    if not torch.is_grad_enabled():
        return fn(*args)
    if modules is None:
        if not isinstance(fn, nn.Module):
            raise TypeError("recompute_in_backward: pass modules= (the BatchNorms fn runs) for a plain function")
        modules = fn
    from torch.utils.checkpoint import checkpoint
    return checkpoint(_RunOnceThenRecompute(fn, modules), *args, use_reentrant=False, preserve_rng_state=True)
