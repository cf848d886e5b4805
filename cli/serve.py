"""``edgecloud serve``: the OpenAI-compatible HTTP API (edge_worker/openai_api.py) on uvicorn."""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Callable
from typing import Annotated

import typer

from cli.common import EXIT_FAILED, Progress, setup_logging, startup_heap, typed_errors
from cli.edge_options import with_edge_options
from edge_worker.config import EdgeConfig

HTTP_KEY_ENV = "EDGECLOUD_HTTP_KEY"


def can_listen(host: str, port: int) -> str | None:
    """None when ``host:port`` can be listened on now, else why not (checked before the model
    loads, so that a port in use or an address this machine lacks costs no start-up)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot resolve {host}: {exc.strerror}"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind(address)
        except OSError as exc:
            return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    return None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@with_edge_options()
def serve(
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="TCP port.")] = 8000,
    http_key: Annotated[str | None, typer.Option(
        "--http-key", help=f"Key clients must send as 'Authorization: Bearer KEY' (env {HTTP_KEY_ENV}).")] = None,
    allow_no_key: Annotated[bool, typer.Option(
        "--allow-no-key", help="Listen beyond loopback without a key (anyone who reaches the port may "
        "generate).")] = False,
    served_model_name: Annotated[str | None, typer.Option(
        "--served-model-name", help="The model id clients send (default: the --model name).")] = None,
    max_concurrent: Annotated[int, typer.Option(
        "--max-concurrent", help="Generations at once; more get 429 with Retry-After.")] = 4,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging on stderr.")] = False,
    *,
    settings: Callable[[], EdgeConfig],
    edge_values: dict,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions)."""
    setup_logging(verbose, quiet=False)
    key = http_key or os.environ.get(HTTP_KEY_ENV) or None
    if key is None and not is_loopback(host) and not allow_no_key:
        typer.echo(f"error: --host {host} without --http-key (or {HTTP_KEY_ENV}) would let anyone who reaches "
                   "the port generate; give a key, or --allow-no-key if that is what you want", err=True)
        raise typer.Exit(2)
    if max_concurrent < 1:
        typer.echo(f"error: --max-concurrent must be at least 1, got {max_concurrent}", err=True)
        raise typer.Exit(2)
    problem = can_listen(host, port)
    if problem:
        typer.echo(f"error: {problem}", err=True)
        raise typer.Exit(EXIT_FAILED)
    progress = Progress(enabled=True)
    with typed_errors():
        with startup_heap():
            import uvicorn

            from edge_worker.engine import EdgeEngine
            from edge_worker.openai_api import ServerConfig, create_app

            engine = EdgeEngine(settings=settings(), progress=progress)
        with engine:
            with startup_heap():
                engine.warm_up()  # the first request finds its layers loaded
            progress.done()
            app = create_app(engine, ServerConfig(model_name=served_model_name, http_key=key,
                                                  max_concurrent=max_concurrent))
            name = app.state.server.model
            typer.echo(f"serving {name} at http://{host}:{port}/v1 "
                       f"({'key required' if key else 'no key'}; Ctrl-C stops)", err=True)
            uvicorn.run(app, host=host, port=port, log_level="debug" if verbose else "warning")
