"""The web viewer (viewer.py): the frame it serves against test mode's render, the range warning, the views it
toggles between, the live viewer's schedule, camera paths that test mode renders, one-line errors, and a page in
a real browser (headless Chromium).

One tiny model (128 px, grid 8, 4 features) is trained for two steps per module; a browser stand-in
(tools/viser_probe.py) speaks viser's websocket protocol where no browser is needed.
"""
from __future__ import annotations

import base64
import contextlib
import glob
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types
import urllib.request

import numpy as np
import pytest
import torch

import data_util
import run_deepvoxels
import viewer
from conftest import REPO_ROOT, TEST_DEVICE
from tools import synthetic
from tools.viser_probe import ViserProbe

SIDE = 128
TINY_MODEL = ["--img_sidelength", str(SIDE), "--grid_dim", "8", "--num_grid_feats", "4", "--nf0", "4"]
TEST_VIEW = 1  # the test pose compared with test mode's render
WAIT_S = 60.0
BROWSER_WAIT_S = 240.0  # software WebGL on a loaded 2-core machine can take minutes to start the page
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _quiet_main(argv: list[str]) -> int:
    with contextlib.redirect_stdout(io.StringIO()):
        return run_deepvoxels.main(argv)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> types.SimpleNamespace:
    """Two training steps of the tiny model, and test mode's renders of the test poses."""
    root = tmp_path_factory.mktemp("viewer")
    folders = synthetic.make_synthetic_dataset(root / "data", "cube", resolution=SIDE, num_train=4, num_val=1,
                                               num_test=2, seed=0)
    logs = root / "logs"
    assert _quiet_main(["--train_test", "train", "--data_root", folders["train"], "--logging_root", str(logs),
                        *TINY_MODEL, "--max_steps", "2", "--num_trgt", "1", "--val_every", "0",
                        "--device", TEST_DEVICE, "--seed", "0"]) == 0
    (checkpoint,) = glob.glob(str(logs / "logs" / "*" / "*" / "model-epoch_*_iter_*.pth"))
    assert _quiet_main(["--train_test", "test", "--data_root", folders["test"], "--logging_root", str(logs),
                        "--checkpoint", checkpoint, "--device", TEST_DEVICE]) == 0
    (test_dir,) = glob.glob(str(logs / "test_traj" / "*" / "*"))
    return types.SimpleNamespace(root=root, folders=folders, logs=logs, checkpoint=checkpoint, test_dir=test_dir)


def _serve(trained, *extra: str) -> viewer.Viewer:
    return viewer.serve(["--checkpoint", trained.checkpoint, "--data_root", trained.folders["train"], "--port", "0",
                         "--device", TEST_DEVICE, "--paths_dir", str(trained.root / "paths"), *extra])


def _wait(predicate, what: str, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"waited {timeout} s for {what}")


def _only_page(v: viewer.Viewer):
    return _wait(lambda: next(iter(v.pages.values()), None), "the probe's page")


def _frame_of(v: viewer.Viewer, probe: ViserProbe, page, pose: np.ndarray) -> np.ndarray:
    """The frame the viewer served for ``pose``, as the probe decoded it."""
    _wait(lambda: page.shown_pose is not None and np.abs(page.shown_pose - pose).max() < 1e-5, "the pose's frame")
    return probe.wait_image(page.frames_sent)


def _square(frame: np.ndarray, side: int, width: int, height: int) -> np.ndarray:
    _, _, top, left = viewer.letterbox_offsets(side, width, height)
    return frame[top:top + side, left:left + side]


@pytest.fixture(scope="module")
def served(trained):
    """A checkpoint viewer sending PNG frames to a 640 x 480 probe."""
    v = _serve(trained, "--image_format", "png")
    probe = ViserProbe(v.port, 640, 480)
    page = _only_page(v)
    yield types.SimpleNamespace(viewer=v, probe=probe, page=page, client=page.client)
    probe.close()
    v.close()


