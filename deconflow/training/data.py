"""Datasets as whole uint8 tensors, ready to live on the accelerator.

Every dataset is small enough (CIFAR-10 is 180 MB as uint8) to keep entirely in device
memory, as airbench does: batches are then index lookups plus batched augmentation, with
no DataLoader workers or host-to-device copies in the training loop. Nothing is ever
downloaded: CIFAR-10 is read from the standard python-pickle folder at a configured path.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from deconflow.profiles import TrainConfig

CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_FILE = "test_batch"
CIFAR_SHAPE = (3, 32, 32)
CIFAR_CLASSES = 10


class DataError(ValueError):
    """A dataset cannot be loaded; the message is one line, names the path, and is for users."""


@dataclass
class Dataset:
    """Train and test splits as uint8 N×C×H×W tensors plus the training-set channel stats.

    Images stay uint8 (4x smaller than float32) until a batch is augmented; ``mean`` and
    ``std`` are per channel in [0, 1] scale, matching what ``augment.to_float`` produces.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    num_classes: int
    name: str

    def to(self, device: torch.device | str) -> Dataset:
        """Return a copy with every tensor on ``device``; images stay uint8 there."""
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.x_test.shape[0])


def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact per-channel mean/std in [0, 1] scale from 256-bin histograms.

    Histograms avoid materialising a float copy of the whole set (600 MB for CIFAR-10).
    """
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(x.shape[1]):
        counts = torch.bincount(x[:, c].reshape(-1).cpu(), minlength=256).to(torch.float64)
        n = counts.sum()
        mean = (counts * values).sum() / n
        var = (counts * values.square()).sum() / n - mean.square()
        means.append(mean)
        stds.append(var.clamp_min(0.0).sqrt())
    mean_t = torch.stack(means).to(torch.float32)
    std_t = torch.stack(stds).to(torch.float32).clamp_min(1e-6)
    return mean_t, std_t


def _make_dataset(
    name: str,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    num_classes: int,
) -> Dataset:
    mean, std = _channel_stats(x_train)
    return Dataset(
        x_train=x_train.contiguous(),
        y_train=y_train.to(torch.int64).contiguous(),
        x_test=x_test.contiguous(),
        y_test=y_test.to(torch.int64).contiguous(),
        mean=mean,
        std=std,
        num_classes=num_classes,
        name=name,
    )


def _resolve_cifar_folder(path: str | Path) -> Path:
    """Accept the ``cifar-10-batches-py`` folder itself or the folder that contains it."""
    p = Path(path).expanduser()
    if (p / CIFAR_FOLDER).is_dir():
        return p / CIFAR_FOLDER
    if not p.is_dir():
        raise DataError(
            f"CIFAR-10 folder not found: {p.absolute()} "
            f"(expected data_batch_1..5 and test_batch; nothing is downloaded)"
        )
    return p


def _read_cifar_batch(file: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one pickled batch, turning every way it can be broken into a one-line DataError."""
    if not file.is_file():
        raise DataError(
            f"CIFAR-10 file missing: {file.absolute()} "
            f"(expected data_batch_1..5 and test_batch; nothing is downloaded)"
        )
    try:
        with file.open("rb") as f:
            # The official archive is a pickle; the path is configured by the operator.
            batch = pickle.load(f, encoding="bytes")
    except Exception as e:  # unpickling garbage can raise almost anything
        msg = " ".join(str(e).split())[:120]
        raise DataError(
            f"CIFAR-10 file is not a readable pickle: {file.absolute()} ({type(e).__name__}: {msg})"
        ) from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch)[:6] if isinstance(batch, dict) else type(batch).__name__
        raise DataError(
            f"CIFAR-10 file has the wrong format: {file.absolute()} "
            f"(expected a dict with keys b'data' and b'labels', got {keys})"
        )
    try:
        data = np.asarray(batch[b"data"])
        labels = np.asarray(batch[b"labels"])
    except Exception as e:
        raise DataError(
            f"CIFAR-10 file has unreadable arrays: {file.absolute()} ({type(e).__name__})"
        ) from None
    n_pixels = int(np.prod(CIFAR_SHAPE))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != n_pixels:
        raise DataError(
            f"CIFAR-10 file has the wrong data shape: {file.absolute()} "
            f"(expected uint8 N×{n_pixels}, got {data.dtype} {tuple(data.shape)})"
        )
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise DataError(
            f"CIFAR-10 file has the wrong label shape: {file.absolute()} "
            f"(expected {data.shape[0]} labels, got shape {tuple(labels.shape)})"
        )
    if labels.size and (
        not np.issubdtype(labels.dtype, np.integer)
        or labels.min() < 0
        or labels.max() >= CIFAR_CLASSES
    ):
        raise DataError(
            f"CIFAR-10 file has labels outside 0..{CIFAR_CLASSES - 1}: {file.absolute()}"
        )
    return data.reshape(-1, *CIFAR_SHAPE), labels.astype(np.int64)


