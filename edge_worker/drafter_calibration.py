"""Training the self-drafter's adapter on the main model's own generations.

Early exit applies the final norm and LM head to the hidden state after layer ``k``; the head was
trained on the last layer's output, so the guess is poor at shallow splits. A residual linear map
``h + W h + b`` trained to make that guess agree with the main model's greedy token recovers much
of the gap at the cost of one H x H matrix-vector product per draft.

Data: the main model answers the calibration prompts greedily (``data/drafter_prompts.txt`` plus
prompts drawn from the templates and topics in ``data/drafter_prompt_parts.json``, all shipped with
the package), in batches; then, teacher-forced on each answer, we keep the layer-``k`` hidden state
at every generated position and the main model's next token there. An eighth of the prompts is
held out, and the held-out agreement before and after training is reported and stored with the
adapter.

The drafter's head is restricted to the tokens the model produced in that text (its *vocabulary*,
a few thousand of SmolLM2's 49k): a guess outside it would almost never be right, and the head's
cost falls with its rows.

The adapter is data-limited: on SmolLM2 at split 15, measured on the generated positions of 8
prompts outside the calibration set, 2.2k positions gave 31.5% agreement, 6.7k 36.7% and 52k
(the default: 456 prompts) 40.5%; prompt lookup first, as the pipelined self-drafter guesses,
45.0% (``bench/bench_drafter_ceiling.py``). Teacher-forcing it on other text instead (40k positions of Python's documentation) gave
17.8%: it must see the model's own answers.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import torch

from edge_worker.drafting import DrafterAdapter, SelfDrafter, adapter_path, save_adapter
from partition.models import ModelSource
from partition.segment import ModelSegment
from partition.tokens import encode_prompt, eos_token_ids

log = logging.getLogger(__name__)

Answers = list[tuple[list[int], list[int]]]  # (prompt ids, greedy answer ids) per prompt


def _data(name: str) -> str:
    return resources.files("edge_worker").joinpath(f"data/{name}").read_text(encoding="utf-8")


def calibration_prompts(drawn: int = 0, seed: int = 0) -> list[str]:
    """The shipped calibration prompts, plus ``drawn`` distinct ones filled in from the shipped
    templates with a fixed seed."""
    shipped = [line.strip() for line in _data("drafter_prompts.txt").splitlines() if line.strip()]
    parts = json.loads(_data("drafter_prompt_parts.json"))
    rng = random.Random(seed)
    out: dict[str, None] = {}
    while len(out) < drawn:
        if rng.random() < 0.12:
            prompt = rng.choice(parts["task_templates"]).format(task=rng.choice(parts["tasks"]))
        else:
            topic, other = rng.sample(parts["topics"], 2)
            prompt = rng.choice(parts["templates"]).format(topic=topic, other=other)
        out.setdefault(prompt)
    return shipped + list(out)


@torch.inference_mode()
def generate_answers(source: ModelSource, tokenizer, prompts: list[str], new_tokens: int, batch: int = 24,
                     progress: Callable[[str], None] = lambda _: None) -> Answers:
    """The main model's greedy answers, ``batch`` prompts at a time (transformers' generate, left
    padded); an answer ends at its first end-of-sequence token. ``batch=1`` pads nothing, so the
    answers are the ones a generation would give."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source.directory, dtype=torch.float32).eval()
    eos = eos_token_ids(source, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))  # similar lengths pad least
    answers: dict[int, tuple[list[int], list[int]]] = {}
    for lo in range(0, len(order), batch):
        progress(f"generating calibration answers {lo + 1}-{min(lo + batch, len(order))}/{len(order)}")
        group = order[lo:lo + batch]
        width = max(len(encoded[i]) for i in group)
        ids = torch.tensor([[pad] * (width - len(encoded[i])) + encoded[i] for i in group])
        mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in group])
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=pad, temperature=None, top_p=None, top_k=None)
        for row, i in enumerate(group):
            answer = []
            for token in out[row, width:].tolist():
                answer.append(token)
                if token in eos:
                    break
            answers[i] = (encoded[i], answer)
    return [answers[i] for i in range(len(prompts))]


