"""Training with the negative ELBO: ``elbo`` and ``fit`` (one process, or several under torchrun).

``fit`` trains a wrapped model (loss: the negative ELBO) or a plain one (loss:
cross-entropy, for dense pre-training), with optimizer groups (gate parameters
may take their own learning rate), a linear warm-up of the KL weight, a
progress bar, checkpoints after every epoch and resume, and a fixed seed. Under
``torchrun`` it trains with DistributedDataParallel (gloo on CPU, NCCL on GPU):
each rank sees its own slice of every epoch's permutation.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch._dynamo
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from onnxprune.bayes.wrapper import BayesianModel


def elbo(logits: torch.Tensor, targets: torch.Tensor, model: BayesianModel, n_train: int, kl_weight: float = 1.0) -> torch.Tensor:
    """Negative ELBO: ``n_train * mean cross-entropy + kl_weight * sum of the gates' KL``."""
    return n_train * F.cross_entropy(logits, targets) + kl_weight * model.kl()


@dataclass
class EpochStats:
    epoch: int
    loss: float
    accuracy: float
    kl_weight: float
    kept_fraction: float
    seconds: float
    eval_accuracy: float | None = None


@dataclass
class History:
    epochs: list[EpochStats] = field(default_factory=list)

    def to_dict(self) -> list[dict]:
        return [asdict(e) for e in self.epochs]


LR_SCHEDULES = ("constant", "cosine", "step-linear")


def lr_factor(schedule: str, progress: float, decay_start: float = 0.5) -> float:
    """The learning rate's multiplier at ``progress`` (0 at the start of training, 1 at its end).
    "step-linear" is constant until ``decay_start`` (a fraction of training), then linear to 0."""
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "step-linear":
        return min(1.0, (1.0 - progress) / (1.0 - decay_start))
    return 1.0


def step_lr_factor(
    schedule: str, epoch: int, step: int, steps_per_epoch: int, epochs: int,
    span: tuple[int, int] | None = None, decay_start: float = 0.5,
) -> float:
    """The learning rate's multiplier at ``step`` of ``epoch`` in ``fit``: the schedule runs once over all
    epochs, or once within ``span`` (the epochs ``[start, end)`` of the current RBP stage)."""
    if schedule == "constant":
        return 1.0
    if span is None:
        progress = (epoch * steps_per_epoch + step) / (epochs * steps_per_epoch)
    else:
        progress = ((epoch - span[0]) * steps_per_epoch + step) / ((span[1] - span[0]) * steps_per_epoch)
    return lr_factor(schedule, progress, decay_start)


def rbp_reach_warning(
    model: BayesianModel, *, epochs: int, steps_per_epoch: int, gate_lr: float, lr_schedule: str = "constant",
    decay_start: float = 0.5, restart_per_stage: bool = True,
) -> str | None:
    """A sentence when some RBP gate trains for too few steps to reject any channel, else None.

    A channel is rejected when its log alpha passes the threshold (3) from where it starts (-8); Adam moves log
    alpha by about the gate learning rate per step at most (:func:`~onnxprune.bayes.rbp.log_alpha_reach`), so a
    stage shorter than that distance keeps every channel, whatever the data say: the noise has no time to grow.
    Layer by layer, a stage is ``epochs / stages`` epochs (one at least), which on a deep net is short.
    """
    from onnxprune.bayes.rbp import RBPGate, log_alpha_reach

    gates = [g for g in model.gates.values() if isinstance(g, RBPGate)]
    short = []
    for g in gates:
        if g.recursive:
            active = [e for e in range(epochs) if RBPGate.schedule(g.stage_index, g.stage_count, e, epochs) == "active"]
        else:
            active = list(range(epochs))
        factors = [step_lr_factor(lr_schedule, e, s, steps_per_epoch, epochs,
                                  model.stage_span(e, epochs) if restart_per_stage else None, decay_start)
                   for e in active for s in range(steps_per_epoch)]
        reach = log_alpha_reach(gate_lr, factors, g.parametrization)
        need = g.log_alpha_threshold - g.init_log_alpha
        if reach < need:
            per_lr = log_alpha_reach(1.0, factors, g.parametrization)
            short.append((need / per_lr if per_lr > 0 else math.inf, len(active) * steps_per_epoch, reach, g))
    if not short:
        return None
    needed, steps, reach, g = max(short, key=lambda t: t[0])
    return (f"RBP: {len(short)} of {len(gates)} gates train for too few steps to reject any channel. The shortest "
            f"stage is {steps} steps at gate lr {gate_lr:g} ({lr_schedule} schedule): Adam moves log alpha by about "
            f"{reach:.2g} in it, but a channel starts at log alpha {g.init_log_alpha:g} and is rejected above "
            f"{g.log_alpha_threshold:g}. Use a gate learning rate of at least {needed:.2g}, more epochs or more "
            f"steps per epoch, or a higher init_log_alpha.")


