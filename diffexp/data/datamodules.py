"""In-memory LightningDataModules for small vector data sets (Gaussian mixtures, 2-D toys).

Batches are tuples: ``(x,)`` for unlabelled data and ``(x, y)`` (``y`` long) for labelled data.
Loading is fast: the dataset is indexed with a whole list of indices at once (one tensor gather
per batch) through ``DataLoader(ds, sampler=BatchSampler(...), batch_size=None)``, never example
by example through the default collate.

Every split is generated in ``__init__`` from its own seed stream, so ``dm.dim``,
``dm.num_classes`` etc. work before ``setup``. Seeds are derived with ``numpy.random.SeedSequence``
from ``(seed, stream)`` with a different stream per split, so train/val/test are independent;
``reference(n, seed)`` draws fresh samples from a separate stream that depends only on its own
``seed`` (the same held-out set for every data seed, so runs stay comparable).

Every data module also carries a ``DataDescription`` (``DescribedDataModule``): what other parts of
a run read about the data (recommended schedule endpoints, EDM's sigma_data, FID features). It is
given as keyword arguments, like the keys of a ``conf/data/*.yaml`` node, so a data node is
instantiated as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, SequentialSampler

from diffexp.data.mixtures import PRESETS, GaussianMixture, make_mixture

__all__ = [
    "MIXTURE_PRESETS",
    "TOY_DATASETS",
    "DataDescription",
    "DescribedDataModule",
    "MixtureDataModule",
    "TensorBatchDataset",
    "ToyDataModule",
    "VectorDataModule",
    "derive_seed",
]

# Seed streams: train shuffling, one per split, and one for held-out reference samples.
_STREAM_SHUFFLE, _STREAM_TRAIN, _STREAM_VAL, _STREAM_TEST, _STREAM_REFERENCE = 0, 1, 2, 3, 4
_SPLIT_STREAMS = (_STREAM_TRAIN, _STREAM_VAL, _STREAM_TEST)


def derive_seed(seed: int, stream: int) -> int:
    """A 32-bit seed for ``(seed, stream)`` from ``numpy.random.SeedSequence([seed, stream])``."""
    return int(np.random.SeedSequence([int(seed), int(stream)]).generate_state(1)[0])


def _identity(batch):
    """Collate function for pre-batched data: return the batch (a tuple) unchanged."""
    return batch


class EpochShuffle(Sampler[int]):
    """A random permutation per epoch that depends only on (seed, epoch), like DistributedSampler:
    a run resumed at epoch k sees the same order as one that never stopped."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = int(n), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the permutation of ``epoch`` (Lightning calls this before every epoch)."""
        self.epoch = int(epoch)

    def __iter__(self):
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.n, generator=generator).tolist())

    def __len__(self) -> int:
        return self.n


class EpochBatchSampler(BatchSampler):
    """Batches of an ``EpochShuffle``, forwarding ``set_epoch`` to it; ``resume_at`` makes the
    next pass over an epoch start after the batches a resumed run already trained on."""

    _resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Forward the epoch to the shuffling sampler."""
        self.sampler.set_epoch(epoch)

    def resume_at(self, epoch: int, batches: int) -> None:
        """The next pass, if it is over ``epoch``, skips that epoch's first ``batches`` batches."""
        self._resume = (int(epoch), int(batches))

    def __iter__(self):
        resume, self._resume = self._resume, None
        batches = super().__iter__()
        if resume is not None and resume[0] == self.sampler.epoch:
            for _ in range(resume[1]):
                next(batches, None)
        yield from batches


def shuffled_batches(ds: Dataset, batch_size: int, seed: int) -> DataLoader:
    """Full batches (drop_last) of a fresh, resumable permutation each epoch, gathered at once."""
    shuffle = EpochShuffle(len(ds), derive_seed(seed, _STREAM_SHUFFLE))
    sampler = EpochBatchSampler(shuffle, batch_size, drop_last=True)
    return DataLoader(ds, sampler=sampler, batch_size=None, collate_fn=_identity)


class TensorBatchDataset(Dataset):
    """A dataset of aligned tensors whose ``__getitem__`` takes a list of indices -> whole batch."""

    def __init__(self, *tensors: Tensor) -> None:
        if not tensors:
            raise ValueError("TensorBatchDataset needs at least one tensor")
        n = tensors[0].shape[0]
        if any(t.shape[0] != n for t in tensors):
            raise ValueError("all tensors must have the same first dimension")
        self.tensors = tensors

    def __len__(self) -> int:
        return self.tensors[0].shape[0]

    def __getitem__(self, indices: Sequence[int] | Tensor | int) -> tuple[Tensor, ...]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return tuple(t[idx] for t in self.tensors)


