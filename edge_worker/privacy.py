"""``PrivacyProtection``: the original design's settings object for how activations leave the device.

Today that is end-to-end encryption (on by default) and the wire precision; dimensionality
reduction is accepted as a setting and refused until its calibrated projection exists (issue 7),
rather than silently ignored.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrivacyProtection:
    encryption_enabled: bool = True
    wire_dtype: str = "fp16"
    reduce_dims: int | None = None

    def __post_init__(self) -> None:
        if self.wire_dtype not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"wire dtype must be fp32, fp16 or bf16, got {self.wire_dtype!r}")
        if self.reduce_dims is not None:
            raise NotImplementedError(
                "dimensionality reduction needs a calibrated projection (`edgecloud calibrate`, issue 7), "
                "which does not exist yet; leave reduce_dims unset"
            )
