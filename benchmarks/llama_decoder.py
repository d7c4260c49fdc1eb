"""A Llama-shaped decoder built with onnx's helpers, random fp16 weights streamed to one external data file, some
heads and FFN neurons dead.

The graph, per layer (Hugging Face's LlamaDecoderLayer written out, eager attention, no KV cache):

* RMSNorm as HF computes it: ``Cast`` to float32, ``Pow(x, 2)``, ``ReduceMean`` over the hidden axis, ``Add`` eps,
  ``Sqrt``, ``Div``, ``Cast`` back to float16, ``Mul`` by the fp16 weight;
* q/k/v projections (``MatMul`` by [H, nq*D], [H, nkv*D], [H, nkv*D]), each ``Reshape``d to [B, S, heads, D] and
  ``Transpose``d to [B, heads, S, D];
* rotary embedding on q and k (``--rotary``; off by default): ``q*cos + rotate_half(q)*sin`` with ``rotate_half`` as
  HF writes it (``Slice`` the two halves of D, ``Neg`` the second, ``Concat``), cos/sin constant [1, 1, S, D];
* the GQA repeat of K and V as HF's ``repeat_kv``: ``Unsqueeze`` axis 2, ``Expand`` to [1, nkv, rep, S, D],
  ``Reshape`` to [B, nq, S, D];
* ``MatMul(q, Transpose(k))``, ``Mul`` by 1/sqrt(D), ``Add`` of the causal mask (constant [1, 1, S, S], fp16 min
  above the diagonal), ``Softmax`` in float32 (``Cast`` up and back, as HF does), ``MatMul`` by V;
* heads merged (``Transpose``, ``Reshape`` to [B, S, nq*D]), ``o_proj``, the residual ``Add``;
* RMSNorm, the SwiGLU MLP: ``Sigmoid(gate)*gate*up`` (SiLU as ``Sigmoid`` and ``Mul``), ``down``; the residual ``Add``.

Then the final RMSNorm (no embedding, no lm_head: the input is hidden states [batch, S, H], batch symbolic, S
fixed). Every Reshape target is a constant with -1 for the batch.

What is dead in each layer (random normal weights elsewhere, std 0.02, norms 1 + noise):

* one K/V head (layer i: head i mod nkv): its V columns are zero, so its output is zero whatever Q and K are;
  deleting it takes its K and V columns, and all ``rep`` query heads that read it (Q columns, o_proj rows);
* ``dead_query_heads`` further query heads (of other K/V groups) whose o_proj rows are zero: their output
  reaches nothing, but their K/V head still serves the group's other query heads;
* FFN neurons, three kinds in equal parts of ``dead_ffn`` of F: up column zero (the product is zero), gate
  column zero (SiLU(0) = 0), down row zero (the neuron reaches nothing).

A prune of it is checked block by block by the library (``onnxprune prune --verify blocks``,
onnxprune/verify_blocks.py): the residual stream between sublayers is a cut every path from the input to the output
crosses (the mask and rotary tables are constants inside each block), and ``build_llama`` returns those cut points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.common import ExternalDataWriter

FP16_MIN = float(np.finfo(np.float16).min)


@dataclass
class LlamaShape:
    layers: int
    hidden: int = 4096
    ffn: int = 11008
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    seq: int = 16
    dead_ffn: float = 0.15  # share of F dead, in three equal kinds (up, gate, down)
    dead_query_heads: int = 1  # per layer, beside the dead K/V head's own query heads
    rotary: bool = False  # HF's rotary embedding on q and k (the engine follows the heads through it)
    eps: float = 1e-5

    @property
    def rep(self) -> int:
        return self.heads // self.kv_heads

    @property
    def layer_params(self) -> int:
        h, d = self.hidden, self.head_dim
        return h * d * (2 * self.heads + 2 * self.kv_heads) + 3 * h * self.ffn + 2 * h

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.hidden

    @property
    def weight_bytes(self) -> int:
        return 2 * self.params

    def dead_neurons(self) -> tuple[int, int, int]:
        """Dead FFN neurons per layer of each kind: (up column zero, gate column zero, down row zero)."""
        n = round(self.dead_ffn * self.ffn / 3)
        return n, n, n

    def expected_removed(self) -> dict:
        """Parameters each kind of dead unit holds, over the model (what deleting it removes)."""
        h, d, L = self.hidden, self.head_dim, self.layers
        up, gate, down = self.dead_neurons()
        kv = L * (2 * h * d + self.rep * 2 * h * d)  # K and V columns; Q columns and o_proj rows of its query heads
        return {"kv_head_with_its_query_heads": kv, "lone_query_heads": L * self.dead_query_heads * 2 * h * d,
                "ffn_up_zero": L * up * 3 * h, "ffn_gate_zero": L * gate * 3 * h, "ffn_down_zero": L * down * 3 * h}


def _normal16(rng: np.random.Generator, shape: tuple[int, int], std: float = 0.02) -> np.ndarray:
    """Random normal fp16 of ``shape``, made 16 Mi values at a time (float32 scratch of 64 MiB at most)."""
    out = np.empty(shape, np.float16)
    flat = out.reshape(-1)
    step = 1 << 24
    for i in range(0, flat.size, step):
        n = min(step, flat.size - i)
        chunk = rng.standard_normal(n, dtype=np.float32)
        chunk *= np.float32(std)
        flat[i:i + n] = chunk
    return out


def _norm_weight(rng: np.random.Generator, n: int) -> np.ndarray:
    return (1 + 0.1 * rng.standard_normal(n, dtype=np.float32)).astype(np.float16)


def _consts(shape: LlamaShape):
    """The constant tensors every layer shares (small, stored inside the .onnx): shapes, axes, mask, rotary tables."""
    from onnx import numpy_helper

    s, d, nq, nkv = shape.seq, shape.head_dim, shape.heads, shape.kv_heads
    i64 = lambda v: np.array(v, np.int64)  # noqa: E731
    mask = np.triu(np.full((s, s), FP16_MIN, np.float32), 1).astype(np.float16)[None, None]
    inv = 1.0 / (10000.0 ** (np.arange(0, d, 2, dtype=np.float64) / d))
    freqs = np.outer(np.arange(s, dtype=np.float64), inv)
    emb = np.concatenate([freqs, freqs], axis=-1)
    values = {
        "c.q_shape": i64([-1, s, nq, d]), "c.kv_shape": i64([-1, s, nkv, d]), "c.perm_axis2": i64([2]),
        "c.expand": i64([1, nkv, shape.rep, s, d]), "c.rep_shape": i64([-1, nq, s, d]),
        "c.merge_shape": i64([-1, s, nq * d]), "c.last": i64([-1]), "c.two": np.array(2.0, np.float32),
        "c.eps": np.array(shape.eps, np.float32), "c.scale": np.array(1 / math.sqrt(d), np.float16),
        "c.mask": mask, "c.cos": np.cos(emb).astype(np.float16)[None, None],
        "c.sin": np.sin(emb).astype(np.float16)[None, None],
        "c.half_starts_lo": i64([0]), "c.half_ends_lo": i64([d // 2]), "c.half_starts_hi": i64([d // 2]),
        "c.half_ends_hi": i64([d]),
    }
    return [numpy_helper.from_array(v, k) for k, v in values.items()]


def _rms_norm(p: str, x: str, weight: str, out: str) -> list:
    from onnx import TensorProto, helper

    mk = helper.make_node
    return [
        mk("Cast", [x], [f"{p}.f32"], to=TensorProto.FLOAT, name=f"{p}.cast_up"),
        mk("Pow", [f"{p}.f32", "c.two"], [f"{p}.sq"], name=f"{p}.pow"),
        mk("ReduceMean", [f"{p}.sq", "c.last"], [f"{p}.var"], keepdims=1, name=f"{p}.mean"),
        mk("Add", [f"{p}.var", "c.eps"], [f"{p}.var_eps"], name=f"{p}.add_eps"),
        mk("Sqrt", [f"{p}.var_eps"], [f"{p}.rms"], name=f"{p}.sqrt"),
        mk("Div", [f"{p}.f32", f"{p}.rms"], [f"{p}.normed32"], name=f"{p}.div"),
        mk("Cast", [f"{p}.normed32"], [f"{p}.normed"], to=TensorProto.FLOAT16, name=f"{p}.cast_down"),
        mk("Mul", [f"{p}.normed", weight], [out], name=f"{p}.weight"),
    ]


def _heads(p: str, x: str, target: str, out: str) -> list:
    from onnx import helper

    return [helper.make_node("Reshape", [x, target], [f"{p}.split"], name=f"{p}.split"),
            helper.make_node("Transpose", [f"{p}.split"], [out], perm=[0, 2, 1, 3], name=f"{p}.transpose")]


def _rotary(p: str, x: str, out: str) -> list:
    """HF's apply_rotary_pos_emb on one of q, k: x*cos + rotate_half(x)*sin, rotate_half = cat(-x2, x1)."""
    from onnx import helper

    mk = helper.make_node
    return [
        mk("Slice", [x, "c.half_starts_lo", "c.half_ends_lo", "c.last"], [f"{p}.x1"], name=f"{p}.x1"),
        mk("Slice", [x, "c.half_starts_hi", "c.half_ends_hi", "c.last"], [f"{p}.x2"], name=f"{p}.x2"),
        mk("Neg", [f"{p}.x2"], [f"{p}.neg_x2"], name=f"{p}.neg"),
        mk("Concat", [f"{p}.neg_x2", f"{p}.x1"], [f"{p}.rot"], axis=-1, name=f"{p}.rotate_half"),
        mk("Mul", [x, "c.cos"], [f"{p}.xcos"], name=f"{p}.cos"),
        mk("Mul", [f"{p}.rot", "c.sin"], [f"{p}.rsin"], name=f"{p}.sin"),
        mk("Add", [f"{p}.xcos", f"{p}.rsin"], [out], name=f"{p}.rope"),
    ]


