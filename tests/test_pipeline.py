"""The whole pipeline with real processes on loopback: broker, cloud workers and edge CLIs."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from cli.cluster import LocalCluster, cli_command

pytestmark = pytest.mark.integration  # every test here starts real processes


PROMPT = "Describe a lighthouse at night."


def edge_json(cluster: LocalCluster, *args: str) -> dict:
    out = cluster.edge(*args, "--json", "--prompt", PROMPT)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, f"--json must print exactly one line on stdout, got {out.stdout!r}"
    return json.loads(lines[0])


def test_hybrid_output_equals_local_output_at_every_split(tiny_cluster):
    local = edge_json(tiny_cluster, "--force-local", "--tokens", "20")
    assert local["mode"] == "local" and local["cloud_round_trips"] == 0
    for k in range(0, 4):
        hybrid = edge_json(tiny_cluster, "--split", str(k), "--tokens", "20")
        assert hybrid["token_ids"] == local["token_ids"], f"split {k}"
        assert hybrid["mode"] == ("cloud" if k == 0 else "hybrid")
        # The cloud computed every token (the int8 drafter, on by default, may have the cloud verify
        # several at once when round trips look slow, so there can be fewer than 20 of them).
        assert hybrid["cloud_round_trips"] > 0 and hybrid["fallback_at_step"] is None
        assert hybrid["bytes_sent"] > 0 and hybrid["bytes_received"] > 0


def test_sampling_with_a_seed_is_reproducible_and_matches_local(tiny_cluster):
    args = ("--tokens", "16", "--temperature", "0.8", "--top-p", "0.9", "--seed", "7")
    local = edge_json(tiny_cluster, "--force-local", *args)
    hybrid = edge_json(tiny_cluster, "--split", "2", *args)
    again = edge_json(tiny_cluster, "--split", "2", *args)
    assert hybrid["token_ids"] == local["token_ids"] == again["token_ids"]
    other = edge_json(tiny_cluster, "--split", "2", "--tokens", "16", "--temperature", "0.8", "--seed", "8")
    assert other["token_ids"] != hybrid["token_ids"]


def test_penalty_and_min_p_reach_the_worker_and_match_local(tiny_cluster):
    """The worker holds the head at split 2: the penalty's generated tokens travel with each
    step, and the text is the one the edge samples alone."""
    plain = edge_json(tiny_cluster, "--force-local", "--tokens", "24")
    for args in (("--repetition-penalty", "1.8"),
                 ("--repetition-penalty", "1.3", "--temperature", "0.9", "--min-p", "0.05", "--top-k", "50",
                  "--seed", "4")):
        local = edge_json(tiny_cluster, "--force-local", "--tokens", "24", *args)
        hybrid = edge_json(tiny_cluster, "--split", "2", "--tokens", "24", *args)
        assert hybrid["token_ids"] == local["token_ids"], args
        assert local["token_ids"] != plain["token_ids"], args
    bad = tiny_cluster.edge("--split", "2", "--tokens", "4", "--min-p", "2", "--prompt", PROMPT)
    assert bad.returncode != 0 and "min_p must be in [0, 1]" in bad.stderr, bad.stderr[-2000:]


@pytest.mark.parametrize("split", [("--split", "2"), ()], ids=["fixed", "planned"])
def test_wrong_api_key_is_refused_clearly(tiny_cluster, split):
    """Also when the planner chooses: a refused key is never read as "no worker serves this model"."""
    out = tiny_cluster.edge(*split, "--tokens", "4", "--api-key", "not-a-key")
    assert out.returncode == 1, out.stderr[-2000:]
    assert "API key" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_keyed_worker_refuses_a_session_in_the_clear(tiny_cluster):
    out = tiny_cluster.edge("--split", "2", "--tokens", "4", "--no-encryption")
    assert out.returncode == 1
    assert "only serves encrypted sessions" in out.stderr
    assert "Traceback" not in out.stderr


def test_untrusted_worker_key_is_refused(tiny_cluster, tmp_path):
    import shutil

    keys = tmp_path / "keys"
    shutil.copytree(tiny_cluster.keys_dir, keys)
    (keys / "trusted_workers.txt").write_text("00" * 32 + "\n")
    env = dict(tiny_cluster.env(), EDGECLOUD_KEYS=str(keys))
    out = subprocess.run(cli_command("edge", "--model", "tiny-llama", "--split", "2", "--tokens", "4"),
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "trusted" in out.stderr


def test_garbage_to_the_broker_and_bad_requests_to_a_worker_leave_both_serving(tiny_cluster):
    import zmq

    from broker.client_api import BrokerClient
    from broker.errors import CryptoError, EdgeCloudError, ProtocolError
    from broker.transport import client_keys, setup_curve_client
    from broker.wire.crypto import load_api_keys
    from edge_worker.cloud_client import CloudClient
    from partition.models import resolve_model

    ctx = zmq.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 2000)  # deliver the junk before closing
    curve = client_keys(tiny_cluster.keys_dir, "client")
    setup_curve_client(raw, curve)  # an allowed key, so the junk gets past the handshake to the decoder
    raw.connect(tiny_cluster.endpoint)
    from broker import protocol as p

    V = p.MAGIC + bytes([p.PROTOCOL_VERSION])  # the header prefix of this protocol version
    for junk in ([b""], [b"\x00" * 10], [V + b"\xff" * 50], [V + b"\x81\xa1t\x01", b"x" * 100],
                 [b"hello", b"world", b"!"], [b"EC\x09" + b"\x80"]):
        raw.send_multipart(junk)
    raw.close()
    ctx.term()

    source = resolve_model("tiny-llama")
    api_key = sorted(load_api_keys(tiny_cluster.keys_dir / "api_keys.txt"))[0]
    conn = BrokerClient(tiny_cluster.endpoint, api_key, curve=curve)
    try:
        # A malformed opener reaches the worker through the broker: the worker answers an error.
        with pytest.raises(ProtocolError):
            conn.request("bad-open", "open", source.model_id, 2, 0, extra={"edge_pk": b"short"}, timeout_s=10)
        # A real encrypted session, then a tampered step frame for it.
        client = CloudClient(api_key=api_key, broker=tiny_cluster.endpoint, keys_dir=tiny_cluster.keys_dir)
        session = client.session(source.model_id, 2, source.hidden_size)
        import torch

        from partition.sampling import SamplingParams

        session.start(SamplingParams())
        hidden = torch.randn(1, 3, source.hidden_size)
        _tokens, _ = session.step(hidden, 0)
        from broker.wire.session_protocol import seal_step

        frames = seal_step(session.cipher, session.session_id, 1, session.pos, hidden[:, :1], "fp16")
        tampered = [bytearray(f) for f in frames]
        tampered[1][-1] ^= 0x01
        with pytest.raises(CryptoError):
            conn.request(session.session_id, "step", source.model_id, 2, 1, [bytes(f) for f in tampered],
                         timeout_s=10)
        # A replayed frame (the same sealed bytes twice) is refused the second time.
        ok = conn.request(session.session_id, "step", source.model_id, 2, 1, frames, timeout_s=10)
        assert ok.frames
        with pytest.raises(CryptoError, match="replay"):
            conn.request(session.session_id, "step", source.model_id, 2, 1, frames, timeout_s=10)
        session.close()
        client.close()
    except EdgeCloudError:
        raise
    finally:
        conn.close()
    st = tiny_cluster.status()
    assert sum(st["protocol_errors"].values()) >= 6, st["protocol_errors"]
    assert st["counters"]["worker_errors"] >= 3, st["counters"]
    # And both still serve real generations.
    assert edge_json(tiny_cluster, "--split", "1", "--tokens", "5")["token_ids"]


def test_two_concurrent_sessions_use_two_workers_and_a_new_worker_takes_new_sessions(tmp_path):
    with LocalCluster(model="tiny-llama", worker_threads=1, heartbeat_s=0.5) as cluster:
        cluster.start_broker()
        cluster.add_worker()
        cluster.wait_for_workers(1, timeout_s=60)
        first = edge_json(cluster, "--split", "2", "--tokens", "8")
        assert first["workers_used"] == ["worker1"]
        cluster.add_worker()
        cluster.wait_for_workers(2, timeout_s=60)
        # Two long generations at once: least-load placement puts them on different workers.
        args = cli_command("edge", "--model", "tiny-llama", "--split", "2", "--tokens", "300", "--json",
                           "--raw-prompt", "--prompt", PROMPT)
        procs = [subprocess.Popen(args, env=cluster.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]
        try:
            results = [json.loads(p.communicate(timeout=180)[0]) for p in procs]
        finally:
            for p in procs:
                p.kill()
        used = {w for r in results for w in r["workers_used"]}
        assert used == {"worker1", "worker2"}, [r["workers_used"] for r in results]
        assert results[0]["token_ids"] == results[1]["token_ids"]


@pytest.mark.real_model
def test_smollm2_hybrid_and_cloud_only_equal_local():
    with LocalCluster(model="smollm2-135m") as cluster:
        cluster.start_broker()
        cluster.add_worker()
        cluster.wait_for_workers(1)
        local = edge_json(cluster, "--force-local", "--tokens", "24")
        assert len(local["token_ids"]) > 5
        for args in (("--split", "15"), ("--split", "29"), ("--force-cloud",)):
            got = edge_json(cluster, *args, "--tokens", "24")
            assert got["token_ids"] == local["token_ids"], args
            assert got["text"] == local["text"]


def test_demo_runs_every_process_and_stops_them():
    out = subprocess.run(cli_command("demo", "--model", "tiny-llama", "--workers", "2", "--split", "2",
                                     "--tokens", "6", "--json"),
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["mode"] == "hybrid" and len(result["token_ids"]) == 6
    pids = result["cluster"]["pids"]
    assert len(pids) == 3  # the broker and two workers
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    # Its directory, with every key the demo made, is gone.
    assert not os.path.exists(result["cluster"]["workdir"])


def test_a_force_local_demo_starts_no_process_and_forwards_the_edge_options():
    out = subprocess.run(cli_command("demo", "--model", "tiny-llama", "--force-local", "--tokens", "5",
                                     "--raw-prompt", "--seed", "3", "--temperature", "0.8", "--json"),
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["mode"] == "local" and result["cluster"]["pids"] == []
    assert len(result["token_ids"]) == 5
    alone = subprocess.run(cli_command("edge", "--model", "tiny-llama", "--force-local", "--tokens", "5",
                                       "--raw-prompt", "--seed", "3", "--temperature", "0.8", "--json",
                                       "--prompt", "Explain in two sentences why a phone might send part of a "
                                       "neural network to the cloud."),
                           capture_output=True, text=True, timeout=240)
    assert json.loads(alone.stdout)["token_ids"] == result["token_ids"]


def test_the_seeds_script_path_and_options_run_the_demo():
    """The design's own line, at the design's path (./src/run_edge_cloud.sh), on the tiny model."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([str(root / "src" / "run_edge_cloud.sh"), "--tokens", "20", "--cloud-latency", "0.5",
                          "--energy-weight", "0.4", "--model", "tiny-llama", "--json"],
                         capture_output=True, text=True, timeout=240, cwd="/")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert len(result["token_ids"]) == 20
    assert result["decision"]["weights"]["energy"] == pytest.approx(0.4 / 1.1, abs=1e-3)  # 0.4, 0.4, 0.3 normalised
    assert not os.path.exists(result["cluster"]["workdir"])


