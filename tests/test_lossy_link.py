"""A lossy, duplicating link between edge and broker: each lost message costs about one step time."""

from __future__ import annotations

import time

import pytest

from broker.linkproxy import LinkConfig
from broker.wire.crypto import load_api_keys
from edge_worker.cloud_client import CloudClient
from edge_worker.generation import EdgeGenerator
from partition.segment import ModelSegment
from partition.tokens import encode_prompt, eos_token_ids

pytestmark = pytest.mark.integration  # every test here starts real processes


pytestmark = pytest.mark.timeout(180)
TOKENS = 60
REQUEST_TIMEOUT_S = 2.0


class TimedBackend:
    """Delegates to a backend and records each step's wall time (what a lost message costs)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.step_s: list[float] = []

    def start(self, sampling) -> None:
        self.inner.start(sampling)

    def step(self, hidden, step, draft=(), seen=()):
        t0 = time.perf_counter()
        out = self.inner.step(hidden, step, draft, seen)
        self.step_s.append(time.perf_counter() - t0)
        return out

    def prime(self, hidden) -> None:
        self.inner.prime(hidden)

    def close(self) -> None:
        self.inner.close()


def test_lost_decode_messages_cost_a_copy_after_one_round_trip_not_the_request_timeout(tiny_cluster, tiny_llama):
    source = tiny_llama
    tok = source.load_tokenizer()
    ids = encode_prompt(tok, "Describe a lighthouse at night.", raw=True)
    eos = eos_token_ids(source, tok)
    local = EdgeGenerator(ModelSegment.load(source, 0, source.n_layers), None, tok, eos, "local").generate(ids, TOKENS)
    link = LinkConfig(drop_rate=0.05, duplicate_rate=0.05, seed=11)
    client = CloudClient(api_key=sorted(load_api_keys(tiny_cluster.keys_dir / "api_keys.txt"))[0],
                         broker=tiny_cluster.endpoint, keys_dir=tiny_cluster.keys_dir,
                         request_timeout_s=REQUEST_TIMEOUT_S, step_deadline_s=30, link=link)
    try:
        backend = TimedBackend(client.session(source.model_id, 2, source.hidden_size))
        result = EdgeGenerator(ModelSegment.load(source, 0, 2), backend, tok, eos, "hybrid").generate(ids, TOKENS)
        dropped = client._proxy.stats().dropped if client._proxy is not None else None
    finally:
        client.close()
    assert result.token_ids == local.token_ids
    assert dropped, "the link dropped nothing: the test would prove nothing"
    # Past the first few steps (the timer needs samples), no step waited out the request timeout:
    # a lost request or reply was answered by a copy after about one round trip.
    copies = sum(t["retries"] for t in result.trace[5:])
    worst_s = max(backend.step_s[5:])
    assert copies >= 1, (dropped, result.retries)
    assert worst_s < REQUEST_TIMEOUT_S / 2, (worst_s, sorted(backend.step_s)[-5:])


def test_a_late_copy_of_an_earlier_step_is_refused_and_leaves_the_cache_alone(tiny_cluster, tiny_llama):
    """A reordering link can deliver a copy of step s after step s+1; running it would crop s+1."""
    import torch

    from broker.errors import ProtocolError
    from broker.wire.session_protocol import seal_step
    from partition.sampling import SamplingParams

    source = tiny_llama
    client = CloudClient(api_key=sorted(load_api_keys(tiny_cluster.keys_dir / "api_keys.txt"))[0],
                         broker=tiny_cluster.endpoint, keys_dir=tiny_cluster.keys_dir, request_timeout_s=10)
    try:
        session = client.session(source.model_id, 2, source.hidden_size)
        session.start(SamplingParams())
        first = torch.randn(1, 3, source.hidden_size)
        session.step(first, 0)
        late_copy = seal_step(session.cipher, session.session_id, 0, 0, first, "fp16")
        session.step(torch.randn(1, 1, source.hidden_size), 1)
        with pytest.raises(ProtocolError, match="stale_step"):
            client.connection.request(session.session_id, "step", source.model_id, 2, 0, late_copy, timeout_s=10)
        session.step(torch.randn(1, 1, source.hidden_size), 2)  # the cache still holds 4 positions
        assert session.pos == 5
    finally:
        client.close()
