"""A second client replays everything an edge sends, byte for byte under fresh request ids, while
the edge generates and again after it closed; it also forges closes and openers for the edge's
session. Real processes on loopback: a broker and two tiny-llama workers, with end-to-end
encryption, with and without CURVE.

Without CURVE (one API key shared by both clients) the broker cannot tell the clients apart, so
the workers' rules must hold: one opener per session id, ever (the key schedule takes a nonce
the worker draws per opener), the session cipher's replay window, a close that reveals the key
its opener committed to. With CURVE the broker already refuses another key's requests for the
session. Either way every replay is refused, and the edge's output, retries and workers are
those of an undisturbed run.
"""

from __future__ import annotations

import queue
import subprocess
import threading
from dataclasses import dataclass, field
from typing import Any

import pytest

from broker.client_api import BrokerClient
from broker.errors import EdgeCloudError
from broker.transport import client_keys
from broker.wire.crypto import load_api_keys
from broker.wire.session_protocol import new_close_key
from cli.cluster import ROOT, LocalCluster, cli_command
from edge_worker.config import EdgeConfig
from edge_worker.engine import EdgeEngine

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

PROMPT = [5, 17, 42, 99, 7, 23, 61, 140]
TOKENS = 40


@dataclass
class Capture:
    """Every request the victim's connection sends, as the replaying client will send it again."""

    victim: Any = None
    seen: queue.Queue = field(default_factory=queue.Queue)
    log: list[tuple] = field(default_factory=list)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        submit, result = BrokerClient.submit, BrokerClient.result
        sent: dict[str, tuple] = {}

        def recording_submit(client, session_id, kind, model_id, layer_lo, step, frames=(), timeout_s=None,
                             extra=None):
            rid = submit(client, session_id, kind, model_id, layer_lo, step, frames, timeout_s, extra)
            if client is self.victim:
                sent[rid] = (session_id, kind, model_id, layer_lo, step, [bytes(memoryview(f)) for f in frames],
                             dict(extra or {}))
                self.log.append(sent[rid])
            return rid

        def releasing_result(client, rid):
            # Replayed once its original was answered, as a copy seen on the wire would come
            # after it (a copy sent at once could overtake it on another connection).
            try:
                return result(client, rid)
            finally:
                if client is self.victim and rid in sent:
                    self.seen.put(sent.pop(rid))

        monkeypatch.setattr(BrokerClient, "submit", recording_submit)
        monkeypatch.setattr(BrokerClient, "result", releasing_result)


def replay(attacker: BrokerClient, call: tuple) -> EdgeCloudError | None:
    """Send ``call`` again under a fresh request id; the error that refused it (None: served)."""
    session_id, kind, model_id, layer_lo, step, frames, extra = call
    try:
        attacker.request(session_id, kind, model_id, layer_lo, step, frames, timeout_s=10, extra=extra)
    except EdgeCloudError as exc:
        return exc
    return None


@pytest.mark.parametrize("curve", [False, True], ids=["shared-api-key", "curve"])
def test_every_replayed_or_forged_request_is_refused_and_the_victim_runs_as_if_alone(tmp_path, monkeypatch, curve):
    keys = tmp_path / "keys"
    subprocess.run(cli_command("keys", "generate", str(keys), "--workers", "4", "--clients", "2"),
                   check=True, capture_output=True, cwd=ROOT)
    api_key = sorted(load_api_keys(keys / "api_keys.txt"))[0]
    with LocalCluster(model="tiny-llama", keys_dir=keys, curve=curve, worker_threads=1, heartbeat_s=0.5) as cluster:
        cluster.start_broker()
        cluster.add_worker()
        cluster.add_worker()
        cluster.wait_for_workers(2, timeout_s=90)
        # Plain hybrid (no drafter): the attacker replays one captured request per step it saw.
        settings = EdgeConfig(model="tiny-llama", split=1, broker=cluster.endpoint, keys_dir=keys, api_key=api_key,
                              curve=curve, max_new_tokens=TOKENS, adaptive_timeout=False, dynamic=False,
                              mini="none")
        with EdgeEngine("tiny-llama", settings) as engine:
            params = engine.params(ignore_eos=True)
            alone = engine.generate(PROMPT, params)

            capture = Capture(victim=engine.client.connection)
            capture.install(monkeypatch)
            attacker = BrokerClient(cluster.endpoint, api_key,
                                    curve=client_keys(keys, "client", "2") if curve else None)
            during: list[tuple[str, EdgeCloudError | None]] = []
            done = threading.Event()

            def attack() -> None:
                # Each request the edge sends is sent again at once, while the generation runs;
                # then a forged close (no key, a wrong key) and a forged opener for its session.
                while not done.is_set() or not capture.seen.empty():
                    try:
                        call = capture.seen.get(timeout=0.05)
                    except queue.Empty:
                        continue
                    during.append((call[1], replay(attacker, call)))
                    if call[1] == "step" and call[4] == 3:
                        session_id, _, model_id, layer_lo = call[:4]
                        for extra in ({}, {"close_key": new_close_key()}):
                            during.append(("forged close", replay(
                                attacker, (session_id, "close", model_id, layer_lo, 0, [], extra))))
                        opener = next(c for c in capture.log if c[1] == "open")
                        forged = {**opener[6], "close_digest": bytes(32)}
                        during.append(("forged open", replay(attacker, (*opener[:6], forged))))

            thread = threading.Thread(target=attack)
            thread.start()
            try:
                attacked = engine.generate(PROMPT, params)
            finally:
                done.set()
                thread.join(timeout=60)
            # After the edge closed its session: everything once more, the close included.
            after = [(call[1], replay(attacker, call)) for call in capture.log]
            attacker.close()
        status = cluster.status()

    kinds = [k for k, _ in during]
    assert kinds.count("open") == 1 and kinds.count("step") >= TOKENS - 1, kinds
    assert {"forged close", "forged open"} <= set(kinds), kinds
    served = [(k, e) for k, e in during + after if e is None]
    assert not served, f"replays that were served: {served}"
    reasons = " | ".join(f"{k}: {type(e).__name__}: {e}" for k, e in during + after)
    ended = ("not held", "opened before")  # a replay that came after the edge's close
    if curve:  # the broker refuses every request of another key for a live session
        live = [k for k, e in during if "belongs to another client" in str(e)]
        assert all(any(m in str(e) for m in ("belongs to another client", *ended)) for k, e in during), reasons
    else:  # the workers refuse: a second opener, a replayed frame, a close without the key
        live = [k for k, e in during if "replayed frame" in str(e) or "already open" in str(e)
                or "close key" in str(e)]
        expected = {"step": "replayed frame", "open": "already open", "forged open": "already open",
                    "forged close": "close key", "close": "not held"}
        assert all(any(m in str(e) for m in (expected[k], *ended)) for k, e in during), reasons
    # Most of them came while the session was live (the rest just after its close).
    assert "open" in live and "forged close" in live and live.count("step") >= TOKENS // 2, reasons
    # Once closed, the opener is refused by the broker (the id is spent) and the rest find nothing.
    assert all("opened before" in str(e) for k, e in after if k == "open"), reasons
    assert all("not held by any worker" in str(e) for k, e in after if k != "open"), reasons

    assert attacked.token_ids == alone.token_ids
    assert (attacked.retries, attacked.fallback_at_step, len(attacked.workers_used)) == (0, None, 1)
    assert (alone.retries, alone.fallback_at_step) == (0, None)
    counters = status["counters"]
    assert counters["reopen_refused"] >= 1
    assert counters.get("auth_refused_sessions", 0) >= (len(live) if curve else 0)
