"""COLMAP import: a synthetic scene is written as a COLMAP model (with pycolmap's writer) in a scaled, rotated,
shifted world, converted, and the DeepVoxels dataset is checked against the ground truth."""
import itertools
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import data_util
from tools import colmap_import, placement, synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures")

OBJECT = "sphere_box"
HEIGHT, WIDTH = 96, 128  # non-square: the crop removes 16 columns on each side
FOCAL = 110.0
CX, CY = 70.3, 45.1  # data_util pixels (integer = pixel centre); off-centre on purpose
RESOLUTION = 64  # 96 -> 64: a non-integer area resize
NUM_CAMERAS = 12
CAMERA_RADIUS = 1.6
WORLD_SCALE = 3.0  # COLMAP's gauge: ground-truth world scaled by this, rotated and shifted
NUM_POINTS = 400
NUM_FAR_OUTLIERS = 8  # 2% of the points, well tracked but far away: trimming must drop them
NUM_LONELY = 6  # far away and seen once: the track filter must drop them


def random_rotation(rng):
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def write_model(directory, cameras, images, points, binary=False):
    """A COLMAP model written by pycolmap. cameras: (id, model, w, h, params); images: (id, world2cam (3, 4),
    cam_id, name, [(x, y)] 2D points); points: (xyz, rgb, [(image_id, point2d_idx)])."""
    import pycolmap
    reconstruction = pycolmap.Reconstruction()
    for cam_id, model, w, h, params in cameras:
        reconstruction.add_camera_with_trivial_rig(
            pycolmap.Camera(model=model, width=w, height=h, params=list(params), camera_id=cam_id))
    for image_id, world2cam, cam_id, name, keypoints in images:
        image = pycolmap.Image(name=name, keypoints=np.asarray(keypoints, dtype=np.float64).reshape(-1, 2),
                               camera_id=cam_id, image_id=image_id)
        reconstruction.add_image_with_trivial_frame(image, pycolmap.Rigid3d(np.asarray(world2cam)))
    for xyz, rgb, track in points:
        elements = [pycolmap.TrackElement(image_id, idx) for image_id, idx in track]
        reconstruction.add_point3D(np.asarray(xyz, dtype=np.float64), pycolmap.Track(elements),
                                   np.asarray(rgb, dtype=np.uint8))
    os.makedirs(directory, exist_ok=True)
    (reconstruction.write_binary if binary else reconstruction.write_text)(directory)


# ----------------------------------------------------------------------------- the scene

