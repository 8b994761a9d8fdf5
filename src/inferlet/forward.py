"""Forward: one hand-built forward pass (Pie's SDK), run as one pie pass on the context's sequence.

    fwd = ctx.forward()
    fwd.input(tokens)                              # at the next positions; they stay in the KV
    h = fwd.sample([len(tokens) - 1], Sampler.argmax())
    p = fwd.probe(len(tokens) - 1, Distribution(1.0, 8))
    out = await fwd.execute()
    out.token(h), out.distribution(p)

Indices count over this pass's inputs: the `input` tokens, then the `input_at` tokens. Tokens still
in the context's buffer (fillers, the last generated token) run first in the same pass, causally (Pie's
SDK leaves them in the buffer; pie runs them so positions never collide); `start_position()` is where
the first `input` token lands. `input_at` tokens are scoring-only: they are dropped from the KV after the
pass (pie.runtime truncate), so `seq_len` grows by the buffer and `input` tokens only.

What runs where: sampled tokens, distributions (k <= the driver's max_dist_size) and entropy come from the
driver; Logits, Logprob(s), Distribution with k = 0 or above max_dist_size read the row's logits (copied
to the host, [V] float32 per probe) and are computed there. A logit mask (`mask`) is applied on the host
too: masked rows return their logits and are sampled on the host with pie's own sampler (same filters and
seeded noise as the driver).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pie.drivers.protocol import ForwardResult
from pie.drivers.sampling import SamplingParams
from pie.drivers.sampling import sample as _host_sample
from pie.runtime.work import sampler_rows
from pie.sdk.sampler import Sampler as _PieSampler
from pie.sdk.sampler import step_seed

from . import brle
from ._errors import unsupported
from .sample import Distribution, Entropy, Logits, Logprob, Logprobs, Sampler, probe_kind

if TYPE_CHECKING:
    from .context import Context


@dataclass(frozen=True, slots=True)
class SampleHandle:
    """A sampler's slots in the Output: read with output.token(h) / output.tokens_at(h)."""

    slot: int
    arity: int = 1


@dataclass(frozen=True, slots=True)
class ProbeHandle:
    """A probe's slot in the Output; `kind` names the accessor that reads it."""

    slot: int
    kind: str


@dataclass(slots=True)
class _Slot:
    index: int  # into this pass's inputs
    sampler: Sampler | None = None  # a sampler slot
    probe: Any = None  # or a probe
    seed: int | None = None  # overrides the sampler's seed (per generation step)


