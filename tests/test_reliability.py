"""Exact resume, safe checkpoints, signals, a full disk, and a one-line refusal for every bad input."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import checkpoints
import data_util
import options
import run_deepvoxels
from tools.synthetic import make_synthetic_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--img_sidelength", "128", "--grid_dim", "8", "--num_grid_feats", "4", "--nf0", "4", "--device", "cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability_data")
    make_synthetic_dataset(str(root), "cube", resolution=128, num_train=6, num_val=2, num_test=2, seed=3)
    return root


def _train_argv(data_root, logs, *extra):
    return ["--train_test", "train", "--data_root", str(data_root), "--logging_root", str(logs), *TINY, *extra]


def _final_state(logs):
    path = checkpoints.newest_checkpoint(str(logs))
    return torch.load(path, weights_only=True), path


def test_stop_and_resume_gives_the_same_weights(data, tmp_path):
    train_root = data / "train" / "cube"
    assert run_deepvoxels.main(_train_argv(train_root, tmp_path / "straight", "--max_steps", "12")) == 0
    assert run_deepvoxels.main(_train_argv(train_root, tmp_path / "split", "--max_steps", "6")) == 0
    half, _ = _final_state(tmp_path / "split")
    assert half["step"] == 6
    assert run_deepvoxels.main(_train_argv(train_root, tmp_path / "split", "--max_steps", "12", "--resume")) == 0
    straight, _ = _final_state(tmp_path / "straight")
    resumed, resumed_path = _final_state(tmp_path / "split")
    assert straight["step"] == resumed["step"] == 12
    # Resumed in the same run folder.
    assert os.path.dirname(resumed_path) == os.path.dirname(checkpoints.list_checkpoints(
        os.path.dirname(resumed_path))[0][1])
    for net in ("model", "discriminator"):
        for key, value in straight[net].items():
            if value.is_floating_point():
                torch.testing.assert_close(resumed[net][key], value, atol=1e-6, rtol=0, msg=f"{net}.{key}")
            else:
                assert torch.equal(resumed[net][key], value), key
    assert not torch.equal(half["model"]["deepvoxels"], straight["model"]["deepvoxels"])


def test_removed_allocator_flag_is_one_warning_and_the_run_goes_on(data, tmp_path, caplog):
    with caplog.at_level("WARNING"):
        code = run_deepvoxels.main(_train_argv(data / "train" / "cube", tmp_path, "--max_steps", "1",
                                               "--cpu_allocator", "pool"))
    assert code == 0
    lines = [r.getMessage() for r in caplog.records if "cpu_allocator" in r.getMessage()]
    assert len(lines) == 1 and "removed" in lines[0]
    config = tmp_path / "old.yaml"
    config.write_text("cpu_allocator: system\n")
    opt = options.parse_args(_train_argv(data / "train" / "cube", tmp_path, "--config", str(config)))
    assert not hasattr(opt, "cpu_allocator")


def _networks(data, tmp_path):
    opt = options.parse_args(_train_argv(data / "train" / "cube", tmp_path, "--max_steps", "1"))
    torch.manual_seed(0)
    return run_deepvoxels.build_networks(opt, torch.device("cpu"))


def test_original_checkpoint_in_train_mode_restores_weights_only(data, tmp_path, caplog):
    """--checkpoint with an original-format file (model + discriminator only) starts optimizers afresh."""
    model, discriminator = _networks(data, tmp_path)
    original = tmp_path / "original.pth"
    torch.save({"model": model.state_dict(), "discriminator": discriminator.state_dict()}, original)
    with caplog.at_level("INFO"):
        code = run_deepvoxels.main(_train_argv(data / "train" / "cube", tmp_path / "logs", "--max_steps", "1",
                                               "--checkpoint", str(original)))
    assert code == 0
    assert "optimizers start fresh" in caplog.text
    payload, _ = _final_state(tmp_path / "logs")
    assert payload["step"] == 1


def test_checkpoint_in_train_mode_fine_tunes_from_start_epoch(data, tmp_path):
    """--checkpoint with a full checkpoint of this project takes its weights only, as the original did: the
    run starts at --start_epoch with fresh optimizers (Adam's step count is 1 after one step), in a new run."""
    train_root = data / "train" / "cube"
    assert run_deepvoxels.main(_train_argv(train_root, tmp_path / "first", "--max_steps", "3")) == 0
    finished, path = _final_state(tmp_path / "first")
    assert finished["step"] == 3
    assert run_deepvoxels.main(_train_argv(train_root, tmp_path / "again", "--checkpoint", path,
                                           "--start_epoch", "2", "--max_steps", "13")) == 0
    tuned, _ = _final_state(tmp_path / "again")
    assert tuned["step"] == 13 and tuned["epoch"] == 2  # 6 views: epoch 2 starts at step 12
    assert {int(s["step"]) for s in tuned["optimizer_g"]["state"].values()} == {1}


def test_resume_a_given_file_continues_exactly(data, tmp_path):
    train_root = data / "train" / "cube"
    assert run_deepvoxels.main(_train_argv(train_root, tmp_path / "a", "--max_steps", "4")) == 0
    assert run_deepvoxels.main(_train_argv(train_root, tmp_path / "b", "--max_steps", "2")) == 0
    _, two = _final_state(tmp_path / "b")
    assert run_deepvoxels.main(_train_argv(train_root, tmp_path / "c", "--max_steps", "4", "--resume", two)) == 0
    straight, _ = _final_state(tmp_path / "a")
    resumed, resumed_path = _final_state(tmp_path / "c")  # a checkpoint outside --logging_root: a new run folder
    assert resumed["step"] == 4 and str(tmp_path / "c") in resumed_path
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), key


