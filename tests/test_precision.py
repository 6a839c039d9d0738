"""Under bf16 autocast, the ops whose rounding would compound stay in float32."""
import torch
from torch import nn

from custom_layers import IntegrationNet, OcclusionNet

GRID, FEATS = 8, 4


def _convs(module: nn.Module) -> list[nn.Conv3d]:
    return [m for m in module.modules() if isinstance(m, nn.Conv3d)]


def test_integration_blends_the_grid_in_float32_under_bf16():
    """A small update gate: (1 - u) in bf16 would move in steps of 2^-8 (relative error up to 2e-3)."""
    torch.manual_seed(0)
    net = IntegrationNet(FEATS, grid_dim=GRID).eval()
    with torch.no_grad():
        for conv in _convs(net):  # every gate logit is its bias; the candidate is relu(0) = 0
            conv.weight.zero_()
            if conv.bias is not None:
                conv.bias.zero_()
        _convs(net.update_old_net)[0].bias.fill_(-5.8)  # update gate ~0.003
    old = torch.rand(1, FEATS, GRID, GRID, GRID) + 0.5
    new = torch.rand(1, FEATS, GRID, GRID, GRID)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        state, update, reset = net(new, old)
    assert state.dtype == update.dtype == reset.dtype == torch.float32
    assert 0.002 < update.min() and update.max() < 0.004
    expected = (1 - update.double()) * old.double()
    torch.testing.assert_close(state.double(), expected, rtol=1e-6, atol=0)


def test_occlusion_weights_are_a_float32_softmax_under_bf16():
    torch.manual_seed(0)
    net = OcclusionNet(nf0=FEATS, occnet_nf=4, frustum_dims=(8, 8, 16)).eval()
    frustum = torch.randn(2, FEATS, 16, 8, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        weights, depth = net(frustum)
    assert weights.dtype == depth.dtype == torch.float32
    # A bf16 softmax sums to 1 only within ~1e-2; this one within float32 rounding.
    torch.testing.assert_close(weights.sum(dim=2), torch.ones(2, 1, 8, 8), rtol=0, atol=1e-6)
    with torch.no_grad():
        weights32, _ = net(frustum)
    assert (weights - weights32).abs().max() < 0.05 * weights32.max()  # same net, bf16 convolutions


def test_geometry_is_float32_under_autocast():
    """Autocast would run the pose transforms' matrix products in bf16: other voxels, moved coordinates."""
    import numpy as np

    import data_util
    from projection import ProjectionHelper
    intrinsic = np.array([[109.375, 0, 32, 0], [0, 109.375, 32, 0], [0, 0, 1, 0], [0, 0, 0, 1]], np.float64)
    near = float(np.sqrt(3) / 2)
    geometry = ProjectionHelper(lifting_intrinsic=intrinsic, projection_intrinsic=intrinsic,
                                projection_image_dims=[64, 64], lifting_image_dims=[64, 64], depth_min=0.0,
                                depth_max=1.0 + near, grid_dims=[16] * 3, voxel_size=1.0 / 16, near_plane=near,
                                frustum_depth=32, grid2world=torch.eye(4))
    pose = torch.from_numpy(data_util.look_at(data_util.spherical_position(35.0, 25.0, 1.7)).astype(np.float32))
    for method in (geometry.lifting_indices, geometry.projection_indices):
        lin, coords = method(pose)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lin_amp, coords_amp = method(pose)
        assert coords_amp.dtype == torch.float32
        assert torch.equal(lin_amp, lin) and torch.equal(coords_amp, coords)
