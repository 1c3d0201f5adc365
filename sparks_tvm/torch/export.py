"""Export trained binary nets to the ONNX the compiler recognises, with a per-layer summary.

Training-time binary convs compute their weight in the forward pass (nearest codeword,
Hungarian selection through scipy, straight-through terms): none of that can or should be
traced. Export therefore works on a *frozen* copy of the model in which every binary conv is
a plain conv with its inference weight ``alpha_o * codeword`` as a constant, and every
:class:`~sparks_tvm.torch.layers.BinaryActivation` is a bare ``torch.sign``. torch's
TorchScript exporter (``dynamo=False``) then folds the following BatchNorm into that constant,
so each binary conv's ONNX weight is ``+-alpha_o * gamma_o / sigma_o`` per output channel with
the layer's codewords as kernels: exactly README's "What is recognised".
"""

from __future__ import annotations

import copy
import io
import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SparksError
from .codebook import code_strings, kernel_codes
from .layers import (
    BinaryConv2dBase,
    CodebookConv2dBase,
    DenseBinaryConv2d,
    RandomCodebookConv2d,
    SparksConv2d,
    binary_convs,
)


class FrozenConv2d(nn.Module):
    """A conv with a constant (buffer) weight: the inference form of a binary conv."""

    def __init__(self, weight: torch.Tensor, stride: int, padding: int):
        super().__init__()
        self.register_buffer("weight", weight.detach().clone())
        self.stride, self.padding = stride, padding

    def forward(self, x):
        return F.conv2d(x, self.weight, stride=self.stride, padding=self.padding)


def onnx_conv_name(module_name: str) -> str:
    """The node name torch's TorchScript exporter gives the Conv of module ``module_name``.

    Each scope is the attribute name, except that children of containers (Sequential,
    ModuleList: numeric names) are scoped ``parent.index``: ``blocks.2.shortcut.1`` ->
    ``/blocks/blocks.2/shortcut/shortcut.1/Conv``.
    """
    parts = module_name.split(".")
    scopes = [f"{parts[i - 1]}.{p}" if p.isdigit() and i > 0 else p for i, p in enumerate(parts)]
    return "/" + "/".join(scopes) + "/Conv"


@dataclass
class LayerSummary:
    """One binary conv of an exported model.

    Attributes
    ----------
    name : str
        torch module name.
    onnx_name : str
        The ONNX Conv node's name (the compiler report's ``name``).
    kind : str
        ``"sparks"``, ``"snn"`` (random fixed codewords), ``"topk"`` (fixed codewords counted
        from a dense BNN) or ``"dense"`` (plain BNN).
    codewords : int or None
        K (None for dense).
    selected : list of str
        The K codewords, 9 taps '+'/'-' row-major (empty for dense).
    used : int
        Distinct kernels the layer really uses (<= K; the compiler counts these).
    bits_per_weight : float
        Index bits per weight, tau / 9 (1 for dense).
    weight_bits : int
        Storage of the layer's binary weights: indices + K * 9 bits of codebook (dense: one
        bit per weight).
    """

    name: str
    onnx_name: str
    kind: str
    in_channels: int
    out_channels: int
    stride: int
    codewords: int | None
    selected: list = field(default_factory=list)
    used: int = 0
    bits_per_weight: float = 1.0
    weight_bits: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _kind(layer: BinaryConv2dBase) -> str:
    if isinstance(layer, SparksConv2d):
        return "sparks"
    if isinstance(layer, DenseBinaryConv2d):
        return "dense"
    if isinstance(layer, RandomCodebookConv2d):
        return "snn"
    return "topk"


def summarize(model: nn.Module) -> list[LayerSummary]:
    """Per binary conv: K, the selected codewords, distinct kernels used, bits per weight."""
    out = []
    for name, layer in binary_convs(model):
        w = layer.export_weight().numpy()
        kernels = np.sign(w).reshape(-1, layer.kernel_size * layer.kernel_size)
        n_weights = w.size
        rec = LayerSummary(name=name, onnx_name=onnx_conv_name(name), kind=_kind(layer),
                           in_channels=layer.in_channels, out_channels=layer.out_channels,
                           stride=layer.stride, codewords=layer.codewords,
                           bits_per_weight=layer.bits_per_weight)
        if isinstance(layer, CodebookConv2dBase):
            codes = layer.selected_codes()
            rec.selected = code_strings(codes)
            rec.used = int(np.unique(kernel_codes(kernels)).size)
            tau = int(np.ceil(np.log2(layer.codewords))) if layer.codewords > 1 else 0
            rec.weight_bits = layer.out_channels * layer.in_channels * tau + layer.codewords * 9
        else:
            rec.used = int(np.unique(kernel_codes(kernels)).size) if layer.kernel_size == 3 else 0
            rec.weight_bits = n_weights
        out.append(rec)
    return out


