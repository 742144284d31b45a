"""The evaluate stage's pictures: sample grids, latent interpolations, VAE reconstructions,
one row per class for conditional models. PNG files in reports/evaluate/."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from imagegen.evaluation.sampling import generate, latents, png_grid, to_uint8
from imagegen.models.description import ModelDescription
from imagegen.models.kinds import kind_of, to_images

SCALE = 3  # tiles enlarged x3 (nearest neighbour): 28-pixel tiles are too small to judge
SIDE_BY_SIDE = "gan-vs-vae.png"


def draw_pictures(folder: Path, module, description: ModelDescription, samples: np.ndarray,
                  test: tuple[np.ndarray, np.ndarray], seed: int, device) -> None:
    """Samples, interpolations, a row per class (conditional), reconstructions (a kind with an encoder);
    uint8 N x C x H x W in, grey or RGB PNGs out."""
    kind = description.kind
    (folder / f"{kind}-samples.png").write_bytes(png_grid(samples[:100], nrow=10, scale=SCALE))
    (folder / f"{kind}-interpolations.png").write_bytes(png_grid(interpolations(module, description, seed, device),
                                                                 nrow=10, scale=SCALE))
    if description.num_classes:
        rows = [generate(module, description, 10, seed + 1 + label, label, device)
                for label in range(description.num_classes)]
        (folder / f"{kind}-classes.png").write_bytes(png_grid(np.concatenate(rows), nrow=10, scale=SCALE))
    if kind_of(description).reconstructs:
        (folder / f"{kind}-reconstructions.png").write_bytes(
            png_grid(reconstructions(module, test[0][:50], test[1][:50], device), nrow=10, scale=SCALE))


def side_by_side(path: Path, grids: dict[str, np.ndarray], gap: int = 24) -> None:
    """One PNG with an 8 x 8 grid per model next to each other, each titled (e.g. GAN | VAE)."""
    import io

    from PIL import Image, ImageDraw, ImageFont

    pictures = [Image.open(io.BytesIO(png_grid(images[:64], nrow=8, scale=SCALE))) for images in grids.values()]
    title = 20
    mode = "RGB" if any(np.asarray(images).ndim == 4 and images.shape[1] == 3 for images in grids.values()) else "L"
    canvas = Image.new(mode, (sum(p.width for p in pictures) + gap * (len(pictures) + 1),
                              max(p.height for p in pictures) + title + gap), "white")
    draw, x, font = ImageDraw.Draw(canvas), gap, ImageFont.load_default(size=16)
    for name, picture in zip(grids, pictures, strict=True):
        draw.text((x, 0), name, fill="black", font=font)
        canvas.paste(picture.convert(mode), (x, title))
        x += picture.width + gap
    canvas.save(path, format="png")


@torch.no_grad()
def interpolations(module, description: ModelDescription, seed: int, device, rows: int = 8,
                   steps: int = 10) -> np.ndarray:
    """Each row walks from one latent to another: along the great circle (slerp) under N(0, I), which
    keeps the intermediate points at the norm the Gaussian prior puts its mass on; along the straight
    line between two draws of a fitted prior (a VAE's mixture or second stage)."""
    gen = torch.Generator().manual_seed(seed + 999)
    start, end = (latents(module, description, rows, gen).cpu() for _ in range(2))
    gaussian = getattr(getattr(module, "prior", None), "kind", "standard") == "standard"
    t = torch.linspace(0, 1, steps)
    path = slerp if gaussian else lerp
    z = torch.stack([path(a, b, t) for a, b in zip(start, end, strict=True)]).flatten(0, 1).to(device)
    labels = None
    if description.num_classes:
        labels = (torch.arange(rows) % description.num_classes).repeat_interleave(steps).to(device)
    return to_uint8(to_images(module, description, z, labels))


def lerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.lerp(a[None], b[None], t[:, None])


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    omega = torch.arccos(torch.clamp(torch.dot(a / a.norm(), b / b.norm()), -1, 1))
    if omega.abs() < 1e-6:
        return torch.lerp(a[None], b[None], t[:, None])
    return (torch.sin((1 - t) * omega)[:, None] * a + torch.sin(t * omega)[:, None] * b) / torch.sin(omega)


@torch.no_grad()
def reconstructions(vae, images: np.ndarray, labels: np.ndarray, device) -> np.ndarray:
    """Rows of 10 inputs (uint8 N x C x H x W) each followed by a row of their reconstructions (posterior mean)."""
    x = torch.from_numpy(images).float().div(255).to(device)
    y = torch.from_numpy(labels).to(device) if vae.num_classes else None
    mu, _ = vae.encode(x, y)
    out = to_uint8(torch.sigmoid(vae.decode(mu, y)))
    pairs = [block for start in range(0, len(images), 10) for block in (images[start:start + 10], out[start:start + 10])]
    return np.concatenate(pairs)
