"""A small Vision Transformer for 32x32 images (CIFAR-10): patch 4, a class token, pre-norm blocks.

The image is cut into 4x4 patches (a stride-4 Conv2d: 64 tokens of ``dim``), a learned class token is put in
front and a learned position embedding added (65 tokens). Each of ``depth`` pre-norm blocks is
``x + Attention(LN(x))``, ``x + MLP(LN(x))``; the class token's final LayerNorm feeds the linear classifier.

Attention has separate q/k/v/out ``nn.Linear`` layers (as models/transformer.py) and
``F.scaled_dot_product_attention``, so the ONNX export is plain MatMul/Add/Softmax/Reshape/Transpose and both
heads (a head: ``head_dim`` consecutive q/k/v channels) and MLP neurons can be pruned. ``num_heads`` is read at
every forward pass: a pruner that deletes heads sets it to the heads left.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import IMAGENET_MEAN, IMAGENET_STD, make_normalize
from .transformer import MLP, MultiHeadSelfAttention


class Attention(MultiHeadSelfAttention):
    """models/transformer.py's attention through ``F.scaled_dot_product_attention``; ``num_heads`` read at every pass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v
        return self.out(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class Block(nn.Module):
    """Pre-norm encoder block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Patch embedding, class token, learned position embedding, ``depth`` blocks, final LayerNorm, classifier.

    Input ``[B, 3, H, W]`` in [0, 1] (normalised first unless ``normalize=False``); output ``[B, num_classes]``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        dim: int = 192,
        depth: int = 6,
        heads: int = 6,
        mlp: int = 384,
        patch: int = 4,
        image_size: int = 32,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not divisible by patch {patch}")
        self.normalize = make_normalize(normalize, IMAGENET_MEAN, IMAGENET_STD)
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        tokens = (image_size // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens + 1, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """Truncated-normal (std 0.02) position embedding, class token and Linear weights, zero biases (timm's)."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(self.normalize(x)).flatten(2).transpose(1, 2)  # [B, T, D]
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def vit_cifar(num_classes: int = 10, **kwargs) -> ViT:
    """ViT for CIFAR-10: dim 192, depth 6, 6 heads of 32, MLP 384 (GELU), patch 4 (64 tokens + class token);
    ``kwargs`` are :class:`ViT`'s."""
    return ViT(num_classes=num_classes, **kwargs)
