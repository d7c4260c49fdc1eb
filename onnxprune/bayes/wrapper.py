"""Wrapping any model with Bayesian channel gates.

``wrap(model, example_inputs, method="sbp")`` returns a :class:`BayesianModel`:
the model's graph (torch.fx, or torch.export where fx cannot trace it: see
:mod:`onnxprune.bayes.capture`), with a :class:`GateSite` inserted after every
Conv/Linear whose channels can be pruned, at the end of its conv -> [BN] ->
[activation] chain (or right after the layer when nothing follows). Sites whose
channels are coupled (one engine group, see :mod:`onnxprune.bayes.grouping`)
share one gate and, within a forward pass, one sample of it.

Not gated: layers whose channels reach the graph output (the classifier) or
an op the engine cannot prune through, modules named in ``exclude``, and
producers whose output only feeds a depthwise conv of the same group or a Mul
(an SE excitation branch): there the channel is gated once, further on. Query
and key channels (those reaching an attention contraction) are not gated
either: their head's gate sits at the value projection, the only layer of the
head group that gets a site.

A layer applied functionally (a weight passed to ``F.linear`` or ``F.conv*`` outside
a layer module's call: ``nn.MultiheadAttention``'s packed ``in_proj_weight``, the
``qkv.weight`` of torchvision's Swin) has no graph node to follow: its channels are
gated on its weight and bias instead (:mod:`onnxprune.bayes.weight_gates`), one
sample per minibatch.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from onnxprune.bayes.capture import capture as capture_graph
from onnxprune.bayes.gate import ChannelGate, Producer
from onnxprune.bayes.grouping import Grouping, ModuleChannels, WeightChannels, channel_grouping, is_hf_conv1d, is_layer, layer_width
from onnxprune.bayes.methods import gate_class
from onnxprune.bayes.weight_gates import GatedChannels, WeightSiteInfo, holds_parameter, weight_readers, weight_site

ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SiLU, nn.GELU, nn.Hardswish, nn.Tanh, nn.Sigmoid,
                      nn.Mish)
_aten = torch.ops.aten
ACTIVATION_FUNCTIONS = {F.relu, F.relu6, F.leaky_relu, F.elu, F.silu, F.gelu, F.hardswish, torch.relu, torch.tanh, torch.sigmoid, F.mish,
                        # as torch.export writes them
                        _aten.relu.default, _aten.relu_.default, _aten.relu6.default, _aten.leaky_relu.default,
                        _aten.elu.default, _aten.silu.default, _aten.gelu.default, _aten.hardswish.default,
                        _aten.tanh.default, _aten.sigmoid.default, _aten.mish.default}
ACTIVATION_METHODS = {"relu", "relu_", "sigmoid", "tanh"}
# Positively homogeneous: act(g * x) == g * act(x) for g >= 0, so a gate after them folds into the layer.
HOMOGENEOUS_MODULES = (nn.ReLU, nn.LeakyReLU, nn.PReLU)
HOMOGENEOUS_FUNCTIONS = {F.relu, F.leaky_relu, torch.relu, _aten.relu.default, _aten.relu_.default, _aten.leaky_relu.default}
NORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


NOISE_SHARING = ("example", "batch")
PLACEMENTS = ("output", "pre-bias")


class GateBank(nn.Module):
    """The gates, one per channel group, and one sample of each per forward pass.

    ``noise="example"`` draws each gate once per example (a [batch, G] sample, the lower-variance
    estimator); ``noise="batch"`` draws it once per minibatch and shares it across the examples
    (a [1, G] sample), as the SBP authors' code does. Both estimate the same ELBO. The gates in
    ``batch_shared`` (those gating a weight, :mod:`onnxprune.bayes.weight_gates`) are drawn once per
    minibatch either way.
    """

    def __init__(self, gates: dict[str, ChannelGate], noise: str = "example") -> None:
        super().__init__()
        if noise not in NOISE_SHARING:
            raise ValueError(f"noise must be one of {NOISE_SHARING}, got {noise!r}")
        self.gates = nn.ModuleDict(gates)
        self.noise = noise
        self._samples: dict[str, torch.Tensor] = {}
        #: gates drawn once per minibatch whatever ``noise`` says (they scale a weight, which the examples share)
        self.batch_shared: set[str] = set()
        #: a multiplier of each group's KL term (1 when absent): see onnxprune.bayes.costs.weight_kl_by_macs
        self.kl_weights: dict[str, float] = {}

    def clear(self) -> None:
        self._samples.clear()

    def theta(self, group: str, batch: int) -> torch.Tensor:
        """[batch, G] (training: one sample per example), [1, G] (training, ``noise="batch"``)
        or [G] (eval: E[theta] * mask)."""
        gate = self.gates[group]
        if not self.training:
            return gate.deterministic()
        if self.noise == "batch" or group in self.batch_shared:
            batch = 1
        cached = self._samples.get(group)
        if cached is None or cached.shape[0] != batch:
            together = self._drawn_together(group)
            if len(together) > 1:  # every such gate's draw in one computation (SBP)
                drawn = type(gate).sample_jointly([self.gates[k] for k in together], batch)
                self._samples.update(zip(together, drawn))
            else:
                self._samples[group] = gate.sample(batch)
            cached = self._samples[group]
        return cached

    def _drawn_together(self, group: str) -> list[str]:
        """The gates sampled together with ``group``'s: every gate of the bank of the same class and
        joint key (:meth:`ChannelGate.joint_key`; just ``group`` when that is None)."""
        gate = self.gates[group]
        key = gate.joint_key()
        if key is None:
            return [group]
        return [k for k, g in self.gates.items() if type(g) is type(gate) and g.joint_key() == key]

    def kl(self) -> torch.Tensor:
        """Sum of every gate's complexity term (gates with a joint key in one computation per class and
        key), each group's multiplied by its ``kl_weights`` entry."""
        terms, joint = [], {}
        for name, g in self.gates.items():
            weight = self.kl_weights.get(name, 1.0)
            key = g.joint_key()
            if key is None:
                terms.append(g.kl() * weight if weight != 1.0 else g.kl())
            else:
                joint.setdefault((type(g), key), []).append((g, weight))
        terms += [kind.kl_jointly([g for g, _ in gw], [w for _, w in gw]) for (kind, _), gw in joint.items()]
        return torch.stack(terms).sum() if terms else torch.zeros(())


