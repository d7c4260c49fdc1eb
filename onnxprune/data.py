"""Datasets for training and evaluation: MNIST, Fashion-MNIST, CIFAR-10 (JPEG copy), sklearn digits.

Nothing is ever downloaded. ``load_dataset`` reads the files of the shared data folder
(or a folder the user gives) and returns ``(images, labels)``: float32 NCHW in [0, 1] and
int64. The CIFAR-10 JPEG archive is decoded once with Pillow and cached as uint8 ``.npy``
under ``cache_dir() / "datasets"``. ``ArrayLoader`` batches arrays into torch tensors
(shuffled per epoch, optionally sharded across DistributedDataParallel ranks) and
``augment_batch`` does the standard CIFAR augmentation on a whole batch at once.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import re
import struct
import tarfile
import tempfile
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from onnxprune.errors import InputError
from onnxprune.latency.cache import cache_dir

SPLITS = ("train", "test")
DIGIT_NAMES = tuple(str(i) for i in range(10))
FASHION_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer",
                 "dog", "frog", "horse", "ship", "truck")
CIFAR10_ARCHIVE = "cifar10_yoongikim_jpeg_q75.tar.xz"
IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
DIGITS_SEED = 0  # sklearn digits: stratified 80/20 split with random_state=0 -> 1437 train / 360 test
DIGITS_TEST_FRACTION = 0.2

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset looks like: classes, input shape (C, H, W), default model, shared-data folder."""

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    class_names: tuple[str, ...] | None
    default_model: str
    folder: str | None  # sub-folder of the shared data folder; None: ships with a package
    sizes: tuple[int, int]  # (train, test) number of samples


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec("mnist", 10, (1, 28, 28), DIGIT_NAMES, "lenet5", "mnist", (60000, 10000)),
    "fashion-mnist": DatasetSpec("fashion-mnist", 10, (1, 28, 28), FASHION_NAMES, "lenet5",
                                 "fashion-mnist", (60000, 10000)),
    "cifar10": DatasetSpec("cifar10", 10, (3, 32, 32), CIFAR10_NAMES, "vgg_cifar", "cifar10-jpeg",
                           (50000, 10000)),
    "digits": DatasetSpec("digits", 10, (1, 28, 28), DIGIT_NAMES, "lenet5", None, (1437, 360)),
}


# ----------------------------------------------------------------------------- public entry


def get_spec(name: str) -> DatasetSpec:
    """The spec of a dataset by name (case-insensitive, '_' accepted for '-'); InputError if unknown."""
    key = name.strip().lower().replace("_", "-")
    if key not in DATASETS:
        raise InputError(f"unknown dataset {name!r}: known datasets are {', '.join(DATASETS)}")
    return DATASETS[key]


