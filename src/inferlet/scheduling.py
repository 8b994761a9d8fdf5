"""Pie's `inferlet.scheduling`: what the scheduler reports, on pie's runtime.

Pie schedules by a credit market (bids, rent, dividends). pie's scheduler takes priorities instead: a
context's bid (`Context.set_bid`) is its priority, and when the KV cache runs out the victim is an idle
context first (no pass waiting), then the lowest priority, then the most recently started work, and work
never takes the pages of work with a higher priority (see pie.runtime.scheduler.Scheduler._victim);
`Context.idle()` makes a context the first victim for a while and
`Context.suspend()` gives its pages back now. The readings below are pie's real numbers in Pie's units:

    price()         1.0: one new KV page costs one credit (constant, as in Pie)
    rent(ctx)       the bid that lost in the last step: the priority of the context preempted to make room
                    in the scheduler's last step (0.0 when that step preempted nobody); bid above it to stay
    latency(ctx)    seconds the device took for the last batch of this context's model
    balance(model)  free KV pages on the model's device: at one credit a page, what can be claimed now
                    without preempting anyone (pie keeps no per-inferlet wallet)
    dividend(model) 0.0: pie charges no rent, so it pays no dividend
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .context import Context
    from .model import Model


def balance(model: Model) -> float:
    """Free KV pages on the model's device (credits, at price() = 1 per page)."""
    return float(model._pie._rt.kv.alloc.num_free)


def rent(ctx: Context) -> float:
    """The priority (bid) of the context preempted in the scheduler's last step; 0.0 if none was."""
    sched = ctx._inner._rt.scheduler
    if sched.last_victim_step >= sched.num_steps - 1 >= 0:
        return max(0.0, float(sched.last_victim_priority))
    return 0.0


def dividend(model: Model) -> float:
    """Always 0.0: pie charges no rent, so it redistributes none."""
    return 0.0


def latency(ctx: Context) -> float:
    """Seconds the device took for the last batch of this context's model (0.0 before the first)."""
    return float(ctx._inner._rt.scheduler.last_step_s)


def price() -> float:
    """Cost to produce one new KV page (constant = 1 credit)."""
    return 1.0