def _repeat_kv(p: str, x: str, out: str) -> list:
    from onnx import helper

    mk = helper.make_node
    return [mk("Unsqueeze", [x, "c.perm_axis2"], [f"{p}.unsq"], name=f"{p}.unsqueeze"),
            mk("Expand", [f"{p}.unsq", "c.expand"], [f"{p}.exp"], name=f"{p}.expand"),
            mk("Reshape", [f"{p}.exp", "c.rep_shape"], [out], name=f"{p}.repeat")]


def layer_nodes(shape: LlamaShape, i: int, x: str) -> tuple[list, str, str]:
    """Layer i's nodes reading the residual stream ``x``: (nodes, the stream after attention, after the MLP)."""
    from onnx import TensorProto, helper

    mk = helper.make_node
    p = f"layers.{i}"
    a, m = f"{p}.self_attn", f"{p}.mlp"
    nodes = _rms_norm(f"{p}.input_layernorm", x, f"{p}.input_layernorm.weight", f"{p}.attn_in")
    for proj in ("q", "k", "v"):
        nodes.append(mk("MatMul", [f"{p}.attn_in", f"{a}.{proj}_proj.weight"], [f"{a}.{proj}"], name=f"{a}.{proj}_proj"))
    nodes += _heads(f"{a}.q", f"{a}.q", "c.q_shape", f"{a}.q_heads")
    nodes += _heads(f"{a}.k", f"{a}.k", "c.kv_shape", f"{a}.k_heads")
    nodes += _heads(f"{a}.v", f"{a}.v", "c.kv_shape", f"{a}.v_heads")
    q, k = f"{a}.q_heads", f"{a}.k_heads"
    if shape.rotary:
        nodes += _rotary(f"{a}.q_rope", q, f"{a}.q_rot")
        nodes += _rotary(f"{a}.k_rope", k, f"{a}.k_rot")
        q, k = f"{a}.q_rot", f"{a}.k_rot"
    nodes += _repeat_kv(f"{a}.k_rep", k, f"{a}.k_all")
    nodes += _repeat_kv(f"{a}.v_rep", f"{a}.v_heads", f"{a}.v_all")
    nodes += [
        mk("Transpose", [f"{a}.k_all"], [f"{a}.k_t"], perm=[0, 1, 3, 2], name=f"{a}.k_t"),
        mk("MatMul", [q, f"{a}.k_t"], [f"{a}.qk"], name=f"{a}.qk"),
        mk("Mul", [f"{a}.qk", "c.scale"], [f"{a}.scores"], name=f"{a}.scale"),
        mk("Add", [f"{a}.scores", "c.mask"], [f"{a}.masked"], name=f"{a}.causal_mask"),
        mk("Cast", [f"{a}.masked"], [f"{a}.masked32"], to=TensorProto.FLOAT, name=f"{a}.softmax_up"),
        mk("Softmax", [f"{a}.masked32"], [f"{a}.probs32"], axis=-1, name=f"{a}.softmax"),
        mk("Cast", [f"{a}.probs32"], [f"{a}.probs"], to=TensorProto.FLOAT16, name=f"{a}.softmax_down"),
        mk("MatMul", [f"{a}.probs", f"{a}.v_all"], [f"{a}.pv"], name=f"{a}.pv"),
        mk("Transpose", [f"{a}.pv"], [f"{a}.pv_t"], perm=[0, 2, 1, 3], name=f"{a}.merge_t"),
        mk("Reshape", [f"{a}.pv_t", "c.merge_shape"], [f"{a}.merged"], name=f"{a}.merge"),
        mk("MatMul", [f"{a}.merged", f"{a}.o_proj.weight"], [f"{a}.o"], name=f"{a}.o_proj"),
        mk("Add", [x, f"{a}.o"], [f"{p}.post_attn"], name=f"{p}.attn_residual"),
    ]
    nodes += _rms_norm(f"{p}.post_attention_layernorm", f"{p}.post_attn", f"{p}.post_attention_layernorm.weight",
                       f"{p}.mlp_in")
    nodes += [
        mk("MatMul", [f"{p}.mlp_in", f"{m}.gate_proj.weight"], [f"{m}.gate"], name=f"{m}.gate_proj"),
        mk("MatMul", [f"{p}.mlp_in", f"{m}.up_proj.weight"], [f"{m}.up"], name=f"{m}.up_proj"),
        mk("Sigmoid", [f"{m}.gate"], [f"{m}.sig"], name=f"{m}.sigmoid"),
        mk("Mul", [f"{m}.gate", f"{m}.sig"], [f"{m}.silu"], name=f"{m}.silu"),
        mk("Mul", [f"{m}.silu", f"{m}.up"], [f"{m}.act"], name=f"{m}.gate_up"),
        mk("MatMul", [f"{m}.act", f"{m}.down_proj.weight"], [f"{m}.down"], name=f"{m}.down_proj"),
        mk("Add", [f"{p}.post_attn", f"{m}.down"], [f"{p}.out"], name=f"{p}.mlp_residual"),
    ]
    return nodes, f"{p}.post_attn", f"{p}.out"


