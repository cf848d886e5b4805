"""CURVE on broker connections: the allowlist policy as plain data, then a real broker process
tried with an unknown key, a plain-text client, raw TCP garbage, revoked keys on live connections
and workers registering beyond what their key allows."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import zmq

from broker import protocol as p
from broker.client_api import BrokerClient, ClientConfig
from broker.errors import AuthError, BrokerUnavailable
from broker.transport import (
    ROLE_CLIENT,
    ROLE_WORKER,
    AllowEntry,
    CurveClientKeys,
    allow_key,
    authorize,
    broker_public_key,
    client_keys,
    load_allowlist,
    parse_allowlist,
    register_key_mismatch,
    revoke_key,
    setup_curve_client,
)
from broker.wire.crypto import KeyPair, generate_keypair, load_keys, load_trusted_workers
from broker.worker_api import WorkerConfig, WorkerConnection, WorkerInfo
from cli.cluster import ROOT, LocalCluster, cli_command, free_port
from tests.brokerutil import wait_for_status, wait_until

MODEL = "tiny-llama"
HEARTBEAT_S = 0.3
QUICK = ClientConfig(default_timeout_s=3.0, reply_grace_s=0.5)
FAST_WORKER = WorkerConfig(heartbeat_interval_s=HEARTBEAT_S, broker_liveness=5, reconnect_initial_s=0.05)
REVOKE_WITHIN_S = 5.0  # the broker re-reads its lists every heartbeat (0.3 s here); slack for a loaded machine
KEY_A, KEY_B = "aa" * 32, "bb" * 32


# ---------------------------------------------------------------- policy as plain data
def test_allowlist_lines_take_comments_and_model_scopes_and_skip_only_bad_lines():
    text = (f"# header\n{KEY_A}  # worker-default\n{KEY_B} models=tiny-llama,smollm2-135m\n"
            f"zz-not-hex\n{'cc' * 31}\n{'dd' * 32} colour=blue\n")  # fmt: skip
    entries, problems = parse_allowlist(text, ROLE_WORKER, "w.txt")
    assert entries == {
        KEY_A: AllowEntry(frozenset({ROLE_WORKER})),
        KEY_B: AllowEntry(frozenset({ROLE_WORKER}), frozenset({"tiny-llama", "smollm2-135m"})),
    }
    assert [pr.split(":")[1] for pr in problems] == ["4", "5", "6"]
    _, problems = parse_allowlist(f"{KEY_A} models=x\n", ROLE_CLIENT)
    assert "only models=" in problems[0]


def test_edges_still_read_scoped_and_commented_worker_lines(tmp_path):
    (tmp_path / "trusted_workers.txt").write_text(f"{KEY_A}  # worker-default\n{KEY_B} models=m  # w2\n")
    assert load_trusted_workers(tmp_path / "trusted_workers.txt") == {bytes.fromhex(KEY_A), bytes.fromhex(KEY_B)}


def _register(model: str = MODEL, public_key: bytes = b"") -> p.Register:
    return p.Register(worker_id=p.WorkerId("w"), model_id=model, layer_ranges=((0, 4),), public_key=public_key,
                      per_layer_ms=0.0, pid=1, max_sessions=4)  # fmt: skip


@pytest.mark.parametrize(
    ("entry", "msg", "allowed"),
    [
        (AllowEntry(frozenset({ROLE_CLIENT})), p.Ping(request_id="r"), True),
        (AllowEntry(frozenset({ROLE_CLIENT})), p.Status(request_id="r", api_key=""), True),
        (AllowEntry(frozenset({ROLE_CLIENT})), _register(), False),
        (AllowEntry(frozenset({ROLE_CLIENT})), p.Heartbeat(worker_id=p.WorkerId("w"), active_sessions=0,
                                                           queue_depth=0, per_layer_ms=0.0), False),  # fmt: skip
        (AllowEntry(frozenset({ROLE_WORKER})), _register(), True),
        (AllowEntry(frozenset({ROLE_WORKER})), p.Status(request_id="r", api_key=""), False),
        (AllowEntry(frozenset({ROLE_WORKER})), p.Ping(request_id="r"), True),
        (AllowEntry(frozenset({ROLE_WORKER}), frozenset({MODEL})), _register(MODEL), True),
        (AllowEntry(frozenset({ROLE_WORKER}), frozenset({MODEL})), _register("smollm2-135m"), False),
        (None, p.Ping(request_id="r"), False),
    ],
)
def test_each_key_may_send_only_its_roles_messages_and_register_only_its_models(entry, msg, allowed):
    assert (authorize(entry, msg) is None) is allowed


def test_a_worker_may_announce_only_its_own_key_for_sessions():
    assert register_key_mismatch(KEY_A, _register(public_key=bytes.fromhex(KEY_A))) is None
    assert register_key_mismatch(KEY_A, _register(public_key=b"")) is None
    assert register_key_mismatch(KEY_A, _register(public_key=bytes.fromhex(KEY_B))) is not None


@pytest.mark.integration
def test_keys_generate_lists_every_client_and_worker_and_revoke_and_allow_edit_the_lists(tmp_path, tiny_llama):
    keys = tmp_path / "keys"
    out = subprocess.run(cli_command("keys", "generate", str(keys), "--workers", "2", "--clients", "2"),
                         capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert out.returncode == 0, out.stderr
    allow = load_allowlist(keys)
    pub = {f"{r}-{n}": load_keys(keys, r, n).public_key.hex() for r in ("client", "worker") for n in ("default", "2")}
    assert allow.problems == ()
    assert {k: sorted(allow.get(v).roles) for k, v in pub.items()} == {
        "client-default": ["client"], "client-2": ["client"], "worker-default": ["worker"], "worker-2": ["worker"]}
    assert client_keys(keys, "client").server_public_key == broker_public_key(keys)
    assert revoke_key(keys, bytes.fromhex(pub["client-2"])) == [keys / "trusted_clients.txt"]
    assert load_allowlist(keys).get(pub["client-2"]) is None
    assert load_allowlist(keys).get(pub["client-default"]) is not None
    allow_key(keys, bytes.fromhex(pub["worker-2"]), ROLE_WORKER, ["m1"])
    assert load_allowlist(keys).get(pub["worker-2"]).models == {"m1"}
    # The CLI scopes by model name: stored as the model id the worker will register with.
    out = subprocess.run(cli_command("keys", "allow", str(keys), "worker-2", "--models", f"{MODEL},other@1"),
                         capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert load_allowlist(keys).get(pub["worker-2"]).models == {tiny_llama.model_id, "other@1"}
    assert (keys / "trusted_workers.txt").stat().st_mode & 0o077 == 0


# ---------------------------------------------------------------- a real broker process
@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    c = LocalCluster(model=MODEL, heartbeat_s=HEARTBEAT_S, workdir=tmp_path)
    try:
        c.start_broker()
        with broker_client(c) as bc:
            wait_until(lambda: _answers(bc, c), timeout_s=60, what="the broker to answer")
        yield c
    finally:
        c.stop()


def _answers(bc: BrokerClient, c: LocalCluster) -> bool:
    c.check_alive()
    try:
        bc.ping(1.0)
        return True
    except BrokerUnavailable:
        return False


@contextmanager
def broker_client(c: LocalCluster, keypair: KeyPair | None = None, server_key: bytes | None = None,
                  plain: bool = False) -> Iterator[BrokerClient]:  # fmt: skip
    curve = None
    if not plain:
        own = client_keys(c.keys_dir, "client")
        curve = CurveClientKeys(keypair or own.keypair, server_key or own.server_public_key)
    bc = BrokerClient(c.endpoint, _api_key(c), config=QUICK, curve=curve)
    try:
        yield bc
    finally:
        bc.close()


def _api_key(c: LocalCluster) -> str:
    return (Path(c.keys_dir) / "api_keys.txt").read_text().split()[0]


def _status(c: LocalCluster) -> dict:
    with broker_client(c) as bc:
        return bc.status()


@pytest.mark.integration
def test_an_unknown_key_a_plain_client_a_wrong_server_key_and_tcp_garbage_are_refused(cluster):
    # An unknown client key: refused at the handshake, and the client says so at once.
    with broker_client(cluster, keypair=generate_keypair()) as bc, pytest.raises(AuthError, match="refused"):
        bc.ping(3.0)
    # Our own client without keys: no answer, and it says why.
    with broker_client(cluster, plain=True) as bc, pytest.raises(BrokerUnavailable, match="requires CURVE"):
        bc.ping(1.5)
    # A plain (NULL mechanism) client and one that expects another broker key: no handshake, no answer.
    for kind, sock_setup in (("plain", lambda s: None),
                             ("wrong server key", lambda s: setup_curve_client(s, CurveClientKeys(
                                 client_keys(cluster.keys_dir, "client").keypair, generate_keypair().public_key)))):
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock_setup(sock)
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                          | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        sock.connect(cluster.endpoint)
        sock.send_multipart(p.encode(p.Ping(request_id="r1")))
        assert not sock.poll(1500), f"a {kind} client got an answer"
        events = []
        while monitor.poll(0):
            from zmq.utils.monitor import recv_monitor_message

            events.append(recv_monitor_message(monitor)["event"])
        assert events and zmq.EVENT_HANDSHAKE_SUCCEEDED not in events, (kind, events)
        monitor.close()
        sock.close()
        ctx.term()
    # Raw TCP: random bytes, then a well-formed ZMTP greeting asking for the NULL mechanism.
    host, port = cluster.endpoint.removeprefix("tcp://").rsplit(":", 1)
    greeting_null = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" + b"\x00" * 31
    for junk in (bytes(range(256)) * 4, greeting_null + b"\x04\x19\x05READY\x0bSocket-Type\x00\x00\x00\x06DEALER"):
        with socket.create_connection((host, int(port)), timeout=5.0) as raw:
            raw.sendall(junk)
            try:
                while raw.recv(4096):  # the broker's greeting, then nothing more: it closes the connection
                    pass
            except ConnectionResetError:
                pass
    # The broker still serves the real client, and counted the refusals.
    cluster.check_alive()
    st = _status(cluster)
    assert st["transport"]["curve"] is True
    assert st["transport"]["handshakes"]["refused_key"] >= 1
    assert st["transport"]["allowed_clients"] == 1 and st["transport"]["allowed_workers"] == 4


@pytest.mark.integration
def test_a_revoked_client_key_stops_being_served_on_its_live_connection(cluster):
    with broker_client(cluster) as live:
        assert live.status()["transport"]["curve"]
        out = subprocess.run(cli_command("keys", "revoke", str(cluster.keys_dir), "client-default"),
                             capture_output=True, text=True, cwd=ROOT)  # fmt: skip
        assert out.returncode == 0 and "trusted_clients.txt" in out.stderr, out.stderr

        def refused() -> bool:
            try:
                live.status(2.0)
                return False
            except AuthError as exc:
                return "no longer" in str(exc)

        wait_until(refused, timeout_s=REVOKE_WITHIN_S, what="the live connection to be refused")
        with pytest.raises(AuthError, match="allowlist"):
            live.ping(2.0)  # not served, on the same connection
    with broker_client(cluster) as fresh, pytest.raises(AuthError, match="refused this key"):
        fresh.ping(3.0)  # and a new connection fails the handshake
    # Allowed again: served again.
    subprocess.run(cli_command("keys", "allow", str(cluster.keys_dir), "client-default"), check=True, cwd=ROOT,
                   capture_output=True)  # fmt: skip
    with broker_client(cluster) as again:
        wait_until(lambda: _pings(again), timeout_s=REVOKE_WITHIN_S, what="the key to be served again")
    cluster.check_alive()


def _pings(bc: BrokerClient) -> bool:
    try:
        bc.ping(1.0)
        return True
    except (AuthError, BrokerUnavailable):
        return False


@contextmanager
def worker(c: LocalCluster, key_name: str, worker_id: str, model: str = MODEL, role: str = "worker",
           announce: bytes | None = None) -> Iterator[WorkerConnection]:  # fmt: skip
    """A worker connection (its own real socket) to the broker process, with ROLE-KEY_NAME's keys."""
    keys = client_keys(c.keys_dir, role, key_name)
    info = WorkerInfo(p.WorkerId(worker_id), model, ((0, 4),),
                      public_key=keys.keypair.public_key if announce is None else announce)  # fmt: skip
    conn = WorkerConnection(c.endpoint, info, config=FAST_WORKER, curve=keys)
    try:
        yield conn
    finally:
        conn.close()


