"""``PrivacyProtection`` and ``MiniLLMHandler``: the original design's settings objects.

``PrivacyProtection`` decides how activations leave the device. Today that is end-to-end
encryption (on by default) and the wire precision; dimensionality reduction is accepted as a
setting and refused until its calibrated projection exists (issue 7), rather than silently
ignored.

``MiniLLMHandler`` holds the on-device drafter and its confidence threshold and refuses a drafter
whose tokenizer differs from the main model's. Drafting itself (issue 6) is not wired into the
generation loop yet: until it is, every token comes from the main model and ``tokens_from_mini``
stays 0.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from partition.errors import PartitionError

log = logging.getLogger(__name__)


class TokenizerMismatchError(PartitionError):
    """The drafter's tokenizer does not produce the main model's token ids."""


@dataclass(frozen=True)
class PrivacyProtection:
    encryption_enabled: bool = True
    wire_dtype: str = "fp16"
    reduce_dims: int | None = None

    def __post_init__(self) -> None:
        from broker.codec import WIRE_DTYPES

        if self.wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire dtype must be one of {', '.join(WIRE_DTYPES)}, got {self.wire_dtype!r}")
        if self.reduce_dims is not None:
            raise NotImplementedError(
                "dimensionality reduction needs a calibrated projection (`edgecloud calibrate`, issue 7), "
                "which does not exist yet; leave reduce_dims unset"
            )


# Probe strings for the tokenizer check: ASCII, whitespace runs, digits, accents, CJK, emoji.
_TOKENIZER_PROBES = ("Hello, world!", "  indented\n\ttext 12345", "café naïve", "边缘云", "🙂 ok")


class MiniLLMHandler:
    def __init__(self, model: Any = None, tokenizer: Any = None, threshold: float = 0.8,
                 main_tokenizer: Any = None) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.model = model
        self.tokenizer = tokenizer
        self.threshold = threshold
        if main_tokenizer is not None:
            self.check_tokenizer(main_tokenizer)

    def check_tokenizer(self, main_tokenizer: Any) -> None:
        """Refuse a drafter whose tokenizer would give different ids than the main model's."""
        if self.tokenizer is None or self.tokenizer is main_tokenizer:
            return
        if len(self.tokenizer) != len(main_tokenizer):
            raise TokenizerMismatchError(
                f"the mini-LLM's tokenizer has {len(self.tokenizer)} tokens, the main model's {len(main_tokenizer)}: "
                "a drafter must share the main model's tokenizer"
            )
        for text in _TOKENIZER_PROBES:
            if self.tokenizer(text)["input_ids"] != main_tokenizer(text)["input_ids"]:
                raise TokenizerMismatchError(
                    f"the mini-LLM's tokenizer encodes {text!r} differently from the main model's"
                )
