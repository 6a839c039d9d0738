"""The fast paths (performance.py) must not change a single computed value: gradients are compared bit for bit;
and the CPU kernel they steer to is the one that runs."""
import contextlib
import dataclasses
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

import data_util
from deep_voxels import DeepVoxels
from projection import ProjectionHelper
import performance
import recompute as savers
from conftest import REPO_ROOT
from performance import FastPaths

SIDE, GRID, MAP = 128, 16, 64
FOCAL = 109.375 * 2  # 128 px images; the 64 px feature maps use half of it


def _geometry(device: torch.device = torch.device("cpu")) -> ProjectionHelper:
    def intrinsic(focal, centre):
        return np.array([[focal, 0, centre, 0], [0, focal, centre, 0], [0, 0, 1, 0], [0, 0, 0, 1]], np.float64)
    near = math.sqrt(3) / 2
    return ProjectionHelper(lifting_intrinsic=intrinsic(FOCAL / 2, MAP / 2), projection_intrinsic=intrinsic(
        FOCAL / 2, MAP / 2), projection_image_dims=[MAP, MAP], lifting_image_dims=[MAP, MAP], depth_min=0.0,
        depth_max=1.0 + near, grid_dims=[GRID] * 3, voxel_size=1.0 / GRID, near_plane=near,
        frustum_depth=2 * GRID, grid2world=torch.eye(4, device=device))


def _pose(azimuth: float) -> torch.Tensor:
    return torch.from_numpy(data_util.look_at(data_util.spherical_position(azimuth, 30.0, 1.6)).astype(np.float32))


def _train_step_grads(cheap: bool, heavy: bool, device: torch.device) -> tuple[dict, torch.Tensor]:
    """One train-mode forward and backward of a small model from a fixed state and fixed dropout masks."""
    torch.manual_seed(0)
    model = DeepVoxels(SIDE, [MAP, MAP], [MAP, MAP], [GRID] * 3, num_grid_feats=8, nf0=8)
    model.deepvoxels.normal_(0.0, 0.1)
    model.to(device).train()
    performance.enable(model, FastPaths(recompute_cheap_layers=cheap, recompute_full_resolution=heavy,
                                        recompute_view_volume=heavy))
    geometry = _geometry(device)
    image = (torch.rand(1, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1)) - 0.5).to(device)
    lift = geometry.lifting_indices(_pose(0.0).to(device))
    projections = [geometry.projection_indices(_pose(a).to(device)) for a in (40.0, 80.0)]
    torch.manual_seed(2)  # dropout (every device's generator)
    images, depths = model(image, [p[0] for p in projections], [p[1] for p in projections], *lift)
    weights = torch.rand(images[0].shape, generator=torch.Generator().manual_seed(3)).to(device)
    loss = sum((img * weights).sum() for img in images) + sum(d.sum() for d in depths)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    return grads, buffers


@pytest.mark.parametrize("heavy", [False, True], ids=["cheap_layers", "with_save_memory"])
def test_memory_savers_leave_gradients_and_buffers_bit_identical(monkeypatch, heavy, device):
    remade, runs = [], []
    make, run = savers._Recipe.make, savers._RunOnceThenRecompute.__call__

    def counting_make(self):
        remade.append(type(self.layer))
        return make(self)

    def counting_run(self, x):
        runs.append(self.calls)
        return run(self, x)

    monkeypatch.setattr(savers._Recipe, "make", counting_make)
    monkeypatch.setattr(savers._RunOnceThenRecompute, "__call__", counting_run)
    grads_on, buffers_on = _train_step_grads(cheap=True, heavy=heavy, device=device)
    kinds = {nn.ReflectionPad2d, nn.ReplicationPad3d, nn.BatchNorm2d, nn.BatchNorm3d, nn.ReLU, nn.LeakyReLU,
             nn.Dropout2d}
    assert {kind for kind in kinds for t in remade if issubclass(t, kind)} == kinds, \
        "a layer kind was kept instead of made again"
    # Feature extractor once; per target view the view volume and the rendering net's full-resolution
    # layers: each segment runs once forward and once more in the backward pass.
    assert sorted(runs) == ([0] * 5 + [1] * 5 if heavy else [])
    remade.clear()
    runs.clear()
    grads_off, buffers_off = _train_step_grads(cheap=False, heavy=False, device=device)
    assert not remade and not runs
    assert grads_on.keys() == grads_off.keys()
    for name in grads_on:
        assert torch.equal(grads_on[name], grads_off[name]), name
    for name in buffers_on:  # the updated grid and the BatchNorm running statistics
        assert torch.equal(buffers_on[name], buffers_off[name]), name