def _worker_ids(c: LocalCluster) -> set[str]:
    return {w["worker_id"] for w in _status(c)["workers"]}


@pytest.mark.integration
def test_workers_register_only_within_their_key_and_a_revoked_worker_is_dropped_live(cluster):
    keys = cluster.keys_dir
    allow_key(keys, load_keys(keys, "worker", "2").public_key, ROLE_WORKER, ["some-other-model"])
    with (worker(cluster, "default", "good") as good, worker(cluster, "2", "out-of-scope"),
          worker(cluster, "default", "as-client", role="client"),
          worker(cluster, "3", "wrong-announce", announce=load_keys(keys, "worker", "4").public_key)):
        wait_until(lambda: "good" in _worker_ids(cluster), what="the allowed worker to register")
        before = _status(cluster)["counters"].get("auth_refused_messages", 0)
        # Several heartbeat periods: the others keep trying, and keep being refused.
        wait_until(lambda: _status(cluster)["counters"].get("auth_refused_messages", 0) >= before + 3,
                   what="more refusals")  # fmt: skip
        assert _worker_ids(cluster) == {"good"}
        assert good.registrations >= 1
        revoked_before = _status(cluster)["counters"].get("workers_revoked", 0)  # worker-2 may have registered
        # before the broker re-read its new scope, and been dropped then: scopes apply live too.
        # Revoke the registered worker's key: the broker drops it without waiting for a reconnect.
        out = subprocess.run(cli_command("keys", "revoke", str(keys), "worker-default"), capture_output=True,
                             text=True, cwd=ROOT)  # fmt: skip
        assert out.returncode == 0, out.stderr
        wait_until(lambda: not _worker_ids(cluster), timeout_s=REVOKE_WITHIN_S, what="the revoked worker to go")
        st = _status(cluster)
        assert st["counters"]["workers_revoked"] == revoked_before + 1
        assert load_trusted_workers(keys / "trusted_workers.txt").isdisjoint({load_keys(keys, "worker", "default")
                                                                              .public_key})  # fmt: skip
    # The scoped key may register for the model it names.
    with worker(cluster, "2", "in-scope", model="some-other-model"):
        wait_until(lambda: _worker_ids(cluster) == {"in-scope"}, what="the scoped worker to register")


