"""Tiny attention models with dead heads and dead FFN neurons (test helper: builders, no tests).

Each builder seeds torch, builds one attention pattern with random weights, makes some attention
heads dead and some FFN neurons dead in place, and returns an :class:`AttentionCase`.

A head is dead when its V slice is dead: the V projection's rows (and bias) for that head are zero,
so the head's attention output is zero whatever Q and K are. Deleting it removes the head's Q, K and
V rows and biases and the output projection's input columns. With grouped-query attention a K/V head
is dead when its V rows are zero; it goes together with every query head that reads it.
An FFN neuron is dead when its fc1 row and bias are zero (GELU(0) = 0): deleting it removes that row,
the bias entry and fc2's input column.

``removed_params`` is how many float parameters removing exactly those heads and neurons in PyTorch
removes (the Q/K/V/output-projection weights and biases of the heads, the fc1/fc2 weights and biases of
the neurons). It leaves out per-head tables beside the projections (MaxVit's and Swin's relative
position bias tables): their exported form differs by exporter, so they are not counted.

Every builder takes ``heads`` and ``neurons`` (both True by default): with ``heads=False`` the same model
(same seed, same weights) keeps every head live, with ``neurons=False`` every FFN neuron.

torchvision and transformers are imported only through tests/vision.py (a shim needed on this machine).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from tests.vision import import_timm, import_torchvision, import_transformers

DIM, HEADS, HEAD_DIM, HIDDEN, SEQ = 32, 4, 8, 64, 8
VOCAB = 100


@dataclass
class AttentionCase:
    """One model (eval mode) with ``dead_heads`` dead heads and ``dead_neurons`` dead FFN neurons."""

    name: str
    model: nn.Module
    example: torch.Tensor | tuple[torch.Tensor, ...]
    dead_heads: int
    dead_neurons: int
    removed_params: int
    # a fresh random input of the example's kind (a tensor, or a tuple as the example) for a batch size
    make_input: Callable[[int], torch.Tensor | tuple[torch.Tensor, ...]]

    def __repr__(self) -> str:
        return (f"AttentionCase({self.name!r}, dead_heads={self.dead_heads}, dead_neurons={self.dead_neurons}, "
                f"removed_params={self.removed_params})")

    @property
    def inputs(self) -> tuple[torch.Tensor, ...]:
        return self.example if isinstance(self.example, tuple) else (self.example,)


# ---------------------------------------------------------------------------------------------
# Killing heads and neurons, counting what removing them in PyTorch removes
# ---------------------------------------------------------------------------------------------


def _rows(head: int, head_dim: int, offset: int = 0) -> slice:
    return slice(offset + head * head_dim, offset + (head + 1) * head_dim)


@torch.no_grad()
def zero_out_rows(weight: torch.Tensor, bias: torch.Tensor | None, rows: slice) -> None:
    """Zero output rows ``rows`` of an nn.Linear-layout weight [out, in] and its bias."""
    weight[rows] = 0.0
    if bias is not None:
        bias[rows] = 0.0


@torch.no_grad()
def zero_out_columns(weight: torch.Tensor, bias: torch.Tensor | None, cols: slice) -> None:
    """Zero output columns of a transformers Conv1D weight [in, out] (y = x @ W + b) and its bias."""
    weight[:, cols] = 0.0
    if bias is not None:
        bias[cols] = 0.0


def head_params(dim: int, head_dim: int, *, bias: bool = True) -> int:
    """Float parameters of one MHA head: Q, K, V rows (+ biases) and the output projection's columns."""
    return 3 * head_dim * (dim + bias) + dim * head_dim


def kill_linear_neurons(fc1: nn.Linear, fc2: nn.Linear, neurons: Sequence[int]) -> int:
    """Make ``neurons`` of fc1 -> activation -> fc2 dead; the parameters removing them removes."""
    for n in neurons:
        zero_out_rows(fc1.weight, fc1.bias, slice(n, n + 1))
    return len(neurons) * (fc1.in_features + (fc1.bias is not None) + fc2.out_features)


def kill_mha_heads(in_proj_weight: torch.Tensor, in_proj_bias: torch.Tensor | None, heads: Sequence[int],
                   num_heads: int) -> int:
    """Kill ``heads`` of a packed [3E, E] QKV projection (V is the last third); parameters removed."""
    dim = in_proj_weight.shape[1]
    hd = dim // num_heads
    for h in heads:
        zero_out_rows(in_proj_weight, in_proj_bias, _rows(h, hd, offset=2 * dim))
    return len(heads) * head_params(dim, hd, bias=in_proj_bias is not None)


