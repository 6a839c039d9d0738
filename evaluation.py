"""Rendering a trained model's poses, and what test mode and validation make of the renders."""
from __future__ import annotations

import concurrent.futures
import logging
import os
import time
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

import data_util
import performance
import util
from data_util import UINT16_MAX
from deep_voxels import DeepVoxels
from metrics import BORDER, LpipsScorer, crop_border, psnr, ssim, ssim_whole_and_cropped, write_metrics
from projection import EmptyFrustumError, IndexCache

log = logging.getLogger("deepvoxels")


def crop(img: torch.Tensor) -> torch.Tensor:
    """(..., H, W) without its ``BORDER``-pixel frame, which the original left out of the loss and the scores."""
    return img[..., BORDER:-BORDER, BORDER:-BORDER]


def to_uint16(img: torch.Tensor) -> np.ndarray:
    """(3, H, W) render in [-1/2, 1/2] -> (H, W, 3) uint16, as the original's test() wrote it."""
    arr = img.detach().float().cpu().numpy().transpose(1, 2, 0) + 0.5
    return (arr * UINT16_MAX).round().clip(0, UINT16_MAX).astype(np.uint16)


def cropped_ground_truth(item: dict) -> np.ndarray:
    """A dataset item's image as (H, W, 3) in [0, 1] without the border, as renders are scored."""
    return crop(item["gt_rgb"]).numpy().transpose(1, 2, 0) + 0.5


def score(png: np.ndarray, item: dict) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(prediction, ground truth, PSNR, SSIM) of a written 16-bit render against its item's image."""
    pred = png.astype(np.float64) / UINT16_MAX
    gt = cropped_ground_truth(item)
    return pred, gt, psnr(pred, gt), ssim(pred, gt)