class GateSite(GatedChannels):
    """Multiplies one tensor by the gates of the groups its channels belong to (ungated channels: 1)."""

    def __init__(self, bank: GateBank, parts: list[tuple[str, torch.Tensor, torch.Tensor]], channels: int, channel_axis: int,
                 layer: nn.Module | None = None) -> None:
        super().__init__(bank, parts, channels)
        self._layer = [layer] if layer is not None else []  # pre-bias placement: the gate leaves this layer's bias alone
        self.channel_axis = channel_axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate_vector(x.shape[0]).to(x.dtype)
        axis = self.channel_axis % x.dim()
        shape = [1] * x.dim()
        shape[axis] = g.shape[-1]
        if g.dim() == 2:  # per example
            shape[0] = g.shape[0]
        bias = self._layer[0].bias if self._layer else None
        if bias is None:
            return x * g.reshape(shape)
        b_shape = [1] * x.dim()
        b_shape[axis] = -1
        b = bias.to(x.dtype).reshape(b_shape)
        return (x - b) * g.reshape(shape) + b  # theta * (W x) + b


@dataclass
class SiteInfo:
    """Where a gate site sits: the layer it follows and the chain between them."""

    name: str
    layer: str
    groups: list[str]
    chain: list[str]  # fx nodes from the layer to the site (layer, [bn], [act])
    norm: str | None  # BatchNorm module in the chain, if any
    foldable: bool  # all activations in the chain are positively homogeneous (or the site is pre-bias)
    pre_bias: bool = False  # the gate scales the layer's W x, before its bias
    contracted_width: int = 0  # the layer's channels that only an attention product reads (packed queries, keys)


