"""The worker's prefix cache: prompts' keys and values reused, bit for bit, by sessions that start
the same way (partition/prefix_cache.py)."""

from __future__ import annotations

import pytest
import torch

from partition.prefix_cache import PrefixCache, row_digests
from partition.segment import ModelSegment, StepInput

SYSTEM = [(13 * i) % 200 + 3 for i in range(40)]  # a shared beginning, longer than a decode frame


def _segment(source, start: int = 0) -> ModelSegment:
    from partition import rowkernel

    if rowkernel.kernel() is None:
        pytest.skip(f"the row kernel does not run here: {rowkernel.reason()}")
    seg = ModelSegment.load(source, start, source.n_layers, embed=start == 0)
    assert seg.whole_frames_packed()
    return seg


def _prefill(seg: ModelSegment, rows: torch.Tensor, cache=None):
    cache = cache if cache is not None else seg.new_cache()
    out = seg.forward_many([StepInput(rows, cache)])[0]
    return out.logits, cache


def _keys(cache, length: int) -> torch.Tensor:
    return torch.cat([cache._layers[i].keys[..., :length, :] for i in sorted(cache._layers)])


def test_digests_chain_over_rows_and_tell_start_layers_apart():
    rows = torch.tensor([[5, 6, 7, 8]])
    whole = row_digests(rows, 0)
    assert row_digests(rows[:, :2], 0) == whole[:2] and len(set(whole)) == 4
    assert row_digests(rows, 3)[0] != whole[0]
    other = row_digests(torch.tensor([[5, 9, 7, 8]]), 0)
    assert other[0] == whole[0] and all(a != b for a, b in zip(other[1:], whole[1:], strict=True))
    hidden = torch.randn(1, 3, 8)
    assert row_digests(hidden, 2) == row_digests(hidden.clone(), 2) != row_digests(hidden.bfloat16(), 2)


@pytest.mark.parametrize("start", [0, 2])
def test_a_session_copying_a_known_beginning_computes_the_bits_it_computes_alone(tiny_llama, start):
    seg = _segment(tiny_llama, start)

    def rows(ids: list[int]) -> torch.Tensor:  # what the session sends: ids, or a split's hidden states
        if start == 0:
            return torch.tensor([ids])
        return torch.stack([torch.randn(tiny_llama.hidden_size, generator=torch.Generator().manual_seed(i))
                            for i in ids]).unsqueeze(0)

    prefixes = PrefixCache(64 * 2**20)
    first = rows(SYSTEM + [50, 51, 52])
    digests = row_digests(first, start)
    cache = seg.new_cache()
    assert prefixes.fill(digests, cache, first.shape[1] - 1) == 0  # nothing known yet
    _prefill(seg, first, cache)
    prefixes.add(digests, cache)

    second = rows(SYSTEM + [60, 61, 62, 63, 64])
    alone_logits, alone_cache = _prefill(seg, second)
    cache = seg.new_cache()
    digests = row_digests(second, start)
    reused = prefixes.fill(digests, cache, second.shape[1] - 1)
    assert reused == len(SYSTEM) and cache.length == len(SYSTEM)
    logits, cache = _prefill(seg, second[:, reused:], cache)
    assert torch.equal(logits, alone_logits)
    assert torch.equal(_keys(cache, second.shape[1]), _keys(alone_cache, second.shape[1]))
    # The same prompt again: all but its last position, whose logits are the answer.
    again = seg.new_cache()
    assert prefixes.fill(row_digests(first, start), again, first.shape[1] - 1) == first.shape[1] - 1
    assert prefixes.hits == 2 and prefixes.reused_positions == len(SYSTEM) + first.shape[1] - 1


def test_the_cache_keeps_to_its_budget_least_recently_used_first(tiny_llama):
    seg = _segment(tiny_llama)
    prompts = [torch.tensor([SYSTEM[:10] + [70 + i] * 6]) for i in range(4)]
    computed = []
    for p in prompts:
        _, cache = _prefill(seg, p)
        computed.append((row_digests(p, 0), cache))
    size = computed[0][1].nbytes() * 16 // computed[0][1].capacity()  # one prompt's 16 positions
    prefixes = PrefixCache(3 * size)
    for digests, cache in computed[:3]:
        prefixes.add(digests, cache)
    assert len(prefixes) == 3 and prefixes.nbytes == 3 * size
    assert prefixes.fill(computed[0][0], seg.new_cache(), 15) == 15  # the first is now the most recent
    prefixes.add(*computed[3])  # over budget: the least recently used (the second) goes
    assert len(prefixes) == 3 and prefixes.nbytes <= prefixes.limit_bytes
    assert prefixes.longest(computed[1][0], 15) == (prefixes.longest(computed[0][0], 10)[0], 10)  # only the shared part
    assert prefixes.longest(computed[0][0], 15)[1] == 15 and prefixes.longest(computed[3][0], 15)[1] == 15
    # Evicting every entry that held the shared beginning leaves nothing pointing at them.
    small = PrefixCache(size)
    small.add(*computed[0])
    small.add(*computed[1])
    assert len(small) == 1 and small.longest(computed[0][0], 15) == (small.longest(computed[1][0], 15)[0], 10)
    with pytest.raises(ValueError, match="empty cache"):
        full = seg.new_cache()
        _prefill(seg, prompts[0], full)
        small.fill(computed[0][0], full, 15)


