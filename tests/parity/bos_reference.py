#!/usr/bin/env python3
"""transformers' side of the BOS test: what `tokenizer(text)` adds.

    python tests/parity/bos_reference.py OUT_DIR

Writes OUT_DIR/<family>/tokenizer.json + tokenizer_config.json for four
tiny byte-level BPE tokenizers whose post-processors add what the real
families add (GPT-2 and Qwen: nothing; Llama 2 and Gemma: `<s>`/`<bos>`;
Llama 3: `<|begin_of_text|>`; a Llama with add_eos_token: BOS and EOS), and
OUT_DIR/reference.json: for each family and text, the ids of
`tokenizer(text)["input_ids"]` (special tokens added) and of
`tokenizer(text, add_special_tokens=False)`.
"""
import json
import os
import sys

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

TEXTS = ["Human: hi\n\nAssistant:", "A longer prompt, with punctuation!", "x"]
# family -> (bos, eos, post-processor template or None)
FAMILIES = {
    "gpt2": (None, "<|endoftext|>", None),
    "llama2": ("<s>", "</s>", "<s> $A"),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>", "<|begin_of_text|> $A"),
    "llama_eos": ("<s>", "</s>", "<s> $A </s>"),
}


def tokenizer(bos, eos, template):
    specials = [t for t in (bos, eos) if t]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TEXTS * 4, trainer)
    if template:
        tok.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[(t, tok.token_to_id(t)) for t in specials])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def main(out_dir):
    results = {}
    for name, (bos, eos, template) in FAMILIES.items():
        folder = os.path.join(out_dir, name)
        os.makedirs(folder, exist_ok=True)
        tokenizer(bos, eos, template).save(os.path.join(folder, "tokenizer.json"))
        config = {"eos_token": eos, **({"bos_token": bos} if bos else {})}
        json.dump(config, open(os.path.join(folder, "tokenizer_config.json"), "w"))
        fast = PreTrainedTokenizerFast(tokenizer_file=os.path.join(folder, "tokenizer.json"), **config)
        results[name] = [
            {"text": t, "with_specials": fast(t)["input_ids"],
             "without": fast(t, add_special_tokens=False)["input_ids"],
             "bos_id": fast.bos_token_id, "bos_token": fast.bos_token, "eos_id": fast.eos_token_id}
            for t in TEXTS
        ]
    json.dump({"transformers": transformers.__version__, "results": results},
              open(os.path.join(out_dir, "reference.json"), "w"))


if __name__ == "__main__":
    main(sys.argv[1])