class BayesianModel(nn.Module):
    """A model with Bayesian channel gates (see module docstring)."""

    def __init__(self, traced: fx.GraphModule, bank: GateBank, sites: list[SiteInfo], method: str,
                 group_layers: dict[str, list[str]]) -> None:
        super().__init__()
        self.model = traced
        self.bank = bank
        self.sites = sites
        self.method = method
        self.group_layers = group_layers
        #: how the model's graph was read: "fx" or "export" (:func:`onnxprune.bayes.capture.capture`)
        self.captured_by = "fx"
        #: per layer with query / key channels of a gated head group: ``(gate name, channels, positions)``
        #: of those channels, gated at the group's value projection (read by onnxprune.bayes.costs)
        self.contracted: dict[str, list[tuple[str, torch.Tensor, torch.Tensor]]] = {}
        #: the functional layers (weights applied outside a module call) with gated channels, gated on their weight
        #: or, for queries and keys, at their head's values (:mod:`onnxprune.bayes.weight_gates`)
        self.weight_sites: list[WeightSiteInfo] = []

    def forward(self, *args, **kwargs):
        self.bank.clear()
        return self.model(*args, **kwargs)

    @property
    def gates(self) -> nn.ModuleDict:
        return self.bank.gates

    def kl(self) -> torch.Tensor:
        """Sum of every gate's KL divergence from its prior."""
        return self.bank.kl()

    def gate_parameters(self) -> Iterable[nn.Parameter]:
        return self.bank.parameters()

    def weight_parameters(self) -> Iterable[nn.Parameter]:
        gate_ids = {id(p) for p in self.bank.parameters()}
        return (p for p in self.parameters() if id(p) not in gate_ids)

    def clip_(self) -> None:
        """Every gate's :meth:`~ChannelGate.clip_` (after an optimizer step)."""
        for g in self.gates.values():
            g.clip_()

    def compile_gates(self, enabled: bool = True) -> None:
        """Run the gates' numerics through ``torch.compile`` where a gate supports it (SBP)."""
        for g in self.gates.values():
            g.compile_numerics(bool(enabled))

    def begin_epoch(self, epoch: int, epochs: int) -> None:
        """Let gates with a schedule (recursive, layer-by-layer methods) know where training is."""
        for g in self.gates.values():
            g.begin_epoch(epoch, epochs)

    def stage_span(self, epoch: int, epochs: int) -> tuple[int, int] | None:
        """The epochs ``[start, end)`` of the current stage when the gates are trained stage by stage
        (recursive RBP), else None."""
        for g in self.gates.values():
            span = g.stage_epochs(epoch, epochs)
            if span is not None:
                return span
        return None

    def read_states_as_data(self, flag: bool) -> None:
        """Gates on a schedule (RBP) read their state as data in training (one compiled graph for every stage)."""
        for g in self.gates.values():
            g.read_state_as_data(bool(flag))

    def before_step(self) -> None:
        """Between backward and the optimizer step: gates on a schedule (RBP) drop the gradients their state does
        not train."""
        for g in self.gates.values():
            g.before_step()

    def after_step(self) -> None:
        """After each optimizer step: gates with closed-form updates (Turbo-VBI) run them here."""
        for g in self.gates.values():
            g.after_step()

    def leaves_parameters_unused(self) -> bool:
        """True when some gate leaves some of its parameters out of some training steps (RBP's schedule)."""
        return any(g.leaves_parameters_unused() for g in self.gates.values())

    @torch.no_grad()
    def kept(self) -> dict[str, tuple[int, int]]:
        """Per gated group: (channels the posterior keeps, channels gated)."""
        return {name: (int((g.deterministic() != 0).sum()), g.num_channels) for name, g in self.gates.items()}

    def kept_fraction(self) -> float:
        k = self.kept()
        total = sum(t for _, t in k.values())
        return sum(a for a, _ in k.values()) / total if total else 1.0


