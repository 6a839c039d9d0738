"""Memory savers that recompute activations in the backward pass instead of keeping them, bit for bit.

How cheap-layer recompute works: after each convolution the networks run a chain of cheap elementwise layers
whose outputs autograd keeps, although they are quick functions of the convolution's output, which BatchNorm
keeps anyway. Inside ``recompute_cheap_layers`` such an output is saved as a recipe instead (the layer and its
input, itself a recipe or a kept tensor) and made again when the backward pass needs it. A reflection or
replication pad's backward reads only the shape of its input, so for it nothing is kept or made again.

``recompute_in_backward`` runs a whole function again in the backward pass (activation checkpointing that
keeps dropout masks and BatchNorm statistics). ``performance`` switches both on where they pay.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, Iterator, Optional, Union

import torch
from torch import nn
from torch.nn import functional as F

from pytorch_prototyping import norm


# Padding layers whose output is a pure function of their input (no parameters, no randomness).
PADDING_LAYERS = (nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d,
                  nn.ReplicationPad2d, nn.ReplicationPad3d, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d,
                  nn.ConstantPad3d)
# Padding layers whose backward uses their saved input only for its shape (reflection/replication pads).
SHAPE_ONLY_BACKWARD_LAYERS = (nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d,
                              nn.ReplicationPad2d, nn.ReplicationPad3d)
# Layers whose input a recipe may hold without keeping memory that would otherwise be freed: BatchNorm's
# backward keeps it anyway, and a saved padded copy needs it (and is larger).
KEEP_INPUT_LAYERS = (nn.modules.batchnorm._BatchNorm,) + SHAPE_ONLY_BACKWARD_LAYERS
ACTIVATION_LAYERS = (nn.ReLU, nn.LeakyReLU)
DROPOUT_LAYERS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
CHEAP_LAYERS = PADDING_LAYERS + (nn.modules.batchnorm._BatchNorm,) + ACTIVATION_LAYERS + DROPOUT_LAYERS


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class _Recipe:
    """How to make a layer's output again: the layer applied to its source, which is either a tensor the
    backward pass keeps anyway (checked for in-place changes) or another recipe.

    A made output is kept (``cache``) while saved tensors that need it, directly or through later recipes
    of the chain, are still to be unpacked (``pending``), so one backward pass makes each output once.
    Not when an in-place layer consumes it: that would overwrite the kept copy.
    """

    __slots__ = ("layer", "source", "source_version", "param_versions", "rng", "stride", "autocast", "pending",
                 "cache", "consumed_in_place")

    def __init__(self, layer: nn.Module, source: Union[torch.Tensor, "_Recipe"], rng: Optional[tuple],
                 output: torch.Tensor):
        self.layer, self.source, self.rng, self.stride = layer, source, rng, output.stride()
        self.source_version = source._version if isinstance(source, torch.Tensor) else None
        self.param_versions = [p._version for p in layer.parameters(recurse=False)]
        kind = output.device.type
        self.autocast = (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        self.pending, self.cache, self.consumed_in_place = 0, None, False
        if isinstance(source, _Recipe) and getattr(layer, "inplace", False):
            source.consumed_in_place = True

    def chain(self) -> Iterator["_Recipe"]:
        recipe: Union[torch.Tensor, _Recipe] = self
        while isinstance(recipe, _Recipe):
            yield recipe
            recipe = recipe.source

    def make(self) -> torch.Tensor:
        """The layer's whole output, as the forward pass made it."""
        out = self.cache if self.cache is not None else self._make()
        self.cache = out if self.pending > 0 and not self.consumed_in_place else None
        return out

    def _make(self) -> torch.Tensor:
        if isinstance(self.source, _Recipe):
            source = self.source.make()
        else:
            source = self.source
            if source._version != self.source_version:
                raise RuntimeError(f"the input of {self.layer} was modified in place after the forward pass; "
                                   "its output cannot be made again for the backward pass")
        if [p._version for p in self.layer.parameters(recurse=False)] != self.param_versions:
            raise RuntimeError(f"the parameters of {self.layer} were changed between the forward pass and the "
                               "backward pass that needs its output")
        kind, enabled, dtype = self.autocast
        with torch.no_grad(), torch.autocast(kind, dtype=dtype, enabled=enabled):  # as in the forward pass
            out = self._apply(source)
        if out.stride() != self.stride:  # the views handed to the backward assume the forward's layout
            raise RuntimeError(f"{self.layer} produced a different memory layout when run again")
        return out

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            # Batch statistics when the forward pass used them (the output does not depend on the running
            # statistics then; copies keep the real ones from a second update).
            batch_stats = layer.training or layer.running_mean is None
            mean, var = layer.running_mean, layer.running_var
            if batch_stats and mean is not None:
                mean, var = mean.clone(), var.clone()
            # The layer's own function: an accurate-statistics BatchNorm (norm.py) must be made again by it.
            fn = norm.batch_norm if isinstance(layer, norm._AccurateBatchNorm) else F.batch_norm
            return fn(x, mean, var, layer.weight, layer.bias, batch_stats, 0.0, layer.eps)
        if self.rng is None:
            return layer.forward(x)
        now = _rng_state(x.device)
        _set_rng_state(self.rng, x.device)
        try:
            return layer.forward(x)  # the same dropout mask as in the forward pass
        finally:
            _set_rng_state(now, x.device)


