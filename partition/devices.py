"""Where a process's layers compute and in what dtype: the cloud worker's ``--device``/``--dtype``
and the edge's. Importing this module does not import torch (settings are checked before it loads).

"auto" device: a GPU when torch sees one, else the CPU. "auto" dtype: float32 on a CPU (the row
kernel, and outputs equal to another float32 run) and bfloat16 on a GPU (float32's range, half its
bytes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def check_device(name: str) -> None:
    if name not in DEVICES:
        raise ValueError(f"--device must be auto, cpu or cuda, got {name!r}")


def check_dtype(name: str) -> None:
    if name not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")


def dtype_name(name: str, device_type: str) -> str:
    """The dtype layers on ``device_type`` ("cpu" or "cuda") compute in for ``--dtype name``."""
    check_dtype(name)
    if name == "auto":
        return "float32" if device_type == "cpu" else "bfloat16"
    return name


def pick_device(name: str) -> torch.device:
    """The torch device for ``--device name``; ValueError for cuda where torch sees none."""
    import torch

    check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype for ``--dtype name`` on ``device``."""
    import torch

    return getattr(torch, dtype_name(name, device.type))
