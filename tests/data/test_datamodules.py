"""In-memory vector data modules: batches, seeding, splits, reference samples."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from diffexp.data import (
    DataDescription,
    GaussianMixture,
    MixtureDataModule,
    ToyDataModule,
    VectorDataModule,
)
from diffexp.metrics import sliced_wasserstein

SMALL = dict(n_train=2_000, n_val=500, n_test=700, batch_size=128, eval_batch_size=300)


def _rows(x: torch.Tensor) -> list[tuple[float, ...]]:
    return [tuple(r) for r in x.tolist()]


def test_mixture_datamodule_attributes():
    dm = MixtureDataModule("ring8", **SMALL)
    assert (dm.dim, dm.shape, dm.num_classes, dm.name) == (2, (2,), 8, "ring8")
    assert isinstance(dm.mixture, GaussianMixture)
    assert dm.x_train.shape == (2_000, 2) and dm.x_val.shape == (500, 2)
    assert dm.x_test.shape == (700, 2) and dm.y_train.dtype == torch.long
    lp = dm.true_log_prob(dm.x_test)
    assert lp.shape == (700,) and torch.isfinite(lp).all()
    dm1 = MixtureDataModule("mixture1d", **SMALL)
    assert (dm1.dim, dm1.shape, dm1.num_classes) == (1, (1,), 2)
    dm3 = MixtureDataModule("ring8", radius=3.0, **SMALL)
    torch.testing.assert_close(dm3.mixture.means.norm(dim=1), torch.full((8,), 3.0))
    assert (dm3.x_train.norm(dim=1) - 3.0).abs().max() < 1.0


def test_train_loader_full_batches_cover_each_example_at_most_once():
    dm = MixtureDataModule("grid25", **SMALL)
    loader = dm.train_dataloader()
    assert len(loader) == 2_000 // 128
    index = {row: i for i, row in enumerate(_rows(dm.x_train))}
    orders = []
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)  # what Lightning does before every epoch
        seen = []
        for batch in loader:
            assert isinstance(batch, tuple) and len(batch) == 2
            x, y = batch
            assert x.shape == (128, 2) and x.dtype == torch.float32
            assert y.shape == (128,) and y.dtype == torch.long
            ids = [index[row] for row in _rows(x)]
            assert torch.equal(y, dm.y_train[ids])
            seen.extend(ids)
        assert len(seen) == (2_000 // 128) * 128 == len(set(seen))
        orders.append(seen)
    assert orders[0] != orders[1]  # a new permutation every epoch
    # which depends only on (seed, epoch): a fresh loader at epoch 1 (a resumed run) sees the same
    fresh = dm.train_dataloader()
    fresh.sampler.set_epoch(1)
    assert [index[row] for b in fresh for row in _rows(b[0])] == orders[1]


def test_eval_loaders_are_sequential():
    dm = MixtureDataModule("ring8", **SMALL)
    for loader, x, y in (
        (dm.val_dataloader(), dm.x_val, dm.y_val),
        (dm.test_dataloader(), dm.x_test, dm.y_test),
    ):
        batches = list(loader)
        assert [len(b[0]) for b in batches][:-1] == [300] * (len(batches) - 1)
        assert torch.equal(torch.cat([b[0] for b in batches]), x)
        assert torch.equal(torch.cat([b[1] for b in batches]), y)


def test_unlabelled_batches_are_one_tuples():
    dm = MixtureDataModule("ring8", labelled=False, **SMALL)
    assert dm.num_classes == 0 and dm.y_train is None
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, tuple) and len(batch) == 1 and batch[0].shape == (128, 2)
    batch = next(iter(dm.val_dataloader()))
    assert isinstance(batch, tuple) and len(batch) == 1


def test_determinism_and_distinct_splits():
    a = MixtureDataModule("ring8", seed=3, **SMALL)
    b = MixtureDataModule("ring8", seed=3, **SMALL)
    c = MixtureDataModule("ring8", seed=4, **SMALL)
    for name in ("x_train", "y_train", "x_val", "x_test"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.x_train, c.x_train)
    for xa, xb in zip(a.train_dataloader(), b.train_dataloader(), strict=True):
        assert torch.equal(xa[0], xb[0])
    assert not torch.equal(next(iter(a.train_dataloader()))[0], a.x_train[:128])
    train = set(_rows(a.x_train))
    assert not train & set(_rows(a.x_val)) and not train & set(_rows(a.x_test))
    assert not set(_rows(a.x_val)) & set(_rows(a.x_test))


def test_reference_samples():
    dm = MixtureDataModule("ring8", **SMALL)
    r0, r0b, r1 = dm.reference(4_000, seed=0), dm.reference(4_000, 0), dm.reference(4_000, 1)
    assert r0.shape == (4_000, 2) and r0.dtype == dm.x_train.dtype
    assert torch.equal(r0, r0b) and not torch.equal(r0, r1)
    assert not set(_rows(r0)) & set(_rows(dm.x_train))
    assert not set(_rows(r0)) & set(_rows(dm.x_test))
    assert torch.equal(MixtureDataModule("ring8", seed=9, **SMALL).reference(4_000, 0), r0)
    # same distribution: two held-out sets give a noise floor well below a real shift
    floor = sliced_wasserstein(r0, r1)
    assert floor < 0.15
    assert sliced_wasserstein(r0, r1 + torch.tensor([0.5, 0.0])) > 2 * floor
    toy = ToyDataModule("moons", **SMALL)
    t0, t1 = toy.reference(500, 0), toy.reference(500, 1)
    assert t0.shape == (500, 2) and not torch.equal(t0, t1)
    assert torch.equal(t0, toy.reference(500, 0))
    assert sliced_wasserstein(t0, toy.x_test) < 0.2


def test_toy_datamodules():
    moons = ToyDataModule("moons", **SMALL)
    assert (moons.dim, moons.num_classes, moons.mixture) == (2, 2, None)
    assert moons.true_log_prob(moons.x_test) is None
    assert set(moons.y_train.tolist()) == {0, 1}
    x, y = next(iter(moons.train_dataloader()))
    assert x.shape == (128, 2) and y.dtype == torch.long
    roll = ToyDataModule("swissroll", **SMALL)
    assert (roll.num_classes, roll.y_train) == (0, None)
    assert len(next(iter(roll.train_dataloader()))) == 1
    for dm in (moons, roll):  # fixed constants give about zero mean and unit RMS
        assert dm.x_train.mean(0).abs().max() < 0.15
        assert 0.8 < dm.x_train.square().mean().sqrt() < 1.2
    big = ToyDataModule("moons", scale=2.0, **SMALL)
    torch.testing.assert_close(big.x_train, 2 * moons.x_train)
    assert not torch.equal(ToyDataModule("moons", seed=1, **SMALL).x_train, moons.x_train)


def test_unknown_names_and_bad_arguments():
    with pytest.raises(ValueError, match="ring8") as err:
        MixtureDataModule("ring9")
    assert "grid25" in str(err.value) and "mixture1d" in str(err.value)
    with pytest.raises(ValueError, match="moons") as err:
        ToyDataModule("circles")
    assert "swissroll" in str(err.value)
    with pytest.raises(ValueError, match="batch_size"):
        MixtureDataModule("ring8", n_train=100, batch_size=128)
    x = torch.zeros(10, 2)
    with pytest.raises(ValueError, match="labels"):
        VectorDataModule(x, x, x, torch.zeros(10, dtype=torch.long), batch_size=4)


def test_the_description_is_carried_and_unknown_arguments_are_refused():
    dm = MixtureDataModule("ring8", radius=3.0, log_snr_max=9.0, sigma_data=2.1, **SMALL)
    assert dm.description == DataDescription(log_snr_max=9.0, sigma_data=2.1)
    assert (
        dm.description.log_snr_max,
        dm.description.log_snr_min,
        dm.description.sigma_data,
        dm.description.fid_features,
    ) == (
        9.0,
        None,
        2.1,
        None,
    )
    assert dm.x_train.norm(dim=1).mean() > 2.5  # the preset argument still reaches the mixture
    moons = ToyDataModule("moons", log_snr_min=-6.0, fid_features="inception", **SMALL)
    assert (
        moons.description.log_snr_min,
        moons.description.fid_features,
        moons.description.fid_features_path,
    ) == (
        -6.0,
        "inception",
        None,
    )
    assert ToyDataModule("moons", **SMALL).description == DataDescription()
    with pytest.raises(TypeError, match=r"ToyDataModule got unexpected arguments \['sigma'\]"):
        ToyDataModule("moons", sigma=1.0, **SMALL)
    with pytest.raises(TypeError, match="log_snr_max"):  # the message lists the description keys
        ToyDataModule("moons", sigma=1.0, **SMALL)


def test_vector_datamodule_from_tensors():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 3, generator=g)
    y = torch.randint(4, (100,), generator=g)
    dm = VectorDataModule(x, x[:10], x[:20], y, y[:10], y[:20], batch_size=32, eval_batch_size=8)
    assert (dm.dim, dm.num_classes, dm.mixture) == (3, int(y.max()) + 1, None)
    assert len(dm.train_dataloader()) == 3 and len(dm.val_dataloader()) == 2
    with pytest.raises(NotImplementedError):
        dm.reference(5, 0)


class _CountingModule(pl.LightningModule):
    """Records the batches Lightning feeds it."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2))
        self.train_shapes: list[tuple] = []
        self.val_batches = 0

    def training_step(self, batch, batch_idx):
        assert isinstance(batch, tuple)
        self.train_shapes.append(tuple(t.shape for t in batch))
        return (batch[0] - self.w).square().mean()

    def validation_step(self, batch, batch_idx):
        self.val_batches += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_trainer_consumes_the_loaders():
    dm = MixtureDataModule("ring8", **SMALL)
    module = _CountingModule()
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=dm)
    assert module.train_shapes == [((128, 2), (128,))] * (2 * (2_000 // 128))
    assert module.val_batches == 2 * 2
