"""DCGAN-style generator and discriminator for C x H x W images (C = 1 or 3; H = W = 28, 32 or 64).

The size decides the number of up/down-sampling blocks (each doubles or halves the side):
- 28: the generator starts from a 7 x 7 seed (7 -> 14 -> 28); the discriminator goes 28 -> 14 -> 7 -> 4
  (its last block a 3 x 3 convolution). At 1 x 28 x 28 both are exactly the models trained before
  other sizes existed (same parameter names and shapes: old weights load).
- 32: a 4 x 4 seed (4 -> 8 -> 16 -> 32); the discriminator 32 -> 16 -> 8 -> 4.
- 64: one block more on each side (4 -> ... -> 64; 64 -> ... -> 4).
Channels: `width` next to the image, doubling per block away from it, at most 8 x width.
Generator: z (+ class embedding) -> seed, BatchNorm + ReLU, tanh output in [-1, 1].
Discriminator: strided convolutions, LeakyReLU, optional spectral norm; a conditional model adds
the projection term <embed(y), h> (Miyato & Koyama, 2018).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from imagegen.models.description import LEGACY_SHAPE, SEEDS, check_shape, doublings

MAX_MULTIPLIER = 8


def channels(width: int, n: int) -> list[int]:
    """Channels from the deepest block to the one next to the image: [.., 4w, 2w, w]."""
    return [width * min(2 ** i, MAX_MULTIPLIER) for i in range(n, -1, -1)]


class Generator(nn.Module):
    def __init__(self, latent_dim: int = 64, width: int = 32, num_classes: int = 0, kernel_size: int = 4,
                 image_shape: tuple[int, int, int] = LEGACY_SHAPE):
        super().__init__()
        c_out, size, _ = check_shape(image_shape)
        self.latent_dim, self.num_classes, self.image_shape = latent_dim, num_classes, (c_out, size, size)
        self.embed = nn.Embedding(num_classes, latent_dim) if num_classes else None
        seed, chans = SEEDS[size], channels(width, doublings(size))
        self.project = nn.Sequential(
            nn.Linear(latent_dim * (2 if num_classes else 1), chans[0] * seed * seed, bias=False),
            nn.Unflatten(1, (chans[0], seed, seed)),
            nn.BatchNorm2d(chans[0]),
            nn.ReLU(inplace=True),
        )
        up = {"kernel_size": kernel_size, "stride": 2, "padding": (kernel_size - 1) // 2,
              "output_padding": kernel_size % 2, "bias": False}  # exactly doubles the size
        layers: list[nn.Module] = []
        for c_in, c in zip(chans, chans[1:]):
            layers += [nn.ConvTranspose2d(c_in, c, **up), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers, nn.Conv2d(chans[-1], c_out, 3, 1, 1), nn.Tanh())

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.embed(labels)], dim=1)
        return self.body(self.project(z))


class Discriminator(nn.Module):
    def __init__(self, width: int = 32, num_classes: int = 0, use_spectral_norm: bool = True, kernel_size: int = 4,
                 image_shape: tuple[int, int, int] = LEGACY_SHAPE):
        super().__init__()
        sn = spectral_norm if use_spectral_norm else (lambda m: m)
        c_in, size, _ = check_shape(image_shape)
        halvings = {28: 3, 32: 3, 64: 4}[size]  # down to 4 x 4
        chans = channels(width, halvings - 1)[::-1]  # w, 2w, 4w, ..
        pad = (kernel_size - 1) // 2
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip([c_in, *chans[:-1]], chans)):
            # 28 -> 14 -> 7 -> 4: the last halving of 7 is a 3 x 3 convolution (as before other sizes)
            k, p = (3, 1) if size == 28 and i == len(chans) - 1 else (kernel_size, pad)
            layers += [sn(nn.Conv2d(a, b, k, 2, p)), nn.LeakyReLU(0.2, inplace=True)]
        self.features = nn.Sequential(*layers, nn.Flatten())
        features = chans[-1] * 4 * 4
        self.head = sn(nn.Linear(features, 1))
        self.embed = sn(nn.Embedding(num_classes, features)) if num_classes else None

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self.features(x)
        out = self.head(h).squeeze(1)
        if self.embed is not None:
            out = out + (self.embed(labels) * h).sum(dim=1)
        return out
