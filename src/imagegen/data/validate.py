"""validate: a Great Expectations suite over the manifest and the prepared arrays.

Each split is one batch: the manifest's rows for that split plus a few columns derived
here from the arrays training reads (each image's content hash, which must equal the
manifest's, duplicate flags from those hashes, the label stored in the .npz, class share).
The suite is the same for both splits; the expected row count comes in as a suite parameter.
A folder dataset adds a third batch, `files` (one row per file, skipped ones included), with
its own suite: skipped fraction (the notes count them per reason), images per class, class balance
(a failure level, and a warning level whose expectations have severity "warning": reported, not
failing), and the original sizes and modes as observed values in the Data Docs.
The content hash of each split goes to metrics/validate.json, so that the stages reading the
data can tell that these very arrays passed (imagegen.data.integrity). Results and Data
Docs go to reports/validation/, a summary to metrics/validate.json. Any failed expectation
fails the stage, naming each one and what was observed.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imagegen.config import Config, DataConfig, ValidateConfig
from imagegen.data import drift
from imagegen.data.datasets import DATASETS, SPLITS
from imagegen.data.prepare import MANIFEST_COLUMNS, image_hashes
from imagegen.data.arrays import read_info
from imagegen.data.integrity import HASH_KEY, RECORD, content_hashes
from imagegen.errors import ImagegenError
from imagegen.fsutil import atomic_dir, write_json
from imagegen.layout import MANIFEST, PREPARED_DIR

log = logging.getLogger(__name__)

REPORT_DIR = Path("reports/validation")
METRICS_FILE = RECORD


@dataclass(frozen=True)
class ValidateResult:
    """Only data that passed gets a result: a failed expectation raises ImagegenError instead."""

    summary: dict


def run_validate(cfg: Config, root: Path = Path("."), baseline: Path | None = None) -> ValidateResult:
    """Built-ins: the split suite with the published sizes. Folder datasets: the split suite (sizes only when
    validate.expected_counts gives them) plus a `files` batch: skipped files, images per class, class
    balance (warning and failure levels), original sizes and modes. The drift gate compares with the profile
    in the folder `baseline` (the champion's, fetched by the caller), else with data/profile."""
    folder = not cfg.data.builtin
    info = read_info(root / PREPARED_DIR, cfg.data.dataset)
    check_class_count(info.num_classes, cfg)
    expected_counts = cfg.validate_.expected_counts or (None if folder else DATASETS[cfg.data.dataset].split_sizes)
    manifest = load_manifest(root / PREPARED_DIR / MANIFEST)
    arrays = {split: load_arrays(root / PREPARED_DIR / f"{split}.npz") for split in SPLITS}
    nearest = nearest_other_split_rms(arrays["train"][0], arrays["test"][0])
    hashes = {split: image_hashes(arrays[split][0]) for split in SPLITS}
    batches = {
        split: validation_frame(manifest, split, arrays[split][1], hashes, nearest[split]) for split in SPLITS
    }
    suites = {"manifest": lambda: build_suite(info.num_classes, cfg.validate_, expected_counts is not None, not folder)}
    parameters = {split: {"expected_rows": int(expected_counts[split])} for split in SPLITS} if expected_counts else {}
    if folder:
        scan = load_scan(root / PREPARED_DIR)
        batches["files"] = files_frame(manifest, scan, info.num_classes, cfg.data.image_size)
        suites["files"] = lambda: build_files_suite(cfg.validate_, cfg.data, batches["files"])
    with atomic_dir(root / REPORT_DIR) as report_dir:
        results = run_suite(batches, suites, parameters, report_dir)
        (report_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        gate = drift.run_gate(cfg, root, report_dir, arrays, hashes, baseline)  # the drift gate: data/drift.py
    failed = [(name, r) for name in batches for r in results[name]["results"] if not r["success"]]
    failures = [f"{name}: {describe(r)}" for name, r in failed if severity(r) != "warning"]
    summary = {
        "success": not failures,
        "failed_expectations": len(failures),
        "evaluated_expectations": sum(len(results[name]["results"]) for name in batches),
        **{split: split_summary(batches[split], cfg.validate_.near_duplicate_rms) for split in SPLITS},
        HASH_KEY: content_hashes(root, arrays),
    }
    if folder:
        summary["files"] = files_summary(batches["files"], scan, info.classes)
        summary["warnings"] = [f"{name}: {describe(r)}" for name, r in failed if severity(r) == "warning"]
    summary["success"] = summary["success"] and gate.passed
    write_json(root / METRICS_FILE, summary)
    write_json(root / drift.RESULTS, {**gate.summary(), "lineage": gate.lineage})  # not read by training
    for split in SPLITS:
        log.info("validate: %s: %s", split, summary[split])
    for path in summary.get("files", {}).get("skipped", []):
        log.warning("validate: skipped by prepare: %s", path)
    for warning in summary.get("warnings", []):
        log.warning("validate: warning: %s", warning)
    if failures:
        raise ImagegenError(
            f"validate: {len(failures)} expectation(s) failed (see {REPORT_DIR}/data_docs/index.html): "
            + "; ".join(failures)
        )
    gate.raise_if_failed()
    gate.accept(root)  # only a version that passed becomes the reference of the next
    return ValidateResult(summary)


def check_class_count(classes: int, cfg: Config) -> None:
    """The VAE's class_mixture prior needs a component per class: refuse too many classes before any training."""
    vae = cfg.vae
    if vae.prior == "class_mixture" and classes > vae.prior_components:
        raise ImagegenError(f"validate: {PREPARED_DIR / 'dataset.json'} lists {classes} classes; expected at most "
                            f"vae.prior_components ({vae.prior_components}) with vae.prior class_mixture (raise "
                            "vae.prior_components, choose another vae.prior, or use fewer class folders)")


def load_manifest(path: Path):
    import pandas as pd

    try:
        manifest = pd.read_parquet(path)
    except FileNotFoundError:
        raise ImagegenError(f"{path}: file not found (run the prepare stage first)") from None
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise ImagegenError(f"{path}: not a readable parquet file ({type(exc).__name__})") from None
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest.columns]
    if missing:
        raise ImagegenError(f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(MANIFEST_COLUMNS)}")
    return manifest


def load_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as arrays:
            return arrays["images"], arrays["labels"]
    except FileNotFoundError:
        raise ImagegenError(f"{path}: file not found (run the prepare stage first)") from None
    except (KeyError, ValueError, OSError) as exc:
        raise ImagegenError(f"{path}: expected an .npz holding 'images' and 'labels' ({exc})") from None


def nearest_other_split_rms(train: np.ndarray, test: np.ndarray, chunk: int = 500,
                            block_bytes: int = 1 << 28) -> dict[str, np.ndarray]:
    """For every image, the RMS pixel distance (0..255) to its nearest image in the other split.

    Exact search (about 8 s for 10k x 60k 28 x 28 images on 2 CPU cores); it finds the near-duplicates
    that a content hash misses, which matter because the test split is the FID reference set. Images
    of any shape (N x C x H x W) are compared as flat vectors; the train split is taken in blocks of
    `block_bytes` of float32 so large colour datasets need no whole float copy.
    """
    import torch

    a_all, b_all = test.reshape(len(test), -1), train.reshape(len(train), -1)
    dims = a_all.shape[1]
    to_train = torch.full((len(a_all),), float("inf"))
    to_test = torch.full((len(b_all),), float("inf"))
    block = max(1, block_bytes // (4 * max(dims, 1)))
    for b_start in range(0, len(b_all), block):
        b = torch.from_numpy(b_all[b_start:b_start + block]).float()
        for start in range(0, len(a_all), chunk):
            d = torch.cdist(torch.from_numpy(a_all[start:start + chunk]).float(), b)
            if d.numel():
                to_train[start:start + chunk] = torch.minimum(to_train[start:start + chunk], d.min(dim=1).values)
                end = b_start + len(b)
                to_test[b_start:end] = torch.minimum(to_test[b_start:end], d.min(dim=0).values)
    scale = np.sqrt(dims) if dims else 1.0
    return {"train": to_test.numpy() / scale, "test": to_train.numpy() / scale}


def validation_frame(manifest, split: str, array_labels: np.ndarray, hashes: dict[str, list[str]],
                     nearest_rms: np.ndarray):
    """The split's manifest rows plus the columns derived from the arrays that the suite checks."""
    frame = manifest[manifest["split"] == split].reset_index(drop=True)
    if len(frame) != len(array_labels):
        raise ImagegenError(
            f"{PREPARED_DIR / MANIFEST}: {len(frame)} {split} rows, but {split}.npz holds "
            f"{len(array_labels)} labels; expected one row per image (re-run prepare)"
        )
    other_hashes = {h for other, values in hashes.items() if other != split for h in values}
    counts = frame["label"].value_counts()
    share_if_balanced = len(frame) / max(frame["label"].nunique(), 1)
    frame["array_label"] = array_labels
    frame["array_hash"] = hashes[split]
    frame["class_share_ratio"] = frame["label"].map(counts) / share_if_balanced
    frame["repeats_earlier"] = frame["array_hash"].duplicated(keep="first")
    frame["in_other_split"] = frame["array_hash"].isin(other_hashes)
    frame["nearest_other_split_rms"] = nearest_rms
    return frame


def build_suite(num_classes: int, cfg: ValidateConfig, row_counts: bool = True, class_tolerance: bool = True):
    """The suite of each split. row_counts: rows must equal the expected_rows parameter; class_tolerance:
    each class's share within class_balance_tolerance of an even share (built-ins; folder datasets check
    balance over all their files instead, build_files_suite)."""
    import great_expectations as gx

    e = gx.expectations
    labels = list(range(num_classes))
    suite = gx.ExpectationSuite(name="manifest")
    for expectation in [
        *([e.ExpectTableRowCountToEqual(value={"$PARAMETER": "expected_rows"})] if row_counts else []),
        *(e.ExpectColumnValuesToNotBeNull(column=c) for c in MANIFEST_COLUMNS),
        e.ExpectColumnValuesToBeUnique(column="index"),
        e.ExpectColumnValuesToBeInSet(column="label", value_set=labels),
        e.ExpectColumnDistinctValuesToEqualSet(column="label", value_set=labels),
        e.ExpectColumnPairValuesToBeEqual(column_A="label", column_B="array_label"),
        e.ExpectColumnPairValuesToBeEqual(column_A="hash", column_B="array_hash"),  # the arrays are what prepare described
        e.ExpectColumnValuesToBeBetween(column="min", min_value=0, max_value=255),
        e.ExpectColumnValuesToBeBetween(column="max", min_value=0, max_value=255),
        e.ExpectColumnPairValuesAToBeGreaterThanB(column_A="max", column_B="min", or_equal=True),
        e.ExpectColumnValuesToBeBetween(column="mean", min_value=0, max_value=255),
        e.ExpectColumnValuesToBeBetween(column="std", min_value=0, max_value=127.5),
        *([e.ExpectColumnValuesToBeBetween(
            column="class_share_ratio",
            min_value=1 - cfg.class_balance_tolerance,
            max_value=1 + cfg.class_balance_tolerance,
        )] if class_tolerance else []),
        e.ExpectColumnValuesToBeInSet(
            column="repeats_earlier", value_set=[False], mostly=1 - cfg.max_duplicate_fraction
        ),
        e.ExpectColumnValuesToBeBetween(  # exact duplicates have distance 0, so this covers them too
            column="nearest_other_split_rms",
            min_value=cfg.near_duplicate_rms,
            mostly=1 - cfg.max_cross_split_duplicate_fraction,
        ),
    ]:
        suite.add_expectation(expectation)
    return suite


def run_suite(batches: dict, suites: dict, parameters: dict, report_dir: Path) -> dict:
    """Validate each batch (name -> frame; a split's name or "files", checked by the suite of that name, else
    "manifest"; suites: name -> a function building it once the context exists) with its expectation
    parameters; write Data Docs under report_dir; return results as JSON dicts."""
    import great_expectations as gx
    from great_expectations.data_context.types import base

    base.logger.setLevel(logging.WARNING)  # it sets INFO itself and announces a temp folder per context
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = base.ProgressBarsConfig(globally=False, metric_calculations=False)
    context.add_data_docs_site(
        site_name="validation",
        site_config={
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                              "base_directory": str((report_dir / "data_docs").resolve())},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        },
    )
    asset = context.data_sources.add_pandas("prepared").add_dataframe_asset("manifest")
    added = {name: context.suites.add(make()) for name, make in suites.items()}
    results = {}
    for name, frame in batches.items():
        suite_name = name if name in added else "manifest"
        definition = context.validation_definitions.add(gx.ValidationDefinition(
            name=name if name == suite_name else f"{suite_name}-{name}",
            data=asset.add_batch_definition_whole_dataframe(name), suite=added[suite_name],
        ))
        checkpoint = context.checkpoints.add(gx.Checkpoint(
            name=f"validate-{name}",
            validation_definitions=[definition],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=["validation"])],
            result_format="SUMMARY",
        ))
        run = checkpoint.run(batch_parameters={"dataframe": frame}, expectation_parameters=parameters.get(name, {}))
        (suite_result,) = run.run_results.values()
        results[name] = suite_result.to_json_dict()
    return results


