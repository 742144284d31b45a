"""The VAE's priors: densities against closed forms, fits that find known structure, shapes, and
model folders written before priors existed."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

from imagegen.evaluation.sampling import generate
from imagegen.models.description import ModelDescription
from imagegen.models.io import load_model, save_model
from imagegen.models.priors import (
    ClassMixturePrior,
    MixturePrior,
    StandardPrior,
    TwoStagePrior,
    build_prior,
    fit_mixture,
)
from imagegen.models.vae import VAE


def two_clusters(n: int = 3000, d: int = 3, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(3 * n // 4, d, generator=gen) * 0.3 + 2
    b = torch.randn(n // 4, d, generator=gen) * 0.5 - 1
    return torch.cat([a, b])


def random_mixture(d: int = 3, k: int = 4, seed: int = 0) -> MixturePrior:
    gen = torch.Generator().manual_seed(seed)
    prior = MixturePrior(d, k)
    prior.log_weights.copy_(torch.randn(k, generator=gen).log_softmax(0))
    prior.means.copy_(torch.randn(k, d, generator=gen) * 2)
    tril = torch.randn(k, d, d, generator=gen).tril(-1) * 0.5
    prior.scale_tril.copy_(tril + torch.diag_embed(torch.rand(k, d, generator=gen) + 0.3))
    return prior


def test_standard_prior_is_the_unit_gaussian_and_draws_as_before():
    prior = StandardPrior(4)
    z = torch.randn(10, 4)
    expected = MultivariateNormal(torch.zeros(4), torch.eye(4)).log_prob(z)
    assert torch.allclose(prior.log_prob(z), expected, atol=1e-5)
    # Old models' images for a seed must not change: the same draws as torch.randn with that generator.
    assert torch.equal(prior.sample(5, torch.Generator().manual_seed(3)),
                       torch.randn(5, 4, generator=torch.Generator().manual_seed(3)))


def test_mixture_log_prob_matches_the_closed_form():
    prior = random_mixture()
    z = torch.randn(50, 3) * 3
    w, m, tril = prior.log_weights.exp(), prior.means, prior.scale_tril
    reference = MixtureSameFamily(Categorical(probs=w), MultivariateNormal(m, scale_tril=tril))
    assert torch.allclose(prior.log_prob(z), reference.log_prob(z), atol=1e-4)
    assert prior.log_prob(z.reshape(5, 10, 3)).shape == (5, 10)


def test_one_dimensional_mixture_density_integrates_to_one():
    prior = random_mixture(d=1, k=3, seed=1)
    grid = torch.linspace(-20, 20, 40_001)[:, None]
    mass = torch.trapezoid(prior.log_prob(grid).exp(), grid[:, 0])
    assert float(mass) == pytest.approx(1.0, abs=1e-4)


def test_mixture_fit_recovers_two_clusters_and_samples_like_them():
    codes = two_clusters()
    weights, means, _, log_lik, steps = fit_mixture(codes, 2, seed=0)
    order = means[:, 0].argsort(descending=True)
    assert torch.allclose(weights[order], torch.tensor([0.75, 0.25]), atol=0.02)
    assert torch.allclose(means[order], torch.tensor([[2.0] * 3, [-1.0] * 3]), atol=0.1)
    assert 1 < steps <= 100 and math.isfinite(log_lik)
    prior = MixturePrior(3, 2)
    prior.fit(codes)
    draws = prior.sample(20_000, torch.Generator().manual_seed(0))
    assert draws.shape == (20_000, 3)
    assert float((draws[:, 0] > 0.5).float().mean()) == pytest.approx(0.75, abs=0.02)
    # The fitted density prefers the codes to points of the holes between the clusters.
    assert float(prior.log_prob(codes).mean()) > float(prior.log_prob(torch.full((10, 3), 0.5)).mean()) + 5


def test_mixture_fit_puts_a_component_on_each_separated_cluster():
    """Two tight clumps and three components: a start from the codes' overall covariance let all three
    span both clumps (EM stalled at a mean log-likelihood of -2.75); the k-means start finds both."""
    gen = torch.Generator().manual_seed(0)
    codes = torch.cat([torch.randn(750, 2, generator=gen) * 0.3 + torch.tensor([-3.0, 0.0]),
                       torch.randn(750, 2, generator=gen) * 0.3 + torch.tensor([3.0, 0.0])])
    weights, means, tril, log_lik, _ = fit_mixture(codes, 3, seed=0)
    for clump in (-3.0, 3.0):
        near = (means[:, 0] - clump).abs() < 0.5
        assert near.any() and float(weights[near].sum()) == pytest.approx(0.5, abs=0.01)
    assert log_lik > -1.3  # the truth: ln N at sd 0.3 in 2-D (-0.43 on average) + ln 1/2 = -1.12 per point
    assert (tril.diagonal(dim1=1, dim2=2) < 0.5).all()


def labelled_clusters(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0: 1500 codes in two clumps (left and right); class 1: 500 codes around the origin,
    overlapping neither; class 2: 4 codes only."""
    gen = torch.Generator().manual_seed(seed)
    left = torch.randn(750, 2, generator=gen) * 0.3 + torch.tensor([-3.0, 0.0])
    right = torch.randn(750, 2, generator=gen) * 0.3 + torch.tensor([3.0, 0.0])
    middle = torch.randn(500, 2, generator=gen) * 0.3
    few = torch.randn(4, 2, generator=gen) * 0.3 + torch.tensor([0.0, 4.0])
    labels = torch.cat([torch.zeros(1500), torch.ones(500), torch.full((4,), 2)]).long()
    return torch.cat([left, right, middle, few]), labels


