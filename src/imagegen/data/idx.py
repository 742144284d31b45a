"""The IDX format of (Fashion-)MNIST: big-endian header, then raw unsigned bytes."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np

from imagegen.errors import ImagegenError

UBYTE = 0x08


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX file with `ndim` dimensions, checking its header against its size."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImagegenError(f"{path}: file not found (run the fetch stage first)") from None
    if len(data) < 4:
        raise ImagegenError(f"{path}: malformed IDX header: file is only {len(data)} bytes")
    zero, dtype, file_ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != UBYTE or file_ndim != ndim:
        raise ImagegenError(
            f"{path}: malformed IDX header: magic {data[:4].hex()}, expected 0000{UBYTE:02x}{ndim:02x} "
            f"(unsigned bytes, {ndim} dimension{'s' if ndim > 1 else ''})"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ImagegenError(f"{path}: malformed IDX header: truncated before its {ndim} dimension sizes")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + math.prod(dims)
    if len(data) != expected:
        raise ImagegenError(
            f"{path}: IDX size mismatch: header says {'x'.join(map(str, dims))} "
            f"({expected} bytes), file has {len(data)} bytes"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)