def _layer_weights(shape: LlamaShape, i: int, rng: np.random.Generator):
    """Yield (name, fp16 array) of layer i's weights, one at a time, the dead units zeroed; and fill ``dead``."""
    h, d, f = shape.hidden, shape.head_dim, shape.ffn
    p = f"layers.{i}"
    a, m = f"{p}.self_attn", f"{p}.mlp"
    kv = i % shape.kv_heads
    # lone dead query heads: the first of other K/V groups, o_proj rows zero
    groups = [(kv + 1 + j) % shape.kv_heads for j in range(shape.dead_query_heads)]
    lone = [g * shape.rep for g in groups]
    n_up, n_gate, n_down = shape.dead_neurons()
    perm = rng.permutation(f)
    up_dead, gate_dead, down_dead = (np.sort(perm[:n_up]), np.sort(perm[n_up:n_up + n_gate]),
                                     np.sort(perm[n_up + n_gate:n_up + n_gate + n_down]))
    dead = {"kv_head": kv, "query_heads_of_kv_head": list(range(kv * shape.rep, (kv + 1) * shape.rep)),
            "lone_query_heads": lone, "ffn_up_zero": len(up_dead), "ffn_gate_zero": len(gate_dead),
            "ffn_down_zero": len(down_dead)}
    yield f"{p}.input_layernorm.weight", _norm_weight(rng, h)
    yield f"{a}.q_proj.weight", _normal16(rng, (h, shape.heads * d))
    yield f"{a}.k_proj.weight", _normal16(rng, (h, shape.kv_heads * d))
    v = _normal16(rng, (h, shape.kv_heads * d))
    v[:, kv * d:(kv + 1) * d] = 0
    yield f"{a}.v_proj.weight", v
    del v
    o = _normal16(rng, (shape.heads * d, h))
    for q in lone:
        o[q * d:(q + 1) * d] = 0
    yield f"{a}.o_proj.weight", o
    del o
    yield f"{p}.post_attention_layernorm.weight", _norm_weight(rng, h)
    gate = _normal16(rng, (h, f))
    gate[:, gate_dead] = 0
    yield f"{m}.gate_proj.weight", gate
    del gate
    up = _normal16(rng, (h, f))
    up[:, up_dead] = 0
    yield f"{m}.up_proj.weight", up
    del up
    down = _normal16(rng, (f, h))
    down[down_dead] = 0
    yield f"{m}.down_proj.weight", down
    yield "dead", dead