def test_generation_survives_kill_9_of_its_worker_with_identical_output():
    """The edge's replay log moves the session to the other worker; the text does not change."""
    with LocalCluster(model="tiny-llama", worker_threads=1, heartbeat_s=0.3) as cluster:
        cluster.start_broker()
        cluster.add_worker()
        cluster.add_worker()
        cluster.wait_for_workers(2, timeout_s=60)
        expected = edge_json(cluster, "--force-local", "--tokens", "900", "--raw-prompt")["token_ids"]
        proc = cluster.start_edge("--split", "2", "--tokens", "900", "--json", "--raw-prompt", "--prompt", PROMPT)
        try:
            # Kill the session's worker once decoding is under way (not while the opener is in
            # flight: the broker itself re-dispatches an opener, and the edge would see nothing).
            victim = cluster.worker_named(cluster.wait_for_decoding(proc))
            cluster.kill(victim)  # SIGKILL mid-generation
            out, err = proc.communicate(timeout=120)
        finally:
            proc.kill()
        assert proc.returncode == 0, err[-3000:]
        result = json.loads(out)
        assert result["token_ids"] == expected
        assert result["retries"] >= 1, (victim.name, result["workers_used"], result["total_ms"], err[-2000:])
        assert len(result["workers_used"]) == 2, result["workers_used"]


