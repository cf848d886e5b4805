"""EdgeCloudManager: the original usage example, force modes, planner choices, fallback."""

from __future__ import annotations

import contextlib

import pytest
import torch


@pytest.fixture
def env(tiny_cluster, monkeypatch):
    monkeypatch.setenv("EDGECLOUD_BROKER", tiny_cluster.endpoint)
    monkeypatch.setenv("EDGECLOUD_KEYS", str(tiny_cluster.keys_dir))
    monkeypatch.setenv("EDGECLOUD_MAX_NEW_TOKENS", "12")


@contextlib.contextmanager
def one_worker_cluster(model: str, monkeypatch, timeout_s: float, **kwargs):
    """A broker and one one-thread worker of ``model`` as real processes, and the environment
    that points an edge at them."""
    from cli.cluster import LocalCluster

    with LocalCluster(model=model, worker_threads=1, **kwargs) as cluster:
        cluster.start_broker()
        cluster.add_worker()
        cluster.wait_for_workers(1, timeout_s=timeout_s)
        monkeypatch.setenv("EDGECLOUD_BROKER", cluster.endpoint)
        monkeypatch.setenv("EDGECLOUD_KEYS", str(cluster.keys_dir))
        yield cluster


def reference(source, ids: list[int], n: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source.directory).eval()
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0].tolist()


@pytest.mark.integration
def test_the_original_usage_example_runs_as_written(env, tiny_llama):
    from transformers import AutoModelForCausalLM

    from edge_worker import CloudClient, DeviceMonitor, EdgeCloudManager, MiniLLMHandler, PrivacyProtection

    main_model = AutoModelForCausalLM.from_pretrained(tiny_llama.directory)
    tokenizer = tiny_llama.load_tokenizer()
    input_ids = torch.tensor([tokenizer("an edge, a cloud")["input_ids"]])

    device_monitor = DeviceMonitor(background_monitoring=True)
    cloud_client = CloudClient(api_key=None)
    mini_llm = MiniLLMHandler(model=None, tokenizer=tokenizer)
    privacy = PrivacyProtection(encryption_enabled=True)
    edge_cloud_manager = EdgeCloudManager(
        model=main_model,
        device_monitor=device_monitor,
        cloud_client=cloud_client,
        mini_llm=mini_llm,
        privacy_protection=privacy,
        energy_weight=0.3,
        latency_weight=0.4,
        memory_weight=0.3,
    )
    try:
        outputs = edge_cloud_manager.process_hybrid(input_ids)
    finally:
        edge_cloud_manager.close()
    # Like generate(): the prompt, then the new tokens, greedy, as a (1, T + new) tensor.
    assert outputs.shape == (1, input_ids.shape[1] + 12)
    assert outputs[0].tolist() == reference(tiny_llama, input_ids[0].tolist(), 12)
    # The generation's first decision is the plan; a re-plan during it (the load moved) adds more.
    decision = edge_cloud_manager.decisions[0]
    assert decision.reason == "planned" and decision.rtt_ms is not None
    assert decision.plan is not None and len(decision.plan.table) == tiny_llama.n_layers + 1


@pytest.mark.integration
@pytest.mark.parametrize("force_mode, split", [("local-only", 4), ("cloud-only", 0), (None, 2)])
def test_forced_modes_and_splits_give_the_same_ids(env, tiny_llama, force_mode, split):
    from edge_worker import EdgeCloudManager

    manager = EdgeCloudManager(model="tiny-llama", force_mode=force_mode,
                               split=split if force_mode is None else None)
    ids = tiny_llama.load_tokenizer()("forced")["input_ids"]
    try:
        out = manager.process_hybrid(ids, max_new_tokens=10)
    finally:
        manager.close()
    assert manager.decisions[-1].k == split
    assert out[0].tolist() == reference(tiny_llama, ids, 10)
    assert manager.last_result.cloud_round_trips == (0 if split == 4 else 11)  # an open, then 10 steps


@pytest.mark.integration
def test_a_batch_of_prompts_runs_as_sessions_at_once_and_each_row_is_the_prompt_alone(env, tiny_llama):
    from edge_worker import EdgeCloudManager

    tok = tiny_llama.load_tokenizer()
    texts = ["the first prompt", "a second, longer prompt than that", "third"]
    prompts = [tok(t)["input_ids"] for t in texts]
    manager = EdgeCloudManager(model="tiny-llama", force_mode="cloud-only")
    try:
        out = manager.process_hybrid(prompts, max_new_tokens=8)  # a list of id lists of three lengths
        # A left-padded (B, T) tensor and its mask, as a tokenizer returns them: the same rows.
        width = max(len(p) for p in prompts)
        padded = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        out_padded = manager.process_hybrid(padded, max_new_tokens=8, attention_mask=mask)
    finally:
        manager.close()
    assert out.shape == (3, width + 8)
    for i, ids in enumerate(prompts):
        expected = reference(tiny_llama, ids, 8)
        assert out[i, :len(expected)].tolist() == expected
        assert (out[i, len(expected):] == manager.pad_id).all()
        assert out_padded[i].tolist() == [0] * (width - len(ids)) + expected
    assert [r.mode for r in manager.last_results] == ["cloud"] * 3
    assert len({r.cloud_round_trips for r in manager.last_results}) == 1  # each its own session


