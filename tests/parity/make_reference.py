#!/usr/bin/env python3
"""Write tiny random-init HF checkpoints plus reference outputs for alignflow's
model-layer parity tests.

    python tests/parity/make_reference.py OUT_DIR

For each of gpt2/, llama_gqa_tied/, llama_untied/, llama31_scaled/,
llama_linear/, qwen3/, qwen3_yarn/, mistral_window/, qwen2_window/,
smollm3/, olmo2/, gemma/, gemma2/, gemma3/, phi3_window/, phi35_long/, phi35_short/,
and the Hub-style gemma_gelu/, gemma2_hub/, gemma3_hub/, smollm3_hub/ under OUT_DIR:
  config.json, generation_config.json, model.safetensors   (save_pretrained)
  reference.safetensors   input_ids, attention_mask, position_ids, logits,
                          greedy_ids, greedy_logprobs
  reference.json          the same data as nested lists + versions + notes
Deterministic: torch.manual_seed(0), eager attention, float32, CPU.
"""
import inspect
import json
import os
import sys

import torch
import transformers
from safetensors.torch import save_file
from transformers import (
    Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, GemmaConfig,
    GemmaForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
    MistralForCausalLM, Olmo2Config, Phi3Config, Phi3ForCausalLM, Olmo2ForCausalLM, Qwen2Config, Qwen2ForCausalLM,
    Qwen3Config, Qwen3ForCausalLM, SmolLM3Config, SmolLM3ForCausalLM,
)

torch.set_num_threads(2)

BATCH_LENGTHS = [10, 7, 4]  # real lengths per row; left-padded to SEQ
SEQ = 10
NEW = 12
NORM_NOISE = 0.1  # std of the noise added to norm weights (around 1) and biases
# weight init std (HF default 0.02 gives near-uniform logits and greedy near-ties,
# which would make greedy parity fragile); written to config.json, harmless on load.
INIT_STD = float(os.environ.get("PARITY_INIT_STD", "0.2"))


def gpt2_config():
    return GPT2Config(
        vocab_size=96, n_positions=64, n_embd=32, n_layer=2, n_head=4,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        initializer_range=INIT_STD, attn_implementation="eager",
    )


def llama_config(kv_heads, tied, theta, scaling=None):
    return LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv_heads,
        max_position_embeddings=64,
        # transformers 5 stores rope_theta inside rope_parameters in config.json
        rope_parameters={"rope_type": "default", "rope_theta": theta, **(scaling or {})},
        rms_norm_eps=1e-6, tie_word_embeddings=tied,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
        initializer_range=INIT_STD, attn_implementation="eager",
    )


def qwen3_config(scaling=None):
    # head_dim 16 while hidden / heads = 8: q_proj is 32 -> 64, o_proj 64 -> 32.
    return Qwen3Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, head_dim=16,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, **(scaling or {})},
        rms_norm_eps=1e-6, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
        initializer_range=INIT_STD, attn_implementation="eager",
    )


# The shape every Llama-family fixture below shares.
SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0,
             initializer_range=INIT_STD, attn_implementation="eager")
# A window of 4 keys: the batch (10 tokens + 12 generated) reaches far past it.
WINDOW = 4


def mistral_config():
    return MistralConfig(**SMALL, sliding_window=WINDOW, tie_word_embeddings=False)


def qwen2_window_config():
    # Sliding attention from layer 1 on (layer 0 full), q/k/v biases.
    return Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=WINDOW,
                       max_window_layers=1, tie_word_embeddings=True)


def smollm3_config():
    # RoPE in layer 0, none in layer 1 (every 2nd layer).
    return SmolLM3Config(**SMALL, no_rope_layer_interval=2, tie_word_embeddings=True)


def olmo2_config():
    return Olmo2Config(**SMALL, tie_word_embeddings=False)


# Gemma: head_dim 16 (not hidden / heads = 8), a query_pre_attn_scalar apart
# from head_dim, and caps low enough to bite on these logits.
GEMMA = dict(SMALL, head_dim=16, hidden_activation="gelu_pytorch_tanh")


def gemma_config():
    return GemmaConfig(**{k: v for k, v in GEMMA.items() if k != "hidden_activation"},
                       hidden_act="gelu_pytorch_tanh")


def gemma2_config():
    return Gemma2Config(**GEMMA, query_pre_attn_scalar=24, sliding_window=WINDOW,
                        layer_types=["sliding_attention", "full_attention"],
                        attn_logit_softcapping=2.0, final_logit_softcapping=3.0)


