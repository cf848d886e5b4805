"""What the wire codecs and dimensionality reduction cost in output quality (not timing).

For each split, codec and reduction size the activations take exactly the path of a real session
(``edge_worker.privacy.worker_input``: projection, codec, the worker's decoder, reconstruction)
between the edge's layers [0, k) and the worker's [k, N), all in this process. Against the
unmodified model (every layer, fp32, no codec) it measures:

* bytes/token: the sealed step body (XChaCha20-Poly1305, as sent) of one decode step, averaged
  over the generated positions (int8's size varies with the number of outlier channels);
* top-1 agreement: teacher-forced, over every position of prompt + reference continuation (the
  whole text crosses the wire as one prefill step);
* greedy match: how many generated tokens equal the reference before the first difference
  (the mean over prompts, and how many prompts stay identical to the reference, which ends at
  end-of-sequence or after --tokens). Computed by replaying the reference's own steps through the
  codec (see match_length; --exact runs every configuration token by token instead).

Projections come from the shipped calibration text, never from the prompts measured here. To
measure on other text: --prompts-file FILE (one prompt per line).

    .venv/bin/python bench/bench_privacy_quality.py [--splits 5,15,25] [--codecs fp16,bf16,int8]
        [--dims 0,64,128,256,384] [--tokens 64] [--prompts-file F] [--reductions DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PROMPTS  # noqa: E402

# The benchmark prompts plus more of other kinds, so a mean over prompts means something.
QUALITY_PROMPTS = [
    *PROMPTS,
    "What is the difference between a virus and a bacterium?",
    "Give me three tips for learning a new language.",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "How does a refrigerator keep food cold?",
    "Write a Python function that reverses a string.",
    "What should I pack for a weekend hiking trip?",
    "Why do cats purr?",
    "Explain what a neural network is to a ten-year-old.",
    "Translate 'good morning, how are you?' into Spanish.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--splits", default="5,15,25")
    parser.add_argument("--codecs", default="fp16,bf16,int8")
    parser.add_argument("--dims", default="0,64,128,256,384", help="0: no reduction")
    parser.add_argument("--tokens", type=int, default=64, help="greedy tokens per prompt")
    parser.add_argument("--prompts-file", type=Path, help="one prompt per line (default: the built-in set)")
    parser.add_argument("--reductions", type=Path, help="projection files (default: the edge's default)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--exact", action="store_true", help="greedy match by a token-by-token run per "
                        "configuration (slow) instead of replaying the reference's steps in one batch")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args()

    import torch

    from broker.wire.crypto import SessionCipher, generate_keypair
    from partition.models import resolve_model
    from partition.reduction import calibrate_many, default_reductions_dir
    from partition.segment import ModelSegment
    from partition.tokens import encode_prompt, eos_token_ids

    torch.set_num_threads(args.threads)
    source = resolve_model(args.model)
    tokenizer = source.load_tokenizer()
    eos = eos_token_ids(source, tokenizer)
    n = source.n_layers
    prompts = (args.prompts_file.read_text(encoding="utf-8").splitlines() if args.prompts_file
               else QUALITY_PROMPTS)
    prompts = [p for p in prompts if p.strip()]
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    splits = [int(s) for s in args.splits.split(",")]
    codecs = args.codecs.split(",")
    dims_list = [int(d) for d in args.dims.split(",")]
    reductions_dir = args.reductions or default_reductions_dir()
    wk, ek = generate_keypair(), generate_keypair()
    cipher = SessionCipher.for_edge(ek.secret_key, wk.public_key, "q" * 32, bytes(16))

    rows = []
    replay_checks: dict[int, bool] = {}  # split -> the batched replay reproduced the reference
    t_start = time.perf_counter()
    for k in splits:
        edge = ModelSegment.load(source, 0, k)
        rest = ModelSegment.load(source, k, n, embed=False)
        reductions = calibrate_many(source, k, [d for d in dims_list if d], reductions_dir, edge)

        runs = [reference_run(edge, rest, ids, args.tokens, eos) for ids in prompt_ids]
        refs = [tokens for tokens, _ in runs]
        full = [ids + ref for ids, ref in zip(prompt_ids, refs, strict=True)]
        with torch.inference_mode():
            hidden = [edge(torch.tensor([s]), edge.new_cache(), logits="none").hidden for s in full]
            ref_top1 = [rest(h, rest.new_cache(), logits="all").logits.argmax(-1) for h in hidden]
        if not args.exact:
            # The batched replay below must reproduce the incremental reference exactly.
            replayed = [match_length(rest, steps, ref, Exact()) for ref, (_, steps) in zip(refs, runs, strict=True)]
            replay_checks[k] = replayed == [len(r) for r in refs]
            if not replay_checks[k]:
                print(f"warning: split {k}: batched replay differs from the incremental reference "
                      f"({replayed}); rerun with --exact", file=sys.stderr)

        for dims in dims_list:
            reduction = reductions.get(dims)
            for codec in codecs:
                wire = Wire(codec, reduction, cipher)
                agree = total = 0
                with torch.inference_mode():
                    for h, ref in zip(hidden, ref_top1, strict=True):
                        got = rest(wire(h), rest.new_cache(), logits="all").logits.argmax(-1)
                        agree += int((got == ref).sum())
                        total += ref.numel()
                # The decode steps of the reference runs, each as its own step body.
                decode_steps = [h for _, steps in runs for h in steps[1:]]
                tensor_sizes = [wire.tensor_bytes(h) for h in decode_steps]
                sizes = [wire.bytes(h) for h in decode_steps]
                if args.exact:
                    matches = []
                    for ids, ref in zip(prompt_ids, refs, strict=True):
                        out = greedy(edge, rest, ids, wire, len(ref), eos, reference=ref)
                        matches.append(next((i for i, (a, b) in enumerate(zip(out, ref, strict=False)) if a != b),
                                            min(len(out), len(ref))))
                else:
                    matches = [match_length(rest, steps, ref, wire) for ref, (_, steps) in zip(refs, runs, strict=True)]
                row = {
                    "split": k, "codec": codec, "dims": dims or source.hidden_size, "reduced": bool(dims),
                    "bytes_per_token": round(sum(sizes) / len(sizes), 1) if sizes else None,
                    "tensor_bytes_per_token": round(sum(tensor_sizes) / len(tensor_sizes), 1) if sizes else None,
                    "top1_agreement": round(agree / total, 4),
                    "greedy_match_mean": round(sum(matches) / len(matches), 1),
                    "identical": sum(m == len(r) for m, r in zip(matches, refs, strict=True)),
                    "matches": [f"{m}/{len(r)}" for m, r in zip(matches, refs, strict=True)],
                    "prompts": len(prompts),
                    "explained": round(reduction.explained, 5) if reduction else 1.0,
                }
                rows.append(row)
                if not args.json:
                    print(json.dumps(row), file=sys.stderr, flush=True)
    result = {
        "model": source.model_id, "tokens": args.tokens, "prompts": len(prompts),
        "reference_tokens_mean": round(sum(map(len, refs)) / len(refs), 1), "seconds": round(time.perf_counter() - t_start, 1),
        "mode": "exact" if args.exact else "replay", "replay_reproduces_reference": replay_checks, "rows": rows,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(render(rows, result["reference_tokens_mean"]))


class Exact:
    """The unmodified model: activations pass as they are."""

    def __call__(self, h):
        return h


class Wire:
    """What a real session does to the activations between the edge's and the worker's layers."""

    def __init__(self, codec: str, reduction, cipher) -> None:
        self.codec, self.reduction, self.cipher = codec, reduction, cipher

    def __call__(self, h):
        from edge_worker.privacy import worker_input

        return worker_input(h, self.codec, self.reduction)  # (1, T, H)

    def bytes(self, h) -> int:
        from broker.wire.session_protocol import seal_step

        wire = self.reduction.project(h) if self.reduction else h
        return sum(len(memoryview(f)) for f in seal_step(self.cipher, "q" * 32, 1, 0, wire, self.codec))

    def tensor_bytes(self, h) -> int:
        from broker.wire.codec import encode_tensor

        return encode_tensor(self.reduction.project(h) if self.reduction else h, self.codec)[1].nbytes


def reference_run(edge, rest, ids, limit: int, eos: set[int]) -> tuple[list[int], list]:
    """The unmodified model's greedy tokens, and the edge activations of each step as a session
    sends them: (1, P, H) for the prompt, then (1, 1, H) per token."""
    import torch

    ec, rc = edge.new_cache(), rest.new_cache()
    x = torch.tensor([ids])
    tokens, steps = [], []
    with torch.inference_mode():
        for _ in range(limit):
            h = edge(x, ec, logits="none").hidden  # (1, T, H)
            steps.append(h)
            token = int(rest(h, rc).logits[0, -1].argmax())
            tokens.append(token)
            if token in eos:
                break
            x = torch.tensor([[token]])
    return tokens, steps


def match_length(rest, steps, reference: list[int], transform) -> int:
    """Tokens a greedy run through ``transform`` shares with ``reference`` before the first
    difference. Until then the run feeds the edge exactly the reference tokens, so its edge
    activations are exactly the reference's ``steps``: each step is transformed on its own, as it
    would be sent, and the worker side runs the prompt step, then every decode step in one batch
    (the same computation as one step at a time, up to float summation order, which the
    reference check in main() confirms changes no token)."""
    import torch

    with torch.inference_mode():
        rc = rest.new_cache()
        first = rest(transform(steps[0]), rc).logits[0, -1].argmax()
        preds = [int(first)]
        if len(steps) > 1:
            rows = torch.cat([transform(h) for h in steps[1:]], dim=1)  # (1, n - 1, H)
            preds += rest(rows, rc, logits="all").logits[0].argmax(-1).tolist()
    return next((i for i, (a, b) in enumerate(zip(preds, reference, strict=True)) if a != b), len(reference))


def greedy(edge, rest, ids, transform, limit: int, eos: set[int], reference=None) -> list[int]:
    """Greedy tokens: a prefill of the prompt, then one token per step as in a real session,
    stopping at end-of-sequence or at the first difference from ``reference``."""
    import torch

    ec, rc = edge.new_cache(), rest.new_cache()
    x = torch.tensor([ids])
    out = []
    with torch.inference_mode():
        for step in range(limit):
            h = edge(x, ec, logits="none").hidden  # (1, T, H)
            token = int(rest(transform(h), rc).logits[0, -1].argmax())
            out.append(token)
            if reference is not None and token != reference[step]:
                break
            if token in eos:
                break
            x = torch.tensor([[token]])
    return out


def render(rows: list[dict], reference_mean: float) -> str:
    lines = [
        f"| split | codec | dims | tensor B/token | sealed step B/token | top-1 agreement | "
        f"greedy match (of {reference_mean}) | identical |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['split']} | {r['codec']} | {r['dims']}{'' if r['reduced'] else ' (full)'} | "
            f"{r['tensor_bytes_per_token']} | {r['bytes_per_token']} | {100 * r['top1_agreement']:.1f}% | {r['greedy_match_mean']} | "
            f"{r['identical']}/{r['prompts']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
