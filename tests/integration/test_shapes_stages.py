"""The stage functions on a 32 x 32 RGB prepared dataset (random arrays + dataset.json, tiny params):
train-features, train-gan, train-vae and evaluate make outputs of the dataset's shape."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from imagegen.config import Config
from imagegen.data.arrays import DatasetInfo, write_info
from imagegen.errors import ImagegenError
from tests.helpers import mark_validated
from tests.tiny import write_prepared

SHAPE = (3, 32, 32)
TINY = {
    "train": {"mlflow": False, "threads": 1, "seed": 1, "device": "cpu"},
    "gan": {"epochs": 1, "batch_size": 16, "latent_dim": 8, "width": 4},
    "vae": {"epochs": 1, "batch_size": 16, "latent_dim": 4, "width": 4, "prior": "mixture", "prior_components": 2},
    "features": {"epochs": 1, "batch_size": 16, "width": 4, "feature_dim": 8},
    "eval": {"n_samples": 1000, "kid_subsets": 2, "kid_subset_size": 50, "iwae_k": 2, "iwae_images": 8},
}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, Config]:
    from imagegen.evaluation.features import run_train_features
    from imagegen.evaluation.stage import run_evaluate
    from imagegen.training.stage import run_train

    root = tmp_path_factory.mktemp("rgb32")
    write_prepared(root, SHAPE)
    mark_validated(root)
    (root / "params.yaml").write_text(yaml.safe_dump(TINY))
    cfg = Config.model_validate(TINY)
    run_train_features(cfg, root)
    run_train(cfg, "gan", root)
    run_train(cfg, "vae", root)
    run_evaluate(cfg, root)
    return root, cfg


@pytest.mark.parametrize("kind", ["features", "gan", "vae"])
def test_every_model_is_described_with_the_dataset_shape(project, kind):
    root, _ = project
    description = json.loads((root / "models" / kind / "model.json").read_text())
    assert description["image_shape"] == list(SHAPE)
    assert description["classes"] == ["circle", "square", "star"] and description["dataset"] == "fashion-mnist"


@pytest.mark.parametrize("kind", ["gan", "vae"])
def test_epoch_grids_are_rgb(project, kind):
    root, _ = project
    grid = Image.open(root / "reports" / kind / "samples-epoch-001.png")
    assert grid.mode == "RGB" and grid.size == (8 * (3 * 32 + 2) + 2,) * 2


def test_evaluation_scores_in_the_feature_space_and_per_dimension(project):
    root, _ = project
    metrics = json.loads((root / "metrics" / "evaluate.json").read_text())
    for kind in ("gan", "vae"):
        assert np.isfinite(metrics[kind]["fid"]) and metrics[kind]["n_samples"] == 1000
    assert metrics["vae"]["dims"] == 3 * 32 * 32
    assert metrics["vae"]["nll_iwae_per_dim"] == pytest.approx(metrics["vae"]["nll_iwae"] / 3072, rel=1e-3)
    for name in ("gan-samples.png", "vae-samples.png", "vae-reconstructions.png", "gan-vs-vae.png"):
        assert Image.open(root / "reports" / "evaluate" / name).mode == "RGB", name


def test_train_refuses_data_that_does_not_match_its_description(project, tmp_path):
    from imagegen.training.stage import run_train

    _, cfg = project
    write_prepared(tmp_path, SHAPE)
    write_info(tmp_path / "data" / "prepared", DatasetInfo("shapes", ("a", "b", "c"), 1, 28))
    mark_validated(tmp_path)
    with pytest.raises(ImagegenError) as err:
        run_train(cfg, "vae", tmp_path)
    assert str(err.value) == (f"{tmp_path}/data/prepared/train.npz: images are 3 x 32 x 32, but data/prepared/"
                              "dataset.json says 1 x 28 x 28; run the prepare stage again")


def test_evaluate_refuses_a_model_of_another_shape_than_the_feature_net(project, tmp_path):
    import shutil

    from imagegen.evaluation.stage import run_evaluate
    from tests.helpers import make_model

    root, cfg = project
    for name in ("data", "metrics", "models"):
        shutil.copytree(root / name, tmp_path / name)
    make_model(tmp_path / "models" / "gan", "gan", seed=0)  # 1 x 28 x 28
    before = (tmp_path / "metrics" / "evaluate.json").read_bytes()
    with pytest.raises(ImagegenError, match=r"models/gan: makes 28 x 28 grey images, but the feature net in "
                                            r"models/features scores 32 x 32 RGB ones"):
        run_evaluate(cfg, tmp_path)
    assert (tmp_path / "metrics" / "evaluate.json").read_bytes() == before  # nothing half-written
    assert list((tmp_path / "reports").iterdir()) == []  # no evaluate pictures, no partial folder