@pytest.mark.integration
@pytest.mark.parametrize("split", [0, 2])
def test_sessions_sharing_a_system_prompt_reuse_it_on_the_worker_and_keep_their_tokens(tiny_llama, split):
    """Real broker and worker: a second prompt with the first's beginning is partly copied on the
    worker (its status says how many positions) and, at a split, in the edge's layers too; every
    generation gives the tokens it gives without either cache and locally."""
    from brokerutil import wait_for_status

    from broker.wire.crypto import load_api_keys
    from cli.cluster import LocalCluster
    from edge_worker.config import EdgeConfig
    from edge_worker.engine import EdgeEngine

    prompts = [SYSTEM + [50, 51, 52], SYSTEM + [60, 61], SYSTEM + [50, 51, 52]]
    got: dict[str, list[list[int]]] = {}
    for name, args in (("cached", ()), ("uncached", ("--prefix-cache-mb", "0"))):
        # The default heartbeat: at 0.2 s (0.6 s of silence expires a worker) a loaded CI machine
        # had the broker drop the worker for a moment and its status list it nowhere.
        with LocalCluster(model="tiny-llama", worker_threads=1) as cluster:
            cluster.start_broker()
            cluster.add_worker(extra_args=args)
            cluster.wait_for_workers(1, timeout_s=60)
            key = sorted(load_api_keys(cluster.keys_dir / "api_keys.txt"))[0]
            placement = {"force_cloud": True} if split == 0 else {"split": split}
            settings = EdgeConfig(model="tiny-llama", broker=cluster.endpoint, keys_dir=cluster.keys_dir,
                                  api_key=key, wire_dtype="fp32", mini="none", dynamic=False,
                                  prefix_cache_mb=64 if name == "cached" else 0, **placement)
            with EdgeEngine("tiny-llama", settings) as engine:
                params = engine.params(ignore_eos=True, max_new_tokens=12)
                results = [engine.generate(p, params) for p in prompts]
                assert all(r.split == split for r in results)
                got[name] = [r.token_ids for r in results]
                edge_reused = engine.prefixes.reused_positions if engine.prefixes else 0
                # The next heartbeats carry the counts (a starved one may hide the worker for a moment).
                worker = wait_for_status(
                    cluster, lambda st, name=name: st["workers"] and (name == "uncached" or st["workers"][0].get("prefix_reused")),
                    "the worker's prefix cache counts in its status", timeout_s=30)["workers"][0]
        if name == "cached":
            assert worker["prefix_reused"] == len(SYSTEM) + len(prompts[0]) - 1 and worker["prefix_bytes"] > 0
            assert edge_reused == (0 if split == 0 else worker["prefix_reused"])  # split 0: no edge layers
        else:
            assert worker["prefix_reused"] == 0 and worker["prefix_bytes"] == 0 and edge_reused == 0
    settings = EdgeConfig(model="tiny-llama", force_local=True, mini="none")
    with EdgeEngine("tiny-llama", settings) as engine:
        local = [engine.generate(p, engine.params(ignore_eos=True, max_new_tokens=12)).token_ids for p in prompts]
    assert got["cached"] == got["uncached"] == local


def test_status_shows_what_the_prefix_cache_holds_and_saved():
    from cli.roles import render_status

    worker = {"worker_id": "w1", "layer_ranges": [[0, 30]], "cache_bytes": 3 * 2**20, "prefix_bytes": 5 * 2**20,
              "prefix_reused": 280}
    assert "3.0 MiB + 5.0 MiB prefixes (280 positions reused)" in render_status({"workers": [worker]})
    assert "prefixes" not in render_status({"workers": [dict(worker, prefix_bytes=0)]})


def test_a_local_engine_reuses_a_shared_beginning_and_gives_the_tokens_it_gives_without(tiny_llama):
    from edge_worker.config import EdgeConfig
    from edge_worker.engine import EdgeEngine

    prompts = [SYSTEM + [50, 51, 52], SYSTEM[:30] + [60, 61], SYSTEM + [50, 51, 52, 53]]
    got = {}
    for mb in (64, 0):
        with EdgeEngine("tiny-llama", EdgeConfig(force_local=True, mini="none", prefix_cache_mb=mb)) as engine:
            params = engine.params(ignore_eos=True, max_new_tokens=10)
            got[mb] = [engine.generate(p, params).token_ids for p in prompts]
            reused = engine.prefixes.reused_positions if engine.prefixes else 0
        assert reused == (30 + len(prompts[0]) if mb else 0)
    assert got[64] == got[0]
