"""The OpenAI-compatible API in process (httpx through FastAPI's TestClient) on a local tiny-llama
engine: shapes, semantics and every refusal. The server as a real process behind uvicorn, with
the real openai client and a split engine, is in test_serve.py."""

from __future__ import annotations

import json

import pytest

MODEL = "tiny-llama"
KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def engine():
    from edge_worker.config import EdgeConfig
    from edge_worker.engine import EdgeEngine

    with EdgeEngine(MODEL, EdgeConfig(force_local=True)) as e:
        yield e


def client(engine, **config):
    from fastapi.testclient import TestClient

    from edge_worker.openai_api import ServerConfig, create_app

    return TestClient(create_app(engine, ServerConfig(**{"http_key": KEY, **config})))


@pytest.fixture(scope="module")
def api(engine):
    with client(engine) as c:
        yield c


def events(response) -> list[dict | str]:
    """The data of each server-sent event; "[DONE]" as a string."""
    out: list[dict | str] = []
    for block in response.text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            data = block[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_the_models_list_names_the_one_model(api):
    body = api.get("/v1/models", headers=AUTH).json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == [MODEL]
    assert api.get(f"/v1/models/{MODEL}", headers=AUTH).json()["id"] == MODEL


def test_a_chat_completion_is_the_engines_greedy_text_for_the_same_ids(api, engine):
    ids = engine.encode_chat([{"role": "user", "content": "hello there"}])
    expected = engine.generate(ids, engine.params(max_new_tokens=10))
    body = api.post("/v1/chat/completions", headers=AUTH, json={
        "model": MODEL, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 10}).json()
    choice = body["choices"][0]
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert choice["message"] == {"role": "assistant", "content": expected.text}
    assert choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 10, "total_tokens": len(ids) + 10}
    assert body["edgecloud"]["mode"] == "local"


def test_a_text_completion_takes_a_raw_prompt_or_token_ids(api, engine):
    ids = engine.encode("once upon", raw=True)
    expected = engine.generate(ids, engine.params(max_new_tokens=8)).text
    for prompt in ("once upon", ["once upon"], ids):
        body = api.post("/v1/completions", headers=AUTH,
                        json={"model": MODEL, "prompt": prompt, "max_tokens": 8}).json()
        assert body["object"] == "text_completion" and body["choices"][0]["text"] == expected


def test_streamed_chat_deltas_join_to_the_same_text_and_end_with_done(api):
    request = {"model": MODEL, "messages": [{"role": "user", "content": "stream it"}], "max_tokens": 12}
    whole = api.post("/v1/chat/completions", headers=AUTH, json=request).json()
    r = api.post("/v1/chat/completions", headers=AUTH,
                 json={**request, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = events(r)
    assert chunks[-1] == "[DONE]"
    usage_chunk, final = chunks[-2], chunks[-3]
    deltas = [c["choices"][0]["delta"] for c in chunks[:-3]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("content", "") for d in deltas) == whole["choices"][0]["message"]["content"]
    assert final["choices"][0] == {"index": 0, "logprobs": None, "finish_reason": "length", "delta": {}}
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks[:-1])


def test_a_stream_that_fails_before_its_first_token_is_an_http_error_like_the_same_request_unstreamed():
    """With the fallback off and no cloud, the generation fails before any token: a stream gets
    the same 503 as the request unstreamed, not a 200 whose events then say so."""
    from edge_worker.config import EdgeConfig
    from edge_worker.engine import EdgeEngine

    config = EdgeConfig(force_cloud=True, broker="tcp://127.0.0.1:9", encryption=False, fallback_local=False,
                        request_timeout_s=0.5, step_deadline_s=1.0)
    with EdgeEngine(MODEL, config) as cloudless, client(cloudless) as c:
        for stream in (False, True):
            r = c.post("/v1/chat/completions", headers=AUTH, json={
                "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": stream})
            assert r.status_code == 503, (stream, r.text[:500])
            assert r.json()["error"]["type"] == "service_unavailable"
        assert c.get("/health").json()["generations"] == 0  # both slots given back


def test_a_streamed_text_completion_without_usage_has_no_usage_chunk(api):
    r = api.post("/v1/completions", headers=AUTH, json={"model": MODEL, "prompt": "abc", "max_tokens": 5,
                                                        "stream": True})
    chunks = events(r)
    assert chunks[-1] == "[DONE]" and chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in c for c in chunks[:-1])