def build_llama(path: Path, shape: LlamaShape, *, seed: int = 0) -> dict:
    """Write the decoder to ``path`` and its weights to ``path``.data, one tensor at a time (never more than one
    weight matrix in memory). Returns the files' sizes, the dead units per layer and the cut points."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    data = ExternalDataWriter(path.with_name(path.name + ".data"))
    nodes, inits, dead, cuts = [], _consts(shape), [], ["input"]
    x = "input"
    try:
        for i in range(shape.layers):
            for name, value in _layer_weights(shape, i, rng):
                if name == "dead":
                    dead.append(value)
                else:
                    inits.append(data.add(name, value))
                del value
            layer, mid, x = layer_nodes(shape, i, x)
            nodes += layer
            cuts += [mid, x]
        inits.append(data.add("norm.weight", _norm_weight(rng, shape.hidden)))
    finally:
        data.close()
    nodes += _rms_norm("norm", x, "norm.weight", "output")
    cuts.append("output")
    dims = ["batch", shape.seq, shape.hidden]
    graph = helper.make_graph(nodes, "llama_decoder", [helper.make_tensor_value_info("input", TensorProto.FLOAT16, dims)],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT16, dims)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="prune_at_scale")
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return {"model_bytes": path.stat().st_size + data.path.stat().st_size, "data_file_bytes": data.path.stat().st_size,
            "dead_per_layer": dead, "cuts": cuts}


# -- what the prune deleted, read from the weights' shapes --------------------------------------------------------


def weight_widths(path: Path) -> dict[str, list[int]]:
    """Per projection weight (by the MatMul node that reads it), its shape, from the graph alone (no weights read)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.name.endswith("_proj") and node.input[1] in dims:
            out[node.name] = dims[node.input[1]]
    return out