def test_emulated_link_delays_real_frames_and_changes_nothing_else(tiny_cluster):
    # Plain hybrid: a drafter (the default --mini auto) would hide the round trip being measured.
    plain = edge_json(tiny_cluster, "--split", "2", "--tokens", "8", "--mini", "none")
    slow = edge_json(tiny_cluster, "--split", "2", "--tokens", "8", "--cloud-latency", "0.05",
                     "--bandwidth-mbps", "100", "--mini", "none")
    assert slow["token_ids"] == plain["token_ids"]
    # Every decode step waits one emulated round trip; the trace sees it as transport time.
    decode = slow["trace"][1:]
    assert min(s["transport_ms"] for s in decode) >= 45, [s["transport_ms"] for s in decode]
    assert slow["ms_per_token"] >= 50 > plain["ms_per_token"]


@pytest.mark.parametrize("mini", ["self", "lookup", "tiny-gpt2"])
def test_drafts_verified_by_a_real_worker_leave_the_output_unchanged(tiny_cluster, mini):
    """Drafts, rejections and rollback on both sides, through the broker: the text is the main
    model's, and a generation continued after rejections stays identical (caches consistent)."""
    args = ("--tokens", "40", "--raw-prompt", "--prompt", "abcabcabc abcabcabc abc")
    local = edge_json(tiny_cluster, "--force-local", *args)
    drafted = edge_json(tiny_cluster, "--split", "2", *args, "--mini", mini, "--mini-threshold", "0",
                        "--mini-max-draft", "4", "--mini-fixed", "--no-mini-pipeline")
    assert drafted["token_ids"] == local["token_ids"]
    assert drafted["mini"] == mini and drafted["mini_mode"] == "verify"
    assert drafted["tokens_drafted"] > 0 and drafted["acceptance_rate"] is not None
    assert drafted["cloud_round_trips"] == len(drafted["trace"]) + 1  # one opener, then one per round


