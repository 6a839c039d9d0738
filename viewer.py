"""See a DeepVoxels model turn around: a web viewer on viser, for a checkpoint or live while training.

    python -m viewer --checkpoint CKPT --data_root DATA/train/cube [--port 8080] [--device auto]
    python run_deepvoxels.py --train_test train ... --live_viewer [--viewer_port 8080] [--viewer_every 10]

The page (its address is printed; no browser is opened) shows the render of the browser's camera, its depth
map or the nearest training image, over the training cameras' frusta and the voxel grid's box. The camera
keeps the trained focal length: zoom moves it. DeepVoxels renders a square view of a view volume at a fixed
depth range, so the square is letterboxed to the page, and the page says when the camera leaves the distances
trained on or the grid leaves the view volume. Keyframes of the camera make a path, written as a pose folder
with its intrinsics.txt for test mode to render into images and a video.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import math
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch

import checkpoints
import data_util
import options
import util
from dataio import load_cam2world, poses_are_world2cam
from deep_voxels import DeepVoxels
from evaluation import crop, inpaint_grid, render_poses
from metrics import BORDER
from projection import EmptyFrustumError, IndexCache, ProjectionHelper

log = logging.getLogger("deepvoxels")

DEFAULT_PORT = 8080
SHOW = ("render", "depth", "nearest training image")
# Training cameras often share one distance (synthetic scenes: exactly); this much relative slack keeps the
# orbit controls' rounding from counting as leaving the trained range.
DISTANCE_TOLERANCE = 0.02
LETTERBOX_GREY = 40  # the bars beside the square render, distinct from the page's white
FRUSTUM_SIZE = 0.1  # drawn training cameras, as a fraction of the grid's side
FRAMES_BETWEEN_KEYFRAMES = 30
IDLE_POLL_S = 0.5  # the checkpoint viewer's render thread wakes at least this often to notice a shutdown


def _eval_mode(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """The model in eval mode (BatchNorm's running statistics) for the block, then as it was."""
    @contextlib.contextmanager
    def scope():
        was_training = model.training
        model.eval()
        try:
            yield
        finally:
            model.train(was_training)
    return scope()


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """(3, H, W) render in [-1/2, 1/2] -> (H, W, 3) uint8."""
    arr = img.detach().float().cpu().numpy().transpose(1, 2, 0) + 0.5
    return (arr * 255).round().clip(0, 255).astype(np.uint8)


def letterbox_offsets(side: int, width: int, height: int) -> tuple[int, int, int, int]:
    """(frame height, frame width, top, left): a square of ``side`` pixels centred in a frame with the page's
    aspect ratio ``width`` / ``height``."""
    if width >= height:
        frame_w = max(side, round(side * width / height))
        return side, frame_w, 0, (frame_w - side) // 2
    frame_h = max(side, round(side * height / width))
    return frame_h, side, (frame_h - side) // 2, 0


def letterbox(square: np.ndarray, width: int, height: int) -> np.ndarray:
    """(s, s, 3) uint8 -> the frame the page shows, grey bars beside or above and below the square."""
    frame_h, frame_w, top, left = letterbox_offsets(square.shape[0], width, height)
    frame = np.full((frame_h, frame_w, 3), LETTERBOX_GREY, dtype=np.uint8)
    frame[top:top + square.shape[0], left:left + square.shape[1]] = square
    return frame


def check_port(host: str, port: int, flag: str) -> None:
    """One UsageError line naming the port and the flag when another program listens there (viser itself
    would silently move to the next free port)."""
    if not 0 <= port <= 65535:
        raise util.UsageError(f"{flag} {port}: expected a port number from 0 to 65535")
    if port == 0:  # the system picks a free port
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will bind
        try:
            probe.bind((host, port))
        except OSError as err:
            raise util.UsageError(f"{flag} {port}: port in use ({err.strerror or err}); choose another with "
                                  f"{flag} PORT") from None


# ----------------------------------------------------------------------------------------------------------
# What the page shows

class Renderer:
    """Renders the page's views of a model: the DeepVoxels render, its depth, the nearest training image.

    ``data_root`` is the training set's folder: its intrinsics.txt, pose/ and rgb/. Renders go through
    ``evaluation.render_poses`` as test mode's do, from a grid inpainted once per ``refresh()``.
    """

    def __init__(self, model: DeepVoxels, geometry: ProjectionHelper, data_root: str, img_sidelength: int,
                 autocast, device: torch.device):
        self.model, self.geometry, self.autocast, self.device = model, geometry, autocast, device
        self.data_root, self.side = data_root, img_sidelength
        self.intrinsics_path = os.path.join(data_root, "intrinsics.txt")
        intrinsic = data_util.parse_intrinsics(self.intrinsics_path, img_sidelength)[0]
        self.focal = float(intrinsic[0][0])  # pixels of the S x S render
        self.shown_side = img_sidelength - 2 * BORDER  # test mode's crop
        world2cam = poses_are_world2cam(data_root)
        pose_paths = data_util.list_poses(os.path.join(data_root, "pose"))
        if not pose_paths:
            raise data_util.DataError(f"pose folder {os.path.join(data_root, 'pose')}: expected the training "
                                      "cameras' *.txt pose files, found none")
        self.train_poses = np.stack([load_cam2world(p, world2cam).astype(np.float64) for p in pose_paths])
        self.image_paths = data_util.glob_imgs(os.path.join(data_root, "rgb"))
        self.centre = geometry.grid2world[:3, 3].double().cpu().numpy()
        distances = np.linalg.norm(self.train_poses[:, :3, 3] - self.centre, axis=1)
        self.distance_range = (float(distances.min()), float(distances.max()))
        self.up = -self.train_poses[:, :3, 1].mean(axis=0)  # OpenCV: image up is -y
        self.up /= np.linalg.norm(self.up)
        self._nearest: dict[int, np.ndarray] = {}
        self._inpainted: Optional[torch.Tensor] = None
        import matplotlib
        self._depth_colours = (matplotlib.colormaps["viridis"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)

    @property
    def square_fov(self) -> float:
        """Field of view of the shown square, radians."""
        return 2.0 * math.atan(self.shown_side / 2.0 / self.focal)

    def refresh(self) -> None:
        """Inpaint the grid of the model's current weights (once per checkpoint, or per shown training step)."""
        with _eval_mode(self.model):
            self._inpainted = inpaint_grid(self.model, self.autocast)

    def render(self, cam2world: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(image (s, s, 3) uint8, raw depth (64, 64) in [-1/2, 1/2)) of camera ``cam2world`` (4, 4), without
        test mode's border. Raises EmptyFrustumError when the camera sees none of the grid."""
        if self._inpainted is None:
            self.refresh()
        pose = torch.from_numpy(np.asarray(cam2world, dtype=np.float32))
        with _eval_mode(self.model):
            ((_, img, depth),) = list(render_poses(self.model, IndexCache(self.geometry, self.device), [pose], 1,
                                                   self.autocast, inpainted=self._inpainted))
        return to_uint8(crop(img)), depth[0].float().cpu().numpy()

    def frame(self, cam2world: np.ndarray, show: str) -> np.ndarray:
        """(s, s, 3) uint8 of what ``show`` (one of SHOW) names, for camera ``cam2world``."""
        if show == SHOW[2]:
            return self.nearest_image(cam2world)
        try:
            image, depth = self.render(cam2world)
        except EmptyFrustumError:
            return np.full((self.shown_side, self.shown_side, 3), LETTERBOX_GREY, dtype=np.uint8)
        if show == SHOW[0]:
            return image
        levels = np.clip((depth + 0.5) * 255, 0, 255).round().astype(np.uint8)
        coloured = self._depth_colours[levels]
        zoom = self.side // depth.shape[0]
        return np.ascontiguousarray(coloured.repeat(zoom, 0).repeat(zoom, 1)[BORDER:-BORDER, BORDER:-BORDER])

    def nearest_index(self, cam2world: np.ndarray) -> int:
        """The training view whose viewing direction is closest to the camera's (data_util's ranking)."""
        ranking, _ = data_util.get_nn_ranking([np.asarray(cam2world), *self.train_poses])
        return int(ranking[0][-1]) - 1

    def nearest_image(self, cam2world: np.ndarray) -> np.ndarray:
        if not self.image_paths:
            return np.full((self.shown_side, self.shown_side, 3), LETTERBOX_GREY, dtype=np.uint8)
        i = self.nearest_index(cam2world)
        if i not in self._nearest:
            rgb = torch.from_numpy(data_util.load_rgb(self.image_paths[i], self.side))
            self._nearest[i] = to_uint8(crop(rgb))
        return self._nearest[i]

    def range_note(self, cam2world: np.ndarray) -> str:
        """Markdown: the camera's distance to the grid centre against the trained range, and whether the grid is
        in the view volume."""
        distance = float(np.linalg.norm(np.asarray(cam2world)[:3, 3] - self.centre))
        low, high = self.distance_range
        problems = []
        if not low * (1 - DISTANCE_TOLERANCE) <= distance <= high * (1 + DISTANCE_TOLERANCE):
            problems.append(f"distance {distance:.2f} to the grid centre, trained {low:.2f} to {high:.2f}")
        if not self.geometry.grid_in_view_volume(torch.from_numpy(np.asarray(cam2world))):
            problems.append("the grid is not inside the view volume")
        if problems:
            return "**Outside the range trained:** " + "; ".join(problems) + ". The render is not to be trusted."
        return f"Camera in the range trained (distance {distance:.2f}, trained {low:.2f} to {high:.2f})."


# ----------------------------------------------------------------------------------------------------------
# The page

@dataclass
class _Page:
    """One browser tab: its controls and what it was last sent."""

    client: Any
    show: Any
    status: Any
    frames_between: Any
    keyframes: list = field(default_factory=list)
    dirty: bool = True  # the camera or the choice of view changed since the last frame
    shown_step: Optional[int] = None  # the training step of the weights last shown (live viewer)
    shown_pose: Optional[np.ndarray] = None
    frames_sent: int = 0


def camera_pose(camera) -> np.ndarray:
    """(4, 4) float64 cam2world of a viser camera (viser's cameras follow OpenCV's axes, as ours)."""
    import viser.transforms as vtf
    pose = np.eye(4)
    pose[:3, :3] = vtf.SO3(np.asarray(camera.wxyz)).as_matrix()
    pose[:3, 3] = camera.position
    return pose


class Viewer:
    """The viser server and its pages. ``live``: rendering happens in ``between_steps`` on the training
    thread; otherwise a thread of its own renders as cameras move."""

    def __init__(self, renderer: Renderer, port: int, host: str = "127.0.0.1", port_flag: str = "--port",
                 paths_dir: str = "camera_paths", image_format: str = "jpeg", live: bool = False,
                 every: int = 1):
        import viser
        check_port(host, port, port_flag)
        self.renderer, self.paths_dir, self.image_format, self.live, self.every = (
            renderer, paths_dir, image_format, live, every)
        self.pages: dict[int, _Page] = {}
        self._lock = threading.Condition()
        self._step: Optional[int] = None  # the current training step (live viewer)
        self._last_render_step: Optional[int] = None
        self._closed = False
        self.server = viser.ViserServer(host=host, port=port, label="DeepVoxels", verbose=False)
        self.port = self.server.get_port()
        self.url = f"http://{'localhost' if host in ('127.0.0.1', '0.0.0.0') else host}:{self.port}"
        self._draw_scene()
        self.server.on_client_connect(self._connect)
        self.server.on_client_disconnect(self._disconnect)
        self._thread = None
        if not live:
            renderer.refresh()
            self._thread = threading.Thread(target=self._render_loop, name="viewer-render", daemon=True)
            self._thread.start()

    # -- the shared scene ----------------------------------------------------------------------------------

    def _draw_scene(self) -> None:
        import viser.transforms as vtf
        r, scene = self.renderer, self.server.scene
        start = r.train_poses[0][:3, 3]
        self.server.initial_camera.position = tuple(start)
        self.server.initial_camera.look_at = tuple(r.centre)
        self.server.initial_camera.up = tuple(r.up)
        self.server.initial_camera.fov = r.square_fov
        side = r.geometry.grid_dims[0] * r.geometry.voxel_size
        handles = []
        for i, pose in enumerate(r.train_poses):
            handles.append(scene.add_camera_frustum(f"/training_cameras/{i:05d}", fov=r.square_fov, aspect=1.0,
                                     scale=FRUSTUM_SIZE * side, thickness=2.0, thickness_units="screen",
                                     color=(60, 90, 200), wxyz=vtf.SO3.from_matrix(pose[:3, :3]).wxyz,
                                     position=pose[:3, 3]))
        corners = r.geometry.grid_corners().numpy()  # index bits: x, y, z
        edges = [(a, b) for a in range(8) for b in range(a + 1, 8) if bin(a ^ b).count("1") == 1]
        handles.append(scene.add_line_segments("/voxel_grid", np.array([[corners[a], corners[b]] for a, b in edges]),
                                               colors=(230, 120, 20), thickness=2.0, thickness_units="screen"))
        self.overlays = self.server.gui.add_checkbox("Show cameras and grid", initial_value=True)

        @self.overlays.on_update
        def _(_) -> None:
            for handle in handles:
                handle.visible = self.overlays.value

    # -- pages ---------------------------------------------------------------------------------------------

    def _connect(self, client) -> None:
        gui = client.gui
        show = gui.add_dropdown("Show", SHOW, initial_value=SHOW[0])
        status = gui.add_markdown("")
        with gui.add_folder("Camera path"):
            frames = gui.add_slider("Frames between keyframes", min=1, max=240, step=1,
                                    initial_value=FRAMES_BETWEEN_KEYFRAMES)
            add = gui.add_button("Add keyframe")
            clear = gui.add_button("Clear keyframes")
            write = gui.add_button("Write camera path")
        page = _Page(client, show, status, frames)
        with self._lock:
            self.pages[client.client_id] = page

        @show.on_update
        def _(_) -> None:
            self._mark_dirty(page)

        @add.on_click
        def _(_) -> None:
            page.keyframes.append(camera_pose(client.camera))
            client.add_notification("Keyframe added", f"{len(page.keyframes)} keyframe(s)", auto_close_seconds=3)

        @clear.on_click
        def _(_) -> None:
            page.keyframes.clear()

        @write.on_click
        def _(_) -> None:
            if not page.keyframes:
                client.add_notification("No keyframes", "Add keyframes first.", auto_close_seconds=5)
                return
            folder = self.write_camera_path(page.keyframes, int(frames.value))
            client.add_notification("Camera path written", f"{folder}: render it with test mode, "
                                    f"--data_root {folder}", auto_close_seconds=20)
            print(f"camera path: {folder}  (render it: python run_deepvoxels.py --train_test test "
                  f"--data_root {folder} --logging_root LOGS --checkpoint CKPT)", flush=True)

        @client.camera.on_update
        def _(camera) -> None:
            self._keep_focal_length(camera)
            self._mark_dirty(page)

        self._keep_focal_length(client.camera)
        self._mark_dirty(page)

    def _disconnect(self, client) -> None:
        with self._lock:
            self.pages.pop(client.client_id, None)

    def _keep_focal_length(self, camera) -> None:
        """The page's vertical field of view that shows the square render at the trained focal length."""
        if camera.image_height <= 0 or camera.image_width <= 0:
            return
        half = math.tan(self.renderer.square_fov / 2)
        if camera.image_height > camera.image_width:  # bars above and below: the square spans the width
            half *= camera.image_height / camera.image_width
        fov = 2 * math.atan(half)
        if abs(camera.fov - fov) > 1e-4:
            camera.fov = fov

    def _mark_dirty(self, page: _Page) -> None:
        with self._lock:
            page.dirty = True
            self._lock.notify_all()

    # -- rendering -----------------------------------------------------------------------------------------

    def _send(self, page: _Page) -> None:
        camera = page.client.camera
        pose = camera_pose(camera)
        square = self.renderer.frame(pose, page.show.value)
        note = self.renderer.range_note(pose)
        if self.live:
            note += f"  \nTraining step {self._step}."
        page.status.content = note
        page.client.scene.set_background_image(letterbox(square, camera.image_width, camera.image_height),
                                               format=self.image_format, jpeg_quality=90)
        page.frames_sent += 1  # before shown_pose: whoever sees the pose also sees the count of its frame
        page.shown_pose, page.shown_step = pose, self._step

    def _render_loop(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not any(p.dirty for p in self.pages.values()):
                    self._lock.wait(IDLE_POLL_S)
                if self._closed:
                    return
                todo = [p for p in self.pages.values() if p.dirty]
                for page in todo:
                    page.dirty = False
            for page in todo:
                self._send_safely(page)

    def _send_safely(self, page: _Page) -> None:
        try:
            self._send(page)
        except Exception as err:  # noqa: BLE001 - a page closed mid-render must not stop the viewer
            log.debug("viewer: frame for client %s not sent: %s", page.client.client_id, err)

    def between_steps(self, step: int) -> None:
        """Live viewer: show the current weights on pages whose camera moved or whose frame is older than this
        step, at most every ``every`` steps. Costs nothing without a page."""
        self._step = step
        if not self.pages or (self._last_render_step is not None and step - self._last_render_step < self.every):
            return
        with self._lock:
            todo = [p for p in self.pages.values() if p.dirty or p.shown_step != step]
            for page in todo:
                page.dirty = False
        if not todo:
            return
        self.renderer.refresh()
        for page in todo:
            self._send_safely(page)
        self._last_render_step = step

    # -- camera paths --------------------------------------------------------------------------------------

    def write_camera_path(self, keyframes: Sequence[np.ndarray], frames_between: int) -> str:
        """Write the interpolated keyframes as ``paths_dir/path_<time>/pose/*.txt`` with the training set's
        intrinsics.txt (without a world2cam line: these poses are camera-to-world). Returns the folder."""
        folder = os.path.join(self.paths_dir, datetime.datetime.now().strftime("path_%Y%m%d_%H%M%S_%f"))
        data_util.write_pose_folder(os.path.join(folder, "pose"),
                                    data_util.interpolate_keyframes(list(keyframes), frames_between))
        with open(self.renderer.intrinsics_path) as src:
            lines = src.read().splitlines()[:5]
        with open(os.path.join(folder, "intrinsics.txt"), "w") as dst:
            dst.write("\n".join(lines) + "\n")
        return folder

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
        self.server.stop()


# ----------------------------------------------------------------------------------------------------------
# The live viewer behind one call in the training script

class _Off:
    """The live viewer when --live_viewer is not given."""

    def between_steps(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def start_live(opt: Any, model: DeepVoxels, geometry: ProjectionHelper, autocast, device: torch.device,
               log_dir: Optional[str], is_main: bool = True):
    """The live viewer of a training run when ``--live_viewer`` is given (rank 0 only), else a stand-in that
    does nothing. Call ``between_steps(step)`` after each step and ``close()`` at the end."""
    if not opt.live_viewer or not is_main:
        return _Off()
    renderer = Renderer(model, geometry, opt.data_root, opt.img_sidelength, autocast, device)
    viewer = Viewer(renderer, opt.viewer_port, port_flag="--viewer_port", live=True, every=opt.viewer_every,
                    paths_dir=os.path.join(log_dir or opt.logging_root, "camera_paths"))
    print(f"live viewer: {viewer.url}", flush=True)
    return viewer


# ----------------------------------------------------------------------------------------------------------
# python -m viewer

def load(checkpoint: str, data_root: str, device: torch.device, amp: str = "off") -> Renderer:
    """A Renderer of a checkpoint's model over the training set in ``data_root``."""
    import run_deepvoxels
    payload = checkpoints.load(checkpoint, mapped=True)
    opt = argparse.Namespace(**options.MODEL_DEFAULTS, explicit_model_flags=[], batchnorm_init="uniform",
                             near_plane=(payload.get("config") or {}).get("near_plane", math.sqrt(3) / 2))
    checkpoints.take_model_flags(checkpoint, payload, opt)
    for name in ("intrinsics.txt", "pose"):
        if not os.path.exists(os.path.join(data_root, name)):
            raise data_util.DataError(f"--data_root {data_root}: expected the training set's {name} there")
    geometry, model = run_deepvoxels.build_for_rendering(opt, checkpoint, payload, data_root, device)
    return Renderer(model, geometry, data_root, opt.img_sidelength, run_deepvoxels.amp_context(amp, device), device)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m viewer", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="the model to view (a .pth written by training)")
    p.add_argument("--data_root", required=True,
                   help="the training set's object folder: intrinsics.txt, pose/ (cameras drawn), rgb/ (nearest view)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port of the page on this machine")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (0.0.0.0: every interface; otherwise reach it through an SSH tunnel)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N or mps")
    p.add_argument("--amp", choices=("off", "bf16", "fp16"), default="off", help="autocast precision of the renders")
    p.add_argument("--paths_dir", default="",
                   help="folder for written camera paths (default: camera_paths/ beside the checkpoint)")
    p.add_argument("--image_format", choices=("jpeg", "png"), default="jpeg",
                   help="how frames travel to the page: jpeg (small) or png (lossless)")
    return p


def serve(argv: Optional[Sequence[str]] = None) -> Viewer:
    """Start the viewer of ``argv``'s checkpoint and return it (the page is served until ``close()``)."""
    args = build_parser().parse_args(argv)
    device = util.resolve_device(args.device)
    util.configure_backends(device)
    renderer = load(args.checkpoint, args.data_root, device, args.amp)
    paths_dir = args.paths_dir or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "camera_paths")
    return Viewer(renderer, args.port, host=args.host, paths_dir=paths_dir, image_format=args.image_format)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Serve until Ctrl-C. Exit codes: 0, or 2 for bad input (one line naming the flag or file)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        viewer = serve(argv)
    except (util.UsageError, data_util.DataError, checkpoints.CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"viewer: {viewer.url}  (open it in a browser; Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
