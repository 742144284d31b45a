"""The whole uint8 training set (N x C x H x W, as arrays.load_split reads it) lives on the device;
batches are index slices of it.

60k x 28 x 28 bytes is 47 MB (10k x 3 x 64 x 64, 123 MB): a DataLoader would only add worker overhead. Each epoch's order
is a permutation drawn from (seed, epoch), so a resumed run sees exactly the batches an
uninterrupted one would. Under DDP each rank takes its own slice of every global batch.
"""

from __future__ import annotations

from collections.abc import Iterator
import numpy as np
import torch

from imagegen.data.arrays import as_nchw
from imagegen.errors import ImagegenError


class DeviceBatches:
    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, device: torch.device,
                 seed: int, rank: int = 0, world_size: int = 1):
        self.images = torch.from_numpy(as_nchw(images)).to(device)  # N x C x H x W, uint8
        self.labels = torch.from_numpy(labels.astype(np.int64)).to(device)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.steps_per_epoch = len(self.images) // (batch_size * world_size)
        self.images_per_epoch = self.steps_per_epoch * batch_size * world_size  # the last partial batch is dropped
        if self.steps_per_epoch == 0:
            raise ImagegenError(
                f"train: {len(self.images)} images are fewer than one batch of {batch_size} x {world_size} process(es); "
                "lower the batch_size"
            )

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.images), generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        order = order.to(self.images.device)
        for step in range(start_step, self.steps_per_epoch):
            start = (step * self.world_size + self.rank) * self.batch_size
            index = order[start:start + self.batch_size]
            yield self.images[index], self.labels[index]
