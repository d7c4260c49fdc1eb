"""FitConfig: fit's options as one dataclass, given whole or by name."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from onnxprune import bayes  # noqa: E402
from onnxprune.bayes.fit_config import FitConfig  # noqa: E402
from onnxprune.bayes.training import fit  # noqa: E402


def tiny_data(n: int = 32) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.random((n, 6), dtype=np.float32), np.arange(n) % 3


def tiny_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def test_options_by_name_and_a_config_train_the_same_model():
    x, y = tiny_data()
    by_name, by_config = tiny_net(), tiny_net()
    h1 = fit(by_name, x, y, epochs=2, batch_size=8, lr=1e-2, seed=1, progress=False)
    h2 = fit(by_config, x, y, FitConfig(epochs=2, batch_size=8, lr=1e-2, seed=1, progress=False))
    assert [e.loss for e in h1.epochs] == [e.loss for e in h2.epochs]
    for p, q in zip(by_name.parameters(), by_config.parameters()):
        assert torch.equal(p, q)


def test_options_beside_a_config_replace_its_fields():
    config = FitConfig(epochs=5, lr=0.1)
    merged = FitConfig.from_options(config, {"epochs": 1, "batch_size": 4})
    assert (merged.epochs, merged.lr, merged.batch_size) == (1, 0.1, 4)
    assert config.epochs == 5  # the caller's config is not modified


def test_an_unknown_option_is_a_type_error_naming_it():
    x, y = tiny_data()
    with pytest.raises(TypeError, match="unknown option 'learning_rate'"):
        fit(tiny_net(), x, y, epochs=1, learning_rate=0.1)


def test_fit_without_epochs_or_with_a_config_of_another_type_is_a_type_error():
    x, y = tiny_data()
    with pytest.raises(TypeError, match="'epochs'"):
        fit(tiny_net(), x, y, lr=0.1)
    with pytest.raises(TypeError, match="must be a FitConfig"):
        fit(tiny_net(), x, y, 3)


@pytest.mark.parametrize("field, value, message", [("kl_scale", 0.0, "kl_scale"), ("lr_schedule", "exponential", "lr_schedule"),
                                                   ("decay_start", 1.0, "decay_start")])
def test_a_config_refuses_an_option_out_of_range(field, value, message):
    with pytest.raises(ValueError, match=message):
        FitConfig(epochs=1, **{field: value})


def test_the_gate_learning_rate_defaults_to_the_learning_rate():
    assert FitConfig(epochs=1, lr=0.5).gate_learning_rate == 0.5
    assert FitConfig(epochs=1, lr=0.5, gate_lr=0.03).gate_learning_rate == 0.03


def test_fit_logs_each_epochs_summary_line_at_info(caplog):
    x, y = tiny_data()
    wrapped = bayes.wrap(tiny_net(), (torch.zeros(1, 6),))
    eval_data = (x[:8], y[:8])
    with caplog.at_level(logging.INFO, logger="onnxprune"):
        fit(wrapped, x, y, epochs=2, batch_size=8, progress=True, desc="sbp", eval_data=eval_data)
    lines = [r.getMessage() for r in caplog.records if r.name == "onnxprune.bayes.training"]
    assert len(lines) == 2 and all(r.levelno == logging.INFO for r in caplog.records if r.name == "onnxprune.bayes.training")
    pattern = r"sbp 2/2: loss \d+\.\d{4}, train acc \d\.\d{4}, test acc \d\.\d{4}, channels kept \d+\.\d% \(\d+\.\d s\)"
    assert lines[0].startswith("sbp 1/2: loss ")
    assert re.fullmatch(pattern, lines[1]), lines[1]


def test_fit_logs_nothing_without_progress(caplog):
    x, y = tiny_data()
    with caplog.at_level(logging.INFO, logger="onnxprune"):
        fit(tiny_net(), x, y, epochs=1, batch_size=8, progress=False)
    assert not [r for r in caplog.records if r.name == "onnxprune.bayes.training"]