class Forward:
    """One forward pass; build with Context.forward(), then `await execute()` (once)."""

    __slots__ = ("_ctx", "_inputs", "_explicit", "_slots", "_mask", "_mask_job", "_attn", "_drain", "_done")

    def __init__(self, ctx: Context, *, drain_buffer: bool = True) -> None:
        self._ctx = ctx
        self._inputs: list[int] = []
        self._explicit: list[tuple[list[int], list[int]]] = []
        self._slots: list[_Slot | None] = []  # None: a reserved slot that reads as nothing
        self._mask: np.ndarray | None = None
        # an awaitable of the [V] bool mask, computed on the host while the device runs the pass (a
        # constrained generation step); awaited when the logits are back
        self._mask_job = None
        self._attn: list[list[int]] | None = None
        self._drain = drain_buffer
        self._done = False

    def start_position(self) -> int:
        """The KV slot (and position) the first `input` token takes: seq_len plus the buffered tokens."""
        return self._ctx.seq_len + (len(self._ctx._pending_buffer()) if self._drain else 0)

    # ---- inputs ----------------------------------------------------------------------------------
    def input(self, tokens: list[int]) -> Forward:
        """Tokens at the next positions; they stay in the context (seq_len grows)."""
        self._inputs.extend(int(t) for t in tokens)
        return self

    def input_at(self, tokens: list[int], positions: list[int]) -> Forward:
        """Tokens at given positions, for scoring: they are not kept in the context after the pass."""
        if len(tokens) != len(positions):
            raise ValueError(f"input_at: {len(tokens)} tokens but {len(positions)} positions; give one each")
        self._explicit.append(([int(t) for t in tokens], [int(p) for p in positions]))
        return self

    def input_image(self, image, anchor: int) -> Forward:
        unsupported("images (Forward.input_image)")

    def input_audio(self, audio, anchor: int) -> Forward:
        unsupported("audio (Forward.input_audio)")

    # ---- slots ---------------------------------------------------------------------------------
    def sample(self, indices: list[int], sampler: Sampler) -> SampleHandle:
        """Sample a token at each index (one slot each); read with output.token(h) / tokens_at(h)."""
        if not isinstance(sampler, Sampler):
            raise TypeError(f"sample() needs an inferlet.Sampler (Sampler.argmax(), ...), got {sampler!r}")
        idx = [int(i) for i in ([indices] if isinstance(indices, int) else indices)]
        h = SampleHandle(slot=len(self._slots), arity=len(idx))
        self._slots += [_Slot(i, sampler=sampler) for i in idx]
        return h

    def probe(self, index: int, probe: Any) -> ProbeHandle:
        """Read a distribution at `index` without sampling (Logits, Distribution, Logprob(s), Entropy)."""
        h = ProbeHandle(slot=len(self._slots), kind=probe_kind(probe))
        self._slots.append(_Slot(int(index), probe=probe))
        return h

    def _reserve_slot(self) -> None:
        self._slots.append(None)

    # ---- decoration ----------------------------------------------------------------------------
    def mask(self, brle_mask: list[int]) -> Forward:
        """A BRLE logit mask over the vocabulary (True = allowed), applied to every sampler and
        Distribution probe of this pass (on the host; see the module docs)."""
        self._mask = brle.decode(brle_mask, self._ctx.model.vocab_size, "Forward.mask")
        if not self._mask.any():
            raise ValueError("Forward.mask: the logit mask allows no token")
        return self

    def attention_mask(self, masks: list[list[int]]) -> Forward:
        """One BRLE row per input token (input, then input_at), over the KV after the pass
        (start_position() + number of inputs slots); True = may attend. Unset: causal."""
        self._attn = [list(m) for m in masks]
        return self

    def adapter(self, adapter) -> Forward:
        unsupported("adapters (Forward.adapter)")

    def zo_seed(self, seed: int) -> Forward:
        unsupported("zo (Forward.zo_seed)")

    # ---- execution -----------------------------------------------------------------------------
    async def execute(self) -> Output:
        """Run the pass and return its Output."""
        if self._done:
            raise RuntimeError("this Forward was already executed; build a new one with ctx.forward()")
        self._done = True
        ctx = self._ctx
        ctx._check_open()
        inner = ctx._inner
        ctx._drain_chat()
        buffered = ctx._take_buffer() if self._drain else []
        explicit_ids = [t for ids, _ in self._explicit for t in ids]
        n_in = len(self._inputs) + len(explicit_ids)
        if not buffered and n_in == 0:
            raise ValueError(
                "Forward.execute(): nothing to run; add tokens with fwd.input(...) (or fill the context first)"
            )
        try:
            return await self._run(ctx, inner, buffered, explicit_ids, n_in)
        except BaseException:
            if buffered:  # the pass did not run: the buffer is as it was
                ctx._buffer[:0] = buffered
            raise

    async def _run(
        self, ctx: Context, inner, buffered: list[int], explicit_ids: list[int], n_in: int
    ) -> Output:
        nb = len(buffered)
        ids = buffered + self._inputs + explicit_ids
        start = inner.next_position
        positions = list(range(start, start + nb + len(self._inputs)))
        positions += [p for _, pos in self._explicit for p in pos]
        kv0 = inner.seq_len
        kv_end = kv0 + len(ids)

        attn = None
        if self._attn is not None:
            if len(self._attn) != n_in:
                raise ValueError(
                    f"attention_mask: {len(self._attn)} rows for {n_in} input tokens; give one BRLE row per "
                    "input / input_at token"
                )
            attn = np.tri(len(ids), kv_end, k=kv0, dtype=bool)  # buffered rows stay causal
            for r, row in enumerate(self._attn):
                attn[nb + r] = brle.decode(row, kv_end, f"attention_mask row {r}")

        masked = self._mask is not None or self._mask_job is not None
        # one driver output row per slot: what the driver computes for it
        vocab = ctx.model.vocab_size
        max_dist = inner._rt.capabilities.max_dist_size
        slots = [s for s in self._slots if s is not None]
        fields: dict[str, list] = {
            k: [] for k in ("temperature", "top_k", "top_p", "min_p", "seed", "dist_k", "return_logits")
        }
        want_entropy = False
        for s in slots:
            if not 0 <= s.index < n_in:
                raise IndexError(
                    f"index {s.index} is outside this pass's {n_in} input tokens (0..{n_in - 1})"
                )
            row = _PieSampler().row()
            if s.sampler is not None:
                row = s.sampler._pie.row(s.seed)
                if masked:  # sampled on the host from the masked logits
                    row = _PieSampler(want_logits=True).row()
            elif isinstance(s.probe, Distribution):
                if 0 < s.probe.k <= max_dist and not masked:
                    row = _PieSampler(temp=s.probe.temperature, dist_k=s.probe.k).row()
                else:
                    row = _PieSampler(want_logits=True).row()
            elif isinstance(s.probe, (Logits, Logprob, Logprobs)):
                row = _PieSampler(want_logits=True).row()
                for t in getattr(s.probe, "tokens", (getattr(s.probe, "token", 0),)):
                    if not 0 <= t < vocab:
                        raise ValueError(f"{type(s.probe).__name__}: token id {t} is outside 0..{vocab - 1}")
            elif isinstance(s.probe, Entropy):
                want_entropy = True
            for k in fields:
                fields[k].append(row[k])
        rows = (
            sampler_rows(len(slots), **{k: np.array(v) for k, v in fields.items()})
            if slots
            else sampler_rows(0)
        )
        outputs = [nb + s.index for s in slots]

        res: ForwardResult = await inner._run(ids, positions, outputs, rows, attn, want_entropy)
        if self._mask_job is not None:
            self._mask = await self._mask_job
        if explicit_ids:  # scoring-only tokens leave the KV
            inner.truncate(len(explicit_ids))
        return Output(self._decode(res, slots, rows))

    def _decode(
        self, res: ForwardResult, slots: list[_Slot], rows: np.ndarray
    ) -> list[tuple[str, Any] | None]:
        """Each slot's value as (kind, value); reserved slots are None."""
        logit_rank = np.cumsum(rows["return_logits"]) - 1
        values: list[tuple[str, Any]] = []
        for i, s in enumerate(slots):
            logits = res.logits[logit_rank[i]] if rows["return_logits"][i] else None  # [V] float32
            if s.sampler is not None:
                if logits is not None:
                    values.append(("token", _masked_sample(logits, self._mask, s.sampler._pie, s.seed)))
                else:
                    values.append(("token", int(res.tokens[i])))
            elif isinstance(s.probe, Logits):
                values.append(("logits", np.ascontiguousarray(logits, dtype=np.float32).tobytes()))
            elif isinstance(s.probe, Distribution):
                if logits is None:
                    k = s.probe.k
                    values.append(
                        ("distribution", (res.dist_ids[i, :k].tolist(), res.dist_probs[i, :k].tolist()))
                    )
                else:
                    values.append(("distribution", _host_distribution(logits, self._mask, s.probe)))
            elif isinstance(s.probe, (Logprob, Logprobs)):
                tokens = s.probe.tokens if isinstance(s.probe, Logprobs) else (s.probe.token,)
                logp = torch.log_softmax(torch.from_numpy(np.asarray(logits, np.float32)), dim=-1)
                values.append(("logprobs", logp[list(tokens)].tolist()))
            else:  # Entropy
                values.append(("entropy", float(res.entropies[i])))
        it = iter(values)
        return [None if s is None else next(it) for s in self._slots]


