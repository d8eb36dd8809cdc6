#!/usr/bin/env bash
# SFT throughput with 1 and 2 data-parallel CPU processes (Gloo), and with
# one process in a group of its own (ALIGNFLOW_DIST_GROUP_OF_ONE=1: the
# data-parallel path's cost), through the engine: a small GPT-2-shaped model pretrained on the HH sample, then
# the same `sft` stage with `data_parallel: 1` and `2`, each REPEATS times in
# a fresh cache; prints the stage's tokens/s (its `tokens_per_s` metric,
# training steps only) and the scaling efficiency tokens/s(2) / (2 x
# tokens/s(1)). The stage's threads are shared among its ranks (2 threads:
# one process with 2, or two with 1 each).
#
#   benches/run-data-parallel-bench.sh [--repeats N] [--threads N] [--bin DIR]
#
# DIR holds `alignflow` and `alignflow-worker` (default target/debug).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REPEATS=3
THREADS=2
BIN="$ROOT/target/debug"
while (($#)); do
  case "$1" in
    --repeats) REPEATS="$2"; shift 2 ;;
    --threads) THREADS="$2"; shift 2 ;;
    --bin) BIN="$2"; shift 2 ;;
    *) echo "usage: $0 [--repeats N] [--threads N] [--bin DIR]" >&2; exit 2 ;;
  esac
done

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
cp "$ROOT/examples/hh-rlhf-sample.jsonl" "$WORK/hh.jsonl"
cat > "$WORK/pipeline.yaml" <<'EOF'
version: 1
name: dp-bench
seed: 1
params:
  dp: 1
stages:
  hh:
    op: dataset.import
    inputs: { source: hh.jsonl }
  tok:
    op: tokenizer.train
    inputs: { data: "${stages.hh.data}" }
    params: { vocab_size: 2048 }
  base:
    op: lm.pretrain
    inputs: { data: "${stages.hh.data}", tokenizer: "${stages.tok.tokenizer}" }
    params: { width: 256, layers: 4, heads: 4, positions: 256, seq_len: 128, batch_size: 8, max_steps: 1 }
  sft:
    op: sft
    inputs: { model: "${stages.base.model}", data: "${stages.hh.data}" }
    params: { response_field: chosen, max_len: 256, batch_size: 16, max_steps: 8, checkpoint_every: 0, dropout: false, data_parallel: "${params.dp}" }
EOF

cd "$WORK"
run() { # dp (1g: one rank in a group of its own) -> tokens/s
  local cache="$WORK/cache-$1-$2" dp="${1%g}" one=0
  [[ "$1" == *g ]] && one=1
  ALIGNFLOW_DIST_GROUP_OF_ONE="$one" ALIGNFLOW_CACHE_DIR="$cache" "$BIN/alignflow" run pipeline.yaml --quiet --threads "$THREADS" \
    --target sft --set "params.dp=$dp" > /dev/null
  python3 - "$cache" <<'PY'
import json, pathlib, sys
for f in pathlib.Path(sys.argv[1], "records").rglob("*.json"):
    r = json.loads(f.read_text())
    if r.get("stage") == "sft":
        print(r["metrics"]["tokens_per_s"])
        break
PY
}
declare -A best
for dp in 1 1g 2; do
  for i in $(seq "$REPEATS"); do
    t="$(run "$dp" "$i")"
    echo "data_parallel $dp, run $i: $t tokens/s"
    best[$dp]="$(python3 -c "print(max(float('${best[$dp]:-0}'), float('$t')))")"
  done
done
python3 - "${best[1]}" "${best[1g]}" "${best[2]}" <<'PY'
import sys
one, group_of_one, two = map(float, sys.argv[1:])
print("| processes | tokens/s (best) |\n|---|---|")
print(f"| 1 | {one:.0f} |\n| 1, in a group of its own (the data-parallel path) | {group_of_one:.0f} |\n| 2 | {two:.0f} |")
print(f"the data-parallel path's cost at one rank: {1 - group_of_one / one:+.1%}")
print(f"scaling efficiency: {two / (2 * one):.2f}")
PY
