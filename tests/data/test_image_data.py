"""Image data modules: sklearn digits; MNIST and CIFAR-10 from tiny files in the real format."""

from __future__ import annotations

import gzip
import pickle
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from diffexp.data.images import (
    CIFAR10DataModule,
    DigitsDataModule,
    MNISTDataModule,
    levels_to_unit,
)
from diffexp.diffusion.discretized import DiscretizedGaussianNLL, level_index


def _levels(x: torch.Tensor, num_levels: int) -> torch.Tensor:
    """The integer levels of images in [-1, 1], checking they lie exactly on the grid."""
    k = level_index(x, num_levels)
    assert torch.allclose(levels_to_unit(k, num_levels, x.dtype), x, atol=1e-6)
    return k


# ---------------------------------------------------------------------- digits
@pytest.mark.parametrize("size", [8, 16, 32])
def test_digits_shapes_levels_and_labels(size):
    dm = DigitsDataModule(image_size=size, batch_size=64, eval_batch_size=100, seed=3)
    assert dm.shape == (1, size, size) and dm.dim == size * size
    assert dm.num_levels == 17 and dm.num_classes == 10 and dm.mixture is None
    assert isinstance(dm.reconstruction_nll, DiscretizedGaussianNLL)
    assert dm.reconstruction_nll.num_levels == 17
    dm.setup("fit")
    assert dm.sizes == (1257, 180, 360)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, size, size) and x.dtype == torch.get_default_dtype()
    assert y.shape == (64,) and y.dtype == torch.long and 0 <= y.min() and y.max() <= 9
    xs = torch.cat([b[0] for b in dm.val_dataloader()])
    assert xs.shape == (180, 1, size, size)
    values = torch.unique(torch.cat([xs, *(b[0] for b in dm.test_dataloader())]))
    assert len(values) == 17
    assert torch.allclose(values, torch.linspace(-1, 1, 17, dtype=values.dtype))
    if size > 8:  # nearest-neighbour repetition: every pixel is a constant f x f block
        f = size // 8
        blocks = x.reshape(64, 1, 8, f, 8, f)
        assert torch.equal(blocks, blocks[:, :, :, :1, :, :1].expand_as(blocks))
    assert dm.true_log_prob(x) is None


def test_digits_values_and_labels_match_sklearn():
    from sklearn.datasets import load_digits

    digits = load_digits()
    dm = DigitsDataModule()
    x = torch.cat([b[0] for b in dm.test_dataloader()])
    y = torch.cat([b[1] for b in dm.test_dataloader()])
    k = _levels(x, 17).reshape(-1, 64).numpy()
    # every test image is one of sklearn's images, with its label
    table = {
        row.astype(np.int64).tobytes(): t for row, t in zip(digits.data, digits.target, strict=True)
    }
    for row, label in zip(k, y.tolist(), strict=True):
        assert table[row.astype(np.int64).tobytes()] == label


def test_digits_splits_are_fixed_and_disjoint():
    a, b = DigitsDataModule(seed=0), DigitsDataModule(seed=1)  # seed: shuffling only
    for loader in ("val_dataloader", "test_dataloader"):
        xa = torch.cat([t[0] for t in getattr(a, loader)()])
        xb = torch.cat([t[0] for t in getattr(b, loader)()])
        assert torch.equal(xa, xb)
    other = DigitsDataModule(split_seed=1)
    assert not torch.equal(other.reference(360, 0), a.reference(360, 0))
    a.setup()
    keys = [{t.numpy().tobytes() for t in a.split_levels(s)[0]} for s in ("train", "val", "test")]
    # splits are disjoint as index sets (a few digits images are exact duplicates)
    assert sum(len(k) for k in keys) >= 1790
    # training batches: reproducible for one seed, different for another
    first = next(iter(DigitsDataModule(seed=0).train_dataloader()))[0]
    assert torch.equal(first, next(iter(a.train_dataloader()))[0])
    assert not torch.equal(first, next(iter(b.train_dataloader()))[0])
    assert len(a.train_dataloader()) == 1257 // 128


