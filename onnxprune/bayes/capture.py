"""Capturing a model's graph for the Bayesian wrapper: torch.fx where it traces, torch.export where it does not.

The wrapper reads a graph whose layers, norms and activations are ``call_module`` nodes (so it can
find each layer's conv -> [norm] -> [activation] chain and insert gate modules after it). torch.fx's
symbolic tracing gives that directly but cannot trace Python control flow on tensors or calls that
need real values (timm's and Hugging Face's attention, hybrid conv/attention nets). torch.export
(non-strict) traces those. Its graph is made of ATen ops, each tagged with the module call it came
from; :func:`export_capture` rolls every single-input leaf module the wrapper cares about (Conv,
Linear, transformers' Conv1D, BatchNorm, activations, Dropout) back into a ``call_module`` node of
the model's own module and keeps the rest as ATen calls reading the model's own parameters, so the
result trains the same parameters, runs each rolled-up module live (BatchNorm and Dropout follow
``train()``/``eval()``) and takes any batch size.

What export fixes at capture time: Python branches on ``self.training`` outside those modules
(e.g. a functional attention dropout) are taken as in evaluation mode; shapes other than the
batch axis are those of the example.
"""

from __future__ import annotations

import inspect
import logging
import traceback
from collections.abc import Sequence

import torch
import torch.fx as fx
from torch import nn

from onnxprune.bayes.grouping import is_hf_conv1d, is_layer
from onnxprune.errors import InputError
from onnxprune.torch_export import batch_of_two

logger = logging.getLogger(__name__)

CAPTURES = ("auto", "fx", "export")
# Leaf modules rolled back into one call_module node each (a single input, a single output).
ROLLED_MODULES = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SiLU, nn.GELU, nn.Hardswish, nn.Tanh, nn.Sigmoid, nn.Mish,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
)  # and transformers' Conv1D (is_hf_conv1d)


class CaptureError(InputError):
    """No capture could trace the model: names the model and what each capture stumbled on."""


def capture(model: nn.Module, example_inputs: tuple, method: str = "auto") -> tuple[fx.GraphModule, str]:
    """A ``call_module``-level graph of ``model`` and the capture that made it ("fx" or "export"): torch.fx
    (``method="fx"``), torch.export (``"export"``), or fx and, when it cannot trace the model, torch.export
    (``"auto"``)."""
    if method not in CAPTURES:
        raise ValueError(f"capture must be one of {CAPTURES}, got {method!r}")
    errors: list[str] = []
    if method in ("auto", "fx"):
        try:
            return symbolic_trace(model), "fx"
        except Exception as exc:  # noqa: BLE001 - any tracing failure: try the next capture
            errors.append(f"torch.fx: {_describe(exc)}")
            logger.info("torch.fx cannot trace %s (%s); capturing with torch.export", type(model).__name__, errors[-1])
    if method in ("auto", "export"):
        try:
            return export_capture(model, example_inputs), "export"
        except Exception as exc:  # noqa: BLE001
            errors.append(f"torch.export: {_describe(exc)}")
    raise CaptureError(f"cannot capture {type(model).__name__} for gating: " + "; ".join(errors))


class _Tracer(fx.Tracer):
    """torch.fx's tracer that also keeps transformers' Conv1D layers and mode-dependent modules
    (:func:`reads_training_flag`) as calls."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return super().is_leaf_module(m, module_qualified_name) or is_hf_conv1d(m) or reads_training_flag(m)


def reads_training_flag(module: nn.Module) -> bool:
    """True for a module without Conv/Linear layers inside whose own ``forward`` reads ``self.training``
    (stochastic depth, a custom dropout, a BatchNorm fused with its activation): traced through, one mode's
    branch would be baked into the graph for both."""
    if any(is_layer(m) for m in module.modules()):
        return False
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False
    return "self.training" in source


def symbolic_trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace`` in evaluation mode, mode-dependent modules kept as ``call_module`` nodes (run
    live); a ``self.training`` branch elsewhere is taken as in evaluation, as torch.export's capture does."""
    was_training = model.training
    model.eval()
    try:
        graph = _Tracer().trace(model)
    finally:
        model.train(was_training)
    gm = fx.GraphModule(model, graph, type(model).__name__)
    gm.train(was_training)
    return gm


