"""Reading the MLflow model registry: a registered imagegen model as a torch module (`imagegen sample`,
the warm start of training, the register stage's fair contest). Kept apart from registry.py (which
writes the registry and imports the evaluation code) so that training depends only on this.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

from imagegen import tracking
from imagegen.errors import ImagegenError

METRIC_TAG = "metric."  # prefix of a registered version's tags holding its evaluation metrics
MODEL_SHA_TAG = "model_sha256"  # a registered version's tag: tree_sha256 of its files as stored
REGISTRY_NOTE = "registered_model_meta"  # name and version, which MLflow adds to a models:/NAME/VERSION download
MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))$")


def describe(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


@contextlib.contextmanager
def quiet_mlflow() -> Iterator[None]:
    """No progress bars, prints or advice from MLflow while logging, registering or downloading a model:
    the stage's own log says what happened. Errors still raise."""
    import os

    logger = logging.getLogger("mlflow")
    level, bar = logger.level, os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    logger.setLevel(logging.ERROR)
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
        if bar is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = bar


def load_registered(uri: str, device: str = "cpu", with_version: bool = False):
    """The torch module and ModelDescription of a registered version (models:/NAME@ALIAS or models:/NAME/VERSION);
    with_version: also the MLflow ModelVersion (module, description, version). Only the weights are loaded
    (weights_only), after their sha256 is checked against the one recorded at registration."""
    from imagegen.models.io import load_model

    version = resolve_version(uri)
    with checked_download(uri, version, whole=False) as local:
        module, description = load_model(local / model_artifact(uri, version, local), device)
        return (module, description, version) if with_version else (module, description)


def serve_registered(uri: str, host: str, port: int) -> int:
    """Serve a registered version with `mlflow models serve` from a local copy whose every file matched the
    model_sha256 recorded at registration: the pickled pyfunc is unpickled only once it is known to be the
    registered one. Returns the server's exit code (when it stops)."""
    import subprocess
    import sys

    version = resolve_version(uri)
    with checked_download(uri, version, whole=True) as local:
        cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(local), "--env-manager", "local",
               "-h", host, "-p", str(port)]
        return subprocess.run(cmd).returncode


def resolve_version(uri: str):
    """The MLflow ModelVersion that models:/NAME@ALIAS or models:/NAME/VERSION names, or a one-line error."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    match = MODEL_URI.match(uri)
    if not match:
        raise ImagegenError(f"--model {uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    tracking_uri = tracking_store(Path("."))
    name, alias = match["name"], match["alias"]
    try:
        client = MlflowClient()
        return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, match["version"])
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise ImagegenError(f"{uri}: no such registered model or {'alias' if alias else 'version'} in the "
                                f"MLflow registry at {tracking_uri}") from None
        raise ImagegenError(f"MLflow tracking at {tracking_uri} is not usable: {describe(exc)}") from None


@contextlib.contextmanager
def checked_download(uri: str, version, whole: bool) -> Iterator[Path]:
    """The version's files in a private temp folder, checked against the digests recorded at registration:
    model_sha256 (every file) when recorded, which `whole` requires, and weights_sha256. A replaced or
    damaged file in the store is refused with a one-line error before anything is loaded."""
    import mlflow

    from imagegen.fsutil import sha256_file
    from imagegen.models.io import WEIGHTS

    label = f"{uri}: version {version.version}"
    recorded = version.tags.get(MODEL_SHA_TAG)
    if whole and not recorded:
        raise ImagegenError(f"{label} has no {MODEL_SHA_TAG} tag (registered before digests were recorded): "
                            "refused, as its files cannot be checked before they are unpickled")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            with quiet_mlflow():
                local = Path(mlflow.artifacts.download_artifacts(f"models:/{version.name}/{version.version}",
                                                                 dst_path=tmp))
        except Exception as exc:  # artifact stores raise many kinds
            raise ImagegenError(f"{label}: could not download it from MLflow at {mlflow.get_tracking_uri()}: "
                                f"{describe(exc)}") from None
        if recorded and stored_sha256(local) != recorded:
            raise ImagegenError(f"{label}: its files in the artifact store do not match the {MODEL_SHA_TAG} recorded "
                                "at registration (replaced or damaged); refused, nothing loaded")
        weights = local / model_artifact(uri, version, local) / WEIGHTS
        if weights.is_file() and sha256_file(weights) != version.tags.get("weights_sha256"):
            raise ImagegenError(f"{label}: {WEIGHTS} in the artifact store does not match the weights_sha256 recorded "
                                "at registration (replaced or damaged); refused, nothing loaded")
        yield local


def stored_sha256(local: Path) -> str:
    """The model_sha256 of a downloaded model: every file as the store holds it."""
    from imagegen.fsutil import tree_sha256

    (local / REGISTRY_NOTE).unlink(missing_ok=True)  # written by the download, not from the store
    return tree_sha256(local)


def model_artifact(uri: str, version, local: Path) -> str:
    """The path of the model folder inside a downloaded version (its pyfunc 'model' artifact)."""
    from mlflow.models import Model

    try:
        artifacts = Model.load(local / "MLmodel").flavors["python_function"].get("artifacts", {})
    except (OSError, KeyError, ValueError) as exc:
        raise ImagegenError(f"{uri}: version {version.version} has no readable MLmodel file ({describe(exc)})") from None
    if "model" not in artifacts:
        raise ImagegenError(f"{uri}: version {version.version} is not an imagegen model (no 'model' artifact)")
    return artifacts["model"]["path"]


def tracking_store(root: Path) -> str:
    """The tracking URI for reading the registry; the embedded store must exist already."""
    uri = tracking.configure(root)
    if uri == tracking.embedded_uri(root) and not (root / tracking.EMBEDDED_DB).exists():
        raise ImagegenError(f"no model registry at {uri}: run the pipeline (dvc repro) here first, or set "
                            "MLFLOW_TRACKING_URI to a tracking server")
    tracking.check_uri(uri)
    return uri


def tag_float(version, metric: str) -> float | None:
    """A registered version's recorded metric (tag metric.<name>), None when it has none or `version` is None."""
    if version is None:
        return None
    try:
        return float(version.tags[f"{METRIC_TAG}{metric}"])
    except (KeyError, ValueError):
        return None
