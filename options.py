"""The command line of run_deepvoxels.py: the original's flags (same names, defaults and meaning) and ours.

``--help`` is grouped as a user reads it; ``--config FILE`` takes the same flags from YAML.
"""
from __future__ import annotations

import argparse
import logging
import math
import re
from typing import Any, Optional, Sequence

import configargparse

import util

log = logging.getLogger("deepvoxels")

FEATURE_MAP_SIZE = 64  # side of the lifted feature map and of the rendered view volume (fixed in the original)
MIN_IMG_EXPONENT = 1  # --img_sidelength must be FEATURE_MAP_SIZE * 2**k with k >= this
SUMMARY_EVERY = 100  # steps between image summaries (original)

# Flags that shape the networks: a checkpoint only loads into a model built with the same values. Test mode
# reads them from the checkpoint; given explicitly, they must agree with it.
MODEL_DEFAULTS = {"img_sidelength": 512, "grid_dim": 32, "num_grid_feats": 64, "nf0": 64, "no_occlusion_net": False}
MODEL_FLAGS = tuple(MODEL_DEFAULTS)

REMOVED_FLAGS = {
    "cpu_allocator": "the caching CPU allocator it chose was removed (it only lowered CPU peak memory at 512 px); "
                     "a heap can still be tuned from outside, see docs/performance.md",
}

EPILOG = "Flags can also come from a YAML file: --config FILE, one 'flag_name: value' per line; the command line wins."


