"""The nearest-neighbour baseline: each test view "rendered" as the training image whose camera looks
the most the same way, scored exactly as run_deepvoxels' test mode scores a trained model.

Run it with ``python -m tools.dataset nn_baseline --train_root TRAIN --test_root TEST``.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

import data_util
import metrics
from data_util import PathLike


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
    def views(root: PathLike, what: str) -> tuple[list[str], list[str]]:
        root = os.fspath(root)
        images = data_util.glob_imgs(os.path.join(root, "rgb"))
        poses = data_util.list_poses(os.path.join(root, "pose"))
        if not images or not poses:
            raise data_util.DataError(f"{what} folder {root}: expected images in rgb/ and poses in pose/, "
                                      f"found {len(images)} images and {len(poses)} poses")
        if len(images) != len(poses):
            raise data_util.DataError(f"{what} folder {root}: expected as many images as poses, "
                                      f"found {len(images)} images and {len(poses)} poses")
        return images, poses

    train_images, train_pose_paths = views(train_root, "training")
    test_images, test_pose_paths = views(test_root, "test")
    nearest = nearest_training_views([data_util.load_pose(p) for p in train_pose_paths],
                                     [data_util.load_pose(p) for p in test_pose_paths])

    def unit_rgb(path: str) -> np.ndarray:
        # (3, S, S) in [-0.5, 0.5] -> cropped (S', S', 3) in [0, 1], exactly as test mode treats ground truth.
        return metrics.crop_border(data_util.load_rgb(path, sidelength).transpose(1, 2, 0)) + 0.5

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


def run_nn_baseline(train_root: PathLike, test_root: PathLike, sidelength: int, out_dir: PathLike) -> dict:
    """nn_baseline plus its files (metrics.csv, metrics.json in out_dir); returns the metrics.json content."""
    rows, means = nn_baseline(train_root, test_root, sidelength)
    summary = {"method": "nearest training view by viewing direction (cosine of cam2world[:3, 2])",
               **means, "train_root": os.path.abspath(train_root), "test_root": os.path.abspath(test_root),
               "img_sidelength": int(sidelength), "out_dir": os.path.abspath(out_dir)}
    metrics.write_metrics(out_dir, rows, summary)
    return summary
