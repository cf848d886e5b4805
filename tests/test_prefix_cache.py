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
    worker (its status says how many positions) and, at a split, in the edge's layers too; a
    conversation's next turn (the first prompt, its answer and more) copies the answer too, on
    the worker; every generation gives the tokens it gives without either cache and locally."""
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
                turn = prompts[0] + results[0].token_ids + [7, 8]  # the next turn of the first conversation
                results.append(engine.generate(turn, params))
                assert all(r.split == split for r in results)
                got[name] = [r.token_ids for r in results]
                edge_reused = engine.prefixes.reused_positions if engine.prefixes else 0
                # The next heartbeats carry the counts (a starved one may hide the worker for a moment).
                worker = wait_for_status(
                    cluster, lambda st, name=name: st["workers"] and (name == "uncached" or st["workers"][0].get("prefix_reused")),
                    "the worker's prefix cache counts in its status", timeout_s=30)["workers"][0]
        if name == "cached":
            # The second prompt copies the system prompt, the third all but its last position, the
            # next turn the first prompt and all but the last of its 12 tokens (never fed back).
            prompts_reused = len(SYSTEM) + len(prompts[0]) - 1
            assert worker["prefix_reused"] == prompts_reused + len(prompts[0]) + 11 and worker["prefix_bytes"] > 0
            # The edge's layers copy as much (with the activations the cloud got); split 0 has none.
            assert edge_reused == (0 if split == 0 else worker["prefix_reused"])
        else:
            assert worker["prefix_reused"] == 0 and worker["prefix_bytes"] == 0 and edge_reused == 0
    settings = EdgeConfig(model="tiny-llama", force_local=True, mini="none", prefix_cache_mb=0)
    with EdgeEngine("tiny-llama", settings) as engine:
        params = engine.params(ignore_eos=True, max_new_tokens=12)
        local = [engine.generate(p, params).token_ids for p in prompts]
        local.append(engine.generate(prompts[0] + local[0] + [7, 8], params).token_ids)
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
            # The next turn of the first conversation: its prompt, its answer and more.
            got[mb].append(engine.generate(prompts[0] + got[mb][0] + [7, 8], params).token_ids)
            reused = engine.prefixes.reused_positions if engine.prefixes else 0
        # The second prompt copies 30 positions, the third all but its last (the first prompt),
        # the turn the first prompt and all but the last of its 10 tokens (never fed back).
        assert reused == (30 + len(prompts[0]) + len(prompts[0]) + 9 if mb else 0)
    assert got[64] == got[0]


def test_digests_of_a_later_frame_continue_the_chain_of_the_frames_before():
    rows = torch.randn(1, 6, 8)
    whole = row_digests(rows, 1)
    assert row_digests(rows[:, :2], 1) + row_digests(rows[:, 2:], 1, prev=whole[1]) == whole


def test_an_entry_that_extends_another_replaces_it(tiny_llama):
    seg = _segment(tiny_llama)
    rows = torch.tensor([SYSTEM[:20]])
    _, cache = _prefill(seg, rows)
    digests = row_digests(rows, 0)
    prefixes = PrefixCache(64 * 2**20)
    prefixes.add(digests[:12], cache)  # a session's prompt, when computed
    prefixes.add(digests[:5], cache)  # a prefix held already: nothing new
    assert len(prefixes) == 1
    one = prefixes.nbytes
    prefixes.add(digests, cache)  # the same session when it ends: its prompt's entry is redundant
    assert len(prefixes) == 1 and prefixes.nbytes > one and prefixes.longest(digests, 20)[1] == 20
    assert prefixes.longest(digests[:12], 12)[1] == 12  # still served, by the longer entry
    # An entry with what the edge keeps per position is not replaced by one without.
    with_extra = PrefixCache(64 * 2**20)
    with_extra.add(digests[:12], cache, torch.zeros(1, 12, 4))
    with_extra.add(digests, cache)
    assert len(with_extra) == 2


def test_a_session_with_a_tree_and_drafts_joins_the_cache_whole_when_it_ends(tiny_llama):
    """An in-process worker (its connection to a real broker) runs a session at split 1: its
    prompt, a token tree (one path kept), a chain of drafts (one rejected) and a plain step, then
    the edge closes it. The worker keeps every position the session's cache held: a second
    session sending all of them and one more copies them and answers the local run's token;
    a session that expires is kept too."""
    import time

    from brokerutil import in_process_worker
    from test_tree import _greedy_tree_case, _next_local

    from broker.wire.crypto import NullCipher
    from broker.wire.session_protocol import new_close_key, open_step_reply, seal_step

    k = 1
    _segment(tiny_llama)  # skips where the row kernel does not run
    prompt, greedy, tree = _greedy_tree_case(tiny_llama)
    greedy = greedy + [_next_local(tiny_llama, prompt + greedy)]
    greedy = greedy + [_next_local(tiny_llama, prompt + greedy)]  # g0..g5
    wrong = next(t for t in range(5, 60) if t != greedy[5])
    edge = ModelSegment.load(tiny_llama, 0, k)

    with in_process_worker() as served:
        worker = served.worker

        def step(sid: str, n: int, pos: int, rows: torch.Tensor, **kw):
            frames = served.send(sid, "step", n, k, frames=seal_step(NullCipher(), sid, n, pos, rows, "fp32", **kw))
            return open_step_reply(NullCipher(), sid, n, frames)

        key = new_close_key()
        served.send("s1", "open", 0, k, served.opener(key))
        ec = edge.new_cache()
        frame = lambda ids, **kw: edge(torch.tensor([ids]), ec, logits="none", **kw).hidden  # noqa: E731
        assert step("s1", 0, 0, frame(prompt)).token == greedy[0]
        pos = len(prompt)
        got = step("s1", 1, pos, frame([greedy[0], *tree.tokens], tree=tree), draft=list(tree.tokens),
                   tree=list(tree.parents))
        assert (got.accepted, got.token) == (2, greedy[3])
        ec.keep(pos, [0, *got.path])
        # g3 pending, g4 right, then a wrong guess
        got = step("s1", 2, got.pos, frame([greedy[3], greedy[4], wrong]), draft=[greedy[4], wrong])
        assert (got.accepted, got.token) == (1, greedy[5])
        ec.crop(got.pos)
        got = step("s1", 3, got.pos, frame([greedy[5]]))
        held = got.pos  # the prompt and g0..g5
        assert held == len(prompt) + 6 and worker.sessions.get("s1").digests is not None
        served.send("s1", "close", 4, k, {"close_key": key})
        assert worker.failed == 0 and len(worker.prefixes) == 1  # the prompt's entry gave way to the session's

        conversation = prompt + greedy[:6] + [got.token]
        served.send("s2", "open", 0, k, served.opener(new_close_key()))
        fresh = edge(torch.tensor([conversation]), edge.new_cache(), logits="none").hidden
        answer = step("s2", 0, 0, fresh)
        assert worker.prefixes.reused_positions == held
        assert answer.token == _next_local(tiny_llama, conversation) and worker.failed == 0

        served.send("s3", "open", 0, k, served.opener(new_close_key()))
        step("s3", 0, 0, edge(torch.tensor([[40, 41, 42, 43, 44]]), edge.new_cache(), logits="none").hidden)
        before = len(worker.prefixes)
        assert worker.sessions.expire(now=time.monotonic() + 10 * worker.sessions.idle_ttl_s) == ["s2", "s3"]
        assert len(worker.prefixes) == before  # s2 and s3 extend the entries they began with
        assert worker.prefixes.longest(row_digests(fresh, k), fresh.shape[1])[1] == fresh.shape[1]


@pytest.mark.parametrize(("tree_nodes", "pipelined"), [(0, False), (0, True), (10, False)])
def test_a_split_generation_with_drafts_keeps_its_answer_and_what_the_cloud_got_of_it(tiny_llama, tree_nodes,
                                                                                     pipelined):
    """At a split the edge keeps a generation's positions with their boundary activations, whatever
    drafting did to its cache (chains of guesses, pipelined frames, token trees, rejected guesses
    cropped): the next turn copies prompt and answer, the rest of the model gets the kept
    activations, and every token is the local run's."""
    from edge_worker.backends import LocalBackend
    from edge_worker.generation import EdgeGenerator
    from edge_worker.mini_llm import MiniLLMHandler
    from partition.tokens import eos_token_ids

    _segment(tiny_llama)  # skips where the row kernel does not run
    tokenizer = tiny_llama.load_tokenizer()
    eos = eos_token_ids(tiny_llama, tokenizer)
    n, k = tiny_llama.n_layers, 2
    local = EdgeGenerator(ModelSegment.load(tiny_llama, 0, n), None, tokenizer, eos, "local")
    mini = MiniLLMHandler(model="int8", threshold=0.0, max_draft=4, adaptive=False, tree_nodes=tree_nodes,
                          pipeline=pipelined)
    edge = ModelSegment.load(tiny_llama, 0, k)
    settings = mini.settings(tiny_llama, edge, tokenizer)
    prefixes = PrefixCache(64 * 2**20)
    prompt = tokenizer("abcabcabc abc abcabc")["input_ids"]
    turns = [prompt, None]
    answers = []
    for turn in range(2):
        backend = LocalBackend(ModelSegment.load(tiny_llama, k, n, embed=False), pipelined=pipelined)
        ids = turns[turn] or prompt + answers[0] + [7, 8]
        got = EdgeGenerator(edge, backend, tokenizer, eos, "hybrid", mini=settings, prefixes=prefixes).generate(ids, 20)
        assert got.token_ids == local.generate(ids, 20).token_ids
        assert got.tokens_drafted > 0
        answers.append(got.token_ids)
    assert len(answers[0]) == 20  # no end of sequence: every generated token but the last was fed back
    assert prefixes.reused_positions == len(prompt) + 19


