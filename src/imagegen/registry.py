"""The register stage: trained models -> MLflow registered model versions, champion/challenger aliases.

For each kind (gan, vae) the registered model is `<dataset>-<kind>`. A new version is created
only for weights not registered before (tag weights_sha256). The new version gets the alias
`challenger`, and `champion` too when there is no champion or it beats the champion's
register.metric by register.margin (relative) and, for fid, by register.sigmas standard deviations of the
difference (each side's bootstrap `fid_std`): a gain within the noise of a small test split is no gain. The
decision lands in metrics/register.json and on the version (tags, description).

Order of writes, so that a failure midway leaves nothing that looks finished: log the model ->
create the version (tags, `registration: pending`, no alias) -> write the contest tags, the model card
and the `decision` tag -> move the aliases (challenger, then champion) -> `registration: complete`.
An alias therefore never points at a version without a recorded decision. The next run finds a pending
version by its weights and finishes it: it moves the aliases as recorded when the champion is still the
one the decision was made against, else it decides again (the recorded decision is rolled back).

A candidate trained on an older data version (`data_version_number`, see data/drift.py) than the
champion's is never promoted. Registrations against one tracking store are serialised by a lock keyed
on its normalised URI: a host-local file lock, and with a Prefect API (PREFECT_API_URL: the team stack)
also a Prefect global concurrency limit, so registrars on different machines wait for each other; both
give up after IMAGEGEN_REGISTER_LOCK_TIMEOUT_S seconds. The champion is read inside the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from imagegen import baseline, lineage, tracking
from imagegen.config import Config, model_params
from imagegen.data.accepted import PROFILE_RUN_TAG, VERSION_TAG
from imagegen.errors import ImagegenError
from imagegen.fsutil import sha256_file, write_json
from imagegen.layout import experiment_name, registered_model_name
from imagegen.models.io import META, WEIGHTS, read_description
from imagegen.models.kinds import GENERATORS
from imagegen.registry_reader import METRIC_TAG, MODEL_SHA_TAG, describe, quiet_mlflow, stored_sha256, tag_float

if TYPE_CHECKING:
    from imagegen.evaluation.contest import Contest

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
LOWER_IS_BETTER = {"fid": True, "kid_mean": True, "precision": False, "recall": False}
EVALUATION = Path("metrics") / "evaluate.json"
OUTPUT = Path("metrics") / "register.json"
DECISION_TAG = "decision"  # promoted / kept: written before any alias moves
REGISTRATION_TAG = "registration"  # pending from creation until the aliases are moved, then complete
DATA_NUMBER_TAG = VERSION_TAG  # the monotonic data version a version was trained on
DRIFT = Path("metrics") / "drift.json"
FAULT_ENV = "IMAGEGEN_FAULT"  # register:<step>: the process dies (SIGKILL) at that step, for tests
LOCK_TIMEOUT_ENV, LOCK_TIMEOUT_S = "IMAGEGEN_REGISTER_LOCK_TIMEOUT_S", 1800.0


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def decide(metric: str, value: float, champion_value: float | None, margin: float, noise: float = 0.0) -> Decision:
    """Whether a challenger with `value` replaces a champion with `champion_value` (None: no champion): better by
    the relative `margin` and by `noise`, the metric's uncertainty in its own units (`Uncertainty.noise`)."""
    if champion_value is None or not math.isfinite(champion_value):
        return Decision(True, f"no champion {metric} to beat")
    lower = LOWER_IS_BETTER[metric]
    needed = max(abs(champion_value) * margin, noise)
    better = value < champion_value - needed if lower else value > champion_value + needed
    direction = "lower" if lower else "higher"
    verdict = "beats" if better else "does not beat"
    noise_text = f", noise {noise:.3g}" if noise else ""
    return Decision(better, f"{metric} {value:.6g} {verdict} champion's {champion_value:.6g} "
                            f"({direction} is better, margin {margin:g}{noise_text})")


