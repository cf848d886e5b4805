"""Packed forward passes: a session's numbers do not depend on what else is in the batch."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from partition.batching import PACK_MAX_ROWS, packed_linear, row_range
from partition.segment import ModelSegment, StepInput


def test_packed_products_give_each_row_what_it_gets_alone():
    torch.manual_seed(0)
    for n, k in ((576, 576), (1536, 576), (64, 1536)):
        layer = torch.nn.Linear(k, n)
        lo, hi = row_range(layer.weight, layer.bias)
        assert 1 <= lo <= 2 <= hi
        x = torch.randn(40, k)
        alone = torch.cat([packed_linear(x[i:i + 1], layer) for i in range(40)])
        for rows in (1, 2, 3, 5, 8, 15, 16, 17, 31, 40):
            assert torch.equal(packed_linear(x[:rows], layer), alone[:rows]), (n, k, rows)
        # Close to the plain product (the kernels differ in the last bits only).
        torch.testing.assert_close(packed_linear(x, layer), layer(x), rtol=1e-4, atol=1e-5)


def _steps(source, seg, specs, seed=0):
    """Frames for ``seg`` (no embedding) after a random prefix: (start_layer, past, rows, logits)."""
    gen = torch.Generator().manual_seed(seed)
    steps = []
    for start, past, rows, logits in specs:
        cache = seg.new_cache()
        if past:
            seg(torch.randn(1, past, source.hidden_size, generator=gen), cache, start_layer=start, logits="none")
        steps.append(StepInput(torch.randn(1, rows, source.hidden_size, generator=gen), cache, start, logits))
    return steps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_packed_batch_of_sessions_equals_each_session_alone(tiny_llama, dtype):
    """In float32 (a CPU worker's dtype), bfloat16 (a GPU worker's default) and float16;
    ``bench/gpu_check.sh`` checks the GPU's dtypes on the GPU."""
    seg = ModelSegment.load(tiny_llama, 0, tiny_llama.n_layers, embed=False, head=True, dtype=dtype)
    assert seg.packable
    # Different splits, cache lengths, decode rows, verification frames and a prefill, at once.
    specs = [(0, 5, 1, "last"), (1, 9, 1, "last"), (2, 0, 4, "all"), (4, 3, 1, "last"), (3, 12, 3, 3),
             (0, 30, 1, "last"), (2, 2, PACK_MAX_ROWS + 4, "last"), (1, 0, 7, "none")]
    together = _steps(tiny_llama, seg, specs)
    alone = [StepInput(s.x, copy.deepcopy(s.cache), s.start_layer, s.logits) for s in together]
    outs = seg.forward_many(together)
    for step, out, ref_step in zip(together, outs, alone, strict=True):
        ref = seg(ref_step.x, ref_step.cache, start_layer=ref_step.start_layer, logits=ref_step.logits)
        assert torch.equal(out.hidden, ref.hidden)
        assert (out.logits is None) == (ref.logits is None)
        if ref.logits is not None:
            assert torch.equal(out.logits, ref.logits)
        assert step.cache.length == ref_step.cache.length
    # Every subset and order gives the same numbers too.
    again = _steps(tiny_llama, seg, specs)
    outs_again = seg.forward_many([again[5], again[0], again[3]])
    assert torch.equal(outs_again[0].logits, outs[5].logits) and torch.equal(outs_again[1].logits, outs[0].logits)


def test_one_session_may_not_appear_twice_in_a_batch(tiny_llama):
    seg = ModelSegment.load(tiny_llama, 0, tiny_llama.n_layers, embed=False, head=True)
    cache = seg.new_cache()
    x = torch.randn(1, 1, tiny_llama.hidden_size)
    with pytest.raises(ValueError, match="one step per cache"):
        seg.forward_many([StepInput(x, cache), StepInput(x, cache)])


def greedy_batched(edge, cloud, prompts: list[list[int]], n: int, concurrency: int) -> list[list[float]]:
    """Greedy generation of ``n`` tokens for each prompt, ``concurrency`` sessions in the cloud
    segment's batch at a time (each session's prefill alone, its decode steps packed): per
    prompt, each token and its logit (equal floats mean equal numbers, not just equal argmaxes)."""
    results: list[list[float]] = []
    for lo in range(0, len(prompts), concurrency):
        group = prompts[lo:lo + concurrency]
        edge_caches = [edge.new_cache() for _ in group]
        cloud_caches = [cloud.new_cache() for _ in group]
        inputs = [torch.tensor([ids]) for ids in group]
        tokens: list[list[int]] = [[] for _ in group]
        top: list[list[float]] = [[] for _ in group]
        for _ in range(n):
            hidden = edge.forward_many([StepInput(x, c, logits="none") for x, c in zip(inputs, edge_caches, strict=True)])
            outs = cloud.forward_many([StepInput(h.hidden, c) for h, c in zip(hidden, cloud_caches, strict=True)])
            for i, out in enumerate(outs):
                tokens[i].append(int(out.logits[0, -1].argmax()))
                top[i] += [tokens[i][-1], float(out.logits[0, -1].max())]
            inputs = [torch.tensor([[t[-1]]]) for t in tokens]
        results.extend(top)
    return results


@pytest.mark.real_model
def test_smollm2_greedy_text_of_100_prompts_is_the_same_at_every_concurrency(smollm2):
    from partition.tokens import encode_prompt

    tokenizer = smollm2.load_tokenizer()
    subjects = ["the sea", "a violin", "bread", "rain", "a library", "winter", "bees", "a bridge", "chess",
                "the moon"]
    asks = ["Describe {} in one sentence.", "Write a haiku about {}.", "Why do people like {}?",
            "Give two facts about {}.", "What rhymes with {}?", "Tell a joke about {}.",
            "Explain {} to a child.", "List three words linked to {}.", "Is {} noisy?", "Draw {} in words."]
    prompts = [encode_prompt(tokenizer, ask.format(s)) for ask in asks for s in subjects]
    assert len(prompts) == 100
    edge = ModelSegment.load(smollm2, 0, 15)
    cloud = ModelSegment.load(smollm2, 15, smollm2.n_layers, embed=False)
    alone = greedy_batched(edge, cloud, prompts, 6, 1)
    assert len({tuple(t) for t in alone}) > 50, "the prompts should give different texts"
    for concurrency in (4, 16):
        assert greedy_batched(edge, cloud, prompts, 6, concurrency) == alone, concurrency