def test_every_kept_prefix_is_found_through_adds_extensions_and_evictions():
    """Many short sequences sharing beginnings, under a budget that evicts at nearly every add:
    after each add, the longest cached prefix of any sequence is what a search of every entry
    finds, the entry named holds it, and nothing evicted is found (the index is kept by family of
    entries with the same first row, and looked up by bisection)."""
    import random

    from partition.kv_cache import SegmentKVCache

    def cache_of(n: int) -> SegmentKVCache:
        cache = SegmentKVCache()
        cache.update(torch.zeros(1, 1, n, 2), torch.zeros(1, 1, n, 2), 0)
        cache.advance(n)
        return cache

    rng = random.Random(0)
    pc = PrefixCache(16 * 40)  # 40 positions of this cache's 16 bytes per position
    for _ in range(600):
        ids = [rng.randrange(3) for _ in range(rng.randrange(1, 12))]
        pc.add(row_digests(torch.tensor([ids]), "s"), cache_of(len(ids)))
        assert pc.nbytes <= pc.limit_bytes and pc.nbytes == sum(e.nbytes for e in pc._entries.values())
        for _ in range(5):
            query = row_digests(torch.tensor([[rng.randrange(3) for _ in range(rng.randrange(1, 14))]]), "s")
            most = rng.randrange(1, 15)
            best = 0
            for entry in pc._entries.values():
                shared = 0
                while shared < min(len(entry.digests), len(query), most) and entry.digests[shared] == query[shared]:
                    shared += 1
                best = max(best, shared)
            entry_id, n = pc.longest(query, most)
            assert n == best
            if n:
                assert pc._entries[entry_id].digests[n - 1] == query[n - 1]
        live = {d for e in pc._entries.values() for d in e.digests}
        assert set(pc._index) == live  # every kept position findable, nothing evicted


