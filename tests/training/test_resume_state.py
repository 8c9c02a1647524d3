"""The pieces of exact resume in isolation: the data position inside an epoch (gradient
accumulation included), the CSV rows kept, the config keys that may change, and the loop states
rewritten for Lightning."""

from __future__ import annotations

import pytest

from diffexp.training.resume import (
    config_changes,
    data_position,
    reopen_stopped_epoch,
    rows_before,
    start_next_epoch,
)


@pytest.mark.parametrize(
    ("step", "epoch", "batches", "accumulate", "expected"),
    [
        (0, 0, 4, 1, 0),
        (5, 1, 4, 1, 1),  # one batch into epoch 1
        (8, 2, 4, 1, 0),  # an epoch's start
        (3, 1, 5, 2, 0),  # 5 batches, 2 a step: 3 steps an epoch (the last takes one batch)
        (4, 1, 5, 2, 2),
        (5, 1, 5, 2, 4),
        (7, 2, 5, 2, 2),
    ],
)
def test_data_position_counts_the_batches_of_the_epoch_already_trained_on(
    step, epoch, batches, accumulate, expected
):
    assert data_position(step, epoch, batches, accumulate) == expected


def test_rows_before_keeps_earlier_steps_and_survives_a_truncated_row(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,train/loss\n0,0,1.5\n0,1,1.25\n0,2,1.0\n0,3")  # cut mid-row
    header, rows = rows_before(path, 2)
    assert header == ["epoch", "step", "train/loss"]
    assert [r["step"] for r in rows] == ["0", "1"]
    assert rows_before(tmp_path / "none.csv", 2) == ([], [])


def test_config_changes_refuse_the_model_and_allow_the_run_length_and_paths():
    stored = {
        "schedule": {"_target_": "LogLinear", "log_snr_max": 10.0},
        "trainer": {"max_steps": 100, "devices": 1},
        "paths": {"output_dir": "/a"},
        "data": {"data_dir": "/x", "n_train": 50},
    }
    current = {
        "schedule": {"_target_": "Cosine", "offset": 0.008, "log_snr_max": 10},
        "trainer": {"max_steps": 200, "devices": 2},
        "paths": {"output_dir": "/b"},
        "data": {"data_dir": "/y", "n_train": 50},
    }
    changes = config_changes(stored, current)
    assert [(k, repr(old), repr(new)) for k, old, new in changes] == [
        ("schedule._target_", "'LogLinear'", "'Cosine'"),
        ("schedule.offset", "absent", "0.008"),
    ]


def test_an_option_added_since_the_checkpoint_is_unchanged_at_its_null_default():
    stored = {"model": {"ema_decay": 0.999, "grad_clip": None}}
    current = {"model": {"ema_decay": 0.999, "ema_warmup": None}}
    assert config_changes(stored, current) == []  # absent on one side, null on the other
    current["model"]["ema_warmup"] = {"power": 0.75}
    assert [k for k, _, _ in config_changes(stored, current)] == ["model.ema_warmup.power"]


def _loops(epoch: dict, batch: dict, last: bool) -> dict:
    both = lambda d: {"current": dict(d), "total": dict(d)}  # noqa: E731
    return {
        "loops": {
            "fit_loop": {
                "epoch_progress": both(epoch),
                "epoch_loop.batch_progress": {**both(batch), "is_last_batch": last},
            }
        }
    }


def _counts(r, s, p, c) -> dict:
    return {"ready": r, "started": s, "processed": p, "completed": c}


def test_an_epoch_end_checkpoint_becomes_the_next_epochs_start():
    ckpt = _loops(_counts(3, 3, 3, 2), _counts(4, 4, 4, 4), last=True)
    assert start_next_epoch(ckpt)
    fit = ckpt["loops"]["fit_loop"]
    assert fit["epoch_progress"]["current"] == _counts(3, 3, 3, 3)
    assert fit["epoch_loop.batch_progress"]["current"] == _counts(0, 0, 0, 0)
    assert not fit["epoch_loop.batch_progress"]["is_last_batch"]
    assert not reopen_stopped_epoch(ckpt)


def test_a_max_steps_stop_inside_an_epoch_is_put_back_inside_it():
    ckpt = _loops(_counts(3, 3, 3, 2), _counts(2, 2, 2, 2), last=False)
    assert not start_next_epoch(ckpt)
    assert reopen_stopped_epoch(ckpt)
    assert ckpt["loops"]["fit_loop"]["epoch_progress"]["current"] == _counts(3, 3, 2, 2)


def test_a_checkpoint_inside_an_epoch_is_left_to_lightning():
    ckpt = _loops(_counts(3, 3, 2, 2), _counts(2, 2, 2, 1), last=False)  # on_train_batch_end
    assert not start_next_epoch(ckpt) and not reopen_stopped_epoch(ckpt)
