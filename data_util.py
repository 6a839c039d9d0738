"""DeepVoxels data formats and camera helpers: poses, intrinsics, images, camera paths.

Conventions used throughout this module:

* ``cam2world``: (4, 4) matrix mapping OpenCV camera coordinates (+x right, +y down, +z forward)
  to world coordinates. Its last column is the camera centre in world units.
* Pixel coordinates: the integer coordinate (u, v) is the *centre* of the pixel in column u and
  row v, i.e. image[v, u]. A camera-space point (x, y, z) projects to u = f*x/z + cx,
  v = f*y/z + cy. This matches the original projection code, which casts rays through integer
  pixel coordinates.
* World up is +z for the camera path helpers (and the synthetic scenes in tools/synthetic.py).
* Images in memory are HxWxC RGB (never BGR); network inputs are float32 (3, S, S) in [-0.5, 0.5].

The dataset tools that build on this module (synthetic scenes, trajectories, COLMAP import, the
nearest-neighbour baseline) live in the tools/ package: ``python -m tools.dataset --help``.
"""
from __future__ import annotations

import contextlib
import glob
import logging
import math
import os
import shutil
import tempfile
from typing import Iterator, Sequence, Union

import numpy as np

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

# ---------------------------------------------------------------------------------------------
# Errors and constants
# ---------------------------------------------------------------------------------------------


class DataError(ValueError):
    """Bad input data; the message is one line naming the file and what was expected."""


POSE_ENTRIES = 16
# Pose files carry 8 decimals in the published data, so their rotation blocks are orthonormal and
# their last rows exact to about 1e-8. A larger deviation is reported (rotation) or refused (last row).
POSE_TOLERANCE = 1e-3
# A rotation block whose smallest singular value is below this (a rotation has all three equal to 1)
# has no usable inverse: the camera frame collapses onto a plane.
POSE_MIN_SINGULAR_VALUE = 1e-6
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
UINT8_MAX = 255
UINT16_MAX = 65535
# cv2.resize(INTER_AREA) has a dedicated integer path for an exact 2x shrink.
HALVING_FACTOR = 2
# The original test trajectory: an Archimedean spiral with this winding constant, sampled at
# SPIRAL_ORIGINAL_VIEWS points from the equator up towards the pole.
SPIRAL_WINDING = 300.0
SPIRAL_ORIGINAL_VIEWS = 1000
# interpolate_training_poses picks its second pose among ranks [1, 11) of the ascending
# similarity ranking (the original's choice: the least similar views, the query itself is rank 0).
INTERP_RANK_LOW, INTERP_RANK_HIGH = 1, 11


def one_line(text: object) -> str:
    """text with every run of whitespace (newlines included) made one space, for one-line errors."""
    return " ".join(str(text).split())


# ---------------------------------------------------------------------------------------------
# Poses
# ---------------------------------------------------------------------------------------------


