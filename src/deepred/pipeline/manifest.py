"""The run folder's bookkeeping: content hashes, fingerprints of a stage's inputs, manifest.json, and the decision
to skip or rerun a stage."""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

from ..config import RunConfig
from ..errors import DeepRedError
from ..files import hash_path, write_json
from ..models.registry import resolve_base_model
from ..records import CARD, MANIFEST


class StageFailed(DeepRedError):
    pass


class RunInterrupted(StageFailed):
    """Ctrl-C or SIGTERM stopped the run; what finished is kept and the same command resumes it."""

    exit_code = 130


def content_hash(path: Path) -> str:
    """A file's or folder's content hash; model cards are left out (they are rewritten as later stages finish)."""
    return hash_path(path, ignore=frozenset({CARD}))


@functools.lru_cache(maxsize=8)  # several stages ask; hashing a multi-GB folder once per run is enough
def model_identity(name: str) -> str:
    """A hub name identifies itself; a local folder is identified by its content."""
    path = Path(resolve_base_model(name)).expanduser()
    return f"sha256:{content_hash(path)}" if path.is_dir() else name


def fingerprint(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def corrupt_manifest(path: Path, why: str) -> DeepRedError:
    return DeepRedError(f"{path} is corrupt ({why}); delete it to rerun every stage")


@dataclass
class Manifest:
    path: Path
    stages: dict = field(default_factory=dict)

    @classmethod
    def load(cls, run_dir: Path) -> "Manifest":
        path = run_dir / MANIFEST
        if not path.is_file():
            return cls(path)
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:
            raise corrupt_manifest(path, str(exc)) from exc
        stages = data.get("stages", {}) if isinstance(data, dict) else None
        if not isinstance(stages, dict) or not all(isinstance(entry, dict) for entry in stages.values()):
            raise corrupt_manifest(path, 'expected {"stages": {STAGE: {...}}}')
        return cls(path, stages)

    def save(self) -> None:
        write_json(self.path, {"stages": self.stages})

    def record(self, stage: str, **values) -> None:
        self.stages.setdefault(stage, {}).update(values, updated=datetime.now().isoformat(timespec="seconds"))
        self.save()


# ---------------------------------------------------------------------------------------------------------------
# the run


@dataclass
class Run:
    cfg: RunConfig
    run_dir: Path
    manifest: Manifest
    log: Callable = print
    outputs: dict = field(default_factory=dict)  # stage -> {name: path}, filled as stages finish or are skipped
    current_fingerprint: str = ""  # of the stage being decided or run

    def path(self, stage: str, name: str) -> Path:
        return Path(self.outputs[stage][name])

    @property
    def base_model(self) -> str:
        return self.cfg.base_model

    def gguf_name(self, quant: str) -> str:
        return "deepred.gguf" if quant == self.cfg.quant_types[0] else f"deepred-{quant}.gguf"


def why_rerun(previous: dict, inputs: dict, forced: bool) -> str | None:
    """None when the stage can be skipped, else the reason it runs."""
    if forced:
        return "--from asked for it"
    if not previous:
        return "first run"
    if previous.get("status") != "done":
        return f"previous attempt {previous.get('status', 'did not finish')}"
    changed = sorted(k for k in set(inputs) | set(previous.get("inputs", {}))
                     if inputs.get(k) != previous.get("inputs", {}).get(k))
    if changed:
        return "inputs changed: " + ", ".join(changed)
    missing = [p for p in previous.get("outputs", {}).values() if not Path(p).exists()]
    if missing:
        return "outputs missing: " + ", ".join(missing)
    if outputs_hash(previous.get("outputs", {})) != previous.get("output_hash"):
        return "outputs were modified since they were made"
    return None


def outputs_hash(outputs: dict) -> str:
    """Content hash of a stage's products. `*_dir` entries are locations (checkpoints, logs), not products."""
    return fingerprint({name: content_hash(Path(p)) for name, p in sorted(outputs.items())
                        if not name.endswith("_dir")})