def load_scan(prepared_dir: Path) -> dict:
    from imagegen.data.folder import SCAN

    path = prepared_dir / SCAN
    try:
        scan = json.loads(path.read_text())
        return {"files": int(scan["files"]), "ignored": int(scan["ignored"]),
                "skipped": [(str(s["path"]), str(s["reason"])) for s in scan["skipped"]]}
    except FileNotFoundError:
        raise ImagegenError(f"{path}: not found; expected prepare's scan of the image folder (re-run prepare)") from None
    except (ValueError, KeyError, TypeError):
        raise ImagegenError(f"{path}: expected JSON with files, ignored and skipped (re-run prepare)") from None


def files_frame(manifest, scan: dict, num_classes: int, image_size: int):
    """One row per file of the folder: the images read (from the manifest) and the skipped files (`skipped`:
    the reason)."""
    import pandas as pd

    readable = manifest[["source", "split", "label", "width", "height", "mode"]].copy()
    counts = readable["label"].value_counts()
    readable["class_images"] = readable["label"].map(counts).astype("int64")
    readable["class_share"] = readable["class_images"] / (len(readable) / max(num_classes, 1))
    readable["short_side"] = readable[["width", "height"]].min(axis=1)
    readable["skipped"] = None
    skipped = pd.DataFrame(scan["skipped"], columns=["source", "skipped"]).assign(split="skipped")
    frame = pd.concat([readable, skipped], ignore_index=True) if len(skipped) else readable
    frame["skipped"] = frame["skipped"].astype(object).where(frame["skipped"].notna(), None)
    return frame.reset_index(drop=True)


