#!/usr/bin/env bash
# Rebuild the engine versions measured in bench/RESULTS.md as source trees under DEST:
# DEST/<v>/llmcal is this checkout's llmcal package with bench/variants/<v>/scoring.py swapped in.
#   bash bench/variants/build.sh /tmp/llmcal-variants
#   python bench/bench_eval.py --variant v0=/tmp/llmcal-variants/v0 --variant v1=/tmp/llmcal-variants/v1 ...
# v0: the engine before issue 4 (git HEAD 19a3c61 scoring.py, with the 2048-token default):
#     attention mask passed to the decoder, greedy length batches.
# v1: v0 without the attention mask (right padding; causal attention needs none).
# v2: v1 with padding-aware batches (dynamic programming over the cut points).
# (the current engine is v2 plus keep_freed_memory, the glibc malloc setting.)
set -euo pipefail
dest=${1:?usage: build.sh DEST}
here=$(cd "$(dirname "$0")" && pwd)
src=$(cd "$here/../../src/llmcal" && pwd)
for v in v0 v1 v2; do
  rm -rf "$dest/$v"
  mkdir -p "$dest/$v"
  cp -r "$src" "$dest/$v/llmcal"
  find "$dest/$v" -name __pycache__ -prune -exec rm -rf {} +
  cp "$here/$v/scoring.py" "$dest/$v/llmcal/scoring.py"
done
echo "built $(ls "$dest" | tr '\n' ' ')in $dest"
