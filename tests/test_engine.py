"""EdgeEngine: one place that runs a generation, on the user's own model objects, with fallback.

Unit tests: no broker or worker processes (a client pointed at a closed port stands for a cloud
that is gone). The split paths against real processes are in test_manager.py and test_faults.py.
"""

from __future__ import annotations

import threading

import pytest
import torch


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


@pytest.fixture
def llama_object(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama.directory).eval()


def local_engine(model, **settings):
    from edge_worker.config import EdgeConfig
    from edge_worker.engine import EdgeEngine

    return EdgeEngine(model, EdgeConfig(force_local=True, **settings))


def test_a_local_generation_equals_transformers_greedy_generate(tiny_llama, llama_object):
    ids = tiny_llama.load_tokenizer()("the engine runs it")["input_ids"]
    with local_engine("tiny-llama") as engine:
        result = engine.generate(ids, engine.params(max_new_tokens=12))
    assert result.token_ids == hf_greedy(llama_object, ids, 12)
    assert result.mode == "local" and result.split == tiny_llama.n_layers


def test_the_users_model_object_is_the_one_that_runs_not_a_reload(tiny_llama, llama_object):
    """The segments share the object's tensors; a change made in memory changes the output (and
    the model id), where a reload from disk would have given the original text."""
    from partition.models import source_of

    ids = tiny_llama.load_tokenizer()("changed in memory")["input_ids"]
    with torch.no_grad():
        llama_object.model.layers[1].mlp.down_proj.weight.mul_(3.0)
    source = source_of(llama_object)
    assert source.model_id != tiny_llama.model_id
    with local_engine(llama_object) as engine:
        edge = engine.edge_segment(tiny_llama.n_layers)
        shared = edge.layers[1].mlp.down_proj.weight
        assert shared.data_ptr() == llama_object.model.layers[1].mlp.down_proj.weight.data_ptr()
        result = engine.generate(ids, engine.params(max_new_tokens=10))
    assert result.token_ids == hf_greedy(llama_object, ids, 10)
    with local_engine("tiny-llama") as original:
        assert original.generate(ids, original.params(max_new_tokens=10)).token_ids != result.token_ids


def test_an_unchanged_object_is_the_same_model_as_its_directory(tiny_llama, llama_object, tiny_gpt2):
    from transformers import AutoModelForCausalLM

    from partition.models import source_of

    assert source_of(llama_object).model_id == tiny_llama.model_id
    gpt2 = AutoModelForCausalLM.from_pretrained(tiny_gpt2.directory).eval()
    assert source_of(gpt2).model_id == tiny_gpt2.model_id


def test_a_gpt2_object_generates_its_own_greedy_text(tiny_gpt2):
    from transformers import AutoModelForCausalLM

    gpt2 = AutoModelForCausalLM.from_pretrained(tiny_gpt2.directory).eval()
    ids = tiny_gpt2.load_tokenizer()("gpt-2 as an object")["input_ids"]
    with local_engine(gpt2) as engine:
        assert engine.generate(ids, engine.params(max_new_tokens=10)).token_ids == hf_greedy(gpt2, ids, 10)


def test_a_bfloat16_object_runs_in_bfloat16(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama.directory, dtype=torch.bfloat16).eval()
    ids = tiny_llama.load_tokenizer()("half precision")["input_ids"]
    with local_engine(model) as engine:
        edge = engine.edge_segment(tiny_llama.n_layers)
        assert edge.dtype == torch.bfloat16
        assert edge.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
        result = engine.generate(ids, engine.params(max_new_tokens=8))
    assert result.token_ids == hf_greedy(model, ids, 8)