def build_files_suite(cfg: ValidateConfig, data: DataConfig, frame):
    """Folder datasets: checks over all the folder's image files, and the original sizes and modes shown in
    the Data Docs (observed values, and a table of modes in the notes)."""
    import great_expectations as gx

    e = gx.expectations
    modes = frame["mode"].dropna().value_counts()
    mode_table = "\n".join(["| mode | files |", "| --- | --- |", *(f"| {m} | {n} |" for m, n in modes.items())])
    reasons = frame["skipped"].dropna().value_counts().sort_index()
    reason_table = "\n".join(["| reason | files |", "| --- | --- |", *(f"| {r} | {n} |" for r, n in reasons.items())])
    suite = gx.ExpectationSuite(name="files")
    for expectation in [
        e.ExpectColumnValuesToBeNull(column="skipped", mostly=1 - data.max_unreadable_fraction,
                                     notes="Files prepare skipped, by reason (data/prepared/scan.json lists each "
                                           f"with its reason):\n\n{reason_table}"),
        e.ExpectColumnValuesToBeBetween(column="class_images", min_value=cfg.min_images_per_class),
        e.ExpectColumnValuesToBeBetween(column="class_share", min_value=cfg.class_share_fail),
        e.ExpectColumnValuesToBeBetween(column="class_share", min_value=cfg.class_share_warn, severity="warning"),
        e.ExpectColumnValuesToBeBetween(column="short_side", min_value=data.image_size, severity="warning",
                                        notes=f"Images whose shorter side is under {data.image_size} px are upscaled."),
        e.ExpectColumnDistinctValuesToBeInSet(column="mode", value_set=sorted(IMAGE_MODES),
                                              notes=f"Original modes of the readable files:\n\n{mode_table}"),
        *(e.ExpectColumnMinToBeBetween(column=c, min_value=1) for c in ("width", "height")),
        *(e.ExpectColumnMedianToBeBetween(column=c, min_value=1) for c in ("width", "height")),
        *(e.ExpectColumnMaxToBeBetween(column=c, min_value=1) for c in ("width", "height")),
    ]:
        suite.add_expectation(expectation)
    return suite


