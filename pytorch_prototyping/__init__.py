"""Generic convolutional building blocks the DeepVoxels networks are assembled from.

The original kept these in a git submodule (vsitzmann/pytorch_prototyping). Module nesting and attribute
names here are chosen so that the state_dict keys of the assembled model equal the original's, which lets
checkpoints written by the original load with ``strict=True``.
"""
from pytorch_prototyping.blocks import (
    at_least_float32,
    autocast_off,
    Conv2dSame,
    Conv3dSame,
    DownBlock,
    DownBlock3D,
    DownsamplingNet,
    ReflectionPad2d,
    ReplicationPad3d,
    Unet,
    Unet3d,
    UnetSkipConnectionBlock,
    UnetSkipConnectionBlock3d,
    UpBlock,
    UpBlock3D,
    UpsamplingNet,
)

__all__ = [
    "at_least_float32", "autocast_off", "Conv2dSame", "Conv3dSame", "DownBlock", "DownBlock3D", "DownsamplingNet",
    "ReflectionPad2d", "ReplicationPad3d", "Unet", "Unet3d",
    "UnetSkipConnectionBlock", "UnetSkipConnectionBlock3d", "UpBlock", "UpBlock3D", "UpsamplingNet",
]
