"""DCGAN-style generator and discriminator for 28x28 single-channel images.

Generator: z (+ class embedding) -> 7x7 -> 14x14 -> 28x28, BatchNorm + ReLU, tanh output in [-1, 1].
Discriminator: strided convolutions 28 -> 14 -> 7 -> 4, LeakyReLU, optional spectral norm; a
conditional model adds the projection term <embed(y), h> (Miyato & Koyama, 2018).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


class Generator(nn.Module):
    def __init__(self, latent_dim: int = 64, width: int = 32, num_classes: int = 0, kernel_size: int = 4):
        super().__init__()
        self.latent_dim, self.num_classes = latent_dim, num_classes
        self.embed = nn.Embedding(num_classes, latent_dim) if num_classes else None
        c = width
        self.project = nn.Sequential(
            nn.Linear(latent_dim * (2 if num_classes else 1), 4 * c * 7 * 7, bias=False),
            nn.Unflatten(1, (4 * c, 7, 7)),
            nn.BatchNorm2d(4 * c),
            nn.ReLU(inplace=True),
        )
        up = {"kernel_size": kernel_size, "stride": 2, "padding": (kernel_size - 1) // 2,
              "output_padding": kernel_size % 2, "bias": False}  # exactly doubles the size
        self.body = nn.Sequential(
            nn.ConvTranspose2d(4 * c, 2 * c, **up),
            nn.BatchNorm2d(2 * c),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(2 * c, c, **up),
            nn.BatchNorm2d(c),
            nn.ReLU(inplace=True),
            nn.Conv2d(c, 1, 3, 1, 1),
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.embed(labels)], dim=1)
        return self.body(self.project(z))


class Discriminator(nn.Module):
    def __init__(self, width: int = 32, num_classes: int = 0, use_spectral_norm: bool = True, kernel_size: int = 4):
        super().__init__()
        sn = spectral_norm if use_spectral_norm else (lambda m: m)
        c = width
        pad = (kernel_size - 1) // 2
        self.features = nn.Sequential(
            sn(nn.Conv2d(1, c, kernel_size, 2, pad)),  # 14x14
            nn.LeakyReLU(0.2, inplace=True),
            sn(nn.Conv2d(c, 2 * c, kernel_size, 2, pad)),  # 7x7
            nn.LeakyReLU(0.2, inplace=True),
            sn(nn.Conv2d(2 * c, 4 * c, 3, 2, 1)),  # 4x4
            nn.LeakyReLU(0.2, inplace=True),
            nn.Flatten(),
        )
        features = 4 * c * 4 * 4
        self.head = sn(nn.Linear(features, 1))
        self.embed = sn(nn.Embedding(num_classes, features)) if num_classes else None

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self.features(x)
        out = self.head(h).squeeze(1)
        if self.embed is not None:
            out = out + (self.embed(labels) * h).sum(dim=1)
        return out
