"""Train DeepVoxels on one object, or render a trained model's test poses.

    python run_deepvoxels.py --train_test train --data_root DATA/train/cube --logging_root logs/
    python run_deepvoxels.py --train_test test --data_root DATA/test/cube --logging_root logs/ --checkpoint CKPT

Every flag of the original keeps its name, default and meaning; ``--config FILE`` reads flags from YAML.
"""
from __future__ import annotations

import contextlib
import csv
import datetime
import glob
import inspect
import json
import logging
import math
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import configargparse
import numpy as np
import torch
from torch import nn

import cpu_allocator
import data_util
import util
from deep_voxels import DeepVoxels
from losses import GANLoss, PatchDiscriminator
from projection import EmptyFrustumError, ProjectionHelper

log = logging.getLogger("deepvoxels")

FEATURE_MAP_SIZE = 64  # side of the lifted feature map and of the rendered view volume (fixed in the original)
BORDER = 5  # pixels left out of the loss and cropped from test renders ("boundary errors", original)
SUMMARY_EVERY = 100  # steps between image summaries (original)
MIN_IMG_EXPONENT = 1  # --img_sidelength must be FEATURE_MAP_SIZE * 2**k with k >= this
UINT16_MAX = 2 ** 16 - 1
CHECKPOINT_RE = re.compile(r"model-epoch_(\d+)_iter_(\d+)\.pth$")
MODEL_FLAGS = ("img_sidelength", "grid_dim", "num_grid_feats", "nf0", "no_occlusion_net")


UsageError = util.UsageError


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------

class _HelpFormatter(configargparse.ArgumentDefaultsHelpFormatter, configargparse.RawDescriptionHelpFormatter):
    """Defaults in the help, and the module docstring's command lines kept as written."""


def build_parser() -> configargparse.ArgumentParser:
    p = configargparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter,
                                      config_file_parser_class=configargparse.YAMLConfigFileParser)
    p.add_argument("--config", is_config_file=True, help="YAML file with flags (command line wins)")
    # The original's flags: same names, defaults and meaning.
    p.add_argument("--train_test", type=str, required=True, help="'train' or 'test'")
    p.add_argument("--data_root", required=True, help="object folder with rgb/, pose/ and intrinsics.txt")
    p.add_argument("--logging_root", required=True, help="folder for checkpoints, TensorBoard runs and renders")
    p.add_argument("--experiment_name", type=str, default="", help="suffix of the run folder name")
    p.add_argument("--max_epoch", type=int, default=400, help="epochs to train for")
    p.add_argument("--lr", type=float, default=0.0004, help="Adam learning rate (generator and discriminator)")
    p.add_argument("--l1_weight", type=float, default=200, help="weight of the L1 loss against the GAN loss")
    p.add_argument("--sampling_pattern", type=str, default="all",
                   help="'all' views, or 'skip_N' to keep every (N+1)-th view")
    p.add_argument("--img_sidelength", type=int, default=512,
                   help="side of input and rendered images in pixels: 128, 256, 512 or 1024")
    p.add_argument("--no_occlusion_net", action="store_true", default=False,
                   help="replace the occlusion net by a 2D depth-collapse net (ablation)")
    p.add_argument("--num_trgt", type=int, default=2,
                   help="target views per training step: the anchor view plus num_trgt-1 random views")
    p.add_argument("--checkpoint", default="", help="checkpoint to load (train: also optimizers and step)")
    p.add_argument("--start_epoch", type=int, default=0, help="epoch to start at (step = start_epoch * views)")
    p.add_argument("--grid_dim", type=int, default=32, help="voxels per grid side")
    p.add_argument("--num_grid_feats", type=int, default=64, help="features per voxel")
    p.add_argument("--nf0", type=int, default=64, help="features in the outermost layer of the U-Nets")
    p.add_argument("--near_plane", type=float, default=math.sqrt(3) / 2,
                   help="near plane in world units, used when intrinsics.txt gives 0")
    # Additions.
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N or mps")
    p.add_argument("--seed", type=int, default=0, help="seed for python, numpy and torch")
    p.add_argument("--num_workers", type=int, default=0,
                   help="DataLoader workers (views are cached in memory; 0 keeps --resume bit-exact)")
    p.add_argument("--max_steps", type=int, default=0, help="stop after this many steps in total (0: no limit)")
    p.add_argument("--checkpoint_every", type=int, default=10000, help="steps between checkpoints")
    p.add_argument("--keep_checkpoints", type=int, default=3, help="newest step checkpoints to keep (0: all)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint under --logging_root, in its run folder")
    p.add_argument("--summary_every", type=int, default=SUMMARY_EVERY, help="steps between image summaries")
    p.add_argument("--val_root", default="", help="validation object folder (default: sibling validation/<obj>)")
    p.add_argument("--val_every", type=int, default=1000, help="steps between validations (0: only at the end)")
    p.add_argument("--val_views", type=int, default=0, help="validation views to render (0: all)")
    p.add_argument("--view_batch", type=int, default=8, help="views rendered per forward in test mode and validation")
    p.add_argument("--amp", choices=("off", "bf16", "fp16"), default="off", help="autocast precision")
    p.add_argument("--compile", action="store_true", help="torch.compile the 2D and 3D networks")
    p.add_argument("--tf32", action="store_true",
                   help="CUDA: float32 convolutions and matrix products on TF32 tensor cores (faster, ~1e-3 "
                        "relative error; off by default, as the original computed in full float32)")
    p.add_argument("--save_memory", action="store_true",
                   help="recompute cheap layers at any image size, and the full-resolution layers and the view "
                        "volumes, in the backward pass instead of keeping them (same values); on CPU also return "
                        "freed blocks of 1 MiB and up to the OS, on a GPU also step the generator parameter by "
                        "parameter in its backward pass. With --cpu_allocator system at 512 px: CPU peak RSS "
                        "5.2 -> 4.6 GB, ~50%% slower; the default pool allocator reaches 4.6 GB without it")
    p.add_argument("--cpu_allocator", choices=("auto", "pool", "system"), default="auto",
                   help="CPU runs: 'pool' serves tensors of 1 MiB and up from a cache kept within the peak of "
                        "live tensors + 64 MB (cpu_allocator.py; compiled on first use, ~1 s; falls back to "
                        "'system' with a warning): at 512 px peak RSS 5.2 -> 4.6 GB and ~8%% faster. 'system': "
                        "the C library's malloc. 'auto': the pool from 512 px up (below it the pool was slower)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0: torch's default; 1 is steadier on a shared machine)")
    p.add_argument("--log_level", default="INFO", help="logging level")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> configargparse.Namespace:
    opt = build_parser().parse_args(argv)
    if opt.train_test not in ("train", "test"):
        raise UsageError(f"--train_test {opt.train_test!r}: expected 'train' or 'test'")
    exponent = util.num_divisible_by_2(opt.img_sidelength) if opt.img_sidelength > 0 else -1
    if opt.img_sidelength != FEATURE_MAP_SIZE * 2 ** max(exponent - 6, 0) or exponent - 6 < MIN_IMG_EXPONENT:
        sizes = ", ".join(str(FEATURE_MAP_SIZE * 2 ** k) for k in range(MIN_IMG_EXPONENT, 5))
        raise UsageError(f"--img_sidelength {opt.img_sidelength}: the networks need {FEATURE_MAP_SIZE}*2^k "
                         f"pixels with k >= {MIN_IMG_EXPONENT}, e.g. {sizes}")
    if opt.grid_dim < 4 or opt.grid_dim % 4:
        raise UsageError(f"--grid_dim {opt.grid_dim}: must be a positive multiple of 4 (the inpainting U-Net "
                         f"halves it twice)")
    for flag in ("num_grid_feats", "nf0", "num_trgt", "checkpoint_every", "view_batch"):
        if getattr(opt, flag) < 1:
            raise UsageError(f"--{flag} {getattr(opt, flag)}: must be at least 1")
    if opt.nf0 < 2:
        raise UsageError(f"--nf0 {opt.nf0}: must be at least 2")
    if opt.sampling_pattern != "all" and not re.fullmatch(r"skip_\d+", opt.sampling_pattern):
        raise UsageError(f"--sampling_pattern {opt.sampling_pattern!r}: expected 'all' or 'skip_N'")
    if opt.train_test == "test" and not opt.checkpoint:
        raise UsageError("--checkpoint is required with --train_test test")
    return opt


