"""``edgecloud broker``, ``cloud-worker``, ``keys`` and ``status``: thin wiring to each role's run()."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cli.common import (
    EXIT_FAILED,
    EXIT_USAGE,
    interrupt_on_signals,
    setup_logging,
    startup_heap,
    stop_on_signals,
    typed_errors,
)

keys_app = typer.Typer(help="Create key material, and allow or revoke client and worker keys.", no_args_is_help=True)


def broker(
    endpoint: Annotated[str | None, typer.Option(help="Address to bind (env EDGECLOUD_BROKER).")] = None,
    keys: Annotated[Path | None, typer.Option("--keys", help="Keys directory: api_keys.txt there is accepted.")] = None,
    api_key: Annotated[list[str] | None, typer.Option("--api-key", help="An accepted API key (repeatable).")] = None,
    no_auth: Annotated[bool, typer.Option("--no-auth", help="Accept clients without an API key.")] = False,
    heartbeat: Annotated[float, typer.Option(help="Heartbeat period with workers, seconds.")] = 1.0,
    no_curve: Annotated[bool, typer.Option("--no-curve", help="Accept plain connections: no CURVE, no key "
                                           "allowlist (on by default when broker-default.key exists).")] = False,
    max_attempts: Annotated[int, typer.Option(help="Workers one request may fail on (die, hang, time out) "
                                              "before it is refused as poison.")] = 3,
    max_queue: Annotated[int, typer.Option(help="Requests waiting for a worker; beyond it senders get "
                                           "'busy'.")] = 1024,
    max_sessions_per_client: Annotated[int, typer.Option(help="Sessions one client (its CURVE key, else its API "
                                                         "key) may hold at once; beyond it openers get 'busy'. "
                                                         "0: no limit.")] = 32,
    session_idle: Annotated[float, typer.Option(help="Seconds an untouched session is kept before the broker drops "
                                                "it and tells its worker.")] = 300.0,
    max_request_mb: Annotated[float, typer.Option(help="Largest request body accepted, MiB; beyond it the sender "
                                                  "gets 'too_large' (edges send long prompts in frames of "
                                                  "--max-frame-mb).")] = 32.0,
    max_client_mb: Annotated[float, typer.Option(help="Request bodies one client may have in flight, MiB; beyond "
                                                 "it its requests get 'busy' with a retry hint. 0: no limit.")] = 128.0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging on stderr.")] = False,
) -> None:
    """Run the job broker: routes edge requests to cloud workers (never reads payloads)."""
    from broker.broker import Broker, BrokerConfig
    from broker.transport import TRUSTED_CLIENTS_FILE, broker_has_keys
    from broker.wire.crypto import load_api_keys
    from edge_worker.config import default_broker, default_keys_dir

    setup_logging(verbose)
    keys_dir = keys or default_keys_dir()
    accepted = set(api_key or [])
    key_file = keys_dir / "api_keys.txt"
    if key_file.exists():
        accepted |= load_api_keys(key_file)
    if not accepted and not no_auth:
        typer.echo(
            f"error: no API keys: {key_file} does not exist and no --api-key was given. "
            f"Run `edgecloud keys generate {keys_dir}`, pass --api-key KEY, or --no-auth for a trusted network.",
            err=True,
        )
        raise typer.Exit(EXIT_USAGE)
    curve = not no_curve and broker_has_keys(keys_dir)
    if curve and not (keys_dir / TRUSTED_CLIENTS_FILE).exists():
        typer.echo(
            f"error: CURVE is on ({keys_dir}/broker-default.key exists) but {keys_dir}/{TRUSTED_CLIENTS_FILE} "
            f"does not: no client could connect. Run `edgecloud keys allow {keys_dir} client-default`, "
            "or pass --no-curve.",
            err=True,
        )
        raise typer.Exit(EXIT_USAGE)
    with typed_errors():
        if max_attempts < 1 or max_queue < 1:
            raise ValueError("--max-attempts and --max-queue must be at least 1")
        if max_sessions_per_client < 0 or session_idle <= 0:
            raise ValueError("--max-sessions-per-client must be at least 0 and --session-idle positive")
        if max_request_mb <= 0 or max_client_mb < 0:
            raise ValueError("--max-request-mb must be positive and --max-client-mb at least 0")
        config = BrokerConfig(endpoint=endpoint or default_broker(), heartbeat_interval_s=heartbeat,
                              api_keys=frozenset() if no_auth else frozenset(accepted),
                              curve_keys_dir=str(keys_dir) if curve else None,
                              max_attempts=max_attempts, max_queue=max_queue,
                              max_sessions_per_client=max_sessions_per_client, session_idle_s=session_idle,
                              max_request_bytes=int(max_request_mb * 2**20),
                              max_client_bytes=int(max_client_mb * 2**20))  # fmt: skip
        with startup_heap():
            b = Broker(config)
        transport = b.status()["transport"]
        how = (f"CURVE, {transport['allowed_clients']} client and {transport['allowed_workers']} worker keys allowed"
               if curve else "no CURVE: plain connections")  # fmt: skip
        typer.echo(f"broker listening on {b.endpoint} ({len(config.api_keys)} API keys; {how})", err=True)
        b.serve_forever(stop_on_signals())


def cloud_worker(
    broker: Annotated[str | None, typer.Option(help="Broker address (env EDGECLOUD_BROKER).")] = None,
    model: Annotated[str, typer.Option("--model", "-m", help="Model to serve (see `edge --help`).")] = "smollm2-135m",
    keys: Annotated[Path | None, typer.Option("--keys", help="Keys directory (env EDGECLOUD_KEYS).")] = None,
    key_name: Annotated[str, typer.Option(help="Which worker key in the directory: worker-NAME.key.")] = "default",
    no_encryption: Annotated[bool, typer.Option("--no-encryption", help="Serve only unencrypted sessions.")] = False,
    allow_plaintext: Annotated[bool, typer.Option("--allow-plaintext", help="With keys, also serve edges "
                                                  "that run --no-encryption.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    dtype: Annotated[str, typer.Option(help="What the layers compute in: auto (float32 on a CPU, bfloat16 on "
                                       "a GPU), float32, bfloat16 or float16.")] = "auto",
    cuda_graphs: Annotated[bool, typer.Option("--cuda-graphs", help="On a GPU, run decode passes as CUDA graphs "
                                              "captured between the attentions: the same tokens, fewer kernel "
                                              "launches.")] = False,
    head_blocks: Annotated[bool, typer.Option("--head-blocks", help="Read the head from a GGUF file's Q8_0 "
                                              "blocks (the same tokens): a lone session's step about 30% "
                                              "cheaper, a batch of eight 12%.")] = False,
    max_sessions: Annotated[int, typer.Option(help="KV caches held at once.")] = 64,
    session_ttl: Annotated[float, typer.Option(help="Seconds an idle session is kept (the broker drops its "
                                               "record after its own --session-idle, 300 s by default).")] = 360.0,
    max_tokens: Annotated[int, typer.Option(help="Longest session, in tokens.")] = 8192,
    max_batch: Annotated[int, typer.Option(help="Most sessions' steps computed together in one forward pass "
                                           "(continuous batching; 1 serves one step at a time).")] = 16,
    batch_wait_ms: Annotated[float, typer.Option(help="Longest wait for the next steps of the sessions in the "
                                                 "last forward pass before computing without them.")] = 20.0,
    max_cache_mb: Annotated[float | None, typer.Option(help="Most MiB the sessions' KV caches hold together; past "
                                                       "it new sessions and growing steps are answered busy, "
                                                       "and the oldest session's growth ends the youngest "
                                                       "(default: no limit but --max-sessions).")] = None,
    prefix_cache_mb: Annotated[float, typer.Option(help="MiB of prompts' and ended sessions' KV caches kept for "
                                                   "sessions that start the same way (a shared system prompt, a "
                                                   "conversation's earlier turns and answers); 0: "
                                                   "none, for clients that must not learn by timing what "
                                                   "others sent.")] = 128.0,
    threads: Annotated[int | None, typer.Option(help="torch threads (default: one per core).")] = None,
    worker_id: Annotated[str | None, typer.Option(help="Name shown by `edgecloud status`.")] = None,
    reductions: Annotated[Path | None, typer.Option("--reductions", help="Projection files of --reduce-dims edges "
                                                    "(env EDGECLOUD_REDUCTIONS, default "
                                                    "~/.cache/edgecloud/reductions).")] = None,
    no_curve: Annotated[bool, typer.Option("--no-curve", help="Connect to the broker in the clear "
                                           "(CURVE is on when the worker key and broker-default.pub exist).")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging on stderr.")] = False,
) -> None:
    """Run a cloud worker: serves layers [k, N) of a model for any split k, one KV cache per session."""
    from cloud_worker.config import CloudWorkerConfig
    from edge_worker.config import default_broker, default_keys_dir

    setup_logging(verbose)
    interrupt_on_signals()  # while the model loads (a first conversion takes a minute): end at once
    with typed_errors():
        keys_dir = keys or default_keys_dir()
        has_key = (keys_dir / f"worker-{key_name}.key").exists()
        # Checks the broker address, the model and the device before torch is imported.
        config = CloudWorkerConfig(
            broker=broker or default_broker(), model=model, keys_dir=keys_dir if has_key else None,
            key_name=key_name, encryption=not no_encryption, allow_plaintext=allow_plaintext, device=device,
            dtype=dtype, cuda_graphs=cuda_graphs, head_blocks=head_blocks, max_sessions=max_sessions, max_batch=max_batch,
            batch_wait_s=batch_wait_ms / 1e3,
            max_cache_mb=max_cache_mb, prefix_cache_mb=prefix_cache_mb,
            session_idle_ttl_s=session_ttl, max_session_tokens=max_tokens, torch_threads=threads,
            worker_id=worker_id, reductions_dir=reductions, curve=not no_curve,
        )
        if not no_encryption and not has_key:
            typer.echo(f"warning: no worker key {keys_dir}/worker-{key_name}.key: serving unencrypted sessions "
                       f"only (create one with `edgecloud keys generate {keys_dir}`)", err=True)
        with startup_heap():
            from cloud_worker.worker import CloudWorker

            worker = CloudWorker(config)
        worker.stop_event = stop_on_signals()  # serving: leave cleanly, saying DISCONNECT to the broker
        typer.echo(f"worker {worker.worker_id} ready: {worker.source.model_id} on {worker.device} "
                   f"in {str(worker.dtype).removeprefix('torch.')}", err=True)
        worker.serve()


def status(
    broker: Annotated[str | None, typer.Option(help="Broker address (env EDGECLOUD_BROKER).")] = None,
    keys: Annotated[Path | None, typer.Option("--keys", help="Keys directory (env EDGECLOUD_KEYS).")] = None,
    api_key: Annotated[str | None, typer.Option(help="API key (env EDGECLOUD_API_KEY).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the raw status map as JSON.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the broker.")] = 5.0,
    no_curve: Annotated[bool, typer.Option("--no-curve", help="Connect in the clear.")] = False,
) -> None:
    """Show the broker's workers, sessions, in-flight requests and error counters."""
    # zmq and the key files only: no torch, so the answer comes in well under a second.
    from broker.client_api import BrokerClient
    from broker.transport import client_keys
    from cli.cluster import jsonable
    from edge_worker.config import (
        check_endpoint,
        check_keys_dir,
        default_broker,
        default_keys_dir,
        resolve_api_key,
    )

    setup_logging(False, quiet=True)
    with typed_errors():
        broker = broker or default_broker()
        check_endpoint(broker)
        keys_dir = check_keys_dir(keys or default_keys_dir())
        curve = None if no_curve else client_keys(keys_dir, "client")
        client = BrokerClient(broker, resolve_api_key(api_key, keys_dir), curve=curve)
        try:
            st = client.status(timeout_s=timeout)
        finally:
            client.close()
    if json_out:
        typer.echo(json.dumps(st, default=jsonable))
        return
    typer.echo(render_status(st))


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _cache(w: dict) -> str:
    """KV-cache memory held, and of how much where the worker has a limit."""
    limit = w.get("cache_limit_bytes") or 0
    held = _mib(w.get("cache_bytes") or 0) + (f" of {limit / 2**20:.0f}" if limit else "")
    if w.get("prefix_bytes"):  # prompts kept for sessions that start the same way, and what they saved
        held += f" + {_mib(w['prefix_bytes'])} prefixes ({w.get('prefix_reused', 0)} positions reused)"
    return held