def test_class_mixture_gives_each_class_its_components_and_share():
    codes, labels = labelled_clusters()
    prior = ClassMixturePrior(2, components=8)
    metrics = prior.fit(codes, labels=labels)
    weights = prior.log_weights.exp()
    # 8 components over 3 classes: 3 / 3 / 2, the larger classes first; each class's block of
    # components carries its share of the codes.
    assert float(weights[:3].sum()) == pytest.approx(1500 / 2004, abs=1e-5)
    assert float(weights[3:6].sum()) == pytest.approx(500 / 2004, abs=1e-5)
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-5)
    assert math.isfinite(metrics["prior_fit_log_lik"]) and metrics["prior_fit_iterations"] >= 1
    # Class 0's components sit on its two clumps, none in the middle (that is class 1's).
    assert (prior.means[:3, 0].abs() > 1).sum() >= 2
    assert (prior.means[3:6, 0].abs() < 1).all()
    # The density is the mixture's closed form over the components in use.
    used = weights > 0
    reference = MixtureSameFamily(Categorical(probs=weights[used]),
                                  MultivariateNormal(prior.means[used], scale_tril=prior.scale_tril[used]))
    z = torch.randn(40, 2) * 3
    assert torch.allclose(prior.log_prob(z), reference.log_prob(z), atol=1e-4)
    # Draws: 2-D shape, each class's region in proportion to its share.
    draws = prior.sample(20_000, torch.Generator().manual_seed(0))
    assert draws.shape == (20_000, 2)
    middle = (draws[:, 0].abs() < 1.5) & (draws[:, 1] < 2)
    assert float(middle.float().mean()) == pytest.approx(500 / 2004, abs=0.02)


