"""The accepted data profile travels with the champion: the register stage logs data/profile with the
registered versions (artifact folder `data_profile` of the register run, tags `data_version_number` and
`data_profile_run_id` on each version), and validate / accept-classes read it back, so every clone and worker gates against the same
baseline. Without a champion (or one registered before profiles travelled) the local data/profile is it.
What comes back from the store is untrusted: drift.load_profile checks every part of it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from imagegen import tracking
from imagegen.data.accepted import PROFILE, PROFILE_ARTIFACT, PROFILE_DIR, PROFILE_RUN_TAG, VERSION_TAG
from imagegen.errors import ImagegenError
from imagegen.layout import MODEL_KINDS, registered_model_name

log = logging.getLogger(__name__)

PROGRESS_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


def log_profile(root: Path) -> None:
    """Log data/profile (when there is one) to the active run: the register run, which creates the versions."""
    import mlflow

    if (root / PROFILE_DIR / PROFILE).is_file():
        mlflow.log_artifacts(str(root / PROFILE_DIR), PROFILE_ARTIFACT)


def champion_profile(root: Path, dataset: str, dst: Path) -> tuple[Path, str] | None:
    """Download the profile logged with the champion of <dataset>-gan / -vae (the higher data version number)
    into dst; (its folder, which champion) or None when there is no champion with a profile. Never creates an
    embedded store that does not exist yet."""
    uri = tracking.configure(root)
    if uri == tracking.embedded_uri(root) and not (root / tracking.EMBEDDED_DB).exists():
        return None
    tracking.check_uri(uri)
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    found = []
    names = [registered_model_name(dataset, kind) for kind in MODEL_KINDS]
    # Only models that exist: MLflow's basic-auth app answers PERMISSION_DENIED, not "does not exist", for others.
    # (A dataset name holds no quote: config.DATASET_NAME.)
    try:
        existing = {m.name for m in client.search_registered_models(f"name LIKE '{dataset}-%'")}
    except MlflowException as exc:
        raise ImagegenError(f"MLflow tracking at {uri}: cannot list the registered models ({exc.error_code})") from None
    for name in names:
        if name not in existing:
            continue
        try:
            version = client.get_model_version_by_alias(name, "champion")
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                continue
            raise ImagegenError(f"MLflow tracking at {uri}: cannot read the champion of {name} "
                                f"({exc.error_code})") from None
        number = version.tags.get(VERSION_TAG, "")
        if number.isdigit():
            found.append((int(number), f"{version.name} v{version.version}",
                          version.tags.get(PROFILE_RUN_TAG, version.run_id)))
    if not found:
        return None
    number, which, run_id = max(found, key=lambda f: f[0])  # both champions come from one run as a rule
    bar = os.environ.get(PROGRESS_BAR)
    os.environ[PROGRESS_BAR] = "false"  # the stage's log says what happened
    try:
        folder = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=PROFILE_ARTIFACT, dst_path=str(dst))
    except Exception as exc:  # artifact stores raise many kinds
        raise ImagegenError(f"MLflow tracking at {uri}: cannot download the data profile of champion {which} "
                            f"(run {run_id}, {PROFILE_ARTIFACT}/): {type(exc).__name__}") from None
    finally:
        if bar is None:
            os.environ.pop(PROGRESS_BAR, None)
        else:
            os.environ[PROGRESS_BAR] = bar
    log.info("drift baseline: the profile of champion %s (data version %d)", which, number)
    return Path(folder), which