def deleted_units(shape: LlamaShape, widths: dict[str, list[int]]) -> dict:
    """Units left and deleted over the layers, from the projections' shapes: query heads (q_proj's columns),
    K/V heads (k_proj's; v_proj's must match), o_proj's input rows in heads (fewer than the query heads where the
    engine reads o_proj's input through a Gather), FFN neurons (gate's columns; up's and down's must match)."""
    d = shape.head_dim
    left = {"query_heads": 0, "kv_heads": 0, "o_proj_input_heads": 0, "ffn_neurons": 0, "down_proj_rows": 0}
    for i in range(shape.layers):
        a, m = f"layers.{i}.self_attn", f"layers.{i}.mlp"
        q, k, v, o = (widths[f"{a}.{p}_proj"] for p in "qkvo")
        g, u, dn = (widths[f"{m}.{p}_proj"] for p in ("gate", "up", "down"))
        assert k[1] == v[1] and g[1] == u[1], (q, k, v, o, g, u, dn)
        left["query_heads"] += q[1] // d
        left["kv_heads"] += k[1] // d
        left["o_proj_input_heads"] += o[0] / d
        left["ffn_neurons"] += g[1]
        left["down_proj_rows"] += dn[0]
    n = shape.layers
    full = {"query_heads": n * shape.heads, "kv_heads": n * shape.kv_heads, "o_proj_input_heads": n * shape.heads,
            "ffn_neurons": n * shape.ffn, "down_proj_rows": n * shape.ffn}
    return {"left": left, "deleted": {k: full[k] - left[k] for k in full}}
