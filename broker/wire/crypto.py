"""End-to-end encryption between an edge and a cloud worker (the broker sees only ciphertext).

Key agreement: workers own static X25519 keypairs; for each session the edge
makes an ephemeral keypair, and both sides compute ``X25519(eph, worker)``.
Two direction keys are derived with keyed BLAKE2b over the shared secret,
both public keys, the session id, a fresh nonce the worker draws for each
opener it accepts, and a direction label, so a key is unique to (session,
edge ephemeral key, worker, opener, direction). The worker's nonce is what
makes a replayed opener useless: whoever replays it gets a session under new
keys, in which none of the captured steps authenticate.

Sealed layout, one ciphertext per body frame (so a 64 MiB activation is never
concatenated into a second copy)::

    frame_i = seq (8, big-endian) || index (4) || count (4) || nonce (24) || AEAD(plaintext_i)

AEAD is XChaCha20-Poly1305 with a random nonce (random rather than derived
from ``seq`` so that an edge reusing an ephemeral key after a reconnect can
never repeat a nonce). The associated data binds the caller's ``aad`` (the
header fields both ends see identically), the direction, ``seq``, the frame's
index and the frame count, so frames cannot be reordered, dropped, moved
between messages or directions. An empty frame list is sealed as one frame
carrying an empty plaintext, so even header-only messages are authenticated
and replay-checked.

Replay protection: the sender numbers messages 1, 2, 3, ... per direction;
the receiver accepts each number at most once, tolerating reordering within
a window of :data:`REPLAY_WINDOW` messages.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import nacl.bindings as sodium
import nacl.exceptions
import nacl.hash
from nacl.encoding import RawEncoder

from broker.errors import ConfigError, CryptoError, ReplayedFrame

logger = logging.getLogger(__name__)

KEY_BYTES = 32
NONCE_BYTES = sodium.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES  # 24
TAG_BYTES = sodium.crypto_aead_xchacha20poly1305_ietf_ABYTES  # 16
_PREFIX = struct.Struct(">QII")  # seq, index, count
SEALED_OVERHEAD_BYTES = _PREFIX.size + NONCE_BYTES + TAG_BYTES
# Messages of one direction may arrive out of order (the broker re-queues,
# the edge pipelines); 1024 in flight is far beyond any real pipeline depth.
REPLAY_WINDOW = 1024
# BLAKE2b personalisation (max 16 bytes): separates our derivation from any
# other use of the same shared secret.
_KDF_PERSON = b"edgecloud-kdf-v1"
_AAD_TAG = b"edgecloud-aead-v1"
EDGE_TO_WORKER = b"edge->worker"
WORKER_TO_EDGE = b"worker->edge"
SESSION_NONCE_BYTES = 16  # drawn by the worker for each opener it accepts
SECRET_FILE_MODE = 0o600
API_KEY_BYTES = 32  # 256 bits of entropy, urlsafe-encoded to 43 characters
ROLES = ("worker", "broker", "client", "edge")


@dataclass(frozen=True)
class KeyPair:
    """A static or ephemeral X25519 keypair (raw 32-byte keys)."""

    public_key: bytes
    secret_key: bytes = field(repr=False)


def generate_keypair() -> KeyPair:
    """A fresh X25519 keypair from the OS random source."""
    sk = secrets.token_bytes(KEY_BYTES)
    return KeyPair(public_key=sodium.crypto_scalarmult_base(sk), secret_key=sk)


def public_from_secret(secret_key: bytes) -> bytes:
    """The X25519 public key of ``secret_key``."""
    _check_key(secret_key, "secret key")
    return sodium.crypto_scalarmult_base(secret_key)


def _check_key(key: Any, what: str) -> None:
    if type(key) is not bytes or len(key) != KEY_BYTES:
        raise CryptoError(f"{what} must be {KEY_BYTES} bytes")


def _check_nonce(nonce: Any) -> None:
    if type(nonce) is not bytes or len(nonce) != SESSION_NONCE_BYTES:
        raise CryptoError(f"the worker's session nonce must be {SESSION_NONCE_BYTES} bytes")


# ------------------------------------------------------------------ key files
def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by the owner only, even if it existed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, SECRET_FILE_MODE)
    try:
        os.fchmod(fd, SECRET_FILE_MODE)
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _key_paths(directory: Path | str, role: str, name: str) -> tuple[Path, Path]:
    if role not in ROLES:
        raise ConfigError(f"unknown key role {role!r}; use one of {ROLES}")
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"bad key name {name!r}")
    d = Path(directory)
    return d / f"{role}-{name}.key", d / f"{role}-{name}.pub"


def save_keys(directory: Path | str, role: str, name: str, keypair: KeyPair | None = None) -> KeyPair:
    """Write (a new, unless given) keypair as hex files ``ROLE-NAME.key`` (0600) and ``.pub``."""
    keypair = keypair or generate_keypair()
    sk_path, pk_path = _key_paths(directory, role, name)
    sk_path.parent.mkdir(parents=True, exist_ok=True)
    _write_private(sk_path, keypair.secret_key.hex() + "\n")
    _write_private(pk_path, keypair.public_key.hex() + "\n")
    return keypair


def _read_hex_key(path: Path) -> bytes:
    try:
        text = path.read_text().strip()
        key = bytes.fromhex(text)
    except FileNotFoundError as exc:
        raise ConfigError(f"key file {path} not found") from exc
    except ValueError as exc:
        raise ConfigError(f"key file {path} is not hex") from exc
    if len(key) != KEY_BYTES:
        raise ConfigError(f"key file {path} holds {len(key)} bytes, expected {KEY_BYTES}")
    return key


def load_keys(directory: Path | str, role: str, name: str) -> KeyPair:
    """Read a keypair written by :func:`save_keys`; warns if the secret is readable by others."""
    sk_path, _ = _key_paths(directory, role, name)
    sk = _read_hex_key(sk_path)
    mode = sk_path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning(
            "secret key %s is accessible by group/others (mode %o); chmod 600 it", sk_path, mode & 0o777
        )
    return KeyPair(public_key=public_from_secret(sk), secret_key=sk)


def _read_lines(path: Path | str) -> list[str]:
    try:
        text = Path(path).read_text()
    except FileNotFoundError as exc:
        raise ConfigError(f"{path} not found") from exc
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def load_trusted_workers(path: Path | str) -> frozenset[bytes]:
    """Public keys from ``trusted_workers.txt``: one hex key per line, ``#`` comments."""
    keys = set()
    for n, line in enumerate(_read_lines(path), 1):
        try:
            key = bytes.fromhex(line.split()[0])
        except ValueError as exc:
            raise ConfigError(f"{path}:{n}: not a hex public key") from exc
        if len(key) != KEY_BYTES:
            raise ConfigError(f"{path}:{n}: public key must be {KEY_BYTES} bytes")
        keys.add(key)
    return frozenset(keys)


