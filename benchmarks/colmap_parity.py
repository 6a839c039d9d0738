"""Does a COLMAP-converted dataset train as well as the dataset it came from?

Renders a built-in scene, writes its known cameras and surface points as a COLMAP text model in a rotated,
shifted and scaled world (as a real reconstruction would be), converts it with ``tools.colmap_import``, then trains
the same configuration on the original and on the converted dataset and compares test PSNR/SSIM.

    python benchmarks/colmap_parity.py --out /tmp/colmap_parity --config configs/demo.yaml --max_steps 300

Prints one JSON line: {"original": {...}, "converted_auto": {...}[, ...]}.
"converted_auto" (``--variants auto``, the default) uses the importer's automatic axes and grid placement;
"converted_unaligned" (``--variants unaligned``) keeps COLMAP's (randomly turned) axes (``--align none``);
"converted_matched" (``--variants matched``) keeps COLMAP's axes and passes --origin/--scale/--near_plane so
the grid sits where the original dataset's grid is, up to the world's rotation.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
import sys
from typing import Optional, Sequence

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

WORLD_SCALE = 3.0  # COLMAP's arbitrary gauge: the true world scaled by this, rotated and shifted
NUM_POINTS = 3000
COLMAP_PIXEL_OFFSET = 0.5  # COLMAP's pixel centres sit at +0.5


def _quaternion(rot: np.ndarray) -> np.ndarray:
    """(3, 3) rotation -> COLMAP's (qw, qx, qy, qz)."""
    from scipy.spatial.transform import Rotation
    x, y, z, w = Rotation.from_matrix(rot).as_quat()
    return np.array([w, x, y, z])


def write_colmap_model(split_dirs: Sequence[str], obj: str, model_dir: str, photo_dir: str,
                       rotation: np.ndarray, shift: np.ndarray) -> None:
    """Known cameras and surface points of ``split_dirs`` as a COLMAP text model; images copied to photo_dir."""
    import data_util
    from tools import synthetic
    os.makedirs(model_dir, exist_ok=True)
    os.makedirs(photo_dir, exist_ok=True)
    f, cx, cy = (float(v) for v in open(os.path.join(split_dirs[0], "intrinsics.txt")).readline().split()[:3])
    height, width = (int(float(v)) for v in open(os.path.join(split_dirs[0], "intrinsics.txt")).readlines()[4].split())
    images = []
    for split_dir in split_dirs:
        split = os.path.basename(os.path.dirname(split_dir))
        for img, pose in zip(data_util.glob_imgs(os.path.join(split_dir, "rgb")),
                             data_util.list_poses(os.path.join(split_dir, "pose"))):
            name = f"{split}_{os.path.basename(img)}"
            shutil.copy(img, os.path.join(photo_dir, name))
            images.append((name, data_util.load_pose(pose).astype(np.float64)))
    with open(os.path.join(model_dir, "cameras.txt"), "w") as handle:
        handle.write(f"1 PINHOLE {width} {height} {f!r} {f!r} {cx + COLMAP_PIXEL_OFFSET!r} "
                     f"{cy + COLMAP_PIXEL_OFFSET!r}\n")
    with open(os.path.join(model_dir, "images.txt"), "w") as handle:
        for image_id, (name, cam2world) in enumerate(images, start=1):
            rot = rotation @ cam2world[:3, :3]
            centre = WORLD_SCALE * rotation @ cam2world[:3, 3] + shift
            q, t = _quaternion(rot.T), -rot.T @ centre
            handle.write(" ".join([str(image_id), *(repr(float(v)) for v in (*q, *t)), "1", name]) + "\n\n")
    points, colours = synthetic.object_surface_points(obj, NUM_POINTS, seed=0)
    rng = np.random.RandomState(0)
    with open(os.path.join(model_dir, "points3D.txt"), "w") as handle:
        for pid, (p, c) in enumerate(zip(points, colours), start=1):
            xyz = WORLD_SCALE * rotation @ p + shift
            track = rng.choice(len(images), size=3, replace=False) + 1
            handle.write(" ".join([str(pid), *(repr(float(v)) for v in xyz), *(str(int(v)) for v in c), "0.5",
                                   *(f"{i} 0" for i in track)]) + "\n")