# Pillow modes prepare converts (the Data Docs show which ones the folder holds).
IMAGE_MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV",
               "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def severity(result: dict) -> str:
    """critical (fails the stage) or warning (reported only)."""
    value = result["expectation_config"].get("severity") or "critical"
    return str(getattr(value, "value", value))


def files_summary(frame, scan: dict, classes: tuple[str, ...]) -> dict:
    readable = frame[frame["split"] != "skipped"]
    counts = readable["label"].value_counts()

    def spread(column: str) -> dict:
        values = readable[column]
        return {"min": int(values.min()), "median": float(values.median()), "max": int(values.max())}

    return {
        "files": scan["files"],
        "images": int(len(readable)),
        "ignored": scan["ignored"],
        "skipped": [path for path, _ in scan["skipped"]],
        "skipped_per_reason": dict(sorted(Counter(reason for _, reason in scan["skipped"]).items())),
        "skipped_fraction": round(len(scan["skipped"]) / max(scan["files"], 1), 4),
        "images_per_class": {name: int(counts.get(label, 0)) for label, name in enumerate(classes)},
        "min_class_share": round(float(readable["class_share"].min()), 4),
        "width": spread("width"),
        "height": spread("height"),
        "modes": {str(m): int(n) for m, n in readable["mode"].value_counts().sort_index().items()},
    }


