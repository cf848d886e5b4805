"""How much of the input a cloud worker can read back from the activations it is sent.

End-to-end encryption hides activations from the broker and the network, not from the worker
that decrypts them: the worker sees the boundary hidden states at split ``k`` (after the wire
codec, and after any dimensionality reduction). This module is our own inversion attack on
exactly those tensors, so that the README can say with numbers what depth and reduction buy.

The attacker is the worker. It knows the model (it holds every layer), the split, the codec and
the reduction (it must, to reconstruct), and it can run the model on any text of its own. Attacks,
each mapping what the worker sees at one position to a guess of the input token there:

* ``nn``: nearest neighbour, by cosine, of the observed vector among the rows of the token
  embedding matrix. Exact at split 0; works while the residual stream is still dominated by the
  token's own embedding (shallow splits).
* ``ridge``: a linear map, fitted in closed form on the attacker's calibration text, from the
  observed vector to the (normalised) embedding of the token, then ``nn`` on the result. Because
  it regresses into embedding space, it can name tokens it never saw in training.
* ``mlp``: a small two-layer network trained with torch on the same calibration text, scored by
  a softmax over the embedding rows of the calibration vocabulary (cheap), decoded against the
  whole vocabulary.
* ``verify``: the best probe's top candidates per position, each run through the worker's own
  copy of layers ``[0, k)`` after the tokens recovered so far, keeping the one whose view matches
  what was observed. The strongest, and the costliest, so it runs on a sample of positions.

The score of a cell is the fraction of test-text tokens whose id the attack recovers exactly.
Train and test text are disjoint files (``partition/data/leakage_{train,test}.txt`` by default;
any other text can be passed). Everything here is a function of tensors except
``collect_boundary`` and ``verify_attack``, which run the model's segments; what the worker sees
is a ``View`` callable passed in by the caller (``bench/bench_leakage.py`` builds them from the
real projection and wire codec), so this module needs torch and the model code only.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from partition.models import ModelSource
from partition.segment import ModelSegment

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_TRAIN_TEXT = DATA_DIR / "leakage_train.txt"
DEFAULT_TEST_TEXT = DATA_DIR / "leakage_test.txt"
# Sequence length of one attacked "prompt". Paragraphs of the shipped text are 40-110 tokens;
# 64 keeps position effects (the first positions of a sequence look unlike the rest) in
# proportion without making every sequence one paragraph.
DEFAULT_CHUNK_TOKENS = 64
# Ridge penalties tried, relative to the mean eigenvalue of X^T X; chosen on a held-out fifth of
# the calibration text, never on the test text.
RIDGE_ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
# MLP probe: width, steps and learning rate. Chosen so that one cell trains in about ten seconds
# on two idle CPU cores; not tuned further, so the probe's figures are a lower bound.
MLP_HIDDEN = 1024
MLP_STEPS = 600
MLP_BATCH = 256
MLP_LR = 1e-3
MLP_WEIGHT_DECAY = 1e-4
ATTACKS = ("nn", "ridge", "mlp")
# Verification: candidates per position, from the best probe's nearest embedding rows. On the
# shipped text at split 25 (fp16) the MLP probe's top 32 held the right token at 89% of positions
# (its top 1 at 65%): verification can recover at most what the candidates hold.
VERIFY_CANDIDATES = 32

# What the worker sees: (hidden (n, H) float32 at split k, k) -> (n, D) float32.
View = Callable[[torch.Tensor, int], torch.Tensor]


class LeakageInputError(ValueError):
    """The attack's inputs are unusable: empty text, a bad split, mismatched shapes."""


# --- text and activations --------------------------------------------------------------------------


def read_paragraphs(path: str | Path) -> list[str]:
    """Blank-line-separated paragraphs of a text file, whitespace-normalised."""
    text = Path(path).read_text(encoding="utf-8")
    paragraphs = [" ".join(p.split()) for p in text.split("\n\n")]
    paragraphs = [p for p in paragraphs if p]
    if not paragraphs:
        raise LeakageInputError(f"{path} holds no text")
    return paragraphs


