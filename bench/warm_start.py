"""Warm start: retraining from the champion vs from scratch on grown data
Through the pipeline's own stage functions. Week 1: train-gan and train-vae on the first `--first`
training images, evaluate, register (both become champions). Week 2, the data has grown to `--second`
images: train each `--variants` entry, e.g. `none:1` (from scratch, `--epochs` epochs) and `champion:0.5`
(from the champion, half the epochs), evaluating each as the evaluate stage does: the evaluate stage's FID
and the training wall time (the raw rows also go to --out as JSON).

Needs a project folder (--root) with data/prepared validated (imagegen fetch, prepare, validate); the
feature net is trained there on `--second` images for `--feature-epochs` (a small budget: compare rows,
not with the default pipeline's FIDs). MLflow: the folder's embedded store.

  python bench/warm_start.py --root /tmp/ws --first 5000 --second 10000 --epochs 6
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from benchlog import record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--first", type=int, default=5000, help="training images of week 1")
    parser.add_argument("--second", type=int, default=10000, help="training images of week 2")
    parser.add_argument("--epochs", type=int, default=6, help="epochs of a cold run (and of week 1)")
    parser.add_argument("--variants", default="none:1,champion:0.5",
                        help="week-2 runs as init_from:share-of-epochs, comma-separated (default: none:1,champion:0.5)")
    parser.add_argument("--reuse", action="store_true",
                        help="skip week 1 and the feature net: use the champion and models/features already there")
    parser.add_argument("--feature-epochs", type=int, default=2)
    parser.add_argument("--n-samples", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path("bench/results/warm_start.json"))
    args = parser.parse_args()

    from imagegen.config import load_config, with_overrides
    from imagegen.evaluation.features import run_train_features
    from imagegen.evaluation.stage import run_evaluate
    from imagegen.registry import run_register
    from imagegen.training.stage import run_train

    root = args.root.resolve()
    os.chdir(root)
    base = with_overrides(load_config(root / "params.yaml"), {
        "train.mlflow": False, "train.resume": False, "train.device": "cpu",
        "gan.epochs": args.epochs, "vae.epochs": args.epochs, "features.epochs": args.feature_epochs,
        "eval.n_samples": args.n_samples, "eval.kid_subsets": 10, "eval.iwae_images": 500, "eval.iwae_k": 8})

    def week(limit: int, init_from: str, share: float = 1.0) -> dict:
        epochs = max(1, round(args.epochs * share))
        cfg = with_overrides(base, {"train.limit": limit, "train.init_from": init_from, "gan.epochs": epochs,
                                    "vae.epochs": epochs, "train.warm_epochs_fraction": 1.0})
        row = {"images": limit, "init_from": init_from}
        for kind in ("gan", "vae"):
            started = time.perf_counter()
            metrics = run_train(cfg, kind, root).metrics
            row[f"{kind}_seconds"] = round(time.perf_counter() - started, 1)
            row[f"{kind}_epochs"] = metrics["epochs"]
            row[f"{kind}_start"] = metrics.get("init_from")
        evaluation = run_evaluate(cfg, root).metrics
        row.update(gan_fid=evaluation["gan"]["fid"], vae_fid=evaluation["vae"]["fid"])
        print(json.dumps(row), flush=True)
        return row

    rows = []
    if not args.reuse:
        run_train_features(with_overrides(base, {"train.limit": args.second}), root)
        rows.append(week(args.first, "none"))
        print(run_register(base, root).summary, flush=True)
    for variant in args.variants.split(","):
        init_from, share = variant.split(":")
        rows.append(week(args.second, init_from, float(share)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    record("warm_start", COLUMNS, table(rows, week_one=not args.reuse),
           note=f"{args.epochs} epochs from scratch; feature net {args.feature_epochs} epochs on the week 2 images, "
                f"{args.n_samples:,} samples per FID: compare rows, not with other tables.")


COLUMNS = ["week", "images", "start", "GAN epochs", "GAN s", "GAN FID", "VAE epochs", "VAE s", "VAE FID"]


def table(rows: list[dict], week_one: bool) -> list[list]:
    weeks = [1] * week_one + [2] * len(rows)
    return [[week, f"{row['images']:,}", row["gan_start"], row["gan_epochs"], row["gan_seconds"], row["gan_fid"],
             row["vae_epochs"], row["vae_seconds"], row["vae_fid"]] for week, row in zip(weeks, rows)]

if __name__ == "__main__":
    main()
