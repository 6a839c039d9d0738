"""A/B of the BatchNorm initialisations (--batchnorm_init uniform, PyTorch 1.0's, against ones, today's) on the
demo: configs/demo.yaml trained and tested once per (initialisation, seed), two runs at a time with one thread
each. Prints one line per run and a summary (mean and spread of the test PSNR and SSIM per initialisation).

    .venv/bin/python benchmarks/init_ab.py --out /tmp/init_ab --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "demo.yaml")


def run_arm(out: str, data: str, init: str, seed: int) -> dict:
    """Train and test one arm; returns test mode's metrics.json."""
    logs = os.path.join(out, f"{init}_seed{seed}")
    common = ["--config", CONFIG, "--logging_root", logs, "--threads", "1"]
    subprocess.run([sys.executable, "run_deepvoxels.py", "--train_test", "train", "--data_root",
                    os.path.join(data, "train", "cube"), "--batchnorm_init", init, "--seed", str(seed), *common],
                   cwd=REPO, check=True, capture_output=True)
    sys.path.insert(0, REPO)
    import checkpoints
    ckpt = checkpoints.newest_checkpoint(logs)
    result = subprocess.run([sys.executable, "run_deepvoxels.py", "--train_test", "test", "--data_root",
                             os.path.join(data, "test", "cube"), "--checkpoint", ckpt, *common],
                            cwd=REPO, check=True, capture_output=True, text=True)
    renders = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("renders: ")][-1]
    with open(os.path.join(renders, "metrics.json")) as handle:
        metrics = json.load(handle)
    print(f"{init:8s} seed {seed}: PSNR {metrics['psnr']:.2f} dB  SSIM {metrics['ssim']:.4f}", flush=True)
    return {"init": init, "seed": seed, "psnr": metrics["psnr"], "ssim": metrics["ssim"]}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the dataset, runs and results.json")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    p.add_argument("--parallel", type=int, default=2, help="runs at a time (one thread each)")
    args = p.parse_args(argv)
    data = os.path.join(args.out, "data")
    if not os.path.isdir(os.path.join(data, "test")):
        subprocess.run([sys.executable, "-m", "tools.dataset", "synthetic", "--out", data, "--object", "cube",
                        "--resolution", "128", "--num_train", "50", "--num_val", "10", "--seed", "0"],
                       cwd=REPO, check=True, capture_output=True)
    arms = [(init, seed) for seed in args.seeds for init in ("ones", "uniform")]
    with ThreadPoolExecutor(args.parallel) as pool:
        rows = list(pool.map(lambda arm: run_arm(args.out, data, *arm), arms))
    for init in ("ones", "uniform"):
        mine = [r for r in rows if r["init"] == init]
        psnr, ssim = [r["psnr"] for r in mine], [r["ssim"] for r in mine]
        spread = f" (min {min(psnr):.2f}, max {max(psnr):.2f})" if len(psnr) > 1 else ""
        print(f"{init:8s} mean PSNR {statistics.mean(psnr):.2f} dB{spread}  mean SSIM {statistics.mean(ssim):.4f}")
    with open(os.path.join(args.out, "results.json"), "w") as handle:
        json.dump(rows, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
