"""The built-in synthetic scenes: a small numpy ray caster and the dataset generator behind
``python -m tools.dataset synthetic``.

Three objects (OBJECT_NAMES) made of textured boxes and spheres, lit by a fixed light, are rendered
from cameras on the upper hemisphere (train, validation) and on the original's Archimedean test
spiral (test) into the DeepVoxels folder layout. Camera, pixel and image conventions are
data_util's (OpenCV cam2world, integer pixel coordinates at pixel centres, +z world up).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

import data_util

logger = logging.getLogger(__name__)

# Focal length per pixel of image side (about 39 degrees field of view). At SYNTH_RADIUS the
# objects then span about 70% (at most about 77%) of the image.
SYNTH_FOCAL_PER_PIXEL = 1.4

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


# Octaves of the value noise on the "crate": cells per world unit. From 5 cells across a face (blobs a
# SIFT detector finds at 128 px) to 80 (fine grain that still shows at 512 px).
_NOISE_CELLS_PER_UNIT = (10.0, 20.0, 40.0, 80.0, 160.0)


def _lattice_hash(i: np.ndarray, j: np.ndarray, face: np.ndarray, channel: int) -> np.ndarray:
    """A pseudo-random value in [0, 1) per integer lattice point, face and channel (a fixed integer hash)."""
    h = (i.astype(np.int64) * 73856093) ^ (j.astype(np.int64) * 19349663) ^ (face.astype(np.int64) * 83492791) \
        ^ (channel * 2654435761)
    h = (h ^ (h >> 13)) * 1274126177
    return ((h ^ (h >> 16)) & 0xFFFF) / 65536.0


def _value_noise(a: np.ndarray, b: np.ndarray, face: np.ndarray, channel: int) -> np.ndarray:
    """Sum of bilinearly interpolated lattice noise over _NOISE_CELLS_PER_UNIT, amplitude halving per octave,
    in [0, 1)."""
    total, weight = np.zeros_like(a), 0.0
    for octave, cells in enumerate(_NOISE_CELLS_PER_UNIT):
        x, y = a * cells, b * cells
        i, j = np.floor(x), np.floor(y)
        fx, fy = x - i, y - j
        fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)  # smoothstep: no creases at cell edges
        corners = [_lattice_hash(i + di, j + dj, face, channel + 7 * octave) for di in (0, 1) for dj in (0, 1)]
        value = (corners[0] * (1 - fx) * (1 - fy) + corners[1] * (1 - fx) * fy + corners[2] * fx * (1 - fy)
                 + corners[3] * fx * fy)
        amplitude = 0.7 ** octave
        total += amplitude * value
        weight += amplitude
    return total / weight


def _crate_texture(points: np.ndarray, normals: np.ndarray, face: np.ndarray) -> np.ndarray:
    """Coloured multi-scale value noise, different on every face: corners and blobs at every scale, so
    structure from motion finds many distinct features (the checkers of the other objects repeat)."""
    axes = np.array(_FACE_UV_AXES)[face]
    idx = np.arange(len(face))
    a, b = points[idx, axes[:, 0]], points[idx, axes[:, 1]]
    noise = np.stack([_value_noise(a, b, face, channel) for channel in range(3)], axis=1)
    # Stretch the contrast: a sum of octaves clusters around 0.5.
    return np.clip(0.5 + 2.2 * (noise - 0.5), 0.0, 1.0)


def _scene(object_name: str) -> list:
    if object_name == "crate":
        h = CUBE_HALF_SIDE
        return [_Box((-h, -h, -h), (h, h, h), _crate_texture)]
    if object_name == "cube":
        h = CUBE_HALF_SIDE
        return [_Box((-h, -h, -h), (h, h, h), _cube_texture)]
    if object_name == "sphere_box":
        return [_Box(_PLINTH_LO, _PLINTH_HI, _plinth_texture), _Sphere(_BALL_CENTRE, _BALL_RADIUS, _ball_texture)]
    raise ValueError(f"unknown object {object_name!r}; expected one of {', '.join(OBJECT_NAMES)}")


OBJECT_NAMES = ("cube", "sphere_box", "crate")


def _shade(prim, points: np.ndarray, face: np.ndarray) -> np.ndarray:
    normals = prim.normals(points) if isinstance(prim, _Sphere) else _FACE_NORMALS[face]
    albedo = prim.texture(points, normals, face)
    lambert = np.clip(normals @ LIGHT_DIR, 0.0, None)[:, None]
    return np.clip(albedo * (AMBIENT + DIFFUSE * lambert), 0.0, 1.0)


def cast_rays(object_name: str, origins: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cast world-space rays: origins (N, 3), unit dirs (N, 3).

    Returns colours (N, 3) in [0, 1] and the hit distance t (N,), inf where a ray sees the background.
    """
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


def _render_samples(object_name: str, cam2world: np.ndarray, f: float, cx: float, cy: float, height: int,
                    width: int) -> tuple[np.ndarray, np.ndarray]:
    """Colours (H, W, k*k, 3), the background where a ray misses, and hits (H, W, k*k) of the SUPERSAMPLE x
    SUPERSAMPLE sub-rays around each integer pixel coordinate."""
    k = SUPERSAMPLE
    offsets = (np.arange(k) + 0.5) / k - 0.5
    uu = np.arange(width)[None, :, None, None] + offsets[None, None, None, :]   # (1, W, 1, k)
    vv = np.arange(height)[:, None, None, None] + offsets[None, None, :, None]  # (H, 1, k, 1)
    uu, vv = np.broadcast_arrays(uu, vv)                                         # (H, W, k, k)
    origins, dirs = pixel_rays(cam2world, f, cx, cy, uu, vv)
    colour, t = cast_rays(object_name, origins, dirs)
    return colour.reshape(height, width, k * k, 3), np.isfinite(t).reshape(height, width, k * k)


