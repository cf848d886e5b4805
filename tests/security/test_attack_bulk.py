"""Bulk frames must not crowd out liveness or other clients (issue 16's finding 5: six ~128 MB
bodies made a worker miss its heartbeats and lose its sessions, and another worker was expired).

The broker refuses a request over ``--max-request-mb`` and holds at most ``--max-client-mb`` of one
client's bodies (beyond: busy, with a retry hint); edges send a long prompt in frames of at most
``--max-frame-mb``. Real processes on loopback: a CURVE broker, a tiny-llama worker, edges.
"""

from __future__ import annotations

import threading

import pytest
from brokerutil import wait_until

from broker.client_api import BrokerClient
from broker.errors import Busy, EdgeCloudError, ProtocolError
from broker.transport import client_keys
from broker.wire.crypto import generate_keypair, load_api_keys
from broker.wire.session_protocol import OpenParams, close_digest, new_close_key
from cli.cluster import LocalCluster
from edge_worker.config import EdgeConfig
from edge_worker.engine import EdgeEngine
from partition.sampling import SamplingParams

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

MIB = 1 << 20


def _settings(cluster: LocalCluster, **kw) -> EdgeConfig:
    key = sorted(load_api_keys(cluster.keys_dir / "api_keys.txt"))[0]
    # No drafter: these tests count the frames of plain hybrid.
    return EdgeConfig(model="tiny-llama", split=1, broker=cluster.endpoint, keys_dir=cluster.keys_dir, api_key=key,
                      dynamic=False, mini="none", **kw)


def test_a_long_prompt_goes_in_frames_under_the_brokers_limit_and_generates_the_same_tokens():
    prompt = [(7 * i) % 250 + 3 for i in range(700)]  # 700 positions x 64 dims x 2 bytes: 87.5 KiB
    with LocalCluster(model="tiny-llama", worker_threads=1, heartbeat_s=0.5) as cluster:
        cluster.start_broker("--max-request-mb", "0.05")  # 51 KiB: the prompt in one frame is refused
        cluster.add_worker()
        cluster.wait_for_workers(1, timeout_s=60)
        # 20 KiB frames: 160 rows, so 128-position frames (whole 64-position chunks).
        with EdgeEngine("tiny-llama", _settings(cluster, max_frame_mb=20 / 1024)) as engine:
            chunked = engine.generate(prompt, engine.params(max_new_tokens=12, ignore_eos=True))
        with EdgeEngine("tiny-llama", _settings(cluster, fallback_local=False)) as engine, \
                pytest.raises(ProtocolError, match="too_large.*--max-frame-mb"):
            engine.generate(prompt, engine.params(max_new_tokens=2))  # the default 8 MiB frames
    with EdgeEngine("tiny-llama", EdgeConfig(model="tiny-llama", force_local=True)) as local:
        alone = local.generate(prompt, local.params(max_new_tokens=12, ignore_eos=True))
    assert chunked.token_ids == alone.token_ids
    assert chunked.fallback_at_step is None and chunked.retries == 0
    # The prompt went as ceil(700 / 128) = 6 frames, then one per token after the first.
    assert chunked.cloud_round_trips == 1 + 6 + 11, chunked.cloud_round_trips


def _flood_session(cluster: LocalCluster, flooder: BrokerClient, model_id: str) -> str:
    """An encrypted session of the flooder's own, so its junk reaches the worker as steps."""
    params = OpenParams(generate_keypair().public_key, SamplingParams().to_wire(), "fp16",
                        close_digest(new_close_key()))
    flooder.request("flood", "open", model_id, 1, 0, extra=params.to_extra(), timeout_s=30)
    return "flood"


def test_a_client_sending_huge_frames_slows_only_itself():
    with LocalCluster(model="tiny-llama", worker_threads=1, heartbeat_s=0.5) as cluster:
        cluster.start_broker()
        cluster.add_worker()
        cluster.wait_for_workers(1, timeout_s=60)
        settings = _settings(cluster, max_new_tokens=150, adaptive_timeout=False)
        key = settings.api_key
        with EdgeEngine("tiny-llama", settings) as engine:
            params = engine.params(ignore_eos=True)
            alone = engine.generate([5, 6, 7, 8], params)
            model_id = engine.client.status()["workers"][0]["model_id"]
            flooder = BrokerClient(cluster.endpoint, key, curve=client_keys(cluster.keys_dir, "client"))
            sid = _flood_session(cluster, flooder, model_id)
            outcomes: dict[str, int] = {"too_large": 0, "busy": 0, "refused by the worker": 0}
            busy_hints: list[float] = []
            stop = threading.Event()
            started = threading.Event()  # the first junk is on its way
            rounds = [0]  # rounds of junk answered

            def flood() -> None:
                # Bodies just under the broker's 32 MiB limit, as many at once as it lets through,
                # and a few over it (finding 5 sent 128 MB ones): junk the worker must decrypt.
                step = 1
                while not stop.is_set():
                    sizes = [31 * MIB] * 6 + [100 * MIB]
                    rids = []
                    for size in sizes:
                        try:
                            rids.append(flooder.submit(sid, "step", model_id, 1, step, [bytes(size)], timeout_s=30))
                            started.set()
                        except EdgeCloudError:
                            pass
                        step += 1
                    for rid in rids:
                        try:
                            flooder.result(rid)
                        except Busy as exc:
                            outcomes["busy"] += 1
                            busy_hints.append(exc.retry_after_s)
                        except ProtocolError as exc:
                            outcomes["too_large" if "too_large" in str(exc) else "refused by the worker"] += 1
                        except EdgeCloudError:
                            outcomes["refused by the worker"] += 1
                    rounds[0] += 1

            flooding = threading.Thread(target=flood)
            flooding.start()
            assert started.wait(60), "the flood never started"
            try:
                attacked = engine.generate([5, 6, 7, 8], params)
                # A fast machine can finish the generation within the flood's first round: the
                # flood goes on for two rounds at least, so the counts below see it answered.
                wait_until(lambda: rounds[0] >= 2 or not flooding.is_alive(), 120, "two rounds of junk answered")
            finally:
                stop.set()
                flooding.join(timeout=120)
                flooder.close()
        status = cluster.status()
    assert attacked.token_ids == alone.token_ids
    assert attacked.fallback_at_step is None and attacked.workers_used == alone.workers_used
    assert status["counters"].get("workers_expired", 0) == 0, status["counters"]
    # The worker refuses junk as fast as it arrives, so the flooder seldom has its 128 MiB share in
    # flight (test_broker_integration.py shows the busy answer and its hint with a worker that holds).
    assert outcomes["too_large"] >= 1 and outcomes["refused by the worker"] >= 10, outcomes
    assert all(h > 0 for h in busy_hints)
