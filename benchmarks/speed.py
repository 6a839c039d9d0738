"""Speed, FLOPs, utilisation and peak memory of one training iteration and of test rendering.

    .venv/bin/python benchmarks/speed.py --img_sidelength 128 --grid_dim 16 --num_grid_feats 8 --nf0 8
    .venv/bin/python benchmarks/speed.py --iters 3 --warmup 1            # default (512 px) setting
    .venv/bin/python benchmarks/speed.py --iters 3 --amp bf16

It runs exactly the code that training and testing run: ``run_deepvoxels.train_step`` on what
``run_deepvoxels.build_training`` builds, both networks in train mode (forward with the input view, 2 target
views, L1 + GAN losses, D step, G step), and ``evaluation.render_poses`` on a model set up as test mode sets
it up (inpaint once, batched views). Inputs are synthetic: the 6 reference poses
(../shared/reference/pose_*.txt with small_intrinsics.txt) and seeded random images. Train and test each
run in their own subprocess, so that each peak is its own. The last line printed is one JSON object.

Definitions (as in the original's timings, ../shared/reference/timings_original_cpu.md):
* train s/iter: median wall time of ``train_step`` after ``--warmup`` untimed steps. Lifting and
  projection indices come from ``projection.IndexCache`` (training sees every pose again each epoch); their
  one-off cost per pose is reported separately as ``mapping_s_per_pose``.
* peak memory: the largest resident set size (VmHWM on Linux; on CUDA, max allocated) during the timed
  iterations; the count restarts after the warm-up, which includes the FLOP count.
* FLOPs: counted over one step, including what the backward pass recomputes (the memory savers, see
  ``run_deepvoxels.py --save_memory``), so GFLOP/s is the work the machine actually did.
* test s/view: median over ``--iters`` passes of (wall time of rendering all 6 poses) / 6, each pass with a
  fresh ``IndexCache``, so it includes the projection indices and the once-per-pass inpainting, like the
  span the original's ``test()`` timed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Optional, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The reference poses and intrinsics: ../shared/reference beside the repository, or DEEPVOXELS_REFERENCE.
REFERENCE_DIR = os.environ.get("DEEPVOXELS_REFERENCE", os.path.join(REPO_ROOT, "..", "shared", "reference"))
NUM_POSES = 6  # pose_0.txt .. pose_5.txt in the reference folder
MATMUL_SIDE = 2048  # square matmul used to measure the machine's peak (large enough to be compute bound)
MATMUL_SIDE_CUDA = 8192  # a GPU needs a larger one to fill its SMs
MATMUL_REPEATS = 5
GIGA = 1e9


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Model flags: passed through to options.parse_args(), same names and defaults.
    p.add_argument("--img_sidelength", type=int, default=512, help="image side in pixels")
    p.add_argument("--grid_dim", type=int, default=32, help="voxels per grid side")
    p.add_argument("--num_grid_feats", type=int, default=64, help="features per voxel")
    p.add_argument("--nf0", type=int, default=64, help="features in the outermost U-Net layer")
    p.add_argument("--no_occlusion_net", action="store_true", help="depth-collapse net instead of occlusion net")
    p.add_argument("--amp", choices=("off", "bf16", "fp16"), default="off", help="autocast precision")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks")
    p.add_argument("--tf32", action="store_true", help="CUDA: TF32 tensor cores for float32 (run_deepvoxels --tf32)")
    p.add_argument("--save_memory", action="store_true",
                   help="turn the training-memory savers on (run_deepvoxels --save_memory)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--view_batch", type=int, default=0,
                   help="views per forward in test rendering (0: run_deepvoxels's default for the device and size)")
    # Benchmark flags.
    p.add_argument("--iters", type=int, default=5, help="timed training iterations (and test passes)")
    p.add_argument("--warmup", type=int, default=1, help="untimed training iterations (and test passes) first")
    p.add_argument("--only", choices=("both", "train", "test"), default="both", help="which part to run")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and images")
    p.add_argument("--threads", type=int, default=0,
                   help="torch.set_num_threads (0: torch's default). On a shared machine 1 thread is far steadier")
    p.add_argument("--save", default="", help="also write the final JSON to this file")
    p.add_argument("--disable", nargs="*", default=[], metavar="PATH",
                   help="fast paths (performance.FastPaths fields) to turn off, e.g. onednn_conv3d step_in_backward")
    p.add_argument("--enable", nargs="*", default=[], metavar="PATH",
                   help="fast paths to turn on whatever performance.choose says, e.g. channels_last_2d")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also profile the last timed step (and test pass) and print its N costliest operators")
    p.add_argument("--profile_shapes", action="store_true",
                   help="with --profile: one row per operator and input shapes (which layer costs what)")
    p.add_argument("--child", choices=("train", "test"), default=None, help=argparse.SUPPRESS)
    return p


def model_options(args: argparse.Namespace, logging_root: str) -> Any:
    """The run_deepvoxels options for ``args``, resolved by its own parser (so every default is the same)."""
    import options
    argv = ["--train_test", "train", "--data_root", REFERENCE_DIR, "--logging_root", logging_root,
            "--img_sidelength", str(args.img_sidelength), "--grid_dim", str(args.grid_dim),
            "--num_grid_feats", str(args.num_grid_feats), "--nf0", str(args.nf0), "--amp", args.amp,
            "--device", args.device, "--view_batch", str(args.view_batch), "--seed", str(args.seed)]
    if args.no_occlusion_net:
        argv.append("--no_occlusion_net")
    if args.compile:
        argv.append("--compile")
    if args.save_memory:
        argv.append("--save_memory")
    if args.tf32:
        argv.append("--tf32")
    return options.parse_args(argv)


def load_poses() -> list:
    import data_util
    import torch
    return [torch.as_tensor(data_util.load_pose(os.path.join(REFERENCE_DIR, f"pose_{i}.txt")), dtype=torch.float32)
            for i in range(NUM_POSES)]


def synchronize(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(fn: Callable[[], Any]) -> tuple[Any, float]:
    """Run ``fn`` under FlopCounterMode; returns (its result, total FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        result = fn()
    return result, float(counter.get_total_flops())


def print_profile(fn: Callable[[], Any], rows: int, what: str, by_shape: bool = False) -> None:
    """Run ``fn`` once under torch.profiler and print its costliest operators by self time (to stderr, so that
    the last line of stdout stays the JSON result); ``by_shape``: one row per operator and input shapes."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], record_shapes=by_shape) as prof:
        fn()
    print(f"profile of one {what}:", file=sys.stderr)
    print(prof.key_averages(group_by_input_shape=by_shape).table(
        sort_by="self_cpu_time_total", row_limit=rows, max_shapes_column_width=100), file=sys.stderr)


def reset_peak_rss() -> bool:
    """Restart the peak resident set size count (Linux: VmHWM, reset through /proc/self/clear_refs), so that
    the peak reported is that of the timed part alone, not of the FLOP count or the warm-up. False where the
    system cannot; the peak is then the whole process's."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def process_peak_rss_mb() -> float:
    """The whole process's peak resident set size in MiB (``ru_maxrss``: bytes on macOS, else KiB)."""
    scale = 1.0 / 1024 ** 2 if sys.platform == "darwin" else 1.0 / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def peak_rss_mb() -> float:
    """Peak resident set size in MiB since the last ``reset_peak_rss`` (VmHWM), or of the whole process."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return process_peak_rss_mb()


def cuda_peak_mb(device) -> Optional[float]:
    import torch
    return torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None


def _setup(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """Resolved flags, device and geometry (reference intrinsics), with every seed set."""
    import run_deepvoxels
    import util
    with tempfile.TemporaryDirectory() as tmp:
        opt = model_options(args, tmp)
    device = util.resolve_device(opt.device)
    util.configure_backends(device, opt.tf32)  # as run_deepvoxels.main does
    util.seed_everything(opt.seed)
    if args.disable or args.enable:
        import dataclasses

        import performance
        unknown = set(args.disable + args.enable) - {f.name for f in dataclasses.fields(performance.FastPaths)}
        if unknown:
            raise SystemExit(f"error: --disable/--enable: no fast path named {sorted(unknown)}")
        forced = {**{n: False for n in args.disable}, **{n: True for n in args.enable}}
        choose = performance.choose
        performance.choose = lambda *a, **k: dataclasses.replace(choose(*a, **k), **forced)
    geometry = run_deepvoxels.build_geometry(os.path.join(REFERENCE_DIR, "small_intrinsics.txt"), opt.grid_dim,
                                             opt.near_plane, device)
    return opt, device, geometry


def run_train(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    import run_deepvoxels
    import util
    from projection import IndexCache
    opt, device, geometry = _setup(args)
    model, discriminator = run_deepvoxels.build_networks(opt, device)
    training = run_deepvoxels.build_training(opt, device, model, discriminator)
    model.train()  # as run_deepvoxels.train sets both before its loop
    discriminator.train()
    rss_after_build = peak_rss_mb()
    mappings = IndexCache(geometry, device)
    poses = load_poses()
    t0 = time.perf_counter()
    for pose in poses:
        mappings.lift(pose)
        mappings.project(pose)
    mapping_s = (time.perf_counter() - t0) / len(poses)
    gen = torch.Generator().manual_seed(opt.seed)
    images = [(torch.rand(1, 3, opt.img_sidelength, opt.img_sidelength, generator=gen) - 0.5).to(device)
              for _ in poses]

    def step(i: int):
        # A triplet as NovelViewTriplets makes one: the input view and 2 other target views.
        near, trgt = i % NUM_POSES, [(i + 1) % NUM_POSES, (i + 2) % NUM_POSES]
        return run_deepvoxels.train_step(training, images[near], mappings.lift(poses[near]),
                                         [mappings.project(poses[t]) for t in trgt], [images[t] for t in trgt])

    flops = None
    times = []
    for i in range(args.warmup + args.iters):
        if i == 0 and args.warmup and not args.compile:
            t0 = time.perf_counter()
            _, flops = count_flops(lambda: step(i))  # the first warm-up step doubles as the FLOP count
            synchronize(device)
            warm_s = time.perf_counter() - t0
            continue
        if i == args.warmup:
            reset_peak_rss()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        losses = step(i)[0]
        synchronize(device)
        if i == 0:
            warm_s = time.perf_counter() - t0
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak_mb, cuda_mb = peak_rss_mb(), cuda_peak_mb(device)
    if args.profile:
        print_profile(lambda: step(0), args.profile, "train step", args.profile_shapes)
    if flops is None:
        _, flops = count_flops(lambda: step(0))
    return {"train_times": times, "train_s_per_iter": statistics.median(times), "train_warmup_s": warm_s,
            "train_flops": flops, "mapping_s_per_pose": mapping_s, "last_losses": losses,
            "train_rss_after_build_mb": rss_after_build, "train_peak_rss_mb": peak_mb,
            "train_process_peak_rss_mb": process_peak_rss_mb(),
            "train_cuda_peak_mb": cuda_mb,
            "generator_params": util.count_parameters(model)}


def run_test(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    import checkpoints
    import performance
    import run_deepvoxels
    from evaluation import render_poses
    from projection import IndexCache
    opt, device, geometry = _setup(args)
    model, _ = run_deepvoxels.build_networks(opt, device)
    small = (opt.img_sidelength, opt.grid_dim, opt.num_grid_feats, opt.nf0, opt.no_occlusion_net) == (
        128, 16, 8, 8, False)
    if small:  # the trained reference checkpoint: a grid and BatchNorm statistics that are not trivial
        path = os.path.join(REFERENCE_DIR, "small_ckpt.pth")
        checkpoints.load_weights(path, checkpoints.load(path), model)
    else:
        model.deepvoxels.normal_(0.0, 0.1)
    # As run_deepvoxels.test sets up a model built from a checkpoint.
    performance.enable(model, performance.choose(device, opt.img_sidelength, opt.save_memory, compiled=opt.compile,
                                                 nf0=opt.nf0, training=False))
    if opt.compile:
        performance.compile_networks(model)
    model.eval()
    autocast = run_deepvoxels.amp_context(opt.amp, device)
    poses = load_poses()

    view_batch = performance.views_per_forward(opt.view_batch, device, opt.img_sidelength)

    def render_all() -> list:
        mappings = IndexCache(geometry, device)  # fresh: a test run sees each pose once
        out = [img for _, img, _ in render_poses(model, mappings, poses, view_batch, autocast)]
        synchronize(device)
        return out

    flops = None
    times = []
    for i in range(args.warmup + args.iters):
        if i == args.warmup:
            reset_peak_rss()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        if i == 0 and args.warmup and not args.compile:
            _, flops = count_flops(render_all)
        else:
            render_all()
        elapsed = (time.perf_counter() - t0) / len(poses)
        if i >= args.warmup:
            times.append(elapsed)
    peak_mb, cuda_mb = peak_rss_mb(), cuda_peak_mb(device)
    if args.profile:
        print_profile(render_all, args.profile, f"test pass over {len(poses)} views", args.profile_shapes)
    if flops is None:
        _, flops = count_flops(render_all)
    return {"test_times": times, "test_s_per_view": statistics.median(times), "test_flops_per_view": flops / len(poses),
            "test_peak_rss_mb": peak_mb, "test_cuda_peak_mb": cuda_mb}


def matmul_peak(device_name: str, tf32: bool = False, bf16: bool = False) -> dict[str, float]:
    """Best-of-N GFLOP/s of a large square matmul in fp32 (TF32 with ``tf32`` on CUDA) and, with ``bf16``, in
    bf16 on the benchmark's device (nan otherwise: a CPU without bf16 instructions takes minutes for it)."""
    import torch

    import util
    device = util.resolve_device(device_name)
    util.configure_backends(device, tf32)
    side = MATMUL_SIDE_CUDA if device.type == "cuda" else MATMUL_SIDE
    result = {"bf16": float("nan")}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))[:2 if bf16 else 1]:
        a = torch.randn(side, side, device=device).to(dtype)
        b = torch.randn(side, side, device=device).to(dtype)
        torch.mm(a, b)  # warm-up: library load and kernel selection
        best = float("inf")
        for _ in range(MATMUL_REPEATS):
            synchronize(device)
            t0 = time.perf_counter()
            torch.mm(a, b)
            synchronize(device)
            best = min(best, time.perf_counter() - t0)
        result[name] = 2 * side ** 3 / best / GIGA
    return result


