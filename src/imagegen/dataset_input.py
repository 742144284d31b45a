"""The prepared data as an MLflow run's dataset input: its DVC hash as the digest, images per split and class
as the profile (what the runs table's Dataset column and a run's Inputs show), the manifest's columns as the
schema. Not the drift profile (data/profile, imagegen.data.drift): that one gates validate.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from pathlib import Path

from imagegen.errors import ImagegenError
from imagegen.layout import data_version


def log_dataset(root: Path, dataset: str, context: str, limit: int | None = None) -> None:
    """The prepared data as the active run's dataset input: digest = its DVC hash (dvc.lock), source =
    the folder, profile = images per split and class, schema = the per-image manifest's columns.
    `limit` (train.limit): only the first N training images count, in the profile and, for a training run,
    in its tags data_images / data_images_per_class (what it was trained on)."""
    import mlflow
    import pandas as pd
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.pandas_dataset import PandasDataset

    from imagegen.data.arrays import read_info
    from imagegen.layout import MANIFEST, PREPARED_DIR

    folder = (root / PREPARED_DIR).resolve()
    try:
        manifest = pd.read_parquet(folder / MANIFEST)
    except (OSError, ValueError):  # no manifest (a hand-made folder): count the labels of the arrays
        import numpy as np

        frames = []
        for split in ("train", "test"):
            with contextlib.suppress(OSError, KeyError, ValueError), np.load(folder / f"{split}.npz") as f:
                frames.append(pd.DataFrame({"split": split, "label": f["labels"], "index": range(len(f["labels"]))}))
        manifest = (pd.concat(frames, ignore_index=True) if frames
                    else pd.DataFrame({"split": [], "label": [], "index": []}))
    if limit:  # load_split's first `limit` images of the train split
        manifest = manifest[(manifest["split"] != "train") | (manifest["index"] < limit)]
    try:
        classes = read_info(folder, dataset).classes
    except ImagegenError:  # no dataset.json and not a built-in: label numbers
        classes = ()
    per_class = {split: {(classes[int(label)] if int(label) < len(classes) else str(label)): int(n)
                         for label, n in group["label"].value_counts().sort_index().items()}
                 for split, group in manifest.groupby("split", sort=False)}
    digest = data_version(root)
    profile = {"images": {split: sum(counts.values()) for split, counts in per_class.items()},
               "images_per_class": per_class, "dvc_md5": digest, **({"train_limit": limit} if limit else {})}
    if digest == "untracked":
        digest = "untracked-" + hashlib.sha256(json.dumps(profile, sort_keys=True).encode()).hexdigest()[:26]
    if context == "training":
        trained = per_class.get("train", {})
        mlflow.set_tags({"data_images": str(sum(trained.values())),
                         "data_images_per_class": json.dumps(trained, sort_keys=True)[:4000]})

    class ImageData(PandasDataset):
        @property
        def profile(self):
            return profile

    with warnings.catch_warnings():  # "can be interpreted in multiple ways", "integer columns" hints
        warnings.simplefilter("ignore")
        data = ImageData(df=manifest, source=resolve_dataset_source(str(folder)),  # MLflow keeps one profile per
                         name=f"{dataset}-prepared" + (f"-first{limit}" if limit else ""), digest=digest[:36])  # name
        mlflow.log_input(data, context=context)
    run = mlflow.active_run()
    parent = mlflow.get_run(run.info.run_id).data.tags.get("mlflow.parentRunId") if run else None
    if parent:  # the pipeline's row in the runs table shows its data version too
        from mlflow.entities import DatasetInput, InputTag

        mlflow.MlflowClient().log_inputs(parent, [DatasetInput(data._to_mlflow_entity(),
                                                               [InputTag("mlflow.data.context", "pipeline")])])
