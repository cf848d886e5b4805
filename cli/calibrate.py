"""``edgecloud calibrate``: compute and save the projection that ``--reduce-dims`` uses."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import setup_logging, typed_errors


def calibrate(
    split: Annotated[int, typer.Option("--split", "-k", help="The split the projection is for (layers on the edge).")],
    dims: Annotated[int, typer.Option("--dims", "-d", help="Dimensions the activations are reduced to.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Model (see `edge --help`).")] = "smollm2-135m",
    out: Annotated[Path | None, typer.Option("--out", help="File to write; default: the reductions "
                                             "directory, where edge and cloud-worker look.")] = None,
    reductions: Annotated[Path | None, typer.Option("--reductions", help="Reductions directory "
                                                    "[env EDGECLOUD_REDUCTIONS, default "
                                                    "~/.cache/edgecloud/reductions].")] = None,
    text: Annotated[Path | None, typer.Option("--text", help="Calibration text (paragraphs separated by "
                                              "blank lines); default: the one shipped in the package.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Fit a centred PCA of the hidden states at --split on calibration text and save it.

    Edges (`--reduce-dims D`) and cloud workers (`--reductions DIR`) load the file and agree on it
    by its sha256, which this command prints. Edges calibrate by themselves when the file is missing.
    """
    from partition.models import resolve_model
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
