"""Tiny untrained models, evaluation metrics and MLflow servers shared by the tests."""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from imagegen.fsutil import write_json
from imagegen.models.description import LEGACY_SHAPE, ModelDescription
from imagegen.models.io import save_model
from imagegen.models.kinds import build

ARCH = {"latent_dim": 8, "width": 4, "kernel_size": 4}
CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist: the offline mirror


def needs_debian(package: str, present: bool) -> pytest.MarkDecorator:
    """Skip unless `present`, with a reason naming the one command that installs the package."""
    return pytest.mark.skipif(not present, reason=missing_debian(package))


def missing_debian(package: str) -> str:
    return f"needs Debian's {package}: sudo apt-get install {package} (`make test` installs it when run as root)"


needs_fashion_mnist = needs_debian("dataset-fashion-mnist", FASHION_MNIST.is_dir())

TINY_ARCH = {"gan": ARCH, "vae": {"latent_dim": 8, "width": 4}, "features": {"width": 4, "feature_dim": 8}}


def make_model(folder: Path, kind: str, seed: int, conditional: bool = False, dataset: str = "fashion-mnist",
               image_shape: tuple[int, int, int] = LEGACY_SHAPE, classes: list[str] = CLASSES) -> ModelDescription:
    """A models/<kind> folder as the training stage writes it, with random weights from `seed`
    (a feature net always predicts the classes)."""
    torch.manual_seed(seed)
    num_classes = len(classes) if conditional or kind == "features" else 0
    description = ModelDescription(kind, TINY_ARCH[kind], num_classes, tuple(classes), tuple(image_shape),
                                   dataset=dataset)
    module = build(description)
    description = ModelDescription(kind, TINY_ARCH[kind], num_classes, tuple(classes), tuple(image_shape),
                                   dataset=dataset, parameters=sum(p.numel() for p in module.parameters()))
    folder.mkdir(parents=True, exist_ok=True)
    save_model(folder, module, description)
    return description


def make_project(root: Path, seed: int, fid: dict[str, float], dataset: str = "fashion-mnist",
                 conditional: bool = False) -> Path:
    """models/{gan,vae}, metrics/evaluate.json (fid per kind, other metrics fixed) and params.yaml."""
    for kind in ("gan", "vae"):
        make_model(root / "models" / kind, kind, seed + (100 if kind == "vae" else 0), conditional, dataset)
    evaluation = {kind: {"fid": value, "kid_mean": value / 1000, "kid_std": 0.001, "precision": 0.7,
                         "recall": 0.5, "class_entropy": 2.28, "n_samples": 64, "sampler": "ema"}
                  for kind, value in fid.items()}
    evaluation["reference"] = {"n_samples": 64}
    (root / "metrics").mkdir(parents=True, exist_ok=True)
    (root / "metrics" / "evaluate.json").write_text(json.dumps(evaluation))
    (root / "params.yaml").write_text(yaml.safe_dump({"data": {"dataset": dataset},
                                                      "register": {"metric": "fid", "margin": 0.01}}))
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:4]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} not healthy after {timeout} s:\n{log.read_text()[-3000:]}")


