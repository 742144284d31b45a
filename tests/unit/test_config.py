import re
from pathlib import Path

import pytest
import yaml

from imagegen.config import Config, load_config
from imagegen.errors import ImagegenError

REPO_PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_repo_params_load_and_match_defaults():
    cfg = load_config(REPO_PARAMS)
    assert cfg.data.dataset == "fashion-mnist"
    assert cfg.data.sources[-1] == "official"
    assert cfg == Config()  # params.yaml spells out the defaults


@pytest.mark.parametrize("text", ["", "# all commented out\n", "{}\n"])
def test_empty_file_is_an_error(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ImagegenError) as info:
        load_config(path)
    assert str(info.value) == (f"{path}: empty; expected sections such as data, train, gan (delete keys, "
                               "not the whole file, to use defaults)")


@pytest.mark.parametrize("text, line, key", [
    ("gan:\n  epochs: 3\n  width: 8\n  epochs: 4\n", 4, "gan.epochs"),
    ("gan:\n  epochs: 3\nvae: {}\ngan:\n  width: 4\n", 4, "gan"),
    ("validate:\n  expected_counts: {train: 5, test: 2, train: 6}\n", 2, "validate.expected_counts.train"),
])
def test_duplicate_keys_are_an_error(tmp_path, text, line, key):
    path = write(tmp_path, text)
    with pytest.raises(ImagegenError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: line {line}: duplicate key {key}; expected each key once"


@pytest.mark.parametrize("text, expected", [
    ("gan:\n  epochs: true\n", "gan.epochs: Input should be a valid integer (got True)"),
    ("gan:\n  epochs: 18.0\n", "gan.epochs: Input should be a valid integer (got 18.0)"),
    ("train:\n  seed: '3'\n", "train.seed: Input should be a valid integer (got '3')"),
    ("train:\n  limit: false\n", "train.limit: Input should be a valid integer (got False)"),
    ("gan:\n  lr_g: true\n", "gan.lr_g: Input should be a valid number (got True)"),
    ("gan:\n  betas: [true, 0.9]\n", "gan.betas.0: Input should be a valid number (got True)"),
    ("train:\n  resume: 1\n", "train.resume: Input should be a valid boolean (got 1)"),
    ("train:\n  resume: 'yes'\n", "train.resume: Input should be a valid boolean (got 'yes')"),
])
def test_strict_types(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ImagegenError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: {expected}"


def test_numbers_read_as_dvc_reads_them(tmp_path):
    """YAML 1.2 (DVC's reader) makes 1e-3 a float, an int is a valid float, a list a valid pair."""
    cfg = load_config(write(tmp_path, "gan:\n  lr_g: 1e-3\n  lr_d: 2E-4\n  betas: [0, 0.9]\nvae:\n  beta: 2\n"))
    assert (cfg.gan.lr_g, cfg.gan.lr_d, cfg.gan.betas, cfg.vae.beta) == (0.001, 0.0002, (0.0, 0.9), 2.0)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("data:\n  datset: mnist\n", "data.datset: unknown key"),
        ("trainer: {}\n", "trainer: unknown key"),
        ("data:\n  dataset: cifar\n", "data.folder: cifar is not a built-in dataset (fashion-mnist, mnist); expected the folder"),
        ("data:\n  retries: many\n", "data.retries: Input should be a valid integer (got 'many')"),
        ("data:\n  retries: -1\n", "data.retries: Input should be greater than or equal to 0"),
        ("data:\n  sources: []\n", "data.sources: List should have at least 1 item"),
        ("validate:\n  class_balance_tolerance: 2\n", "validate.class_balance_tolerance: Input should be less"),
        ("validate:\n  expected_counts: {train: 0}\n", "validate.expected_counts.train: Input should be greater"),
        ("- a\n- b\n", "expected a mapping of sections"),
        ("data: [unclosed\n", "is not valid YAML"),
    ],
)
def test_bad_params_name_the_key(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ImagegenError) as info:
        load_config(path)
    message = str(info.value)
    assert expected in message
    assert str(path) in message
    assert "\n" not in message


def test_missing_file(tmp_path):
    with pytest.raises(ImagegenError, match="file not found"):
        load_config(tmp_path / "nope.yaml")