def load_pose(path: PathLike) -> np.ndarray:
    """Read a camera pose file.

    Accepts 4 lines of 4 numbers or one line of 16 numbers (row-major). Returns a float32 (4, 4)
    cam2world matrix (OpenCV camera axes), as written. A rotation block that is not orthonormal
    (the original's interpolated trajectories normalise its columns without orthogonalising them)
    is used as given, with one warning. Raises DataError for a wrong count of numbers, a value that
    is not a finite number, a last row other than [0, 0, 0, 1], or a singular rotation block.
    """
    path = os.fspath(path)
    try:
        with open(path, "r") as fh:
            text = fh.read()
    except OSError as err:
        raise DataError(f"pose file {path}: cannot read ({one_line(err.strerror or err)})") from None
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
    smallest = np.linalg.svd(rot, compute_uv=False).min()
    if smallest < POSE_MIN_SINGULAR_VALUE:
        raise DataError(f"pose file {path}: expected an invertible rotation block, found a singular one "
                        f"(smallest singular value {smallest:.3g})")
    deviation = np.abs(rot.T @ rot - np.eye(3)).max()
    if deviation > POSE_TOLERANCE:
        logger.warning("pose file %s: rotation block is not orthonormal (max |R^T R - I| = %.3g); "
                       "using it as given", path, deviation)
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
                        f"found {one_line(lines[lineno - 1])!r}") from None
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
        raise DataError(f"intrinsics file {path}: cannot read ({one_line(err.strerror or err)})") from None
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
        raise DataError(f"image {path}: cannot decode ({one_line(err)})") from None
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
        img = img * (UINT8_MAX // (2 ** bitdepth - 1))
    return img.astype(dtype)


def write_png(path: PathLike, img: np.ndarray) -> None:
    """Write a uint8 or uint16 HxW (gray), HxWx3 (RGB) or HxWx4 (RGBA) image as PNG, losslessly."""
    import png
    img = np.asarray(img)
    if img.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"write_png {os.fspath(path)}: expected uint8 or uint16, got {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] in (3, 4))):
        raise ValueError(f"write_png {os.fspath(path)}: expected HxW, HxWx3 or HxWx4, got shape {img.shape}")
    height, width = img.shape[:2]
    writer = png.Writer(width=width, height=height, greyscale=img.ndim == 2, alpha=img.ndim == 3 and img.shape[2] == 4,
                        bitdepth=16 if img.dtype == np.uint16 else 8)
    # Rows of bytes as PNG stores them (16-bit samples big-endian), from an array in row order.
    packed = np.ascontiguousarray(img, dtype=">u2" if img.dtype == np.uint16 else np.uint8).view(np.uint8)
    with open(path, "wb") as fh:
        writer.write_packed(fh, packed.reshape(height, -1))


@contextlib.contextmanager
def staged_folder(out: PathLike) -> Iterator[str]:
    """Yield a fresh folder beside ``out`` to write into; on success it is renamed to ``out``, on any error it
    is removed, so a failed command leaves nothing half-written. ``out`` must not exist (an empty folder is
    replaced)."""
    out = os.path.normpath(os.fspath(out))
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        raise DataError(f"{out}: already exists and is not empty; choose a fresh --out")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=parent)
    try:
        yield staging
        if os.path.isdir(out):
            os.rmdir(out)
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


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


def archimedean_spiral_poses(radius: float, num_views: int, target: Sequence[float] = (0.0, 0.0, 0.0)
                             ) -> np.ndarray:
    """(num_views, 4, 4) cam2world poses on the spiral (see archimedean_spiral_positions), looking at target, +z up."""
    positions = archimedean_spiral_positions(radius, num_views, target)
    return np.stack([look_at(p, target) for p in positions], axis=0)


def _nearest_rotation(matrix: np.ndarray) -> np.ndarray:
    """The rotation closest to a (3, 3) matrix in the Frobenius norm (polar factor from the SVD)."""
    u, _, vt = np.linalg.svd(matrix)
    flip = np.sign(np.linalg.det(u @ vt))  # -1 would be a reflection
    return u @ np.diag([1.0, 1.0, flip]) @ vt


def interpolate_poses(pose_a: np.ndarray, pose_b: np.ndarray, num_steps: int) -> np.ndarray:
    """(num_steps, 4, 4) cam2world poses blended linearly from pose_a to pose_b.

    Camera centres move on the straight line. Rotations are the original's linear blend, replaced by
    the nearest rotation: the original only rescaled the columns to unit length, which leaves them
    non-orthogonal between the endpoints. Written trajectories are thus rigid cameras; load_pose
    would also accept the original's files, with a warning for each.
    """
    pose_a, pose_b = np.asarray(pose_a), np.asarray(pose_b)
    poses = []
    for w in np.linspace(0.0, 1.0, num_steps):
        pose = (1.0 - w) * pose_a + w * pose_b
        pose[:3, :3] = _nearest_rotation(pose[:3, :3])
        poses.append(pose)
    return np.stack(poses, axis=0)


def interpolate_keyframes(keyframes: Sequence[np.ndarray], steps_between: int) -> np.ndarray:
    """(K, 4, 4) cam2world poses through the keyframes in order, ``steps_between`` poses from each keyframe to
    the next (interpolate_poses), ending on the last keyframe."""
    if not keyframes:
        raise ValueError("interpolate_keyframes: no keyframes")
    poses = [np.asarray(keyframes[0], dtype=np.float64)]
    for pose_a, pose_b in zip(keyframes[:-1], keyframes[1:]):
        poses.extend(interpolate_poses(pose_a, pose_b, steps_between + 1)[1:])
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


