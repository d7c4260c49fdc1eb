"""Conv [-> Relu] -> MaxPool (kernel = stride = s) computed in phases: SpaceToDepth, one wider Conv, Max.

The pool's output at (i, j) is the largest of the conv's outputs at (s*i + a, s*j + b) over the s*s phases (a, b).
After SpaceToDepth(s) of the conv's input, the conv output of phase (a, b) is a stride-1 conv with a kernel of
ceil((K + s - 1) / s) taps whose weights are the original taps moved to where SpaceToDepth put the pixels they read
(zeros elsewhere). All phases are one Conv with s*s*O outputs (phase after phase), the max over the phases is a
Split and a Max. Relu, which commutes with max, reads the phase conv's output: runtimes fuse it into the conv,
and an int8 model quantizes the conv's output over [0, max] as the pool's. The conv's zero pads become the phase
conv's pads, with a Pad node first where the pads at the start are not a multiple of s or the padded-at-start
input is not a multiple of s long.

One Conv of s*s*O channels on an s-times smaller image, where ORT's NCHWc conv computes output channels in blocks
of 16: a narrow first layer (pruned LeNet5's conv1, 3 channels) does the work of one block instead of s*s. It
computes more MACs (the phase kernels are partly zero), so it pays only where measured faster.

With ``int8_kernels`` the phase conv gets zero output channels up to what ONNX Runtime's CPU int8 conv runs
without im2col (:func:`int8_padding`; LeNet5's conv1: 12 -> 16), split off into a part nobody reads.

Exact where the conv's input is finite: a phase kernel's zeros multiply pixels the original conv does not read for
that phase, and ``0 * inf`` is NaN (the condition of ``--assume-finite``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.graphutil import (
    NameSource,
    is_default_domain,
    opset_version,
    set_const_input,
    weight_and_bias,
)
from onnxprune.pass_infra import GraphPass, PassResult

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Axis:
    """How one spatial axis of a site is computed in phases."""

    size: int  # the conv's input's
    stride: int  # s
    pad_before: int  # zeros a Pad node adds at the start (aligns the pool's windows with SpaceToDepth's blocks)
    pad_after: int  # zeros a Pad node adds at the end (makes the length a multiple of s)
    conv_before: int  # the phase conv's pad at the start, in blocks
    conv_after: int  # the phase conv's pad at the end, in blocks
    taps: int  # the phase kernel's size

    @property
    def padded(self) -> int:
        """The length after the Pad node (if any)."""
        return self.size + self.pad_before + self.pad_after

    @property
    def pooled(self) -> int:
        """The phase conv's (and the pool's) output length."""
        return self.padded // self.stride + self.conv_before + self.conv_after - self.taps + 1


@dataclass
class Site:
    """A Conv [-> Relu] -> MaxPool that can be computed in phases."""

    conv: gs.Node
    relu: gs.Node | None
    pool: gs.Node
    stride: int  # s: the pool's kernel and strides
    weight: np.ndarray
    bias: np.ndarray | None
    axes: tuple[Axis, Axis]


def _ints(node: gs.Node, name: str, default: list[int]) -> list[int]:
    return [int(v) for v in node.attrs.get(name, default)]


def _only_reader(t: gs.Tensor, outputs: set[int]) -> gs.Node | None:
    """The one node reading ``t`` (None if it is read by several, none, or is a graph output)."""
    return t.outputs[0] if len(t.outputs) == 1 and id(t) not in outputs else None


def _conv_refusal(conv: gs.Node) -> str | None:
    """Why ``conv`` cannot be computed in phases, as far as the conv alone tells (None if it can)."""
    found = weight_and_bias(conv)
    if found is None:
        return "its weight or bias is not a constant"
    if found[0].ndim != 4:
        return f"not a 2-D conv (weight of rank {found[0].ndim})"
    if int(conv.attrs.get("group", 1)) != 1:
        return f"grouped (group {conv.attrs['group']})"
    if _ints(conv, "strides", [1, 1]) != [1, 1]:
        return f"strides {_ints(conv, 'strides', [1, 1])}, not 1"
    if _ints(conv, "dilations", [1, 1]) != [1, 1]:
        return f"dilations {_ints(conv, 'dilations', [1, 1])}, not 1"
    if conv.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return f"auto_pad {conv.attrs['auto_pad']}"
    return None


def _pool_refusal(pool: gs.Node) -> str | None:
    """Why ``pool`` is not a MaxPool whose windows tile its input (None if it is)."""
    if pool.op != "MaxPool" or not is_default_domain(pool):
        return f"read by {pool.op}, not MaxPool"
    kernel, strides = _ints(pool, "kernel_shape", []), _ints(pool, "strides", [1, 1])
    if len(kernel) != 2 or kernel[0] != kernel[1] or kernel != strides or kernel[0] < 2:
        return f"MaxPool kernel {kernel} strides {strides}: not one square kernel equal to its strides"
    if any(_ints(pool, "pads", [0] * 4)) or pool.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return "MaxPool pads"
    if int(pool.attrs.get("ceil_mode", 0)) or _ints(pool, "dilations", [1, 1]) != [1, 1]:
        return "MaxPool ceil_mode or dilations"
    if len([t for t in pool.outputs if t is not None and t.name]) != 1:
        return "MaxPool writes indices"
    return None


def _chain(conv: gs.Node, outputs: set[int]) -> tuple[gs.Node | None, gs.Node] | str:
    """The Relu (or None) and MaxPool reading ``conv`` as their only reader; a reason if it is not so read."""
    reader = _only_reader(conv.outputs[0], outputs)
    if reader is None:
        return "its output is not read by one node only (or is a graph output)"
    relu = None
    if reader.op == "Relu" and is_default_domain(reader):
        relu, reader = reader, _only_reader(reader.outputs[0], outputs)
        if reader is None:
            return "its Relu's output is not read by one node only (or is a graph output)"
    return relu, reader


def _axis(size: int, kernel: int, begin: int, end: int, s: int) -> Axis | str:
    """One spatial axis in phases: input ``size``, conv ``kernel`` and pads, pool stride ``s``; a reason if the
    phase conv cannot give exactly the pool's outputs."""
    pooled = (size + begin + end - kernel + 1) // s
    if pooled < 1:
        return "the pool has no output"
    pad_before = begin % s
    pad_after = -(size + pad_before) % s
    taps = math.ceil((kernel + s - 1) / s)
    conv_before = begin // s
    conv_after = pooled + taps - 1 - (size + pad_before + pad_after) // s - conv_before
    if conv_after < 0:  # the phase conv would compute windows the pool drops (ceil_mode 0 leaves a remainder)
        return f"the conv's output of {size + begin + end - kernel + 1} does not end where the pool's last window does"
    return Axis(size, s, pad_before, pad_after, conv_before, conv_after, taps)