def test_class_mixture_with_a_tiny_class_leaves_unused_components_at_weight_zero():
    codes, labels = labelled_clusters()
    prior = ClassMixturePrior(2, components=30)  # class 2 gets 10 components but its 4 codes fit one
    prior.fit(codes, labels=labels)
    weights = prior.log_weights.exp()
    assert int((weights == 0).sum()) == 9 and float(weights.sum()) == pytest.approx(1.0, abs=1e-5)
    # It is still one proper density: it has finite values, and so do its draws and their density.
    assert torch.isfinite(prior.log_prob(torch.randn(100, 2))).all()
    # A class of a single code still gets a proper (narrow) Gaussian.
    single = ClassMixturePrior(2, components=4)
    single.fit(torch.cat([codes[:1500], codes[-1:]]), labels=torch.cat([labels[:1500], labels[-1:]]))
    lone = single.log_weights.exp()  # 2 + 2 components; the single code uses one, the other stays at 0
    assert torch.isfinite(single.scale_tril).all() and float(lone[2]) == pytest.approx(1 / 1501) and lone[3] == 0
    draws = prior.sample(10_000, torch.Generator().manual_seed(0))
    assert torch.isfinite(draws).all() and torch.isfinite(prior.log_prob(draws)).all()


def gaussian_clusters(n: int, d: int = 32, seed: int = 0) -> torch.Tensor:
    """n codes from three fixed, well-spread full-covariance Gaussians in d dimensions (seed: the draw)."""
    truth = torch.Generator().manual_seed(123)
    means = torch.randn(3, d, generator=truth) * 2
    mixing = torch.randn(3, d, d, generator=truth) / math.sqrt(d)
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randint(3, (n,), generator=gen)
    return means[pick] + (mixing[pick] @ torch.randn(n, d, 1, generator=gen)).squeeze(-1)


@pytest.mark.parametrize("n", [100, 200])
def test_few_codes_get_few_components_and_a_better_held_out_likelihood(n):
    """A small folder's class: 100-200 codes in 32 dimensions. Six full-covariance components (the default
    share per class) would each fit their few points; the fit keeps one per 96 codes, and the held-out
    codes score at least as well as under a single Gaussian."""
    codes, held_out = gaussian_clusters(n), gaussian_clusters(5000, seed=1)
    asked = MixturePrior(32, 6)
    stats = asked.fit(codes)
    single = MixturePrior(32, 1)
    single.fit(codes)
    assert stats["prior_fit_components"] == n // 96 and int(torch.isfinite(asked.log_weights).sum()) == n // 96
    assert float(asked.log_prob(held_out).mean()) >= float(single.log_prob(held_out).mean()) - 1e-3
    assert torch.isfinite(asked.log_prob(asked.sample(100, torch.Generator().manual_seed(0)))).all()


def test_many_codes_keep_every_component_asked_for():
    prior = MixturePrior(32, 6)
    assert prior.fit(gaussian_clusters(3000))["prior_fit_components"] == 6


def test_class_mixture_one_dimensional_density_integrates_to_one():
    gen = torch.Generator().manual_seed(2)
    codes = torch.cat([torch.randn(300, 1, generator=gen) - 2, torch.randn(100, 1, generator=gen) * 0.5 + 3])
    prior = ClassMixturePrior(1, components=4)
    prior.fit(codes, labels=torch.cat([torch.zeros(300), torch.ones(100)]).long())
    grid = torch.linspace(-20, 20, 40_001)[:, None]
    assert float(torch.trapezoid(prior.log_prob(grid).exp(), grid[:, 0])) == pytest.approx(1.0, abs=1e-4)


def test_class_mixture_refuses_missing_labels_and_too_few_components():
    codes, labels = labelled_clusters()
    with pytest.raises(ValueError, match="needs one training label per code"):
        ClassMixturePrior(2, components=8).fit(codes)
    with pytest.raises(ValueError, match="2 components for 3 classes"):
        ClassMixturePrior(2, components=2).fit(codes, labels=labels)


