"""The end-to-end layer: what only the edge and the worker read, inside the broker's envelope.

``broker/protocol.py`` defines the envelope the broker routes by. This module defines the
request *kinds* a session uses and their bodies, which the broker forwards untouched:

``open``   extra: ``edge_pk`` (32-byte ephemeral X25519 key, or empty without encryption),
           ``sampling`` (temperature, top_p, seed; top_k, min_p, repetition_penalty when not off), ``wire_dtype`` (``broker.wire.codec.WIRE_DTYPES``),
           ``close_digest`` (32 bytes: the BLAKE2b digest of a random ``close_key`` only the edge
           knows, which its ``close`` reveals), and, when the edge reduces its activations,
           ``reduction``: the sha256 (64 hex digits) of
           the projection file (``partition/reduction.py``) both sides hold; the worker refuses a
           hash it does not have. No body: no key exists yet. A worker accepts one opener per
           session id, ever: an opener for an id it holds, or held until it was closed or expired,
           is refused (the edge opens every attempt under a new id), so a replayed opener can
           neither reset a session nor bring an ended one back.
           Reply extra: ``worker_pk`` and ``nonce`` (16 bytes the worker drew for this opener; both
           ends derive the session keys from it, ``broker/wire/crypto.py``); body: one sealed frame
           ``b"open-ok"`` that proves the worker
           holds the secret key of ``worker_pk`` (the edge checks that key against its trusted list).
``step``   body, sealed: [msgpack ``{"pos": int, "tensor": {"dtype", "shape"}, "draft": [int]}``,
           raw tensor bytes]; the tensor is (1, T, H), or (1, T, D) under a reduction to D dims. ``pos`` is the position of the first new token; the worker's cache
           must hold exactly ``pos`` positions, or ``pos`` must be a retry of a step it already ran
           (then the cache is cropped back and the step recomputed: the effect on the cache
           happens once). ``draft`` (optional, at most ``MAX_DRAFT_TOKENS``) holds tokens a
           drafter proposed; the tensor's last ``len(draft) + 1`` positions are the pending token
           and the drafts, and the worker verifies them (``partition/speculative.py``), keeps the
           accepted ones in its cache and drops the rest. ``tree`` (optional, at most
           ``MAX_TREE_NODES`` parents): the drafts are a token tree's nodes (each node's parent:
           -1 for the pending token, else an earlier node; ``partition/tree.py``) and the tensor
           holds exactly the pending token and the nodes; the worker verifies the whole tree in
           one pass, keeps the accepted path in its cache and names it in the reply's ``path``
           (the kept frame rows after the pending token's). ``epoch`` (optional, default 0): the
           edge raises it when it gives up on frames in flight and resends from its oldest
           unanswered position; a step of a higher epoch may rewind the cache (crop back to
           ``pos``), one of a lower epoch is stale. ``first`` (optional) makes the step
           *conditional* (pipelined drafting): ``first`` is the edge's guess of the token at
           ``pos``, and the worker runs the step only if its cache holds exactly ``pos``
           positions, the epoch is the session's, and ``first`` is the token the main model
           chose after the previous step; otherwise it answers ``skipped`` and changes nothing.
           A third body frame, present when the session's sampling has a repetition penalty,
           holds the distinct token ids generated up to the last position before the drafts
           (little-endian int32): what the penalty reads.
           Reply body, sealed: [msgpack ``{"token": int, "accepted": int, "pos": int,
           "compute_ms": float, "worker_ms": float}``] (a skipped conditional step:
           ``{"skipped": true, "pos": int, ...}`` with ``token`` 0): ``accepted`` drafts were kept and
           ``token`` follows them; ``pos`` is the cache length after the step; ``compute_ms`` is
           the forward pass and sampling, ``worker_ms`` everything from the job's arrival at the
           worker to its reply (decryption included).
``close``  extra: ``close_key`` (32 bytes) whose digest the opener carried; no body. The worker
           frees the session only for the right key, and compares in constant time. A key rather
           than a sealed body, so that an edge whose opener got no answer (timed out, interrupted)
           can still free what the opener may have made; a replayed close finds the session gone.

Every sealed body is bound to ``make_aad(session_id, step, kind)``, so a body moved to another
session, step or kind fails authentication.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import nacl.hash
import numpy as np
from nacl.encoding import RawEncoder

from broker.errors import CryptoError, ProtocolError
from broker.wire.codec import WIRE_DTYPES, decode_tensor, encode_tensor
from broker.wire.crypto import Cipher, make_aad
from partition.sampling_params import MAX_DRAFT_TOKENS
from partition.tree import MAX_TREE_NODES, DraftTree, TreeError

KIND_OPEN = "open"
KIND_STEP = "step"
KIND_CLOSE = "close"
OPEN_PROOF = b"open-ok"
# Step metadata is a tiny map; anything bigger is hostile.
_MAX_META_BYTES = 4096
SAMPLING_KEYS = frozenset({"temperature", "top_p", "seed"})  # required
SAMPLING_OPTIONAL_KEYS = frozenset({"top_k", "min_p", "repetition_penalty"})  # absent: off
# The generated token ids a step carries for a repetition penalty: at most this many (int32 each).
MAX_SEEN_TOKENS = 1 << 20


def _unpack_small(data: Any, what: str) -> dict:
    raw = bytes(data)
    if len(raw) > _MAX_META_BYTES:
        raise ProtocolError("bad_body", f"{what} metadata is {len(raw)} bytes")
    try:
        obj = msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            max_bin_len=64,
            max_str_len=256,
            max_array_len=max(MAX_DRAFT_TOKENS, MAX_TREE_NODES),
            max_map_len=16,
            ext_hook=_no_ext,
        )
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise ProtocolError(
            "bad_body", f"{what} metadata is not valid msgpack: {type(exc).__name__}"
        ) from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_body", f"{what} metadata is not a map")
    return obj


def _no_ext(code: int, data: bytes) -> Any:
    raise ProtocolError("bad_body", "msgpack ext types are not accepted")


def _int_field(d: dict, key: str, what: str) -> int:
    v = d.get(key)
    if type(v) is not int or v < 0:
        raise ProtocolError("bad_body", f"{what} field {key!r} must be a non-negative integer")
    return v


# --- open ----------------------------------------------------------------------------------------


CLOSE_KEY_BYTES = 32


def new_close_key() -> bytes:
    """The secret an edge draws for each opener; its ``close`` reveals it."""
    return secrets.token_bytes(CLOSE_KEY_BYTES)


def close_digest(close_key: bytes) -> bytes:
    """What the opener carries: the close key's digest (revealing nothing of the key)."""
    return nacl.hash.blake2b(close_key, digest_size=CLOSE_KEY_BYTES, person=b"edgecloud-close",
                             encoder=RawEncoder)


