#!/usr/bin/env python3
"""Writes the data of pipelines/grpo-arith.yaml (run from this folder):

- facts.txt: the 100 sums a+b=c of two digits, in eight seeded shuffles,
  three sums a line ("2+3=5 0+8=8 1+1=2"). A model pretrained on it learns
  the sums, and learns that a sum is usually followed by another one rather
  than by the end of the text, so the base model often goes on after its
  answer: what GRPO with `exact_match` teaches it not to do, a skill that
  carries over to prompts it never trained on.
- train.jsonl: the 70 prompts "a+b=" GRPO trains on, with their `reference`.
- heldout.jsonl: the other 30, each four times (120 answers sampled at
  temperature 1 make the accuracy's interval narrow enough to compare).
"""
import json
import random

HELDOUT = ["0+0", "0+1", "0+2", "1+0", "1+4", "1+6", "2+1", "2+2", "2+4", "2+5",
           "2+6", "3+2", "3+3", "3+8", "4+4", "4+7", "4+8", "4+9", "5+1", "6+1",
           "7+3", "7+6", "7+8", "7+9", "8+1", "8+2", "8+4", "9+3", "9+4", "9+9"]
ASKED = 4


def main():
    sums = {f"{a}+{b}": str(a + b) for a in range(10) for b in range(10)}
    facts = [f"{q}={c}" for q, c in sums.items()]
    rng = random.Random(0)
    lines = []
    for _ in range(8):
        order = facts[:]
        rng.shuffle(order)
        lines += [" ".join(order[i:i + 3]) for i in range(0, len(order), 3)]
    with open("facts.txt", "w") as f:
        f.writelines(line + "\n" for line in lines)
    record = lambda q: json.dumps({"prompt": q + "=", "reference": sums[q]}) + "\n"
    with open("train.jsonl", "w") as f:
        f.writelines(record(q) for q in sums if q not in HELDOUT)
    with open("heldout.jsonl", "w") as f:
        f.writelines(record(q) for _ in range(ASKED) for q in HELDOUT)


if __name__ == "__main__":
    main()
