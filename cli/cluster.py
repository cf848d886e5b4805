"""A broker and cloud workers as real OS processes on loopback: the demo's and the tests' cluster.

Every child runs the real CLI (``python -m cli.main ...``) with its output in a log file. ``stop``
always terminates and reaps every child (SIGTERM, then SIGKILL after a grace period), so a
failing test or a Ctrl-C never leaves processes behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker.errors import EdgeCloudError

if TYPE_CHECKING:
    from broker.client_api import BrokerClient

ROOT = Path(__file__).resolve().parent.parent
STOP_GRACE_S = 5.0
# The waits' own broker client logs here, errors only: a broker still starting or restarting is
# what they expect, and its reconnection warnings would only alarm whoever reads the demo's output.
WATCHER_LOG = logging.getLogger("cli.cluster.watcher")
WATCHER_LOG.setLevel(logging.ERROR)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # Importing this package set the OpenMP defaults in os.environ (cli/__init__.py): children get them.
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra or {})
    return env


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli.main", *args]


def jsonable(o: object) -> str:
    """``json.dumps``'s default for a status map: bytes as hex, anything else as its str."""
    if isinstance(o, bytes | bytearray | memoryview):
        return bytes(o).hex()
    return str(o)


class ClusterError(RuntimeError):
    """A cluster process failed to start or died; the message carries the end of its log."""


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n_chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n_chars:]
        except OSError:
            return ""


