#!/usr/bin/env python3
"""Independent reference losses for alignflow's training ops (first step).

Written from the documented conventions with Hugging Face transformers and a
few lines of plain PyTorch; no alignflow code. Used by
worker/tests/loss_parity.rs. Every command prints one JSON line:
{"loss": ..., "alternatives": {name: loss under another convention}, ...}
The alternatives let the Rust test check that the comparison can tell the
conventions apart (each must differ from "loss" by far more than the tolerance).

    make-models OUT --tokenizer DIR NAME:ARCH:SEED:DROPOUT ...   (ARCH gpt2|llama)
    sft      --model DIR --data JSONL [--template T] [--max-len N]
    sft-chat --model DIR --data JSONL --chat-template FILE
    pretrain --model DIR --data JSONL --seq-len N
    pm       --model LM_DIR --head PM_DIR --data JSONL[=WEIGHT] ...
    dpo      --policy DIR --reference DIR --data JSONL --beta B --loss sigmoid|ipo
             [--label-smoothing EPS]
    ppo      --input JSON    (a fixed rollout; prints policy_loss, value_loss, kl)

Model forwards: float32, eval mode (dropout off), one sequence per forward
(no padding at all), log-softmax in float64.
"""
import argparse
import json
import math
import os
import shutil
import sys

import torch
import transformers
from safetensors.torch import load_file
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification,
                          GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast)

torch.set_num_threads(1)
EOS_TOKEN = "<|endoftext|>"


# ---------------------------------------------------------------- fixtures
def make_models(a):
    """Tiny random-init checkpoints (save_pretrained) plus the tokenizer files,
    one per NAME:ARCH:SEED:DROPOUT under OUT; init std 0.2 (initializer_range)."""
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(a.tokenizer, "tokenizer.json"))
    vocab = len(tok)
    eos = tok.convert_tokens_to_ids(EOS_TOKEN)
    for spec in a.models:
        name, arch, seed, dropout = spec.split(":")
        seed, dropout = int(seed), float(dropout)
        out = os.path.join(a.out, name)
        torch.manual_seed(seed)
        if arch == "gpt2":
            cfg = GPT2Config(
                vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
                resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                initializer_range=0.2, attn_implementation="eager",
            )
            model = GPT2LMHeadModel(cfg)
        else:
            cfg = LlamaConfig(
                vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                rms_norm_eps=1e-6, tie_word_embeddings=True, attention_dropout=dropout,
                bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
                initializer_range=0.2, attn_implementation="eager",
            )
            model = LlamaForCausalLM(cfg)
        model.save_pretrained(out)
        for f in os.listdir(a.tokenizer):
            shutil.copy(os.path.join(a.tokenizer, f), os.path.join(out, f))
        print(json.dumps({"out": out, "vocab": vocab, "eos": eos, "arch": arch}))


# ---------------------------------------------------------------- helpers
def tokenizer_of(d):
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(d, "tokenizer.json"))
    eos = tok.convert_tokens_to_ids(EOS_TOKEN)
    assert eos is not None and eos != tok.unk_token_id, "no <|endoftext|> in the tokenizer"

    def enc(text):
        return tok.encode(text, add_special_tokens=False)

    return enc, eos


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_lm(d):
    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    return m


def token_logps(model, ids):
    """log p(ids[t] | ids[:t]) for t = 1..len-1, float64, one unpadded forward."""
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids=x).logits[0].double()
    lp = torch.log_softmax(logits[:-1], -1)
    return lp.gather(-1, x[0, 1:].unsqueeze(-1)).squeeze(-1)  # [len-1]


def check_len(ids, model):
    n_pos = getattr(model.config, "n_positions", None) or model.config.max_position_embeddings
    assert len(ids) <= n_pos, f"{len(ids)} tokens > {n_pos} positions: would be truncated"


def emit(loss, alternatives, **extra):
    print(json.dumps({"loss": loss, "alternatives": alternatives, **extra}))


def logsig(x):
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


