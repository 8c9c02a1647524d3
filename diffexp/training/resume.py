"""What a resumed run needs to continue exactly: Lightning's loop state put where the
uninterrupted run stood, and the data position inside an epoch.

Lightning 2.x restores a checkpoint written after an epoch's last batch (``on_train_epoch_end``,
or after the epoch's validation) by running one batch too many in the finished epoch and then
restarting the next epoch's data from its start (Lightning issues #18060, #19815). Such a
checkpoint is the start of the next epoch, so its loop counters are rewritten to say so. A
checkpoint written inside an epoch is restored by Lightning at the right batch index, but with a
data loader that cannot save its position it would restart the epoch's data; ``data_position``
gives the number of batches to skip. A checkpoint written when ``max_steps`` stopped training inside
an epoch is put back inside that epoch (Lightning counts the epoch as processed and would start
the next epoch's data order).
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from diffexp.cli import ConfigError

log = logging.getLogger("diffexp")


def _progress(d: dict[str, Any], value: int) -> dict[str, int]:
    """A progress record with every counter at ``value``."""
    return {k: value for k in d}


def finished_epoch(checkpoint: dict[str, Any]) -> bool:
    """Whether ``checkpoint`` was written after its epoch's last batch was trained."""
    try:
        batch = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]
    except (KeyError, TypeError):
        return False
    current = batch["current"]
    return bool(batch.get("is_last_batch")) and current["completed"] == current["ready"] > 0


def start_next_epoch(checkpoint: dict[str, Any]) -> bool:
    """Rewrite the loop counters of a checkpoint written after its epoch's last batch (and its
    validation, if any) to the start of the next epoch; True when rewritten."""
    if not finished_epoch(checkpoint):
        return False
    fit = checkpoint["loops"]["fit_loop"]
    epochs = fit["epoch_progress"]
    done = int(epochs["current"]["started"])  # epochs started, the finished one included
    epochs["current"] = _progress(epochs["current"], done)
    epochs["total"] = _progress(epochs["total"], done)
    batch = fit["epoch_loop.batch_progress"]
    batch["current"] = _progress(batch["current"], 0)
    batch["is_last_batch"] = False
    return True


def reopen_stopped_epoch(checkpoint: dict[str, Any]) -> bool:
    """Rewrite a checkpoint written at the end of training that stopped inside an epoch
    (``max_steps``: Lightning ends the epoch early and counts it processed) to the state of a stop
    inside that epoch, so a longer run continues the epoch's data; True when rewritten."""
    try:
        fit = checkpoint["loops"]["fit_loop"]
        batch, epochs = fit["epoch_loop.batch_progress"], fit["epoch_progress"]
    except (KeyError, TypeError):
        return False
    current = batch["current"]
    inside = not batch.get("is_last_batch") and current["completed"] == current["ready"] > 0
    if not inside or epochs["current"]["processed"] != epochs["current"]["started"]:
        return False
    for record in (epochs["current"], epochs["total"]):
        record["processed"] = record["completed"] = record["started"] - 1
    return True


def data_position(global_step: int, epoch: int, batches_per_epoch: float, accumulate: int) -> int:
    """Batches of ``epoch`` already trained on at ``global_step``: every epoch has
    ``batches_per_epoch`` batches and ceil(batches / ``accumulate``) optimizer steps (its last
    step may take fewer batches); 0 at an epoch's start."""
    if batches_per_epoch == float("inf") or batches_per_epoch <= 0:
        return 0
    n, accumulate = int(batches_per_epoch), max(1, int(accumulate))
    steps_per_epoch = math.ceil(n / accumulate)
    done = (int(global_step) - int(epoch) * steps_per_epoch) * accumulate
    return done if 0 < done < n else 0


# what may differ between a checkpoint's config and the resuming run's: how long to train, what
# to log and write, where, and on which devices (prefixes of dotted keys); everything else defines
# the model, its objective or its data and must match
MAY_CHANGE_ON_RESUME = (
    "trainer.max_steps",
    "trainer.max_epochs",
    "model.lr_scheduler.total_steps",
    "trainer.accelerator",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.strategy",
    "trainer.enable_progress_bar",
    "trainer.log_every_n_steps",
    "trainer.check_val_every_n_epoch",
    "trainer.limit_val_batches",
    "trainer.default_root_dir",
    # compiling the network changes how it runs, not what it computes
    "model.compile",
    "logger",
    "callbacks",
    "sampler",
    "paths",
    # where the data and the FID features are read from (paths, not the data itself)
    "data.data_dir",
    "data.download",
    "data.fid_features_path",
    "trainer.val_check_interval",
    "ckpt_path",
    "tags",
    "optimized_metric",
    "task_name",
)


class _Absent:
    """A key one of two configs does not have."""

    def __repr__(self) -> str:
        return "absent"


ABSENT = _Absent()


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as {dotted key: leaf value} (lists are leaves)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def may_change(key: str) -> bool:
    """Whether ``key`` may differ between a checkpoint's config and the resuming run's."""
    return any(key == p or key.startswith(p + ".") for p in MAY_CHANGE_ON_RESUME)


