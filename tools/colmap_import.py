"""Turn a COLMAP sparse reconstruction into a DeepVoxels object folder, grid placed automatically.

Usage:

    python -m tools.dataset from_colmap --colmap_dir SPARSE --images DIR --out OUT [--resolution 512]
    python -m tools.dataset from_colmap --run_colmap --images DIR --out OUT      # run COLMAP first

OUT receives the layout the DeepVoxels loader reads:

    OUT/rgb/%06d.png        square centre crops (the loader's crop), optionally area-resized
    OUT/pose/%06d.txt       (4, 4) cam2world, OpenCV camera (+x right, +y down, +z forward) -> world
    OUT/intrinsics.txt      f cx cy / origin / near_plane / scale / img_height img_width

plus two files the loader ignores: `source_images.txt` (the COLMAP image name of each index) and
`world_transform.txt` ((4, 4) similarity, COLMAP world -> dataset world).

Conventions
-----------
* COLMAP stores world2cam as a unit quaternion (qw, qx, qy, qz) and a translation t. Its camera
  axes already are OpenCV's, so cam2world = inverse([R | t]) with no axis flip.
* Pixel coordinates: COLMAP puts the centre of the top-left pixel at (0.5, 0.5); data_util and the
  projection code put it at (0, 0). The crop (a shift) and the resize (a product) are applied in
  COLMAP's corner-origin coordinates, where both are exact, then cx and cy move by -0.5.
  Writing at the training side length (--resolution) avoids any later rescale by the loader.
* Only pinhole cameras (PINHOLE, SIMPLE_PINHOLE) can be written: DeepVoxels has one focal length
  and no distortion. Distorted models are undistorted with `colmap image_undistorter` when a
  `colmap` executable is on PATH and refused otherwise.

Normalisation (the choice made here)
------------------------------------
The world is re-expressed so that the grid is centred at the origin with side 1 and its axes sit square
to the object: x_dataset = R (x_colmap - origin) / scale. intrinsics.txt then holds origin 0 0 0 and scale 1,
like every dataset the original shipped, so the model's defaults (and its --near_plane, which is
in grid units) keep their meaning whatever unit COLMAP's arbitrary gauge happened to pick. The
near plane written is measured in the same units. --origin and --scale override the automatic
placement and are given in COLMAP world units (the units of points3D.txt); --near_plane is given
in dataset units (grid side = 1), the units intrinsics.txt stores. `world_transform.txt` keeps the
similarity so results can be mapped back onto the reconstruction.

Grid placement
--------------
* axes (R, ``--align object``): COLMAP's axes are arbitrary, and a voxel grid turned against the object
  wastes voxels and draws its faces as staircases. The mean of the cameras' up vectors (-y of each
  camera; photos are mostly taken upright) becomes +z, the built-in scenes' up. That up is corrected by
  up to MAX_TILT_DEG, and the object turned about it, so that its sparse points (filtered as below) fit
  the smallest cube (yaw and tilt searched alternately): a box-shaped object ends up face-on.
  ``--align none`` keeps COLMAP's axes.
* points: the sparse points, without those seen by fewer than MIN_TRACK_LENGTH images. The
  per-axis [trim, 1 - trim] quantiles give a core box that floaters and distant background cannot
  move; the object's box is the full extent of the points within TAIL_WINDOW core sizes of it
  (the quantiles alone cut off the object's thin tails, e.g. corners turned against the axes).
* origin: the centre of the object's box. (A per-axis median is pulled towards the side with
  the most texture; the box centre gives the object equal room on both sides.)
* scale: the largest side of the object's box around the origin, times (1 + 2 * margin).
* near_plane: the smallest depth, over every camera and every grid corner, at which a grid corner
  lies, so the whole grid is in front of every camera's first frustum plane; clamped to at least
  MIN_NEAR_PLANE when a camera sits inside or behind the grid.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import os
import shutil
import sys
from typing import Mapping, Optional, Sequence

import numpy as np

import data_util

log = logging.getLogger(__name__)

# COLMAP's triangulated points need two views; shorter tracks are noise when they appear at all.
MIN_TRACK_LENGTH = 2
# Object points are looked for this far (in sizes of the quantile box) beyond the quantile box:
# far enough for the tails the quantiles cut, short of background a few object sizes away.
TAIL_WINDOW = 0.25
# Fewer points than this cannot give meaningful quantiles.
MIN_POINTS = 10
# The model's frustum has 2 * G depth planes spaced scale / G: it spans two grid sides in depth.
FRUSTUM_DEPTH_IN_GRID_SIDES = 2.0
# Smallest near plane written (grid sides); a camera inside the grid would otherwise give <= 0.
MIN_NEAR_PLANE = 0.05
# COLMAP puts the centre of the top-left pixel at (0.5, 0.5); DeepVoxels (data_util) puts it at (0, 0).
COLMAP_TO_CENTRE_PIXELS = 0.5
# Up is the mean of the cameras' up vectors; when they point every which way (their mean is shorter than
# this), there is no up to align to.
MIN_UP_AGREEMENT = 0.3
# The yaw that fits the object's horizontal footprint into the smallest square is searched at this step
# (degrees) over a quarter turn, then refined once around the best angle at a tenth of it.
YAW_STEP_DEG = 1.0
# Among yaws whose square is within this fraction of the smallest, the one with the smallest rectangle wins.
YAW_TIE_TOLERANCE = 1e-3
# The cameras' mean up may be off by a few degrees (they look down on the object from one side more than
# another); it is corrected by up to this much, towards the tilt that fits the object in the smallest cube.
MAX_TILT_DEG = 10.0
ALIGN_ROUNDS = 2  # alternations of the yaw and the tilt search
ALIGN_POINTS = 4000  # sparse points used to measure the object's extent while searching
DATASET_UP = np.array([0.0, 0.0, 1.0])  # world up of the built-in scenes and the camera path helpers
# Cameras sharing an intrinsics.txt may differ by this fraction of the focal length (pixels).
CAMERA_PARAM_TOLERANCE = 0.01
# Structure from motion models the camera as one focal length, the principal point and one radial term,
# shared by every image (one zoom setting); undistortion then yields the single PINHOLE DeepVoxels needs.
SFM_CAMERA_MODEL = "SIMPLE_RADIAL"


@dataclasses.dataclass
class Camera:
    """A COLMAP camera: model name, image size, parameters, and its pinhole part (corner-origin pixels)."""
    camera_id: int
    model: str
    width: int
    height: int
    params: np.ndarray
    fx: float
    fy: float
    cx: float
    cy: float
    pinhole: bool  # a perspective projection without distortion (PINHOLE, or any model with zero distortion)


@dataclasses.dataclass
class Image:
    """A registered COLMAP image and its pose."""
    image_id: int
    cam2world: np.ndarray  # (4, 4) OpenCV camera (+x right, +y down, +z forward) -> COLMAP world
    camera_id: int
    name: str


@dataclasses.dataclass
class SparseModel:
    cameras: dict
    images: dict  # registered images only
    points: np.ndarray  # (N, 3) world positions
    track_lengths: np.ndarray  # (N,) number of images that see each point
    source: str  # model directory, for messages
    mean_reprojection_error: float = float("nan")  # pixels


def _error(path: str, message: str) -> Exception:
    return data_util.DataError(f"{path}: {message}")


def quiet_pycolmap() -> None:
    """COLMAP logs every step (and advice about threads and memory) on stderr; keep its errors only."""
    import pycolmap
    pycolmap.logging.minloglevel = pycolmap.logging.ERROR


# ----------------------------------------------------------------------------- reading COLMAP models

def find_model_dir(colmap_dir: str) -> str:
    """The sparse model folder: colmap_dir itself or, as the mapper leaves it (sparse/0), its first subfolder
    holding a model."""
    if not os.path.isdir(colmap_dir):
        raise _error(colmap_dir, "COLMAP model folder not found")
    candidates = [colmap_dir] + sorted(os.path.join(colmap_dir, d) for d in os.listdir(colmap_dir)
                                       if os.path.isdir(os.path.join(colmap_dir, d)))
    for directory in candidates:
        if any(os.path.isfile(os.path.join(directory, f"cameras.{ext}")) for ext in ("bin", "txt")):
            return directory
    raise _error(colmap_dir, "no COLMAP model here: expected cameras, images and points3D files (.bin or .txt)")


def read_model(colmap_dir: str) -> SparseModel:
    """Read a COLMAP sparse model with pycolmap: binary or text, COLMAP 3.x (cameras, images, points3D) or
    4.x (also rigs and frames) layout. Only registered images are kept."""
    import pycolmap
    directory = find_model_dir(colmap_dir)
    reconstruction = pycolmap.Reconstruction()
    try:
        reconstruction.read(directory)
    except (ValueError, RuntimeError) as err:  # pycolmap turns COLMAP's failed checks into these
        raise _error(directory, f"not a readable COLMAP model ({data_util.one_line(err)})") from None
    cameras = {}
    for camera_id, camera in reconstruction.cameras.items():
        params = np.asarray(camera.params, dtype=np.float64)
        if not np.all(np.isfinite(params)) or camera.width <= 0 or camera.height <= 0:
            raise _error(directory, f"camera {camera_id} has an invalid size or parameters")
        pinhole = camera.is_undistorted() and "FISHEYE" not in camera.model.name
        cameras[camera_id] = Camera(camera_id, camera.model.name, camera.width, camera.height, params,
                                    camera.focal_length_x, camera.focal_length_y, camera.principal_point_x,
                                    camera.principal_point_y, pinhole)
    images = {}
    for image_id in reconstruction.reg_image_ids():
        image = reconstruction.image(image_id)
        world2cam = np.eye(4)
        world2cam[:3] = image.cam_from_world().matrix()
        images[image_id] = Image(image_id, np.linalg.inv(world2cam), image.camera_id, image.name)
    if not images:
        raise _error(directory, "no registered images")
    points3d = reconstruction.points3D
    points = np.array([p.xyz for p in points3d.values()], dtype=np.float64).reshape(-1, 3)
    tracks = np.array([p.track.length() for p in points3d.values()], dtype=np.int64)
    return SparseModel(cameras, images, points, tracks, directory,
                       float(reconstruction.compute_mean_reprojection_error()))


# ----------------------------------------------------------------------------- geometry

def colmap_to_dataset(origin: np.ndarray, scale: float, rotation: Optional[np.ndarray] = None) -> np.ndarray:
    """(4, 4) similarity COLMAP world -> dataset world: x_dataset = rotation @ (x_colmap - origin) / scale,
    so the grid centre goes to 0, the grid side to 1 and the grid's axes to the dataset's axes."""
    rotation = np.eye(3) if rotation is None else np.asarray(rotation, dtype=np.float64)
    transform = np.eye(4)
    transform[:3, :3] = rotation / scale
    transform[:3, 3] = -rotation @ np.asarray(origin, dtype=np.float64) / scale
    return transform


def rotation_between(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(3, 3) rotation taking unit vector a to unit vector b by the shortest arc (Rodrigues)."""
    axis = np.cross(a, b)
    sin, cos = np.linalg.norm(axis), float(np.dot(a, b))
    if sin < 1e-12:
        if cos > 0:
            return np.eye(3)
        # Opposite: half a turn about any axis perpendicular to a.
        helper = np.eye(3)[np.argmin(np.abs(a))]
        axis = np.cross(a, helper)
        axis /= np.linalg.norm(axis)
        return 2.0 * np.outer(axis, axis) - np.eye(3)
    k = axis / sin
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + sin * cross + (1.0 - cos) * cross @ cross


