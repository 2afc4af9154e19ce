"""Packed rows: an example's base tokens and the variants (branches) packed after them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Branch:
    """One variant inside a packed row.

    Attributes:
        key: The request it answers.
        shared: Number of base tokens it attends to.
        own: Its own tokens after the shared base prefix (context remainder, then answer).
        n_answer: Teacher-forced answer tokens at the end of `own` (0 for forced answers).
        n_draft: Draft tokens at the end of `own` (forced answers): a guess of the greedy
            answer, checked in the same pass; they never change the result.
        accepted: Draft tokens the greedy decode confirmed (they stay in the KV cache).
        generated: Greedy tokens decoded so far (forced answers).
        done: Whether decoding of this branch has finished.
    """

    key: Any
    shared: int
    own: list[int]
    n_answer: int = 0
    n_draft: int = 0
    accepted: int = 0
    generated: list[int] = field(default_factory=list)
    done: bool = False


@dataclass
class PackedRow:
    """The base tokens of one example and the branches packed after them."""

    base: list[int]
    branches: list[Branch] = field(default_factory=list)

    @property
    def length(self) -> int:
        """Tokens in the row."""
        return len(self.base) + sum(len(b.own) for b in self.branches)


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i + 64 <= n and a[i : i + 64] == b[i : i + 64]:  # whole blocks compared at C speed
        i += 64
    while i < n and a[i] == b[i]:
        i += 1
    return i


def straggler_row(row: PackedRow, branch: Branch) -> PackedRow:
    """A row of its own for an unfinished forced branch: its context and the tokens it has
    decoded so far (the last one fed again), so decoding resumes where it stopped."""
    context = row.base[: branch.shared] + branch.own[: len(branch.own) - branch.n_draft]
    full = context + branch.generated
    resumed = Branch(key=branch.key, shared=len(full) - 1, own=full[-1:], generated=list(branch.generated))
    return PackedRow(base=full[:-1], branches=[resumed])
