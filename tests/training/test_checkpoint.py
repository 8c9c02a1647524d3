"""Checkpoints: EMA weights restored exactly, weights-only loading refuses foreign pickles."""

from __future__ import annotations

import pickle

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from diffexp.build.factory import build_datamodule, build_module
from diffexp.build.runs import load_model
from diffexp.training.checkpoint_io import load_checkpoint


def test_ema_weights_restored_from_a_checkpoint_equal_the_saved_ones(compose, tmp_path):
    cfg = compose(["data.n_train=2048", "model.ema_decay=0.9"])
    dm = build_datamodule(cfg.data)
    module = build_module(cfg, dm)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
    trainer = pl.Trainer(
        max_steps=6,
        logger=False,
        callbacks=[ckpt],
        enable_progress_bar=False,
        limit_val_batches=0,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm)
    saved_ema = {k: v.clone() for k, v in module.ema.module.state_dict().items()}
    live = {k: v.clone() for k, v in module.denoiser.state_dict().items()}
    # EMA differs from the live weights after a few steps with decay 0.9
    assert any(not torch.equal(saved_ema[k], live[k]) for k in live if live[k].is_floating_point())

    ckpt_file = tmp_path / "checkpoints" / "last.ckpt"
    eval_cfg = compose([f"ckpt={ckpt_file}"], name="eval")
    raw_cfg = compose([f"ckpt={ckpt_file}", "use_ema=false"], name="eval")
    loaded = load_model(eval_cfg)
    for k, v in loaded.denoiser.state_dict().items():
        torch.testing.assert_close(v, saved_ema[k], rtol=0, atol=0)
    raw = load_model(raw_cfg)
    for k, v in raw.denoiser.state_dict().items():
        torch.testing.assert_close(v, live[k], rtol=0, atol=0)


class _Exploit:
    def __reduce__(self):
        return (print, ("this ran code while loading a checkpoint",))


def test_a_checkpoint_whose_pickle_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        torch.save(
            {"state_dict": {}, "diffexp_config": {}, "payload": _Exploit()}, f, pickle_module=pickle
        )
    with pytest.raises(ValueError, match="safely") as err:
        load_checkpoint(path)
    assert "weights_only" not in str(err.value)  # never the advice to load it unsafely


def test_a_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "partial.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1000)}, "diffexp_config": {}}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="not a readable checkpoint: truncated") as err:
        load_checkpoint(path)
    assert "weights_only" not in str(err.value)


def test_a_file_that_is_not_a_diffexp_checkpoint_is_refused(tmp_path):
    path = tmp_path / "other.ckpt"
    torch.save({"weights": torch.ones(3)}, path)
    with pytest.raises(ValueError, match="not a diffexp checkpoint"):
        load_checkpoint(path)


def test_a_failed_checkpoint_write_never_overwrites_a_good_one(tmp_path):
    from diffexp.training.checkpoint_io import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "diffexp_config": {}}, path)
    good = path.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 - whatever stops the write midway
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "bad": lambda: None}, path)
    assert path.read_bytes() == good
    assert not list(tmp_path.glob("*.tmp"))
    assert torch.equal(load_checkpoint(path)["state_dict"]["w"], torch.ones(3))
