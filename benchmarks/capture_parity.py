"""Data in, end to end: does a dataset made from photos alone, or from a NeRF-synthetic scene, train as well as
the same views with their true cameras?

    python benchmarks/capture_parity.py --out /tmp/capture_parity --config configs/demo.yaml [--max_steps 300]

1. Renders the textured "crate" from ``--num_views`` cameras on a ring (known cameras) at ``--photo_side`` px.
2. ``from_capture`` on the photos alone (no cameras given): registered images, and after the similarity that
   maps the reconstruction onto the true world, the rotation and camera-centre errors per view, and the focal
   length error.
3. The same views and splits with their true cameras; both datasets are trained with the given flags (the
   demo configuration) and tested on the same held-out views.
4. A scene written in the NeRF-synthetic format (``--nerf_object``), converted with ``from_nerf_synthetic``,
   trained, and scored both ways (cropped as DeepVoxels, uncropped on white as NeRF-synthetic papers).

Prints one JSON line with the errors, the scores and the seconds each stage took. Flags it does not know
go to run_deepvoxels.py.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

RADIUS = 1.6  # camera distance, world units


def ring_poses(num_views: int) -> np.ndarray:
    """Cameras around the object at 20..50 degrees elevation, as someone walking round it would take them."""
    import data_util
    azimuths = np.arange(num_views) * 360.0 / num_views
    elevations = 35.0 + 15.0 * np.sin(np.deg2rad(3 * azimuths))
    return np.stack([data_util.look_at(data_util.spherical_position(a, e, RADIUS))
                     for a, e in zip(azimuths, elevations)])


def similarity(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(scale, rotation, translation) with dst ~ scale * rotation @ src + translation, least squares (Umeyama)."""
    mu_s, mu_d = src.mean(axis=0), dst.mean(axis=0)
    a, b = src - mu_s, dst - mu_d
    u, d, vt = np.linalg.svd(b.T @ a / len(src))
    sign = np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))])
    rotation = u @ sign @ vt
    scale = float(np.trace(np.diag(d) @ sign) / a.var(axis=0).sum())
    return scale, rotation, mu_d - scale * rotation @ mu_s


def read_views(root: str, obj: str) -> dict[str, dict[str, np.ndarray]]:
    """{split: {source photo name: dataset cam2world}} of a from_capture tree."""
    import data_util
    views = {}
    for split in ("train", "validation", "test"):
        folder = os.path.join(root, split, obj)
        names = [line.split()[1] for line in open(os.path.join(folder, "source_images.txt"))]
        poses = [np.loadtxt(p) for p in data_util.list_poses(os.path.join(folder, "pose"))]
        views[split] = dict(zip(names, poses))
    return views


def camera_errors(views: dict, true_poses: np.ndarray) -> dict:
    """Per-view rotation (degrees) and centre (fraction of the camera distance) errors after the best similarity."""
    merged = {name: pose for split in views.values() for name, pose in split.items()}
    names = sorted(merged)
    index = [int(name.split("_")[1].split(".")[0]) for name in names]
    centres = np.stack([merged[n][:3, 3] for n in names])
    scale, rotation, shift = similarity(centres, true_poses[index, :3, 3])
    centre_err = np.linalg.norm(scale * centres @ rotation.T + shift - true_poses[index, :3, 3], axis=1) / RADIUS
    rot_err = np.array([np.degrees(np.arccos(np.clip(
        (np.trace(true_poses[i][:3, :3].T @ rotation @ merged[n][:3, :3]) - 1) / 2, -1, 1)))
        for n, i in zip(names, index)])
    return {"rotation_deg_mean": float(rot_err.mean()), "rotation_deg_max": float(rot_err.max()),
            "centre_rel_mean": float(centre_err.mean()), "centre_rel_max": float(centre_err.max())}


def true_camera_dataset(views: dict, photos: str, true_poses: np.ndarray, photo_side: int, side: int, out: str,
                        obj: str) -> None:
    """The same photos and splits as the reconstruction, with their true cameras (the renderer's world)."""
    import data_util
    from tools import placement, synthetic
    zoom = side / photo_side
    # Rendered with cx = cy = photo_side / 2 in pixel-centre coordinates; the area resize maps centre
    # coordinate u to (u + 0.5) * zoom - 0.5.
    centre = (photo_side / 2 + 0.5) * zoom - 0.5
    intrinsics = (synthetic.synthetic_focal(photo_side) * zoom, centre, centre)
    for split, named in views.items():
        names = list(named)
        index = [int(name.split("_")[1].split(".")[0]) for name in names]
        images = [placement.to_square(data_util.read_image(os.path.join(photos, n)), side) for n in names]
        poses = true_poses[index]
        near, _ = placement.choose_near_plane(true_poses)
        placement.write_object_folder(os.path.join(out, split, obj), images, poses, intrinsics, near, np.eye(4),
                                      names)


