"""What a training run reports while it runs: TensorBoard summaries and progress."""
from __future__ import annotations

import logging
import sys
import time
from typing import Any, Optional

import numpy as np
import torch

log = logging.getLogger("deepvoxels")


def write_summaries(writer, step: int, summary_every: int, losses: dict[str, float], outputs: list[torch.Tensor],
                    targets: list[torch.Tensor], depths: list[torch.Tensor], nearest: torch.Tensor,
                    gates: Optional[tuple[torch.Tensor, torch.Tensor]], lr: float) -> None:
    """The original's TensorBoard summaries: scalars every step; images and gate volumes every
    ``summary_every`` steps. ``depths`` are metric depths (world units along the ray)."""
    for name, value in losses.items():
        writer.add_scalar(name, value, step)
    writer.add_scalar("out_min", outputs[0].min().item(), step)
    writer.add_scalar("out_max", outputs[0].max().item(), step)
    writer.add_scalar("trgt_min", targets[0].min().item(), step)
    writer.add_scalar("trgt_max", targets[0].max().item(), step)
    writer.add_scalar("learning_rate", lr, step)
    if step % summary_every:
        return
    from torchvision.utils import make_grid

    def grid(images: torch.Tensor) -> np.ndarray:
        return make_grid(images.detach().float().cpu(), scale_each=True, normalize=True).numpy()

    writer.add_image("Depth", grid(torch.cat([d.repeat(1, 3, 1, 1) for d in depths])), step)
    writer.add_image("Nearest_neighbors_rgb", grid(nearest), step)
    writer.add_image("Output_vs_gt", grid(torch.cat([*outputs, *targets])), step)
    if gates is not None:
        for name, gate in zip(("update_gate", "reset_gate"), gates):
            writer.add_figure(name, gate_figure(gate, name), step, close=True)


def gate_figure(gate: torch.Tensor, title: str):
    """3D scatter of a gate volume (mean over channels): marker size grows with the gate value."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    values = gate.float().mean(dim=1).squeeze(0).cpu().numpy()  # (z, y, x)
    z, y, x = np.nonzero(values > -1)
    keep = slice(None, None, 3)
    fig = plt.figure(figsize=(4, 4))
    ax = fig.add_subplot(111, projection="3d")
    ax.scatter(x[keep], y[keep], z[keep], s=values[z[keep], y[keep], x[keep]] * 5)
    ax.set_title(title)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_zlabel("z")
    return fig


class Progress:
    """A progress bar on a terminal; elsewhere (SLURM, nohup, CI) a log line at the first step and then every
    ``every_s`` seconds: step, losses, seconds per step and time left."""

    def __init__(self, total: int, initial: int, every_s: float, enabled: bool = True):
        self.total, self.start_step, self.every_s = total, initial, every_s
        self.bar = None
        self.lines = enabled and not sys.stderr.isatty()
        if enabled and not self.lines:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=min(initial, total), desc="train", dynamic_ncols=True)
        self.t0 = time.perf_counter()
        self.last_line = -float("inf")

    def update(self, step: int, epoch: int, losses: dict[str, Any]) -> None:
        """Call after step ``step`` (counted from 1) has finished."""
        if self.bar is not None:
            self.bar.set_postfix(epoch=epoch, loss_g=f"{losses['gen_loss_total']:.3f}",
                                 loss_d=f"{losses['discrim_loss']:.3f}", refresh=False)
            self.bar.update(1)
            return
        now = time.perf_counter()
        if not self.lines or (now - self.last_line < self.every_s and step < self.total):
            return
        self.last_line = now
        per_step = (now - self.t0) / max(step - self.start_step, 1)
        left = max(self.total - step, 0) * per_step
        log.info("step %d/%d  epoch %d  loss_g %.4f  loss_d %.4f  %.2f s/step  %s left", step, self.total, epoch,
                 losses["gen_loss_total"], losses["discrim_loss"], per_step, _duration(left))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(round(seconds)), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}:{m:02d}:{s:02d}"
