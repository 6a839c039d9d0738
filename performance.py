"""Fast paths for training and rendering that leave every computed value as it is, behind one switchboard.

The method's code runs without any of them. ``choose`` picks the ones that pay on the device at hand and
``enable`` switches them on a model; the training script calls both once. Each is a field of ``FastPaths``,
so a test can run the same step with any of them off:

* ``recompute_cheap_layers``: outputs of BatchNorm, ReLU, dropout and padding layers are saved for the
  backward pass as recipes (the layer and its input) and made again there, bit for bit (``recompute.py``).
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
* ``winograd_conv2d``: in a model that only renders, the generator's wide 3x3 convolutions compute each 2x2
  block of outputs with Winograd's minimal filtering, 16 products per channel pair instead of 36, as 16
  batched matrix products (``WinogradConv2d``).
* ``heap_reuse``: glibc serves every block from its heap and keeps freed memory there for the next request,
  instead of mapping each large block afresh from the kernel, which fills it with zeros one page fault at a
  time, and unmapping it when it is freed (``reuse_heap``). Process-wide, and it stays on once set.

Which of these pay depends on the machine: on a GPU the savers' Python work is not hidden behind the
arithmetic; on a CPU the channels-last 2D kernels pay with AVX-512 and, with AVX2 alone, only when the
narrowest networks render (``choose`` reads the CPU's flags; the measurements are in docs/performance.md).

The recompute savers themselves live in ``recompute.py``.
"""
from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
from torch import nn


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


@dataclass
class FastPaths:
    recompute_cheap_layers: bool = False
    recompute_full_resolution: bool = False
    recompute_view_volume: bool = False
    step_in_backward: bool = False
    fused_adam: bool = False
    onednn_conv3d: bool = False
    channels_last_2d: bool = False
    winograd_conv2d: bool = False
    heap_reuse: bool = False


def choose(device: torch.device, img_sidelength: int, save_memory: bool = False, distributed: bool = False,
           loss_scaling: bool = False, compiled: bool = False, *, nf0: int = 64, training: bool = True
           ) -> FastPaths:
    """The fast paths for a run (``nf0``: the width of the 2D U-Nets' outermost layers; ``training`` False for
    a model that only renders: test mode, the checkpoint viewer). On a GPU the savers' Python work per layer
    and per parameter is not hidden behind the arithmetic as on a CPU, so there they come only with
    ``--save_memory``. The parameter-wise step cannot run under DDP (which all-reduces
    gradients after the hooks) nor with fp16's loss scaler (which must see every gradient first); under
    torch.compile the compiler decides what is kept. Channels-last 2D networks pay on GPUs and with AVX-512.
    With AVX2 they are off in training, where oneDNN's channels-last backward kernels are slower than its NCHW
    ones and channels-last needs the accurate BatchNorm statistics (pytorch_prototyping/norm.py), and on in a
    model that only renders: there the view volume hands the rendering net channels-last features, oneDNN
    follows the input's layout, and weights stored channels-last are not copied so at every call (same
    pixels). In a model that only renders on an AVX2 CPU the wide 3x3 convolutions run as Winograd's, which
    PyTorch's oneDNN convolutions do not use; with AVX-512 their direct kernels come close enough to the
    matmul peak that it pays only on the smallest maps, and it stays off. On Linux CPUs the heap keeps its
    memory, since a step frees and allocates the same large blocks again and again, unless memory comes
    first (``save_memory``): the gaps the heap cannot fill raise the peak."""
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
        channels_last_2d=not cpu or wide_vectors or not training,
        winograd_conv2d=cpu and not wide_vectors and not training and not compiled,
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
        elif type(module) in (nn.Conv2d, WinogradConv2d) and WinogradConv2d.suits(module):
            module.__class__ = WinogradConv2d if paths.winograd_conv2d else nn.Conv2d


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