def _distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); joins the process group torchrun describes, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def finish_distributed() -> int:
    """Under torchrun: wait for every rank, then leave the process group. Returns this process's rank
    (0 when not distributed), so that rank 0 alone can go on to export and write."""
    if not dist.is_initialized():
        return 0
    rank = dist.get_rank()
    dist.barrier()
    dist.destroy_process_group()
    return rank


def _base(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@contextmanager
def ieee_float32() -> Iterator[None]:
    """Full float32 arithmetic while open: on CUDA, convolutions and matrix products without TF32 (PyTorch's default
    for cuDNN convolutions), so predictions compare with ONNX Runtime's float32 kernels to the rounding of the sum."""
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = saved


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, *, batch_size: int = 512, device: str | torch.device = "cpu") -> np.ndarray:
    """Class predictions of ``model`` in evaluation mode for images ``x`` (numpy, float or uint8), in full float32."""
    model = _base(model)
    was = model.training
    model.eval()
    out = []
    try:
        with ieee_float32():
            for i in range(0, len(x), batch_size):
                xb = torch.as_tensor(x[i : i + batch_size])
                xb = xb.float() / 255.0 if xb.dtype == torch.uint8 else xb.float()
                out.append(model(xb.to(device)).argmax(dim=1).cpu().numpy())
    finally:
        model.train(was)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, **kwargs) -> float:
    """Accuracy of ``model`` in evaluation mode."""
    return float((predict(model, x, **kwargs) == y).mean())


