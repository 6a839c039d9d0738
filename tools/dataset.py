"""The dataset command line: ``python -m tools.dataset SUBCOMMAND ...`` (``--help`` lists them).

    synthetic     render a synthetic train/validation/test dataset (tools/synthetic.py)
    spiral        write test poses on the original's Archimedean spiral
    interpolate   write a test trajectory interpolating training poses, as the original did
    nn_baseline   score the nearest training view for each test view (tools/nn_baseline.py)
    from_capture  photos or a video -> structure from motion (pycolmap) -> train/validation/test (tools/capture.py)
    from_colmap   convert an existing COLMAP model, read with pycolmap (tools/colmap_import.py)
    from_nerf_synthetic  convert a NeRF-synthetic ("Blender") scene (tools/nerf_synthetic.py)

Bad input ends the command with one ``error: ...`` line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

import data_util
from tools import capture, colmap_import, nerf_synthetic, nn_baseline, synthetic

# Subcommands with their own parser (``SUBCOMMAND --help`` lists their flags): main() hands the arguments to
# the module's main().
DELEGATED = {"from_capture": capture, "from_colmap": colmap_import, "from_nerf_synthetic": nerf_synthetic}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.dataset", description="DeepVoxels dataset tools.")
    sub = parser.add_subparsers(dest="command", required=True)

    synth = sub.add_parser("synthetic", help="render a synthetic train/validation/test dataset")
    synth.add_argument("--out", required=True, help="output root; writes <out>/{train,validation,test}/<object>")
    synth.add_argument("--object", default="cube", choices=synthetic.OBJECT_NAMES, help="which synthetic object")
    synth.add_argument("--resolution", type=int, default=128, help="image side length in pixels")
    synth.add_argument("--num_train", type=int, default=50, help="number of training views")
    synth.add_argument("--num_val", type=int, default=25, help="number of validation views")
    synth.add_argument("--num_test", type=int, default=50, help="number of test views (spiral)")
    synth.add_argument("--radius", type=float, default=synthetic.SYNTH_RADIUS,
                       help="camera distance from the origin, world units")
    synth.add_argument("--seed", type=int, default=0, help="random seed for the camera positions")

    spiral = sub.add_parser("spiral", help="write test poses on the Archimedean spiral")
    spiral.add_argument("--out", required=True, help="output pose folder (files %%06d.txt)")
    spiral.add_argument("--num_views", type=int, default=data_util.SPIRAL_ORIGINAL_VIEWS, help="number of poses")
    spiral.add_argument("--radius", type=float, default=synthetic.SYNTH_RADIUS,
                        help="camera distance from the origin, world units")

    interp = sub.add_parser("interpolate", help="write a test trajectory interpolating training poses")
    interp.add_argument("--train_pose_dir", required=True, help="folder of training pose *.txt files")
    interp.add_argument("--out", required=True, help="output pose folder")
    interp.add_argument("--num_samples", type=int, default=10, help="number of interpolated segments")
    interp.add_argument("--num_steps", type=int, default=100, help="poses per segment")
    interp.add_argument("--seed", type=int, default=0, help="random seed for the pose choice")

    baseline = sub.add_parser("nn_baseline", help="score the nearest training view for each test pose "
                                                  "(metrics as in test mode)")
    baseline.add_argument("--train_root", required=True, help="training object folder (rgb/, pose/)")
    baseline.add_argument("--test_root", required=True, help="test object folder with ground truth (rgb/, pose/)")
    baseline.add_argument("--img_sidelength", type=int, default=512,
                          help="side in pixels the images are scored at (as run_deepvoxels --img_sidelength)")
    baseline.add_argument("--out", default="", help="output folder (default: nn_baseline/<test object>)")

    sub.add_parser("from_capture", add_help=False,
                   help="photos or a video -> structure from motion (pycolmap) -> train/validation/test dataset")
    sub.add_parser("from_colmap", help="convert an existing COLMAP model into an object folder", add_help=False)
    sub.add_parser("from_nerf_synthetic", add_help=False,
                   help="convert a NeRF-synthetic (Blender, transforms_*.json) scene into a train/validation/test "
                        "dataset")
    return parser


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise data_util.DataError(f"--{name}: expected a positive integer, got {value}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point; returns the exit code (2 on bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if argv and argv[0] in DELEGATED:
        return DELEGATED[argv[0]].main(argv[1:])
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "synthetic":
            for name in ("resolution", "num_train", "num_test"):
                _positive(name, getattr(args, name))
            folders = synthetic.make_synthetic_dataset(args.out, args.object, args.resolution, args.num_train,
                                                       args.num_val, args.num_test, args.seed, args.radius)
            print("wrote " + ", ".join(f"{k}: {v}" for k, v in folders.items()))
        elif args.command == "spiral":
            _positive("num_views", args.num_views)
            poses = data_util.archimedean_spiral_poses(args.radius, args.num_views)
            paths = data_util.write_pose_folder(args.out, poses)
            print(f"wrote {len(paths)} spiral poses to {args.out}")
        elif args.command == "interpolate":
            _positive("num_samples", args.num_samples)
            _positive("num_steps", args.num_steps)
            paths = data_util.interpolate_training_poses(args.train_pose_dir, args.out, args.num_samples,
                                                         args.num_steps, args.seed)
            print(f"wrote {len(paths)} interpolated poses to {args.out}")
        elif args.command == "nn_baseline":
            _positive("img_sidelength", args.img_sidelength)
            out = args.out or os.path.join("nn_baseline", os.path.basename(os.path.normpath(args.test_root)))
            summary = nn_baseline.run_nn_baseline(args.train_root, args.test_root, args.img_sidelength, out)
            line = f"baseline PSNR {summary['psnr']:.2f} dB  SSIM {summary['ssim']:.4f}"
            if "lpips" in summary:
                line += f"  LPIPS {summary['lpips']:.4f}"
            print(line + f"  over {summary['num_views']} views ({out}: metrics.csv, metrics.json)")
    except (ValueError, OSError) as err:  # DataError is a ValueError
        print(f"error: {data_util.one_line(err)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
