#!/usr/bin/env bash
# PPO benchmark, alignflow's `ppo` op against a TRL-style PPO iteration in
# transformers on the same torch (docs/DESIGN.md section 6). Builds the worker's `ppo`
# bench (release) unless --bin names a built one, then runs alignflow and the
# peer alternately, each in its own process (clean peak RSS), --rounds times,
# and prints a markdown table: the median over rounds of each round's median
# seconds per iteration, the min-max over rounds, the ratio, peak RSS.
#
#   benches/run-ppo-bench.sh [--rounds N] [--repeats N] [--warmup N]
#       [--threads N] [--device cpu|cuda] [--bin PATH] [--python PATH]
#       [--recompute-old-logprobs] [--breakdown]
#
# --bin: a built bench binary (`target/release/deps/ppo-*`), for a machine
# without cargo; it needs libtorch on LD_LIBRARY_PATH (the script adds
# torch's lib folder of --python). --python: default .venv/bin/python, else
# python3. --recompute-old-logprobs: the peer recomputes the rollout
# log-probs with a policy forward, as the op does (default: from the
# generation scores, as TRL does). --breakdown: alignflow also times the
# phases of an iteration rebuilt from library parts (a second JSON line). Raw JSON lines go to $OUT_DIR (default: a
# temporary folder, printed at the end).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
[[ -x "$PY" ]] || PY="$(command -v python3)"
BIN=""
ROUNDS=3
REPEATS=5
WARMUP=2
THREADS="${ALIGNFLOW_BENCH_THREADS:-2}"
DEVICE=cpu
PEER_FLAGS=()
AF_FLAGS=()
while (($#)); do
  case "$1" in
    --rounds) ROUNDS="$2"; shift 2 ;;
    --repeats) REPEATS="$2"; shift 2 ;;
    --warmup) WARMUP="$2"; shift 2 ;;
    --threads) THREADS="$2"; shift 2 ;;
    --device) DEVICE="$2"; shift 2 ;;
    --bin) BIN="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --recompute-old-logprobs) PEER_FLAGS+=("$1"); shift ;;
    --breakdown) AF_FLAGS+=("$1"); shift ;;
    *) echo "usage: $0 [--rounds N] [--repeats N] [--warmup N] [--threads N] [--device cpu|cuda] [--bin PATH] [--python PATH] [--recompute-old-logprobs] [--breakdown]" >&2; exit 2 ;;
  esac
done

OUT_DIR="${OUT_DIR:-$(mktemp -d -t alignflow-ppo-bench.XXXXXX)}"
mkdir -p "$OUT_DIR"

if [[ -z "$BIN" ]]; then
  export LIBTORCH="${LIBTORCH:-$ROOT/.venv/libtorch}"
  echo "building the ppo bench (release)..." >&2
  BIN="$(cargo bench -p alignflow-worker --bench ppo --no-run --message-format=json 2>/dev/null \
    | "$PY" -c '
import json, sys
exe = [m["executable"] for m in map(json.loads, sys.stdin)
       if m.get("reason") == "compiler-artifact" and m.get("executable")
       and m["target"]["name"] == "ppo"]
print(exe[-1] if exe else "")
')"
  [[ -n "$BIN" ]] || { echo "build failed; rerun: cargo bench -p alignflow-worker --bench ppo --no-run" >&2; exit 1; }
fi
# The bench links libtorch dynamically: torch's own copy serves.
TORCH_LIB="$("$PY" -c 'import os, torch; print(os.path.dirname(torch.__file__) + "/lib")')"
export LD_LIBRARY_PATH="${LIBTORCH:+$LIBTORCH/lib:}$TORCH_LIB:${LD_LIBRARY_PATH:-}"

for ((r = 1; r <= ROUNDS; r++)); do
  echo "== round $r/$ROUNDS: alignflow (load $(cut -d' ' -f1-3 /proc/loadavg))" >&2
  RUST_LOG=warn "$BIN" --repeats "$REPEATS" --warmup "$WARMUP" --threads "$THREADS" --device "$DEVICE" \
    ${AF_FLAGS[@]+"${AF_FLAGS[@]}"} | tee -a "$OUT_DIR/alignflow.jsonl" >&2
  echo "== round $r/$ROUNDS: transformers (load $(cut -d' ' -f1-3 /proc/loadavg))" >&2
  "$PY" benches/peer_ppo.py --repeats "$REPEATS" --warmup "$WARMUP" --threads "$THREADS" \
    --device "$DEVICE" ${PEER_FLAGS[@]+"${PEER_FLAGS[@]}"} | tee -a "$OUT_DIR/transformers.jsonl" >&2
done

"$PY" - "$OUT_DIR" <<'EOF'
import json, statistics, sys, pathlib
out = pathlib.Path(sys.argv[1])
lines = {n: [json.loads(l) for l in (out / f"{n}.jsonl").read_text().splitlines() if l.strip()]
         for n in ("alignflow", "transformers")}
rows = {n: [r for r in v if r["bench"] == "ppo_iteration"] for n, v in lines.items()}
breakdown = [r for r in lines["alignflow"] if r["bench"] == "ppo_breakdown"]
def fig(rs):
    meds = [r["s_per_iteration"] for r in rs]
    return statistics.median(meds), min(meds), max(meds), max(r["peak_rss_mib"] for r in rs)
a, h = fig(rows["alignflow"]), fig(rows["transformers"])
ratio = h[0] / a[0]
dev = rows["alignflow"][0]["device"]
print(f"| system | s/iteration (median of {len(rows['alignflow'])} rounds) | round medians min-max "
      "| response tokens/s | peak RSS |")
print("|---|---|---|---|---|")
for name, f in (("alignflow", a), ("transformers", h)):
    print(f"| {name} | {f[0]:.3f} s | {f[1]:.3f}-{f[2]:.3f} s | {8 * 96 / f[0]:.1f} | {f[3]:.0f} MiB |")
gpu = [(n, r[-1].get("cuda_mem_mib")) for n, r in rows.items() if r[-1].get("cuda_mem_mib") is not None]
print(f"\nratio (transformers s / alignflow s): {ratio:.2f}x on {dev}; target >= 2x: "
      f"{'met' if ratio >= 2 else 'MISSED'}; peak RSS <=: {'met' if a[3] <= h[3] else 'MISSED'}")
if gpu:
    print("GPU memory (nvidia-smi, this process): " + ", ".join(f"{n} {m} MiB" for n, m in gpu))
def phases(rs):
    keys = rs[0]["phases_s"].keys()
    return ", ".join(f"{k} {statistics.median(r['phases_s'][k] for r in rs):.3f}" for k in keys)
print(f"transformers phases (median over rounds of the medians, s): {phases(rows['transformers'])}")
if breakdown:
    print(f"alignflow phases, rebuilt iteration (median over rounds, s): {phases(breakdown)}; "
          f"total {statistics.median(r['s_per_iteration'] for r in breakdown):.3f}")
print(f"\nraw JSON: {out}/alignflow.jsonl, {out}/transformers.jsonl", file=sys.stderr)
EOF
