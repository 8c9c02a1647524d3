"""Image LightningDataModules: scikit-learn digits, MNIST and CIFAR-10, labelled, on a level grid.

Images are stored as integer levels ``[n, C, H, W]`` (uint8) and served as float tensors scaled to
[-1, 1] with ``x = 2 * level / (num_levels - 1) - 1``; batches are ``(x, y)`` with ``y`` long.
The reconstruction term of the ELBO is the discretized Gaussian over the same levels
(``reconstruction_nll``), so bits/dim are of a discrete likelihood with no dequantization offset.

Loading follows ``diffexp.data.datamodules``: each batch is one tensor gather through a
``BatchSampler`` (no per-example collate); the train loader is shuffled from the data module's
``seed``. The splits are fixed by ``split_seed`` (default 0), independent of ``seed``, so every run
is evaluated on the same images. ``shape``, ``dim``, ``num_classes`` and ``num_levels`` are known
before ``setup``; the images are loaded in ``setup`` (any stage loads every split; idempotent).
"""

from __future__ import annotations

import contextlib
import gzip
import os
import pickle
import shutil
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

from diffexp.cli import ConfigError
from diffexp.data.datamodules import (
    DescribedDataModule,
    TensorBatchDataset,
    _identity,
    derive_seed,
    shuffled_batches,
)
from diffexp.diffusion.discretized import DiscretizedGaussianNLL

__all__ = [
    "CIFAR10DataModule",
    "DigitsDataModule",
    "ImageDataModule",
    "LevelBatchDataset",
    "MNISTDataModule",
    "MissingDataError",
    "levels_to_unit",
]

# Seed streams (as in datamodules.py): train shuffling, the split permutation, reference draws.
_STREAM_SHUFFLE, _STREAM_SPLIT, _STREAM_REFERENCE = 0, 5, 4
# Seconds a download may wait on a silent connection before it fails.
_DOWNLOAD_TIMEOUT_S = 60.0

Splits = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]
_SPLITS = ("train", "val", "test")


def levels_to_unit(levels: Tensor, num_levels: int, dtype: torch.dtype | None = None) -> Tensor:
    """x = 2 * level / (num_levels - 1) - 1, in [-1, 1] (default dtype unless given)."""
    x = levels.to(dtype or torch.get_default_dtype())
    return x * 2.0 / (num_levels - 1) - 1.0


class LevelBatchDataset(TensorBatchDataset):
    """Integer images and labels; a list of indices -> ``(x, y)``, x scaled to [-1, 1]."""

    def __init__(self, levels: Tensor, labels: Tensor, num_levels: int) -> None:
        super().__init__(levels, labels)
        self.num_levels = int(num_levels)

    def __getitem__(self, indices: Sequence[int] | Tensor | int) -> tuple[Tensor, ...]:
        levels, labels = super().__getitem__(indices)
        return levels_to_unit(levels, self.num_levels), labels


def _permutation(n: int, seed: int, stream: int) -> Tensor:
    """A permutation of range(n) from the seed stream ``(seed, stream)``."""
    generator = torch.Generator().manual_seed(derive_seed(seed, stream))
    return torch.randperm(n, generator=generator)


