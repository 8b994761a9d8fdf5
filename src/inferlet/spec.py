"""Speculative decoding: Pie's Speculator protocol, pie's built-in n-gram drafter, and acceptance stats.

A speculator proposes draft tokens that continue the sequence; the generator verifies them in ONE
forward pass (inputs: the last token, then the drafts; a sample at every position), keeps the drafts the
model's own samples agree with plus the model's next token, and truncates the rejected drafts out of the
KV. Every kept token is the model's own sample given the kept prefix, so the output is the one plain
decoding gives (for greedy: token for token; for seeded samplers: each output position draws with the
seed plain decoding would use).

    class MyDrafter:                                   # duck-typed, as in Pie
        def draft(self) -> tuple[list[int], list[int]]: ...   # (tokens, positions); ([], []) = none
        def accept(self, tokens: list[int]) -> None: ...      # the tokens this step produced
        def rollback(self, n: int) -> None: ...               # n drafts were rejected
        def reset(self) -> None: ...

    ctx.generate(Sampler.argmax(), speculator=MyDrafter())

Without a speculator, greedy generation uses NgramSpeculator (prompt lookup: the longest recent n-gram
that ends the sequence is looked up earlier in the context, and what followed it is the draft) whenever
it finds a match; `system_speculation=False` or `gen.disable_system_speculation()` turns it off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@runtime_checkable
class Speculator(Protocol):
    """A drafter; see the module docs. accept() gets the tokens a verification produced (the first is
    the model's own pick after the last token, the rest matched drafts); rollback(n) follows when n of
    the drafts were rejected."""

    def draft(self) -> tuple[list[int], list[int]]: ...

    def accept(self, tokens: list[int]) -> None: ...

    def rollback(self, n: int) -> None: ...

    def reset(self) -> None: ...


@dataclass
class SpeculationStats:
    """How speculation went for one generator (pie's extension; Pie has none)."""

    passes: int = 0  # verification passes that carried drafts
    drafted: int = 0  # draft tokens proposed in them
    accepted: int = 0  # draft tokens the model agreed with

    @property
    def acceptance_rate(self) -> float:
        """accepted / drafted (0.0 before any draft)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """Tokens a verification pass yields on average (1 + accepted drafts per pass)."""
        return 1.0 + self.accepted / self.passes if self.passes else 1.0


class NgramSpeculator:
    """Prompt-lookup drafting over a token history (the context's tokens, then what is generated).

    The history's last n tokens (n = max_ngram down to min_ngram) are looked up at their most recent
    earlier occurrence; the up to `num_draft` tokens that followed it are the draft. An index of every
    n-gram's latest follower makes a draft O(max_ngram + num_draft) however long the history is.
    """

    def __init__(
        self,
        history: list[int] | None = None,
        *,
        next_position: int | None = None,
        num_draft: int = 6,
        max_ngram: int = 3,
        min_ngram: int = 2,
    ) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        if num_draft < 1:
            raise ValueError(f"num_draft must be >= 1, got {num_draft}")
        self.num_draft, self.max_ngram, self.min_ngram = num_draft, max_ngram, min_ngram
        self._initial = list(history or [])
        self._initial_pos = len(self._initial) if next_position is None else int(next_position)
        self._proposed = 0
        self.reset()

    def reset(self) -> None:
        self._hist: list[int] = []
        self._index: list[dict[tuple[int, ...], int]] = [{} for _ in range(self.max_ngram + 1)]
        # position of the token after the history's last one: drafts take the next positions
        self._next_pos = self._initial_pos - len(self._initial)
        self._extend(self._initial)

    def _extend(self, tokens: list[int]) -> None:
        h, index = self._hist, self._index
        for t in tokens:
            i = len(h)  # t lands at index i: it follows the n-grams ending at i - 1
            for n in range(1, self.max_ngram + 1):
                if i >= n:
                    index[n][tuple(h[i - n : i])] = i
            h.append(int(t))
        self._next_pos += len(tokens)

    def draft(self) -> tuple[list[int], list[int]]:
        h = self._hist
        for n in range(min(self.max_ngram, len(h) - 1), self.min_ngram - 1, -1):
            j = self._index[n].get(tuple(h[-n:]))
            if j is not None:  # j < len(h): the suffix itself has no follower yet
                tokens = h[j : j + self.num_draft]
                self._proposed = len(tokens)
                return tokens, list(range(self._next_pos, self._next_pos + len(tokens)))
        self._proposed = 0
        return [], []

    def accept(self, tokens: list[int]) -> None:
        self._extend(list(tokens))

    def rollback(self, n: int) -> None:
        pass  # drafts never enter the history: only accept() grows it


__all__ = ["NgramSpeculator", "SpeculationStats", "Speculator"]
