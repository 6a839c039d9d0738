"""Reading and writing DeepVoxels data, camera helpers, and a small synthetic scene renderer.

Conventions used throughout this module:

* ``cam2world``: (4, 4) matrix mapping OpenCV camera coordinates (+x right, +y down, +z forward)
  to world coordinates. Its last column is the camera centre in world units.
* Pixel coordinates: the integer coordinate (u, v) is the *centre* of the pixel in column u and
  row v, i.e. image[v, u]. A camera-space point (x, y, z) projects to u = f*x/z + cx,
  v = f*y/z + cy. This matches the original projection code, which casts rays through integer
  pixel coordinates.
* World up is +z for the synthetic scenes and the camera path helpers.
* Images in memory are HxWxC RGB (never BGR); network inputs are float32 (3, S, S) in [-0.5, 0.5].

Run ``python data_util.py --help`` for the dataset tools (synthetic scenes, spiral and interpolated
test trajectories, COLMAP import, the nearest-neighbour baseline).
"""
from __future__ import annotations

import argparse
import glob
import logging
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

# ---------------------------------------------------------------------------------------------
# Errors and constants
# ---------------------------------------------------------------------------------------------


class DataError(ValueError):
    """Bad input data; the message is one line naming the file and what was expected."""


POSE_ENTRIES = 16
# Pose files carry 8 decimals in the published data; 1e-3 accepts those and rejects real mistakes.
POSE_TOLERANCE = 1e-3
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
UINT8_MAX = 255.0
UINT16_MAX = 65535.0
# cv2.resize(INTER_AREA) has a dedicated integer path for an exact 2x shrink.
HALVING_FACTOR = 2
# Synthetic datasets: focal length per pixel of image side (about 39 degrees field of view). At
# SYNTH_RADIUS the objects then span about 70% (at most about 77%) of the image.
SYNTH_FOCAL_PER_PIXEL = 1.4
# The original test trajectory: an Archimedean spiral with this winding constant, sampled at
# SPIRAL_ORIGINAL_VIEWS points from the equator up towards the pole.
SPIRAL_WINDING = 300.0
SPIRAL_ORIGINAL_VIEWS = 1000
# interpolate_training_poses picks its second pose among ranks [1, 11) of the ascending
# similarity ranking (the original's choice: the least similar views, the query itself is rank 0).
INTERP_RANK_LOW, INTERP_RANK_HIGH = 1, 11


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# ---------------------------------------------------------------------------------------------
# Poses
# ---------------------------------------------------------------------------------------------


def load_pose(path: PathLike) -> np.ndarray:
    """Read a camera pose file.

    Accepts 4 lines of 4 numbers or one line of 16 numbers (row-major). Returns a float32 (4, 4)
    cam2world matrix (OpenCV camera axes). Raises DataError for anything that is not a rigid
    transform with last row [0, 0, 0, 1].
    """
    path = os.fspath(path)
    try:
        with open(path, "r") as fh:
            text = fh.read()
    except OSError as err:
        raise DataError(f"pose file {path}: cannot read ({_one_line(err.strerror or err)})") from None
    tokens = text.split()
    if len(tokens) != POSE_ENTRIES:
        raise DataError(f"pose file {path}: expected {POSE_ENTRIES} numbers, found {len(tokens)}")
    try:
        values = np.array([float(t) for t in tokens], dtype=np.float64)
    except ValueError:
        bad = next(t for t in tokens if not _is_float(t))
        raise DataError(f"pose file {path}: expected numbers, found {bad!r}") from None
    if not np.all(np.isfinite(values)):
        raise DataError(f"pose file {path}: expected finite numbers, found inf or nan")
    pose = values.reshape(4, 4)
    if np.abs(pose[3] - np.array([0.0, 0.0, 0.0, 1.0])).max() > POSE_TOLERANCE:
        raise DataError(f"pose file {path}: expected last row 0 0 0 1, found {' '.join(tokens[12:])}")
    rot = pose[:3, :3]
    det = np.linalg.det(rot)
    if abs(abs(det) - 1.0) > POSE_TOLERANCE:
        raise DataError(f"pose file {path}: expected a rotation block with |det| = 1, found det {det:.6g}")
    if np.abs(rot.T @ rot - np.eye(3)).max() > POSE_TOLERANCE:
        raise DataError(f"pose file {path}: expected an orthonormal rotation block (R^T R = I)")
    return pose.astype(np.float32)


