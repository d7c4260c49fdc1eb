"""Build the model ``onnxprune train --model SPEC`` names: a models/ name, ``torchvision:NAME`` or ``timm:NAME``.

Every model starts from random weights drawn after ``torch.manual_seed(seed)``; nothing is ever
downloaded. ``pretrained`` loads a local state dict: strictly for models/ names (as before), and for
torchvision/timm models with a classifier head of another number of classes allowed (the head stays
random and is trained here). torchvision's classifiers take 3 channels: on a 1-channel dataset a
:class:`ChannelRepeat` in front repeats the channel (timm takes ``in_chans`` itself).
"""

from __future__ import annotations

import difflib
import logging
from collections import OrderedDict
from types import ModuleType

import torch
from torch import nn

from onnxprune.errors import InputError, first_line

log = logging.getLogger(__name__)

SOURCES = ("torchvision", "timm")
EXTRA = "pip install 'onnxprune[vision]'"
FORMS = "a models/ name, torchvision:NAME or timm:NAME"


def split_spec(spec: str) -> tuple[str | None, str]:
    """(source, name) of a model spec: (None, name) for a models/ name; InputError for an unknown source."""
    if ":" not in spec:
        return None, spec
    source, _, name = spec.partition(":")
    if source.strip().lower() not in SOURCES or not name.strip():
        raise InputError(f"unknown model '{spec}': give {FORMS}")
    return source.strip().lower(), name.strip()


def import_source(source: str, spec: str) -> ModuleType:
    """The torchvision.models or timm module; InputError in one line if it does not import."""
    try:
        if source == "torchvision":
            import torchvision.models as module
        else:
            import timm as module
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken install's RuntimeError
        raise InputError(f"--model {spec} needs {source} ({EXTRA}): {first_line(e)}") from None
    return module


def known_names(source: str, module: ModuleType) -> list[str]:
    """The classification models ``source`` can build."""
    if source == "torchvision":
        return list(module.list_models(module=module))
    return list(module.list_models())


def check_spec(spec: str) -> None:
    """InputError (one line) unless ``spec`` names a model that can be built: known source, importable, known name."""
    import models

    source, name = split_spec(spec)
    if source is None:
        if name not in models.REGISTRY:
            raise InputError(f"unknown model '{spec}'; known: {', '.join(models.names())}; or torchvision:NAME, timm:NAME")
        return
    module = import_source(source, spec)
    exists = name in known_names(source, module) if source == "torchvision" else module.is_model(name)
    if not exists:
        close = difflib.get_close_matches(name, known_names(source, module), n=5, cutoff=0.5)
        hint = f"; close: {', '.join(f'{source}:{c}' for c in close)}" if close else ""
        raise InputError(f"unknown {source} model '{name}'{hint}")


