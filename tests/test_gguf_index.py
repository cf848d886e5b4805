"""partition/gguf_index.py: a GGUF file's tensors from its header, the same as gguf.GGUFReader's."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFEndian, GGUFReader, GGUFWriter

from partition import gguf_index
from partition.gguf_index import GGUFIndexError, read_index


def _write(path: Path, endian: GGUFEndian = GGUFEndian.LITTLE, alignment: int | None = 64) -> Path:
    """A small GGUF file with metadata of every kind a model file holds (a tokenizer's strings
    among them) and tensors of two types."""
    w = GGUFWriter(str(path), "llama", endianess=endian)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_array("tokenizer.ggml.tokens", ["a", "bb", "", "ccc\u00e9"] * 50)
    w.add_array("tokenizer.ggml.scores", [0.5, -1.0, 2.0])
    w.add_array("x.ints", [1, 2, 3])
    w.add_float32("x.f", 1.5)
    w.add_bool("x.b", True)
    w.add_string("x.s", "hello")
    w.add_uint64("x.u64", 2**40)
    w.add_tensor("t.f32", np.arange(12, dtype=np.float32).reshape(3, 4))
    rng = np.random.default_rng(0)
    w.add_tensor("t.q8", rng.integers(0, 256, (4, 34), dtype=np.uint8), raw_dtype=GGMLQuantizationType.Q8_0)
    w.add_tensor("t.q41", rng.integers(0, 256, (2, 40), dtype=np.uint8), raw_dtype=GGMLQuantizationType.Q4_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _theirs(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    return {t.name: (t.tensor_type.name, tuple(int(d) for d in t.shape), np.asarray(t.data).tobytes())
            for t in GGUFReader(path).tensors}


def _ours(index: dict[str, gguf_index.GGUFTensor]) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    return {t.name: (t.type_name, t.shape, t.data.tobytes()) for t in index.values()}


@pytest.mark.parametrize("alignment", [None, 64])
def test_the_index_holds_what_ggufs_reader_reads(tmp_path, alignment):
    path = _write(tmp_path / "m.gguf", alignment=alignment)
    ours = _ours(read_index(path))
    assert ours == _theirs(path)
    assert ours["t.q41"][:2] == ("Q4_1", (64, 2)) and ours["t.f32"][2] == np.arange(12, dtype=np.float32).tobytes()


def test_a_file_the_index_does_not_walk_is_read_by_ggufs_reader(tmp_path, caplog):
    path = _write(tmp_path / "big.gguf", endian=GGUFEndian.BIG)
    with pytest.raises(GGUFIndexError, match="little-endian"):
        read_index(path)
    gguf_index.tensors.cache_clear()
    with caplog.at_level(logging.INFO, logger="partition.gguf_index"):
        index = gguf_index.tensors(path)
    assert _ours(index) == _theirs(path)
    assert any("GGUFReader" in r.getMessage() for r in caplog.records)


def test_a_truncated_or_foreign_file_is_a_typed_error(tmp_path):
    whole = _write(tmp_path / "m.gguf").read_bytes()  # the last tensor, 80 bytes, is followed by 48 of padding
    for n, match in ((30, "past the end|inside a field"), (200, "past the end|inside a field"), (len(whole) - 70, "bytes")):
        cut = tmp_path / f"cut{n}.gguf"
        cut.write_bytes(whole[:n])
        with pytest.raises(GGUFIndexError, match=match):
            read_index(cut)
    for n in (0, 23):
        short = tmp_path / f"short{n}.gguf"
        short.write_bytes(whole[:n])
        with pytest.raises(GGUFIndexError, match="shorter than a header"):
            read_index(short)
    foreign = tmp_path / "foreign.gguf"
    foreign.write_bytes(b"PK\x03\x04" + bytes(60))
    with pytest.raises(GGUFIndexError, match="magic"):
        read_index(foreign)


@pytest.mark.real_model
def test_smollm2s_file_indexes_as_ggufs_reader_reads_it():
    from partition.models import smollm2_gguf_path

    path = smollm2_gguf_path()
    ours = read_index(path)
    theirs = {t.name: t for t in GGUFReader(path).tensors}
    assert set(ours) == set(theirs) and len(ours) == 272
    for name, t in theirs.items():
        assert (ours[name].type_name, ours[name].shape) == (t.tensor_type.name, tuple(int(d) for d in t.shape))
        assert np.array_equal(ours[name].data, np.asarray(t.data).reshape(-1).view(np.uint8)), name
