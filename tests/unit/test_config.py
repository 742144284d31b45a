from pathlib import Path

import pytest

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


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == Config()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("data:\n  datset: mnist\n", "data.datset: unknown key"),
        ("trainer: {}\n", "trainer: unknown key"),
        ("data:\n  dataset: cifar\n", "data.dataset: Input should be 'fashion-mnist' or 'mnist'"),
        ("data:\n  retries: many\n", "data.retries: Input should be a valid integer"),
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
    # No compile: on an H100 its cold warm-up cost more than it saved in a 60-epoch run (bench/README.md).
    assert cfg.gan.width == GPU_PROFILE["gan.width"] and cfg.train.compile is False
    readme = (REPO_PARAMS.parent / "README.md").read_text()
    for key, value in GPU_PROFILE.items():
        spelled = str(value).lower() if isinstance(value, bool) else f"{value:g}"
        assert f"-S {key}={spelled}" in readme


def test_overrides_are_validated():
    from imagegen.config import with_overrides

    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="gan.width"):
        with_overrides(Config(), {"gan.width": -1})
