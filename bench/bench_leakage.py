"""Leakage table: the fraction of input tokens a cloud worker recovers from what it is sent.

For each split and each protection, runs the attacks of ``partition/leakage.py`` on exactly the
tensors a worker holds after decoding a step frame (``edge_worker.privacy.through_wire``: the
projection if any, the real codec, the worker's decoder), trained on the calibration text(s) and
scored on the disjoint test text, and prints the best attack per cell. A protection is a wire
dtype (fp16, bf16, int8) optionally followed by ``+dD``: the calibrated PCA reduction to D
dimensions (``edgecloud calibrate``; calibrated here on first use). ``verify`` (the worker
recomputing candidate tokens with its own copy of the layers) is costly and runs only on the
splits and protections named, on the first ``--verify-positions`` test positions.
Not a timing benchmark: the figures do not depend on machine load.

    .venv/bin/python bench/bench_leakage.py [--model smollm2-135m] [--splits 0,1,2,5,10,15,20,25]
        [--protections fp16,int8,fp16+d256,fp16+d128,fp16+d64] [--train-text F ...] [--test-text F]
        [--attacks nn,ridge,mlp] [--verify-splits 5,15,25] [--verify-protections fp16,fp16+d64] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (puts the repository root on sys.path)

from edge_worker.privacy import through_wire  # noqa: E402
from partition import leakage as L  # noqa: E402
from partition.models import resolve_model  # noqa: E402
from partition.reduction import CALIBRATION_TEXT, calibrate_many  # noqa: E402

DEFAULT_SPLITS = "0,1,2,5,10,15,20,25"
DEFAULT_PROTECTIONS = "fp16,int8,fp16+d256,fp16+d128,fp16+d64"
WIRE_DTYPES = ("fp32", "fp16", "bf16", "int8")


def parse_protection(name: str) -> tuple[str, int | None]:
    dtype, _, dims = name.partition("+d")
    if dtype not in WIRE_DTYPES or (dims and not dims.isdigit()):
        raise SystemExit(f"bad protection {name!r}: use a wire dtype ({', '.join(WIRE_DTYPES)}), "
                         "optionally +dD for a reduction to D dims, e.g. fp16+d64")
    return dtype, int(dims) if dims else None


def protection_views(source, names: list[str], splits: list[int]) -> dict[str, L.View]:
    """One View per protection: (T, H) edge activations at split k -> what the worker decodes."""
    parsed = {n: parse_protection(n) for n in names}
    all_dims = sorted({d for _, d in parsed.values() if d})
    reductions = {}
    if all_dims:
        for k in splits:
            for d, r in calibrate_many(source, k, all_dims).items():
                reductions[(k, d)] = r

    def make(dtype: str, dims: int | None) -> L.View:
        def view(hidden, k):
            reduction = reductions[(k, dims)] if dims else None
            return through_wire(hidden.unsqueeze(0), dtype, reduction)[0]  # (T, D or H)
        return view

    return {n: make(*parsed[n]) for n in names}


def markdown(cells: list[L.Cell], names: list[str], baseline: float) -> str:
    """The table as BENCHMARKS.md shows it: per cell the best of the probes (nn, ridge, mlp; on
    every test position) with its name, then ``verify`` (on its sample of positions) where it ran."""
    by = {(c.split, c.protection): c for c in cells}
    splits = sorted({c.split for c in cells})
    lines = ["| split | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for k in splits:
        row = []
        for n in names:
            c = by.get((k, n))
            if c is None:
                row.append("")
                continue
            probes = {a: s for a, s in c.scores.items() if a != "verify"}
            best = max(probes, key=lambda a: probes[a])
            text = f"{100 * probes[best]:.1f} ({best})"
            if "verify" in c.scores:
                text += f"; **verify {100 * c.scores['verify']:.1f}**"
            row.append(text)
        lines.append(f"| {k} | " + " | ".join(row) + " |")
    lines.append(f"\nGuessing the commonest calibration token everywhere recovers {100 * baseline:.1f}%.")
    return "\n".join(lines)


def render(path: Path) -> str:
    """The markdown table of a saved ``--json`` output."""
    result = json.loads(path.read_text())
    cells = [L.Cell(c["split"], c["protection"], c["dims"], c["scores"]) for c in result["cells"]]
    names = list(dict.fromkeys(c.protection for c in cells))
    return markdown(cells, names, result["majority_baseline"])


def _shown(path: Path) -> str:
    """A path as recorded in the JSON: relative to the repository when inside it."""
    try:
        return str(path.resolve().relative_to(common.ROOT))
    except ValueError:
        return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--splits", default=DEFAULT_SPLITS)
    parser.add_argument("--protections", default=DEFAULT_PROTECTIONS)
    parser.add_argument("--attacks", default=",".join(L.ATTACKS))
    parser.add_argument("--train-text", type=Path, nargs="+", default=[L.DEFAULT_TRAIN_TEXT, CALIBRATION_TEXT],
                        help="the attacker's calibration text(s); default: ours and the reduction's")
    parser.add_argument("--test-text", type=Path, default=L.DEFAULT_TEST_TEXT)
    parser.add_argument("--chunk-tokens", type=int, default=L.DEFAULT_CHUNK_TOKENS)
    parser.add_argument("--verify-splits", default="", help="splits where the verify attack also runs")
    parser.add_argument("--verify-protections", default="fp16", help="protections it runs on")
    parser.add_argument("--verify-positions", type=int, default=128, help="test positions it attacks")
    parser.add_argument("--verify-candidates", type=int, default=L.VERIFY_CANDIDATES,
                        help="candidate tokens it recomputes per position")
    parser.add_argument("--reduced-splits", default="", help="splits where +dD protections are measured "
                        "(default: all); each needs a calibration")
    parser.add_argument("--mlp-protections", default="", help="protections the MLP probe runs on (default: all)")
    parser.add_argument("--mlp-steps", type=int, default=L.MLP_STEPS)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="print the markdown table of a saved --json output, and run nothing")
    args = parser.parse_args()
    if args.render:
        print(render(args.render))
        return

    splits = [int(s) for s in args.splits.split(",") if s]
    names = [s for s in args.protections.split(",") if s]
    attacks = [a for a in args.attacks.split(",") if a]
    verify_splits = {int(s) for s in args.verify_splits.split(",") if s}
    verify_names = {s for s in args.verify_protections.split(",") if s}
    for name in names:
        parse_protection(name)
    t0 = time.perf_counter()
    source = resolve_model(args.model)
    tokenizer = source.load_tokenizer()
    reduced_splits = [int(s) for s in args.reduced_splits.split(",") if s] or splits
    mlp_names = {s for s in args.mlp_protections.split(",") if s} or set(names)
    views = protection_views(source, names, reduced_splits)
    train_par = [p for f in args.train_text for p in L.read_paragraphs(f)]
    train_chunks = L.chunk_token_ids(tokenizer, train_par, args.chunk_tokens)
    test_chunks = L.chunk_token_ids(tokenizer, L.read_paragraphs(args.test_text), args.chunk_tokens)
    train = L.collect_boundary(source, train_chunks, splits)
    test = L.collect_boundary(source, test_chunks, splits)
    emb_unit = L._unit(L.embedding_matrix(source))
    cells = []
    for k in splits:
        for name, view in views.items():
            if parse_protection(name)[1] and k not in reduced_splits:
                continue
            verify = k in verify_splits and name in verify_names
            cell_attacks = [a for a in attacks if a != "mlp" or name in mlp_names]
            cell = L.leakage_cell(k, name, view, train, test, emb_unit, cell_attacks, mlp_steps=args.mlp_steps,
                                  source=source if verify else None, verify_positions=args.verify_positions,
                                  verify_candidates=args.verify_candidates)
            cells.append(cell)
            print(f"split {k:>2} {name:>10}: " + ", ".join(f"{a} {100 * s:.1f}%" for a, s in cell.scores.items()),
                  file=sys.stderr, flush=True)
    baseline = L.majority_baseline(train, test)
    result = {
        "model": source.model_id, "train_text": [_shown(f) for f in args.train_text], "test_text": _shown(args.test_text),
        "verify_positions": args.verify_positions, "verify_candidates": args.verify_candidates,
        "mlp_steps": args.mlp_steps,
        "train_tokens": len(train.token_ids), "test_tokens": len(test.token_ids),
        "majority_baseline": baseline, "seconds": round(time.perf_counter() - t0, 1),
        "cells": [{"split": c.split, "protection": c.protection, "dims": c.dims, "scores": c.scores,
                   "best_attack": c.best_attack, "recovered": c.recovered} for c in cells],
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"model {source.model_id}; calibration {result['train_tokens']} tokens "
          f"({', '.join(f.name for f in args.train_text)}), "
          f"test {result['test_tokens']} tokens ({args.test_text.name}); {result['seconds']} s\n")
    print(markdown(cells, names, baseline))


if __name__ == "__main__":
    main()
