"""The VAE's likelihood-side numbers on the test split, in nats per image and (`*_per_dim`) per
dimension, a dimension being one pixel of one channel (C x H x W of them), so that models of
different image sizes compare.

The decoder is a Bernoulli likelihood over intensities in [0, 1] (as trained), so these are
comparable between our runs, not with discretised-likelihood NLLs from papers.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from imagegen.data.arrays import as_nchw
from imagegen.models.vae import VAE, negative_elbo

PER_DIM = ("recon_bce", "nelbo", "nll_iwae", "nll_iwae_prior")  # also reported per dimension


@torch.no_grad()
def vae_test_metrics(vae: VAE, images: np.ndarray, labels: np.ndarray, k: int, seed: int = 0,
                     batch_size: int = 500, device: torch.device | str = "cpu") -> dict[str, float]:
    """Reconstruction error (decoding the posterior mean), negative ELBO (one posterior sample)
    and the IWAE bound on the negative log-likelihood with k importance samples, all of the first
    stage as trained (prior N(0, I)). With a fitted prior (vae.prior), also `nll_iwae_prior`: the same
    bound for the model samples are drawn from (fitted prior + decoder; for a two-stage prior, whose
    density is only bounded, a looser bound)."""
    vae = vae.to(device).eval()
    noise = torch.Generator().manual_seed(seed)
    prior_noise = torch.Generator().manual_seed(seed + 1)  # its own: the first-stage numbers stay as they were
    fitted = getattr(vae, "prior", None)
    fitted = fitted if getattr(fitted, "kind", "standard") != "standard" else None
    sums = {"recon_bce": 0.0, "recon_mse": 0.0, "nelbo": 0.0, "kl": 0.0, "nll_iwae": 0.0}
    if fitted is not None:
        sums["nll_iwae_prior"] = 0.0
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(as_nchw(images[start:start + batch_size])).float().div(255).to(device)
        y = torch.from_numpy(labels[start:start + batch_size]).to(device) if vae.num_classes else None
        mu, logvar = vae.encode(x, y)
        logits = vae.decode(mu, y)
        sums["recon_bce"] += float(negative_elbo(logits, x, mu, logvar)[1].sum())
        sums["recon_mse"] += float((torch.sigmoid(logits) - x).pow(2).flatten(1).mean(1).sum())
        eps = torch.randn(mu.shape, generator=noise).to(device)
        nelbo, _, kl = negative_elbo(vae.decode(mu + eps * (0.5 * logvar).exp(), y), x, mu, logvar)
        sums["nelbo"] += float(nelbo.sum())
        sums["kl"] += float(kl.sum())
        bounds = iwae_bound(vae, x, y, mu, logvar, k, noise, fitted, prior_noise)
        sums["nll_iwae"] -= float(bounds[0].sum())
        if fitted is not None:
            sums["nll_iwae_prior"] -= float(bounds[1].sum())
    means = {name: total / len(images) for name, total in sums.items()}
    dims = math.prod(as_nchw(images).shape[1:])
    per_dim = {f"{name}_per_dim": means[name] / dims for name in PER_DIM if name in means}
    return {**means, **per_dim, "dims": dims}


def iwae_bound(vae: VAE, x, y, mu, logvar, k: int, noise: torch.Generator, prior=None,
               prior_noise: torch.Generator | None = None):
    """log (1/k) sum_i p(x, z_i) / q(z_i | x), z_i ~ q(z | x): a lower bound on log p(x) that
    tightens as k grows (Burda et al., 2016), and equals the ELBO in expectation for k = 1.
    Returns (bound with p(z) = N(0, I), bound with p(z) = `prior`'s log_prob from the same z_i and
    decodes, or None without a prior)."""
    n, d = mu.shape
    eps = torch.randn((k, n, d), generator=noise).to(mu.device)
    z = mu + eps * (0.5 * logvar).exp()  # k x n x d
    log_q = -0.5 * (eps.pow(2) + logvar + math.log(2 * math.pi)).sum(-1)
    log_prior = -0.5 * (z.pow(2) + math.log(2 * math.pi)).sum(-1)
    log_lik = torch.stack([
        -negative_elbo(vae.decode(z_i, y), x, mu, logvar)[1] for z_i in z
    ])
    bound = torch.logsumexp(log_lik + log_prior - log_q, dim=0) - math.log(k)
    if prior is None:
        return bound, None
    log_fitted = prior.log_prob(z, prior_noise)
    return bound, torch.logsumexp(log_lik + log_fitted - log_q, dim=0) - math.log(k)