@torch.no_grad()
def recalibrate_norms(model: nn.Module, x: np.ndarray, *, batch_size: int = 256, device: str | torch.device = "cpu",
                      max_examples: int | None = None) -> int:
    """Re-estimate every BatchNorm's running mean and variance for the network as it is evaluated.

    While a Bayesian model trains, its gates multiply channels by noise, and a BatchNorm fed by
    gated channels averages that noise into its running variance. Evaluation uses the deterministic
    gates, whose outputs vary less: the stored statistics no longer fit (the variance shift of
    dropout before BatchNorm) and accuracy can fall far below the training accuracy. This runs
    ``x`` (the training images, no augmentation; the first ``max_examples``) through the model with
    deterministic gates and BatchNorm in training mode with cumulative averaging, then restores
    the model's mode. Returns the number of BatchNorm modules re-estimated (0: nothing to do).
    """
    base = _base(model)
    norms = [m for m in base.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    was = base.training
    base.eval()
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over every batch of this pass
        m.train()
    x = x[:max_examples] if max_examples else x
    try:
        for i in range(0, len(x), batch_size):
            xb = torch.as_tensor(x[i : i + batch_size])
            xb = xb.float() / 255.0 if xb.dtype == torch.uint8 else xb.float()
            base(xb.to(device))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
            m.eval()
        base.train(was)
    return len(norms)


def _compile_by_default(device: torch.device) -> bool:
    """Compile the gates on CUDA when Triton (torch.compile's GPU code generator) is installed."""
    if device.type != "cuda":
        return False
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def fit(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    gate_lr: float | None = None,
    weight_decay: float = 0.0,
    kl_warmup_epochs: float = 0.0,
    kl_scale: float = 1.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    augment: Callable | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    eval_data: tuple[np.ndarray, np.ndarray] | None = None,
    progress: bool = True,
    lr_schedule: str = "constant",
    desc: str = "train",
    amp: bool = False,
    compile_gates: bool | None = None,
    compile_step: bool | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    decay_start: float = 0.5,
    recalibrate: bool = True,
    restart_per_stage: bool = True,
) -> History:
    """Train ``model`` on (x, y) for ``epochs`` epochs; see the module docstring.

    A :class:`BayesianModel` is trained on the negative ELBO (N = len(x), the
    whole training set across ranks), anything else on cross-entropy. With
    ``checkpoint``, the state after every epoch is written there (atomically)
    and a later call with the same path resumes after the last finished epoch.
    ``lr_schedule`` is "constant", "cosine" or "step-linear" (constant for the first half,
    then linear decay to zero: the SBP authors' schedule; ``decay_start`` moves the bend). ``betas`` are Adam's. ``amp`` runs the forward pass in
    bfloat16 autocast on CUDA (the gates' statistics stay in float64).
    ``compile_gates`` compiles the gates' numerics with ``torch.compile`` (default:
    on CUDA when Triton is installed, where it makes an SBP step several times faster).
    ``kl_scale`` multiplies the KL term (1: the ELBO; above 1 a tempered one, which trades
    accuracy for sparsity, as if the data set were ``kl_scale`` times smaller).
    ``recalibrate``: after the last epoch, a Bayesian model's BatchNorm statistics are
    re-estimated for its deterministic gates (:func:`recalibrate_norms`), so that the model
    evaluated and exported is the one whose statistics were measured.
    ``compile_step`` compiles the whole forward pass and loss (and so their backward) into one
    graph, fusing the gates' many small ops into the layers' kernels (default: on CUDA with
    Triton, one process). The first steps then take the compile time (a minute or two).
    ``restart_per_stage``: when the gates are trained stage by stage (recursive RBP), the
    learning-rate schedule runs once within each stage instead of once over all epochs, so that
    the last stages are not trained at a decayed rate.
    """
    from onnxprune.data import ArrayLoader

    device = torch.device(device)
    rank, world = _distributed(device)
    torch.manual_seed(seed)
    np.random.seed(seed)
    base = model.to(device)
    bayesian = isinstance(base, BayesianModel)
    if bayesian:
        base.compile_gates(_compile_by_default(device) if compile_gates is None else compile_gates)
    groups = [{"params": list(base.weight_parameters()) if bayesian else list(base.parameters()), "lr": lr}]
    gate_params = list(base.gate_parameters()) if bayesian else []
    if gate_params:  # Turbo-VBI's gates hold no trainable parameters
        groups.append({"params": gate_params, "lr": gate_lr or lr, "weight_decay": 0.0})
    if not 0.0 <= decay_start < 1.0:
        raise ValueError(f"decay_start must be in [0, 1), got {decay_start}")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
    # fused: one kernel for every parameter's update on CUDA (a small net's step is launch-bound there)
    optimizer = torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay, betas=betas, fused=device.type == "cuda")
    start_epoch, history = 0, History()
    ckpt_path = Path(checkpoint) if checkpoint else None
    if ckpt_path is not None and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        base.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = state["epoch"]
        history = History([EpochStats(**e) for e in state["history"]])
        torch.set_rng_state(state["rng"].cpu())  # map_location moved the saved state to ``device``
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
    train_model: nn.Module = base
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        # Gates on a schedule (RBP's dormant and frozen stages) leave some parameters without gradient.
        scheduled = bayesian and any(hasattr(g, "begin_epoch") for g in base.gates.values())
        train_model = nn.parallel.DistributedDataParallel(base, device_ids=ids, find_unused_parameters=scheduled)
    n_train = len(x)
    if compile_step is None:
        compile_step = _compile_by_default(device) and world == 1

    def forward_loss(xb: torch.Tensor, yb: torch.Tensor, kl_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            logits = train_model(xb)
        logits = logits.float()
        if bayesian:
            return elbo(logits, yb, base, n_train, kl_w) / n_train, logits
        return F.cross_entropy(logits, yb), logits

    if compile_step:
        # (other code that changes with the schedule still gets its own graph: allow several)
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        if bayesian:  # RBP's gates then read their stage as data: one graph for all stages, not one per stage
            base.read_states_as_data(True)
        forward_loss = torch.compile(forward_loss, dynamic=False)
    if not kl_scale > 0:
        raise ValueError(f"kl_scale must be positive, got {kl_scale}")
    kl_weight = torch.full((), float(kl_scale), device=device)
    loader = ArrayLoader(x, y, batch_size, shuffle=True, seed=seed, device=device, augment=augment,
                         drop_last=True, rank=rank, world_size=world)
    steps_per_epoch = max(1, len(loader))
    if bayesian and rank == 0:
        short = rbp_reach_warning(base, epochs=epochs, steps_per_epoch=steps_per_epoch, gate_lr=gate_lr or lr,
                                  lr_schedule=lr_schedule, decay_start=decay_start, restart_per_stage=restart_per_stage)
        if short:
            warnings.warn(short, RuntimeWarning, stacklevel=2)
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)
        train_model.train()
        span = None
        if bayesian:
            base.begin_epoch(epoch, epochs)
            span = base.stage_span(epoch, epochs) if restart_per_stage else None
        t0 = time.perf_counter()
        bar = None
        if progress and rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=steps_per_epoch, desc=f"{desc} {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True)
        # running sums stay on the device: reading them every step would wait for the GPU each time
        seen = 0
        correct = torch.zeros((), dtype=torch.int64, device=device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        kl_w = 1.0
        for step, (xb, yb) in enumerate(loader):
            done = epoch * steps_per_epoch + step
            if lr_schedule != "constant":  # gates trained stage by stage (span): once within each stage
                factor = step_lr_factor(lr_schedule, epoch, step, steps_per_epoch, epochs, span, decay_start)
                for g, base_lr in zip(optimizer.param_groups, [lr, gate_lr or lr]):
                    g["lr"] = base_lr * factor
            if bayesian and kl_warmup_epochs > 0:
                kl_w = min(1.0, (done + 1) / (kl_warmup_epochs * steps_per_epoch))
                kl_weight.fill_(kl_w * kl_scale)
            loss, logits = forward_loss(xb, yb, kl_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if bayesian:
                base.before_step()
            optimizer.step()
            if bayesian:
                base.after_step()
                base.clip_()
            with torch.no_grad():
                correct += (logits.argmax(1) == yb).sum()
                seen += len(yb)
                loss_sum += loss.detach().double() * len(yb)
            if bar is not None:
                bar.update(1)
                if step % 10 == 0:
                    post = {"loss": f"{float(loss_sum) / seen:.4f}", "acc": f"{int(correct) / seen:.3f}"}
                    if bayesian:
                        post["kept"] = f"{base.kept_fraction():.2f}"
                    bar.set_postfix(post)
        if bar is not None:
            bar.close()
        stats = torch.stack([loss_sum, correct.double(), torch.tensor(float(seen), dtype=torch.float64, device=device)])
        if world > 1:
            dist.all_reduce(stats)
        kept = base.kept_fraction() if bayesian else 1.0
        record = EpochStats(epoch + 1, float(stats[0] / stats[2]), float(stats[1] / stats[2]), kl_w, kept, time.perf_counter() - t0)
        if eval_data is not None and rank == 0:
            record.eval_accuracy = evaluate(base, *eval_data, device=device)
        history.epochs.append(record)
        if rank == 0 and progress:
            msg = f"{desc} {epoch + 1}/{epochs}: loss {record.loss:.4f}, train acc {record.accuracy:.4f}"
            if record.eval_accuracy is not None:
                msg += f", test acc {record.eval_accuracy:.4f}"
            if bayesian:
                msg += f", channels kept {kept:.1%}"
            print(msg + f" ({record.seconds:.1f} s)", flush=True)
        if ckpt_path is not None and rank == 0:
            ckpt_path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_torch_save(
                {
                    "model": base.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "epoch": epoch + 1,
                    "history": history.to_dict(),
                    "rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                },
                ckpt_path,
            )
        if world > 1:
            dist.barrier()
    if bayesian:
        base.read_states_as_data(False)
    if bayesian and recalibrate:
        recalibrate_norms(base, x, batch_size=max(batch_size, 256), device=device)
    return history


def history_json(history: History) -> str:
    return json.dumps(history.to_dict(), indent=1)