def start(cmd: list[str], log: Path, health: str, env: dict | None = None, cwd: Path | None = None):
    """Start a server (its own process group, so its workers stop with it) and wait until `health` answers."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
    try:
        wait_http(health, proc, log)
    except BaseException:
        stop(proc)
        raise
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def mlflow_server(folder: Path):
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder}/server.db",
           "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    proc = start(cmd, folder / "server.log", f"http://127.0.0.1:{port}/health", cwd=folder)
    return proc, f"http://127.0.0.1:{port}"


def cli_env(tracking_uri: str | None, **extra: str) -> dict:
    """The environment for an `imagegen` subprocess: the given tracking URI, or the embedded default."""
    env = {**os.environ, **extra}
    env.pop("MLFLOW_TRACKING_URI", None)
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return env


def mark_validated(root: Path) -> None:
    """metrics/validate.json as a passing validate stage writes it for root's prepared arrays
    (for tests about training or evaluation, not validation: the stages refuse unvalidated data)."""
    from imagegen.data.arrays import INFO
    from imagegen.data.integrity import HASH_KEY, RECORD, info_hash, split_hash

    hashes = {path.stem: split_hash(path) for path in sorted((root / "data" / "prepared").glob("*.npz"))}
    hashes[INFO] = info_hash(root)
    write_json(root / RECORD, {"success": True, "failed_expectations": 0, HASH_KEY: hashes})


def make_image_folder(root: Path, per_class: int = 16, seed: int = 0, start: int = 0) -> dict[str, Path]:
    """A labelled image folder root/<circle|square|triangle>/: coloured shapes 20-100 px wide and high, as PNG
    (RGB, RGBA, palette with transparency, 16-bit grey) and JPEG (RGB, CMYK, one with EXIF orientation),
    plus one corrupt PNG, one hidden file and one non-image file (returned by name). `start` numbers the
    files, so a second call adds new images to the folder."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    for label, shape in enumerate(("circle", "square", "triangle")):
        folder = root / shape
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(start, start + per_class):
            w, h = (int(v) for v in rng.integers(20, 101, size=2))
            background, colour = (tuple(int(c) for c in rng.integers(0, 256, size=3)) for _ in range(2))
            image = Image.new("RGBA", (w, h), (*background, 255 if i % 7 != 2 else 0))
            draw = ImageDraw.Draw(image)
            box = (w * 0.2, h * 0.2, w * 0.8, h * 0.8)
            if shape == "circle":
                draw.ellipse(box, fill=(*colour, 255))
            elif shape == "square":
                draw.rectangle(box, fill=(*colour, 255))
            else:
                draw.polygon([(w / 2, h * 0.2), (w * 0.8, h * 0.8), (w * 0.2, h * 0.8)], fill=(*colour, 255))
            kind, name = i % 7, folder / f"{shape}-{i:03d}"
            if kind == 0:
                image.convert("RGB").save(f"{name}.png")
            elif kind == 1:
                image.convert("RGB").save(f"{name}.jpg", quality=90)
            elif kind == 2:  # transparent background
                image.save(f"{name}.png")
            elif kind == 3:  # palette, background colour transparent
                palette = image.convert("RGB").quantize(16)
                palette.info["transparency"] = palette.getpixel((0, 0))
                palette.save(f"{name}.png", transparency=palette.getpixel((0, 0)))
            elif kind == 4:  # 16-bit grey
                grey = np.asarray(image.convert("L"), dtype=np.uint16) * 257
                Image.fromarray(grey).save(f"{name}.png")
            elif kind == 5:
                image.convert("CMYK").save(f"{name}.jpeg", quality=90)
            else:  # stored sideways, EXIF says rotate
                exif = Image.Exif()
                exif[0x0112] = 6
                image.convert("RGB").transpose(Image.Transpose.ROTATE_90).save(f"{name}.JPG", exif=exif)
    extras = {"corrupt": root / "square" / "broken.png", "hidden": root / "circle" / ".hidden.png",
              "other": root / "triangle" / "notes.txt"}
    if start == 0:
        good = (root / "square" / "square-000.png").read_bytes()
        extras["corrupt"].write_bytes(good[: len(good) // 2])  # truncated
        extras["hidden"].write_bytes(good)
        extras["other"].write_text("not an image\n")
    return extras


def decode_png(data: str | bytes) -> np.ndarray:
    """A served PNG (base64 text or bytes) as H x W grey or H x W x 3 RGB, decoded by Pillow."""
    raw = base64.b64decode(data) if isinstance(data, str) else data
    return np.array(Image.open(io.BytesIO(raw)))


def write_idx(path: Path, array: np.ndarray) -> None:
    """A uint8 array as an IDX file, as the official Fashion-MNIST files are written (fixtures, mirrors)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.tobytes())


def load_samples(path: Path, shape: tuple[int, int, int] = (1, 28, 28)) -> np.ndarray:
    """A samples .npy file read and conformed as `imagegen evaluate --samples` does."""
    from imagegen.evaluation.stage import conform_samples, read_samples

    return conform_samples(path, read_samples(path), shape)
