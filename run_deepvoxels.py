"""Train DeepVoxels on one object, or render a trained model's test poses.

    python run_deepvoxels.py --train_test train --data_root DATA/train/cube --logging_root logs/
    python run_deepvoxels.py --train_test test --data_root DATA/test/cube --logging_root logs/ --checkpoint CKPT

The script reads as the method: flags, geometry, generator and discriminator, the training loop with its
step (forward, losses, discriminator step, generator step), then test mode. Speed and memory savers
(performance.py), torchrun (distributed.py) and checkpoint plumbing (checkpoints.py) live beside it.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import json
import logging
import math
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

import checkpoints
import data_util
import distributed
import options
import performance
import util
import viewer
from deep_voxels import DeepVoxels
from evaluation import (Validator, ViewScorer, crop, each_chunk_in_threads, render_poses, scores_line, to_uint16,
                        write_test_outputs)
from losses import GANLoss, PatchDiscriminator
from metrics import crop_border
from options import FEATURE_MAP_SIZE
from projection import EmptyFrustumError, IndexCache, ProjectionHelper
from pytorch_prototyping import at_least_float32
from summaries import Progress, write_summaries

log = logging.getLogger("deepvoxels")


# ----------------------------------------------------------------------------------------------------------
# Geometry and networks

def build_geometry(intrinsics_path: str, grid_dim: int, near_plane_flag: float, device: torch.device,
                   dtype: torch.dtype = torch.float32) -> ProjectionHelper:
    """The original's set-up from intrinsics.txt: grid centre, voxel size, near plane, 64x64 intrinsics.
    ``dtype`` is the poses' precision (the geometry follows it)."""
    intrinsic, barycenter, scale, near_plane, _ = data_util.parse_intrinsics(intrinsics_path, FEATURE_MAP_SIZE)
    if near_plane == 0.0:
        near_plane = near_plane_flag
    voxel_size = (1.0 / grid_dim) * scale
    grid2world = torch.eye(4, dtype=dtype)
    grid2world[:3, 3] = torch.as_tensor(np.asarray(barycenter, dtype=np.float32)).to(dtype)
    return ProjectionHelper(lifting_intrinsic=intrinsic, projection_intrinsic=intrinsic,
                            projection_image_dims=[FEATURE_MAP_SIZE] * 2, lifting_image_dims=[FEATURE_MAP_SIZE] * 2,
                            depth_min=0.0, depth_max=grid_dim * voxel_size + near_plane, grid_dims=[grid_dim] * 3,
                            voxel_size=voxel_size, near_plane=near_plane, frustum_depth=2 * grid_dim,
                            grid2world=grid2world.to(device))


def build_networks(opt: Any, device: torch.device) -> tuple[DeepVoxels, PatchDiscriminator]:
    """The generator and the PatchGAN discriminator, initialised as ``--batchnorm_init`` says."""
    first_init = util.batchnorm_init_of_pytorch_1_0 if opt.batchnorm_init == "uniform" else contextlib.nullcontext
    with first_init():
        model = DeepVoxels(img_sidelength=opt.img_sidelength, lifting_img_dims=[FEATURE_MAP_SIZE] * 2,
                           frustrum_img_dims=[FEATURE_MAP_SIZE] * 2, grid_dims=[opt.grid_dim] * 3,
                           use_occlusion_net=not opt.no_occlusion_net, num_grid_feats=opt.num_grid_feats, nf0=opt.nf0)
        discriminator = PatchDiscriminator(input_nc=3)
    return model.to(device), discriminator.to(device)


def metric_depth(raw: torch.Tensor, geometry: ProjectionHelper, grid_dim: int) -> torch.Tensor:
    """The original's depth in world units from the occlusion net's raw depth in [-1/2, 1/2). It scales by
    ceil(sqrt(3) G) voxels, the grid's diagonal, although the view volume spans 2 G planes; kept as written,
    since it only feeds the summaries."""
    return (raw + 0.5) * math.ceil(math.sqrt(3) * grid_dim) * geometry.voxel_size + geometry.near_plane


