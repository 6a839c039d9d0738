"""Image quality metrics used by test mode, validation and the nearest-neighbour baseline.

All scores take images as float arrays (H, W, 3) in [0, 1], cropped by ``crop_border`` first, so that
every number this project reports (test mode, validation, baseline) is computed the same way.
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np

log = logging.getLogger(__name__)

# Pixels left out on every side before scoring: the original cropped 5 px from its test renders
# ("boundary errors"). Equal to run_deepvoxels.BORDER, which also crops the training loss.
EVAL_BORDER = 5


def crop_border(img: np.ndarray, border: int = EVAL_BORDER) -> np.ndarray:
    """(H, W, ...) -> (H - 2 border, W - 2 border, ...)."""
    return img[border:-border, border:-border] if border > 0 else img


def psnr(pred: np.ndarray, target: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB for data range 1; inf for identical images."""
    from skimage.metrics import peak_signal_noise_ratio
    with np.errstate(divide="ignore"):  # identical images: log10(1 / 0) = inf, which is the right answer
        return float(peak_signal_noise_ratio(target.astype(np.float64), pred.astype(np.float64), data_range=1.0))


def ssim(pred: np.ndarray, target: np.ndarray) -> float:
    """Structural similarity (scikit-image defaults: 7x7 window, channels averaged), data range 1."""
    from skimage.metrics import structural_similarity
    return float(structural_similarity(target.astype(np.float64), pred.astype(np.float64), data_range=1.0,
                                       channel_axis=-1))


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