@dataclass
class LocalCluster:
    model: str = "smollm2-135m"
    keys_dir: Path | None = None  # None: a fresh directory with new keys
    encryption: bool = True
    curve: bool = True  # False: every process runs with --no-curve
    worker_threads: int | None = None
    heartbeat_s: float = 1.0
    # Keys and logs; None: a temporary directory of its own, removed (private keys and all) by stop().
    workdir: Path | None = None
    port: int = field(default_factory=free_port)
    broker: Proc | None = None
    workers: list[Proc] = field(default_factory=list)
    servers: list[Proc] = field(default_factory=list)  # `edgecloud serve` processes

    def __post_init__(self) -> None:
        self._brokers_started = 0
        self._owns_workdir = self.workdir is None
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="edgecloud-"))
        if self.keys_dir is None:
            self.keys_dir = self.workdir / "keys"
            subprocess.run(cli_command("keys", "generate", str(self.keys_dir), "--workers", "4"),
                           env=child_env(), check=True, capture_output=True)

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return child_env({"EDGECLOUD_BROKER": self.endpoint, "EDGECLOUD_KEYS": str(self.keys_dir)})

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Proc:
        log_path = self.workdir / f"{name}.log"
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(cli_command(*args), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env={**self.env(), **(env or {})}, cwd=ROOT,
                                     start_new_session=True)  # Ctrl-C in a terminal reaches us, not them
        return Proc(name, popen, log_path)

    def start_broker(self, *args: str) -> Proc:
        """Start the broker; ``args`` are extra ``edgecloud broker`` options. A restarted broker
        logs to broker-2.log, broker-3.log, ...: the log of the one before stays readable."""
        self._brokers_started += 1
        name = "broker" if self._brokers_started == 1 else f"broker-{self._brokers_started}"
        self.broker = self._spawn(name, ["broker", "--endpoint", self.endpoint,
                                             "--heartbeat", str(self.heartbeat_s), *self._curve_args(), *args])
        return self.broker

    def _curve_args(self) -> list[str]:
        return [] if self.curve else ["--no-curve"]

    def add_worker(self, key_name: str | None = None, extra_args: tuple[str, ...] = (),
                   env: dict[str, str] | None = None) -> Proc:
        """Start a worker; ``env`` adds environment variables (e.g. EDGECLOUD_FAULT_INJECTION)."""
        i = len(self.workers)
        name = f"worker{i + 1}"
        args = ["cloud-worker", "--model", self.model, "--worker-id", name,
                "--key-name", key_name or ("default" if i == 0 else str(min(i + 1, 4)))]
        if not self.encryption:
            args.append("--no-encryption")
        args += self._curve_args()
        if self.worker_threads:
            args += ["--threads", str(self.worker_threads)]
        args += extra_args
        proc = self._spawn(name, args, env)
        self.workers.append(proc)
        return proc

    def start_server(self, port: int, *args: str, timeout_s: float = 120.0) -> Proc:
        """Start ``edgecloud serve ARGS`` on ``port`` against this cluster; returns once its
        /health answers (or fails, with its log)."""
        import urllib.request

        proc = self._spawn(f"serve{len(self.servers) + 1}", ["serve", "--model", self.model, "--port", str(port),
                                                             *self._curve_args(), *args])
        self.servers.append(proc)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not proc.alive():
                raise ClusterError(f"{proc.name} exited with code {proc.popen.returncode}:\n{proc.log_tail()}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1.0) as r:
                    if r.status == 200:
                        return proc
            time.sleep(0.2)
        raise ClusterError(f"{proc.name} did not answer /health within {timeout_s:.0f} s:\n{proc.log_tail()}")

    def status(self, timeout_s: float = 2.0) -> dict:
        out = subprocess.run(cli_command("status", "--json", "--timeout", str(timeout_s), *self._curve_args()),
                             env=self.env(),
                             capture_output=True, text=True, cwd=ROOT)
        if out.returncode != 0:
            raise ClusterError(f"status failed: {out.stderr.strip()}")
        return json.loads(out.stdout)

    def wait_for_workers(self, n: int, timeout_s: float = 180.0,
                         progress: Callable[[int, float], None] | None = None, every_s: float = 10.0) -> dict:
        """Wait until ``n`` workers are registered; fail early, with the log, if a process died.
        ``progress(registered, seconds)`` is called every ``every_s`` while it waits."""
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        next_report = t0 + every_s
        st: dict = {}
        with self._watcher() as watcher:
            while time.monotonic() < deadline:
                self.check_alive()
                with contextlib.suppress(EdgeCloudError):
                    st = json.loads(json.dumps(watcher.status(timeout_s=2.0), default=jsonable))  # as `status --json`
                    if len(st.get("workers", [])) >= n:
                        return st
                if progress is not None and time.monotonic() >= next_report:
                    progress(len(st.get("workers", [])), time.monotonic() - t0)
                    next_report += every_s
                time.sleep(0.2)
        raise ClusterError(f"{n} workers did not register within {timeout_s:.0f} s; last status: {st}\n"
                           f"{self.log_tails()}")

    @contextlib.contextmanager
    def _watcher(self) -> Iterator[BrokerClient]:
        """A client of this cluster's broker in this process: what the waits poll (a ``status``
        process per poll would take a core's third of a second each, beside the cluster)."""
        from broker.client_api import BrokerClient
        from broker.transport import client_keys
        from broker.wire.crypto import load_api_keys

        keys = sorted(load_api_keys(Path(self.keys_dir) / "api_keys.txt"))
        curve = client_keys(self.keys_dir, "client") if self.curve else None
        watcher = BrokerClient(self.endpoint, keys[0] if keys else "", curve=curve, log=WATCHER_LOG)
        try:
            yield watcher
        finally:
            watcher.close()

    def check_alive(self) -> None:
        for proc in [self.broker, *self.workers]:
            if proc is not None and not proc.alive():
                raise ClusterError(f"{proc.name} exited with code {proc.popen.returncode}:\n{proc.log_tail()}")

    def edge(self, *args: str, timeout_s: float = 300.0, env: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess:
        """Run ``edgecloud edge ARGS`` against this cluster as its own process; ``env`` adds
        environment variables (``EDGECLOUD_CPUS`` to place it on some cores, say)."""
        return subprocess.run(cli_command("edge", "--model", self.model, *self._curve_args(), *args),
                              env={**self.env(), **(env or {})}, capture_output=True, text=True, timeout=timeout_s,
                              cwd=ROOT)

    def start_edge(self, *args: str) -> subprocess.Popen:
        """Start ``edgecloud edge ARGS`` without waiting (read its output with communicate())."""
        return subprocess.Popen(cli_command("edge", "--model", self.model, *self._curve_args(), *args), env=self.env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)

    def wait_for(self, cond: Callable[[dict], Any], what: str, edge: subprocess.Popen | None = None,
                 timeout_s: float = 120.0) -> Any:
        """Poll the broker's status (one request at a time, from this process) until ``cond`` of it
        is truthy, and return that value. Fails with ClusterError, saying ``what`` it waited for,
        at ``timeout_s`` or as soon as ``edge`` (if given) has ended."""
        with self._watcher() as watcher:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and (edge is None or edge.poll() is None):
                try:
                    got = cond(watcher.status(timeout_s=2))
                except EdgeCloudError:
                    continue
                if got:
                    return got
                time.sleep(0.02)  # a status request at a time, not a stream of them beside the edge
            if edge is not None and edge.poll() is not None:  # it ended: say how
                _, err = edge.communicate()
                raise ClusterError(f"the edge ended (exit status {edge.returncode}) before {what}:\n{err[-3000:]}\n"
                                   f"{self.log_tails()}")
            raise ClusterError(f"timed out after {timeout_s:.0f} s waiting until {what}\n{self.log_tails()}")

    def wait_for_decoding(self, edge: subprocess.Popen, served: int = 50, timeout_s: float = 120.0) -> str:
        """Wait until the broker has served ``served`` requests and a worker holds a session (the
        edge is decoding, past its opener); return that worker's id. For injecting faults."""

        def decoding(st: dict) -> str | None:
            busy = [w for w in st["workers"] if w["sessions"]]
            return str(busy[0]["worker_id"]) if busy and st["counters"].get("requests_served", 0) >= served else None

        return self.wait_for(decoding, "decoding was under way", edge, timeout_s)

    def worker_named(self, worker_id: str) -> Proc:
        return next(p for p in self.workers if p.name == worker_id)

    def log_tails(self, n_chars: int = 2000) -> str:
        """The end of every child's log, restarted ones included: what a failing test prints."""
        parts = []
        for path in sorted(Path(self.workdir).glob("*.log")):
            with contextlib.suppress(OSError):
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-n_chars:]}")
        return "\n".join(parts)

    def kill(self, proc: Proc, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.popen.send_signal(sig)

    def stop(self) -> None:
        procs = [p for p in [*self.servers, *self.workers, self.broker] if p is not None]
        for p in procs:
            if p.alive():
                with contextlib.suppress(ProcessLookupError):
                    p.popen.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
                    p.popen.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for p in procs:
            try:
                p.popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