class _PermutedChannelsLast(torch.autograd.Function):
    """``x.permute(axes)`` copied to the channels-last layout, whose gradient is copied back channels-last in
    ``x``'s own axis order. With a plain ``permute(axes).contiguous(...)`` the layer before would receive a
    gradient strided in the permuted order, which a replication pad's backward first copies to (N, C, D, H, W)
    and then walks with its generic kernel. The values are the same either way; only their order in memory
    differs."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
        ctx.inverse = tuple(axes.index(axis) for axis in range(len(axes)))
        return x.permute(axes).contiguous(memory_format=torch.channels_last_3d)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.permute(ctx.inverse).contiguous(memory_format=torch.channels_last_3d), None


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
        order, extra = (2, 3, 4), 0
        if x.shape[0] == 1 and max(self.kernel_size) <= 3:
            order = _largest_axes_first(x)
            plane = x.shape[0] * x.shape[order[0]] * x.shape[order[1]]
            if x.shape[1] * plane <= ONEDNN_MIN_SIZE:
                extra = ONEDNN_MIN_SIZE // plane + 1 - x.shape[1]
                if extra > x.shape[1]:  # would more than double the work: the slow kernel is cheaper
                    return super()._conv_forward(x, weight, bias)
        axes = (0, 1, *order)
        spatial = [axis - 2 for axis in order]
        x, weight = _PermutedChannelsLast.apply(x, axes), weight.permute(axes)
        if extra:
            zeros = torch.empty((x.shape[0], extra, *x.shape[2:]), dtype=x.dtype, device=x.device,
                                memory_format=torch.channels_last_3d).zero_()
            x = torch.cat([x, zeros], dim=1).contiguous(memory_format=torch.channels_last_3d)
            weight = torch.cat([weight, weight.new_zeros(weight.shape[0], extra, *weight.shape[2:])], dim=1)
        out = nn.functional.conv3d(x, weight, bias, [self.stride[i] for i in spatial],
                                   [self.padding[i] for i in spatial], [self.dilation[i] for i in spatial], 1)
        back = [2 + order.index(axis) for axis in (2, 3, 4)]
        return out.permute(0, 1, *back).contiguous(memory_format=torch.channels_last_3d)


# Winograd pays where the matrix products dominate. With fewer input channels than this the layer is bound by
# memory traffic, and the transforms of its blocks cost more than the products they save (docs/performance.md).
WINOGRAD_MIN_IN_CHANNELS = 256

# F(2x2, 3x3)'s kernel transform (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks", 2016).
# Its input transform B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]] and output transform
# A^T = [[1, 1, 1, 0], [0, 1, -1, -1]] are written out as sums in ``_winograd_3x3``.
_WINOGRAD_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def _winograd_3x3(x: torch.Tensor, u: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Unpadded 3x3 convolution of ``x`` (N, C, H + 2, W + 2), H and W even, with the transformed kernel ``u``
    (16, C, K); (N, K, H, W) in the channels-last layout. Every 2x2 output block is A^T [U . (B^T d B)] A of
    its 4x4 input block d; the 16 elementwise products summed over channels are 16 matrix products. The
    transforms work in place where they can, so that at most the blocks and their products are held."""
    n, c, height, width = x.shape
    rows, cols, k = (height - 2) // 2, (width - 2) // 2, u.shape[2]
    nhwc = x.permute(0, 2, 3, 1)
    v = x.new_empty(4, 4, n, rows, cols, c)  # B^T d, then B^T d B, with every block's (i, j) in v[i, j]
    for j in range(4):
        d0, d1, d2, d3 = (nhwc[:, i:i + 2 * rows:2, j:j + 2 * cols:2] for i in range(4))
        torch.sub(d0, d2, out=v[0, j])
        torch.add(d1, d2, out=v[1, j])
        torch.sub(d2, d1, out=v[2, j])
        torch.sub(d1, d3, out=v[3, j])
    for i in range(4):
        e0, e1, e2, e3 = v[i]
        e0.sub_(e2)
        torch.sub(e1, e3, out=e3)
        e1_plus_e2 = e1 + e2
        e2.sub_(e1)
        e1.copy_(e1_plus_e2)
    m = torch.bmm(v.view(16, -1, c), u).view(4, 4, n, rows, cols, k)
    del v
    m[0].add_(m[1]).add_(m[2])  # A^T m: its two rows in m[0] and m[1]
    m[1].sub_(m[2]).sub_(m[3])
    out = x.new_empty(n, rows, 2, cols, 2, k)
    for r in range(2):  # then A^T along the other axis
        torch.add(m[r, 0] + m[r, 1], m[r, 2], out=out[:, :, r, :, 0])
        torch.sub(m[r, 1] - m[r, 2], m[r, 3], out=out[:, :, r, :, 1])
    out = out.view(n, 2 * rows, 2 * cols, k)
    if bias is not None:
        out += bias
    return out.permute(0, 3, 1, 2)


class WinogradConv2d(nn.Conv2d):
    """``nn.Conv2d`` (3x3, stride 1, unpadded as in ``Conv2dSame``) that, without autograd, in float32 on a
    CPU, computes each 2x2 block of outputs from its 4x4 block of inputs with Winograd's minimal filtering
    F(2x2, 3x3): 16 products per pair of channels instead of 36, summed over the input channels by 16 batched
    matrix products. The same parameters and result up to float rounding. With autograd or autocast, or for
    odd output sizes, it is ``nn.Conv2d``. The transformed kernel is kept until the weight changes."""

    @staticmethod
    def suits(conv: nn.Conv2d) -> bool:
        return conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (0, 0) \
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros" \
            and conv.in_channels >= WINOGRAD_MIN_IN_CHANNELS

    def _transformed_weight(self) -> torch.Tensor:
        key = (self.weight.data_ptr(), self.weight._version, self.weight.shape)
        cached = getattr(self, "_winograd_cache", None)
        if cached is None or cached[0] != key:
            g = torch.tensor(_WINOGRAD_G, dtype=torch.float64)
            u = torch.einsum("ai,kcij,bj->abck", g, self.weight.detach().double(), g)
            self._winograd_cache = (key, u.reshape(16, self.in_channels, self.out_channels).float().contiguous())
        return self._winograd_cache[1]

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 4 \
                or torch.is_autocast_enabled("cpu") or weight is not self.weight \
                or x.shape[2] < 4 or x.shape[3] < 4 or x.shape[2] % 2 or x.shape[3] % 2:
            return super()._conv_forward(x, weight, bias)
        return _winograd_3x3(x, self._transformed_weight(), bias)
