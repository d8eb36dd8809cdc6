#!/usr/bin/env python3
"""Peer benchmark: the same fixed workload as alignflow's model benches, run in
Hugging Face transformers (PyTorch eager).

Workload (fixed): GPT-2 architecture, vocab 4096, 256 positions, width 256,
4 layers, 4 heads, float32, random init with seed 0, dropout 0,
bos = eos = pad = token 0, inputs random tokens in [1, 4096) (seed 0, no padding).

  sft_step    batch 8 x seq 128: forward + causal-LM loss + backward
              + torch.optim.AdamW(lr=1e-4).step() + zero_grad()   -> tokens/s
  rm_step     GPT2ForSequenceClassification(num_labels=1, pad_token_id=0),
              8 pairs = 16 sequences of 128 (chosen and rejected in ONE forward
              of 16), loss -logsigmoid(r_chosen - r_rejected).mean(), backward,
              AdamW step, zero_grad                                -> pairs/s
  sample      batch 8, prompt 32 random tokens, generate(do_sample=True,
              temperature=1.0, top_k=0, max_new_tokens=96, min_new_tokens=96,
              use_cache=True, pad_token_id=0)                      -> new tokens/s
  mixed       mixed response lengths: 16 prompts of 32 random tokens, 4
              samples each (num_return_sequences=4), in calls of 2 prompts
              (8 rows), do_sample=True, temperature=1.0, top_k=0,
              max_new_tokens=224, no EOS; row j stops after
              mixed_length(j) tokens (8 to 224) through a per-row
              StoppingCriteria; finished rows decode padding until the
              call's longest row ends (static batching)    -> new tokens/s

For the GPU check, as the model bench takes them: --preset gpt2-124m or
llama-1b swaps the model of every section (GPT-2-124M; Llama-3.2-1B's
shape: vocab 128256, width 2048, 16 layers, 32 heads, 8 key/value heads,
MLP 8192, tied embeddings; random init), SFT then on batch 8 x 1024;
--batch N sets the sampling batch and the rows per call of `mixed` (64: one
call); --bf16 trains under bf16 autocast and samples with the model in bf16.

Each: 2 warm-up iterations, then --repeats timed; median and all samples.
One JSON object per section on stdout. peak_rss_mib is ru_maxrss of the whole
process, so it is cumulative over the sections run so far; use --only to run
each section in its own process for a clean figure.

    .venv/bin/python benches/peer_hf.py --only sft
    .venv/bin/python benches/peer_hf.py --only rm
    .venv/bin/python benches/peer_hf.py --only sample
    .venv/bin/python benches/peer_hf.py               # all three, one process
"""
import argparse
import json
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import transformers
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, GPT2Config,
                          LlamaConfig)

VOCAB, POSITIONS, WIDTH, LAYERS, HEADS = 4096, 256, 256, 4, 4
SFT_BATCH, SFT_SEQ = 8, 128
RM_PAIRS, RM_SEQ = 8, 128
SAMPLE_BATCH, PROMPT, NEW_TOKENS = 8, 32, 96
MIXED_PROMPTS, MIXED_SAMPLES, MIXED_MAX_NEW = 16, 4, 224
LR = 1e-4
WARMUP = 2
# RSS high-water mark once torch + transformers are imported (before any model)
IMPORT_RSS_MIB = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def config(args, **extra):
    """The preset's config (docs/DESIGN.md's GPT-2 by default)."""
    common = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0, attn_implementation=args.attn, **extra)
    if args.preset == "llama-1b":
        return LlamaConfig(vocab_size=128256, max_position_embeddings=2048, hidden_size=2048,
                           num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                           intermediate_size=8192, tie_word_embeddings=True, **common)
    if args.preset == "gpt2-124m":
        shape = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
    else:
        shape = dict(vocab_size=VOCAB, n_positions=POSITIONS, n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS)
    return GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **shape, **common)


def lm(args, device):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config(args)).to(device)


def sampling_lm(args, device):
    """The LM in eval mode, in bf16 with --bf16 (as alignflow's `generate` on a GPU)."""
    model = lm(args, device).eval()
    return model.to(torch.bfloat16) if args.bf16 else model


def sft_shape(args):
    return (SFT_BATCH, SFT_SEQ) if args.preset == "design" else (8, 1024)


def tokens(shape, device):
    g = torch.Generator().manual_seed(0)
    return torch.randint(1, VOCAB, shape, generator=g).to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats, device):
    for _ in range(WARMUP):
        fn()
    sync(device)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples), samples


