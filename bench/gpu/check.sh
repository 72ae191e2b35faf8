#!/usr/bin/env bash
# The GPU check in one command (bench/gpu/README.md): llmcal's scoring and CFT/RCFT training on
# random models of real shapes, offline, under 8 minutes on one large GPU. Writes
# bench/results/gpu-<time>.json. Extra arguments go to check.py (e.g. --models qwen2.5-1.5b, --tiny).
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
       LLMCAL_PROGRESS=0 TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1
PY="${PYTHON:-$(command -v python || command -v python3)}"
# Wheels carried along (bench/gpu/wheels, see the README) go into a private folder, never into the
# machine's own environment: torch, transformers, peft and accelerate stay the machine's.
if compgen -G "bench/gpu/wheels/*.whl" > /dev/null; then
  "$PY" -m pip install --quiet --no-index --no-deps --target bench/gpu/.site bench/gpu/wheels/*.whl
  export PYTHONPATH="$PWD/bench/gpu/.site${PYTHONPATH:+:$PYTHONPATH}"
fi
# The script stops starting models after --budget-s (420 s); timeout is the backstop.
exec timeout 475 "$PY" bench/gpu/check.py "$@"