# ----------------------------------------------------------------------------------------------------------
# Set-up shared by training, testing, the benchmarks and the tests
# ----------------------------------------------------------------------------------------------------------

def plain_config(opt: Any) -> dict[str, Any]:
    """The resolved flags as plain JSON types (what ``torch.load(weights_only=True)`` accepts)."""
    return json.loads(json.dumps({k: v for k, v in vars(opt).items() if k != "config"}, default=float))


def build_geometry(intrinsics_path: str, grid_dim: int, near_plane_flag: float,
                   device: torch.device = torch.device("cpu")) -> ProjectionHelper:
    """The original's set-up from intrinsics.txt: grid centre, voxel size, near plane and 64x64 intrinsics."""
    _, barycenter, scale, near_plane, _ = data_util.parse_intrinsics(intrinsics_path, FEATURE_MAP_SIZE)
    if near_plane == 0.0:
        near_plane = near_plane_flag
    intrinsic = data_util.parse_intrinsics(intrinsics_path, FEATURE_MAP_SIZE)[0]
    voxel_size = (1.0 / grid_dim) * scale
    grid2world = torch.eye(4, dtype=torch.float32)
    grid2world[:3, 3] = torch.as_tensor(np.asarray(barycenter, dtype=np.float32))
    return ProjectionHelper(lifting_intrinsic=intrinsic, projection_intrinsic=intrinsic,
                            projection_image_dims=[FEATURE_MAP_SIZE] * 2, lifting_image_dims=[FEATURE_MAP_SIZE] * 2,
                            depth_min=0.0, depth_max=grid_dim * voxel_size + near_plane, grid_dims=[grid_dim] * 3,
                            voxel_size=voxel_size, near_plane=near_plane, frustum_depth=2 * grid_dim,
                            grid2world=grid2world.to(device))


def build_model(opt: Any) -> DeepVoxels:
    model = DeepVoxels(img_sidelength=opt.img_sidelength, lifting_img_dims=[FEATURE_MAP_SIZE] * 2,
                       frustrum_img_dims=[FEATURE_MAP_SIZE] * 2, grid_dims=[opt.grid_dim] * 3,
                       use_occlusion_net=not opt.no_occlusion_net, num_grid_feats=opt.num_grid_feats, nf0=opt.nf0)
    model.save_memory(getattr(opt, "save_memory", False))
    return model


