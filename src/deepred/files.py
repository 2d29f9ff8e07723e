"""Files on disk: writes that never leave a half-written file under the final name, content hashes, output checks.

Every write of a product goes through `atomic_file` or `atomic_folder`: the content is made under a hidden temporary
sibling (`.NAME.PID.partial`, same filesystem) and renamed into place only when complete. A folder that already
exists is renamed aside first, then the new one in, then the old one deleted, so a kill at any moment leaves either
the old or the new folder at the final name, never a mixture. Temporaries left by a killed process carry its PID,
so a later write to the same name removes them.

A process that writes a run folder or an output holds its lock (`folder_lock`, `output_lock`): a second process is
refused in one line naming the first one's PID, a lock left by a killed process is taken over (the kernel drops an
flock when its holder dies), and whoever takes a lock first removes what killed writers left in that folder.

A file the user names is read only if it is a regular file (`read_regular_file`): a folder, a FIFO or a device is
refused in one line, and a FIFO is never opened (reading one waits for a writer forever).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

from .errors import DatasetNotFoundError, DeepRedError

BOM = b"\xef\xbb\xbf"  # Windows editors write one; it is not part of the first line's JSON

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: outputs are written without a lock
    fcntl = None

Log = Callable[[str], object]
PARTIAL = ".partial"
LOCK = ".deepred.lock"  # a run or training folder's lock; an output's lock is `.NAME.lock` beside it
# `.NAME.PID[.TAG].partial` as partial_path makes it (NAME may hold dots; TAG is e.g. `f32` or `old`)
PARTIAL_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)(?:\.(?P<tag>[A-Za-z0-9_]+))?\.partial$")


class FolderBusy(DeepRedError):
    """Another process holds the lock of the folder or output this one would write."""


# ---------------------------------------------------------------------------------------------------------------
# temporary siblings


def partial_path(path: Path, tag: str = "") -> Path:
    """A hidden temporary sibling of `path` named after this process: `.NAME.PID[.TAG].partial`."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}{'.' + tag if tag else ''}{PARTIAL}")


