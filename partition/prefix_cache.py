"""Prompt prefixes a segment has computed, kept so that a later session starting the same way
copies their keys and values instead of computing them again: a cloud worker's for its sessions,
an edge engine's for its generations' local layers.

Chat requests share long beginnings: every request to an instruct model starts with its system
prompt (28 of the 37 tokens of the benchmarks' prompts), and each turn of a conversation resends
the turns before it, answers included. vLLM (automatic prefix caching) and SGLang (RadixAttention)
keep such prefixes; so does this: a session's prompt once computed, and when the session ends
everything its cache holds (prompt and generated tokens), so the next turn copies the previous
answer too. A session's first frame (its prompt, from position 0) copies the longest known
beginning.

Exact by construction, not by luck: where the segment runs every frame on the row kernel
(``ModelSegment.whole_frames_packed``) a position's keys and values depend only on the rows up to
it, never on how the prompt was cut into frames or what shared its passes
(``tests/test_batching.py``), so copied positions hold the bits the session would have computed.
Where that does not hold (a GPU, bfloat16, the kernel switched off) the worker keeps no prefixes.

Keys are chained digests of the rows as the segment receives them (token ids, or hidden states
for a split session), salted with what else decides the numbers (the layer a worker's session
starts at, the edge's split): position ``i``'s digest covers rows ``0..i``. The worker never
needs to know the tokens. Entries are whole prompts' caches (and, on the edge, the boundary
activations the cloud needs of them), least recently used evicted first past a byte budget.
One lock guards the whole cache: an engine's generations run on several threads.

Sessions on one worker share its prefixes whoever opened them, so how fast a prompt is
prefilled tells whether another session sent the same beginning (the timing side channel of any
shared prefix cache). Run workers serving mutually untrusting clients with ``--prefix-cache-mb 0``.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from partition.kv_cache import SegmentKVCache


def row_digests(rows: torch.Tensor, salt: int | str, prev: bytes | None = None) -> list[bytes]:
    """The chained digest of every prefix of ``rows`` ((1, T) ids or (1, T, H) hidden states):
    entry ``i`` covers rows ``0..i``, their dtype and shape, and ``salt``. ``prev``: the digest of
    the rows before these (a session's later frame), whose chain this one continues."""
    flat = rows[0].cpu().contiguous()
    if prev is None:
        prev = hashlib.blake2b(f"{salt}|{flat.dtype}|{tuple(flat.shape[1:])}".encode(), digest_size=16).digest()
    data = flat.view(torch.uint8).numpy().reshape(flat.shape[0], -1)  # a row's bytes per line
    out = []
    for row in data:
        prev = hashlib.blake2b(prev + row.tobytes(), digest_size=16).digest()
        out.append(prev)
    return out


@dataclass
class _Entry:
    digests: list[bytes]  # of its positions' prefixes, in order
    layers: dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> keys, values (1, kv_heads, length, head_dim)
    nbytes: int
    extra: torch.Tensor | None = None  # (1, length, ...): what else the caller keeps per position


class PrefixCache:
    """Computed prompt prefixes, by the digest of their rows, under a budget of ``limit_bytes``."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first
        # prefix digest -> (entry id, positions). Every position of every entry is here (some entry
        # holding it), so along one chain of digests the ones found are a beginning of it.
        self._index: dict[bytes, tuple[int, int]] = {}
        # first digest -> the entries starting with it: only these can share positions (the digests
        # are chained), so an eviction looks at them alone.
        self._by_root: dict[bytes, set[int]] = {}
        self._next_id = 0
        self.nbytes = 0
        self.hits = 0  # sessions that copied a prefix
        self.reused_positions = 0  # positions copied instead of computed

    def __len__(self) -> int:
        return len(self._entries)

    def longest(self, digests: list[bytes], most: int) -> tuple[int, int]:
        """``(entry id, positions)`` of the longest cached prefix of at most ``most`` positions
        (``(-1, 0)``: none)."""
        with self._lock:
            return self._longest(digests, most)

    def _longest(self, digests: list[bytes], most: int) -> tuple[int, int]:
        lo, hi = 0, min(most, len(digests))  # the index holds the first lo; not the first hi + 1
        if hi and digests[hi - 1] in self._index:
            lo = hi
        while lo < hi:  # bisect: the index holds a beginning of the chain
            mid = (lo + hi + 1) // 2
            if digests[mid - 1] in self._index:
                lo = mid
            else:
                hi = mid - 1
        return (self._index[digests[lo - 1]][0], lo) if lo else (-1, 0)

    def fill(self, digests: list[bytes], cache: SegmentKVCache, most: int) -> int:
        """Copy the longest cached prefix of at most ``most`` positions into ``cache`` (empty), as
        if it had computed them; the positions copied (0: none)."""
        return self.fill_with_extra(digests, cache, most)[0]

    def fill_with_extra(self, digests: list[bytes], cache: SegmentKVCache,
                        most: int) -> tuple[int, torch.Tensor | None]:
        """``fill``, and the ``extra`` kept with the prefix for the positions copied."""
        if cache.length:
            raise ValueError(f"a prefix goes into an empty cache, this one holds {cache.length} positions")
        with self._lock:
            entry_id, n = self._longest(digests, most)
            if not n:
                return 0, None
            entry = self._entries[entry_id]
            self._entries.move_to_end(entry_id)
            self.hits += 1
            self.reused_positions += n
        with torch.inference_mode():  # the caches are inference tensors (written in forward passes)
            for layer_idx, (keys, values) in entry.layers.items():
                store, start = cache.reserve(layer_idx, keys[..., :n, :], values[..., :n, :])
                store.keys[..., start:start + n, :] = keys[..., :n, :]
                store.values[..., start:start + n, :] = values[..., :n, :]
        cache.advance(n)
        return n, None if entry.extra is None else entry.extra[:, :n]

    def add(self, digests: list[bytes], cache: SegmentKVCache, extra: torch.Tensor | None = None) -> None:
        """Keep the first ``len(digests)`` positions ``cache`` holds (a prompt just computed, or
        a whole session), and of ``extra`` (1, T, ...) as many. Entries this one extends (the
        same session's prompt, kept when it was computed) are dropped: it serves their prefixes."""
        length = len(digests)
        if not length or cache.length < length or self.limit_bytes <= 0:
            return
        with self._lock:
            known = self._index.get(digests[-1], (None, 0))
            if known[1] == length:
                self._entries.move_to_end(known[0])
                return  # this whole prefix is here already
        with torch.inference_mode():
            layers = {i: (s.keys[..., :length, :].clone(), s.values[..., :length, :].clone())
                      for i, s in cache._layers.items()}
            kept = None if extra is None else extra[:, :length].clone()
        nbytes = sum(k.nelement() * k.element_size() + v.nelement() * v.element_size() for k, v in layers.values())
        nbytes += 0 if kept is None else kept.nelement() * kept.element_size()
        if nbytes > self.limit_bytes:
            return
        with self._lock:
            entry_id, self._next_id = self._next_id, self._next_id + 1
            self._entries[entry_id] = _Entry(list(digests), layers, nbytes, kept)  # a copy: a session's grows
            self.nbytes += nbytes
            for n, digest in enumerate(digests, start=1):
                self._index[digest] = (entry_id, n)  # the newest entry holding a prefix serves it
            family = self._by_root.setdefault(digests[0], set())
            for other_id in [i for i in family
                             if len(e := self._entries[i].digests) < length and digests[len(e) - 1] == e[-1]
                             and (kept is not None or self._entries[i].extra is None)]:
                family.discard(other_id)
                self.nbytes -= self._entries.pop(other_id).nbytes  # the index points past it already
            family.add(entry_id)
            while self.nbytes > self.limit_bytes:
                self._evict()

    def _evict(self) -> None:
        entry_id, entry = self._entries.popitem(last=False)
        self.nbytes -= entry.nbytes
        root = entry.digests[0]
        family = self._by_root[root]
        family.discard(entry_id)
        if not family:
            del self._by_root[root]
        gone = [n for n, digest in enumerate(entry.digests) if self._index.get(digest, (None,))[0] == entry_id]
        for n in gone:
            del self._index[entry.digests[n]]
        # A prefix another entry of the family also holds stays findable through it; the
        # positions two entries share are a beginning of both chains.
        for other_id in sorted(family, reverse=True):  # the newest first
            other = self._entries[other_id].digests
            for n in gone:
                if n >= len(other) or other[n] != entry.digests[n]:
                    break
                self._index.setdefault(other[n], (other_id, n + 1))


class Continuations:
    """Where recent generations live, by the digests of their answers' positions (an edge's index,
    at most ``limit`` positions, least recently used forgotten first): a prompt that continues one
    (a conversation's next turn resends the answer) finds the worker whose prefix cache holds it,
    and its opener asks the broker for that worker. A prompt's own positions are not indexed: a
    beginning many requests share (a system prompt) says nothing about where a conversation is."""

    def __init__(self, limit: int = 1 << 16) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._where: OrderedDict[bytes, str] = OrderedDict()  # position digest -> worker id

    def __len__(self) -> int:
        return len(self._where)

    def add(self, prompt: list[int], tokens: list[int], worker_id: str, salt: int | str) -> None:
        """A generation from ``prompt`` that produced ``tokens`` (all but the last fed back) and
        ended on ``worker_id``."""
        fed = [*prompt, *tokens[:-1]]
        if len(fed) <= len(prompt) or not worker_id:
            return
        digests = row_digests(torch.tensor([fed]), salt)[len(prompt):]
        with self._lock:
            for digest in digests:
                self._where[digest] = worker_id
                self._where.move_to_end(digest)
            while len(self._where) > self.limit:
                self._where.popitem(last=False)

    def worker_for(self, ids: list[int], salt: int | str) -> str | None:
        """The worker holding the longest generation ``ids`` continues (None: none known)."""
        if not self._where or len(ids) < 2:
            return None
        digests = row_digests(torch.tensor([ids[:-1]]), salt)  # the last position is computed anyway
        with self._lock:
            for digest in reversed(digests):
                worker = self._where.get(digest)
                if worker is not None:
                    self._where.move_to_end(digest)
                    return worker
        return None