def _is_float(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def write_pose(path: PathLike, cam2world: np.ndarray) -> None:
    """Write a (4, 4) cam2world matrix as 4 lines of 4 numbers, at full (repr) precision."""
    pose = np.asarray(cam2world)
    if pose.shape != (4, 4):
        raise ValueError(f"write_pose {os.fspath(path)}: expected a (4, 4) matrix, got shape {pose.shape}")
    lines = [" ".join(repr(float(x)) for x in row) for row in pose]
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def write_pose_folder(out_dir: PathLike, poses: Sequence[np.ndarray]) -> list[str]:
    """Write poses as out_dir/%06d.txt; returns the written paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i, pose in enumerate(poses):
        path = os.path.join(out_dir, f"{i:06d}.txt")
        write_pose(path, pose)
        paths.append(path)
    return paths


def list_poses(directory: PathLike) -> list[str]:
    """Sorted *.txt files in a directory."""
    return sorted(glob.glob(os.path.join(os.fspath(directory), "*.txt")))


# ---------------------------------------------------------------------------------------------
# Intrinsics
# ---------------------------------------------------------------------------------------------


def _parse_numbers(path: str, lines: list[str], lineno: int, count: int, what: str) -> list[float]:
    if lineno > len(lines):
        raise DataError(f"intrinsics file {path}: line {lineno}: expected {what}, found end of file")
    tokens = lines[lineno - 1].split()
    if len(tokens) < count:
        raise DataError(f"intrinsics file {path}: line {lineno}: expected {what}, found {len(tokens)} values")
    try:
        values = [float(t) for t in tokens[:count]]
    except ValueError:
        raise DataError(f"intrinsics file {path}: line {lineno}: expected {what}, "
                        f"found {_one_line(lines[lineno - 1])!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise DataError(f"intrinsics file {path}: line {lineno}: expected finite {what}")
    return values


def parse_intrinsics(path: PathLike, trgt_sidelength: int
                     ) -> tuple[np.ndarray, np.ndarray, float, float, bool]:
    """Read a DeepVoxels intrinsics.txt and rescale it to a square image of side trgt_sidelength.

    File layout: ``f cx cy`` / ``origin_x origin_y origin_z`` / ``near_plane`` / ``scale`` /
    ``img_height img_width`` / optional integer world2cam flag.

    Returns:
        intrinsic: float64 (4, 4) [[f,0,cx,0],[0,f,cy,0],[0,0,1,0],[0,0,0,1]] in pixels of the
            target image (f and cy scaled by S/height, cx by S/width).
        grid_barycenter: float32 (3,) world position of the voxel grid centre.
        scale: grid side length in world units.
        near_plane: as in the file; 0 means "use the --near_plane flag".
        world2cam_poses: the optional flag; False when absent or not an integer.
    """
    path = os.fspath(path)
    try:
        with open(path, "r") as fh:
            lines = fh.read().splitlines()
    except OSError as err:
        raise DataError(f"intrinsics file {path}: cannot read ({_one_line(err.strerror or err)})") from None
    f, cx, cy = _parse_numbers(path, lines, 1, 3, "'f cx cy'")
    barycenter = _parse_numbers(path, lines, 2, 3, "'origin_x origin_y origin_z'")
    near_plane = _parse_numbers(path, lines, 3, 1, "'near_plane'")[0]
    scale = _parse_numbers(path, lines, 4, 1, "'scale'")[0]
    height, width = _parse_numbers(path, lines, 5, 2, "'img_height img_width'")
    if height <= 0 or width <= 0:
        raise DataError(f"intrinsics file {path}: line 5: expected positive image size, found {height} {width}")
    world2cam_poses = False
    if len(lines) >= 6:
        try:
            world2cam_poses = bool(int(lines[5]))
        except ValueError:
            world2cam_poses = False

    # Same operation order as the original, so the float64 results agree bit for bit.
    cx = cx / width * trgt_sidelength
    cy = cy / height * trgt_sidelength
    f = trgt_sidelength / height * f
    intrinsic = np.array([[f, 0.0, cx, 0.0],
                          [0.0, f, cy, 0.0],
                          [0.0, 0.0, 1.0, 0.0],
                          [0.0, 0.0, 0.0, 1.0]], dtype=np.float64)
    return intrinsic, np.array(barycenter, dtype=np.float32), float(scale), float(near_plane), world2cam_poses


def write_intrinsics(path: PathLike, f: float, cx: float, cy: float, origin: Sequence[float],
                     near_plane: float, scale: float, height: int, width: int) -> None:
    """Write a DeepVoxels intrinsics.txt (see parse_intrinsics for the layout)."""
    ox, oy, oz = (float(v) for v in origin)
    with open(path, "w") as fh:
        fh.write(f"{float(f)!r} {float(cx)!r} {float(cy)!r}\n")
        fh.write(f"{ox!r} {oy!r} {oz!r}\n")
        fh.write(f"{float(near_plane)!r}\n")
        fh.write(f"{float(scale)!r}\n")
        fh.write(f"{int(height)} {int(width)}\n")


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def read_image(path: PathLike) -> np.ndarray:
    """Read an image as HxWx3 RGB or HxW gray, keeping uint8 / uint16 (alpha is dropped).

    PNGs go through pypng so that 16-bit data keeps all its bits; other formats use imageio.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"image {path}: file not found")
    try:
        if path.lower().endswith(".png"):
            img = _read_png(path)
        else:
            import imageio.v3 as iio
            img = np.asarray(iio.imread(path))
    except DataError:
        raise
    except Exception as err:  # decoders raise many types; all mean "not a readable image"
        raise DataError(f"image {path}: cannot decode ({_one_line(err)})") from None
    if img.dtype not in (np.uint8, np.uint16):
        raise DataError(f"image {path}: expected 8 or 16 bit data, found {img.dtype}")
    if img.ndim == 3:
        channels = img.shape[2]
        if channels in (1, 2):  # gray or gray + alpha
            img = img[:, :, 0]
        elif channels in (3, 4):
            img = img[:, :, :3]
        else:
            raise DataError(f"image {path}: expected 1 to 4 channels, found {channels}")
    elif img.ndim != 2:
        raise DataError(f"image {path}: expected a 2D image, found shape {img.shape}")
    return np.ascontiguousarray(img)


