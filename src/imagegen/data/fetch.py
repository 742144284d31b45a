"""fetch: get the dataset's four IDX files from the first source that has them intact.

Sources are local mirror folders and http(s) base URLs, tried in the configured order.
Whatever the source, a file is accepted only when its checksum matches (see datasets.py) and
no byte is written past its known size (a gzip bomb or an endless download is cut there);
it is stored decompressed in data/raw/, so the stage output is identical whichever
source served it.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

from imagegen.config import Config, DataConfig
from imagegen.data.datasets import DATASETS, FileSpec
from imagegen.errors import ImagegenError
from imagegen.fsutil import atomic_dir

log = logging.getLogger(__name__)

RAW_DIR = Path("data/raw")
CHUNK = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"


class SourceError(Exception):
    """One source could not supply one file; the next source is tried."""


class TransientError(SourceError):
    """A network failure worth retrying (connection, timeout, truncated body, HTTP 5xx)."""


@dataclass(frozen=True)
class FetchResult:
    dataset: str
    raw_dir: Path
    sources: dict[str, str]  # file name -> source that supplied it


def run_fetch(cfg: Config, root: Path = Path(".")) -> FetchResult:
    if not cfg.data.builtin:
        return check_folder(cfg, root)
    spec = DATASETS[cfg.data.dataset]
    sources = expand_sources(cfg.data)
    raw_dir = root / RAW_DIR
    used: dict[str, str] = {}
    with atomic_dir(raw_dir) as tmp_dir:
        for key, file_spec in spec.files.items():
            used[file_spec.name] = fetch_file(file_spec, sources, tmp_dir, cfg.data, spec.name, spec.file_size(key))
    return FetchResult(spec.name, raw_dir, used)


def check_folder(cfg: Config, root: Path) -> FetchResult:
    """A folder dataset has nothing to download: check that the folder can be one (prepare depends on the
    folder itself) and leave a note in data/raw, the stage's output."""
    import json

    from imagegen.data.folder import scan_folder

    scan = scan_folder(root / cfg.data.folder)
    with atomic_dir(root / RAW_DIR) as tmp_dir:
        (tmp_dir / "folder.json").write_text(json.dumps({"dataset": cfg.data.dataset, "folder": cfg.data.folder,
                                                         "note": "prepare reads the images from the folder"}) + "\n")
    log.info("fetch: %s: %d classes, %d image files in %s; nothing to fetch",
             cfg.data.dataset, len(scan.classes), len(scan.files), scan.root)
    return FetchResult(cfg.data.dataset, root / RAW_DIR, {})


def expand_sources(data: DataConfig) -> list[str]:
    sources: list[str] = []
    for source in data.sources:
        if source == "official":
            sources.extend(DATASETS[data.dataset].urls)
        else:
            sources.append(source.replace("{dataset}", data.dataset))
    return sources


def fetch_file(spec: FileSpec, sources: list[str], out_dir: Path, data: DataConfig, dataset: str,
               size: int) -> str:
    """Write the verified, decompressed file (`size` bytes) to out_dir/spec.name; return the source used."""
    failures = []
    for source in sources:
        try:
            if is_url(source):
                download_verified(spec, source, out_dir, data, size)
            else:
                copy_verified(spec, Path(source.removeprefix("file://")), out_dir, size)
        except SourceError as exc:
            log.info("fetch: %s from %s failed: %s", spec.name, source, exc)
            failures.append(f"{source}: {exc}")
            continue
        log.info("fetch: %s from %s (checksum ok)", spec.name, source)
        return source
    raise ImagegenError(
        f"fetch: no source gave a valid {spec.name} for {dataset} (params.yaml data.sources): "
        + "; ".join(failures)
    )


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def copy_verified(spec: FileSpec, folder: Path, out_dir: Path, size: int) -> None:
    if not folder.is_dir():
        raise SourceError("no such folder")
    for candidate in (folder / f"{spec.name}.gz", folder / spec.name):
        if candidate.is_file():
            verify_into(candidate, spec, out_dir / spec.name, size)
            return
    raise SourceError(f"neither {spec.name}.gz nor {spec.name} is there")


def download_verified(spec: FileSpec, base_url: str, out_dir: Path, data: DataConfig, size: int) -> None:
    url = f"{base_url.rstrip('/')}/{spec.name}.gz"
    download = out_dir / f".{spec.name}.download"
    try:
        for attempt in range(data.retries + 1):
            try:
                download_once(url, download, data.timeout_s, size + size // 64 + 4096)  # gzip never grows more
                break
            except TransientError as exc:
                if attempt == data.retries:
                    raise SourceError(f"{exc} (after {attempt + 1} attempts)") from None
                delay = data.backoff_s * 2**attempt
                log.warning("fetch: %s: %s; retrying in %.1f s", url, exc, delay)
                time.sleep(delay)
        verify_into(download, spec, out_dir / spec.name, size)
    finally:
        download.unlink(missing_ok=True)


def download_once(url: str, dest: Path, timeout_s: float, max_bytes: int) -> None:
    from tqdm import tqdm

    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response, dest.open("wb") as out:
            expected = response.headers.get("Content-Length")
            expected = int(expected) if expected and expected.isdigit() else None
            received = 0
            with tqdm(total=expected, unit="B", unit_scale=True, desc=Path(url).name,
                      disable=None, leave=False) as bar:
                while chunk := response.read(CHUNK):
                    received += len(chunk)
                    if received > max_bytes:
                        raise SourceError(f"the download is over {max_bytes} bytes, more than the file can be")
                    out.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as exc:
        error = TransientError if exc.code >= 500 else SourceError
        raise error(f"HTTP {exc.code} {exc.reason}") from None
    except http.client.IncompleteRead as exc:
        raise TransientError(f"truncated body ({len(exc.partial)} bytes, then the connection closed)") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise TransientError(f"network error: {reason}") from None
    if expected is not None and received != expected:
        raise TransientError(f"truncated body ({received} of {expected} bytes)")


def verify_into(src: Path, spec: FileSpec, dest: Path, size: int) -> None:
    """Decompress src (if gzip) into dest, at most `size` bytes, and check its checksums; remove dest if they fail."""
    raw_md5 = hashlib.md5(usedforsecurity=False)
    with src.open("rb") as f:
        while chunk := f.read(CHUNK):
            raw_md5.update(chunk)
        f.seek(0)
        compressed = f.read(2) == GZIP_MAGIC
    content_sha = hashlib.sha256()
    written = 0
    try:
        with (gzip.open(src, "rb") if compressed else src.open("rb")) as f, dest.open("wb") as out:
            while chunk := f.read(CHUNK):
                written += len(chunk)
                if written > size:
                    dest.unlink()
                    raise SourceError(f"{src.name} decompresses to more than {size} bytes, the size of {spec.name} "
                                      "for this dataset; not its file")
                content_sha.update(chunk)
                out.write(chunk)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        dest.unlink(missing_ok=True)
        raise SourceError(f"corrupt gzip data in {src.name} ({exc})") from None
    if content_sha.hexdigest() == spec.content_sha256 or raw_md5.hexdigest() == spec.gz_md5:
        return
    dest.unlink(missing_ok=True)
    if spec.content_sha256:
        raise SourceError(
            f"checksum mismatch for {src.name}: content sha256 {content_sha.hexdigest()[:16]}…, "
            f"expected {spec.content_sha256[:16]}…"
        )
    raise SourceError(f"checksum mismatch for {src.name}: md5 {raw_md5.hexdigest()}, expected {spec.gz_md5}")


