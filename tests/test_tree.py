"""Token trees (partition/tree.py): one pass over a tree computes, at every node, what the plain
sequence root..node computes; the accepted path kept in the cache continues like a plain run."""

from __future__ import annotations

import pytest
import torch

from partition.segment import ModelSegment
from partition.tree import MAX_TREE_NODES, DraftTree, TreeError

# Root (the pending token) -> nodes 0 (5) and 1 (9); 0 -> 2 (7) and 3 (8); 2 -> 4 (11); 1 -> 5 (6).
TREE = DraftTree(tokens=(5, 9, 7, 8, 11, 6), parents=(-1, -1, 0, 0, 2, 1))


def test_a_tree_knows_its_rows_depths_ancestors_and_mask():
    assert TREE.rows == 7 and TREE.depths() == [0, 1, 1, 2, 2, 3, 2]
    anc = TREE.ancestors()
    assert anc[5].nonzero().flatten().tolist() == [0, 1, 3, 5]  # node 4 (row 5): root, 0, 2, itself
    assert anc[6].nonzero().flatten().tolist() == [0, 2, 6]
    mask = TREE.mask(past=3, dtype=torch.float32)
    assert mask.shape == (1, 1, 7, 10)
    assert bool((mask[0, 0, :, :3] == 0).all())  # every row sees the cache
    assert (mask[0, 0, 5, 3:] == 0).nonzero().flatten().tolist() == [0, 1, 3, 5]
    assert TREE.positions(3).tolist() == [[3, 4, 4, 5, 5, 6, 5]]
    windowed = TREE.mask(past=3, dtype=torch.float32, window=3)  # row 5 sits at position 6: keys 4..6 only
    assert (windowed[0, 0, 5] == 0).nonzero().flatten().tolist() == [4, 6, 8]
    assert DraftTree.chain([4, 5]).parents == (-1, 0)


def test_accept_follows_the_main_models_choices_down_the_tree():
    # choices[r]: the main model's token after row r.
    assert TREE.accept([5, 7, 0, 11, 0, 42, 0]) == ([0, 1, 3, 5], 42)  # root -> 5 -> 7 -> 11, then 42
    assert TREE.accept([9, 0, 6, 0, 0, 0, 13]) == ([0, 2, 6], 13)
    assert TREE.accept([1, 0, 0, 0, 0, 0, 0]) == ([0], 1)  # no child is the model's token
    assert TREE.path_tokens([0, 1, 3, 5]) == [5, 7, 11]
    with pytest.raises(TreeError, match="a choice per frame row"):
        TREE.accept([5])


@pytest.mark.parametrize(("tokens", "parents", "match"), [
    ((1, 2), (-1,), "a parent per node"),
    ((1, 2), (-1, 1), "not the root"),
    ((1, 1), (-1, -1), "twice under the same parent"),
    (tuple(range(MAX_TREE_NODES + 1)), tuple(range(-1, MAX_TREE_NODES)), "at most"),
])
def test_bad_trees_are_refused(tokens, parents, match):
    with pytest.raises(TreeError, match=match):
        DraftTree(tokens, parents)


def _plain_logits(segment: ModelSegment, ids: list[int]) -> torch.Tensor:
    return segment(torch.tensor([ids]), segment.new_cache(), logits="last").logits[0, -1]