def gemma3_config():
    # Local and global RoPE bases differ, as in the real models.
    return Gemma3TextConfig(**GEMMA, query_pre_attn_scalar=24, sliding_window=WINDOW,
                            layer_types=["sliding_attention", "full_attention"],
                            rope_parameters={
                                "sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                                "full_attention": {"rope_type": "default", "rope_theta": 1e6},
                            })


# Hub-style configs: checkpoints published before transformers 5 leave out
# what their config class derives (`layer_types`, `no_rope_layers`, the
# Gemma 2 caps, RoPE bases) or spell it the old way. Each fixture below is
# saved, then its config.json rewritten by the function beside it; build()
# checks transformers derives the same config from the rewritten file.
def gemma_gelu_config():
    # The first Gemma releases said `hidden_act: gelu` for the tanh form.
    return gemma_config()


def gemma_gelu_legacy(cfg):
    cfg["hidden_act"] = "gelu"


THREE = dict(GEMMA, num_hidden_layers=3)


def gemma2_hub_config():
    # Default caps (50, 30) and alternating windows: sliding, full, sliding.
    return Gemma2Config(**THREE, query_pre_attn_scalar=24, sliding_window=WINDOW)


def gemma2_hub_legacy(cfg):
    for key in ("layer_types", "attn_logit_softcapping", "final_logit_softcapping"):
        del cfg[key]


def gemma3_hub_config():
    # sliding, sliding, full; default bases 1e4 (sliding) and 1e6 (full).
    return Gemma3TextConfig(**THREE, query_pre_attn_scalar=24, sliding_window=WINDOW,
                            sliding_window_pattern=3)


def gemma3_hub_legacy(cfg):
    del cfg["layer_types"], cfg["rope_parameters"]
    cfg["sliding_window_pattern"] = 3


def smollm3_hub_config():
    # Four layers, the 4th without RoPE; tied, base 2e6, all by default.
    return SmolLM3Config(**dict(SMALL, num_hidden_layers=4))


def smollm3_hub_legacy(cfg):
    for key in ("no_rope_layers", "layer_types", "rope_parameters", "tie_word_embeddings"):
        del cfg[key]


def phi3_window_config():
    # Fused qkv_proj and gate_up_proj; a window on every layer (Phi-3 mini 4k).
    return Phi3Config(**SMALL, sliding_window=WINDOW, tie_word_embeddings=False)


def phi35_longrope_config(original):
    # Phi-3.5's LongRoPE. transformers picks the short or the long factors
    # per forward pass (its last position against the original context), so
    # incremental decoding and a full forward only agree when every pass
    # takes the same side. alignflow picks them per row (as transformers
    # does on each row alone): the two agree when every row takes the same
    # side: `phi35_long` (original 2, short of every prompt the tests use)
    # the long factors throughout, `phi35_short` (32 > 22) the short ones.
    return Phi3Config(**SMALL, tie_word_embeddings=False,
                      original_max_position_embeddings=original,
                      rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                       "short_factor": [1.0, 1.2, 1.5, 2.0],
                                       "long_factor": [1.0, 2.5, 5.0, 8.0],
                                       "original_max_position_embeddings": original})


# Scaled RoPE with a small original context (16 positions, the batch
# reaches 22), so the scaling changes the logits within the fixture;
# build() checks it does against the same weights with plain RoPE.
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
LINEAR = {"rope_type": "linear", "factor": 4.0}
YARN = {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 16}

MODELS = [
    ("gpt2", GPT2LMHeadModel, gpt2_config),
    ("llama_gqa_tied", LlamaForCausalLM, lambda: llama_config(2, True, 10000.0)),
    ("llama_untied", LlamaForCausalLM, lambda: llama_config(4, False, 500000.0)),
    ("llama31_scaled", LlamaForCausalLM, lambda: llama_config(2, True, 10000.0, LLAMA3)),
    ("llama_linear", LlamaForCausalLM, lambda: llama_config(2, False, 10000.0, LINEAR)),
    ("qwen3", Qwen3ForCausalLM, qwen3_config),
    ("qwen3_yarn", Qwen3ForCausalLM, lambda: qwen3_config(YARN)),
    ("mistral_window", MistralForCausalLM, mistral_config),
    ("qwen2_window", Qwen2ForCausalLM, qwen2_window_config),
    ("smollm3", SmolLM3ForCausalLM, smollm3_config),
    ("olmo2", Olmo2ForCausalLM, olmo2_config),
    ("gemma", GemmaForCausalLM, gemma_config),
    ("gemma2", Gemma2ForCausalLM, gemma2_config),
    ("gemma3", Gemma3ForCausalLM, gemma3_config),
    ("phi3_window", Phi3ForCausalLM, phi3_window_config),
    ("phi35_long", Phi3ForCausalLM, lambda: phi35_longrope_config(2)),
    ("phi35_short", Phi3ForCausalLM, lambda: phi35_longrope_config(32)),
    ("gemma_gelu", GemmaForCausalLM, gemma_gelu_config, gemma_gelu_legacy),
    ("gemma2_hub", Gemma2ForCausalLM, gemma2_hub_config, gemma2_hub_legacy),
    ("gemma3_hub", Gemma3ForCausalLM, gemma3_hub_config, gemma3_hub_legacy),
    ("smollm3_hub", SmolLM3ForCausalLM, smollm3_hub_config, smollm3_hub_legacy),
]