def test_served_frame_equals_test_mode_render(trained, served):
    """The camera set through viser's client API to a test pose: the frame the page receives is test mode's
    render of that pose (8-bit against 16-bit: within 1/255)."""
    pose = data_util.load_pose(data_util.list_poses(os.path.join(trained.folders["test"], "pose"))[TEST_VIEW])
    pose = pose.astype(np.float64)
    camera = served.client.camera
    camera.position = pose[:3, 3]
    camera.look_at = (0.0, 0.0, 0.0)  # the synthetic test poses look at the origin with +z up
    camera.up_direction = (0.0, 0.0, 1.0)
    frame = _frame_of(served.viewer, served.probe, served.page, pose)
    side = served.viewer.renderer.shown_side
    assert frame.shape[:2] == viewer.letterbox_offsets(side, 640, 480)[:2]
    shown = _square(frame, side, 640, 480).astype(np.float64) / 255
    expected = data_util.read_image(os.path.join(trained.test_dir, f"img_{TEST_VIEW:05d}.png")) / 65535.0
    assert shown.shape == expected.shape
    diff = np.abs(shown - expected).max()
    print(f"served frame vs test mode: max difference {diff * 255:.3f}/255")
    assert diff <= 1 / 255
    assert (frame[:, :2] == viewer.LETTERBOX_GREY).all()  # the bars beside the square
    # The page keeps the trained focal length: its vertical field of view is the square's.
    assert camera.fov == pytest.approx(served.viewer.renderer.square_fov, abs=1e-4)


def test_page_says_when_the_camera_leaves_the_range_trained(served):
    probe, page = served.probe, served.page
    for position, inside in (((0.0, -3.0, 0.5), False), ((0.0, -1.6, 0.2), True), ((0.0, -1.0, 0.1), False)):
        count = page.frames_sent
        probe.move(position, (0.0, 0.0, 0.0), (0.0, 0.0, 1.0))  # as a user's drag or zoom would
        _wait(lambda: page.frames_sent > count and np.allclose(page.shown_pose[:3, 3], position), "a frame")
        assert ("Outside the range trained" in page.status.content) != inside, page.status.content
    far = data_util.look_at((0.0, -3.0, 0.5))
    assert "distance 3.04" in served.viewer.renderer.range_note(far)
    assert "not inside the view volume" in served.viewer.renderer.range_note(far)


def test_toggle_depth_and_nearest_training_image(trained, served):
    v, probe, page = served.viewer, served.probe, served.page
    pose = data_util.look_at((0.3, -1.55, 0.3))
    probe.move(pose[:3, 3], (0.0, 0.0, 0.0), (0.0, 0.0, 1.0))
    _wait(lambda: page.shown_pose is not None and np.abs(page.shown_pose - pose).max() < 1e-5, "the pose's frame")
    frames = {}
    for show in (viewer.SHOW[1], viewer.SHOW[2], viewer.SHOW[0]):
        count = page.frames_sent
        page.show.value = show
        _wait(lambda: page.frames_sent > count and np.abs(page.shown_pose - pose).max() < 1e-5, show)
        frames[show] = _square(probe.wait_image(page.frames_sent), v.renderer.shown_side, 640, 480)
    image, depth = v.renderer.render(page.shown_pose)
    assert np.abs(frames["render"].astype(int) - image).max() <= 1
    assert not np.array_equal(frames["depth"], frames["render"])
    levels = np.clip((depth + 0.5) * 255, 0, 255).round().astype(np.uint8)
    assert (frames["depth"][0, 0] == v.renderer._depth_colours[levels[2, 2]]).all()  # 2 px per cell, 5 px border
    # The nearest training image by viewing direction, cropped as renders are.
    train_poses = [data_util.load_pose(p) for p in data_util.list_poses(os.path.join(trained.folders["train"], "pose"))]
    nearest = int(np.argmax([p[:3, 2] @ pose[:3, 2] for p in train_poses]))
    gt = data_util.load_rgb(data_util.glob_imgs(os.path.join(trained.folders["train"], "rgb"))[nearest], SIDE)
    expected = viewer.to_uint8(torch.from_numpy(gt)[:, 5:-5, 5:-5])
    assert np.array_equal(frames["nearest training image"], expected)


def test_letterbox_keeps_the_square_whole_for_any_aspect():
    square = np.full((10, 10, 3), 200, dtype=np.uint8)
    for width, height in ((640, 480), (480, 640), (300, 300)):
        frame = viewer.letterbox(square, width, height)
        assert abs(frame.shape[1] / frame.shape[0] - width / height) < 0.1
        assert np.array_equal(_square(frame, 10, width, height), square)
        assert (frame == 200).all(axis=2).sum() == 100