def _split_off(
    levels: Tensor, labels: Tensor, n_val: int, seed: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(train, val) = a seeded permutation of (levels, labels) cut after n - n_val examples."""
    n = levels.shape[0]
    if not 0 < n_val < n:
        raise ValueError(f"val_size must be in [1, {n - 1}] for {n} training images; got {n_val}")
    perm = _permutation(n, seed, _STREAM_SPLIT)
    train, val = perm[: n - n_val], perm[n - n_val :]
    return levels[train], labels[train], levels[val], labels[val]


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """Temporarily give sockets without a timeout this one, so a dead network cannot hang us."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


class ImageDataModule(DescribedDataModule):
    """Labelled images on ``num_levels`` levels, with fixed train/val/test splits.

    Subclasses implement ``_load() -> (levels_train, y_train, levels_val, y_val, levels_test,
    y_test)`` (integer levels ``[n, C, H, W]``, long labels ``[n]``) and, when they can download,
    ``prepare_data``.

    Args:
        shape: ``(C, H, W)`` of one image.
        num_levels: number of pixel values (17 for digits, 256 for 8-bit images).
        num_classes: number of labels.
        name: a short name for logs.
        batch_size: training batch size (the train loader drops the last incomplete batch).
        eval_batch_size: validation / test batch size (sequential, last batch kept).
        seed: seeds the train shuffling (a fresh permutation every epoch, reproducible).
        split_seed: fixes which images go to which split (independent of ``seed``).
        **description: the ``DataDescription`` (``log_snr_max``, ..., ``fid_features_path``).
    """

    def __init__(
        self,
        *,
        shape: tuple[int, int, int],
        num_levels: int,
        num_classes: int,
        name: str,
        batch_size: int = 128,
        eval_batch_size: int = 500,
        seed: int = 0,
        split_seed: int = 0,
        **description: Any,
    ) -> None:
        super().__init__(**description)
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError("batch_size and eval_batch_size must be >= 1")
        self._shape = tuple(int(s) for s in shape)
        self._num_levels = int(num_levels)
        self._num_classes = int(num_classes)
        self._name = name
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size)
        self.seed = int(seed)
        self.split_seed = int(split_seed)
        self.reconstruction_nll = DiscretizedGaussianNLL(self._num_levels)
        self._splits: Splits | None = None

    # ------------------------------------------------------------------ properties
    @property
    def name(self) -> str:
        """A short name for logs."""
        return self._name

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape of one image, ``(C, H, W)``."""
        return self._shape

    @property
    def dim(self) -> int:
        """Data dimension ``d = C * H * W``."""
        c, h, w = self._shape
        return c * h * w

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return self._num_classes

    @property
    def num_levels(self) -> int:
        """Number of pixel values; pixel k is ``2 k / (num_levels - 1) - 1``."""
        return self._num_levels

    @property
    def labelled(self) -> bool:
        """Whether batches carry labels ``(x, y)`` (always)."""
        return True

    @property
    def mixture(self) -> None:
        """No known density for images."""
        return None

    # ------------------------------------------------------------------ loading
    def _load(self) -> Splits:
        """The integer-level images and labels of train, val and test."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Load every split (once), checking shapes, levels and labels."""
        if self._splits is not None:
            return
        splits = tuple(self._load())
        for levels, labels in zip(splits[0::2], splits[1::2], strict=True):
            if tuple(levels.shape[1:]) != self._shape or levels.is_floating_point():
                raise ValueError(
                    f"{self.name}: expected integer images [n, {', '.join(map(str, self._shape))}]"
                    f"; got {levels.dtype} {tuple(levels.shape)}"
                )
            if levels.numel() and (int(levels.min()) < 0 or int(levels.max()) >= self._num_levels):
                raise ValueError(f"{self.name}: pixel levels outside [0, {self._num_levels - 1}]")
            if labels.shape != (levels.shape[0],):
                raise ValueError(f"{self.name}: labels must be [n]; got {tuple(labels.shape)}")
        self._splits = tuple(
            t.to(torch.uint8) if i % 2 == 0 else t.long() for i, t in enumerate(splits)
        )

    def split_levels(self, split: str) -> tuple[Tensor, Tensor]:
        """(levels uint8 [n, C, H, W], labels long [n]) of "train", "val" or "test" (loads them)."""
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {_SPLITS}; got {split!r}")
        self.setup()
        i = _SPLITS.index(split)
        return self._splits[2 * i], self._splits[2 * i + 1]

    @property
    def sizes(self) -> tuple[int, int, int]:
        """Number of images in train, val and test (loads the data)."""
        return tuple(int(self.split_levels(s)[0].shape[0]) for s in _SPLITS)

    # ------------------------------------------------------------------ ground truth
    def reference(self, n: int, seed: int) -> Tensor:
        """``n`` test images in [-1, 1], drawn with the seed stream of ``seed``.

        Without replacement when ``n`` <= the test size, with replacement otherwise. There is no
        generator for real images: two seeds give two (overlapping) draws of the same test set.
        """
        levels, _ = self.split_levels("test")
        generator = torch.Generator().manual_seed(derive_seed(seed, _STREAM_REFERENCE))
        n, n_test = int(n), levels.shape[0]
        if n <= n_test:
            idx = torch.randperm(n_test, generator=generator)[:n]
        else:
            idx = torch.randint(n_test, (n,), generator=generator)
        return levels_to_unit(levels[idx], self._num_levels)

    def true_log_prob(self, x: Tensor) -> Tensor | None:
        """Unknown for images: None."""
        return None

    # ------------------------------------------------------------------ loaders
    def _dataset(self, split: str) -> LevelBatchDataset:
        return LevelBatchDataset(*self.split_levels(split), self._num_levels)

    def train_dataloader(self) -> DataLoader:
        """Shuffled (seeded; a new permutation each epoch) full batches of ``batch_size``."""
        ds = self._dataset("train")
        if self.batch_size > len(ds):
            raise ValueError(
                f"batch_size={self.batch_size} exceeds n_train={len(ds)}: "
                "the train loader drops incomplete batches and would be empty"
            )
        return shuffled_batches(ds, self.batch_size, self.seed)

    def _eval_loader(self, split: str) -> DataLoader:
        ds = self._dataset(split)
        sampler = BatchSampler(SequentialSampler(ds), self.eval_batch_size, drop_last=False)
        return DataLoader(ds, sampler=sampler, batch_size=None, collate_fn=_identity)

    def val_dataloader(self) -> DataLoader:
        """Sequential batches of ``eval_batch_size`` over the validation split."""
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        """Sequential batches of ``eval_batch_size`` over the test split."""
        return self._eval_loader("test")

    def __str__(self) -> str:
        return repr(self)  # Lightning's __str__ builds every loader (and so loads the data)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, shape={self.shape}, "
            f"num_levels={self.num_levels}, num_classes={self.num_classes}, "
            f"batch_size={self.batch_size})"
        )


