"""Small folders: the default budget on 2,000 to 60,000 images
The default pipeline's GAN and VAE trained on stratified subsets of the training split, each scored against
the whole test split by the evaluate stage's scorer, with and without the GAN's adaptive augmentation
(gan.augment): FID ± its bootstrap std, precision, recall, wall time, the GAN's final
augmentation probability p, the VAE prior's fitted components. The raw rows are also written to --out.

The budget is the one in params.yaml (gan.images, vae.images: images seen, whatever the subset's size),
times --budget (0.25: a quarter, for a 2-core CPU; 1: the pipeline's). All rows share one feature net,
trained on the whole training split, so their FIDs compare with each other.

Needs a project folder (--root) where `imagegen fetch`, `imagegen prepare` and `imagegen validate` ran on
the built-in data. The bench orders data/prepared/train.npz so that every prefix is stratified (each class
within one image of its share) and validates it again; train.limit then picks a subset.

  python bench/small_data.py --root /tmp/small --sizes 2000,5000,20000,60000 --budget 0.25
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from benchlog import record


def stratified_order(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """A permutation whose every prefix holds each class in proportion (within one image): each class
    shuffled, then the classes dealt out by how far each is behind its share."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    queues = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    taken = np.zeros(len(classes), dtype=np.int64)
    order = np.empty(len(labels), dtype=np.int64)
    share = counts / len(labels)
    for i in range(len(labels)):
        c = int(np.argmax(share * (i + 1) - taken))  # the class furthest behind its share
        order[i] = queues[c][taken[c]]
        taken[c] += 1
    return order


def order_training_split(root: Path) -> None:
    """train.npz and its manifest rows in stratified order, then validated again (validate checks that the
    arrays match the manifest row by row)."""
    import pandas as pd

    from imagegen.data.prepare import write_npz

    from imagegen.data.arrays import load_split
    from imagegen.layout import MANIFEST, PREPARED_DIR

    path, manifest_path = root / PREPARED_DIR / "train.npz", root / PREPARED_DIR / MANIFEST
    images, labels = load_split(path)
    order = stratified_order(labels)
    if np.array_equal(order, np.arange(len(order))):
        return
    manifest = pd.read_parquet(manifest_path)
    train = manifest[manifest["split"] == "train"].sort_values("index").iloc[order]
    train["index"] = np.arange(len(train))
    manifest = pd.concat([train, manifest[manifest["split"] != "train"]], ignore_index=True)
    for target, write in ((path, lambda f: write_npz(f, images[order], labels[order])),
                          (manifest_path, lambda f: manifest.to_parquet(f, index=False))):
        partial = target.with_name(target.name + ".tmp")
        write(partial)
        os.replace(partial, target)
    subprocess.run([sys.executable, "-m", "imagegen.cli", "validate"], cwd=root, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--sizes", default="2000,5000,20000,60000", help="training images per row")
    parser.add_argument("--augment", default="off,on", help="gan.augment settings to try, comma-separated")
    parser.add_argument("--budget", type=float, default=1.0, help="share of params.yaml's gan.images and vae.images")
    parser.add_argument("--feature-epochs", type=int, default=None, help="default: params.yaml's features.epochs")
    parser.add_argument("--n-samples", type=int, default=10000)
    parser.add_argument("--reuse", action="store_true", help="keep the feature net and the ordering already there")
    parser.add_argument("--out", type=Path, default=Path("bench/results/small_data.json"))
    args = parser.parse_args()
    out = args.out.resolve()

    from imagegen.config import load_config, with_overrides
    from imagegen.evaluation.features import run_train_features
    from imagegen.evaluation.sampling import generate
    from imagegen.evaluation.stage import Scorer, rounded
    from imagegen.models.io import load_model
    from imagegen.training.stage import run_train

    root = args.root.resolve()
    os.chdir(root)
    cfg = load_config(root / "params.yaml")
    base = with_overrides(cfg, {
        "train.mlflow": False, "train.resume": False, "train.device": "cpu", "eval.n_samples": args.n_samples,
        "gan.images": round(cfg.gan.images * args.budget), "vae.images": round(cfg.vae.images * args.budget),
        **({"features.epochs": args.feature_epochs} if args.feature_epochs else {})})
    if not args.reuse:
        order_training_split(root)
        started = time.perf_counter()
        run_train_features(base, root)
        print(f"feature net: {time.perf_counter() - started:.0f} s", flush=True)
    scorer = Scorer.load(base, root, "cpu")

    def score(kind: str, row: dict) -> None:
        module, description = load_model(root / "models" / kind, "cpu")
        scores = rounded(scorer.score(generate(module, description, base.eval.n_samples, base.eval.seed)))
        row.update({f"{kind}_{k}": scores[k] for k in ("fid", "fid_std", "precision", "recall")})

    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        for n, augment in enumerate(args.augment.split(",")):
            cfg_row = with_overrides(base, {"train.limit": size, "gan.augment": augment == "on"})
            row = {"images": size, "augment": augment}
            for kind in ("gan", "vae") if n == 0 else ("gan",):  # augmentation is the GAN's only
                started = time.perf_counter()
                metrics = run_train(cfg_row, kind, root).metrics
                row[f"{kind}_seconds"] = round(time.perf_counter() - started, 1)
                row[f"{kind}_epochs"] = metrics["epochs"]
                score(kind, row)
                if kind == "gan":
                    row["augment_p"] = metrics.get("augment_p")
                else:
                    row["vae_prior_components"] = metrics.get("prior_fit_components")
            print(json.dumps(row), flush=True)
            rows.append(row)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"budget": args.budget, "gan_images": base.gan.images, "vae_images": base.vae.images,
                               "rows": rows}, indent=2) + "\n")
    record("small_data", COLUMNS, table(rows), note=f"Budget {args.budget:g}: gan.images {base.gan.images:,}, "
           f"vae.images {base.vae.images:,}; {base.eval.n_samples:,} samples per FID.")


COLUMNS = ["images", "augment", "GAN epochs", "GAN s", "GAN FID", "precision", "recall", "final p", "VAE epochs",
           "VAE s", "VAE FID", "prior components"]


def table(rows: list[dict]) -> list[list[str]]:
    def cell(row, key, std=None):
        if row.get(key) is None:
            return ""
        return f"{row[key]:.2f} ± {row[std]:.2f}" if std else str(row[key])

    return [[f"{row['images']:,}", row["augment"], cell(row, "gan_epochs"), cell(row, "gan_seconds"),
             cell(row, "gan_fid", "gan_fid_std"), cell(row, "gan_precision"), cell(row, "gan_recall"),
             cell(row, "augment_p"), cell(row, "vae_epochs"), cell(row, "vae_seconds"),
             cell(row, "vae_fid", "vae_fid_std"), cell(row, "vae_prior_components")] for row in rows]


if __name__ == "__main__":
    main()