def _axes(conv: gs.Node, weight: np.ndarray, s: int) -> tuple[Axis, Axis] | str:
    """Both spatial axes of ``conv`` in phases (static sizes needed), or why not."""
    shape = conv.inputs[0].shape
    if shape is None or len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]):
        return f"its input's channels, height and width are not static (shape {shape})"
    pads = _ints(conv, "pads", [0] * 4) if conv.attrs.get("auto_pad", "NOTSET") == "NOTSET" else [0] * 4
    axes = [_axis(shape[2 + k], weight.shape[2 + k], pads[k], pads[2 + k], s) for k in (0, 1)]
    for axis in axes:
        if isinstance(axis, str):
            return axis
    return axes[0], axes[1]


def qualify(conv: gs.Node, outputs: set[int], opset: int) -> Site | str:
    """The site ``conv`` starts, or why it cannot be computed in phases (``outputs``: ids of the graph's outputs)."""
    refusal = _conv_refusal(conv)
    if refusal:
        return refusal
    chain = _chain(conv, outputs)
    if isinstance(chain, str):
        return chain
    relu, pool = chain
    refusal = _pool_refusal(pool)
    if refusal:
        return refusal
    s = int(pool.attrs["kernel_shape"][0])
    weight, bias = weight_and_bias(conv)
    axes = _axes(conv, weight, s)
    if isinstance(axes, str):
        return axes
    if opset < 11 and any(a.pad_before or a.pad_after for a in axes):
        return f"needs a Pad node, and opset {opset} has no Pad with pads as an input"
    return Site(conv, relu, pool, s, weight, bias, axes)


