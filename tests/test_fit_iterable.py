"""fit on any iterable of (inputs, targets) batches (a DataLoader), with any loss; real training on the CPU."""

from __future__ import annotations

import copy
import json
import logging
import os
import socket
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, TensorDataset  # noqa: E402

from onnxprune import bayes  # noqa: E402
from onnxprune.bayes.evaluation import evaluate, evaluate_batches, recalibrate_norms, recalibrate_norms_on_batches  # noqa: E402
from onnxprune.bayes.training import finish_distributed, fit  # noqa: E402
from onnxprune.data import load_dataset  # noqa: E402
from onnxprune.errors import InputError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    x, y = load_dataset("digits", split="train")
    xt, yt = load_dataset("digits", split="test")
    return x[:192], y[:192], xt[:128], yt[:128]


class Flipping(Dataset):
    """(image, label) pairs, each image flipped left-right with probability 1/2 (torch's global RNG): augmentation."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)
        self.flips = 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        image = self.x[i]
        if torch.rand(()) < 0.5:
            image = image.flip(-1)
            self.flips += 1
        return image, self.y[i]


class EpochPermutations(Sampler):
    """The order ArrayLoader visits (x, y) in, epoch after epoch (one world, seed ``seed``)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        self.epoch += 1
        return iter(order.tolist())


class Batches:
    """An iterable of batches with neither a len() nor a dataset."""

    def __init__(self, batches: list) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def mlp(outputs: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, outputs))


def _conv_bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 6 * 6, 10),
    )


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, features, scale):
        return self.net(features * scale[:, None])


_WRAPPED = {  # name -> (net, example inputs)
    "conv": lambda: (_conv_bn_net(), (torch.zeros(1, 1, 28, 28),)),
    "mlp": lambda: (mlp(), (torch.zeros(1, 6),)),
    "mlp1": lambda: (mlp(outputs=1), (torch.zeros(1, 6),)),
    "two-inputs": lambda: (TwoInputs(), (torch.zeros(1, 6), torch.ones(1))),
}
_wrapped_once: dict[str, bayes.BayesianModel] = {}


def wrapped(name: str) -> bayes.BayesianModel:
    """A fresh copy of a wrapped net (each is wrapped once: wrapping exports it to ONNX, which takes seconds)."""
    if name not in _wrapped_once:
        _wrapped_once[name] = bayes.wrap(*_WRAPPED[name]())
    return copy.deepcopy(_wrapped_once[name])


