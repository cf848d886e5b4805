"""Dimensionality reduction: the PCA fit, its file and hash, the worker's store, the edge's
options, and a real broker + worker serving reduced sessions (and refusing unknown ones)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from broker.errors import UnknownReduction
from edge_worker.backends import LocalBackend
from edge_worker.generation import EdgeGenerator
from edge_worker.privacy import CloudView, PrivacyProtection, worker_input
from partition.reduction import (
    Reduction,
    ReductionError,
    ReductionStore,
    calibrate,
    find_or_calibrate,
    fit_pca,
    load_reduction,
    reduction_filename,
    save_reduction,
)
from partition.segment import ModelSegment
from partition.tokens import eos_token_ids

SPLIT = 2
DIMS = 16


def _low_rank_states(n: int = 300, width: int = 32, rank: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, rank, generator=g) @ torch.randn(rank, width, generator=g) * 4 + 7.0


def test_pca_reconstructs_states_that_lie_in_d_dims_exactly() -> None:
    states = _low_rank_states()
    mean, basis, explained = fit_pca(states, 5)
    assert basis.shape == (32, 5) and explained > 0.9999
    assert torch.allclose(basis.T @ basis, torch.eye(5), atol=1e-5)
    r = Reduction("m", 1, 32, 5, mean, basis, explained)
    h = states[:7].unsqueeze(0)  # (1, 7, 32)
    z = r.project(h)
    assert z.shape == (1, 7, 5)
    assert torch.allclose(r.reconstruct(z), h, rtol=1e-4, atol=1e-3)
    _, _, fewer = fit_pca(states, 2)
    assert fewer < explained


def test_a_saved_reduction_is_named_by_the_sha256_of_its_bytes(tmp_path) -> None:
    mean, basis, explained = fit_pca(_low_rank_states(), 8)
    r = Reduction("llama-4x64@abc", 3, 32, 8, mean, basis, explained)
    path = tmp_path / reduction_filename(r.model_id, 3, 8)
    saved = save_reduction(r, path)
    assert saved.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    again = save_reduction(Reduction("llama-4x64@abc", 3, 32, 8, *fit_pca(_low_rank_states(), 8)), tmp_path / "b")
    assert again.sha256 == saved.sha256  # the same states give a byte-identical file
    loaded = load_reduction(path, expected_sha256=saved.sha256)
    assert torch.equal(loaded.basis, basis) and (loaded.split, loaded.dims) == (3, 8)
    with pytest.raises(ReductionError):
        load_reduction(path, expected_sha256="0" * 64)
    corrupt = bytearray(path.read_bytes())
    corrupt[-3] ^= 0xFF
    (tmp_path / "c.safetensors").write_bytes(bytes(corrupt))
    assert load_reduction(tmp_path / "c.safetensors").sha256 != saved.sha256
    for junk in (b"", b"\x00" * 7, b"\xff" * 64, b"not a reduction"):
        (tmp_path / "j.safetensors").write_bytes(junk)
        with pytest.raises(ReductionError):
            load_reduction(tmp_path / "j.safetensors")


def test_the_worker_store_finds_files_added_later_and_skips_junk(tmp_path) -> None:
    store = ReductionStore(tmp_path, rescan_interval_s=0.0)
    (tmp_path / "junk.safetensors").write_bytes(b"garbage")
    assert store.get("a" * 64) is None
    r = save_reduction(Reduction("m", 1, 32, 4, *fit_pca(_low_rank_states(), 4)), tmp_path / "r.safetensors")
    assert store.get(r.sha256).sha256 == r.sha256 and len(store) == 1
    throttled = ReductionStore(tmp_path, rescan_interval_s=3600)
    assert throttled.get("b" * 64) is None  # the first miss scans ...
    r2 = save_reduction(Reduction("m", 2, 32, 4, *fit_pca(_low_rank_states(), 4)), tmp_path / "r2.safetensors")
    assert throttled.get(r2.sha256) is None  # ... later misses wait for the interval


def test_the_edge_calibrates_once_and_then_reuses_the_file(tiny_llama, tmp_path) -> None:
    r = find_or_calibrate(tiny_llama, SPLIT, DIMS, tmp_path)
    files = list(tmp_path.iterdir())
    assert [f.name for f in files] == [reduction_filename(tiny_llama.model_id, SPLIT, DIMS)]
    mtime = files[0].stat().st_mtime_ns
    assert find_or_calibrate(tiny_llama, SPLIT, DIMS, tmp_path).sha256 == r.sha256
    assert files[0].stat().st_mtime_ns == mtime
    assert (r.model_id, r.split, r.hidden_size, r.dims) == (tiny_llama.model_id, SPLIT, 64, DIMS)
    with pytest.raises(ReductionError):
        calibrate(tiny_llama, SPLIT, 65)
    with pytest.raises(ReductionError):
        r.check_matches(tiny_llama.model_id, SPLIT + 1, 64)


def test_privacy_protection_takes_reduce_dims(tiny_llama, tmp_path) -> None:
    assert PrivacyProtection(encryption_enabled=True).reduction_for(tiny_llama, SPLIT) is None
    p = PrivacyProtection(encryption_enabled=True, reduce_dims=DIMS, reductions_dir=tmp_path)
    assert p.reduction_for(tiny_llama, SPLIT).dims == DIMS
    assert p.reduction_for(tiny_llama, tiny_llama.n_layers) is None  # nothing leaves the device
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError):
            PrivacyProtection(reduce_dims=bad)
    with pytest.raises(ValueError):
        PrivacyProtection(wire_dtype="int4")


def test_cloud_view_is_the_decoded_step_tensor(tiny_llama, tmp_path) -> None:
    view = CloudView(tiny_llama, SPLIT, wire_dtype="int8", reduce_dims=DIMS, reductions_dir=tmp_path)
    ids = [5, 17, 3, 99, 42]
    seen = view(ids)
    assert seen.shape == (1, 5, DIMS) and seen.dtype == torch.float32
    edge = ModelSegment.load(tiny_llama, 0, SPLIT)
    hidden = edge(torch.tensor([ids]), edge.new_cache(), logits="none").hidden
    z = view.reduction.project(hidden)
    assert torch.allclose(seen, z, atol=z.abs().max().item() / 100)
    plain = CloudView(tiny_llama, SPLIT, wire_dtype="fp32")(ids)
    assert torch.equal(plain, hidden)


class _ReducedLocalBackend(LocalBackend):
    """What a worker serving a reduced session computes, in process: the reference for the real one."""

    def __init__(self, segment, wire_dtype, reduction) -> None:
        super().__init__(segment)
        self.wire_dtype, self.reduction = wire_dtype, reduction

    def step(self, hidden, step, draft=(), seen=()):
        return super().step(worker_input(hidden, self.wire_dtype, self.reduction), step, draft, seen)


@pytest.fixture(scope="module")
def reduced_cluster(tmp_path_factory):
    from cli.cluster import LocalCluster

    worker_dir = tmp_path_factory.mktemp("worker-reductions")
    mp = pytest.MonkeyPatch()
    mp.setenv("EDGECLOUD_REDUCTIONS", str(worker_dir))  # inherited by the spawned processes
    cluster = LocalCluster(model="tiny-llama", worker_threads=1, heartbeat_s=0.5)
    try:
        cluster.start_broker()
        cluster.add_worker()
        cluster.wait_for_workers(1)
        yield cluster, worker_dir
    finally:
        cluster.stop()
        mp.undo()


PROMPT = ["--prompt", "hello edge", "--tokens", "12", "--raw-prompt", "--json"]


@pytest.mark.integration
def test_a_worker_serves_reduced_sessions_exactly_like_the_in_process_reference(reduced_cluster, tiny_llama):
    cluster, worker_dir = reduced_cluster
    out = cluster.edge("--split", str(SPLIT), "--reduce-dims", str(DIMS), "--wire-dtype", "int8", *PROMPT)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout)
    # The prefill step carries D int8 values (plus scales) per position, not H fp16 ones.
    positions = got["trace"][0]["positions"]
    assert got["trace"][0]["bytes_sent"] < positions * (DIMS + 4) + 400 < positions * 64 * 2

    reduction = load_reduction(worker_dir / reduction_filename(tiny_llama.model_id, SPLIT, DIMS))
    tokenizer = tiny_llama.load_tokenizer()
    edge = ModelSegment.load(tiny_llama, 0, SPLIT)
    rest = ModelSegment.load(tiny_llama, SPLIT, tiny_llama.n_layers, embed=False)
    gen = EdgeGenerator(edge, _ReducedLocalBackend(rest, "int8", reduction), tokenizer,
                        eos_token_ids(tiny_llama, tokenizer), mode="hybrid")
    expected = gen.generate(tokenizer("hello edge")["input_ids"], 12)
    assert got["token_ids"] == expected.token_ids


@pytest.mark.integration
def test_a_worker_refuses_a_reduction_it_does_not_hold_and_keeps_serving(reduced_cluster, tmp_path):
    cluster, _ = reduced_cluster
    out = cluster.edge("--split", str(SPLIT), "--reduce-dims", "8", "--reductions", str(tmp_path), *PROMPT)
    assert out.returncode != 0
    assert "this worker has no reduction with sha256" in out.stderr, out.stderr[-2000:]
    cluster.check_alive()  # the refusal was a typed error reply; the worker process goes on


def test_the_worker_refuses_a_reduction_for_another_split(tiny_llama, tmp_path) -> None:
    from cloud_worker.worker import CloudWorker, CloudWorkerConfig

    r = find_or_calibrate(tiny_llama, SPLIT, DIMS, tmp_path)
    worker = CloudWorker(CloudWorkerConfig(model="tiny-llama", encryption=False, reductions_dir=tmp_path))
    assert worker._reduction(r.sha256, SPLIT).sha256 == r.sha256
    with pytest.raises(UnknownReduction):
        worker._reduction(r.sha256, SPLIT + 1)
    with pytest.raises(UnknownReduction):
        worker._reduction("f" * 64, SPLIT)


def test_calibrate_command_writes_the_file_the_edge_finds(tiny_llama, tmp_path) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    runner = CliRunner()
    out = runner.invoke(app, ["calibrate", "--model", "tiny-llama", "--split", "1", "--dims", "8",
                              "--reductions", str(tmp_path)])
    assert out.exit_code == 0, out.output
    path = tmp_path / reduction_filename(tiny_llama.model_id, 1, 8)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert str(path) in out.output and f"sha256 {sha}" in out.output
    assert find_or_calibrate(tiny_llama, 1, 8, tmp_path).sha256 == sha
    text = tmp_path / "cal.txt"
    text.write_text("one short paragraph\n\nand another one")
    custom = tmp_path / "custom.safetensors"
    out = runner.invoke(app, ["calibrate", "--model", "tiny-llama", "--split", "1", "--dims", "8",
                              "--text", str(text), "--out", str(custom)])
    assert out.exit_code == 0, out.output
    assert load_reduction(custom).sha256 != sha  # other text, other projection
    bad = runner.invoke(app, ["calibrate", "--model", "tiny-llama", "--split", "9", "--dims", "8",
                              "--reductions", str(tmp_path)])
    assert bad.exit_code == 2 and "split 9 is outside" in bad.output
