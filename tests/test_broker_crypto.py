"""End-to-end session encryption, key files and trust lists."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from broker.errors import ConfigError, CryptoError
from broker.wire import crypto
from broker.wire.crypto import NullCipher, SessionCipher, generate_keypair, make_aad

SID = "session-1"
NONCE = bytes(range(16))


@pytest.fixture
def pair() -> tuple[SessionCipher, SessionCipher]:
    worker = generate_keypair()
    eph = generate_keypair()
    edge = SessionCipher.for_edge(eph.secret_key, worker.public_key, SID, NONCE, trusted={worker.public_key})
    cloud = SessionCipher.for_worker(worker.secret_key, eph.public_key, SID, NONCE)
    return edge, cloud


def test_round_trip_both_directions(pair: tuple[SessionCipher, SessionCipher]) -> None:
    edge, cloud = pair
    aad = make_aad(SID, 0, "prefill")
    sealed = edge.seal(aad, [b"hidden", b"", memoryview(b"mask")])
    assert len(sealed) == 3 and all(b"hidden" not in f for f in sealed)
    assert cloud.open(aad, sealed) == [b"hidden", b"", b"mask"]
    back = cloud.seal(aad, [b"out"])
    assert edge.open(aad, back) == [b"out"]
    # Header-only messages are authenticated too.
    assert cloud.open(aad, edge.seal(aad, [])) == []


def test_out_of_order_delivery_is_accepted_once(pair: tuple[SessionCipher, SessionCipher]) -> None:
    edge, cloud = pair
    first, second = edge.seal(b"a", [b"1"]), edge.seal(b"a", [b"2"])
    assert cloud.open(b"a", second) == [b"2"]
    assert cloud.open(b"a", first) == [b"1"]
    with pytest.raises(CryptoError, match="replayed"):
        cloud.open(b"a", first)


def test_replay_is_rejected(pair: tuple[SessionCipher, SessionCipher]) -> None:
    edge, cloud = pair
    sealed = edge.seal(b"h", [b"x"])
    cloud.open(b"h", sealed)
    with pytest.raises(CryptoError, match="replayed"):
        cloud.open(b"h", sealed)


def test_very_old_sequence_numbers_count_as_replays(pair: tuple[SessionCipher, SessionCipher]) -> None:
    edge, cloud = pair
    old = edge.seal(b"h", [b"x"])
    for _ in range(crypto.REPLAY_WINDOW + 1):
        cloud.open(b"h", edge.seal(b"h", [b"y"]))
    with pytest.raises(CryptoError, match="replayed"):
        cloud.open(b"h", old)


def test_tampered_header_or_body_is_rejected(pair: tuple[SessionCipher, SessionCipher]) -> None:
    edge, cloud = pair
    sealed = edge.seal(make_aad(SID, 4, "decode"), [b"payload", b"more"])
    with pytest.raises(CryptoError):
        cloud.open(make_aad(SID, 5, "decode"), sealed)  # header (step) changed
    for i in range(len(sealed)):
        for pos in (-1, crypto._PREFIX.size + 1):  # ciphertext/tag byte and nonce byte
            bad = [bytearray(f) for f in sealed]
            bad[i][pos] ^= 1
            with pytest.raises(CryptoError):
                cloud.open(make_aad(SID, 4, "decode"), [bytes(f) for f in bad])
    with pytest.raises(CryptoError):
        cloud.open(make_aad(SID, 4, "decode"), sealed[::-1])  # reordered frames
    with pytest.raises(CryptoError):
        cloud.open(make_aad(SID, 4, "decode"), sealed[:1])  # dropped frame
    with pytest.raises(CryptoError):
        cloud.open(make_aad(SID, 4, "decode"), [b"short"])
    # The untouched message still opens: failures did not consume its sequence number.
    assert cloud.open(make_aad(SID, 4, "decode"), sealed) == [b"payload", b"more"]


def test_reflection_to_sender_fails(pair: tuple[SessionCipher, SessionCipher]) -> None:
    edge, _ = pair
    with pytest.raises(CryptoError):
        edge.open(b"h", edge.seal(b"h", [b"x"]))


def test_wrong_key_or_session_fails() -> None:
    worker, other, eph = generate_keypair(), generate_keypair(), generate_keypair()
    edge = SessionCipher.for_edge(eph.secret_key, worker.public_key, SID, NONCE)
    sealed = edge.seal(b"h", [b"x"])
    with pytest.raises(CryptoError):
        SessionCipher.for_worker(other.secret_key, eph.public_key, SID, NONCE).open(b"h", sealed)
    with pytest.raises(CryptoError):
        SessionCipher.for_worker(worker.secret_key, eph.public_key, "session-2", NONCE).open(b"h", sealed)
    # Another opener of the same session (a replay of the edge's) gets another nonce from the
    # worker: nothing sealed under the first one authenticates under it.
    with pytest.raises(CryptoError, match="authentication"):
        SessionCipher.for_worker(worker.secret_key, eph.public_key, SID, bytes(16)).open(b"h", sealed)
    assert SessionCipher.for_worker(worker.secret_key, eph.public_key, SID, NONCE).open(b"h", sealed) == [b"x"]
    with pytest.raises(CryptoError, match="nonce"):
        SessionCipher.for_worker(worker.secret_key, eph.public_key, SID, b"short")


def test_untrusted_or_invalid_worker_key() -> None:
    worker, eph = generate_keypair(), generate_keypair()
    with pytest.raises(CryptoError, match="trusted"):
        SessionCipher.for_edge(eph.secret_key, worker.public_key, SID, NONCE, trusted=set())
    with pytest.raises(CryptoError):
        SessionCipher.for_edge(eph.secret_key, bytes(32), SID, NONCE)  # low-order point
    with pytest.raises(CryptoError):
        SessionCipher.for_edge(eph.secret_key, b"short", SID, NONCE)


def test_null_cipher_passes_through() -> None:
    c = NullCipher()
    assert c.open(b"", c.seal(b"", [b"a", b"b"])) == [b"a", b"b"]


def test_key_files(tmp_path: Path) -> None:
    kp = crypto.save_keys(tmp_path / "keys", "worker", "w1")
    secret = tmp_path / "keys" / "worker-w1.key"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert secret.read_text().strip() == kp.secret_key.hex()
    assert crypto.load_keys(tmp_path / "keys", "worker", "w1") == kp
    assert "secret_key" not in repr(kp)
    with pytest.raises(ConfigError):
        crypto.load_keys(tmp_path / "keys", "worker", "nope")
    with pytest.raises(ConfigError):
        crypto.save_keys(tmp_path, "wizard", "x")
    os.chmod(secret, 0o644)
    assert crypto.load_keys(tmp_path / "keys", "worker", "w1") == kp  # loads, with a warning


def test_trusted_workers_and_api_keys(tmp_path: Path) -> None:
    trusted = tmp_path / "trusted_workers.txt"
    a, b = generate_keypair(), generate_keypair()
    crypto.add_trusted_worker(trusted, a.public_key)
    crypto.add_trusted_worker(trusted, a.public_key)
    with open(trusted, "a") as f:
        f.write("# comment\n\n" + b.public_key.hex() + "  second worker\n")
    assert crypto.load_trusted_workers(trusted) == {a.public_key, b.public_key}
    trusted.write_text("zz\n")
    with pytest.raises(ConfigError):
        crypto.load_trusted_workers(trusted)

    keys = tmp_path / "api_keys.txt"
    k1 = crypto.add_api_key(keys)
    k2 = crypto.add_api_key(keys)
    assert k1 != k2 and len(k1) >= 40
    assert crypto.load_api_keys(keys) == {k1, k2}
    assert stat.S_IMODE(keys.stat().st_mode) == 0o600
