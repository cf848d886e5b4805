"""Transport security: CurveZMQ on every broker connection, with an enforced allowlist of keys.

CURVE authenticates and encrypts each ZeroMQ connection (who may connect, and nobody on the path
reads or alters the headers, API keys or ciphertext). It is a second layer under the end-to-end
encryption of session bodies (crypto.py), which the broker cannot read either way.

Keys are the X25519 keypairs of crypto.py (CurveZMQ uses the same Curve25519), so there is one
key system and one keys directory:

* ``broker-default.key`` / ``.pub``: the broker's CURVE server keypair; clients and workers need
  the ``.pub``;
* ``client-NAME.key``: an edge's (or status client's) CURVE client keypair;
* ``worker-NAME.key``: a worker's keypair, for CURVE and for end-to-end session keys alike;
* ``trusted_clients.txt``: the client public keys the broker serves;
* ``trusted_workers.txt``: the worker public keys edges trust with activations and the broker
  lets register; ``models=ID[,ID...]`` after a key restricts which models that worker may serve.

Both lists: one hex key per line, then optional ``models=...``, ``#`` comments (whole-line or
after the fields). A key in ``trusted_clients.txt`` may only send client messages (REQUEST,
STATUS, PING); a key in ``trusted_workers.txt`` only worker messages (and PING).

Enforcement, in two places because ZAP runs once per connection:

* at the handshake, :class:`ZapHandler` (RFC 27) answers libzmq's ZAP requests for the broker's
  socket: a key not on either list is refused (status 400) and never gets a connection; plain
  NULL-mechanism peers fail the handshake before ZAP is asked;
* on every message, the broker reads the key the handshake authenticated (the ZAP ``User-Id``,
  a property of each received frame) and :func:`authorize` checks it against the *current*
  lists, which the broker reloads when the files change: removing a key (``edgecloud keys
  revoke``) stops its live connections from being served too.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from broker import protocol as p
from broker.errors import ConfigError
from broker.wire.crypto import KEY_BYTES, KeyPair, _key_paths, _read_hex_key, load_keys

logger = logging.getLogger(__name__)

ZAP_DOMAIN = "edgecloud"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # fixed by RFC 27: one handler per context
ZAP_VERSION = b"1.0"
BROKER_KEY_NAME = "default"
TRUSTED_CLIENTS_FILE = "trusted_clients.txt"
TRUSTED_WORKERS_FILE = "trusted_workers.txt"
ROLE_CLIENT = "client"
ROLE_WORKER = "worker"
_ROLE_FILES = ((ROLE_CLIENT, TRUSTED_CLIENTS_FILE), (ROLE_WORKER, TRUSTED_WORKERS_FILE))
# How long a half-done handshake may hold a connection: a peer that connects and says nothing
# (or too little) is dropped after this, instead of libzmq's 30 s default.
HANDSHAKE_TIMEOUT_MS = 5000
# The ZAP thread checks for stop() this often while no handshake is waiting.
ZAP_POLL_MS = 100
ZAP_JOIN_TIMEOUT_S = 5.0

_CLIENT_MESSAGES = (p.Request, p.Status, p.Ping)
_WORKER_MESSAGES = (p.Register, p.Heartbeat, p.WorkerReply, p.WorkerReplies, p.WorkerError, p.Disconnect, p.Ping)


# ------------------------------------------------------------------ allowlist
@dataclass(frozen=True)
class AllowEntry:
    """What one public key may do."""

    roles: frozenset[str]
    models: frozenset[str] | None = None  # for a worker key: the models it may serve; None = any

    def may_serve(self, model_id: str) -> bool:
        return ROLE_WORKER in self.roles and (self.models is None or model_id in self.models)


@dataclass(frozen=True)
class Allowlist:
    """Public keys (lower-case hex, as the ZAP handler names them) and what each may do."""

    entries: Mapping[str, AllowEntry] = field(default_factory=dict)
    problems: tuple[str, ...] = ()  # lines skipped, files missing: logged by the loader

    def get(self, key_hex: str | None) -> AllowEntry | None:
        return self.entries.get(key_hex) if key_hex else None

    def count(self, role: str) -> int:
        return sum(role in e.roles for e in self.entries.values())


def parse_allowlist(text: str, role: str, source: str = "<text>") -> tuple[dict[str, AllowEntry], list[str]]:
    """Entries of one list file and the problems found; a bad line is skipped, never fatal, so a
    typo elsewhere in the file cannot keep a revoked key alive."""
    entries: dict[str, AllowEntry] = {}
    problems = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key_text, *options = line.split()
        try:
            key = bytes.fromhex(key_text)
        except ValueError:
            problems.append(f"{source}:{n}: not a hex public key")
            continue
        if len(key) != KEY_BYTES:
            problems.append(f"{source}:{n}: a public key is {KEY_BYTES} bytes, this one {len(key)}")
            continue
        models: frozenset[str] | None = None
        bad = [o for o in options if not o.startswith("models=") or role != ROLE_WORKER]
        if bad:
            problems.append(f"{source}:{n}: unknown option {bad[0]!r} (only models=ID[,ID...] for workers)")
            continue
        for o in options:
            models = frozenset(m for m in o.removeprefix("models=").split(",") if m)
        entries[key.hex()] = AllowEntry(frozenset({role}), models)
    return entries, problems


def load_allowlist(keys_dir: Path | str) -> Allowlist:
    """Both list files of ``keys_dir``; a missing file allows nobody of that role."""
    merged: dict[str, AllowEntry] = {}
    problems: list[str] = []
    for role, name in _ROLE_FILES:
        path = Path(keys_dir) / name
        try:
            text = path.read_text()
        except FileNotFoundError:
            problems.append(f"{path} does not exist: no {role} key is allowed")
            continue
        entries, bad = parse_allowlist(text, role, str(path))
        problems += bad
        for key, e in entries.items():
            old = merged.get(key)
            merged[key] = e if old is None else AllowEntry(old.roles | e.roles, old.models or e.models)
    return Allowlist(merged, tuple(problems))


def _file_signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class AllowlistFiles:
    """The allowlist of a keys directory, reloaded by :meth:`reload_if_changed`.

    ``current`` is replaced, never mutated, so another thread (the ZAP handler) may read it
    without a lock.
    """

    def __init__(self, keys_dir: Path | str) -> None:
        self.keys_dir = Path(keys_dir)
        self._signature = self._signatures()
        self.current = self._load()

    def _signatures(self) -> tuple[Any, ...]:
        return tuple(_file_signature(self.keys_dir / name) for _, name in _ROLE_FILES)

    def _load(self) -> Allowlist:
        allow = load_allowlist(self.keys_dir)
        for problem in allow.problems:
            logger.warning("allowlist: %s", problem)
        return allow

    def reload_if_changed(self) -> bool:
        """Reload when a list file was replaced, edited or removed; True if it was."""
        sig = self._signatures()
        if sig == self._signature:
            return False
        self._signature = sig
        self.current = self._load()
        logger.info("allowlist reloaded: %d client keys, %d worker keys",
                    self.current.count(ROLE_CLIENT), self.current.count(ROLE_WORKER))  # fmt: skip
        return True


def authorize(entry: AllowEntry | None, msg: p.Message) -> str | None:
    """Why the holder of ``entry`` may not send ``msg`` (None: it may). Pure policy.

    ``entry`` None means the connection's key is not (or no longer) on any list.
    """
    if entry is None:
        return "this connection's key is not (or no longer) in the broker's allowlist"
    if isinstance(msg, _CLIENT_MESSAGES) and ROLE_CLIENT in entry.roles:
        return None
    if not isinstance(msg, _WORKER_MESSAGES) or ROLE_WORKER not in entry.roles:
        role = "/".join(sorted(entry.roles))
        return f"a {role} key may not send {type(msg).__name__}"
    if isinstance(msg, p.Register):
        if not entry.may_serve(msg.model_id):
            allowed = ", ".join(sorted(entry.models or ()))
            return f"this worker key may serve only {allowed or 'no model'}, not {msg.model_id}"
    return None


def register_key_mismatch(key_hex: str, msg: p.Register) -> str | None:
    """A worker may announce only its own key for end-to-end sessions (or none)."""
    if msg.public_key and msg.public_key.hex() != key_hex:
        return "REGISTER announces a public key other than the one this connection authenticated"
    return None


# ------------------------------------------------------------------ ZAP handler
class ZapHandler:
    """Answers the ZAP requests of every CURVE server socket in ``context`` from an allowlist.

    Binds in ``__init__`` (before any server socket may accept), serves in its own thread. The
    ``User-Id`` of an accepted connection is the client's public key in hex; the broker reads it
    back from every message.
    """

    def __init__(self, context: zmq.Context, allowlist: Callable[[], Allowlist], domain: str = ZAP_DOMAIN) -> None:
        self._allowlist = allowlist
        self.domain = domain.encode()
        # Written by the ZAP thread, read by the broker's: every key exists from the start.
        self.counts: Counter[str] = Counter(accepted=0, refused_key=0, refused_other=0)
        self._stop = threading.Event()
        self._sock = context.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        try:
            self._sock.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as exc:
            self._sock.close()
            raise ConfigError(f"cannot start the ZAP handler ({exc}): another one runs in this context") from exc
        self._thread = threading.Thread(target=self._run, name="zap-handler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._sock.poll(ZAP_POLL_MS):
                    continue
                request = self._sock.recv_multipart()
                self._sock.send_multipart(self._answer(request))
        except zmq.ZMQError as exc:
            if not self._stop.is_set():
                logger.error("ZAP handler stopped: %s; new connections will be refused", exc)
        finally:
            self._sock.close()

    def _answer(self, request: list[bytes]) -> list[bytes]:
        """RFC 27 reply: version, request id, status code, status text, user id, metadata."""
        if len(request) < 6 or request[0] != ZAP_VERSION:
            self.counts["refused_other"] += 1
            rid = request[1] if len(request) > 1 else b""
            return [ZAP_VERSION, rid, b"500", b"malformed ZAP request", b"", b""]
        _, rid, domain, address, _identity, mechanism, *credentials = request
        peer = address.decode(errors="replace")
        if domain != self.domain or mechanism != b"CURVE" or len(credentials) != 1:
            self.counts["refused_other"] += 1
            logger.warning("refused %s: mechanism %s, domain %r", peer, mechanism.decode(errors="replace"), domain)
            return [ZAP_VERSION, rid, b"400", b"CURVE in the edgecloud domain only", b"", b""]
        key_hex = credentials[0].hex()
        if self._allowlist().get(key_hex) is None:
            self.counts["refused_key"] += 1
            logger.warning("refused %s: key %s... is not in the allowlist", peer, key_hex[:16])
            return [ZAP_VERSION, rid, b"400", b"key not allowed", b"", b""]
        self.counts["accepted"] += 1
        return [ZAP_VERSION, rid, b"200", b"OK", key_hex.encode(), b""]

    def close(self) -> None:
        """Stop the thread (it closes its socket); call before terminating the context."""
        self._stop.set()
        self._thread.join(ZAP_JOIN_TIMEOUT_S)


# ------------------------------------------------------------------ sockets
@dataclass(frozen=True)
class CurveClientKeys:
    """What a CURVE client socket needs: its own keypair and the broker's public key."""

    keypair: KeyPair
    server_public_key: bytes = field(repr=False)