def config_changes(stored: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, checkpoint's value, current value) for every key that defines the run and differs.
    A key one side lacks and the other sets to null is unchanged: options added since the
    checkpoint was written (``model.ema_warmup: null``) default to what the run did."""
    before, after = flatten(stored), flatten(current)
    missing = object()
    changes = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key, missing), after.get(key, missing)
        if (old is missing and new is None) or (old is None and new is missing):
            continue
        if old != new and not may_change(key):
            changes.append(
                (key, ABSENT if old is missing else old, ABSENT if new is missing else new)
            )
    return changes


def newest_last_checkpoint(run_dir: str | Path) -> Path | None:
    """``<run_dir>/checkpoints/last.ckpt`` when it exists (what ``ckpt_path=auto`` resumes)."""
    path = Path(run_dir) / "checkpoints" / "last.ckpt"
    return path if path.is_file() else None


def checkpoints_in(folder: Path, limit: int = 50) -> list[Path]:
    """The .ckpt files in ``folder`` and its checkpoints/ subfolder (then deeper), sorted."""
    found = sorted(folder.glob("*.ckpt")) + sorted(folder.glob("checkpoints/*.ckpt"))
    if not found:
        found = sorted(p for _, p in zip(range(limit), folder.rglob("*.ckpt"), strict=False))
    return found


def rows_before(metrics_csv: str | Path, step: int) -> tuple[list[str], list[dict[str, str]]]:
    """The header and the rows of a CSV log logged before ``step`` (a resumed run logs the rest
    again); empty when there is no file."""
    path = Path(metrics_csv)
    if not path.is_file():
        return [], []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = [r for r in reader if (r.get("step") or "").isdigit() and int(r["step"]) < step]
        return list(reader.fieldnames or []), rows


@dataclass
class ResumePlan:
    """Where a run resumes from: the checkpoint, its step, and whether it continues the same run
    folder (then its CSV log and W&B run are continued too)."""

    path: Path
    step: int
    same_folder: bool
    wandb_run_id: str | None = None


def plan_resume(cfg: DictConfig) -> ResumePlan | None:
    """The checkpoint ``ckpt_path`` names (``auto``: this run folder's last.ckpt, None when there
    is none yet), checked before any compute: a readable diffexp checkpoint whose stored config
    differs from ``cfg`` only where ``MAY_CHANGE_ON_RESUME`` allows."""
    value = cfg.get("ckpt_path")
    run_dir = Path(cfg.paths.output_dir)
    if value is None or value == "":
        existing = newest_last_checkpoint(run_dir)
        if existing is not None:  # e.g. a requeued job whose command lacks ckpt_path=auto
            raise ConfigError(
                f"paths.output_dir={run_dir} already holds a run ({existing}), and ckpt_path=null "
                "would start a fresh run over its checkpoints. Resume it with ckpt_path=auto, or "
                "start the new run in another folder (hydra.run.dir=<new folder>)."
            )
        return None
    if value == "auto":
        path = newest_last_checkpoint(run_dir)
        if path is None:
            log.info("ckpt_path=auto: no checkpoints/last.ckpt in %s yet, starting fresh", run_dir)
            return None
    else:
        path = Path(str(value))
        if path.is_dir():
            found = [str(p) for p in checkpoints_in(path)[:5]]
            raise ConfigError(
                f"ckpt_path={value} is a directory, not a checkpoint file. Pass a file (found: "
                f"{', '.join(found) or 'no .ckpt files'}), or ckpt_path=auto with "
                f"hydra.run.dir={path} to resume that run folder's last.ckpt."
            )
        if not path.is_file():
            raise ConfigError(
                f"ckpt_path={value} does not exist. Pass a checkpoint file (a run writes "
                "<run>/checkpoints/last.ckpt), ckpt_path=auto to resume this run folder's own, "
                "or ckpt_path=null to start fresh."
            )
    state = read_checkpoint(path, "ckpt_path")
    changes = config_changes(state["diffexp_config"], OmegaConf.to_container(cfg, resolve=True))
    if changes:
        raise ConfigError(describe_changes(path, changes))
    same = path.resolve().parent.parent == run_dir.resolve()
    wandb_id = state.get("wandb_run_id") if same else None
    return ResumePlan(path, int(state.get("global_step", 0)), same, wandb_id)


def read_checkpoint(path: Path, key: str) -> dict[str, Any]:
    """A diffexp training checkpoint's contents (``checkpoint_io.load_checkpoint``'s safe
    reading); a ConfigError naming ``key`` when it has no loop state to resume."""
    from diffexp.training.checkpoint_io import load_checkpoint

    state = load_checkpoint(path, key)
    if "loops" not in state:
        raise ConfigError(
            f"{key}={path} holds weights but no training state to resume (no loop state). "
            "Pass a <run>/checkpoints/last.ckpt written by python -m diffexp.train, or start "
            "fresh with ckpt_path=null."
        )
    return state


def describe_changes(path: Path, changes: list[tuple[str, Any, Any]]) -> str:
    """One paragraph: the keys that differ from the checkpoint's config, and what to do."""
    shown = "; ".join(f"{k}: {old!r} in the checkpoint, {new!r} now" for k, old, new in changes[:8])
    more = f" (and {len(changes) - 8} more)" if len(changes) > 8 else ""
    return (
        f"ckpt_path={path} was trained with a different model, objective or data, so resuming "
        f"it with this config would not continue that run: {shown}{more}. Drop these overrides "
        "to resume (the checkpoint's config is used), or start a new run (ckpt_path=null). On "
        f"resume only these may change: {', '.join(MAY_CHANGE_ON_RESUME)}."
    )
