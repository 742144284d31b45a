"""fsutil's atomic writes: whole or nothing, with the permissions the umask gives any other tool."""

from __future__ import annotations

import os
import stat

import pytest

from imagegen.config import Config
from imagegen.data.fetch import RAW_DIR
from imagegen.data.prepare import PREPARED_DIR, run_prepare
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