# ---------------------------------------------------------------------- scikit-learn digits
_DIGITS_SIZES = (8, 16, 32)
_DIGITS_SPLIT = (1257, 180, 360)


class DigitsDataModule(ImageDataModule):
    """scikit-learn's ``load_digits``: 1797 8x8 grey images of digits 0-9, pixel values 0..16.

    17 levels (``num_levels = 17``), no download (the data ship with scikit-learn). ``image_size``
    16 or 32 repeats every pixel 2x2 or 4x4 (nearest neighbour: exactly the same 17 values).
    Split: a fixed permutation (``split_seed``) of the 1797 images into 1257 train, 180 val and
    360 test. ``**description``: the ``DataDescription``.
    """

    def __init__(
        self,
        image_size: int = 8,
        batch_size: int = 128,
        eval_batch_size: int = 500,
        seed: int = 0,
        split_seed: int = 0,
        **description: Any,
    ) -> None:
        if image_size not in _DIGITS_SIZES:
            raise ValueError(
                f"digits image_size must be one of {_DIGITS_SIZES} (8x8 repeated by nearest "
                f"neighbour); got {image_size}"
            )
        self.image_size = int(image_size)
        super().__init__(
            shape=(1, self.image_size, self.image_size),
            num_levels=17,
            num_classes=10,
            name="digits" if image_size == 8 else f"digits{image_size}",
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            seed=seed,
            split_seed=split_seed,
            **description,
        )

    def _load(self) -> Splits:
        from sklearn.datasets import load_digits

        digits = load_digits()
        levels = torch.as_tensor(np.rint(digits.images), dtype=torch.uint8).unsqueeze(1)
        factor = self.image_size // 8
        levels = levels.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)
        labels = torch.as_tensor(digits.target, dtype=torch.long)
        perm = _permutation(levels.shape[0], self.split_seed, _STREAM_SPLIT)
        n_train, n_val, _ = _DIGITS_SPLIT
        parts = (perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :])
        return tuple(t for idx in parts for t in (levels[idx], labels[idx]))


# ---------------------------------------------------------------------- files on disk
class MissingDataError(ConfigError, FileNotFoundError):
    """The files of a data set are not where ``data.data_dir`` points (and are not downloaded)."""


def _missing_files_error(
    dataset: str, data_dir: Path, folder: Path, files: Sequence[str], why: str
) -> MissingDataError:
    """The error for absent data files: the key, where, which files and how to get them."""
    folder, where = Path(os.path.abspath(folder)), os.path.abspath(data_dir)
    shown = f"{data_dir} ({where})" if str(data_dir) != where else where
    return MissingDataError(
        f"data.data_dir={shown}: {dataset} not found: {why}. Expected the files "
        f"{', '.join(files)} in {folder}/ . Either set data.download=true on a machine with "
        f"internet access (they are saved there), or copy the files into that folder (or point "
        f"data.data_dir / paths.data_dir at the folder that holds them)."
    )