class Scene:
    """Ground truth (world of data_util's renderer) and its COLMAP model in a similar world."""

    def __init__(self, root):
        rng = np.random.RandomState(7)
        azimuths = np.linspace(0.0, 360.0, NUM_CAMERAS, endpoint=False) + rng.uniform(0, 20, NUM_CAMERAS)
        elevations = rng.uniform(15.0, 70.0, NUM_CAMERAS)
        # Distances vary a little, as in a hand-held capture.
        radii = CAMERA_RADIUS * rng.uniform(0.9, 1.1, NUM_CAMERAS)
        self.cam2worlds = np.stack([data_util.look_at(data_util.spherical_position(a, e, r))
                                    for a, e, r in zip(azimuths, elevations, radii)])
        self.rotation = random_rotation(rng)
        self.shift = rng.normal(scale=2.0, size=3)
        self.image_dir = os.path.join(root, "photos")
        os.makedirs(self.image_dir)
        # Names sorted differently from ids: the dataset order follows the names.
        self.names = [f"IMG_{(5 * i) % NUM_CAMERAS:04d}.png" for i in range(NUM_CAMERAS)]
        for name, cam2world in zip(self.names, self.cam2worlds):
            img = synthetic.render_view(OBJECT, cam2world, FOCAL, CX, CY, HEIGHT, WIDTH)
            data_util.write_png(os.path.join(self.image_dir, name), img)

        surface, colours = synthetic.object_surface_points(OBJECT, NUM_POINTS, seed=0)
        far = rng.normal(size=(NUM_FAR_OUTLIERS + NUM_LONELY, 3))
        far = 5.0 * far / np.linalg.norm(far, axis=1, keepdims=True)
        xyz = np.concatenate([surface, far])
        rgb = np.concatenate([colours, np.full((len(far), 3), 128)])
        image_ids = np.arange(1, NUM_CAMERAS + 1) * 3  # COLMAP ids need not be 1..N
        keypoints = {int(i): [] for i in image_ids}
        self.points = []
        for index, (p, c) in enumerate(zip(xyz, rgb)):
            length = 1 if index >= NUM_POINTS + NUM_FAR_OUTLIERS else rng.randint(2, 5)
            seen_by = rng.choice(image_ids[image_ids != image_ids[4]], size=length, replace=False)
            track = []
            for image_id in seen_by:
                track.append((int(image_id), len(keypoints[int(image_id)])))
                keypoints[int(image_id)].append((float(rng.uniform(0, WIDTH)), float(rng.uniform(0, HEIGHT))))
            self.points.append((self.to_colmap(p), c, track))
        # image_ids[4] has no observations: an empty line in images.txt.

        self.images = []
        for image_id, name, cam2world in zip(image_ids, self.names, self.cam2worlds):
            rot = self.rotation @ cam2world[:3, :3]  # camera -> COLMAP world
            centre = self.to_colmap(cam2world[:3, 3])
            world2cam = np.concatenate([rot.T, (-rot.T @ centre)[:, None]], axis=1)
            self.images.append((int(image_id), world2cam, 1, name, keypoints[int(image_id)]))
        self.pinhole = [(1, "PINHOLE", WIDTH, HEIGHT, [FOCAL, FOCAL, CX + 0.5, CY + 0.5])]
        self.text_dir = os.path.join(root, "sparse_txt")
        write_model(self.text_dir, self.pinhole, self.images, self.points)

    def to_colmap(self, points):
        return WORLD_SCALE * np.asarray(points) @ self.rotation.T + self.shift

    def to_ground_truth(self, points):
        return (np.asarray(points) - self.shift) @ self.rotation / WORLD_SCALE


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return Scene(str(tmp_path_factory.mktemp("scene")))