def test_camera_path_renders_in_test_mode(trained, served):
    """The camera path button's folder: interpolated poses and the intrinsics, which test mode renders."""
    keyframes = [data_util.look_at(p) for p in ((1.6, 0.0, 0.3), (0.0, 1.6, 0.5), (-1.6, 0.0, 0.3))]
    folder = served.viewer.write_camera_path(keyframes, 2)
    poses = [data_util.load_pose(p) for p in data_util.list_poses(os.path.join(folder, "pose"))]
    assert len(poses) == 5
    for pose, key in zip(poses[::2], keyframes):
        np.testing.assert_allclose(pose, key, atol=1e-6)
    with open(os.path.join(folder, "intrinsics.txt")) as handle:
        assert len(handle.read().splitlines()) == 5  # no world2cam line: the poses are camera-to-world
    logs = trained.root / "path_logs"
    assert _quiet_main(["--train_test", "test", "--data_root", folder, "--logging_root", str(logs),
                        "--checkpoint", trained.checkpoint, "--device", TEST_DEVICE]) == 0
    (out,) = glob.glob(str(logs / "test_traj" / "*" / "*"))
    assert len(glob.glob(os.path.join(out, "img_*.png"))) == 5
    assert glob.glob(os.path.join(out, "video.*"))


def test_live_viewer_renders_at_most_every_n_steps(trained):
    renderer = viewer.load(trained.checkpoint, trained.folders["train"], torch.device(TEST_DEVICE))
    renderer.model.train()
    v = viewer.Viewer(renderer, 0, live=True, every=3, paths_dir=str(trained.root / "live_paths"))
    try:
        v.between_steps(1)  # no page: nothing to render
        assert v._last_render_step is None
        probe = ViserProbe(v.port, 320, 320)
        page = _only_page(v)
        rendered_at = []
        for step in range(2, 12):
            probe.move((0.0, -1.6, 0.1 * step), (0.0, 0.0, 0.0), (0.0, 0.0, 1.0))  # the camera keeps moving
            _wait(lambda: abs(page.client.camera.position[2] - 0.1 * step) < 1e-9, "the camera")
            count = page.frames_sent
            v.between_steps(step)
            if page.frames_sent > count:
                rendered_at.append(step)
        assert rendered_at == [2, 5, 8, 11]
        assert "Training step 11" in page.status.content
        assert renderer.model.training  # restored after each render
        probe.close()
    finally:
        v.close()


def test_live_viewer_flag_trains_and_prints_the_address(trained, capsys):
    logs = trained.root / "live_logs"
    code = run_deepvoxels.main(["--train_test", "train", "--data_root", trained.folders["train"], "--logging_root",
                                str(logs), *TINY_MODEL, "--max_steps", "2", "--num_trgt", "1", "--val_every", "0",
                                "--device", TEST_DEVICE, "--live_viewer", "--viewer_port", "0",
                                "--viewer_every", "1"])
    assert code == 0
    assert re.search(r"^live viewer: http://localhost:\d+$", capsys.readouterr().out, re.M)


