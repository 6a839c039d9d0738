"""NeRF-synthetic ("Blender") scenes to the DeepVoxels layout: ``python -m tools.dataset from_nerf_synthetic``.

    python -m tools.dataset from_nerf_synthetic --scene nerf_synthetic/lego --out data/lego --resolution 512

The format, as the NeRF paper's scenes ship it:

    SCENE/transforms_train.json  transforms_val.json  transforms_test.json
        {"camera_angle_x": horizontal field of view in radians,
         "frames": [{"file_path": "./train/r_0", "transform_matrix": (4, 4) camera-to-world}, ...]}
    SCENE/train/r_0.png ...      RGBA; file_path may omit the extension (the real files do: ".png" is tried)

Conventions
-----------
* transform_matrix is an OpenGL (Blender) camera: +x right, +y up, looking along -z. The OpenCV camera
  DeepVoxels uses has +y down and looks along +z: cam2world_opencv = transform_matrix @ diag(1, -1, -1, 1).
* f = (W / 2) / tan(camera_angle_x / 2) pixels, and the principal point is the image centre. Blender puts
  the centre of pixel i at i + 0.5 from the image edge, so in data_util's pixels (integer = pixel centre) the
  centre is at (W - 1) / 2, (H - 1) / 2 (the NeRF code's W / 2 is half a pixel off).
* RGBA images are composited on ``--background`` (white by default, as the papers report) and written at
  ``--resolution`` (the networks take 64 * 2^k px: 512 for the 800 px originals).

Grid placement: the region the cameras look at (the point nearest to all their optical axes, and a cube
as wide as the narrowest view there), refined by the alpha masks: a coarse visual hull (the points every
training view sees as foreground), boxed, plus ``--margin``. ``--origin`` and ``--scale`` override it (in the
scene's units). The dataset world is the scene's, shifted and scaled so that the grid is centred at 0 with
side 1; ``world_transform.txt`` holds that map. Splits: train -> train, val -> validation, test -> test.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from typing import Optional, Sequence

import numpy as np

import data_util
from tools import placement

log = logging.getLogger(__name__)

SPLIT_FILES = {"train": "transforms_train.json", "validation": "transforms_val.json",
               "test": "transforms_test.json"}
# OpenGL camera axes (+y up, looking along -z) -> OpenCV's (+y down, looking along +z).
OPENGL_TO_OPENCV = np.diag([1.0, -1.0, -1.0, 1.0])
# Blender's principal point sits at the image centre: W / 2 from the edge, in corner-origin pixels.
BLENDER_TO_CENTRE_PIXELS = 0.5
BACKGROUNDS = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0)}
# A pixel is foreground for the visual hull when its alpha is at least this.
ALPHA_FOREGROUND = 0.5
# Points per side of the visual hull's two passes (coarse over the looked-at cube, then fine over its box),
# and at most this many training views carve it.
HULL_POINTS = 48
HULL_VIEWS = 40


def read_split(scene: str, split_file: str) -> tuple[float, list[tuple[str, np.ndarray]]]:
    """(camera_angle_x, [(image path, (4, 4) OpenCV cam2world)]) of one transforms file."""
    path = os.path.join(scene, split_file)
    try:
        with open(path, "r", encoding="utf-8") as file:
            meta = json.load(file)
    except json.JSONDecodeError as err:
        raise data_util.DataError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise data_util.DataError(f"{path}: expected a JSON object with 'camera_angle_x' and 'frames'")
    for key in ("camera_angle_x", "frames"):
        if key not in meta:
            raise data_util.DataError(f"{path}: missing key '{key}'")
    angle = meta["camera_angle_x"]
    if not isinstance(angle, (int, float)) or not 0 < angle < math.pi:
        raise data_util.DataError(f"{path}: 'camera_angle_x' {angle!r}: expected a field of view in radians")
    if not isinstance(meta["frames"], list) or not meta["frames"]:
        raise data_util.DataError(f"{path}: 'frames' is empty or not a list")
    views = []
    for number, frame in enumerate(meta["frames"]):
        for key in ("file_path", "transform_matrix"):
            if not isinstance(frame, dict) or key not in frame:
                raise data_util.DataError(f"{path}: frame {number} is missing key '{key}'")
        matrix = np.asarray(frame["transform_matrix"], dtype=np.float64)
        if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
            raise data_util.DataError(f"{path}: frame {number}: 'transform_matrix' is not a finite 4x4 matrix")
        views.append((resolve_image(scene, frame["file_path"], path), matrix @ OPENGL_TO_OPENCV))
    return float(angle), views


def resolve_image(scene: str, file_path: str, transforms: str) -> str:
    """The image a frame's file_path names, relative to the scene; without an extension, ".png" is tried."""
    path = os.path.normpath(os.path.join(scene, file_path))
    if os.path.isfile(path):
        return path
    if not os.path.splitext(path)[1] and os.path.isfile(path + ".png"):
        return path + ".png"
    raise data_util.DataError(f"{transforms}: image {file_path!r} not found (looked for {path}"
                              + ("" if os.path.splitext(path)[1] else " and .png") + ")")