@pytest.mark.real_model
def test_smollm2_in_bfloat16_gives_each_session_its_numbers_alone(smollm2):
    """bfloat16, a GPU worker's default, on this CPU. MKL's one-row kernel sums SmolLM2's down
    product in another order than its kernel of two rows; rounding to bfloat16 hides that on most
    rows, so a probe that compared two random rows per size took them for one kernel, and a
    session's numbers changed with its neighbours from layer 11 on."""
    from partition.tokens import encode_prompt

    tokenizer = smollm2.load_tokenizer()
    prompts = [encode_prompt(tokenizer, f"Name {n} animals that live in {place}.")
               for n in ("two", "three", "four") for place in ("the sea", "a forest", "the desert", "a city")]
    edge = ModelSegment.load(smollm2, 0, 15, dtype=torch.bfloat16)
    cloud = ModelSegment.load(smollm2, 15, smollm2.n_layers, embed=False, dtype=torch.bfloat16)
    alone = greedy_batched(edge, cloud, prompts, 4, 1)
    for concurrency in (3, 12):
        assert greedy_batched(edge, cloud, prompts, 4, concurrency) == alone, concurrency


@pytest.mark.integration
def test_a_worker_batches_concurrent_sessions_and_each_gets_the_text_it_gets_alone(tiny_llama):
    import threading
    import time

    from broker.wire.crypto import load_api_keys
    from cli.cluster import LocalCluster
    from edge_worker.config import EdgeConfig
    from edge_worker.engine import EdgeEngine

    prompts = [[(13 * i + 7 * j) % 250 + 3 for j in range(5 + i)] for i in range(8)]
    with LocalCluster(model="tiny-llama", worker_threads=1, heartbeat_s=0.3) as cluster:
        cluster.start_broker()
        cluster.add_worker()
        cluster.wait_for_workers(1, timeout_s=60)
        key = sorted(load_api_keys(cluster.keys_dir / "api_keys.txt"))[0]
        settings = EdgeConfig(model="tiny-llama", force_cloud=True, broker=cluster.endpoint,
                              keys_dir=cluster.keys_dir, api_key=key, max_new_tokens=120)
        with EdgeEngine("tiny-llama", settings) as engine:
            params = engine.params(ignore_eos=True)
            alone = [engine.generate(p, params).token_ids for p in prompts]
            batches: list[float] = []  # steps per pass, as each heartbeat reported it
            caches: list[int] = []  # KV-cache bytes, likewise
            done = threading.Event()

            def watch() -> None:
                while not done.is_set():
                    for w in engine.client.status()["workers"]:
                        batches.append(float(w["mean_batch"]))
                        caches.append(int(w["cache_bytes"]))
                    done.wait(0.1)

            watcher = threading.Thread(target=watch)
            watcher.start()
            together = [r.token_ids for r in engine.generate_many(prompts, params)]
            # The heartbeat that covers the run's last passes may still be on its way.
            deadline = time.monotonic() + 10
            while not (batches and max(batches) > 1.0) and time.monotonic() < deadline:
                done.wait(0.1)
            done.set()
            watcher.join()
        status = cluster.status()["workers"][0]
    assert together == alone
    assert len({tuple(t) for t in alone}) == len(prompts)
    assert max(batches) > 1.0, batches  # some forward passes served several sessions at once
    assert status["max_batch"] == 16 and max(caches) > 0


@pytest.mark.integration
def test_a_bfloat16_worker_gives_what_its_layers_give_in_process(tiny_llama):
    """``--dtype bfloat16`` (a GPU worker's default) on this CPU: the cloud-only tokens of several
    prompts, one at a time and batched, equal the engine's local run of every layer with
    ``--dtype bfloat16`` (the activations cross the wire in bf16, the dtype the worker computes
    in), and differ from float32's somewhere (the option took effect)."""
    from broker.wire.crypto import load_api_keys
    from cli.cluster import LocalCluster
    from edge_worker.config import EdgeConfig
    from edge_worker.engine import EdgeEngine

    prompts = [[(11 * i + 5 * j) % 250 + 3 for j in range(4 + i)] for i in range(6)]

    def on_this_device(dtype: str) -> list[list[int]]:
        """Every layer in this process, in ``dtype`` (the engine's --dtype)."""
        with EdgeEngine("tiny-llama", EdgeConfig(model="tiny-llama", force_local=True, dtype=dtype)) as engine:
            params = engine.params(ignore_eos=True, max_new_tokens=40)
            return [engine.generate(p, params).token_ids for p in prompts]

    with LocalCluster(model="tiny-llama", worker_threads=1) as cluster:
        cluster.start_broker()
        worker = cluster.add_worker(extra_args=("--dtype", "bfloat16"))
        cluster.wait_for_workers(1, timeout_s=60)
        key = sorted(load_api_keys(cluster.keys_dir / "api_keys.txt"))[0]
        settings = EdgeConfig(model="tiny-llama", force_cloud=True, broker=cluster.endpoint, wire_dtype="bf16",
                              keys_dir=cluster.keys_dir, api_key=key, max_new_tokens=40)
        with EdgeEngine("tiny-llama", settings) as engine:
            params = engine.params(ignore_eos=True)
            alone = [engine.generate(p, params).token_ids for p in prompts]
            together = [r.token_ids for r in engine.generate_many(prompts, params)]
        assert "in bfloat16" in worker.log_tail(10**6)
    expected = on_this_device("bfloat16")
    assert alone == expected and together == expected
    assert expected != on_this_device("float32")


