"""Training loop, schedules, two-stage initialisation and evaluation for the binary nets.

The recipe is a CPU-sized version of SNN's (SPARKS.md): Adam, learning rate decayed linearly
to 0, optional knowledge distillation from a float teacher, and two stages: a dense BNN
first, whose weights and most frequent kernels start every codebook net
(:func:`init_from_dense`). For Sparks layers the Sinkhorn temperature and the Gumbel noise
scale follow :class:`TemperatureSchedule`; the selection logits have their own learning rate
and are frozen for the last part of training (``TrainConfig.selection_end``), so the latent
weights settle on the codebook that inference uses. Accuracy is measured after BatchNorm
recalibration (:func:`recalibrate_batchnorm`), every epoch and at the end.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import SparksError
from .codebook import kernel_codes
from .layers import DenseBinaryConv2d, FixedCodebookConv2d, SparksConv2d, binary_convs
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
    #: Re-estimate BatchNorm statistics before every evaluation and at the end.
    recalibrate_bn: bool = True
    #: Training images used for the recalibration (the first ones; 0 = all).
    recalibrate_images: int = 5000
    #: Fraction of training after which the Sparks selection is frozen (no update and no
    #: Sinkhorn), so the latent weights settle on the final codebook; 1.0 never freezes it.
    selection_end: float = 1.0
    #: Weight of the distillation loss (KL to the teacher's softmax at ``kd_temperature``);
    #: the cross-entropy gets ``1 - kd_weight``. Needs a ``teacher`` in :func:`train`.
    kd_weight: float = 0.0
    kd_temperature: float = 1.0
    #: Fraction of training after which BatchNorm statistics are re-estimated once and then
    #: frozen (BatchNorms in eval mode, affine parameters still learned); 1.0 never freezes.
    #: See :func:`train` for why binary nets need it.
    bn_freeze: float = 1.0
    #: Decay of an exponential moving average of the parameters (0 = off). When on, every
    #: evaluation and the final model use the averaged parameters (Polyak averaging): a
    #: latent weight near 0 that Adam moves back and forth by about ``lr`` each step flips
    #: its sign from step to step; its average does not, so the evaluated net is the one
    #: the recent steps agree on. The Sparks selection logits are not averaged.
    ema_decay: float = 0.0
    #: Train in channels-last memory layout: about 20% faster on the CPU (mkldnn convs);
    #: parameters keep their values and shapes, only their strides change.
    channels_last: bool = True
    #: Learning-rate decay over training: ``"linear"`` (to 0, SNN's recipe) or ``"cosine"``
    #: (half a cosine to 0: the same start and end, lower in the second half).
    lr_schedule: str = "linear"
    #: Fraction of training at the end held at ``lr_tail_factor`` times the learning rate
    #: (0 = off): the decay then runs from 1 to ``lr_tail_factor`` over the rest. A low,
    #: constant tail lets the last epochs settle instead of still climbing as the rate reaches 0.
    lr_tail: float = 0.0
    lr_tail_factor: float = 0.05
    #: Fraction of training after which the binary part of the net is frozen (1.0 never
    #: freezes): the latent weights of every binary conv and the Sparks selection logits get
    #: no gradient (Adam leaves them alone) and the Gumbel noise is off, so the training
    #: forward uses the inference codebook. Only the float parameters (BatchNorm affine,
    #: shifts, PReLU, stem, shortcuts, classifier) train for the rest. Even at a low learning
    #: rate a binary net still moves 0.2-0.4 points per epoch because latent weights near 0
    #: flip sign; with the binary function fixed, the last epochs only fit its float parts.
    #: With ``ema_decay`` the averaged parameters are loaded into the live net at that point,
    #: so the frozen binary weights are those the evaluated (averaged) net had.
    binary_freeze: float = 1.0
    #: With ``ema_decay``: also evaluate the live (not averaged) parameters after every epoch
    #: (``TrainResult.live_accuracy``; costs one more recalibration and test pass per epoch).
    eval_live: bool = False
    schedule: TemperatureSchedule = field(default_factory=TemperatureSchedule)

    def __post_init__(self):
        if not 0.0 <= self.kd_weight <= 1.0:
            raise SparksError(f"kd_weight must be in [0, 1], got {self.kd_weight}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise SparksError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0.0 <= self.selection_end <= 1.0:
            raise SparksError(f"selection_end must be in [0, 1], got {self.selection_end}")
        if not 0.0 <= self.binary_freeze <= 1.0:
            raise SparksError(f"binary_freeze must be in [0, 1], got {self.binary_freeze}")
        if self.lr_schedule not in ("linear", "cosine"):
            raise SparksError(f"lr_schedule must be 'linear' or 'cosine', got {self.lr_schedule!r}")
        if not 0.0 <= self.lr_tail < 1.0 or not 0.0 <= self.lr_tail_factor <= 1.0:
            raise SparksError(f"lr_tail must be in [0, 1) and lr_tail_factor in [0, 1], "
                              f"got {self.lr_tail}, {self.lr_tail_factor}")

    def lr_factor(self, progress: float) -> float:
        """Learning-rate multiplier at training progress in [0, 1] (1 at the start, 0 at the end)."""
        p = min(max(progress, 0.0), 1.0)
        floor = 0.0
        if self.lr_tail > 0:
            if p >= 1.0 - self.lr_tail:
                return self.lr_tail_factor
            p, floor = p / (1.0 - self.lr_tail), self.lr_tail_factor
        decay = 0.5 * (1.0 + math.cos(math.pi * p)) if self.lr_schedule == "cosine" else 1.0 - p
        return floor + (1.0 - floor) * decay

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    """What a run produced: per-epoch loss and test accuracy, final accuracy, wall time.

    ``selection_changes`` holds, per epoch, the mean number of Sparks slots (summed over the
    layers) whose codeword in the training forward changed from one step to the next: Gumbel
    noise and swaps of the learned selection both count (0 for nets without Sparks layers).
    """

    losses: list
    #: per epoch, plus a last entry after BatchNorm recalibration when it is on
    test_accuracy: list
    final_accuracy: float
    seconds: float
    selection_changes: list = field(default_factory=list)
    #: per epoch, the live parameters' test accuracy when an average is evaluated
    #: (``TrainConfig.eval_live``; empty otherwise)
    live_accuracy: list = field(default_factory=list)


def selection_parameters(model: torch.nn.Module) -> list:
    """The Sparks selection logits (their own learning rate, no weight decay)."""
    return [m.logits for m in model.modules() if isinstance(m, CodewordSelector)]


def _bn_order(model: torch.nn.Module, x: np.ndarray) -> list:
    """The BatchNorms of ``model`` in the order a forward pass reaches them."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    order, hooks = [], [m.register_forward_pre_hook(lambda m, inp: order.append(m)) for m in bns]
    try:
        model(torch.from_numpy(x[:2]))
    finally:
        for h in hooks:
            h.remove()
    seen = set()
    return [m for m in order if not (id(m) in seen or seen.add(id(m)))]


