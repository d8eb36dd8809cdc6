#!/usr/bin/env bash
# What scripts/gpu-check.sh needs on a GPU machine without cargo (`make
# gpu-bundle`): the release binaries, the benches and test binaries it runs
# (stripped: with line tables they come to over 1 GB) and the
# transformers-made parity fixtures, in gpu-bundle/, and packed in
# gpu-bundle.tar.gz: the folder is 76 MiB, the device carries 64 MiB at
# most, the archive about 31 (gpu-check.sh unpacks it where the folder is
# missing).
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO=${CARGO:-cargo}
PY=.venv/bin/python

# The executable cargo built for TARGET (a test or bench target's name, or
# `alignflow_worker` for the worker library's unit tests), from its JSON
# messages on stdin.
executable() {
    "$PY" -c '
import json, sys
name = sys.argv[1]
exe = [m["executable"] for m in map(json.loads, sys.stdin)
       if m.get("reason") == "compiler-artifact" and m.get("executable")
       and m["target"]["name"] == name]
sys.exit("no executable for " + name) if not exe else print(exe[-1])
' "$1"
}

$CARGO build --release --workspace
benches=$($CARGO bench -p alignflow-worker --bench model --bench ppo --bench memory --no-run --message-format=json)
tests=$($CARGO test --release -p alignflow-worker --lib --test model_parity --no-run --message-format=json)

rm -rf gpu-bundle && mkdir -p gpu-bundle/bin
cp target/release/alignflow target/release/alignflow-worker gpu-bundle/bin/
cp "$(executable model_parity <<<"$tests")" gpu-bundle/bin/model_parity
cp "$(executable alignflow_worker <<<"$tests")" gpu-bundle/bin/worker-unit
cp "$(executable model <<<"$benches")" gpu-bundle/bin/model-bench
cp "$(executable ppo <<<"$benches")" gpu-bundle/bin/ppo-bench
cp "$(executable memory <<<"$benches")" gpu-bundle/bin/memory-bench
strip gpu-bundle/bin/*
"$PY" tests/parity/make_reference.py gpu-bundle/fixtures
tar -czf gpu-bundle.tar.gz gpu-bundle
du -sh gpu-bundle gpu-bundle/bin/* gpu-bundle.tar.gz