def test_the_row_kernel_sums_each_row_alike_in_any_call_and_close_to_torch():
    from partition import rowkernel

    if rowkernel.kernel() is None:
        pytest.skip(f"the row kernel does not run here: {rowkernel.reason()}")
    gen = torch.Generator().manual_seed(1)
    for n, k in ((576, 576), (3, 7), (49, 1536), (5, 33)):  # whole blocks, and tails of N and K
        w = torch.randn(n, k, generator=gen)
        b = torch.randn(n, generator=gen)
        x = torch.randn(70, k, generator=gen)
        alone = torch.cat([rowkernel.linear(x[i:i + 1], w, b) for i in range(70)])
        for rows in (2, 3, 4, 5, 8, 16, 19, 37, 70):  # every block shape, the many-row one from 16 rows
            assert torch.equal(rowkernel.linear(x[:rows], w, b), alone[:rows]), (n, k, rows)
        torch.testing.assert_close(alone, torch.nn.functional.linear(x, w, b), rtol=1e-4, atol=1e-4)
        # The thread count splits the weights' rows, never a sum.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            assert torch.equal(rowkernel.linear(x, w, b), alone)
        finally:
            torch.set_num_threads(threads)


def test_where_a_compiler_and_avx2_are_found_the_kernel_builds_and_passes_its_load_checks(monkeypatch):
    """A kernel that failed its checks would leave packed products on the tiles and the row
    kernel's tests skipped: on a machine that can build it, that is a failure."""
    from partition import rowkernel

    if rowkernel._compiler() is None or rowkernel._capability() is None:
        pytest.skip("no C compiler or no AVX2 here")
    monkeypatch.delenv(rowkernel.SWITCH, raising=False)
    monkeypatch.setattr(rowkernel, "_state", {})
    assert rowkernel.kernel() is not None, rowkernel.reason()
    assert {"fn8", "attend", "layer"} <= set(rowkernel._state)


def test_packed_products_use_the_tiles_when_the_row_kernel_is_switched_off(monkeypatch):
    from partition import rowkernel

    monkeypatch.setattr(rowkernel, "_state", {})
    monkeypatch.setenv(rowkernel.SWITCH, "off")
    assert rowkernel.kernel() is None and rowkernel.SWITCH in rowkernel.reason()
    layer = torch.nn.Linear(64, 48)
    x = torch.randn(9, 64)
    alone = torch.cat([packed_linear(x[i:i + 1], layer) for i in range(9)])
    assert torch.equal(packed_linear(x, layer), alone)


def test_the_session_table_refuses_what_would_outgrow_its_cache_memory():
    from broker.errors import CacheLimitExceeded
    from cloud_worker.sessions import SessionTable

    table = SessionTable(max_sessions=8, idle_ttl_s=60, max_cache_bytes=1 << 20)
    table.reserve(1 << 20, "a new session")  # exactly the limit fits
    with pytest.raises(CacheLimitExceeded, match="max-cache-mb"):
        table.reserve((1 << 20) + 1, "a new session")
    SessionTable(8, 60).reserve(1 << 40, "anything")  # no limit


def test_the_oldest_sessions_growth_preempts_the_youngest_and_a_session_that_can_never_fit_is_not_retried():
    """Sessions that each need to grow while the others hold the rest would all be refused until
    their deadlines: the oldest goes on, the youngest others end until its growth fits."""
    from broker.errors import Busy, CacheLimitExceeded
    from cloud_worker.sessions import Session, SessionTable
    from partition.sampling import SamplingParams

    mib = 1 << 20

    class Held:  # a cache of a fixed size
        def __init__(self, nbytes: int) -> None:
            self.bytes = nbytes

        def nbytes(self) -> int:
            return self.bytes

    table = SessionTable(max_sessions=8, idle_ttl_s=60, max_cache_bytes=3 * mib)
    sessions = []
    for i in range(3):
        session = Session(f"s{i}", 0, None, SamplingParams(), Held(mib), opened_at=float(i))  # type: ignore[arg-type]
        table.add(session)
        sessions.append(session)
    first, second, third = sessions
    # The youngest's growth, or the middle one's, does not fit: busy, nothing ends.
    for session in (third, second):
        with pytest.raises(Busy, match="max-cache-mb"):
            table.reserve(mib, "a step", session)
    assert len(table) == 3
    # The oldest's does: the youngest ends, and only as many as needed.
    assert table.reserve(mib, "a step", first) == ["s2"]
    assert table.ids() == ["s0", "s1"] and table.ended("s2") == "preempted"
    first.cache.bytes += mib  # it grew: 3 of 3 MiB held
    # A growth that would not fit even alone: never here, and nobody is ended for it.
    with pytest.raises(CacheLimitExceeded):
        table.reserve(2 * mib, "a step", first)
    assert len(table) == 2
    assert table.reserve(mib, "a step", first) == ["s1"]
    # A new session bigger than the whole limit can never open: not worth retrying.
    with pytest.raises(CacheLimitExceeded, match="larger --max-cache-mb"):
        table.reserve(4 * mib, "a new session")
    with pytest.raises(Busy):
        table.reserve(2 * mib, "a new session")  # fits an emptier worker: busy


@contextlib.contextmanager
def _cache_limited_cluster(source, first_caches: float):
    """A broker and one worker of ``source`` whose --max-cache-mb holds ``first_caches`` sessions'
    first KV caches (256 positions of every layer); yields the cluster, the worker, that limit in
    MiB and an edge config for it: cloud-only, 300 tokens, a 4 s step deadline, and fp32 on the wire, so that the
    cloud computes exactly what the edge does and 300 tokens of a random model can be compared
    with a local run token for token."""
    from broker.wire.crypto import load_api_keys
    from cli.cluster import LocalCluster
    from edge_worker.config import EdgeConfig
    from partition.profile import kv_bytes_per_token_per_layer

    limit_mb = first_caches * 256 * source.n_layers * kv_bytes_per_token_per_layer(source.config) / 2**20
    with LocalCluster(model=source.name, worker_threads=1, heartbeat_s=0.3) as cluster:
        cluster.start_broker()
        worker = cluster.add_worker(extra_args=("--max-cache-mb", f"{limit_mb:.4f}"))
        cluster.wait_for_workers(1, timeout_s=60)
        key = sorted(load_api_keys(cluster.keys_dir / "api_keys.txt"))[0]
        yield cluster, worker, limit_mb, EdgeConfig(
            model=source.name, force_cloud=True, broker=cluster.endpoint, keys_dir=cluster.keys_dir, api_key=key,
            max_new_tokens=300, step_deadline_s=4.0, wire_dtype="fp32")