@dataclass(frozen=True)
class Uncertainty:
    """The challenger's standard deviation of the metric (evaluate's bootstrap) and how many standard deviations
    of the difference the contest asks for (register.sigmas)."""
    std: float
    sigmas: float

    @classmethod
    def of(cls, cfg: Config, metrics: dict[str, float]) -> Uncertainty | None:
        std = metrics.get(f"{cfg.register_.metric}_std")
        return cls(std, cfg.register_.sigmas) if std is not None and math.isfinite(std) and std >= 0 else None

    def noise(self, champion_std: float | None) -> float:
        """The gain the difference's noise asks for; a champion of unknown spread counts as the challenger's."""
        usable = champion_std is not None and math.isfinite(champion_std) and champion_std >= 0
        return self.sigmas * math.hypot(self.std, champion_std if usable else self.std)


@dataclass(frozen=True)
class RegisterResult:
    summary: str
    decisions: dict  # as written to metrics/register.json


def run_register(cfg: Config, root: Path = Path(".")) -> RegisterResult:
    metric = cfg.register_.metric
    models = {kind: (model_folder(root, kind), challenger_metrics(root, kind, metric)) for kind in GENERATORS}
    uri = tracking.configure(root)
    tracking.check_uri(uri)
    params = {"data.dataset": cfg.data.dataset, "register.metric": metric, "register.margin": cfg.register_.margin}
    try:
        with registry_lock(uri), tracking.stage_run(root, experiment_name(cfg.data.dataset), "register", params,
                                                    lineage.lineage_tags(root, params, "cpu")) as run:
            from imagegen.evaluation.contest import Contest

            contest = Contest(cfg, root)  # re-scores each champion on today's test split (fair contest)
            baseline.log_profile(root)  # the accepted data profile travels with the versions (imagegen.baseline)
            decisions = {kind: register_kind(cfg, root, kind, folder, metrics, run, contest)
                         for kind, (folder, metrics) in models.items()}
            import mlflow

            mlflow.log_dict(decisions, "register.json")
    except ImagegenError:
        raise
    except Exception as exc:  # MLflow raises many kinds when the store fails midway
        raise ImagegenError(f"MLflow tracking at {uri} failed during registration: {describe(exc)}"
                            f"{tracking.object_store_hint()}; "
                            "re-run to finish (an interrupted version is completed, not duplicated)") from None
    output = {"metric": metric, "margin": cfg.register_.margin, **decisions}
    write_json(root / OUTPUT, output)
    return RegisterResult("; ".join(summary_line(kind, d) for kind, d in decisions.items()), output)


def model_folder(root: Path, kind: str) -> Path:
    folder = root / "models" / kind
    for name in (WEIGHTS, META):
        if not (folder / name).is_file():
            raise ImagegenError(f"{folder / name}: missing; expected a trained model (run the train-{kind} stage)")
    return folder