def test_dtype_bfloat16_runs_the_layers_read_from_files_in_bfloat16(tiny_llama):
    """``--dtype bfloat16`` (weights from files): the edge's layers hold and compute in bfloat16,
    and the text is transformers' own for the model loaded in bfloat16."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama.directory, dtype=torch.bfloat16).eval()
    ids = tiny_llama.load_tokenizer()("half precision from files")["input_ids"]
    with local_engine("tiny-llama", dtype="bfloat16") as engine:
        assert (engine.device, engine.dtype) == (torch.device("cpu"), torch.bfloat16)
        edge = engine.edge_segment(tiny_llama.n_layers)
        assert edge.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
        result = engine.generate(ids, engine.params(max_new_tokens=12))
    assert result.token_ids == hf_greedy(model, ids, 12)


def test_an_explicit_dtype_converts_the_users_object_and_auto_keeps_its_own(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama.directory, dtype=torch.bfloat16).eval()
    with local_engine(model) as engine:
        assert engine.dtype == torch.bfloat16
    ids = tiny_llama.load_tokenizer()("asked for float32")["input_ids"]
    with local_engine(model, dtype="float32") as engine:
        assert engine.edge_segment(tiny_llama.n_layers).layers[0].mlp.up_proj.weight.dtype == torch.float32
        result = engine.generate(ids, engine.params(max_new_tokens=10))
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16  # the object itself is untouched
    assert result.token_ids == hf_greedy(model.float(), ids, 10)


def test_a_device_or_dtype_that_cannot_be_had_is_refused_clearly():
    from edge_worker.config import EdgeConfig
    from edge_worker.engine import EdgeEngine

    with pytest.raises(ValueError, match="--device must be auto, cpu or cuda"):
        EdgeConfig(force_local=True, device="tpu")
    with pytest.raises(ValueError, match="--dtype must be one of"):
        EdgeConfig(force_local=True, dtype="int4")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA device"):
            EdgeEngine("tiny-llama", EdgeConfig(force_local=True, device="cuda"))


def test_a_saved_checkpoint_of_an_object_is_the_same_model(tiny_llama, llama_object, tmp_path):
    from partition.models import resolve_model, save_checkpoint, source_of

    with torch.no_grad():
        llama_object.model.norm.weight.add_(0.5)
    save_checkpoint(llama_object, tmp_path / "m", tiny_llama.load_tokenizer())
    assert resolve_model(str(tmp_path / "m")).model_id == source_of(llama_object).model_id


def test_the_fingerprint_follows_the_values_not_the_path(tiny_llama, tmp_path):
    import shutil

    from partition.models import resolve_model

    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama.directory, copy)
    assert resolve_model(str(copy)).model_id == tiny_llama.model_id


def test_the_stream_yields_the_text_as_it_comes(tiny_llama):
    ids = tiny_llama.load_tokenizer()("streamed")["input_ids"]
    with local_engine("tiny-llama") as engine:
        stream = engine.stream(ids, engine.params(max_new_tokens=16))
        pieces = list(stream)
        whole = engine.generate(ids, engine.params(max_new_tokens=16))
    assert len(pieces) > 1
    assert "".join(pieces) == stream.result.text == whole.text


def test_a_stream_closed_early_stops_its_generation(tiny_llama):
    ids = tiny_llama.load_tokenizer()("stop me")["input_ids"]
    with local_engine("tiny-llama") as engine:
        stream = engine.stream(ids, engine.params(max_new_tokens=200))
        next(stream)
        stream.close()
        assert stream.result is None  # it did not run to the end
        assert list(stream) == []


def test_generations_from_several_threads_each_equal_their_own_run(tiny_llama):
    tok = tiny_llama.load_tokenizer()
    prompts = [tok(p)["input_ids"] for p in ("first prompt", "a second one", "and the third")]
    with local_engine("tiny-llama") as engine:
        alone = [engine.generate(ids, engine.params(max_new_tokens=20)).token_ids for ids in prompts]
        together: dict[int, list[int]] = {}

        def run(i: int) -> None:
            together[i] = engine.generate(prompts[i], engine.params(max_new_tokens=20)).token_ids

        threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert [together[i] for i in range(3)] == alone


def test_a_prompt_past_the_context_is_refused_with_a_clear_error(tiny_llama):
    from edge_worker.engine import ContextLengthError

    with local_engine("tiny-llama") as engine:
        with pytest.raises(ContextLengthError, match="holds 1024"):
            engine.generate([65] * 1000, engine.params(max_new_tokens=30))
        with pytest.raises(ContextLengthError):
            engine.generate([65] * 1025, engine.params(max_new_tokens=1))


def test_on_request_a_long_prompt_loses_its_oldest_tokens_and_runs_as_its_tail_would(tiny_llama):
    from edge_worker.engine import ContextLengthError

    ids = [(7 * i) % 250 + 3 for i in range(1030)]
    with local_engine("tiny-llama") as engine:
        cut = engine.generate(ids, engine.params(max_new_tokens=6, truncate_prompt=True))
        tail = engine.generate(ids[-1018:], engine.params(max_new_tokens=6))
        assert cut.token_ids == tail.token_ids
        assert cut.prompt_tokens == 1018 and cut.prompt_tokens_dropped == 12 and tail.prompt_tokens_dropped == 0
        # A prompt that fits is left whole; more tokens than the context holds are refused either way.
        assert engine.fit_prompt(ids[:10], 6, truncate=True) == ids[:10]
        with pytest.raises(ContextLengthError, match="no prompt fits"):
            engine.generate(ids, engine.params(max_new_tokens=1024, truncate_prompt=True))


def test_a_split_generation_with_no_cloud_falls_back_and_says_at_which_step(tiny_llama, llama_object):
    from edge_worker.config import EdgeConfig
    from edge_worker.engine import EdgeEngine

    ids = tiny_llama.load_tokenizer()("nobody is listening")["input_ids"]
    settings = EdgeConfig(split=2, broker="tcp://127.0.0.1:9", encryption=False, request_timeout_s=0.5,
                          step_deadline_s=5.0)
    with EdgeEngine(llama_object, settings) as engine:
        result = engine.generate(ids, engine.params(max_new_tokens=8))
    assert result.token_ids == hf_greedy(llama_object, ids, 8)
    # The broker did not answer the check before the first step: every layer ran here from the start.
    assert result.fallback_at_step == 0 and result.mode == "local" and result.cloud_round_trips == 0
    assert result.decision["reason"].endswith("the broker did not answer")


def test_without_fallback_a_split_generation_with_no_cloud_raises(tiny_llama):
    from broker.errors import EdgeCloudError
    from edge_worker.config import EdgeConfig
    from edge_worker.engine import EdgeEngine

    settings = EdgeConfig(model="tiny-llama", split=2, broker="tcp://127.0.0.1:9", encryption=False,
                          request_timeout_s=0.3, step_deadline_s=1.0, fallback_local=False)
    with EdgeEngine(settings=settings) as engine, pytest.raises(EdgeCloudError):
        engine.generate([65, 66, 67], engine.params(max_new_tokens=3))


def test_cloud_only_the_self_drafter_loads_no_head_on_the_edge(tiny_llama, tmp_path, monkeypatch):
    """It drafts by lookup there (no edge layer to exit from), so the edge holds the embedding
    alone; at a split with edge layers it keeps its head."""
    from edge_worker.config import EdgeConfig
    from edge_worker.engine import EdgeEngine
    from edge_worker.mini_llm import MiniLLMHandler

    monkeypatch.setenv("EDGECLOUD_CACHE", str(tmp_path))  # no calibrated adapter in reach
    settings = EdgeConfig(model="tiny-llama", split=0, broker="tcp://127.0.0.1:9", encryption=False)
    with EdgeEngine(settings=settings, mini_llm=MiniLLMHandler(model=None)) as engine:
        assert engine.edge_segment(0).lm_head is None
        assert engine.edge_segment(2).lm_head is not None


def test_servable_splits_come_from_the_workers_of_this_model_only():
    from edge_worker.planning import servable_splits

    workers = [{"model_id": "m@1", "layer_ranges": [[0, 4]]}, {"model_id": "m@2", "layer_ranges": [[0, 4]]},
               {"model_id": "m@1", "layer_ranges": [[6, 8]]}]
    assert servable_splits(workers, "m@1", 8) == {0, 1, 2, 3, 6, 7}
    assert servable_splits(workers, "m@3", 8) == set()
    assert servable_splits([], "m@1", 8) == set()


def test_a_model_of_an_unsupported_kind_is_refused():
    from partition.models import source_of

    with pytest.raises(ValueError, match="cannot use a dict"):
        source_of({"not": "a model"})


@pytest.mark.real_model
def test_the_gguf_object_is_the_same_model_as_the_default(smollm2):
    from transformers import AutoModelForCausalLM

    from partition.models import smollm2_gguf_path, source_of

    gguf = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    source = source_of(model)
    assert source.model_id == smollm2.model_id
    assert len(source.load_tokenizer()) == len(smollm2.load_tokenizer())


def test_a_stop_string_ends_the_text_before_it_streamed_or_not(tiny_llama):
    """The stop is taken from the text a plain run produces, so it must occur; the streamed pieces
    never show any of it, even when it spans tokens."""
    ids = tiny_llama.load_tokenizer()("where to stop")["input_ids"]
    with local_engine("tiny-llama") as engine:
        plain = engine.generate(ids, engine.params(max_new_tokens=40))
        stop = plain.text[12:15]
        assert len(stop) == 3 and stop not in plain.text[:12], "pick a stop that first occurs at 12"
        params = engine.params(max_new_tokens=40, stop=("never there", stop))
        stopped = engine.generate(ids, params)
        stream = engine.stream(ids, params)
        pieces = list(stream)
    assert stopped.text == plain.text[:12] and stopped.stop_reason == "stop"
    assert stopped.token_ids == plain.token_ids[:len(stopped.token_ids)] and len(stopped.token_ids) < 40
    assert "".join(pieces) == stream.result.text == stopped.text


def test_the_text_stream_holds_back_what_could_still_become_a_stop_string():
    from edge_worker.generation import TextStream

    class Chars:  # token i is chr(i)
        def decode(self, ids, skip_special_tokens=True):
            return "".join(map(chr, ids))

    out: list[str] = []
    stream = TextStream(Chars(), out.append, stop=("END",))
    text = [ord(c) for c in "abEN"]
    assert not stream.update(text[:3]) and out == ["ab"]  # "E" may begin "END"
    assert not stream.update(text) and out == ["ab"]
    assert not stream.update(text + [ord("x")]) and out == ["ab", "ENx"]  # it did not
    assert stream.update(text + [ord(c) for c in "xyEND!"]) and out[-1] == "y" and stream.stopped_at == 6
    assert stream.update(text + [ord("z")]), "stopped stays stopped"


def test_top_k_one_samples_the_greedy_text_and_a_larger_k_is_seeded(tiny_llama):
    ids = tiny_llama.load_tokenizer()("sampled")["input_ids"]
    with local_engine("tiny-llama") as engine:
        greedy = engine.generate(ids, engine.params(max_new_tokens=16)).token_ids
        k1 = engine.generate(ids, engine.params(max_new_tokens=16, temperature=1.5, top_k=1, seed=3)).token_ids
        k8 = [engine.generate(ids, engine.params(max_new_tokens=16, temperature=1.5, top_k=8, seed=3)).token_ids
              for _ in range(2)]
    assert k1 == greedy
    assert k8[0] == k8[1] and k8[0] != greedy


def test_top_k_keeps_only_the_k_most_likely_tokens():
    from partition.sampling import SamplingParams, probabilities

    logits = torch.tensor([0.0, 3.0, 1.0, 2.0, -1.0])
    probs = probabilities(logits, SamplingParams(temperature=1.0, top_k=2))
    assert probs.nonzero().flatten().tolist() == [1, 3]
    assert SamplingParams.from_wire(SamplingParams(0.5, 0.9, 7, 2).to_wire()) == SamplingParams(0.5, 0.9, 7, 2)
    assert "top_k" not in SamplingParams(0.5).to_wire(), "an edge without top_k sends what older workers read"


def test_a_cancelled_generation_raises_and_ends_at_its_next_step(tiny_llama):
    from edge_worker.generation import GenerationCancelled

    ids = tiny_llama.load_tokenizer()("cancel me")["input_ids"]
    cancel = threading.Event()
    seen: list[str] = []

    def on_text(piece: str) -> None:
        seen.append(piece)
        if len(seen) == 3:
            cancel.set()

    with local_engine("tiny-llama") as engine, pytest.raises(GenerationCancelled):
        engine.generate(ids, engine.params(max_new_tokens=200), on_text=on_text, cancel=cancel)
    assert len(seen) <= 4


def test_a_conversation_without_a_chat_template_encodes_as_the_cli_prompt(tiny_llama):
    with local_engine("tiny-llama") as engine:
        assert engine.encode_chat([{"role": "user", "content": "hello"}]) == engine.encode("hello")


class _Connection:
    """Records the kinds of requests a CloudSession sends; its opener raises ``on_open``."""

    broker_gone = ""

    def __init__(self, on_open: BaseException) -> None:
        from types import SimpleNamespace

        self.on_open, self.kinds = on_open, []
        self.config = SimpleNamespace(reply_grace_s=0.1)

    def request(self, session_id, kind, *args, **kwargs):
        self.kinds.append(kind)
        if kind == "open":
            raise self.on_open

    def submit(self, session_id, kind, *args, **kwargs):
        self.kinds.append(kind)
        return f"r{len(self.kinds)}"

    def wait_any(self, rids, timeout_s):
        return rids[0]

    def result(self, rid):
        return None


@pytest.mark.parametrize("interruption, closed", [(KeyboardInterrupt(), True), (None, False)])
def test_an_opener_interrupted_in_flight_is_closed_but_one_the_cloud_refused_is_not(interruption, closed):
    """Ctrl-C while the opener is in flight: the worker may have made the session, so close()
    frees it. An opener that failed in the cloud (a timeout here) needs no close, and one to a
    broker that is not answering would only cost its timeout."""
    from types import SimpleNamespace

    from broker.errors import RequestTimeout
    from edge_worker.cloud_client import CloudSession
    from partition.sampling import SamplingParams

    conn = _Connection(interruption or RequestTimeout("no answer"))
    client = SimpleNamespace(connection=conn, encryption=False, wire_dtype="fp16", request_timeout_s=1.0,
                             step_deadline_s=1.0, max_retries=0, backoff_initial_s=0.01, backoff_max_s=0.01)
    session = CloudSession(client, "model", 2, 8)
    session.start(SamplingParams())
    with pytest.raises((KeyboardInterrupt, RequestTimeout)):
        session.step(torch.zeros(1, 1, 8), 0)
    session.close()
    assert conn.kinds == (["open", "close"] if closed else ["open"])


def test_warm_up_builds_the_layers_the_first_generation_uses(tiny_llama):
    """A server warms its engine before it listens: the first request finds the split's layers
    built (no "loading" step of its own) and records no decision for the warm-up."""
    from edge_worker.config import EdgeConfig
    from edge_worker.engine import EdgeEngine

    said: list[str] = []
    with EdgeEngine("tiny-llama", EdgeConfig(force_local=True), progress=said.append) as engine:
        assert engine.warm_up() == tiny_llama.n_layers
        assert any(m.startswith("loading layers") for m in said) and engine.decisions == []
        said.clear()
        engine.generate([65, 66, 67], engine.params(max_new_tokens=2))
        assert not any(m.startswith("loading") for m in said), said
    settings = EdgeConfig(model="tiny-llama", split=2, broker="tcp://127.0.0.1:9", encryption=False,
                          request_timeout_s=0.3, step_deadline_s=1.0)
    with EdgeEngine(settings=settings) as engine:  # no broker: the fallback's decision, every layer here
        assert engine.warm_up() == tiny_llama.n_layers
