"""``PrivacyProtection``: the original design's settings object for how activations leave the device.

``PrivacyProtection`` decides how activations leave the device: end-to-end encryption (on by
default), the wire precision (``broker.wire.codec.WIRE_DTYPES``), and optionally a reduction to
``reduce_dims`` dimensions by a projection calibrated per model and split
(``partition/reduction.py``; found in ``reductions_dir`` or calibrated there on first use).
Encryption hides the activations from the broker and the network, not from the worker that
decrypts them; ``CloudView`` returns exactly what that worker sees, for measuring what it reveals.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from partition.models import ModelSource, resolve_model
from partition.reduction import Reduction, find_or_calibrate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrivacyProtection:
    encryption_enabled: bool = True
    wire_dtype: str = "fp16"
    reduce_dims: int | None = None  # None: the activations leave at full width
    reductions_dir: Path | None = None  # None: $EDGECLOUD_REDUCTIONS or ~/.cache/edgecloud/reductions

    def __post_init__(self) -> None:
        from broker.wire.codec import WIRE_DTYPES

        if self.wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire dtype must be one of {', '.join(WIRE_DTYPES)}, got {self.wire_dtype!r}")
        if self.reduce_dims is not None and (type(self.reduce_dims) is not int or self.reduce_dims < 1):
            raise ValueError(f"reduce_dims must be a positive integer or None, got {self.reduce_dims!r}")

    def reduction_for(self, source: ModelSource, split: int, edge_segment=None) -> Reduction | None:
        """The projection for this model and split (calibrated and saved on first use), or None
        without ``reduce_dims`` or when every layer runs here (nothing leaves the device)."""
        if self.reduce_dims is None or split >= source.n_layers:
            return None
        return find_or_calibrate(source, split, self.reduce_dims, self.reductions_dir, edge_segment)


class CloudView:
    """Exactly the tensor a cloud worker sees for a prompt: the edge's layers [0, split), the
    projection if any, the wire codec, and the worker's decoding (after decryption, before it
    reconstructs the full width). For leakage measurements: it runs the same code the edge and the
    worker run (``seal_step`` / ``open_step``), only with the cipher left out.

        view = CloudView("smollm2-135m", split=5, wire_dtype="int8", reduce_dims=128)
        seen = view(input_ids)   # (1, T, 128) float32; view.reduction.reconstruct(seen) -> (1, T, 576)
    """

    def __init__(self, model: str | ModelSource, split: int, wire_dtype: str = "fp16",
                 reduce_dims: int | None = None, reductions_dir: Path | None = None,
                 reduction: Reduction | None = None) -> None:
        from partition.segment import ModelSegment

        self.source = resolve_model(model) if isinstance(model, str) else model
        if not 0 <= split < self.source.n_layers:
            raise ValueError(f"split must be in [0, {self.source.n_layers}) for a cloud to see anything, got {split}")
        self.split = split
        self.privacy = PrivacyProtection(True, wire_dtype, reduce_dims, reductions_dir)
        self.edge = ModelSegment.load(self.source, 0, split)
        self.reduction = reduction or self.privacy.reduction_for(self.source, split, self.edge)
        if self.reduction is not None:
            self.reduction.check_matches(self.source.model_id, split, self.source.hidden_size)
        self.width = self.reduction.dims if self.reduction else self.source.hidden_size

    @torch.inference_mode()
    def __call__(self, input_ids: list[int] | torch.Tensor) -> torch.Tensor:
        """input_ids: (T,) or (1, T); returns the (1, T, D or H) float32 tensor the worker decodes."""
        ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(1, -1)  # (1, T)
        hidden = self.edge(ids, self.edge.new_cache(), logits="none").hidden  # (1, T, H)
        return through_wire(hidden, self.privacy.wire_dtype, self.reduction)


def through_wire(hidden: torch.Tensor, wire_dtype: str, reduction: Reduction | None = None) -> torch.Tensor:
    """(1, T, H) edge activations -> the (1, T, D or H) tensor the worker decodes from the step
    body: the projection, the codec and the decoder's checks, as in the edge and the worker."""
    from broker.wire.crypto import NullCipher
    from broker.wire.session_protocol import open_step, seal_step

    wire = reduction.project(hidden) if reduction else hidden
    sid = uuid.uuid4().hex
    frames = seal_step(NullCipher(), sid, 0, 0, wire, wire_dtype)
    return open_step(NullCipher(), sid, 0, frames, wire.shape[-1]).hidden


def worker_input(hidden: torch.Tensor, wire_dtype: str, reduction: Reduction | None = None) -> torch.Tensor:
    """(1, T, H) edge activations -> the (1, T, H) tensor the worker's layers run on."""
    seen = through_wire(hidden, wire_dtype, reduction)
    return reduction.reconstruct(seen) if reduction else seen