def challenger_metrics(root: Path, kind: str, metric: str) -> dict[str, float]:
    """The numeric evaluation metrics of one model from metrics/evaluate.json; the chosen one must be finite."""
    path = root / EVALUATION
    try:
        evaluation = json.loads(path.read_text())
    except FileNotFoundError:
        raise ImagegenError(f"{path}: missing; expected the evaluate stage's metrics") from None
    except ValueError as exc:
        raise ImagegenError(f"{path}: not valid JSON ({exc})") from None
    section = evaluation.get(kind) if isinstance(evaluation, dict) else None
    if not isinstance(section, dict):
        raise ImagegenError(f"{path}: no '{kind}' section; expected the metrics of the {kind} model")
    numbers = {k: float(v) for k, v in section.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if metric not in numbers or not math.isfinite(numbers[metric]):
        raise ImagegenError(f"{path}: {kind}.{metric} is {section.get(metric)!r}; expected a finite number "
                            "(register.metric in params.yaml)")
    return numbers


def register_kind(cfg: Config, root: Path, kind: str, folder: Path, metrics: dict, run,
                  contest: Contest | None = None) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient()
    name = registered_model_name(cfg.data.dataset, kind)
    metric = cfg.register_.metric
    sha = sha256_file(folder / WEIGHTS)
    version = find_version(client, name, sha)
    if version is not None and not interrupted(version):
        champion = alias_version(client, name, CHAMPION)
        return record(name, version, False, metrics[metric], champion, metric,
                      Decision(False, f"unchanged: these weights are version {version.version}"))
    new = version is None
    if new:
        version = create_version(client, cfg, root, kind, folder, metrics, sha, run)
        fault("version")
    else:
        log.info("register: %s version %s was interrupted before its aliases moved; finishing it", name,
                 version.version)
    card = ModelCard(client, root, kind, metrics, run)
    return promote(client, name, version, metrics[metric], cfg.register_.margin, metric, new, card, contest,
                   Uncertainty.of(cfg, metrics))


def interrupted(version) -> bool:
    """A registration that did not finish: no decision yet, or aliases not yet moved (see the module doc)."""
    return DECISION_TAG not in version.tags or version.tags.get(REGISTRATION_TAG) == "pending"


def fault(step: str) -> None:
    """Die here, hard, when IMAGEGEN_FAULT=register:<step> (the fault-injection tests)."""
    if os.environ.get(FAULT_ENV) == f"register:{step}":
        log.warning("register: %s=register:%s: killing this process", FAULT_ENV, step)
        os.kill(os.getpid(), signal.SIGKILL)


def create_version(client, cfg: Config, root: Path, kind: str, folder: Path, metrics: dict, sha: str, run):
    import mlflow
    from mlflow.exceptions import MlflowException

    from imagegen import serving

    description = read_description(folder)
    with tempfile.TemporaryDirectory() as staging, quiet_mlflow():
        code = Path(staging) / "imagegen"  # the package travels with the model: serving needs no install
        shutil.copytree(Path(__file__).parent, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        info = mlflow.pyfunc.log_model(
            name=kind, python_model=serving.ImageSampler(), artifacts={serving.MODEL_ARTIFACT: str(folder)},
            code_paths=[str(code)], pip_requirements=requirements(), signature=serving.signature(),
            input_example=serving.input_example(description), metadata=serving.metadata(description))
        # What the store holds now, read back: loading checks it first (no replaced file is ever unpickled).
        stored = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=f"{staging}/stored"))
        model_sha = stored_sha256(stored)
    training_run, source = training_run_id(client, run, sha)
    params = model_params(cfg, kind)
    tags = {
        **lineage.lineage_tags(root, params, "cpu"),
        "weights_sha256": sha,
        MODEL_SHA_TAG: model_sha,
        "training_run_id": training_run,
        "training_run_source": source,
        **{f"{METRIC_TAG}{k}": repr(v) for k, v in metrics.items()},
        REGISTRATION_TAG: "pending",
    }
    number = data_version_number(root)
    if number is not None:
        tags[DATA_NUMBER_TAG] = str(number)
    tags.pop("device")
    tags[PROFILE_RUN_TAG] = run.info.run_id  # the register run, which holds the data profile (imagegen.baseline)
    name = registered_model_name(cfg.data.dataset, kind)
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    # run_id: the training run that wrote the weights (the model itself is logged in the register run)
    version = client.create_model_version(name, info.model_uri, run_id=training_run, tags=tags, model_id=info.model_id)
    log.info("register: %s version %s created from %s", version.name, version.version, folder)
    return client.get_model_version(version.name, version.version)


def promote(client, name: str, version, value: float, margin: float, metric: str, new: bool,
            card: ModelCard | None = None, contest: Contest | None = None,
            uncertainty: Uncertainty | None = None) -> dict:
    champion = alias_version(client, name, CHAMPION)
    decision = recorded_decision(version, champion)
    if decision is not None:  # interrupted after the decision was written: finish as recorded
        result = record(name, version, new, value, previous_champion(client, name, version), metric, decision)
    else:
        result = decide_and_record(client, name, version, value, margin, metric, new, champion, card, contest,
                                   uncertainty)
        decision = Decision(result["promoted"], result["reason"])
    fault("decision")
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    fault("challenger")
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    fault("champion")
    client.set_model_version_tag(name, version.version, REGISTRATION_TAG, "complete")
    return result


