"""The one exception type a user should ever see: a single line that says what is wrong and what to do; and SIGTERM
made to stop a command as Ctrl-C does."""

from __future__ import annotations

import contextlib
import signal
from typing import Iterator


class DeepRedError(Exception):
    """A problem the user can fix. The CLI prints its message on one line and exits non-zero."""

    exit_code = 2


class InvalidDatasetError(DeepRedError):
    """The dataset has problems; `problems` holds every `FILE:LINE: message`."""

    exit_code = 1

    def __init__(self, message: str, problems: list[str]):
        super().__init__(message)
        self.problems = problems


class DatasetNotFoundError(DeepRedError):
    """The dataset the user named (by --dataset or $GUTENBERG_DATA) is not there; nothing else is used instead."""

    exit_code = 1


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler, `kill`, `timeout`) raises KeyboardInterrupt while the block runs, so the command stops as
    Ctrl-C stops it: outputs cleaned up, locks released, how to resume printed. Training installs its own graceful
    handler for both while it runs. Outside the main thread signals are left alone."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
