"""Convolutional blocks: "same"-padded convolutions, down/up blocks, 2D and 3D U-Nets.

Shapes follow PyTorch: 2D tensors are (B, C, H, W), 3D tensors are (B, C, D, H, W).

Checkpoint compatibility constrains this file more than style would: the index of every layer inside its
``nn.Sequential`` and every attribute name (``net``, ``model``, ``in_layer``, ``unet_block``, ``out_layer``,
``downs``, ``ups``) is part of a state_dict key of the original DeepVoxels model. The order in which layers
are *constructed* is also kept, so that a seeded initialisation draws the same random numbers as the
original did.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence, Type

import torch
from torch import nn

from pytorch_prototyping.norm import BatchNorm2d, BatchNorm3d

LEAKY_SLOPE = 0.2  # negative slope of every LeakyReLU (the down paths and the PatchGAN discriminator)
POST_CONV_DROPOUT = 0.1  # the original hard-codes this probability after an UpBlock's second convolution


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 if it is in a narrower float type (under autocast), else unchanged (float64 stays)."""
    return x.float() if x.is_floating_point() and x.element_size() < 4 else x


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast switched off on ``device_type`` where it is on; otherwise a no-op context, so that float32
    hot paths do not enter an autocast context on every call."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class _PadInInputDtype:
    """Mixin for padding layers: pad in the input's dtype. CPU autocast lists the padding ops among those
    it runs in float32, so a bfloat16 activation would be copied to float32, padded, and cast back by the
    convolution after it. Padding only copies values, so the result is identical either way."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast_off(x.device.type):
            return super().forward(x)


class ReflectionPad2d(_PadInInputDtype, nn.ReflectionPad2d):
    """``nn.ReflectionPad2d`` in the input's dtype under autocast."""


class ReplicationPad3d(_PadInInputDtype, nn.ReplicationPad3d):
    """``nn.ReplicationPad3d`` in the input's dtype under autocast."""


def _same_padding(kernel_size: int) -> tuple[int, int]:
    """(before, after) padding that keeps a stride-1 convolution's output the size of its input."""
    before = kernel_size // 2
    after = before - 1 if kernel_size % 2 == 0 else before
    return before, after