def decide_and_record(client, name: str, version, value: float, margin: float, metric: str, new: bool, champion,
                      card: ModelCard | None, contest: Contest | None, uncertainty: Uncertainty | None) -> dict:
    """The contest with the current champion; its tags, model card and decision written on the version."""
    fairness: dict = {}
    older = older_data(version, champion)
    if champion is not None and str(champion.version) == str(version.version):
        decision = Decision(True, "already champion (promoted by an interrupted run)")
    elif older:
        decision = Decision(False, older)
    else:
        fairness = contest.champion_score(name, champion) if contest and champion is not None else {}
        champion_value = fairness.get("champion_value", tag_float(champion, metric))
        champion_std = fairness.get("champion_scores", {}).get(f"{metric}_std", tag_float(champion, f"{metric}_std"))
        noise = uncertainty.noise(champion_std) if uncertainty else 0.0
        decision = decide(metric, value, champion_value, margin, noise)
        if fairness.get("champion_rescored"):
            decision = Decision(decision.promote, decision.reason + f"; both scored on test split "
                                f"{fairness['scored_on']['test_sha256'][:12]} with feature net "
                                f"{fairness['scored_on']['features_sha256'][:12]}")
    result = record(name, version, new, value, champion, metric, decision, fairness)
    before = result["champion_before"]
    outcome = "champion" if decision.promote else f"challenger (champion stays version {before})"
    summary = (f"{metric} {value:.6g}: {outcome}; {decision.reason}. Weights sha256 "
               f"{version.tags.get('weights_sha256', '?')[:12]}, training run {version.tags.get('training_run_id', '?')}.")
    if fairness.get("champion_rescored"):
        summary += (f" Champion v{before} re-scored today: {metric} {fairness['champion_value']:.6g} (recorded "
                    f"{fairness['champion_value_recorded']} on data {fairness['champion_data_version']}); this "
                    f"version's data {fairness['challenger_data_version']}.")
    for key, tag in CONTEST_TAGS.items():
        if fairness.get(key) is not None:
            client.set_model_version_tag(name, version.version, tag, str(fairness[key]))
    description = card.write(name, version, champion, decision, summary) if card else summary
    client.update_model_version(name, version.version, description=description)
    fault("card")
    client.set_model_version_tag(name, version.version, "decision_reason", decision.reason)
    client.set_model_version_tag(name, version.version, "champion_before", str(before))
    client.set_model_version_tag(name, version.version, DECISION_TAG, "promoted" if decision.promote else "kept")
    return result


def recorded_decision(version, champion) -> Decision | None:
    """The decision an interrupted registration wrote, while it still holds: the champion is still the one it
    was compared with (or already this version). None: no decision yet, or a stale one to decide again."""
    if DECISION_TAG not in version.tags:
        return None
    current = str(champion.version) if champion is not None else "None"
    if current not in (version.tags.get("champion_before"), str(version.version)):
        log.info("register: version %s decided against champion %s, now %s: deciding again",
                 version.version, version.tags.get("champion_before"), current)
        return None
    return Decision(version.tags[DECISION_TAG] == "promoted", version.tags.get("decision_reason", ""))


def previous_champion(client, name: str, version):
    """The champion a recorded decision was made against (tag champion_before), or None."""
    before = version.tags.get("champion_before", "")
    return client.get_model_version(name, before) if before.isdigit() else None


def older_data(version, champion) -> str | None:
    """Why `version` cannot replace `champion`: trained on an older data version; None when it is not older
    or either number is unknown (a version registered before data versions were numbered)."""
    if champion is None:
        return None
    mine, theirs = tag_int(version, DATA_NUMBER_TAG), tag_int(champion, DATA_NUMBER_TAG)
    if mine is None or theirs is None or mine >= theirs:
        return None
    return (f"trained on data version {mine}, older than the champion's data version {theirs}: "
            "an older-data model never becomes champion")


def data_version_number(root: Path) -> int | None:
    """The data version number the validate stage recorded (metrics/drift.json lineage), or None."""
    try:
        number = json.loads((root / DRIFT).read_text()).get("lineage", {}).get(DATA_NUMBER_TAG)
    except (OSError, ValueError, AttributeError):
        return None
    return number if isinstance(number, int) and not isinstance(number, bool) and number >= 0 else None