def _conv_chain() -> nn.Sequential:
    """A convolution and the cheap layers after it, as in the up blocks: only its output needs keeping."""
    torch.manual_seed(0)
    from pytorch_prototyping import ReflectionPad2d
    return nn.Sequential(nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4), nn.ReLU(True), nn.Dropout2d(0.5),
                         ReflectionPad2d(1), nn.Conv2d(4, 3, 3)).train()


def _watch_outputs(net: nn.Module) -> list:
    outputs = []
    for layer in list(net)[1:5]:
        layer.register_forward_hook(lambda _m, _i, out: outputs.append(StorageWeakRef(out.untyped_storage())))
    return outputs


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16_autocast"])
def test_cheap_layer_outputs_are_freed_and_made_again_exactly(monkeypatch, amp, device):
    placeholders = []

    def poisoned(self):  # the padding's backward must not read the values of its saved input
        placeholders.append(self.size)
        return torch.full(self.size, float("nan"), dtype=self.dtype, device=self.device).as_strided(
            self.size, self.stride)

    monkeypatch.setattr(savers._ShapeOnly, "tensor", poisoned)
    made = []
    make = savers._Recipe._make
    monkeypatch.setattr(savers._Recipe, "_make", lambda self: made.append(type(self.layer).__name__) or make(self))
    nets = {recompute: _conv_chain().to(device) for recompute in (False, True)}
    watched = _watch_outputs(nets[True])
    x = torch.randn(2, 2, 8, 8).to(device)
    grads, outs = {}, {}
    for recompute, net in nets.items():
        inp = x.clone().requires_grad_()
        torch.manual_seed(5)  # the same channel dropout mask
        saver = savers.recompute_cheap_layers(net) if recompute else contextlib.nullcontext()
        with saver, torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = net(inp)
        torch.manual_seed(6)  # the backward pass must not depend on the generator's state
        outs[recompute] = out.detach()
        grads[recompute] = torch.autograd.grad(out.float().square().sum(), [inp, *net.parameters()])
        if recompute:
            # BatchNorm, ReLU (in place, so the same storage), dropout and padding outputs all died with the
            # forward pass; only the convolution's output, which BatchNorm keeps, stayed.
            assert all(ref.expired() for ref in watched), "a cheap layer's output outlived the forward pass"
    assert placeholders == [torch.Size([2, 4, 8, 8])]
    # Each output made once: the ReLU's, needed by the last convolution's and by its own backward, is kept
    # in between; BatchNorm's is overwritten by the in-place ReLU and made only for it.
    assert sorted(made) == ["BatchNorm2d", "Dropout2d", "ReLU", "ReflectionPad2d"]
    assert torch.equal(outs[True], outs[False])
    for a, b in zip(grads[True], grads[False]):
        assert torch.equal(a, b)
    for a, b in zip(nets[True].buffers(), nets[False].buffers()):
        assert torch.equal(a, b)  # running statistics updated once


def test_kept_input_changed_in_place_is_an_error():
    net = _conv_chain()
    x = torch.randn(2, 2, 8, 8, requires_grad=True)
    with savers.recompute_cheap_layers(net):
        hidden = net[0](x)
        out = net[1:](hidden)
    with torch.no_grad():
        hidden.mul_(2.0)  # BatchNorm's input, from which the later outputs are made again
    with pytest.raises(RuntimeError, match="modified"):
        out.sum().backward()


