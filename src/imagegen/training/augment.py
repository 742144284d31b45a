"""Differentiable augmentation for the GAN's discriminator, with an adaptive probability.

A discriminator trained on a few thousand images memorises them and its gradients stop guiding the
generator (Karras et al. 2020, "Training Generative Adversarial Networks with Limited Data" (ADA);
Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN Training"). Both real and fake
images are augmented before the discriminator, in the generator's step too, with operations that pass
gradients through: translation by up to 1/8 of the side (zero padded), cutout of a square half the side,
and for RGB brightness, saturation and contrast. Each operation is applied to each image with
probability p.

p adapts (ADA's heuristic): r = E[sign D(real)] says how sure the discriminator is about the training
images; above `target` it is overfitting, so p rises, below it p falls, by batch / speed_images per step
(p goes from 0 to 1 in `speed_images` images). Everything stays on the device: no value is read back,
so the step can still be replayed as a CUDA graph.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def augment(x: torch.Tensor, p: torch.Tensor, noise: torch.Generator) -> torch.Tensor:
    """x (N x C x H x W, in [-1, 1]) with each operation applied to each image with probability p."""
    if x.shape[1] == 3:
        x = colour(x, p, noise)
    return cutout(translate(x, p, noise), p, noise)


def chosen(x: torch.Tensor, p: torch.Tensor, noise: torch.Generator) -> torch.Tensor:
    """Per image: 1.0 with probability p, else 0.0 (shape N x 1 x 1 x 1)."""
    draw = torch.rand(len(x), 1, 1, 1, generator=noise, device=x.device)
    return (draw < p).to(x.dtype)


def uniform(x: torch.Tensor, noise: torch.Generator) -> torch.Tensor:
    return torch.rand(len(x), 1, 1, 1, generator=noise, device=x.device, dtype=x.dtype)


def colour(x: torch.Tensor, p: torch.Tensor, noise: torch.Generator) -> torch.Tensor:
    """Brightness + [-0.5, 0.5], saturation and contrast x [0.5, 1.5]; each written as x + change, so
    that an image not chosen keeps its exact values."""
    x = x + chosen(x, p, noise) * (uniform(x, noise) - 0.5)
    x = x + chosen(x, p, noise) * (x - x.mean(dim=1, keepdim=True)) * (uniform(x, noise) - 0.5)
    return x + chosen(x, p, noise) * (x - x.mean(dim=(1, 2, 3), keepdim=True)) * (uniform(x, noise) - 0.5)


def translate(x: torch.Tensor, p: torch.Tensor, noise: torch.Generator) -> torch.Tensor:
    """Shift each image by whole pixels (up to 1/8 of the side each way), zeros coming in."""
    n, _, h, w = x.shape
    reach = math.ceil(h / 8)
    apply = chosen(x, p, noise).view(n, 1).long()
    shift = torch.randint(-reach, reach + 1, (n, 2), generator=noise, device=x.device) * apply
    padded = F.pad(x, [reach] * 4)
    rows = torch.arange(h, device=x.device) + reach - shift[:, :1]  # N x H: which padded row lands at each row
    cols = torch.arange(w, device=x.device) + reach - shift[:, 1:]
    c, wp = x.shape[1], padded.shape[3]
    out = padded.gather(2, rows[:, None, :, None].expand(n, c, h, wp))
    return out.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def cutout(x: torch.Tensor, p: torch.Tensor, noise: torch.Generator) -> torch.Tensor:
    """Zero a square of half the side at a random place (it may hang over the border)."""
    n, _, h, w = x.shape
    apply = chosen(x, p, noise).view(n, 1, 1)
    centre = torch.rand(n, 2, generator=noise, device=x.device) * torch.tensor([h, w], device=x.device)
    ys = (torch.arange(h, device=x.device)[None, :] + 0.5 - centre[:, :1]).abs() < h / 4  # N x H
    xs = (torch.arange(w, device=x.device)[None, :] + 0.5 - centre[:, 1:]).abs() < w / 4
    hole = (ys[:, :, None] & xs[:, None, :]).to(x.dtype) * apply
    return x * (1 - hole[:, None])


@torch.no_grad()
def adapt(p: torch.Tensor, real_out: torch.Tensor, target: float, speed_images: int) -> None:
    """ADA's step, in place on the device: p += sign(E[sign D(real)] - target) * batch / speed_images, in [0, 1]."""
    overfit = torch.sign(real_out.float()).mean()
    p.add_(torch.sign(overfit - target) * (len(real_out) / speed_images)).clamp_(0, 1)