@dataclass(frozen=True)
class DataDescription:
    """What other parts of a run read about a data set; the data module only carries it.

    The keys of the same names in ``conf/data/*.yaml`` (schedules read ``${data.log_snr_max}``,
    eval and ``callbacks=images`` the FID features). None: not given.

    Args:
        log_snr_max, log_snr_min: recommended endpoints of the noise schedule.
        sigma_data: the data's std per dimension (EDM's sigma_data).
        fid_features: the FID feature extractor for this data ("classifier" or "inception").
        fid_features_path: its weights file (null: the extractor's default).
    """

    log_snr_max: float | None = None
    log_snr_min: float | None = None
    sigma_data: float | None = None
    fid_features: str | None = None
    fid_features_path: str | None = None

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The argument names, in order."""
        return tuple(f.name for f in fields(cls))


def split_description(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the ``DataDescription`` entries of ``kwargs``, the others)."""
    keys = DataDescription.keys()
    described = {k: v for k, v in kwargs.items() if k in keys}
    return described, {k: v for k, v in kwargs.items() if k not in keys}


class DescribedDataModule(pl.LightningDataModule):
    """A LightningDataModule with the ``DataDescription`` of its data, given as keyword arguments
    (``**description``) and read back as ``dm.description`` (``dm.description.sigma_data``)."""

    def __init__(self, **description: Any) -> None:
        super().__init__()
        described, unknown = split_description(description)
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got unexpected arguments {sorted(unknown)}; besides its "
                f"own, a data module takes the description keys {list(DataDescription.keys())}"
            )
        self.description = DataDescription(**described)


