"""Your own capture to a dataset that trains: ``python -m tools.dataset from_capture``.

    python -m tools.dataset from_capture --images photos/ --out data/myobject --resolution 512
    python -m tools.dataset from_capture --video clip.mp4 --fps 2 --out data/myobject --resolution 512

Photos (or frames taken from a video at ``--fps``) go through structure from motion with pycolmap (SIFT,
exhaustive matching for photos, sequential for video frames, incremental mapping, undistortion to a pinhole
camera); ``tools.colmap_import`` then places the grid and writes the views, split into

    OUT/train/<object>/  OUT/validation/<object>/  OUT/test/<object>/      (rgb/, pose/, intrinsics.txt, ...)
    OUT/sparse/                                                            the reconstruction, for from_colmap

Held-out views: every ``--test_every``-th registered view (sorted by name; 8 as LLFF and nerfstudio do) goes
to test, and ``--num_val`` of the others, evenly spread, to validation. All splits share one world, grid and
camera. Everything is written into a folder beside OUT and renamed at the end: a refused or failed run leaves
nothing behind.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from typing import Optional, Sequence

import numpy as np

import data_util
from tools import colmap_import

log = logging.getLogger(__name__)

# Fewer photos than this cannot give a reconstruction worth training on (and leave no views to hold out).
MIN_IMAGES = 8
# Structure from motion must register at least this fraction of the images; fewer means the capture did not
# overlap enough, and a dataset of the rest would misrepresent the object.
MIN_REGISTERED_FRACTION = 0.5
SPLITS = ("train", "validation", "test")


def split_indices(num_views: int, test_every: int, num_val: int) -> dict[str, list[int]]:
    """Indices per split of views sorted by name: every test_every-th view (0, n, 2n, ...; 0: none) to test,
    num_val of the rest, evenly spread, to validation, the others to train."""
    test = list(range(0, num_views, test_every)) if test_every > 0 else []
    rest = [i for i in range(num_views) if i not in set(test)]
    num_val = min(num_val, max(len(rest) - 1, 0))
    picks = np.linspace(0, len(rest) - 1, num_val + 2)[1:-1].round().astype(int) if num_val > 0 else []
    validation = [rest[k] for k in picks]
    train = [i for i in rest if i not in set(validation)]
    return {"train": train, "validation": validation, "test": test}


def check_images(image_dir: str) -> list[str]:
    """Names of the photos in image_dir (top level), refused when too few or of mixed sizes."""
    import imageio.v3 as iio
    if not os.path.isdir(image_dir):
        raise data_util.DataError(f"{image_dir}: image folder not found")
    paths = data_util.glob_imgs(image_dir)
    if len(paths) < MIN_IMAGES:
        raise data_util.DataError(f"{image_dir}: {len(paths)} images (.png, .jpg, .jpeg); structure from motion "
                                  f"needs at least {MIN_IMAGES}")
    sizes = {}
    for path in paths:
        try:
            shape = iio.improps(path).shape
        except Exception as err:  # decoders raise many types; all mean "not a readable image"
            raise data_util.DataError(f"image {path}: cannot decode ({data_util.one_line(err)})") from None
        sizes.setdefault(tuple(shape[:2]), path)
    if len(sizes) > 1:
        (size_a, a), (size_b, b) = list(sizes.items())[:2]
        raise data_util.DataError(f"{image_dir}: mixed image sizes ({os.path.basename(a)} is {size_a[0]}x{size_a[1]}, "
                                  f"{os.path.basename(b)} is {size_b[0]}x{size_b[1]}); one camera needs one size")
    return [os.path.basename(p) for p in paths]


def extract_frames(video: str, out_dir: str, fps: float) -> dict[str, str]:
    """Decode ``fps`` frames per second of video into out_dir/frame_%05d.png (imageio-ffmpeg).
    Returns {frame file name: source label ``<video name>#t=<seconds>``}."""
    import imageio_ffmpeg
    if not os.path.isfile(video):
        raise data_util.DataError(f"{video}: video file not found")
    os.makedirs(out_dir, exist_ok=True)
    sources = {}
    try:
        frames = imageio_ffmpeg.read_frames(video, output_params=["-vf", f"fps={fps:g}"])
        width, height = next(frames)["size"]
        for k, frame in enumerate(frames):
            img = np.frombuffer(frame, dtype=np.uint8).reshape(height, width, 3)
            name = f"frame_{k:05d}.png"
            data_util.write_png(os.path.join(out_dir, name), img)
            # ffmpeg's fps filter keeps one frame per 1 / fps seconds; the label is that time, to within one
            # frame of the source (the filter rounds timestamps).
            sources[name] = f"{os.path.basename(video)}#t={k / fps:.3f}"
    except Exception as err:  # ffmpeg reports an undecodable file in several ways (IOError, RuntimeError, ...)
        raise data_util.DataError(f"{video}: cannot decode as a video ({data_util.one_line(err)})") from None
    return sources


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tools.dataset from_capture",
        description="Photos or a video -> structure from motion (pycolmap) -> a train/validation/test dataset "
                    "with the grid placed automatically.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="folder of photos of one object (all the same size, one zoom setting)")
    source.add_argument("--video", help="video file; frames are taken at --fps")
    parser.add_argument("--out", required=True,
                        help="dataset root to write (must not exist): OUT/{train,validation,test}/<object>")
    parser.add_argument("--object", default=None,
                        help="object folder name (default: the name of the photo folder or video)")
    parser.add_argument("--fps", type=float, default=2.0, help="frames taken per second of video")
    parser.add_argument("--matching", choices=("auto", "exhaustive", "sequential"), default="auto",
                        help="image pairs matched: every pair (photos, up to a few hundred), or neighbours in name "
                             "order (video); auto: exhaustive for photos, sequential for video")
    parser.add_argument("--sfm_threads", type=int, default=-1,
                        help="threads for structure from motion (-1: all cores; 1: the same reconstruction every run)")
    parser.add_argument("--test_every", type=int, default=8,
                        help="every N-th registered view (by name) is held out for test (0: no test views)")
    parser.add_argument("--num_val", type=int, default=3,
                        help="views of the rest held out for validation (best.pth), evenly spread")
    colmap_import.add_placement_flags(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry; returns the exit code (bad input: one `error: ...` line on stderr, 2)."""
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    # The closing summary says what was done; the importer's line-by-line account is for from_colmap.
    logging.getLogger(colmap_import.__name__).setLevel(logging.WARNING)
    try:
        colmap_import.check_placement_flags(args)
        if not args.fps > 0:
            raise data_util.DataError(f"--fps {args.fps}: expected a positive number of frames per second")
        if args.test_every < 0 or args.num_val < 0:
            raise data_util.DataError("--test_every and --num_val must not be negative")
        if args.sfm_threads == 0 or args.sfm_threads < -1:
            raise data_util.DataError(f"--sfm_threads {args.sfm_threads}: expected -1 (all cores) or at least 1")
        source = args.images or args.video
        name = args.object or os.path.splitext(os.path.basename(os.path.normpath(source)))[0]
        with data_util.staged_folder(args.out) as staging:
            summary = capture_to_dataset(args, name, staging)
    except (data_util.DataError, OSError) as err:
        print(f"error: {data_util.one_line(err)}", file=sys.stderr)
        return 2
    print(summary.replace(staging, os.path.normpath(args.out)))
    return 0


def capture_to_dataset(args: argparse.Namespace, name: str, out: str) -> str:
    """The work of main() inside the staging folder ``out``; returns the closing summary lines."""
    work = os.path.join(out, ".work")
    times = {}
    start = time.perf_counter()
    sources = None
    if args.video:
        image_dir = os.path.join(work, "frames")
        sources = extract_frames(args.video, image_dir, args.fps)
        times["frames"] = time.perf_counter() - start
        if len(sources) < MIN_IMAGES:
            raise data_util.DataError(f"{args.video}: {len(sources)} frames at --fps {args.fps:g}; structure from "
                                      f"motion needs at least {MIN_IMAGES} (raise --fps)")
        names = check_images(image_dir)
    else:
        image_dir = args.images
        names = check_images(image_dir)
    matching = args.matching if args.matching != "auto" else ("sequential" if args.video else "exhaustive")

    start = time.perf_counter()
    raw_dir = colmap_import.run_sfm(image_dir, work, matching, image_names=names, threads=args.sfm_threads)
    times["structure from motion"] = time.perf_counter() - start
    raw = colmap_import.read_model(raw_dir)
    registered = len(raw.images)
    if registered < MIN_REGISTERED_FRACTION * len(names):
        raise data_util.DataError(f"{args.images or args.video}: only {registered} of {len(names)} images "
                                  f"registered (at least {MIN_REGISTERED_FRACTION:.0%} needed); take more "
                                  "overlapping views of a textured object")
    start = time.perf_counter()
    model, undistorted_dir = colmap_import.pinhole_model(raw_dir, image_dir, work)
    splits = split_indices(len(model.images), args.test_every, args.num_val)
    if len(splits["train"]) < 2:
        raise data_util.DataError(f"--test_every {args.test_every} --num_val {args.num_val} leave "
                                  f"{len(splits['train'])} of {len(model.images)} views to train on")
    folders = {os.path.join(split, name): splits[split] for split in SPLITS if splits[split]}
    summary = colmap_import.convert(model, undistorted_dir, out, sources=sources, splits=folders,
                                    **colmap_import.placement_kwargs(args))
    times["undistortion and dataset"] = time.perf_counter() - start
    shutil.move(raw_dir, os.path.join(out, "sparse"))
    shutil.rmtree(work)

    focal = next(iter(raw.cameras.values())).params[0]
    lines = [
        f"registered {registered} of {len(names)} images ({matching} matching); mean reprojection error "
        f"{raw.mean_reprojection_error:.3f} px; focal length {focal:.1f} px before undistortion",
        f"grid: centre {np.array2string(summary['origin'], precision=4)}, side {summary['scale']:.4g} (COLMAP units), "
        f"near plane {summary['near_plane']:.3f} grid sides; images {summary['side']} px, f {summary['f']:.2f} px",
        "split: " + ", ".join(f"{len(splits[s])} {s}" for s in SPLITS)
        + (f" (every {args.test_every}th registered view to test)" if args.test_every else "")
        + f" in {os.path.join(out, '{' + ','.join(SPLITS) + '}', name)}",
        "time: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()),
    ]
    return "\n".join(lines)
