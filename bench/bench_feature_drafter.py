"""Would a drafter that sees the cloud's last hidden state guess better? (EAGLE-style, measured)

The self-drafter guesses the next token from the edge's layer-``k`` activation. The cloud could
send back the main model's last hidden state ``f(t)`` (post-norm, what the LM head reads) with
each verdict, and the edge could predict ``f(t+1)`` from it and the next token, as EAGLE (Li et
al., 2024) does with one decoder block. This trains two such drafters on the same data
``calibrate --drafter`` uses (the model's own greedy answers to the shipped prompts plus
``--drawn`` drawn ones) and counts top-1 agreement with the main model on the generated
positions of the 8 evaluation prompts of ``bench_drafter_ceiling.py``:

* ``feature block``: ``[norm(f(t)), norm(embed(x(t+1)))] -> linear -> one Llama-shaped block
  (started from the model's last layer) -> norm``, trained on feature regression plus
  cross-entropy, with a second unrolled pass on its own predictions; at depth d > 1 it feeds
  itself its own predicted features, as it would when drafting a chain;
* ``adapter + previous feature``: the self-drafter's residual map, given also ``f(t-1)``, next
  to the same map trained on the same positions without it.

    .venv/bin/python bench/bench_feature_drafter.py [--split 15] [--drawn 400] [--epochs 6]

Not part of the product: it decides whether such a drafter is worth building.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cli  # noqa: E402,F401  (the OpenMP defaults, set before torch loads)

# isort: split
import torch  # noqa: E402
from bench_drafter_ceiling import EVAL_PROMPTS, EVAL_TOKENS  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402,N812

from edge_worker.drafter_calibration import calibration_prompts, generate_answers  # noqa: E402
from partition.models import resolve_model  # noqa: E402
from partition.segment import ModelSegment  # noqa: E402


class Block(nn.Module):
    """A pre-norm Llama-shaped decoder block: grouped-query attention with rotary positions, SwiGLU."""

    def __init__(self, c) -> None:
        super().__init__()
        h, self.nh = c.hidden_size, c.num_attention_heads
        self.nkv, self.hd = c.num_key_value_heads, h // c.num_attention_heads
        self.q, self.o = nn.Linear(h, h, bias=False), nn.Linear(h, h, bias=False)
        self.k, self.v = nn.Linear(h, self.nkv * self.hd, bias=False), nn.Linear(h, self.nkv * self.hd, bias=False)
        self.gate, self.up = nn.Linear(h, c.intermediate_size, bias=False), nn.Linear(h, c.intermediate_size, bias=False)
        self.down = nn.Linear(c.intermediate_size, h, bias=False)
        self.n1, self.n2 = nn.RMSNorm(h, eps=c.rms_norm_eps), nn.RMSNorm(h, eps=c.rms_norm_eps)
        theta = (getattr(c, "rope_parameters", None) or {}).get("rope_theta") or getattr(c, "rope_theta", 10000.0)
        self.register_buffer("inv", 1.0 / theta ** (torch.arange(0, self.hd, 2).float() / self.hd), persistent=False)

    def start_from(self, layer) -> None:
        with torch.no_grad():
            for mine, theirs in ((self.q, layer.self_attn.q_proj), (self.k, layer.self_attn.k_proj),
                                 (self.v, layer.self_attn.v_proj), (self.o, layer.self_attn.o_proj),
                                 (self.gate, layer.mlp.gate_proj), (self.up, layer.mlp.up_proj),
                                 (self.down, layer.mlp.down_proj), (self.n1, layer.input_layernorm),
                                 (self.n2, layer.post_attention_layernorm)):
                mine.weight.copy_(theirs.weight)

    def rope(self, x, start):
        f = torch.arange(start, start + x.shape[2]).float()[:, None] * self.inv[None]
        e = torch.cat((f, f), -1)
        half = x.shape[-1] // 2
        return x * e.cos() + torch.cat((-x[..., half:], x[..., :half]), -1) * e.sin()

    def forward(self, x, past=None):
        b, t, _ = x.shape
        start = 0 if past is None else past[0].shape[2]
        h = self.n1(x)
        q = self.rope(self.q(h).view(b, t, self.nh, self.hd).transpose(1, 2), start)
        k = self.rope(self.k(h).view(b, t, self.nkv, self.hd).transpose(1, 2), start)
        v = self.v(h).view(b, t, self.nkv, self.hd).transpose(1, 2)
        if past is not None:
            k, v = torch.cat((past[0], k), 2), torch.cat((past[1], v), 2)
        r = self.nh // self.nkv
        mask = torch.ones(t, start + t, dtype=torch.bool).tril(start)
        a = F.scaled_dot_product_attention(q, k.repeat_interleave(r, 1), v.repeat_interleave(r, 1), attn_mask=mask)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, -1))
        h = self.n2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h)), (k, v)


class FeatureHead(nn.Module):
    def __init__(self, c, final_norm, last_layer) -> None:
        super().__init__()
        h = c.hidden_size
        self.nf, self.ne = nn.RMSNorm(h, eps=c.rms_norm_eps), nn.RMSNorm(h, eps=c.rms_norm_eps)
        self.fc = nn.Linear(2 * h, h, bias=False)
        with torch.no_grad():  # start as "embedding plus feature", the way a residual stream adds
            self.fc.weight.copy_(torch.cat((torch.eye(h), torch.eye(h)), 1))
        self.block = Block(c)
        self.block.start_from(last_layer)
        self.out = nn.RMSNorm(h, eps=c.rms_norm_eps)
        with torch.no_grad():
            self.out.weight.copy_(final_norm.weight)

    def forward(self, feat, emb, past=None):
        x, past = self.block(self.fc(torch.cat((self.nf(feat), self.ne(emb)), -1)), past)
        return self.out(x), past


@torch.inference_mode()
def featurize(full: ModelSegment, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids (T,), the main model's post-norm last-layer features (T, H), its greedy next token at
    each position (T,)), computed once per sequence."""
    f = full.norm(full(torch.tensor([ids]), full.new_cache(), logits="none").hidden[0]).clone()
    return torch.tensor(ids), f, (f @ full.lm_head.weight.T).argmax(-1)


