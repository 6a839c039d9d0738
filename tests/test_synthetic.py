"""Tests for the synthetic renderer, the dataset generator and the dataset command line (tools.dataset).

The camera-convention tests project world points with the pinhole model used everywhere in this
project (OpenCV camera frame from inv(cam2world); u = f*x/z + cx is the column, v = f*y/z + cy the
row; integer (u, v) is the centre of image[v, u]) and check the renderer agrees.
"""
import filecmp
import os

import numpy as np
import pytest

import data_util
import dataio
from tools import colmap_import, dataset, synthetic

RES = 96
F = synthetic.synthetic_focal(RES)
C = RES / 2.0
FLAT_RANGE = 8  # uint8 levels
COLOUR_TOLERANCE = 3  # uint8 levels
CORNER_SIGNS = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64)


def _project(cam2world: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World points (N, 3) -> pixel coords u, v and camera depth z."""
    world2cam = np.linalg.inv(cam2world)
    cam = points @ world2cam[:3, :3].T + world2cam[:3, 3]
    return F * cam[:, 0] / cam[:, 2] + C, F * cam[:, 1] / cam[:, 2] + C, cam[:, 2]


def _pose(az: float, el: float, radius: float = synthetic.SYNTH_RADIUS) -> np.ndarray:
    return data_util.look_at(data_util.spherical_position(az, el, radius))


def test_pixel_rays_invert_the_projection():
    rng = np.random.RandomState(0)
    cam2world = _pose(37.0, 28.0)
    u, v = rng.uniform(-5, RES + 5, size=50), rng.uniform(-5, RES + 5, size=50)
    origins, dirs = synthetic.pixel_rays(cam2world, F, C, C, u, v)
    np.testing.assert_allclose(np.linalg.norm(dirs, axis=1), 1.0)
    points = origins + rng.uniform(0.5, 3.0, size=(50, 1)) * dirs
    pu, pv, z = _project(cam2world, points)
    assert np.all(z > 0)
    np.testing.assert_allclose(pu, u, atol=1e-9)
    np.testing.assert_allclose(pv, v, atol=1e-9)
    _, axis = synthetic.pixel_rays(cam2world, F, C, C, np.array([C]), np.array([C]))
    np.testing.assert_allclose(axis[0], cam2world[:3, 2], atol=1e-12)  # principal point = optical axis


def test_optical_axis_hits_the_targeted_checker_cell():
    # The centre of a checker cell on the cube's top face (cells are 1/8 wide, edges at multiples).
    cell_centre = np.array([0.0625, -0.0625, synthetic.CUBE_HALF_SIDE])
    cam2world = data_util.look_at(cell_centre + np.array([0.6, -0.4, 1.2]), target=cell_centre)
    img = synthetic.render_view("cube", cam2world, F, C, C, RES, RES)
    points, colours = synthetic.object_surface_points("cube", 20000, seed=1)
    nearest = np.argmin(np.linalg.norm(points - cell_centre, axis=1))
    assert np.linalg.norm(points[nearest] - cell_centre) < 0.01
    # Integer (cx, cy) = (C, C) is the centre of image[C, C]; the cell's gradient allows a few levels.
    assert np.abs(img[int(C), int(C)].astype(int) - colours[nearest]).max() <= 4
    # The neighbouring cell (darker checker square) is clearly different.
    u, v, _ = _project(cam2world, (cell_centre + [0.125, 0.0, 0.0])[None])
    assert np.abs(img[int(round(v[0])), int(round(u[0]))].astype(int) - colours[nearest]).max() > 20


@pytest.mark.parametrize("object_name, az, el", [("cube", 30.0, 35.0), ("cube", 200.0, 60.0),
                                                 ("sphere_box", 110.0, 25.0)])
def test_surface_points_project_onto_their_colour(object_name, az, el):
    cam2world = _pose(az, el)
    img = synthetic.render_view(object_name, cam2world, F, C, C, RES, RES)
    points, colours = synthetic.object_surface_points(object_name, 5000, seed=0)
    # Visible = the first hit of the ray from the camera to the point is the point itself.
    centre = cam2world[:3, 3]
    to_point = points - centre
    dist = np.linalg.norm(to_point, axis=1)
    _, t_hit = synthetic.cast_rays(object_name, np.tile(centre, (len(points), 1)), to_point / dist[:, None])
    visible = np.abs(t_hit - dist) < 1e-6
    assert visible.sum() > 500
    u, v, _ = _project(cam2world, points[visible])
    cols, rows = np.round(u).astype(int), np.round(v).astype(int)
    assert cols.min() >= 0 and rows.min() >= 0 and cols.max() < RES and rows.max() < RES
    # Only judge points inside flat image regions (3x3 neighbourhood within a few levels): texture
    # edges and grazing faces change colour within a pixel.
    padded = np.pad(img.astype(int), ((1, 1), (1, 1), (0, 0)), mode="edge")
    patches = np.stack([padded[rows + dr, cols + dc] for dr in range(3) for dc in range(3)], axis=1)
    flat = (patches.max(axis=1) - patches.min(axis=1)).max(axis=1) <= FLAT_RANGE
    assert flat.sum() > 200, flat.sum()
    err = np.abs(img[rows, cols].astype(int) - colours[visible].astype(int)).max(axis=1)
    assert np.mean(err[flat] <= COLOUR_TOLERANCE) > 0.97, np.mean(err[flat] <= COLOUR_TOLERANCE)
    # The same check with the image flipped upside down (a y-up camera) must fail badly.
    flipped = np.abs(img[RES - 1 - rows, cols].astype(int) - colours[visible].astype(int)).max(axis=1)
    assert np.mean(flipped[flat] <= COLOUR_TOLERANCE) < 0.5


def test_cube_silhouette_matches_projected_corners():
    cam2world = _pose(50.0, 30.0)
    img = synthetic.render_view("cube", cam2world, F, C, C, RES, RES)
    u, v, _ = _project(cam2world, CORNER_SIGNS * synthetic.CUBE_HALF_SIDE)
    rows, cols = np.nonzero((img < 250).any(axis=2))
    # Pixel j spans [j - 0.5, j + 0.5]: the covered pixels must bracket the projected extent.
    assert abs(cols.min() - u.min()) <= 1.0 and abs(cols.max() - u.max()) <= 1.0
    assert abs(rows.min() - v.min()) <= 1.0 and abs(rows.max() - v.max()) <= 1.0
    assert tuple(img[0, 0]) == (255, 255, 255)  # white background


def test_objects_fit_grid_and_frame():
    for name in synthetic.OBJECT_NAMES:
        points, colours = synthetic.object_surface_points(name, 2000, seed=3)
        assert points.shape == (2000, 3) and colours.shape == (2000, 3) and colours.dtype == np.uint8
        assert np.abs(points).max() <= synthetic.OBJECT_EXTENT + 1e-9
        for az, el in [(0.0, 10.0), (123.0, 70.0)]:
            u, v, _ = _project(_pose(az, el), points)
            extent = max(u.max() - u.min(), v.max() - v.min()) / RES
            assert 0.45 < extent < 0.85, (name, az, el, extent)
            assert u.min() > 0 and v.min() > 0 and u.max() < RES - 1 and v.max() < RES - 1


def test_render_is_deterministic_and_view_dependent():
    f = synthetic.synthetic_focal(32)
    a = synthetic.render_view("sphere_box", _pose(10.0, 30.0), f, 16, 16, 32, 32)
    b = synthetic.render_view("sphere_box", _pose(10.0, 30.0), f, 16, 16, 32, 32)
    c = synthetic.render_view("sphere_box", _pose(100.0, 30.0), f, 16, 16, 32, 32)
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c).mean() > 5
    with pytest.raises(ValueError, match="unknown object"):
        synthetic.render_view("teapot", _pose(0.0, 30.0), F, C, C, 8, 8)


def _tree_files(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_make_synthetic_dataset_layout_determinism_and_loading(tmp_path):
    folders = synthetic.make_synthetic_dataset(tmp_path / "a", "cube", resolution=24, num_train=4, num_val=2,
                                               num_test=3, seed=5)
    synthetic.make_synthetic_dataset(tmp_path / "b", "cube", resolution=24, num_train=4, num_val=2,
                                     num_test=3, seed=5)
    synthetic.make_synthetic_dataset(tmp_path / "c", "cube", resolution=24, num_train=4, num_val=2,
                                     num_test=3, seed=6)
    files = _tree_files(tmp_path / "a")
    counts = {"train": 4, "validation": 2, "test": 3}
    expected = []
    for split, n in counts.items():
        expected += [f"{split}/cube/intrinsics.txt"]
        expected += [f"{split}/cube/{kind}/{i:06d}.{ext}" for kind, ext in (("pose", "txt"), ("rgb", "png"))
                     for i in range(n)]
    assert files == sorted(expected)
    assert files == _tree_files(tmp_path / "b")
    _, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", files, shallow=False)
    assert mismatch == [] and errors == []
    assert (tmp_path / "a/train/cube/pose/000000.txt").read_text() != \
        (tmp_path / "c/train/cube/pose/000000.txt").read_text()

    intrinsic, barycenter, scale, near, _ = data_util.parse_intrinsics(tmp_path / "a/train/cube/intrinsics.txt", 24)
    assert intrinsic[0, 0] == synthetic.synthetic_focal(24) and intrinsic[0, 2] == intrinsic[1, 2] == 12.0
    assert (scale, near) == (1.0, 0.0) and not barycenter.any()
    for split in counts:
        for path in data_util.list_poses(os.path.join(folders[split], "pose")):
            pose = data_util.load_pose(path)
            assert abs(np.linalg.norm(pose[:3, 3]) - synthetic.SYNTH_RADIUS) < 1e-5
            assert pose[2, 3] >= -1e-6  # upper hemisphere

    train = dataio.NovelViewTriplets(folders["train"], 16)
    assert len(train) == 4 and train.all_views[0]["gt_rgb"].shape == (3, 16, 16)
    test = dataio.TestDataset(folders["test"], 24)
    assert test.has_gt and len(test) == 3
    np.testing.assert_allclose(test[1]["gt_rgb"].numpy(),
                               data_util.read_image(os.path.join(folders["test"], "rgb/000001.png"))
                               .transpose(2, 0, 1) / 255.0 - 0.5, atol=1e-6)


@pytest.mark.slow
def test_cli_synthetic_spiral_and_errors(tmp_path, capsys):
    rc = dataset.main(["synthetic", "--out", str(tmp_path / "d"), "--object", "sphere_box", "--resolution", "16",
                         "--num_train", "2", "--num_val", "1", "--num_test", "2", "--seed", "1"])
    assert rc == 0
    assert len(data_util.glob_imgs(tmp_path / "d/train/sphere_box/rgb")) == 2
    assert dataset.main(["spiral", "--out", str(tmp_path / "sp"), "--num_views", "5", "--radius", "1.2"]) == 0
    assert len(data_util.list_poses(tmp_path / "sp")) == 5
    capsys.readouterr()

    assert dataset.main(["spiral", "--out", str(tmp_path / "x"), "--num_views", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    missing = tmp_path / "no_poses"
    assert dataset.main(["interpolate", "--train_pose_dir", str(missing), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(missing) in err and err.count("\n") == 1


def test_cli_from_colmap_forwards_arguments(monkeypatch):
    received = []
    monkeypatch.setattr(colmap_import, "main", lambda argv: received.append(argv) or 0)
    assert dataset.main(["from_colmap", "--images", "x", "--out", "y"]) == 0
    assert received == [["--images", "x", "--out", "y"]]