# ---------------------------------------------------------------------------------------------
# Hand-written modules
# ---------------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    """Separate q/k/v/out projections, ``view(B, S, H, -1).transpose(1, 2)``.

    ``mode``: "sdpa" (F.scaled_dot_product_attention), "additive" (manual softmax with an additive
    causal -inf mask) or "masked_fill" (manual softmax, causal mask by masked_fill).
    """

    def __init__(self, dim: int = DIM, heads: int = HEADS, mode: str = "sdpa") -> None:
        super().__init__()
        self.heads, self.mode = heads, mode
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.heads, -1).transpose(1, 2)
        k = self.k(x).view(b, s, self.heads, -1).transpose(1, 2)
        v = self.v(x).view(b, s, self.heads, -1).transpose(1, 2)
        if self.mode == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            scale = 1.0 / math.sqrt(q.shape[-1])
            if self.mode == "additive":
                mask = torch.full((s, s), float("-inf"), device=x.device).triu(1)
                scores = q @ k.transpose(-2, -1) * scale + mask
            else:
                causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
                scores = (q @ k.transpose(-2, -1) * scale).masked_fill(~causal, -1e9)
            o = torch.softmax(scores, dim=-1) @ v
        return self.out(o.transpose(1, 2).reshape(b, s, -1))


class GQAttention(nn.Module):
    """Grouped-query attention: separate q/k/v/o, HF-style repeat_kv, SDPA (causal), no rotary embedding."""

    def __init__(self, dim: int = DIM, heads: int = HEADS, kv_heads: int = 2, head_dim: int = HEAD_DIM) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q = nn.Linear(dim, heads * head_dim)
        self.k = nn.Linear(dim, kv_heads * head_dim)
        self.v = nn.Linear(dim, kv_heads * head_dim)
        self.o = nn.Linear(heads * head_dim, dim)

    @staticmethod
    def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
        b, kvh, s, d = x.shape
        if n_rep == 1:
            return x
        return x[:, :, None, :, :].expand(b, kvh, n_rep, s, d).reshape(b, kvh * n_rep, s, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        n_rep = self.heads // self.kv_heads
        k, v = self.repeat_kv(k, n_rep), self.repeat_kv(v, n_rep)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(o.transpose(1, 2).reshape(b, s, -1))


class MHAttention(nn.Module):
    """nn.MultiheadAttention (packed in_proj_weight) on a batch-first input, self-attention."""

    def __init__(self, dim: int = DIM, heads: int = HEADS, *, batch_first: bool, need_weights: bool) -> None:
        super().__init__()
        self.batch_first, self.need_weights = batch_first, need_weights
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=batch_first)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.batch_first else x.transpose(0, 1)
        y, _ = self.mha(h, h, h, need_weights=self.need_weights)  # with need_weights the weights go unused
        return y if self.batch_first else y.transpose(0, 1)


class Block(nn.Module):
    """A pre-norm transformer block: x + attn(ln1(x)), then x + fc2(gelu(fc1(ln2(x)))), then a final norm."""

    def __init__(self, attn: nn.Module, dim: int = DIM, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.ln1, self.attn, self.ln2 = nn.LayerNorm(dim), attn, nn.LayerNorm(dim)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        x = x + self.fc2(self.act(self.fc1(self.ln2(x))))
        return self.norm(x)


def _sequence(batch: int) -> torch.Tensor:
    return torch.randn(batch, SEQ, DIM)


def _image(batch: int) -> torch.Tensor:
    return torch.rand(batch, 3, 32, 32)


def _tokens(batch: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, SEQ))


DEAD_HEADS = (1, 3)  # of 4: a dead head next to live ones on both sides
DEAD_NEURONS = (0, 5, 6, 63)
# per layer of the two-layer models: (dead heads, dead FFN neurons)
TWO_LAYER_PLAN = {0: ((1, 3), (0, 5, 6, 63)), 1: ((2,), (7, 8))}


@torch.no_grad()
def randomize_vectors(model: nn.Module, seed: int = 2) -> None:
    """Give every 1-D parameter (biases, norm scales and shifts) random values: libraries initialise them to
    zeros and ones, which would hide a bias or norm rewritten wrongly (and make exporters share them)."""
    generator = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            base = 1.0 if name.endswith("weight") else 0.0  # norm scales near 1, biases and shifts near 0
            p.copy_(base + 0.1 * torch.randn(p.shape, generator=generator))


class Kill:
    """Makes heads and neurons dead (where asked to) and counts them and the parameters removing them removes."""

    def __init__(self, heads: bool, neurons: bool) -> None:
        self.do_heads, self.do_neurons = heads, neurons
        self.heads = self.neurons = self.removed = 0

    def randomized(self, model: nn.Module) -> nn.Module:
        """``model`` with random 1-D parameters (:func:`randomize_vectors`), before anything is killed."""
        randomize_vectors(model)
        return model

    def heads_by(self, kill: Callable[[], int], count: int) -> None:
        """Kill ``count`` heads with ``kill()`` (which returns the parameters they hold) when heads are asked for."""
        if self.do_heads:
            self.removed += kill()
            self.heads += count

    def mha_heads(self, in_proj_weight: torch.Tensor, in_proj_bias: torch.Tensor | None, heads: Sequence[int],
                  num_heads: int) -> None:
        self.heads_by(lambda: kill_mha_heads(in_proj_weight, in_proj_bias, heads, num_heads), len(heads))

    def separate_heads(self, v: nn.Linear, heads: Sequence[int], head_dim: int) -> None:
        """Heads of separate q/k/v/out projections (all dim x dim): zero ``v``'s rows for each."""

        def kill() -> int:
            for h in heads:
                zero_out_rows(v.weight, v.bias, _rows(h, head_dim))
            return len(heads) * head_params(v.in_features, head_dim, bias=v.bias is not None)

        self.heads_by(kill, len(heads))

    def linear_neurons(self, fc1: nn.Linear, fc2: nn.Linear, neurons: Sequence[int]) -> None:
        if self.do_neurons:
            self.removed += kill_linear_neurons(fc1, fc2, neurons)
            self.neurons += len(neurons)

    def conv1d_neurons(self, c_fc: nn.Module, c_proj: nn.Module, neurons: Sequence[int]) -> None:
        """Neurons of a transformers Conv1D MLP (c_fc weight [E, N], c_proj weight [N, E])."""
        if self.do_neurons:
            for n in neurons:
                zero_out_columns(c_fc.weight, c_fc.bias, slice(n, n + 1))
            dim = c_fc.weight.shape[0]
            self.removed += len(neurons) * (dim + (c_fc.bias is not None) + c_proj.weight.shape[1])
            self.neurons += len(neurons)

    def case(self, name: str, model: nn.Module, make_input: Callable[[int], torch.Tensor]) -> AttentionCase:
        torch.manual_seed(1)
        return AttentionCase(name, model.eval(), make_input(1), self.heads, self.neurons, self.removed, make_input)


