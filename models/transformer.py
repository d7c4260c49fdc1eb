"""A pre-norm transformer encoder block on token sequences, with hand-written attention.

Attention uses ``nn.Linear`` for q/k/v/out and ``torch.matmul`` + softmax (no
``nn.MultiheadAttention``), so the ONNX export is plain MatMul/Add/Softmax/
Reshape/Transpose.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class MultiHeadSelfAttention(nn.Module):
    """Scaled dot-product self-attention over ``[B, T, D]`` with ``num_heads`` heads."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, D] -> [B, H, T, D/H]``."""
        b, t, _ = x.shape
        return x.reshape(b, t, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        attn = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scale, dim=-1)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, t, d)
        return self.out(out)


class MLP(nn.Module):
    """Linear(D, rD) -> GELU -> Linear(rD, D)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerClassifier(nn.Module):
    """One pre-norm block ``x + MHA(LN(x))``, ``x + MLP(LN(x))``, then mean over T and a linear head.

    Input ``[B, T, D]`` float tokens (batch first); output ``[B, num_classes]``.
    """

    def __init__(self, dim: int = 64, num_heads: int = 4, mlp_ratio: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadSelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio * dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(dim=1))


def transformer_block(
    dim: int = 64, num_heads: int = 4, mlp_ratio: int = 4, num_classes: int = 10
) -> TransformerClassifier:
    """Single transformer encoder block classifier on (T=16, D=64) token sequences."""
    return TransformerClassifier(dim=dim, num_heads=num_heads, mlp_ratio=mlp_ratio, num_classes=num_classes)