def test_batch_rows_strip_what_the_mask_marks_and_refuse_a_mask_of_another_shape():
    from edge_worker.manager import batch_rows

    assert [r.ids for r in batch_rows([5, 6, 7])] == [[5, 6, 7]]
    assert [r.ids for r in batch_rows(torch.tensor([[5, 6], [7, 8]]))] == [[5, 6], [7, 8]]
    rows = batch_rows(torch.tensor([[0, 5, 6], [7, 8, 0]]), torch.tensor([[0, 1, 1], [1, 1, 0]]))
    assert [(r.given, r.ids) for r in rows] == [([0, 5, 6], [5, 6]), ([7, 8, 0], [7, 8])]
    with pytest.raises(ValueError, match="shape of input_ids"):
        batch_rows([[1, 2], [3, 4]], [[1, 1]])
    with pytest.raises(ValueError, match="empty"):
        batch_rows([])


def test_a_batch_with_one_bad_prompt_fails_before_any_generation_starts(tiny_llama):
    from edge_worker import EdgeCloudManager

    manager = EdgeCloudManager(model="tiny-llama", force_mode="local-only")
    try:
        with pytest.raises(ValueError, match="prompt 1: token ids must be in"):
            manager.process_hybrid([[5, 6], [5, 10**9]], max_new_tokens=4)
        assert manager.last_results == []
        with pytest.raises(ValueError, match="max_concurrent"):
            manager.engine.generate_many([[5]], max_concurrent=0)
    finally:
        manager.close()


@pytest.mark.integration
def test_latency_weight_and_a_slow_link_keep_everything_local(env, tiny_llama):
    from broker.linkproxy import LinkConfig
    from edge_worker import CloudClient, EdgeCloudManager

    client = CloudClient(link=LinkConfig(rtt_ms=80))
    manager = EdgeCloudManager(model="tiny-llama", cloud_client=client, energy_weight=0, latency_weight=1,
                               memory_weight=0)
    try:
        manager.process_hybrid(tiny_llama.load_tokenizer()("slow link")["input_ids"], max_new_tokens=4)
    finally:
        manager.close()
    decision = manager.decisions[-1]
    assert decision.rtt_ms >= 70
    assert decision.k == tiny_llama.n_layers


@pytest.mark.integration
def test_the_planner_prices_the_cloud_with_the_workers_reported_timing(env, tiny_llama, tiny_cluster):
    """Not an assumed speed-up: the per-layer time the workers measured (and keep measuring on the
    steps they serve) reaches the planner through the broker's status."""
    from edge_worker import EdgeCloudManager

    manager = EdgeCloudManager(model="tiny-llama")
    try:
        manager.process_hybrid(tiny_llama.load_tokenizer()("timed")["input_ids"], max_new_tokens=3)
        reported = [w["per_layer_ms"] for w in manager.cloud_client.status()["workers"]]
        conditions, _rtt = manager.measure_conditions()
    finally:
        manager.close()
    assert reported and all(ms > 0 for ms in reported)
    assert conditions.cloud_layer_ms is not None and len(conditions.cloud_layer_ms) == tiny_llama.n_layers
    assert min(reported) <= conditions.cloud_layer_ms[0] <= max(reported)
    # The --json object's decision carries the measurements behind it and the planner's forecast.
    d = manager.decisions[-1].to_dict()
    assert d["measured"]["cloud_layer_ms"] > 0 and d["measured"]["cloud_speedup"] is None
    assert d["measured"]["edge_slowdown"] >= 1.0  # from the compute probe, not the load formula
    assert conditions.edge_slowdown_measured is not None
    assert d["predicted"]["latency_ms"] > 0 and d["k"] == manager.decisions[-1].k
    # No transfer was timed before the first plan: its uplink is the default, and it says so.
    first = manager.decisions[0]
    assert "bandwidth_mbps" in first.assumed and "cloud_layer_ms" not in first.assumed
    assert "Mbit/s (assumed)" in first.summary() and first.to_dict()["assumed"] == list(first.assumed)