def remove_stale_partials(path: Path) -> list[Path]:
    """Delete the temporary siblings of `path` left by processes that are gone (killed while writing it)."""
    path = Path(path)
    prefix = f".{path.name}."
    removed = []
    for candidate in path.parent.glob(f"{glob_escape(prefix)}*{PARTIAL}"):
        pid = candidate.name[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            remove(candidate)
            removed.append(candidate)
    return removed


def remove_stale_partials_in(folder: Path, log: Log = print) -> list[Path]:
    """Delete every temporary that a process no longer running left in `folder`, and say so in one line. An earlier
    folder set aside for a replacement that was killed before the new one was renamed in is put back instead."""
    removed, restored = [], []
    for candidate in sorted(Path(folder).glob(f".*{PARTIAL}")):
        match = PARTIAL_NAME.match(candidate.name)
        if not match or int(match["pid"]) == os.getpid() or process_alive(int(match["pid"])):
            continue
        final = candidate.with_name(match["name"])
        if match["tag"] == "old" and candidate.is_dir() and not final.exists() and not final.is_symlink():
            os.replace(candidate, final)
            restored.append(final)
        else:
            remove(candidate)
            removed.append(candidate)
    if removed:
        log(f"removed {len(removed)} temporary file(s) that killed deepred processes left in {folder}: "
            + ", ".join(p.name for p in removed))
    for final in restored:
        log(f"restored {final}: a replacement of it was killed before the new one was in place")
    return removed


def glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove(path: Path) -> None:
    """Delete a file or a folder tree; nothing there is fine."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------
# atomic writes


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yields a temporary path beside `path`; it replaces `path` when the block succeeds, and is deleted otherwise."""
    path = Path(path)
    tmp = partial_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """Yields an empty temporary folder beside `path`; it replaces `path` (a folder) when the block succeeds."""
    path = Path(path)
    tmp = partial_path(path)
    remove(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        replace_folder(tmp, path)
    finally:
        remove(tmp)


def replace_folder(new: Path, path: Path) -> None:
    """Put folder `new` at `path`: the old one is renamed aside, the new one renamed in, then the old deleted."""
    aside = partial_path(path, "old")
    remove(aside)
    if path.exists() or path.is_symlink():
        os.replace(path, aside)
    try:
        os.replace(new, path)
    except BaseException:
        if aside.exists() and not path.exists():
            os.replace(aside, path)
        raise
    remove(aside)


def write_atomic(path: Path, data: bytes | str) -> None:
    with atomic_file(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)


def write_json(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=2, default=str))


def read_json(path: Path | None) -> dict:
    """A JSON object from a file, or {} when the file is absent or unreadable (records that may not exist yet)."""
    try:
        data = json.loads(Path(path).read_text()) if path and Path(path).is_file() else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# ---------------------------------------------------------------------------------------------------------------
# locks


_HELD: dict[str, int] = {}  # lock files this process holds -> nesting depth (a stage inside a run may lock again)


@contextlib.contextmanager
def folder_lock(folder: Path, flag: str = "--output_dir", log: Log = print) -> Iterator[Path]:
    """Hold `folder`'s lock while the block writes there (the folder is created and proved writable first, or one
    line names `flag`); on entry, temporaries of killed processes in it are removed."""
    folder = Path(folder)
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    ensure_writable_folder(folder, flag)
    try:
        with _locked(folder / LOCK, folder, log):
            remove_stale_partials_in(folder, log)
            yield folder
    finally:
        with contextlib.suppress(OSError):  # a refusal before anything was written leaves no empty folders behind
            for made in created:
                made.rmdir()


@contextlib.contextmanager
def output_lock(path: Path, flag: str = "--output_path", log: Log = print) -> Iterator[Path]:
    """Hold the lock of one output (a file or folder replaced atomically): `.NAME.lock` beside it, so writers of
    other outputs in the same folder are not held up. Its folder is checked and cleaned as by folder_lock."""
    path = Path(path)
    ensure_writable_folder(path.parent, flag)
    with _locked(path.with_name(f".{path.name}.lock"), path, log):
        remove_stale_partials_in(path.parent, log)
        yield path


@contextlib.contextmanager
def _locked(lock_file: Path, subject: Path, log: Log) -> Iterator[None]:
    key = os.path.abspath(lock_file)
    if key in _HELD or fcntl is None:
        _HELD[key] = _HELD.get(key, 0) + 1
        try:
            yield
        finally:
            _HELD[key] -= 1
            if not _HELD[key]:
                del _HELD[key]
        return
    fd = _acquire(lock_file, subject, log)
    _HELD[key] = 1
    try:
        yield
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            if _same_file(fd, lock_file):
                lock_file.unlink()  # while still holding it: a process waiting on this file sees it is gone
        os.close(fd)


def _acquire(lock_file: Path, subject: Path, log: Log) -> int:
    """flock(LOCK_EX | LOCK_NB) on the lock file, then our PID in it. The kernel releases an flock when its holder
    dies, so a lock whose file still names a process is stale exactly when it can be taken (no PID-reuse guess)."""
    while True:
        try:
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise DeepRedError(f"cannot create the lock file {lock_file} ({exc.strerror}); "
                               f"choose another folder") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _live_holder(fd)
            os.close(fd)
            host = f" on {holder['host']}" if holder.get("host", socket.gethostname()) != socket.gethostname() else ""
            raise FolderBusy(f"another deepred process (PID {holder.get('pid', '?')}{host}) is using {subject}; wait "
                             "for it to finish, or stop it, then run this again") from None
        if _same_file(fd, lock_file):
            break
        os.close(fd)  # its holder removed it between our open and our lock: lock the new one
    stale = _read_holder(fd)
    if stale.get("pid"):
        log(f"took over the lock of {subject} from deepred process {stale['pid']}, which ended without releasing "
            "it (killed?)")
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
    return fd


def _read_holder(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _live_holder(fd: int) -> dict:
    """The holder's record; a holder that has just taken the lock writes its PID a moment later, so wait for it."""
    deadline = time.monotonic() + 2
    holder = _read_holder(fd)
    while time.monotonic() < deadline and not (holder.get("pid") and process_alive(int(holder["pid"]))):
        time.sleep(0.05)
        holder = _read_holder(fd)
    return holder


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


# ---------------------------------------------------------------------------------------------------------------
# content hashes


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hash_path(path: Path, ignore: frozenset[str] = frozenset()) -> str:
    """sha256 of a file, or of a folder's relative names and file contents (hidden files and names in `ignore`
    left out)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and p.name not in ignore
        and not any(part.startswith(".") for part in p.relative_to(path).parts))
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else file.name).encode())
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# output checks


def refuse_output_over_inputs(output: str | Path, inputs: dict[str, str | Path | None], flag: str) -> None:
    """An output that is, contains or lies inside one of the command's inputs would destroy it: one clear line.
    Inputs that are not paths here (hub names) cannot clash."""
    out = Path(output).expanduser().resolve()
    for label, given in inputs.items():
        source = Path(given).expanduser() if given else None
        if source is None or not source.exists():
            continue
        source = source.resolve()
        relation = ("is" if out == source else "lies inside" if source in out.parents
                    else "contains" if out in source.parents else None)
        if relation:
            raise DeepRedError(f"{flag} {output} {relation} the {label} {given}; writing there would destroy it: "
                               f"choose another {flag}")


def ensure_writable_folder(folder: Path, flag: str) -> None:
    """Create `folder` if needed and prove a file can be written there (os.access says yes to root on read-only
    mounts), or stop with one line naming the flag to change."""
    folder = Path(folder)
    taken = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if taken is not None:
        raise DeepRedError(f"{flag} {folder}: {taken} is a file, not a folder; choose another {flag}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise DeepRedError(f"output folder {folder} is not writable ({exc.strerror}); choose another {flag}") from exc


def require_regular_file(path: Path, hint: str) -> None:
    """Anything but a regular file is refused in one line, `hint` saying what to pass instead: nothing there
    (DatasetNotFoundError), or a folder, a FIFO, a device (DeepRedError)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        what = "a symbolic link to nothing" if path.is_symlink() else "nothing is there"
        raise DatasetNotFoundError(f"{path} is not a regular file ({what}); {hint}") from None
    except OSError as exc:
        raise DeepRedError(f"cannot read {path}: {exc.strerror}") from exc
    if not stat.S_ISREG(mode):
        raise DeepRedError(f"{path} is not a regular file (it is {_kind(mode)}); {hint}")


def read_regular_file(path: Path, hint: str) -> bytes:
    """The bytes of a JSONL file the user named, without a leading UTF-8 BOM. Anything but a regular file is refused
    before it is opened (require_regular_file): reading a FIFO would wait for a writer forever."""
    require_regular_file(path, hint)
    try:
        # O_NONBLOCK: should the path have become a FIFO since the check, opening it still returns at once
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise DeepRedError(f"cannot read {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise DeepRedError(f"{path} is not a regular file (it changed while being opened); {hint}")
        return fh.read().removeprefix(BOM)


def _kind(mode: int) -> str:
    kinds = [(stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")]
    return next((name for test, name in kinds if test(mode)), "a special file")
