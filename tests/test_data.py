"""Tests for data_util I/O and camera helpers, and for the dataio datasets."""
import json
import math
import os
import shutil

import numpy as np
import png
import pytest
import torch

import data_util
import dataio
from data_util import DataError
from tools import synthetic

NUM_REFERENCE_POSES = 6
# (azimuth deg, elevation deg, radius) of reference pose_i.txt, from the reference README.
REFERENCE_CAMERAS = [(0, 30, 1.5), (35, 40, 1.45), (-40, 25, 1.55), (120, 45, 1.4), (200, 35, 1.6), (280, 20, 1.5)]


def _random_rotation(rng: np.random.RandomState) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q


def _random_pose(rng: np.random.RandomState) -> np.ndarray:
    pose = np.eye(4)
    pose[:3, :3] = _random_rotation(rng)
    pose[:3, 3] = rng.normal(size=3)
    return pose


def _write_text(path, text: str) -> str:
    with open(path, "w") as fh:
        fh.write(text)
    return str(path)


def _assert_one_line_naming(err: pytest.ExceptionInfo, path) -> None:
    message = str(err.value)
    assert str(path) in message
    assert "\n" not in message


# --------------------------------------------------------------------------------------------- images

@pytest.mark.parametrize("layout", ["rows", "fortran", "strided"])
@pytest.mark.parametrize("shape", [(6, 9), (6, 9, 3)])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_png_round_trip_is_exact(tmp_path, shape, dtype, layout):
    """Any memory layout: the writer hands pypng packed rows."""
    rng = np.random.RandomState(1)
    img = rng.randint(0, np.iinfo(dtype).max + 1, size=shape).astype(dtype)
    if layout == "fortran":
        img = np.asfortranarray(img)
    elif layout == "strided":
        img = np.repeat(img, 2, axis=1)[:, ::2]
    img[0, 0] = np.iinfo(dtype).max  # full range, so 16-bit values above 255 must survive
    path = tmp_path / "img.png"
    data_util.write_png(path, img)
    back = data_util.read_image(path)
    assert back.dtype == dtype
    np.testing.assert_array_equal(back, img)


def test_read_image_drops_alpha_and_reads_jpeg(tmp_path):
    rgba = np.arange(4 * 5 * 4, dtype=np.uint8).reshape(4, 5, 4)
    with open(tmp_path / "a.png", "wb") as fh:
        png.Writer(width=5, height=4, alpha=True, greyscale=False).write(fh, rgba.reshape(4, -1).tolist())
    np.testing.assert_array_equal(data_util.read_image(tmp_path / "a.png"), rgba[:, :, :3])

    import imageio.v3 as iio
    flat = np.full((8, 8, 3), 200, dtype=np.uint8)
    iio.imwrite(tmp_path / "b.JPG", flat, quality=95)
    jpg = data_util.read_image(tmp_path / "b.JPG")
    assert jpg.shape == (8, 8, 3) and jpg.dtype == np.uint8
    assert np.abs(jpg.astype(int) - 200).max() <= 2


def test_read_image_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.png"
    with pytest.raises(DataError) as err:
        data_util.read_image(missing)
    _assert_one_line_naming(err, missing)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    with pytest.raises(DataError) as err:
        data_util.read_image(broken)
    _assert_one_line_naming(err, broken)


def test_square_crop_uses_centre_and_half_of_min():
    img = np.arange(5 * 8).reshape(5, 8)
    # min 5 -> half 2; centre (2, 4) -> rows 0:4, cols 2:6 (odd sizes lose a row, as in the original).
    np.testing.assert_array_equal(data_util.square_crop(img), img[0:4, 2:6])
    img = np.arange(10 * 6 * 3).reshape(10, 6, 3)
    np.testing.assert_array_equal(data_util.square_crop(img), img[2:8, 0:6])