def describe(result: dict) -> str:
    """One failed expectation, what was observed and what was expected, e.g.
    'expect_column_values_to_be_in_set(label): 3 of 70 rows unexpected, e.g. [11]; expected values in [0, ..., 9]'."""
    config = result["expectation_config"]
    kwargs = config["kwargs"]
    columns = ",".join(str(kwargs[k]) for k in ("column", "column_A", "column_B") if k in kwargs)
    name = f"{config['type']}({columns})" if columns else config["type"]
    wanted = expected(config["type"], kwargs)
    observed = result.get("result") or {}
    if observed.get("observed_value") is not None:
        return f"{name}: observed {observed['observed_value']}, expected {wanted}"
    if observed.get("unexpected_count") is not None:
        sample = observed.get("partial_unexpected_list") or []
        return (f"{name}: {observed['unexpected_count']} of {observed.get('element_count')} rows unexpected"
                f", e.g. {sample[:3]}; expected {wanted}")
    exception = result.get("exception_info") or {}
    return f"{name}: {exception.get('exception_message') or 'failed'}; expected {wanted}"


def expected(kind: str, kwargs: dict) -> str:
    """What an expectation of this suite asks for, in words."""
    low, high = kwargs.get("min_value"), kwargs.get("max_value")
    if "value" in kwargs:
        text = str(kwargs["value"])
    elif kind == "expect_column_distinct_values_to_equal_set":
        text = f"exactly the values {kwargs['value_set']}"
    elif "value_set" in kwargs:
        text = f"values in {kwargs['value_set']}"
    elif low is not None or high is not None:
        text = (f"values between {low} and {high}" if low is not None and high is not None
                else f"values >= {low}" if low is not None else f"values <= {high}")
    elif kind == "expect_column_values_to_not_be_null":
        text = "no null values"
    elif kind == "expect_column_values_to_be_null":
        text = "null values"
    elif kind == "expect_column_values_to_be_unique":
        text = "unique values"
    elif kind == "expect_column_pair_values_to_be_equal":
        text = f"{kwargs['column_A']} == {kwargs['column_B']}"
    elif kind == "expect_column_pair_values_a_to_be_greater_than_b":
        text = f"{kwargs['column_A']} {'>=' if kwargs.get('or_equal') else '>'} {kwargs['column_B']}"
    else:
        text = "success"
    mostly = kwargs.get("mostly")
    return f"{text} in at least {mostly:.1%} of rows" if mostly not in (None, 1, 1.0) else text


def split_summary(frame, near_rms: float) -> dict:
    return {
        "rows": int(len(frame)),
        "differ_from_manifest": int((frame["hash"] != frame["array_hash"]).sum()),
        "duplicates_within_split": int(frame["repeats_earlier"].sum()),
        "also_in_other_split": int(frame["in_other_split"].sum()),
        "near_duplicates_in_other_split": int((frame["nearest_other_split_rms"] < near_rms).sum()),
        "min_class_share_ratio": round(float(frame["class_share_ratio"].min()), 4) if len(frame) else None,
        "max_class_share_ratio": round(float(frame["class_share_ratio"].max()), 4) if len(frame) else None,
        "pixel_mean": round(float(frame["mean"].mean()), 4) if len(frame) else None,
    }
