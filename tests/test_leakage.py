"""The inversion attacks of partition/leakage.py on the tiny model: they find what is there and
nothing that is not."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from partition import leakage as L

SPLITS = (0, 1, 3)
# Enough for the tiny model's 257 tokens; the real table uses L.MLP_STEPS.
STEPS = 150


def fp16_view(hidden: torch.Tensor, k: int) -> torch.Tensor:
    from broker.wire.codec import decode_tensor, encode_tensor

    meta, data = encode_tensor(hidden, "fp16")
    return decode_tensor(meta, bytes(data))


@pytest.fixture(scope="module")
def data(tiny_llama):
    tok = tiny_llama.load_tokenizer()
    # The byte tokenizer makes ~12k calibration tokens of the shipped text; a third is plenty here.
    train_par = L.read_paragraphs(L.DEFAULT_TRAIN_TEXT)[:12]
    test_par = L.read_paragraphs(L.DEFAULT_TEST_TEXT)[:5]
    train = L.collect_boundary(tiny_llama, L.chunk_token_ids(tok, train_par), SPLITS)
    test = L.collect_boundary(tiny_llama, L.chunk_token_ids(tok, test_par), SPLITS)
    emb_unit = L._unit(L.embedding_matrix(tiny_llama))
    return train, test, emb_unit


def test_the_shipped_train_and_test_texts_are_disjoint():
    from partition.reduction import CALIBRATION_TEXT

    # The attacker may train on both shipped calibration texts (ours and the reduction's).
    train = set(L.read_paragraphs(L.DEFAULT_TRAIN_TEXT)) | set(L.read_paragraphs(CALIBRATION_TEXT))
    test = L.read_paragraphs(L.DEFAULT_TEST_TEXT)
    assert train and test and not train & set(test)
    # Not merely different paragraphs: no 8-word run of the test text appears in the calibration text.
    train_text = " ".join(train)
    for p in test:
        words = p.split()
        for i in range(len(words) - 7):
            assert " ".join(words[i : i + 8]) not in train_text, words[i : i + 8]


def test_collected_activations_are_what_the_edge_segment_sends(tiny_llama, data):
    from partition.segment import ModelSegment

    train, _, _ = data
    first = train.positions.tolist().index(0, 1)  # the first sequence is [0, first)
    ids = train.token_ids[:first].unsqueeze(0)
    edge = ModelSegment.load(tiny_llama, 0, 3)
    expected = edge(ids, edge.new_cache(), logits="none").hidden[0]
    torch.testing.assert_close(train.hidden[3][:first], expected)
    assert train.hidden[0].shape == (len(train.token_ids), tiny_llama.hidden_size)


def test_nearest_neighbour_recovers_every_token_from_the_embedding_itself(data):
    train, test, emb_unit = data
    cell = L.leakage_cell(0, "fp16", fp16_view, train, test, emb_unit, attacks=("nn",))
    assert cell.scores["nn"] == 1.0 and cell.dims == 64


def test_a_trained_probe_recovers_tokens_from_deeper_splits(data):
    train, test, emb_unit = data
    cell = L.leakage_cell(1, "fp16", fp16_view, train, test, emb_unit, attacks=("ridge", "mlp"), mlp_steps=STEPS)
    assert cell.recovered > 0.5, cell.scores
    assert cell.recovered > 3 * L.majority_baseline(train, test)


def test_a_view_that_carries_no_information_recovers_no_more_than_guessing(data):
    """The attacks only read what the view gives them: noise unrelated to the input teaches nothing."""
    train, test, emb_unit = data
    gen = torch.Generator().manual_seed(1)

    def noise(hidden, k):
        return torch.randn(hidden.shape, generator=gen)

    cell = L.leakage_cell(1, "noise", noise, train, test, emb_unit, mlp_steps=STEPS)
    assert cell.recovered <= L.majority_baseline(train, test) + 0.05, cell.scores


def test_reduced_views_skip_nearest_neighbour_and_still_face_the_probes(data):
    train, test, emb_unit = data
    proj = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(2)))[0][:, :16]

    def reduced(hidden, k):
        return hidden @ proj  # (n, 16)

    cell = L.leakage_cell(1, "reduce-16", reduced, train, test, emb_unit, mlp_steps=STEPS)
    assert set(cell.scores) == {"ridge", "mlp"} and cell.dims == 16
    full = L.leakage_cell(1, "fp16", fp16_view, train, test, emb_unit, attacks=("ridge",))
    assert cell.scores["ridge"] <= full.scores["ridge"]


def test_verification_recomputes_candidates_and_keeps_the_one_that_matches(tiny_llama, data):
    """Candidates holding the true token plus decoys: recomputing layers [0, k) with the recovered
    prefix singles out the true one, through a lossy view too."""
    train, test, emb_unit = data
    n = min(len(test.token_ids), 40)
    gen = torch.Generator().manual_seed(3)
    decoys = torch.randint(0, emb_unit.shape[0], (len(test.token_ids), 7), generator=gen)
    cands = torch.cat([decoys, test.token_ids[:, None]], 1)  # the truth last, never first
    observed = L.worker_view(test, 3, fp16_view)
    pred, at = L.verify_attack(tiny_llama, 3, fp16_view, test, observed, cands, max_positions=n)
    assert len(at) >= n and L.recovery(pred, test.token_ids[at]) > 0.95
    # Through leakage_cell: the candidates are the probe's nearest tokens, as many as asked for.
    one = L.leakage_cell(3, "fp16", fp16_view, train, test, emb_unit, attacks=("ridge",), source=tiny_llama,
                         verify_positions=n, verify_candidates=1)
    many = L.leakage_cell(3, "fp16", fp16_view, train, test, emb_unit, attacks=("ridge",), source=tiny_llama,
                          verify_positions=n, verify_candidates=64)
    assert many.scores["verify"] >= one.scores["verify"]
    with pytest.raises(L.LeakageInputError, match="at least one candidate"):
        L.leakage_cell(3, "fp16", fp16_view, train, test, emb_unit, attacks=("ridge",), source=tiny_llama,
                       verify_positions=n, verify_candidates=0)
    # Without the true token among them, verification cannot invent it.
    pred, at = L.verify_attack(tiny_llama, 3, fp16_view, test, observed, decoys, max_positions=n)
    assert L.recovery(pred, test.token_ids[at]) < 0.2


def test_a_repeated_cache_continues_each_row_like_the_original(tiny_llama):
    from partition.segment import ModelSegment

    seg = ModelSegment.load(tiny_llama, 0, 2)
    cache = seg.new_cache()
    seg(torch.tensor([[5, 6, 7]]), cache, logits="none")
    batch = seg(torch.tensor([[8], [9]]), cache.repeated(2), logits="none").hidden  # (2, 1, H)
    for row, tok in enumerate((8, 9)):
        one = cache.repeated(1)
        single = seg(torch.tensor([[tok]]), one, logits="none").hidden[0]
        torch.testing.assert_close(batch[row], single)
    assert cache.length == 3  # the original is untouched


def test_a_row_of_a_batched_cache_continues_like_that_candidate_alone(tiny_llama):
    from partition.segment import ModelSegment

    seg = ModelSegment.load(tiny_llama, 0, 2)
    cache = seg.new_cache()
    seg(torch.tensor([[5, 6, 7]]), cache, logits="none")
    trial = cache.repeated(3)
    seg(torch.tensor([[8], [9], [10]]), trial, logits="none")
    kept = trial.row(1)  # as if 9 had been chosen
    assert kept.length == 4
    reference = cache.repeated(1)
    seg(torch.tensor([[9]]), reference, logits="none")
    after_9 = seg(torch.tensor([[11]]), reference, logits="none").hidden
    torch.testing.assert_close(seg(torch.tensor([[11]]), kept, logits="none").hidden, after_9)
    other = trial.row(2)  # the row that tried 10 continues differently
    assert not torch.allclose(seg(torch.tensor([[11]]), other, logits="none").hidden, after_9)
    with pytest.raises(IndexError):
        trial.row(3)


def test_bad_inputs_are_refused_clearly(tiny_llama, tmp_path):
    with pytest.raises(L.LeakageInputError, match="splits must be in"):
        L.collect_boundary(tiny_llama, [[1, 2]], [4])
    with pytest.raises(L.LeakageInputError, match="no token sequences"):
        L.collect_boundary(tiny_llama, [], [1])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(L.LeakageInputError, match="holds no text"):
        L.read_paragraphs(empty)
    with pytest.raises(L.LeakageInputError, match="unknown attack"):
        L.run_attack("guess", torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), torch.zeros(2, 4),
                     torch.zeros(3, 4))


@pytest.mark.integration
def test_the_bench_prints_one_json_table(tmp_path):
    from cli.cluster import ROOT, child_env

    train, test = tmp_path / "train.txt", tmp_path / "test.txt"
    train.write_text("\n\n".join(L.read_paragraphs(L.DEFAULT_TRAIN_TEXT)[:6]))
    test.write_text("\n\n".join(L.read_paragraphs(L.DEFAULT_TEST_TEXT)[:2]))
    out = subprocess.run(
        [sys.executable, "bench/bench_leakage.py", "--model", "tiny-llama", "--splits", "0,2",
         "--attacks", "nn,ridge", "--train-text", str(train), "--test-text", str(test), "--json",
         "--protections", "fp16,int8+d16", "--verify-splits", "2", "--verify-positions", "20"],
        capture_output=True, text=True, timeout=240, cwd=ROOT, env=child_env(),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    cells = {(c["split"], c["protection"]): c for c in result["cells"]}
    assert set(cells) == {(0, "fp16"), (0, "int8+d16"), (2, "fp16"), (2, "int8+d16")}
    assert cells[(0, "fp16")]["recovered"] == 1.0
    assert cells[(2, "int8+d16")]["dims"] == 16 and "nn" not in cells[(2, "int8+d16")]["scores"]
    assert "verify" in cells[(2, "fp16")]["scores"] and "verify" not in cells[(0, "fp16")]["scores"]
    assert result["train_tokens"] > result["test_tokens"] > 0
    saved = tmp_path / "table.json"
    saved.write_text(out.stdout)
    table = subprocess.run([sys.executable, "bench/bench_leakage.py", "--render", str(saved)],
                           capture_output=True, text=True, timeout=60, cwd=ROOT, env=child_env())
    assert table.returncode == 0, table.stderr[-2000:]
    rows = [line for line in table.stdout.splitlines() if line.startswith("| 2 |")]
    assert len(rows) == 1 and "**verify" in rows[0].split("|")[2] and "**verify" not in rows[0].split("|")[3]


def test_the_shipped_smollm2_table_is_complete_and_loads_for_the_planner():
    """Every split x protection of BENCHMARKS.md, every attack in every cell, as --max-leakage reads it."""
    table = json.loads((L.DATA_DIR / "leakage-smollm2-135m.json").read_text())
    splits = {0, 1, 2, 5, 10, 15, 20, 25}
    protections = ("fp16", "int8", "fp16+d384", "fp16+d128", "fp16+d32")
    cells = {(c["split"], c["protection"]): c for c in table["cells"]}
    assert set(cells) == {(k, p) for k in splits for p in protections}
    for (_, p), c in cells.items():
        expected = {"ridge", "mlp", "verify"} | ({"nn"} if "+d" not in p else set())
        assert set(c["scores"]) == expected and c["recovered"] == max(c["scores"].values())
    assert table["verify_positions"] >= 128 and not table["test_text"].startswith("/")
    for p in protections:
        assert set(L.measured_leakage(table["model"], p)) == splits
