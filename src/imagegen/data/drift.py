"""The drift gate of the validate stage: is this data version too different from the last accepted one?

Each accepted version leaves a reference profile in data/profile/ (a DVC output of validate with
`persist: true`, so DVC keeps it between runs and `dvc push` shares it):

- profile.json: data version (DVC md5 of data/prepared, content sha256), dataset, shape, classes,
  images per split and class, per-channel intensity histograms (32 bins over 0..255), the original
  size / mode mix when the manifest has such columns;
- feature_mean.npy, feature_cov.npy: mean and covariance of the embedding features of a sample of its images;
- embedding.pt: the weights of the network that made those features;
- image_hashes.npy: the sorted 64-bit content hashes of its images (to tell which images are new).

profile.json also holds `data_version_number` (1 for the first accepted version, one more for each accepted
change) and `class_changes` (each accepted class-list change: classes added, by whom, when). The register stage
logs the profile with the registered version, so validate gates against the champion's profile when there is
a champion (the CLI fetches it; a profile read back from the store is checked like a damaged file would be).

The embedding is a fixed, data-independent network (a small random convolutional net, seed 0)
created with the first profile and copied into every later profile, never retrained. validate runs
before train-features, so the domain net trained on *this* version does not exist yet, and declaring
models/features as a dep of validate would make a cycle; a domain net retrained every week would
also move the feature space under the profile, so last week's mean and covariance could not be
compared with this week's features. A fixed net keeps one space for every version (the distances
mean the same every week), exists on the very first run, and cannot be taught a bad batch.

A new version is compared with the profile: first its class list (a changed list fails unless
data/classes.json accepts the change: imagegen.data.accepted), then, on the classes both versions share,
in two views: the whole folder, and the batch of images added since the accepted version (so a bad
batch is not diluted by a large folder). Each view checks the class-proportion shift (total variation
distance), the intensity distribution (PSI, gated; KS, reported) and the Fréchet distance between the
features relative to the old sample's total variance; the size/mode mix is reported. Each gated check
has a warning and a failure level (validate.drift in params.yaml; the batch's class shift has its own,
as a few hundred images vary more by chance, and a batch under batch_min_images is reported only).
Results and lineage (data version number, images per class, images added, the batch) go to
metrics/drift.json; an HTML page of old vs new to reports/validation/drift.html. The profile is
replaced only when the whole stage passed.
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imagegen.data import arrays
from imagegen.data.accepted import PROFILE, PROFILE_DIR, ClassOrder, read_order
from imagegen.data.datasets import SPLITS
from imagegen.errors import ImagegenError
from imagegen.fsutil import atomic_dir
from imagegen.layout import PREPARED_DIR, data_version

log = logging.getLogger(__name__)

MEAN, COV, EMBEDDING, HASHES = "feature_mean.npy", "feature_cov.npy", "embedding.pt", "image_hashes.npy"
# The checks and lineage of the last validation. Apart from metrics/validate.json, which the training stages
# depend on: re-validating the same data changes the comparison (now against itself), not the data.
RESULTS = Path("metrics/drift.json")
PAGE = "drift.html"
BINS = 32
EMBEDDING_SEED = 0
FEATURES = 256  # the embedding's output size
# Manifest columns describing the original files (folder datasets); their value mix is profiled when present.
MIX_COLUMNS = ("mode", "width", "height")  # the manifest's original mode and size of each image (data/prepare.py)


# --- the statistics (pure functions; tests/unit/test_drift.py checks them against closed forms)

def psi(expected: np.ndarray, actual: np.ndarray, eps: float = 1e-4) -> float:
    """Population stability index of two histograms (counts or shares over the same bins):
    sum (a - e) ln(a / e) over bins, shares clipped at `eps` so an empty bin stays finite."""
    e = np.clip(_shares(expected), eps, None)
    a = np.clip(_shares(actual), eps, None)
    return float(((a - e) * np.log(a / e)).sum())


def ks(expected: np.ndarray, actual: np.ndarray) -> float:
    """Kolmogorov-Smirnov statistic of two histograms over the same bins: the largest gap of their CDFs."""
    return float(np.abs(np.cumsum(_shares(expected)) - np.cumsum(_shares(actual))).max())


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    """Half the L1 distance of two distributions (counts or shares): 0 same, 1 disjoint."""
    return float(np.abs(_shares(p) - _shares(q)).sum() / 2)


def relative_frechet(mu1, sigma1, mu2, sigma2) -> float:
    """The Fréchet distance of two Gaussians divided by the first one's total variance (trace):
    scale-free, so the thresholds do not depend on the embedding's output scale."""
    from imagegen.frechet import frechet_distance

    return frechet_distance(mu1, sigma1, mu2, sigma2) / max(float(np.trace(sigma1)), 1e-12)