@pytest.mark.integration
def test_a_worker_at_its_cache_memory_limit_answers_busy_and_the_edge_finishes_locally(tiny_llama):
    from dataclasses import replace

    from broker.errors import CacheLimitExceeded
    from edge_worker.config import EdgeConfig
    from edge_worker.engine import EdgeEngine

    prompt = [5, 6, 7, 8]
    # Room for one session's first cache, not for its doubling.
    with _cache_limited_cluster(tiny_llama, 1.5) as (cluster, worker, limit_mb, base):
        with EdgeEngine("tiny-llama", base) as engine:
            params = engine.params(ignore_eos=True)
            result = engine.generate(prompt, params)  # past position 256 the worker says busy
            # A 400-token prompt needs 512 positions from its first step: refused, all of it runs here.
            long_prompt = [j % 250 + 3 for j in range(400)]
            refused = engine.generate(long_prompt, engine.params(ignore_eos=True, max_new_tokens=3))
        with EdgeEngine("tiny-llama", replace(base, fallback_local=False)) as engine:
            with pytest.raises(CacheLimitExceeded, match="max-cache-mb"):
                engine.generate(prompt, engine.params(ignore_eos=True))
        status = cluster.status()["workers"][0]
        refusals = worker.log_tail(200_000).count("cannot go on here")
    with EdgeEngine("tiny-llama", EdgeConfig(model="tiny-llama", force_local=True)) as local:
        expected = local.generate(prompt, local.params(max_new_tokens=300, ignore_eos=True)).token_ids
    assert result.token_ids == expected
    assert result.fallback_at_step is not None and 250 <= result.fallback_at_step <= 256
    assert status["cache_limit_bytes"] == int(limit_mb * 2**20)
    # The JSON says what ran: every layer here, though the split was the cloud's.
    assert refused.fallback_at_step == 0 and refused.mode == "local" and refused.split == 0
    # Each of the three generations was refused once, not retried until its deadline.
    assert refusals == 3


@pytest.mark.integration
def test_two_sessions_outgrowing_the_cache_limit_together_both_finish_in_the_cloud(tiny_llama):
    """Two sessions fill --max-cache-mb and both need to grow at the same position: the oldest
    preempts the other, which reopens, waits for room and replays. Both finish in the cloud with
    the fallback off (before, each was refused until its retries ran out)."""
    from dataclasses import replace

    from edge_worker.config import EdgeConfig
    from edge_worker.engine import EdgeEngine

    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    # Two first caches fit, not a third: neither can double beside the other.
    with _cache_limited_cluster(tiny_llama, 2.5) as (_, worker, _, base):
        with EdgeEngine("tiny-llama", replace(base, fallback_local=False)) as engine:
            results = engine.generate_many(prompts, engine.params(ignore_eos=True))
        log = worker.log_tail(200_000)
    with EdgeEngine("tiny-llama", EdgeConfig(model="tiny-llama", force_local=True)) as local:
        expected = [local.generate(p, local.params(max_new_tokens=300, ignore_eos=True)).token_ids for p in prompts]
    assert [r.token_ids for r in results] == expected
    assert all(r.fallback_at_step is None for r in results)
    assert "the oldest here, can grow within --max-cache-mb" in log


def test_a_long_frame_runs_as_its_chunks_beside_other_steps_and_alone_alike(tiny_llama):
    from partition.segment import PREFILL_CHUNK, chunk_bounds

    seg = ModelSegment.load(tiny_llama, 0, tiny_llama.n_layers, embed=False, head=True)
    rows = 2 * PREFILL_CHUNK + 22
    assert chunk_bounds(rows) == [(0, 64), (64, 128), (128, rows)] and PREFILL_CHUNK == 64
    # 70 logit rows: the last 48 of the second chunk and the 22 of the third.
    specs = [(0, 3, rows, 70), (1, 5, 1, "last"), (0, 0, 3, "all")]
    together = _steps(tiny_llama, seg, specs, seed=3)
    by_hand = _steps(tiny_llama, seg, specs, seed=3)[0]
    alone = [StepInput(s.x, copy.deepcopy(s.cache), s.start_layer, s.logits) for s in together]
    outs = seg.forward_many(together)
    hidden, logits = [], []
    for a, b in chunk_bounds(rows):  # the chunks one by one, as a worker runs them
        want = max(0, b - max(a, rows - 70))
        out = seg(by_hand.x[:, a:b], by_hand.cache, start_layer=0, logits=want or "none")
        hidden.append(out.hidden)
        if out.logits is not None:
            logits.append(out.logits)
    assert torch.equal(outs[0].hidden, torch.cat(hidden, dim=1)) and torch.equal(outs[0].logits, torch.cat(logits, dim=1))
    assert outs[0].logits.shape[1] == 70 and together[0].cache.length == 3 + rows
    for step, out in zip(alone, outs, strict=True):
        ref = seg(step.x, step.cache, start_layer=step.start_layer, logits=step.logits)
        assert torch.equal(out.hidden, ref.hidden) and torch.equal(out.logits, ref.logits)