def add_trusted_worker(path: Path | str, public_key: bytes) -> None:
    """Append a worker public key to the trusted list unless it is there already."""
    _check_key(public_key, "public key")
    p = Path(path)
    existing = load_trusted_workers(p) if p.exists() else frozenset()
    if public_key not in existing:
        with open(p, "a") as f:
            f.write(public_key.hex() + "\n")


def generate_api_key() -> str:
    """A random urlsafe API key token."""
    return secrets.token_urlsafe(API_KEY_BYTES)


def load_api_keys(path: Path | str) -> frozenset[str]:
    """API keys from ``api_keys.txt``: one per line, ``#`` comments."""
    return frozenset(_read_lines(path))


def add_api_key(path: Path | str, key: str | None = None) -> str:
    """Append ``key`` (or a new random one) to the API key file (0600); return it."""
    key = key or generate_api_key()
    p = Path(path)
    existing = p.read_text() if p.exists() else ""
    _write_private(p, existing + ("" if not existing or existing.endswith("\n") else "\n") + key + "\n")
    return key


# -------------------------------------------------------------------- ciphers
class Cipher(Protocol):
    """What edge and worker code needs from a session cipher."""

    def seal(self, aad: bytes, frames: Sequence[Any]) -> list[bytes]: ...

    def open(self, aad: bytes, frames: Sequence[Any]) -> list[bytes]: ...