def check_close_key(digest: bytes, extra: dict[str, Any]) -> None:
    """CryptoError unless ``extra`` holds the close key whose digest is ``digest``."""
    key = extra.get("close_key")
    if type(key) is not bytes or len(key) != CLOSE_KEY_BYTES:
        raise CryptoError(f"a close must carry the session's {CLOSE_KEY_BYTES}-byte close key")
    if not hmac.compare_digest(close_digest(key), digest):
        raise CryptoError("wrong close key: only the edge that opened a session may close it")


@dataclass(frozen=True)
class OpenParams:
    edge_pk: bytes
    sampling: dict[str, float | int]
    wire_dtype: str
    close_digest: bytes  # close_digest(close key) (``new_close_key``)
    reduction: str = ""  # sha256 hex of the projection file; "" when activations are not reduced

    def to_extra(self) -> dict[str, Any]:
        extra = {"edge_pk": self.edge_pk, "sampling": dict(self.sampling), "wire_dtype": self.wire_dtype,
                 "close_digest": self.close_digest}
        if self.reduction:
            extra["reduction"] = self.reduction
        return extra

    @classmethod
    def from_extra(cls, extra: dict[str, Any]) -> OpenParams:
        edge_pk = extra.get("edge_pk", b"")
        sampling = extra.get("sampling")
        wire_dtype = extra.get("wire_dtype", "fp16")
        if not isinstance(edge_pk, bytes) or len(edge_pk) not in (0, 32):
            raise ProtocolError("bad_open", "edge_pk must be 32 bytes, or empty without encryption")
        if not isinstance(sampling, dict) or not SAMPLING_KEYS <= set(sampling) <= SAMPLING_KEYS | SAMPLING_OPTIONAL_KEYS:
            raise ProtocolError("bad_open", "sampling must be a map of temperature, top_p, seed and optionally "
                                + ", ".join(sorted(SAMPLING_OPTIONAL_KEYS)))
        if not all(isinstance(v, int | float) for v in sampling.values()):
            raise ProtocolError("bad_open", "sampling values must be numbers")
        if type(wire_dtype) is not str or wire_dtype not in WIRE_DTYPES:
            raise ProtocolError("bad_open", f"unknown wire dtype {wire_dtype!r}; use one of {sorted(WIRE_DTYPES)}")
        reduction = extra.get("reduction", "")
        if type(reduction) is not str or (reduction and not _is_sha256_hex(reduction)):
            raise ProtocolError("bad_open", "reduction must be the 64 hex digits of a sha256")
        digest = extra.get("close_digest")
        if type(digest) is not bytes or len(digest) != CLOSE_KEY_BYTES:
            raise ProtocolError("bad_open", f"close_digest must be {CLOSE_KEY_BYTES} bytes (the digest of the "
                                "key the edge's close will reveal)")
        return cls(edge_pk, sampling, wire_dtype, digest, reduction)


