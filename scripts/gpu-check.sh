#!/usr/bin/env bash
# GPU checks, on a machine with CUDA and torch but no cargo: builds nothing.
# `make gpu-bundle` (here) puts the release binaries, the parity test binary
# and the transformers-made fixtures in gpu-bundle/; this script (there) runs
# its sections in this order, each under a time limit, timing each:
# - doctor: `alignflow-worker doctor` (libtorch, CUDA, devices) and a
#   one-rank NCCL group running every collective (`doctor --nccl`);
# - parity: the parity and sampling tests on CUDA (logits, greedy
#   generation and log-probs against transformers' reference outputs), and
#   the CUDA allocator's peak (`cuda_memory`) against a known tensor;
# - memory: the peak GPU memory (`max_memory_allocated`) of one PPO
#   iteration at Qwen2.5-1.5B's shape with LoRA (policy and critic adapters
#   on one bf16 base) and in full, and of SFT at that size;
# - sft: the SFT step in bf16 at GPT-2-124M and at Llama-3.2-1B's shape:
#   tokens/s and MFU, against transformers on the same GPU;
# - sampler: mixed-length sampling of 64 rows at once at GPT-2-124M in
#   bf16, and a fixed-length batch of 64, against transformers' generate;
# - ppo: the PPO-iteration benchmark against the transformers peer;
# - pipeline: the tiny pipeline end to end on CUDA, then its PPO stage
#   with the models placed across devices (policy and value model on the
#   GPU, reference and reward model on the CPU), whose figures must track
#   the all-GPU run's;
# - nccl: tiny.yaml's preference model trained through a NCCL group of one
#   (`ALIGNFLOW_DIST_GROUP_OF_ONE=1`, against pipeline's plain run), and its
#   placed PPO stage too; on a machine with two GPUs or more, pm on two
#   ranks, one per GPU, then again with rank 1 killed mid-step (the
#   failure's time); with four or more, the placed PPO stage on two ranks
#   of two GPUs each.
# Usage: scripts/gpu-check.sh [BUNDLE_DIR] [PEAK_TFLOPS] [SECTION...]
# (BUNDLE_DIR, default gpu-bundle, is unpacked from BUNDLE_DIR.tar.gz if
# only that is there.)
# PEAK_TFLOPS defaults to 989 (H100/H200 SXM dense bf16). No section named:
# all of them. Their limits add up to more than the 10 minutes the device
# tool gives one command, so name some per call, the paths that never ran
# first: `doctor parity pipeline nccl` (limits 545 s with the kill margins;
# nccl uses pipeline's cache, so those two go in one call), then, with the
# device time left, `memory sft` and `sampler ppo`. Every section goes on
# past a failing step and ends saying how many failed.
set -uo pipefail  # one section failing must not hide the others
bundle=${1:-gpu-bundle}
peak=${2:-989}
shift $(( $# < 2 ? $# : 2 ))
sections=("$@")
((${#sections[@]})) || sections=(doctor parity memory sft sampler ppo pipeline nccl)
# `make gpu-bundle` packs the folder too, small enough to carry.
if [ ! -d "$bundle" ] && [ -f "$bundle.tar.gz" ]; then
    tar -xzf "$bundle.tar.gz" -C "$(dirname "$bundle")"
fi
torch_lib=$(python3 -c "import torch, os; print(os.path.dirname(torch.__file__) + '/lib')")
export LD_LIBRARY_PATH="$torch_lib:${LD_LIBRARY_PATH:-}"
# pipeline's cache, kept for nccl (a later call on the same machine).
cache=${GPU_CHECK_CACHE:-/tmp/alignflow-gpu-check-cache}

wanted() { [[ " ${sections[*]} " == *" $1 "* ]]; }

# Runs a section's function under a time limit (seconds) and times it;
# the section goes on past a failing step, and its last line says how many
# failed.
section() { # NAME LIMIT
    wanted "$1" || return 0
    local start=$SECONDS
    failures=$(mktemp)
    export failures
    echo "#### section $1 (limit $2 s)"
    timeout -k 10 "$2" bash -c "$(declare -f); $1" \
        || echo "FAILED or cut off: section $1 (exit $?)"
    echo "#### section $1 took $(( SECONDS - start )) s, $(wc -l < "$failures") step(s) failed"
    rm -f "$failures"
}
export bundle peak cache

# Runs one step of a section: a failure is said, counted, and the section
# goes on.
step() { # COMMAND...
    "$@"
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "FAILED (exit $rc): $*"
        echo "$*" >> "$failures"
    fi
    return 0
}

# Counts a failure the step's own checks found.
failed() { # WHY
    echo "FAILED: $1"
    echo "$1" >> "$failures"
}

# The last line of STAGE's metrics.jsonl in MANIFEST's run cached in CACHE.
last_metrics() { # MANIFEST STAGE CACHE
    local metrics
    metrics=$("$bundle/bin/alignflow" show "$1" "$2" --cache-dir "$3" | awk '$1 == "metrics" {print $2}')
    tail -1 "$metrics"
}

# Forgets tiny.yaml's STAGE records in CACHE, so that STAGE alone runs again.
forget() { # CACHE STAGE
    python3 - "$1/records" "$2" <<'PY'
import json, os, sys
for root, _, files in os.walk(sys.argv[1]):
    for name in files:
        path = os.path.join(root, name)
        record = json.load(open(path))
        if record.get("pipeline") == "tiny" and record.get("stage") == sys.argv[2]:
            os.remove(path)
PY
}

# Writes tiny.yaml with rl_cai's models placed by role (PLACEMENT, a YAML
# flow map) to OUT.
write_placed() { # OUT PLACEMENT
    sed "s/    params: { lr: 1.0e-4, batch_size: 16, target_kl: 3.0 }/    params: { lr: 1.0e-4, batch_size: 16, target_kl: 3.0, placement: $2 }/" \
        pipelines/tiny.yaml > "$1"
    grep -q "placement:" "$1" || failed "the rl_cai params line of tiny.yaml changed; update this script"
}

doctor() {
    echo "== doctor, and a one-rank NCCL group on cuda:0 (nccl_check)"
    local out
    out=$("$bundle/bin/alignflow-worker" doctor --nccl)
    echo "$out"
    grep -q '"nccl_check":"ok' <<< "$out" || failed "doctor --nccl: the NCCL self-check did not pass"
}

parity() {
    echo "== parity and sampling on CUDA"
    ALIGNFLOW_TEST_DEVICE=cuda ALIGNFLOW_PARITY_FIXTURES="$bundle/fixtures" \
        step "$bundle/bin/model_parity" --test-threads 1 logits_equal greedy_generation sampled_logprobs eos_and_stop
    echo "== the CUDA allocator's peak against a 256 MiB tensor"
    step "$bundle/bin/worker-unit" --test-threads 1 cuda_memory
}

memory() {
    echo "== peak GPU memory at Qwen2.5-1.5B's shape: one PPO iteration (LoRA with a LoRA critic; full) and SFT"
    step "$bundle/bin/memory-bench" --device cuda --threads 8 --sizes 1.5b --only ppo,sft --modes lora,full
}

sft() {
    for preset in gpt2-124m llama-1b; do
        echo "== SFT step, $preset, bf16: alignflow, then transformers"
        step "$bundle/bin/model-bench" --device cuda --preset "$preset" --bf16 --only sft --repeats 5 --peak-tflops "$peak"
        step python3 benches/peer_hf.py --device cuda --preset "$preset" --bf16 --only sft --repeats 5
    done
}

sampler() {
    for section in mixed sample; do
        echo "== sampling ($section), GPT-2-124M in bf16, 64 rows at once: alignflow, then transformers' generate"
        step "$bundle/bin/model-bench" --device cuda --preset gpt2-124m --bf16 --batch 64 --only "$section" --repeats 3
        step python3 benches/peer_hf.py --device cuda --preset gpt2-124m --bf16 --batch 64 --only "$section" --repeats 3
    done
}

ppo() {
    echo "== one PPO iteration on docs/DESIGN.md's fixed workload, alignflow against a TRL-style transformers peer"
    step benches/run-ppo-bench.sh --device cuda --bin "$bundle/bin/ppo-bench" --python python3 --rounds 3 --repeats 10 --warmup 3
}

pipeline() {
    echo "== the tiny pipeline end to end on CUDA (every tensor stage on the GPU, bf16 autocast)"
    rm -rf "$cache" && mkdir -p "$cache"
    start=$(date +%s)
    step "$bundle/bin/alignflow" run pipelines/tiny.yaml --quiet --cache-dir "$cache"
    echo "tiny.yaml cold on CUDA: $(( $(date +%s) - start )) s"
    report=$("$bundle/bin/alignflow" show pipelines/tiny.yaml evaluation --cache-dir "$cache" | awk '$1 == "report_md" {print $2}')
    cat "$report"
    grep -h "^.* run  " "$cache"/logs/*.log | head -20
    echo "the GPU peaks the stages report (metrics cuda_max_memory_allocated_mib):"
    python3 - "$cache/records" <<'PY'
import json, os, sys
for root, _, files in os.walk(sys.argv[1]):
    for name in files:
        record = json.load(open(os.path.join(root, name)))
        peaks = record.get("metrics", {}).get("cuda_max_memory_allocated_mib")
        print(f"  {record.get('stage')}: {peaks if peaks else 'none reported'}")
PY

    echo "== models placed by role: tiny.yaml's rl_cai with the policy and value model on cuda:0, the reference and the reward model on the CPU"
    placed=pipelines/tiny-placed.yaml
    write_placed "$placed" "{ policy: cuda:0, value: cuda:0, reference: cpu, reward: cpu }"
    step "$bundle/bin/alignflow" run "$placed" --quiet --cache-dir "$cache" --target rl_cai
    for manifest in pipelines/tiny.yaml "$placed"; do
        echo "$manifest: last iteration: $(last_metrics "$manifest" rl_cai "$cache")"
    done
    rm -f "$placed"
}

nccl() {
    echo "== the data-parallel path on one GPU (NCCL, a group of one): tiny.yaml's pm, against its plain run above"
    one_cache=$(mktemp -d)
    cp -r "$cache/." "$one_cache/"
    # The same fingerprint: forget pm's record in the copy, so pm alone runs again.
    forget "$one_cache" pm
    ALIGNFLOW_DIST_GROUP_OF_ONE=1 step "$bundle/bin/alignflow" run pipelines/tiny.yaml --quiet --cache-dir "$one_cache" --target pm
    grep -h "starting data-parallel ranks" "$one_cache"/logs/*.log | tail -1
    for c in "$cache" "$one_cache"; do
        echo "$c: pm's last step: $(last_metrics pipelines/tiny.yaml pm "$c")"
    done

    echo "== models placed by role on the data-parallel path (NCCL, a group of one, bound to the policy's GPU): rl_cai with the reference and reward model on the CPU, against pipeline's placed run"
    placed=pipelines/tiny-placed.yaml
    write_placed "$placed" "{ policy: cuda:0, value: cuda:0, reference: cpu, reward: cpu }"
    forget "$one_cache" rl_cai
    ALIGNFLOW_DIST_GROUP_OF_ONE=1 step "$bundle/bin/alignflow" run "$placed" --quiet --cache-dir "$one_cache" --target rl_cai
    for c in "$cache" "$one_cache"; do
        echo "$c: rl_cai placed, last iteration: $(last_metrics "$placed" rl_cai "$c")"
    done
    rm -f "$placed"

    # Whole GPUs (`-L` would count MIG instances too).
    gpus=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | wc -l)
    if [ "$gpus" -ge 2 ]; then
        echo "== data_parallel: 2 on two GPUs (NCCL): tiny.yaml's pm, against its one-GPU run above"
        dp=pipelines/tiny-dp.yaml
        printf 'version: 1\nname: tiny\ninclude: [tiny.yaml]\nstages:\n  pm:\n    params: { data_parallel: 2 }\n' > "$dp"
        step "$bundle/bin/alignflow" run "$dp" --quiet --cache-dir "$cache" --target pm
        for manifest in pipelines/tiny.yaml "$dp"; do
            echo "$manifest: pm's last step: $(last_metrics "$manifest" pm "$cache")"
        done
        echo "== rank 1 of 2 killed in its second step on NCCL: rank 0's watch fails the stage within seconds, not at the 300 s timeout"
        lost_cache=$(mktemp -d)
        cp -r "$cache/." "$lost_cache/"
        forget "$lost_cache" pm
        start=$(date +%s)
        if ALIGNFLOW_DIST_TEST_KILL=1:2 "$bundle/bin/alignflow" run "$dp" --quiet --cache-dir "$lost_cache" --target pm; then
            failed "the run with a killed rank should have failed"
        fi
        echo "the lost rank failed the stage in $(( $(date +%s) - start )) s"
        rm -f "$dp"
    else
        echo "== data_parallel on two GPUs: not run, this machine has $gpus GPU(s)"
    fi
    if [ "$gpus" -ge 4 ]; then
        echo "== data_parallel: 2 with models placed by role (NCCL): rl_cai on 4 GPUs, each rank its policy and value model on one, its reference and reward model on another"
        placed_dp=pipelines/tiny-placed-dp.yaml
        write_placed "$placed_dp" "{ policy: cuda:0, value: cuda:0, reference: cuda:1, reward: cuda:1 }, data_parallel: 2"
        nvidia-smi --query-gpu=index,memory.used --format=csv -l 5 > /tmp/gpu-use.csv &
        smi=$!
        step "$bundle/bin/alignflow" run "$placed_dp" --quiet --cache-dir "$cache" --target rl_cai
        kill $smi
        echo "GPUs that held memory during the run (index, most MiB):"
        awk -F', ' 'NR > 1 {split($2, m, " "); if (m[1] > max[$1]) max[$1] = m[1]} END {for (i in max) print "  " i ": " max[i]}' /tmp/gpu-use.csv
        echo "$placed_dp: rl_cai's last iteration: $(last_metrics "$placed_dp" rl_cai "$cache")"
        rm -f "$placed_dp"
    else
        echo "== data_parallel with placement across GPUs: not run, this machine has $gpus GPU(s) (4 needed)"
    fi
}

section doctor 45
section parity 90
section memory 240
section sft 150
section sampler 150
section ppo 120
section pipeline 180
section nccl 190
