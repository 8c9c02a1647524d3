"""Checkpoints: written atomically (to a temporary file, fsynced, then renamed over the target)
and read safely (weights-only unpickling, our own message for a file that is not one).

A crash or a full disk mid-write leaves the previous good checkpoint in place, never a partial one.
A write that fails (a full disk shows up in torch as ``unexpected pos`` or ``file write failed``)
raises ``CheckpointWriteError``: the path, the free space left there and the fix.
"""

from __future__ import annotations

import errno
import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from diffexp.cli import EXIT_FAILED, ConfigError

# what torch's zip writer says when a write comes up short (typically: no space left)
_SHORT_WRITE = ("unexpected pos", "file write failed", "no space left")


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (a full disk, mostly); the previous checkpoint is unchanged."""

    exit_code = EXIT_FAILED  # the message says what happened and what to do: no traceback


def human_size(n: int) -> str:
    """A byte count in words: ``512 bytes``, ``2.0 KiB``, ``43.8 GiB``."""
    if n < 1024:
        return f"{n} bytes"
    value = n / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _free_space(folder: Path) -> str:
    try:
        return human_size(shutil.disk_usage(folder).free)
    except OSError:
        return "unknown"


def write_failure(path: Path, err: BaseException, had_previous: bool) -> CheckpointWriteError:
    """The error for a failed write of ``path``: whether the disk is full, the free space left,
    what was kept and the fix."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    full = getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(
        s in str(err).lower() for s in _SHORT_WRITE
    )
    kept = (
        f"The previous checkpoint {path} is unchanged."
        if had_previous
        else f"No checkpoint was written at {path}."
    )
    what = "the disk is full" if full else "the write failed"
    return CheckpointWriteError(
        errno.ENOSPC if full else (getattr(err, "errno", None) or errno.EIO),
        f"cannot write checkpoint {path}: {what} ({text}); {_free_space(path.parent)} free on "
        f"that disk. {kept} Free space there (old runs' checkpoints/*.ckpt, outputs/) or send "
        "the run's output to a disk with room (hydra.run.dir=...), then resume from the last "
        "checkpoint (ckpt_path=auto in the run's folder, or ckpt_path=<its last.ckpt>).",
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to ``<path>.tmp``, fsync, then os.replace onto ``<path>``."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        """Write ``checkpoint`` to ``path`` atomically (local files)."""
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        had_previous = path.is_file()
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except (OSError, RuntimeError) as err:
            _remove(tmp)
            if isinstance(err, RuntimeError) and not any(
                s in str(err).lower() for s in _SHORT_WRITE
            ):
                raise  # not a failed write (a bug, a device error): its own traceback
            raise write_failure(path, err, had_previous) from err
        finally:
            _remove(tmp)


def _remove(tmp: Path) -> None:
    """Remove the temporary file if it is there (never fails: the write's error matters)."""
    try:
        if tmp.exists():
            tmp.unlink()
    except OSError:
        pass


# ---------------------------------------------------------------------- reading
def _unreadable(path: Path, key: str | None, what: str) -> ConfigError:
    """The refusal of a file that is not a checkpoint torch can read, with the other checkpoints
    next to it."""
    others = [p.name for p in sorted(path.parent.glob("*.ckpt")) if p != path]
    alternatives = (
        f" Other checkpoints in {path.parent}: {', '.join(others[:5])}." if others else ""
    )
    size = human_size(path.stat().st_size)
    return ConfigError(
        f"{checkpoint_name(path, key)} ({size}) is not a readable checkpoint: {what}. "
        f"Pass another checkpoint of the run ({'ckpt' if key in (None, 'run') else key}=<file>), "
        "or retrain; a checkpoint cut short by a crash or a full disk cannot be repaired."
        f"{alternatives}"
    )


def checkpoint_name(path: Path, key: str | None) -> str:
    """How the message names the file: by the option that named it, when known."""
    if key == "run":
        return f"run={path.parents[1]}: its checkpoint {path}"
    return f"{key}={path}" if key else f"checkpoint {path}"


def load_checkpoint(path: Path | str, key: str | None = None) -> dict[str, Any]:
    """torch.load with weights-only unpickling; a ``ConfigError`` for unreadable or foreign files
    (``key``: the option that named the file, for the message)."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise _unreadable(path, key, "the file is empty (0 bytes: it was never written)")
    with open(path, "rb") as f:
        head = f.read(4)
    is_zip = zipfile.is_zipfile(path)
    if not is_zip and head.startswith(b"PK"):
        raise _unreadable(
            path, key, "truncated (a partial file: the archive torch writes is cut short)"
        )
    if not is_zip and not head.startswith(b"\x80"):
        raise _unreadable(
            path,
            key,
            "not a torch checkpoint (neither the zip archive nor the pickle torch writes)",
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower() or "weights_only" in str(err):
            raise _unreadable(
                path,
                key,
                "it holds objects other than tensors and plain data, and is not loaded because "
                "unpickling them could run code (only checkpoints of diffexp are loaded safely)",
            ) from None
        raise _unreadable(path, key, "corrupted (truncated or partial)") from None
    except Exception:  # noqa: BLE001 - torch's reason would suggest unsafe loading
        raise _unreadable(path, key, "corrupted (truncated or partial)") from None
    if not isinstance(state, dict) or "state_dict" not in state or "diffexp_config" not in state:
        raise ConfigError(
            f"{checkpoint_name(path, key)} is not a diffexp checkpoint (it has no state_dict / "
            "diffexp_config). "
            "Pass a checkpoint written by python -m diffexp.train (checkpoints/last.ckpt of its "
            "run folder)."
        )
    return state
