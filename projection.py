"""Lifting image features into the voxel grid and resampling the grid into a camera's frustum.

Frames and conventions (the original's, kept so that indices match it exactly):

* ``cam2world``: (4, 4) float32, OpenCV camera (+x right, +y down, +z forward) -> world.
* ``grid2world``: (4, 4) float32, a pure translation to the grid centre (``intrinsics.txt`` line 2).
* Pixels: integer pixel coordinates (u, v) = (column, row) are the pixel *positions* (no half-pixel shift):
  ``u = fx * x / z + cx``, ``v = fy * y / z + cy``. A pixel is kept when ``round(u), round(v)`` lies in the
  image.
* Grid: voxel integer index (x, y, z) sits at ``((x, y, z) - G/2) * voxel_size`` relative to the grid centre;
  linear index ``x + G*y + G*G*z``. A grid *tensor* is (B, C, G, G, G) with spatial axes (z, y, x).
* Frustum (canonical view volume): (B, C, D, H, W) with axes (k, v, u); plane k lies at camera depth
  ``near_plane + k * voxel_size``; linear index ``u + W*v + W*H*k``.

Geometry is computed in the poses' own precision (float32), also when called under autocast, which would
run its matrix products in bf16 or fp16 and move voxels and pixels.

All index arithmetic uses floor division. PyTorch 1.0 floored integer ``/``; current PyTorch divides exactly,
which silently collapses the unravelled coordinates. ``unravel_index`` is the one place that does it.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, TypeVar

import torch

from pytorch_prototyping.blocks import autocast_off


_Method = TypeVar("_Method", bound=Callable)


def _without_autocast(method: _Method) -> _Method:
    """Run a geometry method ``(self, cam2world)`` with autocast off on the pose's device."""
    @functools.wraps(method)
    def wrapper(self, cam2world: torch.Tensor):
        with autocast_off(cam2world.device.type):
            return method(self, cam2world)
    return wrapper  # type: ignore[return-value]


class EmptyFrustumError(ValueError):
    """A camera sees none of the grid (lifting) or none of its frustum cells fall in the grid (projection)."""


