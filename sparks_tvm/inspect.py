"""``sparks-tvm inspect``: what the compiler will do with each convolution, without building.

The analysis is the lowering pass's own (:mod:`relay_passes.lower_binary_conv2d`): the model
is loaded, QONNX nodes are rewritten, it is imported and constant-folded exactly as
``sparks_tvm.compile`` does, then :class:`~relay_passes.LowerBinaryConv2d` runs in its
lenient mode with unscheduled kernels and its per-conv records are printed. Nothing is
compiled by LLVM, so inspecting a ResNet-18 takes seconds.

    sparks-tvm inspect model.onnx [--shapes input:1x3x224x224] [--json]
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from relay_passes import pipeline

from . import frontend, qonnx
from .report import Report, _fmt_bops

#: What each kind is lowered to, in words.
LOWERED_TO = {
    "sparks": "Sparks two-stage op (codeword popcount + gather-add)",
    "binary": "dense binary conv (XNOR-popcount)",
    "float": "stock TVM float conv2d",
}


@dataclass
class ConvInspection:
    """One convolution: the lowering pass's record plus what its pattern matched.

    Attributes
    ----------
    binary : bool
        True when the conv is lowered to a binary kernel (kind ``sparks`` or ``binary``).
    why : str
        Why it is or is not binary (the pass's reason, or the binarizer it recognised).
    lowered_to : str
        The kernel the conv becomes.
    binarizer_form : str or None
        The idiom recognised on the input (``sign``, ``where``, ``ste(sign)``, ...).
    input_scale : list or float or None
        A constant activation scale moved into the weights.
    strict_error : str or None
        Set when ``compile`` (strict, the default) would stop on this conv.
    """

    name: str
    kind: str
    binary: bool
    why: str
    lowered_to: str
    in_channels: int
    out_channels: int
    kernel: tuple
    stride: tuple
    out_hw: tuple
    binarizer: str | None
    binarizer_form: str | None
    input_scale: object
    codewords: int | None
    bits_per_weight: float | None
    dense_bops: int | None
    sparks_bops: int | None
    kernel_symbol: str | None
    strict_error: str | None


@dataclass
class Inspection:
    """The whole model: inputs, QONNX rewrites, one :class:`ConvInspection` per conv."""

    model: str
    inputs: list
    qonnx: list = field(default_factory=list)
    convs: list = field(default_factory=list)

    @property
    def totals(self) -> dict:
        binary = [c for c in self.convs if c.binary]
        return {
            "convs": len(self.convs),
            "sparks": sum(c.kind == "sparks" for c in self.convs),
            "binary": sum(c.kind == "binary" for c in self.convs),
            "float": sum(c.kind == "float" for c in self.convs),
            "dense_bops": sum(c.dense_bops or 0 for c in binary),
            "compiled_bops": sum(c.sparks_bops or 0 for c in binary),
            "strict_errors": sum(c.strict_error is not None for c in self.convs),
        }

    def to_dict(self) -> dict:
        return {"model": self.model, "inputs": self.inputs, "qonnx": self.qonnx,
                "convs": [asdict(c) for c in self.convs], "totals": self.totals}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def __str__(self) -> str:
        lines = [f"model: {self.model}"]
        lines.append("inputs: " + ", ".join(f"{d['name']} {tuple(d['shape'])} {d['dtype']}" for d in self.inputs))
        if self.qonnx:
            lines.append("QONNX nodes rewritten:")
            lines += [f"  {n['node']} ({n['op']}): {n['action']}" for n in self.qonnx]
        head = ("conv", "binary", "lowered to", "binarizer", "cin", "cout", "k", "s", "out", "K", "bits/w",
                "dense BOPs", "Sparks BOPs", "why")
        rows = [head]
        for c in self.convs:
            rows.append((
                c.name, "yes" if c.binary else "no", c.kind,
                "" if c.binarizer is None else f"{c.binarizer_form or ''} [0->{_ZERO_RULE.get(c.binarizer, '?')}]",
                str(c.in_channels), str(c.out_channels), "x".join(map(str, c.kernel)),
                str(c.stride[0]) if len(set(c.stride)) == 1 else "x".join(map(str, c.stride)),
                "x".join(map(str, c.out_hw)),
                "" if c.codewords is None else str(c.codewords),
                "" if c.bits_per_weight is None else f"{c.bits_per_weight:.2f}",
                _fmt_bops(c.dense_bops), _fmt_bops(c.sparks_bops), c.why,
            ))
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        table = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
        table.insert(1, "  ".join("-" * w for w in widths))
        lines += table
        t = self.totals
        lines.append(f"{t['convs']} convs: {t['sparks']} sparks, {t['binary']} binary, {t['float']} float; "
                     f"binary BOPs {_fmt_bops(t['dense_bops']) or 0} dense -> {_fmt_bops(t['compiled_bops']) or 0} "
                     "compiled")
        lines.append("kernels: " + "; ".join(f"{k} = {v}" for k, v in LOWERED_TO.items()))
        for c in self.convs:
            if c.strict_error:
                lines.append(f"compile (strict) would fail: {c.strict_error}; --allow-float compiles it in float")
        return "\n".join(lines)


_ZERO_RULE = {"sign": "0", "ge": "+1", "gt": "-1"}


def inspect_model(model, shapes: dict | None = None) -> Inspection:
    """Analyse ``model`` the way :func:`sparks_tvm.compile` would, without building it.

    Parameters
    ----------
    model : str, os.PathLike, bytes or onnx.ModelProto
    shapes : dict, optional
        ``{input_name: shape}`` for dynamic inputs, as for ``compile``.

    Returns
    -------
    Inspection

    Raises
    ------
    SparksError
        The same load / QONNX / unsupported-op / shape errors ``compile`` raises.
    """
    if isinstance(model, (str, os.PathLike)):
        origin = os.fspath(model)
    else:
        origin = "<bytes>" if isinstance(model, (bytes, bytearray)) else "<ModelProto>"
    proto = frontend.load_onnx(model, rewrite_qonnx=False)
    rewritten = qonnx.rewrite_qonnx(proto)
    proto = rewritten.model
    frontend.check_supported_ops(proto)
    specs = frontend.input_specs(proto, shapes)
    # The phases compile runs, up to the binary lowering, with no schedules: nothing is built.
    details: list = []
    _, records = pipeline.lower(frontend.import_graph(proto, specs),
                                pipeline.PipelineOptions(schedules=None, strict=False,
                                                         conv_names=frontend.conv_names(proto), details=details),
                                until="lower_binary")
    report = Report(records)
    convs = []
    for rec, det in zip(report, details):
        binary = rec.kind in ("sparks", "binary")
        strict_error = None
        if rec.reason.startswith("weights not binary"):
            strict_error = f"conv {rec.name!r} reads binarized activations but its {rec.reason}"
        if binary:
            why = f"binarized input ({det['binarizer_form']}), +-alpha weights"
            if rec.codewords is not None:
                why += f", {rec.codewords} codewords"
            if rec.reason:
                why += f"; {rec.reason}"
        else:
            why = rec.reason
        convs.append(ConvInspection(
            name=rec.name, kind=rec.kind, binary=binary, why=why, lowered_to=LOWERED_TO[rec.kind],
            in_channels=rec.in_channels, out_channels=rec.out_channels, kernel=tuple(rec.kernel),
            stride=tuple(rec.stride), out_hw=tuple(rec.out_hw), binarizer=rec.binarizer,
            binarizer_form=det["binarizer_form"], input_scale=det["input_scale"], codewords=rec.codewords,
            bits_per_weight=rec.bits_per_weight, dense_bops=rec.dense_bops, sparks_bops=rec.sparks_bops,
            kernel_symbol=det["kernel_symbol"], strict_error=strict_error,
        ))
    return Inspection(
        model=origin,
        inputs=[{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in specs],
        qonnx=[asdict(n) for n in rewritten.notes],
        convs=convs,
    )
