"""``edgecloud calibrate``: compute and save the projection that ``--reduce-dims`` uses, or
(``--drafter``) train the self-drafter's adapter that ``--mini self`` uses."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import EXIT_USAGE, Progress, setup_logging, typed_errors


def calibrate(
    split: Annotated[int, typer.Option("--split", "-k", help="The split the projection is for (layers on the edge).")],
    dims: Annotated[int | None, typer.Option("--dims", "-d", help="Dimensions the activations are reduced to.")] = None,
    drafter: Annotated[bool, typer.Option("--drafter", help="Instead: train the self-drafter's adapter for "
                                          "--split on the main model's own generations (`--mini self`).")] = False,
    tokens: Annotated[int, typer.Option(help="--drafter: tokens generated per calibration prompt.")] = 128,
    prompts: Annotated[int, typer.Option(help="--drafter: calibration prompts drawn from the shipped templates, "
                                         "besides the 56 shipped ones.")] = 400,
    epochs: Annotated[int, typer.Option(help="--drafter: training passes over the positions.")] = 8,
    model: Annotated[str, typer.Option("--model", "-m", help="Model (see `edge --help`).")] = "smollm2-135m",
    out: Annotated[Path | None, typer.Option("--out", help="File to write; default: the reductions "
                                             "directory, where edge and cloud-worker look.")] = None,
    reductions: Annotated[Path | None, typer.Option("--reductions", help="Reductions directory "
                                                    "(env EDGECLOUD_REDUCTIONS, default "
                                                    "~/.cache/edgecloud/reductions).")] = None,
    text: Annotated[Path | None, typer.Option("--text", help="Calibration text (paragraphs separated by "
                                              "blank lines); default: the one shipped in the package.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging on stderr.")] = False,
) -> None:
    """Fit a centred PCA of the hidden states at --split on calibration text and save it.

    Edges (`--reduce-dims D`) and cloud workers (`--reductions DIR`) load the file and agree on it
    by its sha256, which this command prints. Edges calibrate by themselves when the file is missing.
    With --drafter, train the self-drafter's adapter instead (saved where `--mini self` finds it).
    """
    from partition.models import resolve_model

    if drafter:
        _calibrate_drafter(model, split, out, tokens, prompts, epochs, verbose)
        return
    if dims is None:
        typer.echo("error: --dims D is required (or --drafter)", err=True)
        raise typer.Exit(EXIT_USAGE)
    from partition.reduction import calibrate as fit
    from partition.reduction import default_reductions_dir, reduction_filename, save_reduction

    setup_logging(verbose)
    with typed_errors():
        source = resolve_model(model)
        calibration = text.read_text(encoding="utf-8") if text is not None else None
        reduction = fit(source, split, dims, text=calibration)
        path = out or (reductions or default_reductions_dir()) / reduction_filename(source.model_id, split, dims)
        reduction = save_reduction(reduction, path)
    typer.echo(f"{path}\nsha256 {reduction.sha256}\n{source.model_id} split {split}: {source.hidden_size} -> {dims} "
               f"dims, {100 * reduction.explained:.3f}% of the calibration variance kept")


def _calibrate_drafter(model: str, split: int, out: Path | None, tokens: int, prompts: int, epochs: int,
                       verbose: bool) -> None:
    import json

    from edge_worker.drafter_calibration import calibrate_drafter
    from edge_worker.mini_llm import default_adapters_dir
    from partition.models import resolve_model

    setup_logging(verbose, quiet=not verbose)
    progress = Progress(enabled=True)
    with typed_errors():
        source = resolve_model(model)
        path, metrics = calibrate_drafter(source, split, out, default_adapters_dir(), progress=progress,
                                          new_tokens=tokens, prompts=prompts, epochs=epochs)
        progress.done()
    typer.echo(json.dumps({"adapter": str(path), **metrics}))
