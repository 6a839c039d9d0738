"""Image quality metrics used by test mode, validation and the nearest-neighbour baseline, and the
files they are reported in.

All scores take images as float arrays (H, W, 3) in [0, 1], cropped by ``crop_border`` first, so that
every number this project reports (test mode, validation, baseline) is computed the same way, and
every report is written by ``write_metrics`` in the same layout.
"""
from __future__ import annotations

import csv
import json
import logging
import os
from typing import Optional, Union

import numpy as np

log = logging.getLogger(__name__)

# Pixels left out on every side: the original cropped 5 px from its test renders and from the
# training loss ("boundary errors"). The one value for scoring, test renders and the loss.
BORDER = 5
SSIM_WINDOW = 7  # side of the uniform window of scikit-image's SSIM (its default)


def crop_border(img: np.ndarray, border: int = BORDER) -> np.ndarray:
    """(H, W, ...) -> (H - 2 border, W - 2 border, ...)."""
    return img[border:-border, border:-border] if border > 0 else img


def psnr(pred: np.ndarray, target: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB for data range 1 (scikit-image's peak_signal_noise_ratio, in float64);
    inf for identical images. Written out: importing scikit-image's also imports scipy.stats, which nothing
    else here needs."""
    mse = np.mean(np.square(target.astype(np.float64) - pred.astype(np.float64)))
    with np.errstate(divide="ignore"):  # identical images: log10(1 / 0) = inf, which is the right answer
        return float(10.0 * np.log10(1.0 / mse))


def ssim(pred: np.ndarray, target: np.ndarray) -> float:
    """Structural similarity (scikit-image defaults: 7x7 window, channels averaged), data range 1."""
    from skimage.metrics import structural_similarity
    return float(structural_similarity(target.astype(np.float64), pred.astype(np.float64), data_range=1.0,
                                       channel_axis=-1, win_size=SSIM_WINDOW))


def ssim_whole_and_cropped(pred: np.ndarray, target: np.ndarray, border: int = BORDER) -> tuple[float, float]:
    """``ssim`` of the whole images and of the images without their ``border``, from one scikit-image SSIM
    map: a pixel's value depends only on the window around it, and scikit-image averages the map without a
    half window at every edge, so the cropped images' score is the mean of the map without ``border`` plus
    that half window."""
    from skimage.metrics import structural_similarity
    whole, per_pixel = structural_similarity(target.astype(np.float64), pred.astype(np.float64), data_range=1.0,
                                             channel_axis=-1, win_size=SSIM_WINDOW, full=True)
    inside = crop_border(per_pixel, border + SSIM_WINDOW // 2)
    return float(whole), float(np.mean([inside[..., c].mean() for c in range(inside.shape[-1])]))


class LpipsScorer:
    """LPIPS (AlexNet) when the ``lpips`` package and its weights are available offline; otherwise disabled
    with a single notice."""

    def __init__(self) -> None:
        self.model = None
        try:
            import lpips  # noqa: F401  (optional dependency)
            import torch
            self._torch = torch
            self.model = lpips.LPIPS(net="alex", verbose=False).eval()
        except Exception as err:  # missing package, or weights that would need a download
            log.info("LPIPS not computed (%s: %s); install `lpips` with its weights to enable it",
                     type(err).__name__, str(err).splitlines()[0] if str(err) else "")

    @property
    def available(self) -> bool:
        return self.model is not None

    def __call__(self, pred: np.ndarray, target: np.ndarray) -> Optional[float]:
        if self.model is None:
            return None
        torch = self._torch

        def to_tensor(img: np.ndarray):
            # LPIPS expects (1, 3, H, W) in [-1, 1].
            return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None].float() * 2 - 1

        with torch.no_grad():
            return float(self.model(to_tensor(pred), to_tensor(target)).item())


def write_metrics(out_dir: Union[str, os.PathLike], rows: list[dict], summary: dict
                  ) -> tuple[Optional[str], str]:
    """Write per-view rows as out_dir/metrics.csv and summary as out_dir/metrics.json.

    The CSV columns are the keys of the first row; with no rows (nothing to score) no CSV is written
    and its path is returned as None. Creates out_dir. Returns (csv_path, json_path).
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    csv_path = None
    if rows:
        csv_path = os.path.join(out_dir, "metrics.csv")
        with open(csv_path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0].keys()))
            writer.writeheader()
            writer.writerows(rows)
    json_path = os.path.join(out_dir, "metrics.json")
    with open(json_path, "w") as handle:
        json.dump(summary, handle, indent=1)
    return csv_path, json_path