FIXTURES = os.path.join(REPO, "tests", "fixtures")


def test_checkpoint_from_before_the_redesign_resumes(tmp_path, monkeypatch):
    """A step-2 checkpoint written by the code before the redesign (tests/fixtures/README.md) resumes, and its
    third step reproduces the sums of every tensor that the old code's own step 3 had, to the last bit on the
    CPU kind the fixture was written on.

    The old code ran the 2D networks channels-last on every CPU and took BatchNorm's batch statistics from
    ATen's channels-last kernel, whose rounding differs from the accurate statistics used since
    (pytorch_prototyping/norm.py); both are used here, so that any difference left would come from the
    resume itself."""
    import dataclasses

    import performance
    from pytorch_prototyping import norm
    monkeypatch.setattr(norm, "_uses_accurate_statistics", lambda x, batch_stats: False)
    choose = performance.choose
    monkeypatch.setattr(performance, "choose",
                        lambda *a, **k: dataclasses.replace(choose(*a, **k), channels_last_2d=True))
    root = tmp_path / "data"
    make_synthetic_dataset(str(root), "cube", resolution=128, num_train=6, num_val=2, num_test=2, seed=3)
    argv = ["--train_test", "train", "--data_root", str(root / "train" / "cube"), "--logging_root",
            str(tmp_path / "logs"), "--img_sidelength", "128", "--grid_dim", "4", "--num_grid_feats", "2",
            "--nf0", "2", "--device", "cpu", "--max_steps", "3", "--threads", "1", "--val_every", "0",
            "--resume", os.path.join(FIXTURES, "pre_redesign_step2.pth")]
    assert run_deepvoxels.main(argv) == 0
    resumed, _ = _final_state(tmp_path / "logs")
    expected = json.load(open(os.path.join(FIXTURES, "pre_redesign_step3_sums.json")))
    assert (resumed["step"], resumed["epoch"], resumed["epoch_pos"]) == (3, 0, 3) == (
        expected["step"], expected["epoch"], expected["epoch_pos"])
    for name in ("optimizer_g", "optimizer_d"):  # both Adam states went on from the fixture's step 2
        assert all(float(state["step"]) == 3 for state in resumed[name]["state"].values()), name
    # The fixture was written on an AVX2 CPU, where the same kernels give the same bits. Elsewhere they round
    # differently, and Adam turns every sign flip of a near-zero gradient into a 2 * lr change of that weight
    # (tests/test_training_step.py), so there each sum is bounded by one such flip per weight.
    same_kernels = "avx512f" not in performance.cpu_flags()
    lr = options.parse_args(argv).lr
    for net, sums in (("model", expected["model_sums"]), ("discriminator", expected["discriminator_sums"])):
        assert sums.keys() == {k for k, v in resumed[net].items() if v.is_floating_point()}
        for key, value in sums.items():
            got = float(resumed[net][key].double().sum())
            if same_kernels:
                assert got == value, key
            else:
                assert abs(got - value) <= 2 * lr * resumed[net][key].numel(), key


