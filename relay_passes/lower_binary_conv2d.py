"""LowerBinaryConv2d: rewrite binarized convolutions into sparks_tvm's own TIR kernels.

Pattern (:mod:`relay_passes.binarizer_patterns`): ``conv2d(binarize(x), W)`` with a
recognised binarizer and a constant ``W``.
Check (:mod:`relay_passes.binary_weights`): ``W`` is ``+-alpha_o`` per output channel; its
distinct 3x3 codewords are counted, and the BOPs cost model picks the kernel.
Rewrite: ::

    y = conv2d(binarize(x), W)
    ==>
    yi = call_tir(sparks_conv2d, (x, codes, idx), int32)   # or binary_conv2d(x, wbits)
    y  = astype(yi, "float32") * alpha[None, :, None, None]

The integer kernels take the *float* input and binarize it themselves (with the rule of the
recognised binarizer), so the binarizer node is dead unless something else reads it. The
alpha product stays in the graph; on CPUs, Relax fuses it and the ops after it
(bias/BatchNorm/residual/PReLU) into the kernel (:mod:`relay_passes.schedule_fused_kernels`).
With ``fold_shift``, a constant per-channel shift of the binarizer's input (``sign(x + b)``,
a per-channel ``x >= t``) becomes a kernel input instead of a graph op. Convolutions that do
not match are left alone and reported with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from sparks_tvm.cost import bits_per_weight, dense_bops, sparks_bops, sparks_is_cheaper
from sparks_tvm.errors import NonBinaryWeightsError
from sparks_tvm.kernels import (
    ConvGeometry,
    binary_conv2d_primfunc,
    idx_dtype,
    pack_indices,
    pack_binary_weights,
    sparks_conv2d_primfunc,
)
from sparks_tvm.kernels.encoding import codes_to_bits
from sparks_tvm.report import LayerRecord

from .binarizer_patterns import constant_array, match_binarizer
from .binary_weights import BinaryWeights, NotBinary, analyze_binary_weights, fold_input_scale


@dataclass
class ConvMatch:
    """A conv2d whose structure the binary kernels support (shape checks passed)."""

    geom: ConvGeometry
    source: relax.Expr
    mode: str
    weight: np.ndarray
    #: Constant the binarizer compares ``source`` with (the kernel then reads source - t).
    threshold: relax.Expr | None = None


def _static_shape(expr: relax.Expr):
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    dims = []
    for d in ty.shape.values:
        if not isinstance(d, tvm.tirx.IntImm):
            return None
        dims.append(int(d))
    return tuple(dims)


def match_conv(call: relax.Call, lookup) -> tuple[ConvMatch | None, str, str | None]:
    """Pattern + structural check of one conv2d call.

    Returns ``(match, reason, binarizer_mode)``: ``match`` is None when the conv stays float,
    with ``reason`` saying why; ``binarizer_mode`` is set whenever the input is binarized.
    """
    data, weight = call.args[0], call.args[1]
    found = match_binarizer(data, lookup)
    if found is None:
        return None, "input is not binarized", None
    bound = lookup(weight) if isinstance(weight, relax.Var) else None
    weight = weight if bound is None else bound
    w = constant_array(weight)
    if w is None:
        return None, "weights are not constant", found.mode
    if found.scale is not None and w.ndim == 4:
        # conv(s * b, W) == conv(b, s * W): the scale joins alpha (check in binary_weights).
        folded = fold_input_scale(w, found.scale)
        if isinstance(folded, NotBinary):
            return None, "binarized but scaled: " + folded.reason, found.mode
        w = folded
    attrs = call.attrs
    problems = []
    if int(attrs.groups) != 1:
        problems.append(f"grouped conv (groups={int(attrs.groups)})")
    if any(int(d) != 1 for d in attrs.dilation):
        problems.append(f"dilation {tuple(int(d) for d in attrs.dilation)}")
    if attrs.data_layout != "NCHW" or attrs.kernel_layout != "OIHW":
        problems.append(f"layout {attrs.data_layout}/{attrs.kernel_layout}")
    shape = _static_shape(found.source)
    out_shape = _static_shape(call)
    if shape is None or out_shape is None:
        problems.append("dynamic input shape")
    if found.source.ty.dtype != "float32" or call.ty.dtype != "float32":
        problems.append(f"dtype {found.source.ty.dtype}")
    if found.threshold is not None and shape is not None:
        t = constant_array(found.threshold)
        tshape = (1,) * (len(shape) - t.ndim) + t.shape if t.ndim <= len(shape) else None
        if tshape is None or any(d not in (1, s) for d, s in zip(tshape, shape)) or t.dtype != np.float32:
            problems.append(f"threshold of shape {t.shape} ({t.dtype}) does not broadcast to the input {shape}")
    if problems:
        return None, "binarized but unsupported: " + ", ".join(problems), found.mode
    pad = tuple(int(p) for p in attrs.padding)
    if len(pad) == 2:
        pad = (pad[0], pad[1], pad[0], pad[1])
    geom = ConvGeometry(
        batch=shape[0],
        in_channels=shape[1],
        height=shape[2],
        width=shape[3],
        out_channels=w.shape[0],
        kernel=tuple(w.shape[2:]),
        stride=tuple(int(s) for s in attrs.strides),
        padding=pad,
    )
    if geom.out_shape != out_shape:
        return None, f"unexpected output shape {out_shape} (expected {geom.out_shape})", found.mode
    return ConvMatch(geom, found.source, found.mode, w, found.threshold), "", found.mode


def per_channel(value: np.ndarray, channels: int) -> np.ndarray | None:
    """``value`` as a (C,) float32 vector if it broadcasts along the channel axis only."""
    v = np.asarray(value)
    if v.dtype != np.float32 or v.ndim > 4:
        return None
    shape = (1,) * (4 - v.ndim) + v.shape
    if shape[0] != 1 or shape[2:] != (1, 1) or shape[1] not in (1, channels):
        return None
    return np.ascontiguousarray(np.broadcast_to(v.reshape(-1), (channels,)), np.float32)


def match_input_shift(source: relax.Expr, channels: int, lookup) -> tuple[relax.Expr, np.ndarray] | None:
    """Pattern + check: ``source = x + b`` (or ``x - b``) with a constant per-channel ``b``.

    Returns ``(x, shift)`` with ``x + shift`` bit-identical to ``source`` (IEEE ``x - b`` is
    ``x + (-b)`` exactly), or None.
    """
    call = lookup(source) if isinstance(source, relax.Var) else source
    if not (isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op)
            and call.op.name in ("relax.add", "relax.subtract")):
        return None
    a, b = call.args
    for x, c, sign in ((a, b, 1.0), (b, a, 1.0)) if call.op.name == "relax.add" else ((a, b, -1.0),):
        value = constant_array(c)
        shift = None if value is None else per_channel(value, channels)
        if shift is not None and _static_shape(x) == _static_shape(source):
            return x, (sign * shift).astype(np.float32)
    return None


@dataclass
class LoweringOptions:
    """Knobs of :class:`LowerBinaryConv2d`.

    Attributes
    ----------
    schedules : module
        Provides ``schedule_sparks_conv2d(func, geom, K)`` and ``schedule_binary_conv2d(func,
        geom)`` for the target (see :mod:`schedules`); None leaves kernels unscheduled.
    strict : bool
        Raise :class:`NonBinaryWeightsError` for a binarized conv whose weights are not
        +-alpha; otherwise leave it in float and say so in the report.
    force_kind : str or None
        ``"sparks"`` or ``"binary"`` overrides the cost model (tests, benchmarks).
    conv_names : list of str
        Names of the convs in graph order (ONNX node names), for the report.
    details : list or None
        If a list, one dict per conv (parallel to the report) is appended with what the
        pattern saw: the binarizer idiom, a constant input scale moved into the weights and
        the kernel emitted (``sparks_tvm.inspect`` prints them).
    """

    schedules: object = None
    #: Fold a per-channel shift of the binarizer's input (``sign(x + b)``, ``x >= t``) into
    #: the kernel (``shift`` input) when the schedules support it (``folds_shift``).
    fold_shift: bool = False
    strict: bool = True
    force_kind: str | None = None
    conv_names: list = field(default_factory=list)
    details: list | None = None


@tvm.transform.module_pass(opt_level=0, name="LowerBinaryConv2d")
class LowerBinaryConv2d:
    """Lower binarized conv2d calls to Sparks / dense binary TIR kernels.

    After the pass runs, ``self.report`` holds one :class:`LayerRecord` per conv2d and
    ``self.errors`` the user errors found (a Python exception raised inside a pass reaches
    the caller as a bare RuntimeError through TVM's FFI, so errors are collected instead and
    raised by :func:`lower_binary_conv2d`).
    """

    def __init__(self, options: LoweringOptions | None = None):
        self.options = options or LoweringOptions()
        self.report: list[LayerRecord] = []
        self.errors: list[Exception] = []

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        self.report.clear()
        self.errors.clear()
        rewriter = _BinaryConvRewriter(mod, self.options, self.report, self.errors)
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gvar, rewriter.visit_expr(func))
        return rewriter.builder_.get()


def lower_binary_conv2d(mod: tvm.IRModule, options: LoweringOptions | None = None):
    """Run :class:`LowerBinaryConv2d`; return ``(module, report)`` or raise the first user error."""
    lowering = LowerBinaryConv2d(options)
    out = lowering(mod)
    if lowering.errors:
        raise lowering.errors[0]
    return out, list(lowering.report)


@mutator
class _BinaryConvRewriter(PyExprMutator):  # pylint: disable=abstract-method
    def __init__(self, mod, options: LoweringOptions, report: list, errors: list):
        super().__init__(mod)
        self.options = options
        self.report = report
        self.errors = errors

    def _name(self) -> str:
        i = len(self.report)
        names = self.options.conv_names
        return names[i] if i < len(names) else f"conv2d_{i}"

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # pylint: disable=arguments-renamed
        call = self.visit_expr_post_order(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.conv2d"):
            return call
        name = self._name()
        match, reason, mode = match_conv(call, self.lookup_binding)
        w_shape = _static_shape(call.args[1]) or (0, 0, 0, 0)
        out_shape = _static_shape(call) or (0, 0, 0, 0)
        record = LayerRecord(
            name=name,
            kind="float",
            in_channels=int(w_shape[1]),
            out_channels=int(w_shape[0]),
            kernel=tuple(w_shape[2:]),
            stride=tuple(int(s) for s in call.attrs.strides),
            out_hw=tuple(out_shape[2:]),
            binarizer=mode,
            reason=reason,
        )
        self.report.append(record)
        detail = None
        if self.options.details is not None:
            found = match_binarizer(call.args[0], self.lookup_binding)
            detail = {
                "binarizer_form": found.form if found is not None else None,
                "input_scale": None if found is None or found.scale is None else np.asarray(found.scale).tolist(),
                "kernel_symbol": None,
            }
            self.options.details.append(detail)
        if match is None:
            return call
        analysis = analyze_binary_weights(match.weight)
        if not isinstance(analysis, BinaryWeights):
            msg = f"conv {name!r} reads binarized activations but its weights are not binary: {analysis.reason}"
            if self.options.strict:
                self.errors.append(NonBinaryWeightsError(
                    msg + ". Pass strict=False (--allow-float) to compile this conv in float instead."
                ))
            record.reason = "weights not binary: " + analysis.reason
            return call
        result = self._rewrite(call, match, analysis, record)
        if detail is not None:
            detail["kernel_symbol"] = self._last_symbol
        return result

    def _rewrite(self, call, match: ConvMatch, bw: BinaryWeights, record: LayerRecord) -> relax.Expr:
        geom = match.geom
        sched = self.options.schedules
        shift = None
        if self.options.fold_shift and getattr(sched, "folds_shift", False):
            if match.threshold is not None:  # binarize(x >= t) == binarize(x + (-t) >= 0), exactly
                t = per_channel(constant_array(match.threshold), geom.in_channels)
                if t is not None:
                    shift, match = -t, ConvMatch(geom, match.source, match.mode, match.weight)
            else:
                found = match_input_shift(match.source, geom.in_channels, self.lookup_binding)
                if found is not None:
                    match = ConvMatch(geom, found[0], match.mode, match.weight)
                    shift = found[1]
        if match.threshold is not None:  # binarize(x >= t) == binarize(x - t >= 0), exactly
            match = ConvMatch(geom, self.builder_.emit(relax.op.subtract(match.source, match.threshold)),
                              match.mode, match.weight)
        pixels = geom.out_height * geom.out_width
        record.dense_bops = dense_bops(geom.in_channels, geom.out_channels, pixels, geom.kernel[0] * geom.kernel[1])
        record.sparks_bops = record.dense_bops
        kind = "binary"
        if bw.codebook is not None:
            k = bw.num_codewords
            record.codewords = k
            record.bits_per_weight = bits_per_weight(k)
            record.sparks_bops = sparks_bops(geom.in_channels, geom.out_channels, pixels, k)
            # A target may model its own kernels (ARM: instructions); else the BOPs model.
            model = getattr(self.options.schedules, "sparks_is_cheaper", None)
            if (model(geom, k) if model is not None
                    else sparks_is_cheaper(geom.in_channels, geom.out_channels, pixels, k)):
                kind = "sparks"
        else:
            record.bits_per_weight = 1.0
        if self.options.force_kind is not None and (self.options.force_kind != "sparks" or bw.codebook is not None):
            kind = self.options.force_kind
        record.kind = kind
        record.reason = "" if kind == "sparks" or bw.codebook is None else f"K={record.codewords}: dense is cheaper"
        extra = {} if shift is None else {"shift": True}  # only set when the schedules fold shifts
        if kind == "sparks":
            func = (
                sched.schedule_sparks_conv2d(geom, bw.num_codewords, match.mode, **extra)
                if sched is not None
                else sparks_conv2d_primfunc(geom, bw.num_codewords, match.mode)
            )
            args = [
                match.source,
                relax.const(codes_to_bits(bw.codebook), "int32"),
                relax.const(pack_indices(bw.idx, bw.num_codewords), idx_dtype(bw.num_codewords)),
            ]
        else:
            func = (
                sched.schedule_binary_conv2d(geom, match.mode, **extra)
                if sched is not None
                else binary_conv2d_primfunc(geom, match.mode)
            )
            pack = getattr(sched, "binary_weights", None)  # a kernel may read its own layout
            wbits = pack(geom, match.mode, bw.signs) if pack is not None else pack_binary_weights(bw.signs)
            args = [match.source, relax.const(wbits, str(wbits.dtype))]
        # What the library will hold for this conv's weights (the constants just built).
        record.weight_bytes = sum(
            int(np.prod(a.value.shape)) * np.dtype(str(a.value.dtype)).itemsize for a in args[1:]
        )
        if shift is not None:  # the binarizer's per-channel shift: an input, not weights
            args.append(relax.const(shift, "float32"))
        symbol = f"{kind}_conv2d_{len(self.report) - 1}"
        self._last_symbol = symbol  # for LoweringOptions.details
        gvar = self.builder_.add_func(func.with_attr("global_symbol", symbol), symbol)
        # NCHW from both kernels (the Sparks kernel computes over flattened pixels but stores
        # NCHW), so the elementwise epilogue follows directly and FuseOps can fuse it in.
        acc = self.builder_.emit(relax.call_tir(gvar, args, relax.TensorType(geom.out_shape, "int32")),
                                 name_hint=f"{kind}_acc")
        result = relax.op.astype(acc, "float32")
        if not np.all(bw.alpha == 1.0):
            alpha = relax.const(bw.alpha.reshape(1, -1, 1, 1), "float32")
            result = relax.op.multiply(self.builder_.emit(result), alpha)
        return result