def format_summary(layers: list[LayerSummary]) -> str:
    """A compact text table of :func:`summarize`'s records."""
    head = ("layer", "kind", "cin", "cout", "s", "K", "used", "bits/w", "weight bits", "first codewords")
    rows = [head]
    for r in layers:
        rows.append((r.name, r.kind, str(r.in_channels), str(r.out_channels), str(r.stride),
                     "" if r.codewords is None else str(r.codewords), str(r.used), f"{r.bits_per_weight:.3f}",
                     str(r.weight_bits), " ".join(r.selected[:4]) + (" ..." if len(r.selected) > 4 else "")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def frozen_copy(model: nn.Module) -> nn.Module:
    """An eval-mode deep copy whose binary convs are :class:`FrozenConv2d` constants."""
    frozen = copy.deepcopy(model).eval()
    for name, layer in binary_convs(frozen):
        parent = frozen.get_submodule(name.rsplit(".", 1)[0]) if "." in name else frozen
        setattr(parent, name.rsplit(".", 1)[-1], FrozenConv2d(layer.export_weight(), layer.stride, layer.padding))
    return frozen


@dataclass
class ExportedModel:
    """Result of :func:`export_onnx`: the ONNX bytes, where they were written, the summary."""

    onnx: bytes
    path: str | None
    layers: list

    def __str__(self) -> str:
        return format_summary(self.layers)


def export_onnx(model: nn.Module, example_input, path=None, input_name: str = "input",
                opset: int = 17) -> ExportedModel:
    """Export a trained model to ONNX for ``sparks_tvm.compile``.

    Parameters
    ----------
    model : torch.nn.Module
        A model built from :mod:`sparks_tvm.torch.layers` (left unchanged).
    example_input : Tensor or ndarray
        Fixes the exported input shape (N, C, H, W).
    path : str or os.PathLike, optional
        Where to write the ``.onnx``; ``<path>.layers.json`` gets the summary.
    input_name : str
    opset : int

    Returns
    -------
    ExportedModel
    """
    x = torch.as_tensor(np.asarray(example_input, dtype=np.float32))
    if x.dim() != 4:
        raise SparksError(f"example_input must be (N, C, H, W), got shape {tuple(x.shape)}")
    frozen = frozen_copy(model)
    buf = io.BytesIO()
    try:
        with torch.no_grad():
            torch.onnx.export(frozen, (x,), buf, input_names=[input_name], output_names=["output"],
                              opset_version=opset, dynamo=False, do_constant_folding=True)
    except Exception as err:
        raise SparksError(f"ONNX export failed for input shape {tuple(x.shape)}: "
                          f"{err.__class__.__name__}: {str(err).splitlines()[0]}") from err
    data = buf.getvalue()
    layers = summarize(model)
    out_path = None
    if path is not None:
        out_path = os.fspath(path)
        with open(out_path, "wb") as fh:
            fh.write(data)
        with open(out_path + ".layers.json", "w") as fh:
            json.dump([r.to_dict() for r in layers], fh, indent=1)
    return ExportedModel(data, out_path, layers)


def check_compiled(report, layers: list[LayerSummary]) -> list[str]:
    """Compare a compile report with the export summary; returns the problems (empty: all good).

    Every codebook layer (Sparks, SNN, top-K) must be compiled as ``sparks`` with as many codewords as the
    layer uses (at most K), and every dense binary layer as ``binary`` or ``sparks``.
    """
    by_name = {rec.name: rec for rec in report}
    problems = []
    for lay in layers:
        rec = by_name.get(lay.onnx_name)
        if rec is None:
            problems.append(f"{lay.name}: no conv named {lay.onnx_name!r} in the compile report")
            continue
        if lay.kind in ("sparks", "snn", "topk"):
            if rec.kind != "sparks":
                problems.append(f"{lay.name}: compiled as {rec.kind!r}, not 'sparks' ({rec.reason})")
            elif rec.codewords != lay.used:
                problems.append(f"{lay.name}: compiler found {rec.codewords} codewords, the layer uses {lay.used}")
        elif rec.kind not in ("binary", "sparks"):
            problems.append(f"{lay.name}: compiled as {rec.kind!r}, not binary ({rec.reason})")
    return problems


@torch.no_grad()
def sign_margins(model: nn.Module, x, batch_size: int = 500) -> np.ndarray:
    """Per image, the smallest ``|value|`` that any binarization of ``model`` sees (eval mode).

    A compiled model computes the float parts (stem, shortcuts, BatchNorm folded into
    per-channel scale and bias, residual adds) in another order than PyTorch, so the two
    differ by float32 rounding, about 1e-6 to 1e-5 at the values these nets reach. A value
    that close to 0 can take the other sign in one of them, and every sign downstream of it
    may follow: that is the only way a correctly exported model's logits differ by more
    than rounding. An image whose margin is above that scale cannot flip; one below it may
    (:func:`check_compiled` is about layers, this is about images). ``inf`` for a net without
    binarizations.
    """
    from .layers import BinaryActivation

    model.eval()
    acts = [m for m in model.modules() if isinstance(m, BinaryActivation)]
    xs = np.asarray(x, dtype=np.float32)
    out = np.full(len(xs), np.inf)
    cur = {}

    def hook(mod, inp, res):
        v = inp[0].detach().abs().flatten(1).amin(1).double().numpy()
        cur["m"] = np.minimum(cur["m"], v)

    hooks = [a.register_forward_hook(hook) for a in acts]
    try:
        for i in range(0, len(xs), batch_size):
            cur["m"] = np.full(len(xs[i:i + batch_size]), np.inf)
            model(torch.from_numpy(xs[i:i + batch_size]))
            out[i:i + batch_size] = cur["m"]
    finally:
        for h in hooks:
            h.remove()
    return out