@pytest.mark.integration
def test_a_long_prompt_is_prefilled_in_chunks_between_other_sessions_decode_steps(tiny_llama):
    import threading
    import time

    from broker.wire.crypto import load_api_keys
    from cli.cluster import LocalCluster
    from edge_worker.config import EdgeConfig
    from edge_worker.engine import EdgeEngine
    from partition.segment import chunk_bounds

    long_prompt = [(7 * j) % 250 + 3 for j in range(1000)]  # 16 chunks
    assert len(chunk_bounds(len(long_prompt))) == 16
    short_prompt = [5, 6, 7]
    with LocalCluster(model="tiny-llama", worker_threads=1) as cluster:
        cluster.start_broker()
        cluster.add_worker(extra_args=("--prefix-cache-mb", "0"))  # the second long prefill is computed again
        cluster.wait_for_workers(1, timeout_s=60)
        key = sorted(load_api_keys(cluster.keys_dir / "api_keys.txt"))[0]
        settings = EdgeConfig(model="tiny-llama", force_cloud=True, broker=cluster.endpoint, keys_dir=cluster.keys_dir,
                              api_key=key, wire_dtype="fp32", mini="none")
        with EdgeEngine("tiny-llama", settings) as engine:
            params = engine.params(ignore_eos=True, max_new_tokens=400)
            short_alone = engine.generate(short_prompt, params).token_ids
            long_alone = engine.generate(long_prompt, engine.params(ignore_eos=True, max_new_tokens=8)).token_ids
            stamps: list[float] = []
            started = threading.Event()

            def on_text(_: str) -> None:
                stamps.append(time.monotonic())
                if len(stamps) == 20:
                    started.set()

            out: dict[str, list[int]] = {}
            decoder = threading.Thread(target=lambda: out.update(
                short=engine.generate(short_prompt, params, on_text=on_text).token_ids))
            decoder.start()
            assert started.wait(60)
            t0 = time.monotonic()
            first: list[float] = []
            long_result = engine.generate(long_prompt, engine.params(ignore_eos=True, max_new_tokens=8),
                                          on_text=lambda _: first.append(time.monotonic()))
            decoder.join(120)
    assert out["short"] == short_alone and long_result.token_ids == long_alone
    during = [t for t in stamps if t0 < t < first[0]]
    # The long prompt's 16 chunks ran in 16 passes, each with the decoding session's next step
    # (one pass for the whole prompt would have let through one step at most).
    assert len(during) >= 4, (len(during), first[0] - t0)


def test_a_worker_refuses_a_dispatch_for_a_model_it_does_not_hold(tiny_llama, caplog):
    import logging
    import time

    from brokerutil import running_broker

    from broker.worker_api import Job, WorkerConnection
    from cloud_worker.worker import CloudWorker, CloudWorkerConfig

    with running_broker() as broker:
        worker = CloudWorker(CloudWorkerConfig(model="tiny-llama", encryption=False, broker=broker.endpoint))
        worker.conn = WorkerConnection(broker.endpoint, worker.info)
        try:
            job = Job(request_id="r1", session_id="s1", model_id="llama-30x576@another", step=0, attempt=1,
                      kind="open", layer_lo=0, deadline_ms=5000, extra={}, frames=[], received_at=time.monotonic())
            with caplog.at_level(logging.WARNING, logger="cloud_worker.worker"):
                worker.handle_many([job])
        finally:
            worker.conn.close()
    assert worker.failed == 1 and len(worker.sessions) == 0
    assert "holds tiny-llama" in caplog.text or f"holds {tiny_llama.model_id}" in caplog.text, caplog.text


def test_a_worker_opens_each_session_id_once_and_closes_it_only_for_its_close_key(tiny_llama, tmp_path, caplog):
    import logging
    import subprocess
    import time

    from brokerutil import running_broker

    from broker.wire.crypto import generate_keypair
    from broker.wire.session_protocol import OpenParams, close_digest, new_close_key
    from broker.worker_api import Job, WorkerConnection
    from cli.cluster import ROOT, cli_command
    from cloud_worker.worker import CloudWorker, CloudWorkerConfig
    from partition.sampling import SamplingParams

    subprocess.run(cli_command("keys", "generate", str(tmp_path)), check=True, capture_output=True, cwd=ROOT)
    victim, intruder = generate_keypair().public_key, generate_keypair().public_key
    close_key = new_close_key()

    def job(request_id: str, kind: str, extra: dict) -> Job:
        return Job(request_id=request_id, session_id="s1", model_id=tiny_llama.model_id, step=0, attempt=1,
                   kind=kind, layer_lo=1, deadline_ms=5000, extra=extra, frames=[], received_at=time.monotonic())

    def opener(request_id: str, edge_pk: bytes) -> Job:
        return job(request_id, "open", OpenParams(edge_pk, SamplingParams().to_wire(), "fp32",
                                                  close_digest(close_key)).to_extra())

    with running_broker() as broker:
        worker = CloudWorker(CloudWorkerConfig(model="tiny-llama", keys_dir=tmp_path, broker=broker.endpoint))
        worker.conn = WorkerConnection(broker.endpoint, worker.info)
        caplog.set_level(logging.WARNING, logger="cloud_worker.worker")
        try:
            worker.handle_many([opener("r1", victim)])
            session = worker.sessions.get("s1")
            assert session is not None and worker.failed == 0
            # A second opener for a held id, from any key (the same one replayed, too), changes nothing.
            worker.handle_many([opener("r2", intruder), opener("r3", victim)])
            assert worker.sessions.get("s1") is session and worker.failed == 2
            assert caplog.text.count("already open here") == 2
            # A close without the key, or with another, is refused; the opener's key frees it.
            worker.handle_many([job("r4", "close", {}), job("r5", "close", {"close_key": new_close_key()})])
            assert worker.sessions.get("s1") is session and worker.failed == 4
            assert "wrong close key" in caplog.text
            worker.handle_many([job("r6", "close", {"close_key": close_key})])
            assert worker.sessions.get("s1") is None and worker.failed == 4
            # Replayed afterwards: the close finds nothing, the opener is refused (the id is spent).
            worker.handle_many([job("r7", "close", {"close_key": close_key}), opener("r8", victim)])
            assert len(worker.sessions) == 0 and worker.failed == 6
            assert "was closed: an opener for it again is refused" in caplog.text
        finally:
            worker.conn.close()


