"""Where a run writes, and its checkpoints: atomic saves, rotation, resume, random state, model flags.

A checkpoint is ``{'model', 'discriminator'}`` state_dicts, as the original wrote them, plus what an exact
continuation needs: ``optimizer_g``, ``optimizer_d``, ``step``, ``epoch``, ``epoch_pos`` (views of the epoch
already trained), ``best_psnr``, ``rng`` and the resolved flags (``config``).
"""
from __future__ import annotations

import datetime
import errno
import glob
import os
import pickle
import random
import re
import tempfile
import zipfile
from typing import Any, Mapping, Optional

import numpy as np
import torch

from options import FEATURE_MAP_SIZE, MODEL_FLAGS

STEP_CHECKPOINT_RE = re.compile(r"model-epoch_(\d+)_iter_(\d+)\.pth$")
BEST_NAME = "best.pth"
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, unsafe, cannot be written, or does not fit the configured model."""


# ----------------------------------------------------------------------------------------------------------
# Folders

def run_folder_name(opt: Any, now: datetime.datetime) -> str:
    """The original's run folder: MM_DD/HH-MM-SS_<pattern>_<l1>_l1_weight_<n>_trgt__<object><experiment>."""
    obj = opt.data_root.strip("/").split("/")[-1]
    return os.path.join(now.strftime("%m_%d"), now.strftime("%H-%M-%S_") + f"{opt.sampling_pattern}_"
                        + f"{opt.l1_weight:0.2f}_l1_weight_{opt.num_trgt}_trgt__{obj}{opt.experiment_name}")


def run_folders(opt: Any, resume_path: str, now: datetime.datetime) -> tuple[str, str]:
    """(checkpoint folder, TensorBoard folder) of a run: ``logs/<name>`` and ``runs/<name>`` under
    ``--logging_root``. A resumed run continues in its checkpoint's folder when that lies there, else in a
    new one."""
    logs, runs = os.path.join(opt.logging_root, "logs"), os.path.join(opt.logging_root, "runs")
    if resume_path:
        rel = os.path.relpath(os.path.dirname(os.path.abspath(resume_path)), os.path.abspath(logs))
        if not rel.startswith(os.pardir):
            return os.path.join(logs, rel), os.path.join(runs, rel)
    name = run_folder_name(opt, now)
    return os.path.join(logs, name), os.path.join(runs, name)


def test_folder_name(opt: Any, now: datetime.datetime) -> str:
    """The original's test folder: MM_DD/HH-MM-SS_<run folder>_<checkpoint file>_<object>."""
    ckpt_tail = "_".join(opt.checkpoint.strip("/").split("/")[-2:])
    return os.path.join(now.strftime("%m_%d"), now.strftime("%H-%M-%S_") + ckpt_tail + "_"
                        + opt.data_root.strip("/").split("/")[-1])


def step_checkpoint_path(log_dir: str, epoch: int, step: int) -> str:
    return os.path.join(log_dir, f"model-epoch_{epoch}_iter_{step}.pth")


def list_checkpoints(folder: str) -> list[tuple[int, str]]:
    """(step, path) of the step checkpoints in ``folder``, lowest step first."""
    found = []
    for path in glob.glob(os.path.join(folder, "model-epoch_*_iter_*.pth")):
        m = STEP_CHECKPOINT_RE.search(path)
        if m:
            found.append((int(m.group(2)), path))
    return sorted(found)


def best_or_newest_in_run(folder: str) -> str:
    """A run's checkpoint to test: ``best.pth`` (the highest validation PSNR so far) where validation kept one,
    otherwise its highest-step checkpoint. Raises CheckpointError when the folder holds neither."""
    best = os.path.join(folder, BEST_NAME)
    if os.path.isfile(best):
        return best
    found = list_checkpoints(folder)
    if not found:
        raise CheckpointError(f"run folder {folder}: no {BEST_NAME} and no step checkpoint")
    return found[-1][1]


def newest_checkpoint(logging_root: str) -> Optional[str]:
    """The step checkpoint with the highest step of all runs under ``logging_root``/logs (newest file on ties)."""
    candidates = []
    for path in glob.glob(os.path.join(logging_root, "logs", "**", "model-epoch_*_iter_*.pth"), recursive=True):
        m = STEP_CHECKPOINT_RE.search(path)
        if m:
            candidates.append((int(m.group(2)), os.path.getmtime(path), path))
    return max(candidates)[2] if candidates else None


# ----------------------------------------------------------------------------------------------------------
# Saving and loading

def save(path: str, payload: Mapping[str, Any]) -> None:
    """``torch.save`` through a temporary file in the same folder and a rename: an interrupted or failed write
    (a killed process, a full disk) never leaves a partial file, and an older file at ``path`` stays whole."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".pth", dir=folder)
        with os.fdopen(fd, "wb") as handle:
            torch.save(dict(payload), handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        tmp = None
    except (OSError, RuntimeError) as err:
        if _out_of_space(err):
            raise CheckpointError(f"checkpoint {path}: no space left on the device; nothing was written and "
                                  "earlier checkpoints are kept") from None
        raise
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def _out_of_space(err: BaseException) -> bool:
    """Whether ``err``, or an error it was raised while handling, is a full disk or quota. torch.save reports
    the failed write of its archive as a RuntimeError raised while the OSError is handled."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _NO_SPACE:
            return True
        err = err.__cause__ or err.__context__
    return False


