"""Snapshots for post-hoc EMA (EDM2): power-function EMAs of the denoiser's weights, saved every
N steps to ``<dirpath>/snapshot_<step>.pt``; ``python -m diffexp.eval run=<run>
ema.sigma_rel=<s>`` then evaluates the EMA of any length s, reconstructed from them
(``training.posthoc_ema``).

Enable it with ``callbacks=posthoc_ema`` (the default callbacks plus this one), or add it to
another set: ``+callbacks.posthoc_ema={_target_:diffexp.training.callbacks.PostHocEMASnapshots,
dirpath:<folder>,every_n_steps:100}``. The tracker's state (its count and averages) is part of the
Lightning checkpoint, so a killed run resumes it exactly; each snapshot is written atomically.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from diffexp.training.checkpoint_io import AtomicCheckpointIO
from diffexp.training.posthoc_ema import DEFAULT_SIGMA_RELS, PowerEMA, snapshot_path


class PostHocEMASnapshots(pl.Callback):
    """Keeps power-function EMAs (EDM2: sigma_rel 0.05 and 0.10) of ``pl_module.denoiser``,
    updated after every optimizer step, and writes a snapshot of all of them every
    ``every_n_steps`` steps and at the end of training (rank 0)."""

    def __init__(
        self,
        dirpath: str,
        every_n_steps: int = 100,
        sigma_rels: Sequence[float] = DEFAULT_SIGMA_RELS,
    ) -> None:
        if int(every_n_steps) < 1:
            raise ValueError(f"every_n_steps={every_n_steps}: expected an integer >= 1")
        self.dirpath = Path(dirpath)
        self.every_n_steps = int(every_n_steps)
        self.tracker = PowerEMA(sigma_rels=list(sigma_rels))
        self._step = 0  # the global step of the tracker's last update
        self._written = -1  # the step of the last snapshot written
        self.last_path: Path | None = None

    @property
    def state_key(self) -> str:
        return f"PostHocEMASnapshots[{self.dirpath.name}]"

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        """After an optimizer step (not an accumulating batch): update, and snapshot when due.
        Checkpoint callbacks run after this one, so a checkpoint of this step holds this
        update."""
        step = trainer.global_step
        if step == self._step:
            return
        self._step = step
        self.tracker.update(pl_module.denoiser)
        if step % self.every_n_steps == 0:
            self.save(trainer, step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The final state too, when the last step was not a snapshot step."""
        if self.tracker.t > 0 and self._written != self._step:
            self.save(trainer, self._step)

    def save(self, trainer: pl.Trainer, step: int) -> None:
        """Write ``snapshot_<step>.pt`` (rank 0; atomically: a temporary file, then renamed)."""
        self._written = step
        if trainer.is_global_zero:
            path = snapshot_path(self.dirpath, step)
            AtomicCheckpointIO().save_checkpoint(self.tracker.snapshot(step), path)
            self.last_path = path

    def state_dict(self) -> dict[str, Any]:
        return {**self.tracker.state_dict(), "step": self._step, "written": self._written}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state_dict)
        self._step = int(state_dict["step"])
        self._written = int(state_dict.get("written", -1))