def infer_model_config(state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Model flags recovered from a state_dict's shapes (works for the original's checkpoints too)."""
    grid = state_dict["deepvoxels"].shape  # (1, C, G, G, G)
    downs = {int(m.group(1)) for k in state_dict
             for m in [re.match(r"feature_extractor\.net\.0\.downs\.(\d+)\.", k)] if m}
    config = {"grid_dim": int(grid[-1]), "num_grid_feats": int(grid[1]),
              "img_sidelength": FEATURE_MAP_SIZE * 2 ** len(downs),
              "no_occlusion_net": not any(k.startswith("occlusion_net.") for k in state_dict)}
    first = state_dict.get("feature_extractor.net.0.downs.0.net.1.weight")
    if first is not None:
        config["nf0"] = int(first.shape[0])
    return config


def check_compatible(path: str, state_dict: dict[str, torch.Tensor], opt: Any) -> None:
    """Raise CheckpointError naming every model flag on which the checkpoint and the command line differ."""
    if "deepvoxels" not in state_dict:
        raise util.CheckpointError(f"checkpoint {path}: not a DeepVoxels model (no 'deepvoxels' grid)")
    found = infer_model_config(state_dict)
    diffs = [f"{k} {found[k]} in the checkpoint, {getattr(opt, k)} given" for k in MODEL_FLAGS
             if k in found and found[k] != getattr(opt, k)]
    if diffs:
        raise util.CheckpointError(f"checkpoint {path} was trained with other flags: " + "; ".join(diffs))


class MappingCache:
    """Lifting / projection indices per pose. Poses are fixed, so each is computed once and reused."""

    def __init__(self, geometry: ProjectionHelper, device: torch.device):
        self.geometry = geometry
        self.device = device
        self._lift: dict[bytes, Any] = {}
        self._proj: dict[bytes, Any] = {}

    def _get(self, table: dict, fn, pose: torch.Tensor):
        pose = pose.reshape(4, 4).to(torch.float32)
        key = pose.cpu().numpy().tobytes()
        if key not in table:
            try:
                table[key] = fn(pose.to(self.device))
            except EmptyFrustumError as err:
                table[key] = err
        value = table[key]
        if isinstance(value, EmptyFrustumError):
            raise value
        return value

    def lift(self, pose: torch.Tensor):
        return self._get(self._lift, self.geometry.lifting_indices, pose)

    def project(self, pose: torch.Tensor):
        return self._get(self._proj, self.geometry.projection_indices, pose)


def compile_networks(model: DeepVoxels, discriminator: Optional[nn.Module] = None) -> None:
    """torch.compile the convolutional networks in place (state_dict keys unchanged)."""
    names = ("feature_extractor", "rendering_net", "occlusion_net", "depth_collapse_net", "inpainting_net",
             "integration_net")
    if model.recompute_view_volume:
        log.warning("--save_memory is off under --compile: the compiler chooses what the backward pass keeps")
    model.save_memory(False)
    model.recompute_cheap_layers = False  # its hooks would break the compiled graphs
    for name in names:
        if hasattr(model, name):
            getattr(model, name).compile()
    if discriminator is not None:
        discriminator.compile()


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` widened to float32 when autocast made it narrower (bf16/fp16); float32 and float64 unchanged, so
    that a float64 step stays float64 (``.float()`` would round D's output and the L1 input, and with them
    every gradient, to float32)."""
    return x.float() if x.is_floating_point() and x.element_size() < 4 else x


def autocast(opt: Any, device: torch.device):
    if opt.amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if opt.amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def run_folder_name(opt: Any, now: datetime.datetime) -> str:
    """The original's run folder: MM_DD/HH-MM-SS_<pattern>_<l1>_l1_weight_<n>_trgt__<object><experiment>."""
    obj = opt.data_root.strip("/").split("/")[-1]
    return os.path.join(now.strftime("%m_%d"), now.strftime("%H-%M-%S_") + f"{opt.sampling_pattern}_"
                        + f"{opt.l1_weight:0.2f}_l1_weight_" + f"{opt.num_trgt}_trgt_" + "_" + obj
                        + opt.experiment_name)


def list_checkpoints(folder: str) -> list[tuple[int, str]]:
    """(step, path) of the step checkpoints in ``folder``, oldest first."""
    found = []
    for path in glob.glob(os.path.join(folder, "model-epoch_*_iter_*.pth")):
        m = CHECKPOINT_RE.search(path)
        if m:
            found.append((int(m.group(2)), path))
    return sorted(found)


def newest_checkpoint(logging_root: str) -> Optional[str]:
    """The step checkpoint with the highest step under ``logging_root``/logs (newest file on ties)."""
    candidates = []
    for path in glob.glob(os.path.join(logging_root, "logs", "**", "model-epoch_*_iter_*.pth"), recursive=True):
        m = CHECKPOINT_RE.search(path)
        if m:
            candidates.append((int(m.group(2)), os.path.getmtime(path), path))
    return max(candidates)[2] if candidates else None


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------

def _discriminator_step_keeping_versions(step_fn, params: list[nn.Parameter]) -> None:
    """Step D's optimizer the way PyTorch 1.0 did, so that the generator's backward through D, which runs
    next, uses the *updated* D weights.

    PyTorch 1.0 optimizers wrote ``p.data``, which autograd did not track. Current optimizers write ``p``
    in place, which bumps its version counter, and the generator's backward (whose graph saved the old
    version) would raise "modified by an inplace operation". Restoring the counters gives 1.0's arithmetic:
    saved activations from the forward pass, current weights in the backward pass.
    """
    versions = tuple(p._version for p in params)
    step_fn()
    torch._C._autograd._unsafe_set_version_counter(tuple(params), versions)


def write_summaries(writer, step: int, opt: Any, losses: dict[str, float], outputs: list[torch.Tensor],
                    targets: list[torch.Tensor], depths: list[torch.Tensor], nearest: torch.Tensor,
                    model: DeepVoxels, lr: float) -> None:
    """TensorBoard: scalars every step; images and gate volumes every ``--summary_every`` steps."""
    for name, value in losses.items():
        writer.add_scalar(name, value, step)
    writer.add_scalar("out_min", outputs[0].min().item(), step)
    writer.add_scalar("out_max", outputs[0].max().item(), step)
    writer.add_scalar("trgt_min", targets[0].min().item(), step)
    writer.add_scalar("trgt_max", targets[0].max().item(), step)
    writer.add_scalar("learning_rate", lr, step)
    if step % opt.summary_every:
        return
    import torchvision
    depth_grid = torchvision.utils.make_grid([d.detach().float().squeeze(0).repeat(3, 1, 1).cpu() for d in depths],
                                             scale_each=True, normalize=True)
    writer.add_image("Depth", depth_grid.numpy(), step)
    writer.add_image("Nearest_neighbors_rgb", torchvision.utils.make_grid(nearest.float().cpu(), scale_each=True,
                                                                          normalize=True).numpy(), step)
    both = torch.cat([torch.cat(outputs, 0).detach().float().cpu(), torch.cat(targets, 0).float().cpu()], 0)
    writer.add_image("Output_vs_gt", torchvision.utils.make_grid(both, scale_each=True, normalize=True).numpy(), step)
    if model.last_gates is not None:
        for name, gate in zip(("update_gate", "reset_gate"), model.last_gates):
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