def setup_curve_server(sock: zmq.Socket, secret_key: bytes, domain: str = ZAP_DOMAIN) -> None:
    """Make ``sock`` (before bind) a CURVE server whose every handshake must pass ZAP in ``domain``."""
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret_key)
    sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode())
    # Without a ZAP handler answering, refuse rather than let everyone in.
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_TIMEOUT_MS)


def setup_curve_client(sock: zmq.Socket, keys: CurveClientKeys | None) -> None:
    """Make ``sock`` (before connect) a CURVE client of the broker; None leaves it plain."""
    if keys is None:
        return
    sock.setsockopt(zmq.CURVE_SERVERKEY, keys.server_public_key)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.keypair.public_key)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.keypair.secret_key)
    sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_TIMEOUT_MS)


def peer_key(frame: Any) -> str | None:
    """The authenticated public key (hex) of the connection ``frame`` arrived on, if any."""
    try:
        return frame.get("User-Id") or None
    except (AttributeError, zmq.ZMQError):
        return None


def broker_public_key(keys_dir: Path | str) -> bytes:
    """The broker's public key from ``broker-default.pub``."""
    _, pub = _key_paths(keys_dir, "broker", BROKER_KEY_NAME)
    return _read_hex_key(pub)


def client_keys(keys_dir: Path | str | None, role: str, name: str = "default") -> CurveClientKeys | None:
    """CURVE keys for a client or worker: None when ``keys_dir`` holds no ``ROLE-NAME.key``
    (run in the clear); ConfigError when it does but the broker's public key is missing."""
    if keys_dir is None:
        return None
    secret_path, _ = _key_paths(keys_dir, role, name)
    if not secret_path.exists():
        return None
    _, broker_pub = _key_paths(keys_dir, "broker", BROKER_KEY_NAME)
    if not broker_pub.exists():
        raise ConfigError(f"{secret_path} exists but {broker_pub} does not: copy the broker's public key there, "
                          "or pass --no-curve to connect in the clear")  # fmt: skip
    return CurveClientKeys(load_keys(keys_dir, role, name), broker_public_key(keys_dir))


