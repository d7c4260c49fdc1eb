"""Tiny attention models with rotary position embeddings, dead heads and dead FFN neurons (test helper: builders).

Like tests/attention_models.py (whose :class:`AttentionCase` and :class:`Kill` they use): random weights, some
heads dead (their V rows zero, so their output is zero whatever Q and K are), some FFN neurons dead, and
``removed_params`` what removing exactly those in PyTorch removes. Rotary embedding holds no parameters: its
cos/sin tables are the same for every head and stay.

* :func:`rotary_block`: hand-written rotary attention (HF's ``rotate_half``: ``cat(-x2, x1)`` of the two halves
  of the head width, by slicing or by ``torch.chunk``; cos/sin tables [1, 1, S, D]) in a pre-norm block, either
  multi-head (heads 1 and 3 of 4 dead) or grouped-query (2 K/V heads for 4 query heads, K/V head 1 dead with
  its query heads 2 and 3).
* :func:`hf_llama`: transformers' LlamaModel (2 layers, 4 query heads of 8, random weights, no download),
  ``eager`` or ``sdpa`` attention, multi-head or grouped-query; SwiGLU MLP neurons dead by a zero ``up_proj`` row.

torchvision and transformers are imported only through tests/vision.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.attention_models import (
    DEAD_HEADS,
    DEAD_NEURONS,
    DIM,
    HEAD_DIM,
    HEADS,
    SEQ,
    VOCAB,
    AttentionCase,
    Block,
    HFOutput,
    Kill,
    head_params,
    zero_out_rows,
)
from tests.vision import import_transformers


def rotary_tables(seq: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [1, 1, seq, head_dim] as HF's default rotary embedding makes them (each frequency twice)."""
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(seq, dtype=torch.float32), inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos()[None, None], emb.sin()[None, None]


def rotate_half(x: torch.Tensor, chunk: bool = False) -> torch.Tensor:
    """HF's rotate_half: ``cat(-x2, x1)`` of the two halves of the last axis (``torch.chunk`` or slicing)."""
    if chunk:
        x1, x2 = x.chunk(2, dim=-1)
    else:
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


class RotaryAttention(nn.Module):
    """q/k/v/o projections, ``view(B, S, H, D).transpose(1, 2)``, rotary embedding on q and k, HF's repeat_kv
    for grouped-query attention, causal SDPA."""

    def __init__(self, dim: int = DIM, heads: int = HEADS, kv_heads: int = HEADS, head_dim: int = HEAD_DIM,
                 chunk: bool = False) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.chunk = heads, kv_heads, head_dim, chunk
        self.q = nn.Linear(dim, heads * head_dim)
        self.k = nn.Linear(dim, kv_heads * head_dim)
        self.v = nn.Linear(dim, kv_heads * head_dim)
        self.o = nn.Linear(heads * head_dim, dim)
        cos, sin = rotary_tables(SEQ, head_dim)
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)

    def rope(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.cos + rotate_half(x, self.chunk) * self.sin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.rope(self.q(x).view(b, s, -1, self.head_dim).transpose(1, 2))
        k = self.rope(self.k(x).view(b, s, -1, self.head_dim).transpose(1, 2))
        v = self.v(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        rep = self.heads // self.kv_heads
        if rep > 1:
            k = k[:, :, None].expand(b, self.kv_heads, rep, s, self.head_dim).reshape(b, self.heads, s, self.head_dim)
            v = v[:, :, None].expand(b, self.kv_heads, rep, s, self.head_dim).reshape(b, self.heads, s, self.head_dim)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(o.transpose(1, 2).reshape(b, s, -1))


def _kill_kv_head(kill: Kill, v: nn.Linear, kv_head: int, rep: int, dim: int, head_dim: int, bias: bool) -> None:
    """K/V head ``kv_head`` dead (its V rows zero): it goes with its K rows and its ``rep`` query heads (Q rows,
    output-projection columns)."""

    def removed() -> int:
        zero_out_rows(v.weight, v.bias, slice(kv_head * head_dim, (kv_head + 1) * head_dim))
        return 2 * head_dim * (dim + bias) + rep * (head_dim * (dim + bias) + dim * head_dim)

    kill.heads_by(removed, rep)


def _sequence(batch: int) -> torch.Tensor:
    return torch.randn(batch, SEQ, DIM)


def rotary_block(*, gqa: bool = False, chunk: bool = False, heads: bool = True, neurons: bool = True) -> AttentionCase:
    """Hand-written rotary attention in a pre-norm block: heads 1 and 3 dead, or (``gqa``) K/V head 1 of 2 dead."""
    torch.manual_seed(0)
    attn = RotaryAttention(kv_heads=2 if gqa else HEADS, chunk=chunk)
    kill = Kill(heads, neurons)
    block = kill.randomized(Block(attn))
    if gqa:
        _kill_kv_head(kill, attn.v, 1, HEADS // 2, DIM, HEAD_DIM, bias=True)
    else:
        kill.separate_heads(attn.v, DEAD_HEADS, HEAD_DIM)
    kill.linear_neurons(block.fc1, block.fc2, DEAD_NEURONS)
    name = f"rotary_{'gqa' if gqa else 'mha'}{'_chunk' if chunk else ''}"
    return kill.case(name, block, _sequence)


def _tokens(batch: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, SEQ))


# per layer: dead heads (multi-head) or the dead K/V head (grouped-query), dead SwiGLU neurons
LLAMA_PLAN = {0: ((1, 3), 1, (0, 5, 6, 63)), 1: ((2,), 0, (7, 8))}


def hf_llama(attn_implementation: str = "eager", *, gqa: bool = False, heads: bool = True,
             neurons: bool = True) -> AttentionCase:
    """transformers LlamaModel (2 layers, 4 query heads of 8; 2 K/V heads with ``gqa``) returning
    last_hidden_state. A neuron of the SwiGLU MLP is dead when its ``up_proj`` row is zero (gate * 0 = 0):
    removing it removes its gate and up rows and its down_proj column."""
    tr = import_transformers()
    torch.manual_seed(0)
    kv_heads = 2 if gqa else HEADS
    config = tr.LlamaConfig(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=HEADS, num_key_value_heads=kv_heads, head_dim=HEAD_DIM,
                            max_position_embeddings=2 * SEQ, attn_implementation=attn_implementation)
    llama = tr.LlamaModel(config)
    assert llama.config._attn_implementation == attn_implementation
    kill = Kill(heads, neurons)
    kill.randomized(llama)
    for i, layer in enumerate(llama.layers):
        dead_heads, dead_kv, dead_neurons = LLAMA_PLAN[i]
        attn, mlp = layer.self_attn, layer.mlp
        if gqa:
            _kill_kv_head(kill, attn.v_proj, dead_kv, HEADS // kv_heads, DIM, HEAD_DIM, bias=False)
        else:
            def kill_heads(v=attn.v_proj, dead=dead_heads) -> int:
                for h in dead:
                    zero_out_rows(v.weight, None, slice(h * HEAD_DIM, (h + 1) * HEAD_DIM))
                return len(dead) * head_params(DIM, HEAD_DIM, bias=False)

            kill.heads_by(kill_heads, len(dead_heads))
        if kill.do_neurons:
            for n in dead_neurons:
                zero_out_rows(mlp.up_proj.weight, None, slice(n, n + 1))
            kill.removed += len(dead_neurons) * 3 * DIM
            kill.neurons += len(dead_neurons)
    name = f"hf_llama_{'gqa_' if gqa else ''}{attn_implementation}"
    return kill.case(name, HFOutput(llama, "last_hidden_state"), _tokens)
