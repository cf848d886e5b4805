"""Coverage-guided fuzzing (atheris) of every decoder that reads network bytes.

    python tests/fuzz_atheris.py -atheris_runs=200000     # what `make fuzz` runs
    python tests/fuzz_atheris.py -atheris_runs=2000       # tests/test_fuzz_atheris.py, a bounded run

The first input byte picks the decoder; the rest becomes its frames. Every decoder must return a
valid value or raise the project's typed errors (ProtocolError, CryptoError), nothing else: any
other exception is a crash that atheris reports with the input that caused it.
"""

from __future__ import annotations

import sys

import atheris
import msgpack
import torch  # noqa: F401 - imported (uninstrumented) first: instrumenting torch takes minutes

with atheris.instrument_imports(include=["broker"]):
    from broker import protocol
    from broker.errors import CryptoError, ProtocolError
    from broker.wire import session_protocol
    from broker.wire.codec import decode_tensor
    from broker.wire.crypto import NullCipher, SessionCipher, generate_keypair

SID = "fuzz-session"
HIDDEN = 8
_EDGE, _WORKER = generate_keypair(), generate_keypair()
TYPED = (ProtocolError, CryptoError)


def _frames(fdp: atheris.FuzzedDataProvider) -> list[bytes]:
    n = fdp.ConsumeIntInRange(0, 4)
    return [fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 512)) for _ in range(n)] + [fdp.ConsumeBytes(4096)]


def _envelope(fdp: atheris.FuzzedDataProvider) -> None:
    protocol.decode(_frames(fdp))


def _step(fdp: atheris.FuzzedDataProvider) -> None:
    pos, hidden = session_protocol.open_step(NullCipher(), SID, fdp.ConsumeIntInRange(0, 9), _frames(fdp), HIDDEN)
    assert pos >= 0 and hidden.shape[-1] == HIDDEN, "a decoded step must have the session's width"


def _step_reply(fdp: atheris.FuzzedDataProvider) -> None:
    r = session_protocol.open_step_reply(NullCipher(), SID, 0, _frames(fdp))
    assert r.token >= 0 and r.pos >= 0, "a decoded reply has non-negative fields"


def _open_params(fdp: atheris.FuzzedDataProvider) -> None:
    try:
        extra = msgpack.unpackb(fdp.ConsumeBytes(1024), raw=False, strict_map_key=False)
    except Exception:  # noqa: BLE001 - not a decoder of ours; only well-formed maps get through
        return
    if isinstance(extra, dict):
        session_protocol.OpenParams.from_extra(extra)


def _tensor(fdp: atheris.FuzzedDataProvider) -> None:
    try:
        meta = msgpack.unpackb(fdp.ConsumeBytes(256), raw=False, strict_map_key=False)
    except Exception:  # noqa: BLE001 - as above
        return
    decode_tensor(meta, fdp.ConsumeBytes(4096))


def _sealed(fdp: atheris.FuzzedDataProvider) -> None:
    cipher = SessionCipher.for_worker(_WORKER.secret_key, _EDGE.public_key, SID, bytes(16))
    cipher.open(b"aad", _frames(fdp))
    raise AssertionError("random bytes passed authentication")


TARGETS = (_envelope, _step, _step_reply, _open_params, _tensor, _sealed)


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    target = TARGETS[fdp.ConsumeIntInRange(0, len(TARGETS) - 1)]
    try:
        target(fdp)
    except TYPED:
        pass


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