def test_the_brokers_rerun_of_an_opener_is_answered_as_before_until_a_step_uses_the_session(tiny_llama, caplog):
    """The broker runs an opener again, under the same request id, when it lost the worker that
    had it; that worker may come back and get it again. The rerun must not be refused as a second
    opener (the edge's session would die with it) and must change nothing: the same answer."""
    import logging
    import time

    from brokerutil import running_broker

    from broker.wire.crypto import NullCipher
    from broker.wire.session_protocol import OpenParams, close_digest, new_close_key, seal_step
    from broker.worker_api import Job, WorkerConnection
    from cloud_worker.worker import CloudWorker, CloudWorkerConfig
    from partition.sampling import SamplingParams

    params = OpenParams(b"", SamplingParams().to_wire(), "fp32", close_digest(new_close_key())).to_extra()

    def job(request_id: str, kind: str, attempt: int = 1, extra: dict | None = None, frames: list | None = None,
            step: int = 0) -> Job:
        return Job(request_id=request_id, session_id="s1", model_id=tiny_llama.model_id, step=step,
                   attempt=attempt, kind=kind, layer_lo=1, deadline_ms=5000, extra=params if extra is None else extra,
                   frames=frames or [], received_at=time.monotonic())

    with running_broker() as broker:
        worker = CloudWorker(CloudWorkerConfig(model="tiny-llama", broker=broker.endpoint))
        worker.conn = WorkerConnection(broker.endpoint, worker.info)
        caplog.set_level(logging.INFO, logger="cloud_worker.worker")
        try:
            first = worker._open(job("r1", "open"))
            session = worker.sessions.get("s1")
            assert session is not None
            assert worker._open(job("r1", "open", attempt=2)) == first  # the rerun: the same answer
            assert worker.sessions.get("s1") is session and worker.reopeners == 1
            assert "its opener came again (attempt 2 of request r1)" in caplog.text
            # Another request id, or the same id asking for something else, is a second opener.
            worker.handle_many([job("r2", "open"), job("r1", "open", attempt=3, extra={**params, "wire_dtype": "fp16"})])
            assert worker.failed == 2 and caplog.text.count("already open here") == 2
            # Once a step has used the session, even the same opener is refused.
            hidden = torch.randn(1, 3, tiny_llama.hidden_size)
            worker.handle_many([job("r3", "step", extra={}, frames=seal_step(NullCipher(), "s1", 1, 0, hidden, "fp32"),
                                    step=1)])
            assert worker.failed == 2 and session.cache.length == 3
            worker.handle_many([job("r1", "open", attempt=4)])
            assert worker.failed == 3 and caplog.text.count("already open here") == 3
            assert worker.sessions.get("s1") is session and worker.reopeners == 1
        finally:
            worker.conn.close()


def test_a_worker_frees_the_sessions_of_a_broker_that_was_restarted_and_skips_its_jobs(tiny_llama):
    """A restarted broker knows none of the sessions opened through the one before: their edges
    reopen, and the worker frees them at once instead of holding their caches until they idle out."""
    import time

    from brokerutil import running_broker

    from broker.wire.session_protocol import OpenParams, close_digest, new_close_key
    from broker.worker_api import Job, WorkerConnection
    from cloud_worker.worker import CloudWorker, CloudWorkerConfig
    from partition.sampling import SamplingParams

    params = OpenParams(b"", SamplingParams().to_wire(), "fp32", close_digest(new_close_key())).to_extra()

    def opener(sid: str, epoch: int) -> Job:
        return Job(request_id=f"r-{sid}", session_id=sid, model_id=tiny_llama.model_id, step=0, attempt=1,
                   kind="open", layer_lo=1, deadline_ms=5000, extra=params, frames=[], received_at=time.monotonic(),
                   broker_epoch=epoch)

    with running_broker() as broker:
        worker = CloudWorker(CloudWorkerConfig(model="tiny-llama", broker=broker.endpoint))
        worker.conn = WorkerConnection(broker.endpoint, worker.info)
        try:
            worker.handle_many([opener("old", 0)])
            worker._free_lost_sessions()  # nothing changed: nothing freed
            assert worker.sessions.ids() == ["old"]
            worker.conn.broker_epoch = 1  # what a heartbeat from a new broker process does
            served = worker.served
            worker.handle_many([opener("late", 0)])  # sent by the old broker: its answer would go nowhere
            assert worker.served == served and worker.failed == 0 and worker.sessions.get("late") is None
            worker.handle_many([opener("new", 1)])
            worker._free_lost_sessions()
            assert worker.sessions.ids() == ["new"]
            assert worker.sessions.ended("old") == "lost with the broker that opened it"
            worker._free_lost_sessions()
            assert worker.sessions.ids() == ["new"]
        finally:
            worker.conn.close()


def _one_token_steps(segment, cache, tokens):
    """Each token as a step of its own: (logits per token, hidden per token)."""
    logits, hidden = [], []
    for t in tokens:
        out = segment(torch.tensor([[t]]), cache, logits="last")
        logits.append(out.logits[0, -1])
        hidden.append(out.hidden[0, -1])
    return torch.stack(logits), torch.stack(hidden)