def test_digits_reference_is_seeded_and_without_replacement():
    dm = DigitsDataModule()
    r1, r2 = dm.reference(360, seed=7), dm.reference(360, seed=7)
    assert torch.equal(r1, r2) and r1.shape == (360, 1, 8, 8)
    assert not torch.equal(r1, dm.reference(360, seed=8))
    test = torch.cat([b[0] for b in dm.test_dataloader()])
    # without replacement: a permutation of the test set
    assert torch.equal(r1.reshape(360, -1).sum(0), test.reshape(360, -1).sum(0))
    assert dm.reference(1000, seed=0).shape == (1000, 1, 8, 8)  # more than the test set


def test_digits_refuses_other_sizes():
    with pytest.raises(ValueError, match="image_size must be one of"):
        DigitsDataModule(image_size=28)


# ---------------------------------------------------------------------- MNIST
def _write_idx_images(path: Path, images: np.ndarray) -> None:
    """The idx3-ubyte format: magic 0x00000803, n, rows, cols (big-endian), then the pixels."""
    n, rows, cols = images.shape
    path.write_bytes(struct.pack(">IIII", 0x803, n, rows, cols) + images.astype(np.uint8).tobytes())


def _write_idx_labels(path: Path, labels: np.ndarray) -> None:
    """The idx1-ubyte format: magic 0x00000801, n (big-endian), then the labels."""
    path.write_bytes(struct.pack(">II", 0x801, len(labels)) + labels.astype(np.uint8).tobytes())


def _fake_mnist(root: Path, n_train: int = 20, n_test: int = 10, packed: bool = False):
    """Tiny MNIST files in torchvision's layout ``root/MNIST/raw``; returns the arrays."""
    rng = np.random.default_rng(0)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[:, 0, 0], images[:, 1, 1] = 0, 255  # every value range end present
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        _write_idx_images(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx_labels(raw / f"{prefix}-labels-idx1-ubyte", labels)
        arrays[prefix] = (images, labels)
    if packed:
        for f in list(raw.iterdir()):
            with gzip.open(f"{f}.gz", "wb") as out:
                out.write(f.read_bytes())
            f.unlink()
    return arrays


def _all(dm, loader: str) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(getattr(dm, loader)())
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


@pytest.mark.parametrize("pad_to_32", [True, False])
def test_mnist_round_trip(tmp_path, pad_to_32):
    arrays = _fake_mnist(tmp_path)
    dm = MNISTDataModule(
        str(tmp_path), val_size=5, pad_to_32=pad_to_32, batch_size=4, eval_batch_size=3
    )
    size = 32 if pad_to_32 else 28
    assert dm.shape == (1, size, size) and dm.dim == size * size
    assert dm.num_levels == 256 and dm.reconstruction_nll.num_levels == 256
    dm.prepare_data()
    dm.setup("fit")
    assert dm.sizes == (15, 5, 10)
    x_test, y_test = _all(dm, "test_dataloader")
    assert x_test.shape == (10, 1, size, size) and x_test.min() == -1 and x_test.max() == 1
    k = _levels(x_test, 256)
    if pad_to_32:
        assert k[:, :, :2].eq(0).all() and k[:, :, -2:].eq(0).all() and k[..., :2].eq(0).all()
        k = k[:, :, 2:30, 2:30]
    images, labels = arrays["t10k"]
    assert torch.equal(k[:, 0].to(torch.uint8), torch.from_numpy(images))
    assert torch.equal(y_test, torch.from_numpy(labels).long())
    # train + val: the 20 training images, each once, with their labels
    x_val, y_val = _all(dm, "val_dataloader")
    k_train, y_train = dm.split_levels("train")
    assert k_train.dtype == torch.uint8 and y_train.dtype == torch.long
    k_all = torch.cat([_levels(x_val, 256), k_train.long()])
    y_all = torch.cat([y_val, y_train])
    if pad_to_32:
        k_all = k_all[:, :, 2:30, 2:30]
    images, labels = arrays["train"]
    got = sorted(
        zip((r.numpy().tobytes() for r in k_all.to(torch.uint8)), y_all.tolist(), strict=True)
    )
    want = sorted(zip((r.tobytes() for r in images[:, None]), labels.tolist(), strict=True))
    assert got == want
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 1, size, size) and y.dtype == torch.long