def chunk_token_ids(tokenizer, paragraphs: Iterable[str], chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> list[list[int]]:
    """Each paragraph tokenised on its own (no special tokens) and cut into sequences of at most
    ``chunk_tokens``; every sequence is one prompt the edge would send."""
    if chunk_tokens < 1:
        raise LeakageInputError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    chunks = []
    for p in paragraphs:
        ids = [int(i) for i in tokenizer(p, add_special_tokens=False)["input_ids"]]
        chunks.extend(ids[i : i + chunk_tokens] for i in range(0, len(ids), chunk_tokens))
    return [c for c in chunks if c]


@dataclass
class Boundary:
    """Activations at several splits for the same token stream."""

    token_ids: torch.Tensor  # (n,) long: the input token at each position
    positions: torch.Tensor  # (n,) long: its position within its sequence
    hidden: dict[int, torch.Tensor]  # split k -> (n, H) float32, what the edge computes at k

    def sequences(self) -> list[tuple[int, int]]:
        """[start, end) of each sequence (one prompt, one prefill frame) in the stream."""
        starts = (self.positions == 0).nonzero().flatten().tolist()
        return list(zip(starts, [*starts[1:], len(self.positions)], strict=True))


@torch.inference_mode()
def collect_boundary(source: ModelSource, chunks: Sequence[Sequence[int]], splits: Iterable[int]) -> Boundary:
    """Run every chunk through the real segments and keep the boundary hidden states at each split.

    The segments are ``[0, k1), [k1, k2), ...`` chained, each with its own cache, which is what
    the edge runs for a prompt (prefill): the tensor at ``k`` is exactly what it would send.
    """
    ks = sorted(set(int(k) for k in splits))
    if not ks:
        raise LeakageInputError("no splits given")
    n = source.n_layers
    if ks[0] < 0 or ks[-1] >= n:
        raise LeakageInputError(f"splits must be in [0, {n}) (a split at {n} sends nothing), got {ks}")
    if not chunks:
        raise LeakageInputError("no token sequences given")
    bounds = [0, *ks]
    segments = [ModelSegment.load(source, lo, hi, embed=(i == 0), head=False)
                for i, (lo, hi) in enumerate(zip(bounds, bounds[1:], strict=False))]
    per_k: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    ids, pos = [], []
    for chunk in chunks:
        x: torch.Tensor = torch.tensor([list(chunk)], dtype=torch.long)  # (1, T)
        for k, seg in zip(ks, segments, strict=True):
            x = seg(x, seg.new_cache(), logits="none").hidden  # (1, T, H)
            per_k[k].append(x[0].float().clone())
        ids.extend(chunk)
        pos.extend(range(len(chunk)))
    return Boundary(
        token_ids=torch.tensor(ids, dtype=torch.long),
        positions=torch.tensor(pos, dtype=torch.long),
        hidden={k: torch.cat(v) for k, v in per_k.items()},
    )


def embedding_matrix(source: ModelSource) -> torch.Tensor:
    """The token embedding (V, H), float32: the attacker's dictionary."""
    name = source.family.embed_prefixes[0] + "weight"
    return source.weights.load([name], torch.float32)[name]


# --- attacks ---------------------------------------------------------------------------------------


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1, eps=1e-12)