@torch.no_grad()
def recalibrate_batchnorm(model: torch.nn.Module, x: np.ndarray, batch_size: int = 500) -> None:
    """Re-estimate every BatchNorm's running mean/variance on ``x``, as inference will see it.

    Binary weights flip sign often during training, so the running averages (momentum 0.1)
    describe weights of the last few dozen steps, not the final ones; in eval mode that gap
    alone can cost tens of accuracy points on small binary nets.

    The BatchNorms are estimated one at a time in forward order, each with every BatchNorm
    before it already in eval mode with its new statistics. Estimating them all in one pass
    (upstream BatchNorms normalising with batch statistics) is not the function inference
    computes: a binary net learns pre-sign values that sit on the threshold (a digit's
    constant background, about half of some channels' pixels), whose sign then flips from
    batch to batch with the batch mean; the next BatchNorm's averaged statistics mix both
    signs and fit neither. On MNIST that made the accuracy of one trained dense BNN depend on
    which training images were used (88 % with 10,000, 94 % with 60,000) instead of one value.
    Everything but the BatchNorm being estimated runs in eval mode (Sparks layers use their
    noise-free selection); no learned parameter changes.
    """
    model.eval()
    bns = _bn_order(model, x)
    saved = [(m, m.momentum) for m in bns]
    try:
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the pass
            bn.train()
            for i in range(0, len(x), batch_size):
                model(torch.from_numpy(x[i:i + batch_size]))
            bn.eval()
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


