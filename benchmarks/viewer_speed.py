"""The viewer's frame rate, and what the live viewer costs a training run.

    python benchmarks/viewer_speed.py fps --checkpoint CKPT --data_root DATA/train/cube
    python benchmarks/viewer_speed.py training --data_root DATA/train/cube --steps 60

``fps``: a browser stand-in (tools/viser_probe.py) moves the camera around the training orbit and waits for
each frame; frames per second from the move to the frame received, and the render alone.
``training``: seconds per step of configs/demo.yaml without the live viewer, with it and an idle page, and
with a page whose camera keeps moving (the run's own progress line: the loop's wall time over its steps).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import re
import socket
import sys
import tempfile
import threading
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data_util  # noqa: E402
import run_deepvoxels  # noqa: E402
import viewer  # noqa: E402
from tools.viser_probe import ViserProbe  # noqa: E402

ORBIT_ELEVATION = 0.3  # world units above the grid centre, on the training cameras' distance


def orbit(renderer: viewer.Renderer, n: int) -> list[np.ndarray]:
    radius = float(np.mean(renderer.distance_range))
    flat = np.sqrt(radius ** 2 - ORBIT_ELEVATION ** 2)
    return [data_util.look_at(renderer.centre + (flat * np.cos(a), flat * np.sin(a), ORBIT_ELEVATION),
                              renderer.centre) for a in np.linspace(0, 2 * np.pi, n, endpoint=False)]


def fps(args) -> None:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    v = viewer.serve(["--checkpoint", args.checkpoint, "--data_root", args.data_root, "--port", "0",
                      "--device", args.device])
    probe = ViserProbe(v.port, args.width, args.height)
    try:
        page = next(iter(v.pages.values())) if v.pages else None
        while page is None:
            time.sleep(0.05)
            page = next(iter(v.pages.values()), None)
        poses = orbit(v.renderer, args.frames)
        for pose in poses[:3]:  # warm-up
            v.renderer.frame(pose, viewer.SHOW[0])
        t0 = time.perf_counter()
        for pose in poses:
            v.renderer.frame(pose, viewer.SHOW[0])
        render_s = (time.perf_counter() - t0) / len(poses)
        t0 = time.perf_counter()
        for pose in poses:
            count = len(probe.images)
            probe.move(pose[:3, 3], v.renderer.centre, v.renderer.up)
            probe.wait_image(count + 1)
        served_s = (time.perf_counter() - t0) / len(poses)
        print(f"render only: {render_s * 1000:.1f} ms/frame ({1 / render_s:.1f} fps); moved camera -> frame on the "
              f"page: {served_s * 1000:.1f} ms ({1 / served_s:.1f} fps); {args.width}x{args.height} page, "
              f"{len(poses)} frames, {torch.get_num_threads()} threads, device {args.device}")
    finally:
        probe.close()
        v.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _seconds_per_step(argv: list[str]) -> float:
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger().addHandler(handler)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            assert run_deepvoxels.main(argv) == 0
    finally:
        logging.getLogger().removeHandler(handler)
    return float(re.findall(r"([\d.]+) s/step", "\n".join(lines))[-1])


def training(args) -> None:
    logging.getLogger().setLevel(logging.INFO)
    base = ["--config", "configs/demo.yaml", "--train_test", "train", "--data_root", args.data_root,
            "--max_steps", str(args.steps), "--val_every", "0", "--checkpoint_every", "100000",
            "--summary_every", "100000", "--progress_every", "1e9", "--val_root", "",
            "--threads", str(args.threads)]
    results = {}
    for case in args.cases.split(","):
        with tempfile.TemporaryDirectory() as logs:
            argv = base + ["--logging_root", logs]
            stop = threading.Event()
            watcher = None
            if case != "off":
                port = _free_port()
                argv += ["--live_viewer", "--viewer_port", str(port), "--viewer_every", str(args.every)]
                watcher = threading.Thread(target=_page, args=(port, case == "moving", stop), daemon=True)
                watcher.start()
            results[case] = _seconds_per_step(argv)
            stop.set()
            if watcher is not None:
                watcher.join(30)
        print(f"{case}: {results[case]:.3f} s/step", flush=True)
    for case in results:
        if case != "off" and "off" in results:
            print(f"{case}: {100 * (results[case] / results['off'] - 1):+.1f}% against no viewer")


def _page(port: int, moving: bool, stop: threading.Event) -> None:
    """A page on the live viewer: connected and idle, or moving its camera ten times a second."""
    probe = None
    while probe is None and not stop.is_set():
        try:
            probe = ViserProbe(port, 1280, 720)
        except (OSError, TimeoutError):
            time.sleep(0.2)
    angle = 0.0
    while not stop.is_set():
        if moving:
            angle += 0.1
            probe.move((1.6 * np.cos(angle), 1.6 * np.sin(angle), 0.3), (0.0, 0.0, 0.0), (0.0, 0.0, 1.0))
        stop.wait(0.1)
    if probe is not None:
        probe.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    f = sub.add_parser("fps")
    f.add_argument("--checkpoint", required=True)
    f.add_argument("--data_root", required=True)
    f.add_argument("--device", default="cpu")
    f.add_argument("--frames", type=int, default=40)
    f.add_argument("--width", type=int, default=1280)
    f.add_argument("--height", type=int, default=720)
    f.add_argument("--threads", type=int, default=0)
    t = sub.add_parser("training")
    t.add_argument("--data_root", required=True)
    t.add_argument("--steps", type=int, default=60)
    t.add_argument("--every", type=int, default=10, help="--viewer_every")
    t.add_argument("--cases", default="off,idle,moving")
    t.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    fps(args) if args.what == "fps" else training(args)


if __name__ == "__main__":
    main()