@pytest.fixture
def busy_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_port_in_use_is_one_line(trained, busy_port, capsys):
    code = viewer.main(["--checkpoint", trained.checkpoint, "--data_root", trained.folders["train"],
                        "--port", str(busy_port), "--device", TEST_DEVICE])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and f"--port {busy_port}: port in use" in err and "choose another with --port" in err
    code = _quiet_main(["--train_test", "train", "--data_root", trained.folders["train"], "--logging_root",
                        str(trained.root / "busy_logs"), *TINY_MODEL, "--max_steps", "1", "--device", TEST_DEVICE,
                        "--live_viewer", "--viewer_port", str(busy_port)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and f"--viewer_port {busy_port}: port in use" in err


def test_bad_data_root_is_one_line(trained, tmp_path, capsys):
    assert viewer.main(["--checkpoint", trained.checkpoint, "--data_root", str(tmp_path), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(tmp_path) in err and "intrinsics.txt" in err


@pytest.mark.slow
def test_command_prints_the_address_without_a_display(trained):
    """python -m viewer on a machine without a display or a browser: the address on stdout, Ctrl-C ends it."""
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "BROWSER")}
    proc = subprocess.Popen([sys.executable, "-m", "viewer", "--checkpoint", trained.checkpoint, "--data_root",
                             trained.folders["train"], "--port", "0", "--device", TEST_DEVICE], cwd=REPO_ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        address = None
        for line in proc.stdout:
            match = re.match(r"viewer: (http://localhost:\d+)", line)
            if match:
                address = match.group(1)
                break
        assert address, proc.stderr.read()
        with urllib.request.urlopen(address, timeout=30) as response:
            assert response.status == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


# ----------------------------------------------------------------------------------------------------------
# A real browser

def _chromium_screenshot(url: str, width: int, height: int, ready, settle_s: float = 3.0) -> np.ndarray:
    """Load ``url`` in headless Chromium, wait until ``ready()`` and then ``settle_s`` seconds more, and return
    a screenshot, (H, W, 3) uint8. Drives the browser over the DevTools protocol (no extra package)."""
    from websockets.sync.client import connect
    profile = tempfile.mkdtemp(prefix="chromium-")
    # Software WebGL (SwiftShader): there is no GPU in a CI container.
    proc = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--remote-debugging-port=0",
                             f"--user-data-dir={profile}", f"--window-size={width},{height}",
                             "--enable-unsafe-swiftshader", "--use-angle=swiftshader", "about:blank"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            match = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
            if match:
                break
        else:
            pytest.fail("chromium did not start its DevTools server")
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{match.group(1)}/json/list", timeout=30))
        page_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        with connect(page_url, max_size=None) as ws:
            calls = iter(range(1, 1000))

            def call(method: str, **params):
                ident = next(calls)
                ws.send(json.dumps({"id": ident, "method": method, "params": params}))
                while True:
                    reply = json.loads(ws.recv(timeout=WAIT_S))
                    if reply.get("id") == ident:
                        return reply.get("result")

            call("Page.navigate", url=url)
            _wait(ready, "the page's first frame", BROWSER_WAIT_S)
            time.sleep(settle_s)  # the browser decodes and paints the frame
            shot = call("Page.captureScreenshot", format="png")
        import imageio.v3 as iio
        return np.asarray(iio.imread(io.BytesIO(base64.b64decode(shot["data"]))))[..., :3]
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium)")
def test_page_in_a_real_browser_shows_the_render(trained):
    v = _serve(trained)
    try:
        v.overlays.value = False  # frusta and box off: the square holds the render alone
        shown = []  # the page that got a frame; it leaves v.pages when the browser is closed

        def ready() -> bool:
            shown.extend(p for p in v.pages.values() if p.frames_sent and not shown)
            return bool(shown)
        shot = _chromium_screenshot(v.url, 800, 600, ready)
        page = shown[0]
        width, height = page.client.camera.image_width, page.client.camera.image_height
        expected = v.renderer.frame(page.shown_pose, viewer.SHOW[0])
    finally:
        v.close()
    # The canvas fills the screenshot; the square is centred, as tall as the canvas when it is wider.
    h, w = shot.shape[:2]
    assert abs(w / h - width / height) < 0.02
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = shot[top:top + side, left:left + side].astype(np.float64)
    rows = np.minimum((np.arange(side) * expected.shape[0] / side).astype(int), expected.shape[0] - 1)
    scaled = expected[rows][:, rows].astype(np.float64)
    # The GUI panel covers the right (in a short window down past the middle) and a notice the upper left:
    # compare the lower left quarter of the square.
    lower, left_half = slice(side // 2 + 4, side - 4), slice(4, side // 2 - 4)
    # The browser resamples the frame and may manage its colours: a loose bound, far below what an empty page
    # (white) or the letterbox grey would give.
    diff = np.abs(square[lower, left_half] - scaled[lower, left_half]).mean()
    print(f"page square vs served render: mean difference {diff:.1f}")
    assert diff < 20, f"mean difference {diff:.1f} between the page's square and the served render"
    for empty in (255, viewer.LETTERBOX_GREY):
        assert np.abs(square[lower, left_half] - empty).mean() > 2 * diff
    if w > h + 8:
        assert np.abs(shot[h // 2:, 2:left - 2].astype(np.float64) - viewer.LETTERBOX_GREY).mean() < 8
