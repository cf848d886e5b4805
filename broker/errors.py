"""Typed errors shared by the broker, its clients and its workers.

Every error that can cross the wire has a short ``code`` string; the receiving
side rebuilds the same class with :func:`error_from_code`, so callers can
``except Busy`` whether the condition was raised locally or remotely.
``retryable`` tells a caller whether sending the *same* request again may
succeed without any other action (reopening a session is "other action").
"""

from __future__ import annotations

__all__ = [
    "EdgeCloudError",
    "ProtocolError",
    "AuthError",
    "CryptoError",
    "ReplayedFrame",
    "ConfigError",
    "UnknownReduction",
    "BrokerUnavailable",
    "RequestTimeout",
    "Busy",
    "NoWorkerAvailable",
    "WeightsMismatch",
    "WorkerLost",
    "CacheLimitExceeded",
    "PoisonRequest",
    "RemoteError",
    "error_from_code",
]


class EdgeCloudError(Exception):
    """Base of every edgecloud error; an unknown wire code decodes to this class."""

    code: str = "internal"
    retryable: bool = False


class ProtocolError(EdgeCloudError):
    """A frame was malformed, truncated, oversized or of an unknown type.

    ``reason`` is a short stable token (e.g. ``"bad_magic"``) used to count
    failures per cause; ``msg_type`` and ``request_id`` are filled in when the
    decoder got far enough to know them, so the broker can answer the sender.
    """

    code = "protocol"

    def __init__(
        self,
        reason: str,
        detail: str = "",
        *,
        msg_type: int | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.msg_type = msg_type
        self.request_id = request_id


class AuthError(EdgeCloudError):
    """The API key was not accepted (or a peer's public key is unknown)."""

    code = "auth"


class CryptoError(EdgeCloudError):
    """Ciphertext failed authentication, was replayed, or a worker key is untrusted."""

    code = "crypto"


class ReplayedFrame(CryptoError):
    """A sealed message arrived a second time (its sequence number was seen): refused unopened.

    Retryable for the edge that sealed it: when a copy of its own frame (a replay by someone who
    saw it on the wire) got there first, a freshly sealed copy is run as a retry of that step."""

    code = "replayed"
    retryable = True


class ConfigError(EdgeCloudError):
    """A key file, key list or setting is missing or malformed."""

    code = "config"


class UnknownReduction(EdgeCloudError):
    """The worker does not hold the projection file (by sha256) a session asked for, or holds it
    for another model or split. Copy the edge's file into the worker's reductions directory."""

    code = "unknown_reduction"


class BrokerUnavailable(EdgeCloudError):
    """Nothing came back from the broker before the deadline, or the broker is known gone
    (``gone``: it closed the connection, refuses connections or is shutting down)."""

    code = "unavailable"
    retryable = True

    def __init__(self, address: str, detail: str = "", gone: bool = False) -> None:
        hint = (
            f"no answer from the broker at {address}"
            + (f" ({detail})" if detail else "")
            + "; check that the broker is running at that address "
            "(set it with --broker or the EDGECLOUD_BROKER environment variable)"
        )
        super().__init__(hint)
        self.address = address
        self.gone = gone


class RequestTimeout(EdgeCloudError):
    """The request missed its deadline; a late result, if any, is discarded."""

    code = "timeout"
    retryable = True


class Busy(EdgeCloudError):
    """The broker or worker is overloaded (queue full, a quota reached); back off and retry,
    after ``retry_after_s`` when the sender gave a hint (0: none)."""

    code = "busy"
    retryable = True

    def __init__(self, message: str = "", retry_after_s: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NoWorkerAvailable(EdgeCloudError):
    """No registered worker serves this model and layer range (yet); retry later."""

    code = "no_worker"
    retryable = True


class WeightsMismatch(NoWorkerAvailable):
    """Workers serve a model of this architecture, but with other weights (another content
    fingerprint in the model id): the edge's model was changed, fine-tuned or is another
    checkpoint. Raised on the edge, which says how to start a worker with its weights."""


class CacheLimitExceeded(NoWorkerAvailable):
    """The session would hold more KV cache than the worker's whole ``--max-cache-mb``: it can
    never go on there, so it is not retried (a local fallback takes over at once)."""

    code = "cache_limit"
    retryable = False


class WorkerLost(EdgeCloudError):
    """The worker holding the session died or expired; its KV cache is gone.

    Not retryable as-is: the caller must reopen the session (elsewhere) and
    replay its prefix before decoding can continue.
    """

    code = "worker_lost"


class PoisonRequest(EdgeCloudError):
    """The same work failed on as many workers as the broker allows (``--max-attempts``).

    Each of those workers died, hung or missed the deadline while holding it, so the request
    itself is the likely cause: it is not tried again, on any worker. Terminal: retrying or
    reopening elsewhere would only take down more workers.
    """

    code = "poison"


class RemoteError(EdgeCloudError):
    """The worker raised while computing; carries the remote error type and message."""

    code = "remote"

    def __init__(self, remote_type: str, message: str) -> None:
        super().__init__(f"{remote_type}: {message}")
        self.remote_type = remote_type
        self.remote_message = message

    @classmethod
    def from_exception(cls, exc: BaseException) -> RemoteError:
        """Wrap a local exception so it can be sent to the requester."""
        return cls(type(exc).__name__, str(exc))


_BY_CODE: dict[str, type[EdgeCloudError]] = {
    cls.code: cls
    for cls in (
        ProtocolError,
        AuthError,
        CryptoError,
        ReplayedFrame,
        ConfigError,
        UnknownReduction,
        BrokerUnavailable,
        RequestTimeout,
        Busy,
        NoWorkerAvailable,
        CacheLimitExceeded,
        WorkerLost,
        PoisonRequest,
        RemoteError,
    )
}


def error_from_code(code: str, message: str, retry_after_ms: int = 0) -> EdgeCloudError:
    """Rebuild the typed error named by a wire ``code`` with its ``message``.

    Classes whose constructor takes structured arguments are rebuilt from the
    message text they produced; an unknown code yields the base class so that
    a newer peer never crashes an older one.
    """
    cls = _BY_CODE.get(code)
    if cls is None:
        return EdgeCloudError(f"[{code}] {message}")
    if cls is ProtocolError:
        reason, _, detail = message.partition(": ")
        return ProtocolError(reason or "remote", detail)
    if cls is RemoteError:
        remote_type, sep, detail = message.partition(": ")
        return RemoteError(remote_type, detail) if sep else RemoteError("Exception", message)
    if cls is BrokerUnavailable:
        err = BrokerUnavailable.__new__(BrokerUnavailable)
        EdgeCloudError.__init__(err, message)
        err.address = ""
        err.gone = True  # the broker says so itself only when it shuts down
        return err
    if cls is Busy:
        return Busy(message, retry_after_ms / 1000)
    return cls(message)


def is_unavailable(exc: EdgeCloudError) -> bool:
    """Errors that mean "no cloud right now", where running locally is the right answer. Security
    and protocol errors are never papered over by a fallback."""
    return isinstance(exc, WorkerLost | BrokerUnavailable | NoWorkerAvailable | RequestTimeout | Busy)
