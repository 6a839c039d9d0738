"""Fast paths for training and rendering that leave every computed value as it is, behind one switchboard.

The method's code runs without any of them. ``choose`` picks the ones that pay on the device at hand and
``enable`` switches them on a model; the training script calls both once. Each is a field of ``FastPaths``,
so a test can run the same step with any of them off:

* ``recompute_cheap_layers``: outputs of BatchNorm, ReLU, dropout and padding layers are saved for the
  backward pass as recipes (the layer and its input) and made again there, bit for bit (see below).
* ``recompute_full_resolution`` and ``recompute_view_volume`` (``--save_memory``): the layers working at the
  image's full resolution, and each view volume with its occlusion net, keep no activations and run again in
  the backward pass (activation checkpointing that keeps dropout masks and BatchNorm statistics).
* ``step_in_backward``: generator parameters are stepped by their optimizer as soon as their gradients are
  complete (a few megabytes of them at a time), and the gradients freed, so that the generator's gradients
  never exist all at once.
* ``fused_adam``: Adam in one fused kernel instead of per-parameter loops (same update up to rounding).
* ``onednn_conv3d``: 3^3 convolutions on the CPU run through oneDNN in the channels-last layout, with the
  spatial axes reordered, and padded with zero channels where ATen would otherwise pick its slow im2col
  kernel (``OneDNNConv3d``).
* ``channels_last_2d``: the 2D networks (feature extractor, rendering net, discriminator) take channels-last
  (N, H, W, C) activations; the generator's 2D convolution weights are stored so too.
* ``heap_reuse``: glibc serves every block from its heap and keeps freed memory there for the next request,
  instead of mapping each large block afresh from the kernel, which fills it with zeros one page fault at a
  time, and unmapping it when it is freed (``reuse_heap``). Process-wide, and it stays on once set.

Which of these pay depends on the machine: on a GPU the savers' Python work is not hidden behind the
arithmetic; on a CPU the channels-last 2D kernels pay with AVX-512 and, with AVX2 alone, only when the
narrowest networks render (``choose`` reads the CPU's flags; the measurements are in docs/performance.md).

How cheap-layer recompute works: after each convolution the networks run a chain of cheap elementwise layers
whose outputs autograd keeps, although they are quick functions of the convolution's output, which BatchNorm
keeps anyway. Inside ``recompute_cheap_layers`` such an output is saved as a recipe instead (the layer and its
input, itself a recipe or a kept tensor) and made again when the backward pass needs it. A reflection or
replication pad's backward reads only the shape of its input, so for it nothing is kept or made again.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Union

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


# ----------------------------------------------------------------------------------------------------------
# The switchboard

# Cheap-layer recompute frees memory in proportion to the 2D networks' outermost activations (nf0 x side^2
# values per layer) and costs Python work in its hooks per layer plus a second pass of the cheap layers, which
# only wide convolutions hide. So on a CPU it is on where those activations are large, from 512 px at nf0 32
# (docs/performance.md has the measurements that set it): below, the memory it frees is small and its cost not.
CHEAP_RECOMPUTE_MIN_FEATURE_PIXELS = 32 * 512 ** 2


# Views rendered per forward pass when --view_batch is 0: this many, and on a CPU no more than make this many
# pixels. On a CPU a forward's full-resolution activations grow with its views (64 channels x 514^2 px are
# 68 MB a view): fewer views keep them within the memory the heap has already touched and reuses.
VIEWS_PER_FORWARD = 8
CPU_PIXELS_PER_FORWARD = 2 * 512 * 512


def views_per_forward(view_batch: int, device: torch.device, img_sidelength: int) -> int:
    """``--view_batch``, or for 0 the default for this device and image size."""
    if view_batch > 0:
        return view_batch
    if device.type != "cpu":
        return VIEWS_PER_FORWARD
    return max(1, min(VIEWS_PER_FORWARD, CPU_PIXELS_PER_FORWARD // img_sidelength ** 2))


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux names them (``avx2``, ``avx512f``, ``avx512_bf16``, ``amx_tile``...);
    empty where /proc/cpuinfo is not readable."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_description() -> str:
    """One line naming the CPU, its vector extensions, its cores and torch's threads, for benchmark tables."""
    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as handle:
            name = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), name)
    except OSError:
        pass
    flags = cpu_flags()
    vector = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags] or ["no AVX2"]
    return f"{name}, {'/'.join(vector)}, {os.cpu_count()} cores, torch {torch.__version__} " \
           f"with {torch.get_num_threads()} threads"


