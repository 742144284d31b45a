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
    with_version: also the MLflow ModelVersion (module, description, version)."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    from imagegen.models.io import load_model

    match = MODEL_URI.match(uri)
    if not match:
        raise ImagegenError(f"--model {uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    tracking_uri = tracking_store(Path("."))
    client = MlflowClient()
    name, alias = match["name"], match["alias"]
    try:
        version = (client.get_model_version_by_alias(name, alias) if alias
                   else client.get_model_version(name, match["version"]))
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise ImagegenError(f"{uri}: no such registered model or {'alias' if alias else 'version'} in the "
                                f"MLflow registry at {tracking_uri}") from None
        raise ImagegenError(f"MLflow tracking at {tracking_uri} is not usable: {describe(exc)}") from None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            with quiet_mlflow():
                local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version.version}", dst_path=tmp))
        except Exception as exc:  # artifact stores raise many kinds
            raise ImagegenError(f"{uri}: could not download version {version.version} from MLflow at "
                                f"{tracking_uri}: {describe(exc)}") from None
        artifacts = Model.load(local / "MLmodel").flavors["python_function"].get("artifacts", {})
        if "model" not in artifacts:
            raise ImagegenError(f"{uri}: version {version.version} is not an imagegen model (no 'model' artifact)")
        module, description = load_model(local / artifacts["model"]["path"], device)
        return (module, description, version) if with_version else (module, description)


def tracking_store(root: Path) -> str:
    """The tracking URI for reading the registry; the embedded store must exist already."""
    uri = tracking.configure(root)
    if uri == tracking.embedded_uri(root) and not (root / tracking.EMBEDDED_DB).exists():
        raise ImagegenError(f"no model registry at {uri}: run the pipeline (dvc repro) here first, or set "
                            "MLFLOW_TRACKING_URI to a tracking server")
    tracking.check_uri(uri)
    return uri