def test_mnist_gz_files_are_unpacked(tmp_path):
    arrays = _fake_mnist(tmp_path, packed=True)
    dm = MNISTDataModule(str(tmp_path), val_size=5, batch_size=4)
    x = dm.reference(10, seed=0)
    assert x.shape == (10, 1, 32, 32)
    assert (tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte").is_file()
    k = _levels(torch.cat([b[0] for b in dm.test_dataloader()]), 256)[:, 0, 2:30, 2:30]
    assert torch.equal(k.to(torch.uint8), torch.from_numpy(arrays["t10k"][0]))


# ---------------------------------------------------------------------- CIFAR-10
def _fake_cifar(root: Path, per_batch: int = 4, n_test: int = 6):
    """Tiny CIFAR-10 python batches (dicts with b"data" uint8 [n, 3072] and b"labels")."""
    rng = np.random.default_rng(1)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    arrays = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else per_batch
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).tolist()
        entry = {b"batch_label": name.encode(), b"labels": labels, b"data": data}
        entry[b"filenames"] = [f"{name}_{i}.png".encode() for i in range(n)]
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
        arrays[name] = (data, labels)
    meta = {b"num_cases_per_batch": per_batch, b"label_names": [b"airplane", b"automobile"]}
    meta[b"label_names"] += [f"class{i}".encode() for i in range(2, 10)]
    meta[b"num_vis"] = 3072
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return arrays


