"""The metrics on real Fashion-MNIST with a (briefly) trained feature net and VAE."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from imagegen.config import Config, with_overrides
from imagegen.data.fetch import run_fetch
from imagegen.data.prepare import run_prepare
from imagegen.errors import ImagegenError
from imagegen.evaluation import metrics as m
from imagegen.evaluation.features import embed, load_features, run_train_features
from imagegen.evaluation.vae_metrics import vae_test_metrics
from imagegen.models.vae import VAE, negative_elbo
from imagegen.data.arrays import load_split
from imagegen.models.description import ModelDescription
from tests.helpers import CLASSES, make_model, mark_validated, needs_fashion_mnist

pytestmark = [pytest.mark.slow,
              needs_fashion_mnist]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Prepared real data and a feature net trained for one epoch on 6000 images."""
    root = tmp_path_factory.mktemp("eval")
    cfg = with_overrides(Config(), {"train.limit": 6000, "train.threads": 1, "features.epochs": 1})
    run_fetch(cfg, root)
    run_prepare(cfg, root)
    mark_validated(root)
    torch.set_num_threads(2)
    run_train_features(cfg, root)
    return root


@pytest.fixture(scope="module")
def test_split(root):
    return load_split(root / "data/prepared/test.npz")


def test_feature_net_learns_the_classes(root):
    accuracy = json.loads((root / "metrics/features.json").read_text())["test_accuracy"]
    assert accuracy > 0.75
    _, meta, reference = load_features(root)
    assert reference["features"].shape == (10000, meta.arch["feature_dim"])


def test_fid_is_small_for_test_halves_and_grows_with_noise(root, test_split):
    net, _, _ = load_features(root)
    images, _ = test_split
    halves = [embed(net, half)[0] for half in (images[:5000], images[5000:])]
    baseline = m.fid(*halves)
    rng = np.random.default_rng(0)
    noisy = []
    for sigma in (10, 25, 50, 100):
        corrupted = np.clip(images[:5000] + rng.normal(0, sigma, images[:5000].shape), 0, 255).astype(np.uint8)
        noisy.append(m.fid(embed(net, corrupted)[0], halves[1]))
    assert noisy == sorted(noisy), noisy
    assert baseline < noisy[0] / 2, (baseline, noisy)
    kid_mean, kid_std = m.kid(*halves, subsets=20, subset_size=1000)
    assert abs(kid_mean) < 3 * kid_std


def test_precision_recall_fall_for_a_mode_dropped_set(root, test_split):
    net, _, _ = load_features(root)
    images, labels = test_split
    reference = embed(net, images[5000:])[0]
    full = m.precision_recall(embed(net, images[:5000])[0], reference)
    dropped = m.precision_recall(embed(net, images[:5000][labels[:5000] < 3])[0], reference)
    assert dropped[0] == pytest.approx(full[0], abs=0.05), (full, dropped)  # what it draws is still real
    # k-NN recall is generous (a few wide balls cover much of the space): a clear fall, not 30 %.
    assert dropped[1] < full[1] - 0.1, (full, dropped)


@pytest.fixture(scope="module")
def vae(root):
    """A VAE trained for two epochs on 6000 images: enough for a meaningful posterior."""
    images, _ = load_split(root / "data/prepared/train.npz", 6000)
    torch.manual_seed(0)
    model = VAE(latent_dim=8, width=16)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    x_all = torch.from_numpy(images).float().div(255)
    for _ in range(2):
        for batch in x_all[torch.randperm(len(x_all))].split(100):
            logits, mu, logvar = model(batch)
            loss = negative_elbo(logits, batch, mu, logvar)[0].mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def test_iwae_bound_is_at_least_the_elbo_and_tightens_with_k(vae, test_split):
    images, labels = test_split[0][:300], test_split[1][:300]
    by_k = {k: vae_test_metrics(vae, images, labels, k, seed=1) for k in (1, 8, 64)}
    assert by_k[1]["nll_iwae"] == pytest.approx(by_k[1]["nelbo"], rel=0.01)  # equal in expectation at k = 1
    assert by_k[64]["nll_iwae"] < by_k[8]["nll_iwae"] < by_k[1]["nll_iwae"]
    assert by_k[64]["nll_iwae"] <= by_k[64]["nelbo"]
    assert by_k[64]["recon_bce"] < by_k[64]["nelbo"]


def test_a_fitted_prior_leaves_the_first_stage_numbers_and_bounds_its_own_likelihood(vae, root, test_split):
    """The mixture prior fitted to the training codes (as train-vae does) changes where samples start,
    not the first stage's nelbo / nll_iwae; and as it approximates the aggregate posterior (the best
    prior for these encoder and decoder), the model it defines gives the test images more likelihood."""
    import copy

    from imagegen.evaluation.sampling import generate
    from imagegen.models.priors import build_prior, posterior_codes

    images, labels = test_split[0][:300], test_split[1][:300]
    plain = vae_test_metrics(vae, images, labels, 16, seed=1)
    train_images, _ = load_split(root / "data/prepared/train.npz", 6000)
    codes = posterior_codes(vae, torch.from_numpy(train_images), None, torch.Generator().manual_seed(0))
    fitted = copy.deepcopy(vae)
    fitted.prior = build_prior("mixture", 8, components=16)
    fitted.prior.fit(codes)
    with_prior = vae_test_metrics(fitted, images, labels, 16, seed=1)
    assert {k: with_prior[k] for k in plain} == plain
    assert with_prior["nll_iwae_prior"] < plain["nll_iwae"]
    meta = ModelDescription("vae", {"latent_dim": 8})
    assert (generate(fitted, meta, 50, seed=0) != generate(vae, meta, 50, seed=0)).any()


