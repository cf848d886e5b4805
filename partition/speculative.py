"""Verifying drafted tokens against the main model: lossless speculative decoding.

A drafter on the edge proposes tokens ``d1 .. dn`` after the pending token. The edge sends the
boundary activations of ``[pending, d1 .. dn]``; whoever holds the head computes logits
``L0 .. Ln`` for those positions (``Li`` predicts the token after position ``i``) and calls
:func:`verify_drafts`, which returns how many drafts the main model keeps and the token that
follows them (a correction, or a bonus token when every draft was kept).

Greedy: a draft is kept while it equals the main model's argmax, so the output is exactly the
main model's greedy output.

Sampling: the drafter is treated as proposing a single token (a point mass ``q = delta(d)``),
for which the speculative-sampling rule (Leviathan et al. 2023; Chen et al. 2023) is: keep ``d``
with probability ``p(d)``; otherwise draw from ``p`` with ``d`` removed and renormalised. Whatever
the drafter proposed, each emitted token is then distributed exactly as ``p``, the main model's
(temperature, top-p) distribution, and the drafter's own probabilities never cross the network.
Draws are seeded by ``(seed, step)`` like :func:`partition.sampling.choose_token`, so a run is
reproducible and a retried verification draws the same verdict.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from partition.sampling import SamplingParams, choose_token, greedy_token, probabilities
from partition.sampling_params import MAX_DRAFT_TOKENS
from partition.tree import DraftTree

__all__ = ["MAX_DRAFT_TOKENS", "run_and_verify", "run_and_verify_tree", "verify_drafts", "verify_tree"]



def _generator(params: SamplingParams, step: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed((params.seed * 1_000_003 + step * 7 + salt) & 0x7FFF_FFFF_FFFF_FFFF)


def _check_draft(row: torch.Tensor, draft: int, params: SamplingParams, step: int,
                 seen: Sequence[int]) -> int | None:
    """None when the main model keeps ``draft`` at generation index ``step``, else its token there."""
    if params.greedy:
        best = greedy_token(row, params, seen)
        return None if best == draft else best
    p = probabilities(row, params, seen)
    u = float(torch.rand((), generator=_generator(params, step, 1)))
    if u < float(p[draft]):
        return None
    residual = p.clone()
    residual[draft] = 0.0
    total = float(residual.sum())
    if total <= 0.0:  # p(d) rounds to 1: keeping d is the only draw p allows
        return None
    return int(torch.multinomial(residual / total, 1, generator=_generator(params, step, 2)))


def verify_drafts(logits: torch.Tensor, drafts: list[int], params: SamplingParams, step: int,
                  seen: Sequence[int] = ()) -> tuple[int, int]:
    """logits: (n + 1, V) for ``[pending, d1 .. dn]``; ``step`` is the generation index of ``d1``;
    ``seen``: the tokens generated up to the pending one (a repetition penalty reads them; row
    ``i`` also sees ``d1 .. di``).

    Returns ``(accepted, token)``: the first ``accepted`` drafts are kept and ``token`` follows
    them (generation index ``step + accepted``).
    """
    n = len(drafts)
    if logits.dim() != 2 or logits.shape[0] != n + 1:
        raise ValueError(f"verifying {n} drafts needs logits of shape ({n + 1}, V), got {tuple(logits.shape)}")
    history = list(seen) if params.uses_history else []
    for i, draft in enumerate(drafts):
        correction = _check_draft(logits[i], draft, params, step + i, history)
        if correction is not None:
            return i, correction
        if params.uses_history:
            history.append(draft)
    return n, choose_token(logits[n], params, step + n, history)


def verify_tree(logits: torch.Tensor, tree: DraftTree, params: SamplingParams, step: int,
                seen: Sequence[int] = ()) -> tuple[list[int], int]:
    """logits: (rows, V) for a token tree's frame rows (``partition/tree.py``); ``step`` is the
    generation index of the root's children. Returns (the frame rows of the accepted path, root
    first; the token after its last row).

    Greedy: the path follows the child that is the main model's argmax. Sampling: at each row the
    children are tried in order, each with the speculative-sampling rule for a point-mass
    proposal applied to what is left of ``p`` (SpecInfer's multi-candidate rule): keep child
    ``c`` with probability ``p(c)``, else remove ``c`` from ``p``, renormalise and try the next;
    when none is kept, draw from the remainder. Every emitted token is then distributed as ``p``.
    A chain (one child per row) draws exactly what ``verify_drafts`` draws."""
    if logits.dim() != 2 or logits.shape[0] != tree.rows:
        raise ValueError(f"a tree of {tree.rows} rows needs logits of shape ({tree.rows}, V), got {tuple(logits.shape)}")
    children: dict[int, list[int]] = {}
    for i, parent in enumerate(tree.parents):
        children.setdefault(parent + 1, []).append(i + 1)
    history = list(seen) if params.uses_history else []
    path = [0]
    while True:
        row, depth = path[-1], len(path) - 1
        kids = children.get(row, [])
        if params.greedy:
            best = greedy_token(logits[row], params, history)
            nxt = next((c for c in kids if tree.tokens[c - 1] == best), None)
            if nxt is None:
                return path, best
        else:
            p = probabilities(logits[row], params, history)
            nxt = None
            for j, c in enumerate(kids):
                token = tree.tokens[c - 1]
                u = float(torch.rand((), generator=_generator(params, step + depth, 1 if j == 0 else 10 + j)))
                if u < float(p[token]) / max(float(p.sum()), 1e-30):
                    nxt = c
                    break
                p = p.clone()
                p[token] = 0.0
            if nxt is None:
                total = float(p.sum())
                if total > 0.0:
                    draw = torch.multinomial(p / total, 1, generator=_generator(params, step + depth, 2))
                    return path, int(draw)
                nxt = kids[-1]  # p allows only tokens of the children (rounding): keeping one is its draw
        path.append(nxt)
        if params.uses_history:
            history.append(tree.tokens[nxt - 1])


def run_and_verify_tree(segment, hidden: torch.Tensor, cache, params: SamplingParams, step: int,
                        tree: DraftTree, start_layer: int | None = None,
                        seen: Sequence[int] = ()) -> tuple[list[int], int]:
    """Run ``segment`` (which holds the head) on ``hidden`` (1, T, H) whose last ``tree.rows``
    positions are a token tree's rows (any before them run first, as an ordinary frame), verify
    the tree and keep its accepted path in ``cache``. Returns (the kept rows after the root, the
    token after them)."""
    before = hidden.shape[1] - tree.rows
    if before < 0:
        raise ValueError(f"a tree of {tree.rows} rows needs as many positions, got {hidden.shape[1]}")
    if before:
        segment(hidden[:, :before], cache, start_layer=start_layer, logits="none")
    root = cache.length
    out = segment(hidden[:, before:], cache, start_layer=start_layer, logits="all", tree=tree)
    rows, token = verify_tree(out.logits[0], tree, params, step, seen)
    cache.keep(root, rows)
    return rows[1:], token


def run_and_verify(segment, hidden: torch.Tensor, cache, params: SamplingParams, step: int,
                   draft: list[int] | tuple[int, ...] = (), start_layer: int | None = None,
                   seen: Sequence[int] = ()) -> tuple[int, int]:
    """Run ``segment`` (which holds the head) on ``hidden`` (1, T, H), verify the drafts held by
    the last ``len(draft)`` positions, and crop ``cache`` to the positions that were kept.

    Without drafts this is an ordinary step: ``(0, next token)``.
    """
    n = len(draft)
    out = segment(hidden, cache, start_layer=start_layer, logits=n + 1)
    accepted, token = verify_drafts(out.logits[0], list(draft), params, step, seen)
    cache.crop(cache.length - (n - accepted))
    return accepted, token