def _single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _is_norm(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), NORM_MODULES)


def _activation(gm: fx.GraphModule, node: fx.Node) -> tuple[bool, bool]:
    """(is an activation, is positively homogeneous)."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        return isinstance(m, ACTIVATION_MODULES), isinstance(m, HOMOGENEOUS_MODULES)
    if node.op == "call_function" and node.target in ACTIVATION_FUNCTIONS:
        return True, node.target in HOMOGENEOUS_FUNCTIONS
    if node.op == "call_method" and node.target in ACTIVATION_METHODS:
        return True, node.target in ("relu", "relu_")
    return False, False


def _chain(gm: fx.GraphModule, layer: fx.Node) -> tuple[list[fx.Node], str | None, bool]:
    """layer -> [norm] -> [activation...]: the nodes, the norm module name, and foldability."""
    chain, norm, foldable = [layer], None, True
    node = layer
    while True:
        nxt = _single_user(node)
        if nxt is None or len(nxt.all_input_nodes) != 1:
            break
        if _is_norm(gm, nxt) and norm is None and len(chain) == 1:
            norm = nxt.target
            # a BatchNorm subclass with its own forward (timm's BatchNormAct2d): gated after it, not folded into it
            foldable &= type(gm.get_submodule(nxt.target)).forward is nn.modules.batchnorm._BatchNorm.forward
        else:
            is_act, homogeneous = _activation(gm, nxt)
            if not is_act:
                break
            foldable &= homogeneous
        chain.append(nxt)
        node = nxt
    return chain, norm, foldable


_PASS_THROUGH_FUNCS = {torch.flatten, torch.reshape, operator.getitem, _aten.flatten.using_ints, _aten.view.default,
                       _aten.reshape.default, _aten.unsqueeze.default, _aten.squeeze.dim, _aten.squeeze.dims}
_PRODUCTS = {operator.mul, torch.mul, _aten.mul.Tensor}
_PASS_THROUGH_METHODS = {"view", "reshape", "flatten", "unsqueeze", "squeeze", "expand_as"}


def _feeds_only_gated_product(gm: fx.GraphModule, node: fx.Node, groups: set[int], layer_groups: dict[str, set[int]]) -> bool:
    """True if every path from ``node`` ends in a Mul or in a depthwise conv of the same groups."""
    users = list(node.users)
    if not users:
        return False
    for u in users:
        if u.op == "call_function" and u.target in _PRODUCTS:
            continue
        if u.op == "call_module":
            m = gm.get_submodule(u.target)
            if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels and layer_groups.get(u.target) == groups:
                continue
        if (u.op == "call_function" and u.target in _PASS_THROUGH_FUNCS) or (u.op == "call_method" and u.target in _PASS_THROUGH_METHODS):
            if _feeds_only_gated_product(gm, u, groups, layer_groups):
                continue
        return False
    return True


def _input_layers(gm: fx.GraphModule) -> list[fx.Node]:
    """Linear layers that read a graph input through parameter-free ops only (flatten, reshape, ...)."""
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), nn.Linear):
            continue
        src = node.args[0] if node.args else None
        while isinstance(src, fx.Node) and src.op != "placeholder":
            if src.op == "call_module":
                m = gm.get_submodule(src.target)
                if any(True for _ in m.parameters()):
                    break
            elif src.op not in ("call_function", "call_method"):
                break
            inputs = [a for a in src.all_input_nodes]
            if len(inputs) != 1:
                break
            src = inputs[0]
        if isinstance(src, fx.Node) and src.op == "placeholder":
            found.append(node)
    return found


def wrap(
    model: nn.Module,
    example_inputs: tuple | torch.Tensor,
    method: str = "sbp",
    exclude: Iterable[str] = (),
    gate_inputs: bool = False,
    noise: str = "example",
    placement: str = "output",
    capture: str = "auto",
    **gate_kwargs,
) -> BayesianModel:
    """Insert Bayesian gates into ``model``; the original is not modified.

    ``capture`` says how its graph is read: "fx" (torch.fx symbolic tracing), "export" (torch.export,
    non-strict) or "auto" (fx, and torch.export where fx cannot trace the model); when none works,
    :class:`~onnxprune.bayes.capture.CaptureError` names the model and what each capture met.

    ``method`` names the gate class (:mod:`onnxprune.bayes.methods`: "sbp", "rbp", "turbo-vbi", or
    one registered with ``register_method``); ``gate_kwargs`` go to its constructor. Every gate is
    then given its stage (``set_stage``) and producers (``attach``), and ``after_wrap`` the result.

    ``gate_inputs`` also gates, feature by feature, the input of every Linear layer that reads a
    graph input through parameter-free ops (an MLP's pixels, as the SBP paper does for
    LeNet-500-300): rejected features become zero, and the pruned model's first layer reads only
    the kept ones (through a Gather). ``noise`` ("example" or "batch") says whether a training
    forward pass draws the gates once per example or once per minibatch (see :class:`GateBank`).

    ``placement="output"`` gates the end of each layer's conv -> [BN] -> [activation] chain, so a
    rejected channel is zero; ``placement="pre-bias"`` gates ``W x`` before the layer's bias, as the
    SBP authors' code does (``theta * W x + b``; chains with a BatchNorm keep the output placement).
    A channel rejected there is the constant ``act(b)``, which ``onnxprune prune`` folds into the
    next layer's bias where that is exact (an unpadded Conv, Gemm, MatMul) and deletes.

    A layer applied functionally (``nn.MultiheadAttention``'s packed projection, Swin's ``qkv``) is gated on
    its weight rows and bias whatever ``placement`` says, its gates drawn once per minibatch whatever
    ``noise`` says (:mod:`onnxprune.bayes.weight_gates`).
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    cls = gate_class(method)

    def make_gate(num_channels: int) -> ChannelGate:
        return cls(num_channels, **gate_kwargs)

    model = copy.deepcopy(model)
    gm, captured_by = capture_graph(model, example_inputs, capture)
    grouping: Grouping = channel_grouping(model, example_inputs)
    excluded = set(exclude)
    plans, group_layers = _plan_sites(gm, grouping, excluded)
    names = _group_names(plans, group_layers, grouping)
    bank = GateBank({names[g]: make_gate(grouping.group_sizes[g]) for g in names}, noise)
    module_plans = [plan for plan in plans if isinstance(plan, _SitePlan)]
    sites = [_insert_site(gm, bank, f"gate_site_{i}", plan, names, placement) for i, plan in enumerate(module_plans)]
    weight_sites = _weight_sites(gm, bank, grouping, excluded, names)
    layers_by_name = {names[g]: layers for g, layers in group_layers.items() if g in names}
    if gate_inputs:
        for layer in _input_layers(gm):
            sites.append(_insert_input_site(gm, bank, layer, f"gate_site_input_{len(sites)}", make_gate))
            layers_by_name.setdefault(sites[-1].groups[0], [f"input of {layer.target}"])
    producers = _producers(gm, grouping, excluded, names, weight_sites)
    for i, (key, gate) in enumerate(bank.gates.items()):
        gate.set_stage(i, len(bank.gates))  # topological order, for recursive methods
        gate.attach(producers.get(key, []))
    gm.graph.lint()
    gm.recompile()
    result = BayesianModel(gm, bank, sites, method, layers_by_name)
    result.captured_by = captured_by
    result.contracted = _contracted_parts(grouping, excluded, names)
    result.weight_sites = weight_sites
    for gate in bank.gates.values():
        gate.after_wrap(result)
    return result


