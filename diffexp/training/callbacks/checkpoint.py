"""``last.ckpt``: the state a killed run resumes from, written often and only where a resume is
exact.

It is written at the end of every training epoch (after that epoch's validation) and, inside an
epoch, every ``every_n_train_steps`` optimizer steps and every ``every_n_minutes`` minutes, so a
kill loses at most that much work. A step inside an epoch is skipped when it is the epoch's last
batch or validation runs after it: Lightning resumes such a state without that validation, so the
checkpoint waits for the epoch's end. Writes go through the Trainer's checkpoint IO (atomic:
``diffexp.training.checkpoint_io``), on every rank as Lightning requires (rank 0 writes).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Checkpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException


class LastCheckpoint(Checkpoint):
    """Writes ``<dirpath>/last.ckpt`` at every epoch's end and every N steps / minutes.

    A ``Checkpoint``, so Lightning calls it after the other callbacks at an epoch's end and after
    the ``ModelCheckpoint`` listed before it: ``last.ckpt`` records the best checkpoint so far.
    """

    # how often (in steps) the clock is read for ``every_n_minutes``: under DDP reading it is a
    # collective (the ranks agree on rank 0's clock)
    CLOCK_EVERY_N_STEPS = 20

    def __init__(
        self,
        dirpath: str,
        every_n_train_steps: int | None = 500,
        every_n_minutes: float | None = 10.0,
        filename: str = "last.ckpt",
    ) -> None:
        self.path = Path(dirpath) / filename
        self.every_n_train_steps = every_n_train_steps or 0
        self.every_n_seconds = 60.0 * (every_n_minutes or 0.0)
        self._last_write = time.monotonic()

    @property
    def state_key(self) -> str:
        return f"LastCheckpoint[{self.path.name}]"

    def save(self, trainer: pl.Trainer) -> None:
        """Write the full training state to ``last.ckpt`` (atomically)."""
        trainer.save_checkpoint(self.path)
        self._last_write = time.monotonic()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_write = time.monotonic()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run or not self._inside_epoch(trainer, i):
            return
        step = trainer.global_step
        due = self.every_n_train_steps > 0 and step % self.every_n_train_steps == 0
        if not due and self.every_n_seconds > 0 and step % self.CLOCK_EVERY_N_STEPS == 0:
            late = time.monotonic() - self._last_write >= self.every_n_seconds
            due = bool(trainer.strategy.broadcast(late))  # the ranks agree on rank 0's clock
        if due:
            self.save(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.fast_dev_run:
            self.save(trainer)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """A stop on a signal (Lightning's ``SIGTERMException``, raised at a step's end) writes
        ``last.ckpt``; any other exception leaves the last good one (its state may be mid-step)."""
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit":
            self.save(trainer)

    @staticmethod
    def _inside_epoch(trainer: pl.Trainer, batch_idx: int) -> bool:
        """Whether a resume from after batch ``batch_idx`` would be exact: not the epoch's last
        batch, no validation after it, and an optimizer step just taken."""
        n = trainer.num_training_batches
        if math.isfinite(n) and batch_idx + 1 >= n:
            return False
        loop = trainer.fit_loop.epoch_loop
        if loop._should_accumulate():  # no public API says whether the optimizer just stepped
            return False
        interval = trainer.val_check_batch
        if not math.isfinite(interval):
            return True
        # validation every N batches counts within the epoch, or across epochs without
        # check_val_every_n_epoch (Lightning's rule)
        count = batch_idx if trainer.check_val_every_n_epoch else loop.total_batch_idx
        return (count + 1) % int(interval) != 0