def _describe(exc: BaseException) -> str:
    """One line: the error's type and first line, and the innermost frame of the user's code it came from."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/torch/" not in f.filename]
    where = f" (at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    return f"{type(exc).__name__}: {first[:300]}{where}"


def export_capture(model: nn.Module, example_inputs: Sequence) -> fx.GraphModule:
    """``model`` through ``torch.export.export(strict=False)`` (in evaluation mode, the batch axis dynamic), its
    shape guards dropped and its single-input leaf modules rolled back into ``call_module`` nodes."""
    args = tuple(batch_of_two(v) for v in example_inputs)
    dynamic = tuple({0: torch.export.Dim.AUTO} if isinstance(a, torch.Tensor) and a.dim() > 0 else None for a in args)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            program = torch.export.export(model, args, dynamic_shapes=dynamic, strict=False)
    finally:
        model.train(was_training)
    unlifted = program.module()
    _drop_guards(unlifted)
    rolled = _roll_leaf_modules(unlifted, model)
    unlifted.graph.eliminate_dead_code()
    unlifted.graph.lint()
    # a plain GraphModule (the unlifted one refuses train()/eval()) over the same modules and parameters
    gm = fx.GraphModule(unlifted, unlifted.graph, class_name=type(model).__name__)
    gm.train(was_training)
    logger.debug("torch.export capture of %s: %d module calls rolled up", type(model).__name__, rolled)
    return gm


def _drop_guards(gm: fx.GraphModule) -> None:
    """Remove the input-shape guard call that ``ExportedProgram.module()`` adds (the wrapper trains on any batch)."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            gm.graph.erase_node(node)
    for name in [n for n, _ in gm.named_children() if n.startswith("_guards")]:
        delattr(gm, name)


def _module_call(node: fx.Node) -> tuple[str, str] | None:
    """(call key, module path) of the innermost module call ``node`` belongs to, if any."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    key, (path, _) = list(stack.items())[-1]
    return key, path


def _roll_leaf_modules(gm: fx.GraphModule, model: nn.Module) -> int:
    """Replace each call of a :data:`ROLLED_MODULES` leaf by one ``call_module`` node of ``model``'s own module."""
    calls: dict[str, tuple[str, list[fx.Node]]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        call = _module_call(node)
        if call is not None:
            calls.setdefault(call[0], (call[1], []))[1].append(node)
    rolled = 0
    for path, nodes in calls.values():
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        rolled_kind = isinstance(module, ROLLED_MODULES) or is_hf_conv1d(module)
        if rolled_kind and not list(module.children()) and _roll_call(gm, path, module, nodes):
            rolled += 1
    return rolled


def _roll_call(gm: fx.GraphModule, path: str, module: nn.Module, nodes: list[fx.Node]) -> bool:
    """Roll one module call (its ATen nodes) into ``call_module(path)``; False (nothing changed) unless the call
    reads exactly one value from outside besides the module's own parameters and sizes (the batch size a Conv1D's
    ``x.view(...)`` reads, which export computes once for the whole graph: the module, run live, reads its own
    input's) and gives exactly one."""
    region = set(nodes)
    own = f"{path}."
    inputs = {
        n for node in nodes for n in node.all_input_nodes
        if n not in region and not (n.op == "get_attr" and str(n.target).startswith(own))
        and not isinstance(n.meta.get("val"), torch.SymInt)
    }
    outputs = [n for n in nodes if any(u not in region for u in n.users)]
    if len(inputs) != 1 or len(outputs) != 1:
        return False
    (source,), (result,) = inputs, outputs
    _install(gm, path, module)
    with gm.graph.inserting_after(result):
        call = gm.graph.call_module(path, (source,))
    call.meta = dict(result.meta)
    result.replace_all_uses_with(call, delete_user_cb=lambda user: user not in region)
    for node in reversed(nodes):
        if not node.users:
            gm.graph.erase_node(node)
    return True


def _install(gm: fx.GraphModule, path: str, module: nn.Module) -> None:
    """Put ``module`` itself at ``path`` in ``gm`` (whose placeholder there only holds its parameters)."""
    parent_path, _, name = path.rpartition(".")
    parent = gm
    for part in parent_path.split(".") if parent_path else []:
        if not hasattr(parent, part):
            parent.add_module(part, nn.Module())
        parent = getattr(parent, part)
    parent._modules[name] = module  # noqa: SLF001 - replace the parameter holder in place, whatever it is