def train_and_test(root: str, obj: str, logs: str, flags: Sequence[str]) -> dict:
    """Train on root/train/obj (validating on root/validation/obj), test the best checkpoint on root/test/obj."""
    import checkpoints
    import run_deepvoxels
    times = {}
    start = time.perf_counter()
    assert run_deepvoxels.main(["--train_test", "train", "--data_root", os.path.join(root, "train", obj),
                                "--logging_root", logs, *flags]) == 0
    times["train_s"] = time.perf_counter() - start
    best = glob.glob(os.path.join(logs, "**", "best.pth"), recursive=True)
    ckpt = best[0] if best else checkpoints.newest_checkpoint(logs)
    start = time.perf_counter()
    assert run_deepvoxels.main(["--train_test", "test", "--data_root", os.path.join(root, "test", obj),
                                "--logging_root", logs, "--checkpoint", ckpt, *flags]) == 0
    times["test_s"] = time.perf_counter() - start
    (metrics,) = glob.glob(os.path.join(logs, "test_traj", "*", "*", "metrics.json"))
    summary = json.load(open(metrics))
    return {k: summary[k] for k in ("psnr", "ssim", "psnr_uncropped", "ssim_uncropped", "num_views")} | times | \
        {"checkpoint": os.path.basename(ckpt)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="work folder (must not exist)")
    parser.add_argument("--num_views", type=int, default=60, help="photos rendered around the crate")
    parser.add_argument("--photo_side", type=int, default=256, help="side of the rendered photos, px")
    parser.add_argument("--side", type=int, default=128, help="side of the datasets' images (the training side), px")
    parser.add_argument("--nerf_object", default="cube", help="object written in the NeRF-synthetic format")
    parser.add_argument("--parts", nargs="+", choices=("capture", "nerf_synthetic"),
                        default=["capture", "nerf_synthetic"])
    parser.add_argument("--no_training", action="store_true",
                        help="stop after the datasets are written and the cameras compared (no training)")
    args, flags = parser.parse_known_args(argv)
    import data_util
    from tools import capture, colmap_import, nerf_synthetic, synthetic
    os.makedirs(args.out)
    results = {"stage_s": {}}
    stage = results["stage_s"]

    if "capture" in args.parts:
        photos = os.path.join(args.out, "photos")
        os.makedirs(photos)
        true_poses = ring_poses(args.num_views)
        start = time.perf_counter()
        f = synthetic.synthetic_focal(args.photo_side)
        for i, pose in enumerate(true_poses):
            data_util.write_png(os.path.join(photos, f"IMG_{i:03d}.png"),
                                synthetic.render_view("crate", pose, f, args.photo_side / 2, args.photo_side / 2,
                                                      args.photo_side, args.photo_side))
        stage["render_photos"] = time.perf_counter() - start
        start = time.perf_counter()
        reconstructed = os.path.join(args.out, "reconstructed")
        assert capture.main(["--images", photos, "--out", reconstructed, "--object", "crate",
                             "--resolution", str(args.side)]) == 0
        stage["from_capture"] = time.perf_counter() - start
        views = read_views(reconstructed, "crate")
        raw = colmap_import.read_model(os.path.join(reconstructed, "sparse"))
        written_f = float(open(os.path.join(reconstructed, "train", "crate", "intrinsics.txt")).read().split()[0])
        true_f = synthetic.synthetic_focal(args.photo_side)
        results["sfm"] = {
            "registered": len(raw.images), "total": args.num_views,
            "mean_reprojection_error_px": raw.mean_reprojection_error,
            "focal_sfm_px": float(next(iter(raw.cameras.values())).params[0]), "focal_true_px": true_f,
            "focal_rel_error_sfm": float(next(iter(raw.cameras.values())).params[0] / true_f - 1),
            "focal_rel_error_dataset": written_f / (true_f * args.side / args.photo_side) - 1,
            **camera_errors(views, true_poses)}
        truth = os.path.join(args.out, "true_cameras")
        true_camera_dataset(views, photos, true_poses, args.photo_side, args.side, truth, "crate")
        print(json.dumps(results), flush=True)
        if args.no_training:
            return 0
        results["reconstructed"] = train_and_test(reconstructed, "crate", os.path.join(args.out, "logs_rec"), flags)
        print(json.dumps(results), flush=True)
        results["true_cameras"] = train_and_test(truth, "crate", os.path.join(args.out, "logs_true"), flags)
        print(json.dumps(results), flush=True)

    if "nerf_synthetic" in args.parts:
        scene = os.path.join(args.out, "nerf_scene", args.nerf_object)
        start = time.perf_counter()
        synthetic.make_nerf_synthetic_scene(scene, args.nerf_object, resolution=args.photo_side, num_train=50,
                                            num_val=10, num_test=20)
        stage["render_nerf_synthetic"] = time.perf_counter() - start
        start = time.perf_counter()
        converted = os.path.join(args.out, "nerf_converted")
        assert nerf_synthetic.main(["--scene", scene, "--out", converted, "--resolution", str(args.side)]) == 0
        stage["from_nerf_synthetic"] = time.perf_counter() - start
        if args.no_training:
            print(json.dumps(results), flush=True)
            return 0
        results["nerf_synthetic"] = train_and_test(converted, args.nerf_object, os.path.join(args.out, "logs_nerf"),
                                                   flags)
    print(json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