def test_a_stop_string_ends_the_answer_before_it_with_finish_reason_stop(api, engine):
    ids = engine.encode("stop here", raw=True)
    plain = engine.generate(ids, engine.params(max_new_tokens=30)).text
    stop = plain[10:13]
    assert stop not in plain[:10]
    request = {"model": MODEL, "prompt": "stop here", "max_tokens": 30, "stop": [stop]}
    body = api.post("/v1/completions", headers=AUTH, json=request).json()
    assert body["choices"][0]["text"] == plain[:10] and body["choices"][0]["finish_reason"] == "stop"
    streamed = events(api.post("/v1/completions", headers=AUTH, json={**request, "stream": True}))
    assert "".join(c["choices"][0]["text"] for c in streamed[:-1]) == plain[:10]
    assert streamed[-2]["choices"][0]["finish_reason"] == "stop"


def test_a_seeded_sample_repeats_and_top_k_one_is_greedy(api):
    request = {"model": MODEL, "prompt": "dice", "max_tokens": 12, "temperature": 1.2, "seed": 5}
    texts = [api.post("/v1/completions", headers=AUTH, json=request).json()["choices"][0]["text"] for _ in range(2)]
    greedy = api.post("/v1/completions", headers=AUTH, json={**request, "temperature": 0}).json()
    top1 = api.post("/v1/completions", headers=AUTH, json={**request, "top_k": 1}).json()
    assert texts[0] == texts[1] != greedy["choices"][0]["text"]
    assert top1["choices"][0]["text"] == greedy["choices"][0]["text"]


