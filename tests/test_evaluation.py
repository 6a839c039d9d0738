"""Evaluation and monitoring: test-mode metrics, TensorBoard contents, best.pth, validation notices and the
nearest-neighbour baseline.

One tiny model (128 px, grid 8, 4 features) is trained for two steps and tested once per module; every
test below reads what that run wrote. The networks accept nothing smaller: 128 = 64 * 2 is the smallest
image and the inpainting U-Net halves the grid twice.
"""
from __future__ import annotations

import contextlib
import csv
import glob
import io
import json
import logging
import math
import os
import shutil
import struct
import threading
import time
import types
import warnings

import numpy as np
import pytest

import torch

import checkpoints
import data_util
import evaluation
import metrics
import run_deepvoxels
from conftest import TEST_DEVICE
from evaluation import Validator
from tools import dataset, nn_baseline, synthetic

SIDE = 128
TINY_MODEL = ["--img_sidelength", str(SIDE), "--grid_dim", "8", "--num_grid_feats", "4", "--nf0", "4"]
STEPS = 2
TRAIN_SCALARS = ("discrim_loss", "gen_loss_total", "gen_loss_l1", "gen_loss_g", "out_min", "out_max",
                 "learning_rate")
VAL_SCALARS = ("val_psnr", "val_ssim")
SUMMARY_IMAGES = ("Depth", "Output_vs_gt", "Nearest_neighbors_rgb", "update_gate", "reset_gate")


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _run_logged(argv: list[str]) -> tuple[int, list[str], str]:
    """run_deepvoxels.main(argv) in this process; returns its exit code, its log messages and its stdout."""
    handler = _ListHandler()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            code = run_deepvoxels.main(argv)
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    return code, handler.messages, stdout.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> types.SimpleNamespace:
    """Train two steps (validation after each, one validation view), then test the last checkpoint."""
    root = tmp_path_factory.mktemp("evaluation")
    folders = synthetic.make_synthetic_dataset(root / "data", "cube", resolution=SIDE, num_train=4, num_val=2,
                                               num_test=2, seed=0)
    logs = root / "logs"
    train_code, train_log, _ = _run_logged(
        ["--train_test", "train", "--data_root", folders["train"], "--logging_root", str(logs), *TINY_MODEL,
         "--max_steps", str(STEPS), "--num_trgt", "1", "--summary_every", str(STEPS), "--val_every", "1",
         "--val_views", "1", "--device", TEST_DEVICE, "--seed", "0"])
    assert train_code == 0
    (log_dir,) = glob.glob(str(logs / "logs" / "*" / "*"))
    (events,) = glob.glob(str(logs / "runs" / "*" / "*" / "events.out.tfevents.*"))
    (checkpoint,) = glob.glob(os.path.join(log_dir, "model-epoch_*_iter_*.pth"))
    test_code, test_log, test_stdout = _run_logged(
        ["--train_test", "test", "--data_root", folders["test"], "--logging_root", str(logs), *TINY_MODEL,
         "--checkpoint", checkpoint, "--device", TEST_DEVICE])
    assert test_code == 0
    (test_dir,) = glob.glob(str(logs / "test_traj" / "*" / "*"))
    return types.SimpleNamespace(folders=folders, log_dir=log_dir, events=events, checkpoint=checkpoint,
                                 test_dir=test_dir, train_log=train_log, test_log=test_log,
                                 test_stdout=test_stdout)


# ----------------------------------------------------------------------------------------------------------
# Reading TensorBoard event files without TensorFlow
# ----------------------------------------------------------------------------------------------------------

def read_events(path: str) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[int]]]:
    """(scalars {tag: [(step, value)]}, images {tag: [step]}) from one event file.

    Uses tensorboard's EventAccumulator when tensorboard is installed; otherwise parses the TFRecord file
    (8-byte little-endian length, 4-byte masked CRC-32C of it, the Event protobuf, its 4-byte masked CRC)
    with tensorboardX's own protobufs, checking both CRCs.
    """
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return _parse_tfrecord_events(path)
    acc = EventAccumulator(path, size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags["scalars"]}
    images = {t: [e.step for e in acc.Images(t)] for t in tags["images"]}
    return scalars, images


