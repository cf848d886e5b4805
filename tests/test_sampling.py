"""Sampling options (repetition penalty, min-p, top-k, top-p) through transformers' processors:
the rule itself, and the same text whether the head runs here, behind a backend, under drafts
or pipelined frames. The real worker's side is in test_pipeline.py."""

from __future__ import annotations

import pytest
import torch

from edge_worker.backends import LocalBackend
from edge_worker.generation import EdgeGenerator
from edge_worker.mini_llm import MiniLLMHandler
from partition.sampling import SamplingParams, choose_token, greedy_token, probabilities, processed_logits
from partition.segment import ModelSegment
from partition.speculative import verify_drafts
from partition.tokens import eos_token_ids

PENALISED = SamplingParams(repetition_penalty=1.8)
PENALISED_SAMPLE = SamplingParams(temperature=0.9, top_p=0.95, seed=5, top_k=40, min_p=0.02, repetition_penalty=1.5)


# --- the rule -------------------------------------------------------------------------------------


def test_the_penalty_makes_a_generated_token_less_likely_on_either_sign():
    logits = torch.tensor([4.0, 3.0, -1.0, -2.0])
    out = processed_logits(logits, PENALISED, seen=[0, 2])
    assert out.tolist() == pytest.approx([4.0 / 1.8, 3.0, -1.0 * 1.8, -2.0])
    assert choose_token(logits, PENALISED, 0, seen=[0]) == 1, "the repeated top token loses to the next"
    assert choose_token(logits, PENALISED, 0) == 0, "nothing generated yet: nothing penalised"
    assert choose_token(logits, SamplingParams(), 0, seen=[0]) == 0, "no penalty: seen is ignored"


def test_the_greedy_token_is_torchs_argmax_the_first_of_equals_on_any_dtype():
    gen = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for _ in range(20):
                row = torch.randn(49152, generator=gen).to(dtype)
                assert greedy_token(row, SamplingParams()) == int(torch.argmax(row.float()))
    tied = torch.tensor([1.0, 5.0, 2.0, 5.0, 5.0])
    assert greedy_token(tied, SamplingParams()) == int(torch.argmax(tied)) == 1
    assert greedy_token(tied, PENALISED, seen=[1]) == 3, "the penalised first maximum loses to the next equal one"
    assert greedy_token(torch.tensor([0.0, float("nan"), 9.0]), SamplingParams()) == 1, "a NaN wins, as in torch"


def test_min_p_keeps_the_tokens_within_a_fraction_of_the_most_likely():
    probs_in = torch.tensor([0.5, 0.3, 0.12, 0.05, 0.03])
    probs = probabilities(torch.log(probs_in), SamplingParams(temperature=1.0, min_p=0.2))
    assert probs.nonzero().flatten().tolist() == [0, 1, 2]  # 0.05 < 0.2 * 0.5
    assert probs.sum().item() == pytest.approx(1.0)


def test_options_travel_to_the_worker_and_bad_values_are_refused():
    assert SamplingParams.from_wire(PENALISED_SAMPLE.to_wire()) == PENALISED_SAMPLE
    assert set(SamplingParams(0.7).to_wire()) == {"temperature", "top_p", "seed"}, "off options are not sent"
    for bad in ({"min_p": 1.5}, {"min_p": -0.1}, {"repetition_penalty": 0.0}, {"repetition_penalty": float("nan")},
                {"temperature": float("nan")}, {"seed": 2**64}, {"seed": -(2**63) - 1}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    for edge in (2**64 - 1, -(2**63)):  # the wire's integers carry both ends
        assert SamplingParams.from_wire(SamplingParams(1.0, seed=edge).to_wire()).seed == edge


def test_verifying_drafts_under_a_penalty_reads_the_drafts_before_each_row():
    """Row i of a verification sees the drafts before it: the drafts a token-by-token greedy
    generation with the penalty produces are all kept, and the bonus token is its next."""
    logits = torch.full((4, 10), -1.0)
    logits[:, 3], logits[:, 4], logits[:, 5], logits[:, 6] = 5.0, 4.0, 3.0, 2.9
    sequential: list[int] = []
    for i in range(4):
        sequential.append(choose_token(logits[i], PENALISED, i, sequential))
    assert sequential == [3, 4, 5, 6]  # each row's best token is the one not generated yet
    assert verify_drafts(logits, sequential[:3], PENALISED, 0) == (3, 6)
    # Drafts after a token generated earlier: the first row already sees it.
    assert verify_drafts(logits[:3], [4, 5], PENALISED, 1, seen=[3]) == (2, 6)
    assert verify_drafts(logits[:3], [4, 5], SamplingParams(), 1, seen=[3]) == (0, 3)


# --- the same text on every path -----------------------------------------------------------------


def reference_greedy(model, ids: list[int], n: int, penalty: float) -> list[int]:
    """Full forward passes over the growing sequence, transformers' penalty on the generated ids."""
    from transformers import RepetitionPenaltyLogitsProcessor

    rule = RepetitionPenaltyLogitsProcessor(penalty)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids + out])).logits[:, -1].float()
            if out:
                logits = rule(torch.tensor([out]), logits)
            out.append(int(logits.argmax()))
    return out


