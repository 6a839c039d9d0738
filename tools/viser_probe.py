"""A stand-in for the browser on viser's websocket: it reports a camera, follows the camera the server sets as
the web page would, and keeps the background images the server sends. The viewer's tests and its frame-rate
benchmark drive the viewer through it; nothing else needs it.

The wire format is viser's own: a client sends msgpack-encoded messages; the server sends windows of
messages as two little-endian uint64 lengths, a zstd-compressed msgpack payload, then raw binary buffers.
"""
from __future__ import annotations

import asyncio
import io
import threading
import time
from typing import Optional, Sequence

import numpy as np

HEADER_BYTES = 16  # two uint64: the payload's decompressed and compressed sizes
ALIGNMENT = 8  # binary buffers after the payload start on 8-byte boundaries
STATE_WAIT_S = 10.0  # for the server's first messages before the probe reports its camera


def camera_rotation(position: Sequence[float], look_at: Sequence[float], up: Sequence[float]) -> np.ndarray:
    """(3, 3) camera-to-world rotation, OpenCV axes (+z towards ``look_at``, -y along ``up`` as far as it is
    perpendicular): how the page's orbit controls orient the camera."""
    z = np.asarray(look_at, np.float64) - np.asarray(position, np.float64)
    z /= np.linalg.norm(z)
    up = np.asarray(up, np.float64)
    y = -(up - (up @ z) * z)
    y /= np.linalg.norm(y)
    return np.stack([np.cross(y, z), y, z], axis=1)


class ViserProbe:
    """Connects to ``ws://host:port`` on a thread of its own; ``width`` x ``height`` is the page's canvas."""

    def __init__(self, port: int, width: int = 640, height: int = 480, host: str = "127.0.0.1"):
        import viser
        self.url, self.subprotocol = f"ws://{host}:{port}", f"viser-v{viser.__version__}"
        self.width, self.height = width, height
        self.position, self.look_at = np.array([0.0, -3.0, 0.0]), np.zeros(3)
        self.up, self.fov = np.array([0.0, 0.0, 1.0]), 1.0
        self.images: list[tuple[str, bytes]] = []  # (format, encoded bytes), oldest first
        self._received = threading.Condition()
        self._loop = asyncio.new_event_loop()
        self._ws = None
        self._connected = threading.Event()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._run(), self._loop)
        if not self._connected.wait(30):
            raise TimeoutError(f"no websocket connection to {self.url}")

    async def _run(self) -> None:
        import websockets.asyncio.client
        async with websockets.asyncio.client.connect(self.url, subprotocols=[self.subprotocol],
                                                     max_size=None, compression=None) as ws:
            self._ws = ws
            try:  # the scene's stored state, the initial camera in it, comes first: a page loads it, then reports
                self._apply(self._decode(await asyncio.wait_for(ws.recv(), STATE_WAIT_S)))
            except asyncio.TimeoutError:
                pass
            await self._send_camera()
            self._connected.set()
            async for raw in ws:
                if self._apply(self._decode(raw)):
                    await self._send_camera()

    @staticmethod
    def _decode(raw: bytes) -> list[dict]:
        import msgspec
        import zstandard
        size, compressed = (int.from_bytes(raw[i:i + 8], "little") for i in (0, 8))
        payload = zstandard.ZstdDecompressor().decompress(raw[HEADER_BYTES:HEADER_BYTES + compressed],
                                                          max_output_size=size)
        return msgspec.msgpack.decode(payload)["messages"]

    def _apply(self, messages: list[dict]) -> bool:
        """Follow camera commands and keep background images; True when the camera changed."""
        moved = False
        for msg in messages:
            kind = msg["type"]
            if kind == "SetCameraPositionMessage":
                self.position, moved = np.array(msg["position"], np.float64), True
            elif kind == "SetCameraLookAtMessage":
                self.look_at, moved = np.array(msg["look_at"], np.float64), True
            elif kind == "SetCameraUpDirectionMessage":
                self.up, moved = np.array(msg["position"], np.float64), True
            elif kind == "SetCameraFovMessage":
                self.fov, moved = float(msg["fov"]), True
            elif kind == "BackgroundImageMessage" and msg.get("rgb_data") is not None:
                with self._received:
                    self.images.append((msg["format"], bytes(msg["rgb_data"])))
                    self._received.notify_all()
        return moved

    async def _send_camera(self) -> None:
        import msgspec
        import viser.transforms as vtf
        from viser import _messages
        wxyz = vtf.SO3.from_matrix(camera_rotation(self.position, self.look_at, self.up)).wxyz
        message = _messages.ViewerCameraMessage(
            wxyz=tuple(float(v) for v in wxyz), position=tuple(float(v) for v in self.position), fov=self.fov,
            near=0.01, far=1000.0, image_height=self.height, image_width=self.width,
            look_at=tuple(float(v) for v in self.look_at), up_direction=tuple(float(v) for v in self.up))
        await self._ws.send(msgspec.msgpack.encode(message.as_serializable_dict()))

    def move(self, position: Sequence[float], look_at: Sequence[float], up: Sequence[float]) -> None:
        """Move the camera as a user's drag would: the page reports its new camera."""
        async def drag() -> None:  # on the probe's loop, so that no message being applied interleaves
            self.position, self.look_at, self.up = (np.asarray(v, np.float64) for v in (position, look_at, up))
            await self._send_camera()
        asyncio.run_coroutine_threadsafe(drag(), self._loop).result(10)

    def wait_image(self, count: int, timeout: float = 60.0) -> np.ndarray:
        """The ``count``-th background image received (1 = the first), decoded to (H, W, 3) uint8."""
        deadline = time.monotonic() + timeout
        with self._received:
            while len(self.images) < count:
                if not self._received.wait(max(0.0, deadline - time.monotonic())):
                    raise TimeoutError(f"{len(self.images)} images received, waited for {count}")
            _, data = self.images[count - 1]
        import imageio.v3 as iio
        return np.asarray(iio.imread(io.BytesIO(data)))[..., :3]

    def close(self, timeout: Optional[float] = 10.0) -> None:
        if self._ws is not None:
            asyncio.run_coroutine_threadsafe(self._ws.close(), self._loop).result(timeout)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