@pytest.fixture(scope="module")
def converted(scene, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dataset") / "object")
    code = colmap_import.main(["--colmap_dir", scene.text_dir, "--images", scene.image_dir,
                               "--out", out, "--resolution", str(RESOLUTION)])
    assert code == 0
    return out


def dataset_to_colmap(out, points):
    """Undo the documented normalisation (world_transform.txt: COLMAP world -> dataset world)."""
    transform = np.loadtxt(os.path.join(out, "world_transform.txt"))
    return (np.asarray(points) - transform[:3, 3]) @ np.linalg.inv(transform[:3, :3]).T


def ground_truth_to_dataset(scene, out, points):
    transform = np.loadtxt(os.path.join(out, "world_transform.txt"))
    return scene.to_colmap(points) @ transform[:3, :3].T + transform[:3, 3]


def turn(transform):
    """The rotation part of a (4, 4) similarity."""
    return transform[:3, :3] / np.cbrt(np.linalg.det(transform[:3, :3]))


def unit_grid_corners():
    return np.array(list(itertools.product((-0.5, 0.5), repeat=3)))


# ----------------------------------------------------------------------------- tests

def test_crop_window_matches_loader_crop():
    for height, width in [(96, 128), (97, 130), (128, 96), (51, 51)]:
        img = np.arange(height * width).reshape(height, width)
        row0, col0, side = placement.crop_window(height, width)
        np.testing.assert_array_equal(data_util.square_crop(img), img[row0:row0 + side, col0:col0 + side])


def test_poses_match_ground_truth(scene, converted):
    assert sorted(os.listdir(os.path.join(converted, "pose"))) == [f"{i:06d}.txt" for i in range(NUM_CAMERAS)]
    order = np.argsort(scene.names)
    transform = np.loadtxt(os.path.join(converted, "world_transform.txt"))
    for index, k in enumerate(order):
        path = os.path.join(converted, "pose", f"{index:06d}.txt")
        pose64 = np.loadtxt(path)
        pose32 = data_util.load_pose(path)
        assert pose32.dtype == np.float32
        np.testing.assert_allclose(pose32, pose64, atol=1e-6)
        # Undo the normalisation, then the test's similarity: the renderer's camera comes back.
        centre = scene.to_ground_truth(dataset_to_colmap(converted, pose64[:3, 3]))
        rot = scene.rotation.T @ turn(transform).T @ pose64[:3, :3]
        np.testing.assert_allclose(centre, scene.cam2worlds[k][:3, 3], atol=1e-6)
        np.testing.assert_allclose(rot, scene.cam2worlds[k][:3, :3], atol=1e-6)
        np.testing.assert_array_equal(pose64[3], [0, 0, 0, 1])
    # The normalisation is a similarity: a rotation times a uniform scale.
    rotation = turn(transform)
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(rotation) == pytest.approx(1.0)
    names = [line.split()[1] for line in open(os.path.join(converted, "source_images.txt"))]
    assert names == sorted(scene.names)


def test_grid_contains_object_and_lies_in_front_of_cameras(scene, converted):
    intrinsic, origin, scale, near_plane, _ = data_util.parse_intrinsics(
        os.path.join(converted, "intrinsics.txt"), RESOLUTION)
    np.testing.assert_array_equal(origin, [0, 0, 0])
    assert scale == 1.0
    surface, _ = synthetic.object_surface_points(OBJECT, 5000, seed=3)  # not the points COLMAP saw
    inside = ground_truth_to_dataset(scene, converted, surface)
    assert np.abs(inside).max() <= 0.5 * scale
    # Margins: the object fills the grid, it is not lost in a box inflated by the outliers.
    assert np.abs(inside).max() > 0.3 * scale
    assert near_plane > 0
    depths = []
    for name in sorted(os.listdir(os.path.join(converted, "pose"))):
        world2cam = np.linalg.inv(np.loadtxt(os.path.join(converted, "pose", name)))
        corners = unit_grid_corners() * scale + origin
        depths.append(corners @ world2cam[:3, :3].T + world2cam[:3, 3])
    depths = np.array(depths)[..., 2]
    assert depths.min() >= near_plane - 1e-9  # the whole grid is in front of every near plane
    assert depths.min() == pytest.approx(near_plane)  # and the near plane is the tight choice
    # Cameras at different distances: the back corners may pass the last plane, the centre may not.
    centre_depths = [np.linalg.norm(np.loadtxt(os.path.join(converted, "pose", name))[:3, 3])
                     for name in os.listdir(os.path.join(converted, "pose"))]
    assert max(centre_depths) <= near_plane + placement.FRUSTUM_DEPTH_IN_GRID_SIDES * scale


def test_training_loader_reads_the_folder(scene, converted):
    import dataio
    views = dataio.NovelViewTriplets(converted, RESOLUTION)
    assert len(views) == NUM_CAMERAS
    first = views.all_views[0]
    assert tuple(first["gt_rgb"].shape) == (3, RESOLUTION, RESOLUTION)
    np.testing.assert_allclose(first["pose"].numpy(), np.loadtxt(os.path.join(converted, "pose", "000000.txt")),
                               atol=1e-6)


def test_intrinsics_follow_crop_and_resize(scene, converted):
    intrinsic, _, _, _, _ = data_util.parse_intrinsics(os.path.join(converted, "intrinsics.txt"), RESOLUTION)
    zoom = RESOLUTION / HEIGHT
    np.testing.assert_allclose(intrinsic[0, 0], FOCAL * zoom)
    np.testing.assert_allclose(intrinsic[1, 1], FOCAL * zoom)
    # Pixel centres: (CX + 0.5) in COLMAP, shifted by the 16 cropped columns, scaled, back by 0.5.
    np.testing.assert_allclose(intrinsic[0, 2], (CX + 0.5 - (WIDTH - HEIGHT) // 2) * zoom - 0.5)
    np.testing.assert_allclose(intrinsic[1, 2], (CY + 0.5) * zoom - 0.5)
    lines = open(os.path.join(converted, "intrinsics.txt")).read().split("\n")
    assert lines[4].split() == [str(RESOLUTION), str(RESOLUTION)]


def test_written_images_match_a_render_with_written_camera(scene, converted):
    """End to end: rendering the scene with the written intrinsics reproduces the written image."""
    intrinsic, _, _, _, _ = data_util.parse_intrinsics(os.path.join(converted, "intrinsics.txt"), RESOLUTION)
    f, cx, cy = intrinsic[0, 0], intrinsic[0, 2], intrinsic[1, 2]
    k = int(np.argsort(scene.names)[0])
    written = data_util.read_image(os.path.join(converted, "rgb", "000000.png")).astype(np.float64)
    assert written.shape == (RESOLUTION, RESOLUTION, 3)

    def error(dx):
        render = synthetic.render_view(OBJECT, scene.cam2worlds[k], f, cx + dx, cy, RESOLUTION, RESOLUTION)
        return np.abs(render - written).mean()

    assert error(0.0) < 2.0
    assert error(0.0) < error(-0.5) and error(0.0) < error(0.5)


def test_binary_model_reads_like_text(scene, tmp_path):
    binary_dir = str(tmp_path / "sparse_bin")
    write_model(binary_dir, scene.pinhole, scene.images, scene.points, binary=True)
    text = colmap_import.read_model(scene.text_dir)
    binary = colmap_import.read_model(binary_dir)
    assert text.cameras.keys() == binary.cameras.keys() == {1}
    for key in text.cameras:
        a, b = text.cameras[key], binary.cameras[key]
        assert (a.model, a.width, a.height) == (b.model, b.width, b.height) == ("PINHOLE", WIDTH, HEIGHT)
        np.testing.assert_array_equal(a.params, b.params)
    assert text.images.keys() == binary.images.keys()
    for key in text.images:
        a, b = text.images[key], binary.images[key]
        assert (a.name, a.camera_id) == (b.name, b.camera_id)
        np.testing.assert_allclose(a.cam2world, b.cam2world, atol=1e-12)
    np.testing.assert_array_equal(np.sort(text.points, axis=0), np.sort(binary.points, axis=0))
    np.testing.assert_array_equal(np.sort(text.track_lengths), np.sort(binary.track_lengths))
    assert text.track_lengths.min() == 1 and len(text.points) == len(scene.points)

    # The parent folder (as the mapper leaves it: sparse/0) is accepted too.
    nested = tmp_path / "sparse"
    shutil.copytree(binary_dir, nested / "0")
    assert len(colmap_import.read_model(str(nested)).images) == NUM_CAMERAS


# The committed model (tests/fixtures/colmap3_model, see the README there): 3 images and 4 points in COLMAP 3.x's
# layout (no rigs or frames files), once as text and once as binary. Its values, written down by hand:
FIXTURE_CAMERA = ("SIMPLE_RADIAL", 64, 48, [50.0, 32.0, 24.0, 0.01])
FIXTURE_CENTRES = {"a.png": [0.0, 0.0, -3.0], "b.png": [3.0, 0.0, 0.0], "c.png": [0.0, -3.0, 0.0]}


@pytest.mark.parametrize("layout", ["text", "binary"])
def test_reads_a_colmap3_model(layout):
    model = colmap_import.read_model(os.path.join(FIXTURES, "colmap3_model", layout))
    (camera,) = model.cameras.values()
    assert (camera.model, camera.width, camera.height) == FIXTURE_CAMERA[:3]
    np.testing.assert_allclose(camera.params, FIXTURE_CAMERA[3])
    assert sorted(image.name for image in model.images.values()) == sorted(FIXTURE_CENTRES)
    for image in model.images.values():
        np.testing.assert_allclose(image.cam2world[:3, 3], FIXTURE_CENTRES[image.name], atol=1e-12)
        # Every camera looks at the origin: its +z axis points from its centre to (0, 0, 0).
        np.testing.assert_allclose(image.cam2world[:3, 2], -np.array(FIXTURE_CENTRES[image.name]) / 3.0, atol=1e-12)
    assert len(model.points) == 4 and sorted(model.track_lengths) == [2, 2, 3, 3]


def test_binary_conversion_equals_text_conversion(scene, converted, tmp_path):
    binary_dir = str(tmp_path / "sparse_bin")
    write_model(binary_dir, scene.pinhole, scene.images, scene.points, binary=True)
    out = str(tmp_path / "object")
    assert colmap_import.main(["--colmap_dir", binary_dir, "--images", scene.image_dir, "--out", out,
                               "--resolution", str(RESOLUTION)]) == 0
    for sub in ("pose", "rgb"):
        for name in os.listdir(os.path.join(converted, sub)):
            with open(os.path.join(converted, sub, name), "rb") as a, open(os.path.join(out, sub, name), "rb") as b:
                assert a.read() == b.read(), name
    assert open(os.path.join(converted, "intrinsics.txt")).read() == open(os.path.join(out, "intrinsics.txt")).read()


def test_overrides_and_simple_pinhole(scene, tmp_path):
    """--origin/--scale in COLMAP units, --near_plane in grid sides; SIMPLE_PINHOLE; no resize."""
    model_dir = str(tmp_path / "simple")
    write_model(model_dir, [(1, "SIMPLE_PINHOLE", WIDTH, HEIGHT, [FOCAL, CX + 0.5, CY + 0.5])],
                     scene.images, scene.points)
    out = str(tmp_path / "object")
    origin = scene.to_colmap([0.0, 0.0, -0.07])
    assert colmap_import.main(["--colmap_dir", model_dir, "--images", scene.image_dir, "--out", out,
                               "--origin", *map(str, origin), "--scale", str(WORLD_SCALE),
                               "--near_plane", "0.7", "--align", "none"]) == 0
    intrinsic, _, scale, near_plane, _ = data_util.parse_intrinsics(os.path.join(out, "intrinsics.txt"), HEIGHT)
    assert (scale, near_plane) == (1.0, 0.7)
    np.testing.assert_allclose(intrinsic[0, 0], FOCAL)
    np.testing.assert_allclose(intrinsic[0, 2], CX - (WIDTH - HEIGHT) // 2)
    np.testing.assert_allclose(intrinsic[1, 2], CY)
    assert data_util.read_image(os.path.join(out, "rgb", "000000.png")).shape == (HEIGHT, HEIGHT, 3)
    # Scale 3 in COLMAP is one ground-truth unit: the dataset world is the renderer's, shifted
    # and turned by the test's rotation.
    k = int(np.argsort(scene.names)[0])
    pose = np.loadtxt(os.path.join(out, "pose", "000000.txt"))
    expected = scene.rotation @ (scene.cam2worlds[k][:3, 3] - [0.0, 0.0, -0.07])
    np.testing.assert_allclose(pose[:3, 3], expected, atol=1e-9)


def test_alignment_puts_the_cube_square_in_the_grid(scene, converted):
    """COLMAP's world is turned at random; the importer turns it back so that the cameras' up is +z and the
    cube's faces are parallel to the grid's: ground-truth axes map onto dataset axes up to order and sign."""
    gt_to_dataset = turn(np.loadtxt(os.path.join(converted, "world_transform.txt"))) @ scene.rotation
    assert gt_to_dataset[:, 2] @ placement.DATASET_UP > np.cos(np.deg2rad(2.0))  # up stays up
    nearest_axes = np.round(gt_to_dataset)
    assert sorted(np.abs(nearest_axes).sum(axis=0)) == [1, 1, 1]  # a signed permutation
    angle = np.degrees(np.arccos(np.clip((np.trace(nearest_axes.T @ gt_to_dataset) - 1) / 2, -1, 1)))
    assert angle < 2.0
    # The grid is as tight as the margins allow: the cube (side 1 in ground truth) fills 1 / (1 + 2 margin).
    inside = ground_truth_to_dataset(scene, converted, synthetic.object_surface_points(OBJECT, 5000, seed=3)[0])
    assert np.ptp(inside, axis=0).max() > 0.75


def test_yaw_search_finds_a_square_footprint():
    rng = np.random.RandomState(0)
    square = rng.uniform(-1, 1, size=(4000, 2)) * [2.0, 1.0]  # a 4 x 2 rectangle
    for degrees in (0.0, 17.0, 63.0, 89.5):
        turned = square @ placement.rotation_about_z(np.deg2rad(degrees))[:2, :2].T
        back = np.rad2deg(placement.best_yaw(turned))
        assert min(abs(back + degrees) % 90, 90 - abs(back + degrees) % 90) < 0.3


def test_rotation_between_unit_vectors():
    rng = np.random.RandomState(0)
    for a, b in [(rng.normal(size=3), rng.normal(size=3)), ([0, 0, 1.0], [0, 0, 1.0]), ([0, 0, 1.0], [0, 0, -1.0])]:
        a, b = np.asarray(a) / np.linalg.norm(a), np.asarray(b) / np.linalg.norm(b)
        rot = placement.rotation_between(a, b)
        np.testing.assert_allclose(rot @ a, b, atol=1e-12)
        np.testing.assert_allclose(rot @ rot.T, np.eye(3), atol=1e-12)
        assert np.linalg.det(rot) == pytest.approx(1.0)


def test_distorted_camera_is_undistorted_with_pycolmap(scene, converted, tmp_path):
    """A SIMPLE_RADIAL model goes through pycolmap's undistorter: the same poses, a pinhole camera close to the
    distorted one (the undistorter rescales the focal length a little to keep the image filled)."""
    model_dir = str(tmp_path / "radial")
    write_model(model_dir, [(1, "SIMPLE_RADIAL", WIDTH, HEIGHT, [FOCAL, CX + 0.5, CY + 0.5, 0.02])],
                scene.images, scene.points)
    out = str(tmp_path / "object")
    assert colmap_import.main(["--colmap_dir", model_dir, "--images", scene.image_dir, "--out", out,
                               "--resolution", str(RESOLUTION)]) == 0
    for name in os.listdir(os.path.join(converted, "pose")):
        np.testing.assert_allclose(np.loadtxt(os.path.join(out, "pose", name)),
                                   np.loadtxt(os.path.join(converted, "pose", name)), atol=1e-9)
    expected, _, _, _, _ = data_util.parse_intrinsics(os.path.join(converted, "intrinsics.txt"), RESOLUTION)
    undistorted, _, _, _, _ = data_util.parse_intrinsics(os.path.join(out, "intrinsics.txt"), RESOLUTION)
    np.testing.assert_allclose(undistorted, expected, rtol=0.05)
    assert not os.path.exists(os.path.join(out, ".work"))


def test_refuses_unequal_focal_lengths(scene, tmp_path, capsys):
    model_dir = str(tmp_path / "aspect")
    write_model(model_dir, [(1, "PINHOLE", WIDTH, HEIGHT, [FOCAL, 1.05 * FOCAL, CX, CY])],
                     scene.images, scene.points)
    args = ["--colmap_dir", model_dir, "--images", scene.image_dir]
    assert colmap_import.main(args + ["--out", str(tmp_path / "a")]) == 2
    assert "fx=" in capsys.readouterr().err
    assert colmap_import.main(args + ["--out", str(tmp_path / "b"), "--max_focal_mismatch", "0.1"]) == 0


@pytest.mark.parametrize("missing", ["points3D.txt", "images.txt"])
def test_missing_model_file(scene, tmp_path, capsys, missing):
    model_dir = tmp_path / "model"
    shutil.copytree(scene.text_dir, model_dir)
    os.remove(model_dir / missing)
    code = colmap_import.main(["--colmap_dir", str(model_dir), "--images", scene.image_dir,
                               "--out", str(tmp_path / "object")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and str(model_dir) in err and missing.split(".")[0] in err


def test_missing_image_and_bad_lines(scene, tmp_path, capsys):
    photos = tmp_path / "photos"
    shutil.copytree(scene.image_dir, photos)
    os.remove(photos / scene.names[3])
    out = tmp_path / "object"
    args = ["--colmap_dir", scene.text_dir, "--out", str(out)]
    assert colmap_import.main(args + ["--images", str(photos)]) == 2
    assert scene.names[3] in capsys.readouterr().err
    assert not out.exists() and os.listdir(tmp_path) == ["photos"]  # nothing half-written, no staging left

    model_dir = tmp_path / "model"
    shutil.copytree(scene.text_dir, model_dir)
    with open(model_dir / "cameras.txt", "a") as f:
        f.write("2 PINHOLE 128 nan_width 1 2 3 4\n")
    assert colmap_import.main(["--colmap_dir", str(model_dir), "--images", scene.image_dir, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(model_dir) in err and "not a readable COLMAP model" in err


@pytest.mark.slow
def test_command_line_exits_2_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tools.dataset", "from_colmap", "--colmap_dir",
                             str(tmp_path / "nowhere"), "--images", str(tmp_path), "--out", str(tmp_path / "object")],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: ") and "nowhere" in result.stderr
