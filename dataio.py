"""Datasets for DeepVoxels training and testing.

A scene folder holds ``rgb/`` (images), ``pose/`` (one cam2world *.txt per image, OpenCV camera
axes: +x right, +y down, +z forward) and ``intrinsics.txt``. Files are paired by sorted name.
Images become float32 (3, S, S) tensors in [-0.5, 0.5]; poses float32 (4, 4) cam2world tensors.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

import data_util
from data_util import DataError

logger = logging.getLogger(__name__)

# The nearest view is drawn among the NEAREST_VIEW_CHOICES most similar views:
# nn_idcs[idx][-randint(1, NEAREST_VIEW_CHOICES + 1)] (the most similar views sit at the end).
NEAREST_VIEW_CHOICES = 4
MIN_TRAINING_VIEWS = 2
_SKIP_PATTERN = re.compile(r"^skip_(\d+)$")


def _apply_sampling_pattern(paths: list[str], sampling_pattern: str) -> list[str]:
    """'all' keeps everything; 'skip_N' keeps every (N+1)-th file, starting with the first."""
    if sampling_pattern == "all":
        return paths
    match = _SKIP_PATTERN.match(sampling_pattern)
    if match is None:
        raise DataError(f"--sampling_pattern {sampling_pattern!r}: expected 'all' or 'skip_N' with integer N >= 0")
    return paths[::int(match.group(1)) + 1]


def poses_are_world2cam(root_dir: str) -> bool:
    """Line 6 of intrinsics.txt, when present and 1, says pose/ holds world-to-camera matrices."""
    path = os.path.join(root_dir, "intrinsics.txt")
    return os.path.isfile(path) and bool(data_util.parse_intrinsics(path, 1)[4])


def load_cam2world(path: str, world2cam: bool) -> np.ndarray:
    """A pose file as a float32 (4, 4) camera-to-world matrix, inverting world-to-camera files.

    The original parsed the line-6 flag but never applied it; honouring it changes nothing for files without it.
    """
    pose = data_util.load_pose(path)
    return np.linalg.inv(pose.astype(np.float64)).astype(np.float32) if world2cam else pose


def _require_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise DataError(f"{what} {path}: folder not found")


class NovelViewTriplets(Dataset):
    """Training triplets: target views plus one nearby source view for lifting.

    Item idx is (trgt_views, nearest_view): trgt_views[0] is view idx, trgt_views[1:] are random
    views; nearest_view is one of the 4 views whose viewing directions are most similar to view
    idx. Each view is {'gt_rgb': (3, S, S) float32 in [-0.5, 0.5], 'pose': (4, 4) float32
    cam2world}. Draws use numpy's global RNG in the original's order (nearest first, then the
    random targets), so seeding numpy reproduces the original's triplets.
    """

    def __init__(self, root_dir: str, img_size: int, sampling_pattern: str = "all", num_trgt: int = 2):
        super().__init__()
        if num_trgt < 1:
            raise ValueError(f"num_trgt: expected at least 1, got {num_trgt}")
        self.root_dir = os.fspath(root_dir)
        self.img_size = int(img_size)
        self.num_trgt = int(num_trgt)
        _require_dir(self.root_dir, "dataset root")
        color_dir = os.path.join(self.root_dir, "rgb")
        pose_dir = os.path.join(self.root_dir, "pose")
        _require_dir(color_dir, "image folder")
        _require_dir(pose_dir, "pose folder")
        intrinsics = os.path.join(self.root_dir, "intrinsics.txt")
        if not os.path.isfile(intrinsics):
            raise DataError(f"intrinsics file {intrinsics}: file not found")

        self.image_paths = _apply_sampling_pattern(data_util.glob_imgs(color_dir), sampling_pattern)
        self.pose_paths = _apply_sampling_pattern(data_util.list_poses(pose_dir), sampling_pattern)
        if len(self.image_paths) != len(self.pose_paths):
            raise DataError(f"dataset {self.root_dir}: expected as many images as poses, found "
                            f"{len(self.image_paths)} images in rgb/ and {len(self.pose_paths)} poses in pose/")
        if len(self.image_paths) < MIN_TRAINING_VIEWS:
            raise DataError(f"dataset {self.root_dir}: expected at least {MIN_TRAINING_VIEWS} views, "
                            f"found {len(self.image_paths)}")

        world2cam = poses_are_world2cam(self.root_dir)
        self.all_views = [
            {"gt_rgb": torch.from_numpy(data_util.load_rgb(img_path, self.img_size)),
             "pose": torch.from_numpy(load_cam2world(pose_path, world2cam))}
            for img_path, pose_path in tqdm(list(zip(self.image_paths, self.pose_paths)),
                                            desc="loading views", leave=False, disable=None)
        ]
        self.nn_idcs, _ = data_util.get_nn_ranking([v["pose"].numpy() for v in self.all_views])
        logger.info("%s: %d views at %d px, sampling pattern %s", self.root_dir, len(self),
                    self.img_size, sampling_pattern)

    def __len__(self) -> int:
        return len(self.all_views)

    def __getitem__(self, idx: int) -> tuple[list[dict], dict]:
        trgt_views = [self.all_views[idx]]
        nearest_view = self.all_views[self.nn_idcs[idx][-np.random.randint(low=1, high=NEAREST_VIEW_CHOICES + 1)]]
        for _ in range(self.num_trgt - 1):
            trgt_views.append(self.all_views[np.random.choice(len(self))])
        return trgt_views, nearest_view


def in_order(dataset: Dataset, order: list[int], num_workers: int) -> Iterator:
    """The dataset's items in ``order``, in this process or through ``num_workers`` DataLoader workers."""
    if num_workers == 0:
        for idx in order:
            yield dataset[idx]
        return
    yield from torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, order), batch_size=None, shuffle=False,
                                           num_workers=num_workers, worker_init_fn=_seed_worker)