def broker_has_keys(keys_dir: Path | str | None) -> bool:
    """True when ``keys_dir`` holds the broker's secret key (CURVE then defaults to on)."""
    return keys_dir is not None and _key_paths(keys_dir, "broker", BROKER_KEY_NAME)[0].exists()


# errno values of a handshake that failed because the connection did (not because of keys).
_CONNECTION_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNREFUSED, errno.ECONNABORTED,
                                errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH})


class HandshakeWatch:
    """Reports, from a socket monitor, what a client socket's silence would hide: the broker
    refused our CURVE key at the handshake, or the broker is gone (it closed the connection, or
    nothing accepts connections at its address).

    Without it a refused client, or one whose broker died, only sees silence until a deadline.
    """

    EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
              | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_SUCCEEDED
              | zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED)  # fmt: skip

    def __init__(self, sock: zmq.Socket, curve: bool) -> None:
        self.monitor = sock.get_monitor_socket(self.EVENTS)
        self.curve = curve  # whether this socket is a CURVE client (else plain)
        self.refused = False  # the broker answered our key with an authentication failure
        self.failure = ""  # the last handshake failure, for error messages
        # Why the broker is known to be unreachable now ("" while connected, or not known yet):
        # it closed the connection, or a connection attempt was refused. Cleared by a handshake.
        self.gone = ""
        self.connected_once = False  # a handshake has succeeded on this socket

    def poll(self) -> None:
        """Read pending events (never blocks)."""
        while self.monitor.poll(0):
            try:
                ev = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            event = ev["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.refused, self.failure, self.gone = False, "", ""
                self.connected_once = True
            elif event == zmq.EVENT_DISCONNECTED:  # after a failed handshake, that failure says why
                self.gone = self.failure or "the broker closed the connection"
            elif event == zmq.EVENT_CONNECT_RETRIED:  # keeps the first reason while it lasts
                self.gone = self.gone or "nothing accepts connections at that address"
            elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self.refused = True
                self.failure = f"the broker refused this key (status {ev['value']})"
            elif (event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and ev["value"] in _CONNECTION_ERRNOS
                  and self.connected_once):
                # The connection broke mid-handshake after this socket had been served: a broker
                # dying or restarting, not a key problem. (Never served, the same reset is what
                # a mechanism the broker refuses looks like.)
                continue
            elif self.curve:
                self.failure = ("the CURVE handshake failed (the broker runs without CURVE, or its public key "
                                "is not the one in the keys directory, or what listens at that address is not "
                                "an edgecloud broker)")  # fmt: skip
            else:
                self.failure = ("the handshake failed: the broker requires CURVE (give this client a keys directory "
                                "with its key and broker-default.pub: --keys / EDGECLOUD_KEYS), or what listens at "
                                "that address is not an edgecloud broker")  # fmt: skip

    def close(self) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self.monitor.close(linger=0)


# ------------------------------------------------------------------ list files
def _rewrite(path: Path, lines: list[str]) -> None:
    """Replace ``path`` atomically (a new inode, so watchers see the change), owner-only."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("".join(ln if ln.endswith("\n") else ln + "\n" for ln in lines))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _line_key(line: str) -> str | None:
    body = line.split("#", 1)[0].split()
    return body[0].lower() if body else None


def allow_key(keys_dir: Path | str, public_key: bytes, role: str, models: list[str] | None = None,
              comment: str = "") -> Path:  # fmt: skip
    """Add (or replace) ``public_key`` in the list of ``role``; returns the file written."""
    if role not in (ROLE_CLIENT, ROLE_WORKER):
        raise ConfigError(f"role must be {ROLE_CLIENT} or {ROLE_WORKER}, got {role!r}")
    if len(public_key) != KEY_BYTES:
        raise ConfigError(f"a public key is {KEY_BYTES} bytes")
    if models and role != ROLE_WORKER:
        raise ConfigError("models= applies to worker keys only")
    path = Path(keys_dir) / dict(_ROLE_FILES)[role]
    lines = path.read_text().splitlines() if path.exists() else []
    lines = [ln for ln in lines if _line_key(ln) != public_key.hex()]
    entry = public_key.hex() + (f" models={','.join(models)}" if models else "")
    lines.append(entry + (f"  # {comment}" if comment else ""))
    _rewrite(path, lines)
    return path


def revoke_key(keys_dir: Path | str, public_key: bytes) -> list[Path]:
    """Remove ``public_key`` from every list; returns the files it was removed from."""
    changed = []
    for _, name in _ROLE_FILES:
        path = Path(keys_dir) / name
        if not path.exists():
            continue
        lines = path.read_text().splitlines()
        kept = [ln for ln in lines if _line_key(ln) != public_key.hex()]
        if len(kept) != len(lines):
            _rewrite(path, kept)
            changed.append(path)
    return changed


def resolve_public_key(keys_dir: Path | str, who: str) -> bytes:
    """``who`` is a hex public key, or ROLE-NAME naming ``ROLE-NAME.pub`` in ``keys_dir``."""
    with contextlib.suppress(ValueError):
        key = bytes.fromhex(who)
        if len(key) == KEY_BYTES:
            return key
    role, sep, name = who.partition("-")
    if not sep:
        raise ConfigError(f"{who!r} is neither a hex public key nor ROLE-NAME (e.g. client-default)")
    _, pub = _key_paths(keys_dir, role, name)
    return _read_hex_key(pub)
