"""The DeepVoxels sub-networks: feature extractor, rendering net, integration net and occlusion net.

Shapes: images and feature maps (B, C, H, W); grids (B, C, G, G, G) with spatial axes (z, y, x);
canonical view volumes (B, C, D, H, W) with axes (depth plane k, row v, column u).
"""
from __future__ import annotations

import torch
from torch import nn

import util
from recompute import recompute_in_backward
from pytorch_prototyping import (Conv2dSame, Conv3dSame, DownsamplingNet, ReplicationPad3d, Unet, Unet3d, UpsamplingNet,
                                  at_least_float32)
from pytorch_prototyping.norm import BatchNorm2d, BatchNorm3d

RENDER_DROPOUT = 0.1  # dropout probability inside the rendering net (original default)
INTEGRATION_DROPOUT = 0.2  # channel dropout on the integration net's candidate features
COORD_CHANNELS = 3  # (x, y, z) coordinate channels appended to grid features ("coord conv")


def coordinate_volume(grid_dim: int) -> torch.Tensor:
    """(1, 3, G, G, G) float32 voxel coordinates in [-1/2, 1/2): channel i holds the index along axis i,
    shifted by -G//2 and divided by G (the original's ``np.mgrid`` construction)."""
    axis = torch.arange(-grid_dim // 2, grid_dim // 2, dtype=torch.float32)
    return torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"))[None] / grid_dim


class FeatureExtractor(nn.Module):
    """Input image (B, 3, S, S) -> features (B, out_channels, s, s).

    Strided down blocks take S to the lifting size s, then a U-Net with skip connections works at s.
    """

    def __init__(self, nf0: int, out_channels: int, input_resolution: int, output_sidelength: int):
        super().__init__()
        num_down_unet = util.num_divisible_by_2(output_sidelength)
        num_downsampling = util.num_divisible_by_2(input_resolution) - num_down_unet
        unet_nf0 = nf0 * 2 ** (num_downsampling - 1)
        self.net = nn.Sequential(
            DownsamplingNet([nf0 * 2 ** i for i in range(num_downsampling)], in_channels=3, use_dropout=False,
                            norm=BatchNorm2d),
            Unet(in_channels=unet_nf0, out_channels=out_channels, nf0=unet_nf0, use_dropout=False,
                 max_channels=8 * nf0, num_down=num_down_unet, norm=BatchNorm2d),
        )

        # When True (``performance.enable``), the first down block, the one working at the input's full
        # resolution, keeps no activations and is recomputed in the backward pass (same values).
        self.recompute_full_resolution = False

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        downs = self.net[0].downs
        if not (self.recompute_full_resolution and isinstance(downs, nn.Sequential)):
            return self.net(img)
        return self.net[1](downs[1:](recompute_in_backward(downs[0], img)))


class RenderingNet(nn.Module):
    """Collapsed frustum features (B, C, s, s) -> image (B, 3, S, S) in (-1, 1) (tanh).

    A U-Net at s, then transposed-convolution upsampling to S and two 3x3 convolutions.
    """

    def __init__(self, nf0: int, in_channels: int, input_resolution: int, img_sidelength: int):
        super().__init__()
        num_down_unet = util.num_divisible_by_2(input_resolution)
        num_upsampling = util.num_divisible_by_2(img_sidelength) - num_down_unet
        layers: list[nn.Module] = [
            Unet(in_channels=in_channels, out_channels=3 if num_upsampling <= 0 else 4 * nf0,
                 outermost_linear=num_upsampling <= 0, use_dropout=True, dropout_prob=RENDER_DROPOUT,
                 nf0=nf0 * 2 ** num_upsampling, norm=BatchNorm2d, max_channels=8 * nf0,
                 num_down=num_down_unet)
        ]
        if num_upsampling > 0:
            layers += [
                UpsamplingNet(per_layer_out_ch=num_upsampling * [nf0], in_channels=4 * nf0,
                              upsampling_mode="transpose", use_dropout=True, dropout_prob=RENDER_DROPOUT),
                Conv2dSame(nf0, out_channels=nf0 // 2, kernel_size=3, bias=False),
                BatchNorm2d(nf0 // 2),
                nn.ReLU(True),
                Conv2dSame(nf0 // 2, 3, kernel_size=3),
            ]
        layers.append(nn.Tanh())
        self.net = nn.Sequential(*layers)
        self.num_upsampling = num_upsampling
        # When True (``performance.enable``), the layers working at the output's full resolution (the last
        # up block and the two convolutions after it) keep no activations and are recomputed in the
        # backward pass (same values); they hold the largest activations of a rendered view.
        self.recompute_full_resolution = False

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if not (self.recompute_full_resolution and self.num_upsampling > 0):
            return self.net(features)
        unet, upsampling, tail = self.net[0], self.net[1].ups, self.net[2:]
        x = upsampling[:-1](unet(features))
        return recompute_in_backward(nn.Sequential(upsampling[-1], *tail), x)


def _padded_conv3d(in_channels: int, out_channels: int, bias: bool, dropout: float = 0.0) -> nn.Sequential:
    """Replication pad 1 + 3^3 convolution (+ channel dropout). Layer indices match the original's keys."""
    layers: list[nn.Module] = [ReplicationPad3d(1),
                               nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=0, bias=bias)]
    if dropout:
        # The original used Dropout2d on these 5-D volumes, which drops whole channels; Dropout3d does exactly
        # that without the deprecation warning current PyTorch gives for Dropout2d on 5-D input.
        layers.append(nn.Dropout3d(dropout))
    return nn.Sequential(*layers)


class IntegrationNet(nn.Module):
    """GRU-style fusion of a newly lifted observation into the persistent grid.

    ``reset`` and ``update`` gates (one channel each) come from the old state and the new observation, each
    with coordinate channels; the candidate is ``relu(W_new * new + W_old * (reset * old))`` with channel
    dropout on both terms, and the result is ``(1 - update) * old + update * candidate``. (The original's
    constructor also offered per-feature gates and no coordinate channels or dropout; DeepVoxels used none
    of these.)
    """

    def __init__(self, nf0: int, grid_dim: int):
        super().__init__()
        in_channels, gate_channels, dropout = nf0 + COORD_CHANNELS, 1, INTEGRATION_DROPOUT

        # Construction order and names follow the original (state_dict keys, seeded initialisation).
        self.new_integration = _padded_conv3d(in_channels, nf0, bias=True, dropout=dropout)
        self.old_integration = _padded_conv3d(in_channels, nf0, bias=False, dropout=dropout)
        self.update_old_net = _padded_conv3d(in_channels, gate_channels, bias=True)
        self.update_new_net = _padded_conv3d(in_channels, gate_channels, bias=False)
        self.reset_old_net = _padded_conv3d(in_channels, gate_channels, bias=True)
        self.reset_new_net = _padded_conv3d(in_channels, gate_channels, bias=False)
        self.register_buffer("coord_conv_volume", coordinate_volume(grid_dim), persistent=False)

    def forward(self, new_observation: torch.Tensor,
                old_state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Args: new_observation, old_state: (B, C, G, G, G).
        Returns: (new_state (B, C, G, G, G), update gate, reset gate (each (B, 1, G, G, G)))."""
        coords = self.coord_conv_volume.expand(old_state.shape[0], -1, -1, -1, -1).to(old_state.dtype)
        old = torch.cat([old_state, coords], dim=1)
        new = torch.cat([new_observation, coords], dim=1)
        # Gates and the blend in float32 at least: under bf16 autocast, 1 - update would be rounded to steps
        # of 2^-8, and the persistent grid, blended anew at every step, would carry that error forward.
        # (A no-op in float32.)
        reset = torch.sigmoid(at_least_float32(self.reset_old_net(old) + self.reset_new_net(new)))
        update = torch.sigmoid(at_least_float32(self.update_old_net(old) + self.update_new_net(new)))
        candidate = torch.relu(self.new_integration(new) + self.old_integration(reset * old))
        return (1 - update) * old_state + update * at_least_float32(candidate), update, reset


class OcclusionNet(nn.Module):
    """Visibility along each ray of the canonical view volume.

    A softmax over the depth axis gives convex weights per ray; the expected plane position is the depth map.
    """

    def __init__(self, nf0: int, occnet_nf: int, frustum_dims: tuple[int, int, int]):
        """Args: nf0: grid feature channels; occnet_nf: internal channels;
        frustum_dims: (H, W, D) of the view volume, as the original passed them."""
        super().__init__()
        self.frustum_depth = frustum_dims[-1]
        depth = self.frustum_depth
        # Plane k's coordinate (k - D/2) / D, in [-1/2, 1/2); the depth map is its visibility-weighted mean.
        planes = torch.arange(-depth // 2, depth // 2, dtype=torch.float32) / depth
        self.register_buffer("depth_coords", planes.view(1, 1, depth, 1, 1), persistent=False)
        self.frustum_hw = (frustum_dims[0], frustum_dims[0])  # the original used dims[0] twice (square maps)

        self.occlusion_prep = nn.Sequential(
            Conv3dSame(nf0 + 1, occnet_nf, kernel_size=3, bias=False),
            BatchNorm3d(occnet_nf),
            nn.ReLU(True),
        )
        num_down = min(util.num_divisible_by_2(depth), util.num_divisible_by_2(frustum_dims[0]))
        self.occlusion_net = Unet3d(in_channels=occnet_nf, out_channels=occnet_nf, nf0=occnet_nf,
                                    num_down=num_down, max_channels=4 * occnet_nf, outermost_linear=False)
        self.softmax_net = nn.Sequential(
            Conv3dSame(2 * occnet_nf + 1, 1, kernel_size=3, bias=True),
            nn.Softmax(dim=2),
        )

    def forward(self, frustum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: frustum (B, C, D, H, W).
        Returns: weights (B, 1, D, H, W) summing to 1 over D; depth (B, 1, H, W) in [-1/2, 1/2)."""
        return self.weigh(self.with_depth_channel(frustum))

    def with_depth_channel(self, frustum: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) -> (B, 1 + C, D, H, W): each plane's depth coordinate as channel 0, then the frustum.

        Stored channels-last like the sampled volume, so the concatenations in ``weigh`` stay channels-last
        too and the padded inputs reach the 3D convolutions without another copy. ``volume[:, 1:]`` is the
        frustum itself: a caller that needs it after this net can take that view and let its own copy go.
        """
        return torch.cat((self._depth_channel(frustum), frustum), dim=1)

    def _depth_channel(self, like: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) plane coordinates in ``like``'s dtype, materialised channels-last."""
        planes = self.depth_coords.to(like.dtype).expand(like.shape[0], 1, -1, *self.frustum_hw)
        return planes.contiguous(memory_format=torch.channels_last_3d)

    def weigh(self, volume: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` from ``with_depth_channel``'s volume (B, 1 + C, D, H, W)."""
        # Its own tensor (1 / (1 + C) of the volume), not the view volume[:, :1]: the depth product below is
        # saved for a backward pass that never runs when the loss ignores the depth map, and a view would keep
        # the whole volume alive until the graph is freed.
        depth_coords = self._depth_channel(volume)
        prep = self.occlusion_prep(volume)
        feats = self.occlusion_net(prep)
        logits = self.softmax_net[0](torch.cat((prep, feats, depth_coords), dim=1))
        # The softmax over depth in float32 at least, as CUDA autocast runs it (CPU autocast would keep
        # bf16): the weights set the depth map and weigh every feature along the ray.
        weights = self.softmax_net[1](at_least_float32(logits))
        return weights, (depth_coords * weights).sum(dim=2)
