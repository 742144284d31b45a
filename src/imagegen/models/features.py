"""The domain feature network: a small classifier of the dataset's classes (trained by the
train-features stage, evaluation/features.py).

Its penultimate layer (`body`) is the space FID, KID and precision/recall are computed in; its class
predictions give the mode-coverage metrics. Built for C x H x W images (C = 1 or 3; H = W = 28, 32 or
64): 3 x 3 convolutions with max-pooling halve the side down to 7 (28 -> 14 -> 7) or 8 (32 -> 16 -> 8;
64 adds a block: 64 -> 32 -> 16 -> 8), then a linear layer to `feature_dim`. At 1 x 28 x 28 it is
exactly the network trained before other sizes existed (same parameter names and shapes).
"""

from __future__ import annotations

import torch
from torch import nn

from imagegen.models.description import LEGACY_SHAPE, check_shape

POOLS = {28: 2, 32: 2, 64: 3}  # halvings of the side before the last convolution


class FeatureNet(nn.Module):
    def __init__(self, width: int = 32, feature_dim: int = 128, num_classes: int = 10,
                 image_shape: tuple[int, int, int] = LEGACY_SHAPE):
        super().__init__()
        channels, size, _ = check_shape(image_shape)
        self.image_shape = (channels, size, size)
        c = width
        layers: list[nn.Module] = []
        a = channels
        for i in range(POOLS[size]):
            b = c * min(2 ** i, 2)  # c, 2c, 2c
            layers += [nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            a = b
        side = size >> POOLS[size]
        self.body = nn.Sequential(
            *layers,
            nn.Conv2d(a, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU(inplace=True),
            nn.Flatten(),
            nn.Dropout(0.3),
            nn.Linear(2 * c * side * side, feature_dim), nn.BatchNorm1d(feature_dim), nn.ReLU(inplace=True),
        )
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(feature_dim, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))