class VectorDataModule(DescribedDataModule):
    """In-memory train/val/test splits of vectors ``x [n, d]`` with optional labels ``y [n]``.

    Args:
        x_train, x_val, x_test: data, each ``[n_split, d]``.
        y_train, y_val, y_test: optional integer labels (all or none), each ``[n_split]``.
        batch_size: training batch size (the train loader drops the last incomplete batch).
        eval_batch_size: validation / test batch size (sequential, last batch kept).
        seed: seeds the train shuffling (a fresh permutation every epoch, reproducible).
        name: a short name for logs.
        num_classes: number of classes; default ``max(y) + 1`` when labelled, else 0.
        mixture: the true data density when known (a ``GaussianMixture``), else None.
        sampler: ``sampler(n, seed) -> x`` drawing fresh data; used by ``reference``
            (default: the mixture when there is one).
        **description: the ``DataDescription`` (``log_snr_max``, ...).
    """

    def __init__(
        self,
        x_train: Tensor,
        x_val: Tensor,
        x_test: Tensor,
        y_train: Tensor | None = None,
        y_val: Tensor | None = None,
        y_test: Tensor | None = None,
        *,
        batch_size: int = 512,
        eval_batch_size: int = 2_000,
        seed: int = 0,
        name: str = "vector",
        num_classes: int | None = None,
        mixture: GaussianMixture | None = None,
        sampler: Callable[[int, int], Tensor] | None = None,
        **description: Any,
    ) -> None:
        super().__init__(**description)
        xs = (x_train, x_val, x_test)
        ys = (y_train, y_val, y_test)
        if any(x.ndim != 2 for x in xs) or len({x.shape[1] for x in xs}) != 1:
            raise ValueError(
                f"x_train/x_val/x_test must be [n, d] with a common d; "
                f"got {[tuple(x.shape) for x in xs]}"
            )
        labelled = [y is not None for y in ys]
        if any(labelled) and not all(labelled):
            raise ValueError("give labels for all three splits or for none")
        if all(labelled):
            for x, y in zip(xs, ys, strict=True):
                if y.shape != (x.shape[0],) or y.is_floating_point():
                    raise ValueError(f"labels must be integer [n]; got {y.dtype} {tuple(y.shape)}")
            ys = tuple(y.long() for y in ys)
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError("batch_size and eval_batch_size must be >= 1")
        if batch_size > x_train.shape[0]:
            raise ValueError(
                f"batch_size={batch_size} exceeds n_train={x_train.shape[0]}: "
                "the train loader drops incomplete batches and would be empty"
            )

        self.x_train, self.x_val, self.x_test = xs
        self.y_train, self.y_val, self.y_test = ys
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size)
        self.seed = int(seed)
        self._name = name
        self._mixture = mixture
        self._sampler = sampler
        if num_classes is None:
            num_classes = max(
                (int(y.max()) + 1 for y in ys if y is not None and y.numel()), default=0
            )
        self._num_classes = int(num_classes)

    # ------------------------------------------------------------------ properties
    @property
    def name(self) -> str:
        """A short name for logs."""
        return self._name

    @property
    def dim(self) -> int:
        """Data dimension ``d``."""
        return int(self.x_train.shape[1])

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one example, ``(d,)``."""
        return (self.dim,)

    @property
    def num_classes(self) -> int:
        """Number of classes (0 when unlabelled)."""
        return self._num_classes

    @property
    def labelled(self) -> bool:
        """Whether batches carry labels ``(x, y)``."""
        return self.y_train is not None

    @property
    def mixture(self) -> GaussianMixture | None:
        """The true data density when it is a known Gaussian mixture, else None."""
        return self._mixture

    # ------------------------------------------------------------------ ground truth
    def reference(self, n: int, seed: int) -> Tensor:
        """``n`` fresh samples from the data distribution, independent of train/val/test.

        Depends only on ``(n, seed)`` (not on the data module's own seed); different seeds give
        independent sets, so two reference sets give a noise floor for sample metrics.
        """
        return self._draw(int(n), derive_seed(seed, _STREAM_REFERENCE))

    def _draw(self, n: int, seed: int) -> Tensor:
        """``n`` samples of the data distribution from a 32-bit ``seed``."""
        if self._sampler is not None:
            return self._sampler(n, seed)
        if self._mixture is not None:
            generator = torch.Generator().manual_seed(seed)
            return self._mixture.sample(n, generator)[0].to(self.x_train.dtype)
        raise NotImplementedError(f"{type(self).__name__} has no sampler for reference data")

    def true_log_prob(self, x: Tensor) -> Tensor | None:
        """``log p(x)`` under the true data density, or None when it is unknown."""
        if self._mixture is None:
            return None
        return self._mixture.log_prob(x)

    # ------------------------------------------------------------------ loaders
    def _dataset(self, x: Tensor, y: Tensor | None) -> TensorBatchDataset:
        return TensorBatchDataset(x) if y is None else TensorBatchDataset(x, y)

    def train_dataloader(self) -> DataLoader:
        """Shuffled (seeded; a new permutation each epoch) full batches of ``batch_size``."""
        ds = self._dataset(self.x_train, self.y_train)
        return shuffled_batches(ds, self.batch_size, self.seed)

    def _eval_loader(self, x: Tensor, y: Tensor | None) -> DataLoader:
        ds = self._dataset(x, y)
        sampler = BatchSampler(SequentialSampler(ds), self.eval_batch_size, drop_last=False)
        return DataLoader(ds, sampler=sampler, batch_size=None, collate_fn=_identity)

    def val_dataloader(self) -> DataLoader:
        """Sequential batches of ``eval_batch_size`` over the validation split."""
        return self._eval_loader(self.x_val, self.y_val)

    def test_dataloader(self) -> DataLoader:
        """Sequential batches of ``eval_batch_size`` over the test split."""
        return self._eval_loader(self.x_test, self.y_test)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, "
            f"num_classes={self.num_classes}, n_train={len(self.x_train)}, "
            f"n_val={len(self.x_val)}, n_test={len(self.x_test)}, batch_size={self.batch_size})"
        )


class MixtureDataModule(VectorDataModule):
    """Splits drawn from a preset ``GaussianMixture`` (labels = components when ``labelled``).

    The other keyword arguments are the ``DataDescription``'s and the preset's (``radius=3.0``).
    """

    def __init__(
        self,
        preset: str = "ring8",
        n_train: int = 50_000,
        n_val: int = 2_000,
        n_test: int = 5_000,
        batch_size: int = 512,
        eval_batch_size: int = 2_000,
        seed: int = 0,
        labelled: bool = True,
        **kwargs: Any,
    ) -> None:
        description, preset_kwargs = split_description(kwargs)
        mixture = make_mixture(preset, **preset_kwargs)
        splits = []
        for n, stream in zip((n_train, n_val, n_test), _SPLIT_STREAMS, strict=True):
            generator = torch.Generator().manual_seed(derive_seed(seed, stream))
            splits.append(mixture.sample(int(n), generator))
        (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = splits
        super().__init__(
            x_tr,
            x_va,
            x_te,
            *((y_tr, y_va, y_te) if labelled else (None, None, None)),
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            seed=seed,
            name=preset,
            num_classes=mixture.num_components if labelled else 0,
            mixture=mixture,
            **description,
        )
        self.preset = preset


def _moons(n: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import make_moons

    return make_moons(n_samples=n, noise=noise, random_state=seed)


def _swissroll(n: int, noise: float, seed: int) -> tuple[np.ndarray, None]:
    from sklearn.datasets import make_swiss_roll

    x, _ = make_swiss_roll(n_samples=n, noise=noise, random_state=seed)
    return x[:, [0, 2]], None


# name -> (generator, default noise, fixed offset, fixed isotropic divisor, num_classes).
# The constants bring the raw sklearn data to zero mean and about unit RMS per coordinate
# (one scalar divisor, so the shape is not distorted): moons coordinate stds become about
# (1.24, 0.71), swiss-roll stds about (0.98, 1.02).
_TOYS: dict[str, tuple[Callable, float, tuple[float, float], float, int]] = {
    "moons": (_moons, 0.05, (0.5, 0.25), 0.7, 2),
    "swissroll": (_swissroll, 0.5, (2.0, 0.2), 6.8, 0),
}


class ToyDataModule(VectorDataModule):
    """scikit-learn 2-D toys: ``"moons"`` (labelled by moon) and ``"swissroll"`` (unlabelled).

    The swiss roll keeps columns 0 and 2 of ``make_swiss_roll``. Data are rescaled with fixed
    (not data-dependent) constants to zero mean and about unit RMS per coordinate,
    ``x = scale * (raw - offset) / divisor`` (moons: offset (0.5, 0.25), divisor 0.7;
    swiss roll: offset (2.0, 0.2), divisor 6.8). ``noise`` is sklearn's, in raw units
    (default 0.05 for moons, 0.5 for the swiss roll). The true density is unknown (mixture None).
    ``**description``: the ``DataDescription``.
    """

    def __init__(
        self,
        name: str = "moons",
        noise: float | None = None,
        n_train: int = 50_000,
        n_val: int = 2_000,
        n_test: int = 5_000,
        batch_size: int = 512,
        eval_batch_size: int = 2_000,
        seed: int = 0,
        scale: float = 1.0,
        **description: Any,
    ) -> None:
        if name not in _TOYS:
            raise ValueError(f"unknown toy data set {name!r}; valid names: {sorted(_TOYS)}")
        _, default_noise, _, _, num_classes = _TOYS[name]
        self._toy = name
        self.noise = default_noise if noise is None else float(noise)
        self.scale = float(scale)
        splits = [
            self._draw_labelled(int(n), derive_seed(seed, stream))
            for n, stream in zip((n_train, n_val, n_test), _SPLIT_STREAMS, strict=True)
        ]
        (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = splits
        super().__init__(
            x_tr,
            x_va,
            x_te,
            y_tr,
            y_va,
            y_te,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            seed=seed,
            name=name,
            num_classes=num_classes,
            mixture=None,
            **description,
        )

    def _draw_labelled(self, n: int, seed: int) -> tuple[Tensor, Tensor | None]:
        """``n`` rescaled samples ``scale * (raw - offset) / divisor`` and labels (or None)."""
        make, _, offset, divisor, _ = _TOYS[self._toy]
        x, y = make(n, self.noise, seed)
        dtype = torch.get_default_dtype()
        x = (torch.as_tensor(x, dtype=dtype) - torch.tensor(offset, dtype=dtype)) * (
            self.scale / divisor
        )
        return x, (None if y is None else torch.as_tensor(y, dtype=torch.long))

    def _draw(self, n: int, seed: int) -> Tensor:
        return self._draw_labelled(n, seed)[0]


# Valid names, for configs and error messages.
MIXTURE_PRESETS = tuple(PRESETS)
TOY_DATASETS = tuple(_TOYS)


def split_batch(batch: Any) -> tuple[Tensor, Tensor | None]:
    """(x0, y) from a batch ``(x,)`` / ``(x, y)`` / tensor; y is None for unlabelled data."""
    if isinstance(batch, Tensor):
        return batch, None
    return batch[0], (batch[1] if len(batch) > 1 else None)