def test_continuations_find_the_worker_of_the_generation_a_prompt_continues():
    from partition.prefix_cache import Continuations

    where = Continuations(limit=8)
    system = [1, 2, 3, 4]
    where.add(system + [10, 11], [20, 21, 22], "w1", 0)
    assert where.worker_for(system + [10, 11, 20, 21, 22, 5], 0) == "w1"  # the next turn
    assert where.worker_for(system + [10, 11, 20, 9], 0) == "w1"  # part of the answer
    assert where.worker_for(system + [10, 11, 6], 0) is None  # the prompt alone is not indexed
    assert where.worker_for(system + [10, 11, 20, 21], 3) is None  # another split
    where.add(system + [12], [30, 31, 32, 33, 34, 35, 36, 37, 38], "w2", 0)  # over the limit: w1's go
    assert len(where) == 8 and where.worker_for(system + [10, 11, 20, 21, 22], 0) is None
    assert where.worker_for(system + [12, 30, 31, 32, 33, 34, 35, 36, 37, 38], 0) == "w2"


@pytest.mark.integration
def test_a_conversations_next_turn_goes_to_the_worker_that_holds_its_earlier_turns(tiny_llama):
    """Two real workers: a conversation's next turn asks the broker for the worker its first turn
    ran on, which copies the whole first turn from its prefix cache, although placement by load
    would have sent it to the other worker; an engine that forgot where it ran goes by load."""
    from brokerutil import wait_for_status

    from broker.wire.crypto import load_api_keys
    from cli.cluster import LocalCluster
    from edge_worker.cloud_client import CloudClient
    from edge_worker.config import EdgeConfig
    from edge_worker.engine import EdgeEngine
    from partition.prefix_cache import Continuations
    from partition.sampling import SamplingParams

    prompt = SYSTEM + [50, 51, 52]
    with LocalCluster(model="tiny-llama", worker_threads=1) as cluster:
        cluster.start_broker()
        cluster.add_worker()
        cluster.add_worker()
        cluster.wait_for_workers(2, timeout_s=60)
        key = sorted(load_api_keys(cluster.keys_dir / "api_keys.txt"))[0]
        settings = EdgeConfig(model="tiny-llama", broker=cluster.endpoint, keys_dir=cluster.keys_dir, api_key=key,
                              mini="none", dynamic=False, force_cloud=True)
        client = CloudClient(api_key=key, broker=cluster.endpoint, keys_dir=cluster.keys_dir, request_timeout_s=10)
        holders = []
        with EdgeEngine("tiny-llama", settings) as engine:
            params = engine.params(ignore_eos=True, max_new_tokens=12)
            first = engine.generate(prompt, params)
            (home,) = first.workers_used
            # A session held open on the conversation's worker: by load, new sessions go to the other.
            edge = engine.segment(0, 0, head=False)
            for _ in range(1):
                holder = client.session(tiny_llama.model_id, 0, tiny_llama.hidden_size)
                holder.near = home
                holder.start(SamplingParams())
                holder.step(edge(torch.tensor([[5, 6, 7]]), edge.new_cache(), logits="none").hidden, 0)
                holders.append(holder)
            turn = prompt + first.token_ids + [7, 8]
            second = engine.generate(turn, params)
            assert second.workers_used == [home]
            engine.continuations = Continuations()  # forgotten: placement by load
            elsewhere = engine.generate(turn, params)
            assert elsewhere.workers_used != [home] and elsewhere.token_ids == second.token_ids
        for holder in holders:
            holder.close()
        client.close()
        workers = wait_for_status(cluster, lambda st: len(st["workers"]) == 2 and st["counters"].get("placed_near") == 2
                                  and any(w.get("prefix_reused") for w in st["workers"]),
                                  "the turn placed near, its reuse in the status", timeout_s=30)["workers"]
        reused = {w["worker_id"]: w.get("prefix_reused", 0) for w in workers}
        # The turn copied the first turn's prompt and all but the last of its 12 tokens; the
        # other worker had nothing of it.
        assert reused[home] == len(prompt) + 11
        assert sum(reused.values()) == reused[home]