class _FileImageDataModule(ImageDataModule):
    """Images read from files under ``data_dir``, downloaded by ``prepare_data`` if asked."""

    dataset_name = ""

    def __init__(self, data_dir: str, download: bool, val_size: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.data_dir = Path(data_dir).expanduser()
        self.download = bool(download)
        self.val_size = int(val_size)

    @property
    def folder(self) -> Path:
        """The folder that holds the files."""
        raise NotImplementedError

    @property
    def files(self) -> tuple[str, ...]:
        """The file names expected in ``folder``."""
        raise NotImplementedError

    def _present(self) -> bool:
        """Whether every file is in ``folder``."""
        return all((self.folder / f).is_file() for f in self.files)

    def _fetch(self) -> None:
        """Download the files into ``folder``."""
        raise NotImplementedError

    def prepare_data(self) -> None:
        """Download the files when ``download`` is set and they are not there yet."""
        if not self.download or self._present():
            return
        try:
            with _socket_timeout(_DOWNLOAD_TIMEOUT_S):
                self._fetch()
        except Exception as err:  # no network, a dead mirror, a bad checksum
            raise _missing_files_error(
                self.dataset_name,
                self.data_dir,
                self.folder,
                self.files,
                f"downloading failed ({err})",
            ) from err
        if not self._present():
            raise _missing_files_error(
                self.dataset_name,
                self.data_dir,
                self.folder,
                self.files,
                "files absent after downloading",
            )

    def missing_files(self) -> list[str]:
        """The expected files that are not in ``folder`` (none: the data can be loaded)."""
        self._present()  # unpacks what it can
        return [f for f in self.files if not (self.folder / f).is_file()]

    def require_files(self) -> None:
        """Refuse now (``MissingDataError``, a ``ConfigError``) when files are absent and will not
        be downloaded; with ``download`` set, ``prepare_data`` fetches them later."""
        if self.download or self._present():
            return
        missing = self.missing_files()
        if not self.folder.is_dir():
            why = "data.download is false and that folder does not exist"
        else:
            verb = "is" if len(missing) == 1 else "are"
            why = f"data.download is false and {', '.join(missing)} {verb} missing"
        raise _missing_files_error(self.dataset_name, self.data_dir, self.folder, self.files, why)

    def _require_files(self) -> None:
        """Download when asked and needed, then raise MissingDataError if a file is absent."""
        if not self._present():
            self.prepare_data()
        if not self._present():
            raise _missing_files_error(
                self.dataset_name, self.data_dir, self.folder, self.files, "data.download is false"
            )


# ---------------------------------------------------------------------- MNIST
_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


class MNISTDataModule(_FileImageDataModule):
    """MNIST through ``torchvision.datasets.MNIST``: 70000 28x28 grey digits, 256 levels.

    Files: ``<data_dir>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (torchvision's
    layout; ``.gz`` copies are unpacked). Train/val: a fixed permutation (``split_seed``) of the
    60000 training images, the last ``val_size`` (default 5000) for val; test: the official 10000.
    ``pad_to_32`` pads to 32x32 with the background value (level 0, i.e. -1) for UNets.
    ``**description``: the ``DataDescription``.
    """

    dataset_name = "MNIST"

    def __init__(
        self,
        data_dir: str,
        download: bool = False,
        val_size: int = 5000,
        pad_to_32: bool = True,
        batch_size: int = 128,
        eval_batch_size: int = 500,
        seed: int = 0,
        split_seed: int = 0,
        **description: Any,
    ) -> None:
        self.pad_to_32 = bool(pad_to_32)
        size = 32 if self.pad_to_32 else 28
        super().__init__(
            data_dir,
            download,
            val_size,
            shape=(1, size, size),
            num_levels=256,
            num_classes=10,
            name="mnist",
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            seed=seed,
            split_seed=split_seed,
            **description,
        )

    @property
    def folder(self) -> Path:
        """``<data_dir>/MNIST/raw``."""
        return self.data_dir / "MNIST" / "raw"

    @property
    def files(self) -> tuple[str, ...]:
        """The four idx-ubyte files."""
        return _MNIST_FILES

    def _present(self) -> bool:
        """Whether every file is there, unpacking ``<file>.gz`` where only that is."""
        for name in self.files:
            path, packed = self.folder / name, self.folder / f"{name}.gz"
            if not path.is_file() and packed.is_file():
                partial = path.with_name(f"{name}.{os.getpid()}.partial")
                with gzip.open(packed, "rb") as src, open(partial, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                os.replace(partial, path)  # atomic: other processes see all of it or nothing
        return super()._present()

    def _fetch(self) -> None:
        from torchvision.datasets import MNIST

        MNIST(str(self.data_dir), train=True, download=True)

    def _load(self) -> Splits:
        from torchvision.datasets import MNIST

        self._require_files()
        train = MNIST(str(self.data_dir), train=True, download=False)
        test = MNIST(str(self.data_dir), train=False, download=False)
        pad = (2, 2, 2, 2) if self.pad_to_32 else (0, 0, 0, 0)

        def levels(data: Tensor) -> Tensor:
            return torch.nn.functional.pad(data.unsqueeze(1), pad, value=0)

        train_split = _split_off(levels(train.data), train.targets, self.val_size, self.split_seed)
        return (*train_split, levels(test.data), torch.as_tensor(test.targets).long())


# ---------------------------------------------------------------------- CIFAR-10
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = ("test_batch",)
_CIFAR_META = "batches.meta"


def _entry(d: dict, key: str):
    """d[key] for a CIFAR pickle, whose keys are str (Python 2 pickles) or bytes."""
    if key in d:
        return d[key]
    if key.encode() in d:
        return d[key.encode()]
    raise KeyError(key)


def read_cifar_batch(path: str | os.PathLike) -> tuple[Tensor, Tensor]:
    """Images uint8 [n, 3, 32, 32] and labels [n] of one CIFAR-10 python batch file."""
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")  # torchvision's own reading
    try:
        data = np.asarray(_entry(entry, "data"))
        labels = np.asarray(_entry(entry, "labels"), dtype=np.int64)
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a CIFAR-10 batch (a dict with data and labels)") from err
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: data must be uint8 [n, 3072]; got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: {data.shape[0]} images but {labels.shape} labels")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


class CIFAR10DataModule(_FileImageDataModule):
    """CIFAR-10: 60000 32x32 colour images in 10 classes, 256 levels.

    Files: torchvision's layout ``<data_dir>/cifar-10-batches-py/{data_batch_1..5, test_batch,
    batches.meta}``, downloaded by ``torchvision.datasets.utils.download_and_extract_archive``
    (with torchvision's archive checksum). Read in torchvision's format (pickles of dicts with
    ``data`` uint8 [n, 3072], channel-major rows, and ``labels``), without the md5 check of each
    batch file. Train/val: a fixed permutation (``split_seed``) of the 50000 training images, the
    last ``val_size`` (default 5000) for val; test: the official 10000. ``**description``: the
    ``DataDescription``.
    """

    dataset_name = "CIFAR-10"

    def __init__(
        self,
        data_dir: str,
        download: bool = False,
        val_size: int = 5000,
        batch_size: int = 128,
        eval_batch_size: int = 500,
        seed: int = 0,
        split_seed: int = 0,
        **description: Any,
    ) -> None:
        super().__init__(
            data_dir,
            download,
            val_size,
            shape=(3, 32, 32),
            num_levels=256,
            num_classes=10,
            name="cifar10",
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            seed=seed,
            split_seed=split_seed,
            **description,
        )
        self.classes: list[str] | None = None

    @property
    def folder(self) -> Path:
        """``<data_dir>/cifar-10-batches-py``."""
        return self.data_dir / "cifar-10-batches-py"

    @property
    def files(self) -> tuple[str, ...]:
        """The five training batches, the test batch and the metadata."""
        return (*_CIFAR_TRAIN, *_CIFAR_TEST, _CIFAR_META)

    def _fetch(self) -> None:
        from torchvision.datasets import CIFAR10
        from torchvision.datasets.utils import download_and_extract_archive

        download_and_extract_archive(
            CIFAR10.url, str(self.data_dir), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5
        )

    def _load(self) -> Splits:
        self._require_files()
        with open(self.folder / _CIFAR_META, "rb") as f:
            meta = pickle.load(f, encoding="latin1")
        try:
            names = _entry(meta, "label_names")
            self.classes = [c.decode() if isinstance(c, bytes) else str(c) for c in names]
        except (KeyError, TypeError) as err:
            raise ValueError(f"{self.folder / _CIFAR_META} has no label_names") from err

        def read(names: Sequence[str]) -> tuple[Tensor, Tensor]:
            parts = [read_cifar_batch(self.folder / name) for name in names]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

        train_split = _split_off(*read(_CIFAR_TRAIN), self.val_size, self.split_seed)
        return (*train_split, *read(_CIFAR_TEST))
