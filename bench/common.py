"""What the benchmarks share: the fixed prompt set, and the repository root on sys.path."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PROMPTS = [
    "Explain why the sky is blue.",
    "Write a short poem about the sea.",
    "List three uses of a paperclip.",
]
