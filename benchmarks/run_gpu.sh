#!/usr/bin/env bash
# The GPU measurement behind RESULTS.md, in one run on one machine (about 4 minutes on an H100): Qwen2.5-1.5B shape
# (random weights), reference vs fast (the default) vs lean, same synthetic examples in the same order, 3 interleaved
# repeats, the profiler's top operations for each profile, then the CUDA-only tests.
# Run from the repository root on a CUDA machine with the venv set up (`make setup TORCH_SPEC=torch` after installing
# CUDA torch, then `pip install -e ".[gpu]"` for Liger and bitsandbytes).
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-benchmarks/gpu-1.5b-$(date +%Y%m%d).json}
"$PY" -m deepred.cli bench --shape 1.5b --profiles reference,fast,lean --examples 1584 --mean_tokens 268 \
    --steps 10 --repeats 3 --trace --output "$OUT"
"$PY" -m pytest -q tests/train/test_gpu.py
