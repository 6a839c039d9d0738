"""Geometry tests in the PyTorch3D manner: hand-checked pixels, round trips, empty frusta, gradcheck."""
import math

import numpy as np
import pytest
import torch

import data_util
from projection import EmptyFrustumError, ProjectionHelper, lift_features, sample_frustum, unravel_index

G = 16
MAP = 64
FOCAL = 109.375
CENTRE = 32.0


def _helper(grid_dim=G, origin=(0.0, 0.0, 0.0), scale=1.0, near=math.sqrt(3) / 2):
    k = np.array([[FOCAL, 0, CENTRE, 0], [0, FOCAL, CENTRE, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=np.float64)
    grid2world = torch.eye(4)
    grid2world[:3, 3] = torch.tensor(origin)
    voxel = scale / grid_dim
    return ProjectionHelper(lifting_intrinsic=k, projection_intrinsic=k, projection_image_dims=[MAP, MAP],
                            lifting_image_dims=[MAP, MAP], depth_min=0.0, depth_max=grid_dim * voxel + near,
                            grid_dims=[grid_dim] * 3, voxel_size=voxel, near_plane=near,
                            frustum_depth=2 * grid_dim, grid2world=grid2world)


def _random_cameras(n, seed=0, radius=1.6, target=(0.0, 0.0, 0.0)):
    rng = np.random.RandomState(seed)
    poses = []
    for _ in range(n):
        az, el = rng.uniform(0, 360), rng.uniform(-60, 70)
        pos = data_util.spherical_position(az, el, radius) + np.asarray(target)
        poses.append(torch.from_numpy(data_util.look_at(pos, target=target).astype(np.float32)))
    return poses


def test_unravel_index_is_floor_division():
    dims = (5, 7, 3)
    lin = torch.arange(5 * 7 * 3)
    a, b, c = unravel_index(lin, dims)
    # numpy's C order is (slowest, ..., fastest): lin = a + 5*b + 35*c.
    cc, bb, aa = np.unravel_index(lin.numpy(), (3, 7, 5))
    assert np.array_equal(a.numpy(), aa) and np.array_equal(b.numpy(), bb) and np.array_equal(c.numpy(), cc)
    assert a.dtype == torch.int64


def test_point_on_optical_axis_lands_on_principal_point():
    """The grid centre voxel (G/2, G/2, G/2) sits at the grid origin; a camera looking at it sees it at (cx, cy)."""
    helper = _helper(origin=(0.2, -0.1, 0.05))
    for pose in _random_cameras(5, seed=1, target=(0.2, -0.1, 0.05)):
        lin, coords = helper.lifting_indices(pose)
        centre = G // 2 + G * (G // 2) + G * G * (G // 2)
        (where,) = torch.nonzero(lin == centre, as_tuple=True)
        assert len(where) == 1
        u, v, depth = coords[:, where[0]].tolist()
        assert u == pytest.approx(CENTRE, abs=1e-4) and v == pytest.approx(CENTRE, abs=1e-4)
        assert depth == pytest.approx(1.6, abs=1e-5)


def test_hand_computed_pixel():
    """Camera at (0, 0, -1.5) looking along +z with +y down: world point (0.25, 0.125, 0) is 1.5 units deep,
    so u = 109.375 * 0.25 / 1.5 + 32 and v = 109.375 * 0.125 / 1.5 + 32."""
    helper = _helper()
    pose = torch.eye(4)
    pose[2, 3] = -1.5
    lin, coords = helper.lifting_indices(pose)
    voxel = (G // 2 + 4) + G * (G // 2 + 2) + G * G * (G // 2)  # (x, y, z) = (0.25, 0.125, 0) in world units
    col = coords[:, torch.nonzero(lin == voxel)[0, 0]]
    assert col.tolist() == pytest.approx([FOCAL * 0.25 / 1.5 + 32, FOCAL * 0.125 / 1.5 + 32, 1.5], abs=1e-5)


def test_lift_then_project_returns_the_same_voxels():
    """Back-projecting each lifted voxel's (u, v, depth) with the projection's formulas gives its grid index."""
    helper = _helper()
    for pose in _random_cameras(4, seed=2):
        lin, coords = helper.lifting_indices(pose)
        x, y, z = unravel_index(lin, [G] * 3)
        u, v, depth = coords.double()
        cam = torch.stack([(u - CENTRE) / FOCAL * depth, (v - CENTRE) / FOCAL * depth, depth, torch.ones_like(u)])
        grid = (pose.double() @ cam)[:3] / helper.voxel_size + G / 2
        expected = torch.stack([x, y, z]).double()
        assert torch.allclose(grid, expected, atol=1e-4)


def test_projection_samples_land_inside_the_grid_on_their_rays():
    helper = _helper()
    pose = _random_cameras(1, seed=3)[0]
    lin, voxel_coords = helper.projection_indices(pose)
    assert (voxel_coords >= 0).all() and (voxel_coords < G).all()
    u, v, k = unravel_index(lin, (MAP, MAP))
    world = (voxel_coords.double() - G / 2) * helper.voxel_size
    cam = torch.linalg.inv(pose.double()) @ torch.cat([world, torch.ones_like(world[:1])])
    assert torch.allclose(cam[2], k.double() * helper.voxel_size + helper.near_plane, atol=1e-4)
    assert torch.allclose(FOCAL * cam[0] / cam[2] + CENTRE, u.double(), atol=1e-3)
    assert torch.allclose(FOCAL * cam[1] / cam[2] + CENTRE, v.double(), atol=1e-3)


def test_camera_that_sees_nothing_raises():
    helper = _helper()
    away = torch.from_numpy(data_util.look_at((0, 0, 3.0), target=(0, 0, 6.0), up=(0, 1, 0)).astype(np.float32))
    with pytest.raises(EmptyFrustumError):
        helper.lifting_indices(away)
    with pytest.raises(EmptyFrustumError):
        helper.projection_indices(away)


def test_samplers_are_exact_at_integer_positions():
    grid = torch.randn(1, 3, G, G, G)
    lin = torch.tensor([0, 5, 17])
    xyz = torch.tensor([[1.0, 4.0, 15.0], [2.0, 0.0, 7.0], [3.0, 9.0, 15.0]])  # rows x, y, z
    out = sample_frustum(grid, lin, xyz, (1, 1, 64)).view(1, 3, -1)
    for j, (x, y, z) in enumerate(xyz.t().long().tolist()):
        assert torch.allclose(out[0, :, lin[j]], grid[0, :, z, y, x])
    feats = torch.randn(1, 2, MAP, MAP)
    uvd = torch.tensor([[3.0, 40.0], [7.0, 63.0], [1.0, 1.0]])  # rows u (column), v (row), depth
    vol = lift_features(feats, torch.tensor([2, 9]), uvd, [G] * 3).view(1, 2, -1)
    assert torch.allclose(vol[0, :, 2], feats[0, :, 7, 3]) and torch.allclose(vol[0, :, 9], feats[0, :, 63, 40])
    assert vol[0, :, 0].abs().sum() == 0


def test_samplers_gradcheck_float64():
    torch.manual_seed(0)
    grid = torch.randn(1, 2, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    lin = torch.tensor([0, 3, 6, 7])
    xyz = torch.rand(3, 4, dtype=torch.float64) * 3.0
    assert torch.autograd.gradcheck(lambda g: sample_frustum(g, lin, xyz, (2, 2, 2)), (grid,))
    feats = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    uvd = torch.cat([torch.rand(2, 4, dtype=torch.float64) * 4.0, torch.ones(1, 4, dtype=torch.float64)])
    assert torch.autograd.gradcheck(lambda f: lift_features(f, lin, uvd, [2, 2, 2]), (feats,))


def test_sampler_paths_with_and_without_autograd_agree():
    """With and without autograd the sampler gives the same result, and the one computed directly."""
    from projection import _scatter_weighted_corners
    gen = torch.Generator().manual_seed(0)
    src = torch.randn(2, 5, 300, generator=gen)
    idx = torch.randint(0, 300, (8, 400), generator=gen)
    weights = torch.rand(8, 400, generator=gen)
    out_idx = torch.randperm(500, generator=gen)[:400]
    with_grad = _scatter_weighted_corners(src.clone().requires_grad_(), idx, weights, out_idx, 500)
    with torch.no_grad():
        without = _scatter_weighted_corners(src, idx, weights, out_idx, 500)
    expected = torch.zeros(2, 5, 500)
    expected[:, :, out_idx] = (src[:, :, idx] * weights).sum(dim=2)
    torch.testing.assert_close(without, with_grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(without, expected, rtol=0, atol=1e-5)
    buffer = torch.zeros(500, 2 * 5)
    with torch.no_grad():
        into = _scatter_weighted_corners(src, idx, weights, out_idx, 500, out=buffer)
    assert into.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
    assert torch.equal(into, without)
    with pytest.raises(ValueError, match="autograd"):
        _scatter_weighted_corners(src.clone().requires_grad_(), idx, weights, out_idx, 500, out=buffer)


@pytest.mark.parametrize("channels_last", [False, True])
def test_visibility_weighted_mean_matches_the_product_form(channels_last):
    from deep_voxels import visibility_weighted_mean
    gen = torch.Generator().manual_seed(0)
    frustum = torch.randn(3, 5, 7, 4, 6, generator=gen)
    weights = torch.softmax(torch.randn(3, 1, 7, 4, 6, generator=gen), dim=2)
    if channels_last:  # the layout the sampler writes
        frustum = frustum.contiguous(memory_format=torch.channels_last_3d)
    expected = torch.mean(weights * frustum, dim=2)
    with torch.no_grad():
        planewise = visibility_weighted_mean(weights, frustum)
    torch.testing.assert_close(planewise, expected, rtol=0, atol=1e-6)
    # Under autograd its values are the product form's, and so are its gradients, though its backward pass
    # makes no full-size temporaries: the frustum's exactly, the weights' up to the order of the sum over C.
    tracked_w, tracked_f = weights.clone().requires_grad_(), frustum.clone().requires_grad_()
    mean = visibility_weighted_mean(tracked_w, tracked_f)
    assert torch.equal(mean, expected)
    grad_out = torch.randn(expected.shape, generator=gen)
    got_w, got_f = torch.autograd.grad(mean, (tracked_w, tracked_f), grad_out)
    want_w, want_f = torch.autograd.grad(torch.mean(tracked_w * tracked_f, dim=2), (tracked_w, tracked_f), grad_out)
    assert torch.equal(got_f, want_f)
    torch.testing.assert_close(got_w, want_w, rtol=1e-6, atol=1e-7)
    # Only the needed gradient is made; a bfloat16 frustum gets its gradient in bfloat16.
    (only_f,) = torch.autograd.grad(visibility_weighted_mean(weights, tracked_f.bfloat16()), tracked_f, grad_out)
    torch.testing.assert_close(only_f, (weights * grad_out.unsqueeze(2) / frustum.shape[2]).bfloat16().float())
    # Reduced precision is accumulated in float32: closer to the exact mean than the bfloat16 product form.
    half_f, half_w = frustum.bfloat16(), weights.bfloat16()
    exact = torch.mean(half_w.double() * half_f.double(), dim=2)
    with torch.no_grad():
        planewise = visibility_weighted_mean(half_w, half_f)
    assert planewise.dtype == torch.bfloat16
    assert (planewise.double() - exact).abs().max() <= (torch.mean(half_w * half_f, dim=2).double() - exact).abs().max()