@pytest.mark.parametrize("fixture", ["tiny_llama", pytest.param("smollm2", marks=pytest.mark.real_model)])
def test_a_verification_frame_and_a_token_tree_give_each_row_the_bits_of_one_token_steps(fixture, request):
    """Speculative verification is exact only if a frame of several tokens computes for each row
    what decoding that token alone computes: then a draft's verification commits the main model's
    own tokens, not ones a different summation order tipped. SDPA's kernels differ in the last
    bits between the two; the row kernel's attention does not."""
    from partition import rowkernel
    from partition.tree import DraftTree

    if rowkernel.kernel() is None:
        pytest.skip(f"the row kernel does not run here: {rowkernel.reason()}")
    source = request.getfixturevalue(fixture)
    whole = ModelSegment.load(source, 0, source.n_layers)
    prompt, drafts = [3, 17, 29, 4, 8, 21, 40], [12, 5, 9, 31, 7]
    stepped, framed, treed = (whole.new_cache() for _ in range(3))
    for cache in (stepped, framed, treed):
        whole(torch.tensor([prompt]), cache, logits="none")
    expected, expected_hidden = _one_token_steps(whole, stepped, drafts)

    out = whole(torch.tensor([drafts]), framed, logits="all")
    assert torch.equal(out.logits[0], expected) and torch.equal(out.hidden[0], expected_hidden)
    # The next step on each cache: the keys and values the frame left are the steps' too.
    assert torch.equal(_one_token_steps(whole, framed, [42])[0], _one_token_steps(whole, stepped, [42])[0])

    # The chain as one branch of a tree, a sibling branch beside it: the chain's rows, bit for bit.
    tree = DraftTree(tokens=(5, 30, 9, 31, 7), parents=(-1, -1, 0, 2, 3))  # 12 -> 5 -> 9 -> 31 -> 7, and 12 -> 30
    logits = whole(torch.tensor([[12, *tree.tokens]]), treed, logits="all", tree=tree).logits[0]
    assert torch.equal(logits[[0, 1, 3, 4, 5]], expected)


