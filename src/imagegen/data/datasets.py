"""What each dataset is: its files, where they are published and how to recognise them.

A file is accepted when its decompressed IDX content matches `content_sha256`, or when the
bytes as published match `gz_md5`. Mirrors may re-compress (the Debian package does), so the
content checksum is the one that makes every source agree; the published .gz checksum covers
datasets whose content checksum is not recorded here.
"""

from __future__ import annotations

from dataclasses import dataclass

SPLITS = ("train", "test")


@dataclass(frozen=True)
class FileSpec:
    name: str  # IDX file name without .gz, e.g. "train-images-idx3-ubyte"
    content_sha256: str | None
    gz_md5: str | None


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    urls: tuple[str, ...]  # base URLs, each holding the four NAME.gz files
    files: dict[str, FileSpec]  # key: "<split>-images" / "<split>-labels"
    split_sizes: dict[str, int]
    classes: tuple[str, ...]
    height: int = 28
    width: int = 28

    def file_size(self, key: str) -> int:
        """The size of an IDX file decompressed, header included: the most fetch writes for it."""
        split, kind = key.split("-")
        count = self.split_sizes[split]
        return 16 + count * self.height * self.width if kind == "images" else 8 + count


def _files(checksums: dict[str, tuple[str | None, str | None]]) -> dict[str, FileSpec]:
    names = {
        "train-images": "train-images-idx3-ubyte",
        "train-labels": "train-labels-idx1-ubyte",
        "test-images": "t10k-images-idx3-ubyte",
        "test-labels": "t10k-labels-idx1-ubyte",
    }
    return {key: FileSpec(names[key], *checksums[key]) for key in names}


DATASETS: dict[str, DatasetSpec] = {
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        urls=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com",),
        files=_files({
            "train-images": ("c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
                             "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
            "train-labels": ("bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
                             "25c81989df183df01b3e8a0aad5dffbe"),
            "test-images": ("5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
                            "bef4ecab320f06d8554ea6380940ec79"),
            "test-labels": ("0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
                            "bb300cfdad3c16e7a12a480ee83cd310"),
        }),
        split_sizes={"train": 60000, "test": 10000},
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    ),
    "mnist": DatasetSpec(
        name="mnist",
        urls=("https://ossci-datasets.s3.amazonaws.com/mnist",
              "https://storage.googleapis.com/cvdf-datasets/mnist"),
        files=_files({
            "train-images": (None, "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
            "train-labels": (None, "d53e105ee54ea40749a09fcbcd1e9432"),
            "test-images": (None, "9fb629c4189551a2d022fa330f9573f3"),
            "test-labels": (None, "ec29112dd5afa0611ce80d1b7f02629c"),
        }),
        split_sizes={"train": 60000, "test": 10000},
        classes=tuple(str(d) for d in range(10)),
    ),
}