# What the rewritten config.json must still mean.
DERIVED = ("layer_types", "rope_parameters", "no_rope_layers", "tie_word_embeddings",
           "attn_logit_softcapping", "final_logit_softcapping", "sliding_window",
           "hidden_act", "hidden_activation", "query_pre_attn_scalar")


def rewrite_config(out, cls, cfg, legacy):
    """Rewrites OUT/config.json by `legacy` and checks transformers reads
    it back as `cfg`."""
    path = os.path.join(out, "config.json")
    with open(path) as f:
        written = json.load(f)
    legacy(written)
    with open(path, "w") as f:
        json.dump(written, f, indent=2)
    again = type(cfg).from_pretrained(out)
    for key in DERIVED:
        assert getattr(again, key, None) == getattr(cfg, key, None), \
            f"{out}: {key} reads back as {getattr(again, key, None)}, not {getattr(cfg, key, None)}"
    assert cls(again).state_dict().keys() == cls(cfg).state_dict().keys()


def unscaled_logits_diff(model, cfg, ids, mask, pos):
    """Max |logits - logits with plain RoPE| over real tokens (0 without scaling)."""
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") == "default":
        return 0.0
    plain_cfg = type(cfg).from_dict(cfg.to_dict())
    plain_cfg.rope_parameters = {"rope_type": "default",
                                 "rope_theta": cfg.rope_parameters["rope_theta"]}
    plain = type(model)(plain_cfg).eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        b = plain(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    return (a - b)[mask.bool()].abs().max().item()


def unwindowed_logits_diff(model, cfg, ids, mask, pos):
    """Max |logits - logits with full attention everywhere| over real tokens
    (0 without a sliding window)."""
    if getattr(cfg, "sliding_window", None) is None:
        return 0.0
    full_cfg = type(cfg).from_dict(cfg.to_dict())
    # A window longer than any sequence (Gemma builds sliding masks whatever
    # the layer types say, so the key stays set).
    full_cfg.sliding_window = 1 << 20
    full = type(model)(full_cfg).eval()
    full.load_state_dict(model.state_dict())
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        b = full(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    return (a - b).abs()[mask.bool()].max().item()


def perturb_norms(model, gen):
    """Make LayerNorm / RMSNorm affine params non-trivial (not 1 / 0)."""
    with torch.no_grad():
        for name, mod in model.named_modules():
            cls = type(mod).__name__
            if isinstance(mod, torch.nn.LayerNorm) or "RMSNorm" in cls:
                mod.weight.add_(torch.randn(mod.weight.shape, generator=gen) * NORM_NOISE)
                if getattr(mod, "bias", None) is not None:
                    mod.bias.add_(torch.randn(mod.bias.shape, generator=gen) * NORM_NOISE)


def position_ids_from_mask(mask):
    # as HF generate does for left padding: cumsum(mask) - 1, pads -> 0
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def make_batch(gen, vocab, pad):
    ids = torch.full((len(BATCH_LENGTHS), SEQ), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(BATCH_LENGTHS):
        # real tokens avoid ids 0..2 (pad/bos/eos in both families)
        ids[r, SEQ - n:] = torch.randint(3, vocab, (n,), generator=gen)
        mask[r, SEQ - n:] = 1
    return ids, mask


def save_model(model, out):
    kw = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kw["safe_serialization"] = True  # transformers<5; v5 always writes safetensors
    model.save_pretrained(out, **kw)
    assert os.path.isfile(os.path.join(out, "model.safetensors")), "no model.safetensors written"


def build(name, cls, make_cfg, root, legacy=None):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    cfg = make_cfg()
    model = cls(cfg).eval()
    perturb_norms(model, gen)
    out = os.path.join(root, name)
    save_model(model, out)
    if legacy:
        rewrite_config(out, cls, cfg, legacy)

    ids, mask = make_batch(gen, cfg.vocab_size, cfg.pad_token_id)
    pos = position_ids_from_mask(mask)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
        greedy = model.generate(
            ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW,
            min_new_tokens=NEW, pad_token_id=cfg.pad_token_id,
        )
        assert greedy.shape == (len(BATCH_LENGTHS), SEQ + NEW), greedy.shape
        full_mask = torch.cat([mask, torch.ones(len(BATCH_LENGTHS), NEW, dtype=torch.long)], 1)
        full_logits = model(input_ids=greedy, attention_mask=full_mask,
                            position_ids=position_ids_from_mask(full_mask)).logits.float()
    step_logits = full_logits[:, SEQ - 1:SEQ - 1 + NEW]  # predicts tokens SEQ..SEQ+NEW-1
    new_tok = greedy[:, SEQ:]
    logprobs = torch.log_softmax(step_logits, -1).gather(-1, new_tok.unsqueeze(-1)).squeeze(-1)

    # self-checks: the full forward reproduces the first-step logits, and every
    # greedy token is the argmax of the full-forward logits (EOS excluded,
    # since min_new_tokens masks it), with its margin over the runner-up.
    assert torch.allclose(full_logits[:, :SEQ][mask.bool()], logits[mask.bool()], atol=1e-5)
    masked = step_logits.clone()
    masked[..., cfg.eos_token_id] = float("-inf")
    assert torch.equal(masked.argmax(-1), new_tok), "greedy != argmax of full forward"
    top2 = masked.topk(2, -1).values
    margin = (top2[..., 0] - top2[..., 1]).min().item()
    eos_suppressed = int((step_logits.argmax(-1) != new_tok).sum())
    # Over the greedy sequence (22 positions), where the scaling matters most.
    scaled = unscaled_logits_diff(model, cfg, greedy, full_mask,
                                  position_ids_from_mask(full_mask))
    if scaled:
        assert scaled > 1e-2, f"{name}: RoPE scaling changes the logits by only {scaled}"
    windowed = unwindowed_logits_diff(model, cfg, greedy, full_mask,
                                      position_ids_from_mask(full_mask))
    if getattr(cfg, "sliding_window", None) is not None:
        assert windowed > 1e-2, f"{name}: the sliding window changes the logits by only {windowed}"

    ref = {
        "input_ids": ids.contiguous(),
        "attention_mask": mask.contiguous(),
        "position_ids": pos.contiguous(),
        "logits": logits.contiguous(),
        "greedy_ids": greedy.contiguous(),
        "greedy_logprobs": logprobs.float().contiguous(),
    }
    meta = {"transformers": transformers.__version__, "torch": torch.__version__,
            "model": name, "architecture": cls.__name__}
    save_file(ref, os.path.join(out, "reference.safetensors"), metadata=meta)
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump({
            **meta,
            "notes": ("left-padded batch; position_ids = clamp(cumsum(attention_mask)-1, 0); "
                      "logits at pad positions (attention_mask==0) are not meaningful, "
                      "compare only where attention_mask==1; greedy uses min_new_tokens=12 "
                      "(EOS masked out); greedy_logprobs are unmasked log_softmax of a full "
                      "forward on greedy_ids"),
            "min_greedy_margin": margin,
            "eos_suppressed_steps": eos_suppressed,
            "unscaled_rope_logits_diff": scaled,
            "unwindowed_logits_diff": windowed,
            **{k: v.tolist() for k, v in ref.items()},
        }, f)
    files = sorted(os.listdir(out))
    print(f"{out}: {files}")
    for k, v in ref.items():
        print(f"  {k:16s} {str(v.dtype):14s} {list(v.shape)}")
    print(f"  min greedy top1-top2 margin {margin:.4g}, eos-suppressed steps {eos_suppressed}")
    if scaled:
        print(f"  max |logits - logits with unscaled RoPE| {scaled:.4g}")
    if windowed:
        print(f"  max |logits - logits with full attention| {windowed:.4g}")


def main():
    if len(sys.argv) == 3:  # OUT_DIR NAME: one fixture
        build(*next(m for m in MODELS if m[0] == sys.argv[2]), sys.argv[1])
        return
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT_DIR")
    root = sys.argv[1]
    os.makedirs(root, exist_ok=True)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    for name, cls, make_cfg, *legacy in MODELS:
        build(name, cls, make_cfg, root, *legacy)


if __name__ == "__main__":
    main()