def test_an_unreachable_cloud_falls_back_to_local(tiny_llama, monkeypatch):
    from edge_worker import CloudClient, EdgeCloudManager

    manager = EdgeCloudManager(model="tiny-llama", cloud_client=CloudClient(broker="tcp://127.0.0.1:9",
                                                                             encryption=False))
    ids = tiny_llama.load_tokenizer()("alone")["input_ids"]
    try:
        out = manager.process_hybrid(ids, max_new_tokens=6)
    finally:
        manager.close()
    assert manager.decisions[-1].reason == "cloud unreachable"
    assert out[0].tolist() == reference(tiny_llama, ids, 6)


def test_text_or_zero_new_tokens_are_refused_with_what_to_do(tiny_llama):
    from edge_worker import EdgeCloudManager

    manager = EdgeCloudManager(model="tiny-llama", force_mode="local-only")
    try:
        for text in ("hello", ["hello", "there"]):
            with pytest.raises(TypeError, match="token ids .* not text"):
                manager.process_hybrid(text)
        with pytest.raises(ValueError, match="at least 1"):  # not the manager's default in its place
            manager.process_hybrid([[1, 2, 3]], max_new_tokens=0)
        assert manager.process_hybrid([[1, 2, 3]], max_new_tokens=2).shape == (1, 5)
    finally:
        manager.close()
    with pytest.raises(ValueError, match="at least 1"):
        EdgeCloudManager(model="tiny-llama", force_mode="local-only", max_new_tokens=0)


def test_a_drafter_with_another_tokenizer_is_refused(tiny_llama):
    from edge_worker import MiniLLMHandler
    from edge_worker.mini_llm import TokenizerMismatchError
    from partition.models import resolve_model

    gpt2_tokenizer = resolve_model("tiny-gpt2").load_tokenizer()  # same bytes, so it passes
    MiniLLMHandler(model=None, tokenizer=gpt2_tokenizer, main_tokenizer=tiny_llama.load_tokenizer())

    class Shifted:
        def __len__(self):
            return 257

        def __call__(self, text):
            return {"input_ids": [b + 1 for b in text.encode()]}

    with pytest.raises(TokenizerMismatchError):
        MiniLLMHandler(model=None, tokenizer=Shifted(), main_tokenizer=tiny_llama.load_tokenizer())


@pytest.mark.integration
@pytest.mark.real_model
def test_the_split_moves_when_the_link_slows_mid_generation(smollm2, tmp_path, monkeypatch):
    """The round trip jumps from loopback to 1.5 s during a planned generation: the manager sees
    it in the steps' own timings, re-plans past the hysteresis and moves the split (the cloud
    layers come back to the edge); the output stays the main model's greedy output.

    Memory weighs 0.8 and latency 0.2, so at loopback speed the cloud wins on memory even with a
    one-thread worker measured slower than the edge (the planner prices the cloud by the worker's
    own timing), and at 1.5 s the edge wins on latency even when the load slows it tenfold."""
    from broker.linkproxy import LinkConfig
    from edge_worker import CloudClient, DeviceMonitor, EdgeCloudManager
    from edge_worker.generation import EdgeGenerator
    from partition.segment import ModelSegment
    from partition.tokens import encode_prompt, eos_token_ids

    tokenizer = smollm2.load_tokenizer()
    ids = encode_prompt(tokenizer, "Name two rivers in Europe.")
    whole = ModelSegment.load(smollm2, 0, smollm2.n_layers)
    expected = EdgeGenerator(whole, None, tokenizer, eos_token_ids(smollm2, tokenizer), "local").generate(ids, 24)
    with one_worker_cluster("smollm2-135m", monkeypatch, timeout_s=120):
        client = CloudClient(link=LinkConfig())
        manager = EdgeCloudManager(model="smollm2-135m", device_monitor=DeviceMonitor(background_monitoring=False),
                                   cloud_client=client, replan_every=4, latency_weight=0.2,
                                   memory_weight=0.8, energy_weight=0.0)
        from edge_worker.planning import ReplanWatch

        plan_at = ReplanWatch.replan

        def slow_link_then_replan(self, step, trace, current):
            if step >= 6:
                client._proxy.set_rtt(1500.0)
            return plan_at(self, step, trace, current)

        monkeypatch.setattr(ReplanWatch, "replan", slow_link_then_replan)
        try:
            manager.process_hybrid([ids], max_new_tokens=24)
        finally:
            manager.close()
    result = manager.last_result
    first, *later = manager.decisions
    assert first.reason == "planned" and first.k < smollm2.n_layers, first.summary()
    assert later and later[0].reason.startswith("replanned") and "rtt" in later[0].reason, later
    assert result.splits_used == [first.k, later[0].k] and later[0].k > first.k
    assert result.moves[0]["step"] >= 8
    assert result.token_ids == expected.token_ids[:len(result.token_ids)]
    assert result.token_ids == expected.token_ids or result.stop_reason == "eos"