def amp_context(amp: str, device: torch.device):
    """A factory of the run's autocast context (``--amp``)."""
    if amp == "off":
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device_type=device.type,
                             dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


# ----------------------------------------------------------------------------------------------------------
# The training step

@dataclass
class Training:
    """What one training step works on."""

    model: DeepVoxels
    discriminator: PatchDiscriminator
    optimizer_g: torch.optim.Optimizer
    optimizer_d: torch.optim.Optimizer
    generator: torch.nn.Module  # the model, or its DDP wrapper under torchrun
    critic: torch.nn.Module  # the discriminator, or its DDP wrapper
    generator_step_in_backward: performance.GeneratorStepInBackward
    scaler: torch.amp.GradScaler
    autocast: Any
    dist: distributed.Context
    l1_weight: float
    gan_loss: GANLoss


def build_training(opt: Any, device: torch.device, model: DeepVoxels, discriminator: PatchDiscriminator,
                   dist: Optional[distributed.Context] = None, paths: Optional[performance.FastPaths] = None
                   ) -> Training:
    """Adam for both networks, as the original (same learning rate, torch's defaults), and the fast paths."""
    dist = dist or distributed.Context()
    if paths is None:
        paths = performance.choose(device, opt.img_sidelength, opt.save_memory, dist.enabled, opt.amp == "fp16",
                                   opt.compile, nf0=opt.nf0)
    performance.enable(model, paths, discriminator)
    if opt.compile:
        performance.compile_networks(model, discriminator)
    optimizer_g = performance.adam(model.parameters(), opt.lr, paths)
    optimizer_d = performance.adam(discriminator.parameters(), opt.lr, paths)
    return Training(model, discriminator, optimizer_g, optimizer_d,
                    generator=distributed.wrap(dist, model, device), critic=distributed.wrap(dist, discriminator, device),
                    generator_step_in_backward=performance.GeneratorStepInBackward(
                        optimizer_g, model.parameters(), paths.step_in_backward),
                    scaler=torch.amp.GradScaler(device.type, enabled=opt.amp == "fp16"),
                    autocast=amp_context(opt.amp, device), dist=dist, l1_weight=opt.l1_weight, gan_loss=GANLoss())


def step_discriminator_as_in_pytorch_1_0(optimizer_d: torch.optim.Optimizer, step) -> None:
    """Step the discriminator so that the generator's backward through it, which comes next, uses the
    *updated* weights with the activations of the forward pass, as the original did on PyTorch 1.0.

    1.0's optimizers wrote ``p.data``, which autograd did not track. Today's write ``p`` in place, which bumps
    its version counter, and the generator's backward would then raise "modified by an inplace operation".
    Putting the counters back after the step restores 1.0's arithmetic.
    """
    params = tuple(p for group in optimizer_d.param_groups for p in group["params"])
    versions = tuple(p._version for p in params)
    step()
    torch._C._autograd._unsafe_set_version_counter(params, versions)


