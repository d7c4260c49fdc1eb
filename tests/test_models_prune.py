"""Every reference architecture: kill channels in PyTorch, export, prune, check widths and outputs.

Each case zeroes channels the way a trained sparse model would have them (weight
rows, bias, BatchNorm scale and shift) and states, independently of the engine,
which layers must shrink to which width. Every other layer must keep its width.
Layers are matched to ONNX nodes by the order of module calls in forward().
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import models  # noqa: E402
from onnxprune.torch_export import export_onnx  # noqa: E402
from tests.prune_helpers import layer_widths, prune_checked, same_outputs  # noqa: E402


def _module(model, name: str):
    return dict(model.named_modules())[name]


def kill(model, layer: str, idx, bn: str | None = None) -> None:
    """Zero output channels ``idx`` of a Conv2d/Linear (and the BatchNorm after it)."""
    idx = list(idx)
    with torch.no_grad():
        m = _module(model, layer)
        m.weight[idx] = 0
        if m.bias is not None:
            m.bias[idx] = 0
        if bn is not None:
            b = _module(model, bn)
            b.weight[idx] = 0
            b.bias[idx] = 0


def out_widths(model) -> dict[str, int]:
    return {
        name: m.out_channels if isinstance(m, torch.nn.Conv2d) else m.out_features
        for name, m in model.named_modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    }


# -- kill plans: each returns {module name: expected output width after pruning} ----------


def plan_lenet300(m):
    kill(m, "fc1", range(0, 300, 7))
    kill(m, "fc2", [1, 5, 9, 50])
    return {"fc1": 300 - len(range(0, 300, 7)), "fc2": 96}


def plan_lenet5(m):
    kill(m, "conv1", [0, 3, 19])
    kill(m, "conv2", range(10, 30))
    kill(m, "fc1", range(0, 500, 5))
    return {"conv1": 17, "conv2": 30, "fc1": 400}


def plan_vgg(m):
    kill(m, "features.0", [0, 1, 2], bn="features.1")
    kill(m, "features.14", range(0, 64, 4), bn="features.15")
    kill(m, "features.40", range(0, 128, 2), bn="features.41")  # last conv -> flatten -> classifier
    kill(m, "classifier.0", range(0, 128, 3), bn="classifier.1")
    return {"features.0": 13, "features.14": 48, "features.40": 64, "classifier.0": 128 - len(range(0, 128, 3))}


def plan_resnet20(m):
    expected = {}
    # Inner channels of every block.
    for stage in (1, 2, 3):
        for b in range(3):
            blk = f"layer{stage}.{b}"
            width = 16 * 2 ** (stage - 1)
            kill(m, f"{blk}.conv1", [0, width - 1], bn=f"{blk}.bn1")
            expected[f"{blk}.conv1"] = width - 2
    # Stage-1 stream channel 3 reaches stage 2 at 8+3 and stage 3 at 16+8+3 (option-A zero padding):
    # it is dead only if zeroed in every producer of all three streams.
    kill(m, "conv1", [3], bn="bn1")
    for b in range(3):
        kill(m, f"layer1.{b}.conv2", [3], bn=f"layer1.{b}.bn2")
        kill(m, f"layer2.{b}.conv2", [11, 0], bn=f"layer2.{b}.bn2")  # 0: a padded channel of stage 2
        kill(m, f"layer3.{b}.conv2", [27, 16, 1], bn=f"layer3.{b}.bn2")  # 16 <- stage-2 ch 0; 1: padded
    # Channel 40 of stage 3 is zeroed in two of three producers only: it must stay.
    for b in (0, 1):
        kill(m, f"layer3.{b}.conv2", [40], bn=f"layer3.{b}.bn2")
    expected["conv1"] = 15
    for b in range(3):
        expected[f"layer1.{b}.conv2"] = 15
        expected[f"layer2.{b}.conv2"] = 30
        expected[f"layer3.{b}.conv2"] = 61
    return expected


def plan_mobilenetv2(m):
    expected = {}
    blocks = [n for n, x in m.named_modules() if hasattr(x, "use_res_connect")]
    for i, blk in enumerate(blocks):
        conv = _module(m, f"{blk}.conv")
        if len(conv) == 4:  # expand, depthwise, project conv, project bn
            hidden = _module(m, f"{blk}.conv.0.0").out_channels
            idx = list(range(i % 3, hidden, 5))
            kill(m, f"{blk}.conv.0.0", idx, bn=f"{blk}.conv.0.1")
            expected[f"{blk}.conv.0.0"] = hidden - len(idx)
            # The depthwise BN's shift survives ReLU6 as a constant, folded into the 1x1 project conv.
            expected[f"{blk}.conv.1.0"] = hidden - len(idx)
    # A residual stream: features.2 (no residual) feeds features.3 (residual): channel 5 of both projects.
    kill(m, "features.2.conv.2", [5], bn="features.2.conv.3")
    kill(m, "features.3.conv.2", [5], bn="features.3.conv.3")
    expected["features.2.conv.2"] = expected.get("features.2.conv.2", 24) - 1
    expected["features.3.conv.2"] = 23
    return expected


def plan_densenet(m):
    kill(m, "conv1", [0, 5, 9, 20])  # stem: read by several pre-activation BNs (constants, folded)
    kill(m, "features.0.0.conv2", [1, 2, 11])  # new features concatenated into every later layer
    kill(m, "features.0.1.conv1", range(0, 48, 6), bn="features.0.1.bn2")
    return {"conv1": 20, "features.0.0.conv2": 9, "features.0.1.conv1": 40}


def plan_resnext(m):
    expected = {}
    # conv1 (1x1) feeds the grouped 3x3 (cardinality 4, 8 channels per group): equal counts per group.
    kill(m, "layer1.0.conv1", [0, 1, 8, 9, 16, 17, 24, 25], bn="layer1.0.bn1")
    expected["layer1.0.conv1"] = 24
    # Grouped conv outputs: 2, 2, 2 and 3 dead per group -> only 2 per group can go.
    kill(m, "layer1.0.conv2", [0, 1, 8, 9, 16, 17, 24, 25, 26], bn="layer1.0.bn2")
    expected["layer1.0.conv2"] = 24
    # A whole group (inputs and outputs) of layer2.0's grouped conv dead: the group goes.
    c1 = _module(m, "layer2.0.conv1").out_channels
    per = c1 // 4
    kill(m, "layer2.0.conv1", range(per), bn="layer2.0.bn1")
    kill(m, "layer2.0.conv2", range(per), bn="layer2.0.bn2")
    expected["layer2.0.conv1"] = c1 - per
    expected["layer2.0.conv2"] = c1 - per
    return expected


def plan_senet(m):
    expected = {}
    kill(m, "layer1.0.conv1", [0, 7], bn="layer1.0.bn1")
    kill(m, "layer2.1.se.reduce", [1])  # SE hidden unit: its ReLU output is 0, expand columns go
    expected["layer1.0.conv1"] = 14
    expected["layer2.1.se.reduce"] = out_widths(m)["layer2.1.se.reduce"] - 1
    # Stage-1 stream (identity shortcuts): stem and every stage-1 block's bn2, through SE (x * s).
    kill(m, "conv1", [4], bn="bn1")
    n1 = len([n for n in out_widths(m) if n.startswith("layer1.") and n.endswith(".conv2")])
    for b in range(n1):
        kill(m, f"layer1.{b}.conv2", [4], bn=f"layer1.{b}.bn2")
        expected[f"layer1.{b}.conv2"] = 15
        expected[f"layer1.{b}.se.expand"] = 15
    expected["conv1"] = 15
    return expected


def plan_transformer(m):
    kill(m, "mlp.fc1", range(0, 256, 4))
    return {"mlp.fc1": 192}


CASES: dict[str, tuple[dict, Callable]] = {
    "lenet300": ({}, plan_lenet300),
    "lenet500": ({}, lambda m: (kill(m, "fc2", range(100)), {"fc2": 200})[1]),
    "lenet5": ({}, plan_lenet5),
    "vgg_cifar": ({"width": 0.25}, plan_vgg),
    "resnet20": ({}, plan_resnet20),
    "mobilenetv2_cifar": ({}, plan_mobilenetv2),
    "densenet_cifar": ({}, plan_densenet),
    "resnext_cifar": ({}, plan_resnext),
    "senet_cifar": ({}, plan_senet),
    "senet_cifar_linear_se": ({"se_linear": True}, plan_senet),
    "transformer_block": ({}, plan_transformer),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_reference_model_prunes_exactly_the_killed_channels(case):
    kwargs, plan = CASES[case]
    name = case.replace("_linear_se", "")
    spec = models.REGISTRY[name]
    torch.manual_seed(0)
    model = models.build(name, **kwargs).eval()
    models.randomize_batchnorm(model)
    before = out_widths(model)
    expected_changes = plan(model)
    expected = {**before, **expected_changes}
    example = torch.rand(2, *spec.input_shape)
    order = models.layer_call_order(model, example)
    dense = export_onnx(model, example, exporter="torchscript")  # the engine on the zoo; tests/test_exporters.py: dynamo

    result = prune_checked(dense)
    pruned = result.model
    assert same_outputs(dense, pruned, seed=7)

    onnx_layers = [n for n in layer_widths(dense)]
    assert len(onnx_layers) == len(order), f"ONNX layers {onnx_layers} vs module calls {order}"
    got = layer_widths(pruned)
    mismatches = {
        module: (got[node][1], expected[module])
        for node, module in zip(onnx_layers, order)
        if got[node][1] != expected[module]
    }
    assert not mismatches, f"(got, expected) output widths: {mismatches}"
    # And the model's outputs agree with PyTorch itself.
    from onnxprune.runtime import make_session

    with torch.no_grad():
        ref = model(example).numpy()
    out = make_session(pruned).run(None, {"input": example.numpy()})[0]
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-4 * float(np.abs(ref).max()))
