"""Convolutional VAE for C x H x W images (C = 1 or 3; H = W = 28, 32 or 64) with a Bernoulli (logits)
likelihood per pixel and channel.

Encoder: strided 4 x 4 convolutions down to a seed (28 -> 14 -> 7; 32 -> 16 -> 8 -> 4; 64 adds a block:
64 -> .. -> 4), channels width, 2 x width, 4 x width (at most), then a linear layer -> (mu, log sigma^2).
The decoder mirrors it and returns logits; with `decoder_blocks` = k > 0 it has k residual blocks
(two 3 x 3 convolutions each) at every resolution below the image's, the extra depth where the detail
of a decode is made. At 1 x 28 x 28 with k = 0 this is exactly the model trained before other sizes
existed (same parameter names and shapes).
A conditional model feeds a class embedding to both encoder head and decoder.
Samples start from `prior` (models/priors.py): N(0, I) as trained, or a prior fitted to the
trained encoder's codes afterwards; the first stage (encoder, decoder) is the same either way.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from imagegen.models.description import LEGACY_SHAPE, SEEDS, check_shape, doublings
from imagegen.models.priors import build_prior


class VAE(nn.Module):
    def __init__(self, latent_dim: int = 16, width: int = 32, num_classes: int = 0, prior: str = "standard",
                 prior_components: int = 32, prior_width: int = 128,
                 image_shape: tuple[int, int, int] = LEGACY_SHAPE, decoder_blocks: int = 0):
        super().__init__()
        channels, size, _ = check_shape(image_shape)
        self.latent_dim, self.num_classes, self.image_shape = latent_dim, num_classes, (channels, size, size)
        c = width
        cond = c if num_classes else 0
        self.embed = nn.Embedding(num_classes, c) if num_classes else None
        seed = SEEDS[size]
        chans = [c * min(2 ** i, 4) for i in range(doublings(size))]  # 28: c, 2c; 32: c, 2c, 4c; 64: c, 2c, 4c, 4c
        down = []
        for a, b in zip([channels, *chans[:-1]], chans):
            down += [nn.Conv2d(a, b, 4, 2, 1), nn.SiLU()]  # halves the side
        self.encoder = nn.Sequential(
            *down,
            nn.Flatten(),
            nn.Linear(chans[-1] * seed * seed, 8 * c), nn.SiLU(),
        )
        self.posterior = nn.Linear(8 * c + cond, 2 * latent_dim)
        decoder = [  # (built in this order: the same seed gives the same initial weights as before)
            nn.Linear(latent_dim + cond, 8 * c), nn.SiLU(),
            nn.Linear(8 * c, chans[-1] * seed * seed), nn.SiLU(),
            nn.Unflatten(1, (chans[-1], seed, seed)),
        ]
        for a, b in zip(chans[::-1], [*chans[-2::-1], channels]):
            decoder += [ResidualBlock(a) for _ in range(decoder_blocks)]
            decoder += [nn.ConvTranspose2d(a, b, 4, 2, 1), nn.SiLU()]  # doubles the side
        self.decoder = nn.Sequential(*decoder[:-1])  # the last layer gives the logits: no activation
        # Registered last: a standard prior has no state, so old state_dicts still load.
        self.prior = build_prior(prior, latent_dim, prior_components, prior_width)

    def _with_label(self, h: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return torch.cat([h, self.embed(labels)], dim=1) if self.embed is not None else h

    def encode(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.posterior(self._with_label(self.encoder(x), labels)).chunk(2, dim=1)
        return mu, logvar.clamp(-20, 10)

    def decode(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.decoder(self._with_label(z, labels))

    def forward(self, x, labels=None, generator: torch.Generator | None = None):
        mu, logvar = self.encode(x, labels)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        z = mu + eps * (0.5 * logvar).exp()
        return self.decode(z, labels), mu, logvar

    @torch.no_grad()
    def sample_latents(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n latents from the prior, on the model's device; noise from `generator` (a CPU one: same
        images on any device)."""
        return self.prior.sample(n, generator, next(self.parameters()).device)

    @torch.no_grad()
    def sample(self, n: int, labels=None, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.sigmoid(self.decode(self.sample_latents(n, generator), labels))


class ResidualBlock(nn.Module):
    """x + conv(SiLU(conv(x))), 3 x 3, same channels and side. The second convolution starts at zero,
    so a new block is the identity and adding blocks does not disturb the start of training."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.SiLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1))
        nn.init.zeros_(self.body[2].weight)
        nn.init.zeros_(self.body[2].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def negative_elbo(logits: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, beta: float = 1.0):
    """Per-image negative ELBO in nats (x in [0, 1]): reconstruction + beta * KL(q(z|x) || N(0, I))."""
    recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)
    return recon + beta * kl, recon, kl