def test_parameters_changed_before_backward_are_an_error():
    net = _conv_chain()
    with savers.recompute_cheap_layers(net):
        out = net(torch.randn(2, 2, 8, 8, requires_grad=True))
    with torch.no_grad():
        net[1].weight.add_(1.0)  # the BatchNorm whose output the last convolution needs
    with pytest.raises(RuntimeError, match="parameters"):
        out.sum().backward()


def test_recompute_is_inert_without_gradients():
    net = _conv_chain()
    with torch.no_grad(), savers.recompute_cheap_layers(net):
        out = net(torch.randn(2, 2, 8, 8))
    assert out.grad_fn is None
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())


def _training_after_steps(step_in_backward: bool, device: torch.device, steps: int = 2, **paths):
    """Two training steps of a small model through ``run_deepvoxels.train_step`` with the default fast paths,
    except as given."""
    import options
    import run_deepvoxels
    argv = ["--train_test", "train", "--data_root", "unused", "--logging_root", "unused", "--img_sidelength",
            str(SIDE), "--grid_dim", str(GRID), "--num_grid_feats", "8", "--nf0", "8", "--lr", "1e-3"]
    opt = options.parse_args(argv)
    torch.manual_seed(0)
    model, discriminator = run_deepvoxels.build_networks(opt, device)
    chosen = performance.choose(device, SIDE)
    assert chosen.step_in_backward == (device.type == "cpu")  # single process, no fp16 scaler
    chosen = dataclasses.replace(chosen, step_in_backward=step_in_backward, **paths)
    training = run_deepvoxels.build_training(opt, device, model, discriminator, paths=chosen)
    model.train()
    discriminator.train()
    geometry = _geometry(device)
    gen = torch.Generator().manual_seed(1)
    images = [(torch.rand(1, 3, SIDE, SIDE, generator=gen) - 0.5).to(device) for _ in range(3)]
    poses = [_pose(a).to(device) for a in (0.0, 40.0, 80.0)]
    torch.manual_seed(2)
    for _ in range(steps):
        run_deepvoxels.train_step(training, images[0], geometry.lifting_indices(poses[0]),
                                  [geometry.projection_indices(p) for p in poses[1:]], images[1:])
    return training


def _assert_same_training_state(a, b) -> None:
    """Parameters, buffers and both optimizers' state of two trainers, bit for bit."""
    for (name, x), y in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(x, y), name
        assert x.grad is None and y.grad is None  # freed after the step either way
    for (name, x), y in zip(a.model.named_buffers(), b.model.buffers()):
        assert torch.equal(x, y), name
    for (name, x), y in zip(a.discriminator.named_parameters(), b.discriminator.parameters()):
        assert torch.equal(x, y), name
    for which in ("optimizer_g", "optimizer_d"):
        state_a, state_b = getattr(a, which).state_dict(), getattr(b, which).state_dict()
        assert state_a["state"].keys() == state_b["state"].keys(), which
        for key, per_param in state_a["state"].items():
            assert per_param.keys() == state_b["state"][key].keys(), (which, key)
            for field, value in per_param.items():
                assert torch.equal(value, state_b["state"][key][field]), (which, key, field)


