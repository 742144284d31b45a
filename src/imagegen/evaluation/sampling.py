"""Images out of a trained generator: N x 28 x 28 uint8 arrays (.npy) or a PNG grid.

The uint8 .npy file is the interchange format: `imagegen evaluate --samples` scores any
generator's samples in it the same way the evaluate stage scores ours.
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

OUTPUT_SUFFIXES = (".npy", ".png")


def class_labels(meta: dict, n: int, label: int | None) -> torch.Tensor | None:
    """The labels to condition on: `label` for all, or classes in turn; None for an unconditional model."""
    num_classes = meta.get("num_classes", 0)
    if not num_classes:
        if label is not None:
            raise ImagegenError(f"label {label}: this {meta['kind']} model is unconditional; drop the label")
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
def generate(module: nn.Module, meta: dict, n: int, seed: int = 0, label: int | None = None,
             device: str | torch.device = "cpu", batch_size: int | None = None) -> np.ndarray:
    """n images as uint8 N x 28 x 28. The latents come from a CPU generator seeded with `seed`,
    so a seed gives the same images on any device (up to floating-point differences)."""
    if n < 1:
        raise ImagegenError(f"n={n}: expected at least 1 image")
    batch_size = batch_size or batch_size_for(device)
    labels = class_labels(meta, n, label)
    module = module.to(device).eval()
    z = latents(module, meta, n, torch.Generator().manual_seed(seed))
    chunks = []
    for start in range(0, n, batch_size):
        zb = z[start:start + batch_size].to(device)
        lb = labels[start:start + batch_size].to(device) if labels is not None else None
        chunks.append(to_uint8(decode(module, meta["kind"], zb, lb)))
    return np.concatenate(chunks)


def latents(module: nn.Module, meta: dict, n: int, generator: torch.Generator) -> torch.Tensor:
    """n latents from the model's prior: its own (a VAE's fitted prior) or N(0, I), drawn with `generator`."""
    own = getattr(module, "sample_latents", None)
    if own is not None:
        return own(n, generator)
    return torch.randn(n, meta["arch"]["latent_dim"], generator=generator)


def decode(module: nn.Module, kind: str, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Latents -> images in [0, 1] (N x 1 x 28 x 28)."""
    if kind == "gan":
        return (module(z, labels).float() + 1) / 2
    return torch.sigmoid(module.decode(z, labels).float())


def to_uint8(images: torch.Tensor) -> np.ndarray:
    return (images.squeeze(1).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def save_images(path: Path, images: np.ndarray, nrow: int | None = None) -> None:
    """Write N x H x W uint8 images as .npy, or as one PNG grid; atomically."""
    if path.suffix not in OUTPUT_SUFFIXES:
        raise ImagegenError(f"{path}: unknown output type; expected one of {', '.join(OUTPUT_SUFFIXES)}")
    with atomic_file(path) as tmp:
        if path.suffix == ".npy":
            with tmp.open("wb") as f:
                np.save(f, images, allow_pickle=False)
        else:
            tmp.write_bytes(png_grid(images, nrow))


def png_grid(images: np.ndarray, nrow: int | None = None, scale: int = 1) -> bytes:
    """N x H x W uint8 images as one PNG grid; `scale` enlarges each tile (nearest neighbour) to be readable."""
    from torchvision.utils import save_image

    images = np.asarray(images, dtype=np.uint8)
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    tensor = torch.from_numpy(images).float().div(255).unsqueeze(1)
    buffer = io.BytesIO()
    save_image(tensor, buffer, nrow=nrow or math.ceil(math.sqrt(len(tensor))), padding=2, format="png")
    return buffer.getvalue()
