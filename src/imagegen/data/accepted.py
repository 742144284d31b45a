"""What the last accepted data version is: its drift profile folder, and the class order of folder datasets.

The class order lives in data/classes.json, committed with the code (one entry per folder dataset):
`{"<dataset>": {"classes": [...], "accepted": [{"added": [...], "by": ..., "at": ...}, ...]}}`.
prepare numbers a folder's classes by that list, classes it does not list following in name order, and
it is a declared DVC dep of prepare and validate. It cannot live in the profile: the profile is validate's
output, and prepare (which assigns the labels) runs before validate. `imagegen accept-classes` is the one
writer: it appends the folder's new classes to the accepted profile's classes, so a class keeps its index
for good and a champion's labels never change meaning. A removed class is refused, never accepted (its
index would be left empty or reused). The empty file `{}` means nothing was ever accepted: names in order.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from imagegen.errors import ImagegenError
from imagegen.fsutil import write_json

PROFILE_DIR = Path("data/profile")  # validate's output: the last accepted version's drift profile
PROFILE = "profile.json"
CLASS_ORDER = Path("data/classes.json")
PROFILE_ARTIFACT = "data_profile"  # the folder of the register run holding the accepted profile
VERSION_TAG = "data_version_number"  # the registered version's tag: the data version it was trained on
PROFILE_RUN_TAG = "data_profile_run_id"  # the registered version's tag: the run holding its PROFILE_ARTIFACT


@dataclass(frozen=True)
class ClassOrder:
    classes: tuple[str, ...]  # the accepted order; empty when nothing was accepted for the dataset
    accepted: tuple[dict, ...]  # the acceptances: added classes, by whom, when


def read_order(root: Path, dataset: str) -> ClassOrder:
    """The dataset's accepted class order (an empty one when data/classes.json lacks the dataset or the file)."""
    path = root / CLASS_ORDER
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return ClassOrder((), ())
    except (OSError, UnicodeDecodeError, ValueError):
        raise ImagegenError(f"{path}: not valid JSON; expected {{dataset: {{classes: [...], accepted: [...]}}}} "
                            "as `imagegen accept-classes` writes it") from None
    entry = raw.get(dataset) if isinstance(raw, dict) else None
    if entry is None:
        return ClassOrder((), ())
    classes, accepted = (entry.get("classes"), entry.get("accepted")) if isinstance(entry, dict) else (None, None)
    names = isinstance(classes, list) and all(isinstance(c, str) for c in classes) and len(set(classes)) == len(classes)
    if not names or not isinstance(accepted, list) or not all(isinstance(a, dict) for a in accepted):
        raise ImagegenError(f"{path}: {dataset}: expected classes (distinct names) and accepted (a list of records)")
    return ClassOrder(tuple(classes), tuple(accepted))


def numbering(found: Sequence[str], order: ClassOrder) -> tuple[str, ...]:
    """The folder's classes in label order: the accepted ones in their accepted order, then the others by name."""
    listed = [c for c in order.classes if c in found]
    return (*listed, *sorted(set(found) - set(order.classes)))


def accept_classes(root: Path, dataset: str, baseline: Sequence[str], found: Sequence[str], by: str,
                   number: int) -> dict:
    """Accept the classes of `found` that `baseline` (the accepted profile's classes, data version `number`)
    lacks: appended to the order in data/classes.json with who and when. A removed class is refused."""
    removed = [c for c in baseline if c not in found]
    if removed:
        raise ImagegenError(f"accept-classes: class(es) {', '.join(removed)} of data version {number} are missing "
                            "from the folder; a removed class cannot be accepted (its index would change meaning): "
                            "put it back, or start a new baseline under another data.dataset name")
    added = sorted(set(found) - set(baseline))
    if not added:
        raise ImagegenError(f"accept-classes: the folder holds the classes of data version {number}; nothing to accept")
    path = root / CLASS_ORDER
    previous = read_order(root, dataset).accepted  # refuses a damaged file before it is rewritten
    raw = json.loads(path.read_text()) if path.is_file() else {}
    record = {"added": added, "after_data_version_number": number, "by": by,
              "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    raw[dataset] = {"classes": [*baseline, *added], "accepted": [*previous, record]}
    write_json(path, raw)
    return record
