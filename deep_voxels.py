"""The DeepVoxels model: a persistent feature grid, its update from an input view, and novel-view rendering."""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Optional, Sequence

import torch
from torch import nn

from custom_layers import FeatureExtractor, IntegrationNet, OcclusionNet, RenderingNet, coordinate_volume
from projection import lift_features, sample_frustum
from pytorch_prototyping import Conv2dSame, Unet3d
from recompute import recompute_cheap_layers, recompute_in_backward
from pytorch_prototyping.norm import BatchNorm2d

OCCNET_FEATURES = 4  # channels inside the occlusion net's 3D U-Net (original constant)
INPAINTING_NUM_DOWN = 2  # levels of the 3D inpainting U-Net
FRUSTUM_DEPTH_PER_VOXEL = 2  # depth planes per grid voxel: the view volume spans 2 * G planes


class _WeightedMeanOverDepth(torch.autograd.Function):
    """``mean(weights * frustum, dim=2)`` with a backward pass that keeps only its results at full size.

    Autograd's own backward of the product form makes three (V, C, D, H, W) tensors (the expanded gradient
    over D, and a product for each input) where one suffices: the frustum's gradient. The weights' gradient,
    ``sum over C of frustum * grad / D``, is reduced one depth plane at a time. The training step's memory peak
    falls in this backward pass. Forward values are the product form's.
    """

    @staticmethod
    def forward(ctx, weights: torch.Tensor, frustum: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weights, frustum)
        return torch.mean(weights * frustum, dim=2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        weights, frustum = ctx.saved_tensors
        grad = grad / frustum.shape[2]  # the mean's 1 / D (a power of two: exact)
        grad_weights = grad_frustum = None
        if ctx.needs_input_grad[0]:
            planes = [(plane * grad).sum(dim=1, keepdim=True) for plane in frustum.unbind(2)]
            grad_weights = torch.stack(planes, dim=2).to(weights.dtype)
        if ctx.needs_input_grad[1]:
            grad_frustum = (weights * grad.unsqueeze(2)).to(frustum.dtype)
        return grad_weights, grad_frustum


def visibility_weighted_mean(weights: torch.Tensor, frustum: torch.Tensor) -> torch.Tensor:
    """``mean(weights * frustum, dim=2)``: weights (V, 1, D, H, W), frustum (V, C, D, H, W) -> (V, C, H, W).

    Without autograd the D planes are accumulated one at a time (in order k = 0..D-1, in float32 at least,
    then divided by D) instead of forming the (V, C, D, H, W) product and reducing it along a strided axis,
    which is much faster for a batch of test views and equal up to float rounding. With
    autograd the product form is kept for the forward pass (its values are those of training), and the
    backward pass is ``_WeightedMeanOverDepth``'s, which needs less memory than autograd's own.
    """
    if torch.is_grad_enabled() and (weights.requires_grad or frustum.requires_grad):
        return _WeightedMeanOverDepth.apply(weights, frustum)
    planes, plane_weights = frustum.unbind(2), weights.unbind(2)  # D x (V, C or 1, H, W)
    total = planes[0].to(torch.promote_types(frustum.dtype, torch.float32)) * plane_weights[0]
    for plane, weight in zip(planes[1:], plane_weights[1:]):
        total.addcmul_(plane, weight)
    return total.div_(len(planes)).to(torch.promote_types(frustum.dtype, weights.dtype))


class DeepVoxels(nn.Module):
    """Persistent grid ``deepvoxels`` (1, C, G, G, G), axes (z, y, x), and the networks around it.

    Args:
        img_sidelength: S, side of input and rendered images (64 * 2^k, k >= 1).
        lifting_img_dims, frustrum_img_dims: (H, W) of the lifted feature map and the view volume (64, 64);
            the lifted map's size follows from the feature extractor, the argument is kept for the original's callers.
        grid_dims: (G, G, G).
        num_grid_feats: C, features per voxel.
        nf0: features in the outermost layer of the 2D U-Nets.
        use_occlusion_net: occlusion net (True) or the 2D depth-collapse net (``--no_occlusion_net``).

    The spelling ``frustrum`` survives only in this argument name, for callers written against the original.
    """

    def __init__(self, img_sidelength: int, lifting_img_dims: Sequence[int], frustrum_img_dims: Sequence[int],
                 grid_dims: Sequence[int], num_grid_feats: int = 64, nf0: int = 64,
                 use_occlusion_net: bool = True):
        super().__init__()
        self.use_occlusion_net = use_occlusion_net
        self.grid_dims = list(grid_dims)
        self.frustum_img_dims = list(frustrum_img_dims)
        self.frustum_depth = FRUSTUM_DEPTH_PER_VOXEL * grid_dims[-1]

        # Submodules are created in the original's order: same state_dict order, same seeded initialisation.
        self.feature_extractor = FeatureExtractor(nf0=nf0, out_channels=num_grid_feats,
                                                  input_resolution=img_sidelength,
                                                  output_sidelength=self.frustum_img_dims[0])
        self.rendering_net = RenderingNet(nf0=nf0, in_channels=num_grid_feats,
                                          input_resolution=self.frustum_img_dims[0],
                                          img_sidelength=img_sidelength)
        if use_occlusion_net:
            self.occlusion_net = OcclusionNet(nf0=num_grid_feats, occnet_nf=OCCNET_FEATURES,
                                              frustum_dims=(self.frustum_img_dims[0], self.frustum_img_dims[1],
                                                            self.frustum_depth))
        else:
            wide, narrow = nf0 * grid_dims[-1] // 2, nf0 * grid_dims[-1] // 8
            self.depth_collapse_net = nn.Sequential(
                Conv2dSame(num_grid_feats * self.frustum_depth, out_channels=wide, kernel_size=3, bias=False),
                BatchNorm2d(wide),
                nn.ReLU(True),
                Conv2dSame(wide, out_channels=narrow, kernel_size=3, bias=False),
                BatchNorm2d(narrow),
                nn.ReLU(True),
                Conv2dSame(narrow, out_channels=nf0, kernel_size=3, bias=False),
                BatchNorm2d(nf0),
                nn.ReLU(True),
            )
        # Saved with the weights but not trained by the optimiser: it is overwritten by every integration.
        self.register_buffer("deepvoxels", torch.zeros(1, num_grid_feats, *grid_dims))
        self.integration_net = IntegrationNet(num_grid_feats, grid_dim=grid_dims[-1])
        self.inpainting_net = Unet3d(in_channels=num_grid_feats + 3, out_channels=num_grid_feats,
                                     num_down=INPAINTING_NUM_DOWN, nf0=num_grid_feats,
                                     max_channels=4 * num_grid_feats)
        self.register_buffer("coord_conv_volume", coordinate_volume(grid_dims[-1]), persistent=False)

        # Set by the last training forward for the summaries (the loop draws them, never forward).
        self.last_gates: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        # Memory savers, off here; ``performance.enable`` switches them (they change no value).
        self.recompute_cheap_layers = False
        self.recompute_view_volume = False

    def integrate(self, input_img: torch.Tensor, lift_volume_idcs: torch.Tensor,
                  lift_img_coords: torch.Tensor) -> torch.Tensor:
        """Lift the input view's features and fuse them into ``deepvoxels``; returns the new grid (with grad).

        The buffer is overwritten with the result, in train and eval mode alike, as the original did.
        """
        img_feats = self.feature_extractor(input_img)
        lifted = lift_features(img_feats, lift_volume_idcs, lift_img_coords, self.grid_dims)
        new_grid, update, reset = self.integration_net(lifted, self.deepvoxels.detach())
        self.last_gates = (update.detach(), reset.detach())
        # Rebind rather than copy in place: the old grid tensor is saved for this step's backward pass.
        self.deepvoxels = new_grid.detach()
        return new_grid

    def inpaint(self, grid: torch.Tensor) -> torch.Tensor:
        """3D U-Net over the grid with coordinate channels: (1, C, G, G, G) -> (1, C, G, G, G)."""
        return self.inpainting_net(torch.cat([grid, self.coord_conv_volume.to(grid.dtype)], dim=1))

    def render(self, inpainted: torch.Tensor, proj_frustum_idcs: Sequence[torch.Tensor],
               proj_grid_coords: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Render views from an inpainted grid, all views in one batch.

        Args:
            inpainted: (1, C, G, G, G).
            proj_frustum_idcs, proj_grid_coords: per view, from ``ProjectionHelper.projection_indices``.
        Returns:
            images (V, 3, S, S) in (-1/2, 1/2); depth (V, 1, H, W), the raw depth in [-1/2, 1/2)
            (zeros without the occlusion net).

        Batching views changes nothing in eval mode (BatchNorm uses running statistics). In train mode
        BatchNorm statistics would mix views, so ``forward`` renders one view per call there.
        """
        collapse = functools.partial(self.collapse, proj_frustum_idcs=proj_frustum_idcs,
                                     proj_grid_coords=proj_grid_coords)
        if self.recompute_view_volume:
            collapse_net = self.occlusion_net if self.use_occlusion_net else self.depth_collapse_net
            features, depth = recompute_in_backward(collapse, inpainted, modules=collapse_net)
        else:
            features, depth = collapse(inpainted)
        return 0.5 * self.rendering_net(features), depth

    def collapse(self, inpainted: torch.Tensor, proj_frustum_idcs: Sequence[torch.Tensor],
                 proj_grid_coords: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Resample the grid into each view's volume and collapse it along the rays.

        Returns: features (V, C, H, W), the visibility-weighted mean over the depth planes (or the depth
        collapse net's output); depth (V, 1, H, W) as in ``render``.
        """
        dims = (self.frustum_depth, *self.frustum_img_dims)
        views, channels = len(proj_frustum_idcs), inpainted.shape[0] * inpainted.shape[1]  # grid batch: 1
        # (V, C, D, H, W) stored channels-last, as the sampler writes it: the occlusion net's concatenations,
        # pads and 3D convolutions then need no layout copies (torch.cat would return it (V, C, D, H, W)-
        # contiguous). Without autograd each view is sampled straight into its slice of one buffer.
        if torch.is_grad_enabled() and inpainted.requires_grad:
            volumes = [sample_frustum(inpainted, idx, coords, dims).permute(0, 2, 3, 4, 1)
                       for idx, coords in zip(proj_frustum_idcs, proj_grid_coords)]
            # A single view (training renders one at a time) is not copied. view() gives its size-1 batch
            # axis a dense stride: torch.cat would otherwise not see channels-last input and fall back to a
            # (V, C, D, H, W)-contiguous result, and every 3D convolution after it to layout copies.
            frustum = volumes[0].view(volumes[0].shape) if len(volumes) == 1 else torch.cat(volumes, dim=0)
            del volumes
        else:
            frustum = inpainted.new_zeros(views, math.prod(dims), channels)
            for view, (idx, coords) in enumerate(zip(proj_frustum_idcs, proj_grid_coords)):
                sample_frustum(inpainted, idx, coords, dims, out=frustum[view])
            frustum = frustum.view(views, *dims, channels)
        frustum = frustum.permute(0, 4, 1, 2, 3)
        if self.use_occlusion_net:
            # The occlusion net's input holds the frustum as its channels 1..C: the mean reads them there,
            # so that one (V, C, D, H, W) copy is kept for the backward pass instead of two.
            volume = self.occlusion_net.with_depth_channel(frustum)
            del frustum
            weights, depth = self.occlusion_net.weigh(volume)
            features = visibility_weighted_mean(weights, volume[:, 1:])  # (V, C, H, W)
        else:
            features = self.depth_collapse_net(frustum.reshape(views, -1, *self.frustum_img_dims))
            depth = frustum.new_zeros(views, 1, *self.frustum_img_dims)
        return features, depth

    def forward(self, input_img: Optional[torch.Tensor], proj_frustum_idcs_list: Sequence[torch.Tensor],
                proj_grid_coords_list: Sequence[torch.Tensor], lift_volume_idcs: Optional[torch.Tensor] = None,
                lift_img_coords: Optional[torch.Tensor] = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Update the grid from ``input_img`` (when given) and render the requested views.

        Args:
            input_img: (1, 3, S, S) in [-1/2, 1/2], or None to render from the stored grid (test mode).
            proj_frustum_idcs_list, proj_grid_coords_list: per target view (``projection_indices``).
            lift_volume_idcs, lift_img_coords: the input view's ``lifting_indices`` (with ``input_img``).
        Returns:
            (images, depths): lists with one (1, 3, S, S) image and one (1, 1, H, W) raw depth per view.
        """
        with recompute_cheap_layers(self) if self.recompute_cheap_layers else contextlib.nullcontext():
            if input_img is not None:
                grid = self.integrate(input_img, lift_volume_idcs, lift_img_coords)
            else:
                grid = self.deepvoxels
            inpainted = self.inpaint(grid)
            if not self.training:
                images, depths = self.render(inpainted, proj_frustum_idcs_list, proj_grid_coords_list)
                return list(images.split(1)), list(depths.split(1))
            images, depths = [], []
            for idx, coords in zip(proj_frustum_idcs_list, proj_grid_coords_list):
                image, depth = self.render(inpainted, [idx], [coords])
                images.append(image)
                depths.append(depth)
            return images, depths