def render_status(st: dict) -> str:
    lines = []
    workers = st.get("workers", [])
    lines.append(f"{len(workers)} workers, {st.get('sessions', 0)} sessions, "
                 f"{st.get('in_flight', 0)} in flight, {st.get('queue_depth', 0)} queued")
    rows = [("worker", "pid", "model", "layers", "sessions", "in flight", "batch", "tok/s", "cache", "ms/layer",
             "seen")]
    for w in workers:
        ranges = ",".join(f"[{lo},{hi})" for lo, hi in w.get("layer_ranges", []))
        rows.append((
            str(w.get("worker_id")), str(w.get("pid")), str(w.get("model_id")), ranges,
            f"{w.get('sessions', 0)}/{w.get('max_sessions', '?')}", str(w.get("in_flight", 0)),
            f"{float(w.get('mean_batch') or 0):.1f}/{w.get('max_batch', '?')}",
            f"{float(w.get('tokens_per_s') or 0):.1f}", _cache(w),
            f"{float(w.get('per_layer_ms') or 0):.2f}",
            f"{w.get('last_seen_s_ago', 0):.1f}s ago"
            + (f", avoided {w['avoided_for_s']:.0f}s" if w.get("avoided_for_s") else ""),
        ))
    if workers:
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines += ["  " + "  ".join(c.ljust(n) for c, n in zip(r, widths, strict=True)).rstrip() for r in rows]
    transport = st.get("transport", {})
    if transport.get("curve"):
        hs = transport.get("handshakes", {})
        lines.append(f"CURVE: {transport.get('allowed_clients')} client and {transport.get('allowed_workers')} "
                     f"worker keys allowed; handshakes accepted {hs.get('accepted', 0)}, refused "
                     f"{hs.get('refused_key', 0) + hs.get('refused_other', 0)}")  # fmt: skip
    elif transport:
        lines.append("no CURVE: the broker accepts plain connections")
    counters = st.get("counters", {})
    if counters:
        lines.append("counters: " + ", ".join(f"{k}={v}" for k, v in sorted(counters.items())))
    errors = st.get("protocol_errors", {})
    if errors:
        lines.append("malformed input: " + ", ".join(f"{k}={v}" for k, v in sorted(errors.items())))
    return "\n".join(lines)


