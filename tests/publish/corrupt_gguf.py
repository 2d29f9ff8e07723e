"""GGUFs that start like one but are not complete, as every deploy target must refuse them before it copies or
writes anything: a real file cut short, and "GGUF" followed by random bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def cut(good: Path, dest: Path, size: int) -> Path:
    """The first `size` bytes of `good`, at `dest` (as a copy interrupted, or a download cut, leaves one)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(good, "rb") as fin:
        dest.write_bytes(fin.read(size))
    return dest


def magic_then_random(dest: Path, version: bytes = b"", size: int = 100_000, seed: int = 0) -> Path:
    """b"GGUF", then `version` (b"" or a supported one, so the parser gets past the header), then random bytes."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(b"GGUF" + version + np.random.default_rng(seed).bytes(size))
    return dest


def last_tensor_end(path: Path) -> int:
    """Where the last tensor's data ends, in bytes from the start of the file."""
    from gguf import GGUFReader

    return max(tensor.data_offset + tensor.n_bytes for tensor in GGUFReader(str(path)).tensors)


def incomplete_variants(real: Path, small: Path, dest: Path) -> dict:
    """What to write at `dest` for each kind of incomplete GGUF, by name: a real converted file cut to half its size,
    a small complete one cut one byte before its last tensor's data ends, and the magic bytes followed by random
    bytes with and without a valid version."""
    return {
        "half of a real GGUF": lambda: cut(real, dest, real.stat().st_size // 2),
        "one byte short of the last tensor's end": lambda: cut(small, dest, last_tensor_end(small) - 1),
        "GGUF + random bytes": lambda: magic_then_random(dest),
        "GGUF, version 3 + random bytes": lambda: magic_then_random(dest, version=(3).to_bytes(4, "little")),
    }