def machine_name() -> str:
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    name = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        name += f", GPU {torch.cuda.get_device_name()}"
    return name


def run_child(argv: Sequence[str], mode: str) -> dict[str, Any]:
    """Run this script for one part in a fresh process; returns the JSON object it printed last."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--child", mode]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark {mode} subprocess failed (exit {proc.returncode}): {' '.join(cmd)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def format_table(args: argparse.Namespace, res: dict[str, Any], peaks: dict[str, float]) -> str:
    peak = peaks["bf16"] if args.amp == "bf16" else peaks["fp32"]
    rows = ["| part | time | GFLOP | GFLOP/s | utilization | peak memory (MB) |", "|---|---|---|---|---|---|"]
    mem = "cuda_peak_mb" if res.get("train_cuda_peak_mb") or res.get("test_cuda_peak_mb") else "peak_rss_mb"
    for part, unit, time_key, flop_key in (("train", "s/iter", "train_s_per_iter", "train_flops"),
                                           ("test", "s/view", "test_s_per_view", "test_flops_per_view")):
        if time_key not in res:
            continue
        gflop = res[flop_key] / GIGA
        rate = gflop / res[time_key]
        rows.append(f"| {part} | {res[time_key]:.3f} {unit} | {gflop:.1f} | {rate:.1f} | {100 * rate / peak:.1f}% "
                    f"| {res.get(f'{part}_{mem}') or 0:.0f} |")
    return "\n".join(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child is not None:
        result = run_train(args) if args.child == "train" else run_test(args)
        print(json.dumps(result))
        return 0

    peaks = matmul_peak(args.device, args.tf32, bf16=args.amp == "bf16")
    res: dict[str, Any] = {}
    if args.only in ("both", "train"):
        res.update(run_child(argv, "train"))
    if args.only in ("both", "test"):
        res.update(run_child(argv, "test"))
    peak = peaks["bf16"] if args.amp == "bf16" else peaks["fp32"]
    import performance
    import util
    views = performance.views_per_forward(args.view_batch, util.resolve_device(args.device), args.img_sidelength)
    print(f"machine: {machine_name()}")
    print(f"config: img {args.img_sidelength}, grid {args.grid_dim}, feats {args.num_grid_feats}, nf0 {args.nf0}, "
          f"occlusion net {not args.no_occlusion_net}, amp {args.amp}, tf32 {args.tf32}, compile {args.compile}, "
          f"save_memory {args.save_memory}, "
          f"view_batch {args.view_batch} ({views} views per forward), {args.iters} timed after {args.warmup} warm-up")
    print(f"matmul peak: fp32 {peaks['fp32']:.1f} GFLOP/s, bf16 {peaks['bf16']:.1f} GFLOP/s")
    if "train_times" in res:
        print("train iterations (s): " + ", ".join(f"{t:.3f}" for t in res["train_times"])
              + f"  (warm-up {res['train_warmup_s']:.2f} s; indices {res['mapping_s_per_pose'] * 1e3:.1f} ms/pose,"
              f" cached)")
    if "test_times" in res:
        print("test passes (s/view): " + ", ".join(f"{t:.4f}" for t in res["test_times"]))
    print(format_table(args, res, peaks))

    summary: dict[str, Any] = {"config": {k: getattr(args, k) for k in (
        "img_sidelength", "grid_dim", "num_grid_feats", "nf0", "no_occlusion_net", "amp", "tf32", "compile", "view_batch",
        "save_memory", "iters", "warmup")}, "views_per_forward": views}
    summary["peak_rss_mb"] = max(res.get("train_peak_rss_mb", 0.0), res.get("test_peak_rss_mb", 0.0))
    for key in ("train_s_per_iter", "test_s_per_view", "train_peak_rss_mb", "test_peak_rss_mb",
                "train_process_peak_rss_mb"):
        if key in res:
            summary[key] = res[key]
    if "train_s_per_iter" in res:
        summary["train_gflops_per_s"] = res["train_flops"] / GIGA / res["train_s_per_iter"]
        summary["train_utilization"] = summary["train_gflops_per_s"] / peak
    if "test_s_per_view" in res:
        summary["test_gflops_per_s"] = res["test_flops_per_view"] / GIGA / res["test_s_per_view"]
        summary["test_utilization"] = summary["test_gflops_per_s"] / peak
    summary["peak_gflops_per_s"] = peak
    summary["peak_gflops_per_s_fp32"], summary["peak_gflops_per_s_bf16"] = peaks["fp32"], peaks["bf16"]
    if torch.cuda.is_available() and str(args.device) != "cpu":
        summary["cuda_peak_mb"] = max(res.get("train_cuda_peak_mb") or 0.0, res.get("test_cuda_peak_mb") or 0.0)
    summary["machine"] = machine_name()
    line = json.dumps(summary)
    if args.save:
        os.makedirs(os.path.dirname(os.path.abspath(args.save)), exist_ok=True)
        with open(args.save, "w") as handle:
            handle.write(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