def phase_weight(weight: np.ndarray, s: int, taps: tuple[int, int]) -> np.ndarray:
    """The phase conv's weight: block ``a*s + b`` of output channels is phase (a, b); tap (u, v) of input channel c
    moves to SpaceToDepth's channel ``((p % s) * s + q % s) * C + c`` at (p // s, q // s), p = a + u, q = b + v."""
    out, channels, kh, kw = weight.shape
    phased = np.zeros((s * s * out, s * s * channels, *taps), dtype=weight.dtype)
    for a in range(s):
        for b in range(s):
            rows = slice((a * s + b) * out, (a * s + b + 1) * out)
            for u in range(kh):
                for v in range(kw):
                    p, q = a + u, b + v
                    block = (p % s) * s + q % s
                    phased[rows, block * channels:(block + 1) * channels, p // s, q // s] = weight[:, :, u, v]
    return phased


def _variable(names: NameSource, base: str, like: gs.Tensor, shape: list) -> gs.Variable:
    """A new tensor of ``like``'s type, of ``shape``."""
    return gs.Variable(names.fresh(base), dtype=like.dtype, shape=shape)


def _blocks(site: Site, graph: gs.Graph, names: NameSource) -> gs.Variable:
    """The conv's input, padded where its axes need a Pad node, in SpaceToDepth's blocks of s*s pixels."""
    x, tag, s = site.conv.inputs[0], site.conv.name, site.stride
    (n, c, _, _), (h, w) = x.shape, site.axes
    if h.pad_before or h.pad_after or w.pad_before or w.pad_after:
        pads = np.array([0, 0, h.pad_before, w.pad_before, 0, 0, h.pad_after, w.pad_after], dtype=np.int64)
        padded = _variable(names, f"{tag}_phase_padded", x, [n, c, h.padded, w.padded])
        graph.nodes.append(gs.Node("Pad", names.fresh(f"{tag}_phase_Pad"), {"mode": "constant"},
                                   [x, gs.Constant(names.fresh(f"{tag}_phase_pads"), pads)], [padded]))
        x = padded
    blocks = _variable(names, f"{tag}_phase_blocks", x, [n, c * s * s, h.padded // s, w.padded // s])
    graph.nodes.append(gs.Node("SpaceToDepth", names.fresh(f"{tag}_phase_SpaceToDepth"), {"blocksize": s}, [x], [blocks]))
    return blocks


def int8_padding(outputs: int) -> int:
    """Zero output channels that bring ``outputs`` to a count ONNX Runtime's CPU int8 conv runs without im2col:
    MLAS's symmetric int8 kernel takes 16 or more output channels in a multiple of 8 (AVX2; 4 on AVX-512), and
    input channels in a multiple of 4 (a phase conv with s = 2 has 4 * C)."""
    return max(16, -(-outputs // 8) * 8) - outputs


def _phase_conv(site: Site, blocks: gs.Variable, names: NameSource, padding: int) -> gs.Variable:
    """Turn the site's Conv (kept, with its name) into the phase conv reading ``blocks``, with ``padding`` zero
    output channels after the phases; returns its output."""
    conv, s = site.conv, site.stride
    h, w = site.axes
    conv.inputs[0] = blocks
    weight = phase_weight(site.weight, s, (h.taps, w.taps))
    set_const_input(conv, 1, np.concatenate([weight, np.zeros((padding, *weight.shape[1:]), weight.dtype)]), names)
    if site.bias is not None:
        bias = np.tile(np.asarray(site.bias).reshape(-1), s * s)
        set_const_input(conv, 2, np.concatenate([bias, np.zeros(padding, bias.dtype)]), names)
    conv.attrs.pop("auto_pad", None)
    conv.attrs.update(kernel_shape=[h.taps, w.taps], pads=[h.conv_before, w.conv_before, h.conv_after, w.conv_after],
                      strides=[1, 1], dilations=[1, 1])
    channels = len(weight) + padding
    phases = _variable(names, f"{conv.name}_phases", blocks, [blocks.shape[0], channels, h.pooled, w.pooled])
    conv.outputs[0] = phases
    return phases


def _rectified(site: Site, phases: gs.Variable, names: NameSource) -> gs.Variable:
    """The site's Relu (if any) moved to read the phase conv's output, where runtimes fuse it into the conv
    (Relu commutes with the max over phases); its output, or ``phases`` where there is no Relu."""
    if site.relu is None:
        return phases
    rectified = _variable(names, f"{site.conv.name}_phases_relu", phases, list(phases.shape))
    site.relu.inputs[0], site.relu.outputs[0] = phases, rectified
    return rectified


def _split(site: Site, source: gs.Variable, padding: int, graph: gs.Graph, names: NameSource,
           opset: int) -> list[gs.Variable]:
    """A Split of ``source`` into the s*s phases (and the padding, a part nobody reads): the phases' tensors."""
    s, tag, out = site.stride, site.conv.name, site.weight.shape[0]
    shape = [source.shape[0], out, *source.shape[2:]]
    parts = [_variable(names, f"{tag}_phase_{k}", source, shape) for k in range(s * s)]
    outputs, attrs, inputs = list(parts), {"axis": 1}, [source]
    if padding:
        outputs.append(_variable(names, f"{tag}_phase_padding", source, [shape[0], padding, *shape[2:]]))
        sizes = np.array([out] * (s * s) + [padding], dtype=np.int64)
        if opset >= 13:
            inputs.append(gs.Constant(names.fresh(f"{tag}_phase_sizes"), sizes))
        else:
            attrs["split"] = [int(v) for v in sizes]
    elif opset >= 18:
        attrs["num_outputs"] = s * s  # equal parts: no split sizes before 18
    graph.nodes.append(gs.Node("Split", names.fresh(f"{tag}_phase_Split"), attrs, inputs, outputs))
    return parts


def rewrite(site: Site, graph: gs.Graph, names: NameSource, opset: int, padding: int = 0) -> None:
    """Compute ``site`` in phases: [Pad ->] SpaceToDepth -> phase Conv [-> Relu] -> Split -> Max writes the pool's
    output; the old MaxPool is left for cleanup."""
    phases = _phase_conv(site, _blocks(site, graph, names), names, padding)
    parts = _split(site, _rectified(site, phases, names), padding, graph, names, opset)
    pooled = site.pool.outputs[0]
    site.pool.outputs.clear()
    graph.nodes.append(gs.Node("Max", names.fresh(f"{site.conv.name}_phase_Max"), {}, parts, [pooled]))


class PoolPhasesPass(GraphPass):
    name = "pool-phases"
    summary = ("compute Conv [-> Relu] -> MaxPool (kernel = strides) in phases: SpaceToDepth, one Conv, Max "
               "(exact where the conv's input is finite)")
    requires = frozenset({"shapes"})

    def __init__(self, first_only: bool = False, int8_kernels: bool = False) -> None:
        self.first_only = first_only  # only the first site in graph order (a net's narrow first layer)
        # zero output channels added where ORT's int8 conv needs them to skip im2col (see int8_padding)
        self.int8_kernels = int8_kernels

    def call(self, graph: gs.Graph) -> PassResult:
        outputs, opset, names = {id(t) for t in graph.outputs}, opset_version(graph), NameSource(graph)
        rewritten: list[str] = []
        refused: dict[str, str] = {}
        for conv in [n for n in graph.nodes if n.op == "Conv" and is_default_domain(n)]:
            if self.first_only and rewritten:
                refused[conv.name] = "only the first site is computed in phases (first_only)"
                continue
            site = qualify(conv, outputs, opset)
            if isinstance(site, str):
                refused[conv.name] = site
                logger.debug("pool-phases: %s stays: %s", conv.name, site)
                continue
            outputs_count = site.stride ** 2 * site.weight.shape[0]
            rewrite(site, graph, names, opset, int8_padding(outputs_count) if self.int8_kernels else 0)
            rewritten.append(conv.name)
        if rewritten:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(modified=bool(rewritten), summary=f"{len(rewritten)} Conv -> MaxPool site(s) computed in phases",
                          details={"rewritten": rewritten, "refused": refused})