def train_feature_head(c, full, data, vocab, remap, epochs, log):
    emb, w = full.embeddings[0].weight, full.lm_head.weight[vocab]
    head = FeatureHead(c, full.norm, full.layers[-1])
    opt = torch.optim.AdamW(head.parameters(), lr=5e-4, weight_decay=0.0)
    order = sorted(range(len(data)), key=lambda i: len(data[i][0]))
    batches = [order[i:i + 8] for i in range(0, len(order), 8)]
    total = epochs * len(batches)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * max(0.05, 1 - s / total))
    gen = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        for bi in torch.randperm(len(batches), generator=gen).tolist():
            idx = batches[bi]
            t = max(len(data[i][0]) for i in idx) - 1
            fin, ein, ftg = (torch.zeros(len(idx), t, c.hidden_size) for _ in range(3))
            y = torch.full((len(idx), t), -100, dtype=torch.long)
            for j, i in enumerate(idx):
                ids, f, nxt = data[i]
                n = len(ids) - 1
                fin[j, :n], ein[j, :n], ftg[j, :n] = f[:-1], emb[ids[1:]].detach(), f[1:]
                y[j, :n] = remap[nxt[1:]]
            valid = y != -100
            loss, feat_in = 0.0, fin
            for unroll in range(2):  # the second pass feeds the head its own predictions
                g, _ = head(feat_in, ein)
                loss = loss + (F.smooth_l1_loss(g[valid], ftg[valid])
                               + 0.1 * F.cross_entropy((g @ w.T)[valid], y[valid])) * (1.0 if unroll == 0 else 0.7)
                feat_in = torch.cat((fin[:, :1], g[:, :-1]), 1)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 0.5)
            opt.step()
            sched.step()
        log(f"feature block: epoch {epoch + 1}/{epochs}, loss {float(loss):.3f}")
    return head.eval()


@torch.no_grad()
def chain_agreement(head, full, vocab, evals, depth=4):
    """Per depth: of the chains that got that far, the share whose next guess was right.
    ``evals``: (featurized prompt and answer, prompt length) per evaluation prompt."""
    emb, w = full.embeddings[0].weight, full.lm_head.weight[vocab]
    hits, tries = [0] * depth, [0] * depth
    for (ids, f, _), prompt_len in evals:
        seq = ids.tolist()
        for t in range(prompt_len - 1, len(seq) - 2):  # f(t) gave seq[t+1]; guess seq[t+2] on
            _, past = head(f[:t].unsqueeze(0), emb[seq[1:t + 1]].unsqueeze(0)) if t else (None, None)
            feat, token = f[t:t + 1].unsqueeze(0), seq[t + 1]
            for d in range(min(depth, len(seq) - t - 2)):
                g, past = head(feat, emb[[token]].unsqueeze(0), past)
                guess = int(vocab[(g[0, -1] @ w.T).argmax()])
                tries[d] += 1
                if guess != seq[t + 2 + d]:
                    break
                hits[d] += 1
                feat, token = g, guess
    return [h / max(1, n) for h, n in zip(hits, tries, strict=True)]


