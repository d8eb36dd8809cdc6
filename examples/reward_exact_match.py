#!/usr/bin/env python3
"""An alignflow reward program: 1.0 when the response matches the record's
`reference` answer, else 0.0 (the protocol: `alignflow ops ppo`).

alignflow starts it once per stage and writes one JSON request a line on
stdin: {"id": 0, "prompt": "12+7=", "response": "19", "reference": "19", ...}.
It answers each, in order, with one line on stdout and flushes:
{"id": 0, "scores": {"correct": 1.0, "numeric": 1.0}} (or {"id": 0, "score": 1.0}).
Anything written to stderr goes to the stage log.

Use it as a stage input, run through python3:

    inputs: { ..., reward_program: ../examples/reward_exact_match.py }
    params: { rewards: [{ program: { interpreter: [python3] } }] }
"""
import json
import re
import sys


def normalise(text):
    """Lower case, whitespace runs as one space, no trailing period."""
    return " ".join(text.lower().split()).rstrip(".").strip()


def main():
    answered = 0
    for line in sys.stdin:
        request = json.loads(line)
        response = request["response"]
        reference = str(request["reference"])
        scores = {
            "correct": float(normalise(response) == normalise(reference)),
            # A small bonus for answering with a number at all.
            "numeric": float(re.fullmatch(r"\s*-?\d+\s*", response) is not None),
        }
        print(json.dumps({"id": request["id"], "scores": scores}), flush=True)
        answered += 1
    print(f"scored {answered} responses", file=sys.stderr)


if __name__ == "__main__":
    main()
