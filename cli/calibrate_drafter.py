"""Training the self-drafter's adapter: ``edgecloud calibrate --drafter``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cli.common import Progress, setup_logging, typed_errors


def calibrate_drafter(
    split: Annotated[int, typer.Option("--split", "-k", help="The edge split the adapter is for.")] = 15,
    model: Annotated[str, typer.Option("--model", "-m", help="Model (see `edge --help`).")] = "smollm2-135m",
    out: Annotated[Path | None, typer.Option(help="Adapter file; default: the cache, where `--mini self` "
                                             "finds it.")] = None,
    tokens: Annotated[int, typer.Option(help="Tokens the main model generates per calibration prompt.")] = 48,
    epochs: Annotated[int, typer.Option(help="Training passes over the calibration positions.")] = 30,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Train the self-drafter's adapter on the main model's own greedy generations."""
    from edge_worker.drafter_calibration import calibrate_drafter as run
    from edge_worker.mini_llm import default_adapters_dir
    from partition.models import resolve_model

    setup_logging(verbose, quiet=not verbose)
    progress = Progress(enabled=True)
    with typed_errors():
        source = resolve_model(model)
        path, metrics = run(source, split, out, default_adapters_dir(), progress=progress, new_tokens=tokens,
                            epochs=epochs)
        progress.done()
    typer.echo(json.dumps({"adapter": str(path), **metrics}))
