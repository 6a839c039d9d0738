"""Where the voxel grid goes, and the object folder a converted scene is written to.

Shared by the converters that start from cameras in some other world (`from_colmap`, `from_capture`,
`from_nerf_synthetic`). The world is re-expressed so that the grid is centred at the origin with side 1 and its
axes sit square to the object: x_dataset = R (x_source - origin) / scale. intrinsics.txt then holds origin 0 0 0
and scale 1, like every dataset the original shipped, so the model's defaults (and its --near_plane, which is in
grid units) keep their meaning whatever unit the source world happened to use. `world_transform.txt` keeps the
similarity so results can be mapped back.

Grid placement from sparse points
---------------------------------
* axes (R, ``--align object``): a structure-from-motion world's axes are arbitrary, and a voxel grid turned
  against the object wastes voxels and draws its faces as staircases. The mean of the cameras' up vectors
  (-y of each camera; photos are mostly taken upright) becomes +z, the built-in scenes' up. That up is
  corrected by up to MAX_TILT_DEG, and the object turned about it, so that its sparse points (filtered as
  below) fit the smallest cube (yaw and tilt searched alternately): a box-shaped object ends up face-on.
* points: the sparse points, without those seen by fewer than MIN_TRACK_LENGTH images. The per-axis
  [trim, 1 - trim] quantiles give a core box that floaters and distant background cannot move; the object's
  box is the full extent of the points within TAIL_WINDOW core sizes of it (the quantiles alone cut off the
  object's thin tails, e.g. corners turned against the axes).
* origin: the centre of the object's box. (A per-axis median is pulled towards the side with the most
  texture; the box centre gives the object equal room on both sides.)
* scale: the largest side of the object's box around the origin, times (1 + 2 * margin).
* near_plane: the smallest depth, over every camera and every grid corner, at which a grid corner lies, so
  the whole grid is in front of every camera's first frustum plane; clamped to at least MIN_NEAR_PLANE when
  a camera sits inside or behind the grid.
"""
from __future__ import annotations

import argparse
import itertools
import logging
import os
from typing import Optional, Sequence

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


# ----------------------------------------------------------------------------- geometry

def to_dataset_world(origin: np.ndarray, scale: float, rotation: Optional[np.ndarray] = None) -> np.ndarray:
    """(4, 4) similarity source world -> dataset world: x_dataset = rotation @ (x_source - origin) / scale,
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
    """(3, 3) rotation of the source world that puts the cameras' mean up on the dataset's +z, corrects that
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
        raise data_util.DataError(f"{source}: only {len(points)} sparse points seen by >= {MIN_TRACK_LENGTH} images; "
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


# ----------------------------------------------------------------------------- the object folder

def near_plane_for(cam2worlds: np.ndarray, near_plane: Optional[float]) -> tuple[float, str, float]:
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


def add_grid_flags(parser: argparse.ArgumentParser, units: str, placed_from: str) -> None:
    """The flags that override the automatic placement, as every converter names them. units: what the source
    world's units are called in the help; placed_from: what the default placement uses."""
    parser.add_argument("--origin", type=float, nargs=3, metavar=("X", "Y", "Z"), default=None,
                        help=f"grid centre in {units} (default: centre of the object's box, from {placed_from})")
    parser.add_argument("--scale", type=float, default=None,
                        help=f"grid side in {units} (default: the object's box side x (1 + 2 margin))")
    parser.add_argument("--near_plane", type=float, default=None,
                        help="near plane in grid sides, as written to intrinsics.txt "
                             "(default: nearest grid corner over all cameras)")
    parser.add_argument("--margin", type=float, default=0.1,
                        help="free space each side of the object, fraction of its extent")


def check_grid_flags(args: argparse.Namespace) -> None:
    """Refuse override values no placement can use (the flags ``add_grid_flags`` declares)."""
    if args.margin < 0:
        raise data_util.DataError(f"--margin {args.margin} must not be negative")