def _block_case(name: str, attn: nn.Module, kill: Kill, kill_heads: Callable[[Kill], None]) -> AttentionCase:
    block = kill.randomized(Block(attn))
    kill_heads(kill)
    kill.linear_neurons(block.fc1, block.fc2, DEAD_NEURONS)
    return kill.case(name, block, _sequence)


def sdpa_block(*, heads: bool = True, neurons: bool = True) -> AttentionCase:
    """1. Hand-written q/k/v/out + F.scaled_dot_product_attention, pre-norm block with a GELU MLP."""
    torch.manual_seed(0)
    attn = SelfAttention(mode="sdpa")
    return _block_case("sdpa_block", attn, Kill(heads, neurons), lambda k: k.separate_heads(attn.v, DEAD_HEADS, 8))


def manual_causal_block(*, heads: bool = True, neurons: bool = True) -> AttentionCase:
    """2. Manual softmax(q @ k^T * scale + causal -inf mask) @ v."""
    torch.manual_seed(0)
    attn = SelfAttention(mode="additive")
    return _block_case("manual_causal_block", attn, Kill(heads, neurons),
                       lambda k: k.separate_heads(attn.v, DEAD_HEADS, 8))


def manual_masked_fill_block(*, heads: bool = True, neurons: bool = True) -> AttentionCase:
    """2'. Manual attention, causal mask by masked_fill(~tril, -1e9)."""
    torch.manual_seed(0)
    attn = SelfAttention(mode="masked_fill")
    return _block_case("manual_masked_fill_block", attn, Kill(heads, neurons),
                       lambda k: k.separate_heads(attn.v, DEAD_HEADS, 8))


