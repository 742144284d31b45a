"""Throughput and peak memory of `imagegen prepare` on a labelled image folder.

    python bench/folder_prepare.py --images 10000 --image-size 32 --channels 3
    python bench/folder_prepare.py --images 100000 --image-size 64 --channels 3 --sizes 64-128

Generates WORKDIR/folder (once per set of options: ten classes of coloured shapes on noisy
backgrounds, sides drawn from --sizes, a third JPEG, the rest PNG), then runs `imagegen prepare`
there under /usr/bin/time -v (when present) and prints images/s, wall time and the peak resident
memory of the prepare process (its decoding processes are separate, each holding one chunk).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def generate(folder: Path, images: int, low: int, high: int, seed: int = 0) -> None:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    for i in range(images):
        label = i % 10
        w, h = (int(v) for v in rng.integers(low, high + 1, size=2))
        noise = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) // 4 + rng.integers(0, 192, size=3, dtype=np.uint8)
        image = Image.fromarray(noise)
        draw = ImageDraw.Draw(image)
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        box = (w * 0.2, h * 0.2, w * 0.8, h * 0.8)
        (draw.ellipse if label % 2 else draw.rectangle)(box, fill=colour)
        out = folder / f"class-{label}"
        out.mkdir(parents=True, exist_ok=True)
        if i % 3 == 0:
            image.save(out / f"{i:06d}.jpg", quality=90)
        else:
            image.save(out / f"{i:06d}.png")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--image-size", type=int, default=32, choices=(28, 32, 64))
    parser.add_argument("--channels", type=int, default=3, choices=(1, 3))
    parser.add_argument("--sizes", default="20-100", help="range of the source images' sides, px (default 20-100)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/imagegen-folder-bench"))
    args = parser.parse_args()
    low, high = (int(v) for v in args.sizes.split("-"))
    folder = args.workdir / f"folder-{args.images}-{low}-{high}"
    if not (folder / ".complete").exists():
        shutil.rmtree(folder, ignore_errors=True)
        started = time.perf_counter()
        generate(folder, args.images, low, high)
        (folder / ".complete").touch()
        print(f"generated {args.images} images in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    project = args.workdir / "project"
    project.mkdir(parents=True, exist_ok=True)
    (project / "params.yaml").write_text(json.dumps({"data": {
        "dataset": "bench", "folder": str(folder), "image_size": args.image_size, "channels": args.channels}}))
    command = [shutil.which("imagegen") or "imagegen", "prepare"]
    timer = ["/usr/bin/time", "-v"] if Path("/usr/bin/time").exists() else []
    started = time.perf_counter()
    run = subprocess.run(timer + command, cwd=project, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if run.returncode != 0:
        print(run.stdout, run.stderr, file=sys.stderr)
        return 1
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr)
    result = {"images": args.images, "sources_px": args.sizes, "image_size": args.image_size,
              "channels": args.channels, "seconds": round(seconds, 1), "images_per_s": round(args.images / seconds),
              "peak_rss_mb": round(int(peak.group(1)) / 1024) if peak else None,
              "prepared_mb": round(sum(p.stat().st_size for p in (project / "data/prepared").iterdir()) / 2**20, 1)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