def unravel_index(lin: torch.Tensor, dims: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split linear indices ``a + dims[0]*b + dims[0]*dims[1]*c`` into (a, b, c) with floor division.

    Args:
        lin: (N,) int64 linear indices.
        dims: (dims[0], dims[1], ...) the extents of the fastest and second-fastest axes.
    Returns:
        (a, b, c), each (N,) int64.
    """
    plane = dims[0] * dims[1]
    c = torch.div(lin, plane, rounding_mode="floor")
    rest = lin - c * plane
    b = torch.div(rest, dims[0], rounding_mode="floor")
    a = torch.remainder(rest, dims[0])
    return a, b, c


@dataclass
class ProjectionHelper:
    """Geometry of one DeepVoxels set-up: intrinsics, grid placement and frustum size.

    Attributes:
        lifting_intrinsic, projection_intrinsic: (4, 4) pinhole matrices for the lifted feature map and the
            rendered frustum (both 64x64 in DeepVoxels), indexable as ``K[0][0]`` (fx), ``K[0][2]`` (cx), ...
        projection_image_dims, lifting_image_dims: (W, H) of those maps (square in practice).
        depth_min, depth_max: camera-depth range of the lifting frustum's bounding box.
        grid_dims: (G, G, G) voxel counts.
        voxel_size: voxel side length in world units (``scale / G``).
        near_plane: camera depth of frustum plane 0.
        frustum_depth: number of frustum planes D (``2 * G``).
        grid2world: (4, 4) float32 grid-centre-to-world transform.
    """

    lifting_intrinsic: object
    projection_intrinsic: object
    projection_image_dims: Sequence[int]
    lifting_image_dims: Sequence[int]
    depth_min: float
    depth_max: float
    grid_dims: Sequence[int]
    voxel_size: float
    near_plane: float
    frustum_depth: int
    grid2world: torch.Tensor

    def _pixel_to_camera(self, u: float, v: float, depth: float) -> list[float]:
        """Camera-frame point at ``depth`` seen through pixel (u, v) of the lifting map."""
        k = self.lifting_intrinsic
        x = (u - k[0][2]) / k[0][0]  # normalised image coordinates first, then scaled (original's order)
        y = (v - k[1][2]) / k[1][1]
        return [depth * x, depth * y, depth, 1.0]

    def frustum_bounds(self, cam2world: torch.Tensor, world2grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Axis-aligned box (grid frame, world units) around the lifting frustum's 8 corners.

        The corners are floored/ceiled to whole world units before the transform, as in the original, so the
        box is deliberately loose; the exact per-voxel image test in ``lifting_indices`` does the real culling.
        Returns (bbox_min, bbox_max), each (3,) float32.
        """
        w, h = self.lifting_image_dims[0] - 1, self.lifting_image_dims[1] - 1
        corners = [self._pixel_to_camera(u, v, d)
                   for d in (self.depth_min, self.depth_max) for u, v in ((0, 0), (w, 0), (w, h), (0, h))]
        corners = torch.tensor(corners, dtype=cam2world.dtype, device=cam2world.device).unsqueeze(-1)  # (8, 4, 1)
        world = torch.bmm(cam2world.expand(8, -1, -1), corners)
        lower = torch.round(torch.bmm(world2grid.expand(8, -1, -1), torch.floor(world)))[:, :3, 0]
        upper = torch.round(torch.bmm(world2grid.expand(8, -1, -1), torch.ceil(world)))[:, :3, 0]
        both = torch.cat([lower, upper], dim=0)
        return both.min(dim=0).values, both.max(dim=0).values

    def _voxel_positions(self, lin: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(4, N) homogeneous positions, grid frame, world units, of the voxels with linear indices ``lin``."""
        g = self.grid_dims
        x, y, z = unravel_index(lin, g)
        coords = torch.stack([x - g[0] // 2, y - g[1] // 2, z - g[2] // 2]).to(dtype) * self.voxel_size
        return torch.cat([coords, torch.ones_like(coords[:1])], dim=0)

    @_without_autocast
    def lifting_indices(self, cam2world: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Voxels that project into the lifting feature map of camera ``cam2world``, and where they land.

        Args:
            cam2world: (4, 4) float32 camera-to-world (OpenCV axes).
        Returns:
            lin: (N,) int64 voxel linear indices ``x + G*y + G*G*z``.
            coords: (3, N) float32 rows (u, v, depth): pixel column, pixel row, camera-space z.
        Raises:
            EmptyFrustumError: no voxel lies in the frustum's box or projects into the map.
        """
        world2cam = torch.linalg.inv(cam2world)
        world2grid = torch.linalg.inv(self.grid2world)
        bbox_min, bbox_max = self.frustum_bounds(cam2world, world2grid)

        g = self.grid_dims
        lin = torch.arange(g[0] * g[1] * g[2], device=cam2world.device)
        pos = self._voxel_positions(lin, cam2world.dtype)[:3]
        inside = ((pos >= bbox_min[:, None]) & (pos < bbox_max[:, None])).all(dim=0)
        if not inside.any():
            raise EmptyFrustumError("no voxel of the grid lies in the camera's lifting frustum")
        lin = lin[inside]

        cam = torch.mm(world2cam, torch.mm(self.grid2world, self._voxel_positions(lin, cam2world.dtype)))
        k = self.lifting_intrinsic
        u = (cam[0] * k[0][0]) / cam[2] + k[0][2]
        v = (cam[1] * k[1][1]) / cam[2] + k[1][2]
        ui, vi = u.round().long(), v.round().long()
        # Note: like the original, voxels behind the camera are not rejected here; the frustum box and the
        # grid placement (near plane) keep them out in a sane set-up.
        in_image = (ui >= 0) & (vi >= 0) & (ui < self.lifting_image_dims[0]) & (vi < self.lifting_image_dims[1])
        if not in_image.any():
            raise EmptyFrustumError("no voxel of the grid projects into the camera's image")
        return lin[in_image], torch.stack([u, v, cam[2]])[:, in_image]

    @_without_autocast
    def projection_indices(self, cam2world: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frustum cells of camera ``cam2world`` that fall inside the grid, and their grid coordinates.

        Args:
            cam2world: (4, 4) float32 camera-to-world (OpenCV axes).
        Returns:
            lin: (M,) int64 frustum linear indices ``u + W*v + W*H*k``.
            voxel_coords: (3, M) float32 continuous grid coordinates (x, y, z) in voxel units, in [0, G).
        Raises:
            EmptyFrustumError: no frustum cell lies inside the grid.
        """
        w, h = self.projection_image_dims[0], self.projection_image_dims[1]
        world2grid = torch.linalg.inv(self.grid2world)
        lin = torch.arange(w * h * int(self.frustum_depth), device=cam2world.device)
        u, v, k = unravel_index(lin, (w, h))

        kp = self.projection_intrinsic
        depth = k.to(cam2world.dtype) * self.voxel_size + self.near_plane
        x = (u.to(cam2world.dtype) - kp[0][2]) / kp[0][0] * depth
        y = (v.to(cam2world.dtype) - kp[1][2]) / kp[1][1] * depth
        cam = torch.stack([x, y, depth, torch.ones_like(depth)])
        grid = torch.mm(world2grid, torch.mm(cam2world, cam))
        voxel_coords = grid[:3] / self.voxel_size + self.grid_dims[2] / 2

        g = torch.tensor(self.grid_dims, device=cam2world.device)[:, None]
        inside = ((voxel_coords >= 0) & (voxel_coords < g)).all(dim=0)
        if not inside.any():
            raise EmptyFrustumError("none of the camera's frustum lies inside the grid")
        return lin[inside], voxel_coords[:, inside]

    def grid_corners(self) -> torch.Tensor:
        """(8, 3) world positions of the grid's corner voxels, float64 (the grid spans voxels 0 .. G-1)."""
        g = self.grid_dims
        lin = torch.tensor([x + g[0] * y + g[0] * g[1] * z for z in (0, g[2] - 1) for y in (0, g[1] - 1)
                            for x in (0, g[0] - 1)])
        return (self.grid2world.double().cpu() @ self._voxel_positions(lin, torch.float64))[:3].t()

    def grid_in_view_volume(self, cam2world: torch.Tensor) -> bool:
        """Whether the ball inscribed in the grid (where the object is expected to sit) lies in the view volume
        of camera ``cam2world`` (4, 4): between the first and the last frustum plane and inside the projection
        image. The model renders only what is there. The grid's corners are not asked for: with the
        original's near plane they fall outside the view volume of the training cameras themselves."""
        radius = self.grid_dims[0] * self.voxel_size / 2
        centre = torch.linalg.inv(cam2world.double().cpu()) @ self.grid2world.double().cpu()[:, 3]
        x, y, z = (float(c) for c in centre[:3])
        if z - radius < self.near_plane or z + radius > self.near_plane + (self.frustum_depth - 1) * self.voxel_size:
            return False
        k = self.projection_intrinsic
        for coord, focal, principal, side in ((x, k[0][0], k[0][2], self.projection_image_dims[0]),
                                              (y, k[1][1], k[1][2], self.projection_image_dims[1])):
            # The image's two edges along this axis are planes through the camera: coord = slope * z.
            for edge, sign in ((0, 1.0), (side - 1, -1.0)):
                slope = (edge - principal) / focal
                if sign * (coord - slope * z) / math.sqrt(1.0 + slope * slope) < radius:
                    return False
        return True


def _scatter_weighted_corners(src: torch.Tensor, corner_idx: torch.Tensor, corner_w: torch.Tensor,
                              out_idx: torch.Tensor, out_size: int, out: Optional[torch.Tensor] = None
                              ) -> torch.Tensor:
    """The one sampler: ``out[..., out_idx[m]] = sum_k src[..., corner_idx[k, m]] * corner_w[k, m]``.

    Args:
        src: (B, C, N) flattened source features.
        corner_idx: (K, M) int64 indices into N (K = 4 bilinear or 8 trilinear corners).
        corner_w: (K, M) interpolation weights.
        out_idx: (M,) int64 distinct indices into the flattened output.
        out_size: length of the flattened output.
        out: optional zero-filled (out_size, B*C) buffer, written in place (not under autograd).
    Returns:
        (B, C, out_size), stored position-major (channels-last); entries not in ``out_idx`` are zero.

    Gathering and scattering whole rows of B*C features (position-major) is several times faster than
    indexing each channel's row, in both directions of autograd, and the channels-last result is the
    layout the 3D convolutions that follow run in. The corners are gathered and summed one at a time, in
    order k = 0..K-1: temporaries of (M, B*C) instead of (K, M, B*C), which is faster forward and backward
    than gathering all corners at once.
    """
    b, c, n = src.shape
    k, m = corner_idx.shape
    # (N, B*C), made contiguous: a channels-first source gives a view with strides (1, N) here, which
    # index_select would gather element by element, far slower than whole rows (the grid in test mode is so).
    rows = src.permute(2, 0, 1).reshape(n, b * c).contiguous()
    weights = corner_w.to(src.dtype)
    # index_select, not rows[idx]: its backward (index_add_) is deterministic on CPU, whereas advanced
    # indexing's backward accumulates with atomics across threads and changes the last bits run to run.
    values = rows.index_select(0, corner_idx[0]) * weights[0, :, None]
    for corner in range(1, k):
        values += rows.index_select(0, corner_idx[corner]) * weights[corner, :, None]
    if out is None:
        out = src.new_zeros(out_size, b * c).index_copy(0, out_idx, values)
    else:
        if torch.is_grad_enabled() and src.requires_grad:
            raise ValueError("_scatter_weighted_corners: out= is for sampling without autograd")
        out.index_copy_(0, out_idx, values)
    return out.t().view(b, c, out_size)


def lift_features(img_feats: torch.Tensor, lin: torch.Tensor, coords: torch.Tensor,
                  grid_dims: Sequence[int]) -> torch.Tensor:
    """Bilinearly sample a feature map at the lifted voxels' pixel positions.

    Args:
        img_feats: (B, C, H, W) feature map of the input view.
        lin, coords: from ``ProjectionHelper.lifting_indices``; coords rows (u, v, depth).
        grid_dims: (G, G, G).
    Returns:
        (B, C, G, G, G) volume with spatial axes (z, y, x); voxels outside the view are zero.

    Like the original, the lower corner uses ``floor`` without clamping, so a position such as u = -0.3
    reads column -1, which wraps to the last column; only the upper corner is clamped.
    """
    b, c, h, w = img_feats.shape
    row, col = coords[1], coords[0]
    r0, c0 = row.floor().long(), col.floor().long()
    r1, c1 = (r0 + 1).clamp(0, h - 1), (c0 + 1).clamp(0, w - 1)
    fr, fc = row - r0.to(row.dtype), col - c0.to(col.dtype)
    r0, c0 = r0 % h, c0 % w  # negative indices wrap, as PyTorch advanced indexing did in the original
    idx = torch.stack([r0 * w + c0, r1 * w + c0, r0 * w + c1, r1 * w + c1])
    wts = torch.stack([(1 - fr) * (1 - fc), fr * (1 - fc), (1 - fr) * fc, fr * fc])
    n = grid_dims[0] * grid_dims[1] * grid_dims[2]
    vol = _scatter_weighted_corners(img_feats.reshape(b, c, h * w), idx, wts, lin, n)
    return vol.view(b, c, grid_dims[2], grid_dims[1], grid_dims[0])  # (B, C, z, y, x)


def sample_frustum(grid: torch.Tensor, lin: torch.Tensor, voxel_coords: torch.Tensor,
                   frustum_dims: Sequence[int], out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Trilinearly resample the grid into a camera's canonical view volume.

    Args:
        grid: (B, C, G, G, G) with spatial axes (z, y, x).
        lin, voxel_coords: from ``ProjectionHelper.projection_indices``; voxel_coords rows (x, y, z).
        frustum_dims: (D, H, W) of the view volume.
        out: optional zero-filled (D * H * W, B * C) buffer to sample into (without autograd).
    Returns:
        (B, C, D, H, W) with axes (k, v, u), stored channels-last; cells outside the grid are zero.
    """
    b, c, gz, gy, gx = grid.shape
    x, y, z = voxel_coords[0], voxel_coords[1], voxel_coords[2]
    x0, y0, z0 = x.floor().long(), y.floor().long(), z.floor().long()
    x1, y1, z1 = (x0 + 1).clamp(0, gx - 1), (y0 + 1).clamp(0, gy - 1), (z0 + 1).clamp(0, gz - 1)
    fx, fy, fz = x - x0.to(x.dtype), y - y0.to(y.dtype), z - z0.to(z.dtype)
    idx, wts = [], []
    for zi, wz in ((z0, 1 - fz), (z1, fz)):
        for yi, wy in ((y0, 1 - fy), (y1, fy)):
            for xi, wx in ((x0, 1 - fx), (x1, fx)):
                idx.append((zi * gy + yi) * gx + xi)
                wts.append(wz * wy * wx)
    d, h, w = frustum_dims
    samples = _scatter_weighted_corners(grid.reshape(b, c, gz * gy * gx), torch.stack(idx), torch.stack(wts),
                                        lin, d * h * w, out)
    return samples.view(b, c, d, h, w)


class IndexCache:
    """Lifting and projection indices per pose, each computed once: a dataset's poses are fixed.

    Poses are used in their own precision (float32 from the loaders; float64 for a float64 run), on the
    geometry's device. A pose that sees nothing raises EmptyFrustumError every time it is asked for.
    """

    def __init__(self, geometry: ProjectionHelper, device: torch.device):
        self.geometry, self.device = geometry, device
        self._lift: dict[tuple, object] = {}
        self._proj: dict[tuple, object] = {}

    def _get(self, table: dict, fn: Callable, pose: torch.Tensor):
        pose = pose.reshape(4, 4)
        key = (pose.dtype, pose.detach().cpu().numpy().tobytes())
        if key not in table:
            try:
                table[key] = fn(pose.to(self.device))
            except EmptyFrustumError as err:
                table[key] = err
        value = table[key]
        if isinstance(value, EmptyFrustumError):
            raise value
        return value

    def lift(self, cam2world: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``ProjectionHelper.lifting_indices`` of ``cam2world`` (4, 4)."""
        return self._get(self._lift, self.geometry.lifting_indices, cam2world)

    def project(self, cam2world: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``ProjectionHelper.projection_indices`` of ``cam2world`` (4, 4)."""
        return self._get(self._proj, self.geometry.projection_indices, cam2world)