class ChannelRepeat(nn.Module):
    """Repeats a 1-channel image to ``channels`` channels (ONNX: one Expand), in front of 3-channel architectures."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, self.channels, -1, -1)

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


def build_architecture(spec: str, *, num_classes: int, in_channels: int, seed: int,
                       pretrained: str | None = None) -> nn.Module:
    """The model ``spec`` names, randomly initialised from ``seed`` (never downloaded), for ``num_classes`` classes
    and ``in_channels``-channel images; ``pretrained``: a local state dict loaded into it (see :func:`load_state`)."""
    import models

    check_spec(spec)
    source, name = split_spec(spec)
    torch.manual_seed(seed)
    if source is None:  # models/: today's behaviour, the checkpoint must fit exactly
        model = models.build(name)
        if pretrained:
            load_state(model, pretrained)
        return model
    module = import_source(source, spec)
    if source == "torchvision" and in_channels not in (1, 3):
        raise InputError(f"--model {spec} takes 3-channel images (or 1, repeated); the dataset has {in_channels}")
    try:
        if source == "torchvision":
            model = module.get_model(name, weights=None, num_classes=num_classes)
        else:
            model = module.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)
    except Exception as e:  # noqa: BLE001 - a constructor that refuses these settings
        reason = first_line(e)
        raise InputError(f"cannot build --model {spec} for {num_classes} classes, {in_channels} channel(s): {reason}") from None
    if pretrained:
        load_state(model, pretrained, num_classes=num_classes)
    if source == "torchvision" and in_channels == 1:
        log.info("%s takes 3-channel images: the dataset's one channel is repeated 3 times (ChannelRepeat)", spec)
        model = nn.Sequential(OrderedDict(repeat=ChannelRepeat(3), model=model))
    return model


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The state dict in ``path``: plain, or under "state_dict" or "model"; "module." prefixes dropped."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - not a torch file, truncated, ...
        raise InputError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path} holds no state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _new_head_keys(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], wrong: list[str],
                   num_classes: int) -> list[str]:
    """The keys of ``wrong`` that are a classifier head for another number of classes (first axis only differs)."""
    return [k for k in wrong if own[k].ndim == state[k].ndim >= 1 and own[k].shape[0] == num_classes
            and own[k].shape[1:] == state[k].shape[1:]]


def _adapt_single_channel(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], wrong: list[str]) -> list[str]:
    """Stem convolutions of an RGB checkpoint for a 1-channel model: summed over the input channels (as timm does)."""
    adapted = [k for k in wrong if own[k].ndim == 4 and own[k].shape[1] == 1 and state[k].shape[1] == 3
               and own[k].shape[0] == state[k].shape[0] and own[k].shape[2:] == state[k].shape[2:]]
    for k in adapted:
        state[k] = state[k].sum(1, keepdim=True)
    return adapted


def load_state(model: nn.Module, path: str, *, num_classes: int | None = None) -> None:
    """Load the state dict in ``path`` into ``model``; InputError if it does not fit.

    With ``num_classes`` a classifier head trained for another number of classes is skipped (it stays random; the
    skipped keys are logged), and RGB stem convolutions are summed into a 1-channel model's; everything else must
    fit exactly. Without it (models/ names) the whole checkpoint must fit.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    for k, v in own.items():
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = v
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    head: list[str] = []
    if num_classes is not None and not missing and not unexpected:
        head = _new_head_keys(own, state, wrong, num_classes)
        adapted = _adapt_single_channel(own, state, [k for k in wrong if k not in head])
        wrong = [k for k in wrong if k not in head and k not in adapted]
        if adapted:
            log.info("checkpoint %s: RGB weights summed to one input channel: %s", path, ", ".join(adapted))
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        )
        raise InputError(f"checkpoint {path} does not fit the model ({detail})")
    if head:
        classes = state[head[0]].shape[0]
        log.info("checkpoint %s: head for %d classes skipped (%s); it starts random for %d classes",
                 path, classes, ", ".join(head), num_classes)
        state = {k: v for k, v in state.items() if k not in head}
    model.load_state_dict(state, strict=not head)


def probe_input(model: nn.Module, spec: str, input_shape: tuple[int, ...]) -> None:
    """Forward passes on zeros of ``input_shape`` (C, H, W), in eval and in training mode (buffers, RNG and mode
    restored): InputError if the model cannot take that size (suggesting --input-size) or does not return a tensor
    of logits (e.g. auxiliary outputs in training)."""
    was_training = model.training
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            for training in (False, True):
                model.train(training)
                try:
                    out = model(torch.zeros(2, *input_shape))
                except Exception as e:  # noqa: BLE001 - whatever the architecture raises on a size it cannot take
                    raise InputError(f"--model {spec} cannot take {input_shape[1]}x{input_shape[2]} images "
                                     f"({first_line(e)}); give --input-size N (e.g. 224)") from None
                if not isinstance(out, torch.Tensor) or out.ndim != 2:
                    mode = "training" if training else "evaluation"
                    raise InputError(f"--model {spec} returns {type(out).__name__} in {mode} mode, not a tensor of "
                                     f"logits; onnxprune trains classifiers with one output")
    finally:
        model.train(was_training)
        own = dict(model.named_buffers())
        for name, value in buffers.items():
            own[name].copy_(value)
