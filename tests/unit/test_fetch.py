"""fetch against local mirror folders and a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import gzip
import os
import http.server
import threading
from collections import defaultdict
from pathlib import Path

import pytest

from imagegen.config import Config, DataConfig
from imagegen.data import datasets
from imagegen.data.fetch import RAW_DIR, run_fetch
from imagegen.errors import ImagegenError
from tests.tiny import tiny_arrays, write_mirror


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A gzip mirror of the tiny dataset, registered as 'fashion-mnist' for the test."""
    folder = tmp_path / "mirror"
    spec = write_mirror(folder, tiny_arrays())
    monkeypatch.setitem(datasets.DATASETS, "fashion-mnist", spec)
    return folder


def fetch(root: Path, *sources, **data) -> object:
    cfg = Config(data=DataConfig(sources=[str(s) for s in sources], backoff_s=0, **data))
    return run_fetch(cfg, root)


def raw_files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / RAW_DIR).iterdir())}


def leftovers(root: Path) -> list[str]:
    data = root / "data"
    return sorted(p.name for p in data.iterdir()) if data.exists() else []


def test_mirror_files_are_stored_decompressed(tmp_path, mirror):
    result = fetch(tmp_path / "out", mirror)
    files = raw_files(tmp_path / "out")
    assert sorted(files) == sorted(s.name for s in datasets.DATASETS["fashion-mnist"].files.values())
    for name, content in files.items():
        assert content == gzip.decompress((mirror / f"{name}.gz").read_bytes())
    assert set(result.sources.values()) == {str(mirror)}


def test_cli_reports_the_files_it_fetched(tmp_path, mirror, monkeypatch, capsys):
    from dataclasses import replace

    from imagegen.cli import main

    spec = datasets.DATASETS["fashion-mnist"]
    three = dict(list(spec.files.items())[:3])
    monkeypatch.setitem(datasets.DATASETS, "fashion-mnist", replace(spec, files=three))
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(f"data:\n  sources: [{tmp_path / 'none'}, {mirror}]\n")
    assert main(["fetch"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"imagegen fetch: fashion-mnist: 3 files in data/raw (from {mirror}) (")
    assert len(list(Path("data/raw").iterdir())) == 3


def test_uncompressed_mirror_gives_identical_output(tmp_path, mirror):
    plain = tmp_path / "plain"
    write_mirror(plain, tiny_arrays(), compress=False)
    fetch(tmp_path / "a", mirror)
    fetch(tmp_path / "b", plain)
    assert raw_files(tmp_path / "a") == raw_files(tmp_path / "b")


def test_recompressed_file_passes_on_content_checksum(tmp_path, mirror):
    """Debian's .gz files differ byte-wise from upstream's; the content checksum decides."""
    name = "train-labels-idx1-ubyte.gz"
    content = gzip.decompress((mirror / name).read_bytes())
    (mirror / name).write_bytes(gzip.compress(content, compresslevel=1, mtime=12345))
    fetch(tmp_path / "out", mirror)
    assert raw_files(tmp_path / "out")["train-labels-idx1-ubyte"] == content


def test_missing_folder_falls_through_to_next_source(tmp_path, mirror):
    result = fetch(tmp_path / "out", tmp_path / "does-not-exist", mirror)
    assert set(result.sources.values()) == {str(mirror)}


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda b: b[:-20], "corrupt gzip data"),  # truncated .gz
        (lambda b: b[:10] + bytes(len(b) - 10), "corrupt gzip data"),  # garbage after the header
        (lambda b: gzip.compress(gzip.decompress(b)[:-5]), "checksum mismatch"),  # truncated content
        (lambda b: gzip.compress(gzip.decompress(b)[:-1] + b"\x07"), "checksum mismatch"),  # wrong bytes
        # a gzip bomb (50 MB of zeros in 50 KB): refused at the file's known size, 16 + 40 x 28 x 28 bytes
        (lambda b: gzip.compress(bytes(50 << 20)), "t10k-images-idx3-ubyte.gz decompresses to more than 31376 bytes"),
    ],
)
def test_bad_file_is_rejected_and_next_source_used(tmp_path, mirror, damage, expected):
    bad = tmp_path / "bad"
    write_mirror(bad, tiny_arrays())
    target = bad / "t10k-images-idx3-ubyte.gz"
    target.write_bytes(damage(target.read_bytes()))

    result = fetch(tmp_path / "out", bad, mirror)
    assert result.sources["t10k-images-idx3-ubyte"] == str(mirror)
    assert result.sources["train-images-idx3-ubyte"] == str(bad)

    with pytest.raises(ImagegenError, match=expected) as info:
        fetch(tmp_path / "only-bad", bad)
    assert "\n" not in str(info.value)
    assert leftovers(tmp_path / "only-bad") == []


