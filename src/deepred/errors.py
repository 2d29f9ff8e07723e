"""The one exception type a user should ever see: a single line that says what is wrong and what to do (the file
system's own refusals said the same way); and SIGTERM made to stop a command as Ctrl-C does."""

from __future__ import annotations

import contextlib
import errno
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


FILE_SYSTEM_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def file_system_refusal(exc: OSError) -> str | None:
    """The file system's refusal (a full disk, a read-only folder, a permission) as one line and what to do; None
    for other OSErrors (a refused connection is not about files). Writes are atomic and runs resumable, so running
    the command again after the fix loses nothing."""
    if exc.errno not in FILE_SYSTEM_ERRNOS and not exc.filename:
        return None
    reason = exc.strerror or str(exc)
    where = f": {exc.filename}" if exc.filename else ""
    advice = ("free some disk space" if exc.errno in (errno.ENOSPC, errno.EDQUOT)
              else "check the path and its permissions")
    return f"{reason}{where}; {advice}, then run the command again (finished work is kept)"


def invalid_yaml(path, exc: Exception) -> DeepRedError:
    """PyYAML's error (several lines, with a caret drawing) as one line: `FILE:LINE: not valid YAML (what)`."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{path}:{mark.line + 1}" if mark else str(path)
    what = getattr(exc, "problem", None) or " ".join(str(exc).split())
    return DeepRedError(f"{where}: not valid YAML ({what}); fix the file")


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
