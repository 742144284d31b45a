"""Exporting samples and reading a user's samples file: formats, determinism, one-line errors."""

from dataclasses import replace

import numpy as np
import pytest

from imagegen.errors import ImagegenError
from imagegen.evaluation.sampling import generate, save_images
from imagegen.models.description import ModelDescription
from imagegen.models.kinds import build
from tests.helpers import load_samples

ARCH = {"latent_dim": 8, "width": 4, "kernel_size": 4}


def tiny(kind="gan", num_classes=0):
    meta = ModelDescription(kind, dict(ARCH), num_classes)
    return build(meta).eval(), meta


def test_generate_is_uint8_and_deterministic_per_seed():
    module, meta = tiny()
    a, b = generate(module, meta, 37, seed=3, batch_size=10), generate(module, meta, 37, seed=3)
    assert a.shape == (37, 1, 28, 28) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, generate(module, meta, 37, seed=4))


@pytest.mark.parametrize("kind", ["gan", "vae"])
def test_conditional_labels_are_checked(kind):
    module, meta = tiny(kind, num_classes=10)
    assert generate(module, meta, 5, label=9).shape == (5, 1, 28, 28)
    with pytest.raises(ImagegenError, match=r"label 10: expected a class index in 0\.\.9"):
        generate(module, meta, 5, label=10)
    plain, plain_meta = tiny(kind)
    with pytest.raises(ImagegenError, match="unconditional"):
        generate(plain, plain_meta, 5, label=1)


def test_save_images_writes_npy_and_png_atomically(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (10, 1, 28, 28), dtype=np.uint8)
    save_images(tmp_path / "s.npy", images)
    assert np.array_equal(np.load(tmp_path / "s.npy"), images[:, 0])
    save_images(tmp_path / "s.png", images)
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ImagegenError, match=r"s\.jpg: unknown output type"):
        save_images(tmp_path / "s.jpg", images)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npy", "s.png"]


def write(tmp_path, array):
    path = tmp_path / "samples.npy"
    np.save(path, array)
    return path


def test_load_samples_accepts_uint8_and_unit_floats(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (1000, 1, 28, 28), dtype=np.uint8)
    assert np.array_equal(load_samples(write(tmp_path, images)), images)
    floats = load_samples(write(tmp_path, images[:, 0] / 255.0))
    assert np.array_equal(floats, images)


@pytest.mark.parametrize("array, message", [
    (np.zeros((1000, 32, 32), np.uint8), r"shape \(1000, 32, 32\), expected N x 28 x 28"),
    (np.zeros((999, 28, 28), np.uint8), "999 samples, expected at least 1000"),
    (np.full((1000, 28, 28), np.nan), "784000 values are NaN or infinite"),
    (np.full((1000, 28, 28), 2.0), r"float values span 2\.\.2, expected 0\.\.1"),
    (np.zeros((1000, 28, 28), np.int16), "dtype int16, expected uint8"),
])
def test_load_samples_refuses_bad_files_with_one_line(tmp_path, array, message):
    with pytest.raises(ImagegenError, match=message) as err:
        load_samples(write(tmp_path, array))
    assert "\n" not in str(err.value)


def unsupported_files(folder):
    """Files that are not .npy arrays: an .npz archive, text, a pickle, truncated .npy bytes, a folder."""
    np.savez(folder / "x.npz", a=np.zeros((1000, 28, 28), np.uint8))
    (folder / "t.txt").write_text("hello\nworld\n")
    (folder / "t.npy").write_text("hello\nworld\n")
    (folder / "p.pkl").write_bytes(__import__("pickle").dumps({"a": 1}))
    np.save(folder / "cut.npy", np.zeros((1000, 28, 28), np.uint8))
    (folder / "cut.npy").write_bytes((folder / "cut.npy").read_bytes()[:60])
    (folder / "dir.npy").mkdir()
    return ["x.npz", "t.txt", "t.npy", "p.pkl", "cut.npy", "dir.npy"]


def test_unsupported_sample_files_get_the_same_one_line_refusal(tmp_path):
    for name in unsupported_files(tmp_path):
        with pytest.raises(ImagegenError) as err:
            load_samples(tmp_path / name)
        assert str(err.value) == (f"{tmp_path / name}: not a .npy array file; expected one written by "
                                  "numpy.save (N x H x W grey or N x H x W x 3 RGB images)")


