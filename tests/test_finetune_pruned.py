"""Fine-tuning the gate-folded network after Bayesian training: rejected channels stay deleted."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from onnxprune import bayes  # noqa: E402
from onnxprune.api import prune_model  # noqa: E402
from onnxprune.bayes.exporting import export  # noqa: E402
from onnxprune.bayes.finetune import freeze_rejected  # noqa: E402
from onnxprune.runtime import make_session  # noqa: E402
from onnxprune.torch_export import export_onnx  # noqa: E402
from tests.prune_helpers import layer_widths  # noqa: E402
from tests.test_bayes_wrap import build, reject_some  # noqa: E402


def data(n: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((n, 3, 32, 32), dtype=np.float32), rng.integers(0, 10, n)


@pytest.mark.parametrize("placement", ["output", "pre-bias"])
def test_finetuned_network_trains_and_prunes_to_the_same_widths(placement):
    model, x = build("vgg_cifar")
    wrapped = bayes.wrap(model, (x[:1],), method="sbp", placement=placement)
    reject_some(wrapped, 0.4)
    # TorchScript exports (several times faster than dynamo; tests/test_exporters.py covers both exporters).
    widths = layer_widths(prune_model(export(wrapped, (x[:1],), exporter="torchscript"), target="none").model)
    before = {k: v.detach().clone() for k, v in wrapped.state_dict().items()}
    xs, ys = data()
    plain = bayes.finetune_pruned(wrapped, xs, ys, epochs=1, lr=1e-2, batch_size=16, progress=False, compile_step=False)
    assert {k: v for k, v in wrapped.state_dict().items()}.keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in wrapped.state_dict().items()), "the wrapped model was modified"
    gated = export_onnx(plain, x[:1], exporter="torchscript")
    pruned = prune_model(gated, target="none").model
    assert layer_widths(pruned) == widths
    got = make_session(pruned).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, plain(x).numpy(), rtol=1e-4, atol=1e-4)


def test_freeze_rejected_holds_zero_rows_and_entries_while_the_rest_trains():
    layer = torch.nn.Linear(4, 3)
    norm = torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        layer.weight[1] = 0.0
        norm.weight[2] = 0.0
        norm.bias[2] = 0.0
    net = torch.nn.Sequential(layer, norm)
    assert freeze_rejected(net) == 4 + 2  # the weight row (its bias is not zero) and both BatchNorm entries
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(8, 4)).pow(2).sum().backward()
        opt.step()
    assert not layer.weight[1].any() and norm.weight[2] == 0 and norm.bias[2] == 0
    assert layer.weight[0].abs().sum() > 0 and norm.weight[0] != 1.0
