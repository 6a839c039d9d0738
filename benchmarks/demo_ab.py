"""A/B of flag sets on the demo: configs/demo.yaml plus each arm's flags, trained and tested once per (arm, seed),
a few runs at a time with one thread each. Prints one line per run and, per arm, the mean and spread of the
test PSNR and SSIM over the 50 spiral views, and the training time.

    .venv/bin/python benchmarks/demo_ab.py --out /tmp/init_ab --seeds 0 1 2 \\
        --arm ones --batchnorm_init ones --arm uniform --batchnorm_init uniform

Each `--arm NAME` starts an arm; the flags after it (up to the next `--arm`) go to run_deepvoxels.py for both
training and test. Runs that share the machine slow each other down, so the times compare arms only within one
call; the scores do not depend on it (one thread per run fixes the summation order).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import checkpoints  # noqa: E402  (this project's, found through REPO)

CONFIG = os.path.join(REPO, "configs", "demo.yaml")
# Flags that only training takes; test mode reads the model's from the checkpoint and rejects these.
TRAIN_ONLY = {"--lr", "--l1_weight", "--num_trgt", "--max_steps", "--max_epoch", "--seed", "--batchnorm_init",
              "--sampling_pattern", "--checkpoint_every", "--val_every"}


def split_arms(argv: Sequence[str]) -> tuple[list[str], dict[str, list[str]]]:
    """(the script's own flags, {arm name: its run_deepvoxels.py flags})."""
    own, arms, current = [], {}, None
    tokens = list(argv)
    while tokens:
        token = tokens.pop(0)
        if token == "--arm":
            if not tokens:
                raise SystemExit("error: --arm needs a name")
            current = tokens.pop(0)
            arms[current] = []
        elif current is None:
            own.append(token)
        else:
            arms[current].append(token)
    return own, arms


def test_flags(flags: Sequence[str]) -> list[str]:
    """The arm's flags without those only training takes (each with its value)."""
    kept, skip = [], False
    for token in flags:
        if skip:
            skip = False
        elif token in TRAIN_ONLY:
            skip = True
        else:
            kept.append(token)
    return kept


def run_arm(out: str, data: str, name: str, flags: Sequence[str], seed: int) -> dict:
    """Train and test one run; returns its scores and training time."""
    logs = os.path.join(out, f"{name}_seed{seed}")
    common = ["--config", CONFIG, "--logging_root", logs, "--threads", "1"]
    start = time.perf_counter()
    subprocess.run([sys.executable, "run_deepvoxels.py", "--train_test", "train", "--data_root",
                    os.path.join(data, "train", "cube"), "--seed", str(seed), *common, *flags],
                   cwd=REPO, check=True, capture_output=True)
    train_s = time.perf_counter() - start
    ckpt = checkpoints.newest_checkpoint(logs)
    result = subprocess.run([sys.executable, "run_deepvoxels.py", "--train_test", "test", "--data_root",
                             os.path.join(data, "test", "cube"), "--checkpoint", ckpt, *common, *test_flags(flags)],
                            cwd=REPO, check=True, capture_output=True, text=True)
    renders = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("renders: ")][-1]
    with open(os.path.join(renders, "metrics.json")) as handle:
        metrics = json.load(handle)
    print(f"{name} seed {seed}: PSNR {metrics['psnr']:.2f} dB  SSIM {metrics['ssim']:.4f}  training {train_s:.0f} s",
          flush=True)
    return {"arm": name, "flags": list(flags), "seed": seed, "psnr": metrics["psnr"], "ssim": metrics["ssim"],
            "train_s": train_s}


def main(argv: Optional[Sequence[str]] = None) -> int:
    own, arms = split_arms(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the dataset, runs and results.json")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    p.add_argument("--parallel", type=int, default=2, help="runs at a time (one thread each)")
    args = p.parse_args(own)
    if not arms:
        p.error("give at least one --arm NAME [flags]")
    data = os.path.join(args.out, "data")
    if not os.path.isdir(os.path.join(data, "test")):
        subprocess.run([sys.executable, "-m", "tools.dataset", "synthetic", "--out", data, "--object", "cube",
                        "--resolution", "128", "--num_train", "50", "--num_val", "10", "--seed", "0"],
                       cwd=REPO, check=True, capture_output=True)
    runs = [(name, seed) for seed in args.seeds for name in arms]
    with ThreadPoolExecutor(args.parallel) as pool:
        rows = list(pool.map(lambda run: run_arm(args.out, data, run[0], arms[run[0]], run[1]), runs))
    for name in arms:
        mine = [r for r in rows if r["arm"] == name]
        psnr, ssim = [r["psnr"] for r in mine], [r["ssim"] for r in mine]
        spread = f" (min {min(psnr):.2f}, max {max(psnr):.2f})" if len(psnr) > 1 else ""
        print(f"{name}: mean PSNR {statistics.mean(psnr):.2f} dB{spread}  mean SSIM {statistics.mean(ssim):.4f}  "
              f"mean training {statistics.mean(r['train_s'] for r in mine):.0f} s  ({' '.join(arms[name])})")
    with open(os.path.join(args.out, "results.json"), "w") as handle:
        json.dump(rows, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