def load_rgba(path: str) -> np.ndarray:
    """(H, W, 4) float64 in [0, 1], alpha 1 where the file has none."""
    import imageio.v3 as iio
    try:
        img = np.asarray(iio.imread(path))
    except Exception as err:  # decoders raise many types; all mean "not a readable image"
        raise data_util.DataError(f"image {path}: cannot decode ({data_util.one_line(err)})") from None
    if img.dtype not in (np.uint8, np.uint16) or img.ndim not in (2, 3):
        raise data_util.DataError(f"image {path}: expected an 8 or 16 bit gray, RGB or RGBA image")
    top = np.iinfo(img.dtype).max
    img = img.astype(np.float64) / top
    if img.ndim == 2:
        img = img[:, :, None]
    if img.shape[2] in (1, 2):  # gray (+ alpha)
        img = np.concatenate([np.repeat(img[:, :, :1], 3, axis=2), img[:, :, 1:]], axis=2)
    if img.shape[2] == 3:
        img = np.concatenate([img, np.ones_like(img[:, :, :1])], axis=2)
    return img[:, :, :4]


def composite(rgba: np.ndarray, background: Sequence[float]) -> np.ndarray:
    """Straight-alpha RGBA in [0, 1] over a background colour -> (H, W, 3) uint8."""
    alpha = rgba[:, :, 3:]
    rgb = rgba[:, :, :3] * alpha + np.asarray(background, dtype=np.float64) * (1.0 - alpha)
    return np.clip(np.round(rgb * data_util.UINT8_MAX), 0, data_util.UINT8_MAX).astype(np.uint8)


def focal_from_angle(angle_x: float, width: int) -> float:
    return 0.5 * width / math.tan(0.5 * angle_x)


def looked_at_point(cam2worlds: np.ndarray) -> np.ndarray:
    """The point nearest (least squares) to every camera's optical axis."""
    normal_eq, rhs = np.zeros((3, 3)), np.zeros(3)
    for cam2world in cam2worlds:
        d = cam2world[:3, 2] / np.linalg.norm(cam2world[:3, 2])
        off_axis = np.eye(3) - np.outer(d, d)  # projects onto the plane perpendicular to the axis
        normal_eq += off_axis
        rhs += off_axis @ cam2world[:3, 3]
    if np.linalg.matrix_rank(normal_eq) < 3:
        raise data_util.DataError("the cameras' optical axes are parallel: there is no point they all look at; "
                                  "give --origin and --scale")
    return np.linalg.solve(normal_eq, rhs)


def visual_hull_box(cam2worlds: np.ndarray, f: float, cx: float, cy: float, alphas: Sequence[np.ndarray],
                    low: np.ndarray, high: np.ndarray, points_per_side: int) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """Box (low, high) of the sample points in [low, high] that every view showing them sees as foreground
    (alpha >= ALPHA_FOREGROUND), grown by one sample spacing; None when no point is left. A view does not carve
    the points outside its frame, but a point must be inside at least half of the frames (elsewhere nothing
    is known about it). f, cx, cy: data_util pixels of the alpha masks."""
    axes = [np.linspace(low[k], high[k], points_per_side) for k in range(3)]
    points = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    keep = np.ones(len(points), dtype=bool)
    seen_by = np.zeros(len(points), dtype=np.int64)
    for cam2world, alpha in zip(cam2worlds, alphas):
        world2cam = np.linalg.inv(cam2world)
        cam = points @ world2cam[:3, :3].T + world2cam[:3, 3]
        in_front = cam[:, 2] > 1e-9
        z = np.where(in_front, cam[:, 2], 1.0)
        u = np.round(f * cam[:, 0] / z + cx).astype(np.int64)
        v = np.round(f * cam[:, 1] / z + cy).astype(np.int64)
        seen = in_front & (u >= 0) & (u < alpha.shape[1]) & (v >= 0) & (v < alpha.shape[0])
        foreground = np.zeros(len(points), dtype=bool)
        foreground[seen] = alpha[v[seen], u[seen]] >= ALPHA_FOREGROUND
        keep &= foreground | ~seen
        seen_by += seen
    keep &= 2 * seen_by >= len(alphas)
    if not keep.any():
        return None
    spacing = (high - low) / (points_per_side - 1)
    return points[keep].min(axis=0) - spacing, points[keep].max(axis=0) + spacing


