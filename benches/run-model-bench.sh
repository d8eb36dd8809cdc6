#!/usr/bin/env bash
# Model-layer benchmark, alignflow against Hugging Face transformers on the
# same torch (docs/DESIGN.md section 6). Builds the worker's `model` bench (release),
# then for each section runs alignflow and then the peer, each in its own
# process (clean peak RSS), and prints a markdown table.
#
#   benches/run-model-bench.sh [--repeats N] [--threads N] [sft] [rm] [sample] [mixed]
#
# No section named: all four. Environment: LIBTORCH (default
# .venv/libtorch) and CARGO_TARGET_DIR are passed to cargo as set; the peer
# runs on .venv/bin/python (run `make setup` first). Raw JSON lines are kept
# in $OUT_DIR (default: a temporary folder, printed at the end).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
[[ -x "$PY" ]] || { echo "no $PY: run \`make setup\` first" >&2; exit 1; }
export LIBTORCH="${LIBTORCH:-$ROOT/.venv/libtorch}"

REPEATS=5
THREADS="${ALIGNFLOW_BENCH_THREADS:-2}"
SECTIONS=()
while (($#)); do
  case "$1" in
    --repeats) REPEATS="$2"; shift 2 ;;
    --threads) THREADS="$2"; shift 2 ;;
    sft|rm|sample|mixed) SECTIONS+=("$1"); shift ;;
    *) echo "usage: $0 [--repeats N] [--threads N] [sft] [rm] [sample] [mixed]" >&2; exit 2 ;;
  esac
done
((${#SECTIONS[@]})) || SECTIONS=(sft rm sample mixed)

OUT_DIR="${OUT_DIR:-$(mktemp -d -t alignflow-model-bench.XXXXXX)}"
mkdir -p "$OUT_DIR"

echo "building the model bench (release)..." >&2
BIN="$(cargo bench -p alignflow-worker --bench model --no-run --message-format=json 2>/dev/null \
  | "$PY" -c '
import json, sys
exe = [m["executable"] for m in map(json.loads, sys.stdin)
       if m.get("reason") == "compiler-artifact" and m.get("executable")
       and m["target"]["name"] == "model"]
print(exe[-1] if exe else "")
')"
[[ -n "$BIN" ]] || { echo "build failed; rerun: cargo bench -p alignflow-worker --bench model --no-run" >&2; exit 1; }

for s in "${SECTIONS[@]}"; do
  echo "== $s: alignflow" >&2
  "$BIN" --only "$s" --repeats "$REPEATS" --threads "$THREADS" | tee -a "$OUT_DIR/alignflow.jsonl" >&2
  echo "== $s: transformers" >&2
  "$PY" benches/peer_hf.py --only "$s" --repeats "$REPEATS" --threads "$THREADS" \
    | tee -a "$OUT_DIR/transformers.jsonl" >&2
done

"$PY" - "$OUT_DIR" <<'EOF'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
def load(name):
    rows = {}
    for line in (out / name).read_text().splitlines():
        r = json.loads(line)
        rows["sampling" if r["bench"] == "sample" else r["bench"]] = r
    return rows
af, hf = load("alignflow.jsonl"), load("transformers.jsonl")
spec = {  # section: (label, throughput key, unit, time key, target ratio)
    "sft_step": ("SFT step", "tokens_per_s", "tokens/s", "s_per_step", 1.0),
    "rm_step": ("RM step", "pairs_per_s", "pairs/s", "s_per_step", 1.0),
    "sampling": ("Sampling", "new_tokens_per_s", "new tokens/s", "s_per_call", 2.0),
    "mixed": ("Sampling, mixed lengths", "new_tokens_per_s", "new tokens/s", "s_per_call", 3.0),
}
print("| section | alignflow median | transformers median | ratio (alignflow / transformers) | "
      "peak RSS alignflow | peak RSS transformers | target (speed; RSS) |")
print("|---|---|---|---|---|---|---|")
for key, (label, tp, unit, tk, target) in spec.items():
    if key not in af or key not in hf:
        continue
    a, h = af[key], hf[key]
    ratio = a[tp] / h[tp]
    speed = "met" if ratio >= target else "MISSED"
    rss = "met" if a["peak_rss_mib"] <= h["peak_rss_mib"] else "MISSED"
    print(f"| {label} | {a[tp]:.1f} {unit} ({a[tk]:.3f} s) | {h[tp]:.1f} {unit} ({h[tk]:.3f} s) "
          f"| {ratio:.2f}x | {a['peak_rss_mib']:.0f} MiB | {h['peak_rss_mib']:.0f} MiB "
          f"| >= {target:g}x: {speed}; <=: {rss} |")
if "mixed" in af and "mixed" in hf:
    a, h = af["mixed"], hf["mixed"]
    print(f"\nMixed lengths: idle-row fraction {h['idle_row_fraction']:.3f} (transformers, static batch) "
          f"-> {a['idle_row_fraction']:.3f} (alignflow; a static batch would idle "
          f"{a['static_idle_row_fraction']:.3f}); prompt prefills {h['prefills']} -> {a['prefills']}")
print(f"\nraw JSON: {out}/alignflow.jsonl, {out}/transformers.jsonl", file=sys.stderr)
EOF