# Without AVX-512, oneDNN's channels-last 2D kernels beat its NCHW ones only in the forward pass (rendering)
# of networks this narrow (docs/performance.md, "The whole loop against the original, per CPU kind").
CHANNELS_LAST_2D_MAX_NF0_AVX2 = 8


@dataclass
class FastPaths:
    recompute_cheap_layers: bool = False
    recompute_full_resolution: bool = False
    recompute_view_volume: bool = False
    step_in_backward: bool = False
    fused_adam: bool = False
    onednn_conv3d: bool = False
    channels_last_2d: bool = False
    heap_reuse: bool = False


def choose(device: torch.device, img_sidelength: int, save_memory: bool = False, distributed: bool = False,
           loss_scaling: bool = False, compiled: bool = False, *, nf0: int = 64, training: bool = True
           ) -> FastPaths:
    """The fast paths for a run (``nf0``: the width of the 2D U-Nets' outermost layers; ``training`` False for
    a model that only renders: test mode, the checkpoint viewer). On a GPU the savers' Python work per layer
    and per parameter is not hidden behind the arithmetic as on a CPU, so there they come only with
    ``--save_memory``. The parameter-wise step cannot run under DDP (which all-reduces
    gradients after the hooks) nor with fp16's loss scaler (which must see every gradient first); under
    torch.compile the compiler decides what is kept. Channels-last 2D networks pay on GPUs and with AVX-512;
    with AVX2 only when the narrowest networks render: there oneDNN's channels-last backward kernels are
    slower than its NCHW ones, and channels-last training also needs the accurate BatchNorm statistics
    (pytorch_prototyping/norm.py), which cost more than the narrow forward kernels save. On Linux CPUs the
    heap keeps its memory, since a step frees and allocates the same large blocks again and again, unless
    memory comes first (``save_memory``): the gaps the heap cannot fill raise the peak."""
    cpu = device.type == "cpu"
    wide_vectors = cpu and "avx512f" in cpu_flags()
    return FastPaths(
        recompute_cheap_layers=not compiled and (
            save_memory or (cpu and nf0 * img_sidelength ** 2 >= CHEAP_RECOMPUTE_MIN_FEATURE_PIXELS)),
        recompute_full_resolution=save_memory and not compiled,
        recompute_view_volume=save_memory and not compiled,
        step_in_backward=not distributed and not loss_scaling and (cpu or save_memory),
        fused_adam=device.type in ("cpu", "cuda"),
        onednn_conv3d=cpu,
        channels_last_2d=not cpu or wide_vectors or (not training and nf0 <= CHANNELS_LAST_2D_MAX_NF0_AVX2),
        heap_reuse=cpu and not save_memory and sys.platform.startswith("linux"),
    )


def enable(model: nn.Module, paths: FastPaths, discriminator: Optional[nn.Module] = None) -> None:
    """Switch ``paths`` on a DeepVoxels model and its discriminator (and the others off). Parameters stay the
    same objects with the same values, and the state_dict is unchanged. ``heap_reuse`` is process-wide: once
    on, it stays on."""
    if paths.heap_reuse:
        reuse_heap()
    for net in (model.feature_extractor, model.rendering_net):
        _set_2d_layout(net, paths.channels_last_2d)
    if discriminator is not None:  # its weights keep their layout, as the channels-last path was measured
        _set_2d_layout(discriminator, paths.channels_last_2d, weights=False)
    model.recompute_cheap_layers = paths.recompute_cheap_layers
    model.recompute_view_volume = paths.recompute_view_volume
    model.feature_extractor.recompute_full_resolution = paths.recompute_full_resolution
    model.rendering_net.recompute_full_resolution = paths.recompute_full_resolution
    for module in model.modules():
        if type(module) in (nn.Conv3d, OneDNNConv3d) and module.kernel_size == (3, 3, 3):
            module.__class__ = OneDNNConv3d if paths.onednn_conv3d else nn.Conv3d