def test_a_drafter_that_is_always_right_cuts_round_trips(tiny_cluster):
    args = ("--tokens", "30", "--mini", "tiny-llama", "--mini-threshold", "0", "--mini-max-draft", "4",
            "--mini-fixed", "--no-mini-pipeline")  # one frame of drafts per round trip (tests/test_mini_pipeline.py)
    verified = edge_json(tiny_cluster, "--split", "2", *args)
    trusted = edge_json(tiny_cluster, "--split", "2", *args, "--mini-mode", "trust")
    local = edge_json(tiny_cluster, "--force-local", "--tokens", "30")
    assert verified["token_ids"] == trusted["token_ids"] == local["token_ids"]
    assert verified["acceptance_rate"] == 1.0 and verified["tokens_from_mini"] >= 20
    assert verified["cloud_round_trips"] <= 30 // 5 + 2


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_an_interrupted_edge_ends_at_once_and_closes_its_cloud_session(tiny_cluster, sig):
    """Started as ``edgecloud edge ... &`` from a script (SIGINT inherited ignored), the edge still
    ends on SIGINT, and on SIGTERM: within 2 s (plus slack for a loaded machine), through its
    cleanup, so the worker frees the session at once instead of after its idle timeout."""
    import signal
    import time

    from cli.cluster import ROOT

    before = tiny_cluster.status()
    served = before["counters"].get("requests_served", 0)
    held = before["workers"][0]["reported_sessions"]  # sessions other tests of this module left behind
    edge = subprocess.Popen(
        cli_command("edge", "--model", "tiny-llama", "--split", "2", "--tokens", "900", "--cloud-latency", "0.02",
                    "--prompt", PROMPT),
        env=tiny_cluster.env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        tiny_cluster.wait_for_decoding(edge, served=served + 5)
        t0 = time.monotonic()
        edge.send_signal(getattr(signal, sig))
        _, err = edge.communicate(timeout=30)
        took = time.monotonic() - t0
    finally:
        edge.kill()
    assert edge.returncode == 130 and "interrupted" in err and "Traceback" not in err, err[-2000:]
    assert took < 2 + 3, f"{sig} took {took:.1f} s"
    deadline = time.monotonic() + 5
    while tiny_cluster.status()["workers"][0]["reported_sessions"] > held and time.monotonic() < deadline:
        time.sleep(0.2)
    assert tiny_cluster.status()["workers"][0]["reported_sessions"] <= held, tiny_cluster.workers[0].log_tail(3000)