@dataclass
class _SitePlan:
    """A layer to gate: its fx node, its chain to the site, and its output channels."""

    node: fx.Node
    chain: list[fx.Node]
    norm: str | None
    foldable: bool
    channels: ModuleChannels
    axis: int
    width: int


@dataclass
class _WeightPlan:
    """A functional layer whose channels are gated on its weight (:mod:`onnxprune.bayes.weight_gates`)."""

    channels: WeightChannels


def _plan_sites(gm: fx.GraphModule, grouping: Grouping,
                excluded: set[str]) -> tuple[list[_SitePlan | _WeightPlan], dict[int, list[str]]]:
    """The layers that get a gate site (or a gate on their weight), in graph order, and the layers writing each
    channel group."""
    layer_groups = {name: set(mc.groups) for name, mc in grouping.modules.items()}
    readers = _functional_readers(gm, grouping, excluded)
    group_layers: dict[int, list[str]] = {}
    plans: list[_SitePlan | _WeightPlan] = []
    for node in list(gm.graph.nodes):
        for wc in readers.get(node, []):
            for g in wc.all_groups:
                group_layers.setdefault(g, []).append(wc.module)
            if wc.parts:
                plans.append(_WeightPlan(wc))
        if node.op != "call_module" or node.target not in grouping.modules or node.target in excluded:
            continue
        module = gm.get_submodule(node.target)
        if not is_layer(module):
            continue
        mc = grouping.modules[node.target]
        for g in mc.all_groups:
            group_layers.setdefault(g, []).append(node.target)
        if not mc.parts:  # only queries / keys: their heads are gated at the value projection
            continue
        chain, norm, foldable = _chain(gm, node)
        if _feeds_only_gated_product(gm, chain[-1], set(mc.groups), layer_groups):
            continue
        conv = isinstance(module, CONV_MODULES)
        plans.append(_SitePlan(node, chain, norm, foldable, mc, 1 if conv else -1, layer_width(module)))
    return plans, group_layers