def test_resize_area_integer_factor_is_block_mean():
    rng = np.random.RandomState(0)
    img = rng.randint(0, 256, size=(512, 512, 3)).astype(np.uint8)
    expected = img.astype(np.float64).reshape(128, 4, 128, 4, 3).mean(axis=(1, 3)).astype(np.float32)
    out = data_util.resize_area(img, 128)
    assert out.dtype == np.float32 and out.shape == (128, 128, 3)
    np.testing.assert_array_equal(out, expected)


def test_resize_area_fractional_overlap_weights():
    x = np.array([1.0, 2.0, 4.0, 8.0, 16.0])
    img = np.tile(x[None, :], (5, 1))  # rows identical, so the row pass is a no-op mean
    out = data_util.resize_area(img, (2, 2))
    # 5 -> 2: each output covers 2.5 inputs; the middle input is split half and half.
    expected = np.array([(1 + 2 + 0.5 * 4) / 2.5, (0.5 * 4 + 8 + 16) / 2.5])
    np.testing.assert_allclose(out, np.tile(expected, (2, 1)), rtol=1e-6)
    with pytest.raises(ValueError):
        data_util.resize_area(img, 6)


def test_resize_area_matches_opencv_when_available():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.RandomState(3)
    img = rng.randint(0, 256, size=(500, 500, 3)).astype(np.uint8)
    for size in (128, 100, 333):
        ref = cv2.resize(img.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
        np.testing.assert_allclose(data_util.resize_area(img, size), ref, atol=1e-3)


def test_load_rgb_scales_crops_and_keeps_16_bit(tmp_path):
    img = np.zeros((12, 16, 3), dtype=np.uint8)
    img[:, 2:14] = 255  # the centre 12x12 crop is exactly columns 2..13
    data_util.write_png(tmp_path / "wide.png", img)
    rgb = data_util.load_rgb(tmp_path / "wide.png", 12)
    assert rgb.shape == (3, 12, 12) and rgb.dtype == np.float32
    np.testing.assert_array_equal(rgb, np.full((3, 12, 12), 0.5, np.float32))

    gradient = np.tile(np.arange(8, dtype=np.uint8)[None, :, None] * 30, (8, 1, 3))
    rgb = data_util.load_rgb(_png(tmp_path / "g.png", gradient), 4)
    # 2x shrink of columns (0,30), (60,90), ...: means 15, 75, 135, 195.
    np.testing.assert_allclose(rgb[0, 0], np.array([15, 75, 135, 195], np.float32) / 255 - 0.5, atol=1e-7)

    deep = np.full((4, 4, 3), 1000, dtype=np.uint16)
    rgb = data_util.load_rgb(_png(tmp_path / "deep.png", deep), 4)
    np.testing.assert_allclose(rgb, 1000 / data_util.UINT16_MAX - 0.5, rtol=1e-6)
    assert rgb.min() >= -0.5 and rgb.max() <= 0.5


def _png(path, img) -> str:
    data_util.write_png(path, img)
    return str(path)


def test_glob_imgs_and_list_poses_are_sorted_and_case_insensitive(tmp_path):
    for name in ["b.PNG", "a.jpg", "c.JPEG", "d.txt", "e.bmp"]:
        (tmp_path / name).write_bytes(b"")
    names = [os.path.basename(p) for p in data_util.glob_imgs(tmp_path)]
    assert names == ["a.jpg", "b.PNG", "c.JPEG"]
    assert [os.path.basename(p) for p in data_util.list_poses(tmp_path)] == ["d.txt"]


# --------------------------------------------------------------------------------------------- poses

def test_load_pose_both_formats(tmp_path):
    pose = _random_pose(np.random.RandomState(0))
    four = _write_text(tmp_path / "four.txt", "\n".join(" ".join(f"{x:.10f}" for x in row) for row in pose) + "\n")
    one = _write_text(tmp_path / "one.txt", " ".join(f"{x:.10f}" for x in pose.ravel()) + "\n")
    a, b = data_util.load_pose(four), data_util.load_pose(one)
    assert a.dtype == np.float32 and a.shape == (4, 4)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, pose, atol=1e-7)


