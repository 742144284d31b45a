"""fsutil's atomic writes: whole or nothing, with the permissions the umask gives any other tool."""

from __future__ import annotations

import os
import stat

import pytest

from imagegen.config import Config
from imagegen.data.fetch import RAW_DIR
from imagegen.data.prepare import run_prepare
from imagegen.layout import PREPARED_DIR
from imagegen.fsutil import atomic_dir, atomic_file, umask, write_json
from tests.tiny import tiny_arrays, write_mirror


@pytest.fixture(params=[0o022, 0o027, 0o002])
def mask(request):
    before = os.umask(request.param)
    yield request.param
    os.umask(before)


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_umask_is_read_without_changing_it(mask):
    assert umask() == mask
    assert umask() == mask


def test_atomic_writes_respect_the_umask(tmp_path, mask):
    write_json(tmp_path / "a.json", {"a": 1})
    with atomic_dir(tmp_path / "out") as folder:
        (folder / "plain.txt").write_text("x")
        with atomic_file(folder / "inner.bin") as tmp:
            tmp.write_bytes(b"x")
    assert mode(tmp_path / "a.json") == 0o666 & ~mask
    assert mode(tmp_path / "out") == 0o777 & ~mask
    assert mode(tmp_path / "out" / "inner.bin") == mode(tmp_path / "out" / "plain.txt") == 0o666 & ~mask


def test_a_stage_output_is_readable_by_others_under_the_default_umask(tmp_path):
    before = os.umask(0o022)
    try:
        write_mirror(tmp_path / RAW_DIR, tiny_arrays(), compress=False)
        run_prepare(Config(), tmp_path)
    finally:
        os.umask(before)
    out = tmp_path / PREPARED_DIR
    assert mode(out) == 0o755
    assert {p.name: mode(p) for p in out.iterdir()} == {
        "train.npz": 0o644, "test.npz": 0o644, "manifest.parquet": 0o644, "dataset.json": 0o644}


def fsync_log(monkeypatch) -> list[tuple[str, str]]:
    """Record fsync and replace calls, in order, by path."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", f"{src} -> {dst}"))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def test_atomic_file_fsyncs_the_content_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = fsync_log(monkeypatch)
    with atomic_file(tmp_path / "weights.pt") as tmp:
        tmp.write_bytes(b"weights")
    (renamed,) = [i for i, (kind, _) in enumerate(events) if kind == "replace"]
    assert ("fsync", str(tmp)) in events[:renamed]
    assert events[renamed + 1:] == [("fsync", str(tmp_path))]


def test_atomic_dir_fsyncs_every_file_before_the_rename(tmp_path, monkeypatch):
    events = fsync_log(monkeypatch)
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "a.bin").write_bytes(b"a")
        (tmp / "sub" / "b.bin").write_bytes(b"b")
    renamed = next(i for i, (kind, what) in enumerate(events) if kind == "replace" and what.startswith(str(tmp)))
    synced = {what for kind, what in events[:renamed] if kind == "fsync"}
    assert {str(tmp / "a.bin"), str(tmp / "sub" / "b.bin"), str(tmp), str(tmp / "sub")} <= synced
    assert ("fsync", str(tmp_path)) in events[renamed + 1:]
    assert (tmp_path / "model" / "sub" / "b.bin").read_bytes() == b"b"