def _mha_case(name: str, *, batch_first: bool, need_weights: bool, heads: bool, neurons: bool) -> AttentionCase:
    torch.manual_seed(0)
    attn = MHAttention(batch_first=batch_first, need_weights=need_weights)
    return _block_case(name, attn, Kill(heads, neurons),
                       lambda k: k.mha_heads(attn.mha.in_proj_weight, attn.mha.in_proj_bias, DEAD_HEADS, HEADS))


def mha_batch_first_block(*, heads: bool = True, neurons: bool = True) -> AttentionCase:
    """3. nn.MultiheadAttention(batch_first=True), need_weights=False."""
    return _mha_case("mha_batch_first_block", batch_first=True, need_weights=False, heads=heads, neurons=neurons)


def mha_seq_first_block(*, heads: bool = True, neurons: bool = True) -> AttentionCase:
    """3'. nn.MultiheadAttention(batch_first=False) (the block transposes), need_weights=False."""
    return _mha_case("mha_seq_first_block", batch_first=False, need_weights=False, heads=heads, neurons=neurons)


def mha_need_weights_block(*, heads: bool = True, neurons: bool = True) -> AttentionCase:
    """3''. nn.MultiheadAttention(batch_first=True), need_weights=True, only the output used."""
    return _mha_case("mha_need_weights_block", batch_first=True, need_weights=True, heads=heads, neurons=neurons)


def gqa_block(*, heads: bool = True, neurons: bool = True) -> AttentionCase:
    """10. GQA: 4 query heads, 2 K/V heads (head_dim 8), repeat_kv + causal SDPA; K/V head 1 dead.

    Dead K/V head 1 feeds query heads 2 and 3: removing it removes its K and V rows and biases, the Q rows
    and biases of query heads 2 and 3 and their output-projection columns. ``dead_heads`` counts the two
    query heads.
    """
    torch.manual_seed(0)
    attn = GQAttention()
    dead_kv, n_rep, hd = 1, attn.heads // attn.kv_heads, attn.head_dim

    def kill_kv_head() -> int:
        zero_out_rows(attn.v.weight, attn.v.bias, _rows(dead_kv, hd))
        return 2 * hd * (DIM + 1) + n_rep * (hd * (DIM + 1) + DIM * hd)

    return _block_case("gqa_block", attn, Kill(heads, neurons), lambda k: k.heads_by(kill_kv_head, n_rep))


# ---------------------------------------------------------------------------------------------
# torchvision
# ---------------------------------------------------------------------------------------------


def torchvision_vit(*, heads: bool = True, neurons: bool = True) -> AttentionCase:
    """4. torchvision VisionTransformer (2 layers, 4 heads of 8): nn.MultiheadAttention + MLPBlock."""
    import_torchvision()
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64,
                              num_classes=10)
    kill = Kill(heads, neurons)
    kill.randomized(model)
    for i, layer in enumerate(model.encoder.layers):
        dead_heads, dead_neurons = TWO_LAYER_PLAN[i]
        kill.mha_heads(layer.self_attention.in_proj_weight, layer.self_attention.in_proj_bias, dead_heads, 4)
        kill.linear_neurons(layer.mlp[0], layer.mlp[3], dead_neurons)
    return kill.case("torchvision_vit", model, _image)


def torchvision_swin(*, heads: bool = True, neurons: bool = True) -> AttentionCase:
    """5. torchvision SwinTransformer (2 stages of one block, 2 then 4 heads of 8): packed qkv Linear, proj.

    Each attention also has a per-head relative position bias table (not counted in removed_params).
    """
    import_torchvision()
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    model = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=[4, 4],
                            num_classes=10)
    kill = Kill(heads, neurons)
    kill.randomized(model)
    blocks = [model.features[1][0], model.features[3][0]]
    plan = [((0,), (1, 2)), ((1, 3), (0, 5, 127))]
    for block, (dead_heads, dead_neurons) in zip(blocks, plan, strict=True):
        kill.mha_heads(block.attn.qkv.weight, block.attn.qkv.bias, dead_heads, block.attn.num_heads)
        kill.linear_neurons(block.mlp[0], block.mlp[3], dead_neurons)
    return kill.case("torchvision_swin", model, _image)


