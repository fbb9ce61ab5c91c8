"""Data loading and batched augmentation: the format contract and reproducibility."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from deconflow.profiles import TrainConfig
from deconflow.training.augment import normalize, random_resized_crop_flip, to_float
from deconflow.training.data import (
    DataError,
    load_cifar10,
    load_dataset,
    load_digits_dataset,
    synthetic_dataset,
)
from tests.cifar_fixture import write_cifar_fixture


def _read(path: Path) -> dict:
    with path.open("rb") as f:
        return pickle.load(f, encoding="bytes")


def test_cifar_fixture_round_trip(tmp_path: Path) -> None:
    folder = write_cifar_fixture(tmp_path, n_per_batch=20)
    ds = load_cifar10(folder)
    assert ds.x_train.shape == (100, 3, 32, 32) and ds.x_train.dtype == torch.uint8
    assert ds.x_test.shape == (20, 3, 32, 32) and ds.x_test.dtype == torch.uint8
    assert ds.y_train.dtype == torch.int64 and ds.y_train.shape == (100,)
    assert ds.num_classes == 10 and ds.name == "cifar10"
    # Image 3 of batch 2 is train index 23; pixel (c, r, col) is byte c*1024 + r*32 + col.
    raw = _read(folder / "data_batch_2")
    for c, r, col in [(0, 0, 0), (1, 5, 7), (2, 31, 30)]:
        assert int(ds.x_train[23, c, r, col]) == int(raw[b"data"][3, c * 1024 + r * 32 + col])
    assert int(ds.y_train[23]) == raw[b"labels"][3]
    test_raw = _read(folder / "test_batch")
    assert torch.equal(ds.x_test[7].reshape(-1), torch.from_numpy(test_raw[b"data"][7]))
    # Stats: training-set per-channel mean/std in [0, 1] scale.
    x = ds.x_train.double() / 255
    assert torch.allclose(ds.mean.double(), x.mean(dim=(0, 2, 3)), atol=1e-6)
    assert torch.allclose(ds.std.double(), x.std(dim=(0, 2, 3), unbiased=False), atol=1e-5)
    # The parent folder is accepted too.
    assert torch.equal(load_cifar10(tmp_path).x_train, ds.x_train)


def test_missing_folder_is_one_line_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "cifar-10-batches-py"
    with pytest.raises(DataError) as e:
        load_cifar10(missing)
    msg = str(e.value)
    assert str(missing) in msg and "\n" not in msg and "nothing is downloaded" in msg


def test_missing_file(tmp_path: Path) -> None:
    folder = write_cifar_fixture(tmp_path, n_per_batch=4)
    (folder / "data_batch_4").unlink()
    with pytest.raises(DataError, match="data_batch_4"):
        load_cifar10(folder)


def test_corrupt_file_names_it(tmp_path: Path) -> None:
    folder = write_cifar_fixture(tmp_path, n_per_batch=4)
    (folder / "data_batch_3").write_bytes(b"\x00garbage\xff" * 50)
    with pytest.raises(DataError) as e:
        load_cifar10(folder)
    msg = str(e.value)
    assert str(folder / "data_batch_3") in msg and "\n" not in msg


@pytest.mark.parametrize(
    "patch",
    [
        {b"data": np.zeros((4, 3000), dtype=np.uint8)},  # wrong row length
        {b"data": np.zeros((4, 3072), dtype=np.float32)},  # wrong dtype
        {b"labels": [0, 1, 2]},  # wrong count
        {b"labels": [0, 1, 2, 10]},  # out of range
        {b"data": None},
    ],
)
def test_malformed_batch(tmp_path: Path, patch: dict) -> None:
    folder = write_cifar_fixture(tmp_path, n_per_batch=4)
    batch = _read(folder / "test_batch")
    batch.update(patch)
    with (folder / "test_batch").open("wb") as f:
        pickle.dump(batch, f)
    with pytest.raises(DataError) as e:
        load_cifar10(folder)
    assert str(folder / "test_batch") in str(e.value) and "\n" not in str(e.value)


def test_wrong_keys(tmp_path: Path) -> None:
    folder = write_cifar_fixture(tmp_path, n_per_batch=4)
    with (folder / "data_batch_1").open("wb") as f:
        pickle.dump({"data": 1}, f)
    with pytest.raises(DataError, match="data_batch_1"):
        load_cifar10(folder)


def test_digits() -> None:
    ds = load_digits_dataset()
    assert ds.x_train.shape[1:] == (1, 8, 8) and ds.x_train.dtype == torch.uint8
    assert ds.x_train.shape[0] + ds.x_test.shape[0] == 1797
    assert ds.x_test.shape[0] == 360
    assert set(ds.y_train.tolist()) == set(range(10)) == set(ds.y_test.tolist())
    assert int(ds.x_train.max()) == 255 and ds.mean.shape == (1,) and ds.num_classes == 10
    assert torch.equal(load_digits_dataset().x_train, ds.x_train)  # deterministic split


def test_digits_are_scikit_learns_stratified_split_without_importing_it() -> None:
    """The stored rows are exactly ``train_test_split(..., random_state=0, stratify=y)`` of
    ``load_digits()``, in its order; loading them imports neither scikit-learn nor SciPy."""
    import subprocess
    import sys

    probe = (
        "import sys; from deconflow.training.data import load_digits_dataset; "
        "load_digits_dataset(); print(sorted(m for m in ('sklearn', 'scipy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, digits.target, test_size=0.2, random_state=0, stratify=digits.target
    )
    ds = load_digits_dataset()
    assert np.array_equal(ds.x_train.numpy(), x_tr) and np.array_equal(ds.x_test.numpy(), x_te)
    assert np.array_equal(ds.y_train.numpy(), y_tr) and np.array_equal(ds.y_test.numpy(), y_te)


def test_load_dataset_dispatch_and_cap(tmp_path: Path) -> None:
    folder = write_cifar_fixture(tmp_path, n_per_batch=20)
    ds = load_dataset(TrainConfig(dataset="cifar10", data_dir=str(folder), n_train=30, n_test=5))
    assert ds.x_train.shape[0] == 30 and ds.x_test.shape[0] == 5
    assert torch.equal(ds.x_train, load_cifar10(folder).x_train[:30])
    ds = load_dataset(TrainConfig(dataset="synthetic", n_train=64, n_test=16))
    assert ds.x_train.shape == (64, 3, 32, 32) and ds.y_test.shape == (16,)
    assert load_dataset(TrainConfig(dataset="digits", n_test=10)).x_test.shape[0] == 10
    with pytest.raises(DataError, match="not found"):
        load_dataset(TrainConfig(dataset="cifar10", data_dir=str(tmp_path / "absent")))


def test_synthetic_and_to() -> None:
    ds = synthetic_dataset(n_train=200, n_test=50, seed=1)
    assert ds.x_train.dtype == torch.uint8 and int(ds.y_train.max()) <= 9
    assert torch.equal(ds.x_train, synthetic_dataset(200, 50, seed=1).x_train)
    moved = ds.to("cpu")
    assert moved is not ds and moved.x_train.dtype == torch.uint8 and moved.name == "synthetic"


def _batch(seed: int = 0, b: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, 32, 32), generator=g, dtype=torch.uint8)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_augment_shape_dtype_range() -> None:
    x = _batch()
    y = random_resized_crop_flip(x, _gen(0))
    assert y.shape == x.shape and y.dtype == torch.float32
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    assert random_resized_crop_flip(x, _gen(0), out_size=24).shape == (16, 3, 24, 24)


def test_augment_reproducible() -> None:
    x = _batch()
    a = random_resized_crop_flip(x, _gen(5))
    assert torch.equal(a, random_resized_crop_flip(x, _gen(5)))
    assert not torch.equal(a, random_resized_crop_flip(x, _gen(6)))


def test_augment_identity_and_flip() -> None:
    x = _batch()
    full = {"scale": (1.0, 1.0), "ratio": (1.0, 1.0)}
    same = random_resized_crop_flip(x, _gen(0), flip_p=0.0, **full)
    assert torch.allclose(same, to_float(x), atol=1e-6, rtol=0)
    flipped = random_resized_crop_flip(x, _gen(0), flip_p=1.0, **full)
    assert torch.allclose(flipped, to_float(x).flip(-1), atol=1e-6, rtol=0)
    # Default p=0.5: each image is either itself or its mirror, and both occur.
    mixed = random_resized_crop_flip(_batch(b=64), _gen(1), **full)
    ref = to_float(_batch(b=64))
    is_id = (mixed - ref).abs().amax(dim=(1, 2, 3)) < 1e-6
    is_flip = (mixed - ref.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-6
    assert bool((is_id | is_flip).all()) and bool(is_id.any()) and bool(is_flip.any())


def test_augment_crops_zoom_in() -> None:
    # A small crop of a horizontal ramp spans a narrower range of values than the image.
    ramp = torch.arange(32, dtype=torch.uint8).mul(8).expand(8, 3, 32, 32).contiguous()
    y = random_resized_crop_flip(ramp, _gen(0), scale=(0.1, 0.1), ratio=(1.0, 1.0), flip_p=0.0)
    spread = y[:, 0, 0, -1] - y[:, 0, 0, 0]
    assert bool((spread > 0).all()) and bool((spread < 0.5 * 248 / 255).all())


def test_normalize() -> None:
    x = to_float(_batch())
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3])
    z = normalize(x, mean, std)
    assert torch.allclose(z[:, 1], (x[:, 1] - 0.4) / 0.25)
