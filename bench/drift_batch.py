"""The drift gate's two views: a large folder, a small bad batch
A folder of N accepted Fashion-MNIST images plus a batch of 300 new ones, clean or inverted: the whole
folder's and the batch's intensity PSI and feature Fréchet distance against the accepted profile, as the
validate stage computes them (imagegen.data.drift; folder sample 2,000 images). An inverted batch must fail
the batch view (fail levels: PSI 0.25, Fréchet 0.1) however large the folder is.

    python bench/drift_batch.py [N ...]     # default 5000 20000 59000
"""

from __future__ import annotations

import gzip
import sys

import numpy as np
from benchlog import record

from imagegen.data import drift

SOURCE = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"
BATCH, SAMPLE = 300, 2000


def moments(net, images):
    features = drift.embed(net, images)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def main(sizes: list[int]) -> None:
    images = np.frombuffer(gzip.open(SOURCE).read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    net, rng = drift.embedding_net(1), np.random.default_rng(0)
    columns = ["accepted images", "batch", "folder PSI", "folder Fréchet", "batch PSI", "batch Fréchet"]
    print("  ".join(columns))
    rows = []
    for n in sizes:
        accepted = images[:n]
        old_hist, old_moments = drift.histograms(accepted)[0], moments(net, accepted[rng.permutation(n)[:SAMPLE]])
        for kind in ("clean", "inverted"):
            batch = images[n:n + BATCH] if kind == "clean" else 255 - images[n:n + BATCH]
            folder = np.concatenate([accepted, batch])
            sample = folder[rng.permutation(len(folder))[:SAMPLE]]
            row = [drift.psi(old_hist, drift.histograms(folder)[0]),
                   drift.relative_frechet(*old_moments, *moments(net, sample)),
                   drift.psi(old_hist, drift.histograms(batch)[0]),
                   drift.relative_frechet(*old_moments, *moments(net, batch))]
            print(f"{n:>15}  {kind:<8}  " + "  ".join(f"{v:>10.4f}" for v in row))
            rows.append([f"{n:,}", kind, *(f"{v:.4f}" for v in row)])
    record("drift_batch", columns, rows)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [5000, 20000, 59000])