INTENDED_USE = """\
**Intended use.** Generating {dataset} images for experiments, demos and data-augmentation trials;
comparing generator variants by the project's metrics. **Not for** anything where a generated image
could be taken for a real one, nor for judging quality against published (Inception) FIDs.

**Known limits.** Trained on {dataset} only ({shape} images of its classes: {classes}); it cannot draw
anything else, nor at another size. FID, KID and precision/recall are measured in the project's own domain feature space
(a small classifier, see `metrics/features.json`), so they compare runs of this project, not papers.
A GAN can miss rare modes (see recall and `class_entropy`); a VAE's samples are blurrier than its
likelihood suggests."""


MODEL_DESCRIPTION = """\
{kind_text} trained on `{dataset}` by the imagegen pipeline (DVC stages train-{kind}, evaluate, register).
Each version's description is its model card: metrics against the champion it was compared with, the params
that differ from the champion's, the data version and the runs. Aliases: `champion` (the best by the
register stage's metric), `challenger` (the latest registered)."""
KIND_TEXT = {"gan": "A DCGAN-style image generator (EMA generator weights)",
             "vae": "A convolutional VAE with a fitted prior"}
# Each metric's better direction in the model card (by name, then by prefix); none: a count or a diagnostic.
LOWER, HIGHER = "lower ↓", "higher ↑"
BETTER = {"fid": LOWER, "kid_mean": LOWER, "nelbo": LOWER, "nll_iwae": LOWER, "recon_bce": LOWER, "recon_mse": LOWER,
          "precision": HIGHER, "recall": HIGHER, "class_entropy": HIGHER, "min_class_ratio": HIGHER,
          "domain_is": HIGHER, "fid_std": ""}  # fid_std: the FID's uncertainty, not a quality


def better(metric: str) -> str:
    """'lower ↓', 'higher ↑' or '' for a metric of the card (fid_inception, nll_iwae_per_dim: as their stem)."""
    stem = next((k for k in sorted(BETTER, key=len, reverse=True) if metric == k or metric.startswith(k + "_")), None)
    return BETTER[stem] if stem else ""