def adapter_with_previous(full, lower, upper, data, evals, vocab, remap, epochs) -> tuple[float, float]:
    """Agreement of the adapter-shaped map without and with the previous last-layer feature."""
    def rows(seqs):  # (featurized sequence, first position kept)
        hs, ps, ys = [], [], []
        for (ids, f, nxt), start in seqs:
            with torch.inference_mode():
                h = lower(ids.unsqueeze(0), lower.new_cache(), logits="none").hidden[0]
            hs.append(h[start:].clone())
            ps.append(f[start - 1:-1])
            ys.append(nxt[start:])
        return torch.cat(hs), torch.cat(ps), torch.cat(ys)

    h, p, y = rows([(seq, 1) for seq in data])
    he, pe, ye = rows([(seq, prompt_len + 1) for seq, prompt_len in evals])  # after the first generated token
    results = {}
    for use_prev in (False, True):  # the same map without and with the previous feature
        torch.manual_seed(0)
        results[use_prev] = _fit_map(upper, h, p if use_prev else torch.zeros_like(p), y, he,
                                     pe if use_prev else torch.zeros_like(pe), ye,
                                     full.lm_head.weight[vocab], vocab, remap, epochs)
    return results[False], results[True]


def _fit_map(upper, h, p, y, he, pe, ye, w, vocab, remap, epochs) -> float:
    """Train ``h + W [norm(h), norm(p)]`` through the frozen norm and head; agreement on (he, pe)."""
    size = h.shape[1]
    net = nn.Linear(2 * size, size)
    nn.init.zeros_(net.weight)
    nn.init.zeros_(net.bias)
    norms = nn.LayerNorm(size), nn.LayerNorm(size)
    opt = torch.optim.Adam([*net.parameters(), *norms[0].parameters(), *norms[1].parameters()], lr=1e-3)
    labels = remap[y]

    def guess(h, p):
        return upper.norm(h + net(torch.cat((norms[0](h), norms[1](p)), -1))) @ w.T

    for _ in range(epochs):
        order = torch.randperm(len(y))
        for lo in range(0, len(order), 512):
            idx = order[lo:lo + 512]
            loss = F.cross_entropy(guess(h[idx], p[idx]), labels[idx], ignore_index=-100)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return float((vocab[guess(he, pe).argmax(-1)] == ye).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--split", type=int, default=15)
    ap.add_argument("--drawn", type=int, default=400)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    source = resolve_model(args.model)
    tokenizer = source.load_tokenizer()
    full = ModelSegment.load(source, 0, source.n_layers)
    for p in full.parameters():
        p.requires_grad_(False)

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:5.0f} s] {msg}", file=sys.stderr, flush=True)

    answers = generate_answers(source, tokenizer, calibration_prompts(args.drawn), 128)
    data = [featurize(full, pr + ans) for pr, ans in answers]
    evals = [(featurize(full, pr + ans), len(pr))
             for pr, ans in generate_answers(source, tokenizer, EVAL_PROMPTS, EVAL_TOKENS, batch=1)]
    vocab = torch.unique(torch.cat([ids for ids, _, _ in data]))
    remap = torch.full((source.vocab_size,), -100, dtype=torch.long)
    remap[vocab] = torch.arange(len(vocab))
    log(f"{sum(len(ids) for ids, _, _ in data)} training positions, vocabulary {len(vocab)}")
    head = train_feature_head(source.config, full, data, vocab, remap, args.epochs, log)
    depths = chain_agreement(head, full, vocab, evals)
    lower = ModelSegment.load(source, 0, args.split, head=False)
    upper = ModelSegment.load(source, args.split, source.n_layers, embed=False, head=True)
    alone, with_prev = adapter_with_previous(full, lower, upper, data, evals, vocab, remap, 8)
    result = {"model": args.model, "split": args.split, "training_positions": sum(len(i) for i, _, _ in data),
              "feature_block_agreement_by_depth": [round(d, 4) for d in depths],
              "adapter_alone": round(alone, 4), "adapter_with_previous_feature": round(with_prev, 4),
              "seconds": round(time.perf_counter() - t0)}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.model}: top-1 agreement on the generated positions of {len(EVAL_PROMPTS)} evaluation prompts "
          f"({result['seconds']} s, {result['training_positions']} training positions)")
    print("  feature block, by depth: " + ", ".join(f"{d:.1%}" for d in depths))
    print(f"  adapter at split {args.split}, same data: {alone:.1%}; with the previous feature: {with_prev:.1%}")


if __name__ == "__main__":
    main()