def generator(source, k: int, mini: MiniLLMHandler | None = None, pipelined: bool = False) -> EdgeGenerator:
    tokenizer = source.load_tokenizer()
    local = k == source.n_layers
    edge = ModelSegment.load(source, 0, k, head=local or bool(mini and mini.needs_edge_head))
    backend = None if local else LocalBackend(ModelSegment.load(source, k, source.n_layers, embed=False),
                                              pipelined=pipelined)
    settings = mini.settings(source, edge, tokenizer) if mini else None
    return EdgeGenerator(edge, backend, tokenizer, eos_token_ids(source, tokenizer),
                         "local" if local else "hybrid", mini=settings)


def test_a_penalised_greedy_generation_equals_the_reference_loop(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama.directory).eval()
    ids = tiny_llama.load_tokenizer()("abcabcabc abcabcabc abc")["input_ids"]
    result = generator(tiny_llama, tiny_llama.n_layers).generate(ids, 24, PENALISED)
    assert result.token_ids == reference_greedy(model, ids, 24, 1.8)
    plain = generator(tiny_llama, tiny_llama.n_layers).generate(ids, 24)
    assert plain.token_ids != result.token_ids, "the penalty must change this text"


@pytest.mark.parametrize("sampling", [PENALISED, PENALISED_SAMPLE], ids=["greedy", "sampled"])
def test_split_drafted_and_pipelined_runs_equal_the_local_one(tiny_llama, sampling):
    ids = tiny_llama.load_tokenizer()("The quick brown fox jumps over the lazy dog. The quick brown")["input_ids"]
    local = generator(tiny_llama, tiny_llama.n_layers).generate(ids, 24, sampling).token_ids
    assert generator(tiny_llama, 2).generate(ids, 24, sampling).token_ids == local
    # The main model as its own drafter: verified rows that must see the drafts before them.
    # Sampled verification draws other random numbers than plain sampling (the same distribution,
    # not the same text), so there it must repeat itself; greedy, it must be the local text.
    verify = MiniLLMHandler(model="tiny-llama", threshold=0.0, max_draft=4, adaptive=False, pipeline=False)
    drafted = generator(tiny_llama, 2, verify).generate(ids, 24, sampling)
    assert drafted.tokens_drafted > 0
    if sampling.greedy:
        assert drafted.token_ids == local
    else:
        assert drafted.token_ids == generator(tiny_llama, 2, verify).generate(ids, 24, sampling).token_ids
    piped = MiniLLMHandler(model="tiny-llama", threshold=0.0, max_draft=3, adaptive=False)
    pipelined = generator(tiny_llama, 2, piped, pipelined=True).generate(ids, 24, sampling)
    assert pipelined.token_ids == local and pipelined.tokens_drafted > 0


class RecordingBackend(LocalBackend):
    """A LocalBackend that notes what generated tokens each step it runs was given."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[int, list[int]]] = []

    def step(self, hidden, step, draft=(), seen=()):
        self.calls.append((step, list(seen)))
        return super().step(hidden, step, draft, seen)


@pytest.mark.parametrize("how", ["plain", "verify", "trust", "pipelined"])
def test_every_step_is_given_the_tokens_generated_before_it(tiny_llama, how):
    """The penalty's input on every path: a step that produces generation index s (after its
    drafts, in trust mode) is given exactly the tokens generated before s, guesses included."""
    ids = tiny_llama.load_tokenizer()("abcabcabc abcabcabc abc")["input_ids"]
    mini = None if how == "plain" else MiniLLMHandler(
        model="tiny-llama", threshold=0.0, max_draft=3, adaptive=False, pipeline=how == "pipelined",
        mode="trust" if how == "trust" else "verify")
    gen = generator(tiny_llama, 2, mini, pipelined=how == "pipelined")
    gen.backend = RecordingBackend(gen.backend.segment, pipelined=how == "pipelined")
    tokens = gen.generate(ids, 20, PENALISED).token_ids
    assert len(gen.backend.calls) > 1
    for step, seen in gen.backend.calls:
        assert seen == tokens[:step], (how, step)
