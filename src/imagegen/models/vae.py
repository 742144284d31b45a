"""Convolutional VAE for 28x28 single-channel images with a Bernoulli (logits) likelihood.

Encoder: 28 -> 14 -> 7 convolutions -> (mu, log sigma^2). Decoder mirrors it and returns logits.
A conditional model feeds a class embedding to both encoder head and decoder.
Samples start from `prior` (models/priors.py): N(0, I) as trained, or a prior fitted to the
trained encoder's codes afterwards; the first stage (encoder, decoder) is the same either way.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from imagegen.models.priors import build_prior


class VAE(nn.Module):
    def __init__(self, latent_dim: int = 16, width: int = 32, num_classes: int = 0, prior: str = "standard",
                 prior_components: int = 32, prior_width: int = 128):
        super().__init__()
        self.latent_dim, self.num_classes = latent_dim, num_classes
        c = width
        cond = c if num_classes else 0
        self.embed = nn.Embedding(num_classes, c) if num_classes else None
        self.encoder = nn.Sequential(
            nn.Conv2d(1, c, 4, 2, 1), nn.SiLU(),  # 14x14
            nn.Conv2d(c, 2 * c, 4, 2, 1), nn.SiLU(),  # 7x7
            nn.Flatten(),
            nn.Linear(2 * c * 7 * 7, 8 * c), nn.SiLU(),
        )
        self.posterior = nn.Linear(8 * c + cond, 2 * latent_dim)
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim + cond, 8 * c), nn.SiLU(),
            nn.Linear(8 * c, 2 * c * 7 * 7), nn.SiLU(),
            nn.Unflatten(1, (2 * c, 7, 7)),
            nn.ConvTranspose2d(2 * c, c, 4, 2, 1), nn.SiLU(),  # 14x14
            nn.ConvTranspose2d(c, 1, 4, 2, 1),  # 28x28 logits
        )
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


def negative_elbo(logits: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, beta: float = 1.0):
    """Per-image negative ELBO in nats (x in [0, 1]): reconstruction + beta * KL(q(z|x) || N(0, I))."""
    recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)
    return recon + beta * kl, recon, kl
