"""COLMAP models, read and made with pycolmap, turned into DeepVoxels object folders.

Usage:

    python -m tools.dataset from_colmap --colmap_dir SPARSE --images DIR --out OUT [--resolution 512]

(`python -m tools.dataset from_capture` runs structure from motion on photos or a video first, with
`run_sfm` here.) OUT receives the layout the DeepVoxels loader reads:

    OUT/rgb/%06d.png        square centre crops (the loader's crop), optionally area-resized
    OUT/pose/%06d.txt       (4, 4) cam2world, OpenCV camera (+x right, +y down, +z forward) -> world
    OUT/intrinsics.txt      f cx cy / origin / near_plane / scale / img_height img_width

plus two files the loader ignores: `source_images.txt` (the COLMAP image name of each index) and
`world_transform.txt` ((4, 4) similarity, COLMAP world -> dataset world). Where the grid goes, and why, is
tools/placement.py's part.

Conventions
-----------
* COLMAP stores world2cam as a unit quaternion and a translation t. Its camera axes already are OpenCV's,
  so cam2world = inverse([R | t]) with no axis flip.
* Pixel coordinates: COLMAP puts the centre of the top-left pixel at (0.5, 0.5); data_util and the
  projection code put it at (0, 0). The crop (a shift) and the resize (a product) are applied in
  COLMAP's corner-origin coordinates, where both are exact, then cx and cy move by -0.5.
  Writing at the training side length (--resolution) avoids any later rescale by the loader.
* Only pinhole cameras can be written: DeepVoxels has one focal length and no distortion. Models with
  distortion are undistorted with pycolmap first.
* --origin and --scale override the automatic placement and are given in COLMAP world units (the units of
  the sparse points); --near_plane is given in dataset units (grid side = 1), the units intrinsics.txt stores.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import sys
from typing import Mapping, Optional, Sequence

import numpy as np

import data_util
from tools import placement

log = logging.getLogger(__name__)

# COLMAP puts the centre of the top-left pixel at (0.5, 0.5); DeepVoxels (data_util) puts it at (0, 0).
COLMAP_TO_CENTRE_PIXELS = 0.5
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
            image_names: Sequence[str] = (), threads: int = -1) -> str:
    """SIFT features, matching and incremental mapping of every image in image_dir, all through pycolmap, with
    one shared SIMPLE_RADIAL camera. Returns the folder of the model with the most registered images.

    matching: "exhaustive" (every pair: unordered photos, up to a few hundred) or "sequential" (each image
    with its next neighbours by name: video frames). image_names: the images to use (default: every image
    in image_dir and its subfolders). threads: for every stage (-1: all cores); with 1 the same images give the
    same reconstruction every run, which several threads, finishing in varying order, do not.
    """
    import pycolmap
    quiet_pycolmap()
    pycolmap.set_random_seed(0)
    os.makedirs(work_dir, exist_ok=True)
    database = os.path.join(work_dir, "database.db")
    reader = pycolmap.ImageReaderOptions()
    reader.camera_model = SFM_CAMERA_MODEL
    extraction, matcher = pycolmap.FeatureExtractionOptions(), pycolmap.FeatureMatchingOptions()
    extraction.num_threads = matcher.num_threads = threads
    pycolmap.extract_features(database, image_dir, image_names=list(image_names),
                              camera_mode=pycolmap.CameraMode.SINGLE, reader_options=reader,
                              extraction_options=extraction, device=pycolmap.Device.cpu)
    if matching == "sequential":
        pairing = pycolmap.SequentialPairingOptions()
        pycolmap.match_sequential(database, matching_options=matcher, pairing_options=pairing,
                                  device=pycolmap.Device.cpu)
    elif matching == "exhaustive":
        pycolmap.match_exhaustive(database, matching_options=matcher, device=pycolmap.Device.cpu)
    else:
        raise data_util.DataError(f"--matching {matching!r}: expected 'exhaustive' or 'sequential'")
    sparse = os.path.join(work_dir, "sparse")
    os.makedirs(sparse, exist_ok=True)
    options = pycolmap.IncrementalPipelineOptions()
    options.random_seed = 0
    options.num_threads = threads
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
    row0, col0, side = placement.crop_window(camera.height, camera.width)
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
        rotation, summary["align_how"] = placement.align_to_object(colmap_cam2worlds, model.points,
                                                                   model.track_lengths, trim, model.source)
    elif align == "none":
        rotation, summary["align_how"] = np.eye(3), "none (--align none): COLMAP's axes"
    else:
        raise data_util.DataError(f"--align {align!r}: expected 'object' or 'none'")
    if origin is None or scale is None:
        # The box is axis-aligned in the turned world; its centre is mapped back to COLMAP's.
        low, high, how_box = placement.robust_box(model.points @ rotation.T, model.track_lengths, trim,
                                                  model.source)
    if origin is None:
        origin = rotation.T @ (0.5 * (low + high))
        summary["origin_how"] = f"centre of the object's box ({how_box})"
    else:
        summary["origin_how"] = "--origin"
    origin = np.asarray(origin, dtype=np.float64)
    if scale is None:
        scale = placement.grid_side(low, high, rotation @ origin, margin)
        summary["scale_how"] = f"largest side of the object's box x (1 + 2 x margin {margin:g})"
    else:
        summary["scale_how"] = "--scale"
    if not scale > 0:
        raise data_util.DataError(f"grid side {scale} must be positive (points collapse to a point?)")
    transform = placement.to_dataset_world(origin, scale, rotation)
    cam2worlds = np.stack([placement.move_camera(transform, cam2world) for cam2world in colmap_cam2worlds])
    near_plane, near_how, far_end = placement.near_plane_for(cam2worlds, near_plane)

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
        return placement.to_square(img, out_side)

    folders = {"": range(len(images))} if splits is None else splits
    for folder, indices in folders.items():
        placement.write_object_folder(os.path.join(out_dir, folder), [load(i) for i in indices],
                                      cam2worlds[list(indices)], (f_out, cx_out, cy_out), near_plane, transform,
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


def add_placement_flags(parser: argparse.ArgumentParser) -> None:
    """The grid-placement and image flags shared by from_colmap and from_capture."""
    parser.add_argument("--resolution", type=int, default=None,
                        help="side of the written square images in pixels (default: crop side, no resize)")
    placement.add_grid_flags(parser, "COLMAP world units", "the sparse points")
    parser.add_argument("--align", choices=("object", "none"), default="object",
                        help="object: turn the world so that the cameras' mean up is +z and the object sits "
                             "square in the grid; none: keep COLMAP's axes")
    parser.add_argument("--trim", type=float, default=0.05,
                        help="fraction of sparse points dropped at each end of every axis")
    parser.add_argument("--max_focal_mismatch", type=float, default=0.01,
                        help="largest relative fx/fy difference averaged into one focal length")


def check_placement_flags(args: argparse.Namespace) -> None:
    placement.check_grid_flags(args)
    if not 0 <= args.trim < 0.5:
        raise data_util.DataError(f"--trim {args.trim} must lie in [0, 0.5)")
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
