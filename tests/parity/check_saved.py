#!/usr/bin/env python3
"""Check that checkpoints written by alignflow (HF layout: config.json +
model.safetensors) load cleanly in transformers and reproduce reference logits.

    python tests/parity/check_saved.py [--tol 1e-4] [--reward] MODEL_DIR REFERENCE_SAFETENSORS [MODEL_DIR REFERENCE_SAFETENSORS ...]

One process for many checkpoints (importing transformers takes seconds);
one JSON line per pair, in order.

Causal LM mode: loads AutoModelForCausalLM, runs the reference batch
(input_ids, attention_mask, position_ids = clamp(cumsum(mask)-1, 0)) and prints
{"max_abs_diff": ..., ...}, comparing with the reference `logits` at
real-token positions (attention_mask == 1; pad-position logits are not
meaningful). A pair's code is 0 if max_abs_diff <= tol, 1 if above.

Reward mode (--reward): loads AutoModelForSequenceClassification(num_labels=1)
and prints {"scores": [one float per row], ...}. If the reference file holds a
`scores` tensor ([B] or [B,1]) it is compared too (code 1 above tol).

Any missing / unexpected / mismatched key or load error reported by
transformers (output_loading_info=True) is that pair's failure: message on
stderr, a JSON line with "error", code 2. The exit status is the largest
pair's code.
"""
import argparse
import json
import sys

import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

torch.set_num_threads(2)


class LoadFailed(Exception):
    pass


def load(model_dir, reward):
    kw = dict(output_loading_info=True, dtype=torch.float32, attn_implementation="eager")
    try:
        if reward:
            model, info = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, **kw)
        else:
            model, info = AutoModelForCausalLM.from_pretrained(model_dir, **kw)
    except Exception as e:  # e.g. shape mismatches raise instead of being reported
        print(f"ERROR: transformers failed to load {model_dir}: {type(e).__name__}: {e}", file=sys.stderr)
        raise LoadFailed({"error": "load_failed", "exception": f"{type(e).__name__}: {e}"})
    problems = {k: sorted(map(str, v)) for k, v in info.items() if v}
    if problems:
        print(f"ERROR: transformers reported loading problems for {model_dir}:", file=sys.stderr)
        for k, v in problems.items():
            print(f"  {k} ({len(v)}):", file=sys.stderr)
            for item in v:
                print(f"    {item}", file=sys.stderr)
        raise LoadFailed({"error": "loading_problems", **problems})
    return model.eval()


def check(model_dir, reference, reward, tol):
    """One pair: (code, JSON-able result)."""
    result = {"model_dir": model_dir, "reference": reference, "tol": tol,
              "transformers": transformers.__version__, "torch": torch.__version__}
    ref = load_file(reference)
    ids, mask = ref["input_ids"].long(), ref["attention_mask"].long()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    try:
        model = load(model_dir, reward)
    except LoadFailed as e:
        return 2, {**result, **e.args[0]}
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
    if reward:
        scores = out.reshape(out.shape[0], -1)[:, 0]
        result["scores"] = scores.tolist()
        if "scores" not in ref:
            return 0, result
        diff = (scores - ref["scores"].float().reshape(-1)).abs().max().item()
    else:
        expected = ref["logits"].float()
        if expected.shape != out.shape:
            return 1, {**result, "error": "shape_mismatch",
                       "expected": list(expected.shape), "got": list(out.shape)}
        real = mask.bool()
        diff = (out[real] - expected[real]).abs().max().item()
        result["max_abs_diff_all_positions"] = (out - expected).abs().max().item()
    return (0 if diff <= tol else 1), {"max_abs_diff": diff, "ok": diff <= tol, **result}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pairs", nargs="+", metavar="MODEL_DIR REFERENCE",
                    help="checkpoint folders, each followed by its reference safetensors")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--reward", action="store_true",
                    help="load as AutoModelForSequenceClassification(num_labels=1), print scores")
    args = ap.parse_args()
    if len(args.pairs) % 2:
        ap.error("give each MODEL_DIR with its REFERENCE")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    worst = 0
    for model_dir, reference in zip(args.pairs[::2], args.pairs[1::2]):
        code, result = check(model_dir, reference, args.reward, args.tol)
        print(json.dumps(result), flush=True)
        worst = max(worst, code)
    return worst


if __name__ == "__main__":
    sys.exit(main())
