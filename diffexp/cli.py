"""How the entry points end: bad input is refused with one paragraph and exit code 2.

Every ``python -m diffexp.<entry>`` runs its work inside ``refusing_bad_input()``: a
``ConfigError`` (an input that cannot work, with its key, value and fix in the message) is
printed as ``error: <message>`` on stderr and the process exits with ``EXIT_BAD_INPUT``, with no
Python traceback (an expected failure that explains itself, e.g. a full disk, exits 1 the same
way); ``HYDRA_FULL_ERROR=1`` re-raises it for the full traceback. ``run_cli`` also
turns Hydra's own refusals of an override (an unknown option or key, before the job starts) into
that exit code.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# the config tree, found from this file (not from the caller: ``diffexp-train`` and
# ``python -m diffexp.train`` find the same)
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

EXIT_BAD_INPUT = 2
# a run that failed for a reason its message explains (a full disk, a diverged loss)
EXIT_FAILED = 1
# a job stopped by SIGTERM / SIGINT after saving its checkpoint: 128 + SIGTERM, as a shell reports
EXIT_INTERRUPTED = 143

_job_started = False


class ConfigError(ValueError):
    """An input that cannot work; the message names the key, the value and the fix."""


def full_errors() -> bool:
    """Whether the user asked for full tracebacks (Hydra's ``HYDRA_FULL_ERROR=1``)."""
    return os.environ.get("HYDRA_FULL_ERROR", "") == "1"


def explained_exit(err: BaseException) -> int | None:
    """The exit code of an expected failure whose message says everything (its class sets
    ``exit_code``: a full disk, a non-finite loss), None for a bug."""
    code = getattr(type(err), "exit_code", None)
    return code if isinstance(code, int) else None


@contextlib.contextmanager
def refusing_bad_input() -> Iterator[None]:
    """A ``ConfigError`` raised inside becomes one paragraph on stderr and exit code 2; an
    expected failure with ``exit_code`` becomes its message and that code. Other exceptions (bugs)
    keep their traceback."""
    global _job_started
    _job_started = True
    try:
        yield
    except Exception as err:
        code = EXIT_BAD_INPUT if isinstance(err, ConfigError) else explained_exit(err)
        if code is None or full_errors():
            raise
        message = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        sys.stdout.flush()
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()
        if in_multirun():
            raise  # Hydra records this job as failed, runs the others and exits non-zero
        raise SystemExit(code) from None


def in_multirun() -> bool:
    """Whether this job is one of a Hydra sweep's (``-m``)."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.initialized() and str(HydraConfig.get().mode) == "RunMode.MULTIRUN"


# the command that error messages suggest for a missing noisy classifier
TRAIN_CLASSIFIER = "python -m diffexp.train_classifier data=<the model's data>"


def task_overrides() -> list[str]:
    """The command line's overrides of the running Hydra job (none outside one)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def run_cli(main: Callable[[], Any]) -> None:
    """Run a Hydra ``main``; a refusal of the command line by Hydra itself (exit 1 before the
    job started: an unknown option, a malformed override) exits with ``EXIT_BAD_INPUT``."""
    try:
        main()
    except SystemExit as exit_:
        if exit_.code == 1 and not _job_started:
            raise SystemExit(EXIT_BAD_INPUT) from None
        raise
