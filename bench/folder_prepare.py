"""Folder prepare: throughput and peak memory of `imagegen prepare` on a labelled image folder
Memory must not grow with the folder: images are decoded on every core and streamed to disk one at a time,
and hostile files (decompression bombs, lying extensions, links, broken names) are skipped with a reason.

    python bench/folder_prepare.py --images 10000 --image-size 32 --channels 3
    python bench/folder_prepare.py --images 10000 --image-size 32 --channels 3 --hostile
    python bench/folder_prepare.py --images 100000 --image-size 64 --channels 3 --sizes 64-128

Generates WORKDIR/folder (once per set of options: ten classes of coloured shapes on noisy
backgrounds, sides drawn from --sizes, a third JPEG, the rest PNG; --hostile adds the files of
add_hostile: images over the pixel limit and just under it, EPS named .png, other formats, empty and
truncated files, links out of the folder and a loop, a name that is not UTF-8), then runs
`imagegen prepare` there under /usr/bin/time -v (when present) and prints images/s, wall time, the
peak resident memory of the largest single process (peak_rss_mb: prepare or one of its decoding
processes) and of the whole process tree together (peak_tree_rss_mb, sampled every 20 ms), and the
skipped files per reason.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
from benchlog import record


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


def png(side: int, bit_depth: int, colour_type: int = 0, fill: bytes = b"\0") -> bytes:
    """A PNG side x side of one colour, written row by row (small on disk however large decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    channels = {0: 1, 6: 4}[colour_type]
    packer = zlib.compressobj(9)
    row = b"\0" + fill * (side * channels * bit_depth // 8 // len(fill))
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def add_hostile(folder: Path, image_size: int, copies: int = 3) -> None:
    """In folder/class-0, `copies` times: a 16-bit and an 8-bit grey PNG of 9000 x 9000 (81 Mpx, under Pillow's
    own limit, 160 KB on disk), a 16-bit grey and an RGBA PNG just under prepare's pixel limit; once: EPS named
    .png, a GIF, an SVG, a TIFF, an empty and a truncated PNG, a link out of the folder, a link to itself and a
    file whose name is Latin-1, not UTF-8."""
    from PIL import Image

    from imagegen.data.folder import MAX_SCALE

    target = folder / "class-0"
    under = MAX_SCALE * image_size - 1
    for i in range(copies):
        (target / f"bomb16-{i}.png").write_bytes(png(9000, 16))
        (target / f"bomb8-{i}.png").write_bytes(png(9000, 8))
        (target / f"wide16-{i}.png").write_bytes(png(under, 16, fill=b"\x7f\x00"))
        (target / f"rgba-{i}.png").write_bytes(png(under, 8, 6, fill=b"\x10\x80\xf0\x80"))
    (target / "eps.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")
    for name, fmt in (("anim.gif", "GIF"), ("scan.tif", "TIFF")):
        Image.new("RGB", (16, 16), (9, 9, 9)).save(target / name, fmt)
    (target / "vector.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"/>\n')
    (target / "empty.png").write_bytes(b"")
    (target / "truncated.png").write_bytes(png(64, 8)[:60])
    outside = folder.parent / "outside.png"
    outside.write_bytes(png(32, 8))
    (target / "out.png").symlink_to(outside)
    (target / "loop.png").symlink_to(target / "loop.png")
    with open(os.path.join(os.fsencode(target), b"caf\xe9.png"), "wb") as f:
        f.write(png(32, 8))


def tree_peak_rss(proc: subprocess.Popen) -> int:
    """Peak of the summed resident memory of proc and all its descendants, sampled until it ends (bytes)."""
    import psutil

    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        total = 0
        try:
            for p in [root, *root.children(recursive=True)]:
                total += p.memory_info().rss
        except psutil.Error:  # a process ended while being read
            pass
        peak = max(peak, total)
        time.sleep(0.02)
    return peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--image-size", type=int, default=32, choices=(28, 32, 64))
    parser.add_argument("--channels", type=int, default=3, choices=(1, 3))
    parser.add_argument("--sizes", default="20-100", help="range of the source images' sides, px (default 20-100)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/imagegen-folder-bench"))
    parser.add_argument("--hostile", action="store_true", help="add the hostile files of HOSTILE to the folder")
    args = parser.parse_args()
    low, high = (int(v) for v in args.sizes.split("-"))
    kind = f"-hostile{args.image_size}" if args.hostile else ""
    folder = args.workdir / f"folder-{args.images}-{low}-{high}{kind}" / "images"
    if not (folder / ".complete").exists():
        shutil.rmtree(folder.parent, ignore_errors=True)
        started = time.perf_counter()
        generate(folder, args.images, low, high)
        if args.hostile:
            add_hostile(folder, args.image_size)
        (folder / ".complete").touch()
        print(f"generated {args.images} images in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    project = args.workdir / "project"
    project.mkdir(parents=True, exist_ok=True)
    (project / "params.yaml").write_text(json.dumps({"data": {
        "dataset": "bench", "folder": str(folder), "image_size": args.image_size, "channels": args.channels}}))
    command = [shutil.which("imagegen") or "imagegen", "prepare"]
    timer = ["/usr/bin/time", "-v"] if Path("/usr/bin/time").exists() else []
    started = time.perf_counter()
    log = project / "prepare.log"
    with log.open("w") as out, subprocess.Popen(timer + command, cwd=project, stdout=out, stderr=out) as run:
        tree_peak = tree_peak_rss(run)
    seconds = time.perf_counter() - started
    output = log.read_text(errors="replace")
    if run.returncode != 0:
        print(output, file=sys.stderr)
        return 1
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", output)
    scan = json.loads((project / "data/prepared/scan.json").read_text())
    result = {"images": args.images, "hostile": args.hostile, "sources_px": args.sizes, "image_size": args.image_size,
              "channels": args.channels, "cores": len(os.sched_getaffinity(0)), "seconds": round(seconds, 1),
              "images_per_s": round(args.images / seconds),
              "peak_rss_mb": round(int(peak.group(1)) / 1024) if peak else None,
              "peak_tree_rss_mb": round(tree_peak / 2**20),
              "skipped": dict(Counter(s["reason"] for s in scan["skipped"])),
              "prepared_mb": round(sum(p.stat().st_size for p in (project / "data/prepared").iterdir()) / 2**20, 1)}
    print(json.dumps(result))
    record("folder_prepare", ["images", "source sides px", "to", "hostile", "cores", "seconds", "images/s",
                              "peak RSS MB (largest process)", "peak RSS MB (process tree)", "arrays MB", "skipped"],
           [[f"{args.images:,}", args.sizes, f"{args.image_size} × {args.image_size} × {args.channels}",
             "yes" if args.hostile else "no", result["cores"], result["seconds"], f"{result['images_per_s']:,}",
             result["peak_rss_mb"], result["peak_tree_rss_mb"], result["prepared_mb"],
             ", ".join(f"{reason} {n}" for reason, n in sorted(result["skipped"].items())) or "none"]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
