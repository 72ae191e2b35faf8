#!/usr/bin/env bash
# Rebuild the engine versions measured in bench/RESULTS.md as source trees under DEST:
# DEST/<v>/llmcal is this checkout's llmcal package with that version's scoring.py, taken from git history.
#   bash bench/variants/build.sh /tmp/llmcal-variants
#   python bench/bench_eval.py --variant v0=/tmp/llmcal-variants/v0 --variant v2=/tmp/llmcal-variants/v2 ...
# v0: scoring.py of commit 19a3c61 (attention mask passed to the decoder, greedy length batches), with the
#     2048-token default it was measured with.
# v1: v0 without the attention mask (right padding; causal attention needs none).
# v2: scoring.py of commit a07debe (v1 plus padding-aware batches).
# v3: scoring.py of commit 7affa43 (v2 plus keep_freed_memory, the glibc malloc setting; sdpa attention).
# (the current engine is v3 plus attention.py's CPU causal attention.)
set -euo pipefail
dest=${1:?usage: build.sh DEST}
repo=$(cd "$(dirname "$0")/../.." && pwd)
src="$repo/src/llmcal"
show() { git -C "$repo" show "$1:src/llmcal/scoring.py"; }
for v in v0 v1 v2 v3; do
  rm -rf "${dest:?}/$v"
  mkdir -p "$dest/$v"
  cp -r "$src" "$dest/$v/llmcal"
  find "$dest/$v" -name __pycache__ -prune -exec rm -rf {} +
done
show 19a3c61 | sed 's/^DEFAULT_BATCH_TOKENS = 8192$/DEFAULT_BATCH_TOKENS = 2048/' > "$dest/v0/llmcal/scoring.py"
sed 's/attention_mask=attention_mask, use_cache=False)/attention_mask=None, use_cache=False)  # v1: right padding, no mask/' \
  "$dest/v0/llmcal/scoring.py" > "$dest/v1/llmcal/scoring.py"
show a07debe > "$dest/v2/llmcal/scoring.py"
show 7affa43 > "$dest/v3/llmcal/scoring.py"
grep -q "^DEFAULT_BATCH_TOKENS = 2048$" "$dest/v0/llmcal/scoring.py"
grep -q "attention_mask=None, use_cache=False)  # v1" "$dest/v1/llmcal/scoring.py"
grep -q "keep_freed_memory()" "$dest/v3/llmcal/scoring.py"
! grep -q "scoring_attention" "$dest/v3/llmcal/scoring.py"
echo "built v0 v1 v2 v3 in $dest"
