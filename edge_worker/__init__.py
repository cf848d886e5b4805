"""The on-device side: the original design's classes, importable as

    from edge_worker import EdgeCloudManager, DeviceMonitor, CloudClient, MiniLLMHandler, PrivacyProtection

Exports load lazily so that light users of this package (the broker reads only its config
defaults) do not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EdgeCloudManager": "edge_worker.manager",
    "DeviceMonitor": "edge_worker.device_monitor",
    "CloudClient": "edge_worker.cloud_client",
    "MiniLLMHandler": "edge_worker.mini_llm",
    "PrivacyProtection": "edge_worker.privacy",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'edge_worker' has no attribute {name!r}")
