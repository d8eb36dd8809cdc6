#!/usr/bin/env python3
"""Check that a checkpoint written by alignflow (HF layout: config.json +
model.safetensors) loads cleanly in transformers and reproduces reference logits.

    python tests/parity/check_saved.py MODEL_DIR REFERENCE_SAFETENSORS [--tol 1e-4]
    python tests/parity/check_saved.py MODEL_DIR REFERENCE_SAFETENSORS --reward [--tol 1e-4]

Causal LM mode: loads AutoModelForCausalLM, runs the reference batch
(input_ids, attention_mask, position_ids = clamp(cumsum(mask)-1, 0)) and prints
{"max_abs_diff": ..., ...} to stdout, comparing with the reference `logits`
at real-token positions (attention_mask == 1; pad-position logits are not
meaningful). Exit 0 if max_abs_diff <= tol, 1 if above.

Reward mode (--reward): loads AutoModelForSequenceClassification(num_labels=1)
and prints {"scores": [one float per row], ...}. If the reference file holds a
`scores` tensor ([B] or [B,1]) it is compared too (exit 1 above tol).

Any missing / unexpected / mismatched key or load error reported by
transformers (output_loading_info=True) is fatal: message on stderr, exit 2.
"""
import argparse
import json
import sys

import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

torch.set_num_threads(2)


def load(model_dir, reward):
    kw = dict(output_loading_info=True, dtype=torch.float32, attn_implementation="eager")
    try:
        if reward:
            model, info = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, **kw)
        else:
            model, info = AutoModelForCausalLM.from_pretrained(model_dir, **kw)
    except Exception as e:  # e.g. shape mismatches raise instead of being reported
        print(f"ERROR: transformers failed to load {model_dir}: {type(e).__name__}: {e}", file=sys.stderr)
        print(json.dumps({"error": "load_failed", "exception": f"{type(e).__name__}: {e}"}))
        sys.exit(2)
    problems = {k: sorted(map(str, v)) for k, v in info.items() if v}
    if problems:
        print(f"ERROR: transformers reported loading problems for {model_dir}:", file=sys.stderr)
        for k, v in problems.items():
            print(f"  {k} ({len(v)}):", file=sys.stderr)
            for item in v:
                print(f"    {item}", file=sys.stderr)
        print(json.dumps({"error": "loading_problems", **problems}))
        sys.exit(2)
    return model.eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("reference")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--reward", action="store_true",
                    help="load as AutoModelForSequenceClassification(num_labels=1), print scores")
    args = ap.parse_args()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    ref = load_file(args.reference)
    ids, mask = ref["input_ids"].long(), ref["attention_mask"].long()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    model = load(args.model_dir, args.reward)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()

    result = {"model_dir": args.model_dir, "reference": args.reference, "tol": args.tol,
              "transformers": transformers.__version__, "torch": torch.__version__}
    if args.reward:
        scores = out.reshape(out.shape[0], -1)[:, 0]
        result["scores"] = scores.tolist()
        if "scores" not in ref:
            print(json.dumps(result))
            return 0
        diff = (scores - ref["scores"].float().reshape(-1)).abs().max().item()
    else:
        expected = ref["logits"].float()
        if expected.shape != out.shape:
            print(json.dumps({**result, "error": "shape_mismatch",
                              "expected": list(expected.shape), "got": list(out.shape)}))
            return 1
        real = mask.bool()
        diff = (out[real] - expected[real]).abs().max().item()
        result["max_abs_diff_all_positions"] = (out - expected).abs().max().item()
    result = {"max_abs_diff": diff, "ok": diff <= args.tol, **result}
    print(json.dumps(result))
    return 0 if diff <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