class _ShapeOnly:
    """A saved tensor whose values its backward function never reads: only the metadata is kept."""

    __slots__ = ("size", "stride", "dtype", "device")

    def __init__(self, t: torch.Tensor):
        self.size, self.stride, self.dtype, self.device = t.size(), t.stride(), t.dtype, t.device

    def tensor(self) -> torch.Tensor:
        return torch.empty_strided(self.size, self.stride, dtype=self.dtype, device=self.device)


class _Saved:
    """A saved tensor kept as a recipe and the view of the recipe's output that the backward pass wants."""

    __slots__ = ("recipe", "size", "stride", "offset")

    def __init__(self, recipe: _Recipe, view: torch.Tensor):
        self.recipe, self.size, self.stride, self.offset = recipe, view.size(), view.stride(), view.storage_offset()
        for step in recipe.chain():
            step.pending += 1

    def tensor(self) -> torch.Tensor:
        for step in self.recipe.chain():
            step.pending -= 1
        return self.recipe.make().as_strided(self.size, self.stride, self.offset)


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a.size() == b.size()
            and a.stride() == b.stride() and a.storage_offset() == b.storage_offset() and a.dtype == b.dtype
            and a._version == b._version)


@contextlib.contextmanager
def recompute_cheap_layers(module: nn.Module) -> Iterator[None]:
    """Within the block, outputs of ``module``'s BatchNorm, ReLU, LeakyReLU, dropout and padding layers
    that a backward function wants to keep are saved as recipes and made again in the backward pass (see
    the module docstring). A chain is rooted at a tensor the backward pass keeps anyway (the input of a
    BatchNorm or of a reflection/replication padding), so a recipe never holds memory that would otherwise
    be freed. Dropout masks are drawn again from the generator state of the forward pass.

    Does nothing when gradients are off. The backward pass may run after the block has ended.
    """
    layers = [m for m in module.modules() if isinstance(m, CHEAP_LAYERS)]
    if not torch.is_grad_enabled() or not layers:
        yield
        return
    # Storage address of each live recorded output -> (weak reference to it, its version, its recipe). The
    # weak reference tells a live entry from an address since reused by another tensor; an entry goes when
    # its tensor dies, and with it the recipe unless a backward function holds it.
    outputs: dict[int, tuple[weakref.ref, int, _Recipe]] = {}
    pending: dict[nn.Module, tuple[Optional[_Recipe], Optional[tuple]]] = {}
    padding_input: list[torch.Tensor] = []  # the input of the padding layer running now, if one is

    def lookup(t: torch.Tensor) -> Optional[_Recipe]:
        entry = outputs.get(t.untyped_storage().data_ptr()) if outputs else None
        if entry is None:
            return None
        ref, version, recipe = entry
        live = ref()
        if (live is None or live.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
                or t._version != version or t.dtype != live.dtype):
            return None
        return recipe

    def before(layer: nn.Module, inputs: tuple) -> None:
        # Looked up now: an in-place layer changes its input's version before ``record`` sees it.
        if not inputs or not isinstance(inputs[0], torch.Tensor):
            return
        x = inputs[0]
        if isinstance(layer, SHAPE_ONLY_BACKWARD_LAYERS):
            padding_input[:] = [x]
        source = lookup(x)
        if source is not None and isinstance(layer, ACTIVATION_LAYERS) and layer.inplace:
            # The activation saves its own output while it runs, before ``record``: register it now, under
            # the version the in-place operation will give the tensor.
            register(x, x._version + 1, _Recipe(layer, source, None, x))
            return
        rng = None
        if isinstance(layer, DROPOUT_LAYERS) and layer.training and layer.p > 0:
            rng = _rng_state(x.device)
        pending[layer] = (source, rng)

    def record(layer: nn.Module, inputs: tuple, output: Any) -> None:
        if layer not in pending:
            return  # not a tensor, or an in-place activation registered by ``before``
        source, rng = pending.pop(layer)
        padding_input.clear()
        if not isinstance(output, torch.Tensor):
            return
        if source is None:
            if not isinstance(layer, KEEP_INPUT_LAYERS) or inputs[0] is output:
                return  # holding the input could keep memory alive, or an in-place layer overwrote it
            source = inputs[0].detach()
        register(output, output._version, _Recipe(layer, source, rng, output))

    def register(output: torch.Tensor, version: int, recipe: _Recipe) -> None:
        key = output.untyped_storage().data_ptr()

        def forget(_ref, key=key, recipe=recipe) -> None:
            entry = outputs.get(key)
            if entry is not None and entry[2] is recipe:
                del outputs[key]

        outputs[key] = (weakref.ref(output, forget), version, recipe)

    def pack(saved: torch.Tensor):
        if padding_input and _same_view(saved, padding_input[0]):
            # A reflection/replication pad saving its own input: its backward reads only the shape, so
            # the input is neither kept nor made again for it.
            return _ShapeOnly(saved)
        recipe = lookup(saved)
        return saved if recipe is None else _Saved(recipe, saved)

    def unpack(packed):
        return packed.tensor() if isinstance(packed, (_Saved, _ShapeOnly)) else packed

    handles = [h for layer in layers for h in (layer.register_forward_pre_hook(before),
                                               layer.register_forward_hook(record))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
    finally:
        for handle in handles:
            handle.remove()
        outputs.clear()
        pending.clear()
        padding_input.clear()


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
