"""A tiny CIFAR-10 folder in the exact official python-pickle format, for tests.

Tests must not need the 170 MB archive (nothing is downloaded), yet the loader should be
exercised on the real on-disk layout: same file names, same pickle keys, same dtypes.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

LABEL_NAMES = [
    b"airplane",
    b"automobile",
    b"bird",
    b"cat",
    b"deer",
    b"dog",
    b"frog",
    b"horse",
    b"ship",
    b"truck",
]


def _write(path: Path, obj: dict) -> None:
    # Protocol 2 like the official archive (written by Python 2).
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar_fixture(root: Path, n_per_batch: int = 20, seed: int = 0) -> Path:
    """Write ``root/cifar-10-batches-py`` (5 train batches + test batch + meta); return it.

    Images are random uint8 rows of 3072 bytes (R, G, B planes of 32×32, row-major) and
    labels cycle through all 10 classes, so every class is present in every batch.
    """
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in (np.arange(n_per_batch) + k) % 10]
        label = "testing batch 1 of 1" if name == "test_batch" else f"training batch {k + 1} of 5"
        _write(
            folder / name,
            {
                b"batch_label": label.encode(),
                b"labels": labels,
                b"data": data,
                b"filenames": [f"{name}_{i:05d}.png".encode() for i in range(n_per_batch)],
            },
        )
    _write(
        folder / "batches.meta",
        {b"label_names": LABEL_NAMES, b"num_cases_per_batch": n_per_batch, b"num_vis": 3072},
    )
    return folder
