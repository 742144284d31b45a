"""Where the project keeps things and what it names them: the paths every stage shares (relative to the
project root), the MLflow experiment, the registered models, and the data version DVC recorded. The other
modules import these; none spells them again. No imports from the rest of the package: any layer may use it."""

from __future__ import annotations

from pathlib import Path

import yaml

PREPARED_DIR = Path("data/prepared")  # the prepare stage's output: train.npz, test.npz, dataset.json, manifest
MANIFEST = "manifest.parquet"  # in PREPARED_DIR: one row per image
DVC_LOCK = "dvc.lock"
# The models the pipeline trains, evaluates and registers: models/<kind>, the registered <dataset>-<kind>. Stated
# here, not read from models.kinds, so that light stages (validate, report) need no torch; a unit test keeps the two
# the same.
MODEL_KINDS = ("gan", "vae")


def experiment_name(dataset: str) -> str:
    """The MLflow experiment every stage of a pipeline run on `dataset` logs to."""
    return f"imagegen-{dataset}"


def registered_model_name(dataset: str, kind: str) -> str:
    """The MLflow registered model of one kind (gan, vae) trained on `dataset`."""
    return f"{dataset}-{kind}"


def dvc_out_md5(root: Path, stage: str, path: str) -> str:
    """The md5 DVC recorded in dvc.lock for a stage output ('untracked' outside a DVC run)."""
    try:
        lock = yaml.safe_load((root / DVC_LOCK).read_text()) or {}
        outs = lock["stages"][stage]["outs"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return "untracked"
    return next((o.get("md5", "untracked") for o in outs if o.get("path") == path), "untracked")


def data_version(root: Path) -> str:
    """The prepared data's DVC hash: what identifies a data version in lineage tags and the contest."""
    return dvc_out_md5(root, "prepare", str(PREPARED_DIR))