def number(value) -> str:
    """One format for every number of the card: whole numbers as they are, others with 4 significant digits."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "—"
    if not math.isfinite(value):
        return str(value)
    return f"{int(value):d}" if value.is_integer() and abs(value) < 1e15 else f"{value:.4g}"


def verdict(metric: str, value, champion) -> str:
    """'better', 'worse' or 'equal' by the metric's direction ('' without a direction or a champion's value)."""
    try:
        value, champion = float(value), float(champion)
    except (TypeError, ValueError):
        return ""
    direction = better(metric)
    if not direction or value == champion:
        return "equal" if direction else ""
    return "**better**" if (value < champion) == (direction == LOWER) else "worse"


def params_diff(mine: dict[str, str], theirs: dict[str, str]) -> list[tuple[str, str, str]]:
    """(param, the champion's value, this version's value) for each param whose values differ ('—': absent)."""
    return [(key, theirs.get(key, "—"), mine.get(key, "—")) for key in sorted(mine.keys() | theirs.keys())
            if mine.get(key) != theirs.get(key)]


class ModelCard:
    """The model card of a registered version: markdown with the experiment that made it, data version, metrics
    against the previous champion (each with its better direction), the params that differ from the champion's,
    the decision, a sample grid, links to the training and evaluation runs, intended use and known limits. It
    becomes the version's description and `<kind>/model_card.md` in the register run."""

    def __init__(self, client, root: Path, kind: str, metrics: dict[str, float], run):
        self.client, self.root, self.kind, self.metrics, self.run = client, root, kind, metrics, run
        self.description = read_description(model_folder(root, kind))

    def write(self, name: str, version, champion, decision: Decision, summary: str) -> str:
        import mlflow

        text = self.markdown(name, version, champion, decision, summary)
        folder = f"model_cards/{name}-v{version.version}"
        grid = self.root / "reports" / "evaluate" / f"{self.kind}-samples.png"
        if grid.is_file():
            mlflow.log_artifact(str(grid), folder)
        mlflow.log_text(text, f"{folder}/model_card.md")
        self.client.set_model_version_tag(name, version.version, "model_card",
                                          f"runs:/{self.run.info.run_id}/{folder}/model_card.md")
        self.describe_model(name)
        return text

    def describe_model(self, name: str) -> None:
        """The registered model's own description and tags, once (a description written by hand stays)."""
        if self.client.get_registered_model(name).description:
            return
        dataset = name.rsplit("-", 1)[0]
        self.client.update_registered_model(name, description=MODEL_DESCRIPTION.format(
            kind_text=KIND_TEXT.get(self.kind, self.kind), dataset=dataset, kind=self.kind))
        for key, value in {"dataset": dataset, "kind": self.kind, "pipeline": "imagegen"}.items():
            self.client.set_registered_model_tag(name, key, value)

    def markdown(self, name: str, version, champion, decision: Decision, summary: str) -> str:
        tags, exp = version.tags, self.run.info.experiment_id
        before = {k[len(METRIC_TAG):]: v for k, v in (champion.tags if champion else {}).items()
                  if k.startswith(METRIC_TAG)}
        head = f"champion before (v{champion.version})" if champion else "champion before"
        rows = [f"| {k} | {better(k)} | `{number(v)}` | `{number(before.get(k))}` | {verdict(k, v, before.get(k))} |"
                for k, v in sorted(self.metrics.items())]
        training = tags.get("training_run_id", "?")
        evaluation = self.evaluation_run(tags.get("weights_sha256", ""))
        folder = f"model_cards/{name}-v{version.version}"
        grid = (f"![{self.kind} samples](get-artifact?path={folder}/{self.kind}-samples.png"
                f"&run_uuid={self.run.info.run_id})")
        lines = [
            f"# {name} version {version.version}", "",
            f"**Experiment: {self.experiment(tags)}.**", "",
            f"**Decision: {'champion' if decision.promote else 'challenger'}.** {summary}", "",
            "## Metrics (test split, this version vs the champion it was compared with)", "",
            f"| metric | better | this version | {head} | this version is |", "| :--- | :---: | ---: | ---: | :--- |",
            *rows, "",
            *self.params_section(tags, champion),
            "## Data", "",
            f"- dataset `{name.rsplit('-', 1)[0]}`, prepared data DVC md5 `{tags.get('dvc_data_md5', '?')}`",
            f"- images {self.description.shape_text} (C x H x W = "
            f"{' x '.join(map(str, self.description.image_shape))}), {len(self.description.classes)} classes, "
            + ("conditional (a request may pick a class)" if self.description.num_classes else "unconditional"),
            f"- git commit `{tags.get('git_commit', '?')}`, params hash `{tags.get('params_hash', '?')}`, "
            f"pipeline run `{tags.get('pipeline_run', '?')}`", "",
            "## Runs", "",
            f"- training: [{training}](#/experiments/{exp}/runs/{training}) ({tags.get('training_run_source', '')})",
            f"- evaluation: " + (f"[{evaluation}](#/experiments/{exp}/runs/{evaluation})" if evaluation else "not found"),
            f"- registration: [{self.run.info.run_id}](#/experiments/{exp}/runs/{self.run.info.run_id}) "
            f"(artifact `{folder}/model_card.md`)", "",
            "## Samples (8 x 8 of the evaluation samples)", "", grid, "",
            INTENDED_USE.format(dataset=name.rsplit("-", 1)[0], shape=self.description.shape_text,
                                classes=", ".join(self.description.classes) or "unnamed"), "",
        ]
        return "\n".join(lines)

    def experiment(self, tags: dict) -> str:
        """What made this version: the `dvc exp run` experiment, the pipeline run (linked), or a lone stage."""
        exp = self.run.info.experiment_id
        parent = self.client.get_run(self.run.info.run_id).data.tags.get("mlflow.parentRunId")
        pipeline = (f"pipeline run [{self.client.get_run(parent).info.run_name}](#/experiments/{exp}/runs/{parent})"
                    if parent else "a register run outside a pipeline")
        if name := tags.get("dvc_exp_name"):
            return f"DVC experiment `{name}` (`dvc exp show --rev {name}`), {pipeline}"
        return pipeline

    def params_section(self, tags: dict, champion) -> list[str]:
        """The params of the training run that differ from those of the champion's training run."""
        title = "## Params that differ from the champion's"
        if champion is None:
            return [title, "", "No champion to compare with.", ""]
        mine, theirs = self.training_params(tags), self.training_params(champion.tags)
        if mine is None or theirs is None:
            return [title, "", "Not known: a training run is missing (trained with mlflow off?).", ""]
        diff = params_diff(mine, theirs)
        if not diff:
            return [f"{title} (v{champion.version})", "", "None: the same params.", ""]
        return [f"{title} (v{champion.version})", "", f"| param | champion v{champion.version} | this version |",
                "| :--- | ---: | ---: |", *(f"| {k} | `{a}` | `{b}` |" for k, a, b in diff), ""]

    def training_params(self, tags: dict) -> dict[str, str] | None:
        """The params of the training run a version's tag `training_run_id` names (None: not a training run)."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(tags.get("training_run_id", ""))
        except MlflowException:
            return None
        return run.data.params if run.data.tags.get("weights_sha256") else None

    def evaluation_run(self, sha: str) -> str | None:
        """The latest evaluate run that scored these weights (tag <kind>_weights_sha256)."""
        found = self.client.search_runs([self.run.info.experiment_id],
                                        filter_string=f"tags.{self.kind}_weights_sha256 = '{sha}'",
                                        order_by=["attributes.start_time DESC"], max_results=1)
        return found[0].info.run_id if found else None


def record(name: str, version, new: bool, value: float, champion, metric: str, decision: Decision,
           fairness: dict | None = None) -> dict:
    """One model's entry in metrics/register.json (with the fair contest's scores when there was one)."""
    before = to_int(champion.version) if champion else None
    return {"model": name, "version": int(version.version), "new_version": new, "value": value,
            "champion_before": before, "champion_value": tag_float(champion, metric),
            "champion_after": int(version.version) if decision.promote else before,
            "promoted": decision.promote, "reason": decision.reason, **(fairness or {})}


CONTEST_TAGS = {"champion_value": "contest.champion_value", "champion_value_recorded": "contest.champion_value_recorded",
                "champion_data_version": "contest.champion_data_version",
                "challenger_data_version": "contest.challenger_data_version",
                "champion_rescored": "contest.champion_rescored"}


def find_version(client, name: str, sha: str):
    """The version of `name` holding these weights, or None (also when `name` does not exist yet)."""
    matches = [v for v in client.search_model_versions(f"name = '{name}'") if v.tags.get("weights_sha256") == sha]
    return min(matches, key=lambda v: int(v.version)) if matches else None


def alias_version(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def tag_int(version, tag: str) -> int | None:
    try:
        return int(version.tags[tag])
    except (KeyError, ValueError):
        return None


def training_run_id(client, run, sha: str) -> tuple[str, str]:
    """The training run that wrote these weights (tag weights_sha256), else the register run."""
    found = client.search_runs([run.info.experiment_id], filter_string=f"tags.weights_sha256 = '{sha}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    if found:
        return found[0].info.run_id, "training run (tag weights_sha256)"
    return run.info.run_id, "register run: no training run is tagged with these weights (trained with mlflow off?)"


def requirements() -> list[str]:
    """Pinned explicitly: MLflow's inference runs a subprocess for 16-26 s and lists unrelated packages."""
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg).split('+')[0]}" for pkg in ("mlflow", "torch", "numpy", "pandas")]


