"""Leakage table: the fraction of input tokens a cloud worker recovers from what it is sent.

For each split and each protection, runs every attack of ``partition/leakage.py`` on exactly the
tensors a worker holds after decoding a step frame (the real wire codec's round trip), trained on
the calibration text and scored on the disjoint test text, and prints the best attack per cell.
Not a timing benchmark: the figures do not depend on machine load.

    .venv/bin/python bench/bench_leakage.py [--model smollm2-135m] [--splits 0,1,2,5,10,15,20,25]
        [--protections fp16,bf16] [--train-text F] [--test-text F] [--attacks nn,ridge,mlp] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402,F401  (puts the repository root on sys.path)

from broker.codec import decode_tensor, encode_tensor  # noqa: E402
from partition import leakage as L  # noqa: E402
from partition.models import resolve_model  # noqa: E402

DEFAULT_SPLITS = "0,1,2,5,10,15,20,25"


def wire_view(wire_dtype: str) -> L.View:
    """What a worker holds after ``open_step`` decodes a frame sent in ``wire_dtype``."""

    def view(hidden, k):
        meta, data = encode_tensor(hidden, wire_dtype)
        return decode_tensor(meta, bytes(data))

    return view


def protections(names: list[str]) -> dict[str, L.View]:
    out = {}
    for name in names:
        if name in ("fp32", "fp16", "bf16"):
            out[name] = wire_view(name)
        else:
            raise SystemExit(f"unknown protection {name!r}; available: fp32, fp16, bf16")
    return out


def markdown(cells: list[L.Cell], names: list[str], baseline: float) -> str:
    by = {(c.split, c.protection): c for c in cells}
    splits = sorted({c.split for c in cells})
    lines = ["| split | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for k in splits:
        row = []
        for n in names:
            c = by.get((k, n))
            row.append("" if c is None else f"{100 * c.recovered:.1f}% ({c.best_attack})")
        lines.append(f"| {k} | " + " | ".join(row) + " |")
    lines.append(f"\nGuessing the commonest calibration token everywhere recovers {100 * baseline:.1f}%.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--splits", default=DEFAULT_SPLITS)
    parser.add_argument("--protections", default="fp16,bf16")
    parser.add_argument("--attacks", default=",".join(L.ATTACKS))
    parser.add_argument("--train-text", type=Path, default=L.DEFAULT_TRAIN_TEXT)
    parser.add_argument("--test-text", type=Path, default=L.DEFAULT_TEST_TEXT)
    parser.add_argument("--chunk-tokens", type=int, default=L.DEFAULT_CHUNK_TOKENS)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args()

    splits = [int(s) for s in args.splits.split(",") if s]
    names = [s for s in args.protections.split(",") if s]
    attacks = [a for a in args.attacks.split(",") if a]
    views = protections(names)
    t0 = time.perf_counter()
    source = resolve_model(args.model)
    tokenizer = source.load_tokenizer()
    train_chunks = L.chunk_token_ids(tokenizer, L.read_paragraphs(args.train_text), args.chunk_tokens)
    test_chunks = L.chunk_token_ids(tokenizer, L.read_paragraphs(args.test_text), args.chunk_tokens)
    train = L.collect_boundary(source, train_chunks, splits)
    test = L.collect_boundary(source, test_chunks, splits)
    emb_unit = L._unit(L.embedding_matrix(source))
    cells = []
    for k in splits:
        for name, view in views.items():
            cell = L.leakage_cell(k, name, view, train, test, emb_unit, attacks)
            cells.append(cell)
            print(f"split {k:>2} {name:>10}: " + ", ".join(f"{a} {100 * s:.1f}%" for a, s in cell.scores.items()),
                  file=sys.stderr, flush=True)
    baseline = L.majority_baseline(train, test)
    result = {
        "model": source.model_id, "train_text": str(args.train_text), "test_text": str(args.test_text),
        "train_tokens": len(train.token_ids), "test_tokens": len(test.token_ids),
        "majority_baseline": baseline, "seconds": round(time.perf_counter() - t0, 1),
        "cells": [{"split": c.split, "protection": c.protection, "dims": c.dims, "scores": c.scores,
                   "best_attack": c.best_attack, "recovered": c.recovered} for c in cells],
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"model {source.model_id}; calibration {result['train_tokens']} tokens ({args.train_text.name}), "
          f"test {result['test_tokens']} tokens ({args.test_text.name}); {result['seconds']} s\n")
    print(markdown(cells, names, baseline))


if __name__ == "__main__":
    main()