@pytest.mark.parametrize("batch_bytes", [0, 2 ** 16, None])
def test_generator_step_in_backward_matches_one_step_after_backward(device, batch_bytes, monkeypatch):
    """Stepped parameter by parameter (0), in batches, and in the default batches (None): the same state as
    one step after the backward pass, bit for bit; no batch holds more gradients than its size allows."""
    if batch_bytes is not None:
        monkeypatch.setattr(performance, "STEP_IN_BACKWARD_BATCH_BYTES", batch_bytes)
    batches = []
    step_ready = performance.GeneratorStepInBackward._step_ready

    def counted(stepper):
        batches.append([p.grad.numel() * p.grad.element_size() for p in stepper._ready])
        step_ready(stepper)

    monkeypatch.setattr(performance.GeneratorStepInBackward, "_step_ready", counted)
    in_backward = _training_after_steps(True, device)
    steps = 2
    limit = performance.STEP_IN_BACKWARD_BATCH_BYTES
    # A batch is stepped as soon as it reaches the limit: without its last gradient it was below it.
    assert all(len(sizes) == 1 or sum(sizes[:-1]) < limit for sizes in batches)
    if device.type == "cpu" and batch_bytes is not None:
        assert len(batches) > steps  # several batches per backward pass: parameters stepped during it
    _assert_same_training_state(in_backward, _training_after_steps(False, device))


def test_fast_path_defaults_by_device():
    """CPU: cheap recompute where the outermost 2D activations are large, the generator stepped in its backward pass, oneDNN 3D convolutions;
    a GPU: the savers only with --save_memory; torchrun and fp16's loss scaler: no parameter-wise step."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    for side, nf0, cheap in ((128, 64, False), (256, 64, False), (512, 16, False), (512, 32, True), (512, 64, True)):
        assert performance.choose(cpu, side, nf0=nf0).recompute_cheap_layers is cheap, (side, nf0)
        assert performance.choose(gpu, side, nf0=nf0).recompute_cheap_layers is False, (side, nf0)
    for device in (cpu, gpu):
        plain, saving = performance.choose(device, 512), performance.choose(device, 512, save_memory=True)
        assert saving.recompute_cheap_layers and saving.recompute_full_resolution and saving.recompute_view_volume
        assert not plain.recompute_full_resolution and not plain.recompute_view_volume
        assert plain.step_in_backward is (device.type == "cpu") and saving.step_in_backward
        assert not performance.choose(device, 512, save_memory=True, distributed=True).step_in_backward
        assert not performance.choose(device, 512, save_memory=True, loss_scaling=True).step_in_backward
        assert plain.fused_adam
    assert performance.choose(cpu, 512).onednn_conv3d and not performance.choose(gpu, 512).onednn_conv3d
    for flags, wide in ((frozenset({"avx2", "fma"}), False), (frozenset({"avx2", "avx512f"}), True)):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(performance, "cpu_flags", lambda flags=flags: flags)
            assert performance.choose(cpu, 128).channels_last_2d is wide
            assert performance.choose(cpu, 512, nf0=16).channels_last_2d is wide
            # Channels-last where the model only renders, at every width; NCHW in training, unless AVX-512.
            for nf0 in (8, 64):
                assert performance.choose(cpu, 512, nf0=nf0, training=False).channels_last_2d, nf0
                assert performance.choose(cpu, 512, nf0=nf0).channels_last_2d is wide, nf0
            assert performance.choose(gpu, 128).channels_last_2d
            # Winograd's 3x3 convolutions where the model only renders on an AVX2 CPU, as measured.
            assert performance.choose(cpu, 512, training=False).winograd_conv2d is not wide
            assert not performance.choose(cpu, 512, training=False, compiled=True).winograd_conv2d
            assert not performance.choose(cpu, 512).winograd_conv2d
            assert not performance.choose(gpu, 512, training=False).winograd_conv2d
    compiled = performance.choose(cpu, 512, save_memory=True, compiled=True)
    assert not (compiled.recompute_cheap_layers or compiled.recompute_full_resolution or compiled.recompute_view_volume)
    assert performance.choose(cpu, 128).heap_reuse is sys.platform.startswith("linux")
    assert not performance.choose(cpu, 512, save_memory=True).heap_reuse
    assert not performance.choose(gpu, 512).heap_reuse


# Run in a child process: the heap setting is process-wide. Fills and frees a 64 MiB tensor over and over and
# prints the page faults of the last fill.
_FAULTS_OF_A_REALLOCATED_BLOCK = """
import resource, sys, torch, performance
if sys.argv[1] == "reuse":
    assert performance.reuse_heap()
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.ones(16 * 2 ** 20)
    del block
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_heap_reuse_serves_freed_large_blocks_again_without_page_faults():
    """Under glibc's defaults a 64 MiB block is a mapping of its own, so each new one faults on every 4 KiB page
    (16384 of them). With ``reuse_heap`` the heap hands out freed memory again, its pages already there."""
    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", _FAULTS_OF_A_REALLOCATED_BLOCK, mode], cwd=REPO_ROOT,
                             capture_output=True, text=True, check=True).stdout
        return int(out.split()[-1])
    pages = 64 * 2 ** 20 // 4096
    assert faults("default") > pages // 2
    assert faults("reuse") < pages // 20


