"""BRLE: Pie's binary run-length encoding of a bool vector.

Runs alternate starting with a *false* run: [f0, t0, f1, t1, ...]; [0, n] is n trues, [n] is n falses.
Used for logit masks (over the vocabulary: True = the token may be sampled) and attention masks (over
the KV: True = the query may attend to that slot).
"""

from __future__ import annotations

import numpy as np


def decode(runs, length: int, what: str) -> np.ndarray:
    """[length] bool from BRLE `runs`; a shorter encoding is padded with False (not allowed)."""
    counts = np.asarray(list(runs), dtype=np.int64)
    if counts.ndim != 1 or (counts < 0).any():
        raise ValueError(f"{what}: a BRLE mask is a flat list of run lengths >= 0, got {list(runs)[:8]}...")
    total = int(counts.sum())
    if total > length:
        raise ValueError(
            f"{what}: the BRLE mask covers {total} entries, more than the {length} it applies to"
        )
    values = np.arange(counts.shape[0]) % 2 == 1  # run i is true when i is odd
    out = np.zeros(length, dtype=bool)
    out[:total] = np.repeat(values, counts)
    return out


def encode(mask) -> list[int]:
    """BRLE runs of a bool vector (the inverse of decode, without trailing padding)."""
    m = np.asarray(mask, dtype=bool).reshape(-1)
    if m.size == 0:
        return [0]
    # run boundaries where the value flips; a leading True run gets an empty False run first
    edges = np.flatnonzero(m[1:] != m[:-1]) + 1
    bounds = np.concatenate([[0], edges, [m.size]])
    runs = np.diff(bounds).tolist()
    return [0, *runs] if m[0] else runs