def load_cifar10(path: str | Path) -> Dataset:
    """Load CIFAR-10 from the standard python-pickle folder (or its parent); never downloads."""
    folder = _resolve_cifar_folder(path)
    train = [_read_cifar_batch(folder / name) for name in CIFAR_TRAIN_FILES]
    x_te, y_te = _read_cifar_batch(folder / CIFAR_TEST_FILE)
    x_tr = np.concatenate([x for x, _ in train])
    y_tr = np.concatenate([y for _, y in train])
    return _make_dataset(
        "cifar10",
        torch.from_numpy(x_tr),
        torch.from_numpy(y_tr),
        torch.from_numpy(x_te),
        torch.from_numpy(y_te),
        CIFAR_CLASSES,
    )


# The train/test rows of the digits: ``train_test_split(arange(1797), test_size=0.2,
# random_state=0, stratify=labels)`` with scikit-learn 1.x, in its order, saved once.
DIGITS_SPLIT = Path(__file__).with_name("digits_split.npz")


def _digits_csv() -> Path:
    """scikit-learn's ``digits.csv.gz``, found without importing scikit-learn."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the digits demo data comes with scikit-learn: pip install scikit-learn")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise DataError(f"scikit-learn's digits data is missing: {path}")
    return path


def load_digits_dataset() -> Dataset:
    """scikit-learn's 8×8 digits: real images shipped with an installed package, for demos.

    Read from the package's CSV with numpy and split by the stored rows (``DIGITS_SPLIT``):
    importing scikit-learn (and SciPy with it) cost every demo training 3 s of start-up."""
    raw = np.loadtxt(_digits_csv(), delimiter=",")
    images = np.rint(raw[:, :-1].reshape(-1, 8, 8) * (255.0 / 16.0)).clip(0, 255)
    images = images.astype(np.uint8)[:, None, :, :]
    labels = raw[:, -1].astype(np.int64)
    with np.load(DIGITS_SPLIT) as split:
        train, test = split["train"].astype(np.int64), split["test"].astype(np.int64)
    x_tr, x_te, y_tr, y_te = images[train], images[test], labels[train], labels[test]
    return _make_dataset(
        "digits",
        torch.from_numpy(np.ascontiguousarray(x_tr)),
        torch.from_numpy(y_tr),
        torch.from_numpy(np.ascontiguousarray(x_te)),
        torch.from_numpy(y_te),
        10,
    )


def synthetic_dataset(n_train: int = 50_000, n_test: int = 10_000, seed: int = 0) -> Dataset:
    """CIFAR-shaped random images for throughput benchmarks without the real archive.

    Each class gets its own per-channel brightness offset so that the loss can actually
    fall, which keeps the training code path (and its monitors) realistic.
    """
    g = torch.Generator().manual_seed(seed)
    offsets = torch.randint(0, 56, (CIFAR_CLASSES, CIFAR_SHAPE[0]), generator=g, dtype=torch.uint8)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, CIFAR_CLASSES, (n,), generator=g, dtype=torch.int64)
        x = torch.randint(0, 200, (n, *CIFAR_SHAPE), generator=g, dtype=torch.uint8)
        x += offsets[y][:, :, None, None]  # at most 199 + 55: no uint8 overflow
        return x, y

    x_tr, y_tr = split(n_train)
    x_te, y_te = split(n_test)
    return _make_dataset("synthetic", x_tr, y_tr, x_te, y_te, CIFAR_CLASSES)


def _cap(ds: Dataset, n_train: int | None, n_test: int | None) -> Dataset:
    """Keep the first n examples of each split (clone so the rest can be freed)."""
    if (n_train is None or n_train >= ds.n_train) and (n_test is None or n_test >= ds.n_test):
        return ds
    x_tr, y_tr = ds.x_train[:n_train].clone(), ds.y_train[:n_train].clone()
    x_te, y_te = ds.x_test[:n_test].clone(), ds.y_test[:n_test].clone()
    return _make_dataset(ds.name, x_tr, y_tr, x_te, y_te, ds.num_classes)


def load_dataset(cfg: TrainConfig) -> Dataset:
    """The dataset a run's config asks for, capped to ``cfg.n_train`` / ``cfg.n_test``."""
    for label, n in (("n_train", cfg.n_train), ("n_test", cfg.n_test)):
        if n is not None and n <= 0:
            raise DataError(f"{label} must be positive, got {n}")
    if cfg.dataset == "cifar10":
        ds = load_cifar10(cfg.data_dir)
    elif cfg.dataset == "digits":
        ds = load_digits_dataset()
    elif cfg.dataset == "synthetic":
        ds = synthetic_dataset(
            n_train=cfg.n_train if cfg.n_train is not None else 50_000,
            n_test=cfg.n_test if cfg.n_test is not None else 10_000,
        )
    else:
        raise DataError(f"unknown dataset {cfg.dataset!r} (expected cifar10, digits or synthetic)")
    return _cap(ds, cfg.n_train, cfg.n_test)