class NullCipher:
    """Pass-through cipher for ``--no-encryption``: same interface, no protection."""

    def seal(self, aad: bytes, frames: Sequence[Any]) -> list[Any]:
        """Return the frames unchanged."""
        return list(frames)

    def open(self, aad: bytes, frames: Sequence[Any]) -> list[Any]:
        """Return the frames unchanged."""
        return list(frames)


def new_session_nonce() -> bytes:
    """What a worker draws for each opener it accepts (see the module docstring)."""
    return secrets.token_bytes(SESSION_NONCE_BYTES)


def _derive(shared: bytes, edge_pk: bytes, worker_pk: bytes, session_id: str, nonce: bytes, label: bytes) -> bytes:
    sid = session_id.encode()
    material = edge_pk + worker_pk + struct.pack(">I", len(sid)) + sid + nonce + label
    return nacl.hash.blake2b(
        material, digest_size=KEY_BYTES, key=shared, person=_KDF_PERSON, encoder=RawEncoder
    )


def _shared_secret(sk: bytes, pk: bytes) -> bytes:
    try:
        shared = sodium.crypto_scalarmult(sk, pk)
    except (nacl.exceptions.CryptoError, RuntimeError) as exc:  # all-zero result: low-order point
        raise CryptoError("peer public key is invalid (low-order point)") from exc
    if shared == bytes(KEY_BYTES):
        raise CryptoError("peer public key is invalid (low-order point)")
    return shared