# ---------------------------------------------------------------- sft
def sft(a):
    """Token-mean NLL over response tokens + EOS of all examples in the batch;
    prompt = template with {prompt} replaced, tokenized apart from the response."""
    enc, eos = tokenizer_of(a.model)
    model = load_lm(a.model)
    nll, n = 0.0, 0
    per_seq, nll_no_eos, n_no_eos, nll_prompt, n_prompt = [], 0.0, 0, 0.0, 0
    truncated, lens = 0, set()
    nll_keep_eos, n_keep_eos = 0.0, 0
    for r in read_jsonl(a.data):
        p = enc(a.template.replace("{prompt}", r["prompt"]))
        resp = enc(r["response"]) + [eos]
        full_p, full_r = p, resp
        if a.max_len and len(p) + len(resp) > a.max_len:
            # over max_len: the response (EOS included) keeps its start and
            # at least half the budget, the prompt keeps its end.
            L = a.max_len
            resp = resp[:max(1, min(len(resp), L - min(len(p), L // 2)))]
            p = p[len(p) - min(len(p), L - len(resp)):]
            truncated += 1
        ids = p + resp
        # the alternative: EOS kept at the end of a cut response (as pm does)
        alt_r = resp if resp[-1] == eos else resp[:-1] + [eos]
        alt_lp = token_logps(model, p + alt_r)[len(p) - 1:]
        nll_keep_eos -= alt_lp.sum().item()
        n_keep_eos += len(alt_r)
        check_len(ids, model)
        lp = token_logps(model, ids)  # lp[t-1] scores ids[t]
        resp_lp = lp[len(p) - 1:]
        nll -= resp_lp.sum().item()
        n += len(resp)
        per_seq.append(-resp_lp.mean().item())
        k = len(resp) - 1 if resp[-1] == eos else len(resp)
        nll_no_eos -= resp_lp[:k].sum().item()
        n_no_eos += k
        lens.add(len(resp))
        nll_prompt -= lp.sum().item()
        n_prompt += len(ids) - 1
    alts = {"prompt_counted": nll_prompt / n_prompt}
    if n_no_eos != n:  # some row has its EOS
        alts["eos_not_counted"] = nll_no_eos / n_no_eos
    if len(lens) > 1:  # equal lengths: the two means are one
        alts["mean_over_sequences"] = sum(per_seq) / len(per_seq)
    if truncated:
        alts["eos_kept_when_cut"] = nll_keep_eos / n_keep_eos
    emit(nll / n, alts, tokens=n, truncated=truncated, lengths=sorted(lens))


def sft_chat(a):
    """`messages` conversations through a chat template with {% generation %}
    markers: token-mean NLL over exactly the tokens transformers'
    return_assistant_tokens_mask marks (TRL's assistant_only_loss)."""
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(a.model, "tokenizer.json"))
    with open(a.chat_template) as f:
        template = f.read()
    model = load_lm(a.model)
    nll, n, nll_last, n_last, nll_all, n_all = 0.0, 0, 0.0, 0, 0.0, 0
    for r in read_jsonl(a.data):
        out = tok.apply_chat_template(r["messages"], chat_template=template, tokenize=True,
                                      return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
        check_len(ids, model)
        lp = token_logps(model, ids)  # lp[t-1] scores ids[t]
        marked = [t for t in range(1, len(ids)) if mask[t]]
        nll -= sum(lp[t - 1].item() for t in marked)
        n += len(marked)
        # the alternative: only the last assistant turn (one contiguous run)
        last = []
        for t in reversed(marked):
            if last and t != last[-1] - 1:
                break
            last.append(t)
        nll_last -= sum(lp[t - 1].item() for t in last)
        n_last += len(last)
        nll_all -= lp.sum().item()
        n_all += len(ids) - 1
    emit(nll / n, {"last_turn_only": nll_last / n_last, "every_token": nll_all / n_all},
         tokens=n)


# ---------------------------------------------------------------- lm.pretrain
def pretrain(a):
    """Texts (field `text`) each followed by EOS, concatenated, cut into
    blocks of seq_len (the tail dropped); loss = mean NLL over every block
    position but the first."""
    enc, eos = tokenizer_of(a.model)
    model = load_lm(a.model)
    texts = [r["text"] for r in read_jsonl(a.data) if isinstance(r.get("text"), str)]

    def blocks_of(with_eos):
        stream = []
        for t in texts:
            stream += enc(t) + ([eos] if with_eos else [])
        k = len(stream) // a.seq_len
        return [stream[i * a.seq_len:(i + 1) * a.seq_len] for i in range(k)]

    def mean_nll(blocks):
        lps = torch.cat([token_logps(model, b) for b in blocks])
        return -lps.mean().item(), len(lps)

    loss, n = mean_nll(blocks_of(True))
    alt, _ = mean_nll(blocks_of(False))
    emit(loss, {"no_eos_between_texts": alt}, tokens=n, blocks=len(blocks_of(True)))


# ---------------------------------------------------------------- pm
def comparisons(r):
    """(A, B, p) of a record: HH {chosen, rejected, label}, AI {response_a,
    response_b, p_a}, ranking {responses: best first} -> every i < j, p = 1."""
    if "chosen" in r:
        return [(r["chosen"], r["rejected"], float(r.get("label", 1.0)))]
    if "response_a" in r:
        return [(r["response_a"], r["response_b"], float(r["p_a"]))]
    rs = r["responses"]
    return [(rs[i], rs[j], 1.0) for i in range(len(rs)) for j in range(i + 1, len(rs))]


def pm(a):
    """Reward = score head on the hidden state of the LAST token, the appended
    EOS; soft Bradley-Terry -(p logsig(rA-rB) + (1-p) logsig(rB-rA)); batch
    loss = sum(w * l) / sum(w), w = the mix weight of the pair's input."""
    enc, eos = tokenizer_of(a.model)
    lm = load_lm(a.model)
    backbone = lm.base_model  # GPT2Model / LlamaModel, weights of the LM folder
    head = load_file(os.path.join(a.head, "model.safetensors"))["score.weight"].double()
    assert head.shape[0] == 1, head.shape
    # HF's own sequence-classification class on the saved PM, for the record.
    hf = AutoModelForSequenceClassification.from_pretrained(a.head, num_labels=1,
                                                            dtype=torch.float32).eval()

    def hidden(ids):
        check_len(ids, lm)
        with torch.no_grad():
            return backbone(input_ids=torch.tensor([ids])).last_hidden_state[0].double()

    def rewards(ids):
        h = hidden(ids)
        with torch.no_grad():
            r_hf = hf(input_ids=torch.tensor([ids])).logits[0, 0].item()
        return {"eos": (h[-1] @ head[0]).item(), "before_eos": (h[-2] @ head[0]).item(),
                "no_eos": (hidden(ids[:-1])[-1] @ head[0]).item(), "hf": r_hf}

    rows = []  # (weight, p, rewards A, rewards B)
    for spec in a.data:
        path, _, w = spec.partition("=")
        w = float(w) if w else 1.0
        for r in read_jsonl(path):
            pr = enc(r["prompt"])
            for ra, rb, p in comparisons(r):
                rows.append((w, p, rewards(pr + enc(ra) + [eos]), rewards(pr + enc(rb) + [eos])))

    def bt(where="eos", weighted=True, hard=False):
        num = den = 0.0
        for w, p, ra, rb in rows:
            d = ra[where] - rb[where]
            p = float(p > 0.5) if hard else p
            l = -(p * logsig(d) + (1 - p) * logsig(-d))
            w = w if weighted else 1.0
            num += w * l
            den += w
        return num / den

    alts = {"reward_before_eos": bt("before_eos"), "eos_not_appended": bt("no_eos"),
            "hf_sequence_classification": bt("hf")}
    if len({w for w, _, _, _ in rows}) > 1:
        alts["unweighted"] = bt(weighted=False)
    if any(p not in (0.0, 1.0) for _, p, _, _ in rows):
        alts["hard_labels"] = bt(hard=True)
    emit(bt(), alts, pairs=len(rows),
         rewards=[[ra["eos"], rb["eos"]] for _, _, ra, rb in rows])


# ---------------------------------------------------------------- dpo
def dpo(a):
    """d = (logpi(A) - logref(A)) - (logpi(B) - logref(B)), each the SUM of
    the response tokens' log-probs incl. EOS (prompt masked), for ipo their
    MEAN (TRL's IPO); q = (1-eps) p + eps (1-p);
    sigmoid: -(q logsig(beta d) + (1-q) logsig(-beta d));
    ipo: (d - (2q-1)/(2 beta))^2; batch loss = mean over pairs."""
    enc, eos = tokenizer_of(a.policy)
    pol, ref = load_lm(a.policy), load_lm(a.reference)
    eps, beta = a.label_smoothing, a.beta

    def scores(prompt, resp):
        ids = prompt + resp + [eos]
        check_len(ids, pol)
        out = {}
        for name, m in (("pi", pol), ("ref", ref)):
            lp = token_logps(m, ids)[len(prompt) - 1:]
            out[name] = lp.sum().item()
            out[name + "_no_eos"] = lp[:-1].sum().item()
            out[name + "_mean"] = lp.mean().item()
            out[name + "_no_eos_mean"] = lp[:-1].mean().item()
        return out

    rows = []
    for r in read_jsonl(a.data):
        pr = enc(r["prompt"])
        for ra, rb, p in comparisons(r):
            rows.append((p, scores(pr, enc(ra)), scores(pr, enc(rb))))

    ipo = a.loss == "ipo"

    def loss(kind=a.loss, suffix="_mean" if ipo else "", smoothing="flip"):
        total = 0.0
        for p, sa, sb in rows:
            d = (sa["pi" + suffix] - sa["ref" + suffix]) - (sb["pi" + suffix] - sb["ref" + suffix])
            if kind == "sigmoid":
                if smoothing == "flip":
                    q = (1 - eps) * p + eps * (1 - p)
                    l = -(q * logsig(beta * d) + (1 - q) * logsig(-beta * d))
                else:  # TRL-style cDPO applied to the soft label as is
                    l = -(1 - eps) * (p * logsig(beta * d) + (1 - p) * logsig(-beta * d)) \
                        - eps * logsig(-beta * d)
            else:
                q = (1 - eps) * p + eps * (1 - p) if smoothing == "flip" else p
                l = (d - (2 * q - 1) / (2 * beta)) ** 2
            total += l
        return total / len(rows)

    alts = {"eos_not_counted": loss(suffix="_no_eos_mean" if ipo else "_no_eos"),
            ("summed_logps" if ipo else "token_mean_logps"): loss(suffix="" if ipo else "_mean"),
            "other_smoothing": loss(smoothing="other")}
    emit(loss(), alts, pairs=len(rows),
         ref_logps=[[sa["ref"], sb["ref"]] for _, sa, sb in rows])

# ---------------------------------------------------------------- ppo
def ppo(a):
    """One PPO update's losses on a fixed rollout (JSON from the test), TRL's
    recipe in plain PyTorch, float64. Response mask: tokens up to and
    including the first EOS (all of a row without one). Per-token KL
    (k1 = logp - logref, k3 = exp(logref - logp) - 1 - (logref - logp)) on
    the old policy; rewards = -kl_coef * kl on every response token, plus the
    score (+ no_eos_penalty when the row has no EOS) on its last response
    token; optionally whitened without re-centring; GAE backward with V = 0
    and no bootstrap past a row's end; advantages whitened (unbiased
    variance, eps 1e-8) and zeroed past the end; policy loss = masked token
    mean of max(-A r, -A clip(r, 1-eps, 1+eps)); value loss = 0.5 * masked
    token mean of max((V-R)^2, (clip(V, Vold-c, Vold+c)-R)^2); KL metric =
    per-row sum of the masked KL, mean over rows."""
    x = json.load(open(a.input))
    T = lambda k: torch.tensor(x[k], dtype=torch.float64)
    tokens = torch.tensor(x["tokens"])
    old, ref, new, vold, vnew, scores = T("old_logp"), T("ref_logp"), T("logp"), \
        T("old_values"), T("values"), T("scores")
    b, t = tokens.shape
    is_eos = tokens == x["eos"]
    m = ((is_eos.long().cumsum(1) - is_eos.long()) == 0).double()
    has_eos = is_eos.any(1)
    d = old - ref
    kl = (d if x["kl"] == "k1" else (-d).exp() - 1 + d) * m
    last = (m * torch.arange(t)).argmax(1)
    sc = scores + (~has_eos).double() * (x["no_eos_penalty"] or 0.0)

    def whiten(v, shift_mean=True, unbiased=True):
        mean = (v * m).sum() / m.sum()
        var = (((v - mean) ** 2) * m).sum() / m.sum()
        if unbiased:
            var = var * m.sum() / (m.sum() - 1)
        w = (v - mean) * torch.rsqrt(var + 1e-8)
        return torch.where(m > 0, w if shift_mean else w + mean, v)

    def run(score_at=last, bootstrap_past_end=False, unbiased=True):
        rewards = -x["kl_coef"] * kl
        rewards[torch.arange(b), score_at] += sc
        rewards = rewards * m
        if x["whiten_rewards"]:
            rewards = whiten(rewards, shift_mean=False, unbiased=unbiased) * m
        v = vold * m
        if bootstrap_past_end:  # values kept one token past the end (padding_mask_p1)
            v = vold * torch.cat([torch.ones(b, 1), m[:, :-1]], 1).double()
        adv = torch.zeros(b, t, dtype=torch.float64)
        lastgae = torch.zeros(b, dtype=torch.float64)
        for i in reversed(range(t)):
            nextv = v[:, i + 1] if i + 1 < t else torch.zeros(b, dtype=torch.float64)
            if not bootstrap_past_end:
                nextv = nextv * (m[:, i + 1] if i + 1 < t else 0.0)
            delta = rewards[:, i] + x["gamma"] * nextv - v[:, i]
            keep = m[:, i + 1] if (i + 1 < t and not bootstrap_past_end) else (
                torch.ones(b, dtype=torch.float64) if i + 1 < t else 0.0)
            lastgae = delta + x["gamma"] * x["lam"] * lastgae * keep
            adv[:, i] = lastgae
        adv = adv * m
        returns = (adv + v) * m
        adv = whiten(adv, unbiased=unbiased) * m
        ratio = (new - old).exp()
        pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - x["clip"], 1 + x["clip"]))
        pg_loss = (pg * m).sum() / m.sum()
        vclip = torch.max(torch.min(vnew, vold + x["value_clip"]), vold - x["value_clip"])
        vf = torch.max((vnew - returns) ** 2, (vclip - returns) ** 2)
        vf_loss = 0.5 * (vf * m).sum() / m.sum()
        return pg_loss.item(), vf_loss.item(), pg, vf

    pg_loss, vf_loss, pg, vf = run()
    kl_metric = kl.sum(1).mean().item()
    alts = {
        "policy_loss": {
            "mean_over_sequences": ((pg * m).sum(1) / m.sum(1)).mean().item(),
            "score_on_token_before_last": run(score_at=(last - 1).clamp(min=0))[0],
            "biased_whitening_variance": run(unbiased=False)[0],
            "values_kept_one_token_past_end": run(bootstrap_past_end=True)[0],
        },
        "value_loss": {
            "no_half": 2 * vf_loss,
            "mean_over_sequences": 0.5 * ((vf * m).sum(1) / m.sum(1)).mean().item(),
            "score_on_token_before_last": run(score_at=(last - 1).clamp(min=0))[1],
            "values_kept_one_token_past_end": run(bootstrap_past_end=True)[1],
        },
        "kl": {"mean_over_tokens": ((kl * m).sum() / m.sum()).item()},
    }
    print(json.dumps({"policy_loss": pg_loss, "value_loss": vf_loss, "kl": kl_metric,
                      "alternatives": alts}))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("make-models")
    s.add_argument("out")
    s.add_argument("--tokenizer", required=True)
    s.add_argument("models", nargs="+", metavar="NAME:ARCH:SEED:DROPOUT")
    s = sub.add_parser("sft")
    s.add_argument("--model", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--template", default="{prompt}")
    s.add_argument("--max-len", type=int, default=0, help="truncate as sft does (0: never)")
    s = sub.add_parser("sft-chat")
    s.add_argument("--model", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--chat-template", required=True)
    s = sub.add_parser("pretrain")
    s.add_argument("--model", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--seq-len", type=int, required=True)
    s = sub.add_parser("pm")
    s.add_argument("--model", required=True)
    s.add_argument("--head", required=True)
    s.add_argument("--data", required=True, action="append")
    s = sub.add_parser("dpo")
    s.add_argument("--policy", required=True)
    s.add_argument("--reference", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--beta", type=float, required=True)
    s.add_argument("--loss", choices=["sigmoid", "ipo"], required=True)
    s.add_argument("--label-smoothing", type=float, default=0.0)
    s = sub.add_parser("ppo")
    s.add_argument("--input", required=True)
    a = ap.parse_args()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    {"make-models": make_models, "sft": sft, "sft-chat": sft_chat, "pretrain": pretrain, "pm": pm, "dpo": dpo,
     "ppo": ppo}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
