#!/usr/bin/env bash
# The GPU measurement behind RESULTS.md: Qwen2.5-1.5B shape (random weights), reference vs fast (the default) vs lean,
# one process, same synthetic data. Run from the repository root on a CUDA machine with the venv set up
# (`make setup TORCH_SPEC=torch` after installing CUDA torch, then `pip install -e ".[gpu]"` for Liger).
set -euo pipefail
.venv/bin/deepred bench --shape 1.5b --profiles reference,fast,lean --examples 1584 --mean_tokens 268 \
    --steps 20 --output "benchmarks/gpu-1.5b-$(date +%Y%m%d).json"
