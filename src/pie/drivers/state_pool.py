"""The recurrent-state pool of a hybrid model (Qwen 3.5's Gated DeltaNet layers), on the executor's device.

A slot holds one sequence's state across all Lr recurrent layers; the runtime owns the slot numbers (one
per live sequence or snapshot) and names them per request in ForwardBatch.state_slots. Memory, slot-major so
one slot's bytes are contiguous rows:

    conv   [S, Lr, conv_dim, K - 1]    activation dtype   the causal conv's last K - 1 inputs
    delta  [S, Lr, Hv, dk, dv]         float32            the delta-rule state (kept in fp32 as
                                                          transformers and FLA accumulate it)

A slot's raw bytes (PageOps.state_read / state_write) are its conv bytes then its delta bytes.
There is no "valid" flag: a request whose first new token is at KV slot 0 starts from zero (the layer
ignores what the slot held), so a fresh or recomputed sequence needs no clearing op.
"""

from __future__ import annotations

import numpy as np
import torch

from pie.drivers.kv_plan import GiB
from pie.errors import DriverError
from pie.models.config import ModelConfig

DEFAULT_SLOTS = 128  # when the spec names none: live sequences + snapshots a driver can hold at once


def state_slot_bytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
    g = cfg.gated_deltanet
    if g is None:
        return 0
    Lr = len(cfg.recurrent_layers)
    elem = torch.empty((), dtype=dtype).element_size()
    return Lr * (g.conv_dim * (g.conv_kernel - 1) * elem + g.num_v_heads * g.head_k_dim * g.head_v_dim * 4)


class StatePool:
    """num_slots slots the runtime may name, plus `scratch` more that no batch can name (CUDA graphs pad
    decode batches with rows that read and write scratch_slot)."""

    def __init__(
        self, cfg: ModelConfig, num_slots: int, dtype: torch.dtype, device: torch.device, scratch: int = 0
    ) -> None:
        g = cfg.gated_deltanet
        assert g is not None
        if num_slots < 1:
            raise DriverError(f"state_slots must be >= 1 for a model with recurrent layers, got {num_slots}")
        Lr = len(cfg.recurrent_layers)
        self.num_slots = num_slots
        self.scratch_slot = num_slots if scratch else None
        S = num_slots + scratch
        try:
            self.conv = torch.zeros((S, Lr, g.conv_dim, g.conv_kernel - 1), dtype=dtype, device=device)
            self.delta = torch.zeros(
                (S, Lr, g.num_v_heads, g.head_k_dim, g.head_v_dim), dtype=torch.float32, device=device
            )
        except torch.OutOfMemoryError:
            need = S * state_slot_bytes(cfg, dtype)
            raise DriverError(
                f"out of memory allocating {num_slots} recurrent-state slots ({need / GiB:.2f} GiB); "
                "lower state_slots"
            ) from None
        self._conv_rows = self.conv.view(S, -1).view(torch.uint8)  # [S, conv bytes]
        self._delta_rows = self.delta.view(S, -1).view(torch.uint8)  # [S, delta bytes]
        self.slot_nbytes = self._conv_rows.shape[1] + self._delta_rows.shape[1]

    @property
    def nbytes(self) -> int:
        return self.num_slots * self.slot_nbytes

    def copy(self, pairs: np.ndarray) -> None:
        """pairs [n, 2] (src slot, dst slot): every source is read before any destination is written."""
        if not len(pairs):
            return
        src = torch.from_numpy(pairs[:, 0].astype(np.int64)).to(self.conv.device)
        dst = torch.from_numpy(pairs[:, 1].astype(np.int64)).to(self.conv.device)
        self.conv.index_copy_(0, dst, self.conv.index_select(0, src))
        self.delta.index_copy_(0, dst, self.delta.index_select(0, src))

    def read(self, slots: np.ndarray) -> np.ndarray:
        """[n, slot_nbytes] uint8 host copy of the slots' state."""
        idx = torch.from_numpy(slots.astype(np.int64)).to(self.conv.device)
        rows = torch.cat([self._conv_rows.index_select(0, idx), self._delta_rows.index_select(0, idx)], dim=1)
        return rows.cpu().numpy()

    def write(self, slots: np.ndarray, data: np.ndarray) -> None:
        """Fill the slots from [n, slot_nbytes] uint8 rows (read's format)."""
        idx = torch.from_numpy(slots.astype(np.int64)).to(self.conv.device)
        rows = torch.from_numpy(np.ascontiguousarray(data)).to(self.conv.device)
        c = self._conv_rows.shape[1]
        self._conv_rows.index_copy_(0, idx, rows[:, :c])
        self._delta_rows.index_copy_(0, idx, rows[:, c:])