def test_cifar10_round_trip_pixel_exact(tmp_path):
    arrays = _fake_cifar(tmp_path)
    dm = CIFAR10DataModule(str(tmp_path), val_size=5, batch_size=8, eval_batch_size=4)
    assert dm.shape == (3, 32, 32) and dm.dim == 3072 and dm.num_classes == 10
    dm.prepare_data()
    dm.setup("test")
    assert dm.sizes == (15, 5, 6)
    assert dm.classes[:2] == ["airplane", "automobile"]
    x, y = _all(dm, "test_dataloader")
    assert x.shape == (6, 3, 32, 32) and -1 <= x.min() and x.max() <= 1
    data, labels = arrays["test_batch"]
    # channel-major rows: 1024 red, 1024 green, 1024 blue values, each row-major
    assert torch.equal(_levels(x, 256).reshape(6, 3072).to(torch.uint8), torch.from_numpy(data))
    assert y.tolist() == labels
    # 2 * level / 255 - 1 for one pixel, by hand
    assert x[0, 1, 0, 3].item() == pytest.approx(2 * int(data[0, 1024 + 3]) / 255 - 1, abs=1e-6)
    x_val, y_val = _all(dm, "val_dataloader")
    train = torch.cat([torch.from_numpy(arrays[f"data_batch_{i}"][0]) for i in range(1, 6)])
    train_labels = sum((arrays[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    table = {row.numpy().tobytes(): lab for row, lab in zip(train, train_labels, strict=True)}
    for row, lab in zip(
        _levels(x_val, 256).reshape(5, 3072).to(torch.uint8), y_val.tolist(), strict=True
    ):
        assert table[row.numpy().tobytes()] == lab
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and y.shape == (8,)


def test_cifar10_malformed_batch_is_refused(tmp_path):
    _fake_cifar(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": np.zeros((2, 10), np.uint8)}))
    with pytest.raises(ValueError, match="data_batch_3"):
        CIFAR10DataModule(str(tmp_path), val_size=5).setup()


# ---------------------------------------------------------------------- absent files
@pytest.mark.parametrize(
    "cls,folder", [(MNISTDataModule, "MNIST/raw"), (CIFAR10DataModule, "cifar-10-batches-py")]
)
def test_absent_files_name_the_folder(tmp_path, cls, folder):
    dm = cls(str(tmp_path / "nowhere"), download=False)
    assert dm.dim in (1024, 3072)  # the shape is known without the files
    dm.prepare_data()  # nothing to do without download
    with pytest.raises(FileNotFoundError) as err:
        dm.setup("fit")
    message = str(err.value)
    assert str(tmp_path / "nowhere" / folder) in message
    assert "data.download=true" in message and "copy" in message


@pytest.mark.parametrize(
    "cls,folder", [(MNISTDataModule, "MNIST/raw"), (CIFAR10DataModule, "cifar-10-batches-py")]
)
def test_download_without_network_fails_fast_and_clearly(tmp_path, cls, folder):
    dm = cls(str(tmp_path), download=True)
    start = time.monotonic()
    with pytest.raises(FileNotFoundError) as err:
        dm.prepare_data()
    assert time.monotonic() - start < 10
    assert "downloading failed" in str(err.value) and str(tmp_path / folder) in str(err.value)
    with pytest.raises(FileNotFoundError):  # setup tries again and fails the same way
        dm.setup("fit")


@pytest.mark.parametrize(
    "cls,folder", [(MNISTDataModule, "MNIST/raw"), (CIFAR10DataModule, "cifar-10-batches-py")]
)
def test_absent_files_are_a_config_error_naming_data_dir_when_required(tmp_path, cls, folder):
    from diffexp.cli import ConfigError
    from diffexp.data.images import MissingDataError

    dm = cls(str(tmp_path / "nowhere"), download=False)
    with pytest.raises(ConfigError) as err:
        dm.require_files()
    assert isinstance(err.value, MissingDataError) and isinstance(err.value, FileNotFoundError)
    message = str(err.value)
    assert message.startswith(f"data.data_dir={tmp_path / 'nowhere'}")
    assert str(tmp_path / "nowhere" / folder) in message and dm.files[0] in message
    cls(str(tmp_path / "nowhere"), download=True).require_files()  # prepare_data will fetch


def test_image_data_modules_carry_their_description(tmp_path):
    digits = DigitsDataModule(16, fid_features="classifier", fid_features_path="f.pt")
    assert (
        digits.description.fid_features,
        digits.description.fid_features_path,
        digits.description.log_snr_max,
    ) == (
        "classifier",
        "f.pt",
        None,
    )
    for cls in (MNISTDataModule, CIFAR10DataModule):
        dm = cls(str(tmp_path / "nowhere"), log_snr_max=13.3, log_snr_min=-5.0, sigma_data=0.5)
        assert (
            dm.description.log_snr_max,
            dm.description.log_snr_min,
            dm.description.sigma_data,
            dm.description.fid_features,
        ) == (
            13.3,
            -5.0,
            0.5,
            None,
        )
        assert not (tmp_path / "nowhere").exists()
    with pytest.raises(TypeError, match=r"DigitsDataModule got unexpected arguments \['size'\]"):
        DigitsDataModule(size=8)


def test_build_datamodule_requires_the_files_only_when_asked(tmp_path):
    from omegaconf import OmegaConf

    from diffexp.build.factory import build_datamodule
    from diffexp.data.images import MissingDataError

    cfg = OmegaConf.create(
        {"_target_": "diffexp.data.images.MNISTDataModule", "data_dir": str(tmp_path)}
    )
    assert build_datamodule(cfg).shape == (1, 32, 32)  # the shape is known without the files
    with pytest.raises(MissingDataError, match="data.data_dir"):
        build_datamodule(cfg, require_files=True)
    _fake_mnist(tmp_path)
    build_datamodule(cfg, require_files=True)