def render_poses(model: DeepVoxels, indices: IndexCache, poses: Sequence[torch.Tensor], view_batch: int,
                 autocast, timings: Optional[list[float]] = None, inpainted: Optional[torch.Tensor] = None
                 ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield (index, image (3, S, S), raw depth (1, 64, 64)) for each pose, ``view_batch`` views per forward.

    The grid is inpainted once: it does not depend on the view. ``inpainted`` passes one already inpainted
    (``inpaint_grid``), as the viewer does between frames. Raises EmptyFrustumError naming the view.
    ``autocast`` is a context factory (the run's precision); ``timings`` collects seconds per view.
    """
    if inpainted is None:
        inpainted = inpaint_grid(model, autocast)
    with torch.no_grad(), autocast():
        for start in range(0, len(poses), view_batch):
            t0 = time.perf_counter()
            chunk = list(range(start, min(start + view_batch, len(poses))))
            proj = []
            for i in chunk:
                try:
                    proj.append(indices.project(poses[i]))
                except EmptyFrustumError as err:
                    raise EmptyFrustumError(f"view {i}: {err}") from None
            with util.cudnn_heuristics():
                images, depths = model.render(inpainted, [p[0] for p in proj], [p[1] for p in proj])
            if images.device.type == "cuda":
                torch.cuda.synchronize(images.device)
            if timings is not None:
                timings.append((time.perf_counter() - t0) / len(chunk))
            for j, i in enumerate(chunk):
                yield i, images[j], depths[j]


def each_chunk_in_threads(views: Iterable[tuple], chunk: int, work: Callable[..., Any], threads: int) -> list:
    """``[work(*view) for view in views]``, with the views of each chunk of ``chunk`` worked on in up to
    ``threads`` threads at once. The next chunk is drawn only when they are done: drawing it renders it, which
    on a CPU needs the cores the threads would take. PNG compression and scikit-image's SSIM release the GIL."""
    results: list = []
    with concurrent.futures.ThreadPoolExecutor(max(1, min(chunk, threads))) as pool:
        pending: list = []
        for view in views:
            pending.append(pool.submit(work, *view))
            if len(pending) == chunk:
                results += [future.result() for future in pending]
                pending = []
        results += [future.result() for future in pending]
    return results


def inpaint_grid(model: DeepVoxels, autocast) -> torch.Tensor:
    """The model's grid after the inpainting net, (1, C, G, G, G): what every view of it is rendered from."""
    with torch.no_grad(), autocast(), util.cudnn_heuristics():
        return model.inpaint(model.deepvoxels)


class Validator:
    """Renders the validation views during training and logs PSNR/SSIM; the caller keeps best.pth."""

    def __init__(self, dataset, indices: IndexCache, view_batch: int, num_views: int):
        self.dataset, self.indices, self.view_batch = dataset, indices, view_batch
        self.num_views = len(dataset) if not num_views else min(num_views, len(dataset))

    @classmethod
    def create(cls, opt: Any, geometry, device: torch.device) -> Optional["Validator"]:
        """From ``--val_root``, or the sibling ``validation/<object>`` of a ``train/<object>`` data root."""
        import dataio
        root = opt.val_root
        if not root:
            parent, obj = os.path.split(os.path.normpath(opt.data_root))
            sibling = os.path.join(os.path.dirname(parent), "validation", obj)
            root = sibling if os.path.basename(parent) == "train" and os.path.isdir(sibling) else ""
        if not root:
            log.info("no validation set (set --val_root, or use the train/validation/test tree); validation off")
            return None
        dataset = dataio.TestDataset(root, opt.img_sidelength)
        if not dataset.has_gt:
            log.info("validation folder %s has no rgb/ images; validation off", root)
            return None
        log.info("validation: %s", root)
        view_batch = performance.views_per_forward(opt.view_batch, device, opt.img_sidelength)
        return cls(dataset, IndexCache(geometry, device), view_batch, opt.val_views)

    def run(self, model: DeepVoxels, autocast, writer, step: int) -> Optional[float]:
        """Mean PSNR over the validation views (None when a view sees nothing); scalars and a strip to
        TensorBoard."""
        from torchvision.utils import make_grid
        items = [self.dataset[i] for i in range(self.num_views)]
        was_training = model.training
        model.eval()
        scores, pairs = [], []
        try:
            for i, img, _ in render_poses(model, self.indices, [it["pose"] for it in items], self.view_batch,
                                          autocast):
                pred, gt, p, s = score(to_uint16(crop(img)), items[i])
                scores.append((p, s))
                if len(pairs) < 4:
                    pairs += [torch.from_numpy(pred.transpose(2, 0, 1)).float(),
                              torch.from_numpy(gt.transpose(2, 0, 1)).float()]
        except EmptyFrustumError as err:
            log.warning("validation skipped: %s", err)
            return None
        finally:
            model.train(was_training)
        mean_psnr, mean_ssim = (float(np.mean([s[k] for s in scores])) for k in (0, 1))
        writer.add_scalar("val_psnr", mean_psnr, step)
        writer.add_scalar("val_ssim", mean_ssim, step)
        writer.add_image("val_render_vs_gt", make_grid(pairs, nrow=2).numpy(), step)
        log.info("validation at step %d: PSNR %.2f dB, SSIM %.4f over %d views", step, mean_psnr, mean_ssim,
                 len(items))
        return mean_psnr


class ViewScorer:
    """Test mode's per-view scores of a written 16-bit render: PSNR, SSIM, and LPIPS where available, on the
    image without its border as DeepVoxels scored, and PSNR and SSIM of the whole image (``psnr_uncropped``,
    ``ssim_uncropped``), as NeRF-synthetic results are reported."""

    def __init__(self) -> None:
        self.lpips = LpipsScorer()

    def __call__(self, index: int, whole_png: np.ndarray, item: dict) -> dict[str, Any]:
        """The scores of ``whole_png``, the (H, W, 3) uint16 render with its border."""
        whole = whole_png.astype(np.float64) / UINT16_MAX
        whole_gt = item["gt_rgb"].numpy().transpose(1, 2, 0) + 0.5
        pred, gt = crop_border(whole), crop_border(whole_gt)
        whole_ssim, cropped_ssim = ssim_whole_and_cropped(whole, whole_gt, BORDER)  # both from one SSIM map
        row = {"view": index, "pose_file": os.path.basename(item["pose_path"]), "psnr": psnr(pred, gt),
               "ssim": cropped_ssim}
        if self.lpips.available:
            row["lpips"] = self.lpips(pred, gt)
        row["psnr_uncropped"], row["ssim_uncropped"] = psnr(whole, whole_gt), whole_ssim
        return row


def write_test_outputs(folder: str, items: list[dict], frames: list[np.ndarray], depths: list[np.ndarray],
                       rows: list[dict], summary: dict[str, Any]) -> str:
    """Beside the renders: depth PNGs, metrics.json (with the mean scores added to ``summary``), metrics.csv
    and a comparison strip where there are scores, and a video. Returns the video's path."""
    os.makedirs(os.path.join(folder, "depth"), exist_ok=True)
    write_depth_pngs(os.path.join(folder, "depth"), depths)
    for key in ("psnr", "ssim", "lpips", "psnr_uncropped", "ssim_uncropped"):
        if rows and key in rows[0]:
            summary[key] = float(np.mean([r[key] for r in rows]))
    write_metrics(folder, rows, summary)
    if rows:
        write_comparison_strip(os.path.join(folder, "comparison.png"), items, frames)
    return write_video(os.path.join(folder, "video"), frames)


def scores_line(summary: dict[str, Any], num_views: int) -> str:
    line = f"PSNR {summary['psnr']:.2f} dB  SSIM {summary['ssim']:.4f}"
    if "lpips" in summary:
        line += f"  LPIPS {summary['lpips']:.4f}"
    line += f"  over {num_views} views (metrics.csv, metrics.json)"
    if "psnr_uncropped" in summary:
        line += (f"\nuncropped (as NeRF-synthetic papers score): PSNR {summary['psnr_uncropped']:.2f} dB  "
                 f"SSIM {summary['ssim_uncropped']:.4f}")
    return line


def write_depth_pngs(folder: str, depths: list[np.ndarray]) -> None:
    """Raw depth maps as 16-bit PNGs, normalised jointly over all views (min -> 0, max -> 65535), as the
    original's test() wrote them."""
    stack = np.stack(depths)
    span = stack.max() - stack.min()
    normalised = (stack - stack.min()) / (span if span > 0 else 1.0)
    for i, depth in enumerate(normalised):
        data_util.write_png(os.path.join(folder, f"img_{i:05d}.png"), (depth[..., 0] * UINT16_MAX).round().astype(np.uint16))


def write_comparison_strip(path: str, items: list[dict], frames: list[np.ndarray], count: int = 4) -> None:
    """Ground truth (top row) above renders (bottom row) for ``count`` evenly spaced views, 8-bit PNG."""
    picks = np.linspace(0, len(frames) - 1, min(count, len(frames))).round().astype(int)
    top = [(cropped_ground_truth(items[i]) * 255).round().clip(0, 255).astype(np.uint8) for i in picks]
    bottom = [(frames[i] / 257.0).round().astype(np.uint8) for i in picks]
    data_util.write_png(path, np.concatenate([np.concatenate(top, 1), np.concatenate(bottom, 1)], 0))


# H.264 encoder tried first: the one imageio-ffmpeg prefers, named so that it skips its search (it lists
# ffmpeg's encoders and test-encodes a clip with each until one works, two extra ffmpeg runs per video).
VIDEO_CODEC = "libx264"


def write_video(stem: str, frames: list[np.ndarray], fps: int = 24) -> str:
    """MP4 through imageio-ffmpeg, or a GIF when ffmpeg is unavailable. Returns the path written."""
    import imageio.v2 as imageio
    eight_bit = [(f / 257.0).round().astype(np.uint8) for f in frames]
    reason = ""
    for codec in (VIDEO_CODEC, None):  # None: imageio-ffmpeg's search for another H.264 encoder
        try:
            imageio.mimwrite(stem + ".mp4", eight_bit, fps=fps, macro_block_size=1, codec=codec)
        except Exception as err:  # no ffmpeg binary or codec
            reason = str(err).splitlines()[0] if str(err) else repr(err)
            continue
        if os.path.isfile(stem + ".mp4") and os.path.getsize(stem + ".mp4") > 0:
            return stem + ".mp4"
        reason = f"ffmpeg wrote nothing with encoder {codec or 'found by search'}"  # imageio does not raise then
    log.info("MP4 unavailable (%s); writing a GIF", reason)
    if os.path.exists(stem + ".mp4"):
        os.remove(stem + ".mp4")  # what a failed encoder left
    imageio.mimwrite(stem + ".gif", eight_bit, duration=1000.0 / fps)  # imageio takes GIF frame durations in ms
    return stem + ".gif"