def test_a_step_that_fails_after_its_pass_fails_alone_and_the_others_are_answered(tiny_llama):
    """Two prompts in one pass; keeping the first one's positions for reuse fails (as a cache
    out of memory would): that step gets an error, its session's cache and digests are as before
    the step, and the other step of the pass gets its answer, the token its prompt gives alone."""
    import time

    from brokerutil import in_process_worker
    from test_tree import _next_local

    from broker.wire.crypto import NullCipher
    from broker.wire.session_protocol import new_close_key, open_step_reply, seal_step
    from broker.worker_api import Job

    _segment(tiny_llama)
    prompts = {"a": [50, 51, 52, 53], "c": [7, 8, 9, 10, 11]}
    embed = ModelSegment.load(tiny_llama, 0, 0)
    with in_process_worker() as served:
        worker = served.worker
        for sid in prompts:
            served.send(sid, "open", 0, 0, served.opener(new_close_key()))
        keep = worker.prefixes.add

        def add(digests, cache, *args):
            if cache is worker.sessions.get("a").cache:
                raise MemoryError("no room for the prompt's positions")
            return keep(digests, cache, *args)

        worker.prefixes.add = add
        worker.handle_many([Job(request_id=f"{sid}-step", session_id=sid, model_id=tiny_llama.model_id, step=1,
                                attempt=1, kind="step", layer_lo=0, deadline_ms=5000, extra={},
                                received_at=time.monotonic(),
                                frames=seal_step(NullCipher(), sid, 1, 0, embed(torch.tensor([ids]), embed.new_cache(),
                                                                               logits="none").hidden, "fp32"))
                            for sid, ids in prompts.items()])  # fmt: skip
        assert worker.failed == 1 and ("a", 1) not in served.replies
        a = worker.sessions.get("a")
        assert a.cache.length == 0 and not a.digests
        assert open_step_reply(NullCipher(), "c", 1, served.replies["c", 1]).token == _next_local(tiny_llama,
                                                                                                   prompts["c"])


