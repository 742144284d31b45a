"""Priors over the VAE's latent codes: where its samples start.

The VAE is trained against N(0, I), but the codes its encoder actually uses for the training set
(the aggregate posterior) do not fill N(0, I): sampling the prior lands in holes that decode to
blurry in-between images, and some classes' regions get too little mass. A prior fitted to the
codes after training fixes that without touching the first stage:

- `standard`   N(0, I), as trained (no parameters).
- `mixture`    a Gaussian mixture with full covariances, fitted by EM to one z ~ q(z | x) per training
               image ("ex-post density estimation", Ghosh et al. 2020). Exact log-density.
- `class_mixture`  the same kind of mixture, fitted class by class: every class of the training labels
               gets its share of the components, fitted to its own codes only, and its share of the images
               as weight, so no component straddles two classes and every class keeps its mass.
- `two_stage`  a second, small VAE fitted to the same codes (Dai & Wipf 2019): u ~ N(0, I) is decoded
               to z. Its log-density is only bounded (by its ELBO).

A fitted prior never changes the first stage's weights, so the first stage's nelbo / nll_iwae
(measured against N(0, I), as it was trained) stay what they were. Every prior draws its noise from
the caller's CPU generator, so a seed gives the same images on any device.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn



def build_prior(kind: str, latent_dim: int, components: int = 32, width: int = 128) -> nn.Module:
    """The prior named `kind` (vae.prior), built from the PRIORS table at the end of this module."""
    if kind not in PRIORS:
        raise ValueError(f"unknown prior {kind!r}; expected one of {', '.join(PRIORS)}")
    return PRIORS[kind](latent_dim, components, width)


def _noise(shape: tuple[int, ...], generator: torch.Generator | None, device) -> torch.Tensor:
    where = generator.device if generator is not None else "cpu"
    return torch.randn(shape, generator=generator, device=where).to(device)


def gaussian_log_density(z: torch.Tensor) -> torch.Tensor:
    return -0.5 * (z.pow(2) + math.log(2 * math.pi)).sum(-1)


class StandardPrior(nn.Module):
    kind = "standard"

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim

    def sample(self, n: int, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
        # The same draws as before priors existed: old models give the same images for a seed.
        return _noise((n, self.latent_dim), generator, device)

    def log_prob(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return gaussian_log_density(z)

    def fit(self, codes: torch.Tensor, seed: int = 0, **_) -> dict:
        return {}


class MixturePrior(nn.Module):
    """K Gaussians with full covariances; parameters are buffers set by `fit` (EM)."""

    kind = "mixture"

    def __init__(self, latent_dim: int, components: int):
        super().__init__()
        self.latent_dim, self.components = latent_dim, components
        self.register_buffer("log_weights", torch.full((components,), -math.log(components)))
        self.register_buffer("means", torch.zeros(components, latent_dim))
        self.register_buffer("scale_tril", torch.eye(latent_dim).repeat(components, 1, 1))

    def sample(self, n: int, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
        where = generator.device if generator is not None else "cpu"
        weights = self.log_weights.to(where).softmax(0)
        picks = torch.multinomial(weights, n, replacement=True, generator=generator).to(self.means.device)
        eps = _noise((n, self.latent_dim, 1), generator, self.means.device)
        return (self.means[picks] + (self.scale_tril[picks] @ eps).squeeze(-1)).to(device)

    def log_prob(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        shape = z.shape[:-1]
        flat = z.reshape(-1, self.latent_dim)
        out = _mixture_log_prob(flat, self.log_weights.to(z.dtype), self.means.to(z.dtype),
                                self.scale_tril.to(z.dtype)).logsumexp(1)
        return out.reshape(shape)

    @torch.no_grad()
    def fit(self, codes: torch.Tensor, seed: int = 0, iterations: int = 100, tol: float = 1e-3,
            max_points: int = 20_000, **_) -> dict:
        """EM on at most `max_points` codes (a seeded random subset): ample for a few dozen Gaussians
        in a few dozen dimensions, and it keeps the fit to seconds on a CPU."""
        if len(codes) > max_points:
            codes = codes[torch.randperm(len(codes), generator=torch.Generator().manual_seed(seed))[:max_points]]
        weights, means, tril, log_lik, steps = fit_mixture(codes, self.components, seed, iterations, tol)
        used = len(weights)  # fewer than asked for when the codes are few: the rest at weight zero
        self.log_weights.fill_(-math.inf)
        self.log_weights[:used] = weights.log()
        self.means[:used], self.scale_tril[:used] = means, tril
        return {"prior_fit_log_lik": log_lik, "prior_fit_iterations": steps, "prior_fit_components": used}


class ClassMixturePrior(MixturePrior):
    """A `MixturePrior` (same buffers, density and sampling) fitted class by class from labelled codes.

    The components are dealt out to the classes as evenly as they divide (the larger classes get the
    extra ones); EM fits each class's components to that class's codes only, and a class's components
    share its fraction of the codes as weight. A class with too few codes for its share (`fit_mixture`)
    leaves the rest at weight zero (they are never drawn and add nothing to the density)."""

    kind = "class_mixture"

    @torch.no_grad()
    def fit(self, codes: torch.Tensor, seed: int = 0, iterations: int = 100, tol: float = 1e-3,
            max_points: int = 20_000, labels: torch.Tensor | None = None, **_) -> dict:
        if labels is None or len(labels) != len(codes):
            raise ValueError("class_mixture: needs one training label per code")
        if len(codes) > max_points:
            keep = torch.randperm(len(codes), generator=torch.Generator().manual_seed(seed))[:max_points]
            codes, labels = codes[keep.to(codes.device)], labels[keep.to(labels.device)]
        labels = labels.to(codes.device)
        classes, counts = labels.unique(return_counts=True)
        if len(classes) > self.components:
            raise ValueError(f"class_mixture: {self.components} components for {len(classes)} classes; "
                             "expected vae.prior_components >= the number of classes")
        share = torch.full((len(classes),), self.components // len(classes))
        share[counts.argsort(descending=True, stable=True)[:self.components % len(classes)].cpu()] += 1
        d = self.latent_dim
        log_weights = torch.full((self.components,), -math.inf, device=codes.device)
        means = torch.zeros(self.components, d, device=codes.device)
        tril = torch.eye(d, device=codes.device).repeat(self.components, 1, 1)
        at, steps = 0, 0
        for index, (label, count, k) in enumerate(zip(classes, counts, share.tolist())):
            weights, m, t, _, step = fit_mixture(codes[labels == label], k, seed + index, iterations, tol)
            used = len(weights)  # fewer than k when the class has fewer codes than that
            log_weights[at:at + used] = weights.log() + math.log(float(count) / len(codes))
            means[at:at + used], tril[at:at + used] = m, t
            at, steps = at + k, max(steps, step)
        self.log_weights.copy_(log_weights)
        self.means.copy_(means)
        self.scale_tril.copy_(tril)
        log_lik = float(self.log_prob(codes.float()).mean())
        return {"prior_fit_log_lik": log_lik, "prior_fit_iterations": steps,
                "prior_fit_components": int(torch.isfinite(log_weights).sum())}


def _mixture_log_prob(x, log_weights, means, tril, chunk: int = 8192) -> torch.Tensor:
    """N x K: log w_k + log N(x_n; mean_k, L_k L_k^T)."""
    d = x.shape[1]
    half_log_det = tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)  # K
    eye = torch.eye(d, dtype=x.dtype, device=x.device).expand_as(tril)
    whiten = torch.linalg.solve_triangular(tril, eye, upper=False).transpose(1, 2)  # K x d x d: L_k^-T
    shift = (means[:, None, :] @ whiten)  # K x 1 x d
    out = []
    for start in range(0, len(x), chunk):
        solved = x[None, start:start + chunk] @ whiten - shift  # K x n x d: L_k^-1 (x - mean_k)
        out.append((log_weights - half_log_det)[:, None] - 0.5 * (solved.pow(2).sum(-1) + d * math.log(2 * math.pi)))
    return torch.cat(out, dim=1).T


CODES_PER_DIM = 3  # codes a component needs per latent dimension (see fit_mixture)


def fit_mixture(codes: torch.Tensor, k: int, seed: int = 0, iterations: int = 100, tol: float = 1e-3,
                reg: float = 1e-4, chunk: int = 8192):
    """EM for a full-covariance Gaussian mixture (on the codes' device).

    At most one component per CODES_PER_DIM * d codes: a full covariance has d (d + 3) / 2 parameters, and
    with fewer codes EM fits each component to its few points (a small folder: 200 codes of a class in 32
    dimensions, 6 components score a worse held-out likelihood than 1; tests/unit/test_priors.py).

    Starts from k-means (k-means++ seeding, then Lloyd's iterations): each component begins as the
    mean, covariance and share of one cluster. (Starting every component from the codes' overall
    covariance lets each one span several clusters, and EM stalls there.) Stops when the mean
    log-likelihood gains less than `tol` nats per point. Each covariance is shrunk towards the codes'
    covariance by one pseudo-point (so a component that loses its points stays a proper Gaussian) and
    gets `reg` on its diagonal. Returns (weights, means, scale_tril, mean log-likelihood, iterations)."""
    x = codes.detach().float()
    n, d = x.shape
    k = max(1, min(k, n // (CODES_PER_DIM * d)))
    gen = torch.Generator().manual_seed(seed)
    eye = torch.eye(d, dtype=torch.float64, device=x.device)
    spread = torch.cov(x.T).double().reshape(d, d) if n > 1 else torch.zeros_like(eye)  # one code: no spread
    overall = spread + reg * eye
    center = x.mean(0)  # second moments about the mean: float32 keeps its precision
    start = nn.functional.one_hot(kmeans(x, k, gen, chunk=chunk), k).to(x.dtype)
    log_weights, means, tril = _m_step(x, start, center, overall, reg, chunk)
    previous, log_lik, step = -math.inf, -math.inf, 0
    for step in range(1, iterations + 1):
        log_r = _mixture_log_prob(x, log_weights, means, tril, chunk)
        norm = log_r.logsumexp(1, keepdim=True)
        log_lik = float(norm.mean())
        log_weights, means, tril = _m_step(x, (log_r - norm).exp(), center, overall, reg, chunk)
        if log_lik - previous < tol:
            break
        previous = log_lik
    return log_weights.exp(), means, tril, log_lik, step


def _m_step(x, r, center, overall, reg: float, chunk: int):
    """Weights, means and scale_tril from responsibilities r (n x k), covariances shrunk to `overall`."""
    n, d = x.shape
    nk = r.sum(0) + 1e-10
    means = (r.T @ x) / nk[:, None]
    second = torch.zeros(r.shape[1], d, d, dtype=x.dtype, device=x.device)
    for start in range(0, n, chunk):
        xs, rs = x[start:start + chunk] - center, r[start:start + chunk]
        second += (rs.T[:, :, None] * xs[None]).transpose(1, 2) @ xs
    shifted = (means - center).double()
    scatter = second.double() - nk.double()[:, None, None] * shifted[:, :, None] * shifted[:, None, :]
    cov = (scatter + overall) / (nk.double()[:, None, None] + 1) + reg * torch.eye(d, dtype=torch.float64,
                                                                                   device=x.device)
    tril = torch.linalg.cholesky(0.5 * (cov + cov.transpose(1, 2))).float()
    return (nk / n).log(), means, tril


def kmeans(x: torch.Tensor, k: int, generator: torch.Generator, iterations: int = 20,
           chunk: int = 8192) -> torch.Tensor:
    """Cluster index per row of x: k-means++ seeding (Arthur & Vassilvitskii 2007), then Lloyd's
    iterations; the draws come from the CPU `generator`, so a seed gives the same clusters anywhere."""
    n = len(x)
    centers = x[torch.randint(n, (1,), generator=generator).to(x.device)].clone()
    closest = (x - centers[0]).pow(2).sum(1)
    for _ in range(1, k):
        weights = closest.double().cpu()
        pick = (torch.multinomial(weights / weights.sum(), 1, generator=generator) if weights.sum() > 0
                else torch.randint(n, (1,), generator=generator))
        centers = torch.cat([centers, x[pick.to(x.device)]])
        closest = torch.minimum(closest, (x - centers[-1]).pow(2).sum(1))
    for _ in range(iterations):
        assign = _nearest(x, centers, chunk)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centers).index_add_(0, assign, x)
        moved = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centers)  # empty: stays
        if torch.equal(moved, centers):
            return assign  # converged: the assignment to these centers is the one just made
        centers = moved
    return _nearest(x, centers, chunk)


def _nearest(x: torch.Tensor, centers: torch.Tensor, chunk: int) -> torch.Tensor:
    return torch.cat([torch.cdist(x[i:i + chunk], centers).argmin(1) for i in range(0, len(x), chunk)])


class TwoStagePrior(nn.Module):
    """A second VAE over the first stage's codes (Dai & Wipf 2019): MLP encoder z -> q(u | z),
    MLP decoder u -> z with a learned variance gamma per dimension (one scalar, as in the paper, stays
    near 1 when some of the first stage's dimensions are unused noise). Samples are z = decoder(u) + sqrt(gamma) e,
    u, e ~ N(0, I): the density `log_prob` bounds (Dai & Wipf take the mean; the same once gamma -> 0)."""

    kind = "two_stage"

    def __init__(self, latent_dim: int, width: int):
        super().__init__()
        self.latent_dim = latent_dim
        d, w = latent_dim, width
        self.encoder = nn.Sequential(nn.Linear(d, w), nn.SiLU(), nn.Linear(w, w), nn.SiLU(), nn.Linear(w, 2 * d))
        self.decoder = nn.Sequential(nn.Linear(d, w), nn.SiLU(), nn.Linear(w, w), nn.SiLU(), nn.Linear(w, d))
        self.log_gamma = nn.Parameter(torch.zeros(d))

    def sample(self, n: int, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
        u = _noise((n, self.latent_dim), generator, self.log_gamma.device)
        e = _noise((n, self.latent_dim), generator, self.log_gamma.device)
        return (self.decoder(u) + e * (0.5 * self.log_gamma.clamp(min=-12)).exp()).to(device)

    def losses(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-code negative ELBO of the second stage in nats (a Gaussian decoder with variance gamma)."""
        mu, logvar = self.encoder(z).chunk(2, dim=-1)
        logvar = logvar.clamp(-20, 10)
        u = mu + _noise(mu.shape, generator, mu.device) * (0.5 * logvar).exp()
        gamma_log = self.log_gamma.clamp(min=-12)
        nll = 0.5 * ((z - self.decoder(u)).pow(2) * (-gamma_log).exp() + gamma_log + math.log(2 * math.pi)).sum(-1)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(-1)
        return nll + kl

    def log_prob(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A lower bound (the second stage's ELBO, one sample) on log p(z)."""
        return -self.losses(z, generator)

    def fit(self, codes: torch.Tensor, seed: int = 0, epochs: int = 20, batch_size: int = 512,
            lr: float = 1e-3, **_) -> dict:
        gen = torch.Generator().manual_seed(seed)
        with torch.enable_grad():
            self.train()
            optimizer = torch.optim.Adam(self.parameters(), lr=lr)
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
            x = codes.detach().float()
            for _ in range(epochs):
                order = torch.randperm(len(x), generator=gen).to(x.device)
                total = 0.0
                for start in range(0, len(x), batch_size):
                    loss = self.losses(x[order[start:start + batch_size]], gen).mean()
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    total += float(loss.detach()) * len(order[start:start + batch_size])
                schedule.step()
            self.eval()
        return {"prior_fit_loss": total / len(x), "prior_gamma_min": float(self.log_gamma.detach().exp().min()),
                "prior_gamma_max": float(self.log_gamma.detach().exp().max())}


@torch.no_grad()
def posterior_codes(vae, images: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator,
                    batch_size: int = 1000) -> torch.Tensor:
    """One z ~ q(z | x) per image (uint8 N x C x H x W): a sample of the aggregate posterior."""
    was_training = vae.training
    vae.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].float().div(255)
        y = labels[start:start + batch_size] if labels is not None else None
        mu, logvar = vae.encode(x, y)
        out.append(mu + _noise(mu.shape, generator, mu.device) * (0.5 * logvar).exp())
    vae.train(was_training)
    return torch.cat(out).float()


# vae.prior -> the prior it builds, from (latent_dim, components, width); config.VAEConfig.prior lists the same names.
PRIORS: dict[str, Callable[[int, int, int], nn.Module]] = {
    StandardPrior.kind: lambda latent_dim, components, width: StandardPrior(latent_dim),
    MixturePrior.kind: lambda latent_dim, components, width: MixturePrior(latent_dim, components),
    ClassMixturePrior.kind: lambda latent_dim, components, width: ClassMixturePrior(latent_dim, components),
    TwoStagePrior.kind: lambda latent_dim, components, width: TwoStagePrior(latent_dim, width),
}