def timm_vit(*, heads: bool = True, neurons: bool = True) -> AttentionCase:
    """timm's VisionTransformer (2 blocks of 3 heads of 64): packed qkv Linear reshaped to [3, B, H, N, D] and
    unbound (exported as Slice and Squeeze), proj."""
    timm = import_timm()
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8, depth=2)
    kill = Kill(heads, neurons)
    kill.randomized(model)
    plan = [((1,), (2, 5)), ((0, 2), (7,))]
    for block, (dead_heads, dead_neurons) in zip(model.blocks, plan, strict=True):
        kill.mha_heads(block.attn.qkv.weight, block.attn.qkv.bias, dead_heads, block.attn.num_heads)
        kill.linear_neurons(block.mlp.fc1, block.mlp.fc2, dead_neurons)
    return kill.case("timm_vit", model, _image)


def torchvision_maxvit(*, heads: bool = True, neurons: bool = True) -> AttentionCase:
    """6. torchvision MaxVit (one block: window and grid attention, 2 heads of 8 each): packed to_qkv, chunk.

    ``to_qkv``'s output is chunked in three along the last axis: V is its last third, head h its rows
    2F + 8h .. 2F + 8h + 7. Each attention also has a per-head relative position bias table (not counted).
    """
    import_torchvision()
    from torchvision.models.maxvit import MaxVit

    torch.manual_seed(0)
    model = MaxVit(input_size=(32, 32), stem_channels=16, partition_size=4, block_channels=[16], block_layers=[1],
                   head_dim=8, stochastic_depth_prob=0.0, num_classes=10)
    layers = model.blocks[0].layers[0].layers
    kill = Kill(heads, neurons)
    kill.randomized(model)
    plan = {"window_attention": ((0,), (3, 4)), "grid_attention": ((1,), (0, 63))}
    for key, (dead_heads, dead_neurons) in plan.items():
        part = getattr(layers, key)
        attn, mlp = part.attn_layer[1], part.mlp_layer
        kill.mha_heads(attn.to_qkv.weight, attn.to_qkv.bias, dead_heads, attn.n_heads)
        kill.linear_neurons(mlp[1], mlp[3], dead_neurons)
    return kill.case("torchvision_maxvit", model, _image)


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers
# ---------------------------------------------------------------------------------------------


class HFOutput(nn.Module):
    """A Hugging Face model whose forward returns a plain tensor (``logits`` or ``last_hidden_state``)."""

    def __init__(self, model: nn.Module, field: str) -> None:
        super().__init__()
        self.model, self.field = model, field

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(x), self.field)


def hf_bert(attn_implementation: str = "eager", *, heads: bool = True, neurons: bool = True) -> AttentionCase:
    """7. transformers BertModel (2 layers, 4 heads of 8) returning last_hidden_state; "eager" or "sdpa"."""
    tr = import_transformers()
    torch.manual_seed(0)
    config = tr.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, attn_implementation=attn_implementation)
    bert = tr.BertModel(config)
    assert bert.config._attn_implementation == attn_implementation
    kill = Kill(heads, neurons)
    kill.randomized(bert)
    for i, layer in enumerate(bert.encoder.layer):
        dead_heads, dead_neurons = TWO_LAYER_PLAN[i]
        kill.separate_heads(layer.attention.self.value, dead_heads, 8)
        kill.linear_neurons(layer.intermediate.dense, layer.output.dense, dead_neurons)
    return kill.case(f"hf_bert_{attn_implementation}", HFOutput(bert, "last_hidden_state"), _tokens)


