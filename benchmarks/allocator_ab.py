"""A/B of the CPU allocators in training: the budgeted pool (cpu_allocator.py, the default) against glibc.

    .venv/bin/python benchmarks/allocator_ab.py --iters 3 --repeats 2 --threads 2 [--pool_margin_mb 64]

Each arm runs ``speed.py``'s training part (``--only train``) in a fresh process with ``--cpu_allocator
system`` or ``pool``, alternating, ``--repeats`` times, so that both see the same state of a shared machine.
Every other flag goes to speed.py. The last line printed is one JSON object with each arm's medians.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import speed  # noqa: E402  (benchmarks/speed.py: the timed training step, run in a child process)

ARMS = ("system", "pool")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2, help="runs of each arm, alternating")
    args, rest = p.parse_known_args(argv)
    if "--cpu_allocator" in rest or "--child" in rest:
        p.error("--cpu_allocator and --child are set per arm")
    speed_args = speed.build_parser().parse_args(rest)  # rejects unknown flags before the first run
    runs: dict[str, list] = {arm: [] for arm in ARMS}
    for _ in range(args.repeats):
        for arm in ARMS:
            try:
                res = speed.run_child([*rest, "--cpu_allocator", arm], "train")
            except RuntimeError as err:
                print(f"allocator_ab: the {arm} arm failed: {err}", file=sys.stderr)
                return 1
            runs[arm].append(res)
            pool = res.get("train_pool")
            print(f"{arm:6s} train {res['train_s_per_iter']:.2f} s/iter  peak RSS {res['train_peak_rss_mb']:.0f} MB"
                  + (f"  (pool: peak live {pool['peak_live_mb']:.0f} MB, {pool['hits']} hits, {pool['misses']} "
                     f"misses)" if pool else ""), flush=True)
    summary = {arm: {"train_s_per_iter": statistics.median(r["train_s_per_iter"] for r in rs),
                     "peak_rss_mb": statistics.median(r["train_peak_rss_mb"] for r in rs),
                     "runs": [[r["train_s_per_iter"], r["train_peak_rss_mb"]] for r in rs]}
               for arm, rs in runs.items()}
    summary["config"] = {"img_sidelength": speed_args.img_sidelength, "amp": speed_args.amp,
                         "save_memory": speed_args.save_memory, "pool_margin_mb": speed_args.pool_margin_mb}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
