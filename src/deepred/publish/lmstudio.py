"""`deepred deploy --target lmstudio` (the default): put a GGUF where LM Studio finds it, load it with `lms`, and say
how to talk to it.

LM Studio only sees a model two folder levels below its models folder (`<publisher>/<model>/<file>.gguf`; a file
placed directly in the models folder is silently ignored), so the file goes to `<models>/local/<name>/<file>.gguf`.

The copy is written to a hidden `.<file>.<random>.partial` file in the destination folder, checked (size and
sha256 against the source) and only then renamed into place, so an interrupted or failed copy never leaves a file
that LM Studio would take for a complete model.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..config import DeployConfig
from ..errors import DeepRedError
from ..files import Log, atomic_file, file_sha256
from ..gguf_file import require_complete_gguf
from .common import curl_command, executable_from_env, one_line, persona_chat

PUBLISHER = "local"  # the first of LM Studio's two folder levels
CHUNK_SIZE = 8 * 1024 * 1024
SYSTEM_LMS = "/opt/lm-studio/bin/lms"  # where the specification's LM Studio install keeps lms
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 1234
LMS_LOAD_TIMEOUT_S = 300.0  # loading a 14B q4_k_m from a slow disk takes a minute or two; a hung lms never ends

_NAME_RE = re.compile(r"[A-Za-z0-9._-]+")


class LmsLoadError(DeepRedError):
    """`lms load` failed. The model file is deployed and kept; only loading it did not work."""

    exit_code = 1


# ------------------------------------------------------------------------------------------------ locations


def models_dir(cfg_value: str | None = None) -> Path:
    """`--models_dir`, else `$LMSTUDIO_MODELS_DIR`, else `~/.lmstudio/models`."""
    value = cfg_value or os.environ.get("LMSTUDIO_MODELS_DIR") or str(Path.home() / ".lmstudio" / "models")
    return Path(value).expanduser()


def validate_name(name: str) -> str:
    """One safe folder name: letters, digits, '.', '_', '-'; not empty, no '/', no leading or trailing '.'.

    The leading/trailing '.' rule also rules out '.' and '..' (and hidden folders); it is the rule `lms import`
    applies to the folders it creates.
    """
    if (not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name.startswith(".") or name.endswith(".")
            or len(name) > 100):
        raise DeepRedError(
            f"invalid --name {name!r}: use one folder name made of letters, digits, '.', '_' or '-' "
            "(no '/', not starting or ending with '.', at most 100 characters), e.g. --name deepred")
    return name


def find_lms() -> str | None:
    """The `lms` CLI: `$LMS_CLI_PATH`, `/opt/lm-studio/bin/lms`, `~/.lmstudio/bin/lms`, then PATH; None if absent.

    A `$LMS_CLI_PATH` that is set but is not an executable file is an error, not something to skip silently.
    """
    explicit = executable_from_env("LMS_CLI_PATH")
    if explicit:
        return explicit
    for candidate in (Path(SYSTEM_LMS), Path.home() / ".lmstudio" / "bin" / "lms"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("lms")


def server_address() -> tuple[str, int]:
    """`$LMSTUDIO_HOST` and `$LMSTUDIO_PORT` (default 127.0.0.1 and 1234), checked."""
    host = os.environ.get("LMSTUDIO_HOST") or DEFAULT_HOST
    port_text = os.environ.get("LMSTUDIO_PORT") or str(DEFAULT_PORT)
    if "://" in host or "/" in host or host.count(":") == 1:
        raise DeepRedError(f"LMSTUDIO_HOST={host!r}: give a host name or IP address only (no scheme, port or path)")
    try:
        port = int(port_text)
    except ValueError:
        port = 0
    if not 0 < port < 65536:
        raise DeepRedError(f"LMSTUDIO_PORT={port_text!r} is not a port number (1-65535)")
    return host, port


def server_url() -> str:
    """`http://$LMSTUDIO_HOST:$LMSTUDIO_PORT/v1`, the OpenAI-compatible base URL, as in the specification."""
    host, port = server_address()
    if ":" in host and not host.startswith("["):  # IPv6 literal
        host = f"[{host}]"
    return f"http://{host}:{port}/v1"


# ------------------------------------------------------------------------------------------------ lms commands


def lms_model_path(name: str, filename: str) -> str:
    """The model path LM Studio lists for `<models>/local/<name>/<filename>` (always '/'-separated)."""
    return f"{PUBLISHER}/{name}/{filename}"


def lms_load_args(lms: str, name: str, filename: str) -> list[str]:
    """The `lms load` command line for a model deployed as local/<name>/<filename>.

    Which form: LM Studio's docs say `lms load <model_key>`; the lms source takes the argument as a *path* that is
    fuzzy-matched against every downloaded model's path, `<publisher>/<model>/<file>.gguf`. The specification's
    `lms load "deepred/deepred"` and the notes' `lms load <publisher/model>` (`local/deepred`) only work through
    that fuzzy match: with several matching models lms either opens an interactive picker (which hangs a script)
    or, with -y, loads the first match, which may be another model (e.g. local/deepred-old). Since we placed the
    file ourselves we know its exact path, so we ask for exactly that:

      --exact        load only the model whose path is exactly local/<name>/<file>.gguf; fail otherwise
      --identifier   the name API clients use ("model": "<name>"), instead of a key LM Studio derives
      -y             never prompt (documented for scripting)

    No --host/--port: the file was copied into *this* machine's models folder, so it must be this machine's LM
    Studio that loads it; lms finds the local instance (and its port) by itself, while its (hidden) --host option
    would connect to a remote instance as an unprivileged client that cannot see this file.
    """
    return [lms, "load", "--exact", lms_model_path(name, filename), "--identifier", name, "-y"]


# ------------------------------------------------------------------------------------------------ copying


def copy_chunk(src: BinaryIO, dst: BinaryIO, size: int) -> bytes:
    """Copy one chunk; returns it (empty at the end of the source)."""
    block = src.read(size)
    if block:
        dst.write(block)
    return block


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_copy(src: Path, dest: Path, expected_sha: str) -> None:
    """Copy src to dest through a hidden temporary file in dest's folder, verify size + sha256, then rename.

    On any failure (including KeyboardInterrupt) the temporary file is removed and dest is untouched.
    """
    expected_size = src.stat().st_size
    with atomic_file(dest) as tmp:
        copied = hashlib.sha256()
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            while block := copy_chunk(fin, fout, CHUNK_SIZE):
                copied.update(block)
            fout.flush()
            os.fsync(fout.fileno())
        size = tmp.stat().st_size
        if size != expected_size:
            raise DeepRedError(f"copy of {src} is {size} bytes, expected {expected_size}; nothing was deployed")
        if copied.hexdigest() != expected_sha:
            raise DeepRedError(f"{src} changed while it was being copied; nothing was deployed, run deploy again")
        if file_sha256(tmp) != expected_sha:
            raise DeepRedError(f"the copy of {src} does not match it (sha256 differs); nothing was deployed "
                               f"(check the disk holding {dest.parent})")
        try:
            shutil.copymode(src, tmp)
        except OSError:
            pass
    _fsync_dir(dest.parent)


# ------------------------------------------------------------------------------------------------ deploy


@dataclass
class _Existing:
    identical: list[Path]
    different: list[tuple[Path, str]]


def _existing_models(folder: Path, size: int, sha: str) -> _Existing:
    found = _Existing([], [])
    if not folder.is_dir():
        return found
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() != ".gguf" or not path.is_file():
            continue
        other = file_sha256(path) if path.stat().st_size == size else None
        if other == sha:
            found.identical.append(path)
        else:
            found.different.append((path, other or "size differs"))
    return found


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{size} B"


def _print_usage(log: Log, name: str, loaded: bool, chat: list[dict]) -> None:
    url = server_url()
    when = "" if loaded else " (once the model is loaded)"
    log(f"OpenAI-compatible API{when}: {url}")
    log("try it:")
    log(f"  {curl_command(url, name, chat)}")
    log(f"if nothing answers, start LM Studio's server: lms server start --port {server_address()[1]}")


def deploy_lmstudio(cfg: DeployConfig, log: Log = print) -> Path:
    """Copy cfg.gguf to <models>/local/<name>/, load it with `lms` when possible; returns the deployed file."""
    name = validate_name(cfg.name)
    src, _ = require_complete_gguf(cfg.gguf)  # parsed whole before anything is copied
    chat = persona_chat(cfg.persona)
    server_url()  # checks LMSTUDIO_HOST/PORT before anything is written
    root = models_dir(cfg.models_dir)
    folder = root / PUBLISHER / name
    filename = src.name if src.suffix.lower() == ".gguf" else src.name + ".gguf"
    dest = folder / filename

    for path in (root, root / PUBLISHER, folder):
        if path.exists() and not path.is_dir():
            raise DeepRedError(f"{path} exists and is not a folder; move it away or pick another --models_dir/--name")
    if not root.exists():
        log(f"note: {root} does not exist yet (LM Studio creates it on first start); creating it. If LM Studio "
            "uses another models folder (My Models tab), pass --models_dir or set LMSTUDIO_MODELS_DIR")

    try:
        size = src.stat().st_size
        log(f"checking {src} ({_human(size)})")
        sha = file_sha256(src)
        existing = _existing_models(folder, size, sha)
    except OSError as exc:
        raise _os_error(exc, folder) from exc

    if _same_file(src.parent, folder):
        raise DeepRedError(f"{src} is inside the folder it would be deployed to ({folder}): the output would be its "
                           "own input; deploy a GGUF from outside LM Studio's models folder")
    if existing.different and not cfg.force:
        other, other_sha = existing.different[0]
        detail = f"sha256 {other_sha[:12]}" if len(other_sha) == 64 else other_sha
        raise DeepRedError(
            f"{folder} already holds a different model ({other.name}, {detail}; new sha256 {sha[:12]}): "
            f"add --force to replace it, or deploy under another --name")

    lms = find_lms() if cfg.load else None
    lms_for_display = lms or "lms"

    if existing.identical and not existing.different:
        target = next((p for p in existing.identical if p.name == filename), existing.identical[0])
        log(f"already deployed: {target} is identical (sha256 {sha[:12]}); nothing copied")
        return _load(cfg, lms, lms_for_display, name, target, chat, log)  # a load that failed before is tried again

    try:
        folder.mkdir(parents=True, exist_ok=True)
        if existing.identical:
            target = next((p for p in existing.identical if p.name == filename), existing.identical[0])
        else:
            for stale in folder.iterdir():  # left by a copy that was killed
                if not (stale.name.startswith(f".{filename}.") and stale.name.endswith(".partial")):
                    continue
                stale.unlink()
                log(f"removed {stale.name}, left over from an interrupted copy")
            log(f"copying to {dest}")
            atomic_copy(src, dest, sha)
            target = dest
        for other, _ in existing.different:
            if other.exists() and not _same_file(other, target):
                try:
                    other.unlink()
                except OSError as exc:
                    raise DeepRedError(f"deployed {target} but could not remove the previous model {other} "
                                       f"({exc.strerror or exc}); remove it by hand") from exc
                log(f"removed the previous model {other} (--force)")
    except DeepRedError:
        raise
    except OSError as exc:
        raise _os_error(exc, folder) from exc
    log(f"deployed {target} ({_human(size)}, sha256 {sha[:12]}, verified)")
    return _load(cfg, lms, lms_for_display, name, target, chat, log)


def _load(cfg: DeployConfig, lms: str | None, lms_for_display: str, name: str, target: Path, chat: list[dict],
          log: Log) -> Path:
    """`lms load` the deployed file, or say how to."""
    args = lms_load_args(lms_for_display, name, target.name)
    if not cfg.load or not lms:
        reason = "--no-load given" if not cfg.load else (
            "lms (LM Studio's CLI) not found; it ships in ~/.lmstudio/bin, `~/.lmstudio/bin/lms bootstrap` "
            "puts it on PATH, or set LMS_CLI_PATH")
        log(f"not loaded ({reason}). To load it, run:")
        log(f"  {shlex.join(args)}")
        _print_usage(log, name, False, chat)
        return target

    log(f"loading: {shlex.join(args)}")
    try:
        result = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
                                timeout=LMS_LOAD_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise LmsLoadError(f"lms load did not finish within {LMS_LOAD_TIMEOUT_S:.0f} s (is LM Studio running and "
                           f"responding?); the model is deployed at {target}, load it with: {shlex.join(args)}") from exc
    except OSError as exc:
        raise LmsLoadError(f"cannot run {lms}: {exc.strerror or exc}; the model is deployed at {target}, "
                           f"load it with: {shlex.join(args)}") from exc
    if result.returncode != 0:
        message = one_line(result.stderr) or one_line(result.stdout) or "no output"
        raise LmsLoadError(f"lms load failed (exit {result.returncode}): {message} -- the model is deployed at "
                           f"{target}; once fixed (is LM Studio running? is '{name}' already loaded? "
                           f"`lms unload {name}`), run: {shlex.join(args)}")
    log(f"loaded in LM Studio as '{name}'")
    _print_usage(log, name, True, chat)
    return target


def _os_error(exc: OSError, folder: Path) -> DeepRedError:
    where = exc.filename or folder
    reason = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
    return DeepRedError(f"{where}: {reason}; the model under {folder} is unchanged "
                        "(fix permissions or free space, or pick another --models_dir)")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