def test_write_pose_round_trips_exactly(tmp_path):
    rng = np.random.RandomState(7)
    for i in range(5):
        pose = _random_pose(rng)
        path = tmp_path / f"{i}.txt"
        data_util.write_pose(path, pose)
        np.testing.assert_array_equal(data_util.load_pose(path), pose.astype(np.float32))
        assert len(path.read_text().splitlines()) == 4


_GOOD_ROWS = ["1 0 0 0.5", "0 1 0 0", "0 0 1 2", "0 0 0 1"]


@pytest.mark.parametrize("text, fragment", [
    ("1 0 0 0\n0 1 0 0\n0 0 1 0\n", "expected 16 numbers, found 12"),
    ("\n".join(_GOOD_ROWS + ["0"]), "expected 16 numbers, found 17"),
    ("\n".join(_GOOD_ROWS[:3] + ["0 0 0 x"]), "expected numbers"),
    ("\n".join(["1 0 0 nan"] + _GOOD_ROWS[1:]), "finite"),
    ("\n".join(["1 0 0 0", "0 inf 0 0"] + _GOOD_ROWS[2:]), "finite"),
    ("\n".join(_GOOD_ROWS[:3] + ["0 0 0.5 1"]), "last row"),
    ("\n".join(["0 0 0 0", "0 1 0 0", "0 0 1 0", "0 0 0 1"]), "singular"),
    ("\n".join(["1 1 0 0", "0 0 0 0", "0 0 1 0", "0 0 0 1"]), "singular"),
])
def test_load_pose_rejects_bad_files(tmp_path, text, fragment):
    path = _write_text(tmp_path / "bad.txt", text)
    with pytest.raises(DataError) as err:
        data_util.load_pose(path)
    _assert_one_line_naming(err, path)
    assert fragment in str(err.value)


def _original_interpolated_pose(a: np.ndarray, b: np.ndarray, weight: float) -> np.ndarray:
    """A pose of the original's interpolated trajectories: linear blend, rotation columns rescaled to unit length."""
    pose = (1.0 - weight) * a + weight * b
    pose[:3, :3] /= np.linalg.norm(pose[:3, :3], axis=0, keepdims=True)
    return pose


def test_load_pose_accepts_non_orthonormal_rotation_with_one_warning(tmp_path, caplog):
    a = data_util.look_at(data_util.spherical_position(0.0, 20.0, 1.5))
    b = data_util.look_at(data_util.spherical_position(120.0, 50.0, 1.5))
    pose = _original_interpolated_pose(a, b, 0.5)
    rot = pose[:3, :3]
    deviation = np.abs(rot.T @ rot - np.eye(3)).max()
    assert deviation > data_util.POSE_TOLERANCE  # columns unit length, but not orthogonal
    path = tmp_path / "blend.txt"
    data_util.write_pose(path, pose)
    with caplog.at_level("WARNING", logger="data_util"):
        loaded = data_util.load_pose(path)
    np.testing.assert_array_equal(loaded, pose.astype(np.float32))  # used as given, not orthogonalised
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert caplog.records[0].levelname == "WARNING" and "\n" not in message
    assert str(path) in message and "R^T R - I" in message and f"{deviation:.3g}" in message


def test_load_pose_accepts_scaled_rotation_and_orthonormal_silently(tmp_path, caplog):
    scaled = _write_text(tmp_path / "scaled.txt", "\n".join(["2 0 0 0", "0 2 0 0", "0 0 2 0", "0 0 0 1"]))
    rigid = _write_text(tmp_path / "rigid.txt", "\n".join(_GOOD_ROWS))
    with caplog.at_level("WARNING", logger="data_util"):
        np.testing.assert_array_equal(data_util.load_pose(rigid)[:3, 3], [0.5, 0, 2])
        assert caplog.records == []
        np.testing.assert_array_equal(data_util.load_pose(scaled)[:3, :3], 2 * np.eye(3))
    assert len(caplog.records) == 1 and str(scaled) in caplog.records[0].getMessage()