def top_k_codes(weight: torch.Tensor, k: int) -> np.ndarray:
    """The K most frequent binary kernels of a dense BNN layer (``sign(w)``, 0 -> +1).

    Ties (and layers with fewer than K distinct kernels) are broken by the summed magnitude
    of the latent weights that voted for each codeword, then by code, so the result is a
    deterministic function of the weights.
    """
    w = weight.detach().reshape(-1, 9).to(torch.float64)
    codes = kernel_codes(torch.where(w >= 0, 1.0, -1.0).numpy())
    counts = np.bincount(codes, minlength=512).astype(np.float64)
    mass = np.bincount(codes, weights=w.abs().sum(1).numpy(), minlength=512)
    # lexsort: last key is primary; most frequent first, then heaviest, then lowest code
    order = np.lexsort((np.arange(512), -mass, -counts))
    return order[:k].astype(np.int64)


@torch.no_grad()
def init_from_dense(model: torch.nn.Module, dense: torch.nn.Module, top_k: bool = True,
                    weights: bool = True, margin: float = 0.5) -> list:
    """Start a codebook net from a trained dense BNN of the same architecture (stage 2).

    Parameters
    ----------
    model : torch.nn.Module
        The net to initialise (Sparks, top-K or SNN convs, or dense).
    dense : torch.nn.Module
        A trained net with :class:`DenseBinaryConv2d` block convs, same shapes.
    top_k : bool
        Set every Sparks selection and every top-K fixed codebook to the K most frequent
        kernels of the matching dense layer (:func:`top_k_codes`). Random (SNN) codebooks stay.
    weights : bool
        Copy every parameter and buffer of matching name and shape (latent weights, BatchNorm,
        shifts, stem, classifier), so stage 2 starts where stage 1 ended.
    margin : float
        Logit margin of the initial Sparks selection
        (:meth:`~sparks_tvm.torch.sinkhorn.CodewordSelector.set_selection`).

    Returns
    -------
    list of ndarray
        The codes set per codebook layer (empty entries for layers left as they were).
    """
    if weights:
        src = dense.state_dict()
        own = model.state_dict()
        copied = {k: v for k, v in src.items() if k in own and own[k].shape == v.shape
                  and not k.endswith(".codes") and ".selector." not in k}
        model.load_state_dict(copied, strict=False)
    dense_layers = dict(binary_convs(dense))
    set_codes = []
    for name, layer in binary_convs(model):
        codes = np.zeros(0, np.int64)
        # SNN (random) codebooks are FixedCodebookConv2d subclasses and keep their draw.
        if top_k and (isinstance(layer, SparksConv2d) or type(layer) is FixedCodebookConv2d):
            src = dense_layers.get(name)
            if not isinstance(src, DenseBinaryConv2d):
                raise SparksError(f"{name}: the source net has no dense binary conv of that name")
            codes = top_k_codes(src.weight, layer.codewords)
            if isinstance(layer, SparksConv2d):
                layer.set_selection(codes, margin)
            else:
                layer.set_codes(codes)
        set_codes.append(codes)
    return set_codes


