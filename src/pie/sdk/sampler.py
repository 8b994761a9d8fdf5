"""How one output row turns into a token, and which extras come back with it.

    Sampler.argmax()                     the most likely token
    Sampler.temperature(0.8)             a draw at temperature 0.8
    Sampler.top_k(50, t=0.7)             ... among the 50 most likely
    Sampler.top_p(0.95, t=0.6)           ... among the smallest set holding 95% of the mass
    Sampler.min_p(0.05, t=1.0)           ... among tokens with p >= 0.05 * p_max
    Sampler.dist(k)                      argmax, plus the top-k distribution (at temperature 1)
    Sampler.logits()                     argmax, plus the row's full logits

Extras compose: `Sampler.top_p(0.9).with_logprobs().with_dist(5)`. The driver composes filters
like HF / vLLM: temperature, then top_k, then top_p, then min_p (see pie.drivers.sampling).
A seed makes a draw reproducible in any batch; generate() derives one seed per step from it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pie.runtime.work import step_seed  # noqa: F401  (re-exported: seeds per generation step)


@dataclass(frozen=True)
class Sampler:
    temp: float = 0.0  # 0 = argmax
    topk: int = 0  # 0 = off
    topp: float = 1.0  # 1 = off
    minp: float = 0.0  # 0 = off
    seed: int | None = None
    dist_k: int = 0  # >0: return the top-k distribution
    want_logits: bool = False
    want_logprobs: bool = False  # log p(token) and the row's entropy, at temperature 1

    def __post_init__(self) -> None:
        if self.temp < 0:
            raise ValueError(f"temperature must be >= 0 (0 = argmax), got {self.temp}")
        if self.topk < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.topk}")
        if not 0 < self.topp <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.topp}")
        if not 0 <= self.minp <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.minp}")
        if self.dist_k < 0:
            raise ValueError(f"distribution size must be >= 0, got {self.dist_k}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")

    # ---- constructors ------------------------------------------------------------------------
    @classmethod
    def argmax(cls) -> Sampler:
        return cls()

    @classmethod
    def temperature(cls, t: float, seed: int | None = None) -> Sampler:
        return cls(temp=t, seed=seed)

    @classmethod
    def top_k(cls, k: int, t: float = 1.0, seed: int | None = None) -> Sampler:
        return cls(temp=t, topk=k, seed=seed)

    @classmethod
    def top_p(cls, p: float, t: float = 1.0, seed: int | None = None) -> Sampler:
        return cls(temp=t, topp=p, seed=seed)

    @classmethod
    def min_p(cls, p: float, t: float = 1.0, seed: int | None = None) -> Sampler:
        return cls(temp=t, minp=p, seed=seed)

    @classmethod
    def dist(cls, k: int, t: float = 0.0, seed: int | None = None) -> Sampler:
        """Top-k distribution (at temperature t, or 1 when t is 0) plus a token drawn at t (0: argmax)."""
        return cls(temp=t, dist_k=k, seed=seed)

    @classmethod
    def logits(cls) -> Sampler:
        return cls(want_logits=True)

    # ---- modifiers ---------------------------------------------------------------------------
    def with_dist(self, k: int) -> Sampler:
        return replace(self, dist_k=k)

    def with_logits(self) -> Sampler:
        return replace(self, want_logits=True)

    def with_logprobs(self) -> Sampler:
        return replace(self, want_logprobs=True)

    def with_seed(self, seed: int | None) -> Sampler:
        return replace(self, seed=seed)

    @property
    def is_greedy(self) -> bool:
        return self.temp == 0 or self.topk == 1

    def row(self, seed: int | None = None) -> dict:
        """Fields of one SAMPLER_DTYPE row (pie.runtime.work); `seed` overrides self.seed."""
        s = self.seed if seed is None else seed
        return {
            "temperature": self.temp,
            "top_k": self.topk,
            "top_p": self.topp,
            "min_p": self.minp,
            "seed": -1 if s is None else s,
            "dist_k": self.dist_k,
            "return_logits": self.want_logits,
        }
