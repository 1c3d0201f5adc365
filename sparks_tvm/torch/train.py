"""Training loop, temperature schedule and evaluation for the binary nets.

The recipe is a one-stage, CPU-sized version of SNN's (SPARKS.md): Adam, learning rate
decayed linearly to 0, cross-entropy (no distillation teacher: the table's float row is the
reference instead). For Sparks layers the Sinkhorn temperature and the Gumbel noise scale
follow :class:`TemperatureSchedule`, and the selection logits have their own learning rate.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import SparksError
from .sinkhorn import CodewordSelector


@dataclass
class TemperatureSchedule:
    """Exponential annealing of the Sinkhorn temperature and of the Gumbel noise scale.

    At training progress ``p`` in [0, 1]: ``t = t0 * (t1 / t0) ** p``. The noise scale decays
    linearly from ``noise0`` to 0 at ``noise_end`` (fraction of training) so the selection
    explores early and is the noise-free one for the last part of training, which lets the
    latent weights settle on the codebook used at inference.
    """

    t0: float = 1.0
    t1: float = 0.05
    noise0: float = 1.0
    noise_end: float = 0.7

    def __post_init__(self):
        if not (self.t0 > 0 and self.t1 > 0):
            raise SparksError(f"temperatures must be positive, got t0={self.t0}, t1={self.t1}")
        if self.noise0 < 0 or not 0 < self.noise_end <= 1:
            raise SparksError(f"bad noise schedule: noise0={self.noise0}, noise_end={self.noise_end}")

    def at(self, progress: float) -> tuple[float, float]:
        """(temperature, noise scale) at training progress in [0, 1]."""
        p = min(max(progress, 0.0), 1.0)
        temp = self.t0 * (self.t1 / self.t0) ** p
        noise = self.noise0 * max(0.0, 1.0 - p / self.noise_end)
        return temp, noise

    def apply(self, model: torch.nn.Module, progress: float) -> tuple[float, float]:
        """Set every selector of ``model`` to the schedule's values; returns them."""
        temp, noise = self.at(progress)
        for m in model.modules():
            if isinstance(m, CodewordSelector):
                m.temperature, m.noise = temp, noise
        return temp, noise


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (all rows of the table share them)."""

    epochs: int = 8
    batch_size: int = 64
    lr: float = 2e-3
    selection_lr: float = 2e-2
    weight_decay: float = 0.0
    seed: int = 0
    recalibrate_bn: bool = True
    #: Fraction of training after which the Sparks selection is frozen (selection lr 0), so
    #: the latent weights settle on the final codebook; 1.0 never freezes it.
    selection_end: float = 1.0
    schedule: TemperatureSchedule = field(default_factory=TemperatureSchedule)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    """What a run produced: per-epoch loss and test accuracy, final accuracy, wall time."""

    losses: list
    #: per epoch, plus a last entry after BatchNorm recalibration when it is on
    test_accuracy: list
    final_accuracy: float
    seconds: float


def selection_parameters(model: torch.nn.Module) -> list:
    """The Sparks selection logits (their own learning rate, no weight decay)."""
    return [m.logits for m in model.modules() if isinstance(m, CodewordSelector)]


@torch.no_grad()
def recalibrate_batchnorm(model: torch.nn.Module, x: np.ndarray, batch_size: int = 500) -> None:
    """Re-estimate every BatchNorm's running mean/variance on ``x`` with the final weights.

    Binary weights flip sign often during training, so the running averages (momentum 0.1)
    describe weights of the last few dozen steps, not the final ones; in eval mode that gap
    alone can cost tens of accuracy points on small binary nets. One cumulative pass over the
    training images fixes the statistics without changing any learned parameter.
    """
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    saved = [(m, m.momentum) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the pass
    model.train()
    try:
        for i in range(0, len(x), batch_size):
            model(torch.from_numpy(x[i:i + batch_size]))
    finally:
        for m, mom in saved:
            m.momentum = mom
        model.eval()


@torch.no_grad()
def predict(model: torch.nn.Module, x: np.ndarray, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """Eval-mode logits and argmax predictions for numpy images."""
    model.eval()
    outs = [model(torch.from_numpy(x[i:i + batch_size])) for i in range(0, len(x), batch_size)]
    logits = torch.cat(outs).numpy()
    return logits, logits.argmax(axis=1)


def accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy in percent."""
    return float((predict(model, x)[1] == y).mean() * 100.0)


def train(model: torch.nn.Module, x_train: np.ndarray, y_train: np.ndarray, config: TrainConfig,
          x_test: np.ndarray | None = None, y_test: np.ndarray | None = None, log=None) -> TrainResult:
    """Train ``model`` in place with a fixed seed (data order and Gumbel noise).

    Parameters
    ----------
    model : torch.nn.Module
    x_train, y_train : ndarray
        (N, C, H, W) float32 images and int64 labels.
    config : TrainConfig
    x_test, y_test : ndarray, optional
        Evaluated after every epoch when given.
    log : callable, optional
        Called with one progress line per epoch.

    Returns
    -------
    TrainResult
    """
    if len(x_train) != len(y_train) or len(x_train) == 0:
        raise SparksError(f"training set: {len(x_train)} images and {len(y_train)} labels")
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    sel = selection_parameters(model)
    sel_ids = {id(p) for p in sel}
    rest = [p for p in model.parameters() if id(p) not in sel_ids]
    groups = [{"params": rest, "lr": config.lr, "weight_decay": config.weight_decay}]
    if sel:
        groups.append({"params": sel, "lr": config.selection_lr, "weight_decay": 0.0})
    opt = torch.optim.Adam(groups)
    steps_per_epoch = math.ceil(len(x_train) / config.batch_size)
    total = config.epochs * steps_per_epoch
    base = [g["lr"] for g in opt.param_groups]
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    losses, accs, step, start = [], [], 0, time.perf_counter()
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(len(xt), generator=gen)
        run_loss = 0.0
        for b in range(steps_per_epoch):
            idx = order[b * config.batch_size:(b + 1) * config.batch_size]
            for gi, (g, lr) in enumerate(zip(opt.param_groups, base)):
                g["lr"] = lr * (1.0 - step / total)  # linear decay to 0 (SNN recipe)
                if gi == 1 and step >= config.selection_end * total:
                    g["lr"] = 0.0  # selection frozen: Adam makes no update at lr 0
            config.schedule.apply(model, step / total)
            loss = F.cross_entropy(model(xt[idx]), yt[idx])
            if not torch.isfinite(loss):
                raise SparksError(f"training diverged: loss {loss.item()} at epoch {epoch}, step {b}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            run_loss += loss.item() * len(idx)
            step += 1
        losses.append(run_loss / len(xt))
        if x_test is not None:
            accs.append(accuracy(model, x_test, y_test))
        if log is not None:
            acc = f", test {accs[-1]:.2f}%" if accs else ""
            log(f"  epoch {epoch + 1}/{config.epochs}: loss {losses[-1]:.4f}{acc} "
                f"({time.perf_counter() - start:.0f} s)")
    config.schedule.apply(model, 1.0)  # noise-free selection: training mode == inference
    if config.recalibrate_bn:
        recalibrate_batchnorm(model, x_train)
        if x_test is not None:
            accs.append(accuracy(model, x_test, y_test))
            if log is not None:
                log(f"  after BatchNorm recalibration: test {accs[-1]:.2f}%")
    final = accs[-1] if accs else float("nan")
    return TrainResult(losses, accs, final, time.perf_counter() - start)