def test_enable_swaps_only_the_3x3x3_convolutions_and_keeps_the_state_dict():
    torch.manual_seed(0)
    model = DeepVoxels(SIDE, [MAP, MAP], [MAP, MAP], [GRID] * 3, num_grid_feats=8, nf0=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    convs = [m for m in model.modules() if isinstance(m, nn.Conv3d) and not isinstance(m, nn.ConvTranspose3d)]
    performance.enable(model, FastPaths(onednn_conv3d=True))
    assert {type(m) for m in convs if m.kernel_size == (3, 3, 3)} == {performance.OneDNNConv3d}
    assert {type(m) for m in convs if m.kernel_size != (3, 3, 3)} == {nn.Conv3d}  # the stride-2 4^3 ones
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    performance.enable(model, FastPaths())
    assert {type(m) for m in convs} == {nn.Conv3d}


def _kernels_run(conv: nn.Module, x: torch.Tensor) -> set:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof, torch.no_grad():
        conv(x)
    return {event.key for event in prof.key_averages()}


@pytest.mark.parametrize("channels,expect_slow", [(5, True), (6, False)], ids=["at", "above"])
def test_onednn_threshold_is_where_aten_switches_kernels(channels, expect_slow):
    """``performance.ONEDNN_MIN_SIZE`` copies a threshold from inside ATen. On a (1, C, 64, 64, 20) volume
    batch * C * 64 * 64 equals it for C = 5 and exceeds it for C = 6: plain nn.Conv3d must run the im2col kernel
    at it and oneDNN above, and OneDNNConv3d must run oneDNN on both sides, with the same result."""
    assert 5 * 64 * 64 == performance.ONEDNN_MIN_SIZE
    torch.manual_seed(0)
    plain = nn.Conv3d(channels, 3, 3)
    fast = performance.OneDNNConv3d(channels, 3, 3)
    fast.load_state_dict(plain.state_dict())
    x = torch.randn(1, channels, 64, 64, 20)  # (D, H, W): the first two spatial extents are 64 and 64
    plain_kernels, fast_kernels = _kernels_run(plain, x), _kernels_run(fast, x)
    assert ("aten::slow_conv3d_forward" in plain_kernels) is expect_slow, plain_kernels
    assert ("aten::mkldnn_convolution" in plain_kernels) is not expect_slow, plain_kernels
    assert "aten::mkldnn_convolution" in fast_kernels and "aten::slow_conv3d_forward" not in fast_kernels
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("side", [24, 40], ids=["zero-channels-appended", "as-is"])
def test_onednn_conv3d_returns_input_gradients_channels_last_in_the_inputs_axis_order(side):
    """A view volume (D smaller than H and W) is convolved with its spatial axes reordered. The gradient of
    its input must come back channels-last in the input's own order: a replication pad's backward, the layer
    before every such convolution, copies any other layout to (N, C, D, H, W) first. Values as nn.Conv3d's."""
    torch.manual_seed(0)
    plain = nn.Conv3d(17, 4, 3)
    fast = performance.OneDNNConv3d(17, 4, 3)
    fast.load_state_dict(plain.state_dict())
    x = torch.randn(1, 17, 10, side, side).contiguous(memory_format=torch.channels_last_3d)
    assert performance._largest_axes_first(x) != (2, 3, 4)
    grads = []
    for conv in (plain, fast):
        leaf = x.clone().requires_grad_()
        pad = nn.ReplicationPad3d(1)(leaf)
        reaching_pad = []
        pad.register_hook(reaching_pad.append)  # the gradient as the pad's backward receives it
        conv(pad).square().sum().backward()
        grads.append((reaching_pad[0], leaf.grad))
    assert grads[1][0].is_contiguous(memory_format=torch.channels_last_3d)
    for ours, reference in zip(grads[1], grads[0]):
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def _winograd_pair(in_channels: int, out_channels: int, bias: bool) -> tuple[nn.Conv2d, nn.Conv2d]:
    plain = nn.Conv2d(in_channels, out_channels, 3, bias=bias)
    fast = performance.WinogradConv2d(in_channels, out_channels, 3, bias=bias)
    fast.load_state_dict(plain.state_dict())
    return plain, fast


@pytest.mark.parametrize("in_channels,out_channels,side,bias,channels_last", [
    (256, 32, 16, False, True), (64, 5, 10, True, False), (9, 7, 4, True, True), (300, 20, 2, False, True)])
def test_winograd_conv2d_is_the_convolution_up_to_float_rounding(in_channels, out_channels, side, bias,
                                                                  channels_last):
    """Without autograd, F(2x2, 3x3) against the convolution in float64: within a float32 rounding bound of the
    sums (|x| convolved with |w|), which a wrong transform, a flipped kernel or a misplaced block would exceed
    by orders of magnitude; the output is channels-last, as oneDNN's for a channels-last input."""
    torch.manual_seed(0)
    plain, fast = _winograd_pair(in_channels, out_channels, bias)
    x = torch.randn(2, in_channels, side + 2, side + 2)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ours = fast(x)
        exact = nn.functional.conv2d(x.double(), plain.weight.double(), None if not bias else plain.bias.double())
        magnitude = nn.functional.conv2d(x.double().abs(), plain.weight.double().abs()).max().item()
    assert ours.shape == exact.shape and ours.is_contiguous(memory_format=torch.channels_last)
    assert (ours.double() - exact).abs().max().item() <= 1e-6 * magnitude
    assert (ours.double() - exact).abs().max().item() > 0  # it did not run the direct convolution in float64


def test_winograd_conv2d_is_nn_conv2d_with_autograd_or_odd_sizes_and_follows_new_weights():
    """With autograd (training) or an odd output size the module is nn.Conv2d, bit for bit; the transformed
    kernel is made again when the weight changes (a checkpoint loaded into the model)."""
    torch.manual_seed(0)
    plain, fast = _winograd_pair(256, 8, True)
    x = torch.randn(1, 256, 8, 8, requires_grad=True)
    assert torch.equal(fast(x), plain(x)) and fast(x).requires_grad
    with torch.no_grad():
        odd = torch.randn(1, 256, 7, 9)
        assert torch.equal(fast(odd), plain(odd))
        before = fast(x)
        plain.weight.mul_(-2.0)
        fast.load_state_dict(plain.state_dict())
        after, reference = fast(x), plain(x)
    torch.testing.assert_close(after, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after - plain.bias[:, None, None], -2.0 * (before - plain.bias[:, None, None]),
                               rtol=1e-5, atol=1e-5)


def test_enable_swaps_only_the_wide_3x3_convolutions_to_winograd_and_back():
    torch.manual_seed(0)
    model = DeepVoxels(SIDE, [MAP, MAP], [MAP, MAP], [GRID] * 3, num_grid_feats=8, nf0=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    convs = [m for m in model.modules() if type(m) is nn.Conv2d]
    performance.enable(model, FastPaths(winograd_conv2d=True))
    assert not any(type(m) is performance.WinogradConv2d for m in convs)  # nf0 8: none as wide as 256
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(performance, "WINOGRAD_MIN_IN_CHANNELS", 64)
        performance.enable(model, FastPaths(winograd_conv2d=True))
        swapped = [m for m in convs if type(m) is performance.WinogradConv2d]
        assert swapped and all(m.kernel_size == (3, 3) and m.stride == (1, 1) and m.in_channels >= 64
                               for m in swapped)
        assert all(m.kernel_size != (3, 3) or m.in_channels < 64 for m in convs if type(m) is nn.Conv2d)
        assert model.state_dict().keys() == before.keys()
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        performance.enable(model, FastPaths())
    assert {type(m) for m in convs} == {nn.Conv2d}


def test_channels_last_2d_switches_weights_and_inputs_and_back():
    torch.manual_seed(0)
    model = DeepVoxels(SIDE, [MAP, MAP], [MAP, MAP], [GRID] * 3, num_grid_feats=8, nf0=8).eval()
    from losses import PatchDiscriminator
    disc = PatchDiscriminator(input_nc=3).eval()
    nets = (model.feature_extractor, model.rendering_net, disc)
    params = [p for net in nets for p in net.parameters()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    image = torch.rand(1, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1)) - 0.5
    with torch.no_grad():
        plain = [model.feature_extractor(image), disc(image)]
    seen = []
    first = model.feature_extractor.net[0].downs[0]  # the first layer sees what the hook made of the input
    first.register_forward_pre_hook(lambda _m, args: seen.append(
        args[0].is_contiguous(memory_format=torch.channels_last)))

    performance.enable(model, FastPaths(channels_last_2d=True), disc)
    weights = [p for net in nets[:2] for p in net.parameters() if p.dim() == 4]  # D's stay as they are
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    assert [p for net in nets for p in net.parameters()] == params  # the same objects: optimizers keep them
    same = [m for m in model.rendering_net.modules() if hasattr(m, "net") and hasattr(m, "weight")]
    assert same and all(m.weight is m.net[1].weight for m in same)  # Conv2dSame's checkpoint alias
    with torch.no_grad():
        fast = [model.feature_extractor(image), disc(image)]
    assert seen[-1] is True
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    performance.enable(model, FastPaths(), disc)
    assert all(p.is_contiguous() for p in weights)
    with torch.no_grad():
        model.feature_extractor(image)
    assert seen[-1] is False  # the hook is gone
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_rendering_gets_channels_last_features_so_stored_channels_last_weights_leave_the_pixels_alone():
    """Without autograd the view volume hands the rendering net channels-last features whatever the 2D layout
    setting, so storing its weights channels-last (test mode's choice on every CPU) changes no pixel."""
    torch.manual_seed(0)
    model = DeepVoxels(SIDE, [MAP, MAP], [MAP, MAP], [GRID] * 3, num_grid_feats=8, nf0=16).eval()
    model.deepvoxels.normal_(0.0, 0.1)
    geometry = _geometry()
    projections = [geometry.projection_indices(_pose(a)) for a in (40.0, 80.0)]
    inputs = []
    model.rendering_net.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
    renders = []
    for channels_last in (False, True):
        performance.enable(model, FastPaths(channels_last_2d=channels_last))
        with torch.no_grad():
            renders.append(model.render(model.inpaint(model.deepvoxels), [p[0] for p in projections],
                                        [p[1] for p in projections]))
    assert len(inputs) == 2 and all(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
                                    for x in inputs)
    for ours, reference in zip(renders[1], renders[0]):
        assert torch.equal(ours, reference)


def test_pads_keep_the_input_dtype_under_autocast():
    from pytorch_prototyping import ReflectionPad2d, ReplicationPad3d
    for ours, plain, shape in ((ReflectionPad2d(1), nn.ReflectionPad2d(1), (1, 2, 5, 6)),
                               (ReplicationPad3d(1), nn.ReplicationPad3d(1), (1, 2, 3, 4, 5))):
        x = torch.randn(shape).bfloat16()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            padded, promoted = ours(x), plain(x)
        assert padded.dtype == torch.bfloat16 and promoted.dtype == torch.float32  # autocast's own choice
        assert torch.equal(padded.float(), promoted)  # padding copies values: identical either way


def test_training_view_volume_is_kept_once_and_channels_last(monkeypatch):
    """The weighted mean reads the frustum inside the occlusion net's input (one full-size copy kept for the
    backward pass, not two), and every 3D convolution of the occlusion net gets channels-last input (a
    layout that falls back to (B, C, D, H, W) costs a copy per convolution)."""
    import deep_voxels
    torch.manual_seed(0)
    model = DeepVoxels(SIDE, [MAP, MAP], [MAP, MAP], [GRID] * 3, num_grid_feats=8, nf0=8).train()
    performance.enable(model, performance.choose(torch.device("cpu"), SIDE))
    seen = {"volumes": [], "frusta": [], "conv_inputs": []}
    weigh = model.occlusion_net.weigh
    monkeypatch.setattr(model.occlusion_net, "weigh", lambda v: (seen["volumes"].append(v), weigh(v))[1])
    mean = deep_voxels.visibility_weighted_mean
    monkeypatch.setattr(deep_voxels, "visibility_weighted_mean",
                        lambda w, f: (seen["frusta"].append(f), mean(w, f))[1])
    for conv in model.occlusion_net.modules():
        if isinstance(conv, nn.Conv3d):
            conv.register_forward_pre_hook(lambda mod, args: seen["conv_inputs"].append(args[0]))
    geometry = _geometry()
    image = torch.rand(1, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1)) - 0.5
    projections = [geometry.projection_indices(_pose(a)) for a in (40.0, 80.0)]
    _, depths = model(image, [p[0] for p in projections], [p[1] for p in projections],
                      *geometry.lifting_indices(_pose(0.0)))
    assert len(seen["volumes"]) == len(seen["frusta"]) == 2  # training renders one view per call
    for volume, frustum, depth in zip(seen["volumes"], seen["frusta"], depths):
        assert frustum.untyped_storage().data_ptr() == volume.untyped_storage().data_ptr()
        assert torch.equal(frustum, volume[:, 1:])
        # The depth map's product saves its own copy of the depth channel: the loss ignores the depth map, so
        # that backward node never runs, and a view would hold the whole volume until the graph is freed.
        node = depth.grad_fn
        while node.name() != "MulBackward0":
            node = node.next_functions[0][0]
        saved = [getattr(node, name) for name in ("_saved_self", "_saved_other")]
        saved = [t for t in saved if t is not None]  # an input without gradient needs none of the other's
        assert saved and all(t.untyped_storage().data_ptr() != volume.untyped_storage().data_ptr() for t in saved)
    assert seen["conv_inputs"]
    for x in seen["conv_inputs"]:
        assert x.is_contiguous(memory_format=torch.channels_last_3d), tuple(x.shape)


def test_batchnorm_called_in_both_layouts_before_one_backward_matches_nn_batchnorm():
    """A BatchNorm module that sees an (N, C, H, W) input (ATen's kernel, which keeps the running statistics for
    its backward pass) and then a channels-last one (the accurate statistics) before the first call's backward,
    as the discriminator would if its inputs came in both layouts: the backward runs, and gradients and running
    statistics are nn.BatchNorm2d's."""
    from pytorch_prototyping import norm
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6)
    ours, ref = norm.BatchNorm2d(4), nn.BatchNorm2d(4)
    grads = []
    for bn, second in ((ours, x.contiguous(memory_format=torch.channels_last)), (ref, x)):
        first = x.clone().requires_grad_()
        out = bn(first)
        bn(2.0 * second)
        out.square().sum().backward()
        grads.append(first.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-6, atol=1e-7)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 2