class SessionCipher:
    """Authenticated encryption for one session, one object per end.

    Not thread-safe: use one instance per session from one thread at a time.
    """

    def __init__(self, send_key: bytes, recv_key: bytes, send_label: bytes, recv_label: bytes) -> None:
        self._send_key = send_key
        self._recv_key = recv_key
        self._send_label = send_label
        self._recv_label = recv_label
        self._send_seq = 0
        self._recv_highest = 0
        self._recv_seen: set[int] = set()

    @classmethod
    def for_edge(
        cls,
        eph_sk: bytes,
        worker_pk: bytes,
        session_id: str,
        nonce: bytes,
        trusted: Iterable[bytes] | None = None,
    ) -> SessionCipher:
        """Edge side: ephemeral secret key, the worker's static public key, the nonce the
        worker's answer to the opener carried.

        If ``trusted`` is given, ``worker_pk`` must be in it.
        """
        _check_key(eph_sk, "ephemeral secret key")
        _check_key(worker_pk, "worker public key")
        _check_nonce(nonce)
        if trusted is not None and worker_pk not in frozenset(trusted):
            raise CryptoError(
                f"worker public key {worker_pk.hex()[:16]}... is not in the trusted workers list"
            )
        edge_pk = sodium.crypto_scalarmult_base(eph_sk)
        shared = _shared_secret(eph_sk, worker_pk)
        tx = _derive(shared, edge_pk, worker_pk, session_id, nonce, EDGE_TO_WORKER)
        rx = _derive(shared, edge_pk, worker_pk, session_id, nonce, WORKER_TO_EDGE)
        return cls(tx, rx, EDGE_TO_WORKER, WORKER_TO_EDGE)

    @classmethod
    def for_worker(cls, worker_sk: bytes, edge_eph_pk: bytes, session_id: str, nonce: bytes) -> SessionCipher:
        """Worker side: its static secret key, the edge's ephemeral public key, the nonce it drew
        for this opener (``new_session_nonce``)."""
        _check_key(worker_sk, "worker secret key")
        _check_key(edge_eph_pk, "edge ephemeral public key")
        _check_nonce(nonce)
        worker_pk = sodium.crypto_scalarmult_base(worker_sk)
        shared = _shared_secret(worker_sk, edge_eph_pk)
        tx = _derive(shared, edge_eph_pk, worker_pk, session_id, nonce, WORKER_TO_EDGE)
        rx = _derive(shared, edge_eph_pk, worker_pk, session_id, nonce, EDGE_TO_WORKER)
        return cls(tx, rx, WORKER_TO_EDGE, EDGE_TO_WORKER)

    @staticmethod
    def _aad(aad: bytes, label: bytes, prefix: bytes) -> bytes:
        return _AAD_TAG + label + prefix + struct.pack(">I", len(aad)) + aad

    def seal(self, aad: bytes, frames: Sequence[Any]) -> list[bytes]:
        """Encrypt ``frames`` (at least one output frame) bound to ``aad`` and the next sequence number."""
        self._send_seq += 1
        seq = self._send_seq
        plaintexts = list(frames) or [b""]
        count = len(frames)
        out = []
        for i, pt in enumerate(plaintexts):
            prefix = _PREFIX.pack(seq, i, count)
            nonce = secrets.token_bytes(NONCE_BYTES)
            ct = sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(
                bytes(pt), self._aad(aad, self._send_label, prefix), nonce, self._send_key
            )
            out.append(prefix + nonce + ct)
        return out

    def open(self, aad: bytes, frames: Sequence[Any]) -> list[bytes]:
        """Decrypt a message sealed by the other end; CryptoError if tampered or replayed."""
        if not frames:
            raise CryptoError("sealed message has no frames")
        parsed = []
        for f in frames:
            buf = bytes(f)
            if len(buf) < SEALED_OVERHEAD_BYTES:
                raise CryptoError("sealed frame is truncated")
            parsed.append((buf[: _PREFIX.size], _PREFIX.unpack_from(buf), buf))
        seq, _, count = parsed[0][1]
        if len(frames) != max(count, 1):
            raise CryptoError(f"sealed message has {len(frames)} frames, expected {max(count, 1)}")
        if seq == 0:
            raise CryptoError("sequence number 0 is never sent")
        if self._is_replay(seq):
            raise ReplayedFrame("replayed frame")
        out = []
        for i, (prefix, (fseq, idx, fcount), buf) in enumerate(parsed):
            if (fseq, idx, fcount) != (seq, i, count):
                raise CryptoError("sealed frames are out of order or mixed between messages")
            nonce = buf[_PREFIX.size : _PREFIX.size + NONCE_BYTES]
            try:
                pt = sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(
                    buf[_PREFIX.size + NONCE_BYTES :],
                    self._aad(aad, self._recv_label, prefix),
                    nonce,
                    self._recv_key,
                )
            except nacl.exceptions.CryptoError as exc:
                raise CryptoError("ciphertext failed authentication (tampered, or wrong key)") from exc
            out.append(pt)
        self._accept(seq)
        return out if count else []

    def _is_replay(self, seq: int) -> bool:
        if seq + REPLAY_WINDOW <= self._recv_highest:
            return True  # too old to tell: treat as replay
        return seq in self._recv_seen

    def _accept(self, seq: int) -> None:
        self._recv_seen.add(seq)
        if seq > self._recv_highest:
            self._recv_highest = seq
            floor = seq - REPLAY_WINDOW
            if len(self._recv_seen) > 2 * REPLAY_WINDOW:
                self._recv_seen = {s for s in self._recv_seen if s > floor}


def make_aad(session_id: str, step: int, kind: str) -> bytes:
    """Canonical associated data for a session message: fields both ends see unchanged."""
    sid, k = session_id.encode(), kind.encode()
    return struct.pack(">I", len(sid)) + sid + struct.pack(">QI", step, len(k)) + k
