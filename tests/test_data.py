"""Dataset loading (real MNIST / Fashion-MNIST / CIFAR-10 JPEG from ../shared/data), augmentation, batching."""

from __future__ import annotations

import gzip
import shutil
import struct
import time

import numpy as np
import pytest
import torch

from onnxprune.data import (
    CIFAR10_ARCHIVE,
    DATASETS,
    ArrayLoader,
    archive_key,
    augment_batch,
    load_dataset,
)
from onnxprune.errors import InputError
from tests.conftest import shared_file

MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _idx_bytes(data: np.ndarray, dims: tuple[int, ...] | None = None) -> bytes:
    """An uncompressed uint8 idx file: magic 0,0,8,ndim, big-endian dims, data."""
    dims = data.shape if dims is None else dims
    return bytes([0, 0, 8, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + data.astype(np.uint8).tobytes()


# ----------------------------------------------------------------------------- MNIST family


@pytest.mark.data
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_mnist_family_shapes_and_ranges(name):
    root = shared_file(name, "train-images-idx3-ubyte.gz").parents[1]
    for split, n in (("train", 60000), ("test", 10000)):
        x, y = load_dataset(name, root, split)
        assert x.shape == (n, 1, 28, 28) and x.dtype == np.float32
        assert y.shape == (n,) and y.dtype == np.int64
        assert x.min() == 0.0 and x.max() == 1.0
        assert set(np.unique(y)) == set(range(10))
    if name == "fashion-mnist":  # Fashion-MNIST is exactly balanced
        assert np.bincount(y).tolist() == [1000] * 10


@pytest.mark.data
def test_mnist_test_class_counts_and_own_folder():
    folder = shared_file("mnist", "t10k-images-idx3-ubyte.gz").parent
    x, y = load_dataset("MNIST", folder, "test", as_uint8=True)  # the dataset's own folder works too
    assert x.dtype == np.uint8 and x.shape == (10000, 1, 28, 28)
    assert np.bincount(y).tolist() == MNIST_TEST_COUNTS


@pytest.mark.data
def test_default_data_dir_from_env(monkeypatch):
    root = shared_file("mnist", "t10k-labels-idx1-ubyte.gz").parents[1]
    monkeypatch.setenv("ONNXPRUNE_DATA", str(root))
    _, y = load_dataset("mnist", split="test")
    assert len(y) == 10000


@pytest.mark.data
def test_other_datasets_folder_is_not_mistaken(tmp_path):
    """Given mnist/ itself, asking for fashion-mnist must not silently load MNIST (same file names)."""
    folder = shared_file("mnist", "t10k-images-idx3-ubyte.gz").parent
    with pytest.raises(InputError, match="Fashion-MNIST not found"):
        load_dataset("fashion-mnist", folder, "test")


def _write_mnist(folder, images: bytes, labels: bytes, compress=True):
    folder.mkdir(parents=True, exist_ok=True)
    for fname, raw in (("t10k-images-idx3-ubyte.gz", images), ("t10k-labels-idx1-ubyte.gz", labels)):
        (folder / fname).write_bytes(gzip.compress(raw) if compress else raw)


def test_truncated_idx_raises(tmp_path):
    labels = _idx_bytes(np.zeros(10000))
    images = _idx_bytes(np.zeros((100, 28, 28)), dims=(10000, 28, 28))  # header claims more than there is
    _write_mnist(tmp_path / "mnist", images, labels)
    with pytest.raises(InputError, match="truncated"):
        load_dataset("mnist", tmp_path, "test")


def test_truncated_gzip_stream_raises(tmp_path):
    labels = _idx_bytes(np.zeros(10000))
    _write_mnist(tmp_path / "mnist", _idx_bytes(np.zeros((10000, 28, 28))), labels)
    path = tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(InputError, match="not a readable gzip'd idx file"):
        load_dataset("mnist", tmp_path, "test")


@pytest.mark.parametrize(
    "images, match",
    [
        (b"this is not an idx file", "bad magic"),
        (_idx_bytes(np.zeros((5, 28, 28))), r"shape \(5, 28, 28\)"),
    ],
)
def test_corrupt_idx_raises(tmp_path, images, match):
    _write_mnist(tmp_path / "mnist", images, _idx_bytes(np.zeros(10000)))
    with pytest.raises(InputError, match=match):
        load_dataset("mnist", tmp_path, "test")


def test_not_gzip_raises(tmp_path):
    _write_mnist(tmp_path / "mnist", b"\x00\x00\x08\x03garbage", b"x", compress=False)
    with pytest.raises(InputError, match="not a readable gzip'd idx file"):
        load_dataset("mnist", tmp_path, "test")


def test_missing_dir_raises(tmp_path):
    with pytest.raises(InputError) as info:
        load_dataset("mnist", tmp_path / "nowhere")
    msg = str(info.value)
    assert "MNIST not found" in msg and "train-images-idx3-ubyte.gz" in msg
    assert str(tmp_path / "nowhere" / "mnist") in msg and "--data-dir" in msg
    with pytest.raises(InputError, match=f"CIFAR-10 not found: expected {CIFAR10_ARCHIVE}"):
        load_dataset("cifar10", tmp_path)


def test_unknown_name_and_split():
    with pytest.raises(InputError, match="known datasets are mnist, fashion-mnist, cifar10, digits"):
        load_dataset("imagenet")
    with pytest.raises(InputError, match="unknown split"):
        load_dataset("digits", split="val")


def test_specs():
    assert DATASETS["cifar10"].input_shape == (3, 32, 32) and DATASETS["cifar10"].default_model == "vgg_cifar"
    assert DATASETS["cifar10"].class_names[0] == "airplane" and DATASETS["cifar10"].class_names[-1] == "truck"
    for name in ("mnist", "fashion-mnist", "digits"):
        assert DATASETS[name].input_shape == (1, 28, 28) and DATASETS[name].default_model == "lenet5"
    assert all(s.num_classes == len(s.class_names) == 10 for s in DATASETS.values())


# ----------------------------------------------------------------------------- digits


def test_digits_split_is_stratified_and_deterministic():
    from sklearn.datasets import load_digits

    xtr, ytr = load_dataset("digits", split="train")
    xte, yte = load_dataset("digits", split="test")
    assert xtr.shape == (1437, 1, 28, 28) and xte.shape == (360, 1, 28, 28)
    assert xtr.dtype == np.float32 and ytr.dtype == np.int64
    assert 0.0 <= xtr.min() and xtr.max() <= 1.0 and xtr.max() > 0.9
    total = np.bincount(load_digits().target)
    assert (np.bincount(ytr) + np.bincount(yte) == total).all()
    assert np.abs(np.bincount(yte) - 0.2 * total).max() <= 1  # each class ~20 % in test
    x2, y2 = load_dataset("digits", split="test")
    assert np.array_equal(xte, x2) and np.array_equal(yte, y2)


# ----------------------------------------------------------------------------- CIFAR-10


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """Decode the CIFAR-10 archive once into a fresh cache dir, then load it again from the cache."""
    archive = shared_file("cifar10-jpeg", CIFAR10_ARCHIVE)
    with pytest.MonkeyPatch.context() as mp:
        cache = tmp_path_factory.mktemp("data-cache")
        mp.setenv("ONNXPRUNE_CACHE_DIR", str(cache))
        t0 = time.perf_counter()
        first = load_dataset("cifar10", archive.parents[1], "train", as_uint8=True)
        t1 = time.perf_counter()
        second = load_dataset("cifar10", archive.parents[1], "train", as_uint8=True)
        t2 = time.perf_counter()
        test = load_dataset("cifar10", archive.parents[1], "test")
        print(f"\nCIFAR-10 decode {t1 - t0:.1f} s, cached train load {t2 - t1:.2f} s")
        yield {"first": first, "second": second, "test": test, "decode_s": t1 - t0, "cached_s": t2 - t1,
               "cache": cache, "archive": archive}


@pytest.mark.data
def test_cifar10_shapes_labels_and_order(cifar):
    x, y = cifar["first"]
    assert x.shape == (50000, 3, 32, 32) and x.dtype == np.uint8 and y.dtype == np.int64
    assert np.bincount(y).tolist() == [5000] * 10
    assert (np.diff(y) >= 0).all()  # sorted by class, then file name
    xt, yt = cifar["test"]
    assert xt.shape == (10000, 3, 32, 32) and xt.dtype == np.float32
    assert 0.0 <= xt.min() and xt.max() <= 1.0 and xt.max() == 1.0
    assert np.bincount(yt).tolist() == [1000] * 10
    # real photos: channels differ, images differ
    assert not np.array_equal(x[:, 0], x[:, 2]) and len(np.unique(x[:100].reshape(100, -1), axis=0)) == 100


@pytest.mark.data
def test_cifar10_cache_reused(cifar):
    (x1, y1), (x2, y2) = cifar["first"], cifar["second"]
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert cifar["cached_s"] < cifar["decode_s"] / 5
    files = sorted(p.name for p in (cifar["cache"] / "datasets" / "cifar10-jpeg").iterdir())
    key = archive_key(cifar["archive"])
    assert files == sorted(f"{s}-{key}-{a}.npy" for s in ("train", "test") for a in "xy")  # no temp files left


def test_archive_key_changes_with_content(tmp_path):
    a, b = tmp_path / "a.tar.xz", tmp_path / "b.tar.xz"
    a.write_bytes(b"\x00" * 1000)
    b.write_bytes(b"\x00" * 999 + b"\x01")
    assert archive_key(a) != archive_key(b)
    shutil.copy(a, tmp_path / "c.tar.xz")  # a copy (new mtime) keeps its key
    assert archive_key(tmp_path / "c.tar.xz") == archive_key(a)


# ----------------------------------------------------------------------------- augmentation


def test_augment_batch_shape_and_determinism():
    x = torch.rand(16, 3, 32, 32)
    a = augment_batch(x, torch.Generator().manual_seed(1))
    b = augment_batch(x, torch.Generator().manual_seed(1))
    c = augment_batch(x, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(augment_batch(x, crop_padding=0, flip=False), x)


def test_augment_batch_is_crop_of_padded_or_its_mirror():
    x = torch.arange(8 * 2 * 6 * 5, dtype=torch.float32).reshape(8, 2, 6, 5) + 1
    out = augment_batch(x, torch.Generator().manual_seed(0), crop_padding=2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    windows = [padded[:, :, i : i + 6, j : j + 5] for i in range(5) for j in range(5)]
    for n in range(8):
        assert any(torch.equal(out[n], w[n]) or torch.equal(out[n], w[n].flip(-1)) for w in windows)
    flips = augment_batch(x, torch.Generator().manual_seed(0), crop_padding=0)
    assert all(torch.equal(flips[n], x[n]) or torch.equal(flips[n], x[n].flip(-1)) for n in range(8))


# ----------------------------------------------------------------------------- ArrayLoader


def _ids(loader: ArrayLoader) -> list[int]:
    """Sample ids seen in one epoch (x holds each sample's id in every pixel)."""
    return [int(v) for xb, _ in loader for v in xb[:, 0, 0, 0]]


def test_array_loader_batches_and_dtype():
    x = np.arange(103, dtype=np.uint8)[:, None, None, None].repeat(2, axis=2)
    y = np.arange(103) % 10
    loader = ArrayLoader(x, y, batch_size=10, shuffle=False, seed=0)
    batches = list(loader)
    assert len(loader) == len(batches) == 11 and batches[-1][0].shape[0] == 3
    xb, yb = batches[0]
    assert xb.dtype == torch.float32 and yb.dtype == torch.int64
    assert torch.allclose(xb[:, 0, 0, 0], torch.arange(10) / 255.0)
    assert len(ArrayLoader(x, y, 10, drop_last=True)) == len(list(ArrayLoader(x, y, 10, drop_last=True))) == 10


def test_array_loader_epoch_shuffling():
    x = np.arange(200, dtype=np.float32)[:, None, None, None]
    y = np.zeros(200, dtype=np.int64)
    loader = ArrayLoader(x, y, batch_size=32, shuffle=True, seed=7)
    e0, e0_again = _ids(loader), _ids(loader)
    loader.set_epoch(1)
    e1 = _ids(loader)
    assert e0 == e0_again and e0 != e1
    assert sorted(e0) == sorted(e1) == list(range(200))
    assert _ids(ArrayLoader(x, y, 32, shuffle=True, seed=8)) != e0


def test_array_loader_sharding_disjoint_and_covering():
    x = np.arange(200, dtype=np.float32)[:, None, None, None]
    y = np.zeros(200, dtype=np.int64)
    for epoch in (0, 3):
        ranks = []
        for rank in (0, 1):
            loader = ArrayLoader(x, y, batch_size=16, shuffle=True, seed=1, rank=rank, world_size=2)
            loader.set_epoch(epoch)
            ranks.append(_ids(loader))
            assert len(loader) == 7  # ceil(100 / 16)
        assert len(ranks[0]) == len(ranks[1]) == 100
        assert not set(ranks[0]) & set(ranks[1])
        assert sorted(ranks[0] + ranks[1]) == list(range(200))
    # an odd count: equal shares, the remainder dropped
    odd = ArrayLoader(x[:101], y[:101], 16, rank=1, world_size=2)
    assert len(odd.indices()) == 50


def test_array_loader_augment_deterministic():
    x = (np.random.default_rng(0).random((20, 3, 8, 8)) * 255).astype(np.uint8)
    y = np.zeros(20, dtype=np.int64)

    def run(epoch):
        loader = ArrayLoader(x, y, 8, seed=3, augment=augment_batch)
        loader.set_epoch(epoch)
        return torch.cat([xb for xb, _ in loader])

    assert torch.equal(run(0), run(0)) and not torch.equal(run(0), run(1))
    assert run(0).shape == (20, 3, 8, 8)


def test_array_loader_rejects_bad_arguments():
    with pytest.raises(InputError):
        ArrayLoader(np.zeros((3, 1)), np.zeros(2), 1)
    with pytest.raises(InputError):
        ArrayLoader(np.zeros((3, 1)), np.zeros(3), 1, rank=2, world_size=2)