def test_prompts_arriving_together_compute_their_shared_beginning_once(tiny_llama):
    """Three prompts reach a cold worker in one gather, two sharing a 40-position beginning: the
    first computes it, the second waits one pass and copies it, the third (nothing shared) runs
    beside the first; every answer is the token each prompt gives alone."""
    import time

    from brokerutil import in_process_worker
    from test_tree import _next_local

    from broker.wire.crypto import NullCipher
    from broker.wire.session_protocol import new_close_key, open_step_reply, seal_step
    from broker.worker_api import Job

    _segment(tiny_llama)  # skips where the row kernel does not run
    prompts = {"a": SYSTEM + [50, 51, 52], "b": SYSTEM + [60, 61], "c": [7, 8, 9, 10, 11]}
    embed = ModelSegment.load(tiny_llama, 0, 0)  # cloud-only: the edge sends the embeddings
    with in_process_worker() as served:
        worker = served.worker
        for sid in prompts:
            served.send(sid, "open", 0, 0, served.opener(new_close_key()))
        jobs = [Job(request_id=f"{sid}-step", session_id=sid, model_id=tiny_llama.model_id, step=1, attempt=1,
                    kind="step", layer_lo=0, deadline_ms=5000, extra={}, received_at=time.monotonic(),
                    frames=seal_step(NullCipher(), sid, 1, 0, embed(torch.tensor([ids]), embed.new_cache(),
                                                                   logits="none").hidden, "fp32"))
                 for sid, ids in prompts.items()]
        passes = 0
        worker.handle_many(jobs)  # as the serve loop: one gather, then passes while prompts wait
        passes += 1
        assert set(served.replies) >= {("a", 1), ("c", 1)} and ("b", 1) not in served.replies
        while worker._prefilling:
            carry, worker._prefilling = worker._prefilling, []
            worker.handle_many([], carry)
            passes += 1
        assert passes == 2 and not worker._after_prompt and worker.failed == 0
        assert worker.prefixes.reused_positions == len(SYSTEM)  # b copied a's beginning
        for sid, ids in prompts.items():
            assert open_step_reply(NullCipher(), sid, 1, served.replies[sid, 1]).token == _next_local(tiny_llama, ids)