def load_dataset(
    name: str, data_dir: str | Path | None = None, split: str = "train", *, as_uint8: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Images (float32 NCHW in [0, 1]; uint8 0..255 with ``as_uint8``) and int64 labels of one split.

    ``data_dir`` is the shared data folder or the dataset's own folder; by default
    ``$ONNXPRUNE_DATA``, else ``./../shared/data``, else ``shared/data`` beside the checkout.
    Never downloads; missing or damaged files raise InputError.
    """
    spec = get_spec(name)
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r} for {spec.name}: use 'train' or 'test'")
    if spec.name == "digits":
        x, y = _load_digits(split)
        return (np.round(x * 255).astype(np.uint8) if as_uint8 else x), y
    if spec.name == "cifar10":
        x, y = _load_cifar10(_find_folder(spec, data_dir, [CIFAR10_ARCHIVE]) / CIFAR10_ARCHIVE, split)
    else:
        folder = _find_folder(spec, data_dir, list(IDX_FILES[split]))
        x, y = _load_idx_pair(folder, split, spec.sizes[SPLITS.index(split)])
    return (x if as_uint8 else to_float(x)), y


def to_float(x: np.ndarray) -> np.ndarray:
    """uint8 0..255 -> float32 0..1 (one allocation)."""
    out = x.astype(np.float32)
    out /= 255.0
    return out


# ----------------------------------------------------------------------------- locating files


def default_data_roots() -> list[Path]:
    """Where the shared data folder is looked for: $ONNXPRUNE_DATA, ../shared/data, beside the checkout."""
    env = os.environ.get("ONNXPRUNE_DATA")
    if env:
        return [Path(env)]
    beside_repo = Path(__file__).resolve().parents[2] / "shared" / "data"
    return [Path("..") / "shared" / "data", beside_repo]


def _find_folder(spec: DatasetSpec, data_dir: str | Path | None, files: list[str]) -> Path:
    """The folder holding all ``files`` of ``spec``: ``root/<folder>`` or ``root`` itself, for each root."""
    roots = [Path(data_dir)] if data_dir is not None else default_data_roots()
    looked: list[str] = []
    others = {s.folder for s in DATASETS.values() if s.folder and s is not spec}
    for root in roots:
        # the root itself may be the dataset's own folder, but never another dataset's (same idx names)
        for folder in [root / str(spec.folder)] + ([root] if root.name not in others else []):
            if all((folder / f).is_file() for f in files):
                return folder
            looked.append(str(folder))
    hint = "give --data-dir" if data_dir is None else "check --data-dir"
    raise InputError(
        f"{_display(spec)} not found: expected {', '.join(files)} in {' or '.join(looked)} ({hint})"
    )


def _display(spec: DatasetSpec) -> str:
    """Human name of a dataset for messages."""
    return {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST", "cifar10": "CIFAR-10"}.get(spec.name, spec.name)


# ----------------------------------------------------------------------------- MNIST family


def _load_idx_pair(folder: Path, split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, 1, 28, 28) and int64 labels of one MNIST-format split, sizes verified."""
    images_file, labels_file = IDX_FILES[split]
    x = read_idx(folder / images_file, (n, 28, 28))
    y = read_idx(folder / labels_file, (n,)).astype(np.int64)
    if y.max() >= 10:
        raise InputError(f"{folder / labels_file} holds label {int(y.max())}: expected labels 0..9")
    return x[:, None], y


def read_idx(path: Path, expected_shape: tuple[int, ...]) -> np.ndarray:
    """Parse a gzip'd uint8 idx file (magic 0,0,8,ndim; big-endian uint32 dims); InputError if damaged."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"{path} is not a readable gzip'd idx file: {exc}") from None
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise InputError(f"{path} is not a uint8 idx file (bad magic number {raw[:4].hex() or 'empty'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise InputError(f"{path} is truncated: the idx header ends after {len(raw)} bytes")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if dims != tuple(expected_shape):
        raise InputError(f"{path} has shape {dims}: expected {tuple(expected_shape)}")
    if len(raw) - header != math.prod(dims):
        raise InputError(
            f"{path} is truncated or corrupt: {len(raw) - header} data bytes, expected {math.prod(dims)}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


# ----------------------------------------------------------------------------- CIFAR-10 JPEG


def _load_cifar10(archive: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, 3, 32, 32) images and int64 labels, from the .npy cache or decoded (then cached)."""
    folder = cache_dir() / "datasets" / "cifar10-jpeg"
    key = archive_key(archive)
    paths = {s: (folder / f"{s}-{key}-x.npy", folder / f"{s}-{key}-y.npy") for s in SPLITS}
    cached = _read_cache(*paths[split], DATASETS["cifar10"].sizes[SPLITS.index(split)])
    if cached is not None:
        return cached
    decoded = decode_cifar10_archive(archive)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for s, (x_path, y_path) in paths.items():
            _atomic_save(y_path, decoded[s][1])
            _atomic_save(x_path, decoded[s][0])
    except OSError as exc:
        warnings.warn(f"could not cache decoded CIFAR-10 in {folder}: {exc}", stacklevel=3)
    return decoded[split]


def archive_key(path: Path) -> str:
    """Cache key of an archive: its size and the sha256 of its first 4 MiB (a different file re-decodes)."""
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read(4 << 20)).hexdigest()[:16]
    return f"{path.stat().st_size}-{digest}"