@pytest.mark.integration
def test_the_only_worker_killed_mid_generation_the_manager_finishes_locally(tiny_llama, monkeypatch):
    """The seed's API on a model object: the worker dies after the first piece of text, and the
    rest of the model runs here from the step it died at, with the object's own greedy output."""
    from transformers import AutoModelForCausalLM

    from broker.linkproxy import LinkConfig
    from edge_worker import CloudClient, EdgeCloudManager

    main_model = AutoModelForCausalLM.from_pretrained(tiny_llama.directory).eval()
    ids = tiny_llama.load_tokenizer()("the worker goes away")["input_ids"]
    with one_worker_cluster("tiny-llama", monkeypatch, timeout_s=60, heartbeat_s=0.5) as cluster:
        # 20 ms per round trip: 150 steps take seconds, so the kill lands mid-generation.
        client = CloudClient(link=LinkConfig(rtt_ms=20), request_timeout_s=1.0, step_deadline_s=6.0)
        manager = EdgeCloudManager(model=main_model, cloud_client=client, split=2)
        try:
            stream = manager.stream(ids, max_new_tokens=150)
            first = next(stream)
            cluster.kill(cluster.workers[0])
            text = first + "".join(stream)
        finally:
            manager.close()
    result = manager.last_result
    assert result is not None and text == result.text
    assert result.fallback_at_step is not None and result.fallback_at_step > 0
    expected = reference(tiny_llama, ids, len(result.token_ids))[len(ids):]
    assert result.token_ids == expected


@pytest.mark.real_model
@pytest.mark.integration
def test_the_seed_example_on_a_gguf_object_and_a_changed_copy_against_a_smollm2_worker(smollm2, monkeypatch):
    """The model object loaded from the GGUF the package ships is the worker's model (same
    fingerprint): split at 15 it gives its own greedy text through the cloud. A copy with one
    layer changed in memory matches no worker: it is refused with WeightsMismatch, or (with the
    fallback) gives its own greedy text, never the original weights' text."""
    from transformers import AutoModelForCausalLM

    from broker.errors import WeightsMismatch
    from edge_worker import CloudClient, DeviceMonitor, EdgeCloudManager, MiniLLMHandler, PrivacyProtection
    from partition.models import smollm2_gguf_path
    from partition.tokens import encode_prompt

    gguf = smollm2_gguf_path()
    main_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    tokenizer = smollm2.load_tokenizer()
    ids = encode_prompt(tokenizer, "Name a large city.")
    own = hf_greedy(main_model, ids, 12)
    with one_worker_cluster("smollm2-135m", monkeypatch, timeout_s=180):
        monkeypatch.setenv("EDGECLOUD_MAX_NEW_TOKENS", "12")
        # The seed's example, verbatim.
        device_monitor = DeviceMonitor(background_monitoring=True)
        cloud_client = CloudClient(api_key=None)
        mini_llm = MiniLLMHandler(model=None, tokenizer=tokenizer)
        privacy = PrivacyProtection(encryption_enabled=True)
        edge_cloud_manager = EdgeCloudManager(
            model=main_model, device_monitor=device_monitor, cloud_client=cloud_client, mini_llm=mini_llm,
            privacy_protection=privacy, energy_weight=0.3, latency_weight=0.4, memory_weight=0.3,
        )
        try:
            outputs = edge_cloud_manager.process_hybrid(torch.tensor([ids]))
        finally:
            edge_cloud_manager.close()
        assert outputs[0, len(ids):].tolist() == own[:outputs.shape[1] - len(ids)]
        # Split at 15: the cloud serves the object's weights.
        manager = EdgeCloudManager(model=main_model, split=15)
        try:
            split = manager.process_hybrid([ids], max_new_tokens=12)
            served = manager.last_result
        finally:
            manager.close()
        assert split[0, len(ids):].tolist() == own[:split.shape[1] - len(ids)]
        assert served.workers_used and served.fallback_at_step is None
        # A copy changed in memory.
        with torch.no_grad():
            main_model.model.layers[29].mlp.down_proj.weight.mul_(4.0)
        changed = hf_greedy(main_model, ids, 12)
        assert changed != own
        refusing = EdgeCloudManager(model=main_model, split=15, fallback_local=False,
                                    cloud_client=CloudClient(step_deadline_s=8.0))
        try:
            with pytest.raises(WeightsMismatch, match="save_checkpoint"):
                refusing.process_hybrid([ids], max_new_tokens=12)
        finally:
            refusing.close()
        falling_back = EdgeCloudManager(model=main_model, split=15)
        try:
            out = falling_back.process_hybrid([ids], max_new_tokens=12)
        finally:
            falling_back.close()
        assert out[0, len(ids):].tolist() == changed[:out.shape[1] - len(ids)]
        assert falling_back.last_result.fallback_at_step == 0


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()