def train_step(t: Training, nearest_rgb: torch.Tensor, lift: tuple[torch.Tensor, torch.Tensor],
               proj: Sequence[tuple[torch.Tensor, torch.Tensor]], target_rgbs: Sequence[torch.Tensor]
               ) -> tuple[dict[str, float], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """One iteration of the original loop: integrate the nearest view into the grid, render the targets,
    step the discriminator, then the generator.

    Args: nearest_rgb (1, 3, S, S) and its ``lifting_indices``; per target view its ``projection_indices``
    and its image (1, 3, S, S), in [-1/2, 1/2].
    Returns: (the original's logged losses, cropped outputs, cropped targets, raw depths).
    Raises FloatingPointError on a non-finite loss, with nothing updated and the grid as before.
    """
    grid_before = t.model.deepvoxels
    targets = [crop(rgb) for rgb in target_rgbs]
    terms: dict[str, list[torch.Tensor]] = {"l1": [], "gan_g": [], "gan_d": []}  # per target view
    with t.autocast():
        outputs, depths = t.generator(nearest_rgb, [p[0] for p in proj], [p[1] for p in proj], *lift)
        outputs = [crop(out) for out in outputs]
        for out, gt in zip(outputs, targets):
            terms["l1"].append(torch.mean(torch.abs(at_least_float32(out) - gt)))
            # D on the detached render and on the real image; then on the render again, for the generator.
            fake, real = at_least_float32(t.critic(out.detach())), at_least_float32(t.critic(gt))
            terms["gan_d"].append(0.5 * (t.gan_loss(fake, False) + t.gan_loss(real, True)))
            with distributed.no_sync(t.critic):  # this pass's backward reaches only the generator
                terms["gan_g"].append(t.gan_loss(at_least_float32(t.critic(out)), True))
    losses = {name: torch.stack(values) for name, values in terms.items()}
    # The original's losses are means over the target views.
    loss_d = losses["gan_d"].mean()
    loss_g = (losses["gan_g"] + t.l1_weight * losses["l1"]).mean()
    if not distributed.all_true(t.dist, torch.isfinite(loss_d) & torch.isfinite(loss_g)):
        t.model.deepvoxels = grid_before  # the forward already replaced the grid
        raise FloatingPointError(f"non-finite loss (loss_g {loss_g.item()}, loss_d {loss_d.item()})")
    try:
        t.scaler.scale(loss_d).backward()
        step_discriminator_as_in_pytorch_1_0(t.optimizer_d, lambda: t.scaler.step(t.optimizer_d))
        g_params = [p for group in t.optimizer_g.param_groups for p in group["params"]]
        with t.generator_step_in_backward:  # steps each parameter in the backward pass when enabled
            torch.autograd.backward(t.scaler.scale(loss_g), inputs=g_params)  # D has stepped: G's gradients only
        if not t.generator_step_in_backward.enabled:
            t.scaler.step(t.optimizer_g)
        t.scaler.update()
    finally:
        # Freed now rather than at the next step's zero_grad, where they would sit through its forward pass.
        t.optimizer_d.zero_grad(set_to_none=True)
        t.optimizer_g.zero_grad(set_to_none=True)
    # The original logged the generator's terms of the last target.
    logged = {"discrim_loss": loss_d.item(), "gen_loss_total": loss_g.item(),
              "gen_loss_l1": (t.l1_weight * losses["l1"][-1]).item(), "gen_loss_g": losses["gan_g"][-1].item()}
    return logged, outputs, targets, depths


# ----------------------------------------------------------------------------------------------------------
# Training

class _StopRequested(Exception):
    pass


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the message says where the last good state was saved."""


def epoch_order(seed: int, epoch: int, n: int) -> list[int]:
    """The shuffled view order of one epoch, a function of (seed, epoch) alone, so that a resumed run skips
    exactly the views it already trained on."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()


@dataclass
class TrainResult:
    log_dir: Optional[str]  # None on ranks other than 0
    step: int
    model: DeepVoxels
    discriminator: PatchDiscriminator
    stopped_by: Optional[int] = None  # the signal that ended training early, if any


def train(opt: Any, device: torch.device, dist: distributed.Context) -> TrainResult:
    """The original's training loop, with checkpoints, exact resume, validation and torchrun data
    parallelism. Rank 0 alone writes logs, summaries and checkpoints."""
    import dataio
    resume_path = ""
    if opt.resume:
        resume_path = checkpoints.newest_checkpoint(opt.logging_root) if opt.resume == "newest" else opt.resume
        if not resume_path:
            log.warning("--resume: no checkpoint under %s; starting a new run", opt.logging_root)
    weights_path = resume_path or opt.checkpoint
    payload = checkpoints.load(weights_path) if weights_path else None

    util.seed_everything(opt.seed)  # the same seed on every rank: the same initial weights
    geometry = build_geometry(os.path.join(opt.data_root, "intrinsics.txt"), opt.grid_dim, opt.near_plane, device)
    model, discriminator = build_networks(opt, device)
    dataset = dataio.NovelViewTriplets(root_dir=opt.data_root, img_size=opt.img_sidelength,
                                       sampling_pattern=opt.sampling_pattern, num_trgt=opt.num_trgt)
    steps_per_epoch = math.ceil(len(dataset) / dist.world)
    step, epoch, epoch_pos, best_psnr = opt.start_epoch * steps_per_epoch, opt.start_epoch, 0, -math.inf
    if payload is not None:
        checkpoints.check_model_flags(weights_path, payload, opt)
        checkpoints.load_weights(weights_path, payload, model, discriminator)
    t = build_training(opt, device, model, discriminator, dist)
    if resume_path and "optimizer_g" in payload:
        t.optimizer_g.load_state_dict(payload["optimizer_g"])
        t.optimizer_d.load_state_dict(payload["optimizer_d"])
        step, epoch, epoch_pos = int(payload["step"]), int(payload["epoch"]), int(payload["epoch_pos"])
        best_psnr = float(payload.get("best_psnr", best_psnr))
        if not dist.enabled:
            checkpoints.set_rng_state(payload["rng"])
        log.info("resumed %s: step %d, epoch %d (+%d views)", resume_path, step, epoch, epoch_pos)
    elif payload is not None:
        log.info("weights from %s; optimizers start fresh at epoch %d", weights_path, epoch)
    distributed.seed_rank(dist, opt.seed, step)

    config = options.plain_config(opt)
    log_dir = writer = validator = None
    if dist.is_main:
        log_dir, run_dir = checkpoints.run_folders(opt, resume_path, datetime.datetime.now())
        for folder in (log_dir, run_dir):
            os.makedirs(folder, exist_ok=True)
        with open(os.path.join(log_dir, "params.txt"), "w") as handle:
            handle.write("\n".join(f"{k}: {v}" for k, v in config.items()))
        with open(os.path.join(log_dir, "config.json"), "w") as handle:
            json.dump(config, handle, indent=1)
        from tensorboardX import SummaryWriter
        writer = SummaryWriter(run_dir)
        validator = Validator.create(opt, geometry, device)
        log.info("generator %s params, discriminator %s params, %d views, near plane %.4f, voxel %.4f, device %s, "
                 "%d process(es)", f"{util.count_parameters(model):,}", f"{util.count_parameters(discriminator):,}",
                 len(dataset), geometry.near_plane, geometry.voxel_size, device, dist.world)
    indices = IndexCache(geometry, device)
    live = viewer.start_live(opt, model, geometry, t.autocast, device, log_dir, dist.is_main)  # --live_viewer

    def state() -> dict[str, Any]:
        return {"model": model.state_dict(), "discriminator": discriminator.state_dict(),
                "optimizer_g": t.optimizer_g.state_dict(), "optimizer_d": t.optimizer_d.state_dict(),
                "step": step, "epoch": epoch, "epoch_pos": epoch_pos, "best_psnr": best_psnr,
                "rng": checkpoints.get_rng_state(), "config": config}

    def save(reason: str) -> str:
        if not dist.is_main:
            return ""
        path = checkpoints.save_step(log_dir, epoch, step, state(), opt.keep_checkpoints)
        log.info("checkpoint (%s): %s", reason, path)
        return path

    def validate() -> None:
        nonlocal best_psnr
        psnr = validator.run(model, t.autocast, writer, step) if validator is not None else None
        if psnr is not None and psnr > best_psnr:
            best_psnr = psnr
            checkpoints.save(os.path.join(log_dir, checkpoints.BEST_NAME), state())

    stop = {"signal": None}
    previous = {s: signal.signal(s, lambda signum, _: stop.update(signal=signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    total = opt.max_steps if opt.max_steps else opt.max_epoch * steps_per_epoch
    progress = Progress(total, step, opt.progress_every, enabled=dist.is_main)
    skipped = 0
    model.train()
    discriminator.train()
    try:
        while epoch < opt.max_epoch and not (opt.max_steps and step >= opt.max_steps):
            order = distributed.shard(epoch_order(opt.seed, epoch, len(dataset)), dist)[epoch_pos:]
            for trgt_views, nearest_view in dataio.in_order(dataset, order, opt.num_workers):
                if distributed.any_true(dist, stop["signal"] is not None, device):
                    raise _StopRequested()
                try:
                    lift = indices.lift(nearest_view["pose"])
                    proj = [indices.project(view["pose"]) for view in trgt_views]
                except EmptyFrustumError as err:
                    if dist.enabled:  # a skipped triplet would desynchronise the ranks
                        raise EmptyFrustumError(f"rank {dist.rank}: {err} (fix the pose or the grid)") from None
                    skipped += 1
                    log.warning("skipping a training triplet (%d so far): %s", skipped, err)
                    epoch_pos += 1
                    continue
                nearest_rgb = nearest_view["gt_rgb"].to(device)[None]
                try:
                    losses, outputs, targets, depths = train_step(
                        t, nearest_rgb, lift, proj, [v["gt_rgb"].to(device)[None] for v in trgt_views])
                except FloatingPointError as err:
                    raise FloatingPointError(f"step {step}: {err}") from None
                distributed.average_buffers(dist, (model, discriminator), model.deepvoxels)
                if dist.is_main:
                    write_summaries(writer, step, opt.summary_every, losses, outputs, targets,
                                    [metric_depth(d, geometry, opt.grid_dim) for d in depths], nearest_rgb,
                                    model.last_gates, t.optimizer_g.param_groups[0]["lr"])
                step += 1
                epoch_pos += 1
                progress.update(step, epoch, losses)
                live.between_steps(step)
                if step % opt.checkpoint_every == 0:
                    save("interval")
                if opt.val_every and step % opt.val_every == 0 and dist.is_main:
                    validate()
                if opt.max_steps and step >= opt.max_steps:
                    break
            else:
                epoch, epoch_pos = epoch + 1, 0
                continue
            break
    except _StopRequested:
        save(f"signal {stop['signal']}")
        log.info("stopped by signal %s at step %d; continue with --resume", stop["signal"], step)
        return TrainResult(log_dir, step, model, discriminator, stopped_by=stop["signal"])
    except FloatingPointError as err:
        path = save("last good state before a non-finite loss")
        raise NonFiniteLossError(f"{err}; the last good state is in {path or 'rank 0 checkpoint'}") from err
    finally:
        progress.close()
        live.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
        if writer is not None:
            writer.flush()
    if skipped:
        log.warning("%d training triplets were skipped because a camera saw none of the grid", skipped)
    if step % opt.checkpoint_every:
        save("end of training")
    if dist.is_main and not (opt.val_every and step % opt.val_every == 0):
        validate()
    if writer is not None:
        writer.close()
    return TrainResult(log_dir, step, model, discriminator)


# ----------------------------------------------------------------------------------------------------------
# Test mode

def build_for_rendering(opt: Any, path: str, payload: dict, data_root: str, device: torch.device
                        ) -> tuple[ProjectionHelper, DeepVoxels]:
    """Geometry of ``data_root`` and the checkpoint's model in eval mode, with test mode's fast paths."""
    geometry = build_geometry(os.path.join(data_root, "intrinsics.txt"), opt.grid_dim, opt.near_plane, device)
    with util.skip_initialisation():  # the checkpoint sets every weight
        model, _ = build_networks(opt, device)
    compiled = getattr(opt, "compile", False)
    # The layouts first: loading then copies each weight straight into its layout, with no second copy.
    performance.enable(model, performance.choose(device, opt.img_sidelength, getattr(opt, "save_memory", False),
                                                 compiled=compiled, nf0=opt.nf0, training=False))
    checkpoints.load_weights(path, payload, model)
    if compiled:
        performance.compile_networks(model)
    return geometry, model.eval()


def test(opt: Any, device: torch.device) -> dict[str, Any]:
    """Render every pose in data_root/pose: 16-bit PNGs, depth PNGs, a video and, where the folder has ground
    truth, PSNR/SSIM (metrics.csv, metrics.json) and a comparison strip."""
    import dataio
    payload = checkpoints.load(opt.checkpoint, mapped=True)
    flags = checkpoints.take_model_flags(opt.checkpoint, payload, opt)
    print("model flags from the checkpoint: " + ", ".join(f"{k} {v}" for k, v in flags.items()))
    geometry, model = build_for_rendering(opt, opt.checkpoint, payload, opt.data_root, device)
    step = payload.get("step")
    del payload  # the file stays mapped while its tensors are referenced
    dataset = dataio.TestDataset(opt.data_root, opt.img_sidelength)
    traj_dir = os.path.join(opt.logging_root, "test_traj", checkpoints.test_folder_name(opt, datetime.datetime.now()))
    os.makedirs(traj_dir, exist_ok=True)

    items = [dataset[i] for i in range(len(dataset))]
    timings: list[float] = []
    frames, depths, rows = [], [], []
    scorer = ViewScorer() if dataset.has_gt else None
    from tqdm import tqdm
    view_batch = performance.views_per_forward(opt.view_batch, device, opt.img_sidelength)
    renders = render_poses(model, IndexCache(geometry, device), [it["pose"] for it in items], view_batch,
                           amp_context(opt.amp, device), timings)

    def finish(i: int, img: torch.Tensor, depth: torch.Tensor) -> tuple[np.ndarray, np.ndarray, Optional[dict]]:
        whole = to_uint16(img)
        frame = np.ascontiguousarray(crop_border(whole))  # the original's 16-bit renders, without the border
        data_util.write_png(os.path.join(traj_dir, f"img_{i:05d}.png"), frame)
        return frame, depth.float().cpu().numpy().transpose(1, 2, 0), scorer(i, whole, items[i]) if scorer else None

    for frame, depth, row in each_chunk_in_threads(tqdm(renders, total=len(items), desc="test", disable=None),
                                                   view_batch, finish, torch.get_num_threads()):
        frames.append(frame)
        depths.append(depth)
        if row is not None:
            rows.append(row)
    summary = {"checkpoint": os.path.abspath(opt.checkpoint), "step": step, "num_views": len(items),
               "views_per_forward": view_batch, "mean_forward_s": float(np.mean(timings)), "out_dir": traj_dir,
               "config": options.plain_config(opt)}
    video = write_test_outputs(traj_dir, items, frames, depths, rows, summary)
    print(f"Average forward pass time over {len(items)} examples is {summary['mean_forward_s']:f}")
    print(f"renders: {traj_dir}  depth: {os.path.join(traj_dir, 'depth')}  video: {video}")
    if rows:
        print(scores_line(summary, len(rows)))
    return summary


# ----------------------------------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit codes: 0 done, 2 bad input or an unwritable output (one line), 3 non-finite loss, 128+N signal N."""
    try:
        opt = options.parse_args(argv)
    except util.UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=opt.log_level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        if opt.threads > 0:
            torch.set_num_threads(opt.threads)
        dist, device = distributed.setup(opt.device)
        if not dist.is_main:
            logging.getLogger().setLevel(logging.WARNING)
        if not os.path.isdir(opt.data_root):
            raise data_util.DataError(f"--data_root {opt.data_root}: no such folder")
        util.configure_backends(device, opt.tf32)
        if opt.train_test == "train":
            result = train(opt, device, dist)
            if dist.is_main:
                print(f"checkpoints and logs: {result.log_dir}")
            if result.stopped_by is not None:
                return 128 + int(result.stopped_by)  # callers such as `make demo` must not take it as finished
        else:
            test(opt, device)
    except (data_util.DataError, checkpoints.CheckpointError, util.UsageError, EmptyFrustumError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # an output that cannot be written: a full disk, a read-only folder
        print(f"error: {err.filename or ''}: {err.strerror or err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
