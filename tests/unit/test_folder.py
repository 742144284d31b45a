"""Reading a labelled image folder: decoding every mode, the hash split, one-line errors for bad folders."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagegen.config import Config, load_config
from imagegen.data.folder import decode_image, in_test, scan_folder
from imagegen.data.prepare import run_prepare
from imagegen.layout import PREPARED_DIR
from imagegen.errors import ImagegenError


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def decode_bytes(data: bytes, size: int, channels: int, background: str):
    """decode_image on bytes, the extension taken from their format."""
    return decode_image(io.BytesIO(data), ".jpg" if data[:2] == b"\xff\xd8" else ".png", size, channels, background)


def test_grey_png_at_its_own_size_is_read_byte_for_byte():
    pixels = np.random.default_rng(0).integers(0, 256, size=(28, 28), dtype=np.uint8)
    decoded, width, height, mode = decode_bytes(encode(Image.fromarray(pixels)), 28, 1, "white")
    assert decoded.shape == (1, 28, 28) and decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded[0], pixels)
    assert (width, height, mode) == (28, 28, "L")


def test_shorter_side_resized_then_centre_cropped():
    """A 96 x 64 RGB image: left and right 16 px columns red (cropped away), the centre 64 x 64 green over
    blue (top and bottom halves): at 32 x 32 only green and blue remain, each half of the rows."""
    pixels = np.zeros((64, 96, 3), np.uint8)
    pixels[:, :16] = pixels[:, 80:] = (255, 0, 0)
    pixels[:32, 16:80] = (0, 255, 0)
    pixels[32:, 16:80] = (0, 0, 255)
    decoded, width, height, _ = decode_bytes(encode(Image.fromarray(pixels)), 32, 3, "white")
    assert decoded.shape == (3, 32, 32) and (width, height) == (96, 64)
    assert decoded[0, :, 1:-1].max() <= 2 and decoded[0].max() < 40  # red only bleeds into the edge columns
    assert (decoded[1, :14, 1:-1] >= 250).all() and (decoded[2, 18:, 1:-1] >= 250).all()


@pytest.mark.parametrize("background, value", [("white", 255), ("black", 0)])
def test_alpha_composited_on_the_background(background, value):
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[10:30, 10:30] = (200, 100, 50, 255)  # an opaque square on a transparent field
    decoded, *_ = decode_bytes(encode(Image.fromarray(rgba)), 40, 3, background)
    assert (decoded[:, 0, 0] == value).all() and tuple(decoded[:, 20, 20]) == (200, 100, 50)
    grey, *_ = decode_bytes(encode(Image.fromarray(rgba).convert("LA")), 40, 1, background)
    assert grey.shape == (1, 40, 40) and grey[0, 0, 0] == value


def test_palette_with_transparency_and_cmyk():
    palette = Image.new("P", (30, 30), 0)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.paste(1, (10, 10, 20, 20))
    decoded, *_ = decode_bytes(encode(palette, transparency=0), 30, 3, "white")
    assert tuple(decoded[:, 0, 0]) == (255, 255, 255) and tuple(decoded[:, 15, 15]) == (10, 200, 30)
    cmyk = Image.new("CMYK", (30, 30), (0, 255, 255, 0))  # red
    decoded, _, _, mode = decode_bytes(encode(cmyk, "JPEG", quality=95), 30, 3, "white")
    assert mode == "CMYK" and decoded[0].mean() > 240 and decoded[1:].mean() < 15


def test_16_bit_grey_is_scaled_not_clipped():
    wide = np.array([[0, 257 * 100, 65535, 30000]] * 4, dtype=np.uint16)
    decoded, _, _, mode = decode_bytes(encode(Image.fromarray(wide)), 4, 1, "white")
    assert mode.startswith("I")
    assert decoded[0, 0].tolist() == [0, 100, 255, round(30000 / 257)]


def test_exif_orientation_is_applied():
    upright = np.zeros((60, 30, 3), np.uint8)
    upright[:20] = (255, 255, 255)  # white top third
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated; displayed after a 90 degree turn clockwise
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
    decoded, width, height, _ = decode_bytes(encode(stored, exif=exif), 30, 1, "white")
    expected, *_ = decode_bytes(encode(Image.fromarray(upright)), 30, 1, "white")
    assert (width, height) == (60, 30)  # as stored
    np.testing.assert_array_equal(decoded, expected)


@pytest.mark.parametrize("data", [b"not an image at all", None])
def test_unreadable_bytes_raise(data):
    if data is None:  # truncated
        data = encode(Image.new("RGB", (50, 50), (1, 2, 3)))[:60]
    with pytest.raises(Exception):
        decode_bytes(data, 28, 1, "white")


def test_split_depends_on_the_content_hash_only():
    low, high = "0" * 64, "f" * 64
    assert in_test(low, 0.15) and not in_test(high, 0.15)
    hashes = [f"{i:064x}" for i in range(0, 2**256, 2**248)]  # 256 evenly spread values
    assert sum(in_test(h, 0.25) for h in hashes) == 64


def make_folder(root: Path, classes: dict[str, int]) -> Path:
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.new("L", (30, 30), i * 20).save(root / name / f"{i}.png")
    return root


def folder_config(folder: Path, **data) -> Config:
    return Config.model_validate({"data": {"dataset": "mine", "folder": str(folder), **data}})


@pytest.mark.parametrize("classes, expected", [
    ({"cats": 3}, "data.folder: {root} has 1 class folder(s) (cats); expected two or more sub-folders, one per class"),
    ({"cats": 3, "dogs": 0}, "data.folder: {root}/dogs holds no image files (.bmp .jpeg .jpg .png .webp); "
                             "expected at least one per class (add images or remove the folder)"),
])
def test_bad_folders_are_one_line_errors_naming_the_path(tmp_path, classes, expected):
    root = make_folder(tmp_path / "images", classes)
    with pytest.raises(ImagegenError) as info:
        run_prepare(folder_config(root), tmp_path)
    assert str(info.value) == expected.format(root=root)
    assert not (tmp_path / PREPARED_DIR).exists()


def test_missing_folder_and_a_file_instead(tmp_path):
    with pytest.raises(ImagegenError) as info:
        scan_folder(tmp_path / "nope")
    assert str(info.value) == f"data.folder: {tmp_path / 'nope'}: no such folder; expected ROOT/<class>/<image files>"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ImagegenError, match="data.folder: .*/file is not a folder"):
        scan_folder(tmp_path / "file")


def test_hidden_files_are_ignored_and_other_files_skipped(tmp_path):
    root = make_folder(tmp_path / "images", {"a": 2, "b": 1})
    (root / "a" / ".DS_Store").write_bytes(b"\0")
    (root / "a" / "readme.md").write_text("x")
    (root / ".cache").mkdir()
    (root / "top.png").write_bytes((root / "b" / "0.png").read_bytes())
    (root / "b" / "deeper").mkdir()
    (root / "b" / "deeper" / "x.PNG").write_bytes((root / "b" / "0.png").read_bytes())
    scan = scan_folder(root)
    assert scan.classes == ("a", "b")
    assert scan.files == [(0, "a/0.png"), (0, "a/1.png"), (1, "b/0.png"), (1, "b/deeper/x.PNG")]
    assert scan.ignored == 2  # .cache and .DS_Store
    assert [(s["path"], s["reason"]) for s in scan.skipped] == [("top.png", "not-in-a-class"), ("a/readme.md", "format")]


def test_too_many_skipped_files_stop_prepare(tmp_path):
    root = make_folder(tmp_path / "images", {"a": 4, "b": 4})
    (root / "a" / "bad.png").write_bytes(b"")
    with pytest.raises(ImagegenError) as info:
        run_prepare(folder_config(root, max_unreadable_fraction=0.1), tmp_path, processes=1)
    assert str(info.value) == (f"prepare: 1 of 9 files under {root} were skipped (11.1%, above "
                               "data.max_unreadable_fraction 0.1; all listed with reasons in the log): "
                               f"{root}/a/bad.png (empty: empty file (0 bytes))")
    assert not (tmp_path / PREPARED_DIR).exists()


@pytest.mark.parametrize("text, expected", [
    ("data:\n  dataset: mine\n  folder: x\n  image_size: 48\n", "data.image_size: Input should be 28, 32 or 64 (got 48)"),
    ("data:\n  dataset: mine\n  folder: x\n  channels: 2\n", "data.channels: Input should be 1 or 3 (got 2)"),
    ("data:\n  image_size: 32\n", "data.image_size: fashion-mnist images are 28 x 28 grey, so 28 is the only value"),
    ("data:\n  dataset: mnist\n  channels: 3\n", "data.channels: mnist images are 28 x 28 grey, so 1 is the only value"),
    ("data:\n  dataset: mine\n", "data.folder: mine is not a built-in dataset (fashion-mnist, mnist); expected the folder"),
    ("data:\n  folder: /images\n", "data.folder: fashion-mnist is a built-in dataset, read from data/raw"),
    ("data:\n  dataset: my shoes\n  folder: x\n", "data.dataset: 'my shoes' is not a usable name"),
    ("data:\n  dataset: mine\n  folder: x\n  test_fraction: 1\n", "data.test_fraction: Input should be less than 1"),
    ("validate:\n  class_share_warn: 0.2\n  class_share_fail: 0.3\n",
     "validate.class_share_fail: 0.3 is above class_share_warn 0.2"),
])
def test_folder_params_are_checked_on_load(tmp_path, text, expected):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ImagegenError) as info:
        load_config(path)
    assert f"{path}: {expected}" in str(info.value) and "\n" not in str(info.value)


def test_folder_params_load(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("data:\n  dataset: shoes\n  folder: /data/shoes\n  image_size: 64\n  channels: 3\n")
    data = load_config(path).data
    assert (data.builtin, data.folder, data.image_size, data.channels) == (False, "/data/shoes", 64, 3)
    assert Config().data.builtin and Config().data.folder == "data/raw"


def test_fetch_only_checks_the_folder(tmp_path):
    import json

    from imagegen.data.fetch import RAW_DIR, run_fetch

    root = make_folder(tmp_path / "images", {"a": 1, "b": 1})
    assert run_fetch(folder_config(root), tmp_path).sources == {}
    assert json.loads((tmp_path / RAW_DIR / "folder.json").read_text())["folder"] == str(root)
    with pytest.raises(ImagegenError, match=f"^data.folder: {tmp_path}/gone: no such folder"):
        run_fetch(folder_config(tmp_path / "gone"), tmp_path)
    assert json.loads((tmp_path / RAW_DIR / "folder.json").read_text())["folder"] == str(root)  # left as it was