def nearest_token(vectors: torch.Tensor, emb_unit: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """Index of the embedding row with the highest cosine to each vector: (n, H) -> (n,) long."""
    if vectors.shape[-1] != emb_unit.shape[-1]:
        raise LeakageInputError(
            f"vectors have {vectors.shape[-1]} dims, the embedding {emb_unit.shape[-1]}: nn needs the full width"
        )
    q = _unit(vectors.float())
    return torch.cat([(q[i : i + block] @ emb_unit.T).argmax(-1) for i in range(0, len(q), block)])


@dataclass(frozen=True)
class Standardizer:
    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def fit(cls, x: torch.Tensor) -> Standardizer:
        # Outlier channels (absmax/rms ~ 379 in SmolLM2, see MEASUREMENTS.md) would otherwise
        # dominate every distance and every fit.
        return cls(x.mean(0), x.std(0).clamp_min(1e-6))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


# Held-out positions that choose the ridge penalty: each choice decodes them against the whole
# vocabulary (49k rows for SmolLM2), so a sample keeps that cheap.
RIDGE_HOLDOUT_MAX = 400


def _holdout_mask(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    held = torch.rand(n, generator=g) < 0.2
    idx = held.nonzero().flatten()
    if len(idx) > RIDGE_HOLDOUT_MAX:
        held[idx[RIDGE_HOLDOUT_MAX:]] = False
    return held


def fit_ridge(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """W minimising |[x, 1] W - y|^2 + alpha * mean_eig * |W|^2, in float64: (D+1, H)."""
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1).double()
    gram = xb.T @ xb
    scale = gram.diagonal().mean()
    reg = torch.eye(gram.shape[0], dtype=gram.dtype) * alpha * scale
    reg[-1, -1] = 0  # the bias is not penalised
    return torch.linalg.solve(gram + reg, xb.T @ y.double()).float()


def _apply_ridge(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return x @ w[:-1] + w[-1]


def ridge_attack(train_x, train_ids, test_x, emb_unit) -> torch.Tensor:
    """Fit on the calibration views, choose the penalty on a held-out fifth, refit: (n, H) guesses
    in embedding space for the test views."""
    std = Standardizer.fit(train_x)
    xs, ts = std(train_x), std(test_x)
    y = emb_unit[train_ids]
    held = _holdout_mask(len(xs))
    best_alpha, best_acc = RIDGE_ALPHAS[0], -1.0
    for alpha in RIDGE_ALPHAS:
        w = fit_ridge(xs[~held], y[~held], alpha)
        acc = (nearest_token(_apply_ridge(w, xs[held]), emb_unit) == train_ids[held]).float().mean().item()
        if acc > best_acc:
            best_alpha, best_acc = alpha, acc
    log.debug("ridge: alpha %g (held-out %.3f)", best_alpha, best_acc)
    w = fit_ridge(xs, y, best_alpha)
    return _apply_ridge(w, ts)


def mlp_attack(train_x, train_ids, test_x, emb_unit, seed: int = 0, steps: int = MLP_STEPS) -> torch.Tensor:
    """A two-layer probe into embedding space, trained with a softmax over the calibration
    vocabulary: (n, H) guesses in embedding space for the test views."""
    torch.manual_seed(seed)
    std = Standardizer.fit(train_x)
    xs, ts = std(train_x), std(test_x)
    vocab = torch.unique(train_ids)  # classes the probe is trained to tell apart
    remap = torch.full((emb_unit.shape[0],), -1, dtype=torch.long)
    remap[vocab] = torch.arange(len(vocab))
    targets = remap[train_ids]
    cand = emb_unit[vocab]  # (C, H)
    d_in, d_out = xs.shape[1], emb_unit.shape[1]
    net = torch.nn.Sequential(
        torch.nn.Linear(d_in, MLP_HIDDEN), torch.nn.GELU(), torch.nn.Linear(MLP_HIDDEN, d_out)
    )
    log_scale = torch.nn.Parameter(torch.tensor(math.log(20.0)))  # softmax temperature, learned
    opt = torch.optim.AdamW([*net.parameters(), log_scale], lr=MLP_LR, weight_decay=MLP_WEIGHT_DECAY)
    g = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _ in range(steps):
            idx = torch.randint(0, len(xs), (min(MLP_BATCH, len(xs)),), generator=g)
            logits = log_scale.exp() * (_unit(net(xs[idx])) @ cand.T)  # (B, C)
            loss = F.cross_entropy(logits, targets[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return net(ts)


def run_attack(name: str, train_x, train_ids, test_x, emb_unit, mlp_steps: int = MLP_STEPS) -> torch.Tensor | None:
    """(n, H) guesses in embedding space for the test views (decode with ``nearest_token``), or
    None where the attack does not apply (``nn`` on reduced vectors)."""
    if name == "nn":
        return test_x if test_x.shape[1] == emb_unit.shape[1] else None
    if name == "ridge":
        return ridge_attack(train_x, train_ids, test_x, emb_unit)
    if name == "mlp":
        return mlp_attack(train_x, train_ids, test_x, emb_unit, steps=mlp_steps)
    raise LeakageInputError(f"unknown attack {name!r}; use one of {ATTACKS}")


# --- verification with the model ---------------------------------------------------------------


def top_candidates(vectors: torch.Tensor, emb_unit: torch.Tensor, k: int, block: int = 1024) -> torch.Tensor:
    """The ``k`` embedding rows closest (cosine) to each guess: (n, H) -> (n, k) long, best first."""
    q = _unit(vectors.float())
    return torch.cat([(q[i : i + block] @ emb_unit.T).topk(k, dim=-1).indices for i in range(0, len(q), block)])


@torch.inference_mode()
def verify_attack(
    source: ModelSource, split: int, view: View, test: Boundary, observed: torch.Tensor,
    candidates: torch.Tensor, max_positions: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recompute what each candidate token would have produced, and keep the one that matches.

    The worker holds every layer, so for a sequence it can run layers ``[0, split)`` itself, left
    to right: at position ``t``, with the tokens it recovered before ``t`` in the cache, it runs
    all candidates at once (a batch over a repeated cache), applies the same protection, and
    keeps the candidate whose view is nearest the observed one. Returns (predicted ids, the
    indices of the positions attacked): whole sequences, from the first, until
    ``max_positions`` is reached.
    """
    seg = ModelSegment.load(source, 0, split, head=False)
    preds, attacked = [], []
    for start, end in test.sequences():
        if max_positions is not None and len(attacked) >= max_positions:
            break
        cache = seg.new_cache()
        for i in range(start, end):
            cand = candidates[i]  # (K,)
            trial = cache.repeated(len(cand))
            h = seg(cand.view(-1, 1), trial, logits="none").hidden[:, 0]  # (K, H)
            d = (view(h, split) - observed[i]).norm(dim=-1)  # (K,)
            pick = int(d.argmin())
            cache = trial.row(pick)  # the chosen candidate's keys and values, not recomputed
            preds.append(int(cand[pick]))
            attacked.append(i)
    return torch.tensor(preds, dtype=torch.long), torch.tensor(attacked, dtype=torch.long)


# --- the table -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    split: int
    protection: str
    dims: int  # width of what the worker sees
    scores: dict[str, float]  # attack -> fraction of test tokens recovered

    @property
    def best_attack(self) -> str:
        return max(self.scores, key=lambda a: self.scores[a])

    @property
    def recovered(self) -> float:
        return self.scores[self.best_attack]


def recovery(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    if predicted.shape != truth.shape:
        raise LeakageInputError(f"{tuple(predicted.shape)} predictions for {tuple(truth.shape)} tokens")
    return float((predicted == truth).float().mean())


def worker_view(boundary: Boundary, split: int, view: View) -> torch.Tensor:
    """What the worker holds for every position: ``view`` applied to each sequence's (T, H) block,
    as the edge sends a prompt in one frame (a codec may choose its scales per frame)."""
    hidden = boundary.hidden[split]
    parts = [view(hidden[s:e], split).float() for s, e in boundary.sequences()]
    out = torch.cat(parts)
    if out.shape[0] != hidden.shape[0]:
        raise LeakageInputError(f"the view changed the number of positions ({hidden.shape[0]} -> {out.shape[0]})")
    return out


def leakage_cell(
    split: int, protection: str, view: View, train: Boundary, test: Boundary, emb_unit: torch.Tensor,
    attacks: Sequence[str] = ATTACKS, mlp_steps: int = MLP_STEPS,
    source: ModelSource | None = None, verify_positions: int | None = None,
    verify_candidates: int = VERIFY_CANDIDATES,
) -> Cell:
    """Every attack on what the worker sees at ``split`` under one protection.

    With ``source`` given, also ``verify``: the best probe's top ``verify_candidates`` guesses per
    position, checked by recomputation (``verify_attack``), on the first ``verify_positions``
    test positions (scored on those positions only).
    """
    train_x = worker_view(train, split, view)
    test_x = worker_view(test, split, view)
    scores: dict[str, float] = {}
    guesses: dict[str, torch.Tensor] = {}
    for a in attacks:
        vectors = run_attack(a, train_x, train.token_ids, test_x, emb_unit, mlp_steps)
        if vectors is not None:
            guesses[a] = vectors
            scores[a] = recovery(nearest_token(vectors, emb_unit), test.token_ids)
    if source is not None and guesses:
        probe = max(guesses, key=lambda a: scores[a])  # the candidates' source; ties keep the order given
        if verify_candidates < 1:
            raise LeakageInputError(f"verify needs at least one candidate per position, got {verify_candidates}")
        cands = top_candidates(guesses[probe], emb_unit, verify_candidates)
        pred, at = verify_attack(source, split, view, test, test_x, cands, verify_positions)
        scores["verify"] = recovery(pred, test.token_ids[at])
    return Cell(split, protection, int(test_x.shape[1]), scores)


# --- measured tables, for the planner --------------------------------------------------------------

# ``bench/bench_leakage.py --json`` output, one file per model, shipped for the models we measured.
MEASURED_TABLE_GLOB = "leakage-*.json"


def protection_name(wire_dtype: str, reduce_dims: int | None) -> str:
    """The bench's name for a setting: ``fp16``, ``int8+d128``."""
    return wire_dtype + (f"+d{reduce_dims}" if reduce_dims else "")


def measured_leakage(model_id: str, protection: str, directory: Path = DATA_DIR) -> dict[int, float]:
    """Split -> fraction of input tokens recovered (best attack) from the shipped measurements of
    this exact model (weights digest included) under this protection."""
    import json

    for path in sorted(directory.glob(MEASURED_TABLE_GLOB)):
        table = json.loads(path.read_text())
        if table.get("model") != model_id:
            continue
        out = {c["split"]: float(c["recovered"]) for c in table["cells"] if c["protection"] == protection}
        if out:
            return out
        have = sorted({c["protection"] for c in table["cells"]})
        raise LeakageInputError(f"{path.name} has no measurements for {protection!r} (it has {', '.join(have)}); "
                                "measure them with bench/bench_leakage.py --protections " + protection)
    raise LeakageInputError(f"no leakage measurements for model {model_id} in {directory}; measure them with "
                            "bench/bench_leakage.py --json and save the output there as leakage-NAME.json")


def majority_baseline(train: Boundary, test: Boundary) -> float:
    """What guessing the calibration text's commonest token at every position recovers."""
    commonest = torch.bincount(train.token_ids).argmax()
    return float((test.token_ids == commonest).float().mean())