def _read_cache(x_path: Path, y_path: Path, n: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached arrays, or None if absent or damaged (a damaged cache is re-decoded, never trusted)."""
    try:
        x, y = np.load(x_path), np.load(y_path)
    except (OSError, ValueError, EOFError):
        return None
    ok = x.shape == (n, 3, 32, 32) and x.dtype == np.uint8 and y.shape == (n,) and y.dtype == np.int64
    return (x, y) if ok else None


def _atomic_save(path: Path, array: np.ndarray) -> None:
    """np.save to a temporary file beside ``path``, then rename it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_CIFAR_MEMBER = re.compile(r"(?:\./)?(train|test)/([^/]+)/([^/]+\.jpe?g)", re.IGNORECASE)


def decode_cifar10_archive(archive: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Decode every JPEG of the tar.xz (streamed, nothing extracted) into per-split uint8 NCHW arrays.

    Order is deterministic: by class (index in the sorted CIFAR-10 names), then file name.
    """
    from PIL import Image

    items: dict[str, list[tuple[int, str, np.ndarray]]] = {s: [] for s in SPLITS}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                m = _CIFAR_MEMBER.fullmatch(member.name)
                if not member.isfile() or m is None:
                    continue
                split, cls, fname = m.groups()
                if cls not in CIFAR10_NAMES:
                    raise InputError(f"{archive}: unexpected class folder {split}/{cls}")
                with Image.open(io.BytesIO(tar.extractfile(member).read())) as im:  # type: ignore[union-attr]
                    pixels = np.asarray(im.convert("RGB"))
                if pixels.shape != (32, 32, 3):
                    raise InputError(f"{archive}: {member.name} is {pixels.shape[1]}x{pixels.shape[0]}, expected 32x32")
                items[split].append((CIFAR10_NAMES.index(cls), fname, pixels))
    except (tarfile.TarError, OSError, EOFError, zlib.error, ValueError) as exc:
        raise InputError(f"{archive} is not a readable CIFAR-10 JPEG archive: {exc}") from None
    return {s: _stack_split(archive, s, items[s]) for s in SPLITS}


def _stack_split(archive: Path, split: str, items: list[tuple[int, str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Sort decoded images by (class, file name) and stack them as uint8 NCHW + int64 labels."""
    expected = DATASETS["cifar10"].sizes[SPLITS.index(split)]
    if len(items) != expected:
        raise InputError(f"{archive} holds {len(items)} {split} images: expected {expected}")
    items.sort(key=lambda t: (t[0], t[1]))
    x = np.stack([t[2] for t in items]).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x), np.array([t[0] for t in items], dtype=np.int64)


# ----------------------------------------------------------------------------- sklearn digits


def _load_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 8x8 digits scaled to [0, 1], resized bilinearly to 28x28; stratified 80/20 split, seed 0."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    index = np.arange(len(bunch.target))
    train, test = train_test_split(
        index, test_size=DIGITS_TEST_FRACTION, stratify=bunch.target, random_state=DIGITS_SEED
    )
    pick = np.sort(train if split == "train" else test)
    small = torch.from_numpy(bunch.images[pick].astype(np.float32) / 16.0)[:, None]
    big = F.interpolate(small, size=(28, 28), mode="bilinear", align_corners=False)
    return big.clamp_(0.0, 1.0).numpy(), bunch.target[pick].astype(np.int64)


# ----------------------------------------------------------------------------- augmentation


def augment_batch(
    x: torch.Tensor, generator: torch.Generator | None = None, *, crop_padding: int = 4, flip: bool = True
) -> torch.Tensor:
    """Random crop (zero padding ``crop_padding``) and random horizontal flip of a NCHW batch, on its device.

    Vectorised (one gather for the whole batch); deterministic given ``generator``, which
    must live on ``x.device``.
    """
    n, _, h, w = x.shape
    p = crop_padding
    padded = F.pad(x, (p, p, p, p)) if p > 0 else x
    offsets = torch.randint(0, 2 * p + 1, (2, n, 1), generator=generator, device=x.device)
    rows = offsets[0] + torch.arange(h, device=x.device)  # (n, h)
    cols = offsets[1] + torch.arange(w, device=x.device)  # (n, w)
    if flip:
        flipped = torch.rand(n, 1, generator=generator, device=x.device) < 0.5
        cols = torch.where(flipped, cols.flip(1), cols)
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # (n, h, w, c)
    return out.permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------- batching


class ArrayLoader:
    """Batches of (x, y) numpy arrays as torch tensors: shuffled per epoch, optionally sharded by rank.

    uint8 images stay uint8 in memory and become float32 in [0, 1] per batch on ``device``.
    With ``world_size > 1`` each rank takes a disjoint, equally sized share of the epoch's
    permutation (``perm[rank::world_size]`` after dropping the last ``len % world_size``),
    as DistributedSampler does, but without padding by repetition. ``augment(x, generator)``
    (e.g. :func:`augment_batch`) runs on the float batch with a generator seeded from
    (seed, epoch, rank). ``len()`` is the number of batches this rank yields. ``y`` becomes int64
    class labels; with ``class_labels=False`` only integer ``y`` does, other dtypes (regression
    targets) are kept.
    """

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        device: str | torch.device = "cpu",
        augment: Augment | None = None,
        drop_last: bool = False,
        *,
        rank: int = 0,
        world_size: int = 1,
        class_labels: bool = True,
    ) -> None:
        if len(x) != len(y):
            raise InputError(f"ArrayLoader: {len(x)} images but {len(y)} labels")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise InputError(f"ArrayLoader: bad batch_size={batch_size}, rank={rank} or world_size={world_size}")
        self.x, self.y = x, y
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.device = torch.device(device)
        self.augment, self.drop_last = augment, drop_last
        self.rank, self.world_size = rank, world_size
        self.class_labels = class_labels
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation (and augmentation randomness) the next iteration uses."""
        self.epoch = epoch

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch."""
        return len(self.x) // self.world_size

    def __len__(self) -> int:
        """Number of batches per epoch for this rank."""
        n = self.num_samples
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def indices(self) -> np.ndarray:
        """This rank's sample indices for the current epoch, in iteration order."""
        n = len(self.x)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)
        return order[: self.num_samples * self.world_size][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (x float32 NCHW, y int64) batches on ``device``."""
        idx = self.indices()
        generator = None
        if self.augment is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(int(np.random.SeedSequence([self.seed, self.epoch, self.rank]).generate_state(1)[0]))
        for b in range(len(self)):
            sel = idx[b * self.batch_size : (b + 1) * self.batch_size]
            xb = torch.from_numpy(self.x[sel]).to(self.device, non_blocking=True)
            xb = xb.float().div_(255.0) if xb.dtype == torch.uint8 else xb.float()
            if generator is not None:
                xb = self.augment(xb, generator)  # type: ignore[misc]
            yield xb, torch.from_numpy(self._targets(sel)).to(self.device, non_blocking=True)

    def _targets(self, sel: np.ndarray) -> np.ndarray:
        """The batch's targets: int64 labels, or (``class_labels=False``) non-integer targets as they are."""
        yb = self.y[sel]
        if self.class_labels or np.issubdtype(yb.dtype, np.integer):
            return yb.astype(np.int64, copy=False)
        return yb
