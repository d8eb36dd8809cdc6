#!/usr/bin/env python3
"""A tiny random-init chat checkpoint shaped like a real instruct model, for
the end-to-end chat tests: the family's architecture, its special tokens and
real chat template, a byte-level BPE trained on the given texts.

    python tests/parity/make_chat_checkpoint.py OUT FAMILY TEMPLATE CORPUS...

FAMILY is qwen3 (Qwen3-Instruct: <|im_start|>/<|im_end|>, no BOS, EOS
<|im_end|>), llama32 (Llama-3.2-Instruct: <|begin_of_text|> added by the
post-processor, header tokens, EOS <|eot_id|> and the generation config's
[<|end_of_text|>, <|eom_id|>, <|eot_id|>], llama3 RoPE scaling), qwen2
(Qwen2.5-Instruct), gemma and gemma3 (<bos> added by the post-processor and
written by the template, <start_of_turn>/<end_of_turn>; Gemma 3 with
sliding layers and local/global RoPE), gemma2 (Gemma's tokens; soft caps and
sandwich norms), phi3 (<|user|>/<|assistant|>/<|end|>), or smollm3, olmo2
and mistral (with Qwen2.5's ChatML tokens: their own templates are not in
tests/data/chat-templates, and the template path does not depend on the
architecture).
CORPUS files are read as text, line by line.

    python tests/parity/make_chat_checkpoint.py --render DIR MESSAGES_JSON

prints, one JSON line per rendering asked for in MESSAGES_JSON ([{messages,
add_generation_prompt}]), what transformers' apply_chat_template renders.

    python tests/parity/make_chat_checkpoint.py --generate DIR MESSAGES_JSON N

prints, one JSON line per conversation of MESSAGES_JSON ([messages]), the
new token ids of transformers' greedy `generate` (N new tokens at most,
stopping on the generation config's EOS ids) on
`apply_chat_template(messages, add_generation_prompt=True)`.
"""
import json
import sys

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (AutoTokenizer, Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM,
                          Gemma3TextConfig, GemmaConfig, GemmaForCausalLM, GenerationConfig,
                          LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Olmo2Config, Olmo2ForCausalLM, Phi3Config, Phi3ForCausalLM,
                          PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM, SmolLM3Config, SmolLM3ForCausalLM)

FAMILIES = {
    "qwen3": {
        "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
        "bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>",
        "stop": ["<|im_end|>", "<|endoftext|>"],
    },
    "qwen2": {
        "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>",
        "stop": ["<|im_end|>", "<|endoftext|>"],
    },
    "gemma": {
        "specials": ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        "bos": "<bos>", "eos": "<eos>", "pad": "<pad>",
        "stop": ["<eos>", "<end_of_turn>"],
    },
    "phi3": {
        "specials": ["<unk>", "<s>", "<|endoftext|>", "<|assistant|>", "<|end|>", "<|system|>",
                     "<|user|>"],
        "bos": None, "eos": "<|endoftext|>", "pad": "<|endoftext|>",
        "stop": ["<|endoftext|>", "<|end|>"],
    },
    "llama32": {
        "specials": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                     "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"],
        "bos": "<|begin_of_text|>", "eos": "<|eot_id|>", "pad": None,
        "stop": ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
    },
}


# Families whose special tokens are another's: Gemma 2 and 3 are Gemma's;
# SmolLM3, OLMo 2 and Mistral are given ChatML's (Qwen2.5's tokens and
# template), their own templates not being in tests/data/chat-templates.
SPECIAL_TOKENS_OF = {"gemma2": "gemma", "gemma3": "gemma", "smollm3": "qwen2",
                     "olmo2": "qwen2", "mistral": "qwen2"}