def to_int(version) -> int | None:
    return int(version) if version is not None else None


def summary_line(kind: str, d: dict) -> str:
    if not d["new_version"] and d["reason"].startswith("unchanged"):
        return f"{kind}: unchanged, version {d['version']} (champion {d['champion_after']})"
    state = "champion" if d["promoted"] else f"challenger, champion stays {d['champion_after']}"
    return f"{kind}: version {d['version']} is {state} ({d['reason']})"


DEFAULT_PORTS = {"http": 80, "https": 443, "postgresql": 5432, "mysql": 3306, "mssql": 1433}
LOOPBACK = {"localhost", "127.0.0.1", "::1", "ip6-localhost"}


def store_key(uri: str) -> str:
    """One spelling per tracking store: a database file by its resolved path; a server or database by
    scheme (no driver), lower-case host (loopback names as 127.0.0.1), port and path, without credentials."""
    parsed = urllib.parse.urlsplit(uri)
    scheme = parsed.scheme.lower().split("+")[0]
    if scheme in ("sqlite", "file", ""):
        path = urllib.parse.unquote(parsed.path) if scheme else uri
        path = path[1:] if scheme == "sqlite" else path  # sqlite:///rel.db, sqlite:////abs/x.db
        return f"{scheme or 'file'}://{Path(path).resolve()}"
    host = (parsed.hostname or "").lower()
    host = "127.0.0.1" if host in LOOPBACK else host
    return f"{scheme}://{host}:{parsed.port or DEFAULT_PORTS.get(scheme, 0)}{parsed.path.rstrip('/')}"