def _paths(tree: DraftTree) -> dict[int, list[int]]:
    """Frame row -> the tokens from the root's child down to that row."""
    paths = {0: []}
    for i, (t, p) in enumerate(zip(tree.tokens, tree.parents, strict=True)):
        paths[i + 1] = paths[p + 1] + [t]
    return paths


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_one_tree_pass_computes_every_path_and_the_kept_path_continues_like_a_plain_run(fixture, request):
    source = request.getfixturevalue(fixture)
    full = ModelSegment.load(source, 0, source.n_layers)
    prompt, pending = [3, 17, 29, 4], 12
    cache = full.new_cache()
    full(torch.tensor([prompt]), cache, logits="none")
    x = torch.tensor([[pending, *TREE.tokens]])
    logits = full(x, cache, logits="all", tree=TREE).logits[0]
    for row, path in _paths(TREE).items():
        torch.testing.assert_close(logits[row], _plain_logits(full, prompt + [pending] + path), rtol=1e-4, atol=1e-4)
    rows, _ = TREE.accept([5, 7, 0, 11, 0, 42, 0])
    cache.keep(len(prompt), rows)
    assert cache.length == len(prompt) + 4
    kept = prompt + [pending, *TREE.path_tokens(rows)]
    after = full(torch.tensor([[42]]), cache, logits="last").logits[0, -1]
    torch.testing.assert_close(after, _plain_logits(full, kept + [42]), rtol=1e-4, atol=1e-4)


def test_a_tree_runs_split_across_edge_and_cloud_as_on_the_whole_model(tiny_llama):
    n, k = tiny_llama.n_layers, 1
    full = ModelSegment.load(tiny_llama, 0, n)
    edge = ModelSegment.load(tiny_llama, 0, k)
    cloud = ModelSegment.load(tiny_llama, k, n, embed=False)
    prompt = [3, 17, 29, 4]
    caches = [s.new_cache() for s in (full, edge, cloud)]
    full(torch.tensor([prompt]), caches[0], logits="none")
    cloud(edge(torch.tensor([prompt]), caches[1], logits="none").hidden, caches[2], logits="none")
    x = torch.tensor([[12, *TREE.tokens]])
    whole = full(x, caches[0], logits="all", tree=TREE).logits[0]
    hidden = edge(x, caches[1], logits="none", tree=TREE).hidden
    split = cloud(hidden, caches[2], logits="all", tree=TREE).logits[0]
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)
    rows, token = TREE.accept(whole.argmax(-1).tolist())
    for cache in caches:
        cache.keep(len(prompt), rows)
    nxt = torch.tensor([[token]])
    a = full(nxt, caches[0], logits="last").logits[0, -1]
    b = cloud(edge(nxt, caches[1], logits="none").hidden, caches[2], logits="last").logits[0, -1]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_keep_refuses_rows_that_are_not_ascending_positions_it_holds(tiny_llama):
    seg = ModelSegment.load(tiny_llama, 0, tiny_llama.n_layers)
    cache = seg.new_cache()
    seg(torch.tensor([[1, 2, 3, 4]]), cache, logits="none")
    with pytest.raises(ValueError, match="ascending"):
        cache.keep(2, [1, 0])
    with pytest.raises(ValueError, match="ascending"):
        cache.keep(2, [0, 2])
    cache.keep(2, [0, 1])  # the plain continuation: a crop
    assert cache.length == 4


def test_tree_verification_greedy_follows_the_argmax_and_a_chain_draws_what_verify_drafts_draws():
    from partition.sampling import SamplingParams
    from partition.speculative import verify_drafts, verify_tree

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(TREE.rows, 16, generator=gen)
    choices = logits.argmax(-1).tolist()
    assert verify_tree(logits, TREE, SamplingParams(), step=3) == TREE.accept(choices)
    chain = DraftTree.chain([4, 9, 2])
    for seed in range(40):
        params = SamplingParams(temperature=1.0, seed=seed)
        rows = torch.randn(chain.rows, 16, generator=gen)
        rows[0, 4] += 3.0  # make the first draft likely, so paths of several lengths occur
        path, token = verify_tree(rows, chain, params, step=5)
        accepted, expected = verify_drafts(rows, [4, 9, 2], params, step=5)
        assert (len(path) - 1, token) == (accepted, expected)