class _StopRequested(Exception):
    pass


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the message says where the last good state was saved."""


def _epoch_order(seed: int, epoch: int, n: int) -> list[int]:
    """The shuffled view order of one epoch, a pure function of (seed, epoch) so a resumed run can skip
    exactly the views it already trained on."""
    generator = torch.Generator().manual_seed(seed * 100003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def _worker_init(worker_id: int) -> None:
    # Forked workers would otherwise share one numpy state and draw identical "random" views.
    np.random.seed(torch.initial_seed() % 2 ** 32)


def _iterate(dataset, order: list[int], num_workers: int) -> Iterator:
    if num_workers == 0:
        for idx in order:
            yield dataset[idx]
        return
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, order), batch_size=None, shuffle=False,
                                         num_workers=num_workers, worker_init_fn=_worker_init)
    yield from loader


@dataclass
class DistContext:
    """Where this process stands in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(opt: Any) -> tuple[DistContext, torch.device]:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU); pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(), util.resolve_device(opt.device)
    import torch.distributed as dist
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if opt.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = util.resolve_device(opt.device)
        if device.type == "cuda":
            device = torch.device(f"cuda:{local_rank}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank=dist.get_rank(), world=dist.get_world_size()), device


def _all_reduce_mean_(tensors: Sequence[torch.Tensor], world: int) -> None:
    """Average float tensors across ranks in place, with one flattened all-reduce."""
    import torch.distributed as dist
    if not tensors:
        return
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for t in tensors:
        n = t.numel()
        t.data.copy_(flat[offset:offset + n].view_as(t))
        offset += n


def create_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Make Adam create its state (zero moments, step 0) for every parameter now, one at a time.

    Adam would create it inside the first training step, in between that step's activations; on a CPU those
    1.5 GB at 512 px then sit scattered through the C library's heap, whose gaps around them stay resident
    (0.27 GB more peak RSS). The state is Adam's own: each parameter is stepped once with a zero gradient at
    learning rate 0 (``p - 0 * 0 / eps``: unchanged), and the step counts are set back to 0, so the first
    real step is the same, bit for bit, as with the state created lazily.
    """
    rates = [group["lr"] for group in optimizer.param_groups]
    created = []
    try:
        for group in optimizer.param_groups:
            group["lr"] = 0.0
            for param in group["params"]:
                if param in optimizer.state:  # already has state (loaded or stepped): left as it is
                    continue
                param.grad = torch.zeros_like(param)
                optimizer.step()
                param.grad = None
                created.append(param)
    finally:
        for group, rate in zip(optimizer.param_groups, rates):
            group["lr"] = rate
    for param in created:
        optimizer.state[param]["step"].zero_()


class Trainer:
    """The networks, optimizers and one training step of the original loop (used by ``train`` and the
    benchmark, so both run the same code)."""

    def __init__(self, opt: Any, device: torch.device, dist_ctx: Optional[DistContext] = None):
        self.opt, self.device = opt, device
        self.dist = dist_ctx or DistContext()
        save_memory = getattr(opt, "save_memory", False)
        if save_memory and device.type == "cpu" and not util.return_freed_blocks_to_os():
            log.warning("--save_memory: cannot set the C library's mmap threshold (not glibc)")
        self.model = build_model(opt).to(device)
        # The default memory savers below (cheap-layer recompute, the generator stepped in its backward pass)
        # are paid for in Python work per layer and per parameter. On a CPU that hides behind the arithmetic;
        # a GPU waits for it: on an H200 at 512 px they made a step 10-18% slower in fp32 and 2.6x slower in
        # bf16, for 1.7 GB of its memory (README, Performance). There they come only with --save_memory.
        savers_by_default = device.type == "cpu"
        if not savers_by_default:
            self.model.recompute_cheap_by_default = False
            self.model.save_memory(save_memory)
        self.discriminator = PatchDiscriminator(input_nc=3).to(device)
        self.criterion_gan = GANLoss()
        # Fused Adam: one kernel for all parameters, no full-size temporaries (same update up to rounding).
        adam = {"fused": True} if device.type in ("cpu", "cuda") else {"foreach": True}
        self.optimizer_d = torch.optim.Adam(self.discriminator.parameters(), lr=opt.lr, **adam)
        self.optimizer_g = torch.optim.Adam(self.model.parameters(), lr=opt.lr, **adam)
        self.d_params = list(self.discriminator.parameters())
        self.g_params = list(self.model.parameters())
        if device.type == "cpu":
            for optimizer in (self.optimizer_g, self.optimizer_d):
                create_adam_state(optimizer)
        self.scaler = torch.amp.GradScaler(device.type, enabled=opt.amp == "fp16")
        # Each generator parameter is stepped as soon as its gradient is complete, and the gradient freed:
        # the generator's 0.76 GB of gradients at 512 px never exist all at once. Same update, parameter by
        # parameter. Not under DDP (it all-reduces gradients after the hooks) nor with fp16's loss scaler
        # (it must see every gradient before stepping); on a GPU only with --save_memory (see above).
        self.step_in_backward = (not self.dist.enabled and not self.scaler.is_enabled()
                                 and (savers_by_default or save_memory))
        self._in_generator_backward = False
        for p in self.g_params:  # inert unless step_in_backward (an attribute, so a benchmark can flip it)
            p.register_post_accumulate_grad_hook(self._generator_param_ready)
        if opt.compile:
            compile_networks(self.model, self.discriminator)
        self.generator_fwd: nn.Module = self.model
        self.discriminator_fwd: nn.Module = self.discriminator
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [device.index] if device.type == "cuda" else None
            # Buffers are not broadcast from rank 0: the grid and BatchNorm statistics are averaged after
            # each step instead (average_buffers), so every rank's update counts.
            no_buffer_sync = ({"forward_sync_buffers": False}
                              if "forward_sync_buffers" in inspect.signature(DDP).parameters
                              else {"broadcast_buffers": False})
            self.generator_fwd = DDP(self.model, device_ids=ids, **no_buffer_sync)
            self.discriminator_fwd = DDP(self.discriminator, device_ids=ids, **no_buffer_sync)

    def _generator_param_ready(self, param: nn.Parameter) -> None:
        if self._in_generator_backward:
            # Every other generator gradient is None here (freed after its step, or not computed yet), so
            # Adam updates this parameter alone.
            self.optimizer_g.step()
            param.grad = None

    def average_buffers(self) -> None:
        """Make the replicas one model again after a step: mean of the updated grids and of the BatchNorm
        running statistics over the ranks (parameters are already equal through DDP's gradient all-reduce)."""
        if not self.dist.enabled:
            return
        buffers = [self.model.deepvoxels]
        for net in (self.model, self.discriminator):
            buffers += [b for name, b in net.named_buffers() if name.endswith(("running_mean", "running_var"))]
        _all_reduce_mean_(buffers, self.dist.world)

    def train_mode(self) -> None:
        self.model.train()
        self.discriminator.train()

    def step(self, nearest_rgb: torch.Tensor, lift: tuple[torch.Tensor, torch.Tensor],
             proj: Sequence[tuple[torch.Tensor, torch.Tensor]], target_rgbs: Sequence[torch.Tensor]
             ) -> tuple[dict[str, float], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """One iteration: integrate the nearest view, render the targets, D step, then G step.

        Args:
            nearest_rgb: (1, 3, S, S) input view; lift: its ``lifting_indices``.
            proj: per target view, its ``projection_indices``; target_rgbs: per target (1, 3, S, S).
        Returns:
            (losses, cropped outputs, cropped targets, raw depths).
        Raises:
            FloatingPointError: a loss is not finite; nothing was updated and the grid is restored.
        """
        model, disc, gan, opt = self.model, self.discriminator_fwd, self.criterion_gan, self.opt
        grid_before = model.deepvoxels
        targets = [t[:, :, BORDER:-BORDER, BORDER:-BORDER] for t in target_rgbs]
        # Under DDP the discriminator's passes for the generator loss must not arm its gradient reducer:
        # their backward only needs gradients for the generator.
        no_sync = disc.no_sync if self.dist.enabled else contextlib.nullcontext
        with autocast(opt, self.device):
            outputs, depths = self.generator_fwd(nearest_rgb, [p[0] for p in proj], [p[1] for p in proj],
                                                 lift[0], lift[1])
            outputs = [o[:, :, BORDER:-BORDER, BORDER:-BORDER] for o in outputs]
            losses_d, losses_g = [], []
            for out, gt in zip(outputs, targets):
                loss_d_fake = gan(at_least_float32(disc(out.detach())), False)
                loss_d_real = gan(at_least_float32(disc(gt)), True)
                losses_d.append((loss_d_fake + loss_d_real) * 0.5)
                with no_sync():
                    loss_g_gan = gan(at_least_float32(disc(out)), True)
                loss_g_l1 = torch.mean(torch.abs(at_least_float32(out) - gt)) * opt.l1_weight
                losses_g.append(loss_g_gan + loss_g_l1)
            loss_d = torch.stack(losses_d).mean()
            loss_g = torch.stack(losses_g).mean()
        finite = torch.isfinite(loss_d) & torch.isfinite(loss_g)
        if self.dist.enabled:  # all ranks must agree, or the healthy ones would wait in the all-reduce
            import torch.distributed as dist
            flag = finite.to(torch.int32).reshape(1)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            finite = flag[0].bool()
        if not finite:
            model.deepvoxels = grid_before  # the forward already replaced the grid
            raise FloatingPointError(f"non-finite loss (loss_g {loss_g.item()}, loss_d {loss_d.item()})")
        # Gradients are None here: every step frees them when it ends (below), so none carries over.
        try:
            self.scaler.scale(loss_d).backward()
            _discriminator_step_keeping_versions(lambda: self.scaler.step(self.optimizer_d), self.d_params)
            # Only the generator's parameters need this backward's gradients (D has already stepped).
            self._in_generator_backward = self.step_in_backward
            if self.step_in_backward:
                torch.autograd.backward(loss_g, inputs=self.g_params)
            else:
                torch.autograd.backward(self.scaler.scale(loss_g), inputs=self.g_params)
                self.scaler.step(self.optimizer_g)
            self.scaler.update()
        finally:
            self._in_generator_backward = False
            # Freed now rather than at the next step, where they would sit through the next forward pass at
            # its peak memory (0.76 GB at the paper's setting), and freed even when a step is interrupted.
            self.optimizer_d.zero_grad(set_to_none=True)
            self.optimizer_g.zero_grad(set_to_none=True)
        # Loss terms of the last target, as the original logged them.
        losses = {"discrim_loss": loss_d.item(), "gen_loss_total": loss_g.item(),
                  "gen_loss_l1": loss_g_l1.item(), "gen_loss_g": loss_g_gan.item()}
        return losses, outputs, targets, depths


@dataclass
class TrainResult:
    log_dir: str
    trainer: Trainer
    step: int
    stopped_by: Optional[int] = None  # the signal that ended training early, if any


def train(opt: Any, device: torch.device, dist_ctx: Optional[DistContext] = None) -> TrainResult:
    """The original's training loop with checkpoints, resume, validation and optional torchrun data
    parallelism. Rank 0 alone writes logs, summaries and checkpoints."""
    import dataio
    dist_ctx = dist_ctx or DistContext()
    main_rank = dist_ctx.is_main

    resume_path = ""
    if opt.resume:
        resume_path = newest_checkpoint(opt.logging_root) or ""
        if not resume_path:
            log.warning("--resume: no checkpoint under %s; starting a new run", opt.logging_root)
    ckpt_path = resume_path or opt.checkpoint
    payload = util.load_checkpoint(ckpt_path) if ckpt_path else None

    util.seed_everything(opt.seed)  # same seed on every rank: identical initial weights
    geometry = build_geometry(os.path.join(opt.data_root, "intrinsics.txt"), opt.grid_dim, opt.near_plane, device)
    trainer = Trainer(opt, device, dist_ctx)
    model, discriminator = trainer.model, trainer.discriminator
    optimizer_g, optimizer_d = trainer.optimizer_g, trainer.optimizer_d

    dataset = dataio.NovelViewTriplets(root_dir=opt.data_root, img_size=opt.img_sidelength,
                                       sampling_pattern=opt.sampling_pattern, num_trgt=opt.num_trgt)
    num_views = len(dataset)
    steps_per_epoch = math.ceil(num_views / dist_ctx.world)
    step, epoch, epoch_pos = opt.start_epoch * steps_per_epoch, opt.start_epoch, 0
    best_psnr = -math.inf
    if payload is not None:
        check_compatible(ckpt_path, payload["model"], opt)
        model.load_state_dict(payload["model"], strict=True)
        if "discriminator" in payload:
            discriminator.load_state_dict(payload["discriminator"], strict=True)
        if "optimizer_g" in payload:
            optimizer_g.load_state_dict(payload["optimizer_g"])
            optimizer_d.load_state_dict(payload["optimizer_d"])
            step, epoch, epoch_pos = int(payload["step"]), int(payload["epoch"]), int(payload["epoch_pos"])
            best_psnr = float(payload.get("best_psnr", best_psnr))
            if "rng" in payload and not dist_ctx.enabled:
                util.set_rng_state(payload["rng"])
            log.info("restored %s: step %d, epoch %d (+%d views)", ckpt_path, step, epoch, epoch_pos)
        else:
            log.info("loaded weights from %s (original format: optimizers start fresh)", ckpt_path)
    if dist_ctx.enabled:
        # Each rank draws its own triplets and dropout masks; resumed runs continue a fresh stream.
        np.random.seed([opt.seed, dist_ctx.rank, step])
        torch.manual_seed(int(np.random.randint(2 ** 31)))

    log_dir = run_dir = ""
    writer = validator = None
    config = plain_config(opt)
    if main_rank:
        if resume_path:
            log_dir = os.path.dirname(resume_path)
            run_dir = log_dir.replace(os.path.join(opt.logging_root, "logs"),
                                      os.path.join(opt.logging_root, "runs"), 1)
        else:
            name = run_folder_name(opt, datetime.datetime.now())
            log_dir = os.path.join(opt.logging_root, "logs", name)
            run_dir = os.path.join(opt.logging_root, "runs", name)
        os.makedirs(log_dir, exist_ok=True)
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(log_dir, "params.txt"), "w") as handle:
            handle.write("\n".join(f"{k}: {v}" for k, v in config.items()))
        with open(os.path.join(log_dir, "config.json"), "w") as handle:
            json.dump(config, handle, indent=1)
        from tensorboardX import SummaryWriter
        writer = SummaryWriter(run_dir)
        validator = Validator.create(opt, geometry, device)
        log.info("generator %s params, discriminator %s params, %d views, near plane %.4f, voxel %.4f, "
                 "device %s, %d process(es)", f"{util.count_parameters(model):,}",
                 f"{util.count_parameters(discriminator):,}", num_views, geometry.near_plane, geometry.voxel_size,
                 device, dist_ctx.world)
    mappings = MappingCache(geometry, device)

    def checkpoint_payload() -> dict[str, Any]:
        return {"model": model.state_dict(), "discriminator": discriminator.state_dict(),
                "optimizer_g": optimizer_g.state_dict(), "optimizer_d": optimizer_d.state_dict(),
                "step": step, "epoch": epoch, "epoch_pos": epoch_pos, "best_psnr": best_psnr,
                "rng": util.get_rng_state(), "config": config}

    def save(reason: str) -> str:
        if not main_rank:
            return ""
        path = os.path.join(log_dir, f"model-epoch_{epoch}_iter_{step}.pth")
        util.save_checkpoint(path, checkpoint_payload())
        if opt.keep_checkpoints > 0:
            for _, old in list_checkpoints(log_dir)[:-opt.keep_checkpoints]:
                os.remove(old)
        log.info("checkpoint (%s): %s", reason, path)
        return path

    stop = {"signal": None}

    def request_stop(signum, _frame):
        stop["signal"] = signum

    def stop_requested() -> bool:
        flag = stop["signal"] is not None
        if dist_ctx.enabled:  # every rank stops at the same step, or the collectives would hang
            import torch.distributed as dist
            t = torch.tensor([int(flag)], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        return flag

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    skipped = 0
    trainer.train_mode()
    from tqdm import tqdm
    total = opt.max_steps if opt.max_steps else opt.max_epoch * steps_per_epoch
    bar = tqdm(total=total, initial=min(step, total), desc="train", dynamic_ncols=True,
               disable=None if main_rank else True)
    try:
        while epoch < opt.max_epoch and not (opt.max_steps and step >= opt.max_steps):
            # One shared shuffle per epoch; rank r takes every world-th view of it (a distributed sampler).
            order = _epoch_order(opt.seed, epoch, num_views)[dist_ctx.rank::dist_ctx.world]
            for trgt_views, nearest_view in _iterate(dataset, order[epoch_pos:], opt.num_workers):
                if stop_requested():
                    raise _StopRequested()
                try:
                    lift_idx, lift_coords = mappings.lift(nearest_view["pose"])
                    proj = [mappings.project(view["pose"]) for view in trgt_views]
                except EmptyFrustumError as err:
                    if dist_ctx.enabled:
                        raise EmptyFrustumError(f"rank {dist_ctx.rank}: {err} (a skipped triplet would "
                                                f"desynchronise the ranks; fix the pose or the grid)") from None
                    skipped += 1
                    log.warning("skipping a training triplet (%d so far): %s", skipped, err)
                    epoch_pos += 1
                    continue
                nearest_rgb = nearest_view["gt_rgb"].to(device)[None]
                try:
                    losses, outputs, targets, depths = trainer.step(
                        nearest_rgb, (lift_idx, lift_coords), proj,
                        [v["gt_rgb"].to(device)[None] for v in trgt_views])
                except FloatingPointError as err:
                    raise FloatingPointError(f"step {step}: {err}") from None
                trainer.average_buffers()
                if main_rank:
                    metric_depths = [(d + 0.5) * int(np.ceil(np.sqrt(3) * opt.grid_dim)) * geometry.voxel_size
                                     + geometry.near_plane for d in depths]
                    write_summaries(writer, step, opt, losses, outputs, targets, metric_depths, nearest_rgb,
                                    model, optimizer_g.param_groups[0]["lr"])
                    bar.set_postfix(epoch=epoch, loss_g=f"{losses['gen_loss_total']:.3f}",
                                    loss_d=f"{losses['discrim_loss']:.3f}", refresh=False)
                    bar.update(1)
                step += 1
                epoch_pos += 1
                if step % opt.checkpoint_every == 0:
                    save("interval")
                if validator is not None and opt.val_every and step % opt.val_every == 0:
                    best_psnr = validator.run(model, writer, step, best_psnr, checkpoint_payload, log_dir)
                if opt.max_steps and step >= opt.max_steps:
                    break
            else:
                epoch += 1
                epoch_pos = 0
                continue
            break
    except _StopRequested:
        save(f"signal {stop['signal']}")
        log.info("stopped by signal %s at step %d; continue with --resume", stop["signal"], step)
        return TrainResult(log_dir, trainer, step, stopped_by=stop["signal"])
    except FloatingPointError as err:
        path = save("last good state before a non-finite loss")
        raise NonFiniteLossError(f"{err}; the last good state is in {path or 'rank 0 checkpoint'}") from err
    finally:
        bar.close()
        for s_, handler in previous.items():
            signal.signal(s_, handler)
        if writer is not None:
            writer.flush()
    if skipped:
        log.warning("%d training triplets were skipped because a camera saw none of the grid", skipped)
    if step % opt.checkpoint_every:
        save("end of training")
    if validator is not None and not (opt.val_every and step % opt.val_every == 0):
        validator.run(model, writer, step, best_psnr, checkpoint_payload, log_dir)
    if writer is not None:
        writer.close()
    return TrainResult(log_dir, trainer, step)


# ----------------------------------------------------------------------------------------------------------
# Rendering, validation and test
# ----------------------------------------------------------------------------------------------------------

def to_uint16(img: torch.Tensor) -> np.ndarray:
    """(3, H, W) render in [-1/2, 1/2] -> (H, W, 3) uint16, as the original's test() wrote it."""
    arr = img.detach().float().cpu().numpy().transpose(1, 2, 0) + 0.5
    return (arr * UINT16_MAX).round().clip(0, UINT16_MAX).astype(np.uint16)


def cropped_ground_truth(item: dict) -> np.ndarray:
    """A dataset item's image as (H, W, 3) in [0, 1] with the 5-pixel border cropped, as renders are scored."""
    return item["gt_rgb"].numpy().transpose(1, 2, 0)[BORDER:-BORDER, BORDER:-BORDER] + 0.5


def render_poses(model: DeepVoxels, mappings: MappingCache, poses: Sequence[torch.Tensor], view_batch: int,
                 opt: Any, device: torch.device, timings: Optional[list[float]] = None
                 ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield (index, image (3, S, S), raw depth (1, 64, 64)) for each pose, ``view_batch`` views per forward.

    The grid is inpainted once: it does not depend on the view. Raises EmptyFrustumError naming the view.
    """
    with torch.no_grad(), autocast(opt, device):
        inpainted = model.inpaint(model.deepvoxels)
        for start in range(0, len(poses), view_batch):
            t0 = time.perf_counter()
            chunk = list(range(start, min(start + view_batch, len(poses))))
            proj = []
            for i in chunk:
                try:
                    proj.append(mappings.project(poses[i]))
                except EmptyFrustumError as err:
                    raise EmptyFrustumError(f"view {i}: {err}") from None
            images, depths = model.render(inpainted, [p[0] for p in proj], [p[1] for p in proj])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if timings is not None:
                timings.append((time.perf_counter() - t0) / len(chunk))
            for j, i in enumerate(chunk):
                yield i, images[j], depths[j]


class Validator:
    """Renders validation views during training, logs PSNR/SSIM and keeps best.pth."""

    def __init__(self, dataset, mappings: MappingCache, opt: Any, device: torch.device):
        self.dataset, self.mappings, self.opt, self.device = dataset, mappings, opt, device

    @classmethod
    def create(cls, opt: Any, geometry: ProjectionHelper, device: torch.device) -> Optional["Validator"]:
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
        return cls(dataset, MappingCache(geometry, device), opt, device)

    def run(self, model: DeepVoxels, writer, step: int, best_psnr: float, payload_fn, log_dir: str) -> float:
        import torchvision
        from metrics import psnr, ssim
        n = len(self.dataset) if not self.opt.val_views else min(self.opt.val_views, len(self.dataset))
        items = [self.dataset[i] for i in range(n)]
        was_training = model.training
        model.eval()
        scores, renders = [], []
        try:
            for i, img, _ in render_poses(model, self.mappings, [it["pose"] for it in items], self.opt.view_batch,
                                          self.opt, self.device):
                pred = to_uint16(img[:, BORDER:-BORDER, BORDER:-BORDER]).astype(np.float64) / UINT16_MAX
                gt = cropped_ground_truth(items[i])
                scores.append((psnr(pred, gt), ssim(pred, gt)))
                if len(renders) < 4:
                    renders += [torch.from_numpy(pred.transpose(2, 0, 1)).float(),
                                torch.from_numpy(gt.transpose(2, 0, 1)).float()]
        except EmptyFrustumError as err:
            log.warning("validation skipped: %s", err)
            return best_psnr
        finally:
            model.train(was_training)
        mean_psnr = float(np.mean([s[0] for s in scores]))
        mean_ssim = float(np.mean([s[1] for s in scores]))
        writer.add_scalar("val_psnr", mean_psnr, step)
        writer.add_scalar("val_ssim", mean_ssim, step)
        writer.add_image("val_render_vs_gt", torchvision.utils.make_grid(renders, nrow=2).numpy(), step)
        log.info("validation at step %d: PSNR %.2f dB, SSIM %.4f over %d views", step, mean_psnr, mean_ssim, n)
        if mean_psnr > best_psnr:
            best_psnr = mean_psnr
            payload = payload_fn()
            payload["best_psnr"] = best_psnr
            util.save_checkpoint(os.path.join(log_dir, "best.pth"), payload)
        return best_psnr


def test(opt: Any, device: torch.device) -> dict[str, Any]:
    """Render every pose in data_root/pose; write PNGs, depth PNGs, metrics, a video and a comparison strip."""
    import dataio
    from metrics import LpipsScorer, psnr, ssim

    payload = util.load_checkpoint(opt.checkpoint)
    check_compatible(opt.checkpoint, payload["model"], opt)
    geometry = build_geometry(os.path.join(opt.data_root, "intrinsics.txt"), opt.grid_dim, opt.near_plane, device)
    model = build_model(opt).to(device)
    model.load_state_dict(payload["model"], strict=True)
    model.eval()
    if opt.compile:
        compile_networks(model)
    dataset = dataio.TestDataset(opt.data_root, opt.img_sidelength)

    ckpt_tail = "_".join(opt.checkpoint.strip("/").split("/")[-2:])
    now = datetime.datetime.now()
    dir_name = os.path.join(now.strftime("%m_%d"), now.strftime("%H-%M-%S_") + ckpt_tail + "_"
                            + opt.data_root.strip("/").split("/")[-1])
    traj_dir = os.path.join(opt.logging_root, "test_traj", dir_name)
    depth_dir = os.path.join(traj_dir, "depth")
    os.makedirs(depth_dir, exist_ok=True)

    items = [dataset[i] for i in range(len(dataset))]
    mappings = MappingCache(geometry, device)
    timings: list[float] = []
    depths, frames, rows = [], [], []
    lpips_scorer = LpipsScorer() if dataset.has_gt else None
    from tqdm import tqdm
    for i, img, depth in tqdm(render_poses(model, mappings, [it["pose"] for it in items], opt.view_batch, opt,
                                           device, timings), total=len(items), desc="test", disable=None):
        png = to_uint16(img[:, BORDER:-BORDER, BORDER:-BORDER])
        data_util.write_png(os.path.join(traj_dir, f"img_{i:05d}.png"), png)
        depths.append(depth.float().cpu().numpy().transpose(1, 2, 0))
        frames.append(png)
        if dataset.has_gt:
            pred = png.astype(np.float64) / UINT16_MAX
            gt = cropped_ground_truth(items[i])
            row = {"view": i, "pose_file": os.path.basename(items[i]["pose_path"]),
                   "psnr": psnr(pred, gt), "ssim": ssim(pred, gt)}
            if lpips_scorer is not None and lpips_scorer.available:
                row["lpips"] = lpips_scorer(pred, gt)
            rows.append(row)

    stack = np.stack(depths)
    span = stack.max() - stack.min()
    normalised = (stack - stack.min()) / (span if span > 0 else 1.0)
    for i, depth in enumerate(normalised):
        data_util.write_png(os.path.join(depth_dir, f"img_{i:05d}.png"),
                            (depth[..., 0] * UINT16_MAX).round().astype(np.uint16))

    mean_time = float(np.mean(timings)) if timings else float("nan")
    summary: dict[str, Any] = {"checkpoint": os.path.abspath(opt.checkpoint), "step": payload.get("step"),
                               "num_views": len(items), "mean_forward_s": mean_time, "out_dir": traj_dir,
                               "config": plain_config(opt)}
    if rows:
        keys = list(rows[0].keys())
        with open(os.path.join(traj_dir, "metrics.csv"), "w", newline="") as handle:
            w = csv.DictWriter(handle, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        for key in ("psnr", "ssim", "lpips"):
            if key in keys:
                summary[key] = float(np.mean([r[key] for r in rows]))
        write_comparison_strip(os.path.join(traj_dir, "comparison.png"), items, frames)
    with open(os.path.join(traj_dir, "metrics.json"), "w") as handle:
        json.dump(summary, handle, indent=1)
    video = write_video(os.path.join(traj_dir, "video"), frames)

    print(f"Average forward pass time over {len(items)} examples is {mean_time:f}")
    print(f"renders: {traj_dir}  depth: {depth_dir}  video: {video}")
    if rows:
        line = f"PSNR {summary['psnr']:.2f} dB  SSIM {summary['ssim']:.4f}"
        if "lpips" in summary:
            line += f"  LPIPS {summary['lpips']:.4f}"
        print(line + f"  over {len(rows)} views (metrics.csv, metrics.json)")
    return summary


def write_comparison_strip(path: str, items: list[dict], frames: list[np.ndarray], count: int = 4) -> None:
    """Ground truth (top row) above renders (bottom row) for ``count`` evenly spaced views, 8-bit PNG."""
    picks = np.linspace(0, len(frames) - 1, min(count, len(frames))).round().astype(int)
    top = [(cropped_ground_truth(items[i]) * 255)
           .round().clip(0, 255).astype(np.uint8) for i in picks]
    bottom = [(frames[i] / 257.0).round().astype(np.uint8) for i in picks]
    data_util.write_png(path, np.concatenate([np.concatenate(top, 1), np.concatenate(bottom, 1)], 0))


def write_video(stem: str, frames: list[np.ndarray], fps: int = 24) -> str:
    """MP4 through imageio-ffmpeg, or a GIF when ffmpeg is unavailable. Returns the path written."""
    import imageio.v2 as imageio
    eight_bit = [(f / 257.0).round().astype(np.uint8) for f in frames]
    try:
        imageio.mimwrite(stem + ".mp4", eight_bit, fps=fps, macro_block_size=1)
        return stem + ".mp4"
    except Exception as err:  # no ffmpeg binary or codec
        log.info("MP4 unavailable (%s); writing a GIF", str(err).splitlines()[0] if str(err) else err)
        imageio.mimwrite(stem + ".gif", eight_bit, duration=1000.0 / fps)  # imageio takes GIF frame durations in ms
        return stem + ".gif"


# ----------------------------------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        opt = parse_args(argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=getattr(logging, str(opt.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        if opt.threads > 0:
            torch.set_num_threads(opt.threads)
        dist_ctx, device = setup_distributed(opt)
        if not dist_ctx.is_main:
            logging.getLogger().setLevel(logging.WARNING)
        if not os.path.isdir(opt.data_root):
            raise data_util.DataError(f"--data_root {opt.data_root}: no such folder")
        if opt.compile or opt.amp != "off":
            log.info("amp %s, compile %s", opt.amp, opt.compile)
        util.configure_backends(device, opt.tf32)
        with cpu_allocator.cpu_pool(cpu_allocator.wanted(opt.cpu_allocator, device.type,
                                                         opt.img_sidelength)) as pooled:
            if device.type == "cpu":
                log.info("CPU allocator: %s", "pool" if pooled else "system")
            if opt.train_test == "train":
                result = train(opt, device, dist_ctx)
                if dist_ctx.is_main:
                    print(f"checkpoints and logs: {result.log_dir}")
                if result.stopped_by is not None:
                    # The conventional 128 + signal: callers such as `make demo` must not treat it as finished.
                    return 128 + int(result.stopped_by)
            else:
                test(opt, device)
    except (data_util.DataError, util.CheckpointError, UsageError, EmptyFrustumError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
