"""What every command shares: logging to stderr, progress on a terminal, typed errors as exits."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

# Exit codes: 1 for a failed run, 2 for bad usage or input the user can fix.
EXIT_FAILED = 1
EXIT_USAGE = 2


def setup_logging(verbose: bool, quiet: bool = False) -> None:
    level = logging.DEBUG if verbose else (logging.WARNING if quiet else logging.INFO)
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    # Library chatter (transformers' warnings and progress bars) only when asked for. Set through
    # the environment, which transformers reads when it is imported: importing it here would cost
    # every command, `status` and a usage error included, the seconds torch takes to load.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # already loaded (a test, a library user): tell it directly
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        if not verbose:
            hf_logging.disable_progress_bar()


class Progress:
    """One-line status messages on stderr when it is a terminal and the output is not JSON."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.t0 = time.perf_counter()

    def __call__(self, message: str) -> None:
        if self.enabled:
            sys.stderr.write(f"\r\033[K[{time.perf_counter() - self.t0:5.1f}s] {message}…")
            sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


@contextlib.contextmanager
def startup_heap() -> Iterator[None]:
    """Wrap a role's imports and loading: no cyclic garbage collection inside, and what was built
    is frozen after it (``gc.freeze``), out of every later collection's way.

    Importing torch and transformers leaves ~300k objects that live as long as the process. While
    they pile up, each full collection walks all of them again: about 1 s of an edge's 5 s start
    and six full collections (0.5 s) of a worker's (``bench/bench_startup.py``). Left in the
    collector's oldest generation afterwards, they made every later full collection of a serving
    worker a pause of 180-260 ms for all its sessions; frozen, they are never walked again (0.2
    ms). What the role creates afterwards is collected as usual; start-up's own cyclic garbage is
    left (the worker's resident memory did not change measurably). The collector's state before
    is restored on the way out, error or not."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


@contextlib.contextmanager
def typed_errors(json_out: bool = False) -> Iterator[None]:
    """Turn the project's typed errors into one clear line and an exit code, not a traceback.
    ``json_out`` (a command's --json): stdout also gets its one JSON object, the error's
    ``{"error": {"type", "message", "exit_code"}}``, so a script reading it always finds one."""
    from partition.errors import PartitionError

    def fail(exc: BaseException, code: int, line: str | None = None) -> typer.Exit:
        typer.echo(line or f"error: {exc}", err=True)
        if json_out:
            typer.echo(json.dumps({"error": {"type": type(exc).__name__, "message": str(exc) or line,
                                             "exit_code": code}}))
        return typer.Exit(code)

    try:
        yield
    except (PartitionError, ValueError) as exc:
        raise fail(exc, EXIT_USAGE) from None
    except KeyboardInterrupt as exc:
        raise fail(exc, 130, "interrupted") from None
    except Exception as exc:
        # Errors from the wire layer carry their own actionable message; ZeroMQ's say which
        # address it could not use (a malformed endpoint, a port already taken).
        if type(exc).__module__.startswith("zmq"):
            raise fail(exc, EXIT_USAGE) from None
        if type(exc).__module__.startswith("broker"):
            raise fail(exc, EXIT_FAILED) from None
        raise


def stop_on_signals() -> threading.Event:
    """An event that SIGTERM and SIGINT set, so a long-running role leaves cleanly (a worker says
    DISCONNECT, the link proxy logs its stats) instead of dying mid-message."""
    stop = threading.Event()

    def handler(signum, frame):  # noqa: ARG001
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def interrupt_on_signals() -> None:
    """SIGTERM and SIGINT raise KeyboardInterrupt in the main thread, so a one-shot command (edge,
    demo) leaves through its cleanup: the cloud session closed, the demo's processes stopped.
    SIGINT is set explicitly because a process started with ``&`` from a script inherits it
    ignored, and could then not be interrupted at all."""

    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


# The mini-LLM options, shared by `edge` and `demo`.
MiniOpt = Annotated[str, typer.Option(
    "--mini", help="Drafter for easy tokens: auto (int8 at a hybrid split where the model allows it and it fits in a quarter of "
    "the free memory), none, int8 (an int8 copy of the cloud's layers on the edge), self (early exit from the "
    "edge's layers), lookup (prompt lookup) or a small model sharing the tokenizer.")]
MiniThresholdOpt = Annotated[float | None, typer.Option(
    "--mini-threshold", help="Drafter confidence below which a token is hard and drafting stops (default 0.5; "
    "0 for --mini int8 in verify mode).")]
MiniModeOpt = Annotated[str, typer.Option(
    "--mini-mode", help="verify: the main model checks every draft (output unchanged); trust: confident "
    "drafts are emitted without waiting for the cloud.")]
MiniDraftOpt = Annotated[int, typer.Option(
    "--mini-max-draft", help="Most tokens drafted per cloud round trip (fewer when they do not pay).")]
MiniFixedOpt = Annotated[bool, typer.Option(
    "--mini-fixed", help="Always draft up to --mini-max-draft tokens instead of what the measured round "
    "trip and acceptance rate say pays (for measurements).")]
MiniAdapterOpt = Annotated[Path | None, typer.Option(
    "--mini-adapter", help="--mini self: the adapter file to use (`edgecloud calibrate --drafter --out FILE`); "
    "default: the one calibrated for this model and split, if any.")]
MiniPipelineOpt = Annotated[bool, typer.Option(
    "--mini-pipeline/--no-mini-pipeline", help="Verify mode: send guesses while earlier frames are still in "
    "flight, so a round trip is paid per rejected guess (default); off: one frame of drafts per round trip.")]
