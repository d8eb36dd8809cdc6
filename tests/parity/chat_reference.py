#!/usr/bin/env python3
"""transformers' side of the chat-template parity test.

    python tests/parity/chat_reference.py OUT_DIR

Writes OUT_DIR/tokenizer.json (a tiny byte-level BPE that knows every
family's special tokens) and OUT_DIR/reference.json: for each template in
tests/data/chat-templates/*.jinja, each conversation of
tests/data/chat-templates/conversations.json and add_generation_prompt
false/true, what `apply_chat_template` renders (text), its token ids
(tokenize=True), and for templates with {% generation %} the assistant
token mask (return_assistant_tokens_mask=True); or the error the template
raised. Also the special tokens each family's template saw.
tests/parity/whitespace.jinja (not a real template) pins Jinja's whitespace
rules (trim_blocks, lstrip_blocks), which the real templates' `-` markers hide.
"""
import json
import os
import sys

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "data", "chat-templates")

# The special tokens each family's checkpoints name in tokenizer_config.json.
FAMILIES = {
    "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "qwen": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    "gemma": {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"},
    "phi3": {"bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>"},
    "deepseek": {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"},
}
CONTROL = [
    "<|start_header_id|>", "<|end_header_id|>", "<|im_start|>", "<think>", "</think>",
    "<start_of_turn>", "<end_of_turn>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
    "<｜User｜>", "<｜Assistant｜>",
]


def family(template_name):
    for prefix, fam in [("llama3", "llama3"), ("qwen", "qwen"), ("gemma", "gemma"), ("phi3", "phi3"),
                        ("deepseek", "deepseek"), ("whitespace", "phi3")]:
        if template_name.startswith(prefix):
            return fam
    raise SystemExit(f"no family for {template_name}")


def base_tokenizer(cases):
    specials = sorted({t for f in FAMILIES.values() for t in f.values()} | set(CONTROL))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [m["content"] for c in cases for m in c["messages"]] * 4
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    return tok


def main(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    cases = json.load(open(os.path.join(DATA, "conversations.json"), encoding="utf-8"))["cases"]
    tok = base_tokenizer(cases)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    results = []
    completions = []
    families = {}
    paths = [os.path.join(DATA, n) for n in sorted(os.listdir(DATA)) if n.endswith(".jinja")]
    paths.append(os.path.join(HERE, "whitespace.jinja"))
    for path in paths:
        name = os.path.basename(path)
        template = open(path, encoding="utf-8").read()
        fam = family(name)
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=os.path.join(out_dir, "tokenizer.json"), **FAMILIES[fam])
        families[name] = tokenizer.special_tokens_map
        training = "{% generation %}" in template or "{%- generation %}" in template
        for case in cases:
            # alignflow's `strftime_now` renders a fixed date, 26 July 2024
            # (a cached stage's rendering must not change with the day):
            # Llama 3.2's template takes that date as `date_string`.
            kwargs = {"date_string": "26 Jul 2024", **case.get("kwargs", {})}
            for gen in (False, True):
                entry = {"template": name, "case": case["name"], "add_generation_prompt": gen}
                try:
                    text = tokenizer.apply_chat_template(
                        case["messages"], chat_template=template, tokenize=False,
                        add_generation_prompt=gen, **kwargs)
                    out = tokenizer.apply_chat_template(
                        case["messages"], chat_template=template, tokenize=True, return_dict=True,
                        add_generation_prompt=gen, return_assistant_tokens_mask=training, **kwargs)
                    entry["text"] = text
                    entry["ids"] = list(out["input_ids"])
                    if training:
                        entry["assistant_mask"] = list(out["assistant_masks"])
                except Exception as e:  # the template refused the conversation
                    entry["error"] = str(e)
                results.append(entry)
            # A training example as TRL's trainers build it: the prompt with
            # the generation prompt, the whole conversation without.
            messages = case["messages"]
            if len(messages) >= 2 and messages[-1]["role"] == "assistant":
                entry = {"template": name, "case": case["name"], "completion": True}
                try:
                    entry["prompt_ids"] = list(tokenizer.apply_chat_template(
                        messages[:-1], chat_template=template, tokenize=True, return_dict=True,
                        add_generation_prompt=True, **kwargs)["input_ids"])
                    entry["full_ids"] = list(tokenizer.apply_chat_template(
                        messages, chat_template=template, tokenize=True, return_dict=True,
                        add_generation_prompt=False, **kwargs)["input_ids"])
                except Exception as e:
                    entry["error"] = str(e)
                completions.append(entry)
    json.dump(
        {"transformers": transformers.__version__, "special_tokens": families, "results": results,
         "completions": completions},
        open(os.path.join(out_dir, "reference.json"), "w", encoding="utf-8"),
        ensure_ascii=False,
    )


if __name__ == "__main__":
    main(sys.argv[1])