def render_view(object_name: str, cam2world: np.ndarray, f: float, cx: float, cy: float,
                height: int, width: int) -> np.ndarray:
    """Render a synthetic object as uint8 (height, width, 3) RGB on the white background.

    cam2world: (4, 4) OpenCV camera -> world. Pixel (u, v) = image[v, u] is centred on the
    integer pixel coordinate (u, v): its SUPERSAMPLE x SUPERSAMPLE sub-rays sit symmetrically
    around it and are averaged.
    """
    colour, _ = _render_samples(object_name, cam2world, f, cx, cy, height, width)
    return np.round(colour.mean(axis=2) * data_util.UINT8_MAX).astype(np.uint8)


def render_view_rgba(object_name: str, cam2world: np.ndarray, f: float, cx: float, cy: float,
                     height: int, width: int) -> np.ndarray:
    """As render_view, but uint8 (height, width, 4) straight-alpha RGBA without a background: alpha is the
    fraction of sub-rays that hit the object, RGB their mean colour (0 where none hits)."""
    colour, hit = _render_samples(object_name, cam2world, f, cx, cy, height, width)
    alpha = hit.mean(axis=2)
    rgb = (colour * hit[..., None]).sum(axis=2) / np.maximum(hit.sum(axis=2), 1)[..., None]
    rgba = np.concatenate([rgb, alpha[..., None]], axis=2)
    return np.round(rgba * data_util.UINT8_MAX).astype(np.uint8)


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
            col_all.append(np.round(_shade(prim, pts, face) * data_util.UINT8_MAX).astype(np.uint8))
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


def random_hemisphere_poses(num_views: int, radius: float, rng: np.random.RandomState) -> np.ndarray:
    """(num_views, 4, 4) cam2world poses looking at the origin: azimuth uniform in [0, 360), elevation
    uniform in SYNTH_ELEVATION_DEG (degrees)."""
    az = rng.uniform(0.0, 360.0, size=num_views)
    el = rng.uniform(SYNTH_ELEVATION_DEG[0], SYNTH_ELEVATION_DEG[1], size=num_views)
    positions = [data_util.spherical_position(a, e, radius) for a, e in zip(az, el)]
    return np.stack([data_util.look_at(p) for p in positions], axis=0)


def make_synthetic_dataset(out_root: data_util.PathLike, object_name: str, resolution: int = 128,
                           num_train: int = 50, num_val: int = 25, num_test: int = 50, seed: int = 0,
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
        "test": data_util.archimedean_spiral_poses(radius, num_test),
    }
    folders = {}
    for split, poses in splits.items():
        folder = os.path.join(os.fspath(out_root), split, object_name)
        os.makedirs(os.path.join(folder, "rgb"), exist_ok=True)
        data_util.write_pose_folder(os.path.join(folder, "pose"), poses)
        data_util.write_intrinsics(os.path.join(folder, "intrinsics.txt"), f, c, c, (0.0, 0.0, 0.0), 0.0, 1.0,
                                   resolution, resolution)
        for i, pose in enumerate(poses):
            data_util.write_png(os.path.join(folder, "rgb", f"{i:06d}.png"),
                                render_view(object_name, pose, f, c, c, resolution, resolution))
        folders[split] = folder
        logger.info("wrote %d %s views to %s", len(poses), split, folder)
    return folders


def make_nerf_synthetic_scene(out_dir: data_util.PathLike, object_name: str, resolution: int = 128,
                              num_train: int = 50, num_val: int = 10, num_test: int = 50, seed: int = 0,
                              radius: float = SYNTH_RADIUS) -> str:
    """Render a synthetic object in the NeRF-synthetic ("Blender") format, as those scenes ship.

    Writes out_dir/transforms_{train,val,test}.json (camera_angle_x; per frame file_path without extension and
    transform_matrix, the OpenGL cam2world: +y up, looking along -z) and out_dir/{train,val,test}/r_%d.png,
    RGBA without a background. Cameras as make_synthetic_dataset places them; the principal point is the image
    centre as Blender has it ((W - 1) / 2 in data_util's pixels). Returns out_dir.
    """
    import json
    if object_name not in OBJECT_NAMES:
        raise ValueError(f"unknown object {object_name!r}; expected one of {', '.join(OBJECT_NAMES)}")
    rng = np.random.RandomState(seed)
    f = synthetic_focal(resolution)
    c = (resolution - 1) / 2.0
    splits = {"train": random_hemisphere_poses(num_train, radius, rng),
              "val": random_hemisphere_poses(num_val, radius, rng),
              "test": data_util.archimedean_spiral_poses(radius, num_test)}
    opencv_to_opengl = np.diag([1.0, -1.0, -1.0, 1.0])  # flipping y and z is its own inverse
    for split, poses in splits.items():
        os.makedirs(os.path.join(os.fspath(out_dir), split), exist_ok=True)
        frames = []
        for i, pose in enumerate(poses):
            data_util.write_png(os.path.join(os.fspath(out_dir), split, f"r_{i}.png"),
                                render_view_rgba(object_name, pose, f, c, c, resolution, resolution))
            frames.append({"file_path": f"./{split}/r_{i}", "transform_matrix": (pose @ opencv_to_opengl).tolist()})
        with open(os.path.join(os.fspath(out_dir), f"transforms_{split}.json"), "w", encoding="utf-8") as file:
            json.dump({"camera_angle_x": 2.0 * np.arctan(0.5 * resolution / f), "frames": frames}, file, indent=1)
        logger.info("wrote %d %s views to %s", len(poses), split, out_dir)
    return os.fspath(out_dir)
