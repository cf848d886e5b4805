"""Where each tensor of a GGUF file lies, read from its header without parsing its metadata.

``gguf.GGUFReader`` turns every metadata value into numpy views, one per string: SmolLM2's file
holds its tokenizer's 49152 tokens and 48900 merges as metadata, and the reader took 3.0 s of
every edge, worker and server start here, before a single weight was read. ``tensors`` walks the
same header and only steps over the metadata (a string is its length and its bytes), then reads
the tensor table (name, shape, type, offset) and maps the file: the same tensors in 0.1 s.

The format (GGUF versions 2 and 3, little-endian): magic ``GGUF``, uint32 version, uint64 tensor
count, uint64 metadata count; each metadata pair a string key, a uint32 value type and the value
(an array is a uint32 item type, a uint64 count and the items); each tensor a string name, a uint32
dimension count, uint64 dimensions (fastest first), a uint32 type and a uint64 offset; the data
after the table, aligned to ``general.alignment`` (32 by default), each tensor at its offset.
Anything else (a big-endian file, another version) is read by ``GGUFReader``, as is a file this
reader finds inconsistent, so nothing here decides what a file means on its own.
"""

from __future__ import annotations

import functools
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# Bytes of each fixed-size metadata value type (GGUF's numbering); 8 (string) and 9 (array) vary.
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4


class GGUFIndexError(ValueError):
    """The header is not one this reader walks (``tensors`` then asks ``GGUFReader``)."""


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    type_name: str  # GGML's name of its type: "Q4_1", "Q8_0", "F32", ...
    shape: tuple[int, ...]  # as GGUF lists it: the fastest dimension first
    data: np.ndarray  # its bytes, uint8, memory-mapped: nothing is read until used


class _Cursor:
    def __init__(self, buf: memoryview) -> None:
        self.buf, self.at = buf, 0

    def take(self, fmt: str) -> tuple:
        try:
            out = struct.unpack_from(fmt, self.buf, self.at)
        except struct.error:
            raise GGUFIndexError(f"the header ends at byte {self.at}, inside a field") from None
        self.at += struct.calcsize(fmt)
        return out

    def skip(self, n: int) -> None:
        if n < 0 or self.at + n > len(self.buf):
            raise GGUFIndexError(f"a field of {n} bytes at byte {self.at} runs past the end of the file")
        self.at += n

    def string(self) -> str:
        (n,) = self.take("<Q")
        start = self.at
        self.skip(n)
        return bytes(self.buf[start:self.at]).decode("utf-8", errors="replace")

    def skip_value(self, kind: int) -> None:
        if kind in _FIXED:
            self.skip(_FIXED[kind])
        elif kind == _STRING:
            self.skip(self.take("<Q")[0])
        elif kind == _ARRAY:
            item, count = self.take("<IQ")
            if item in _FIXED:
                self.skip(_FIXED[item] * count)
            elif item == _STRING:
                for _ in range(count):  # SmolLM2's 98052 strings in ~40 ms
                    self.skip(self.take("<Q")[0])
            else:
                raise GGUFIndexError(f"an array of value type {item}")
        else:
            raise GGUFIndexError(f"value type {kind}")


def read_index(path: Path) -> dict[str, GGUFTensor]:
    """The tensors of the GGUF file at ``path`` by name, walking its header (see the module's
    doc); ``GGUFIndexError`` where it is not a header this walks."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if path.stat().st_size < 24:  # numpy cannot map an empty file; a header is at least 24 bytes
        raise GGUFIndexError(f"{path.stat().st_size} bytes, shorter than a header")
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(memoryview(mapped))
    magic, version, n_tensors, n_fields = cur.take("<4sIQQ")
    if magic != b"GGUF" or version not in (2, 3):
        raise GGUFIndexError(f"magic {magic!r}, version {version} (little-endian GGUF 2 or 3 is read here)")
    alignment = 32
    for _ in range(n_fields):
        key = cur.string()
        (kind,) = cur.take("<I")
        if key == "general.alignment" and kind == _UINT32:
            (alignment,) = cur.take("<I")
        else:
            cur.skip_value(kind)
    table = []
    for _ in range(n_tensors):
        name = cur.string()
        (dims,) = cur.take("<I")
        shape = cur.take(f"<{dims}Q")
        kind, offset = cur.take("<IQ")
        table.append((name, shape, kind, offset))
    if alignment <= 0:
        raise GGUFIndexError(f"alignment {alignment}")
    start = -(-cur.at // alignment) * alignment
    out = {}
    for name, shape, kind, offset in table:
        try:
            ggml_type = GGMLQuantizationType(kind)
            block, block_bytes = GGML_QUANT_SIZES[ggml_type]
        except (ValueError, KeyError):
            raise GGUFIndexError(f"tensor {name}: type {kind}") from None
        count = int(np.prod(shape, dtype=np.int64))
        if count % block:
            raise GGUFIndexError(f"tensor {name}: {count} values are not whole blocks of {block}")
        a = start + offset
        b = a + count // block * block_bytes
        if a % alignment or b > len(mapped):
            raise GGUFIndexError(f"tensor {name}: bytes {a}..{b} of a {len(mapped)}-byte file")
        out[name] = GGUFTensor(name, ggml_type.name, tuple(int(d) for d in shape), mapped[a:b])
    return out


@functools.lru_cache(maxsize=4)
def tensors(path: Path) -> dict[str, GGUFTensor]:
    """The tensors of the GGUF file at ``path`` by name, memory-mapped; ``read_index`` where it
    walks the header, else ``gguf.GGUFReader`` (slower, any file it reads)."""
    try:
        return read_index(path)
    except GGUFIndexError as exc:
        log.info("%s: %s; reading it with gguf.GGUFReader", path, exc)
    from gguf import GGUFReader

    return {t.name: GGUFTensor(t.name, t.tensor_type.name, tuple(int(d) for d in t.shape),
                               np.asarray(t.data).reshape(-1).view(np.uint8))
            for t in GGUFReader(path).tensors}
