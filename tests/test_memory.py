"""Memory savers must not change a single computed value: gradients are compared bit for bit."""
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

import data_util
from deep_voxels import DeepVoxels
from projection import ProjectionHelper
from pytorch_prototyping import memory

SIDE, GRID, MAP = 128, 16, 64
FOCAL = 109.375 * 2  # 128 px images; the 64 px feature maps use half of it


def _geometry() -> ProjectionHelper:
    def intrinsic(focal, centre):
        return np.array([[focal, 0, centre, 0], [0, focal, centre, 0], [0, 0, 1, 0], [0, 0, 0, 1]], np.float64)
    near = math.sqrt(3) / 2
    return ProjectionHelper(lifting_intrinsic=intrinsic(FOCAL / 2, MAP / 2), projection_intrinsic=intrinsic(
        FOCAL / 2, MAP / 2), projection_image_dims=[MAP, MAP], lifting_image_dims=[MAP, MAP], depth_min=0.0,
        depth_max=1.0 + near, grid_dims=[GRID] * 3, voxel_size=1.0 / GRID, near_plane=near,
        frustum_depth=2 * GRID, grid2world=torch.eye(4))


def _pose(azimuth: float) -> torch.Tensor:
    return torch.from_numpy(data_util.look_at(data_util.spherical_position(azimuth, 30.0, 1.6)).astype(np.float32))


def _train_step_grads(recompute: bool) -> tuple[dict, torch.Tensor]:
    """One train-mode forward and backward of a small model from a fixed state and fixed dropout masks."""
    torch.manual_seed(0)
    model = DeepVoxels(SIDE, [MAP, MAP], [MAP, MAP], [GRID] * 3, num_grid_feats=8, nf0=8)
    model.deepvoxels.normal_(0.0, 0.1)
    model.train()
    model.save_memory(recompute)
    geometry = _geometry()
    image = torch.rand(1, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1)) - 0.5
    lift = geometry.lifting_indices(_pose(0.0))
    projections = [geometry.projection_indices(_pose(a)) for a in (40.0, 80.0)]
    torch.manual_seed(2)  # dropout
    images, depths = model(image, [p[0] for p in projections], [p[1] for p in projections], *lift)
    weights = torch.rand(images[0].shape, generator=torch.Generator().manual_seed(3))
    loss = sum((img * weights).sum() for img in images) + sum(d.sum() for d in depths)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    return grads, buffers


def test_memory_savers_leave_gradients_and_buffers_bit_identical(monkeypatch):
    rebuilt, runs = [], []
    rebuild, run = memory._Repad.rebuild, memory._RunOnceThenRecompute.__call__

    def counting_rebuild(self):
        rebuilt.append(self.layer)
        return rebuild(self)

    def counting_run(self, x):
        runs.append(self.calls)
        return run(self, x)

    monkeypatch.setattr(memory._Repad, "rebuild", counting_rebuild)
    monkeypatch.setattr(memory._RunOnceThenRecompute, "__call__", counting_run)
    grads_on, buffers_on = _train_step_grads(recompute=True)
    assert rebuilt, "no padded tensor was rebuilt: the saver did nothing"
    assert {type(layer) for layer in rebuilt} >= {nn.ReflectionPad2d, nn.ReplicationPad3d}
    # Feature extractor once; per target view the view volume and the rendering net's full-resolution
    # layers: each segment runs once forward and once more in the backward pass.
    assert sorted(runs) == [0] * 5 + [1] * 5
    rebuilt.clear()
    runs.clear()
    grads_off, buffers_off = _train_step_grads(recompute=False)
    assert not rebuilt and not runs
    assert grads_on.keys() == grads_off.keys()
    for name in grads_on:
        assert torch.equal(grads_on[name], grads_off[name]), name
    for name in buffers_on:  # the updated grid and the BatchNorm running statistics
        assert torch.equal(buffers_on[name], buffers_off[name]), name


def _pad_conv() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 1), nn.ReflectionPad2d(1), nn.Conv2d(4, 3, 3))


def test_padded_copy_is_freed_after_the_forward_pass():
    net = _pad_conv()
    padded = []
    net[1].register_forward_hook(lambda _m, _i, out: padded.append(StorageWeakRef(out.untyped_storage())))
    x = torch.randn(1, 2, 8, 8, requires_grad=True)
    kept = net(x)
    assert not padded[-1].expired(), "without the saver the convolution keeps the padded copy"
    with memory.recompute_padding(net):
        out = net(x)
    assert padded[-1].expired(), "the padded copy outlived the forward pass"
    (gx_kept,) = torch.autograd.grad(kept.square().sum(), x)
    (gx,) = torch.autograd.grad(out.square().sum(), x)
    assert torch.equal(gx, gx_kept)


def test_padding_input_changed_in_place_is_an_error():
    net = _pad_conv()
    x = torch.randn(1, 2, 8, 8)
    with memory.recompute_padding(net):
        hidden = net[0](x)
        out = net[2](net[1](hidden))
    with torch.no_grad():
        hidden.mul_(2.0)  # the padding's input, needed to rebuild the padded copy
    with pytest.raises(RuntimeError, match="modified"):
        out.sum().backward()


def test_recompute_padding_is_inert_without_gradients():
    net = _pad_conv()
    with torch.no_grad(), memory.recompute_padding(net):
        out = net(torch.randn(1, 2, 8, 8))
    assert out.grad_fn is None
    assert all(not hook for m in net.modules() for hook in (m._forward_hooks,))


def _trainer_after_steps(step_in_backward: bool, steps: int = 2):
    import run_deepvoxels
    argv = ["--train_test", "train", "--data_root", "unused", "--logging_root", "unused", "--img_sidelength",
            str(SIDE), "--grid_dim", str(GRID), "--num_grid_feats", "8", "--nf0", "8", "--lr", "1e-3"]
    opt = run_deepvoxels.parse_args(argv)
    torch.manual_seed(0)
    trainer = run_deepvoxels.Trainer(opt, torch.device("cpu"))
    assert trainer.step_in_backward  # single process, no fp16 scaler
    trainer.step_in_backward = step_in_backward
    trainer.train_mode()
    geometry = _geometry()
    gen = torch.Generator().manual_seed(1)
    images = [torch.rand(1, 3, SIDE, SIDE, generator=gen) - 0.5 for _ in range(3)]
    poses = [_pose(a) for a in (0.0, 40.0, 80.0)]
    torch.manual_seed(2)
    for _ in range(steps):
        trainer.step(images[0], geometry.lifting_indices(poses[0]),
                     [geometry.projection_indices(p) for p in poses[1:]], images[1:])
    return trainer


def test_generator_step_in_backward_matches_one_step_after_backward():
    fused, plain = _trainer_after_steps(True), _trainer_after_steps(False)
    for (name, a), b in zip(fused.model.named_parameters(), plain.model.parameters()):
        assert torch.equal(a, b), name
        assert a.grad is None and b.grad is None  # freed after the step either way
    for (name, a), b in zip(fused.model.named_buffers(), plain.model.buffers()):
        assert torch.equal(a, b), name
    state_fused, state_plain = fused.optimizer_g.state_dict(), plain.optimizer_g.state_dict()
    assert state_fused["state"].keys() == state_plain["state"].keys()
    for key, per_param in state_fused["state"].items():
        for field, value in per_param.items():
            assert torch.equal(value, state_plain["state"][key][field]), (key, field)
