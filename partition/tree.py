"""Token trees: several draft continuations of one pending token, verified in one pass.

A frame holds the pending token (row 0, the root) and the tree's nodes after it (row ``i + 1``
for node ``i``), each node's parent earlier in the frame. Every row attends to the cached
positions and to its own ancestors, itself included, never to its siblings' branches; its
position is the cache's length plus its depth, so each row computes exactly what it would at the
end of the plain sequence root, ..., itself (``tests/test_tree.py`` checks this against plain
runs of every path, on a whole model and on both sides of a split). The main model's choice after
each row then says which path it accepts (``DraftTree.accept``), and ``SegmentKVCache.keep``
keeps that path's keys and values and drops the rest.

The ideas are SpecInfer's token trees and EAGLE-2's shape chosen by the drafter's confidence;
the code is ours.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from partition.errors import PartitionError
from partition.sampling_params import MAX_TREE_NODES


class TreeError(PartitionError):
    """A token tree that cannot be a frame (a parent after its child, too many nodes, ...)."""


@dataclass(frozen=True)
class DraftTree:
    tokens: tuple[int, ...]  # node i's token
    parents: tuple[int, ...]  # node i's parent: -1 for the root (the pending token), else a node before i

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokens", tuple(int(t) for t in self.tokens))
        object.__setattr__(self, "parents", tuple(int(p) for p in self.parents))
        if len(self.tokens) != len(self.parents):
            raise TreeError(f"a tree has a parent per node: {len(self.tokens)} tokens, {len(self.parents)} parents")
        if len(self.tokens) > MAX_TREE_NODES:
            raise TreeError(f"a tree has at most {MAX_TREE_NODES} nodes, this one {len(self.tokens)}")
        for i, p in enumerate(self.parents):
            if not -1 <= p < i:
                raise TreeError(f"node {i}'s parent {p} is not the root (-1) or an earlier node")
        siblings = set()
        for t, p in zip(self.tokens, self.parents, strict=True):
            if (p, t) in siblings:
                raise TreeError(f"token {t} appears twice under the same parent ({p})")
            siblings.add((p, t))

    @classmethod
    def chain(cls, tokens: list[int]) -> DraftTree:
        return cls(tuple(tokens), tuple(range(-1, len(tokens) - 1)))

    @property
    def rows(self) -> int:
        """Frame rows: the root and the nodes."""
        return len(self.tokens) + 1

    def depths(self) -> list[int]:
        """Depth of every frame row (the root's is 0)."""
        depth = [0]
        for p in self.parents:
            depth.append(depth[p + 1] + 1)
        return depth

    def ancestors(self) -> torch.Tensor:
        """(rows, rows) bool: ``[i, j]`` when row ``j`` is row ``i`` or one of its ancestors."""
        rows = self.rows
        seen = torch.eye(rows, dtype=torch.bool)
        for i, p in enumerate(self.parents):
            seen[i + 1] |= seen[p + 1]
        return seen

    def positions(self, past: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """(1, rows) position ids: the cache's length plus each row's depth."""
        return (past + torch.tensor(self.depths(), device=device)).unsqueeze(0)

    def mask(self, past: int, dtype: torch.dtype, device: torch.device | str = "cpu",
             window: int | None = None) -> torch.Tensor:
        """Additive attention mask (1, 1, rows, past + rows): every cached position and the row's
        own ancestors (and, with a sliding ``window``, only keys less than ``window`` positions
        back)."""
        rows = self.rows
        allowed = torch.cat([torch.ones(rows, past, dtype=torch.bool), self.ancestors()], dim=1).to(device)
        if window is not None:
            q = self.positions(past, device)[0].unsqueeze(1)  # (rows, 1)
            k = torch.cat([torch.arange(past, device=device), self.positions(past, device)[0]]).unsqueeze(0)
            allowed &= (q - k) < window
        mask = torch.zeros((rows, past + rows), dtype=dtype, device=device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask.view(1, 1, rows, past + rows)

    def accept(self, choices: list[int]) -> tuple[list[int], int]:
        """Greedy verification. ``choices[r]``: the main model's token after frame row ``r``.
        Returns (the frame rows of the accepted path, root first; the main model's token after
        its last row): the path follows, from the root, the child whose token is the main
        model's choice while there is one."""
        if len(choices) != self.rows:
            raise TreeError(f"a choice per frame row: {self.rows} rows, {len(choices)} choices")
        children: dict[int, dict[int, int]] = {}
        for i, (t, p) in enumerate(zip(self.tokens, self.parents, strict=True)):
            children.setdefault(p + 1, {})[t] = i + 1
        path = [0]
        while True:
            nxt = children.get(path[-1], {}).get(choices[path[-1]])
            if nxt is None:
                return path, choices[path[-1]]
            path.append(nxt)

    def rows_of(self, tokens: list[int]) -> list[int]:
        """The frame rows, root first, of the path whose draft tokens are ``tokens``."""
        children = {(p + 1, t): i + 1 for i, (t, p) in enumerate(zip(self.tokens, self.parents, strict=True))}
        rows = [0]
        for t in tokens:
            rows.append(children[(rows[-1], t)])
        return rows

    def path_tokens(self, rows: list[int]) -> list[int]:
        """The draft tokens of a path's rows (the root's, the pending token, is not a draft)."""
        return [self.tokens[r - 1] for r in rows if r > 0]