def test_tree_verification_with_sampling_emits_the_main_models_distribution():
    """Three candidates under the root, drawn many times with different seeds: the first emitted
    token (a kept child, or the draw from what is left) follows p, whatever the candidates."""
    from partition.sampling import SamplingParams, probabilities
    from partition.speculative import verify_tree

    vocab = 6
    row = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, 1.5])
    logits = torch.stack([row] + [torch.zeros(vocab)] * 3)
    tree = DraftTree(tokens=(1, 3, 5), parents=(-1, -1, -1))  # the model's 2nd, 4th and 3rd choices
    p = probabilities(row, SamplingParams(temperature=1.0))
    counts = torch.zeros(vocab)
    draws = 6000
    for seed in range(draws):
        path, token = verify_tree(logits, tree, SamplingParams(temperature=1.0, seed=seed), step=0)
        first = tree.tokens[path[1] - 1] if len(path) > 1 else token
        counts[first] += 1
    freq = counts / draws
    # Binomial standard error at 6000 draws is at most 0.0065: allow four of them.
    assert torch.allclose(freq, p, atol=0.026), (freq, p)


def _next_local(source, ids: list[int]) -> int:
    full = ModelSegment.load(source, 0, source.n_layers)
    return int(full(torch.tensor([ids]), full.new_cache(), logits="last").logits[0, -1].argmax())


def _greedy_tree_case(source):
    """(prompt, the local run's next four tokens, a tree whose accepted path is root -> node 1 ->
    node 3 under greedy). The pending token is greedy[0]; under it the right greedy[1] beside a
    wrong token, under that the right greedy[2] beside another: greedy[3] follows the path."""
    full = ModelSegment.load(source, 0, source.n_layers)
    prompt = [3, 17, 29, 4]
    greedy, cache, x = [], full.new_cache(), torch.tensor([prompt])
    for _ in range(4):
        token = int(full(x, cache, logits="last").logits[0, -1].argmax())
        greedy.append(token)
        x = torch.tensor([[token]])
    wrong = [t for t in range(5, 60) if t not in greedy][:2]
    return prompt, greedy, DraftTree(tokens=(wrong[0], greedy[1], wrong[1], greedy[2]), parents=(-1, -1, 1, 1))


def test_a_worker_verifies_a_tree_step_keeps_the_path_and_continues_like_local(tiny_llama):
    """A real worker (in-process, its connection to a real broker) gets a tree frame: it answers
    with the path the main model takes through the tree, keeps only that path in its cache, and
    the next plain step gives the token a local run gives."""
    from brokerutil import in_process_worker

    from broker.wire.crypto import NullCipher
    from broker.wire.session_protocol import new_close_key, open_step_reply, seal_step

    k = 1
    prompt, greedy, tree = _greedy_tree_case(tiny_llama)
    edge = ModelSegment.load(tiny_llama, 0, k)
    with in_process_worker() as served:
        step = lambda n, frames: open_step_reply(NullCipher(), "s1", n, served.send("s1", "step", n, k, frames=frames))  # noqa: E731
        served.send("s1", "open", 0, k, served.opener(new_close_key()))
        ec = edge.new_cache()
        h = edge(torch.tensor([prompt]), ec, logits="none").hidden
        assert step(0, seal_step(NullCipher(), "s1", 0, 0, h, "fp32")).token == greedy[0]
        ht = edge(torch.tensor([[greedy[0], *tree.tokens]]), ec, logits="none", tree=tree).hidden
        got = step(1, seal_step(NullCipher(), "s1", 1, len(prompt), ht, "fp32", draft=list(tree.tokens),
                                tree=list(tree.parents)))
        assert (got.path, got.accepted, got.token, got.pos) == ((2, 4), 2, greedy[3], len(prompt) + 3)
        ec.keep(len(prompt), [0, *got.path])
        h = edge(torch.tensor([[greedy[3]]]), ec, logits="none").hidden
        after = step(2, seal_step(NullCipher(), "s1", 2, got.pos, h, "fp32"))
        assert after.token == _next_local(tiny_llama, prompt + greedy) and served.worker.failed == 0