def save_step(log_dir: str, epoch: int, step: int, payload: Mapping[str, Any], keep: int) -> str:
    """Write a step checkpoint, then delete all but the ``keep`` highest-step ones (0 keeps all)."""
    path = step_checkpoint_path(log_dir, epoch, step)
    save(path, payload)
    if keep > 0:
        for _, old in list_checkpoints(log_dir)[:-keep]:
            os.remove(old)
    return path


def load(path: str, map_location: Any = "cpu", mapped: bool = False) -> dict[str, Any]:
    """Load a checkpoint of this project or of the original code.

    ``weights_only=True``: tensors, numbers, strings and containers only, so a file that would run code when
    unpickled is refused and nothing in it runs. ``mapped``: map the file into memory instead of reading it,
    so that only the tensors used are read from disk: rendering uses the model's weights, not the optimizer
    states that make up most of a training checkpoint. Only torch's zip format can be mapped; the original's
    files (PyTorch 1.0's format) are read whole.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True,
                             mmap=mapped and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"checkpoint {path}: refused by the safe loader (weights_only=True): "
                              f"{_first_line(err)}") from err
    except Exception as err:  # noqa: BLE001 - any failure to parse the bytes means the file is damaged
        raise CheckpointError(f"checkpoint {path}: unreadable or truncated ({_first_line(err)})") from err
    if not isinstance(payload, dict) or "model" not in payload:
        raise CheckpointError(f"checkpoint {path}: expected a dict with a 'model' state_dict")
    return payload


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_weights(path: str, payload: Mapping[str, Any], model: torch.nn.Module,
                 discriminator: Optional[torch.nn.Module] = None) -> None:
    """Load the state_dicts strictly; a mismatch is a one-line CheckpointError."""
    try:
        model.load_state_dict(payload["model"], strict=True)
        if discriminator is not None and "discriminator" in payload:
            discriminator.load_state_dict(payload["discriminator"], strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {path}: does not fit the model ({_first_line(err)})") from None


# ----------------------------------------------------------------------------------------------------------
# Model flags

def infer_model_flags(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Model flags recovered from a state_dict's shapes (the original's checkpoints store no flags)."""
    grid = state_dict["deepvoxels"].shape  # (1, C, G, G, G)
    downs = {int(m.group(1)) for k in state_dict
             for m in [re.match(r"feature_extractor\.net\.0\.downs\.(\d+)\.", k)] if m}
    flags = {"grid_dim": int(grid[-1]), "num_grid_feats": int(grid[1]),
             "img_sidelength": FEATURE_MAP_SIZE * 2 ** len(downs),
             "no_occlusion_net": not any(k.startswith("occlusion_net.") for k in state_dict)}
    first = state_dict.get("feature_extractor.net.0.downs.0.net.1.weight")
    if first is not None:
        flags["nf0"] = int(first.shape[0])
    return flags


def check_model_flags(path: str, payload: Mapping[str, Any], opt: Any, names: Optional[list[str]] = None) -> None:
    """Raise CheckpointError naming every model flag (of ``names``, default all) on which the checkpoint and
    ``opt`` differ."""
    if "deepvoxels" not in payload["model"]:
        raise CheckpointError(f"checkpoint {path}: not a DeepVoxels model (no 'deepvoxels' grid)")
    found = infer_model_flags(payload["model"])
    diffs = [f"{k} {found[k]} in the checkpoint, {getattr(opt, k)} given" for k in (MODEL_FLAGS if names is None else names)
             if k in found and found[k] != getattr(opt, k)]
    if diffs:
        raise CheckpointError(f"checkpoint {path} was trained with other flags: " + "; ".join(diffs))


def take_model_flags(path: str, payload: Mapping[str, Any], opt: Any) -> dict[str, Any]:
    """Set ``opt``'s model flags from the checkpoint (its stored flags, else its tensors' shapes), refusing
    those given explicitly (``opt.explicit_model_flags``) with another value. Returns the flags set."""
    check_model_flags(path, payload, opt, names=list(getattr(opt, "explicit_model_flags", [])))
    found = infer_model_flags(payload["model"])
    stored = payload.get("config") or {}
    flags = {k: stored.get(k, found.get(k, getattr(opt, k))) for k in MODEL_FLAGS}
    for key, value in flags.items():
        setattr(opt, key, value)
    return flags


# ----------------------------------------------------------------------------------------------------------
# Random state

def get_rng_state() -> dict[str, Any]:
    """Every random state a training run draws from, in a form ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    version, internal, gauss = random.getstate()
    if gauss is not None:
        raise RuntimeError("python's random module holds a cached gaussian; not expected in training")
    state = {
        "python": torch.tensor([version, *internal], dtype=torch.int64),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what ``get_rng_state`` saved."""
    items = [int(v) for v in state["python"].tolist()]
    random.setstate((items[0], tuple(items[1:]), None))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