def tiny_data(n: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.random((n, 6), dtype=np.float32)
    return x, (x[:, :3].argmax(1)).astype(np.int64)


def tensors(*arrays: np.ndarray) -> TensorDataset:
    return TensorDataset(*(torch.from_numpy(a) for a in arrays))


def state(model: nn.Module) -> list[torch.Tensor]:
    return [v.detach().clone() for v in model.state_dict().values() if isinstance(v, torch.Tensor)]


OPTS = dict(gate_lr=0.03, progress=False, compile_step=False)


def test_a_wrapped_net_trains_through_a_dataloader_with_augmentation(digits):
    x, y, xt, yt = digits
    data = Flipping(x, y)
    loader = DataLoader(data, batch_size=32, shuffle=True)
    model = wrapped("conv")
    eval_data = DataLoader(tensors(xt, yt), batch_size=64)
    history = fit(model, loader, epochs=4, eval_data=eval_data, recalibrate=False, **OPTS)
    assert [e.epoch for e in history.epochs] == [1, 2, 3, 4]
    assert history.epochs[-1].loss < history.epochs[0].loss
    assert history.epochs[-1].accuracy > history.epochs[0].accuracy
    assert history.epochs[-1].eval_accuracy == pytest.approx(evaluate(model, xt, yt))  # the model as the last epoch left it
    assert 0.3 * 4 * len(x) < data.flips < 0.7 * 4 * len(x)  # the dataset's own augmentation ran every epoch


def test_n_train_is_the_datasets_length_unless_given():
    """The KL term is divided by N: N inferred from len(dataset) trains exactly as N given; a smaller N weighs it more."""
    x, y = tiny_data()
    data = tensors(x, y)

    def one_epoch(**n_train):
        model = wrapped("mlp")
        return fit(model, DataLoader(data, batch_size=16, shuffle=True), epochs=1, **OPTS, **n_train).epochs[0].loss

    inferred, given, smaller = one_epoch(), one_epoch(n_train=len(data)), one_epoch(n_train=len(data) // 8)
    assert inferred == given
    assert smaller > inferred


def test_arrays_and_a_dataloader_of_the_same_batches_train_identically(digits):
    """The same batches in the same order (ArrayLoader's permutations, its drop_last) give the same losses and weights:
    the objective is the same on both paths, and so is the random-number stream the gates draw from."""
    x, y, _, _ = digits
    by_arrays, by_loader = wrapped("conv"), wrapped("conv")
    opts = dict(epochs=2, seed=5, recalibrate=False, **OPTS)  # (the BatchNorm re-estimation batches arrays by 256)
    h_arrays = fit(by_arrays, x, y, batch_size=64, **opts)
    loader = DataLoader(tensors(x, y), batch_size=64, sampler=EpochPermutations(len(x), seed=5), drop_last=True,
                        generator=torch.Generator())  # its own seed draw leaves the global RNG to the gates
    h_loader = fit(by_loader, loader, **opts)
    assert [e.loss for e in h_loader.epochs] == [e.loss for e in h_arrays.epochs]
    assert [e.accuracy for e in h_loader.epochs] == [e.accuracy for e in h_arrays.epochs]
    for p, q in zip(state(by_arrays), state(by_loader)):
        assert torch.equal(p, q)


def test_a_regression_loss_trains_and_reports_no_accuracy(caplog):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((128, 6)).astype(np.float32)
    t = (x @ rng.standard_normal((6, 1)).astype(np.float32)).astype(np.float32)
    model = wrapped("mlp1")
    loader = DataLoader(tensors(x, t), batch_size=16, shuffle=True)
    with caplog.at_level(logging.INFO, logger="onnxprune"):
        history = fit(model, loader, epochs=6, loss_fn=F.mse_loss, lr=1e-2, gate_lr=0.03, progress=True, desc="reg",
                      compile_step=False, eval_data=DataLoader(tensors(x[:32], t[:32]), batch_size=16))
    assert history.epochs[-1].loss < 0.5 * history.epochs[0].loss
    assert all(e.accuracy is None and e.eval_accuracy is None for e in history.epochs)
    lines = [r.getMessage() for r in caplog.records if r.name == "onnxprune.bayes.training"]
    assert len(lines) == 6 and all(line.startswith("reg ") and " acc " not in line for line in lines)
    # arrays with float targets keep them (a plain model: no N needed)
    plain = fit(mlp(outputs=1), x, t, epochs=4, batch_size=16, loss_fn=F.mse_loss, lr=1e-2, **OPTS)
    assert plain.epochs[-1].loss < plain.epochs[0].loss and plain.epochs[0].accuracy is None


class Named(Dataset):
    """({"features": ..., "scale": ...}, label) or ((features, scale), label) items."""

    def __init__(self, as_dict: bool) -> None:
        self.x, self.y = (torch.from_numpy(a) for a in tiny_data())
        self.as_dict = as_dict

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        scale = torch.tensor(1.0 + i % 2)
        inputs = {"features": self.x[i], "scale": scale} if self.as_dict else (self.x[i], scale)
        return inputs, self.y[i]


@pytest.mark.parametrize("as_dict", [True, False], ids=["dict", "tuple"])
def test_dict_and_tuple_inputs_are_passed_by_name_and_by_position(as_dict):
    calls = []
    model = wrapped("two-inputs")
    model.register_forward_pre_hook(lambda m, args, kwargs: calls.append((len(args), sorted(kwargs))), with_kwargs=True)
    history = fit(model, DataLoader(Named(as_dict), batch_size=16, shuffle=True), epochs=5, lr=1e-2, **OPTS)
    assert calls[0] == ((0, ["features", "scale"]) if as_dict else (2, []))
    assert history.epochs[-1].loss < history.epochs[0].loss
    assert history.epochs[-1].accuracy is not None


def test_a_batch_that_is_not_inputs_and_targets_is_refused_before_anything_is_written(tmp_path):
    x, y = tiny_data()
    folder = tmp_path / "checkpoints"
    model = wrapped("mlp")
    before = state(model)
    triples = DataLoader(tensors(x, y, np.arange(len(x))), batch_size=16)
    with pytest.raises(InputError, match=r"fit expects batches of \(inputs, targets\); the data yielded a list of length 3"):
        fit(model, triples, epochs=2, checkpoint=folder / "c.pt", **OPTS)
    with pytest.raises(InputError, match="yielded a Tensor of length 16"):
        fit(model, DataLoader(torch.from_numpy(x), batch_size=16), epochs=1, checkpoint=folder / "c.pt", **OPTS)
    assert not folder.exists()
    assert all(torch.equal(p, q) for p, q in zip(before, state(model)))


@pytest.mark.parametrize("loss_fn, what", [(lambda o, t: F.cross_entropy(o, t, reduction="none"), r"a tensor of shape \(16,\)"),
                                           (lambda o, t: 0.5, "a float")])
def test_a_loss_that_is_not_one_number_is_refused_before_the_first_step(tmp_path, loss_fn, what):
    x, y = tiny_data()
    folder = tmp_path / "checkpoints"
    model = wrapped("mlp")
    before = state(model)
    with pytest.raises(InputError, match=rf"loss_fn returned {what}: .*reduce it .*\.mean\(\)"):
        fit(model, DataLoader(tensors(x, y), batch_size=16), epochs=2, loss_fn=loss_fn, checkpoint=folder / "c.pt", **OPTS)
    assert not folder.exists()
    assert all(torch.equal(p, q) for p, q in zip(before, state(model)))


def test_an_iterable_without_a_size_needs_n_train_and_then_trains():
    x, y = tiny_data()
    batches = Batches([(torch.from_numpy(x[i : i + 16]), torch.from_numpy(y[i : i + 16])) for i in range(0, 64, 16)])
    with pytest.raises(TypeError, match=r"cannot tell the number of training examples N .* Batches: pass n_train=N"):
        fit(wrapped("mlp"), batches, epochs=1, **OPTS)
    with pytest.raises(ValueError, match="need the number of batches per epoch"):
        fit(wrapped("mlp"), batches, epochs=1, n_train=64, lr_schedule="cosine", **OPTS)
    history = fit(wrapped("mlp"), batches, epochs=6, n_train=64, lr=1e-2, gate_lr=0.03,
                  compile_step=False, progress=True)  # a progress bar of unknown length
    assert len(history.epochs) == 6 and history.epochs[-1].loss < history.epochs[0].loss
    fit(mlp(), batches, epochs=1, **OPTS)  # a plain model has no N
    with pytest.raises(InputError, match="an iterator"):
        fit(mlp(), iter(batches), epochs=2, **OPTS)


def test_checkpoint_and_resume_through_a_dataloader_equal_uninterrupted_training(tmp_path, digits):
    x, y, _, _ = digits
    data = Flipping(x[:256], y[:256])
    opts = dict(epochs=3, seed=2, **OPTS)
    straight = wrapped("conv")
    fit(straight, DataLoader(data, batch_size=32, shuffle=True), **opts)
    ckpt = tmp_path / "c.pt"
    fit(wrapped("conv"), DataLoader(data, batch_size=32, shuffle=True), checkpoint=ckpt, **{**opts, "epochs": 2})
    assert torch.load(ckpt, weights_only=True)["epoch"] == 2
    resumed = wrapped("conv")
    history = fit(resumed, DataLoader(data, batch_size=32, shuffle=True), checkpoint=ckpt, **opts)
    assert [e.epoch for e in history.epochs] == [1, 2, 3]
    for p, q in zip(state(straight), state(resumed)):
        torch.testing.assert_close(p, q)


def test_batchnorm_reestimation_and_accuracy_over_batches_match_the_arrays_versions(digits):
    x, y, _, _ = digits
    by_arrays, by_batches = wrapped("conv"), wrapped("conv")
    assert recalibrate_norms(by_arrays, x, batch_size=128) == 2
    assert recalibrate_norms_on_batches(by_batches, (xb for xb, _ in DataLoader(tensors(x, y), batch_size=128))) == 2
    for p, q in zip(state(by_arrays), state(by_batches)):
        torch.testing.assert_close(p, q)
    assert evaluate_batches(by_batches, DataLoader(tensors(x, y), batch_size=100)) == pytest.approx(evaluate(by_arrays, x, y))
    assert recalibrate_norms_on_batches(by_batches, iter([])) == 0  # nothing to run: the statistics stay
    for p, q in zip(state(by_arrays), state(by_batches)):
        torch.testing.assert_close(p, q)


class RecordingSampler(DistributedSampler):
    def __init__(self, dataset) -> None:
        super().__init__(dataset, num_replicas=1, rank=0, shuffle=True, seed=0)
        self.epochs: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)
        super().set_epoch(epoch)


def test_the_callers_distributed_sampler_is_told_each_epoch():
    x, y = tiny_data()
    sampler = RecordingSampler(tensors(x, y))
    fit(mlp(), DataLoader(tensors(x, y), batch_size=16, sampler=sampler), epochs=3, **OPTS)
    assert sampler.epochs == [0, 1, 2]


# -- two processes under torch.distributed (gloo) ------------------------------------


class Recording(Dataset):
    """tiny_data's examples; remembers which indices this process read."""

    def __init__(self) -> None:
        self.x, self.y = (torch.from_numpy(a) for a in tiny_data())
        self.read: list[int] = []

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        self.read.append(int(i))
        return self.x[i], self.y[i]


def _rank_main(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    data = Recording()
    model = wrapped("mlp")
    fit(model, DataLoader(data, batch_size=8, shuffle=True), epochs=2, **OPTS)
    total = float(sum(p.double().sum() for p in state(model)))
    Path(folder, f"rank{rank}.json").write_text(json.dumps({"read": data.read, "params": total}))
    finish_distributed()
    os._exit(0)  # gloo's threads can abort interpreter finalisation (see test_training's DDP script)


def test_under_torchrun_a_plain_dataloader_is_rebuilt_over_a_distributed_sampler():
    from onnxprune.bayes.batches import sharded as _sharded
    from onnxprune.bayes.fit_config import FitConfig

    x, y = tiny_data()

    def collate(items):
        return torch.utils.data.default_collate(items)

    given = DataLoader(tensors(x, y), batch_size=8, shuffle=True, collate_fn=collate, drop_last=True)
    sharded = _sharded(given, FitConfig(epochs=1, seed=7), rank=1, world=2)
    assert isinstance(sharded.sampler, DistributedSampler)
    assert (sharded.sampler.rank, sharded.sampler.num_replicas, sharded.sampler.seed, sharded.sampler.shuffle) == (1, 2, 7, True)
    assert sharded.dataset is given.dataset and sharded.collate_fn is collate
    assert (sharded.batch_size, sharded.drop_last, len(sharded)) == (8, True, 4)
    assert _sharded(given, FitConfig(epochs=1), rank=0, world=1) is given  # one process: as given
    assert _sharded(sharded, FitConfig(epochs=1), rank=1, world=2) is sharded  # already distributed


@pytest.mark.slow  # each spawned process imports torch, dynamo and onnx-graphsurgeon: 20-40 s on 2 busy cores
def test_two_ranks_train_a_plain_dataloader_on_disjoint_halves(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["params"] == ranks[1]["params"]  # one model, trained together
    n = len(Recording())
    for epoch in range(2):
        halves = [set(r["read"][epoch * n // 2 : (epoch + 1) * n // 2]) for r in ranks]
        assert len(halves[0]) == len(halves[1]) == n // 2
        assert not halves[0] & halves[1] and halves[0] | halves[1] == set(range(n))
    assert ranks[0]["read"][: n // 2] != ranks[0]["read"][n // 2 :]  # set_epoch: a new shuffle each epoch