@pytest.mark.integration
@pytest.mark.parametrize("where", ["cloud", "local backend", "fallback"])
def test_a_tree_step_through_each_backend_returns_the_path_and_continues_like_local(tiny_cluster, tiny_llama, where):
    from broker.wire.crypto import load_api_keys
    from edge_worker.backends import LocalBackend
    from edge_worker.cloud_client import CloudClient
    from partition.sampling import SamplingParams

    k, n = 2, tiny_llama.n_layers
    prompt, greedy, tree = _greedy_tree_case(tiny_llama)
    edge = ModelSegment.load(tiny_llama, 0, k)
    rest = lambda: LocalBackend(ModelSegment.load(tiny_llama, k, n, embed=False))  # noqa: E731
    client = None
    if where == "local backend":
        backend = rest()
    else:
        client = CloudClient(api_key=sorted(load_api_keys(tiny_cluster.keys_dir / "api_keys.txt"))[0],
                             broker=tiny_cluster.endpoint, keys_dir=tiny_cluster.keys_dir, request_timeout_s=10)
        backend = client.session(tiny_llama.model_id, k, tiny_llama.hidden_size)
        backend.fallback = rest
    try:
        backend.start(SamplingParams())
        ec = edge.new_cache()
        first, _ = backend.step(edge(torch.tensor([prompt]), ec, logits="none").hidden, 0)
        assert first == [greedy[0]]
        if where == "fallback":  # the cloud is gone from here on: the rest runs on the edge from the log
            backend.local = rest()
            backend.local.start(SamplingParams())
            backend.local.step(torch.cat(backend.replay, dim=1), 0)
        hidden = edge(torch.tensor([[greedy[0], *tree.tokens]]), ec, logits="none", tree=tree).hidden
        tokens, _ = backend.step(hidden, 1, tree=tree)
        assert tokens == greedy[1:4]
        ec.keep(len(prompt), [0, 2, 4])
        nxt, _ = backend.step(edge(torch.tensor([[greedy[3]]]), ec, logits="none").hidden, 4)
        assert nxt == [_next_local(tiny_llama, prompt + greedy)]
        if where != "local backend":
            assert sum(h.shape[1] for h in backend.replay) == len(prompt) + 4  # the path was logged, not the tree
    finally:
        backend.close()
        if client is not None:
            client.close()


@pytest.mark.parametrize("kind", ["int8", "self"])
@pytest.mark.parametrize("pipeline_backend", [False, True])
def test_tree_drafting_leaves_the_output_unchanged_and_keeps_both_caches_on_the_path(tiny_llama, kind,
                                                                                     pipeline_backend):
    """Rounds of token trees (a chain of best guesses with leaves beside it), verified by the rest
    of the model in process: the output is local output token for token, so every round kept the
    accepted path in both caches; some rounds keep a leaf (a drafter's second choice)."""
    from edge_worker.backends import LocalBackend
    from edge_worker.generation import EdgeGenerator
    from edge_worker.mini_llm import MiniLLMHandler
    from partition.tokens import eos_token_ids

    tokenizer = tiny_llama.load_tokenizer()
    eos = eos_token_ids(tiny_llama, tokenizer)
    n, k = tiny_llama.n_layers, 2
    mini = MiniLLMHandler(model=kind, threshold=0.0, max_draft=4, adaptive=False, tree_nodes=10)
    edge = ModelSegment.load(tiny_llama, 0, k, head=mini.needs_edge_head)
    settings = mini.settings(tiny_llama, edge, tokenizer)
    assert settings.trees and not settings.pipelined
    leaves_kept = 0
    for prompt in ("The quick brown fox jumps over the lazy dog.", "abcabcabc abc", "Edge and cloud"):
        ids = tokenizer(prompt)["input_ids"]
        local = EdgeGenerator(ModelSegment.load(tiny_llama, 0, n), None, tokenizer, eos, "local").generate(ids, 30)
        backend = LocalBackend(ModelSegment.load(tiny_llama, k, n, embed=False), pipelined=pipeline_backend)
        got = EdgeGenerator(edge, backend, tokenizer, eos, "hybrid", mini=settings).generate(ids, 30)
        assert got.token_ids == local.token_ids, (kind, prompt)
        rounds = [t for t in got.trace if t.get("tree")]
        assert rounds and got.tokens_drafted > len(rounds)  # trees with more than one node went out
        leaves_kept += sum(t["leaf_kept"] for t in rounds)
    if kind == "self":  # plain early exit on random weights: its second choices are right now and then
        assert leaves_kept > 0