def place_grid(cam2worlds: np.ndarray, f: float, cx: float, cy: float, alphas: Sequence[np.ndarray],
               margin: float) -> tuple[np.ndarray, float, str]:
    """(grid centre, grid side, how) in scene units, from the cameras and their alpha masks."""
    centre = looked_at_point(cam2worlds)
    distances = np.linalg.norm(cam2worlds[:, :3, 3] - centre, axis=1)
    height, width = alphas[0].shape
    # The narrowest view at the looked-at point: the object must fit into every view.
    half = distances.min() * min(width / 2, height / 2) / f
    low, high = centre - half, centre + half
    box = visual_hull_box(cam2worlds, f, cx, cy, alphas, low, high, HULL_POINTS)
    if box is None:
        raise data_util.DataError("the alpha masks leave nothing that every training view sees as foreground "
                                  "near the point the cameras look at; give --origin and --scale")
    box = visual_hull_box(cam2worlds, f, cx, cy, alphas, np.maximum(box[0], low), np.minimum(box[1], high),
                          HULL_POINTS)
    low, high = box if box is not None else (low, high)
    origin = 0.5 * (low + high)
    scale = placement.grid_side(low, high, origin, margin)
    how = (f"box of the alpha masks' visual hull over {len(alphas)} training views, near the point the cameras "
           f"look at ({np.array2string(centre, precision=3)}), x (1 + 2 x margin {margin:g})")
    return origin, scale, how


def convert_scene(scene: str, out: str, name: str, resolution: int, background: Sequence[float],
                  origin: Optional[Sequence[float]] = None, scale: Optional[float] = None,
                  near_plane: Optional[float] = None, margin: float = 0.1) -> dict:
    """Write out/{train,validation,test}/name from a NeRF-synthetic scene; returns the chosen values."""
    splits = {}
    for split, split_file in SPLIT_FILES.items():
        if split == "train" or os.path.isfile(os.path.join(scene, split_file)):
            splits[split] = read_split(scene, split_file)
    angle = splits["train"][0]
    first = load_rgba(splits["train"][1][0][0])
    height, width = first.shape[:2]
    row0, col0, side = placement.crop_window(height, width)
    if resolution > side:
        raise data_util.DataError(f"--resolution {resolution} exceeds the {side} px square crop of the "
                                  f"{height}x{width} images")
    f = focal_from_angle(angle, width)
    cx, cy = width / 2 - BLENDER_TO_CENTRE_PIXELS, height / 2 - BLENDER_TO_CENTRE_PIXELS
    for split, (other_angle, _) in splits.items():
        if abs(other_angle - angle) > 1e-6 * angle:
            raise data_util.DataError(f"{os.path.join(scene, SPLIT_FILES[split])}: camera_angle_x {other_angle} "
                                      f"differs from the training split's {angle}; one intrinsics.txt needs one")

    images = {}
    for split, (_, views) in splits.items():
        images[split] = []
        for path, _ in views:
            rgba = first if path == splits["train"][1][0][0] else load_rgba(path)
            if rgba.shape[:2] != (height, width):
                raise data_util.DataError(f"image {path}: is {rgba.shape[0]}x{rgba.shape[1]}, the first training "
                                          f"image {height}x{width}")
            images[split].append(rgba)
    train_poses = np.stack([pose for _, pose in splits["train"][1]])
    how = "--origin and --scale"
    if origin is None or scale is None:
        picks = np.linspace(0, len(train_poses) - 1, min(HULL_VIEWS, len(train_poses))).round().astype(int)
        auto_origin, auto_scale, how = place_grid(train_poses[picks], f, cx, cy,
                                                  [images["train"][i][:, :, 3] for i in picks], margin)
        origin = auto_origin if origin is None else origin
        scale = auto_scale if scale is None else scale
    origin, scale = np.asarray(origin, dtype=np.float64), float(scale)
    if not scale > 0:
        raise data_util.DataError(f"--scale {scale} must be positive")
    transform = placement.to_dataset_world(origin, scale)
    moved = {split: np.stack([placement.move_camera(transform, pose) for _, pose in views])
             for split, (_, views) in splits.items()}
    near_plane, near_how, _ = placement.near_plane_for(np.concatenate(list(moved.values())), near_plane)

    zoom = resolution / side
    intrinsics = (f * zoom, (width / 2 - col0) * zoom - BLENDER_TO_CENTRE_PIXELS,
                  (height / 2 - row0) * zoom - BLENDER_TO_CENTRE_PIXELS)
    for split, (_, views) in splits.items():
        rgb = [placement.to_square(composite(rgba, background), resolution) for rgba in images[split]]
        sources = [os.path.relpath(path, scene) for path, _ in views]
        placement.write_object_folder(os.path.join(out, split, name), rgb, moved[split], intrinsics,
                                      near_plane, transform, sources)
    return {"origin": origin, "scale": scale, "how": how, "near_plane": near_plane, "near_how": near_how,
            "f": intrinsics[0], "side": resolution, "counts": {s: len(v) for s, (_, v) in splits.items()},
            "source_size": (height, width)}


