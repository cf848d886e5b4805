"""Training the self-drafter's adapter on the main model's own generations.

Early exit applies the final norm and LM head to the hidden state after layer ``k``; the head was
trained on the last layer's output, so the guess is poor at shallow splits. A residual linear map
``h + W h + b`` trained to make that guess agree with the main model's greedy token recovers much
of the gap at the cost of one H x H matrix-vector product per draft.

Data: the main model generates greedily from the calibration prompts (``data/drafter_prompts.txt``,
shipped with the package); at every position we keep the layer-``k`` hidden state and the main
model's next token. The prompts are split into train and held-out halves, and the held-out
agreement before and after training is reported and stored with the adapter.

The adapter is data-limited: on SmolLM2 at split 15, measured on the generated positions of 8
prompts outside the calibration set, 40 tokens per prompt (2.2k positions) gave 31.5% agreement
and 120 (6.7k positions) 36.7%, hence the default of 120. Teacher-forcing it on other text
instead (40k positions of Python's documentation) gave 17.8%: it must see the model's own answers.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import torch

from edge_worker.drafting import DrafterAdapter, adapter_path, save_adapter
from partition.models import ModelSource
from partition.segment import ModelSegment
from partition.tokens import encode_prompt

log = logging.getLogger(__name__)


def calibration_prompts() -> list[str]:
    text = resources.files("edge_worker").joinpath("data/drafter_prompts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


@torch.inference_mode()
def collect(lower: ModelSegment, upper: ModelSegment, tokenizer, prompts: list[str], new_tokens: int,
            progress: Callable[[str], None] = lambda _: None, generated_only: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden at layer k (P, H), the main model's greedy next token (P,)) over every prompt and
    generated position; ``lower`` holds layers [0, k), ``upper`` layers [k, N) and the head.
    ``generated_only``: only the positions a drafter is asked about, those after the first
    generated token (the cloud answers the prompt's last position; nobody drafts it)."""
    hiddens, targets = [], []
    for i, prompt in enumerate(prompts):
        progress(f"generating calibration text {i + 1}/{len(prompts)}")
        ids = encode_prompt(tokenizer, prompt)
        c_lo, c_hi = lower.new_cache(), upper.new_cache()
        x = torch.tensor([ids], dtype=torch.long)
        for step in range(new_tokens):
            h = lower(x, c_lo, logits="none").hidden
            logits = upper(h, c_hi, logits="last" if generated_only else "all").logits[0]  # (T or 1, V)
            nxt = logits.argmax(dim=-1)
            if not generated_only:
                hiddens.append(h[0].float())
                targets.append(nxt)
            elif step > 0:
                hiddens.append(h[0, -1:].float())
                targets.append(nxt[-1:])
            x = nxt[-1:].view(1, 1)
    return torch.cat(hiddens), torch.cat(targets)


def agreement(adapter: DrafterAdapter | None, head: ModelSegment, hidden: torch.Tensor,
              targets: torch.Tensor) -> float:
    """Fraction of positions where the drafter's top-1 guess equals the main model's token."""
    with torch.inference_mode():
        hits = 0
        for lo in range(0, hidden.shape[0], 512):
            h = hidden[lo:lo + 512]
            if adapter is not None:
                h = adapter(h)
            hits += int((head.lm_head(head.norm(h)).argmax(-1) == targets[lo:lo + 512]).sum())
    return hits / max(1, hidden.shape[0])


def fit_adapter(head: ModelSegment, hidden_size: int, hidden: torch.Tensor, targets: torch.Tensor, epochs: int,
                progress: Callable[[str], None] = lambda _: None) -> DrafterAdapter:
    """Train an adapter so that ``head``'s norm and LM head (frozen) map ``hidden`` (layer k) to
    ``targets`` (the main model's tokens); returned in eval mode. Seed torch first to repeat it."""
    adapter = DrafterAdapter(hidden_size)
    opt = torch.optim.Adam(adapter.parameters(), lr=1e-3, weight_decay=1e-4)
    batch = 256
    for epoch in range(epochs):
        order = torch.randperm(hidden.shape[0])
        total = 0.0
        for lo in range(0, len(order), batch):
            idx = order[lo:lo + batch]
            logits = head.lm_head(head.norm(adapter(hidden[idx])))
            loss = torch.nn.functional.cross_entropy(logits, targets[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        progress(f"epoch {epoch + 1}/{epochs}: loss {total / len(order):.3f}")
    return adapter.eval()


def train_adapter(source: ModelSource, split: int, new_tokens: int = 120, epochs: int = 30,
                  seed: int = 0, progress: Callable[[str], None] = lambda _: None
                  ) -> tuple[DrafterAdapter, dict]:
    if not 0 < split < source.n_layers:
        raise ValueError(f"the self-drafter needs a split between 1 and {source.n_layers - 1}, got {split}")
    torch.manual_seed(seed)
    prompts = calibration_prompts()
    random.Random(seed).shuffle(prompts)
    held = prompts[: len(prompts) // 4]
    train = prompts[len(prompts) // 4:]
    t0 = time.perf_counter()
    tokenizer = source.load_tokenizer()
    lower = ModelSegment.load(source, 0, split, head=False)
    # Layers [k, N) and the head: they make the targets, and the adapter trains through the norm and
    # LM head (frozen).
    head = ModelSegment.load(source, split, source.n_layers, embed=False, head=True)
    for p in head.parameters():
        p.requires_grad_(False)
    h_train, y_train = collect(lower, head, tokenizer, train, new_tokens, progress)
    h_test, y_test = collect(lower, head, tokenizer, held, new_tokens, progress)
    before = agreement(None, head, h_test, y_test)
    adapter = fit_adapter(head, source.hidden_size, h_train, y_train, epochs, progress)
    after = agreement(adapter, head, h_test, y_test)
    metrics = {"heldout_agreement_before": round(before, 4), "heldout_agreement_after": round(after, 4),
               "train_positions": int(h_train.shape[0]), "heldout_positions": int(h_test.shape[0]),
               "seconds": round(time.perf_counter() - t0, 1)}
    return adapter, metrics


def calibrate_drafter(source: ModelSource, split: int, out: Path | None, directory: Path,
                      progress: Callable[[str], None] = lambda _: None, **kwargs) -> tuple[Path, dict]:
    adapter, metrics = train_adapter(source, split, progress=progress, **kwargs)
    path = out or adapter_path(directory, source.model_id, split)
    save_adapter(adapter, path, source.model_id, split, metrics)
    return path, metrics
