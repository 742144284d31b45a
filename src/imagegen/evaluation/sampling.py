"""Images out of a trained generator: uint8 N x C x H x W arrays in memory; .npy files or a PNG grid.

In memory (and in data/prepared) images are N x C x H x W. A .npy file holds them the way image
tools expect: N x H x W for grey, N x H x W x 3 for RGB (`file_layout`). That uint8 .npy file is the
interchange format: `imagegen evaluate --samples` scores any generator's samples in it the same way
the evaluate stage scores ours.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from imagegen.errors import ImagegenError
from imagegen.fsutil import atomic_file
from imagegen.models.description import ModelDescription
from imagegen.models.kinds import to_images

OUTPUT_SUFFIXES = (".npy", ".png")


def class_labels(description: ModelDescription, n: int, label: int | None) -> torch.Tensor | None:
    """The labels to condition on: `label` for all, or classes in turn; None for an unconditional model."""
    num_classes = description.num_classes
    if not num_classes:
        if label is not None:
            raise ImagegenError(f"label {label}: this {description.kind} model is unconditional; drop the label")
        return None
    if label is None:
        return torch.arange(n) % num_classes
    if not 0 <= label < num_classes:
        raise ImagegenError(f"label {label}: expected a class index in 0..{num_classes - 1}")
    return torch.full((n,), label, dtype=torch.long)


def batch_size_for(device: str | torch.device) -> int:
    """Images per forward pass: small on a CPU (cache-sized), large on a GPU (fewer launches)."""
    return 8192 if torch.device(device).type == "cuda" else 1000


@torch.no_grad()
def generate(module: nn.Module, description: ModelDescription, n: int, seed: int = 0, label: int | None = None,
             device: str | torch.device = "cpu", batch_size: int | None = None) -> np.ndarray:
    """n images as uint8 N x C x H x W. The latents come from a CPU generator seeded with `seed`,
    so a seed gives the same images on any device (up to floating-point differences)."""
    if n < 1:
        raise ImagegenError(f"n={n}: expected at least 1 image")
    batch_size = batch_size or batch_size_for(device)
    labels = class_labels(description, n, label)
    module = module.to(device).eval()
    z = latents(module, description, n, torch.Generator().manual_seed(seed))
    chunks = []
    for start in range(0, n, batch_size):
        zb = z[start:start + batch_size].to(device)
        lb = labels[start:start + batch_size].to(device) if labels is not None else None
        chunks.append(to_uint8(to_images(module, description, zb, lb)))
    return np.concatenate(chunks)


def latents(module: nn.Module, description: ModelDescription, n: int, generator: torch.Generator) -> torch.Tensor:
    """n latents from the model's prior: its own (a VAE's fitted prior) or N(0, I), drawn with `generator`."""
    own = getattr(module, "sample_latents", None)
    if own is not None:
        return own(n, generator)
    return torch.randn(n, description.arch["latent_dim"], generator=generator)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in [0, 1] (N x C x H x W) as uint8."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def file_layout(images: np.ndarray) -> np.ndarray:
    """uint8 N x C x H x W as a .npy file holds them: N x H x W (grey) or N x H x W x 3 (RGB)."""
    return images[:, 0] if images.shape[1] == 1 else images.transpose(0, 2, 3, 1)


def save_images(path: Path, images: np.ndarray, nrow: int | None = None) -> None:
    """Write uint8 N x C x H x W images as .npy (file_layout), or as one PNG grid; atomically."""
    if path.suffix not in OUTPUT_SUFFIXES:
        raise ImagegenError(f"{path}: unknown output type; expected one of {', '.join(OUTPUT_SUFFIXES)}")
    with atomic_file(path) as tmp:
        if path.suffix == ".npy":
            with tmp.open("wb") as f:
                np.save(f, np.ascontiguousarray(file_layout(images)), allow_pickle=False)
        else:
            tmp.write_bytes(png_grid(images, nrow))


def png_grid(images: np.ndarray, nrow: int | None = None, scale: int = 1) -> bytes:
    """uint8 N x C x H x W images (N x H x W: grey) as one PNG grid, `nrow` tiles a row, black padding
    around them: torchvision's layout, without importing torchvision (2 s of a stage's start-up).
    `scale` enlarges each tile (nearest neighbour) to be readable."""
    from PIL import Image

    images = np.asarray(images, dtype=np.uint8)
    if images.ndim == 3:
        images = images[:, None]
    if scale > 1:
        images = images.repeat(scale, axis=2).repeat(scale, axis=3)
    n, channels, height, width = images.shape
    padding = 2 if n > 1 else 0  # one image is just that image
    columns = min(nrow or math.ceil(math.sqrt(n)), n)
    rows = math.ceil(n / columns)
    grid = np.zeros((rows * (height + padding) + padding, columns * (width + padding) + padding, channels), np.uint8)
    for i, image in enumerate(images):
        top, left = padding + i // columns * (height + padding), padding + i % columns * (width + padding)
        grid[top:top + height, left:left + width] = image.transpose(1, 2, 0)
    buffer = io.BytesIO()
    Image.fromarray(grid[..., 0] if channels == 1 else grid).save(buffer, format="png")
    return buffer.getvalue()