def _is_excluded(path: str, excluded: set[str]) -> bool:
    """True when ``path`` or a module holding it is named in ``excluded``."""
    return any(path == name or path.startswith(f"{name}.") for name in excluded)


def _functional_readers(gm: fx.GraphModule, grouping: Grouping, excluded: set[str]) -> dict[fx.Node, list[WeightChannels]]:
    """The functional layers of ``grouping`` to gate (not excluded, their parameters held by ``gm``), by the first
    graph node that reads their weight."""
    found: dict[fx.Node, list[WeightChannels]] = {}
    for path, wc in grouping.weights.items():
        params = [p for p in (path, wc.bias) if p is not None]
        if any(_is_excluded(p, excluded) or not holds_parameter(gm, p) for p in params):
            continue
        readers = weight_readers(gm, path)
        if readers:
            found.setdefault(readers[0], []).append(wc)
    return found


def _weight_sites(gm: fx.GraphModule, bank: GateBank, grouping: Grouping, excluded: set[str],
                  names: dict[int, str]) -> list[WeightSiteInfo]:
    """Gate every functional layer planned by :func:`_plan_sites` on its weight (its gates drawn once per
    minibatch); those with only query / key channels are recorded ungated, for the MAC costs."""
    sites = []
    for wcs in _functional_readers(gm, grouping, excluded).values():
        for wc in wcs:
            site = weight_site(gm, bank, wc, names, len(sites))
            if site.parts or site.contracted:
                sites.append(site)
                bank.batch_shared.update(site.groups)
    return sites