@keys_app.command("generate")
def keys_generate(
    directory: Annotated[Path, typer.Argument(help="Where to write the keys (created if missing).")],
    workers: Annotated[int, typer.Option(help="Worker keypairs to create (worker-default, worker-2, ...).")] = 1,
    clients: Annotated[int, typer.Option(help="Client keypairs to create (client-default, client-2, ...).")] = 1,
    force: Annotated[bool, typer.Option(help="Overwrite existing keys.")] = False,
) -> None:
    """Write keys for the broker, workers and clients, the trusted worker and client lists and an API key."""
    from broker.transport import (
        ROLE_CLIENT,
        ROLE_WORKER,
        TRUSTED_CLIENTS_FILE,
        TRUSTED_WORKERS_FILE,
        allow_key,
    )
    from broker.wire.crypto import add_api_key, save_keys

    if (directory / "worker-default.key").exists() and not force:
        typer.echo(f"error: {directory} already holds keys; pass --force to replace them", err=True)
        raise typer.Exit(EXIT_FAILED)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o700)
    except OSError as exc:
        what = "is a file" if directory.is_file() else f"cannot be created ({exc.strerror or exc})"
        typer.echo(f"error: the keys directory {directory} {what}", err=True)
        raise typer.Exit(EXIT_FAILED) from None
    for name in (TRUSTED_WORKERS_FILE, TRUSTED_CLIENTS_FILE, "api_keys.txt"):
        if force and (directory / name).exists():
            (directory / name).unlink()
    save_keys(directory, "broker", "default")
    for role, count in ((ROLE_CLIENT, clients), (ROLE_WORKER, workers)):
        for i in range(count):
            name = "default" if i == 0 else str(i + 1)
            kp = save_keys(directory, role, name)
            allow_key(directory, kp.public_key, role, comment=f"{role}-{name}")
    add_api_key(directory / "api_keys.txt")
    typer.echo(f"wrote broker, {clients} client and {workers} worker keypairs, {TRUSTED_WORKERS_FILE}, "
               f"{TRUSTED_CLIENTS_FILE} and api_keys.txt to {directory}", err=True)