def test_the_attention_kernel_gives_each_part_and_row_what_it_gets_alone_and_close_to_sdpa():
    from partition import rowkernel

    if rowkernel.kernel() is None:
        pytest.skip(f"the row kernel does not run here: {rowkernel.reason()}")
    gen = torch.Generator().manual_seed(3)
    heads, kv_heads, dim = 9, 3, 64
    # (past, rows, mask kind): a decode step, a causal frame, a sliding window, a long cache
    shapes = [(40, 1, None), (7, 5, "causal"), (30, 4, "window"), (300, 2, "causal")]

    def mask_of(past, rows, kind):
        if kind is None:
            return None
        q = torch.arange(past, past + rows).unsqueeze(1)
        k = torch.arange(past + rows).unsqueeze(0)
        allowed = (k <= q) & ((q - k < 16) if kind == "window" else True)
        return torch.zeros(rows, past + rows).masked_fill_(~allowed, torch.finfo(torch.float32).min)

    caches = [(torch.randn(1, kv_heads, 512, dim, generator=gen), torch.randn(1, kv_heads, 512, dim, generator=gen))
              for _ in shapes]
    total = sum(rows for _, rows, _ in shapes)
    q, k, v = (torch.randn(total, n, dim, generator=gen) for n in (heads, kv_heads, kv_heads))
    masks = [mask_of(*s) for s in shapes]
    together_caches = [(a.clone(), b.clone()) for a, b in caches]
    together = rowkernel.attend(q, k, v, [(kc, vc, past, rows, m) for (kc, vc), (past, rows, _), m
                                          in zip(together_caches, shapes, masks, strict=True)], 0.125)
    start = 0
    for (kc, vc), (past, rows, _), m, (tk, tv) in zip(caches, shapes, masks, together_caches, strict=True):
        end = start + rows
        alone = rowkernel.attend(q[start:end], k[start:end], v[start:end], [(kc, vc, past, rows, m)], 0.125)
        assert torch.equal(alone, together[start:end])
        assert torch.equal(kc, tk) and torch.equal(vc, tv)  # the new keys and values written in place
        keys = kc[0, :, :past + rows].repeat_interleave(heads // kv_heads, 0)
        values = vc[0, :, :past + rows].repeat_interleave(heads // kv_heads, 0)
        sdpa_mask = m if m is not None else mask_of(past, rows, "causal")
        reference = torch.nn.functional.scaled_dot_product_attention(q[start:end].transpose(0, 1), keys, values,
                                                                     attn_mask=sdpa_mask, scale=0.125)
        torch.testing.assert_close(alone, reference.transpose(0, 1), rtol=1e-4, atol=1e-5)
        start = end
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # the thread count splits rows and heads, never a sum
        again = [(a.clone(), b.clone()) for a, b in caches]
        one = rowkernel.attend(q, k, v, [(kc, vc, past, rows, m) for (kc, vc), (past, rows, _), m
                                         in zip(again, shapes, masks, strict=True)], 0.125)
        assert torch.equal(one, together)
    finally:
        torch.set_num_threads(threads)


def test_a_pipelined_frame_of_the_most_guesses_still_packs():
    from partition.batching import PACK_MAX_ROWS
    from partition.sampling_params import MAX_GROUP

    assert MAX_GROUP <= PACK_MAX_ROWS


def test_the_layers_in_one_kernel_call_give_the_bits_of_a_call_per_layer(tiny_llama, monkeypatch):
    """A pass runs the layers between two sessions' first layers in one call of the row kernel
    (``decode_layers``); one call per layer gives the same bits and caches, for sessions at
    different splits, prefills and verification frames at once. And the plan follows the weights:
    after an int8 copy replaces them, a pass computes with the copy."""
    from partition import batching, rowkernel
    from partition.quantize import quantize_segment

    if rowkernel.kernel() is None:
        pytest.skip(f"the row kernel does not run here: {rowkernel.reason()}")
    seg = ModelSegment.load(tiny_llama, 0, tiny_llama.n_layers, embed=False, head=True)
    specs = [(0, 5, 1, "last"), (1, 9, 1, "last"), (2, 0, 4, "all"), (4, 3, 1, "last"), (3, 12, 3, 3),
             (0, 30, 1, "last"), (1, 0, 7, "none")]

    def run(one_call: bool, segment: ModelSegment) -> tuple[list, list]:
        if not one_call:
            monkeypatch.setattr(batching.KernelLayers, "plan", lambda self, layers: None)
        calls = []
        real = rowkernel.decode_layers
        try:
            steps = _steps(tiny_llama, segment, specs)
            monkeypatch.setattr(rowkernel, "decode_layers", lambda *a, **k: calls.append(a[2:4]) or real(*a, **k))
            outs = segment.forward_many(steps)
        finally:
            monkeypatch.undo()
        return [(o.hidden, o.logits, s.cache.length) for o, s in zip(outs, steps, strict=True)], calls

    one, calls = run(True, seg)
    per_layer, none = run(False, seg)
    # Sessions start at layers 0 to 4 (4: the head only): a call for each stretch between them.
    assert seg.n_layers == 4 and calls == [(0, 1), (1, 2), (2, 3), (3, 4)] and not none
    for (h1, l1, n1), (h2, l2, n2) in zip(one, per_layer, strict=True):
        assert torch.equal(h1, h2) and n1 == n2 and (l1 is None) == (l2 is None)
        assert l1 is None or torch.equal(l1, l2)
    # A call the plan does not hold is refused before the kernel reads any pointer.
    plan = seg._kernel_layers.plan(seg.layers)
    cache = seg.new_cache()
    store = cache.reserve(0, torch.zeros(1, plan.dims[1], 1, plan.dims[2]), torch.zeros(1, plan.dims[1], 1, plan.dims[2]))[0]
    part = (store.keys, store.values, 0, 1, None)
    rope = (torch.ones(1, plan.dims[2]), torch.zeros(1, plan.dims[2]))
    x = torch.zeros(1, tiny_llama.hidden_size)
    for lo, hi, runs in ((0, 5, [[part]] * 5), (2, 2, []), (0, 2, [[part]]), (0, 1, [[part, part]])):
        with pytest.raises(ValueError, match="need a list of parts per layer"):
            rowkernel.decode_layers(x, plan, lo, hi, rope, runs)
    quantize_segment(seg)
    fresh = quantize_segment(ModelSegment.load(tiny_llama, 0, tiny_llama.n_layers, embed=False, head=True))
    for (h1, _, _), (h2, _, _) in zip(run(True, seg)[0], run(True, fresh)[0], strict=True):
        assert torch.equal(h1, h2)


@pytest.mark.parametrize("quantized", [False, True])
def test_the_fused_layer_kernel_computes_what_the_layer_computes_op_by_op(tiny_llama, monkeypatch, quantized):
    """A packed layer runs as one call of the row kernel (norms, rotary, products, attention,
    SiLU, residuals); switched off, the same layer runs as torch operations. The two agree to
    float rounding, for several sessions at once, a multi-row frame among them, in float32 and
    with int8 weights."""
    from partition import batching, rowkernel
    from partition.quantize import quantize_segment

    if rowkernel.kernel() is None:
        pytest.skip(f"the row kernel does not run here: {rowkernel.reason()}")

    def outputs(fused: bool) -> list[torch.Tensor]:
        seg = ModelSegment.load(tiny_llama, 0, tiny_llama.n_layers)
        if quantized:
            quantize_segment(seg)
        if not fused:
            monkeypatch.setattr(batching, "fused_weights", lambda layer: None)
        try:
            assert (batching.fused_weights(seg.layers[0]) is not None) == fused
            caches = [seg.new_cache() for _ in range(3)]
            for i, c in enumerate(caches):
                seg(torch.tensor([[3 + i, 17, 29, 4 + i]]), c, logits="none")
            steps = [StepInput(torch.tensor([[12]]), caches[0], logits="all"),
                     StepInput(torch.tensor([[5, 9, 31]]), caches[1], logits="all"),
                     StepInput(torch.tensor([[7]]), caches[2], logits="all")]
            return [out.logits for out in seg.forward_many(steps)]
        finally:
            monkeypatch.undo()

    for fast, slow in zip(outputs(True), outputs(False), strict=True):
        torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fixture", ["tiny_llama", pytest.param("smollm2", marks=pytest.mark.real_model)])
def test_a_prompt_gets_the_same_bits_however_it_is_cut_into_frames_and_whatever_shares_its_pass(fixture, request):
    """With every layer on the row kernel, prefills run packed too: each position's keys, values
    and logits then depend only on the positions before it, not on the frame it came in, the
    frame's length (one frame, chunks, one token at a time) or the other sessions in the pass,
    which is what lets a worker pack prefills and reuse a prompt's cached prefix exactly."""
    from partition import rowkernel

    if rowkernel.kernel() is None:
        pytest.skip(f"the row kernel does not run here: {rowkernel.reason()}")
    source = request.getfixturevalue(fixture)
    whole = ModelSegment.load(source, 0, source.n_layers)
    assert whole.whole_frames_packed()
    prompt = [(11 * i) % 200 + 3 for i in range(90)]  # longer than a chunk (64): two chunks

    def run(cuts: list[int], beside: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        cache, logits = whole.new_cache(), []
        others = [whole.new_cache() for _ in range(2)]
        for a, b in zip([0, *cuts], [*cuts, len(prompt)], strict=True):
            steps = [StepInput(torch.tensor([prompt[a:b]]), cache, logits="all")]
            if beside:  # another prompt's frame and a decode step in the same passes
                steps += [StepInput(torch.tensor([[5, 6, 7, 8, 9][: 1 + a % 5]]), others[0], logits="all"),
                          StepInput(torch.tensor([[40 + a % 7]]), others[1])]
            logits.append(whole.forward_many(steps)[0].logits[0])
        keys = torch.cat([cache._layers[i].keys[0, :, : len(prompt)] for i in sorted(cache._layers)])
        return torch.cat(logits), keys

    logits, keys = run([])
    for cuts, beside in (([37], False), ([1, 2, 30, 31, 80], False), ([16, 33, 50], True), (list(range(1, 90)), False)):
        cut_logits, cut_keys = run(cuts, beside)
        assert torch.equal(cut_logits, logits) and torch.equal(cut_keys, keys), (cuts, beside)