def test_evaluate_samples_npz_is_refused_by_the_cli(tmp_path, capsys):
    from imagegen.cli import main

    unsupported_files(tmp_path)
    (tmp_path / "params.yaml").write_text("data:\n  dataset: fashion-mnist\n")
    code = main(["--params", str(tmp_path / "params.yaml"), "evaluate", "--samples", str(tmp_path / "x.npz")])
    assert code == 1
    assert capsys.readouterr().err == (f"imagegen evaluate: error: {tmp_path}/x.npz: not a .npy array file; "
                                       "expected one written by numpy.save (N x H x W grey or N x H x W x 3 RGB "
                                       "images)\n")


def load_error(folder) -> str:
    from imagegen.models.io import load_model

    with pytest.raises(ImagegenError) as err:
        load_model(folder)
    message = str(err.value)
    assert "\n" not in message and "weights_only" not in message and "unsafe" not in message
    return message


class Payload:
    """A pickle that would create a file when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("kind", ["gan", "vae"])
def test_a_loaded_model_runs_channels_last_on_the_cpu_with_the_saved_models_images(tmp_path, kind):
    import torch

    from imagegen.models.io import load_model, save_model

    module, meta = tiny(kind)
    save_model(tmp_path, module, meta)
    loaded, _ = load_model(tmp_path, "cpu")
    convolutions = [p for p in loaded.parameters() if p.dim() == 4 and p.shape[1] > 1]
    assert convolutions and all(p.is_contiguous(memory_format=torch.channels_last) for p in convolutions)
    assert not all(p.is_contiguous() for p in convolutions)
    assert np.array_equal(generate(loaded, meta, 50, seed=1), generate(module, meta, 50, seed=1))


def test_corrupt_or_mismatched_model_folders_are_one_line_errors(tmp_path):
    import json

    import torch

    from imagegen.models.io import load_model, save_model

    module, meta = tiny()
    save_model(tmp_path, module, meta)
    weights = tmp_path / "weights.pt"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])  # truncated
    assert load_error(tmp_path) == f"{weights}: damaged or not a PyTorch file"
    weights.write_text("a text file\n")
    assert load_error(tmp_path) == f"{weights}: damaged or not a PyTorch file"
    torch.save({"w": Payload(tmp_path / "pwned")}, weights)
    assert load_error(tmp_path) == (f"{weights}: holds Python objects besides tensors and plain values; "
                                    "refused (only weights are loaded)")
    assert not (tmp_path / "pwned").exists()
    weights.write_bytes(good)
    save_model(tmp_path, module, replace(meta, arch={**meta.arch, "width": 8}))  # weights of width 4
    weights.write_bytes(good)
    assert load_error(tmp_path) == (
        f"{weights}: does not fit the gan architecture in model.json: 16 shape mismatches (file vs model: "
        "project.0.weight 784x8 vs 1568x8, project.2.weight 16 vs 32, project.2.bias 16 vs 32, +13 more)")
    save_model(tmp_path, module, meta)
    state = torch.load(weights)
    state["extra.bias"] = state.pop("project.2.bias")
    torch.save(state, weights)
    assert load_error(tmp_path) == (f"{weights}: does not fit the gan architecture in model.json: "
                                    "1 missing key (project.2.bias); 1 unexpected key (extra.bias)")
    (tmp_path / "model.json").write_text("{not json")
    assert load_error(tmp_path) == (f"{tmp_path}/model.json: not valid JSON at line 1; "
                                    "expected the model description train wrote")
    (tmp_path / "model.json").write_text(json.dumps({"kind": "gan"}))
    assert load_error(tmp_path) == (f"{tmp_path}/model.json: missing arch, num_classes; "
                                    "expected kind, arch and num_classes")
    weights.unlink()
    assert load_error(tmp_path / "nowhere") == f"{tmp_path}/nowhere: no trained model there (model.json missing)"


def test_unreadable_checkpoint_is_one_warning_line(tmp_path, caplog):
    from imagegen.training.loop import LoopConfig, load_checkpoint

    path = tmp_path / "last.pt"
    path.write_bytes(b"PK\x03\x04 a cut-off zip")
    cfg = LoopConfig(epochs=1, seed=0, checkpoint_path=path, checkpoint_every=10, fingerprint="f")
    with caplog.at_level("WARNING"):
        assert load_checkpoint(cfg) is None
    assert [r.getMessage() for r in caplog.records] == [
        f"ignoring checkpoint {path}: damaged or not a PyTorch file; starting afresh"]