def lock_path(uri: str) -> Path:
    return Path(tempfile.gettempdir()) / f"imagegen-registry-{hashlib.sha256(store_key(uri).encode()).hexdigest()[:16]}.lock"


def lock_timeout() -> float:
    text = os.environ.get(LOCK_TIMEOUT_ENV, "")
    try:
        value = float(text) if text else LOCK_TIMEOUT_S
    except ValueError:
        value = -1.0
    if not 0 < value < math.inf:
        raise ImagegenError(f"{LOCK_TIMEOUT_ENV}={text!r}: expected a positive number of seconds")
    return value


@contextlib.contextmanager
def registry_lock(uri: str) -> Iterator[None]:
    """One registration at a time per tracking store: on this host (flock, released if the process dies),
    and across machines through the Prefect API when one is configured (a tracking server or database)."""
    timeout = lock_timeout()
    deadline = time.monotonic() + timeout
    with file_lock(lock_path(uri), timeout):
        remote = os.environ.get("PREFECT_API_URL") and not store_key(uri).startswith(("sqlite:", "file:"))
        with prefect_lock(uri, max(deadline - time.monotonic(), 1.0)) if remote else contextlib.nullcontext():
            yield


def busy(where: str, timeout: float) -> ImagegenError:
    return ImagegenError(f"another registration has held the registry lock ({where}) for more than {timeout:g} s; "
                         f"expected it to finish (wait and re-run, or raise {LOCK_TIMEOUT_ENV})")


@contextlib.contextmanager
def file_lock(path: Path, timeout: float) -> Iterator[None]:
    with path.open("a") as f:
        deadline, waiting = time.monotonic() + timeout, False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waiting:
                    log.info("register: waiting for another registration to finish (lock %s)", path)
                    waiting = True
                if time.monotonic() > deadline:
                    raise busy(f"file {path}", timeout) from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


PREFECT_LOCK_LEASE_S = 60  # a registrar that dies frees the slot when its lease runs out


@contextlib.contextmanager
def prefect_lock(uri: str, timeout: float) -> Iterator[None]:
    """A Prefect global concurrency limit of 1 named after the store (created when missing): registrars
    on every machine that share the Prefect API wait for each other."""
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists

    name = f"imagegen-register-{hashlib.sha256(store_key(uri).encode()).hexdigest()[:16]}"
    where = f"Prefect global concurrency limit {name} at {os.environ['PREFECT_API_URL']}"
    try:
        with get_client(sync_client=True) as client:
            try:
                client.upsert_global_concurrency_limit_by_name(name, 1)
            except ObjectAlreadyExists:  # created meanwhile by another registrar
                pass
            if client.read_global_concurrency_limit_by_name(name).active_slots:
                log.info("register: waiting for another registration to finish (%s)", where)
    except (httpx.HTTPError, OSError) as exc:
        raise ImagegenError(f"the Prefect API that serialises registrations is not usable ({where}): "
                            f"{describe(exc)}; start it, or unset PREFECT_API_URL to lock on this host only") from None
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(concurrency(name, occupy=1, timeout_seconds=timeout,
                                           lease_duration=PREFECT_LOCK_LEASE_S, strict=True))
        except TimeoutError:
            raise busy(where, timeout) from None
        yield
