"""`deepred deploy`: hand a GGUF to the app that will run it, LM Studio (default) or Ollama."""

from __future__ import annotations

from pathlib import Path

from ..config import DeployConfig
from ..files import Log
from .lmstudio import deploy_lmstudio
from .ollama import deploy_ollama

TARGETS = {"lmstudio": deploy_lmstudio, "ollama": deploy_ollama}


def deploy(cfg: DeployConfig, log: Log = print) -> Path:
    """Deploy cfg.gguf to cfg.target; returns the deployed file (LM Studio) or the Modelfile (Ollama)."""
    return TARGETS[cfg.target](cfg, log)
