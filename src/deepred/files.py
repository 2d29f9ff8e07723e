"""Files on disk: writes that never leave a half-written file under the final name, content hashes, output checks.

Every write of a product goes through `atomic_file` or `atomic_folder`: the content is made under a hidden temporary
sibling (`.NAME.PID.partial`, same filesystem) and renamed into place only when complete. A folder that already
exists is renamed aside first, then the new one in, then the old one deleted, so a kill at any moment leaves either
the old or the new folder at the final name, never a mixture. Temporaries left by a killed process carry its PID,
so a later write to the same name removes them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from .errors import DeepRedError

Log = Callable[[str], object]
PARTIAL = ".partial"


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
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise DeepRedError(f"output folder {folder} is not writable ({exc.strerror}); choose another {flag}") from exc