@keys_app.command("allow")
def keys_allow(
    directory: Annotated[Path, typer.Argument(help="The keys directory the broker reads.")],
    who: Annotated[str, typer.Argument(help="A hex public key, or ROLE-NAME for ROLE-NAME.pub in DIRECTORY.")],
    role: Annotated[str | None, typer.Option(help="client or worker (default: from ROLE-NAME).")] = None,
    models: Annotated[str | None, typer.Option(help="Worker keys only: comma-separated models it may serve "
                                               "(names as for --model, or model ids as `status` shows them; "
                                               "default: any).")] = None,
) -> None:
    """Let a client or worker key connect (a running broker picks the change up within a second)."""
    from broker.transport import allow_key, resolve_public_key

    with typed_errors():
        key = resolve_public_key(directory, who)
        role = role or who.partition("-")[0]
        names = [m for m in (models or "").split(",") if m]
        # The broker compares model ids (architecture and a digest of the weights), so a name is
        # resolved here, where the model is; an id (it contains "@") is taken as it is.
        ids = [m if "@" in m else _model_id(m) for m in names]
        comment = " ".join(([who] if len(who) != 2 * len(key) else []) + names)
        path = allow_key(directory, key, role, ids or None, comment=comment)
    typer.echo(f"allowed {role} key {key.hex()[:16]}... in {path}" + (f" for {', '.join(ids)}" if ids else ""),
               err=True)  # fmt: skip


def _model_id(name: str) -> str:
    from partition.models import resolve_model

    return resolve_model(name).model_id


@keys_app.command("revoke")
def keys_revoke(
    directory: Annotated[Path, typer.Argument(help="The keys directory the broker reads.")],
    who: Annotated[str, typer.Argument(help="A hex public key, or ROLE-NAME for ROLE-NAME.pub in DIRECTORY.")],
) -> None:
    """Remove a key from the allowlists: a running broker stops serving it within a second, live
    connections included, and edges stop trusting a revoked worker."""
    from broker.transport import resolve_public_key, revoke_key

    with typed_errors():
        key = resolve_public_key(directory, who)
        changed = revoke_key(directory, key)
    if not changed:
        typer.echo(f"error: key {key.hex()[:16]}... is in no allowlist of {directory}", err=True)
        raise typer.Exit(EXIT_FAILED)
    typer.echo(f"revoked key {key.hex()[:16]}... from {', '.join(p.name for p in changed)}", err=True)