def _masked_sample(logits: np.ndarray, mask: np.ndarray | None, s: _PieSampler, seed: int | None) -> int:
    """Sample one token on the host from [V] logits with disallowed tokens removed, with the driver's code."""
    x = torch.from_numpy(np.asarray(logits, np.float32).copy())[None, :]  # [1, V]
    if mask is not None:
        x[0, ~torch.from_numpy(mask[: x.shape[1]])] = float("-inf")
    seed = s.seed if seed is None else seed
    params = SamplingParams(
        temperature=torch.tensor([s.temp], dtype=torch.float32),
        top_k=torch.tensor([s.topk], dtype=torch.int64),
        top_p=torch.tensor([s.topp], dtype=torch.float32),
        min_p=torch.tensor([s.minp], dtype=torch.float32),
        seed=torch.tensor([-1 if seed is None else seed], dtype=torch.int64),
        dist_k=torch.zeros(1, dtype=torch.int32),
        max_dist_k=0,
        all_greedy=s.is_greedy,
    )
    return int(_host_sample(x, params, return_logprobs=False).tokens[0])


def _host_distribution(
    logits: np.ndarray, mask: np.ndarray | None, probe: Distribution
) -> tuple[list[int], list[float]]:
    x = torch.from_numpy(np.asarray(logits, np.float32).copy())  # [V]
    if mask is not None:
        x[~torch.from_numpy(mask[: x.shape[0]])] = float("-inf")
    t = probe.temperature if probe.temperature >= 1e-5 else 1.0
    p = torch.softmax(x / t, dim=-1)
    k = x.shape[0] if probe.k == 0 else min(probe.k, x.shape[0])
    probs, ids = p.topk(k)
    return ids.tolist(), probs.tolist()