def test_two_stage_maps_noise_to_codes_of_the_first_stage_shape():
    torch.manual_seed(0)
    codes = two_clusters(n=1200, d=4)
    prior = TwoStagePrior(4, width=32)
    with torch.no_grad():
        gap_before = (prior.sample(4000, torch.Generator().manual_seed(0)).mean(0) - codes.mean(0)).norm()
        before = float(prior.losses(codes, torch.Generator().manual_seed(1)).mean())
    metrics = prior.fit(codes, epochs=10, batch_size=128)
    with torch.no_grad():
        after = float(prior.losses(codes, torch.Generator().manual_seed(1)).mean())
    assert after < before and 0 < metrics["prior_gamma_min"] <= metrics["prior_gamma_max"]
    with torch.no_grad():
        draws = prior.sample(4000, torch.Generator().manual_seed(0))
    assert draws.shape == (4000, 4)  # u ~ N(0, I) decoded to the first stage's latent shape
    assert (draws.mean(0) - codes.mean(0)).norm() < 0.75 * gap_before  # it moved its mass to the codes
    # Its log_prob is a bound: finite, per code.
    assert prior.log_prob(codes[:7], torch.Generator().manual_seed(0)).shape == (7,)


@pytest.mark.parametrize("kind", ["standard", "mixture", "class_mixture", "two_stage"])
def test_vae_with_each_prior_saves_loads_and_samples_the_same_images(tmp_path, kind):
    torch.manual_seed(0)
    vae = VAE(latent_dim=3, width=4, prior=kind, prior_components=2, prior_width=16).eval()
    if kind != "standard":
        vae.prior.fit(two_clusters(n=400, d=3), epochs=1, labels=(torch.arange(400) >= 300).long())
    arch = {"latent_dim": 3, "width": 4, "prior": kind, "prior_components": 2, "prior_width": 16}
    meta = ModelDescription("vae", arch, 0, tuple(str(i) for i in range(10)))
    save_model(tmp_path, vae, meta)
    loaded, loaded_meta = load_model(tmp_path)
    assert type(loaded.prior).__name__ == type(vae.prior).__name__
    assert (generate(loaded, loaded_meta, 6, seed=2) == generate(vae, meta, 6, seed=2)).all()
    assert (generate(loaded, loaded_meta, 6, seed=2) != generate(loaded, loaded_meta, 6, seed=3)).any()


def test_vae_folder_from_before_priors_loads_and_samples_as_it_did(tmp_path):
    """A model.json without prior keys (VAEs trained before) is an N(0, I) VAE with the same images."""
    torch.manual_seed(0)
    vae = VAE(latent_dim=3, width=4).eval()
    arch = {"latent_dim": 3, "width": 4}
    save_model(tmp_path, vae, ModelDescription("vae", arch))
    assert "prior" not in json.loads((tmp_path / "model.json").read_text())["arch"]
    assert not any(k.startswith("prior") for k in torch.load(tmp_path / "weights.pt", weights_only=True))
    loaded, meta = load_model(tmp_path)
    assert loaded.prior.kind == "standard"
    z = torch.randn(5, 3, generator=torch.Generator().manual_seed(9))  # what sampling drew before priors
    old = (torch.sigmoid(vae.decode(z)).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    assert (generate(loaded, meta, 5, seed=9) == old).all()


def test_unknown_prior_is_refused():
    with pytest.raises(ValueError, match="unknown prior 'vamp'"):
        build_prior("vamp", 4)


def test_params_offer_exactly_the_priors_there_are():
    import typing

    from imagegen.config import VAEConfig
    from imagegen.models.priors import PRIORS

    assert set(typing.get_args(VAEConfig.model_fields["prior"].annotation)) == set(PRIORS)
    assert all(build_prior(kind, 4, 10, 8).kind == kind for kind in PRIORS)


def test_train_vae_refuses_a_class_mixture_with_fewer_components_than_classes():
    """Before the epochs, not after: one line naming the field."""
    from imagegen.config import VAEConfig
    from imagegen.errors import ImagegenError
    from imagegen.training.tasks import VAETask

    cfg = VAEConfig(prior="class_mixture", prior_components=4, latent_dim=3, width=4)
    with pytest.raises(ImagegenError, match="vae.prior_components: 4 for 10 classes"):
        VAETask(cfg, 10, torch.device("cpu"))
    assert VAETask(cfg.model_copy(update={"prior": "mixture"}), 10, torch.device("cpu")).vae.latent_dim == 3
