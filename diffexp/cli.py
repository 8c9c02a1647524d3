"""How the entry points end: bad input is refused with one paragraph and exit code 2.

Every ``python -m diffexp.<entry>`` runs its work inside ``refusing_bad_input()``: a
``ConfigError`` (an input that cannot work, with its key, value and fix in the message) is
printed as ``error: <message>`` on stderr and the process exits with ``EXIT_BAD_INPUT``, with no
Python traceback; ``HYDRA_FULL_ERROR=1`` re-raises it for the full traceback. ``run_cli`` also
turns Hydra's own refusals of an override (an unknown option or key, before the job starts) into
that exit code.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

EXIT_BAD_INPUT = 2
# a job stopped by SIGTERM / SIGINT after saving its checkpoint: 128 + SIGTERM, as a shell reports
EXIT_INTERRUPTED = 143

_job_started = False


class ConfigError(ValueError):
    """An input that cannot work; the message names the key, the value and the fix."""


def full_errors() -> bool:
    """Whether the user asked for full tracebacks (Hydra's ``HYDRA_FULL_ERROR=1``)."""
    return os.environ.get("HYDRA_FULL_ERROR", "") == "1"


def refuse(message: str) -> None:
    """Print ``error: message`` on stderr and exit with ``EXIT_BAD_INPUT``."""
    sys.stdout.flush()
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(EXIT_BAD_INPUT)


@contextlib.contextmanager
def refusing_bad_input() -> Iterator[None]:
    """A ``ConfigError`` raised inside becomes one paragraph on stderr and exit code 2."""
    global _job_started
    _job_started = True
    try:
        yield
    except ConfigError as err:
        if full_errors():
            raise
        refuse(str(err))


def run_cli(main: Callable[[], Any]) -> None:
    """Run a Hydra ``main``; a refusal of the command line by Hydra itself (exit 1 before the
    job started: an unknown option, a malformed override) exits with ``EXIT_BAD_INPUT``."""
    try:
        main()
    except SystemExit as exit_:
        if exit_.code == 1 and not _job_started:
            raise SystemExit(EXIT_BAD_INPUT) from None
        raise
