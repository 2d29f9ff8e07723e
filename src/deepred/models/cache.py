"""Where deepred keeps what it builds once per machine: `$DEEPRED_CACHE`, else `~/.cache/deepred`."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("DEEPRED_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "deepred")
    return Path(root)