def _group_names(plans: list[_SitePlan | _WeightPlan], group_layers: dict[int, list[str]], grouping: Grouping) -> dict[int, str]:
    """A gate name per gated channel group: the name of its first layer that gates some of its channels (not a
    query or key projection; module names may not contain dots)."""
    names: dict[int, str] = {}
    for plan in plans:
        for g in plan.channels.groups:
            if g not in names:
                first = next(n for n in group_layers[g] if g in grouping.channels(n).groups)
                key = first.replace(".", "_")
                while key in names.values():
                    key += "_"
                names[g] = key
    return names


def _insert_site(gm: fx.GraphModule, bank: GateBank, site_name: str, plan: _SitePlan, names: dict[int, str],
                 placement: str) -> SiteInfo:
    """Insert the gate site of ``plan`` after its chain (pre-bias placement: right after the layer)."""
    parts = [(names[g], torch.as_tensor(ch), torch.as_tensor(pos)) for g, ch, pos in plan.channels.parts]
    chain, foldable = plan.chain, plan.foldable
    pre_bias = placement == "pre-bias" and plan.norm is None
    if pre_bias:
        chain, foldable = chain[:1], True
    layer_module = gm.get_submodule(plan.node.target) if pre_bias else None
    gm.add_submodule(site_name, GateSite(bank, parts, plan.width, plan.axis, layer_module))
    end = chain[-1]
    with gm.graph.inserting_after(end):
        new = gm.graph.call_module(site_name, (end,))
    end.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    groups = [names[g] for g in plan.channels.groups]
    return SiteInfo(site_name, plan.node.target, groups, [n.name for n in chain], plan.norm, foldable, pre_bias,
                    plan.channels.contracted_width)


def _insert_input_site(gm: fx.GraphModule, bank: GateBank, layer: fx.Node, site_name: str,
                       make_gate: Callable[[int], ChannelGate]) -> SiteInfo:
    """Gate the input features of Linear ``layer`` with a gate of their own, added to ``bank``."""
    features = gm.get_submodule(layer.target).in_features
    key = f"input_{layer.target}".replace(".", "_")
    bank.gates[key] = make_gate(features)
    everything = torch.arange(features)
    gm.add_submodule(site_name, GateSite(bank, [(key, everything, everything)], features, -1))
    src = layer.args[0]
    with gm.graph.inserting_before(layer):
        new = gm.graph.call_module(site_name, (src,))
    layer.replace_input_with(src, new)
    return SiteInfo(site_name, layer.target, [key], [], None, False)


def _producers(gm: fx.GraphModule, grouping: Grouping, excluded: set[str], names: dict[int, str],
               weight_sites: list[WeightSiteInfo]) -> dict[str, list]:
    """Per gate name: ``(weight, rows, positions)`` of every layer writing its channels (for ``attach``), not the
    query / key channels of a head (gated at its values). A transformers Conv1D (weight [in, out]: a channel is a
    column) comes as a :class:`~onnxprune.bayes.gate.Producer` with ``channel_axis=1``."""
    producers: dict[str, list] = {}
    for name, mc in grouping.modules.items():
        module = gm.get_submodule(name)
        if name in excluded or not is_layer(module):
            continue
        for g, ch, pos in mc.parts:
            if g in names:
                item = (module.weight, torch.as_tensor(ch), torch.as_tensor(pos))
                if is_hf_conv1d(module):
                    item = Producer(*item, channel_axis=1)
                producers.setdefault(names[g], []).append(item)
    for site in weight_sites:
        weight = gm.get_parameter(site.weight)
        for key, ch, pos in site.parts:
            producers.setdefault(key, []).append((weight, ch, pos))
    return producers


def _contracted_parts(grouping: Grouping, excluded: set[str], names: dict[int, str]) -> dict[str, list]:
    """Per layer: ``(gate name, channels, positions)`` of its query / key channels in gated head groups."""
    found: dict[str, list] = {}
    for name, mc in grouping.modules.items():
        parts = [(names[g], torch.as_tensor(ch), torch.as_tensor(pos)) for g, ch, pos in mc.contracted if g in names]
        if parts and name not in excluded:
            found[name] = parts
    return found
