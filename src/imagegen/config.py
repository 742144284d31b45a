"""Typed view of params.yaml, the one source of truth for every stage's parameters."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from imagegen.errors import ImagegenError

DATASETS = ("fashion-mnist", "mnist")


class Section(BaseModel):
    # strict: a value must have the field's type as written (true is not 1, "3" is not 3; 3 is a valid float)
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


# Ranges of the numeric params: every one has a lower and an upper bound, checked on load, so a value that would
# crash a stage later (seed -1, seed 2**70, width 10**6) is refused at once, naming the key and the bound.
COUNT = 10**9  # images, steps and other counts
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]  # what every RNG the stages seed (numpy, torch, random) accepts
Epochs = Annotated[int, Field(ge=1, le=100_000)]
Images = Annotated[int, Field(ge=1, le=10**12)]  # a count of images seen
BatchSize = Annotated[int, Field(ge=2, le=65_536)]
LatentDim = Annotated[int, Field(ge=1, le=4096)]
Width = Annotated[int, Field(ge=1, le=512)]  # channels of a net's first layer (x2, x4 deeper); GPU profiles use 64
LearningRate = Annotated[float, Field(gt=0, le=1)]

RAW_FOLDER = "data/raw"  # where fetch puts a built-in dataset's IDX files (data.folder of the built-ins)
DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class DataConfig(Section):
    # A built-in (fashion-mnist, mnist: IDX files that fetch puts in data/raw) or a name of the user's
    # choosing for the labelled image folder `folder` (registry names <dataset>-gan, <dataset>-vae).
    dataset: str = "fashion-mnist"
    # Where prepare reads the images (a DVC dependency of prepare): data/raw for the built-ins; for a
    # folder dataset ROOT holding one sub-folder of images per class (relative to the project or absolute).
    folder: str = Field(RAW_FOLDER, validate_default=True)
    image_size: Literal[28, 32, 64] = Field(28, validate_default=True)  # H = W; built-ins: 28 only
    channels: Literal[1, 3] = Field(1, validate_default=True)  # 1 grey, 3 RGB; built-ins: 1 only
    # Folder datasets: the share of images in the test split, decided by each file's sha256.
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.15
    background: Literal["white", "black"] = "white"  # what transparent pixels are composited on
    # Folder datasets: prepare stops when more than this fraction of the image files cannot be read.
    max_unreadable_fraction: Annotated[float, Field(ge=0, le=1)] = 0.01
    # Tried in order. A folder (mirror holding the IDX files, .gz or not), an http(s)
    # base URL, or "official" for the dataset's own URLs. "{dataset}" is substituted.
    sources: list[str] = Field(
        default_factory=lambda: ["/usr/share/datasets/{dataset}", "official"], min_length=1
    )
    retries: Annotated[int, Field(ge=0, le=10)] = 3
    backoff_s: Annotated[float, Field(ge=0, le=3600)] = 1.0
    timeout_s: Annotated[float, Field(gt=0, le=3600)] = 60.0

    @field_validator("sources")
    @classmethod
    def _no_empty_source(cls, sources: list[str]) -> list[str]:
        if any(not s.strip() for s in sources):
            raise ValueError("sources must not contain empty strings")
        return sources

    @field_validator("dataset")
    @classmethod
    def _dataset_name(cls, name: str) -> str:
        if not DATASET_NAME.match(name):
            raise ValueError(f"{name!r} is not a usable name; expected letters, digits, '.', '_' or '-' "
                             "(at most 64, starting with a letter or digit)")
        return name

    @field_validator("folder")
    @classmethod
    def _folder_fits_dataset(cls, folder: str, info: ValidationInfo) -> str:
        dataset = info.data.get("dataset")
        if not folder.strip():
            raise ValueError("empty; expected the folder of your images (ROOT/<class>/<image files>)")
        resolved = Path(folder).expanduser().resolve()
        if resolved == Path(resolved.anchor) or resolved in (Path.cwd(), *Path.cwd().parents):
            raise ValueError(f"{folder} is the file system's root or holds this project; expected the folder of "
                             "your images (ROOT/<class>/<image files>)")
        builtin, is_raw = dataset in DATASETS, Path(folder) == Path(RAW_FOLDER)
        if builtin and not is_raw:
            raise ValueError(f"{dataset} is a built-in dataset, read from {RAW_FOLDER} (fetch fills it); "
                             "name a folder dataset otherwise (data.dataset), e.g. my-images")
        if dataset is not None and not builtin and is_raw:
            raise ValueError(f"{dataset} is not a built-in dataset ({', '.join(DATASETS)}); expected the folder "
                             "of its images, ROOT/<class>/<image files>")
        return folder

    @field_validator("image_size", "channels")
    @classmethod
    def _builtin_shape(cls, value: int, info: ValidationInfo) -> int:
        dataset, builtin = info.data.get("dataset"), {"image_size": 28, "channels": 1}[info.field_name]
        if dataset in DATASETS and value != builtin:
            raise ValueError(f"{dataset} images are 28 x 28 grey, so {builtin} is the only value; for another "
                             f"size or colour export it as a folder (imagegen export) and train on that")
        return value

    @property
    def builtin(self) -> bool:
        """True for fashion-mnist / mnist (IDX files via fetch), False for a labelled image folder."""
        return self.dataset in DATASETS


class DriftConfig(Section):
    """The drift gate (data/drift.py): each check warns at `*_warn` and fails the stage at `*_fail`."""

    enabled: bool = True  # false: profile, lineage and the class-list check only (labels keep their meaning)
    sample: Annotated[int, Field(ge=100, le=100_000)] = 2000  # images embedded for the feature mean/covariance
    class_shift_warn: Annotated[float, Field(ge=0, le=1)] = 0.03  # total variation distance of class shares
    class_shift_fail: Annotated[float, Field(ge=0, le=1)] = 0.08
    intensity_psi_warn: Annotated[float, Field(ge=0, le=100)] = 0.1  # PSI of the per-channel intensity histograms
    intensity_psi_fail: Annotated[float, Field(ge=0, le=100)] = 0.25
    frechet_warn: Annotated[float, Field(ge=0, le=100)] = 0.02  # Fréchet distance / total variance of the old sample
    frechet_fail: Annotated[float, Field(ge=0, le=100)] = 0.1
    # The batch view (images added since the accepted version) uses the levels above, but its class shift has
    # its own: a few hundred images drift from even shares by chance (about 0.06-0.11 TV for 300-100 images).
    batch_class_shift_warn: Annotated[float, Field(ge=0, le=1)] = 0.15
    batch_class_shift_fail: Annotated[float, Field(ge=0, le=1)] = 0.3
    batch_min_images: Annotated[int, Field(ge=2, le=10**9)] = 100  # a smaller batch is reported, not gated

    @model_validator(mode="after")
    def _warn_below_fail(self):
        for name in ("class_shift", "intensity_psi", "frechet", "batch_class_shift"):
            if getattr(self, f"{name}_warn") > getattr(self, f"{name}_fail"):
                raise ValueError(f"{name}_warn must not exceed {name}_fail")
        return self


class ValidateConfig(Section):
    # Rows expected per split; null means the dataset's published sizes (60000 / 10000).
    expected_counts: dict[Literal["train", "test"], Annotated[int, Field(ge=1, le=COUNT)]] | None = None
    # Each class's share of a split may differ from 1/num_classes by this fraction of it.
    class_balance_tolerance: Annotated[float, Field(ge=0, le=1)] = 0.1
    # Largest allowed fraction of a split's images that repeat an earlier image of the same split.
    max_duplicate_fraction: Annotated[float, Field(ge=0, le=1)] = 0.01
    # Two images of different splits closer than this RMS pixel distance (0..255) count as
    # near-duplicates; exact copies have distance 0.
    near_duplicate_rms: Annotated[float, Field(gt=0, le=255)] = 5.0
    # Largest allowed fraction of a split's images with a (near-)duplicate in the other split.
    max_cross_split_duplicate_fraction: Annotated[float, Field(ge=0, le=1)] = 0.01
    # Folder datasets only (the built-ins use class_balance_tolerance and their published sizes):
    min_images_per_class: Annotated[int, Field(ge=1, le=COUNT)] = 50  # readable images of each class, both splits
    # A class's share of the images relative to an even share (1 = images / classes): below
    # class_share_warn validate warns, below class_share_fail it fails.
    class_share_warn: Annotated[float, Field(ge=0, le=1)] = 0.5
    class_share_fail: Annotated[float, Field(ge=0, le=1)] = 0.1

    @field_validator("class_share_fail")
    @classmethod
    def _fail_below_warn(cls, fail: float, info: ValidationInfo) -> float:
        warn = info.data.get("class_share_warn")
        if warn is not None and fail > warn:
            raise ValueError(f"{fail} is above class_share_warn {warn}; expected a failure level at or below the warning level")
        return fail

    drift: DriftConfig = DriftConfig()  # the gate against the last accepted version (docs/retraining.md)


class TrainConfig(Section):
    """Shared by train-gan and train-vae."""

    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    seed: Seed = 0
    amp: bool = True  # bf16 autocast on CUDA and on CPUs with bf16 in hardware; ignored elsewhere
    channels_last: bool = True  # CUDA and CPU (not MPS)
    compile: bool = False  # torch.compile the training models
    cuda_graphs: bool = True  # CUDA only, not under DDP: replay each training step as one CUDA graph
    threads: Annotated[int, Field(ge=0, le=4096)] = 0  # CPU threads; 0 = torch's default
    checkpoint_every: Annotated[int, Field(ge=1, le=COUNT)] = 500  # steps
    resume: bool = True  # continue from checkpoints/<kind>/last.pt when it matches params and data
    limit: Annotated[int, Field(ge=1, le=COUNT)] | None = None  # train on the first N images only (smoke runs)
    mlflow: bool = True  # log runs to MLflow (MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)
    system_metrics: bool = True  # with mlflow: log CPU, memory and GPU utilisation of training runs
    # Warm start: `champion` starts from the registered champion's weights (<dataset>-<kind>@champion) when
    # there is one, and runs warm_epochs_fraction of the epochs; `none` always starts from scratch.
    init_from: Literal["champion", "none"] = "none"
    warm_epochs_fraction: Annotated[float, Field(gt=0, le=1)] = 0.5


class Budgeted(Section):
    """A model trained for a budget of images seen, so that a folder of any size gets about as many updates
    (and as much time) as Fashion-MNIST's 60,000 images get: epochs = images / images per epoch, rounded
    (at least 1; an epoch drops the last partial batch)."""

    images: Images
    epochs: Epochs | None = None  # set: exactly this many passes instead (smoke runs)

    def epochs_for(self, images_per_epoch: int) -> int:
        return self.epochs or max(1, round(self.images / images_per_epoch))


class GANConfig(Budgeted):
    images: Images = 840_000  # 14 epochs of 60,000
    batch_size: BatchSize = 64
    latent_dim: LatentDim = 64
    width: Width = 32  # channels of the first/last conv; x2, x4 deeper
    kernel_size: Literal[4, 5] = 4
    conditional: bool = False
    spectral_norm: bool = True
    loss: Literal["hinge", "bce"] = "hinge"
    label_smoothing: Annotated[float, Field(ge=0, lt=0.5)] = 0.0  # one-sided, bce only
    lr_g: LearningRate = 4e-4
    lr_d: LearningRate = 4e-4
    # YAML gives a list: the pair itself is lax (list -> tuple), its items strict
    betas: Annotated[tuple[Annotated[float, Field(ge=0, lt=1, strict=True)],
                           Annotated[float, Field(ge=0, lt=1, strict=True)]], Field(strict=False)] = (0.5, 0.999)
    ema_decay: Annotated[float, Field(ge=0, lt=1)] = 0.999
    # Differentiable augmentation before the discriminator with ADA's adaptive probability (training/augment.py):
    # p rises while E[sign D(real)] is above ada_target, by batch / ada_speed_images per step.
    augment: bool = False
    ada_target: Annotated[float, Field(ge=0, le=1)] = 0.6  # Karras et al. 2020
    ada_speed_images: Images = 500_000  # images for p to go from 0 to 1 (ADA: 500k)


class VAEConfig(Budgeted):
    images: Images = 960_000  # 16 epochs of 60,000
    batch_size: BatchSize = 128
    latent_dim: LatentDim = 32
    width: Width = 32
    decoder_blocks: Annotated[int, Field(ge=0, le=8)] = 0  # residual blocks at each decoder resolution below the image

    conditional: bool = False
    beta: Annotated[float, Field(gt=0, le=100)] = 0.05
    lr: LearningRate = 1e-3
    # What samples start from (models/priors.py), fitted to the trained encoder's codes after training:
    # standard = N(0, I) as trained; mixture = Gaussian mixture (EM); class_mixture = the mixture fitted
    # class by class (labels); two_stage = a second small VAE.
    prior: Literal["standard", "mixture", "class_mixture", "two_stage"] = "class_mixture"
    prior_components: Annotated[int, Field(ge=1, le=1024)] = 64  # mixture
    prior_width: Annotated[int, Field(ge=1, le=8192)] = 128  # two_stage: hidden units of its MLPs
    prior_epochs: Epochs = 10  # two_stage: passes over the codes


class FeaturesConfig(Section):
    """The domain classifier whose penultimate layer is the feature space of FID, KID and P/R."""

    epochs: Epochs = 10
    batch_size: BatchSize = 128
    width: Width = 32
    feature_dim: Annotated[int, Field(ge=2, le=4096)] = 128
    lr: LearningRate = 1e-3


MIN_EVAL_SAMPLES = 1000  # below this FID is dominated by its small-sample bias


class EvalConfig(Section):
    n_samples: Annotated[int, Field(ge=MIN_EVAL_SAMPLES, le=10_000_000)] = 10_000
    seed: Seed = 0
    kid_subsets: Annotated[int, Field(ge=1, le=100_000)] = 100
    kid_subset_size: Annotated[int, Field(ge=2, le=1_000_000)] = 1000
    pr_k: Annotated[int, Field(ge=1, le=1000)] = 3  # neighbours defining the precision/recall manifolds
    fid_bootstrap: Annotated[int, Field(ge=2, le=10_000)] = 20  # bootstrap rounds for fid_std (metrics.fid_std)
    iwae_k: Annotated[int, Field(ge=1, le=100_000)] = 64  # importance samples per test image for the VAE's NLL bound
    iwae_images: Annotated[int, Field(ge=1, le=COUNT)] | None = None  # test images for the NLL bound; null = all
    # A pt_inception-2015-12-05 weights file (as used by pytorch-fid) for the standard Inception FID;
    # null or a missing file skips it. Never downloaded.
    inception_weights: str | None = None


class RegisterConfig(Section):
    # The metrics/evaluate.json key the champion is chosen by (fid and kid_mean: lower is better;
    # precision and recall: higher is better).
    metric: Literal["fid", "kid_mean", "precision", "recall"] = "fid"
    # A challenger becomes champion only when better than the champion by this fraction of its value.
    margin: Annotated[float, Field(ge=0, lt=1)] = 0.01
    # ... and, for fid, by this many standard deviations of the difference (each side's bootstrap fid_std):
    # a gain within the noise of a small test split promotes nothing. 0: the margin alone.
    sigmas: Annotated[float, Field(ge=0, le=10)] = 2.0


class Config(Section):
    data: DataConfig = DataConfig()
    validate_: ValidateConfig = Field(default=ValidateConfig(), alias="validate")
    train: TrainConfig = TrainConfig()
    gan: GANConfig = GANConfig()
    vae: VAEConfig = VAEConfig()
    features: FeaturesConfig = FeaturesConfig()
    eval: EvalConfig = EvalConfig()
    register_: RegisterConfig = Field(default=RegisterConfig(), alias="register")  # "register" is a BaseModel attribute

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, populate_by_name=True)


# A profile for a real GPU: wider nets, larger batches, more epochs. Apply it with
# `dvc exp run` and one -S per entry (docs/training.md lists them); bench/train_throughput.py uses it.
GPU_PROFILE = {
    "gan.width": 64, "gan.batch_size": 256, "gan.epochs": 60, "gan.lr_g": 4e-4, "gan.lr_d": 4e-4,
    "vae.width": 64, "vae.batch_size": 256, "vae.epochs": 60,
}

def with_overrides(cfg: Config, overrides: dict[str, object]) -> Config:
    """cfg with dotted-key overrides applied (e.g. {"gan.width": 64}), validated again."""
    raw = cfg.model_dump(by_alias=True)
    for key, value in overrides.items():
        section, name = key.split(".", 1)
        raw[section][name] = value
    return Config.model_validate(raw)


def flat_section(prefix: str, section: Section) -> dict[str, object]:
    return {f"{prefix}.{k}": v for k, v in section.model_dump().items()}


def model_params(cfg: Config, kind: str) -> dict[str, object]:
    """The params that define a trained gan/vae model (logged with its run, hashed into its tags)."""
    return {"data.dataset": cfg.data.dataset, **flat_section("train", cfg.train), **flat_section(kind, getattr(cfg, kind))}


def load_config(path: Path | str = "params.yaml") -> Config:
    path = Path(path)
    try:
        raw = read_yaml(path.read_text())
    except FileNotFoundError:
        raise ImagegenError(f"{path}: file not found (expected the pipeline's params file)") from None
    except DuplicateKey as exc:
        raise ImagegenError(f"{path}: line {exc.line}: duplicate key {exc.key}; expected each key once") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ImagegenError(f"{path}:{where} is not valid YAML") from None
    if raw is None or raw == {}:
        raise ImagegenError(f"{path}: empty; expected sections such as data, train, gan (delete keys, "
                            "not the whole file, to use defaults)")
    if not isinstance(raw, dict):
        raise ImagegenError(f"{path}: expected a mapping of sections at the top level")
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ImagegenError(f"{path}: {_describe(exc)}") from None


class DuplicateKey(Exception):
    def __init__(self, key: str, line: int):
        super().__init__(key)
        self.key, self.line = key, line


class _ParamsLoader(yaml.SafeLoader):
    """YAML as DVC reads params.yaml (YAML 1.2): 1e-3 is a float, not the string PyYAML's 1.1 rules give."""


_ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def read_yaml(text: str) -> object:
    """The YAML document in `text`; a key repeated within one mapping raises DuplicateKey (DVC refuses those too)."""
    loader = _ParamsLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_duplicates(node, "")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_duplicates(node: yaml.Node, prefix: str) -> None:
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}" if isinstance(key_node, yaml.ScalarNode) else prefix + "?"
            if key in seen:
                raise DuplicateKey(key, key_node.start_mark.line + 1)
            seen.add(key)
            _check_duplicates(value_node, key + ".")
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicates(item, f"{prefix}{i}.")


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            parts.append(f"{key}: unknown key")
        elif err["type"] == "value_error":  # our own validators: the message says what was expected
            parts.append(f"{key}: {err['msg'].removeprefix('Value error, ')}")
        else:
            parts.append(f"{key}: {err['msg']} (got {err.get('input')!r})")
    return "; ".join(parts)