class _ParameterAverage:
    """Exponential moving average of parameters, swapped in for evaluation (:attr:`TrainConfig.ema_decay`)."""

    def __init__(self, params: list, decay: float):
        self.params, self.decay = params, decay
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def load(self) -> None:
        """Copy the averaged values into the live parameters."""
        for s, p in zip(self.shadow, self.params):
            p.copy_(s)

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.mul_(self.decay).add_(p.detach(), alpha=1.0 - self.decay)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the live and the averaged values (twice restores them)."""
        for s, p in zip(self.shadow, self.params):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)


def _recal_images(config: TrainConfig, x_train: np.ndarray) -> np.ndarray:
    n = config.recalibrate_images
    return x_train if n <= 0 else x_train[:n]


def train(model: torch.nn.Module, x_train: np.ndarray, y_train: np.ndarray, config: TrainConfig,
          x_test: np.ndarray | None = None, y_test: np.ndarray | None = None, log=None,
          teacher: torch.nn.Module | None = None) -> TrainResult:
    """Train ``model`` in place with a fixed seed (data order and Gumbel noise).

    Parameters
    ----------
    model : torch.nn.Module
    x_train, y_train : ndarray
        (N, C, H, W) float32 images and int64 labels.
    config : TrainConfig
    x_test, y_test : ndarray, optional
        Evaluated after every epoch when given (after BatchNorm recalibration when
        ``config.recalibrate_bn``).
    log : callable, optional
        Called with one progress line per epoch.
    teacher : torch.nn.Module, optional
        Frozen float model for distillation (``config.kd_weight > 0``), run in eval mode.

    Returns
    -------
    TrainResult
    """
    if len(x_train) != len(y_train) or len(x_train) == 0:
        raise SparksError(f"training set: {len(x_train)} images and {len(y_train)} labels")
    if config.kd_weight > 0 and teacher is None:
        raise SparksError(f"kd_weight={config.kd_weight} needs a teacher model")
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    sel = selection_parameters(model)
    sel_ids = {id(p) for p in sel}
    rest = [p for p in model.parameters() if id(p) not in sel_ids]
    groups = [{"params": rest, "lr": config.lr, "weight_decay": config.weight_decay}]
    if sel:
        groups.append({"params": sel, "lr": config.selection_lr, "weight_decay": 0.0})
    opt = torch.optim.Adam(groups)
    ema = _ParameterAverage(rest, config.ema_decay) if config.ema_decay > 0 else None
    sparks = [m for m in model.modules() if isinstance(m, SparksConv2d)]
    latent = [m.weight for _, m in binary_convs(model)]
    latent_ids = {id(p) for p in latent}
    selectors = [m for m in model.modules() if isinstance(m, CodewordSelector)]
    teacher_logits = None
    if teacher is not None and config.kd_weight > 0:
        # The teacher is frozen and the images are not augmented, so its logits are one
        # eval pass over the training set, reused every epoch: a float forward per step
        # cost about a quarter of a binary net's training step on the CPU.
        teacher_logits = torch.from_numpy(predict(teacher, x_train)[0])
    fmt = torch.channels_last if config.channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    steps_per_epoch = math.ceil(len(x_train) / config.batch_size)
    total = config.epochs * steps_per_epoch
    base = [g["lr"] for g in opt.param_groups]
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    recal = _recal_images(config, x_train)
    losses, accs, changes, live, step, start = [], [], [], [], 0, time.perf_counter()
    temp = config.kd_temperature
    try:
        bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        bn_frozen = binary_frozen = False
        for epoch in range(config.epochs):
            model.train()
            for m in bns if bn_frozen else ():
                m.eval()
            order = torch.randperm(len(xt), generator=gen)
            run_loss, n_changed, prev = 0.0, 0, None
            for b in range(steps_per_epoch):
                idx = order[b * config.batch_size:(b + 1) * config.batch_size]
                frozen = step >= config.selection_end * total
                for gi, (g, lr) in enumerate(zip(opt.param_groups, base)):
                    g["lr"] = lr * config.lr_factor(step / total)  # decay to 0 (SNN recipe: linear)
                if sel and frozen and sel[0].requires_grad:
                    # Frozen: no gradient, so Adam leaves the logits alone and the forward
                    # skips the soft permutation.
                    for p in sel:
                        p.requires_grad_(False)
                if not bn_frozen and bns and step >= config.bn_freeze * total:
                    recalibrate_batchnorm(model, recal)
                    model.train()
                    for m in bns:
                        m.eval()
                    bn_frozen = True
                if not binary_frozen and step >= config.binary_freeze * total:
                    if ema is not None:
                        # Freeze the binary function the evaluated net has, with the float
                        # parameters it was evaluated with; average the float ones from there.
                        ema.load()
                        ema = _ParameterAverage([p for p in rest if id(p) not in latent_ids],
                                                config.ema_decay)
                    for p in latent + sel:
                        p.requires_grad_(False)  # no gradient: Adam skips them
                    binary_frozen = True
                    if log is not None:
                        log(f"  binary weights and selection frozen at step {step}/{total}")
                config.schedule.apply(model, step / total)
                if binary_frozen:
                    for m in selectors:
                        m.noise = 0.0  # the training forward uses the inference selection
                xb = xt[idx].contiguous(memory_format=fmt)
                out = model(xb)
                loss = F.cross_entropy(out, yt[idx])
                if teacher_logits is not None:
                    soft_t = F.softmax(teacher_logits[idx] / temp, dim=1)
                    kd = F.kl_div(F.log_softmax(out / temp, dim=1), soft_t, reduction="batchmean") * temp * temp
                    loss = (1.0 - config.kd_weight) * loss + config.kd_weight * kd
                if not torch.isfinite(loss):
                    raise SparksError(f"training diverged: loss {loss.item()} at epoch {epoch}, step {b}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if ema is not None:
                    ema.update()
                if sparks:
                    now = [m.last_codes for m in sparks]
                    if prev is not None:
                        n_changed += sum(int((a != p).sum()) for a, p in zip(now, prev))
                    prev = now
                run_loss += loss.item() * len(idx)
                step += 1
            losses.append(run_loss / len(xt))
            changes.append(n_changed / max(1, steps_per_epoch - 1))
            if x_test is not None:
                if ema is not None:
                    ema.swap()  # evaluate the averaged net, then go on training the live one
                if config.recalibrate_bn and not bn_frozen:
                    recalibrate_batchnorm(model, recal)
                accs.append(accuracy(model, x_test, y_test))
                if ema is not None:
                    ema.swap()
                    if config.eval_live:
                        if config.recalibrate_bn and not bn_frozen:
                            recalibrate_batchnorm(model, recal)
                        live.append(accuracy(model, x_test, y_test))
            if log is not None:
                acc = f", test {accs[-1]:.2f}%" if accs else ""
                chg = f", selection changes/step {changes[-1]:.2f}" if sparks else ""
                chg += f", live parameters {live[-1]:.2f}%" if live else ""
                log(f"  epoch {epoch + 1}/{config.epochs}: loss {losses[-1]:.4f}{acc}{chg} "
                    f"({time.perf_counter() - start:.0f} s)")
    finally:
        for p in sel + latent:
            p.requires_grad_(True)
    if ema is not None:
        ema.swap()  # the averaged parameters are the trained model
    config.schedule.apply(model, 1.0)  # noise-free selection: training mode == inference
    model.eval()
    if config.recalibrate_bn and not bn_frozen:
        recalibrate_batchnorm(model, recal)
        if x_test is not None:
            accs.append(accuracy(model, x_test, y_test))
            if log is not None:
                log(f"  after BatchNorm recalibration: test {accs[-1]:.2f}%")
    final = accs[-1] if accs else float("nan")
    return TrainResult(losses, accs, final, time.perf_counter() - start, changes, live)
