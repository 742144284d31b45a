"""The drift gate for real: the validate stage (Great Expectations suite + drift gate) on Fashion-MNIST
images, version after version, in a temporary project. The prepared arrays are edited the way a bad
batch would change them (and their manifest rewritten to match, so the GX suite passes and the drift
gate is what stops them)."""

from __future__ import annotations

import gzip
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from imagegen.config import load_config
from imagegen.data import drift
from imagegen.data.datasets import DATASETS
from imagegen.data.prepare import builtin_sources, manifest_rows
from imagegen.data.arrays import as_nchw
from imagegen.data.validate import run_validate
from imagegen.errors import ImagegenError
from tests.conftest import REPO_ROOT, set_params
from tests.helpers import FASHION_MNIST, needs_fashion_mnist

pytestmark = needs_fashion_mnist


def idx(name: str, offset: int, shape: tuple) -> np.ndarray:
    return np.frombuffer(gzip.open(FASHION_MNIST / f"{name}.gz").read(), np.uint8, offset=offset).reshape(shape)


@pytest.fixture(scope="module")
def fashion() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The first images of each split, per class in order (balanced slices are easy to take)."""
    return {"train": (idx("train-images-idx3-ubyte", 16, (-1, 28, 28)), idx("train-labels-idx1-ubyte", 8, (-1,))),
            "test": (idx("t10k-images-idx3-ubyte", 16, (-1, 28, 28)), idx("t10k-labels-idx1-ubyte", 8, (-1,)))}


def balanced(images, labels, per_class: int, start: int = 0):
    picked = np.concatenate([np.flatnonzero(labels == c)[start:start + per_class] for c in range(10)])
    return images[picked], labels[picked].astype(np.int64)


def write_version(root: Path, splits: dict) -> None:
    """data/prepared as prepare writes it: the arrays and a manifest that describes them."""
    import pandas as pd

    folder = root / "data" / "prepared"
    folder.mkdir(parents=True, exist_ok=True)
    spec = DATASETS["fashion-mnist"]
    for split, (images, labels) in splits.items():
        np.savez(folder / f"{split}.npz", images=as_nchw(images), labels=labels)  # N x 1 x 28 x 28
    pd.concat([manifest_rows(images, labels, split, builtin_sources(spec, split, images))
               for split, (images, labels) in splits.items()], ignore_index=True).to_parquet(folder / "manifest.parquet", index=False)


def version(fashion, train_per_class: int, test_per_class: int, start: int = 0) -> dict:
    return {"train": balanced(*fashion["train"], train_per_class, start),
            "test": balanced(*fashion["test"], test_per_class, start // 6)}


def inverted(splits: dict) -> dict:
    """A bad batch: every image inverted."""
    return {split: (255 - images, labels) for split, (images, labels) in splits.items()}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text())
    return tmp_path


def validate(root: Path, counts: dict) -> dict:
    """The drift record (metrics/drift.json) of a validate run that passed."""
    set_params(root, validate={"expected_counts": counts})
    summary = run_validate(load_config(root / "params.yaml"), root).summary
    assert summary["success"]
    return json.loads((root / drift.RESULTS).read_text())


def test_same_data_and_more_of_it_pass_inverted_images_fail_in_one_line(root, fashion):
    write_version(root, version(fashion, 150, 40))
    first = validate(root, {"train": 1500, "test": 400})
    assert first["baseline"].startswith("no accepted version before")
    assert first["lineage"]["images_added"] == 1900 and first["lineage"]["previous_data_version"] is None
    profile = root / drift.PROFILE_DIR / drift.PROFILE
    assert json.loads(profile.read_text())["images"] == {"train": 1500, "test": 400}

    again = validate(root, {"train": 1500, "test": 400})  # the same data: every check ok, nothing added
    assert again["passed"] and again["baseline"] is None
    checks = again["checks"]
    assert {name: c["status"] for name, c in checks.items() if c["status"] != "info"} == {
        "class_proportion_shift": "ok", "intensity_psi": "ok", "feature_frechet": "ok"}
    assert checks["class_proportion_shift"]["value"] == 0 and checks["intensity_psi"]["value"] < 1e-9
    assert again["lineage"]["images_added"] == 0

    write_version(root, version(fashion, 300, 60))  # grown: more images of the same kind
    grown = validate(root, {"train": 3000, "test": 600})
    assert grown["passed"], grown
    assert grown["lineage"]["images_added"] == 1700
    assert grown["lineage"]["added_per_class"] == {name: 170 for name in grown["lineage"]["added_per_class"]}
    accepted = profile.read_bytes()

    write_version(root, inverted(version(fashion, 300, 60)))
    set_params(root, validate={"expected_counts": {"train": 3000, "test": 600}})
    done = subprocess.run(["imagegen", "validate"], cwd=root, capture_output=True, text=True)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    error = [line for line in done.stderr.splitlines() if line.startswith("imagegen validate: error: ")]
    assert len(error) == 1 and error[0].startswith("imagegen validate: error: validate: drift gate failed"), done.stderr
    assert "intensity_psi" in error[0] and "feature_frechet" in error[0] and "drift.html" in error[0]
    value = float(error[0].split("intensity_psi ")[1].split()[0])
    assert value > 1  # PSI of the inverted histograms: far beyond the 0.25 failure level
    assert profile.read_bytes() == accepted  # a rejected version never becomes the reference
    assert json.loads((root / "metrics" / "validate.json").read_text())["success"] is False
    assert json.loads((root / drift.RESULTS).read_text())["checks"]["intensity_psi"]["status"] == "fail"
    page = (root / "reports" / "validation" / drift.PAGE).read_text()
    assert "FAILED" in page and "<svg" in page and "Images per class" in page


def test_a_class_mostly_gone_fails_the_class_shift_check(root, fashion):
    set_params(root, validate={"class_balance_tolerance": 1.0})  # folder data is unbalanced: GX lets it pass
    write_version(root, version(fashion, 150, 40))
    validate(root, {"train": 1500, "test": 400})
    shifted = {}
    for split, (images, labels) in version(fashion, 150, 40, start=150).items():  # new images, but
        keep = (labels != 3) | (np.arange(len(labels)) % 20 == 0)  # 95 % of the dresses left out
        shifted[split] = (images[keep], labels[keep])
    write_version(root, shifted)
    with pytest.raises(ImagegenError) as failed:
        validate(root, {split: len(labels) for split, (_, labels) in shifted.items()})
    message = str(failed.value)
    assert "\n" not in message and "class_proportion_shift" in message
    assert "validate.drift.class_shift_fail" in message and "intensity_psi" not in message


def test_under_dvc_the_profile_persists_and_a_rejected_version_leaves_dvc_lock_alone(project):
    """data/profile is a `persist: true` output: DVC keeps it when validate re-runs, so the gate compares
    with the last accepted version; a failed gate records nothing in dvc.lock and changes no profile."""
    import yaml

    path = project / "dvc.yaml"
    pipeline = yaml.safe_load(path.read_text())
    pipeline["stages"] = {name: pipeline["stages"][name] for name in ("fetch", "prepare", "validate")}
    path.write_text(yaml.safe_dump(pipeline, sort_keys=False))

    def repro(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["dvc", "repro", *args], cwd=project, capture_output=True, text=True, timeout=900)

    assert repro().returncode == 0
    first = json.loads((project / drift.RESULTS).read_text())
    assert first["baseline"] and first["lineage"]["images"] == 70000
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert first["lineage"]["data_version"] == next(o["md5"] for o in lock["prepare"]["outs"])
    assert "data/profile" in [o["path"] for o in lock["validate"]["outs"]]
    profile = (project / drift.PROFILE_DIR / drift.PROFILE).read_bytes()

    set_params(project, validate={"drift": {"sample": 1000}})  # validate runs again, on the same data
    assert repro().returncode == 0
    again = json.loads((project / drift.RESULTS).read_text())
    assert again["baseline"] is None and again["passed"]  # compared with the kept profile, not a new baseline
    assert again["lineage"]["images_added"] == 0
    assert again["checks"]["class_proportion_shift"]["value"] == 0
    lock_before = (project / "dvc.lock").read_text()

    splits = {}
    for split in ("train", "test"):  # a bad batch: every image inverted (manifest rewritten to match)
        with np.load(project / "data" / "prepared" / f"{split}.npz") as arrays:
            splits[split] = (255 - arrays["images"], arrays["labels"])
    write_version(project, splits)
    failed = repro("--single-item", "validate")
    assert failed.returncode != 0
    assert "drift gate failed" in failed.stdout + failed.stderr and "intensity_psi" in failed.stdout + failed.stderr
    assert (project / "dvc.lock").read_text() == lock_before
    assert json.loads((project / drift.PROFILE_DIR / drift.PROFILE).read_text())["images"] == json.loads(profile)["images"]
    assert json.loads((project / "metrics" / "validate.json").read_text())["success"] is False


def test_with_the_gate_off_a_drifted_version_passes_unchecked_and_becomes_the_reference(root, fashion):
    set_params(root, validate={"drift": {"enabled": False}})
    write_version(root, version(fashion, 150, 40))
    validate(root, {"train": 1500, "test": 400})
    write_version(root, inverted(version(fashion, 150, 40)))
    unchecked = validate(root, {"train": 1500, "test": 400})
    assert unchecked["passed"] and unchecked["checks"] == {} and unchecked["baseline"] is None
    assert unchecked["lineage"]["images_added"] == 0  # still measured against the accepted version
    accepted = json.loads((root / drift.PROFILE_DIR / drift.PROFILE).read_text())
    assert accepted["content_sha256"].startswith(unchecked["lineage"]["content_sha256"])

    set_params(root, validate={"drift": {"enabled": True}})  # back on: compared with the inverted version
    again = validate(root, {"train": 1500, "test": 400})
    assert again["passed"] and again["checks"]["intensity_psi"]["value"] < 1e-9


def test_a_profile_of_another_dataset_is_replaced_by_a_new_baseline(root, fashion):
    write_version(root, version(fashion, 150, 40))
    validate(root, {"train": 1500, "test": 400})
    profile = root / drift.PROFILE_DIR / drift.PROFILE
    info = json.loads(profile.read_text())
    profile.write_text(json.dumps({**info, "shape": [1, 32, 32]}))  # as if accepted for 32 x 32 images
    replaced = validate(root, {"train": 1500, "test": 400})
    assert replaced["baseline"].startswith("the last accepted profile is of fashion-mnist [1, 32, 32]")
    assert replaced["checks"] == {} and replaced["lineage"]["previous_data_version"] is None
    assert json.loads(profile.read_text())["shape"] == [1, 28, 28]


# --- the batch view and the class list (issue 27)

def grown(fashion, base: dict, extra_per_class: int, invert: bool) -> dict:
    """`base` plus `extra_per_class` new images of each class (from further on in Fashion-MNIST), inverted or not."""
    extra = version(fashion, extra_per_class * 5 // 6, extra_per_class // 6, start=2400)
    if invert:
        extra = inverted(extra)
    return {split: tuple(np.concatenate([base[split][i], extra[split][i]]) for i in (0, 1)) for split in base}


def test_a_bad_batch_fails_the_batch_view_that_a_large_folder_dilutes(root, fashion):
    """24,000 accepted images, then 300 inverted ones: the whole folder's intensity PSI stays far under its
    failure level, the batch view (the 300 images the accepted version did not hold) fails."""
    base = version(fashion, 2000, 400)
    write_version(root, base)
    first = validate(root, {"train": 20000, "test": 4000})
    assert first["lineage"]["data_version_number"] == 1 and first["lineage"]["batch_images"] is None

    bad = grown(fashion, base, 30, invert=True)  # 25 train + 5 test of each class
    write_version(root, bad)
    with pytest.raises(ImagegenError) as failed:
        validate(root, {"train": 20250, "test": 4050})
    message = str(failed.value)
    assert "\n" not in message and message.startswith("validate: drift gate failed against data version 1 (")
    assert "batch_intensity_psi" in message and "batch_feature_frechet" in message
    result = json.loads((root / drift.RESULTS).read_text())
    checks = result["checks"]
    assert checks["intensity_psi"]["view"] == "folder" and checks["intensity_psi"]["status"] == "ok", checks
    assert checks["intensity_psi"]["value"] < 0.1 < 1 < checks["batch_intensity_psi"]["value"]  # diluted vs not
    assert checks["batch_intensity_psi"]["status"] == "fail" and checks["batch_intensity_psi"]["view"] == "batch"
    assert result["lineage"]["batch_images"] == 300 and result["lineage"]["data_version_number"] == 2
    page = (root / "reports" / "validation" / drift.PAGE).read_text()
    assert "<td>batch</td><td>batch_intensity_psi</td>" in page and "<td>folder</td><td>intensity_psi</td>" in page

    write_version(root, grown(fashion, base, 30, invert=False))  # the same 300, not inverted: both views pass
    good = validate(root, {"train": 20250, "test": 4050})
    assert good["passed"] and good["lineage"]["batch_images"] == 300 and good["lineage"]["data_version_number"] == 2
    assert {c["status"] for name, c in good["checks"].items() if c["view"] == "batch"} <= {"ok", "warn"}
    assert json.loads((root / drift.PROFILE_DIR / drift.PROFILE).read_text())["data_version_number"] == 2


DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def png_folder(folder: Path, fashion, classes: dict[str, int], per_class: int, start: int = 0, invert: bool = False,
               prefix: str = "") -> list[Path]:
    """folder/<name>/*.png: `per_class` Fashion-MNIST training images of class `classes[name]` from `start` on."""
    from PIL import Image

    images, labels = fashion["train"]
    written = []
    for name, label in classes.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(labels == label)[start:start + per_class]:
            path = folder / name / f"{prefix}{i}.png"
            Image.fromarray(255 - images[i] if invert else images[i]).save(path)
            written.append(path)
    return written


def test_a_new_class_fails_until_accepted_and_then_the_shared_classes_still_catch_a_bad_batch(root, fashion):
    from imagegen.data.accepted import CLASS_ORDER
    from imagegen.data.prepare import run_prepare
    from imagegen.data.arrays import read_info

    folder = root / "images"
    set_params(root, data={"dataset": "digits", "folder": str(folder)}, validate={"min_images_per_class": 20})
    (root / CLASS_ORDER).parent.mkdir(parents=True, exist_ok=True)
    (root / CLASS_ORDER).write_text("{}\n")
    nine = {name: label for label, name in enumerate(DIGITS[:9])}
    png_folder(folder, fashion, nine, 150)

    def prepare_and_validate() -> dict:
        cfg = load_config(root / "params.yaml")
        run_prepare(cfg, root, processes=1)
        summary = run_validate(cfg, root).summary
        assert summary["success"]
        return json.loads((root / drift.RESULTS).read_text())

    assert prepare_and_validate()["lineage"]["data_version_number"] == 1
    accepted = json.loads((root / drift.PROFILE_DIR / drift.PROFILE).read_text())
    assert accepted["classes"] == sorted(DIGITS[:9])  # nothing accepted before: in name order

    png_folder(folder, fashion, {"nine": 9}, 150)  # a new class, which sorts between four and one ...
    bad = png_folder(folder, fashion, nine, 34, start=150, invert=True, prefix="inv")  # ... and 306 inverted images
    run_prepare(load_config(root / "params.yaml"), root, processes=1)
    done = subprocess.run(["imagegen", "validate"], cwd=root, capture_output=True, text=True, timeout=600)
    error = [line for line in done.stderr.splitlines() if line.startswith("imagegen validate: error: ")]
    assert done.returncode == 1 and len(error) == 1, done.stderr[-2000:]
    assert ("class list changed since data version 1: added [nine], removed []; not accepted: run "
            "`imagegen accept-classes` to append them") in error[0]
    assert json.loads((root / drift.PROFILE_DIR / drift.PROFILE).read_text()) == accepted  # still the baseline

    done = subprocess.run(["imagegen", "accept-classes", "--by", "tester"], cwd=root, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "class(es) nine accepted by tester at " in done.stdout and "data/classes.json" in done.stdout
    order = json.loads((root / CLASS_ORDER).read_text())["digits"]
    assert order["classes"] == [*sorted(DIGITS[:9]), "nine"] and order["accepted"][0]["by"] == "tester"

    cfg = load_config(root / "params.yaml")
    run_prepare(cfg, root, processes=1)  # accepted: nine appended, no other class moved
    assert read_info(root / "data" / "prepared", "digits").classes == (*sorted(DIGITS[:9]), "nine")
    with pytest.raises(ImagegenError) as failed:
        run_validate(cfg, root)
    message = str(failed.value)
    assert "class list" not in message and "batch_intensity_psi" in message  # the shared classes still checked
    result = json.loads((root / drift.RESULTS).read_text())
    assert result["class_list"]["accepted"] is True and result["class_list"]["added"] == ["nine"]
    assert result["checks"]["batch_intensity_psi"]["status"] == "fail"

    for path in bad:  # the bad batch removed: accepted, and the profile records who accepted the new class
        path.unlink()
    final = prepare_and_validate()
    assert final["passed"] and final["lineage"]["data_version_number"] == 2 and final["lineage"]["batch_images"] == 150
    profile = json.loads((root / drift.PROFILE_DIR / drift.PROFILE).read_text())
    assert profile["classes"][-1] == "nine" and profile["data_version_number"] == 2
    assert profile["class_changes"] == [{"data_version_number": 2, "added": ["nine"], "by": "tester",
                                         "at": order["accepted"][0]["at"]}]