def test_all_sources_failing_lists_each(tmp_path, mirror):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImagegenError) as info:
        fetch(tmp_path / "out", tmp_path / "nowhere", empty)
    message = str(info.value)
    assert "no source gave a valid train-images-idx3-ubyte" in message
    assert f"{tmp_path / 'nowhere'}: no such folder" in message
    assert f"{empty}: neither train-images-idx3-ubyte.gz nor train-images-idx3-ubyte is there" in message
    assert leftovers(tmp_path / "out") == []


def test_failed_refetch_keeps_previous_good_output(tmp_path, mirror):
    out = tmp_path / "out"
    fetch(out, mirror)
    before = raw_files(out)
    with pytest.raises(ImagegenError):
        fetch(out, tmp_path / "nowhere")
    assert raw_files(out) == before
    assert leftovers(out) == ["raw"]


def test_dataset_placeholder_in_source(tmp_path, mirror):
    (tmp_path / "fashion-mnist").symlink_to(mirror)
    result = fetch(tmp_path / "out", str(tmp_path / "{dataset}"))
    assert set(result.sources.values()) == {str(tmp_path / "fashion-mnist")}


# --- HTTP on loopback ---------------------------------------------------------------------


class Server:
    """Serves the mirror folder; `plan[path]` lists behaviours for successive requests:
    'ok', '404', '500', 'truncate' (declares the full length, sends half, closes)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.plan: dict[str, list[str]] = {}
        self.hits: dict[str, int] = defaultdict(int)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.hits[self.path] += 1
                steps = server.plan.get(self.path, ["ok"])
                step = steps[min(server.hits[self.path], len(steps)) - 1]
                file = server.folder / self.path.rsplit("/", 1)[-1]
                if step == "404" or not file.exists():
                    self.send_error(404, "Not Found")
                elif step == "500":
                    self.send_error(500, "Internal Server Error")
                else:
                    body = file.read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 2] if step == "truncate" else body)
                    self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/data"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_download_from_http(tmp_path, mirror):
    with Server(mirror) as server:
        result = fetch(tmp_path / "out", server.url)
        assert set(result.sources.values()) == {server.url}
    fetch(tmp_path / "local", mirror)
    assert raw_files(tmp_path / "out") == raw_files(tmp_path / "local")


def test_http_404_falls_through_without_retry(tmp_path, mirror):
    with Server(mirror) as server:
        server.plan["/data/train-labels-idx1-ubyte.gz"] = ["404"]
        result = fetch(tmp_path / "out", server.url, mirror, retries=3)
        assert server.hits["/data/train-labels-idx1-ubyte.gz"] == 1
    assert result.sources["train-labels-idx1-ubyte"] == str(mirror)
    assert result.sources["train-images-idx3-ubyte"] == server.url


def test_http_errors_are_retried(tmp_path, mirror):
    path = "/data/t10k-labels-idx1-ubyte.gz"
    with Server(mirror) as server:
        server.plan[path] = ["500", "truncate", "ok"]
        result = fetch(tmp_path / "out", server.url, retries=2)
        assert server.hits[path] == 3
    assert result.sources["t10k-labels-idx1-ubyte"] == server.url


def test_truncated_body_after_all_retries_is_reported(tmp_path, mirror):
    path = "/data/t10k-images-idx3-ubyte.gz"
    with Server(mirror) as server:
        server.plan[path] = ["truncate"]
        with pytest.raises(ImagegenError) as info:
            fetch(tmp_path / "out", server.url, retries=1)
        assert server.hits[path] == 2
    assert "truncated body" in str(info.value) and "after 2 attempts" in str(info.value)
    assert leftovers(tmp_path / "out") == []


def test_unreachable_server(tmp_path, mirror):
    with Server(mirror) as server:
        url = server.url
    with pytest.raises(ImagegenError, match="network error") as info:
        fetch(tmp_path / "out", url, retries=0, timeout_s=5)
    assert url in str(info.value)


def test_download_longer_than_the_file_can_be_is_cut(tmp_path, mirror):
    big = tmp_path / "big"
    write_mirror(big, tiny_arrays())
    (big / "t10k-labels-idx1-ubyte.gz").write_bytes(os.urandom(4 << 20))
    with Server(big) as server:
        with pytest.raises(ImagegenError) as info:
            fetch(tmp_path / "out", server.url, retries=0)
    # 48 bytes decompressed (8 + 40 labels): no gzip of it is over 48 + 4096 bytes
    assert f"{server.url}: the download is over 4144 bytes, more than the file can be" in str(info.value)
    assert leftovers(tmp_path / "out") == []