def test_keep_newest_checkpoints_and_best(data, tmp_path):
    code = run_deepvoxels.main(_train_argv(data / "train" / "cube", tmp_path, "--max_steps", "4",
                                           "--checkpoint_every", "1", "--keep_checkpoints", "2", "--val_every", "2"))
    assert code == 0
    payload, path = _final_state(tmp_path)
    folder = os.path.dirname(path)
    assert [step for step, _ in checkpoints.list_checkpoints(folder)] == [3, 4]
    best = torch.load(os.path.join(folder, "best.pth"), weights_only=True)
    assert np.isfinite(best["best_psnr"])
    assert not [f for f in os.listdir(folder) if f.startswith(".tmp_")]
    # What make demo tests: best.pth while there is one, else the newest step checkpoint.
    assert checkpoints.best_or_newest_in_run(folder) == os.path.join(folder, "best.pth")
    os.remove(os.path.join(folder, "best.pth"))
    assert checkpoints.best_or_newest_in_run(folder) == checkpoints.list_checkpoints(folder)[-1][1]
    for _, old in checkpoints.list_checkpoints(folder):
        os.remove(old)
    with pytest.raises(checkpoints.CheckpointError, match="no best.pth and no step checkpoint"):
        checkpoints.best_or_newest_in_run(folder)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(data, tmp_path):
    logs = tmp_path / "logs"
    cmd = [sys.executable, os.path.join(REPO, "run_deepvoxels.py"),
           *_train_argv(data / "train" / "cube", logs, "--max_steps", "100000", "--val_every", "0")]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    runs = logs / "runs"
    # Wait until training has logged a few scalars, then ask it to stop.
    while time.time() < deadline:
        events = list(runs.rglob("events.out.tfevents.*")) if runs.exists() else []
        if events and events[0].stat().st_size > 2000:
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out  # a clean exit that says training did not finish
    assert "Traceback" not in out
    payload, _ = _final_state(logs)
    assert payload["step"] >= 1
    assert "stopped by signal" in out
    # Not a terminal: progress comes as log lines with the step, the losses and the time per step.
    assert "s/step" in out and "loss_g" in out


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pth")
    checkpoints.save(path, {"model": {"w": torch.ones(3)}})

    def broken_save(obj, handle, *args, **kwargs):
        handle.write(b"partial")
        raise OSError(errno.EIO, "input/output error")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        checkpoints.save(path, {"model": {"w": torch.zeros(3)}})
    monkeypatch.undo()
    assert torch.equal(checkpoints.load(path)["model"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["ckpt.pth"]


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads the process's mappings (Linux)")
def test_mapped_load_maps_zip_checkpoints_and_reads_the_originals_format(tmp_path):
    """Test mode and the viewer map the checkpoint (only the weights they use are read from disk); the
    original's format cannot be mapped and is read whole. Both give the saved values."""
    payload = {"model": {"w": torch.arange(6.0)}, "optimizer_g": {"state": {0: {"exp_avg": torch.ones(4)}}}}
    zipped, legacy = str(tmp_path / "zip.pth"), str(tmp_path / "legacy.pth")
    torch.save(payload, zipped)
    torch.save(payload, legacy, _use_new_zipfile_serialization=False)
    for path, maps in ((zipped, True), (legacy, False)):
        loaded = checkpoints.load(path, mapped=True)
        with open("/proc/self/maps") as handle:
            assert (os.path.realpath(path) in handle.read()) is maps, path
        assert torch.equal(loaded["model"]["w"], payload["model"]["w"])
        assert torch.equal(loaded["optimizer_g"]["state"][0]["exp_avg"], torch.ones(4))
        del loaded
    read = checkpoints.load(zipped)
    with open("/proc/self/maps") as handle:
        assert os.path.realpath(zipped) not in handle.read()  # training's resume reads the file
    assert torch.equal(read["model"]["w"], payload["model"]["w"])


@pytest.mark.parametrize("zip_writer", [False, True], ids=["oserror", "torch_zip_writer"])
def test_full_disk_while_checkpointing_is_one_line_and_keeps_the_last_good_checkpoint(data, tmp_path, capsys,
                                                                                      monkeypatch, zip_writer):
    """The disk fills during the step-4 checkpoint's write: training ends with one line naming the file and
    the lack of space, the step-2 checkpoint stays whole, and no partial file is left behind. On a real full
    filesystem torch.save's archive writer reports it as a RuntimeError raised while the OSError is handled."""
    real_save = torch.save
    calls = []

    def filling_save(obj, handle, *args, **kwargs):
        calls.append(obj.get("step"))
        if obj.get("step") == 4:
            handle.write(b"x" * 1000)
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError:
                if zip_writer:
                    raise RuntimeError("[enforce fail at inline_container.cc] . unexpected pos 1000 vs 900")
                raise
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", filling_save)
    code = run_deepvoxels.main(_train_argv(data / "train" / "cube", tmp_path / "logs", "--max_steps", "6",
                                           "--checkpoint_every", "2", "--val_every", "0"))
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert code == 2 and calls == [2, 4]
    assert err.count("\n") == 1 and "no space left" in err and "model-epoch_0_iter_4.pth" in err, err
    payload, path = _final_state(tmp_path / "logs")
    assert payload["step"] == 2 and checkpoints.load(path)["model"]["deepvoxels"].shape == (1, 4, 8, 8, 8)
    assert not [f for f in os.listdir(os.path.dirname(path)) if f.startswith(".tmp_")]


class _RunsCode:
    """Unpickling this would create a folder: a stand-in for a checkpoint that runs code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def test_checkpoint_that_runs_code_is_refused(tmp_path, capsys, data):
    marker = str(tmp_path / "code_ran")
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"x": _RunsCode(marker)}}, evil)
    with pytest.raises(checkpoints.CheckpointError, match="weights_only"):
        checkpoints.load(str(evil))
    code = run_deepvoxels.main(["--train_test", "test", "--data_root", str(data / "test" / "cube"),
                                "--logging_root", str(tmp_path), "--checkpoint", str(evil), *TINY])
    assert code == 2
    assert not os.path.exists(marker)
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint") and err.count("\n") == 1


def _copy(data, tmp_path, split="train"):
    dst = tmp_path / split / "cube"
    shutil.copytree(data / split / "cube", dst)
    return dst


def _mutate_missing_rgb(root):
    shutil.rmtree(root / "rgb")


def _mutate_missing_pose(root):
    shutil.rmtree(root / "pose")


def _mutate_count(root):
    os.remove(sorted((root / "pose").iterdir())[0])


def _mutate_pose_values(root):
    (sorted((root / "pose").iterdir())[1]).write_text("1 0 0\n0 1 0\n")


def _mutate_pose_text(root):
    (sorted((root / "pose").iterdir())[1]).write_text("1 0 0 0\n0 one 0 0\n0 0 1 0\n0 0 0 1\n")


def _mutate_pose_singular(root):
    (sorted((root / "pose").iterdir())[1]).write_text("1 0 0 0\n1 0 0 0\n0 0 1 1\n0 0 0 1\n")


def _mutate_intrinsics_missing(root):
    os.remove(root / "intrinsics.txt")


def _mutate_intrinsics_malformed(root):
    (root / "intrinsics.txt").write_text("179.2 64.0\n0 0 0\n")


def _mutate_image(root):
    (sorted((root / "rgb").iterdir())[2]).write_bytes(b"not a png at all")


BAD_DATA = [
    (_mutate_missing_rgb, "rgb"),
    (_mutate_missing_pose, "pose"),
    (_mutate_count, "5"),
    (_mutate_pose_values, "000001.txt"),
    (_mutate_pose_text, "000001.txt"),
    (_mutate_pose_singular, "000001.txt"),
    (_mutate_intrinsics_missing, "intrinsics.txt"),
    (_mutate_intrinsics_malformed, "intrinsics.txt"),
    (_mutate_image, "000002.png"),
]


@pytest.mark.parametrize("mutate,culprit", BAD_DATA, ids=[m.__name__[8:] for m, _ in BAD_DATA])
def test_bad_dataset_gets_one_line_naming_the_culprit(data, tmp_path, capsys, mutate, culprit):
    root = _copy(data, tmp_path)
    mutate(root)
    code = run_deepvoxels.main(_train_argv(root, tmp_path / "logs", "--max_steps", "1"))
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert culprit in err
    assert "Traceback" not in err


def test_missing_data_root(tmp_path, capsys):
    assert run_deepvoxels.main(_train_argv(tmp_path / "nowhere", tmp_path / "logs")) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and err.count("\n") == 1


@pytest.mark.parametrize("flags,culprit", [
    (["--train_test", "evaluate"], "--train_test"),
    (["--train_test", "train", "--img_sidelength", "100"], "128, 256, 512"),
    (["--train_test", "train", "--grid_dim", "10"], "--grid_dim"),
    (["--train_test", "train", "--sampling_pattern", "every_other"], "--sampling_pattern"),
])
def test_bad_flags(tmp_path, capsys, flags, culprit):
    argv = ["--data_root", str(tmp_path), "--logging_root", str(tmp_path), "--device", "cpu"] + flags
    assert run_deepvoxels.main(argv) == 2
    err = capsys.readouterr().err
    assert culprit in err and err.count("\n") == 1


def _test_argv(data, tmp_path, ckpt, *extra):
    return ["--train_test", "test", "--data_root", str(data / "test" / "cube"), "--logging_root",
            str(tmp_path / "logs"), "--checkpoint", str(ckpt), *TINY, *extra]


def test_checkpoint_missing_corrupt_or_from_another_configuration(data, tmp_path, capsys, reference_dir):
    assert run_deepvoxels.main(_test_argv(data, tmp_path, tmp_path / "none.pth")) == 2
    assert "no such file" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.pth"
    for seed in range(5):  # random bytes trip the unpickler in different places
        corrupt.write_bytes(np.random.RandomState(seed).bytes(2000))
        assert run_deepvoxels.main(_test_argv(data, tmp_path, corrupt)) == 2
        assert "corrupt.pth" in capsys.readouterr().err
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(open(os.path.join(reference_dir, "small_ckpt.pth"), "rb").read()[:50000])
    assert run_deepvoxels.main(_test_argv(data, tmp_path, truncated)) == 2
    assert "truncated.pth: unreadable or truncated" in capsys.readouterr().err
    small = os.path.join(reference_dir, "small_ckpt.pth")  # grid 16, 8 features, nf0 8
    assert run_deepvoxels.main(_test_argv(data, tmp_path, small)) == 2
    err = capsys.readouterr().err
    assert "grid_dim 16 in the checkpoint, 8 given" in err
    assert "num_grid_feats 8 in the checkpoint, 4 given" in err and err.count("\n") == 1


def _pose_away_from_grid():
    """Camera at (0, 0, 3) looking further along +z: the grid at the origin is behind it."""
    return data_util.look_at((0.0, 0.0, 3.0), target=(0.0, 0.0, 6.0), up=(0.0, 1.0, 0.0))


def test_empty_frustum_is_a_counted_warning_in_training(data, tmp_path, caplog):
    root = _copy(data, tmp_path)
    data_util.write_pose(sorted((root / "pose").iterdir())[0], _pose_away_from_grid())
    with caplog.at_level("WARNING"):
        code = run_deepvoxels.main(_train_argv(root, tmp_path / "logs", "--max_steps", "6", "--val_every", "0"))
    assert code == 0
    assert "skipping a training triplet (1 so far)" in caplog.text
    assert "training triplets were skipped" in caplog.text


def test_empty_frustum_is_an_error_in_test_mode(data, tmp_path, capsys):
    assert run_deepvoxels.main(_train_argv(data / "train" / "cube", tmp_path / "logs", "--max_steps", "1")) == 0
    ckpt = checkpoints.newest_checkpoint(str(tmp_path / "logs"))
    root = _copy(data, tmp_path, "test")
    data_util.write_pose(sorted((root / "pose").iterdir())[1], _pose_away_from_grid())
    code = run_deepvoxels.main(["--train_test", "test", "--data_root", str(root), "--logging_root",
                                str(tmp_path / "logs"), "--checkpoint", ckpt, *TINY])
    err = capsys.readouterr().err
    assert code == 2 and "view 1" in err and err.count("\n") == 1


def test_non_finite_loss_stops_with_a_checkpoint(data, tmp_path, capsys):
    code = run_deepvoxels.main(_train_argv(data / "train" / "cube", tmp_path / "logs", "--max_steps", "5",
                                           "--l1_weight", "nan"))
    err = capsys.readouterr().err
    assert code == 3
    assert "non-finite loss" in err and "last good state" in err and err.count("\n") == 1
    payload, _ = _final_state(tmp_path / "logs")
    assert payload["step"] == 0
    assert all(torch.isfinite(v).all() for v in payload["model"].values() if v.is_floating_point())