class HFMasked(nn.Module):
    """A Hugging Face encoder called with ``input_ids`` and an explicit ``attention_mask``: last_hidden_state."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _tokens_and_mask(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _tokens(batch), torch.ones(batch, SEQ, dtype=torch.int64)


def hf_bert_masked(*, heads: bool = True, neurons: bool = True) -> AttentionCase:
    """7'. :func:`hf_bert` ("eager") with an attention-mask input: the form ONNX Runtime's transformer optimizer
    fuses into com.microsoft Attention (from the TorchScript export)."""
    case = hf_bert("eager", heads=heads, neurons=neurons)
    case.name, case.model = "hf_bert_masked", HFMasked(case.model.model).eval()
    case.make_input = _tokens_and_mask
    torch.manual_seed(1)
    case.example = _tokens_and_mask(1)
    return case


def hf_vit(attn_implementation: str = "eager", *, heads: bool = True, neurons: bool = True) -> AttentionCase:
    """8. transformers ViTForImageClassification (2 layers, 4 heads of 8) returning logits."""
    tr = import_transformers()
    torch.manual_seed(0)
    config = tr.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64, num_labels=10, attn_implementation=attn_implementation)
    vit = tr.ViTForImageClassification(config)
    assert vit.config._attn_implementation == attn_implementation
    inner = vit.vit
    kill = Kill(heads, neurons)
    kill.randomized(vit)
    for i, layer in enumerate(inner.layers if hasattr(inner, "layers") else inner.encoder.layer):
        dead_heads, dead_neurons = TWO_LAYER_PLAN[i]
        if hasattr(layer, "mlp"):  # transformers 5.x: attention.{q,k,v,o}_proj, mlp.fc1/fc2
            v_proj, fc1, fc2 = layer.attention.v_proj, layer.mlp.fc1, layer.mlp.fc2
        else:  # transformers 4.x names
            v_proj, fc1, fc2 = layer.attention.attention.value, layer.intermediate.dense, layer.output.dense
        kill.separate_heads(v_proj, dead_heads, 8)
        kill.linear_neurons(fc1, fc2, dead_neurons)
    return kill.case(f"hf_vit_{attn_implementation}", HFOutput(vit, "logits"), _image)


def hf_gpt2(attn_implementation: str = "eager", *, heads: bool = True, neurons: bool = True) -> AttentionCase:
    """9. transformers GPT2LMHeadModel (2 layers, 4 heads of 8, causal) returning logits.

    ``c_attn`` is a transformers Conv1D (weight [in, 3E], y = x @ W + b): V is its last third of columns;
    the MLP's c_fc/c_proj are Conv1D too (a neuron is a c_fc column and a c_proj row).
    """
    tr = import_transformers()
    torch.manual_seed(0)
    config = tr.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=16, bos_token_id=0,
                           eos_token_id=0, attn_implementation=attn_implementation)
    gpt = tr.GPT2LMHeadModel(config)
    assert gpt.config._attn_implementation == attn_implementation
    kill = Kill(heads, neurons)
    kill.randomized(gpt)
    for i, block in enumerate(gpt.transformer.h):
        dead_heads, dead_neurons = TWO_LAYER_PLAN[i]
        c_attn = block.attn.c_attn

        def kill_heads(c_attn=c_attn, dead_heads=dead_heads) -> int:
            for h in dead_heads:
                zero_out_columns(c_attn.weight, c_attn.bias, _rows(h, 8, offset=2 * 32))
            return len(dead_heads) * head_params(32, 8)

        kill.heads_by(kill_heads, len(dead_heads))
        kill.conv1d_neurons(block.mlp.c_fc, block.mlp.c_proj, dead_neurons)
    return kill.case(f"hf_gpt2_{attn_implementation}", HFOutput(gpt, "logits"), _tokens)


# name -> builder(heads=..., neurons=...) for every case
BUILDERS: dict[str, Callable[..., AttentionCase]] = {
    "sdpa_block": sdpa_block,
    "manual_causal_block": manual_causal_block,
    "manual_masked_fill_block": manual_masked_fill_block,
    "mha_batch_first_block": mha_batch_first_block,
    "mha_seq_first_block": mha_seq_first_block,
    "mha_need_weights_block": mha_need_weights_block,
    "gqa_block": gqa_block,
    "torchvision_vit": torchvision_vit,
    "torchvision_swin": torchvision_swin,
    "torchvision_maxvit": torchvision_maxvit,
    "timm_vit": timm_vit,
    "hf_bert_eager": partial(hf_bert, "eager"),
    "hf_bert_sdpa": partial(hf_bert, "sdpa"),
    "hf_bert_masked": hf_bert_masked,
    "hf_vit_eager": partial(hf_vit, "eager"),
    "hf_vit_sdpa": partial(hf_vit, "sdpa"),
    "hf_gpt2_eager": partial(hf_gpt2, "eager"),
    "hf_gpt2_sdpa": partial(hf_gpt2, "sdpa"),
}


def build(name: str, *, heads: bool = True, neurons: bool = True) -> AttentionCase:
    """The case ``name`` (see BUILDERS) with its dead heads (``heads``) and dead FFN neurons (``neurons``)."""
    return BUILDERS[name](heads=heads, neurons=neurons)
