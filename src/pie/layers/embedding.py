"""Token embedding and the LM head (tied to the embedding when the checkpoint says so)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class VocabEmbedding(nn.Embedding):
    """[T] int64 token ids -> [T, H]."""


class ScaledVocabEmbedding(nn.Embedding):
    """[T] -> [T, H] times `scale` rounded to the weight dtype first (Gemma: sqrt(hidden), as transformers'
    Gemma2TextScaledWordEmbedding multiplies by a tensor cast to the weight dtype)."""

    def __init__(self, vocab: int, hidden: int, scale: float) -> None:
        super().__init__(vocab, hidden)
        self.scale = scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = super().forward(input_ids)
        return x * torch.tensor(self.scale, dtype=self.weight.dtype, device="cpu").item()


class LMHead(nn.Module):
    """[O, H] -> [O, V] fp32 logits. Computed in the weight dtype (as HF does), then upcast for sampling."""

    def __init__(self, hidden: int, vocab: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab, hidden))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight).float()