def test_evaluate_samples_file_scores_like_the_stage_and_refuses_bad_files(root, test_split, tmp_path):
    (root / "params.yaml").write_text("train:\n  device: cpu\neval:\n  kid_subsets: 5\n")
    good = tmp_path / "good.npy"
    np.save(good, test_split[0][:2000])
    run = [sys.executable, "-m", "imagegen.cli", "evaluate", "--samples"]
    result = subprocess.run([*run, str(good)], cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout[:result.stdout.rindex("}") + 1])
    assert scores["n_samples"] == 2000 and scores["fid"] < 1.0 and scores["precision"] > 0.5
    bad = tmp_path / "bad.npy"
    np.save(bad, np.full((2000, 28, 28), np.nan, dtype=np.float32))
    result = subprocess.run([*run, str(bad)], cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"imagegen evaluate: error: {bad}: 1568000 values are NaN or infinite"]


def test_inception_fid_loads_only_matching_weights(tmp_path, test_split):
    from imagegen.evaluation.inception import InceptionFID, fid_inception, inception_features

    weights = tmp_path / "pt_inception.pth"
    from torchvision.models import inception as tv

    # A state dict with the pt_inception layout (torchvision names, 1008 classes), random values.
    torch.save(tv.Inception3(num_classes=1008, aux_logits=False, init_weights=True).state_dict(), weights)
    net = fid_inception(weights)
    features = inception_features(net, test_split[0][:4], "cpu")
    assert features.shape == (4, 2048) and np.isfinite(features).all()
    scorer = InceptionFID(weights, test_split[0][:8], "cpu")
    assert abs(scorer.fid(test_split[0][:8])) < 1e-3 * scorer.fid(test_split[0][8:16])
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ImagegenError, match=r"other\.pth: not pt_inception-2015-12-05 weights \(\d+ missing keys "
                       r"\(Conv2d_1a_3x3\.conv\.weight, .*, \+\d+ more\); 1 unexpected key \(conv\.weight\)\)$"):
        fid_inception(tmp_path / "other.pth")
    (tmp_path / "other.pth").write_text("text")
    with pytest.raises(ImagegenError, match=r"weights \(damaged or not a PyTorch file\)$"):
        fid_inception(tmp_path / "other.pth")


def test_evaluate_stage_writes_metrics_pictures_and_an_mlflow_run(root, monkeypatch):
    from mlflow.tracking import MlflowClient

    from imagegen.evaluation.stage import run_evaluate

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    make_model(root / "models/gan", "gan", seed=0, conditional=True)  # per-class accuracy too
    make_model(root / "models/vae", "vae", seed=0)
    cfg = with_overrides(Config(), {"eval.n_samples": 1000, "eval.kid_subsets": 5, "eval.iwae_k": 4,
                                    "eval.iwae_images": 100, "eval.inception_weights": str(root / "absent.pth")})
    metrics = run_evaluate(cfg, root).metrics
    assert metrics == json.loads((root / "metrics/evaluate.json").read_text())
    for kind in ("gan", "vae"):
        assert {"fid", "fid_std", "kid_mean", "kid_std", "precision", "recall", "class_entropy",
                "min_class_ratio"} <= metrics[kind].keys()
        assert 0 < metrics[kind]["fid_std"] < metrics[kind]["fid"] / 2
        assert metrics[kind]["fid"] > 10 * metrics["reference"]["fid_train_vs_test"]  # untrained vs real data
    assert set(metrics["gan"]["class_accuracy"]) == {*CLASSES, "mean"}
    assert metrics["vae"]["nll_iwae"] <= metrics["vae"]["nelbo"] + 1.0 and metrics["vae"]["iwae_k"] == 4
    assert "fid_inception" not in metrics["gan"]  # the configured weights file does not exist: skipped
    pictures = sorted(p.name for p in (root / "reports/evaluate").iterdir())
    assert pictures == ["gan-classes.png", "gan-interpolations.png", "gan-samples.png", "gan-vs-vae.png",
                        "vae-interpolations.png", "vae-reconstructions.png", "vae-samples.png"]

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("imagegen-fashion-mnist")
    (run,) = client.search_runs([experiment.experiment_id], "attributes.run_name = 'evaluate'")
    assert run.data.metrics["gan/fid"] == pytest.approx(metrics["gan"]["fid"])
    assert run.data.metrics["vae/nll_iwae"] == pytest.approx(metrics["vae"]["nll_iwae"])
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "evaluate")}
    assert logged == {f"evaluate/{name}" for name in pictures}
    assert run.inputs.dataset_inputs[0].dataset.name == "fashion-mnist-prepared"
    assert run.data.tags["gan_weights_sha256"] == hashlib.sha256((root / "models/gan/weights.pt").read_bytes()).hexdigest()
    # the run spans the stage: it was open while the samples were drawn and scored
    assert (run.info.end_time - run.info.start_time) / 1000 >= metrics["seconds"]
    (features,) = client.search_runs([experiment.experiment_id], "attributes.run_name = 'train-features'")
    assert [m.step for m in client.get_metric_history(features.info.run_id, "test_accuracy")] == [1]