@torch.inference_mode()
def positions(lower: ModelSegment, upper: ModelSegment, answers: Answers) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden at layer k (P, H), the main model's greedy next token (P,)) at every position a
    drafter is asked about: those holding a generated token, after the first (the cloud answers
    the prompt's last position; nobody drafts it). Teacher-forced on each answer; ``lower`` holds
    layers [0, k), ``upper`` layers [k, N) and the head."""
    hiddens, targets = [], []
    for prompt, answer in answers:
        if len(answer) < 2:
            continue
        ids = prompt + answer[:-1]
        h = lower(torch.tensor([ids]), lower.new_cache(), logits="none").hidden
        first = len(prompt)  # the first generated token's position
        logits = upper(h, upper.new_cache(), logits=len(ids) - first).logits[0]
        hiddens.append(h[0, first:].float())
        targets.append(logits.argmax(-1))
    if not hiddens:
        raise ValueError("the calibration answers are too short to train on")
    return torch.cat(hiddens), torch.cat(targets)


def agreement(adapter: DrafterAdapter | None, head: ModelSegment, hidden: torch.Tensor,
              targets: torch.Tensor) -> float:
    """Fraction of positions where the drafter's top-1 guess (through its vocabulary, when the
    adapter has one) equals the main model's token."""
    drafter = SelfDrafter(head.norm, head.lm_head, adapter)
    hits = 0
    for lo in range(0, hidden.shape[0], 512):
        hits += int((drafter.guesses(hidden[lo:lo + 512]) == targets[lo:lo + 512]).sum())
    return hits / max(1, hidden.shape[0])


def fit_adapter(head: ModelSegment, hidden_size: int, hidden: torch.Tensor, targets: torch.Tensor, epochs: int,
                progress: Callable[[str], None] = lambda _: None) -> DrafterAdapter:
    """Train an adapter so that ``head``'s norm and LM head (frozen) map ``hidden`` (layer k) to
    ``targets`` (the main model's tokens); its vocabulary is the set of targets. Returned in eval
    mode. Seed torch first to repeat it."""
    adapter = DrafterAdapter(hidden_size)
    vocab = torch.unique(targets)
    rows = head.lm_head.weight[vocab]  # (V', H): the head's rows for the vocabulary, taken once
    index = torch.full((int(vocab.max()) + 1,), -1, dtype=torch.long)
    index[vocab] = torch.arange(len(vocab))
    labels = index[targets]
    opt = torch.optim.Adam(adapter.parameters(), lr=1e-3, weight_decay=1e-4)
    batch = 512
    for epoch in range(epochs):
        order = torch.randperm(hidden.shape[0])
        total = 0.0
        for lo in range(0, len(order), batch):
            idx = order[lo:lo + batch]
            loss = torch.nn.functional.cross_entropy(head.norm(adapter(hidden[idx])) @ rows.T, labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        progress(f"epoch {epoch + 1}/{epochs}: loss {total / len(order):.3f}")
    adapter.vocab = vocab
    return adapter.eval()


def train_adapter(source: ModelSource, split: int, new_tokens: int = 128, epochs: int = 8, prompts: int = 400,
                  seed: int = 0, progress: Callable[[str], None] = lambda _: None
                  ) -> tuple[DrafterAdapter, dict]:
    """``prompts``: calibration prompts drawn from the templates, beyond the shipped ones."""
    if not 0 < split < source.n_layers:
        raise ValueError(f"the self-drafter needs a split between 1 and {source.n_layers - 1}, got {split}")
    torch.manual_seed(seed)
    texts = calibration_prompts(prompts, seed)
    random.Random(seed).shuffle(texts)
    held, train = texts[: max(1, len(texts) // 8)], texts[max(1, len(texts) // 8):]
    t0 = time.perf_counter()
    tokenizer = source.load_tokenizer()
    answers = generate_answers(source, tokenizer, train + held, new_tokens, progress=progress)
    lower = ModelSegment.load(source, 0, split, head=False)
    # Layers [k, N) and the head: they make the targets, and the adapter trains through the norm and
    # LM head (frozen).
    head = ModelSegment.load(source, split, source.n_layers, embed=False, head=True)
    for p in head.parameters():
        p.requires_grad_(False)
    progress("running the calibration answers through the model")
    h_train, y_train = positions(lower, head, answers[:len(train)])
    h_test, y_test = positions(lower, head, answers[len(train):])
    before = agreement(None, head, h_test, y_test)
    adapter = fit_adapter(head, source.hidden_size, h_train, y_train, epochs, progress)
    after = agreement(adapter, head, h_test, y_test)
    metrics = {"heldout_agreement_before": round(before, 4), "heldout_agreement_after": round(after, 4),
               "train_positions": int(h_train.shape[0]), "heldout_positions": int(h_test.shape[0]),
               "prompts": len(texts), "vocabulary": int(len(adapter.vocab)),
               "seconds": round(time.perf_counter() - t0, 1)}
    return adapter, metrics


def calibrate_drafter(source: ModelSource, split: int, out: Path | None, directory: Path,
                      progress: Callable[[str], None] = lambda _: None, **kwargs) -> tuple[Path, dict]:
    adapter, metrics = train_adapter(source, split, progress=progress, **kwargs)
    path = out or adapter_path(directory, source.model_id, split)
    save_adapter(adapter, path, source.model_id, split, metrics)
    return path, metrics