def _read_png(path: str) -> np.ndarray:
    import png
    width, height, rows, info = png.Reader(filename=path).asDirect()
    bitdepth = info["bitdepth"]
    planes = info["planes"]
    dtype = np.uint16 if bitdepth > 8 else np.uint8
    img = np.vstack([np.asarray(row, dtype=np.uint32) for row in rows]).reshape(height, width, planes)
    if bitdepth < 8:  # 1/2/4-bit gray: stretch to the 8-bit range as other readers do
        img = img * (255 // (2 ** bitdepth - 1))
    return img.astype(dtype)


def write_png(path: PathLike, img: np.ndarray) -> None:
    """Write a uint8 or uint16 HxW (gray) or HxWx3 (RGB) image as PNG, losslessly."""
    import png
    img = np.asarray(img)
    if img.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"write_png {os.fspath(path)}: expected uint8 or uint16, got {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
        raise ValueError(f"write_png {os.fspath(path)}: expected HxW or HxWx3, got shape {img.shape}")
    height, width = img.shape[:2]
    writer = png.Writer(width=width, height=height, greyscale=img.ndim == 2,
                        bitdepth=16 if img.dtype == np.uint16 else 8)
    rows = img.reshape(height, -1)
    with open(path, "wb") as fh:
        writer.write(fh, (row.tolist() for row in rows))


def glob_imgs(directory: PathLike) -> list[str]:
    """Sorted image files (png, jpg, jpeg in any letter case) in a directory."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    names = [n for n in os.listdir(directory) if n.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(os.path.join(directory, n) for n in names)


def square_crop(img: np.ndarray) -> np.ndarray:
    """Centre crop to a square of side min(H, W) (centre = shape // 2, half side = min // 2)."""
    min_dim = min(img.shape[:2])
    centre_row, centre_col = img.shape[0] // 2, img.shape[1] // 2
    half = min_dim // 2
    return img[centre_row - half:centre_row + half, centre_col - half:centre_col + half]


def _area_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights: each output cell averages the input cells it overlaps, by overlap length."""
    scale = n_in / n_out
    starts = np.arange(n_out, dtype=np.float64) * scale
    ends = starts + scale
    left = np.arange(n_in, dtype=np.float64)
    overlap = np.minimum(ends[:, None], left[None, :] + 1.0) - np.maximum(starts[:, None], left[None, :])
    return np.clip(overlap, 0.0, None) / scale


def resize_area(img: np.ndarray, size: Union[int, tuple[int, int]]) -> np.ndarray:
    """Area-averaging downscale (OpenCV INTER_AREA semantics for shrinking) to size = S or (H, W).

    Works on HxW or HxWxC arrays; returns float32. Integer factors are exact block means.
    """
    out_h, out_w = (size, size) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
    in_h, in_w = img.shape[:2]
    if out_h > in_h or out_w > in_w or out_h < 1 or out_w < 1:
        raise ValueError(f"resize_area only shrinks: cannot go from {in_h}x{in_w} to {out_h}x{out_w}")
    rows = _area_weights(in_h, out_h)
    cols = _area_weights(in_w, out_w)
    data = img.astype(np.float64)
    out = np.tensordot(rows, data, axes=(1, 0))             # (out_h, in_w, ...)
    out = np.moveaxis(np.tensordot(cols, out, axes=(1, 1)), 0, 1)  # (out_h, out_w, ...)
    return out.astype(np.float32)


def _round_to_dtype(img: np.ndarray, dtype: np.dtype, half_up: bool) -> np.ndarray:
    """Round an area-resized image back to an integer type as cv2.resize does.

    OpenCV's exact 2x shrink uses integer (sum + 2) >> 2, i.e. rounds halves up; its other paths
    round halves to even. The resize itself is float, so this only matters at exact .5 values.
    """
    rounded = np.floor(img.astype(np.float64) + 0.5) if half_up else np.round(img)
    return np.clip(rounded, 0, np.iinfo(dtype).max).astype(dtype)


def load_rgb(path: PathLike, sidelength: int) -> np.ndarray:
    """Load an image as a float32 (3, S, S) array in [-0.5, 0.5], as the original loader did.

    Square centre crop, area resize to S (rounded back to the file's integer type, like cv2.resize
    on an integer image), first three channels, then value / max_value - 0.5.
    """
    img = read_image(path)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    img = square_crop(img)
    if img.shape[0] != sidelength:
        if img.shape[0] < sidelength:
            raise DataError(f"image {os.fspath(path)}: expected at least {sidelength} px after the "
                            f"square crop, found {img.shape[0]}")
        img = _round_to_dtype(resize_area(img, sidelength), img.dtype,
                              half_up=img.shape[0] == HALVING_FACTOR * sidelength)
    scale = UINT16_MAX if img.dtype == np.uint16 else UINT8_MAX
    rgb = img[:, :, :3].astype(np.float32) / np.float32(scale) - np.float32(0.5)
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))


# ---------------------------------------------------------------------------------------------
# Camera paths and view ranking
# ---------------------------------------------------------------------------------------------


def get_nn_ranking(poses: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Rank views by the cosine similarity of their viewing directions (cam2world[:3, 2]).

    Returns (nn_idcs, sorted_cos), each (N, N): per row the other views in *ascending* similarity,
    so the most similar views come last; the view itself gets similarity -1. The arithmetic runs
    in the poses' own dtype (float32 from load_pose) with numpy's default argsort, as the
    original did, so ties resolve the same way.
    """
    dirs = np.stack([np.asarray(p)[:3, 2] for p in poses], axis=0)
    dirs = dirs / np.linalg.norm(dirs, axis=1, ord=2, keepdims=True)
    cos_sim = dirs.dot(dirs.T)
    np.fill_diagonal(cos_sim, -1.0)
    nn_idcs = cos_sim.argsort(axis=1).astype(int)
    return nn_idcs, np.sort(cos_sim, axis=1)


def _normalize(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def look_at(cam_pos: Sequence[float], target: Sequence[float] = (0.0, 0.0, 0.0),
            up: Sequence[float] = (0.0, 0.0, 1.0)) -> np.ndarray:
    """cam2world (4, 4) float64 for a camera at cam_pos looking at target, OpenCV axes.

    z_cam points at the target, x_cam = z_cam x up (image right), y_cam = z_cam x x_cam (image
    down, so world up appears at the top of the image).
    """
    cam_pos = np.asarray(cam_pos, dtype=np.float64)
    forward = np.asarray(target, dtype=np.float64) - cam_pos
    if np.linalg.norm(forward) == 0.0:
        raise ValueError("look_at: camera position equals the target")
    z_cam = _normalize(forward)
    right = np.cross(z_cam, np.asarray(up, dtype=np.float64))
    if np.linalg.norm(right) < 1e-12:
        raise ValueError("look_at: viewing direction is parallel to the up vector")
    x_cam = _normalize(right)
    y_cam = np.cross(z_cam, x_cam)
    cam2world = np.eye(4)
    cam2world[:3, 0], cam2world[:3, 1], cam2world[:3, 2], cam2world[:3, 3] = x_cam, y_cam, z_cam, cam_pos
    return cam2world


def spherical_position(azimuth_deg: float, elevation_deg: float, radius: float) -> np.ndarray:
    """r * (cos(el)cos(az), cos(el)sin(az), sin(el)) in world units (z up)."""
    az, el = math.radians(azimuth_deg), math.radians(elevation_deg)
    return radius * np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])


def archimedean_spiral_positions(radius: float, num_views: int,
                                 target: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """(num_views, 3) camera centres on the DeepVoxels test spiral over the upper hemisphere.

    Parameter t runs from SPIRAL_WINDING/2 (equator) down towards 0 (pole) in equal steps; the
    centre is r*(cos t * cos(phi), sin t * cos(phi), -sin(phi)) + target with phi = -pi/2 + pi*t/a.
    num_views = SPIRAL_ORIGINAL_VIEWS gives the original's sample positions.
    """
    a = SPIRAL_WINDING
    t = (a / 2.0) * (1.0 - np.arange(num_views, dtype=np.float64) / num_views)
    phi = -np.pi / 2.0 + t / a * np.pi
    pos = radius * np.stack([np.cos(t) * np.cos(phi), np.sin(t) * np.cos(phi), -np.sin(phi)], axis=1)
    return pos + np.asarray(target, dtype=np.float64)


def archimedean_spiral_poses(radius: float, num_views: int, target: Sequence[float] = (0.0, 0.0, 0.0),
                             up: Sequence[float] = (0.0, 0.0, 1.0)) -> np.ndarray:
    """(num_views, 4, 4) cam2world poses on the spiral (see archimedean_spiral_positions), looking at target."""
    positions = archimedean_spiral_positions(radius, num_views, target)
    return np.stack([look_at(p, target, up) for p in positions], axis=0)


def _nearest_rotation(matrix: np.ndarray) -> np.ndarray:
    """The rotation closest to a (3, 3) matrix in the Frobenius norm (polar factor from the SVD)."""
    u, _, vt = np.linalg.svd(matrix)
    flip = np.sign(np.linalg.det(u @ vt))  # -1 would be a reflection
    return u @ np.diag([1.0, 1.0, flip]) @ vt


def interpolate_poses(pose_a: np.ndarray, pose_b: np.ndarray, num_steps: int) -> np.ndarray:
    """(num_steps, 4, 4) cam2world poses blended linearly from pose_a to pose_b.

    Camera centres move on the straight line. Rotations are the original's linear blend, replaced by
    the nearest rotation: the original only rescaled the columns to unit length, which leaves them
    non-orthogonal between the endpoints, and load_pose (so test mode) rejects such poses.
    """
    pose_a, pose_b = np.asarray(pose_a), np.asarray(pose_b)
    poses = []
    for w in np.linspace(0.0, 1.0, num_steps):
        pose = (1.0 - w) * pose_a + w * pose_b
        pose[:3, :3] = _nearest_rotation(pose[:3, :3])
        poses.append(pose)
    return np.stack(poses, axis=0)


def interpolate_training_poses(train_pose_dir: PathLike, out_pose_dir: PathLike, num_samples: int = 10,
                               num_steps: int = 100, seed: int = 0) -> list[str]:
    """Write a test trajectory chaining num_samples interpolated segments between training poses.

    The first segment starts at a random training pose; each segment ends at a pose drawn from
    ranks [1, 11) of the start pose's ascending similarity ranking (as the original: views far from
    the start) and the next segment starts there. Draws use RandomState(seed), which gives the
    same stream as the original's np.random.seed(seed). Files are named
    %06d_<start>_<end>.txt as the original named them. Returns the written paths.
    """
    pose_paths = list_poses(train_pose_dir)
    if len(pose_paths) < INTERP_RANK_HIGH:
        raise DataError(f"pose folder {os.fspath(train_pose_dir)}: expected at least {INTERP_RANK_HIGH} "
                        f"poses to interpolate, found {len(pose_paths)}")
    poses = [load_pose(p) for p in pose_paths]
    nn_idcs, _ = get_nn_ranking(poses)
    rng = np.random.RandomState(seed)
    os.makedirs(out_pose_dir, exist_ok=True)
    written = []
    start = None
    for sample in range(num_samples):
        if start is None:
            start = rng.choice(len(pose_paths))
        end = nn_idcs[start][rng.randint(low=INTERP_RANK_LOW, high=INTERP_RANK_HIGH)]
        names = [os.path.splitext(os.path.basename(pose_paths[i]))[0] for i in (start, end)]
        for step, pose in enumerate(interpolate_poses(poses[start], poses[end], num_steps)):
            path = os.path.join(out_pose_dir, f"{step + sample * num_steps:06d}_{names[0]}_{names[1]}.txt")
            write_pose(path, pose)
            written.append(path)
        start = end
    return written


# ---------------------------------------------------------------------------------------------
# Synthetic scenes: numpy ray casting
# ---------------------------------------------------------------------------------------------

# Shading is view independent (Lambertian + ambient, light fixed in the world), so a surface
# point has one colour in every view; object_surface_points relies on that.
LIGHT_DIR = np.array([0.45, -0.35, 0.82]) / np.linalg.norm([0.45, -0.35, 0.82])
AMBIENT = 0.5
DIFFUSE = 0.5
BACKGROUND = np.array([1.0, 1.0, 1.0])
# Rays are cast on a SUPERSAMPLE x SUPERSAMPLE sub-pixel grid and box-averaged (anti-aliasing).
SUPERSAMPLE = 3
# Synthetic dataset defaults: camera distance (world units) and elevation range (degrees).
SYNTH_RADIUS = 1.6
SYNTH_ELEVATION_DEG = (10.0, 70.0)
# All objects live in this world box (inside the unit voxel grid centred at the origin).
OBJECT_EXTENT = 0.4

# Face order for boxes: -x, +x, -y, +y, -z, +z.
_FACE_NORMALS = np.array([[-1, 0, 0], [1, 0, 0], [0, -1, 0], [0, 1, 0], [0, 0, -1], [0, 0, 1]], dtype=np.float64)
# Per face, the two in-face axes used as texture coordinates.
_FACE_UV_AXES = ((1, 2), (1, 2), (0, 2), (0, 2), (0, 1), (0, 1))

TextureFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class _Box:
    lo: tuple[float, float, float]
    hi: tuple[float, float, float]
    texture: TextureFn  # (points (N,3), normals (N,3), face ids (N,)) -> albedo (N,3)

    def intersect(self, origins: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Slab test. Returns ray parameter t (inf on a miss) and entry face id per ray."""
        lo, hi = np.asarray(self.lo), np.asarray(self.hi)
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = 1.0 / dirs
            t0 = (lo - origins) * inv
            t1 = (hi - origins) * inv
        t_near_axes = np.minimum(t0, t1)
        t_far = np.nanmin(np.maximum(t0, t1), axis=1)
        t_near_axes = np.where(np.isnan(t_near_axes), -np.inf, t_near_axes)
        axis = np.argmax(t_near_axes, axis=1)
        t_near = t_near_axes[np.arange(len(axis)), axis]
        hit = (t_near <= t_far) & (t_near > 0.0)
        # Entering through the low face of an axis when the ray travels in +axis direction.
        positive = dirs[np.arange(len(axis)), axis] > 0
        face = 2 * axis + np.where(positive, 0, 1)
        return np.where(hit, t_near, np.inf), face

    def surface(self, n: int, rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
        """n points uniform by area on the faces, with their face ids."""
        lo, hi = np.asarray(self.lo), np.asarray(self.hi)
        size = hi - lo
        areas = np.array([size[a] * size[b] for a, b in _FACE_UV_AXES])
        face = rng.choice(6, size=n, p=areas / areas.sum())
        pts = lo + rng.uniform(size=(n, 3)) * size
        axis = face // 2
        pts[np.arange(n), axis] = np.where(face % 2 == 0, lo[axis], hi[axis])
        return pts, face


@dataclass(frozen=True)
class _Sphere:
    centre: tuple[float, float, float]
    radius: float
    texture: TextureFn

    def intersect(self, origins: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nearest positive root of |o + t d - c| = r (d unit length); inf on a miss."""
        oc = origins - np.asarray(self.centre)
        b = np.sum(oc * dirs, axis=1)
        c = np.sum(oc * oc, axis=1) - self.radius ** 2
        disc = b * b - c
        root = np.sqrt(np.maximum(disc, 0.0))
        t = -b - root
        t = np.where(t > 0, t, -b + root)
        return np.where((disc >= 0) & (t > 0), t, np.inf), np.full(len(t), -1)

    def surface(self, n: int, rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
        v = rng.normal(size=(n, 3))
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        return np.asarray(self.centre) + self.radius * v, np.full(n, -1)

    def normals(self, points: np.ndarray) -> np.ndarray:
        return (points - np.asarray(self.centre)) / self.radius


def _checker(a: np.ndarray, b: np.ndarray, cells_per_unit: float) -> np.ndarray:
    return (np.floor(a * cells_per_unit) + np.floor(b * cells_per_unit)) % 2


# Distinct base colours for the cube faces -x, +x, -y, +y, -z, +z.
_CUBE_FACE_COLOURS = np.array([[0.85, 0.15, 0.15], [0.15, 0.65, 0.20], [0.15, 0.30, 0.90],
                               [0.95, 0.75, 0.10], [0.60, 0.20, 0.75], [0.10, 0.75, 0.80]])
CUBE_HALF_SIDE = 0.25
# Checker cells per world unit on the cube: 4 cells across a face of side 0.5.
_CUBE_CHECKER_FREQ = 8.0


def _cube_texture(points: np.ndarray, normals: np.ndarray, face: np.ndarray) -> np.ndarray:
    """Per-face base colour, a 4x4 checker that darkens alternate cells, and a gradient to white."""
    axes = np.array(_FACE_UV_AXES)[face]
    idx = np.arange(len(face))
    a, b = points[idx, axes[:, 0]], points[idx, axes[:, 1]]
    base = _CUBE_FACE_COLOURS[face]
    dark = _checker(a, b, _CUBE_CHECKER_FREQ)[:, None]
    # Gradient along the face's first texture axis tells the two ends of a face apart.
    ramp = ((a + CUBE_HALF_SIDE) / (2 * CUBE_HALF_SIDE))[:, None]
    albedo = base * (1.0 - 0.45 * dark)
    return albedo * (1.0 - 0.5 * ramp) + 0.5 * ramp * np.array([0.95, 0.95, 0.95])


_PLINTH_LO, _PLINTH_HI = (-0.27, -0.27, -0.3), (0.27, 0.27, -0.15)
_BALL_RADIUS = 0.24
_BALL_CENTRE = (0.0, 0.0, _PLINTH_HI[2] + _BALL_RADIUS - 0.04)  # sunk slightly into the plinth


def _plinth_texture(points: np.ndarray, normals: np.ndarray, face: np.ndarray) -> np.ndarray:
    """Red/blue checker on top; grey sides with a coloured stripe that differs per side."""
    red, blue = np.array([0.85, 0.15, 0.12]), np.array([0.12, 0.25, 0.85])
    top = _checker(points[:, 0], points[:, 1], 1.0 / 0.11)[:, None]
    top_albedo = top * red + (1 - top) * blue
    side_colour = _CUBE_FACE_COLOURS[np.clip(face, 0, 5)]
    stripe = (np.abs(points[:, 2] - 0.5 * (_PLINTH_LO[2] + _PLINTH_HI[2])) < 0.03)[:, None]
    side_albedo = np.where(stripe, side_colour, 0.7)
    return np.where((face == 5)[:, None], top_albedo, side_albedo)


def _ball_texture(points: np.ndarray, normals: np.ndarray, face: np.ndarray) -> np.ndarray:
    """Hue by longitude (8 sectors), lighter bands by latitude: no two views look alike."""
    lon = np.arctan2(normals[:, 1], normals[:, 0])
    lat = np.arcsin(np.clip(normals[:, 2], -1.0, 1.0))
    hue = (lon + np.pi) / (2 * np.pi)
    sector = np.floor(hue * 8) / 8
    rgb = 0.5 + 0.4 * np.stack([np.cos(2 * np.pi * (sector + k / 3.0)) for k in range(3)], axis=1)
    band = (np.floor(lat / (np.pi / 10)) % 2)[:, None]
    return rgb * (1.0 - 0.35 * band) + 0.2 * band * (1.0 - rgb)


def _scene(object_name: str) -> list:
    if object_name == "cube":
        h = CUBE_HALF_SIDE
        return [_Box((-h, -h, -h), (h, h, h), _cube_texture)]
    if object_name == "sphere_box":
        return [_Box(_PLINTH_LO, _PLINTH_HI, _plinth_texture), _Sphere(_BALL_CENTRE, _BALL_RADIUS, _ball_texture)]
    raise ValueError(f"unknown object {object_name!r}; expected one of {', '.join(OBJECT_NAMES)}")


OBJECT_NAMES = ("cube", "sphere_box")


def _shade(prim, points: np.ndarray, face: np.ndarray) -> np.ndarray:
    normals = prim.normals(points) if isinstance(prim, _Sphere) else _FACE_NORMALS[face]
    albedo = prim.texture(points, normals, face)
    lambert = np.clip(normals @ LIGHT_DIR, 0.0, None)[:, None]
    return np.clip(albedo * (AMBIENT + DIFFUSE * lambert), 0.0, 1.0)


def cast_rays(object_name: str, origins: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cast world-space rays (N,3) origins, (N,3) unit dirs. Returns colours (N,3) in [0,1] and hit distance t (inf = background)."""
    prims = _scene(object_name)
    hits = [p.intersect(origins, dirs) for p in prims]
    ts = np.stack([t for t, _ in hits], axis=0)
    nearest = np.argmin(ts, axis=0)
    t_min = ts[nearest, np.arange(len(nearest))]
    colour = np.tile(BACKGROUND, (len(origins), 1))
    for k, prim in enumerate(prims):
        sel = (nearest == k) & np.isfinite(t_min)
        if np.any(sel):
            pts = origins[sel] + t_min[sel, None] * dirs[sel]
            colour[sel] = _shade(prim, pts, hits[k][1][sel])
    return colour, t_min


def pixel_rays(cam2world: np.ndarray, f: float, cx: float, cy: float, u: np.ndarray, v: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """World rays through pixel coordinates (u, v) (any shape, flattened): origins (N,3), unit dirs (N,3).

    Inverse of the pinhole projection u = f*x/z + cx, v = f*y/z + cy in the OpenCV camera frame.
    """
    cam2world = np.asarray(cam2world, dtype=np.float64)
    u, v = np.ravel(u).astype(np.float64), np.ravel(v).astype(np.float64)
    dirs_cam = np.stack([(u - cx) / f, (v - cy) / f, np.ones_like(u)], axis=1)
    dirs = dirs_cam @ cam2world[:3, :3].T
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    origins = np.broadcast_to(cam2world[:3, 3], dirs.shape).copy()
    return origins, dirs


def render_view(object_name: str, cam2world: np.ndarray, f: float, cx: float, cy: float,
                height: int, width: int, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Render a synthetic object as uint8 (height, width, 3) RGB.

    cam2world: (4, 4) OpenCV camera -> world. Pixel (u, v) = image[v, u] is centred on the
    integer pixel coordinate (u, v): its supersample x supersample sub-rays sit symmetrically
    around it and are averaged.
    """
    k = int(supersample)
    offsets = (np.arange(k) + 0.5) / k - 0.5
    uu = np.arange(width)[None, :, None, None] + offsets[None, None, None, :]   # (1, W, 1, k)
    vv = np.arange(height)[:, None, None, None] + offsets[None, None, :, None]  # (H, 1, k, 1)
    uu, vv = np.broadcast_arrays(uu, vv)                                         # (H, W, k, k)
    origins, dirs = pixel_rays(cam2world, f, cx, cy, uu, vv)
    colour, _ = cast_rays(object_name, origins, dirs)
    colour = colour.reshape(height, width, k * k, 3).mean(axis=2)
    return np.round(colour * UINT8_MAX).astype(np.uint8)


def object_surface_points(object_name: str, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sample n world points on the object's visible-from-above surface, with their rendered colours.

    Returns points (n, 3) float64 and colours (n, 3) uint8. Shading is view independent, so these
    are the colours every camera sees at those points. Points inside another part of the object
    and points on downward-facing box faces (never seen from the upper hemisphere) are skipped.
    """
    prims = _scene(object_name)
    rng = np.random.RandomState(seed)
    pts_all, col_all = [], []
    remaining = n
    while remaining > 0:
        batch = max(2 * remaining, 64)
        part = rng.choice(len(prims), size=batch)
        for k, prim in enumerate(prims):
            m = int(np.sum(part == k))
            if m == 0:
                continue
            pts, face = prim.surface(m, rng)
            keep = face != 4  # -z box faces
            for j, other in enumerate(prims):
                if j != k:
                    keep &= ~_inside(other, pts)
            pts, face = pts[keep], face[keep]
            pts_all.append(pts)
            col_all.append(np.round(_shade(prim, pts, face) * UINT8_MAX).astype(np.uint8))
        remaining = n - sum(len(p) for p in pts_all)
    points = np.concatenate(pts_all)[:n]
    colours = np.concatenate(col_all)[:n]
    return points, colours


def _inside(prim, pts: np.ndarray) -> np.ndarray:
    if isinstance(prim, _Sphere):
        return np.linalg.norm(pts - np.asarray(prim.centre), axis=1) < prim.radius
    return np.all((pts > np.asarray(prim.lo)) & (pts < np.asarray(prim.hi)), axis=1)


def synthetic_focal(resolution: int) -> float:
    """Focal length in pixels for the synthetic datasets."""
    return SYNTH_FOCAL_PER_PIXEL * resolution


def random_hemisphere_poses(num_views: int, radius: float, rng: np.random.RandomState,
                            elevation_deg: tuple[float, float] = SYNTH_ELEVATION_DEG) -> np.ndarray:
    """(num_views, 4, 4) cam2world poses looking at the origin: uniform azimuth, uniform elevation in degrees."""
    az = rng.uniform(0.0, 360.0, size=num_views)
    el = rng.uniform(elevation_deg[0], elevation_deg[1], size=num_views)
    return np.stack([look_at(spherical_position(a, e, radius)) for a, e in zip(az, el)], axis=0)


def make_synthetic_dataset(out_root: PathLike, object_name: str, resolution: int = 128, num_train: int = 50,
                           num_val: int = 25, num_test: int = 50, seed: int = 0,
                           radius: float = SYNTH_RADIUS) -> dict[str, str]:
    """Render a DeepVoxels-layout dataset of a synthetic object.

    Writes out_root/{train,validation,test}/<object>/{rgb/%06d.png, pose/%06d.txt, intrinsics.txt}.
    Train and validation cameras are random on the upper hemisphere at distance radius; test
    cameras follow the Archimedean spiral. intrinsics.txt: f = SYNTH_FOCAL_PER_PIXEL * resolution, cx = cy =
    resolution / 2, grid centre at the origin, near plane 0 (use the default), grid scale 1.
    Returns {split: folder}. Deterministic for a given seed.
    """
    if object_name not in OBJECT_NAMES:
        raise ValueError(f"unknown object {object_name!r}; expected one of {', '.join(OBJECT_NAMES)}")
    rng = np.random.RandomState(seed)
    f = synthetic_focal(resolution)
    c = resolution / 2.0
    splits = {
        "train": random_hemisphere_poses(num_train, radius, rng),
        "validation": random_hemisphere_poses(num_val, radius, rng),
        "test": archimedean_spiral_poses(radius, num_test),
    }
    folders = {}
    for split, poses in splits.items():
        folder = os.path.join(os.fspath(out_root), split, object_name)
        os.makedirs(os.path.join(folder, "rgb"), exist_ok=True)
        write_pose_folder(os.path.join(folder, "pose"), poses)
        write_intrinsics(os.path.join(folder, "intrinsics.txt"), f, c, c, (0.0, 0.0, 0.0), 0.0, 1.0,
                         resolution, resolution)
        for i, pose in enumerate(poses):
            write_png(os.path.join(folder, "rgb", f"{i:06d}.png"),
                      render_view(object_name, pose, f, c, c, resolution, resolution))
        folders[split] = folder
        logger.info("wrote %d %s views to %s", len(poses), split, folder)
    return folders


# ---------------------------------------------------------------------------------------------
# Nearest-neighbour baseline
# ---------------------------------------------------------------------------------------------


def nearest_training_views(train_poses: Sequence[np.ndarray], query_poses: Sequence[np.ndarray]) -> np.ndarray:
    """For each query pose, the index of the training pose with the most similar viewing direction.

    Similarity is the cosine of the angle between the cam2world[:3, 2] axes (the camera's +z,
    forward), the measure get_nn_ranking and the training loader use. The original's separate
    get_nearest_neighbors_pose compared normalised camera *positions* instead; for cameras that
    look at the object centre the two agree, and the viewing direction also covers cameras that do
    not. Ties go to the lowest training index. Returns (num_query,) int indices.
    """
    def unit_z(poses: Sequence[np.ndarray]) -> np.ndarray:
        dirs = np.stack([np.asarray(p, dtype=np.float64)[:3, 2] for p in poses], axis=0)
        return dirs / np.linalg.norm(dirs, axis=1, keepdims=True)

    cos_sim = unit_z(query_poses) @ unit_z(train_poses).T  # (num_query, num_train)
    return np.argmax(cos_sim, axis=1)


def nn_baseline(train_root: PathLike, test_root: PathLike, sidelength: int, use_lpips: bool = True
                ) -> tuple[list[dict], dict]:
    """Score the nearest-neighbour baseline: each test view "rendered" as its nearest training image.

    Both images go through the same conversions and the same crop as run_deepvoxels' test mode
    (load_rgb at sidelength, +0.5 to [0, 1], metrics.crop_border, metrics.psnr / ssim / LPIPS when
    available), so the numbers compare directly with a trained model's metrics.json.

    Returns (rows, means): rows are {'view', 'pose_file', 'nn_file', 'psnr', 'ssim'[, 'lpips']} per
    test view; means holds 'psnr', 'ssim'[, 'lpips'] and 'num_views'.
    Raises DataError when a folder lacks rgb/ or pose/, or the test folder has no images to score.
    """
    import metrics

    def views(root: PathLike, what: str) -> tuple[list[str], list[str]]:
        root = os.fspath(root)
        images = glob_imgs(os.path.join(root, "rgb"))
        poses = list_poses(os.path.join(root, "pose"))
        if not images or not poses:
            raise DataError(f"{what} folder {root}: expected images in rgb/ and poses in pose/, "
                            f"found {len(images)} images and {len(poses)} poses")
        if len(images) != len(poses):
            raise DataError(f"{what} folder {root}: expected as many images as poses, "
                            f"found {len(images)} images and {len(poses)} poses")
        return images, poses

    train_images, train_pose_paths = views(train_root, "training")
    test_images, test_pose_paths = views(test_root, "test")
    nearest = nearest_training_views([load_pose(p) for p in train_pose_paths],
                                     [load_pose(p) for p in test_pose_paths])

    def unit_rgb(path: str) -> np.ndarray:
        # (3, S, S) in [-0.5, 0.5] -> cropped (S', S', 3) in [0, 1], exactly as test mode treats ground truth.
        return metrics.crop_border(load_rgb(path, sidelength).transpose(1, 2, 0)) + 0.5

    lpips_scorer = metrics.LpipsScorer() if use_lpips else None
    train_cache: dict[int, np.ndarray] = {}
    rows = []
    for view, (image_path, pose_path) in enumerate(zip(test_images, test_pose_paths)):
        k = int(nearest[view])
        if k not in train_cache:
            train_cache[k] = unit_rgb(train_images[k])
        pred, gt = train_cache[k], unit_rgb(image_path)
        row = {"view": view, "pose_file": os.path.basename(pose_path), "nn_file": os.path.basename(train_images[k]),
               "psnr": metrics.psnr(pred, gt), "ssim": metrics.ssim(pred, gt)}
        if lpips_scorer is not None and lpips_scorer.available:
            row["lpips"] = lpips_scorer(pred, gt)
        rows.append(row)
    means = {key: float(np.mean([r[key] for r in rows])) for key in ("psnr", "ssim", "lpips") if key in rows[0]}
    means["num_views"] = len(rows)
    return rows, means


def write_metrics(out_dir: PathLike, rows: list[dict], summary: dict) -> tuple[str, str]:
    """Write rows as out_dir/metrics.csv and summary as out_dir/metrics.json (test mode's layout)."""
    import csv
    import json
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(os.fspath(out_dir), "metrics.csv")
    json_path = os.path.join(os.fspath(out_dir), "metrics.json")
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)
    with open(json_path, "w") as handle:
        json.dump(summary, handle, indent=1)
    return csv_path, json_path


def run_nn_baseline(train_root: PathLike, test_root: PathLike, sidelength: int, out_dir: PathLike) -> dict:
    """nn_baseline plus its files (metrics.csv, metrics.json in out_dir); returns the metrics.json content."""
    rows, means = nn_baseline(train_root, test_root, sidelength)
    summary = {"method": "nearest training view by viewing direction (cosine of cam2world[:3, 2])",
               **means, "train_root": os.path.abspath(train_root), "test_root": os.path.abspath(test_root),
               "img_sidelength": int(sidelength), "out_dir": os.path.abspath(out_dir)}
    write_metrics(out_dir, rows, summary)
    return summary


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="DeepVoxels dataset tools.")
    sub = parser.add_subparsers(dest="command", required=True)

    synth = sub.add_parser("synthetic", help="render a synthetic train/validation/test dataset")
    synth.add_argument("--out", required=True, help="output root; writes <out>/{train,validation,test}/<object>")
    synth.add_argument("--object", default="cube", choices=OBJECT_NAMES, help="which synthetic object")
    synth.add_argument("--resolution", type=int, default=128, help="image side length in pixels")
    synth.add_argument("--num_train", type=int, default=50, help="number of training views")
    synth.add_argument("--num_val", type=int, default=25, help="number of validation views")
    synth.add_argument("--num_test", type=int, default=50, help="number of test views (spiral)")
    synth.add_argument("--radius", type=float, default=SYNTH_RADIUS, help="camera distance from the origin, world units")
    synth.add_argument("--seed", type=int, default=0, help="random seed for the camera positions")

    spiral = sub.add_parser("spiral", help="write test poses on the Archimedean spiral")
    spiral.add_argument("--out", required=True, help="output pose folder (files %%06d.txt)")
    spiral.add_argument("--num_views", type=int, default=SPIRAL_ORIGINAL_VIEWS, help="number of poses")
    spiral.add_argument("--radius", type=float, default=SYNTH_RADIUS, help="camera distance from the origin, world units")

    interp = sub.add_parser("interpolate", help="write a test trajectory interpolating training poses")
    interp.add_argument("--train_pose_dir", required=True, help="folder of training pose *.txt files")
    interp.add_argument("--out", required=True, help="output pose folder")
    interp.add_argument("--num_samples", type=int, default=10, help="number of interpolated segments")
    interp.add_argument("--num_steps", type=int, default=100, help="poses per segment")
    interp.add_argument("--seed", type=int, default=0, help="random seed for the pose choice")

    baseline = sub.add_parser("nn_baseline", help="score the nearest training view for each test pose "
                                                  "(metrics as in test mode)")
    baseline.add_argument("--train_root", required=True, help="training object folder (rgb/, pose/)")
    baseline.add_argument("--test_root", required=True, help="test object folder with ground truth (rgb/, pose/)")
    baseline.add_argument("--img_sidelength", type=int, default=512,
                          help="side in pixels the images are scored at (as run_deepvoxels --img_sidelength)")
    baseline.add_argument("--out", default="", help="output folder (default: nn_baseline/<test object>)")

    sub.add_parser("from_colmap", help="convert a COLMAP reconstruction (arguments go to colmap_import)",
                   add_help=False)
    return parser


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise DataError(f"--{name}: expected a positive integer, got {value}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point; returns the exit code (2 on bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if argv and argv[0] == "from_colmap":
        try:
            import colmap_import
        except ImportError:
            print("error: from_colmap needs colmap_import.py, which is not in this checkout", file=sys.stderr)
            return 2
        return colmap_import.main(argv[1:])
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "synthetic":
            for name in ("resolution", "num_train", "num_test"):
                _positive(name, getattr(args, name))
            folders = make_synthetic_dataset(args.out, args.object, args.resolution, args.num_train,
                                             args.num_val, args.num_test, args.seed, args.radius)
            print("wrote " + ", ".join(f"{k}: {v}" for k, v in folders.items()))
        elif args.command == "spiral":
            _positive("num_views", args.num_views)
            paths = write_pose_folder(args.out, archimedean_spiral_poses(args.radius, args.num_views))
            print(f"wrote {len(paths)} spiral poses to {args.out}")
        elif args.command == "interpolate":
            _positive("num_samples", args.num_samples)
            _positive("num_steps", args.num_steps)
            paths = interpolate_training_poses(args.train_pose_dir, args.out, args.num_samples,
                                               args.num_steps, args.seed)
            print(f"wrote {len(paths)} interpolated poses to {args.out}")
        elif args.command == "nn_baseline":
            _positive("img_sidelength", args.img_sidelength)
            out = args.out or os.path.join("nn_baseline", os.path.basename(os.path.normpath(args.test_root)))
            summary = run_nn_baseline(args.train_root, args.test_root, args.img_sidelength, out)
            line = f"baseline PSNR {summary['psnr']:.2f} dB  SSIM {summary['ssim']:.4f}"
            if "lpips" in summary:
                line += f"  LPIPS {summary['lpips']:.4f}"
            print(line + f"  over {summary['num_views']} views ({out}: metrics.csv, metrics.json)")
    except (DataError, ValueError, OSError) as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