def split_converted(converted: str, out_root: str, obj: str) -> dict[str, str]:
    """Sort the converted folder's views back into train/ and test/ by their source image names."""
    names = [line.split()[-1] for line in open(os.path.join(converted, "source_images.txt")) if line.strip()]
    rgb = sorted(glob.glob(os.path.join(converted, "rgb", "*.png")))
    poses = sorted(glob.glob(os.path.join(converted, "pose", "*.txt")))
    folders = {}
    for split in ("train", "test"):
        folder = os.path.join(out_root, split, obj)
        for sub in ("rgb", "pose"):
            os.makedirs(os.path.join(folder, sub), exist_ok=True)
        shutil.copy(os.path.join(converted, "intrinsics.txt"), folder)
        folders[split] = folder
    for name, img, pose in zip(names, rgb, poses):
        split = name.split("_")[0]
        shutil.copy(img, os.path.join(folders[split], "rgb", os.path.basename(img)))
        shutil.copy(pose, os.path.join(folders[split], "pose", os.path.basename(pose)))
    return folders


def train_and_test(train_root: str, test_root: str, logs: str, extra: Sequence[str]) -> dict:
    import checkpoints
    import run_deepvoxels
    common = ["--logging_root", logs, "--val_every", "0", "--val_root", test_root, *extra]
    assert run_deepvoxels.main(["--train_test", "train", "--data_root", train_root, *common]) == 0
    ckpt = checkpoints.newest_checkpoint(logs)
    assert run_deepvoxels.main(["--train_test", "test", "--data_root", test_root, "--checkpoint", ckpt,
                                *common]) == 0
    (metrics,) = glob.glob(os.path.join(logs, "test_traj", "*", "*", "metrics.json"))
    summary = json.load(open(metrics))
    return {"psnr": summary["psnr"], "ssim": summary["ssim"]}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="work folder")
    parser.add_argument("--object", default="cube")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--num_train", type=int, default=50)
    parser.add_argument("--num_test", type=int, default=20)
    parser.add_argument("--variants", nargs="+", choices=("original", "auto", "unaligned", "matched"),
                        default=["original", "auto"],
                        help="datasets to train: the original, and converted with automatic axes and placement, "
                             "with COLMAP's axes, and/or with COLMAP's axes and the original's placement")
    args, train_flags = parser.parse_known_args(argv)

    from tools import colmap_import, synthetic
    root = os.path.join(args.out, "original")
    synthetic.make_synthetic_dataset(root, args.object, resolution=args.resolution, num_train=args.num_train,
                                     num_val=1, num_test=args.num_test, seed=0)
    splits = [os.path.join(root, s, args.object) for s in ("train", "test")]
    q, _ = np.linalg.qr(np.random.RandomState(1).normal(size=(3, 3)))
    rotation = q * np.sign(np.linalg.det(q))
    shift = np.array([1.5, -0.7, 2.0])
    model, photos = os.path.join(args.out, "sparse"), os.path.join(args.out, "photos")
    write_colmap_model(splits, args.object, model, photos, rotation, shift)

    results = {}
    if "original" in args.variants:
        results["original"] = train_and_test(splits[0], splits[1], os.path.join(args.out, "logs_original"),
                                             train_flags)
    placement = {"auto": [], "unaligned": ["--align", "none"],
                 "matched": ["--align", "none", "--origin", *map(str, shift), "--scale", str(WORLD_SCALE),
                             "--near_plane", str(math.sqrt(3) / 2)]}
    for variant in (v for v in args.variants if v != "original"):
        label, flags = f"converted_{variant}", placement[variant]
        converted = os.path.join(args.out, label, "all")
        assert colmap_import.main(["--colmap_dir", model, "--images", photos, "--out", converted, *flags]) == 0
        folders = split_converted(converted, os.path.join(args.out, label), args.object)
        results[label] = train_and_test(folders["train"], folders["test"], os.path.join(args.out, f"logs_{label}"),
                                        train_flags)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