@pytest.mark.integration
def test_a_registered_worker_id_cannot_be_claimed_by_another_key(cluster):
    keys = cluster.keys_dir
    real = load_keys(keys, "worker", "default").public_key.hex()

    def w1() -> dict | None:
        return next((w for w in _status(cluster)["workers"] if w["worker_id"] == "w1"), None)

    with worker(cluster, "default", "w1"):
        wait_until(lambda: w1() is not None, what="the real worker to register")
        before = _status(cluster)["counters"].get("auth_refused_messages", 0)
        with worker(cluster, "3", "w1") as impostor:  # an allowed worker key, another worker's id
            wait_until(lambda: _status(cluster)["counters"].get("auth_refused_messages", 0) >= before + 2,
                       what="the impostor's registrations to be refused")
            assert impostor.registrations >= 1
        assert w1()["public_key"] == real
        assert _status(cluster)["counters"].get("workers_expired", 0) == 0
    # Once the real worker has gone, its key registers the id again from a new connection.
    with worker(cluster, "default", "w1"):
        wait_until(lambda: (w1() or {}).get("public_key") == real, what="the worker to come back")


@pytest.mark.integration
def test_an_edge_with_an_unknown_key_fails_clearly_instead_of_falling_back(cluster, tmp_path):
    # (Edges with the right key generate through CURVE in every tiny_cluster test of test_pipeline.)
    stranger = tmp_path / "stranger"
    shutil.copytree(cluster.keys_dir, stranger)
    for f in stranger.glob("client-default.*"):
        f.unlink()
    subprocess.run(cli_command("keys", "generate", str(stranger / "new")), check=True, capture_output=True)
    for suffix in ("key", "pub"):
        shutil.copy(stranger / "new" / f"client-default.{suffix}", stranger / f"client-default.{suffix}")
    env = dict(cluster.env(), EDGECLOUD_KEYS=str(stranger))
    out = subprocess.run(cli_command("edge", "--model", MODEL, "--split", "1", "--tokens", "3", "--deadline", "20"),
                         env=env, capture_output=True, text=True, cwd=ROOT, timeout=120)  # fmt: skip
    assert out.returncode != 0
    assert "refused this key" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr


@pytest.mark.integration
def test_netem_stands_in_for_the_broker_with_curve_on_both_sides(cluster):
    listen = f"tcp://127.0.0.1:{free_port()}"
    proc = subprocess.Popen(cli_command("netem", "--listen", listen, "--upstream", cluster.endpoint, "--rtt-ms", "10"),
                            env=cluster.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)  # fmt: skip
    try:
        via = LocalCluster(model=MODEL, keys_dir=cluster.keys_dir, workdir=cluster.workdir)
        via.port = int(listen.rsplit(":", 1)[1])
        with broker_client(via) as bc:
            wait_until(lambda: _pings(bc), timeout_s=60, what="a ping through the proxy")
            assert bc.status()["transport"]["curve"]  # the broker's status, through the proxy
        with broker_client(via, keypair=generate_keypair()) as bc, pytest.raises(AuthError, match="refused"):
            bc.ping(3.0)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "CURVE" in err and "no CURVE" not in err


@pytest.mark.integration
def test_without_curve_every_process_runs_in_the_clear_as_before(tmp_path):
    with LocalCluster(model=MODEL, heartbeat_s=HEARTBEAT_S, workdir=tmp_path, curve=False, worker_threads=1) as c:
        c.start_broker()
        c.add_worker()
        st = c.wait_for_workers(1)
        assert st["transport"] == {"curve": False}
        out = c.edge("--split", "1", "--tokens", "2", "--json", "--no-fallback")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["mode"] == "hybrid"
        # A CURVE client gets no answer from a plain broker, and says why.
        with broker_client(c) as bc, pytest.raises(BrokerUnavailable, match="handshake"):
            bc.ping(1.5)