def _is_sha256_hex(s: str) -> bool:
    return len(s) == 64 and all(c in "0123456789abcdef" for c in s)


def seal_open_proof(cipher: Cipher, session_id: str, step: int) -> list[Any]:
    return cipher.seal(make_aad(session_id, step, KIND_OPEN), [OPEN_PROOF])


def check_open_proof(cipher: Cipher, session_id: str, step: int, frames: list[Any]) -> None:
    body = cipher.open(make_aad(session_id, step, KIND_OPEN), frames)
    if [bytes(b) for b in body] != [OPEN_PROOF]:
        raise CryptoError("the worker's session proof is wrong: it does not hold the key it announced")


# --- step ----------------------------------------------------------------------------------------


def seal_step(cipher: Cipher, session_id: str, step: int, pos: int, hidden, wire_dtype: str,
              draft: list[int] | tuple[int, ...] = (), first: int | None = None, epoch: int = 0,
              seen: Sequence[int] | None = None, tree: Sequence[int] | None = None) -> list[Any]:
    """hidden: (1, T, H) boundary activations for positions pos .. pos+T; ``draft``: tokens the
    last ``len(draft)`` of those positions hold, to be verified; ``first``: the guessed token at
    ``pos`` of a conditional step; ``epoch``: see the module docstring; ``seen``: the generated
    tokens a repetition penalty reads (None: the session has none); ``tree``: the drafts are a
    token tree's nodes and these their parents (``partition/tree.py``), the frame its rows."""
    meta, data = encode_tensor(hidden, wire_dtype)
    fields: dict[str, Any] = {"pos": pos, "tensor": meta}
    if draft:
        fields["draft"] = [int(t) for t in draft]
    if first is not None:
        fields["first"] = int(first)
    if tree is not None:
        fields["tree"] = [int(p) for p in tree]
    if epoch:
        fields["epoch"] = int(epoch)
    body = [msgpack.packb(fields), data]
    if seen is not None:
        body.append(np.array(sorted(set(seen)), dtype="<i4").tobytes())
    return cipher.seal(make_aad(session_id, step, KIND_STEP), body)


@dataclass(frozen=True)
class StepRequest:
    pos: int
    hidden: Any  # (1, T, H) float32 tensor
    draft: list[int]
    first: int | None = None  # a conditional step: the guessed token at ``pos``
    epoch: int = 0
    seen: list[int] | None = None  # generated token ids for a repetition penalty
    tree: DraftTree | None = None  # the drafts are this tree's nodes; the frame is its rows