@pytest.mark.integration
@pytest.mark.parametrize("mini", ["self", "int8"])
def test_tree_drafts_through_a_real_worker_leave_the_output_unchanged(tiny_cluster, mini):
    import json

    args = ("--tokens", "30", "--raw-prompt", "--prompt", "abcabcabc abcabcabc abc")
    local = tiny_cluster.edge("--force-local", *args, "--json")
    got = tiny_cluster.edge("--split", "2", *args, "--json", "--mini", mini, "--mini-tree", "10",
                            "--mini-threshold", "0", "--mini-max-draft", "4", "--mini-fixed")
    assert local.returncode == 0 and got.returncode == 0, got.stderr[-3000:]
    local, got = json.loads(local.stdout), json.loads(got.stdout)
    assert got["token_ids"] == local["token_ids"]
    rounds = [t for t in got["trace"] if t.get("tree")]
    assert rounds and got["tokens_drafted"] > len(rounds) and got["mini"] == mini
    # One frame per round: the opener, then one per tree.
    assert got["cloud_round_trips"] == len(got["trace"]) + 1


# --- the shape: measured acceptance and the round trip (edge_worker.drafting.TreeShaper) ----------


def _shape(shaper, fixed_ms: float, depths: list[list[float]], leaf_ms: float = 1.0, step_ms: float = 8.0):
    """Nodes a shaper takes from the same ranked candidates per depth: (chain nodes, leaves)."""
    from edge_worker.drafting import TreeShaper

    assert isinstance(shaper, TreeShaper)
    shaper.start(fixed_ms)
    chain = leaves = 0
    for ranked in depths:
        took = shaper.take_chain(ranked[0], leaf_ms + step_ms)
        chain += took
        leaves += sum(shaper.take_leaf(rank, p, leaf_ms) for rank, p in enumerate(ranked[1:], start=1))
        if not took:
            break
        shaper.descend(ranked[0])
    return chain, leaves


def test_a_tree_grows_with_the_round_trip_and_with_what_was_accepted():
    from edge_worker.drafting import TreeShaper

    depths = [[0.6, 0.25, 0.1], [0.7, 0.2, 0.05], [0.5, 0.3, 0.1], [0.9, 0.05, 0.02], [0.4, 0.3, 0.2]] * 2
    near, far = _shape(TreeShaper(), 20.0, depths), _shape(TreeShaper(), 200.0, depths)
    assert near[0] + near[1] < far[0] + far[1]  # a long round trip makes every node cheap next to it
    assert far[1] > 0 and far[0] >= near[0]
    # Measured: second choices of low probability were right whenever they were reached, and best
    # guesses of middling probability never: the same candidates now give more leaves, less chain.
    learned = TreeShaper()
    for _ in range(200):
        # pending -> chain node 0 (p 0.5, rejected) with leaf 1 (rank 1, p 0.15, accepted) beside it,
        # and a leaf under the chain node that was never reached.
        learned.record((-1, -1, 0), [0, 1, 1], [0.5, 0.15, 0.15], kept=[1])
    assert learned.acceptance(1, 0.15) > 0.95 and learned.acceptance(0, 0.5) < 0.05
    assert learned.acceptance(1, 0.3) == TreeShaper().acceptance(1, 0.3)  # other bins: unchanged
    before = _shape(TreeShaper(), 60.0, [[0.5, 0.15, 0.15]] * 3, leaf_ms=6.0)
    after = _shape(learned, 60.0, [[0.5, 0.15, 0.15]] * 3, leaf_ms=6.0)
    assert after[1] > before[1] and after[0] < before[0], (before, after)
