import numpy as np
import pytest

from imagegen.data.idx import read_idx
from imagegen.errors import ImagegenError
from tests.helpers import write_idx


def test_round_trip(tmp_path):
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    write_idx(tmp_path / "x", images)
    np.testing.assert_array_equal(read_idx(tmp_path / "x", ndim=3), images)


@pytest.mark.parametrize(
    "mangle, expected",
    [
        (lambda b: b"\x00\x00\x09" + b[3:], "malformed IDX header"),  # dtype signed byte
        (lambda b: b"\x01" + b[1:], "malformed IDX header"),  # magic must start with two zero bytes
        (lambda b: b[:2], "malformed IDX header"),  # not even a magic number
        (lambda b: b[:6], "truncated before its 3 dimension sizes"),
        (lambda b: b[:-1], "IDX size mismatch: header says 2x3x3"),  # truncated data
        (lambda b: b + b"\x00", "IDX size mismatch"),  # trailing bytes
    ],
)
def test_malformed_files(tmp_path, mangle, expected):
    path = tmp_path / "images"
    write_idx(path, np.zeros((2, 3, 3), dtype=np.uint8))
    path.write_bytes(mangle(path.read_bytes()))
    with pytest.raises(ImagegenError, match=expected) as info:
        read_idx(path, ndim=3)
    assert str(path) in str(info.value)


def test_wrong_number_of_dimensions(tmp_path):
    write_idx(tmp_path / "labels", np.zeros(4, dtype=np.uint8))
    with pytest.raises(ImagegenError, match="expected 00000803"):
        read_idx(tmp_path / "labels", ndim=3)