def test_load_pose_missing_file(tmp_path):
    path = tmp_path / "nope.txt"
    with pytest.raises(DataError) as err:
        data_util.load_pose(path)
    _assert_one_line_naming(err, path)


def test_look_at_reproduces_reference_poses(reference_dir):
    for i, (az, el, r) in enumerate(REFERENCE_CAMERAS):
        ref = data_util.load_pose(os.path.join(reference_dir, f"pose_{i}.txt"))
        ours = data_util.look_at(data_util.spherical_position(az, el, r))
        np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_look_at_frame_is_opencv():
    cam = data_util.look_at((2.0, 0.0, 0.0))
    np.testing.assert_allclose(cam[:3, 2], [-1, 0, 0])   # looks at the origin
    np.testing.assert_allclose(cam[:3, 1], [0, 0, -1])   # image down is world down
    np.testing.assert_allclose(cam[:3, 0], [0, 1, 0], atol=1e-15)  # facing -x with z up, +y is on the right
    np.testing.assert_allclose(np.linalg.det(cam[:3, :3]), 1.0)
    with pytest.raises(ValueError):
        data_util.look_at((0.0, 0.0, 3.0))


# --------------------------------------------------------------------------------------------- intrinsics

def test_parse_reference_intrinsics(reference_dir):
    intrinsic, barycenter, scale, near, w2c = data_util.parse_intrinsics(
        os.path.join(reference_dir, "small_intrinsics.txt"), 64)
    expected = np.array([[109.375, 0, 32, 0], [0, 109.375, 32, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    assert intrinsic.dtype == np.float64
    np.testing.assert_array_equal(intrinsic, expected)
    assert barycenter.dtype == np.float32
    np.testing.assert_array_equal(barycenter, np.zeros(3, np.float32))
    assert (scale, near, w2c) == (1.0, 0.0, False)
    assert isinstance(scale, float) and isinstance(near, float)


def test_parse_intrinsics_non_square_and_flag(tmp_path):
    path = _write_text(tmp_path / "intrinsics.txt", "500 320 240\n0.1 -0.2 0.3\n0.7\n1.5\n480 640\n1\n")
    intrinsic, barycenter, scale, near, w2c = data_util.parse_intrinsics(path, 128)
    assert intrinsic[0, 0] == intrinsic[1, 1] == 128 / 480 * 500
    assert intrinsic[0, 2] == 320 / 640 * 128
    assert intrinsic[1, 2] == 240 / 480 * 128
    np.testing.assert_array_equal(barycenter, np.array([0.1, -0.2, 0.3], np.float32))
    assert (scale, near, w2c) == (1.5, 0.7, True)
    path = _write_text(tmp_path / "junk_flag.txt", "500 320 240\n0 0 0\n0\n1\n480 640\nyes\n")
    assert data_util.parse_intrinsics(path, 64)[4] is False


@pytest.mark.parametrize("text, line", [
    ("500 320\n0 0 0\n0\n1\n480 640\n", 1),
    ("500 320 240\n0 zero 0\n0\n1\n480 640\n", 2),
    ("500 320 240\n0 0 0\n\n1\n480 640\n", 3),
    ("500 320 240\n0 0 0\n0\n1\n", 5),
])
def test_parse_intrinsics_malformed_names_line(tmp_path, text, line):
    path = _write_text(tmp_path / "intrinsics.txt", text)
    with pytest.raises(DataError) as err:
        data_util.parse_intrinsics(path, 64)
    _assert_one_line_naming(err, path)
    assert f"line {line}" in str(err.value)


def test_write_intrinsics_round_trip(tmp_path):
    path = tmp_path / "intrinsics.txt"
    data_util.write_intrinsics(path, 179.2, 64.0, 64.0, (0.0, 0.0, 0.1), 0.0, 1.0, 128, 128)
    intrinsic, barycenter, scale, near, _ = data_util.parse_intrinsics(path, 128)
    assert intrinsic[0, 0] == 179.2 and intrinsic[0, 2] == 64.0
    np.testing.assert_array_equal(barycenter, np.array([0, 0, 0.1], np.float32))
    assert (scale, near) == (1.0, 0.0)


# --------------------------------------------------------------------------------------------- camera paths

def test_nn_ranking_puts_most_similar_last():
    poses = [data_util.look_at(data_util.spherical_position(az, 0.0, 1.5)) for az in (0, 10, 90, 165)]
    nn_idcs, sorted_cos = data_util.get_nn_ranking(poses)
    # Horizontal cameras: cosine of viewing directions = cos(azimuth difference).
    # Row 0: self (-1) < az 165 < az 90 (0) < az 10; the view itself comes first.
    np.testing.assert_array_equal(nn_idcs[0], [0, 3, 2, 1])
    np.testing.assert_array_equal(nn_idcs[:, -1], [1, 0, 3, 2])
    np.testing.assert_allclose(sorted_cos[0], [-1, math.cos(math.radians(165)), 0, math.cos(math.radians(10))],
                               atol=1e-12)
    assert np.all(np.diff(sorted_cos, axis=1) >= 0)


def test_spiral_matches_original_parametrisation():
    radius = 1.3
    expected = []
    t, a = 150.0, 300.0
    while t > 0.0:  # the original's sampling loop, written out independently
        expected.append([radius * math.cos(t) * math.cos(-math.pi / 2 + t / a * math.pi),
                         radius * math.sin(t) * math.cos(-math.pi / 2 + t / a * math.pi),
                         -radius * math.sin(-math.pi / 2 + t / a * math.pi)])
        t -= a / 2000.0
    positions = data_util.archimedean_spiral_positions(radius, 1000)
    assert len(expected) == len(positions) == 1000
    np.testing.assert_allclose(positions, np.array(expected), atol=1e-9)

    poses = data_util.archimedean_spiral_poses(1.5, 40, target=(0.1, 0.0, 0.0))
    centres = poses[:, :3, 3]
    assert np.all(centres[:, 2] >= -1e-12)
    np.testing.assert_allclose(np.linalg.norm(centres - [0.1, 0, 0], axis=1), 1.5)
    to_target = np.array([0.1, 0, 0]) - centres
    np.testing.assert_allclose(poses[:, :3, 2], to_target / np.linalg.norm(to_target, axis=1, keepdims=True),
                               atol=1e-12)


def test_interpolate_poses_endpoints_and_unit_columns():
    rng = np.random.RandomState(2)
    a, b = _random_pose(rng), _random_pose(rng)
    poses = data_util.interpolate_poses(a, b, 7)
    assert poses.shape == (7, 4, 4)
    np.testing.assert_allclose(poses[0], a, atol=1e-12)
    np.testing.assert_allclose(poses[-1], b, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(poses[:, :3, :3], axis=1), 1.0)
    np.testing.assert_allclose(poses[3, :3, 3], 0.5 * (a[:3, 3] + b[:3, 3]))


def test_interpolate_training_poses(tmp_path):
    poses = [data_util.look_at(data_util.spherical_position(az, 30.0, 1.5)) for az in range(0, 360, 24)]
    data_util.write_pose_folder(tmp_path / "train", poses)
    written = data_util.interpolate_training_poses(tmp_path / "train", tmp_path / "out", 3, 5, seed=4)
    assert len(written) == 15 and written == sorted(written)
    rng = np.random.RandomState(4)
    start = rng.choice(len(poses))
    nn_idcs, _ = data_util.get_nn_ranking([p.astype(np.float32) for p in poses])
    end = nn_idcs[start][rng.randint(1, 11)]
    assert os.path.basename(written[0]) == f"000000_{start:06d}_{end:06d}.txt"
    np.testing.assert_allclose(data_util.load_pose(written[0]), poses[start], atol=1e-6)
    np.testing.assert_allclose(data_util.load_pose(written[4]), poses[end], atol=1e-6)
    assert os.path.basename(written[5]).startswith(f"000005_{end:06d}_")
    again = data_util.interpolate_training_poses(tmp_path / "train", tmp_path / "again", 3, 5, seed=4)
    assert [os.path.basename(p) for p in again] == [os.path.basename(p) for p in written]


# --------------------------------------------------------------------------------------------- datasets

def _make_scene(root, poses, img_size=8, num_images=None):
    os.makedirs(root / "rgb")
    os.makedirs(root / "pose")
    _write_text(root / "intrinsics.txt", "16 8 8\n0 0 0\n0\n1\n16 16\n")
    data_util.write_pose_folder(root / "pose", poses)
    for i in range(len(poses) if num_images is None else num_images):
        data_util.write_png(root / "rgb" / f"{i:06d}.png", np.full((img_size, img_size, 3), 10 * i, np.uint8))
    return root


def _reference_scene(root, reference_dir):
    poses = [data_util.load_pose(os.path.join(reference_dir, f"pose_{i}.txt")) for i in range(NUM_REFERENCE_POSES)]
    return _make_scene(root, poses)


def _view_index(dataset, view) -> int:
    return next(i for i, v in enumerate(dataset.all_views) if v is view)


def test_triplets_reproduce_original_training_log(tmp_path, reference_dir):
    """The original's loader, seeded with numpy 0, drew these nearest/target views (trainlog)."""
    dataset = dataio.NovelViewTriplets(str(_reference_scene(tmp_path / "scene", reference_dir)), 8)
    with open(os.path.join(reference_dir, "small_ckpt_trainlog.json")) as fh:
        log = json.load(fh)
    np.random.seed(0)
    for it, entry in enumerate(log):
        trgt_views, nearest = dataset[it % len(dataset)]
        assert _view_index(dataset, nearest) == entry["nearest"]
        assert [_view_index(dataset, v) for v in trgt_views] == entry["targets"]


def test_triplet_draw_order(tmp_path):
    poses = [data_util.look_at(data_util.spherical_position(az, 20.0, 1.5)) for az in range(0, 360, 40)]
    dataset = dataio.NovelViewTriplets(str(_make_scene(tmp_path / "s", poses)), 4, num_trgt=3)
    np.random.seed(123)
    expected = []
    for idx in (0, 5, 8):
        near = dataset.nn_idcs[idx][-np.random.randint(low=1, high=5)]
        expected.append((near, idx, np.random.choice(9), np.random.choice(9)))
    np.random.seed(123)
    for idx, (near, t0, t1, t2) in zip((0, 5, 8), expected):
        trgt_views, nearest = dataset[idx]
        assert _view_index(dataset, nearest) == near
        assert [_view_index(dataset, v) for v in trgt_views] == [t0, t1, t2]
    # With 9 views 40 degrees apart, the 4 nearest views of view 0 are its two neighbours on each side.
    assert set(dataset.nn_idcs[0][-4:].tolist()) == {1, 2, 7, 8}
    view = dataset.all_views[3]
    assert view["gt_rgb"].dtype == torch.float32 and view["gt_rgb"].shape == (3, 4, 4)
    assert view["pose"].dtype == torch.float32 and view["pose"].shape == (4, 4)
    torch.testing.assert_close(view["gt_rgb"], torch.full((3, 4, 4), 30 / 255 - 0.5))


def test_triplets_sampling_pattern(tmp_path):
    poses = [data_util.look_at(data_util.spherical_position(az, 20.0, 1.5)) for az in range(0, 360, 60)]
    root = str(_make_scene(tmp_path / "s", poses))
    dataset = dataio.NovelViewTriplets(root, 4, sampling_pattern="skip_1")
    assert [os.path.basename(p) for p in dataset.pose_paths] == ["000000.txt", "000002.txt", "000004.txt"]
    assert [os.path.basename(p) for p in dataset.image_paths] == ["000000.png", "000002.png", "000004.png"]
    with pytest.raises(DataError, match="--sampling_pattern"):
        dataio.NovelViewTriplets(root, 4, sampling_pattern="every_2")


def test_triplets_reject_bad_folders(tmp_path):
    poses = [data_util.look_at(data_util.spherical_position(az, 20.0, 1.5)) for az in (0, 90, 180)]
    root = _make_scene(tmp_path / "mismatch", poses, num_images=2)
    with pytest.raises(DataError) as err:
        dataio.NovelViewTriplets(str(root), 4)
    assert str(root) in str(err.value) and "2 images" in str(err.value) and "3 poses" in str(err.value)

    with pytest.raises(DataError, match="dataset root"):
        dataio.NovelViewTriplets(str(tmp_path / "absent"), 4)
    single = _make_scene(tmp_path / "single", poses[:1])
    with pytest.raises(DataError, match="at least 2"):
        dataio.NovelViewTriplets(str(single), 4)
    no_intrinsics = _make_scene(tmp_path / "no_k", poses)
    os.remove(no_intrinsics / "intrinsics.txt")
    with pytest.raises(DataError, match="intrinsics"):
        dataio.NovelViewTriplets(str(no_intrinsics), 4)
    no_rgb = _make_scene(tmp_path / "no_rgb", poses)
    shutil.rmtree(no_rgb / "rgb")
    with pytest.raises(DataError, match="image folder"):
        dataio.NovelViewTriplets(str(no_rgb), 4)


def test_test_dataset_with_and_without_images(tmp_path):
    poses = [data_util.look_at(data_util.spherical_position(az, 20.0, 1.5)) for az in (0, 90, 180)]
    root = _make_scene(tmp_path / "gt", poses)
    dataset = dataio.TestDataset(str(root), 4)
    assert dataset.has_gt and len(dataset) == 3
    item = dataset[2]
    assert item["index"] == 2 and item["pose_path"].endswith("000002.txt")
    torch.testing.assert_close(item["pose"], torch.from_numpy(poses[2].astype(np.float32)))
    torch.testing.assert_close(item["gt_rgb"], torch.full((3, 4, 4), 20 / 255 - 0.5))

    shutil.rmtree(root / "rgb")
    dataset = dataio.TestDataset(str(root), 4)
    assert not dataset.has_gt and "gt_rgb" not in dataset[0]

    bad = _make_scene(tmp_path / "bad", poses, num_images=1)
    with pytest.raises(DataError, match="1 images"):
        dataio.TestDataset(str(bad), 4)
    empty = tmp_path / "empty"
    os.makedirs(empty / "pose")
    with pytest.raises(DataError, match="found none"):
        dataio.TestDataset(str(empty), 4)
    with pytest.raises(DataError, match="pose folder"):
        dataio.TestDataset(str(tmp_path / "nothing"), 4)


def test_world2cam_flag_on_line_6_inverts_the_pose_files(tmp_path):
    """intrinsics.txt line 6 = 1: pose/ holds world-to-camera matrices; the loaders return camera-to-world."""
    root = tmp_path / "data"
    synthetic.make_synthetic_dataset(str(root), "cube", resolution=64, num_train=3, num_val=1, num_test=1, seed=0)
    plain = root / "train" / "cube"
    flipped = tmp_path / "flipped"
    shutil.copytree(plain, flipped)
    with open(flipped / "intrinsics.txt", "a") as handle:
        handle.write("1\n")
    for path in (flipped / "pose").iterdir():
        data_util.write_pose(path, np.linalg.inv(data_util.load_pose(path).astype(np.float64)))
    a = dataio.NovelViewTriplets(str(plain), 64)
    b = dataio.NovelViewTriplets(str(flipped), 64)
    for va, vb in zip(a.all_views, b.all_views):
        np.testing.assert_allclose(vb["pose"].numpy(), va["pose"].numpy(), atol=1e-5)
    np.testing.assert_array_equal(a.nn_idcs, b.nn_idcs)
    assert dataio.TestDataset(str(flipped), 64).poses[0].allclose(a.all_views[0]["pose"], atol=1e-5)