def rotation_about_z(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def camera_up(cam2worlds: np.ndarray) -> tuple[Optional[np.ndarray], float]:
    """Mean of the cameras' up vectors (-y of an OpenCV camera, in world axes), normalised, and the length of
    the mean of the unit vectors (1: all agree); None when they do not agree (length < MIN_UP_AGREEMENT)."""
    ups = -cam2worlds[:, :3, 1]
    mean = ups.mean(axis=0)
    agreement = float(np.linalg.norm(mean))
    return (mean / agreement if agreement >= MIN_UP_AGREEMENT else None), agreement


def _footprint(points_xy: np.ndarray, angle: float) -> tuple[float, float]:
    """(side of the smallest axis-aligned square, area of the rectangle) holding the points turned by angle."""
    c, s = np.cos(angle), np.sin(angle)
    x = c * points_xy[:, 0] - s * points_xy[:, 1]
    y = s * points_xy[:, 0] + c * points_xy[:, 1]
    width, depth = np.ptp(x), np.ptp(y)
    return max(width, depth), width * depth


def best_yaw(points_xy: np.ndarray) -> float:
    """Angle (radians, in [0, pi/2)) about the vertical that fits the points' footprint into the smallest
    axis-aligned square, ties going to the smallest rectangle: a box-shaped object ends up face-on to the
    grid, and any object uses as many voxels as it can."""
    def search(angles: np.ndarray) -> float:
        sides, areas = np.array([_footprint(points_xy, a) for a in angles]).T
        near_best = sides <= sides.min() * (1.0 + YAW_TIE_TOLERANCE)
        return float(angles[near_best][np.argmin(areas[near_best])])
    step = np.deg2rad(YAW_STEP_DEG)
    coarse = search(np.arange(0.0, np.pi / 2, step))
    return search(coarse + np.linspace(-step, step, 21)) % (np.pi / 2)


def _tilt(about_x: float, about_y: float) -> np.ndarray:
    cx, sx, cy, sy = np.cos(about_x), np.sin(about_x), np.cos(about_y), np.sin(about_y)
    return np.array([[1.0, 0, 0], [0, cx, -sx], [0, sx, cx]]) @ np.array([[cy, 0, sy], [0, 1.0, 0], [-sy, 0, cy]])


def best_tilt(points: np.ndarray, max_deg: float) -> np.ndarray:
    """Small rotation about x and y (within max_deg) that fits the points into the smallest axis-aligned
    cube, ties going to the smallest box: corrects an up direction that is off by a few degrees."""
    def search(centre: np.ndarray, half: float, steps: int) -> tuple[np.ndarray, float]:
        grid = np.linspace(-half, half, steps)
        candidates = [(centre + [a, b]) for a in grid for b in grid]
        sides, volumes = [], []
        for a, b in candidates:
            extent = np.ptp(points @ _tilt(a, b).T, axis=0)
            sides.append(extent.max())
            volumes.append(extent.prod())
        sides, volumes = np.array(sides), np.array(volumes)
        near_best = np.flatnonzero(sides <= sides.min() * (1.0 + YAW_TIE_TOLERANCE))
        return candidates[near_best[np.argmin(volumes[near_best])]], half / (steps - 1) * 2
    limit = np.deg2rad(max_deg)
    angles, step = search(np.zeros(2), limit, 2 * int(max_deg) + 1)
    angles, _ = search(angles, step, 21)
    return _tilt(*angles)


def align_to_object(cam2worlds: np.ndarray, points: np.ndarray, track_lengths: Optional[np.ndarray],
                    trim: float, source: str) -> tuple[np.ndarray, str]:
    """(3, 3) rotation of the COLMAP world that puts the cameras' mean up on the dataset's +z, corrects that
    up by up to MAX_TILT_DEG and turns the object about it so that it fits the grid best; and how."""
    up, agreement = camera_up(cam2worlds)
    if up is None:
        log.warning("the cameras' up vectors disagree (mean length %.2f < %.2f): world not rotated",
                    agreement, MIN_UP_AGREEMENT)
        return np.eye(3), f"none: the cameras' up vectors disagree (mean length {agreement:.2f})"
    rotation = rotation_between(up, DATASET_UP)
    levelled = points @ rotation.T
    low, high, _ = robust_box(levelled, track_lengths, trim, source)
    # The object's points (the filtered box), at most ALIGN_POINTS of them: enough for its extent.
    obj = points[np.all((levelled >= low) & (levelled <= high), axis=1)]
    obj = obj[np.random.RandomState(0).permutation(len(obj))[:ALIGN_POINTS]]
    for _ in range(ALIGN_ROUNDS):  # yaw and tilt depend on each other a little: alternate
        rotation = rotation_about_z(best_yaw((obj @ rotation.T)[:, :2])) @ rotation
        rotation = best_tilt(obj @ rotation.T, MAX_TILT_DEG) @ rotation
    rotation = rotation_about_z(best_yaw((obj @ rotation.T)[:, :2])) @ rotation
    tilt = np.rad2deg(np.arccos(np.clip(rotation[2] @ up, -1.0, 1.0)))
    how = (f"mean camera up (agreement {agreement:.2f}) to +z, corrected by {tilt:.1f} deg, and the turn about "
           f"it that fit the object's sparse points into the smallest cube")
    return rotation, how


def move_camera(transform: np.ndarray, cam2world: np.ndarray) -> np.ndarray:
    """Re-express a (4, 4) cam2world in the world a similarity maps to; the rotation stays orthonormal."""
    moved = cam2world.copy()
    moved[:3, 3] = transform[:3, :3] @ cam2world[:3, 3] + transform[:3, 3]
    moved[:3, :3] = transform[:3, :3] @ cam2world[:3, :3] / np.cbrt(np.linalg.det(transform[:3, :3]))
    return moved


def robust_box(points: np.ndarray, track_lengths: Optional[np.ndarray], trim: float,
               source: str) -> tuple[np.ndarray, np.ndarray, str]:
    """Bounding box (low (3,), high (3,)) of the object's sparse points, and how it was found.

    Points seen by fewer than MIN_TRACK_LENGTH images go first. The per-axis [trim, 1 - trim]
    quantiles give a core box that outliers cannot move; the quantiles also cut the object's own
    thin tails (a corner of an object turned against the axes holds few points), so the box
    returned is the full extent of the points within TAIL_WINDOW core sizes of the core box.
    """
    total = len(points)
    if track_lengths is not None and len(track_lengths) == len(points):
        points = points[track_lengths >= MIN_TRACK_LENGTH]
    if len(points) < MIN_POINTS:
        raise _error(source, f"only {len(points)} sparse points seen by >= {MIN_TRACK_LENGTH} images; "
                             "cannot place the grid (give --origin and --scale)")
    core_low = np.quantile(points, trim, axis=0)
    core_high = np.quantile(points, 1.0 - trim, axis=0)
    reach = TAIL_WINDOW * (core_high - core_low).max()
    near_core = np.all((points >= core_low - reach) & (points <= core_high + reach), axis=1)
    kept = points[near_core]
    how = (f"{len(kept)} of {total} sparse points: tracks >= {MIN_TRACK_LENGTH}, within "
           f"{TAIL_WINDOW:g} x its size of the per-axis {trim:g}..{1 - trim:g} quantile box")
    return kept.min(axis=0), kept.max(axis=0), how


def grid_side(low: np.ndarray, high: np.ndarray, origin: np.ndarray, margin: float) -> float:
    """Side of the cube centred at origin that holds the box [low, high] plus a margin per side."""
    half = np.max(np.maximum(high - origin, origin - low))
    return float(2.0 * half * (1.0 + 2.0 * margin))


def grid_corner_depths(cam2worlds: np.ndarray) -> np.ndarray:
    """(N, 4, 4) cam2world in dataset units -> (N, 8) camera-space z of the unit grid's corners."""
    corners = np.array(list(itertools.product((-0.5, 0.5), repeat=3)))  # (8, 3), grid side 1
    world2cams = np.linalg.inv(cam2worlds)
    cam_points = np.einsum("nij,kj->nki", world2cams[:, :3, :3], corners) + world2cams[:, None, :3, 3]
    return cam_points[..., 2]


def choose_near_plane(cam2worlds: np.ndarray) -> tuple[float, str]:
    """Near plane (grid sides) that puts the unit grid in front of every camera, and why."""
    depths = grid_corner_depths(cam2worlds)
    closest = float(depths.min())
    camera = int(np.unravel_index(depths.argmin(), depths.shape)[0])
    if closest < MIN_NEAR_PLANE:
        log.warning("camera %06d is inside or behind the grid (nearest grid corner at depth %.3f); "
                    "near plane clamped to %.3f", camera, closest, MIN_NEAR_PLANE)
        return MIN_NEAR_PLANE, f"clamped to {MIN_NEAR_PLANE} (camera {camera:06d} reaches into the grid)"
    return closest, f"nearest grid corner over all cameras (camera {camera:06d})"


# ----------------------------------------------------------------------------- images

def crop_window(height: int, width: int) -> tuple[int, int, int]:
    """(row0, col0, side) of the loader's centre crop: centre = shape // 2, half = min // 2."""
    half = min(height, width) // 2
    return height // 2 - half, width // 2 - half, 2 * half


def to_square(img: np.ndarray, side: int) -> np.ndarray:
    """HxW(x3) image -> (side, side, 3) of the same dtype: the loader's centre crop, area resize."""
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    img = data_util.square_crop(img)
    if img.shape[0] == side:
        return img
    top = np.iinfo(img.dtype).max
    return np.clip(np.rint(data_util.resize_area(img, side)), 0, top).astype(img.dtype)


def shared_pinhole(model: SparseModel, max_focal_mismatch: float) -> tuple[Camera, float, float, float]:
    """The one pinhole camera every image uses -> (camera, f, cx, cy) in COLMAP pixels."""
    used = sorted({image.camera_id for image in model.images.values()})
    for camera_id in used:
        if camera_id not in model.cameras:
            raise _error(model.source, f"an image uses camera {camera_id}, which the model lacks")
        camera = model.cameras[camera_id]
        if not camera.pinhole:
            raise _error(model.source, f"camera {camera_id} is {camera.model} with distortion; DeepVoxels needs an "
                         "undistorted pinhole camera")
    params = []
    for camera_id in used:
        camera = model.cameras[camera_id]
        fx, fy, cx, cy = camera.fx, camera.fy, camera.cx, camera.cy
        if abs(fx - fy) > max_focal_mismatch * 0.5 * (fx + fy):
            raise _error(model.source, f"camera {camera_id} has fx={fx:g} and fy={fy:g}, more than "
                         f"{100 * max_focal_mismatch:g}% apart; DeepVoxels has one focal length "
                         "(raise --max_focal_mismatch to average them)")
        params.append([0.5 * (fx + fy), cx, cy])
    params = np.array(params)
    reference = model.cameras[used[0]]
    for camera_id, p in zip(used, params):
        camera = model.cameras[camera_id]
        if (camera.width, camera.height) != (reference.width, reference.height) or \
                np.abs(p - params[0]).max() > CAMERA_PARAM_TOLERANCE * params[0, 0]:
            raise _error(model.source, f"cameras {used[0]} and {camera_id} differ; one intrinsics.txt needs one "
                         "camera (reconstruct with a single shared camera)")
    f, cx, cy = params.mean(axis=0)
    return reference, float(f), float(cx), float(cy)


# ----------------------------------------------------------------------------- structure from motion (pycolmap)

def run_sfm(image_dir: str, work_dir: str, matching: str = "exhaustive",
            image_names: Sequence[str] = ()) -> str:
    """SIFT features, matching and incremental mapping of every image in image_dir, all through pycolmap, with
    one shared SIMPLE_RADIAL camera. Returns the folder of the model with the most registered images.

    matching: "exhaustive" (every pair: unordered photos, up to a few hundred) or "sequential" (each image
    with its next neighbours by name: video frames). image_names: the images to use (default: every image
    in image_dir and its subfolders).
    """
    import pycolmap
    quiet_pycolmap()
    pycolmap.set_random_seed(0)
    os.makedirs(work_dir, exist_ok=True)
    database = os.path.join(work_dir, "database.db")
    reader = pycolmap.ImageReaderOptions()
    reader.camera_model = SFM_CAMERA_MODEL
    pycolmap.extract_features(database, image_dir, image_names=list(image_names),
                              camera_mode=pycolmap.CameraMode.SINGLE, reader_options=reader, device=pycolmap.Device.cpu)
    if matching == "sequential":
        pairing = pycolmap.SequentialPairingOptions()
        pycolmap.match_sequential(database, pairing_options=pairing, device=pycolmap.Device.cpu)
    elif matching == "exhaustive":
        pycolmap.match_exhaustive(database, device=pycolmap.Device.cpu)
    else:
        raise data_util.DataError(f"--matching {matching!r}: expected 'exhaustive' or 'sequential'")
    sparse = os.path.join(work_dir, "sparse")
    os.makedirs(sparse, exist_ok=True)
    options = pycolmap.IncrementalPipelineOptions()
    options.random_seed = 0
    models = pycolmap.incremental_mapping(database, image_dir, sparse, options)
    if not models:
        raise _error(image_dir, "structure from motion registered no images (too little texture or overlap?)")
    best = max(models, key=lambda k: models[k].num_reg_images())
    if len(models) > 1:
        log.info("structure from motion made %d models with %s images; using the largest", len(models),
                 sorted((m.num_reg_images() for m in models.values()), reverse=True))
    return os.path.join(sparse, str(best))


def undistort(model_dir: str, image_dir: str, work_dir: str) -> tuple[str, str]:
    """Undistort a model and its images to PINHOLE cameras with pycolmap -> (model dir, image dir)."""
    import pycolmap
    quiet_pycolmap()
    out = os.path.join(work_dir, "undistorted")
    os.makedirs(out, exist_ok=True)
    try:
        pycolmap.undistort_images(out, model_dir, image_dir, output_type="COLMAP")
    except (ValueError, RuntimeError) as err:
        raise _error(model_dir, f"undistortion failed ({data_util.one_line(err)})") from None
    return os.path.join(out, "sparse"), os.path.join(out, "images")


def pinhole_model(model_dir: str, image_dir: str, work_dir: str) -> tuple[SparseModel, str]:
    """Read a model; when its cameras have distortion, undistort it (into work_dir) first.
    Returns (pinhole model, folder of the images it names)."""
    model = read_model(model_dir)
    distorted = sorted({model.cameras[i.camera_id].model for i in model.images.values()
                        if i.camera_id in model.cameras and not model.cameras[i.camera_id].pinhole})
    if not distorted:
        return model, image_dir
    log.info("camera model %s has distortion; undistorting to PINHOLE", distorted[0])
    undistorted_model, undistorted_images = undistort(model.source, image_dir, work_dir)
    undistorted = read_model(undistorted_model)
    undistorted.mean_reprojection_error = model.mean_reprojection_error
    return undistorted, undistorted_images


# ----------------------------------------------------------------------------- conversion

def convert(model: SparseModel, image_dir: str, out_dir: str, resolution: Optional[int] = None,
            origin: Optional[Sequence[float]] = None, scale: Optional[float] = None,
            near_plane: Optional[float] = None, margin: float = 0.1, trim: float = 0.05,
            max_focal_mismatch: float = 0.01, align: str = "object",
            splits: Optional[Mapping[str, Sequence[int]]] = None,
            sources: Optional[Mapping[str, str]] = None) -> dict:
    """Write DeepVoxels object folders from a pinhole COLMAP model; returns the chosen values.

    out_dir: the object folder; with ``splits`` ({relative folder: indices into the images sorted by name}),
    the root under which each of those folders is written (e.g. "train/obj": [1, 2, ...]).
    origin, scale: grid centre and side in COLMAP world units (None: placed from the points).
    near_plane: in dataset units, grid side = 1 (None: nearest grid corner over all cameras).
    align: "object" turns the world so that the cameras' up is +z and the object sits square in the grid
    (``align_to_object``); "none" keeps COLMAP's axes.
    sources: what source_images.txt says each image came from (default: its name in the model).
    """
    camera, f, cx, cy = shared_pinhole(model, max_focal_mismatch)
    row0, col0, side = crop_window(camera.height, camera.width)
    out_side = side if resolution is None else int(resolution)
    if out_side > side:
        raise data_util.DataError(f"--resolution {out_side} exceeds the {side} px square crop of "
                                  f"{camera.height}x{camera.width} images; the loader resizes anyway")
    images = sorted(model.images.values(), key=lambda image: image.name)
    for image in images:
        if not os.path.isfile(os.path.join(image_dir, image.name)):
            raise _error(os.path.join(image_dir, image.name), "image listed in the COLMAP model is missing")

    summary = {}
    colmap_cam2worlds = np.stack([image.cam2world for image in images])
    if align == "object":
        rotation, summary["align_how"] = align_to_object(colmap_cam2worlds, model.points, model.track_lengths,
                                                         trim, model.source)
    elif align == "none":
        rotation, summary["align_how"] = np.eye(3), "none (--align none): COLMAP's axes"
    else:
        raise data_util.DataError(f"--align {align!r}: expected 'object' or 'none'")
    if origin is None or scale is None:
        # The box is axis-aligned in the turned world; its centre is mapped back to COLMAP's.
        low, high, how_box = robust_box(model.points @ rotation.T, model.track_lengths, trim, model.source)
    if origin is None:
        origin = rotation.T @ (0.5 * (low + high))
        summary["origin_how"] = f"centre of the object's box ({how_box})"
    else:
        summary["origin_how"] = "--origin"
    origin = np.asarray(origin, dtype=np.float64)
    if scale is None:
        scale = grid_side(low, high, rotation @ origin, margin)
        summary["scale_how"] = f"largest side of the object's box x (1 + 2 x margin {margin:g})"
    else:
        summary["scale_how"] = "--scale"
    if not scale > 0:
        raise data_util.DataError(f"grid side {scale} must be positive (points collapse to a point?)")
    transform = colmap_to_dataset(origin, scale, rotation)
    cam2worlds = np.stack([move_camera(transform, cam2world) for cam2world in colmap_cam2worlds])
    near_plane, near_how, far_end = _near_plane(cam2worlds, near_plane)

    # In COLMAP's corner-origin pixels the crop is a shift and the resize a product; the final
    # shift moves to data_util's convention, where integer coordinates are pixel centres.
    zoom = out_side / side
    f_out = f * zoom
    cx_out = (cx - col0) * zoom - COLMAP_TO_CENTRE_PIXELS
    cy_out = (cy - row0) * zoom - COLMAP_TO_CENTRE_PIXELS

    def load(index: int) -> np.ndarray:
        path = os.path.join(image_dir, images[index].name)
        img = data_util.read_image(path)
        if img.shape[:2] != (camera.height, camera.width):
            raise _error(path, f"is {img.shape[0]}x{img.shape[1]}, COLMAP says {camera.height}x{camera.width}")
        return to_square(img, out_side)

    folders = {"": range(len(images))} if splits is None else splits
    for folder, indices in folders.items():
        write_object_folder(os.path.join(out_dir, folder), [load(i) for i in indices], cam2worlds[list(indices)],
                            (f_out, cx_out, cy_out), near_plane, transform,
                            [(sources or {}).get(images[i].name, images[i].name) for i in indices])

    distances = np.linalg.norm(cam2worlds[:, :3, 3], axis=1)
    summary.update(origin=origin, scale=float(scale), near_plane=float(near_plane), near_how=near_how,
                   f=f_out, cx=cx_out, cy=cy_out, side=out_side, num_images=len(images), rotation=rotation,
                   transform=transform, names=[image.name for image in images])
    log.info("wrote %d images (%dx%d from %dx%d) to %s", len(images), out_side, out_side,
             camera.height, camera.width, out_dir)
    log.info("grid centre  %s (COLMAP units): %s", np.array2string(origin, precision=4), summary["origin_how"])
    log.info("grid side    %.4g (COLMAP units): %s", scale, summary["scale_how"])
    log.info("axes         %s", summary["align_how"])
    log.info("world        turned, rescaled so the grid is centred at 0 with side 1 (world_transform.txt)")
    log.info("near plane   %.4f (grid sides): %s; frustum spans %.4f..%.4f", near_plane, near_how,
             near_plane, far_end)
    log.info("cameras      %.3f..%.3f grid sides from the grid centre (original datasets: about 1.5)",
             distances.min(), distances.max())
    log.info("intrinsics   f=%.3f cx=%.3f cy=%.3f for %dx%d", f_out, cx_out, cy_out, out_side, out_side)
    return summary


def _near_plane(cam2worlds: np.ndarray, near_plane: Optional[float]) -> tuple[float, str, float]:
    """(near plane, how it was chosen, last frustum plane) in grid sides, with a warning for each camera
    problem: an override cutting into the grid, the back of the grid beyond the frustum."""
    auto_near, near_how = choose_near_plane(cam2worlds)
    depths = grid_corner_depths(cam2worlds)
    if near_plane is None:
        near_plane = auto_near
    else:
        near_how = "--near_plane"
        if near_plane > depths.min():
            log.warning("--near_plane %.3f cuts into the grid (nearest corner at depth %.3f)",
                        near_plane, depths.min())
    far_end = near_plane + FRUSTUM_DEPTH_IN_GRID_SIDES
    if depths.max() > far_end:
        log.warning("for the farthest cameras the back of the grid (depth up to %.3f) lies beyond the last "
                    "frustum plane (%.3f): cameras are at different distances; the back is mostly occluded",
                    depths.max(), far_end)
    return float(near_plane), near_how, far_end


def write_object_folder(folder: str, images: Sequence[np.ndarray], cam2worlds: np.ndarray,
                        intrinsics: tuple[float, float, float], near_plane: float, transform: np.ndarray,
                        sources: Sequence[str]) -> None:
    """One DeepVoxels object folder: rgb/%06d.png (square, the training side), pose/%06d.txt (cam2world in the
    dataset world), intrinsics.txt (f, cx, cy in pixel-centre coordinates; grid at 0 with side 1), and two files
    the loader ignores: source_images.txt (index, the photo or frame it came from) and world_transform.txt
    ((4, 4) similarity, source world -> dataset world)."""
    os.makedirs(os.path.join(folder, "rgb"), exist_ok=True)
    os.makedirs(os.path.join(folder, "pose"), exist_ok=True)
    for index, (img, cam2world) in enumerate(zip(images, cam2worlds)):
        data_util.write_png(os.path.join(folder, "rgb", f"{index:06d}.png"), img)
        data_util.write_pose(os.path.join(folder, "pose", f"{index:06d}.txt"), cam2world)
    side = images[0].shape[0] if len(images) else 0
    f, cx, cy = intrinsics
    data_util.write_intrinsics(os.path.join(folder, "intrinsics.txt"), f, cx, cy, (0.0, 0.0, 0.0), near_plane, 1.0,
                               side, side)
    with open(os.path.join(folder, "source_images.txt"), "w", encoding="utf-8") as file:
        file.writelines(f"{index:06d} {name}\n" for index, name in enumerate(sources))
    np.savetxt(os.path.join(folder, "world_transform.txt"), transform, fmt="%.17g")


def add_placement_flags(parser: argparse.ArgumentParser) -> None:
    """The grid-placement and image flags shared by from_colmap and from_capture."""
    parser.add_argument("--resolution", type=int, default=None,
                        help="side of the written square images in pixels (default: crop side, no resize)")
    parser.add_argument("--origin", type=float, nargs=3, metavar=("X", "Y", "Z"), default=None,
                        help="grid centre in COLMAP world units (default: centre of the robust object box)")
    parser.add_argument("--scale", type=float, default=None,
                        help="grid side in COLMAP world units (default: object box side x (1 + 2 margin))")
    parser.add_argument("--near_plane", type=float, default=None,
                        help="near plane in grid sides, as written to intrinsics.txt "
                             "(default: nearest grid corner over all cameras)")
    parser.add_argument("--align", choices=("object", "none"), default="object",
                        help="object: turn the world so that the cameras' mean up is +z and the object sits "
                             "square in the grid; none: keep COLMAP's axes")
    parser.add_argument("--margin", type=float, default=0.1,
                        help="free space each side of the object, fraction of its extent")
    parser.add_argument("--trim", type=float, default=0.05,
                        help="fraction of sparse points dropped at each end of every axis")
    parser.add_argument("--max_focal_mismatch", type=float, default=0.01,
                        help="largest relative fx/fy difference averaged into one focal length")


def check_placement_flags(args: argparse.Namespace) -> None:
    if not 0 <= args.trim < 0.5:
        raise data_util.DataError(f"--trim {args.trim} must lie in [0, 0.5)")
    if args.margin < 0:
        raise data_util.DataError(f"--margin {args.margin} must not be negative")
    if args.resolution is not None and args.resolution < 1:
        raise data_util.DataError(f"--resolution {args.resolution}: expected a positive number of pixels")


def placement_kwargs(args: argparse.Namespace) -> dict:
    return dict(resolution=args.resolution, origin=args.origin, scale=args.scale, near_plane=args.near_plane,
                margin=args.margin, trim=args.trim, max_focal_mismatch=args.max_focal_mismatch, align=args.align)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tools.dataset from_colmap",
        description="Turn an existing COLMAP sparse model (text or binary, COLMAP 3.x or 4.x, read with pycolmap) "
                    "into one DeepVoxels object folder. Distorted cameras are undistorted with pycolmap. To "
                    "reconstruct photos or a video first, use `python -m tools.dataset from_capture`.")
    parser.add_argument("--colmap_dir", required=True,
                        help="COLMAP sparse model folder (cameras, images, points3D as .bin or .txt), or its parent")
    parser.add_argument("--images", required=True, help="folder holding the images the model names")
    parser.add_argument("--out", required=True, help="object folder to write (must not exist yet)")
    add_placement_flags(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry; returns the exit code (bad input: one `error: ...` line on stderr, 2)."""
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        check_placement_flags(args)
        if not os.path.isdir(args.images):
            raise _error(args.images, "image folder not found")
        with data_util.staged_folder(args.out) as staging:
            work_dir = os.path.join(staging, ".work")
            model, image_dir = pinhole_model(args.colmap_dir, args.images, work_dir)
            convert(model, image_dir, staging, **placement_kwargs(args))
            shutil.rmtree(work_dir, ignore_errors=True)
    except (data_util.DataError, OSError) as err:
        print(f"error: {data_util.one_line(err)}", file=sys.stderr)
        return 2
    return 0
