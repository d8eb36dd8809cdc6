#!/usr/bin/env python3
"""Peer benchmark for alignflow's `ppo` op: one PPO iteration on docs/DESIGN.md
section 6's fixed workload, in plain PyTorch + Hugging Face transformers,
written after TRL's PPOTrainer (trl/trainer/ppo_trainer.py, the "PPO v2"
loop) step by step. TRL itself is not installed here (it needs accelerate
and datasets); this is its iteration without the Trainer machinery.

Workload: GPT-2 architecture, vocab 4096, 256 positions, width 256, 4 layers,
4 heads, float32, random init seed 0, dropout 0, no EOS token; 8 prompts of
32 random tokens in [1, 4096) (seed 0, no padding), 96 response tokens.

Models (as TRL): policy and frozen reference `GPT2LMHeadModel`, value model
and frozen reward model `GPT2ForSequenceClassification(num_labels=1)`; the
value model is read through its backbone + `score` at every position
(TRL's `get_reward`), the reward model at the last token.

One iteration (`ppo_iteration`):
  rollout   policy.generate(do_sample, temperature 1, top_k 0, top_p 1,
            96 new tokens, min_new_tokens 96, KV cache, output_scores):
            TRL takes the rollout log-probs from the generation scores;
            `--recompute-old-logprobs` instead runs a policy forward, as
            alignflow's op does
  scoring   no-grad forwards: reference log-probs, values, reward score
  rewards   per-token KL (k1) penalty, kl_coef 0.05, score added at the last
            token; GAE (gamma 1, lam 0.95) as TRL's reversed loop; returns;
            advantages whitened
  update    one epoch, one minibatch of 8: policy + value forward (TRL's
            PolicyAndValueWrapper), clipped policy loss (0.2) + 0.1 x
            clipped value loss (0.2), one backward, grad-norm clip 1.0,
            AdamW (lr 1e-5) step over both models, zero_grad; entropy and
            approx-KL statistics as TRL logs them

--warmup iterations, then --repeats timed; the figure is the median.
peak_rss_mib is ru_maxrss of the process.

    .venv/bin/python benches/peer_ppo.py [--repeats N] [--warmup N] [--threads N]
        [--device cpu|cuda] [--recompute-old-logprobs]
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
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

VOCAB, POSITIONS, WIDTH, LAYERS, HEADS = 4096, 256, 256, 4, 4
BATCH, PROMPT, RESPONSE = 8, 32, 96
LR, KL_COEF, CLIP, VF_COEF, GAMMA, LAM, GRAD_CLIP = 1e-5, 0.05, 0.2, 0.1, 1.0, 0.95, 1.0
TEMPERATURE = 1.0
IMPORT_RSS_MIB = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def cuda_mem_mib():
    # nvidia-smi's used_memory of this process (allocator reserve + CUDA
    # context), the figure the alignflow bench reports; None if unreadable.
    import os, subprocess
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True).stdout
    except OSError:
        return None
    for line in out.splitlines():
        pid, _, mib = line.partition(",")
        if pid.strip() == str(os.getpid()):
            return float(mib)
    return None


def config(attn, **extra):
    # No EOS token: every response runs the full 96 tokens.
    return GPT2Config(
        vocab_size=VOCAB, n_positions=POSITIONS, n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=None, eos_token_id=None, pad_token_id=0,
        attn_implementation=attn, **extra,
    )


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def selective_log_softmax(logits, index):
    # TRL's helper: log-softmax gathered at the chosen tokens.
    return torch.gather(logits.log_softmax(-1), -1, index.unsqueeze(-1)).squeeze(-1)


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum()


def masked_whiten(x, mask, shift_mean=True):
    mean = masked_mean(x, mask)
    centered = x - mean
    var = masked_mean(centered**2, mask)
    var = var * mask.sum() / (mask.sum() - 1)  # unbiased, as TRL
    whitened = centered * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def backbone_hidden(seq_cls_model, ids, mask):
    # TRL's get_reward: the backbone with positions from the mask, the last
    # hidden state through `score`.
    pos = mask.cumsum(1) - mask.long()
    out = seq_cls_model.transformer(input_ids=ids, attention_mask=mask, position_ids=pos,
                                    return_dict=True, output_hidden_states=True, use_cache=False)
    return seq_cls_model.score(out.hidden_states[-1])


class Ppo:
    def __init__(self, args, device):
        self.args, self.device = args, device
        torch.manual_seed(0)
        self.policy = GPT2LMHeadModel(config(args.attn)).to(device)
        torch.manual_seed(0)
        self.ref = GPT2LMHeadModel(config(args.attn)).to(device).eval().requires_grad_(False)
        torch.manual_seed(0)
        self.value = GPT2ForSequenceClassification(config(args.attn, num_labels=1)).to(device)
        torch.manual_seed(0)
        self.reward = GPT2ForSequenceClassification(config(args.attn, num_labels=1)).to(device)
        self.reward.eval().requires_grad_(False)
        # TRL trains policy and value model as one module with one optimizer.
        self.params = list(self.policy.parameters()) + list(self.value.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=LR)
        g = torch.Generator().manual_seed(0)
        self.queries = torch.randint(1, VOCAB, (BATCH, PROMPT), generator=g).to(device)
        self.gen = transformers.GenerationConfig(
            max_new_tokens=RESPONSE, min_new_tokens=RESPONSE, temperature=TEMPERATURE + 1e-7,
            top_k=0, top_p=1.0, do_sample=True, use_cache=True, pad_token_id=0, eos_token_id=None)

    def iteration(self):
        d, a = self.device, self.args
        ph = {}
        t = time.perf_counter()
        self.policy.eval()
        with torch.no_grad():
            q = self.queries
            ctx = q.shape[1]
            out = self.policy.generate(input_ids=q, attention_mask=torch.ones_like(q),
                                       generation_config=self.gen, return_dict_in_generate=True,
                                       output_scores=True)
            qr = out.sequences
            assert qr.shape == (BATCH, PROMPT + RESPONSE), qr.shape
            resp = qr[:, ctx:]
            mask = torch.ones_like(qr)
            pos = mask.cumsum(1) - mask
            if not a.recompute_old_logprobs:
                logits = torch.stack(out.scores, 1)
                logits /= TEMPERATURE + 1e-7
                logprobs = selective_log_softmax(logits, resp)
                del logits
            sync(d)
            ph["sampling"], t = time.perf_counter() - t, time.perf_counter()
            if a.recompute_old_logprobs:
                logits = self.policy(input_ids=qr, attention_mask=mask, position_ids=pos,
                                     output_hidden_states=True).logits[:, ctx - 1:-1]
                logits /= TEMPERATURE + 1e-7
                logprobs = selective_log_softmax(logits, resp)
                del logits
            ref_logits = self.ref(input_ids=qr, attention_mask=mask, position_ids=pos,
                                  output_hidden_states=True).logits[:, ctx - 1:-1]
            ref_logits /= TEMPERATURE + 1e-7
            ref_logprobs = selective_log_softmax(ref_logits, resp)
            del ref_logits
            values = backbone_hidden(self.value, qr, mask)[:, ctx - 1:-1].squeeze(-1)
            # Reward at the last token (no padding: index -1).
            scores = backbone_hidden(self.reward, qr, mask)[:, -1, 0]
            sync(d)
            ph["scoring_forwards"], t = time.perf_counter() - t, time.perf_counter()

            # No EOS and no padding: every response token is valid.
            kl = logprobs - ref_logprobs
            non_score_reward = -KL_COEF * kl
            rewards = non_score_reward.clone()
            rewards[:, -1] += scores
            lastgaelam = 0
            adv_rev = []
            for i in reversed(range(RESPONSE)):
                nextvalues = values[:, i + 1] if i < RESPONSE - 1 else 0.0
                delta = rewards[:, i] + GAMMA * nextvalues - values[:, i]
                lastgaelam = delta + GAMMA * LAM * lastgaelam
                adv_rev.append(lastgaelam)
            advantages = torch.stack(adv_rev[::-1], axis=1)
            returns = advantages + values
            rmask = torch.ones_like(advantages)
            advantages = masked_whiten(advantages, rmask)
            sync(d)
            ph["advantages"], t = time.perf_counter() - t, time.perf_counter()

        # One epoch, one minibatch (the whole batch), shuffled as TRL does.
        self.policy.train()
        self.value.train()
        perm = torch.randperm(BATCH, device=d)
        mb = lambda x: x[perm]
        mb_qr, mb_resp = mb(qr), mb(resp)
        mb_mask, mb_pos = torch.ones_like(mb_qr), pos
        output = self.policy(input_ids=mb_qr, attention_mask=mb_mask, position_ids=mb_pos,
                             output_hidden_states=True)
        vpred = backbone_hidden(self.value, mb_qr, mb_mask)[:, ctx - 1:-1].squeeze(-1)
        logits = output.logits[:, ctx - 1:-1]
        logits /= TEMPERATURE + 1e-7
        new_logprobs = selective_log_softmax(logits, mb_resp)
        mb_values, mb_return, mb_adv, mb_logprobs = mb(values), mb(returns), mb(advantages), mb(logprobs)
        vpredclipped = torch.clamp(vpred, mb_values - CLIP, mb_values + CLIP)
        vf_losses1 = torch.square(vpred - mb_return)
        vf_losses2 = torch.square(vpredclipped - mb_return)
        vf_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), rmask)
        logprobs_diff = new_logprobs - mb_logprobs
        ratio = torch.exp(logprobs_diff)
        pg_losses = -mb_adv * ratio
        pg_losses2 = -mb_adv * torch.clamp(ratio, 1.0 - CLIP, 1.0 + CLIP)
        pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), rmask)
        loss = pg_loss + VF_COEF * vf_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, GRAD_CLIP)
        self.opt.step()
        self.opt.zero_grad()
        with torch.no_grad():
            prob_dist = F.softmax(logits, dim=-1)
            entropy = torch.logsumexp(logits, dim=-1) - torch.sum(prob_dist * logits, dim=-1)
            stats = {"entropy": entropy.mean().item(), "approx_kl": (0.5 * (logprobs_diff**2).mean()).item(),
                     "pg_loss": pg_loss.item(), "vf_loss": vf_loss.item(), "score": scores.mean().item(),
                     "kl": kl.sum(1).mean().item()}
        sync(d)
        ph["update"] = time.perf_counter() - t
        assert all(v == v for v in stats.values()), stats
        return ph


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--recompute-old-logprobs", action="store_true",
                    help="rollout log-probs from a policy forward (as alignflow), not the generation scores (as TRL)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    device = torch.device(args.device)
    ppo = Ppo(args, device)
    for _ in range(args.warmup):
        ppo.iteration()
    samples, phases = [], {}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        ph = ppo.iteration()
        samples.append(time.perf_counter() - t0)
        for k, v in ph.items():
            phases.setdefault(k, []).append(v)
    med = statistics.median(samples)
    mean = statistics.mean(samples)
    res = {"bench": "ppo_iteration", "impl": "transformers", "s_per_iteration": med,
           "iterations_per_s": 1 / med, "response_tokens_per_s": BATCH * RESPONSE / med,
           "samples": samples, "min_s": min(samples), "max_s": max(samples),
           "cv": (statistics.stdev(samples) / mean) if len(samples) > 1 else 0.0,
           "phases_s": {k: statistics.median(v) for k, v in phases.items()},
           "old_logprobs": "policy forward" if args.recompute_old_logprobs else "generation scores (TRL)",
           "warmup": args.warmup, "repeats": args.repeats,
           "batch": BATCH, "prompt": PROMPT, "response": RESPONSE,
           "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
           "peak_rss_note": "ru_maxrss of the whole process", "rss_after_import_mib": IMPORT_RSS_MIB,
           "threads": args.threads, "device": str(device), "attn": args.attn, "dtype": "float32",
           "torch": torch.__version__, "transformers": transformers.__version__}
    if device.type == "cuda":
        res["cuda_peak_allocated_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        res["cuda_peak_reserved_mib"] = round(torch.cuda.max_memory_reserved(device) / 2**20, 1)
        res["cuda_mem_mib"] = cuda_mem_mib()
        res["cuda_mem_note"] = "nvidia-smi used_memory of this process: allocator reserve + CUDA context"
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    sys.exit(main())
