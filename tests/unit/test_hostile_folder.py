"""An image folder filled by someone else: every hostile file is skipped with its reason, the good images are read.

The folder is built here, file by file (no binary blobs in git)."""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import sys
import unicodedata
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from imagegen.config import Config
from imagegen.data.folder import SCAN, folder_name_problem, scan_folder
from imagegen.data.prepare import run_prepare
from imagegen.layout import MANIFEST, PREPARED_DIR
from imagegen.data.arrays import read_info
from imagegen.errors import ImagegenError

CAFE_NFC = unicodedata.normalize("NFC", "café")
CAFE_NFD = unicodedata.normalize("NFD", "café")
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nnewpath 0 0 moveto 8 8 lineto stroke\nshowpage\n"
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"><rect width="8" height="8"/></svg>\n'
BAD_NAME = b"caf\xe9.png"  # Latin-1, not UTF-8


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def big_png(side: int, bit_depth: int) -> bytes:
    """A grey PNG side x side, all zeros: a few hundred KB on disk, side**2 pixels once decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    row = b"\0" * (1 + side * bit_depth // 8)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, bit_depth, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def good(value: int, fmt: str = "PNG", mode: str = "L") -> bytes:
    return png_bytes(Image.new(mode, (30 + value % 7, 30), value), fmt)


def hostile_folder(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """ROOT with good images in classes a, b and café (as NFC and as NFD folders), plus every kind of
    hostile file; returns (root, {escaped path relative to root: expected reason})."""
    root = tmp_path / "images"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(good(200))
    for name, count in (("a", 6), ("b", 6), (CAFE_NFC, 3), (CAFE_NFD, 3)):
        (root / name).mkdir(parents=True)
        for i in range(count):
            (root / name / f"{i}.png").write_bytes(good(i * 30 + len(name) * 5))
    (root / "a" / "photo.jpg").write_bytes(good(90, "JPEG", "RGB"))
    (root / "a" / "web.webp").write_bytes(good(91, "WEBP", "RGB"))
    (root / "b" / "old.bmp").write_bytes(good(92, "BMP", "RGB"))
    (root / "b" / "wide16.png").write_bytes(png_bytes(Image.fromarray(np.full((40, 30), 30000, np.uint16))))
    a, b = root / "a", root / "b"
    (a / "bomb.png").write_bytes(big_png(9000, 8))
    (b / "bomb16.png").write_bytes(big_png(9000, 16))
    (a / "eps.png").write_bytes(EPS)
    (a / "anim.gif").write_bytes(good(10, "GIF"))
    (a / "vector.svg").write_bytes(SVG)
    (b / "scan.tif").write_bytes(good(11, "TIFF"))
    (b / "jpeg-named.png").write_bytes(good(12, "JPEG"))
    (a / "empty.png").write_bytes(b"")
    (b / "truncated.png").write_bytes(good(13)[:60])
    (a / "out.png").symlink_to(outside / "secret.png")
    (root / "linked-class").symlink_to(outside, target_is_directory=True)
    (a / "loop.png").symlink_to(a / "loop.png")
    (b / "up").symlink_to(root, target_is_directory=True)
    (root / "self").symlink_to(root / "self")  # a loop at the root
    (a / "same.png").symlink_to(a / "0.png")  # even inside the folder: not followed
    (root / "readme.txt").write_text("not a class\n")
    (a / ".DS_Store").write_bytes(b"\0")  # hidden: ignored, not listed
    with open(os.path.join(os.fsencode(a), BAD_NAME), "wb") as f:
        f.write(good(14))
    os.mkdir(os.path.join(os.fsencode(root), b"caf\xe9-class"))  # a class folder whose name is not UTF-8
    expected = {
        "a/bomb.png": "too-large", "b/bomb16.png": "too-large", "a/eps.png": "content",
        "a/anim.gif": "format", "a/vector.svg": "format", "b/scan.tif": "format", "b/jpeg-named.png": "content",
        "a/empty.png": "empty", "b/truncated.png": "damaged", "a/out.png": "symlink", "linked-class": "symlink",
        "a/loop.png": "symlink", "b/up": "symlink", "self": "symlink", "a/same.png": "symlink",
        "readme.txt": "not-in-a-class", "a/caf\\xe9.png": "name", "caf\\xe9-class": "name",
    }
    return root, expected


def folder_config(root: Path, **data) -> Config:
    return Config.model_validate({"data": {"dataset": "mine", "folder": str(root), "max_unreadable_fraction": 1,
                                           **data}})


@pytest.fixture
def no_subprocess():
    """Records every process this interpreter starts while the test runs (an audit hook: subprocess, exec,
    spawn, system), with a `gs` on PATH that Pillow would hand EPS to if it ever decoded one."""
    started: list[str] = []
    active = [True]

    def hook(event, args):
        if active[0] and event in ("subprocess.Popen", "os.posix_spawn", "os.exec", "os.spawn", "os.system",
                                   "os.fork", "os.forkpty"):
            started.append(f"{event} {args[:2]!r}")

    sys.addaudithook(hook)  # cannot be removed: switched off at the end instead
    yield started
    active[0] = False


def test_hostile_folder_prepared_with_every_bad_file_listed(tmp_path, no_subprocess, monkeypatch, caplog):
    root, expected = hostile_folder(tmp_path)
    fake_gs = tmp_path / "bin" / "gs"
    fake_gs.parent.mkdir()
    fake_gs.write_text("#!/bin/sh\nexit 1\n")
    fake_gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_gs.parent}{os.pathsep}{os.environ['PATH']}")
    caplog.set_level(logging.INFO)

    result = run_prepare(folder_config(root), tmp_path, processes=1)

    assert no_subprocess == []
    prepared = tmp_path / PREPARED_DIR
    assert read_info(prepared, "mine").classes == ("a", "b", CAFE_NFC)  # NFC and NFD folders: one class
    manifest = pd.read_parquet(prepared / MANIFEST)
    per_class = manifest["label"].value_counts().sort_index().tolist()
    assert per_class == [6 + 2, 6 + 2, 6]  # + photo.jpg, web.webp; + old.bmp, wide16.png
    assert sum(result.counts.values()) == 22 and result.skipped == len(expected)
    scan = json.loads((prepared / SCAN).read_text())
    listed = {entry["path"]: entry["reason"] for entry in scan["skipped"]}
    assert listed == expected
    assert all(entry["detail"] and "BytesIO" not in entry["detail"] for entry in scan["skipped"])
    details = {entry["path"]: entry["detail"] for entry in scan["skipped"]}
    assert details["a/empty.png"] == "empty file (0 bytes)"
    assert "9000 x 9000" in details["a/bomb.png"]
    assert details["b/jpeg-named.png"] == "content is JPEG, not PNG as its extension .png says"
    assert scan["files"] == 22 + len(expected) and scan["ignored"] == 1
    assert "Traceback" not in caplog.text
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["prepared"]


def test_too_many_skipped_files_stop_prepare_with_no_output(tmp_path):
    root, expected = hostile_folder(tmp_path)
    with pytest.raises(ImagegenError) as info:
        run_prepare(folder_config(root, max_unreadable_fraction=0.2), tmp_path, processes=1)
    message = str(info.value)
    assert message.startswith(f"prepare: {len(expected)} of {22 + len(expected)} files under {root} were skipped ")
    assert "\n" not in message and f"; and {len(expected) - 3} more" in message
    assert not (tmp_path / PREPARED_DIR).exists()


def test_scan_lists_links_names_and_formats(tmp_path):
    root, expected = hostile_folder(tmp_path)
    scan = scan_folder(root)
    assert scan.classes == ("a", "b", CAFE_NFC)
    read = {rel for _, rel in scan.files}
    assert f"{CAFE_NFD}/0.png" in read and f"{CAFE_NFC}/0.png" in read
    assert not read & {"a/out.png", "a/loop.png", "a/same.png", "a/anim.gif"}
    assert {entry["path"] for entry in scan.skipped} == {p for p, r in expected.items()
                                                     if r in ("format", "symlink", "name", "not-in-a-class")}


def test_non_utf8_name_is_one_line_before_dvc(tmp_path):
    root = tmp_path / "images"
    for name in ("a", "b"):
        (root / name / ".hidden").mkdir(parents=True)
        (root / name / "0.png").write_bytes(good(1))
    bad = os.path.join(os.fsencode(root / "b" / ".hidden"), BAD_NAME)  # DVC hashes hidden files too
    open(bad, "wb").close()
    (tmp_path / "params.yaml").write_text(f"data:\n  dataset: mine\n  folder: {root}\n")
    assert folder_name_problem(tmp_path) == (
        f"data.folder: {root}/b/.hidden/caf\\xe9.png: the name is not valid UTF-8, so DVC cannot hash the folder; "
        "rename it (e.g. convmv -f latin1 -t utf-8 --notest) or move it out of the folder")
    os.unlink(bad)
    assert folder_name_problem(tmp_path) is None
    (tmp_path / "params.yaml").write_text("data:\n  dataset: fashion-mnist\n")
    assert folder_name_problem(tmp_path) is None  # a built-in: nothing to check