def _parse_tfrecord_events(path: str) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[int]]]:
    from tensorboardX.proto import event_pb2
    from tensorboardX.record_writer import masked_crc32c
    with open(path, "rb") as handle:
        data = handle.read()
    scalars: dict[str, list[tuple[int, float]]] = {}
    images: dict[str, list[int]] = {}
    pos = 0
    while pos < len(data):
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
        payload = data[pos + 12:pos + 12 + length]
        (payload_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
        assert header_crc == masked_crc32c(header) and payload_crc == masked_crc32c(payload), \
            f"{path}: corrupt record at byte {pos}"
        pos += 16 + length
        event = event_pb2.Event.FromString(payload)
        for value in event.summary.value:
            if value.HasField("simple_value"):
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
            elif value.HasField("image"):
                images.setdefault(value.tag, []).append(event.step)
    return scalars, images


# ----------------------------------------------------------------------------------------------------------
# Test mode
# ----------------------------------------------------------------------------------------------------------

def _read_csv(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_test_mode_metrics_recompute_from_pngs(run):
    rows = _read_csv(os.path.join(run.test_dir, "metrics.csv"))
    gt_paths = data_util.glob_imgs(os.path.join(run.folders["test"], "rgb"))
    pose_paths = data_util.list_poses(os.path.join(run.folders["test"], "pose"))
    assert [int(r["view"]) for r in rows] == list(range(len(gt_paths)))
    assert [r["pose_file"] for r in rows] == [os.path.basename(p) for p in pose_paths]
    border = metrics.BORDER
    for row, gt_path in zip(rows, gt_paths):
        png = data_util.read_image(os.path.join(run.test_dir, f"img_{int(row['view']):05d}.png"))
        assert png.dtype == np.uint16 and png.shape == (SIDE - 2 * border, SIDE - 2 * border, 3)
        pred = png.astype(np.float64) / 65535.0
        gt = data_util.load_rgb(gt_path, SIDE).transpose(1, 2, 0)[border:-border, border:-border] + 0.5
        assert float(row["psnr"]) == pytest.approx(metrics.psnr(pred, gt), rel=1e-9)
        assert float(row["ssim"]) == pytest.approx(metrics.ssim(pred, gt), rel=1e-9)
        # PSNR by its definition, independently of scikit-image.
        mse = np.mean((pred - gt.astype(np.float64)) ** 2)
        assert float(row["psnr"]) == pytest.approx(10.0 * math.log10(1.0 / mse), rel=1e-9)

    with open(os.path.join(run.test_dir, "metrics.json")) as handle:
        summary = json.load(handle)
    assert summary["num_views"] == len(rows)
    assert summary["step"] == STEPS
    assert summary["views_per_forward"] == 8  # --view_batch 0 at 128 px: the default batch
    assert summary["checkpoint"] == os.path.abspath(run.checkpoint)
    assert summary["config"]["grid_dim"] == 8
    for key in ("psnr", "ssim"):
        assert summary[key] == pytest.approx(np.mean([float(r[key]) for r in rows]), rel=1e-12)
    assert f"PSNR {summary['psnr']:.2f} dB  SSIM {summary['ssim']:.4f}" in run.test_stdout


def test_test_mode_writes_depth_video_and_comparison(run):
    views = len(data_util.glob_imgs(os.path.join(run.folders["test"], "rgb")))
    assert len(glob.glob(os.path.join(run.test_dir, "depth", "img_*.png"))) == views
    assert [p for p in ("video.mp4", "video.gif") if os.path.isfile(os.path.join(run.test_dir, p))]
    strip = data_util.read_image(os.path.join(run.test_dir, "comparison.png"))
    crop = SIDE - 2 * metrics.BORDER
    assert strip.dtype == np.uint8 and strip.shape == (2 * crop, views * crop, 3)  # ground truth above renders


def test_lpips_notice_at_most_once_in_test_mode(run):
    notices = [m for m in run.test_log if "LPIPS" in m]
    assert len(notices) <= 1


# ----------------------------------------------------------------------------------------------------------
# Training: TensorBoard, validation, best.pth
# ----------------------------------------------------------------------------------------------------------

def test_tensorboard_holds_scalars_and_images(run):
    scalars, images = read_events(run.events)
    for tag in TRAIN_SCALARS:
        assert [s for s, _ in scalars.get(tag, [])] == list(range(STEPS)), tag
        assert all(math.isfinite(v) for _, v in scalars[tag]), tag
    assert scalars["learning_rate"][0][1] == pytest.approx(4e-4)
    for tag in VAL_SCALARS:
        assert [s for s, _ in scalars.get(tag, [])] == [1, 2], tag  # --val_every 1; no repeat at the end
    for tag in SUMMARY_IMAGES:
        assert images.get(tag) == [0], tag  # --summary_every 2 with 2 steps: only step 0
    assert images.get("val_render_vs_gt") == [1, 2]


def test_best_checkpoint_holds_the_best_validation_psnr(run):
    scalars, _ = read_events(run.events)
    val = scalars["val_psnr"]
    best_step, best_value = max(val, key=lambda sv: sv[1])
    payload = checkpoints.load(os.path.join(run.log_dir, "best.pth"))
    assert payload["best_psnr"] == pytest.approx(best_value, rel=1e-6)  # event files store float32
    assert payload["step"] == best_step
    assert "model" in payload and "deepvoxels" in payload["model"]
    # The end-of-training checkpoint remembers it too, so --resume keeps the same best.
    assert checkpoints.load(run.checkpoint)["best_psnr"] == pytest.approx(best_value, rel=1e-6)


def test_validation_defaults_to_the_sibling_folder(run):
    assert any(m == f"validation: {run.folders['validation']}" for m in run.train_log)
    assert not any("validation off" in m for m in run.train_log)


def _validator_opt(data_root: str, val_root: str = "") -> types.SimpleNamespace:
    return types.SimpleNamespace(data_root=data_root, val_root=val_root, img_sidelength=SIDE, val_views=0,
                                 view_batch=4, amp="off")


def test_validation_root_flag(run):
    cpu = torch.device("cpu")
    geometry = run_deepvoxels.build_geometry(os.path.join(run.folders["train"], "intrinsics.txt"), 8, 0.5, cpu)
    # Any folder with poses and images serves; here the test split stands in for a validation set.
    validator = Validator.create(_validator_opt(run.folders["train"], run.folders["test"]), geometry, cpu)
    assert validator is not None and validator.dataset.root_dir == run.folders["test"]


def test_validation_off_gives_one_notice(tmp_path, caplog):
    scene = tmp_path / "scene"  # not inside a train/validation/test tree, and no --val_root
    scene.mkdir()
    with caplog.at_level(logging.INFO):
        validator = Validator.create(_validator_opt(str(scene)), None, None)
    assert validator is None
    assert len([r for r in caplog.records if "validation off" in r.getMessage()]) == 1


# ----------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------

def test_psnr_of_identical_images_is_inf_without_warnings():
    img = np.random.RandomState(0).uniform(size=(16, 16, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert metrics.psnr(img, img) == math.inf
    assert metrics.ssim(img, img) == pytest.approx(1.0)


def test_psnr_is_scikit_images():
    from skimage.metrics import peak_signal_noise_ratio
    rng = np.random.RandomState(1)
    for shape in ((16, 16, 3), (7, 9, 3)):
        target, pred = rng.uniform(size=shape), rng.uniform(size=shape).astype(np.float32)
        expected = peak_signal_noise_ratio(target, pred.astype(np.float64), data_range=1.0)
        assert metrics.psnr(pred, target) == pytest.approx(expected, rel=1e-12)
    slightly_off = target + 1e-3
    assert metrics.psnr(slightly_off, target) == pytest.approx(60.0, rel=1e-9)


def test_ssim_of_the_cropped_images_from_the_whole_images_map():
    """Test mode takes both SSIMs from one map: they equal scikit-image's scores of the whole and the cropped
    images (a window one pixel off changes them at 1e-3)."""
    from skimage.metrics import structural_similarity
    rng = np.random.RandomState(2)
    target = rng.uniform(size=(40, 36, 3))
    pred = np.clip(target + rng.normal(scale=0.2, size=target.shape) * (np.arange(36) / 36)[:, None], 0, 1)
    for border in (metrics.BORDER, 2):
        whole, cropped = metrics.ssim_whole_and_cropped(pred, target, border)
        assert whole == pytest.approx(structural_similarity(target, pred, data_range=1.0, channel_axis=-1),
                                      rel=1e-12)
        inner = (slice(border, -border), slice(border, -border))
        assert cropped == pytest.approx(structural_similarity(target[inner], pred[inner], data_range=1.0,
                                                              channel_axis=-1), rel=1e-12)
        assert abs(cropped - whole) > 1e-3  # the crop matters for these images


def test_lpips_unavailable_gives_one_notice(monkeypatch, caplog):
    monkeypatch.setitem(__import__("sys").modules, "lpips", None)  # makes `import lpips` fail
    with caplog.at_level(logging.INFO):
        scorer = metrics.LpipsScorer()
    assert not scorer.available and scorer(np.zeros((8, 8, 3)), np.zeros((8, 8, 3))) is None
    assert len([r for r in caplog.records if "LPIPS not computed" in r.getMessage()]) == 1


# ----------------------------------------------------------------------------------------------------------
# Nearest-neighbour baseline
# ----------------------------------------------------------------------------------------------------------

def test_nearest_training_views_by_viewing_direction():
    train = [data_util.look_at((2.0, 0.0, 0.3)), data_util.look_at((0.0, 2.0, 0.3)),
             data_util.look_at((-2.0, 0.0, 0.3))]
    # A camera shifted far along +y but looking along -x (as train[0] does) is closest by direction,
    # although its position is closest to train[1]'s.
    shifted = np.array(train[0])
    shifted[:3, 3] += np.array([0.0, 5.0, 0.0])
    queries = [data_util.look_at((1.0, 0.2, 0.1)), data_util.look_at((-0.3, 3.0, 0.0)), shifted,
               data_util.look_at((-1.0, -0.1, 1.0))]
    assert nn_baseline.nearest_training_views(train, queries).tolist() == [0, 1, 0, 2]


def _constant_views(folder, poses, levels) -> None:
    os.makedirs(folder / "rgb")
    data_util.write_pose_folder(folder / "pose", poses)
    for i, level in enumerate(levels):
        data_util.write_png(folder / "rgb" / f"{i:06d}.png", np.full((SIDE, SIDE, 3), level, dtype=np.uint8))


def test_nn_baseline_hand_computed(tmp_path):
    east, north = data_util.look_at((2.0, 0.0, 0.5)), data_util.look_at((0.0, 2.0, 0.5))
    _constant_views(tmp_path / "train", [east, north], [100, 200])
    # Test view 0 looks almost like `east` and shows grey 110; test view 1 *is* `north` with its image.
    _constant_views(tmp_path / "test", [data_util.look_at((2.0, 0.1, 0.4)), north], [110, 200])
    rows, means = nn_baseline.nn_baseline(tmp_path / "train", tmp_path / "test", SIDE, use_lpips=False)

    assert [r["nn_file"] for r in rows] == ["000000.png", "000001.png"]
    # Constant images: PSNR = 20 log10(255 / 10); SSIM has only its luminance term (no variance anywhere).
    a, b, c1 = 110 / 255, 100 / 255, (0.01 * 1.0) ** 2
    assert rows[0]["psnr"] == pytest.approx(20 * math.log10(255 / 10), abs=1e-5)
    assert rows[0]["ssim"] == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), abs=1e-6)
    assert rows[1]["psnr"] == math.inf and rows[1]["ssim"] == pytest.approx(1.0)
    assert means["num_views"] == 2 and means["psnr"] == math.inf
    assert means["ssim"] == pytest.approx((rows[0]["ssim"] + 1.0) / 2)


def test_nn_baseline_picks_a_training_view_shown_again(run, tmp_path):
    # Test views that are copies of training views: the baseline must return those very images.
    test = tmp_path / "copies"
    for sub in ("rgb", "pose"):
        os.makedirs(test / sub)
    train = run.folders["train"]
    for new, old in enumerate((3, 1)):
        shutil.copy(os.path.join(train, "rgb", f"{old:06d}.png"), test / "rgb" / f"{new:06d}.png")
        shutil.copy(os.path.join(train, "pose", f"{old:06d}.txt"), test / "pose" / f"{new:06d}.txt")
    rows, _ = nn_baseline.nn_baseline(train, test, SIDE, use_lpips=False)
    assert [r["nn_file"] for r in rows] == ["000003.png", "000001.png"]
    assert all(r["psnr"] == math.inf and r["ssim"] == pytest.approx(1.0) for r in rows)


def test_nn_baseline_command_writes_its_files(run, tmp_path, capsys):
    out = tmp_path / "baseline"
    code = dataset.main(["nn_baseline", "--train_root", run.folders["train"], "--test_root", run.folders["test"],
                           "--img_sidelength", str(SIDE), "--out", str(out)])
    assert code == 0
    rows = _read_csv(out / "metrics.csv")
    with open(out / "metrics.json") as handle:
        summary = json.load(handle)
    assert len(rows) == summary["num_views"] == 2
    assert list(rows[0])[:5] == ["view", "pose_file", "nn_file", "psnr", "ssim"]
    assert summary["psnr"] == pytest.approx(np.mean([float(r["psnr"]) for r in rows]), rel=1e-12)
    assert summary["img_sidelength"] == SIDE
    # Scored like test mode: the recomputed score of the chosen training image matches.
    border = metrics.BORDER
    for row, gt_path in zip(rows, data_util.glob_imgs(os.path.join(run.folders["test"], "rgb"))):
        nn = data_util.load_rgb(os.path.join(run.folders["train"], "rgb", row["nn_file"]), SIDE)
        gt = data_util.load_rgb(gt_path, SIDE)
        pred = nn.transpose(1, 2, 0)[border:-border, border:-border] + 0.5
        target = gt.transpose(1, 2, 0)[border:-border, border:-border] + 0.5
        assert float(row["psnr"]) == pytest.approx(metrics.psnr(pred, target), rel=1e-9)
    printed = capsys.readouterr().out
    assert f"baseline PSNR {summary['psnr']:.2f} dB  SSIM {summary['ssim']:.4f}" in printed


def test_nn_baseline_command_rejects_a_test_folder_without_images(run, tmp_path, capsys):
    poses_only = tmp_path / "poses_only"
    shutil.copytree(os.path.join(run.folders["test"], "pose"), poses_only / "pose")
    code = dataset.main(["nn_baseline", "--train_root", run.folders["train"], "--test_root", str(poses_only),
                           "--img_sidelength", str(SIDE), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "test folder" in capsys.readouterr().err


def test_interpolate_command(tmp_path, capsys):
    poses = synthetic.random_hemisphere_poses(12, 1.6, np.random.RandomState(1))
    data_util.write_pose_folder(tmp_path / "train_pose", poses)
    assert dataset.main(["interpolate", "--train_pose_dir", str(tmp_path / "train_pose"),
                           "--out", str(tmp_path / "traj"), "--num_samples", "2", "--num_steps", "3"]) == 0
    written = data_util.list_poses(tmp_path / "traj")
    assert len(written) == 6 and "wrote 6 interpolated poses" in capsys.readouterr().out
    assert all(data_util.load_pose(p).shape == (4, 4) for p in written)


def test_uncropped_scores_cover_the_border():
    """Test mode also scores the whole image (as NeRF-synthetic papers do): an error only in the border
    lowers the uncropped PSNR and leaves the cropped one perfect."""
    from evaluation import ViewScorer, to_uint16
    gt = torch.rand(3, 32, 32) - 0.5
    render = gt.clone()
    render[:, :2, :] = 0.5 - render[:, :2, :]  # two rows of the border wrong
    item = {"gt_rgb": torch.from_numpy(to_uint16(gt).transpose(2, 0, 1) / 65535.0 - 0.5).float(),
            "pose_path": "000000.txt"}
    row = ViewScorer()(0, to_uint16(render), item)
    assert row["psnr"] > 80 and row["ssim"] == pytest.approx(1.0, abs=1e-6)
    whole_gt = item["gt_rgb"].numpy().transpose(1, 2, 0) + 0.5
    expected = metrics.psnr(to_uint16(render).astype(np.float64) / 65535.0, whole_gt)
    assert row["psnr_uncropped"] == pytest.approx(expected, rel=1e-9) and row["psnr_uncropped"] < 30
    assert row["ssim_uncropped"] < 0.99


def test_rendering_chooses_cudnn_algorithms_by_heuristics_and_restores_autotuning():
    """render_poses runs the inpainting and every batch of views without cuDNN autotuning (each new shape would
    be timed against every algorithm) and leaves the process's setting as it found it."""
    seen = []

    class Model:
        deepvoxels = torch.zeros(1)

        def inpaint(self, grid):
            seen.append(("inpaint", torch.backends.cudnn.benchmark))
            return grid

        def render(self, grid, lift, proj):
            seen.append(("render", torch.backends.cudnn.benchmark))
            return torch.zeros(len(lift), 3, 2, 2), torch.zeros(len(lift), 1, 2, 2)

    indices = types.SimpleNamespace(project=lambda pose: (pose, pose))
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        views = list(evaluation.render_poses(Model(), indices, [torch.zeros(1)] * 3, 2, contextlib.nullcontext))
        after = torch.backends.cudnn.benchmark
    finally:
        torch.backends.cudnn.benchmark = saved
    assert [i for i, _, _ in views] == [0, 1, 2]
    assert seen == [("inpaint", False), ("render", False), ("render", False)]
    assert after is True


def test_networks_built_for_a_checkpoint_draw_no_random_weights():
    """Inside util.skip_initialisation layers draw nothing (the RNG does not move); outside it they draw again."""
    import util
    state = torch.random.get_rng_state()
    with util.skip_initialisation():
        torch.nn.Conv2d(4, 4, 3)
        torch.nn.BatchNorm2d(4)
        with util.batchnorm_init_of_pytorch_1_0():
            torch.nn.BatchNorm2d(4)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.nn.Conv2d(4, 4, 3)
    assert not torch.equal(torch.random.get_rng_state(), state)


def test_video_names_its_encoder_and_searches_only_when_it_fails(monkeypatch, tmp_path):
    """The MP4 is written with libx264 named, without imageio-ffmpeg's encoder search (two extra ffmpeg runs);
    if that encoder fails, the search finds another before test mode settles for a GIF."""
    _io = pytest.importorskip("imageio_ffmpeg._io")
    searched = []
    search = _io.get_first_available_h264_encoder
    monkeypatch.setattr(_io, "get_first_available_h264_encoder", lambda: searched.append(True) or search())
    frames = [np.full((16, 16, 3), value, np.uint16) for value in (0, 30000, 65535)]
    assert evaluation.write_video(str(tmp_path / "named"), frames) == str(tmp_path / "named.mp4")
    assert not searched
    monkeypatch.setattr(evaluation, "VIDEO_CODEC", "no_such_encoder")
    written = evaluation.write_video(str(tmp_path / "searched"), frames)
    assert searched and os.path.getsize(written) > 0
    assert written.endswith(".mp4") or not os.path.exists(str(tmp_path / "searched.mp4"))


def test_each_chunk_in_threads_works_a_chunk_at_once_and_draws_the_next_after_it():
    """Test mode's PNGs and scores: the views of one rendered chunk are worked on together, in order, and the
    next chunk (whose drawing renders it) is drawn only when they are done; an error reaches the caller."""
    together = threading.Barrier(2, timeout=10)  # both views of a chunk must be in work at once
    finished: list[int] = []

    def views(count):
        for i in range(count):
            if i % 2 == 0:
                assert sorted(finished) == list(range(i)), i  # the earlier chunks are done before this one is drawn
            yield (i,)

    def work(i):
        together.wait()
        time.sleep(0.02 if i % 2 == 0 else 0.0)  # the first of a pair finishes last
        finished.append(i)
        return i * i

    assert evaluation.each_chunk_in_threads(views(6), 2, work, threads=2) == [0, 1, 4, 9, 16, 25]

    def broken(i):
        raise OSError(28, "No space left on device", f"img_{i:05d}.png")
    with pytest.raises(OSError, match="No space left"):
        evaluation.each_chunk_in_threads(((i,) for i in range(3)), 2, broken, threads=2)