def test_repetition_penalty_and_min_p_are_the_engines(api, engine):
    ids = engine.encode("abcabcabc abcabcabc abc", raw=True)
    request = {"model": MODEL, "prompt": "abcabcabc abcabcabc abc", "max_tokens": 16}
    plain = api.post("/v1/completions", headers=AUTH, json=request).json()["choices"][0]["text"]
    for extra in ({"repetition_penalty": 1.8}, {"repetition_penalty": 1.3, "min_p": 0.1, "temperature": 1.0,
                                                "seed": 2}):
        body = api.post("/v1/completions", headers=AUTH, json={**request, **extra}).json()
        expected = engine.generate(ids, engine.params(max_new_tokens=16, **extra))
        assert body["choices"][0]["text"] == expected.text != plain, extra


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"model": MODEL, "prompt": "a", "min_p": 1.5}, 400, "min_p"),
    ({"model": MODEL, "prompt": "a", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ({"model": "gpt-4", "prompt": "a"}, 404, "model"),
    ({"model": MODEL, "prompt": "a", "n": 2}, 400, "n"),
    ({"model": MODEL, "prompt": "a", "logprobs": 3}, 400, "logprobs"),
    ({"model": MODEL, "prompt": "a", "echo": True}, 400, "echo"),
    ({"model": MODEL, "prompt": "a", "frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ({"model": MODEL, "prompt": "a", "best_of": 3}, 400, "best_of"),
    ({"model": MODEL, "prompt": "a", "mystery": 1}, 400, "mystery"),
    ({"model": MODEL}, 400, "prompt"),
    ({"model": MODEL, "prompt": "a", "temperature": 3}, 400, "temperature"),
    ({"model": MODEL, "prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "a", "top_p": 0}, 400, "top_p"),
    ({"model": MODEL, "prompt": "a", "temperature": 1, "seed": 2**64}, 400, "seed"),  # more than the wire carries
    ({"model": MODEL, "prompt": ["a", "b"]}, 400, "prompt"),
    ({"model": MODEL, "prompt": [1, 99999]}, 400, "prompt"),
    ({"model": MODEL, "prompt": "a", "stop": ["1", "2", "3", "4", "5"]}, 400, "stop"),
    ({"model": MODEL, "prompt": "a", "stream_options": {"include_usage": True}}, 400, "stream_options"),
])
def test_a_text_completion_the_server_cannot_honour_is_refused_by_name(api, body, status, param):
    r = api.post("/v1/completions", headers=AUTH, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


@pytest.mark.parametrize(("extra", "param"), [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": None}]}, "messages.0.content"),  # not "...content.str"
])
def test_a_chat_completion_the_server_cannot_honour_is_refused_by_name(api, extra, param):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], **extra}
    r = api.post("/v1/chat/completions", headers=AUTH, json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_neutral_values_that_clients_send_by_default_are_accepted(api):
    r = api.post("/v1/chat/completions", headers=AUTH, json={
        "model": MODEL, "messages": [{"role": "system", "content": "be brief"},
                                     {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "n": 1, "presence_penalty": 0, "frequency_penalty": 0, "logprobs": False, "user": "u1",
        "tool_choice": "none", "response_format": {"type": "text"}, "max_completion_tokens": 3})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3


def test_a_body_that_is_not_json_is_a_400_in_openais_shape(api):
    for content in (b"{not json", b"[1, 2]", b""):
        for path in ("/v1/completions", "/v1/chat/completions"):
            r = api.post(path, headers={**AUTH, "Content-Type": "application/json"}, content=content)
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", (content, r.text)
    r = api.post("/v1/chat/completions", headers=AUTH)  # no body at all
    assert r.status_code == 400 and "must be a JSON object" in r.json()["error"]["message"], r.text


def test_a_wrong_or_missing_key_is_401_and_health_needs_none(api):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = api.get("/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert api.get("/health").json()["status"] == "ok"
    assert api.get("/nowhere", headers=AUTH).status_code == 404


def test_a_prompt_past_the_context_is_a_400_that_says_so(api):
    r = api.post("/v1/completions", headers=AUTH, json={"model": MODEL, "prompt": [65] * 1020, "max_tokens": 10})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    # Without max_tokens the answer is cut to what the context still holds.
    r = api.post("/v1/completions", headers=AUTH, json={"model": MODEL, "prompt": [65] * 1020})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 4


def test_truncate_prompt_tokens_keeps_the_prompts_tail_and_usage_counts_what_was_read(api, engine):
    ids = [(7 * i) % 250 + 3 for i in range(1030)]
    expected = engine.generate(ids[-20:], engine.params(max_new_tokens=5)).token_ids
    r = api.post("/v1/completions", headers=AUTH, json={"model": MODEL, "prompt": ids, "max_tokens": 5,
                                                         "truncate_prompt_tokens": 20})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 20
    assert r.json()["choices"][0]["text"] == engine.tokenizer.decode(expected, skip_special_tokens=True)
    r = api.post("/v1/completions", headers=AUTH, json={"model": MODEL, "prompt": ids, "max_tokens": 5,
                                                         "truncate_prompt_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "truncate_prompt_tokens"


def test_a_server_started_with_truncate_prompt_fits_long_prompts_to_the_context(tiny_llama):
    from edge_worker.config import EdgeConfig
    from edge_worker.engine import EdgeEngine

    ids = [(7 * i) % 250 + 3 for i in range(1030)]
    with EdgeEngine(MODEL, EdgeConfig(force_local=True, truncate_prompt=True)) as cutting, client(cutting) as c:
        r = c.post("/v1/completions", headers=AUTH, json={"model": MODEL, "prompt": ids, "max_tokens": 4})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == 1020
        expected = cutting.generate(ids[-1020:], cutting.params(max_new_tokens=4)).token_ids
        assert r.json()["choices"][0]["text"] == cutting.tokenizer.decode(expected, skip_special_tokens=True)


def test_a_split_generation_with_no_cloud_and_no_fallback_is_503(tiny_llama):
    from fastapi.testclient import TestClient

    from edge_worker.config import EdgeConfig
    from edge_worker.engine import EdgeEngine
    from edge_worker.openai_api import create_app

    settings = EdgeConfig(split=2, fallback_local=False, broker="tcp://127.0.0.1:9", encryption=False,
                          step_deadline_s=1.0, request_timeout_s=0.5)
    with EdgeEngine(MODEL, settings) as split, TestClient(create_app(split)) as c:
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable", r.text
        assert c.get("/health").json()["status"] == "ok", "the server still serves after it"


def test_the_metrics_count_requests_tokens_and_latency(engine):
    with client(engine) as c:
        c.post("/v1/completions", headers=AUTH, json={"model": MODEL, "prompt": "count", "max_tokens": 4})
        c.post("/v1/completions", headers=AUTH, json={"model": "nope", "prompt": "x"})
        text = c.get("/metrics", headers=AUTH).text
    assert 'edgecloud_http_requests_total{endpoint="/v1/completions",status="200"} 1.0' in text
    assert 'edgecloud_http_requests_total{endpoint="/v1/completions",status="404"} 1.0' in text
    assert "edgecloud_completion_tokens_total 4.0" in text
    assert "edgecloud_time_to_first_token_seconds_count 1.0" in text
    assert "edgecloud_active_generations 0.0" in text


def test_token_ids_outside_the_vocabulary_are_a_400_on_the_prompt(api, engine):
    vocab = int(engine.source.config.vocab_size)
    r = api.post("/v1/completions", headers=AUTH, json={"model": MODEL, "prompt": [1, vocab, 2], "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert f"[0, {vocab})" in r.json()["error"]["message"]


def test_a_busy_cloud_is_a_503_that_passes_on_its_retry_hint():
    from broker.errors import Busy, WorkerLost
    from edge_worker.openai_api import engine_error

    busy = engine_error(Busy("this client holds 32 sessions", retry_after_s=2.2))
    assert (busy.status, busy.headers) == (503, {"Retry-After": "3"})
    assert "32 sessions" in busy.body()["error"]["message"] and busy.body()["error"]["code"] == "busy"
    assert engine_error(WorkerLost("gone")).headers == {}