def test_gpu_profile_is_valid_and_documented():
    from imagegen.config import GPU_PROFILE, with_overrides

    cfg = with_overrides(Config(), GPU_PROFILE)
    # No compile: on an H100 its cold warm-up cost more than it saved in a 60-epoch run (docs/performance.md).
    # The profiles are documented as `dvc exp run -S` lines in docs/training.md.
    assert cfg.gan.width == GPU_PROFILE["gan.width"] and cfg.train.compile is False
    readme = (REPO_PARAMS.parent / "docs" / "training.md").read_text()
    for key, value in GPU_PROFILE.items():
        spelled = str(value).lower() if isinstance(value, bool) else f"{value:g}"
        assert f"-S {key}={spelled}" in readme


def test_gpu_profiles_per_image_size_are_valid_configs():
    """The per-size profiles live only in docs/training.md, as `dvc exp run -S` lines: each must be a valid
    config, and the 28 x 28 one is GPU_PROFILE (32 and 64 have more epochs: a folder is usually smaller)."""
    from imagegen.config import GPU_PROFILE, with_overrides

    section = (REPO_PARAMS.parent / "docs" / "training.md").read_text().split("GPU profiles per image size")[1]
    lines = [text.strip() for text in section.splitlines()]
    profiles = {}
    for size in (28, 32, 64):
        line = lines[next(i for i, text in enumerate(lines) if text.startswith(f"# {size} x {size}")) + 1]
        assert line.startswith("dvc exp run ")
        profiles[size] = {key: yaml.safe_load(value) for key, value in re.findall(r"-S (\S+)=(\S+)", line)}
        with_overrides(Config(), profiles[size])
    assert profiles[28] == GPU_PROFILE
    assert profiles[32]["gan.epochs"] > GPU_PROFILE["gan.epochs"] and profiles[64]["features.width"] == 64


def test_overrides_are_validated():
    from imagegen.config import with_overrides

    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="gan.width"):
        with_overrides(Config(), {"gan.width": -1})


@pytest.mark.parametrize("text, expected", [
    ("train:\n  seed: -1\n", "train.seed: Input should be greater than or equal to 0 (got -1)"),
    ("train:\n  seed: 1180591620717411303424\n",  # 2**70
     "train.seed: Input should be less than or equal to 4294967295 (got 1180591620717411303424)"),
    ("eval:\n  seed: 4294967296\n", "eval.seed: Input should be less than or equal to 4294967295 (got 4294967296)"),
    ("gan:\n  width: 1000000\n", "gan.width: Input should be less than or equal to 512 (got 1000000)"),
    ("vae:\n  epochs: 1000000\n", "vae.epochs: Input should be less than or equal to 100000 (got 1000000)"),
    ("features:\n  lr: 5.0\n", "features.lr: Input should be less than or equal to 1 (got 5.0)"),
    ("validate:\n  drift:\n    sample: 10000000\n",
     "validate.drift.sample: Input should be less than or equal to 100000 (got 10000000)"),
])
def test_numeric_params_out_of_their_documented_range_are_refused_on_load(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ImagegenError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: {expected}"


def test_every_numeric_param_has_an_upper_and_a_lower_bound():
    from annotated_types import Ge, Gt, Le, Lt

    def sections(model):
        for name, field in model.model_fields.items():
            kind = field.annotation
            if isinstance(kind, type) and issubclass(kind, Config.__mro__[1]):
                yield from sections(kind)
            else:
                yield model, name, field

    for model, name, field in sections(Config):
        text = str(field.annotation)
        if any(t in text for t in ("int", "float")) and "Literal" not in text and "tuple" not in text:
            meta = field.metadata + [m for arg in getattr(field.annotation, "__args__", ()) for m in
                                     getattr(arg, "__metadata__", ())]
            meta += [m for info in meta for m in getattr(info, "metadata", ())]  # Optional[Annotated[...]]
            bounds = {type(m) for m in meta}
            assert bounds & {Ge, Gt} and bounds & {Le, Lt}, f"{model.__name__}.{name} lacks a range"


@pytest.mark.parametrize("folder", ["/", ".", ".."])
def test_a_folder_that_is_the_root_or_holds_the_project_is_refused(tmp_path, folder):
    path = write(tmp_path, f"data:\n  dataset: mine\n  folder: {folder}\n")
    with pytest.raises(ImagegenError) as info:
        load_config(path)
    assert str(info.value) == (f"{path}: data.folder: {folder} is the file system's root or holds this project; "
                               "expected the folder of your images (ROOT/<class>/<image files>)")