@pytest.mark.integration
def test_a_broker_with_its_key_but_no_client_list_refuses_to_start_and_says_what_to_do(tmp_path):
    keys = tmp_path / "keys"
    subprocess.run(cli_command("keys", "generate", str(keys)), check=True, capture_output=True, cwd=ROOT)
    (keys / "trusted_clients.txt").unlink()  # a keys directory made before the client list existed
    out = subprocess.run(cli_command("broker", "--keys", str(keys), "--endpoint", f"tcp://127.0.0.1:{free_port()}"),
                         capture_output=True, text=True, cwd=ROOT, timeout=60)  # fmt: skip
    assert out.returncode == 2
    assert "keys allow" in out.stderr and "--no-curve" in out.stderr


def test_status_shows_whether_curve_is_on_and_the_refused_handshakes():
    from cli.roles import render_status

    on = render_status({"transport": {"curve": True, "allowed_clients": 2, "allowed_workers": 3,
                                      "handshakes": {"accepted": 5, "refused_key": 1, "refused_other": 1}}})
    assert "CURVE: 2 client and 3 worker keys allowed; handshakes accepted 5, refused 2" in on
    assert "no CURVE" in render_status({"transport": {"curve": False}})


@pytest.mark.integration
def test_revoking_the_worker_of_a_live_session_moves_the_session_to_another_worker(tmp_path):
    # (That a moved session's output is unchanged is test_faults' subject: revocation expires the
    # worker through the same path as a missed heartbeat.)
    # 600 round trips of at least 5 ms (the emulated link; no drafter, which would otherwise guess
    # almost every token and send a few dozen frames): 3 s or more of decoding however fast the
    # machine, so the revocation (a CLI run, then the broker's next reload of its allowlist) lands
    # mid-decode. With the default drafter the 600 tokens took 0.75-0.98 s, and on a loaded machine
    # the generation could end first.
    prompt, tokens = "Describe a lighthouse at night.", "600"
    with LocalCluster(model=MODEL, worker_threads=1, heartbeat_s=HEARTBEAT_S, workdir=tmp_path) as c:
        c.start_broker()
        c.add_worker()  # worker1, key worker-default
        c.add_worker()  # worker2, key worker-2
        c.wait_for_workers(2, timeout_s=60)
        edge = c.start_edge("--split", "2", "--tokens", tokens, "--json", "--raw-prompt", "--prompt", prompt,
                            "--timeout", "2", "--no-fallback", "--cloud-latency", "0.005", "--mini", "none")  # fmt: skip
        try:
            victim = c.wait_for_decoding(edge)
            key = {"worker1": "worker-default", "worker2": "worker-2"}[victim]
            subprocess.run(cli_command("keys", "revoke", str(c.keys_dir), key), check=True, capture_output=True,
                           cwd=ROOT)  # fmt: skip
            out, err = edge.communicate(timeout=180)
        finally:
            edge.kill()
        assert edge.returncode == 0, err[-3000:]
        result = json.loads(out)
        assert result["retries"] >= 1 and result["fallback_at_step"] is None, (result["total_ms"], err[-2000:])
        assert set(result["workers_used"]) == {"worker1", "worker2"}
        survivor = {"worker1": "worker2", "worker2": "worker1"}[victim]
        # On a starved machine the survivor can miss the test's short heartbeat window and be
        # re-registering at this moment: give it a few periods to be listed again.

        st = wait_for_status(c, lambda st: [w["worker_id"] for w in st["workers"]] == [survivor],
                             "the surviving worker to be listed", timeout_s=20 * HEARTBEAT_S * 3)
        assert st["counters"]["workers_revoked"] == 1
        assert [w["worker_id"] for w in st["workers"]] == [survivor]
        assert c.worker_named(victim).alive()  # still running, just no longer served


def test_status_renders_a_table_of_workers():
    from cli.roles import render_status

    text = render_status({"sessions": 2, "workers": [
        {"worker_id": "w1", "pid": 7, "model_id": "llama-30x576@ab", "layer_ranges": [[0, 30]], "sessions": 2,
         "max_sessions": 128, "in_flight": 1, "per_layer_ms": 0.8312, "last_seen_s_ago": 0.4, "max_batch": 16,
         "mean_batch": 3.5, "tokens_per_s": 41.25, "cache_bytes": 3 << 20}]})
    header, row = text.splitlines()[1:3]
    assert header.split()[:4] == ["worker", "pid", "model", "layers"] and "ms/layer" in header
    assert row.split()[:11] == ["w1", "7", "llama-30x576@ab", "[0,30)", "2/128", "1", "3.5/16", "41.2", "3.0",
                                "MiB", "0.83"]