# glibc's mallopt() parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_INT_MAX = 2 ** 31 - 1


def reuse_heap() -> bool:
    """Make glibc's malloc serve large blocks from its heap and keep freed memory for reuse: no block gets a
    mapping of its own (by default glibc maps every block above its threshold, which starts at 128 KiB and
    rises with each freed mapped block up to 32 MiB), and free memory at the top of the heap is kept (up to
    2 GiB) rather than returned to the kernel. Both would otherwise make the kernel zero-fill the same pages,
    one fault per 4 KiB, at every step. Peak memory grows by whatever gaps the heap cannot fill.

    Returns False where the C library has no ``mallopt`` or refuses a setting. Under a preloaded allocator
    (jemalloc, tcmalloc) it sets glibc's unused heap and has no effect."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _INT_MAX))


def _channels_last_input(_module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(memory_format=torch.channels_last),) + tuple(args[1:])


def _set_2d_layout(net: nn.Module, channels_last: bool, weights: bool = True) -> None:
    """Give ``net`` channels-last input and store its 4-D weights so too (else every convolution and its
    backward would copy them into the input's layout), or put both back to (N, C, H, W)."""
    hook = getattr(net, "_channels_last_hook", None)
    if hook is not None:
        hook.remove()
    if weights:
        net.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    net._channels_last_hook = net.register_forward_pre_hook(_channels_last_input) if channels_last else None


def compile_networks(model: nn.Module, discriminator: Optional[nn.Module] = None) -> None:
    """torch.compile the convolutional networks in place (state_dict keys unchanged). Use with the savers
    off (``choose(compiled=True)``): their hooks would break the compiled graphs."""
    names = ("feature_extractor", "rendering_net", "occlusion_net", "depth_collapse_net", "inpainting_net",
             "integration_net")
    for net in [getattr(model, n) for n in names if hasattr(model, n)] + [discriminator]:
        if net is not None:
            net.compile()


def adam(params: Iterable[nn.Parameter], lr: float, paths: FastPaths) -> torch.optim.Adam:
    """``torch.optim.Adam`` with its defaults (the original's optimizer), fused when ``paths`` says so."""
    return torch.optim.Adam(params, lr=lr, fused=True) if paths.fused_adam else torch.optim.Adam(params, lr=lr)


# The gradients the parameter-wise step holds back before it steps their parameters and frees them: a step
# call costs Python work whatever its size, so parameters are stepped in batches of about this many bytes.
STEP_IN_BACKWARD_BATCH_BYTES = 16 * 2 ** 20


class GeneratorStepInBackward:
    """Used as ``with stepper: loss.backward()``: while armed, parameters are stepped by ``optimizer`` as soon
    as their gradients are complete, in batches of about ``STEP_IN_BACKWARD_BATCH_BYTES`` of gradients, which
    are then freed; the last batch when the backward pass has finished. The update is the same as one step
    after the backward pass. Inert (the caller steps after the backward) unless ``enabled``."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter], enabled: bool):
        self.optimizer, self.enabled, self._armed = optimizer, enabled, False
        self._group = {id(p): i for i, group in enumerate(optimizer.param_groups) for p in group["params"]}
        self._ready: list[nn.Parameter] = []
        self._ready_bytes = 0
        if enabled:
            for param in params:
                param.register_post_accumulate_grad_hook(self._on_gradient)

    def _on_gradient(self, param: nn.Parameter) -> None:
        if self._armed:
            self._ready.append(param)
            self._ready_bytes += param.grad.numel() * param.grad.element_size()
            if self._ready_bytes >= STEP_IN_BACKWARD_BATCH_BYTES:
                self._step_ready()

    def _step_ready(self) -> None:
        """Step the parameters whose gradients are ready, and free those gradients: each group lends the
        optimizer a list of just its ready parameters for the call."""
        groups = self.optimizer.param_groups
        lists = [group["params"] for group in groups]
        try:
            for i, group in enumerate(groups):
                group["params"] = [p for p in self._ready if self._group[id(p)] == i]
            self.optimizer.step()
        finally:
            for group, params in zip(groups, lists):
                group["params"] = params
        for param in self._ready:
            param.grad = None
        self._ready, self._ready_bytes = [], 0

    def __enter__(self) -> "GeneratorStepInBackward":
        self._armed = self.enabled
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self._armed = False
        try:
            if exc_type is None and self._ready:
                self._step_ready()
        finally:
            self._ready, self._ready_bytes = [], 0


# ATen runs a CPU convolution through oneDNN only when batch * channels * (first spatial extent) * (second
# spatial extent) exceeds this (``use_mkldnn`` in aten/src/ATen/native/Convolution.cpp), or for kernels wider
# than 3, or batches above 1. Below it a 3D convolution takes the im2col ``slow_conv3d`` path. A test checks
# which kernel runs on either side of it, so a change in PyTorch shows up there.
ONEDNN_MIN_SIZE = 20480


def _largest_axes_first(x: torch.Tensor) -> tuple[int, int, int]:
    """Spatial axes (2, 3, 4 of a 5-D tensor) reordered so that the two largest come first."""
    return tuple(sorted((2, 3, 4), key=lambda axis: -x.shape[axis]))  # sorted() is stable: ties keep order


class OneDNNConv3d(nn.Conv3d):
    """``nn.Conv3d`` that runs on CPU through oneDNN in the channels-last (N, D, H, W, C) layout; the same
    parameters and result up to float rounding.

    * For a batch of one with a 3^3 kernel, ATen picks its kernel from the first two spatial extents only
      (``ONEDNN_MIN_SIZE``), and the view volumes with few channels fall below it. A convolution does not
      depend on the order of the spatial axes, so input and kernel are permuted together (largest extents
      first) and the output permuted back; when that is not enough, all-zero input channels (and zero kernel
      slices) are appended, which add 0 to every sum.
    * oneDNN's kernels for few channels are faster in channels-last than in (N, C, D, H, W), which it would
      otherwise reorder to blocked channels. The output stays channels-last, so the norms, activations and
      pads after it feed the next convolution without a copy.
    """

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if x.device.type != "cpu" or x.dim() != 5 or self.padding_mode != "zeros" or self.groups != 1 \
                or isinstance(self.padding, str):
            return super()._conv_forward(x, weight, bias)
        order = (2, 3, 4)
        if x.shape[0] == 1 and max(self.kernel_size) <= 3:
            order = _largest_axes_first(x)
            plane = x.shape[0] * x.shape[order[0]] * x.shape[order[1]]
            if x.shape[1] * plane <= ONEDNN_MIN_SIZE:
                extra = ONEDNN_MIN_SIZE // plane + 1 - x.shape[1]
                if extra > x.shape[1]:  # would more than double the work: the slow kernel is cheaper
                    return super()._conv_forward(x, weight, bias)
                x = torch.cat([x, x.new_zeros(x.shape[0], extra, *x.shape[2:])], dim=1)
                weight = torch.cat([weight, weight.new_zeros(weight.shape[0], extra, *weight.shape[2:])], dim=1)
        axes = (0, 1, *order)
        spatial = [axis - 2 for axis in order]
        out = nn.functional.conv3d(x.permute(axes).contiguous(memory_format=torch.channels_last_3d),
                                   weight.permute(axes), bias, [self.stride[i] for i in spatial],
                                   [self.padding[i] for i in spatial], [self.dilation[i] for i in spatial], 1)
        back = [2 + order.index(axis) for axis in (2, 3, 4)]
        return out.permute(0, 1, *back).contiguous(memory_format=torch.channels_last_3d)