class Conv2dSame(nn.Module):
    """Stride-1 2D convolution with reflection padding so that H and W are unchanged.

    The convolution's ``weight`` and ``bias`` are also exposed as attributes of this module. Because they are
    Parameters, they appear twice in the state_dict (``weight`` and ``net.1.weight``), as in the original.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True,
                 padding_layer: Type[nn.Module] = ReflectionPad2d):
        super().__init__()
        before, after = _same_padding(kernel_size)
        self.net = nn.Sequential(
            padding_layer((before, after, before, after)),
            nn.Conv2d(in_channels, out_channels, kernel_size, bias=bias, stride=1),
        )
        # Aliases kept for checkpoint compatibility (the original state_dict holds both names).
        self.weight = self.net[1].weight
        self.bias = self.net[1].bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Conv3dSame(nn.Module):
    """Stride-1 3D convolution with replication padding so that D, H and W are unchanged."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True,
                 padding_layer: Type[nn.Module] = ReplicationPad3d):
        super().__init__()
        before, after = _same_padding(kernel_size)
        self.net = nn.Sequential(
            padding_layer((before, after, before, after, before, after)),
            nn.Conv3d(in_channels, out_channels, kernel_size, bias=bias, stride=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DownBlock3D(nn.Module):
    """Halves D, H and W: replication pad 1, 4^3 convolution with stride 2, optional norm, LeakyReLU."""

    def __init__(self, in_channels: int, out_channels: int, norm: Optional[Type[nn.Module]] = BatchNorm3d):
        super().__init__()
        layers: list[nn.Module] = [
            ReplicationPad3d(1),
            nn.Conv3d(in_channels, out_channels, kernel_size=4, padding=0, stride=2, bias=norm is None),
        ]
        if norm is not None:
            layers.append(norm(out_channels, affine=True))
        layers.append(nn.LeakyReLU(LEAKY_SLOPE, True))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class UpBlock3D(nn.Module):
    """Doubles D, H and W: 4^3 transposed convolution with stride 2, optional norm, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, norm: Optional[Type[nn.Module]] = BatchNorm3d):
        super().__init__()
        layers: list[nn.Module] = [
            nn.ConvTranspose3d(in_channels, out_channels, kernel_size=4, stride=2, padding=1, bias=norm is None),
        ]
        if norm is not None:
            layers.append(norm(out_channels, affine=True))
        layers.append(nn.ReLU(True))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class UpBlock(nn.Module):
    """Doubles H and W with a 4x4 stride-2 transposed convolution, then (optionally) a 3x3 convolution.

    Each convolution is followed by an optional norm, ReLU and optional channel dropout.
    """

    def __init__(self, in_channels: int, out_channels: int, post_conv: bool = True, use_dropout: bool = False,
                 dropout_prob: float = 0.1, norm: Optional[Type[nn.Module]] = BatchNorm2d,
                 upsampling_mode: str = "transpose"):
        super().__init__()
        if upsampling_mode != "transpose":
            raise ValueError(f"upsampling_mode {upsampling_mode!r} is not supported; DeepVoxels uses 'transpose'")
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(in_channels, out_channels, kernel_size=4, stride=2, padding=1, bias=norm is None),
        ]
        if norm is not None:
            layers.append(norm(out_channels, affine=True))
        layers.append(nn.ReLU(True))
        if use_dropout:
            layers.append(nn.Dropout2d(dropout_prob, False))
        if post_conv:
            layers.append(Conv2dSame(out_channels, out_channels, kernel_size=3, bias=norm is None))
            if norm is not None:
                layers.append(norm(out_channels, affine=True))
            layers.append(nn.ReLU(True))
            if use_dropout:
                layers.append(nn.Dropout2d(POST_CONV_DROPOUT, False))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DownBlock(nn.Module):
    """Halves H and W: an optional 3x3 "prep" convolution, then a 4x4 stride-2 convolution.

    Both convolutions use reflection padding 1 and are followed by an optional norm, LeakyReLU and optional
    channel dropout.
    """

    def __init__(self, in_channels: int, out_channels: int, prep_conv: bool = True,
                 middle_channels: Optional[int] = None, use_dropout: bool = False, dropout_prob: float = 0.1,
                 norm: Optional[Type[nn.Module]] = BatchNorm2d):
        super().__init__()
        if middle_channels is None:
            middle_channels = in_channels
        layers: list[nn.Module] = []
        if prep_conv:
            layers += [ReflectionPad2d(1),
                       nn.Conv2d(in_channels, middle_channels, kernel_size=3, padding=0, stride=1,
                                 bias=norm is None)]
            if norm is not None:
                layers.append(norm(middle_channels, affine=True))
            layers.append(nn.LeakyReLU(LEAKY_SLOPE, True))
            if use_dropout:
                layers.append(nn.Dropout2d(dropout_prob, False))
        layers += [ReflectionPad2d(1),
                   nn.Conv2d(middle_channels, out_channels, kernel_size=4, padding=0, stride=2, bias=norm is None)]
        if norm is not None:
            layers.append(norm(out_channels, affine=True))
        layers.append(nn.LeakyReLU(LEAKY_SLOPE, True))
        if use_dropout:
            layers.append(nn.Dropout2d(dropout_prob, False))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class UnetSkipConnectionBlock3d(nn.Module):
    """One level of a 3D U-Net: down, (inner levels), up; the output is ``cat([input, result], dim=1)``."""

    def __init__(self, outer_nc: int, inner_nc: int, norm: Optional[Type[nn.Module]] = BatchNorm3d,
                 submodule: Optional[nn.Module] = None):
        super().__init__()
        if submodule is None:
            layers = [DownBlock3D(outer_nc, inner_nc, norm=norm), UpBlock3D(inner_nc, outer_nc, norm=norm)]
        else:
            # The inner level returns its input concatenated with its output: 2 * inner_nc channels.
            layers = [DownBlock3D(outer_nc, inner_nc, norm=norm), submodule,
                      UpBlock3D(2 * inner_nc, outer_nc, norm=norm)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.model(x)], 1)


class UnetSkipConnectionBlock(nn.Module):
    """One level of a 2D U-Net: down, (inner levels), up; the output is ``cat([input, result], dim=1)``."""

    def __init__(self, outer_nc: int, inner_nc: int, upsampling_mode: str = "transpose",
                 norm: Optional[Type[nn.Module]] = BatchNorm2d, submodule: Optional[nn.Module] = None,
                 use_dropout: bool = False, dropout_prob: float = 0.1):
        super().__init__()
        down = DownBlock(outer_nc, inner_nc, use_dropout=use_dropout, dropout_prob=dropout_prob, norm=norm)
        up_in = inner_nc if submodule is None else 2 * inner_nc
        up = UpBlock(up_in, outer_nc, use_dropout=use_dropout, dropout_prob=dropout_prob, norm=norm,
                     upsampling_mode=upsampling_mode)
        layers = [down, up] if submodule is None else [down, submodule, up]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.model(x)], 1)


def _level_channels(level: int, nf0: int, max_channels: int) -> int:
    """Channels at U-Net depth ``level``: doubling per level from nf0, capped at max_channels."""
    return int(min(2 ** level * nf0, max_channels))


class Unet3d(nn.Module):
    """3D U-Net: 3^3 in-convolution, ``num_down`` skip levels, 3^3 out-convolution.

    The innermost level has no norm because its feature map can be 1 voxel wide (BatchNorm would see a
    single value per channel).
    """

    def __init__(self, in_channels: int, out_channels: int, nf0: int, num_down: int, max_channels: int,
                 norm: Optional[Type[nn.Module]] = BatchNorm3d, outermost_linear: bool = False):
        super().__init__()
        if num_down < 1:
            raise ValueError(f"Unet3d needs at least one downsampling level, got num_down={num_down}")
        in_layer: list[nn.Module] = [Conv3dSame(in_channels, nf0, kernel_size=3, bias=False)]
        if norm is not None:
            in_layer.append(norm(nf0, affine=True))
        in_layer.append(nn.LeakyReLU(LEAKY_SLOPE, True))
        self.in_layer = nn.Sequential(*in_layer)

        innermost = _level_channels(num_down - 1, nf0, max_channels)
        block: nn.Module = UnetSkipConnectionBlock3d(innermost, innermost, norm=None)
        for level in reversed(range(num_down - 1)):
            block = UnetSkipConnectionBlock3d(_level_channels(level, nf0, max_channels),
                                              _level_channels(level + 1, nf0, max_channels),
                                              submodule=block, norm=norm)
        self.unet_block = block

        # The outermost level returns cat(in_layer output, its result): 2 * nf0 channels.
        out_layer: list[nn.Module] = [Conv3dSame(2 * nf0, out_channels, kernel_size=3, bias=outermost_linear)]
        if not outermost_linear:
            if norm is not None:
                out_layer.append(norm(out_channels, affine=True))
            out_layer.append(nn.ReLU(True))
        self.out_layer = nn.Sequential(*out_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(self.unet_block(self.in_layer(x)))


class Unet(nn.Module):
    """2D U-Net: 3x3 in-convolution, ``num_down`` skip levels, 3x3 out-convolution.

    The innermost level has no norm (its feature map is 1 pixel wide at the DeepVoxels sizes).
    """

    def __init__(self, in_channels: int, out_channels: int, nf0: int, num_down: int, max_channels: int,
                 use_dropout: bool, upsampling_mode: str = "transpose", dropout_prob: float = 0.1,
                 norm: Optional[Type[nn.Module]] = BatchNorm2d, outermost_linear: bool = False):
        super().__init__()
        if num_down < 1:
            raise ValueError(f"Unet needs at least one downsampling level, got num_down={num_down}")
        in_layer: list[nn.Module] = [Conv2dSame(in_channels, nf0, kernel_size=3, bias=norm is None)]
        if norm is not None:
            in_layer.append(norm(nf0, affine=True))
        in_layer.append(nn.LeakyReLU(LEAKY_SLOPE, True))
        if use_dropout:
            in_layer.append(nn.Dropout2d(dropout_prob))
        self.in_layer = nn.Sequential(*in_layer)

        innermost = _level_channels(num_down - 1, nf0, max_channels)
        block: nn.Module = UnetSkipConnectionBlock(innermost, innermost, use_dropout=use_dropout,
                                                   dropout_prob=dropout_prob, norm=None,
                                                   upsampling_mode=upsampling_mode)
        for level in reversed(range(num_down - 1)):
            block = UnetSkipConnectionBlock(_level_channels(level, nf0, max_channels),
                                            _level_channels(level + 1, nf0, max_channels),
                                            use_dropout=use_dropout, dropout_prob=dropout_prob, submodule=block,
                                            norm=norm, upsampling_mode=upsampling_mode)
        self.unet_block = block

        out_layer: list[nn.Module] = [Conv2dSame(2 * nf0, out_channels, kernel_size=3,
                                                 bias=outermost_linear or norm is None)]
        if not outermost_linear:
            if norm is not None:
                out_layer.append(norm(out_channels, affine=True))
            out_layer.append(nn.ReLU(True))
            if use_dropout:
                out_layer.append(nn.Dropout2d(dropout_prob))
        self.out_layer = nn.Sequential(*out_layer)
        # Alias kept for checkpoint compatibility: the original state_dict holds "out_layer_weight".
        self.out_layer_weight = self.out_layer[0].weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(self.unet_block(self.in_layer(x)))


class DownsamplingNet(nn.Module):
    """``len(per_layer_out_ch)`` DownBlocks, each halving H and W; identity when the list is empty."""

    def __init__(self, per_layer_out_ch: Sequence[int], in_channels: int, use_dropout: bool,
                 dropout_prob: float = 0.1, norm: Optional[Type[nn.Module]] = BatchNorm2d):
        super().__init__()
        if not per_layer_out_ch:
            self.downs: nn.Module = nn.Identity()
            return
        blocks = [DownBlock(in_channels, per_layer_out_ch[0], use_dropout=use_dropout, dropout_prob=dropout_prob,
                            middle_channels=per_layer_out_ch[0], norm=norm)]
        for c_in, c_out in zip(per_layer_out_ch[:-1], per_layer_out_ch[1:]):
            blocks.append(DownBlock(c_in, c_out, dropout_prob=dropout_prob, use_dropout=use_dropout, norm=norm))
        self.downs = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downs(x)


class UpsamplingNet(nn.Module):
    """``len(per_layer_out_ch)`` UpBlocks, each doubling H and W; identity when the list is empty."""

    def __init__(self, per_layer_out_ch: Sequence[int], in_channels: int, upsampling_mode: str,
                 use_dropout: bool, dropout_prob: float = 0.1, norm: Optional[Type[nn.Module]] = BatchNorm2d):
        super().__init__()
        if not per_layer_out_ch:
            self.ups: nn.Module = nn.Identity()
            return
        channels = [in_channels, *per_layer_out_ch]
        self.ups = nn.Sequential(*[
            UpBlock(c_in, c_out, use_dropout=use_dropout, dropout_prob=dropout_prob, norm=norm,
                    upsampling_mode=upsampling_mode)
            for c_in, c_out in zip(channels[:-1], channels[1:])
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ups(x)
