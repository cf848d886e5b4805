"""How often can a drafter on the edge guess the main model's next token? No network, no timing.

The mini-LLM's speed-up at a long round trip is bounded by how often its guesses are right (each
wrong guess costs a round trip). This measures top-1 agreement with the main model's greedy token
on the *generated* positions of prompts outside the drafter's calibration set, for:

* early exit: layers [0, K), the final norm and the LM head;
* the self-drafter's adapter as installed (``edgecloud calibrate --drafter``), if there is one;
* adapters trained here on the model's own answers to the 56 shipped calibration prompts, with
  ``--tokens`` tokens per prompt, and to those plus ``--drawn`` prompts drawn from the shipped
  templates (128 tokens each: what ``calibrate --drafter`` does by default), and one trained on
  teacher-forced text instead (Python's documentation, ``--doc-positions`` positions: other text);
* layer skipping (self-speculative decoding): the whole model with some layers left out.

    .venv/bin/python bench/bench_drafter_ceiling.py [--split 15] [--tokens 40 120] [--drawn 400] [--epochs 8]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PROMPTS  # noqa: E402

import cli  # noqa: E402,F401  (the OpenMP defaults, set before torch loads)

# isort: split
import torch  # noqa: E402

from edge_worker.drafter_calibration import (  # noqa: E402
    agreement,
    calibration_prompts,
    fit_adapter,
    generate_answers,
    positions,
)
from edge_worker.drafting import DrafterError, LookupDrafter, SelfDrafter, adapter_path, load_adapter  # noqa: E402
from edge_worker.mini_llm import default_adapters_dir  # noqa: E402
from partition.models import resolve_model  # noqa: E402
from partition.segment import ModelSegment  # noqa: E402

EVAL_PROMPTS = [*PROMPTS, "What is the capital of France and why is it famous?", "Give me a recipe for pancakes.",
                "Describe how a bicycle works.", "Why do cats purr?", "Summarize the plot of Romeo and Juliet."]
EVAL_TOKENS = 64


@torch.inference_mode()
def teacher_forced(lower, upper, ids, positions, chunk=256):
    hs, ys = [], []
    for lo in range(0, min(len(ids), positions), chunk):
        h = lower(torch.tensor([ids[lo:lo + chunk]]), lower.new_cache(), logits="none").hidden
        hs.append(h[0].float())
        ys.append(upper(h, upper.new_cache(), logits="all").logits[0].argmax(-1))
    return torch.cat(hs), torch.cat(ys)


def guessing_as_run(adapter, upper, answers, hidden, targets) -> dict[str, float]:
    """How ``--mini self`` guesses when pipelined: a prompt-lookup match of 2 tokens or more
    first, the adapter otherwise (the same SelfDrafter the edge builds); and lookup alone where it
    matches."""
    drafter = SelfDrafter(upper.norm, upper.lm_head, adapter, lookup=LookupDrafter(min_ngram=2))
    contexts = [ids[:pos + 1] for ids, start in ((p + a[:-1], len(p)) for p, a in answers if len(a) >= 2)
                for pos in range(start, len(ids))]
    assert len(contexts) == len(targets)
    hits = matched = lookup_hits = 0
    for context, h, y in zip(contexts, hidden, targets.tolist(), strict=True):
        hits += drafter.guess(context, h)[0] == y
        found = drafter.lookup.guess(context, h)
        if found:
            matched += 1
            lookup_hits += found[0] == y
    return {"installed adapter, prompt lookup first (as --mini self guesses, pipelined)": hits / len(contexts),
            f"prompt lookup alone, where it matches ({matched / len(contexts):.0%} of positions)":
                lookup_hits / max(1, matched)}


def train(upper, hidden_size, h, y, epochs):
    torch.manual_seed(0)
    return fit_adapter(upper, hidden_size, h, y, epochs)


@torch.inference_mode()
def skip_agreement(full: ModelSegment, keep: list[int], sequences) -> float:
    """Top-1 agreement of the model with only the ``keep`` layers, teacher-forced on the main
    model's own greedy sequences, at generated positions."""
    layers, windows = list(full.layers), list(full.windows)
    full.layers = torch.nn.ModuleList(layers[i] for i in keep)
    full.windows = [windows[i] for i in keep]
    try:
        hits = total = 0
        for prompt_ids, out in sequences:
            logits = full(torch.tensor([prompt_ids + out[:-1]]), full.new_cache(), logits="all").logits[0]
            pred = logits.argmax(-1)[len(prompt_ids):]
            hits += int((pred == torch.tensor(out[1:])).sum())
            total += len(out) - 1
        return hits / total
    finally:
        full.layers, full.windows = torch.nn.ModuleList(layers), windows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--split", type=int, default=15)
    ap.add_argument("--tokens", type=int, nargs="+", default=[40, 120], help="calibration tokens per prompt")
    ap.add_argument("--drawn", type=int, default=400, help="prompts drawn from the templates (0: no such row)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--doc-positions", type=int, default=40_000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    t0 = time.perf_counter()
    source = resolve_model(args.model)
    tokenizer = source.load_tokenizer()
    k, n, width = args.split, source.n_layers, source.hidden_size
    lower = ModelSegment.load(source, 0, k, head=False)
    upper = ModelSegment.load(source, k, n, embed=False, head=True)
    for p in upper.parameters():
        p.requires_grad_(False)
    # One prompt at a time: no padding, so these are the answers a generation gives.
    eval_answers = generate_answers(source, tokenizer, EVAL_PROMPTS, EVAL_TOKENS, batch=1)
    h_eval, y_eval = positions(lower, upper, eval_answers)
    rows: dict[str, float] = {"early exit": agreement(None, upper, h_eval, y_eval)}
    try:
        installed = load_adapter(adapter_path(default_adapters_dir(), source.model_id, k), source.model_id, k, width)
        rows["installed adapter"] = agreement(installed, upper, h_eval, y_eval)
        rows.update(guessing_as_run(installed, upper, eval_answers, h_eval, y_eval))
    except DrafterError:
        pass
    data = [(f"shipped prompts, {tokens} tokens/prompt", calibration_prompts(), tokens) for tokens in args.tokens]
    if args.drawn:
        data.append((f"{56 + args.drawn} prompts, 128 tokens/prompt", calibration_prompts(args.drawn), 128))
    for label, prompts, tokens in data:
        h, y = positions(lower, upper, generate_answers(source, tokenizer, prompts, tokens))
        adapter = train(upper, width, h, y, args.epochs)
        covered = float(torch.isin(y_eval, adapter.vocab).float().mean())
        rows[f"adapter, own answers, {label} ({len(y)} positions; vocabulary {len(adapter.vocab)}, "
             f"covers {covered:.0%})"] = agreement(adapter, upper, h_eval, y_eval)
    if args.doc_positions:
        import pydoc_data.topics as topics

        text = "\n\n".join(topics.topics[name] for name in sorted(topics.topics))
        h, y = teacher_forced(lower, upper, tokenizer(text)["input_ids"], args.doc_positions)
        adapter = train(upper, width, h, y, max(1, args.epochs // 4))
        rows[f"adapter, Python docs teacher-forced ({len(y)} positions)"] = agreement(adapter, upper, h_eval, y_eval)
    del lower, upper
    full = ModelSegment.load(source, 0, n)
    upper_layers = list(range(k, n))
    skips = {
        f"layers [0, {k}) and every 2nd upper layer": list(range(k)) + upper_layers[1::2],
        f"layers [0, {k}) and every 3rd upper layer": list(range(k)) + upper_layers[::3],
        f"layers [0, {k}) and the last 4": list(range(k)) + upper_layers[-4:],
        f"all but 2 layers ({k + 5}, {k + 9})": [i for i in range(n) if i not in (k + 5, k + 9)],
    }
    for name, keep in skips.items():
        rows[f"skip: {name}"] = skip_agreement(full, keep, eval_answers)
    result = {"model": args.model, "split": k, "eval_positions": len(y_eval),
              "agreement": rows, "seconds": round(time.perf_counter() - t0)}  # fmt: skip
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.model}, split {k}: top-1 agreement with the main model on {len(y_eval)} generated positions "
          f"of {len(EVAL_PROMPTS)} prompts ({result['seconds']} s)")
    for name, value in rows.items():
        print(f"  {name:66} {value:6.1%}")


if __name__ == "__main__":
    main()
