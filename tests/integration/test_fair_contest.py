"""The fair contest and the warm start against a real MLflow store (embedded SQLite), with real models,
a real feature net and real test splits: the register stage re-scores the champion on today's test split
with today's feature net; train.init_from: champion starts training from the champion's weights."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient

from imagegen import tracking
from imagegen.config import load_config
from imagegen.data.integrity import HASH_KEY, RECORD
from imagegen.evaluation.features import FEATURES_DIR, REFERENCE, embed
from imagegen.evaluation.sampling import generate
from imagegen.evaluation.stage import Scorer, rounded
from imagegen.fsutil import sha256_file
from imagegen.models.description import ModelDescription
from imagegen.models.features import FeatureNet
from imagegen.models.io import load_model, save_model
from imagegen.registry_reader import load_registered
from imagegen.registry import run_register
from imagegen.training.tasks import GANTask, VAETask
from imagegen.training.warm import warm_start
from tests.conftest import set_params
from tests.helpers import CLASSES, make_model, make_project, mark_validated

pytestmark = pytest.mark.slow
GAN, VAE = "fashion-mnist-gan", "fashion-mnist-vae"


def data_version(root: Path, seed: int, md5: str, n_test: int, shape: tuple[int, int, int] = (1, 28, 28)) -> None:
    """A data version: prepared arrays (random images), the feature net trained on it (random weights from
    `seed`) with its test-split features, a validation record, and dvc.lock naming its DVC hash."""
    rng = np.random.default_rng(seed)
    folder = root / "data" / "prepared"
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 200), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
        np.savez(folder / f"{split}.npz", images=images, labels=np.arange(n, dtype=np.int64) % 10)
    torch.manual_seed(seed)
    net = FeatureNet(4, 16, 10, shape).eval()
    features = root / FEATURES_DIR
    if features.exists():
        shutil.rmtree(features)
    features.mkdir(parents=True)
    save_model(features, net, ModelDescription("features", {"width": 4, "feature_dim": 16}, 10, tuple(CLASSES),
                                               shape, dataset="fashion-mnist"))
    with np.load(folder / "test.npz") as test:
        np.savez(features / REFERENCE, features=embed(net, test["images"])[0].astype(np.float32),
                 labels=test["labels"])
    mark_validated(root)
    (root / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"prepare": {
        "outs": [{"path": "data/prepared", "md5": md5}]}}}))


def settings(root: Path, **train) -> None:
    set_params(root, eval={"n_samples": 1000, "kid_subsets": 2, "kid_subset_size": 100},
               train={"device": "cpu", "mlflow": True, **train})


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "project"
    mlflow.set_tracking_uri(tracking.embedded_uri(root))
    yield root
    mlflow.set_tracking_uri(None)


def write_fid(root: Path, fid: dict[str, float], fid_std: dict[str, float] | None = None) -> None:
    path = root / "metrics" / "evaluate.json"
    evaluation = json.loads(path.read_text())
    for kind, value in fid.items():
        evaluation[kind]["fid"] = value
    for kind, value in (fid_std or {}).items():
        evaluation[kind]["fid_std"] = value
    path.write_text(json.dumps(evaluation))


def test_register_rescores_the_champion_on_todays_test_split(root):
    # Week 1: v1 of each kind, champion with a recorded FID so low that no honest score beats it.
    make_project(root, seed=0, fid={"gan": 1e-9, "vae": 1e-9})
    data_version(root, seed=1, md5="week1.dir", n_test=100)
    settings(root)
    first = run_register(load_config(root / "params.yaml"), root).decisions
    assert first["gan"]["promoted"] and "champion_rescored" not in first["gan"]  # nothing to re-score
    week1_gan = root.parent / "week1-gan"
    shutil.copytree(root / "models" / "gan", week1_gan)

    # Week 2: more data (a larger test split), a new feature net, new models.
    make_project(root, seed=7, fid={"gan": 1.0, "vae": 1.0})
    data_version(root, seed=2, md5="week2.dir", n_test=300)
    settings(root)
    cfg = load_config(root / "params.yaml")
    champion, meta = load_model(week1_gan)  # what the champion scores today, computed independently
    today = Scorer.load(cfg, root, "cpu").score(generate(champion, meta, 1000, cfg.eval.seed))["fid"]
    write_fid(root, {"gan": round(today * 0.5, 5), "vae": 1e9})  # gan: better than the re-scored champion

    decisions = run_register(cfg, root).decisions
    gan, vae = decisions["gan"], decisions["vae"]
    assert gan["champion_rescored"] and vae["champion_rescored"]
    assert gan["champion_value"] == pytest.approx(today, abs=1e-5)  # re-scored today (rounded as evaluate rounds)
    assert gan["champion_value_recorded"] == 1e-9 and today > 1e-4
    assert gan["promoted"], gan  # against the recorded 0.001 it would have lost
    assert not vae["promoted"] and vae["champion_after"] == 1
    test_hash = json.loads((root / RECORD).read_text())[HASH_KEY]["test"]
    for entry in (gan, vae):
        assert entry["scored_on"] == {"data_version": "week2.dir", "test_sha256": test_hash,
                                      "features_sha256": sha256_file(root / FEATURES_DIR / "weights.pt")}
        assert entry["champion_data_version"] == "week1.dir" and entry["challenger_data_version"] == "week2.dir"
        assert "both scored on test split " + test_hash[:12] in entry["reason"]
    written = json.loads((root / "metrics" / "register.json").read_text())
    assert written["gan"]["champion_value"] == gan["champion_value"]

    version = MlflowClient().get_model_version(GAN, "2")
    assert float(version.tags["contest.champion_value"]) == pytest.approx(today, abs=1e-5)
    assert version.tags["contest.champion_data_version"] == "week1.dir"
    assert version.tags["contest.challenger_data_version"] == "week2.dir"
    assert version.tags["dvc_data_md5"] == "week2.dir"
    assert "Champion v1 re-scored today" in version.description


def test_a_gain_smaller_than_the_noise_of_both_scores_keeps_the_champion(root):
    """On a small test split FID moves by its bootstrap std: the champion falls only to a gain of more than
    register.sigmas standard deviations of the difference, whatever the relative margin says."""
    make_project(root, seed=0, fid={"gan": 1e-9, "vae": 1e-9})
    data_version(root, seed=1, md5="week1.dir", n_test=100)
    settings(root)
    run_register(load_config(root / "params.yaml"), root)
    week1 = {kind: shutil.copytree(root / "models" / kind, root.parent / f"week1-{kind}") for kind in ("gan", "vae")}
    make_project(root, seed=7, fid={"gan": 1.0, "vae": 1.0})
    data_version(root, seed=2, md5="week2.dir", n_test=150)
    settings(root)
    set_params(root, register={"margin": 0.0, "sigmas": 2.0})
    cfg = load_config(root / "params.yaml")
    scorer = Scorer.load(cfg, root, "cpu")
    today = {kind: rounded(scorer.score(generate(*load_model(folder), 1000, cfg.eval.seed)))  # as evaluate writes them
             for kind, folder in week1.items()}
    noise = {kind: 2 * math.hypot(s["fid_std"], s["fid_std"]) for kind, s in today.items()}  # the same std both sides
    assert all(n > 0 for n in noise.values())
    write_fid(root, {"gan": today["gan"]["fid"] - 0.5 * noise["gan"], "vae": today["vae"]["fid"] - 1.5 * noise["vae"]},
              {kind: s["fid_std"] for kind, s in today.items()})

    decisions = run_register(cfg, root).decisions
    gan, vae = decisions["gan"], decisions["vae"]
    assert gan["champion_rescored"] and not gan["promoted"] and gan["champion_after"] == 1, gan
    assert f"noise {noise['gan']:.3g}" in gan["reason"], gan["reason"]
    assert vae["promoted"] and vae["champion_after"] == 2, vae


def test_a_champion_of_another_image_shape_keeps_its_recorded_value(root):
    make_project(root, seed=0, fid={"gan": 5.0, "vae": 5.0})
    data_version(root, seed=1, md5="week1.dir", n_test=100)
    settings(root)
    run_register(load_config(root / "params.yaml"), root)  # v1: 28 x 28 grey champions
    for kind in ("gan", "vae"):  # week 2: the folder now holds 32 x 32 RGB images
        make_model(root / "models" / kind, kind, seed=7, image_shape=(3, 32, 32))
    data_version(root, seed=2, md5="week2.dir", n_test=100, shape=(3, 32, 32))
    write_fid(root, {"gan": 4.0, "vae": 6.0})
    decisions = run_register(load_config(root / "params.yaml"), root).decisions
    for kind, promoted in (("gan", True), ("vae", False)):  # against the recorded 5.0, not a crash
        assert not decisions[kind]["champion_rescored"] and decisions[kind]["champion_value"] == 5.0, decisions
        assert decisions[kind]["promoted"] is promoted, decisions


def test_warm_start_loads_the_champions_weights(root):
    make_project(root, seed=3, fid={"gan": 10.0, "vae": 10.0})
    data_version(root, seed=1, md5="week1.dir", n_test=100)
    settings(root, init_from="champion", warm_epochs_fraction=0.5)
    set_params(root, gan={"latent_dim": 8, "width": 4, "kernel_size": 4, "epochs": 4},
               vae={"latent_dim": 8, "width": 4, "epochs": 4, "prior": "standard"})
    cfg = load_config(root / "params.yaml")
    nothing = warm_start(cfg, "gan", GANTask(cfg.gan, 10, torch.device("cpu"), False, False), root)
    assert nothing["init_from"] == "none" and "no champion" in nothing["init_note"]  # nothing registered yet

    run_register(cfg, root)
    for kind, task in (("gan", GANTask(cfg.gan, 10, torch.device("cpu"), False, False)),
                       ("vae", VAETask(cfg.vae, 10, torch.device("cpu"), False, False))):
        fresh = {k: v.clone() for k, v in task.export().state_dict().items()}
        info = warm_start(cfg, kind, task, root)
        assert info["init_from"] == "champion" and info["init_version"] == 1, info
        registered, _ = load_registered(f"models:/fashion-mnist-{kind}@champion")
        expected = registered.state_dict()
        for module in ([task.generator, task.ema] if kind == "gan" else [task.vae]):
            got = module.state_dict()
            assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
        assert not all(torch.equal(fresh[k], expected[k]) for k in fresh)  # it really changed them

    wider = load_config(root / "params.yaml").model_copy(update={"gan": cfg.gan.model_copy(update={"width": 8})})
    other = warm_start(wider, "gan", GANTask(wider.gan, 10, torch.device("cpu"), False, False), root)
    assert other["init_from"] == "none" and "another architecture" in other["init_note"]
    deeper = VAETask(cfg.vae.model_copy(update={"decoder_blocks": 1}), 10, torch.device("cpu"), False, False)
    before = {k: v.clone() for k, v in deeper.vae.state_dict().items()}
    other = warm_start(cfg, "vae", deeper, root)  # its encoder would fit the champion's: nothing may be loaded
    assert other["init_from"] == "none" and "another architecture" in other["init_note"]
    assert all(torch.equal(before[k], v) for k, v in deeper.vae.state_dict().items())

    from imagegen.training.stage import run_train

    set_params(root, train={"mlflow": False})
    result = run_train(load_config(root / "params.yaml"), "gan", root)
    assert result.metrics["init_from"] == "champion" and result.metrics["init_version"] == 1
    assert result.metrics["epochs"] == 2  # half of gan.epochs after a warm start