class _HelpFormatter(configargparse.RawDescriptionHelpFormatter):
    """Shows a flag's default once, and none for required flags or flags without one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.required or action.default in (None, "", False, argparse.SUPPRESS) or "default" in text
                or not action.option_strings):
            return text
        return f"{text} (default: {action.default})"


class _Parser(configargparse.ArgumentParser):
    def error(self, message: str):  # one line through main(), not argparse's usage block and exit
        raise util.UsageError(message)


def build_parser() -> configargparse.ArgumentParser:
    p = _Parser(description=__doc__.splitlines()[0], formatter_class=_HelpFormatter, epilog=EPILOG,
                config_file_parser_class=configargparse.YAMLConfigFileParser, add_config_file_help=False,
                add_env_var_help=False)
    p.add_argument("--config", is_config_file=True, help="YAML file with flags (the command line wins)")

    g = p.add_argument_group("required")
    g.add_argument("--train_test", required=True, choices=("train", "test"), help="train a model, or render its test poses")
    g.add_argument("--data_root", required=True, help="object folder with rgb/, pose/ and intrinsics.txt")
    g.add_argument("--logging_root", required=True, help="folder for checkpoints, TensorBoard runs and renders")

    g = p.add_argument_group("model (test mode reads these from the checkpoint; given, they must match it)")
    g.add_argument("--img_sidelength", type=int, default=None,
                   help="side of input and rendered images in pixels: 64*2^k with k >= 1, e.g. 128, 256, 512 "
                        f"(default: {MODEL_DEFAULTS['img_sidelength']})")
    g.add_argument("--grid_dim", type=int, default=None,
                   help=f"voxels per grid side, a multiple of 4 (default: {MODEL_DEFAULTS['grid_dim']})")
    g.add_argument("--num_grid_feats", type=int, default=None,
                   help=f"features per voxel (default: {MODEL_DEFAULTS['num_grid_feats']})")
    g.add_argument("--nf0", type=int, default=None,
                   help=f"features in the outermost layer of the U-Nets (default: {MODEL_DEFAULTS['nf0']})")
    g.add_argument("--no_occlusion_net", action="store_true", default=None,
                   help="replace the occlusion net by a 2D depth-collapse net (the paper's ablation)")
    g.add_argument("--near_plane", type=float, default=math.sqrt(3) / 2,
                   help="near plane in world units, used where intrinsics.txt gives 0")
    g.add_argument("--batchnorm_init", choices=("uniform", "ones"), default="uniform",
                   help="BatchNorm scales of a new model: 'uniform' in [0, 1) as PyTorch 1.0 (the original's) drew "
                        "them, or 'ones' as PyTorch >= 1.2 does")

    g = p.add_argument_group("schedule")
    g.add_argument("--max_epoch", type=int, default=400, help="epochs to train for")
    g.add_argument("--max_steps", type=int, default=0, help="stop after this many steps in total (0: no limit)")
    g.add_argument("--lr", type=float, default=0.0004, help="Adam learning rate of generator and discriminator")
    g.add_argument("--l1_weight", type=float, default=200, help="weight of the L1 loss against the GAN loss")
    g.add_argument("--num_trgt", type=int, default=2,
                   help="target views per step: the anchor view plus num_trgt-1 random views")
    g.add_argument("--sampling_pattern", default="all", help="'all' views, or 'skip_N' to keep every (N+1)-th view")
    g.add_argument("--seed", type=int, default=0, help="seed of python, numpy and torch")
    g.add_argument("--num_workers", type=int, default=0,
                   help="DataLoader workers (views are cached in memory; 0 keeps --resume exact)")

    g = p.add_argument_group("checkpoints and resume")
    g.add_argument("--checkpoint", default="",
                   help="train: start from this checkpoint's weights (model and discriminator) at --start_epoch "
                        "with fresh optimizers; test: the model to render (required)")
    g.add_argument("--start_epoch", type=int, default=0, help="epoch to start at (step = start_epoch * views)")
    g.add_argument("--resume", nargs="?", const="newest", default="", metavar="FILE",
                   help="continue exactly (weights, optimizers, step, random state) from FILE, or without FILE "
                        "from the highest-step checkpoint under --logging_root, in its run folder")
    g.add_argument("--checkpoint_every", type=int, default=10000, help="steps between checkpoints")
    g.add_argument("--keep_checkpoints", type=int, default=3, help="newest step checkpoints kept per run (0: all)")
    g.add_argument("--experiment_name", default="", help="suffix of the run folder's name")

    g = p.add_argument_group("validation and test")
    g.add_argument("--val_root", default="", help="validation object folder (default: the sibling validation/<object>)")
    g.add_argument("--val_every", type=int, default=1000, help="steps between validations (0: only at the end)")
    g.add_argument("--val_views", type=int, default=0, help="validation views rendered (0: all)")
    g.add_argument("--view_batch", type=int, default=0,
                   help="views rendered per forward pass in test mode and validation (0: 8 views, fewer on a CPU "
                        "so that a forward renders at most 2 x 512^2 pixels: 2 views at 512 px)")

    g = p.add_argument_group("live viewer (python -m viewer shows a checkpoint)")
    g.add_argument("--live_viewer", action="store_true",
                   help="serve the web viewer during training, showing the current weights (address printed)")
    g.add_argument("--viewer_port", type=int, default=8080, help="port of the live viewer's page")
    g.add_argument("--viewer_every", type=int, default=10,
                   help="steps between the live viewer's renders, at most one render per this many steps")

    g = p.add_argument_group("performance")
    g.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N or mps")
    g.add_argument("--amp", choices=("off", "bf16", "fp16"), default="off", help="autocast precision")
    g.add_argument("--compile", action="store_true", help="torch.compile the 2D and 3D networks")
    g.add_argument("--tf32", action="store_true",
                   help="CUDA: float32 convolutions and matrix products on TF32 tensor cores (faster, about 1e-3 "
                        "relative error; the original computed in full float32)")
    g.add_argument("--save_memory", action="store_true",
                   help="recompute more layers in the backward pass instead of keeping their activations (same "
                        "values, slower); on a GPU also step the generator parameter by parameter in its backward "
                        "pass; on a Linux CPU also keep glibc's default heap, which returns freed memory to the "
                        "system (less memory, more page faults)")
    g.add_argument("--threads", type=int, default=0, help="CPU threads of torch (0: torch's default)")
    for name in REMOVED_FLAGS:
        g.add_argument(f"--{name}", default=None, help=argparse.SUPPRESS)

    g = p.add_argument_group("logging")
    g.add_argument("--summary_every", type=int, default=SUMMARY_EVERY, help="steps between TensorBoard images")
    g.add_argument("--progress_every", type=float, default=60.0,
                   help="seconds between progress lines when the output is not a terminal (no progress bar)")
    g.add_argument("--log_level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   type=str.upper, help="logging level")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> configargparse.Namespace:
    """Parse and check the flags. ``opt.explicit_model_flags`` names the model flags that were given."""
    opt = build_parser().parse_args(argv)
    opt.explicit_model_flags = [k for k in MODEL_FLAGS if getattr(opt, k) is not None]
    for key, value in MODEL_DEFAULTS.items():
        if getattr(opt, key) is None:
            setattr(opt, key, value)
    for name, why in REMOVED_FLAGS.items():
        if getattr(opt, name) is not None:
            log.warning("--%s is ignored: %s", name, why)
        delattr(opt, name)
    if str(opt.resume).lower() in ("true", "false"):  # a YAML boolean, as in configs written for the old switch
        opt.resume = "newest" if str(opt.resume).lower() == "true" else ""
    check_model_flags(opt)
    for flag in ("num_grid_feats", "num_trgt", "checkpoint_every", "viewer_every"):
        if getattr(opt, flag) < 1:
            raise util.UsageError(f"--{flag} {getattr(opt, flag)}: must be at least 1")
    if opt.view_batch < 0:
        raise util.UsageError(f"--view_batch {opt.view_batch}: must be 0 (the default for the device) or more")
    if opt.sampling_pattern != "all" and not re.fullmatch(r"skip_\d+", opt.sampling_pattern):
        raise util.UsageError(f"--sampling_pattern {opt.sampling_pattern!r}: expected 'all' or 'skip_N'")
    if opt.train_test == "test" and not opt.checkpoint:
        raise util.UsageError("--checkpoint is required with --train_test test")
    if opt.progress_every <= 0:
        raise util.UsageError(f"--progress_every {opt.progress_every}: must be positive")
    return opt


def check_model_flags(opt: Any) -> None:
    exponent = util.num_divisible_by_2(opt.img_sidelength) if opt.img_sidelength > 0 else -1
    if opt.img_sidelength != FEATURE_MAP_SIZE * 2 ** max(exponent - 6, 0) or exponent - 6 < MIN_IMG_EXPONENT:
        sizes = ", ".join(str(FEATURE_MAP_SIZE * 2 ** k) for k in range(MIN_IMG_EXPONENT, 5))
        raise util.UsageError(f"--img_sidelength {opt.img_sidelength}: the networks need {FEATURE_MAP_SIZE}*2^k "
                              f"pixels with k >= {MIN_IMG_EXPONENT}, e.g. {sizes}")
    if opt.grid_dim < 4 or opt.grid_dim % 4:
        raise util.UsageError(f"--grid_dim {opt.grid_dim}: must be a positive multiple of 4 (the inpainting U-Net "
                              f"halves it twice)")
    if opt.num_grid_feats < 1:
        raise util.UsageError(f"--num_grid_feats {opt.num_grid_feats}: must be at least 1")
    if opt.nf0 < 2:
        raise util.UsageError(f"--nf0 {opt.nf0}: must be at least 2")


def plain_config(opt: Any) -> dict[str, Any]:
    """The resolved flags as plain JSON types (what ``torch.load(weights_only=True)`` accepts)."""
    import json
    skip = ("config", "explicit_model_flags")
    return json.loads(json.dumps({k: v for k, v in vars(opt).items() if k not in skip}, default=float))
