"""Write the inputs that the configs in configs/tiny/ read, under --root (default: here).

- ``tiny-model/``: a randomly initialised tiny Qwen2 chat model (ChatML
  template, byte-level BPE trained on the rows below), about 0.2M parameters;
- ``data/tiny/train.jsonl`` and ``data/tiny/eval.jsonl``: ranking rows
  ({system, context, target, meta.candidates}) that the ``inverse_rank``
  grader scores;
- ``data/tiny/facts.jsonl``: ``{"text": ...}`` rows, the SFT config's
  ``data.text_data``.

Run it from the repository root, then any tiny config, for example::

    python tools/make_tiny.py
    npu-rft train --config configs/tiny/grpo_lora_cpu.yaml

A random model learns nothing useful: these files exist to try commands and
launchers (torchrun, resume, export) in seconds on CPU. ``npu-rft quickstart``
is the run that learns.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from npu_rft.quickstart.tiny_model import TinyModelSpec, build_model, build_tokenizer

# Each disease with the symptoms that point to it.
DISEASES = {
    "flu": ["fever", "cough", "aches"],
    "cold": ["sneezing", "cough", "sore throat"],
    "measles": ["rash", "fever", "red eyes"],
    "migraine": ["headache", "nausea", "light sensitivity"],
    "gout": ["joint pain", "swelling", "redness"],
    "asthma": ["wheezing", "breathlessness", "cough"],
}
SYSTEM = "Rank the candidate diseases from most to least likely. Reply with JSON only."


def case_rows(n: int, seed: int) -> list:
    """``n`` ranking rows: two symptoms of the target, 3 candidates in a random order."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        target = rng.choice(sorted(DISEASES))
        symptoms = rng.sample(DISEASES[target], 2)
        candidates = [target] + rng.sample([d for d in sorted(DISEASES) if d != target], 2)
        rng.shuffle(candidates)
        rows.append({
            "system": SYSTEM,
            "context": f"Symptoms: {', '.join(symptoms)}.\nCandidates: {json.dumps(candidates)}",
            "target": target,
            "meta": {"id": f"tiny-{seed}-{i}", "candidates": candidates},
        })
    return rows


def fact_rows() -> list:
    return [{"text": f"{name} often shows {', '.join(symptoms)}."} for name, symptoms in sorted(DISEASES.items())]


def write_jsonl(path: Path, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def make_tiny(root: Path, *, train_rows: int = 32, eval_rows: int = 8, seed: int = 0) -> dict:
    """Write the model and the three data files under ``root``; return their paths."""
    data = root / "data" / "tiny"
    paths = {"model": root / "tiny-model", "train": data / "train.jsonl", "eval": data / "eval.jsonl",
             "facts": data / "facts.jsonl"}
    train, held_out, facts = case_rows(train_rows, seed), case_rows(eval_rows, seed + 1), fact_rows()
    write_jsonl(paths["train"], train)
    write_jsonl(paths["eval"], held_out)
    write_jsonl(paths["facts"], facts)
    texts = [row["system"] + "\n" + row["context"] for row in train] + [row["text"] for row in facts]
    texts.append(json.dumps({"possible_diseases": sorted(DISEASES)}))
    spec = TinyModelSpec(bpe_vocab_size=400, hidden_size=64, intermediate_size=128, seed=seed)
    tokenizer = build_tokenizer(texts, sorted(DISEASES), spec.bpe_vocab_size)
    model = build_model(tokenizer, spec)
    tokenizer.save_pretrained(paths["model"])
    model.save_pretrained(paths["model"])
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("."), help="where tiny-model/ and data/tiny/ go")
    parser.add_argument("--train-rows", type=int, default=32)
    parser.add_argument("--eval-rows", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = make_tiny(args.root, train_rows=args.train_rows, eval_rows=args.eval_rows, seed=args.seed)
    for name, path in paths.items():
        print(f"wrote {name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