class Output:
    """What a pass returned. `tokens`: the tokens a generation step accepted (empty for a raw Forward);
    the accessors read a slot by its handle and return None for a handle of another kind."""

    __slots__ = ("_slots", "tokens", "auto_sampler")

    def __init__(
        self,
        slots: list[tuple[str, Any] | None],
        tokens: list[int] | None = None,
        auto_sampler: SampleHandle | None = None,
    ) -> None:
        self._slots = slots
        self.tokens: list[int] = tokens if tokens is not None else []
        self.auto_sampler = auto_sampler

    def _get(self, slot: int, kind: str):
        if 0 <= slot < len(self._slots) and self._slots[slot] is not None and self._slots[slot][0] == kind:
            return self._slots[slot][1]
        return None

    def token(self, h: SampleHandle) -> int | None:
        return self._get(h.slot, "token")

    def tokens_at(self, h: SampleHandle) -> list[int]:
        out = []
        for i in range(h.arity):
            t = self._get(h.slot + i, "token")
            if t is None:
                break
            out.append(t)
        return out

    def distribution(self, h: ProbeHandle) -> tuple[list[int], list[float]] | None:
        v = self._get(h.slot, "distribution")
        return None if v is None else (list(v[0]), list(v[1]))

    def logits(self, h: ProbeHandle) -> bytes | None:
        return self._get(h.slot, "logits")

    def logprobs(self, h: ProbeHandle) -> list[float] | None:
        v = self._get(h.slot, "logprobs")
        return None if v is None else list(v)

    def entropy(self, h: ProbeHandle) -> float | None:
        return self._get(h.slot, "entropy")


__all__ = ["Forward", "Output", "ProbeHandle", "SampleHandle", "step_seed"]
