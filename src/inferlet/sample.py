"""Samplers (pick a token) and probes (read the distribution) with the names and defaults of Pie's SDK.

    Sampler.argmax()                          the most likely token
    Sampler.top_p(temperature=0.6, p=0.95)    nucleus sampling
    Sampler.top_k(temperature=0.6, k=40)
    Sampler.min_p(temperature=0.6, p=0.1)     keep p >= p * p_max
    Sampler.top_k_top_p(temperature=0.6, k=40, p=0.95)
    Sampler.multinomial(temperature=1.0, draws=1)

Every constructor also takes `seed=` (pie's extension): the same seed gives the same draw in any batch;
a generation derives one seed per step from it. Temperature 0 is argmax. Filters compose like HF / vLLM
(temperature, top_k, top_p, min_p; see pie.drivers.sampling).

Probes for Forward.probe / GenStep.probe / Generator.probe_each_step: Logits(), Distribution(temperature,
k), Logprob(token), Logprobs(tokens), Entropy().
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from pie.sdk.sampler import Sampler as _PieSampler


class Sampler:
    """A token-producing sampler; build one with the class methods."""

    __slots__ = ("_pie", "_kind")

    def __init__(self, pie_sampler: _PieSampler, kind: str) -> None:
        self._pie = pie_sampler
        self._kind = kind

    @classmethod
    def argmax(cls) -> Sampler:
        """Greedy: the most likely token (deterministic)."""
        return cls(_PieSampler(), "argmax")

    @classmethod
    def top_p(cls, temperature: float = 0.6, p: float = 0.95, *, seed: int | None = None) -> Sampler:
        """Nucleus sampling; temperature 0 is argmax."""
        return cls(_PieSampler(temp=float(temperature), topp=float(p), seed=seed), "top_p")

    @classmethod
    def top_k(cls, temperature: float = 0.6, k: int = 40, *, seed: int | None = None) -> Sampler:
        """Sample among the k most likely tokens."""
        return cls(_PieSampler(temp=float(temperature), topk=int(k), seed=seed), "top_k")

    @classmethod
    def min_p(cls, temperature: float = 0.6, p: float = 0.1, *, seed: int | None = None) -> Sampler:
        """Sample among tokens with probability >= p * max probability."""
        return cls(_PieSampler(temp=float(temperature), minp=float(p), seed=seed), "min_p")

    @classmethod
    def top_k_top_p(
        cls, temperature: float = 0.6, k: int = 40, p: float = 0.95, *, seed: int | None = None
    ) -> Sampler:
        """Top-k, then nucleus p over the survivors."""
        return cls(_PieSampler(temp=float(temperature), topk=int(k), topp=float(p), seed=seed), "top_k_top_p")

    @classmethod
    def multinomial(cls, temperature: float = 1.0, draws: int = 1, *, seed: int | None = None) -> Sampler:
        """A plain draw after temperature scaling. pie draws one token per sampled position: draws must be 1."""
        if int(draws) != 1:
            raise ValueError(
                f"Sampler.multinomial(draws={draws}): pie draws one token per sampled position; for several "
                "draws, sample the position several times (fwd.sample([i, i, i], ...)) with different seeds"
            )
        return cls(_PieSampler(temp=float(temperature), seed=seed), "multinomial")

    @property
    def seed(self) -> int | None:
        return self._pie.seed

    @property
    def is_argmax(self) -> bool:
        return self._pie.is_greedy

    def __repr__(self) -> str:
        s = self._pie
        return f"Sampler.{self._kind}(temperature={s.temp}, k={s.topk}, p={s.topp}, min_p={s.minp}, seed={s.seed})"


@dataclass(frozen=True, slots=True)
class Logits:
    """The row's raw logits (no temperature), as native-endian float32 bytes of length vocab_size * 4
    (decode with np.frombuffer(buf, dtype=np.float32))."""


@dataclass(frozen=True, slots=True)
class Distribution:
    """The top-k (token ids, probabilities), most likely first, after softmax at `temperature`
    (temperature 0 is read as 1); k = 0 returns the whole vocabulary."""

    temperature: float = 1.0
    k: int = 0

    def __post_init__(self) -> None:
        if self.k < 0:
            raise ValueError(f"Distribution(k={self.k}): k must be >= 0 (0 = the whole vocabulary)")
        if not self.temperature >= 0:
            raise ValueError(f"Distribution(temperature={self.temperature}): temperature must be >= 0")


@dataclass(frozen=True, slots=True)
class Logprob:
    """log p(token | context) at temperature 1; read as a one-element list with output.logprobs(h)."""

    token: int


@dataclass(frozen=True, slots=True)
class Logprobs:
    """log p(t | context) for each t in `tokens`, at temperature 1, in the order given."""

    tokens: tuple[int, ...] = field(default_factory=tuple)

    def __init__(self, tokens: Iterable[int] = ()) -> None:
        object.__setattr__(self, "tokens", tuple(int(t) for t in tokens))


@dataclass(frozen=True, slots=True)
class Entropy:
    """Shannon entropy (nats) of the row's temperature-1 distribution."""


PROBES = (Logits, Distribution, Logprob, Logprobs, Entropy)


def probe_kind(probe) -> str:
    """The Output accessor a probe is read with."""
    if isinstance(probe, Logits):
        return "logits"
    if isinstance(probe, Distribution):
        return "distribution"
    if isinstance(probe, (Logprob, Logprobs)):
        return "logprobs"
    if isinstance(probe, Entropy):
        return "entropy"
    raise TypeError(
        f"{type(probe).__name__} is not a probe: use Logits(), Distribution(temperature, k), Logprob(token), "
        "Logprobs(tokens) or Entropy()"
    )
