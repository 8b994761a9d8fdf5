"""Token embedding and the LM head (tied to the embedding when the checkpoint says so)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class VocabEmbedding(nn.Embedding):
    """[T] int64 token ids -> [T, H]."""


class LMHead(nn.Module):
    """[O, H] -> [O, V] fp32 logits. Computed in the weight dtype (as HF does), then upcast for sampling."""

    def __init__(self, hidden: int, vocab: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab, hidden))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight).float()
