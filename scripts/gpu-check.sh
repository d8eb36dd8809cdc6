#!/usr/bin/env bash
# GPU checks, on a machine with CUDA and torch but no cargo: builds nothing.
# `make gpu-bundle` (here) puts the release binaries, the parity test binary
# and the transformers-made fixtures in gpu-bundle/; this script (there) runs
# - `alignflow-worker doctor` (libtorch, CUDA, devices),
# - the parity and sampling tests on CUDA (logits, greedy generation and
#   log-probs against transformers' reference outputs),
# - the SFT-step benchmark at GPT-2-124M size in bf16: tokens/s and MFU,
# - the PPO-iteration benchmark against the transformers peer,
# - the tiny pipeline end to end on CUDA,
# - its PPO stage again with the models placed across devices (policy and
#   value model on the GPU, reference and reward model on the CPU), whose
#   figures must track the all-GPU run's,
# - data parallelism's NCCL path: a one-rank group running every
#   collective (`doctor --nccl`), tiny.yaml's preference model trained
#   through it on one GPU (`ALIGNFLOW_DIST_GROUP_OF_ONE=1`), and, on a
#   machine with two GPUs or more, on two ranks, one per GPU, then again
#   with rank 1 killed mid-step (the failure's time).
# Usage: scripts/gpu-check.sh [BUNDLE_DIR] [PEAK_TFLOPS]
# PEAK_TFLOPS defaults to 989 (H100/H200 SXM dense bf16).
set -uo pipefail  # one section failing must not hide the others
bundle=${1:-gpu-bundle}
peak=${2:-989}
torch_lib=$(python3 -c "import torch, os; print(os.path.dirname(torch.__file__) + '/lib')")
export LD_LIBRARY_PATH="$torch_lib:${LD_LIBRARY_PATH:-}"

# The last line of STAGE's metrics.jsonl in MANIFEST's run cached in CACHE.
last_metrics() { # MANIFEST STAGE CACHE
    local metrics
    metrics=$("$bundle/bin/alignflow" show "$1" "$2" --cache-dir "$3" | awk '$1 == "metrics" {print $2}')
    tail -1 "$metrics"
}

# Forgets tiny.yaml's pm records in CACHE, so that pm alone runs again.
forget_pm() { # CACHE
    python3 - "$1/records" <<'PY'
import json, os, sys
for root, _, files in os.walk(sys.argv[1]):
    for name in files:
        path = os.path.join(root, name)
        record = json.load(open(path))
        if record.get("pipeline") == "tiny" and record.get("stage") == "pm":
            os.remove(path)
PY
}

echo "== doctor, and a one-rank NCCL group on cuda:0 (nccl_check)"
"$bundle/bin/alignflow-worker" doctor --nccl

echo "== parity and sampling on CUDA"
ALIGNFLOW_TEST_DEVICE=cuda ALIGNFLOW_PARITY_FIXTURES="$bundle/fixtures" \
    "$bundle/bin/model_parity" --test-threads 1 logits_equal greedy_generation sampled_logprobs eos_and_stop

echo "== SFT step, GPT-2-124M, bf16"
"$bundle/bin/model-bench" --device cuda --preset gpt2-124m --bf16 --only sft --peak-tflops "$peak"

echo "== one PPO iteration on docs/DESIGN.md's fixed workload, alignflow against a TRL-style transformers peer"
benches/run-ppo-bench.sh --device cuda --bin "$bundle/bin/ppo-bench" --python python3 --rounds 3 --repeats 10 --warmup 3

echo "== the tiny pipeline end to end on CUDA (every tensor stage on the GPU, bf16 autocast)"
cache=$(mktemp -d)
start=$(date +%s)
"$bundle/bin/alignflow" run pipelines/tiny.yaml --quiet --cache-dir "$cache"
echo "tiny.yaml cold on CUDA: $(( $(date +%s) - start )) s"
report=$("$bundle/bin/alignflow" show pipelines/tiny.yaml evaluation --cache-dir "$cache" | awk '$1 == "report_md" {print $2}')
cat "$report"
grep -h "^.* run  " "$cache"/logs/*.log | head -20

echo "== models placed by role: tiny.yaml's rl_cai with the policy and value model on cuda:0, the reference and the reward model on the CPU"
placed=pipelines/tiny-placed.yaml
sed 's/    params: { lr: 1.0e-4, batch_size: 16, target_kl: 3.0 }/    params: { lr: 1.0e-4, batch_size: 16, target_kl: 3.0, placement: { policy: cuda:0, value: cuda:0, reference: cpu, reward: cpu } }/' \
    pipelines/tiny.yaml > "$placed"
grep -q "placement:" "$placed" || echo "FAILED: the rl_cai params line of tiny.yaml changed; update this script"
"$bundle/bin/alignflow" run "$placed" --quiet --cache-dir "$cache" --target rl_cai
for manifest in pipelines/tiny.yaml "$placed"; do
    echo "$manifest: last iteration: $(last_metrics "$manifest" rl_cai "$cache")"
done
rm -f "$placed"

echo "== the data-parallel path on one GPU (NCCL, a group of one): tiny.yaml's pm, against its plain run above"
one_cache=$(mktemp -d)
cp -r "$cache/." "$one_cache/"
# The same fingerprint: forget pm's record in the copy, so pm alone runs again.
forget_pm "$one_cache"
ALIGNFLOW_DIST_GROUP_OF_ONE=1 "$bundle/bin/alignflow" run pipelines/tiny.yaml --quiet --cache-dir "$one_cache" --target pm \
    && grep -h "starting data-parallel ranks" "$one_cache"/logs/*.log | tail -1
for c in "$cache" "$one_cache"; do
    echo "$c: pm's last step: $(last_metrics pipelines/tiny.yaml pm "$c")"
done

gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
if [ "$gpus" -ge 2 ]; then
    echo "== data_parallel: 2 on two GPUs (NCCL): tiny.yaml's pm, against its one-GPU run above"
    dp=pipelines/tiny-dp.yaml
    printf 'version: 1\nname: tiny\ninclude: [tiny.yaml]\nstages:\n  pm:\n    params: { data_parallel: 2 }\n' > "$dp"
    "$bundle/bin/alignflow" run "$dp" --quiet --cache-dir "$cache" --target pm
    for manifest in pipelines/tiny.yaml "$dp"; do
        echo "$manifest: pm's last step: $(last_metrics "$manifest" pm "$cache")"
    done
    echo "== rank 1 of 2 killed in its second step on NCCL: rank 0's watch fails the stage within seconds, not at the 300 s timeout"
    lost_cache=$(mktemp -d)
    cp -r "$cache/." "$lost_cache/"
    forget_pm "$lost_cache"
    start=$(date +%s)
    if ALIGNFLOW_DIST_TEST_KILL=1:2 "$bundle/bin/alignflow" run "$dp" --quiet --cache-dir "$lost_cache" --target pm; then
        echo "FAILED: the run should have failed"
    fi
    echo "the lost rank failed the stage in $(( $(date +%s) - start )) s"
    rm -f "$dp"
else
    echo "== data_parallel on two GPUs: not run, this machine has $gpus GPU(s)"
fi