def make(out, family, template_path, corpus):
    spec = FAMILIES[SPECIAL_TOKENS_OF.get(family, family)]
    texts = []
    for path in corpus:
        with open(path, encoding="utf-8") as f:
            texts.extend(line for line in f if line.strip())
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=640, special_tokens=spec["specials"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    if spec["bos"]:
        bos_id = tok.token_to_id(spec["bos"])
        tok.post_processor = processors.TemplateProcessing(
            single=f"{spec['bos']} $A", pair=f"{spec['bos']} $A {spec['bos']} $B",
            special_tokens=[(spec["bos"], bos_id)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    with open(template_path, encoding="utf-8") as f:
        template = f.read()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=spec["bos"],
                                   eos_token=spec["eos"], pad_token=spec["pad"])
    fast.chat_template = template
    fast.save_pretrained(out)

    ids = lambda t: tok.token_to_id(t)
    torch.manual_seed(0)
    common = dict(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=4096, tie_word_embeddings=True,
                  initializer_range=0.2, attn_implementation="eager")
    if family == "qwen3":
        cfg = Qwen3Config(**common, head_dim=16, eos_token_id=ids(spec["eos"]),
                          bos_token_id=ids("<|endoftext|>"), pad_token_id=ids(spec["pad"]),
                          rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
        model = Qwen3ForCausalLM(cfg)
    elif family == "qwen2":
        cfg = Qwen2Config(**common, eos_token_id=ids(spec["eos"]),
                          bos_token_id=ids("<|endoftext|>"), pad_token_id=ids(spec["pad"]))
        model = Qwen2ForCausalLM(cfg)
    elif family == "gemma":
        cfg = GemmaConfig(**common, head_dim=16, hidden_act="gelu_pytorch_tanh",
                          bos_token_id=ids("<bos>"), eos_token_id=ids("<eos>"),
                          pad_token_id=ids("<pad>"))
        model = GemmaForCausalLM(cfg)
    elif family == "gemma2":
        cfg = Gemma2Config(**common, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                           layer_types=["sliding_attention", "full_attention"],
                           attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                           bos_token_id=ids("<bos>"), eos_token_id=ids("<eos>"),
                           pad_token_id=ids("<pad>"))
        model = Gemma2ForCausalLM(cfg)
    elif family in ("smollm3", "olmo2", "mistral"):
        config, causal_lm, extra = {
            "smollm3": (SmolLM3Config, SmolLM3ForCausalLM, {"no_rope_layer_interval": 2}),
            "olmo2": (Olmo2Config, Olmo2ForCausalLM, {}),
            "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": 8}),
        }[family]
        cfg = config(**common, **extra, eos_token_id=ids(spec["eos"]),
                     bos_token_id=ids("<|endoftext|>"), pad_token_id=ids(spec["pad"]))
        model = causal_lm(cfg)
    elif family == "gemma3":
        cfg = Gemma3TextConfig(**common, head_dim=16, query_pre_attn_scalar=16,
                               sliding_window=8,
                               layer_types=["sliding_attention", "full_attention"],
                               rope_parameters={
                                   "sliding_attention": {"rope_type": "default",
                                                         "rope_theta": 10000.0},
                                   "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                      "rope_theta": 1000000.0}},
                               bos_token_id=ids("<bos>"), eos_token_id=ids("<eos>"),
                               pad_token_id=ids("<pad>"))
        model = Gemma3ForCausalLM(cfg)
    elif family == "phi3":
        cfg = Phi3Config(**{**common, "tie_word_embeddings": False},
                         bos_token_id=ids("<s>"), eos_token_id=ids("<|endoftext|>"),
                         pad_token_id=ids("<|endoftext|>"))
        model = Phi3ForCausalLM(cfg)
    else:
        cfg = LlamaConfig(**common, bos_token_id=ids(spec["bos"]),
                          eos_token_id=[ids(t) for t in spec["stop"]],
                          rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                           "factor": 32.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 8192})
        model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    GenerationConfig(eos_token_id=[ids(t) for t in spec["stop"]],
                     bos_token_id=cfg.bos_token_id).save_pretrained(out)
    print(json.dumps({"out": out, "vocab": tok.get_vocab_size()}))


# alignflow's `strftime_now` renders a fixed date (a cached stage's
# rendering must not change with the day); Llama 3.2's template takes it as
# `date_string`, which the other templates ignore.
TEMPLATE_DATE = {"date_string": "26 Jul 2024"}


def render(model_dir, requests_path):
    tok = AutoTokenizer.from_pretrained(model_dir)
    with open(requests_path, encoding="utf-8") as f:
        requests = json.load(f)
    for r in requests:
        text = tok.apply_chat_template(r["messages"], tokenize=False,
                                       add_generation_prompt=r["add_generation_prompt"],
                                       **TEMPLATE_DATE)
        print(json.dumps({"text": text}))


def generate(model_dir, conversations_path, n):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with open(conversations_path, encoding="utf-8") as f:
        conversations = json.load(f)
    for messages in conversations:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                      return_dict=True, return_tensors="pt",
                                      **TEMPLATE_DATE)["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=n, pad_token_id=model.config.eos_token_id
                                 if isinstance(model.config.eos_token_id, int)
                                 else model.config.eos_token_id[0])
        print(json.dumps({"ids": out[0, ids.shape[1]:].tolist()}))


def main():
    transformers.logging.set_verbosity_error()
    if sys.argv[1] == "--render":
        render(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "--generate":
        generate(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        make(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])


if __name__ == "__main__":
    main()
