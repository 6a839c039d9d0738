"""The adversarial part of the DeepVoxels objective: a PatchGAN discriminator and its log-loss."""
from __future__ import annotations

import torch
from torch import nn

from pytorch_prototyping import ReflectionPad2d
from pytorch_prototyping.blocks import LEAKY_SLOPE
from pytorch_prototyping.norm import BatchNorm2d

GAN_EPS = 1e-9  # keeps log() finite when the discriminator saturates
DISCRIMINATOR_NDF = 28  # filters in the discriminator's first layer (original default)
DISCRIMINATOR_LAYERS = 3
DISCRIMINATOR_DROPOUT = 0.5


class GANLoss(nn.Module):
    """Binary cross-entropy on probabilities: ``-mean(log(p))`` for real, ``-mean(log(1 - p))`` for fake."""

    def forward(self, prediction: torch.Tensor, target_is_real: bool) -> torch.Tensor:
        if target_is_real:
            return -torch.mean(torch.log(prediction + GAN_EPS))
        return -torch.mean(torch.log(1 - prediction + GAN_EPS))


class PatchDiscriminator(nn.Module):
    """PatchGAN: image (B, input_nc, H, W) -> per-patch probability of being real (B, 1, h, w).

    Every convolution is 4x4 after a reflection pad of 1; strides 2, 2, 2, 1, 1 for the default 3 layers.
    """

    def __init__(self, input_nc: int, ndf: int = DISCRIMINATOR_NDF, n_layers: int = DISCRIMINATOR_LAYERS):
        super().__init__()
        layers: list[nn.Module] = [
            ReflectionPad2d(1),
            nn.Conv2d(input_nc, ndf, kernel_size=4, stride=2, padding=0),
            nn.LeakyReLU(LEAKY_SLOPE, True),
        ]
        mult = 1
        for n in range(n_layers):
            prev, mult = mult, min(2 ** (n + 1), 8)
            layers += [
                ReflectionPad2d(1),
                nn.Conv2d(ndf * prev, ndf * mult, kernel_size=4, stride=1 if n == n_layers - 1 else 2, padding=0),
                BatchNorm2d(ndf * mult),
                nn.Dropout2d(DISCRIMINATOR_DROPOUT),
                nn.LeakyReLU(LEAKY_SLOPE, True),
            ]
        layers += [
            ReflectionPad2d(1),
            nn.Conv2d(ndf * mult, 1, kernel_size=4, stride=1, padding=0),
            nn.Sigmoid(),
        ]
        self.model = nn.Sequential(*layers)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.model(img)
