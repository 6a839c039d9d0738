"""This project's training loop and test mode against the original's, as users run them, over a grid of settings.

    git clone --recursive https://github.com/vsitzmann/deepvoxels benchmarks/original/deepvoxels
    .venv/bin/pip install opencv-python-headless      # the original reads images with cv2
    .venv/bin/python benchmarks/vs_original.py                       # the whole grid (about half an hour on 2 cores)
    .venv/bin/python benchmarks/vs_original.py --settings demo paper --steps 4
    python3 benchmarks/vs_original.py --device cuda --settings demo paper   # on a GPU machine

The original is copied to benchmarks/original/patched/ (git-ignored) and patched only as
../shared/reference/README.md says: ``.cuda()`` -> CPU (unless ``--device cuda``), floor division for the
integer index divisions in projection.py, ``.contiguous()`` before ``.view(-1)`` on the cropped target, and
the discriminator step that keeps PyTorch 1.0's arithmetic. Its own ``train()`` and ``test()`` then run
unchanged, with their defaults: 8 data-loader workers, a print and 8 scalars per step, image summaries and
gate figures every 100 steps.

Both programs train on the same rendered scene (``python -m tools.dataset synthetic`` at 512 px; each
loader resizes to the setting's side), each in a fresh process. Definitions:
* loop s/step: median time between the ends of consecutive generator steps after ``--warmup`` steps. It
  covers the whole loop: data loading, index computation, the step, logging, progress.
* step s (ours): median time inside ``run_deepvoxels.train_step``. ``loop - step`` is the loop's own cost.
* test s/view: wall time of test mode after ``import torch`` (the networks built, the checkpoint loaded,
  every pose rendered, PNGs and, for ours, the video and scores written) divided by the number of test
  poses. Both render the checkpoint that the original's run saved.
With ``--rounds N`` both programs run N times per setting, in alternating order, and the times are pooled.
Image summaries (every 100 steps), validation (every 1000) and checkpoints (every 10000) fall outside the
timed window; their cost is reported per event for ours (``events``) and amortised in ``loop_total``.
The last line printed is one JSON object; ``--markdown`` also prints the table for docs/performance.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
ORIGINAL_DIR = os.path.join(REPO_ROOT, "benchmarks", "original", "deepvoxels")
PATCHED_DIR = os.path.join(REPO_ROOT, "benchmarks", "original", "patched")
ORIGINAL_COMMIT = "a12171a"  # the commit the reference fixtures were made from
DATA_SIDE = 512  # the scene is rendered once at the largest side of the grid
NUM_TEST_POSES = 12

# (name, img_sidelength, grid_dim, num_grid_feats, nf0): a dozen settings around the demo's and the paper's.
SETTINGS = [
    ("small", 128, 16, 8, 8),
    ("demo", 128, 16, 16, 16),  # configs/demo.yaml
    ("128-g32-f16", 128, 32, 16, 16),
    ("128-g32-f64", 128, 32, 64, 64),
    ("256-g16-f8", 256, 16, 8, 8),
    ("256-g32-f16", 256, 32, 16, 16),
    ("256-g32-f64", 256, 32, 64, 64),
    ("512-g16-f8", 512, 16, 8, 8),
    ("512-g32-f8", 512, 32, 8, 8),
    ("512-g32-f16", 512, 32, 16, 16),
    ("512-g16-f64", 512, 16, 64, 64),
    ("paper", 512, 32, 64, 64),
]
# Steps per event of the training loop's defaults (the original's and ours).
SUMMARY_EVERY, VAL_EVERY, CHECKPOINT_EVERY = 100, 1000, 10000


def model_flags(setting: Sequence[Any]) -> list[str]:
    _, side, grid, feats, nf0 = setting
    return ["--img_sidelength", str(side), "--grid_dim", str(grid), "--num_grid_feats", str(feats), "--nf0", str(nf0)]


# ------------------------------------------------------------------------------------------------------------
# The original, patched as the reference README says

def _replace(text: str, old: str, new: str, count: int, where: str) -> str:
    found = text.count(old)
    if found != count:
        raise SystemExit(f"error: patching {where}: expected {count} x {old!r}, found {found}; "
                         f"is {ORIGINAL_DIR} at commit {ORIGINAL_COMMIT}?")
    return text.replace(old, new)


def patch_original(device: str) -> str:
    """A fresh patched copy of the original in PATCHED_DIR, running on ``device`` (cpu or cuda); returns its path."""
    if not os.path.isfile(os.path.join(ORIGINAL_DIR, "run_deepvoxels.py")) or not os.path.isfile(
            os.path.join(ORIGINAL_DIR, "pytorch_prototyping", "pytorch_prototyping.py")):
        raise SystemExit(f"error: {ORIGINAL_DIR}: no checkout of the original with its submodule; clone it with "
                         "git clone --recursive https://github.com/vsitzmann/deepvoxels " + ORIGINAL_DIR)
    shutil.rmtree(PATCHED_DIR, ignore_errors=True)
    shutil.copytree(ORIGINAL_DIR, PATCHED_DIR, ignore=shutil.ignore_patterns(".git"))
    for folder, _, files in os.walk(PATCHED_DIR):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            with open(path) as handle:
                text = handle.read()
            if device == "cpu":
                text = text.replace(".cuda()", ".cpu()").replace("torch.device('cuda')", "torch.device('cpu')")
            if name == "projection.py":  # PyTorch 1.0 floored integer tensor division
                text = _replace(text, "lin_ind_volume / (", "lin_ind_volume // (", 2, path)
                text = _replace(text, "tmp / self.grid_dims[0]", "tmp // self.grid_dims[0]", 2, path)
                text = _replace(text, "lin_ind_frustrum / (", "lin_ind_frustrum // (", 1, path)
                text = _replace(text, "tmp / self.projection_image_dims[0]", "tmp // self.projection_image_dims[0]",
                                1, path)
            if name == "run_deepvoxels.py" and folder == PATCHED_DIR:
                text = _replace(text, "['gt_rgb'].to(device).view(-1)", "['gt_rgb'].to(device).contiguous().view(-1)",
                                1, path)
                # 1.0's optimizer wrote p.data, which left autograd's version counters alone.
                text = _replace(text, "            optimizerD.step()\n",
                                "            _versions = [p._version for p in discriminator.parameters()]\n"
                                "            optimizerD.step()\n"
                                "            torch._C._autograd._unsafe_set_version_counter("
                                "tuple(discriminator.parameters()), tuple(_versions))\n", 1, path)
            with open(path, "w") as handle:
                handle.write(text)
    return PATCHED_DIR


class _Enough(Exception):
    """Raised from inside a training loop once the timed steps are done."""


def child_original(args: argparse.Namespace) -> dict[str, Any]:
    # The original's module names (util, dataio, pytorch_prototyping...) are also this project's.
    sys.path[:] = [args.patched] + [p for p in sys.path if os.path.abspath(p or ".") != REPO_ROOT]
    mode = args.child.split("-")[1]
    sys.argv = ["run_deepvoxels.py", "--train_test", mode, "--data_root", args.data_root,
                "--logging_root", args.logging_root] + args.flags
    if mode == "test":
        sys.argv += ["--checkpoint", args.checkpoint]
    import torch
    start = time.perf_counter()
    import run_deepvoxels as original  # builds everything at import, as the original does
    if mode == "test":
        original.test()
        return {"test_s": time.perf_counter() - start}
    ends: list[float] = []
    step = original.optimizerG.step

    def timed_step(*a, **k):
        out = step(*a, **k)
        ends.append(time.perf_counter())
        return out

    def stop_after_print(*a, **k):  # the loop body's last work after the G step is the print and the scalars
        if len(ends) >= args.warmup + args.steps + 1:
            raise _Enough()
        builtins_print(*a, **k)

    import builtins
    builtins_print = builtins.print
    original.optimizerG.step = timed_step
    original.print = stop_after_print
    try:
        original.train()
    except _Enough:
        pass
    original.util.custom_save(original.model, args.checkpoint, original.discriminator)
    loop = [b - a for a, b in zip(ends[args.warmup:], ends[args.warmup + 1:])]
    return {"loop": loop, "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------------------------
# This project

def child_ours(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, args.ours)
    import torch
    start = time.perf_counter()
    import run_deepvoxels
    mode = args.child.split("-")[1]
    argv = ["--train_test", mode, "--data_root", args.data_root, "--logging_root", args.logging_root] + args.flags
    if mode == "test":
        rc = run_deepvoxels.main(argv + ["--checkpoint", args.checkpoint])
        return {"rc": rc, "test_s": time.perf_counter() - start}
    ends: list[float] = []
    inside: list[float] = []
    events: dict[str, list[float]] = {"summary": [], "validation": [], "checkpoint": []}

    def timed(fn, into):
        def wrapper(*a, **k):
            start = time.perf_counter()
            out = fn(*a, **k)
            into(time.perf_counter() - start)
            return out
        return wrapper

    step = run_deepvoxels.train_step

    def timed_step(*a, **k):
        start = time.perf_counter()
        out = step(*a, **k)
        if torch.cuda.is_available():  # the step's kernels done, so that the step's own time is measured
            torch.cuda.synchronize()
        ends.append(time.perf_counter())
        inside.append(ends[-1] - start)
        return out

    summaries = run_deepvoxels.write_summaries

    def timed_summaries(writer, step, every, *a, **k):
        start = time.perf_counter()
        summaries(writer, step, every, *a, **k)
        if step % every == 0 and step > 0:  # step 0 also pays one-off imports
            events["summary"].append(time.perf_counter() - start)

    run_deepvoxels.train_step = timed_step
    run_deepvoxels.write_summaries = timed_summaries
    run_deepvoxels.Validator.run = timed(run_deepvoxels.Validator.run, events["validation"].append)
    run_deepvoxels.checkpoints.save_step = timed(run_deepvoxels.checkpoints.save_step, events["checkpoint"].append)
    # One image summary inside the run (besides step 0's), so its cost is measured; the timed window avoids it.
    total = args.warmup + args.steps + 1
    rc = run_deepvoxels.main(argv + ["--max_steps", str(total + 1), "--summary_every", str(total)])
    loop = [b - a for a, b in zip(ends[args.warmup:total - 1], ends[args.warmup + 1:total])]
    return {"rc": rc, "loop": loop, "step": inside[args.warmup + 1:total], "events": events,
            "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------------------------
# The driver

def run_child(kind: str, setting: Sequence[Any], args: argparse.Namespace, work: str, checkpoint: str) -> dict:
    logs = os.path.join(work, f"{kind}-{setting[0]}")
    split = "test" if kind.endswith("test") else "train"
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--patched", PATCHED_DIR, "--ours", args.ours,
           "--data_root", os.path.join(work, "data", split, "cube"), "--logging_root", logs,
           "--checkpoint", checkpoint, "--warmup", str(args.warmup), "--steps", str(args.steps), "--flags",
           *model_flags(setting), *([] if kind.startswith("original") else ["--device", args.device])]
    with open(logs + ".out", "w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT,
                              cwd=PATCHED_DIR if kind.startswith("original") else args.ours)
    with open(logs + ".out") as handle:
        tail = handle.read().strip().splitlines()
    if proc.returncode != 0 or not tail or not tail[-1].startswith("{"):
        raise SystemExit(f"error: {kind} {setting[0]} failed (exit {proc.returncode}); see {logs}.out")
    # The run's checkpoints and summaries are not needed once timed (at the paper's setting they take GBs).
    shutil.rmtree(logs, ignore_errors=True)
    return json.loads(tail[-1])


def make_scene(work: str) -> None:
    data = os.path.join(work, "data")
    if os.path.isdir(os.path.join(data, "test", "cube")):
        return
    subprocess.run([sys.executable, "-m", "tools.dataset", "synthetic", "--out", data, "--resolution",
                    str(DATA_SIDE), "--num_train", "50", "--num_val", "10", "--num_test", str(NUM_TEST_POSES),
                    "--seed", "0"], check=True, cwd=REPO_ROOT, stdout=subprocess.DEVNULL)


def measure(setting: Sequence[Any], args: argparse.Namespace, work: str) -> dict[str, Any]:
    """Both programs' training runs and test modes, ``args.rounds`` times, the order of the two swapped from one
    round to the next so that a slow spell of a shared machine falls on both; times are pooled over the rounds."""
    checkpoint = os.path.join(work, f"original-{setting[0]}.pth")  # the original's training run writes it
    runs: dict[str, list[tuple[dict, dict]]] = {"original": [], "ours": []}
    for round_ in range(args.rounds):
        for program in ("original", "ours") if round_ % 2 == 0 else ("ours", "original"):
            train = run_child(f"{program}-train", setting, args, work, checkpoint)
            runs[program].append((train, run_child(f"{program}-test", setting, args, work, checkpoint)))

    def pooled(program: str, key: str) -> list:
        return [x for train, _ in runs[program] for x in train[key]]

    events = {name: [t for train, _ in runs["ours"] for t in train["events"][name]]
              for name in runs["ours"][0][0]["events"]}
    os.remove(checkpoint)
    ev = {k: statistics.median(v) if v else None for k, v in events.items()}
    loop = statistics.median(pooled("ours", "loop"))
    amortised = sum((ev[k] or 0) / every for k, every in
                    (("summary", SUMMARY_EVERY), ("validation", VAL_EVERY), ("checkpoint", CHECKPOINT_EVERY)))
    row = {"setting": setting[0], "flags": " ".join(model_flags(setting)), "rounds": args.rounds,
           "original_loop_s": statistics.median(pooled("original", "loop")), "ours_loop_s": loop,
           "ours_step_s": statistics.median(pooled("ours", "step")), "ours_events_s": ev,
           "ours_loop_total_s": loop + amortised,
           "original_test_s_per_view": statistics.median(t["test_s"] for _, t in runs["original"]) / NUM_TEST_POSES,
           "ours_test_s_per_view": statistics.median(t["test_s"] for _, t in runs["ours"]) / NUM_TEST_POSES}
    row["train_speedup"] = row["original_loop_s"] / row["ours_loop_total_s"]
    row["test_speedup"] = row["original_test_s_per_view"] / row["ours_test_s_per_view"]
    row["loop_overhead"] = 1 - row["ours_step_s"] / row["ours_loop_total_s"]
    print(json.dumps(row), flush=True)
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| setting | original loop s/step | ours loop s/step | train x | ours step s | loop overhead | "
             "original test s/view | ours test s/view | test x |", "|---" * 9 + "|"]
    for r in rows:
        lines.append(f"| {r['setting']} (`{r['flags']}`) | {r['original_loop_s']:.3f} | {r['ours_loop_total_s']:.3f} | "
                     f"{r['train_speedup']:.2f} | {r['ours_step_s']:.3f} | {100 * r['loop_overhead']:.1f}% | "
                     f"{r['original_test_s_per_view']:.3f} | {r['ours_test_s_per_view']:.3f} | "
                     f"{r['test_speedup']:.2f} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", nargs="*", default=[s[0] for s in SETTINGS],
                   help="names from SETTINGS (default: all)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first has one-off costs)")
    p.add_argument("--rounds", type=int, default=1,
                   help="runs of each program per setting, in alternating order; their times are pooled")
    p.add_argument("--work", default="", help="folder for the scene and the runs (default: a temporary one)")
    p.add_argument("--ours", default=REPO_ROOT,
                   help="checkout of this project to measure (default: this one); e.g. a worktree of an older commit")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where both programs run")
    p.add_argument("--markdown", action="store_true", help="also print the table")
    p.add_argument("--save", default="", help="also write the final JSON to this file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--patched", default=PATCHED_DIR, help=argparse.SUPPRESS)
    p.add_argument("--data_root", help=argparse.SUPPRESS)
    p.add_argument("--logging_root", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--flags", nargs=argparse.REMAINDER, default=[], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        result = (child_original if args.child.startswith("original") else child_ours)(args)
        print(json.dumps(result), flush=True)
        return 0
    unknown = set(args.settings) - {s[0] for s in SETTINGS}
    if unknown:
        raise SystemExit(f"error: --settings: unknown {sorted(unknown)}; known: {[s[0] for s in SETTINGS]}")
    from performance import cpu_description
    patch_original(args.device)
    args.ours = os.path.abspath(args.ours)
    work = args.work or tempfile.mkdtemp(prefix="vs_original-")
    os.makedirs(work, exist_ok=True)
    make_scene(work)
    print(f"cpu: {cpu_description()}", flush=True)
    if args.device == "cuda":
        import torch
        print(f"gpu: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    rows = [measure(s, args, work) for s in SETTINGS if s[0] in args.settings]
    if args.markdown:
        print(markdown(rows))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=args.ours, capture_output=True, text=True)
    result = {"cpu": cpu_description(), "date": time.strftime("%Y-%m-%d"), "ours": commit.stdout.strip(), "rows": rows}
    if args.save:
        with open(args.save, "w") as handle:
            json.dump(result, handle, indent=1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