def _seed_worker(worker_id: int) -> None:
    # Forked workers would otherwise share one numpy state and draw identical "random" views.
    np.random.seed(torch.initial_seed() % 2 ** 32)


class TestDataset(Dataset):
    """Poses to render at test time, with ground-truth images where the folder has them.

    Item i is {'pose': (4, 4) float32 cam2world, 'index': i, 'pose_path': str} plus
    'gt_rgb': (3, S, S) float32 in [-0.5, 0.5] when rgb/ holds one image per pose.
    """

    def __init__(self, root_dir: str, img_size: int):
        super().__init__()
        self.root_dir = os.fspath(root_dir)
        self.img_size = int(img_size)
        pose_dir = os.path.join(self.root_dir, "pose")
        _require_dir(pose_dir, "pose folder")
        self.pose_paths = data_util.list_poses(pose_dir)
        if not self.pose_paths:
            raise DataError(f"pose folder {pose_dir}: expected *.txt pose files, found none")
        world2cam = poses_are_world2cam(self.root_dir)
        self.poses = [torch.from_numpy(load_cam2world(p, world2cam)) for p in self.pose_paths]

        color_dir = os.path.join(self.root_dir, "rgb")
        self.image_paths = data_util.glob_imgs(color_dir)
        if self.image_paths and len(self.image_paths) != len(self.pose_paths):
            raise DataError(f"dataset {self.root_dir}: expected as many images as poses, found "
                            f"{len(self.image_paths)} images in rgb/ and {len(self.pose_paths)} poses in pose/")
        self.has_gt = bool(self.image_paths)
        self.images = [torch.from_numpy(data_util.load_rgb(p, self.img_size))
                       for p in tqdm(self.image_paths, desc="loading test images", leave=False, disable=None)]
        logger.info("%s: %d test poses%s", self.root_dir, len(self),
                    " with ground truth" if self.has_gt else "")

    def __len__(self) -> int:
        return len(self.poses)

    def __getitem__(self, idx: int) -> dict:
        item = {"pose": self.poses[idx], "index": idx, "pose_path": self.pose_paths[idx]}
        if self.has_gt:
            item["gt_rgb"] = self.images[idx]
        return item