def peak(device):
    out = {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
           "peak_rss_note": "ru_maxrss of the whole process, cumulative over sections run in it",
           "rss_after_import_mib": IMPORT_RSS_MIB}
    if device.type == "cuda":
        out["cuda_peak_allocated_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def bench_sft(args, device):
    model = lm(args, device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    batch, seq = sft_shape(args)
    ids = tokens((batch, seq), device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()

    med, samples = timed(step, args.repeats, device)
    return {"bench": "sft_step", "tokens_per_s": batch * seq / med, "s_per_step": med,
            "batch": batch, "seq": seq, "preset": args.preset}, samples


def bench_rm(args, device):
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config(args, num_labels=1)).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    ids = tokens((2 * RM_PAIRS, RM_SEQ), device)  # rows [0, 8) chosen, [8, 16) rejected

    def step():
        r = model(input_ids=ids).logits[:, 0]
        loss = -F.logsigmoid(r[:RM_PAIRS] - r[RM_PAIRS:]).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()

    med, samples = timed(step, args.repeats, device)
    return {"bench": "rm_step", "pairs_per_s": RM_PAIRS / med, "s_per_step": med,
            "pairs": RM_PAIRS, "seq": RM_SEQ}, samples


def bench_sample(args, device):
    model = sampling_lm(args, device)
    prompt = tokens((args.batch, PROMPT), device)
    mask = torch.ones_like(prompt)

    def gen():
        out = model.generate(prompt, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                             max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, use_cache=True,
                             pad_token_id=0)
        assert out.shape == (args.batch, PROMPT + NEW_TOKENS), out.shape

    med, samples = timed(gen, args.repeats, device)
    return {"bench": "sample", "new_tokens_per_s": args.batch * NEW_TOKENS / med, "s_per_call": med,
            "batch": args.batch, "prompt": PROMPT, "new_tokens": NEW_TOKENS, "preset": args.preset}, samples


def mixed_length(j):
    """Row j's length, as worker/benches/workload/mod.rs computes it."""
    return 8 + (j * 97 + 31) % 217


class StopAtLengths(transformers.StoppingCriteria):
    """Ends each row after its own number of new tokens."""

    def __init__(self, prompt_len, lengths):
        self.prompt_len, self.lengths = prompt_len, lengths

    def __call__(self, input_ids, scores, **kwargs):
        return (input_ids.shape[1] - self.prompt_len) >= self.lengths


def bench_mixed(args, device):
    model = sampling_lm(args, device)
    model.generation_config.eos_token_id = None  # rows end at their lengths only
    prompts = tokens((MIXED_PROMPTS, PROMPT), device)
    per_call = max(1, args.batch // MIXED_SAMPLES)
    call_rows = per_call * MIXED_SAMPLES
    rows = MIXED_PROMPTS * MIXED_SAMPLES
    lengths = [mixed_length(j) for j in range(rows)]

    def gen():
        for c in range(0, MIXED_PROMPTS, per_call):
            prompt = prompts[c:c + per_call]
            want = torch.tensor(lengths[c * MIXED_SAMPLES:(c + per_call) * MIXED_SAMPLES], device=device)
            stop = transformers.StoppingCriteriaList([StopAtLengths(PROMPT, want)])
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                                 temperature=1.0, top_k=0, max_new_tokens=MIXED_MAX_NEW,
                                 num_return_sequences=MIXED_SAMPLES, stopping_criteria=stop,
                                 use_cache=True, pad_token_id=0)
            assert out.shape[1] == PROMPT + int(want.max()), out.shape

    med, samples = timed(gen, args.repeats, device)
    used = sum(lengths)
    static = sum(len(lengths[i:i + call_rows]) * max(lengths[i:i + call_rows]) for i in range(0, rows, call_rows))
    return {"bench": "mixed", "new_tokens_per_s": used / med, "s_per_call": med, "rows": rows,
            "max_rows": call_rows, "preset": args.preset, "prompt": PROMPT, "samples_per_prompt": MIXED_SAMPLES,
            "max_new_tokens": MIXED_MAX_NEW, "new_tokens": used, "prefills": rows,
            "row_steps": static, "idle_row_fraction": 1 - used / static}, samples


SECTIONS = {"sft": bench_sft, "rm": bench_rm, "sample": bench_sample, "mixed": bench_mixed}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", choices=sorted(SECTIONS), help="run one section (clean peak RSS)")
    ap.add_argument("--preset", default="design", choices=["design", "gpt2-124m", "llama-1b"],
                    help="the model of every section (default: docs/DESIGN.md's GPT-2)")
    ap.add_argument("--batch", type=int, default=SAMPLE_BATCH,
                    help="sampling's batch, and the rows per call of `mixed` (default 8)")
    ap.add_argument("--bf16", action="store_true",
                    help="train under bf16 autocast, sample with the model in bf16")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"],
                    help="transformers attention implementation (default sdpa, HF's default)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    device = torch.device(args.device)

    for name in [args.only] if args.only else list(SECTIONS):
        res, samples = SECTIONS[name](args, device)
        res = {"bench": res.pop("bench"), "impl": "transformers", **res, "samples": samples, "repeats": args.repeats,
               "warmup": WARMUP, **peak(device), "threads": args.threads, "device": str(device),
               "attn": args.attn,
               "dtype": ("float32, bf16 autocast" if name == "sft" else
                         "bfloat16" if name in ("sample", "mixed") else "float32") if args.bf16 else "float32",
               "torch": torch.__version__, "transformers": transformers.__version__}
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    sys.exit(main())