def _shares(counts) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    return counts / total if total > 0 else counts


def histograms(images: np.ndarray) -> np.ndarray:
    """Per-channel intensity histograms of uint8 N x C x H x W images: C x BINS counts."""
    step = 256 // BINS
    return np.stack([np.bincount(images[:, c].reshape(-1) // step, minlength=BINS) for c in range(images.shape[1])])


# --- the embedding

def embedding_net(channels: int):
    """The fixed random feature network: three 3x3 conv + ReLU blocks, average pooled to 2 x 2 (256 features)."""
    import torch
    from torch import nn

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(EMBEDDING_SEED)
        net = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    return net.eval().requires_grad_(False)


def embed(net, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """float64 N x 256 features of uint8 N x C x H x W images (scaled to -1..1)."""
    import torch

    with torch.no_grad():
        chunks = [net(torch.from_numpy(images[start:start + batch_size]).float().div(127.5).sub(1)).double()
                  for start in range(0, len(images), batch_size)]
    return torch.cat(chunks).numpy()


# --- profiles

@dataclass
class Profile:
    info: dict  # what profile.json holds
    mean: np.ndarray
    cov: np.ndarray
    net_state: dict = field(repr=False)
    hashes: np.ndarray | None = field(default=None, repr=False)  # sorted uint64 content hashes of its images


def load_profile(folder: Path) -> Profile | None:
    """The last accepted version's profile, or None when there is none yet. The folder may come back from the
    tracking store, so everything in it is checked before use (no pickle: weights_only tensors, plain arrays)."""
    if not (folder / PROFILE).is_file():
        return None
    import torch

    try:
        info = json.loads((folder / PROFILE).read_text())
        mean, cov = np.load(folder / MEAN, allow_pickle=False), np.load(folder / COV, allow_pickle=False)
        state = torch.load(folder / EMBEDDING, map_location="cpu", weights_only=True)
        hashes = np.load(folder / HASHES, allow_pickle=False) if (folder / HASHES).is_file() else None
        check_profile(info, mean, cov, state, hashes)
    except Exception as exc:  # json, numpy and torch raise many kinds for a damaged file
        raise ImagegenError(f"{folder}: damaged drift profile ({type(exc).__name__}: {str(exc)[:120]}); "
                            f"expected {PROFILE}, {MEAN}, {COV} and {EMBEDDING} as validate writes them "
                            "(delete the folder to start a new baseline)") from None
    return Profile(info, mean, cov, state, hashes)


def check_profile(info, mean, cov, state, hashes) -> None:
    """Raise ValueError unless the parts of a profile have the types and shapes validate writes."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(what)

    def counts(value) -> bool:
        return isinstance(value, dict) and all(isinstance(k, str) and type(v) is int and v >= 0
                                               for k, v in value.items())

    need(isinstance(info, dict), "profile.json is not an object")
    for key, kind in (("dataset", str), ("data_version", str), ("content_sha256", str), ("classes", list),
                      ("shape", list), ("images", dict), ("images_per_class", dict), ("histograms", list)):
        need(isinstance(info.get(key), kind), f"{key}: expected {kind.__name__}")
    need(all(isinstance(c, str) for c in info["classes"]), "classes: expected names")
    need(len(info["shape"]) == 3 and all(type(v) is int and v > 0 for v in info["shape"]), "shape: expected C, H, W")
    need(type(info.get("data_version_number", 0)) is int and info.get("data_version_number", 0) >= 0,
         "data_version_number: expected a non-negative integer")
    need(all(counts(info["images_per_class"].get(s)) for s in SPLITS), "images_per_class: expected counts per split")
    histograms = np.asarray(info["histograms"], dtype=np.float64)
    need(histograms.shape == (info["shape"][0], BINS) and np.isfinite(histograms).all() and (histograms >= 0).all(),
         f"histograms: expected {info['shape'][0]} x {BINS} counts")
    need(isinstance(info.get("mix", {}), dict) and all(counts(v) for v in info.get("mix", {}).values()),
         "mix: expected counts per column")
    need(mean.dtype == np.float64 and mean.shape == (FEATURES,) and np.isfinite(mean).all(),
         f"{MEAN}: expected {FEATURES} floats")
    need(cov.dtype == np.float64 and cov.shape == (FEATURES, FEATURES) and np.isfinite(cov).all(),
         f"{COV}: expected {FEATURES} x {FEATURES} floats")
    expected = embedding_net(info["shape"][0]).state_dict()
    need(isinstance(state, dict) and set(state) == set(expected)
         and all(getattr(state[k], "shape", None) == v.shape and state[k].dtype == v.dtype
                 for k, v in expected.items()),
         f"{EMBEDDING}: expected the embedding network's weights")
    changes = info.get("class_changes", [])
    need(isinstance(changes, list) and all(isinstance(c, dict) for c in changes), "class_changes: expected records")
    need(hashes is None or (hashes.dtype == np.uint64 and hashes.ndim == 1), f"{HASHES}: expected uint64 hashes")


def hash_values(hashes: list[str]) -> np.ndarray:
    """The manifest's hex content hashes (validate recomputes them from the arrays) as uint64s: the first 64 bits
    are plenty to tell which images an accepted version held."""
    return np.array([int(h[:16], 16) for h in hashes], dtype=np.uint64)


def added_images(hashes: list[str], accepted: np.ndarray) -> np.ndarray:
    """Indices of the images (hex content hashes, in order) whose content is not among the accepted hashes."""
    return np.flatnonzero(~np.isin(hash_values(hashes), accepted))


def build_profile(root: Path, dataset: str, splits: dict, hashes: dict, sample: int, net) -> tuple[Profile, np.ndarray]:
    """The profile of the data in root/data/prepared (`splits`: its arrays, split -> (images, labels), as validate
    loaded them; `hashes`: split -> each image's hex content hash), embedded with `net`; and the indices of the
    embedded sample."""
    from imagegen.data.integrity import array_hash

    folder = root / PREPARED_DIR
    info = arrays.read_info(folder, dataset)
    splits = {split: (arrays.as_nchw(images), labels) for split, (images, labels) in splits.items()}
    images = np.concatenate([splits[s][0] for s in SPLITS])
    names = list(info.classes)
    counts = {split: {name: int((labels == i).sum()) for i, name in enumerate(names)}
              for split, (_, labels) in splits.items()}
    picked = np.sort(np.random.default_rng(EMBEDDING_SEED).permutation(len(images))[:sample])
    features = embed(net, images[picked])
    content = hashlib.sha256("".join(array_hash(*splits[s]) for s in SPLITS).encode()).hexdigest()
    profile_info = {
        "dataset": info.name, "shape": list(info.shape), "classes": names,
        "data_version": data_version(root), "content_sha256": content,
        "images": {split: len(splits[split][1]) for split in SPLITS}, "images_per_class": counts,
        "histograms": histograms(images).tolist(), "mix": manifest_mix(folder), "sample": len(picked),
    }
    accepted = np.unique(np.concatenate([hash_values(hashes[s]) for s in SPLITS]))
    return Profile(profile_info, features.mean(axis=0), np.cov(features, rowvar=False),
                   {k: v.clone() for k, v in net.state_dict().items()}, accepted), picked


def manifest_mix(folder: Path) -> dict[str, dict[str, int]]:
    """Value counts of the manifest's original-size/mode columns (only those it has)."""
    import pandas as pd
    import pyarrow.parquet as pq

    try:
        columns = pq.read_schema(folder / "manifest.parquet").names
        present = [c for c in MIX_COLUMNS if c in columns]
        if not present:
            return {}
        frame = pd.read_parquet(folder / "manifest.parquet", columns=present)
    except (OSError, ValueError):
        return {}
    return {c: {str(k): int(v) for k, v in frame[c].astype(str).value_counts().head(50).items()} for c in present}


def save_profile(folder: Path, profile: Profile) -> None:
    import torch

    with atomic_dir(folder) as tmp:
        (tmp / PROFILE).write_text(json.dumps(profile.info, indent=1) + "\n")
        np.save(tmp / MEAN, profile.mean, allow_pickle=False)  # .npy, not .npz: no zip timestamps, so the
        np.save(tmp / COV, profile.cov, allow_pickle=False)  # same data gives the same bytes (and DVC hash)
        np.save(tmp / HASHES, profile.hashes, allow_pickle=False)
        torch.save(profile.net_state, tmp / EMBEDDING)


# --- the gate

@dataclass
class Gate:
    checks: list[dict]  # name, view (folder | batch), value, warn, fail, status (ok | warn | fail | info)
    lineage: dict
    new: Profile
    baseline: str | None  # why there is no comparison (first version, another dataset), else None
    class_list: dict = field(default_factory=dict)  # added, removed, accepted, failure (a sentence or None)

    @property
    def failures(self) -> list[str]:
        failed = [f"{c['name']} {c['value']:.4g} >= fail level {c['fail']:g} (validate.drift.{c['param']}_fail)"
                  for c in self.checks if c["status"] == "fail"]
        return ([self.class_list["failure"]] if self.class_list.get("failure") else []) + failed

    @property
    def passed(self) -> bool:
        return not self.failures

    def summary(self) -> dict:
        return {"passed": self.passed, "baseline": self.baseline, "class_list": self.class_list,
                "checks": {c["name"]: {"view": c["view"], "value": round(c["value"], 6), "status": c["status"]}
                           for c in self.checks}}

    def raise_if_failed(self) -> None:
        if self.failures:
            raise ImagegenError(f"validate: drift gate failed against data version "
                                f"{self.lineage['previous_data_version_number']} "
                                f"({self.lineage['previous_data_version']}): " + "; ".join(self.failures)
                                + f" (old vs new: reports/validation/{PAGE})")

    def accept(self, root: Path) -> None:
        """This version passed: its profile becomes the reference of the next one."""
        save_profile(root / PROFILE_DIR, self.new)


def run_gate(cfg, root: Path, report_dir: Path, splits: dict, hashes: dict, baseline: Path | None = None) -> Gate:
    """Profile the prepared data (`splits`: split -> (images, labels); `hashes`: split -> hex content hash of each
    image), compare it with the last accepted profile (the folder `baseline`, e.g. the champion's from the tracking
    store; else data/profile), write the HTML page."""
    drift = cfg.validate_.drift
    old = load_profile(baseline or root / PROFILE_DIR)
    channels = arrays.as_nchw(splits[SPLITS[0]][0]).shape[1]
    same_dataset = old is not None and old.info["dataset"] == cfg.data.dataset
    net = embedding_net(channels)
    if same_dataset and old.info["shape"][0] == channels:
        net.load_state_dict(old.net_state)
    new, picked = build_profile(root, cfg.data.dataset, splits, hashes, drift.sample, net)
    comparable = same_dataset and old.info["shape"] == new.info["shape"]
    baseline_note = None
    if old is None:
        baseline_note = "no accepted version before this one: it becomes the baseline"
    elif not comparable:
        baseline_note = (f"the last accepted profile is of {old.info['dataset']} {old.info['shape']}, "
                         f"not {new.info['dataset']} {new.info['shape']}: this version becomes the new baseline")
    reference = old if comparable else None
    class_list = class_list_change(reference, new, read_order(root, cfg.data.dataset)) if reference else {}
    new.info["data_version_number"] = version_number(reference, new, root)
    new.info["class_changes"] = [*(reference.info.get("class_changes", []) if reference else []),
                                 *([{"data_version_number": new.info["data_version_number"], **class_list["record"]}]
                                   if class_list.get("record") else [])]
    checks, batch = [], None
    if reference is not None:
        images = np.concatenate([arrays.as_nchw(splits[s][0]) for s in SPLITS])
        labels = np.concatenate([splits[s][1] for s in SPLITS])
        if reference.hashes is not None:
            batch = added_images([h for s in SPLITS for h in hashes[s]], reference.hashes)
        if drift.enabled and class_list["shared"]:
            checks = compare_views(reference, images, labels, new.info["classes"], class_list["shared"], picked,
                                   batch, net, drift) + mix_checks(reference, new)
    gate = Gate(checks, lineage(reference, new, batch, class_list), new, baseline_note,
                {k: v for k, v in class_list.items() if k != "record"})
    for check in checks:
        log.info("validate: drift %s = %.4g (%s)", check["name"], check["value"], check["status"])
    (report_dir / PAGE).write_text(page(gate, reference))
    return gate


def version_number(old: Profile | None, new: Profile, root: Path) -> int:
    """1 for the first accepted version; the same number for the same content; else one more than the highest
    number accepted before, here (data/profile) or in the baseline (the champion's)."""
    if old is not None and old.info["content_sha256"] == new.info["content_sha256"]:
        return old.info.get("data_version_number", 0) or 1
    highest = old.info.get("data_version_number", 0) if old else 0
    try:
        local = json.loads((root / PROFILE_DIR / PROFILE).read_text()).get("data_version_number", 0)
        highest = max(highest, local if type(local) is int else 0)
    except (OSError, ValueError, AttributeError):
        pass
    return highest + 1


def class_list_change(old: Profile, new: Profile, order: ClassOrder) -> dict:
    """The class list of `new` against the accepted one: shared, added, removed classes; whether the change is
    accepted (data/classes.json lists exactly the new numbering, the old classes first) and, when not, the
    failure sentence."""
    before, now = old.info["classes"], new.info["classes"]
    added, removed = [c for c in now if c not in before], [c for c in before if c not in now]
    result = {"shared": [c for c in before if c in now], "added": added, "removed": removed, "failure": None}
    if now == before:
        return result
    stable = now[:len(before)] == before
    accepted = stable and not removed and list(order.classes) == now
    result["accepted"] = accepted
    if accepted:
        record = next((a for a in reversed(order.accepted) if set(added) <= set(a.get("added", []))), {})
        result["record"] = {"added": added, "by": str(record.get("by", "?")), "at": str(record.get("at", "?"))}
        return result
    number = old.info.get("data_version_number", 0)
    if removed:
        why = "a removed class is refused (its label would change meaning): put it back or use a new data.dataset"
    elif added and list(order.classes) != now:
        why = "not accepted: run `imagegen accept-classes` to append them"
    else:
        why = "the accepted classes changed order (labels would change meaning): restore data/classes.json"
    result["failure"] = (f"class list changed since data version {number}: added [{', '.join(added)}], removed "
                         f"[{', '.join(removed)}]; {why}")
    return result


def compare_views(old: Profile, images: np.ndarray, labels: np.ndarray, classes: list[str], shared: list[str],
                  picked: np.ndarray, batch: np.ndarray | None, net, drift) -> list[dict]:
    """The checks against the accepted profile `old`, on the classes both versions share (`shared`, in the old
    order; `classes`: the new numbering) in two views: the whole folder (its embedded sample `picked`) and the
    batch of images added since `old` (indices; None when `old` holds no image hashes; up to drift.sample of them
    embedded)."""
    reference = (np.array([sum(old.info["images_per_class"][s][c] for s in SPLITS) for c in shared]),
                 np.asarray(old.info["histograms"], dtype=np.float64), old.mean, old.cov)
    shared_labels = [classes.index(c) for c in shared]
    in_shared = np.isin(labels, shared_labels)
    folder = stats(images, labels, shared_labels, np.flatnonzero(in_shared), picked[in_shared[picked]], net)
    checks = gated_checks("", reference, folder, drift, gated=True)
    if batch is not None:
        chosen = batch[in_shared[batch]]
        embedded = np.sort(np.random.default_rng(EMBEDDING_SEED).permutation(chosen)[:drift.sample])
        if len(chosen) >= 2:  # a covariance needs two
            checks += gated_checks("batch_", reference, stats(images, labels, shared_labels, chosen, embedded, net),
                                   drift, gated=len(chosen) >= drift.batch_min_images)
    checks.append({"name": "intensity_ks", "view": "folder", "param": None,
                   "value": max(ks(reference[1][c], folder[1][c]) for c in range(len(folder[1]))),
                   "warn": None, "fail": None, "status": "info"})
    return checks


def stats(images: np.ndarray, labels: np.ndarray, shared_labels: list[int], chosen: np.ndarray, embedded: np.ndarray,
          net) -> tuple:
    """(class counts over the shared labels, per-channel histograms, feature mean, feature covariance) of the
    images `chosen`, the features from the images `embedded`."""
    features = embed(net, images[embedded])
    counts = np.bincount(labels[chosen], minlength=max(shared_labels) + 1)[shared_labels]
    return counts, histograms(images[chosen]), features.mean(axis=0), np.cov(features, rowvar=False)


def gated_checks(prefix: str, old: tuple, new: tuple, drift, gated: bool) -> list[dict]:
    """Class shift, intensity PSI and Fréchet distance of `new` against `old` (both as `stats` gives them), each
    with its warning and failure levels (validate.drift.<prefix><check>_warn/_fail for the class shift, the same
    levels for both views otherwise); not gated: reported as info (a batch under drift.batch_min_images)."""
    channels = range(len(new[1]))
    values = [
        ("class_proportion_shift", f"{prefix}class_shift", total_variation(old[0], new[0])),
        ("intensity_psi", "intensity_psi", max(psi(old[1][c], new[1][c]) for c in channels)),
        ("feature_frechet", "frechet", relative_frechet(old[2], old[3], new[2], new[3])),
    ]
    checks = []
    for name, param, value in values:
        warn, fail = getattr(drift, f"{param}_warn"), getattr(drift, f"{param}_fail")
        status = "fail" if value >= fail else "warn" if value >= warn else "ok"
        checks.append({"name": prefix + name, "view": "batch" if prefix else "folder", "param": param, "value": value,
                       "warn": warn, "fail": fail, "status": status if gated else "info"})
    return checks


def mix_checks(old: Profile, new: Profile) -> list[dict]:
    """The original size / mode mix of both versions (folder datasets), reported only."""
    checks = []
    for column in sorted(set(old.info.get("mix", {})) & set(new.info.get("mix", {}))):
        keys = sorted(set(old.info["mix"][column]) | set(new.info["mix"][column]))
        value = total_variation(*(np.array([p.info["mix"][column].get(k, 0) for k in keys]) for p in (old, new)))
        checks.append({"name": f"{column}_mix_shift", "view": "folder", "param": None, "value": value, "warn": None,
                       "fail": None, "status": "info"})
    return checks


def lineage(old: Profile | None, new: Profile, batch: np.ndarray | None, class_list: dict) -> dict:
    """Data version (DVC md5 and number), images per class, images added per class since the previous accepted
    version, and the batch (images whose content the previous version did not hold)."""
    names = new.info["classes"]
    now = {n: sum(new.info["images_per_class"][s][n] for s in SPLITS) for n in names}
    before = ({n: sum(old.info["images_per_class"][s].get(n, 0) for s in SPLITS) for n in names}
              if old is not None else {n: 0 for n in names})
    added = {n: now[n] - before[n] for n in names}
    return {"data_version": new.info["data_version"], "data_version_number": new.info["data_version_number"],
            "content_sha256": new.info["content_sha256"][:16],
            "previous_data_version": old.info["data_version"] if old else None,
            "previous_data_version_number": old.info.get("data_version_number") if old else None,
            "images": sum(now.values()), "images_per_class": now,
            "images_added": sum(added.values()), "added_per_class": added,
            "batch_images": None if batch is None else int(len(batch)),
            "classes_added": class_list.get("added", []), "classes_removed": class_list.get("removed", [])}


# --- the HTML page: old vs new

def page(gate: Gate, old: Profile | None) -> str:
    new, lin = gate.new, gate.lineage
    verdict = ("FAILED: " + "; ".join(gate.failures)) if gate.failures else (gate.baseline or "passed")
    rows = "".join(f"<tr class='{c['status']}'><td>{c['view']}</td><td>{c['name']}</td><td>{c['value']:.4g}</td>"
                   f"<td>{'' if c['warn'] is None else c['warn']}</td><td>{'' if c['fail'] is None else c['fail']}</td>"
                   f"<td>{c['status']}</td></tr>" for c in gate.checks)
    names = new.info["classes"]
    total_old = sum(old.info["images"].values()) if old else 0
    total_new = sum(new.info["images"].values())
    class_rows = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{lin['images_per_class'][n] - lin['added_per_class'][n]}</td>"
        f"<td>{_pct(lin['images_per_class'][n] - lin['added_per_class'][n], total_old)}</td>"
        f"<td>{lin['images_per_class'][n]}</td><td>{_pct(lin['images_per_class'][n], total_new)}</td>"
        f"<td>{lin['added_per_class'][n]:+d}</td></tr>" for n in names)
    changes = gate.class_list
    class_text = ("no previous version" if not changes else "unchanged" if not changes["added"] + changes["removed"]
                  else f"added {changes['added']}, removed {changes['removed']}: "
                  + (changes["failure"] or "accepted (data/classes.json)"))
    batch_text = "images" if lin["batch_images"] is None else f"{lin['batch_images']} images"
    charts = "".join(_histogram_svg(c, old.info["histograms"][c] if old else None, new.info["histograms"][c])
                     for c in range(len(new.info["histograms"])))
    mix = "".join(f"<h3>{html.escape(col)}</h3><p>old: {html.escape(json.dumps((old.info.get('mix') or {}).get(col, {}) if old else {}))}"
                  f"<br>new: {html.escape(json.dumps(values))}</p>" for col, values in new.info.get("mix", {}).items())
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Drift: old vs new data</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px}}
tr.fail{{background:#fdd}}tr.warn{{background:#ffd}}</style></head><body>
<h1>Drift gate: {html.escape(verdict)}</h1>
<p>Previous accepted version {lin['previous_data_version_number']} <code>{lin['previous_data_version']}</code>
({total_old} images) vs this version {lin['data_version_number']} <code>{lin['data_version']}</code>
({total_new} images, {lin['images_added']:+d}).</p>
<p>Class list: {html.escape(class_text)}</p>
<h2>Checks</h2><p>Two views against the accepted version, on the classes both share: <b>folder</b>, every image of
this version; <b>batch</b>, the {batch_text} whose content the accepted version did not hold (a bad batch is not
diluted by a large folder).</p><table><tr><th>view</th><th>check</th><th>value</th><th>warn at</th><th>fail at</th><th>status</th></tr>{rows}</table>
<h2>Images per class</h2><table><tr><th>class</th><th>old</th><th>old share</th><th>new</th><th>new share</th><th>added</th></tr>{class_rows}</table>
<h2>Intensity histograms (share of pixels per bin of {256 // BINS} levels; grey: old, blue: new)</h2>{charts}
{('<h2>Original size / mode mix</h2>' + mix) if mix else ''}
</body></html>
"""


def _pct(n: int, total: int) -> str:
    return f"{100 * n / total:.2f} %" if total else ""


def _histogram_svg(channel: int, old, new) -> str:
    width, height, bar = 640, 160, 640 / BINS
    shares = [(_shares(old) if old is not None else None, "#999"), (_shares(new), "#36c")]
    top = max(float(s.max()) for s, _ in shares if s is not None) or 1.0
    bars = []
    for offset, (values, colour) in enumerate(shares):
        if values is None:
            continue
        for i, v in enumerate(values):
            h = height * float(v) / top
            bars.append(f"<rect x='{i * bar + offset * bar / 2:.1f}' y='{height - h:.1f}' width='{bar / 2 - 1:.1f}' "
                        f"height='{h:.1f}' fill='{colour}'/>")
    return f"<p>channel {channel}</p><svg width='{width}' height='{height}'>{''.join(bars)}</svg>"