def open_step(cipher: Cipher, session_id: str, step: int, frames: list[Any], hidden_size: int,
              vocab_size: int | None = None) -> StepRequest:
    """Decrypt and validate a step body; raises ProtocolError or CryptoError.

    ``hidden_size`` is the width the session sends: the model's H, or D under a reduction."""
    body = cipher.open(make_aad(session_id, step, KIND_STEP), frames)
    if len(body) not in (2, 3):
        raise ProtocolError("bad_body", f"a step body has 2 or 3 frames, got {len(body)}")
    seen = _seen_tokens(body[2], vocab_size) if len(body) == 3 else None
    head = _unpack_small(body[0], "step")
    pos = _int_field(head, "pos", "step")
    draft = head.get("draft", [])
    if type(draft) is not list or not all(type(t) is int and t >= 0 for t in draft):
        raise ProtocolError("bad_draft", "step field 'draft' must be a list of token ids")
    if vocab_size is not None and any(t >= vocab_size for t in draft):
        raise ProtocolError("bad_draft", f"a drafted token id is outside the vocabulary (size {vocab_size})")
    first = head.get("first")
    if first is not None and (type(first) is not int or first < 0
                              or (vocab_size is not None and first >= vocab_size)):
        raise ProtocolError("bad_draft", "step field 'first' must be a token id in the vocabulary")
    epoch = _int_field(head, "epoch", "step") if "epoch" in head else 0
    tree = None
    if "tree" in head:
        parents = head["tree"]
        if type(parents) is not list or not all(type(p) is int for p in parents):
            raise ProtocolError("bad_draft", "step field 'tree' must be a list of parent indices")
        if first is not None:
            raise ProtocolError("bad_draft", "a tree step cannot be conditional")
        try:
            tree = DraftTree(tuple(draft), tuple(parents))
        except TreeError as exc:
            raise ProtocolError("bad_draft", f"step field 'tree': {exc}") from None
    elif len(draft) > MAX_DRAFT_TOKENS:
        raise ProtocolError("bad_draft", f"at most {MAX_DRAFT_TOKENS} drafts in a chain, got {len(draft)}")
    hidden = decode_tensor(head.get("tensor"), body[1])
    if hidden.dim() != 3 or hidden.shape[0] != 1 or hidden.shape[2] != hidden_size or hidden.shape[1] < 1:
        raise ProtocolError(
            "bad_shape", f"step activations must be (1, T, {hidden_size}), got {tuple(hidden.shape)}"
        )
    if len(draft) >= hidden.shape[1]:
        raise ProtocolError("bad_draft", f"{len(draft)} drafts need at least {len(draft) + 1} positions, "
                            f"the step has {hidden.shape[1]}")
    if tree is not None and hidden.shape[1] != tree.rows:
        raise ProtocolError("bad_draft", f"a tree step holds its {tree.rows} rows only, got {hidden.shape[1]} positions")
    return StepRequest(pos, hidden, draft, first, epoch, seen, tree)


def _seen_tokens(data: Any, vocab_size: int | None) -> list[int]:
    raw = bytes(data)
    if len(raw) % 4 or len(raw) > 4 * MAX_SEEN_TOKENS:
        raise ProtocolError("bad_body", f"a step's generated-token frame must be int32 ids, got {len(raw)} bytes")
    ids = np.frombuffer(raw, dtype="<i4")
    if ids.size and (int(ids.min()) < 0 or (vocab_size is not None and int(ids.max()) >= vocab_size)):
        raise ProtocolError("bad_body", "a step's generated-token frame holds an id outside the vocabulary")
    return ids.tolist()


def seal_step_reply(
    cipher: Cipher, session_id: str, step: int, token: int, pos: int, compute_ms: float, worker_ms: float,
    accepted: int = 0, skipped: bool = False, path: Sequence[int] | None = None,
) -> list[Any]:
    fields: dict[str, Any] = {"token": token, "accepted": accepted, "pos": pos, "compute_ms": float(compute_ms),
                              "worker_ms": float(worker_ms)}
    if skipped:
        fields["skipped"] = True
    if path is not None:
        fields["path"] = [int(r) for r in path]
    head = msgpack.packb(fields)
    return cipher.seal(make_aad(session_id, step, KIND_STEP), [head])


@dataclass(frozen=True)
class StepReply:
    token: int
    pos: int  # positions the worker's cache holds after the step
    compute_ms: float
    worker_ms: float
    accepted: int = 0  # drafts the worker kept; ``token`` follows them
    skipped: bool = False  # a conditional step whose condition failed: nothing ran
    path: tuple[int, ...] | None = None  # a tree step: the frame rows kept after the root


def open_step_reply(cipher: Cipher, session_id: str, step: int, frames: list[Any]) -> StepReply:
    body = cipher.open(make_aad(session_id, step, KIND_STEP), frames)
    if len(body) != 1:
        raise ProtocolError("bad_body", f"a step reply has 1 frame, got {len(body)}")
    head = _unpack_small(body[0], "step reply")
    times = [head.get("compute_ms"), head.get("worker_ms")]
    if not all(isinstance(t, float | int) for t in times):
        raise ProtocolError("bad_body", "step reply compute_ms and worker_ms must be numbers")
    return StepReply(
        _int_field(head, "token", "step reply"),
        _int_field(head, "pos", "step reply"),
        float(times[0]),
        float(times[1]),
        _int_field(head, "accepted", "step reply") if "accepted" in head else 0,
        head.get("skipped") is True,
        _path_field(head),
    )


def _path_field(head: dict) -> tuple[int, ...] | None:
    path = head.get("path")
    if path is None:
        return None
    if type(path) is not list or not all(type(r) is int and r > 0 for r in path) or path != sorted(set(path)):
        raise ProtocolError("bad_body", "step reply 'path' must be ascending frame rows")
    return tuple(path)
