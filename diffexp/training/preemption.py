"""Stopping on a signal without losing work, and exiting so that a scheduler knows.

SIGTERM (a scheduler's kill, ``scancel``), SIGINT (Ctrl-C) and SLURM's preemption signal
(``--signal=USR1@120``, or USR2 from submitit) all ask training to stop at the end of the current
step: Lightning raises ``SIGTERMException`` there, ``LastCheckpoint`` writes ``last.ckpt``, the
loggers are closed, and the process exits with 128 + the signal's number (143 for SIGTERM, 130
for SIGINT), never 0. A second Ctrl-C stops at once. On SLURM the preemption signal also requeues
the job (``scontrol requeue $SLURM_JOB_ID``); the requeued job resumes through ``ckpt_path=auto``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytorch_lightning as pl

log = logging.getLogger("diffexp")

# the signals SLURM sends before a job's time limit when asked to (sbatch --signal=USR1@120;
# submitit's launcher sends USR2)
PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


class Interrupted(SystemExit):
    """Training stopped on a signal after writing its checkpoint; the exit code is 128 + signum."""

    def __init__(self, signum: int, step: int, requeued: bool) -> None:
        super().__init__(128 + int(signum))
        self.signum, self.step, self.requeued = int(signum), int(step), requeued


def slurm_job_id() -> str | None:
    """The SLURM job to requeue (``<array job>_<task>`` for array jobs), None outside SLURM."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None


def requeue(job_id: str) -> bool:
    """``scontrol requeue <job_id>``; True when it succeeded."""
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    except OSError as err:
        log.error("could not requeue SLURM job %s: %s", job_id, err)
        return False
    if result.returncode != 0:
        log.error("scontrol requeue %s failed: %s", job_id, result.stderr.strip())
    return result.returncode == 0


class _StopIfSignalled(pl.Callback):
    """Re-raises Lightning's stop flag at the start of training for a signal received before."""

    def __init__(self, stop: GracefulStop) -> None:
        self.stop = stop

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.stop.signum is not None:
            # Lightning's stop-at-step-end flag; it has no public setter
            trainer._signal_connector.received_sigterm = True


class GracefulStop:
    """Signal handlers that turn SIGTERM, SIGINT and SLURM's preemption signals into a stop at
    the end of the current training step (Lightning's ``received_sigterm``)."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.signum: int | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        if self.signum is None:
            self.signum = signum
            log.warning(
                "received %s: stopping at the end of this step and writing last.ckpt%s",
                signal.Signals(signum).name,
                " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else "",
            )
        # Lightning's stop-at-step-end flag; it has no public setter
        self.trainer._signal_connector.received_sigterm = True

    @contextlib.contextmanager
    def installed(self) -> Iterator[GracefulStop]:
        """The handlers, for the duration of ``trainer.fit`` (main thread only). A signal that
        arrives while ``fit`` sets up (Lightning then resets its flag) still stops training at
        its first step."""
        spawned = type(self.trainer.strategy.launcher).__name__ == "_MultiProcessingLauncher"
        if spawned or threading.current_thread() is not threading.main_thread():
            # trainer=ddp_spawn trains in processes of its own: a signal keeps its default (the
            # job ends, non-zero; last.ckpt is the last one written)
            yield self
            return
        self.trainer.callbacks.append(_StopIfSignalled(self))
        signals = (signal.SIGTERM, signal.SIGINT, *(PREEMPTION_SIGNALS if slurm_job_id() else ()))
        previous = {s: signal.signal(s, self._handle) for s in signals}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def interrupted(self) -> Interrupted:
        """The exit for a stopped run; requeues the SLURM job when it was preempted."""
        signum = self.signum if self.signum is not None else signal.SIGTERM
        job = slurm_job_id()
        requeued = (
            bool(job)
            and signum in PREEMPTION_SIGNALS
            and self.trainer.is_global_zero
            and requeue(job)
        )
        return Interrupted(signum, self.trainer.global_step, requeued)