def parse_background(text: str) -> tuple[float, float, float]:
    """"white", "black" or "R,G,B" in [0, 1]."""
    if text in BACKGROUNDS:
        return BACKGROUNDS[text]
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not all(0.0 <= v <= 1.0 for v in values):
        raise data_util.DataError(f"--background {text!r}: expected white, black or R,G,B with values in [0, 1]")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tools.dataset from_nerf_synthetic",
        description="Convert a NeRF-synthetic (Blender) scene, transforms_{train,val,test}.json with RGBA images, "
                    "into OUT/{train,validation,test}/<object> with the grid placed from the cameras and masks.")
    parser.add_argument("--scene", required=True, help="scene folder holding transforms_train.json (val, test)")
    parser.add_argument("--out", required=True, help="dataset root to write (must not exist)")
    parser.add_argument("--object", default=None, help="object folder name (default: the scene folder's name)")
    parser.add_argument("--resolution", type=int, default=512,
                        help="side of the written images in pixels (the networks take 64 * 2^k: 512 for 800 px)")
    parser.add_argument("--background", default="white",
                        help="colour the RGBA images are composited on: white (as papers report), black, or R,G,B "
                             "in [0, 1]")
    placement.add_grid_flags(parser, "scene units", "the cameras and the alpha masks")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry; returns the exit code (bad input: one `error: ...` line on stderr, 2)."""
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        background = parse_background(args.background)
        if args.resolution < 1:
            raise data_util.DataError(f"--resolution {args.resolution}: expected a positive number of pixels")
        placement.check_grid_flags(args)
        if not os.path.isfile(os.path.join(args.scene, SPLIT_FILES["train"])):
            raise data_util.DataError(f"{os.path.join(args.scene, SPLIT_FILES['train'])}: not found "
                                      "(--scene must be a NeRF-synthetic scene folder)")
        name = args.object or os.path.basename(os.path.normpath(args.scene))
        with data_util.staged_folder(args.out) as staging:
            summary = convert_scene(args.scene, staging, name, args.resolution, background, args.origin,
                                    args.scale, args.near_plane, args.margin)
    except (data_util.DataError, OSError) as err:
        print(f"error: {data_util.one_line(err)}", file=sys.stderr)
        return 2
    height, width = summary["source_size"]
    written = os.path.join(args.out, "{train,validation,test}", name)
    print(f"converted {', '.join(f'{n} {s}' for s, n in summary['counts'].items())} views ({height}x{width} -> "
          f"{summary['side']} px, f {summary['f']:.2f} px) to {written}")
    print(f"grid: centre {np.array2string(summary['origin'], precision=4)}, side {summary['scale']:.4g} (scene units): "
          f"{summary['how']}; near plane {summary['near_plane']:.3f} grid sides")
    return 0
