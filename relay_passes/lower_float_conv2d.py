"""Relax pass: float conv2d -> a scheduled, weight-prepacked TIR convolution.

``tvm.compile`` gives a float ``relax.nn.conv2d`` no CPU schedule: it legalizes to a naive,
single-threaded loop nest (the 7x7 stem of the example ResNet-18 took ~160 ms there against
~2.5 ms for this kernel). The binary convs are lowered first by
:mod:`relay_passes.lower_binary_conv2d`; this pass takes the float convs that remain (stem,
shortcuts) and lowers them to :func:`sparks_tvm.kernels.float_conv2d_compute` with weights
repacked at compile time. Convs it cannot handle are left to stock TVM untouched.

Pattern: a ``relax.nn.conv2d`` call. Check (:func:`check_float_conv`): float32, NCHW/OIHW,
groups 1, dilation 1, static shapes, constant weights. Rewrite: ``call_tir`` of the
scheduled kernel with the packed weights as a constant.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from sparks_tvm.kernels import ConvGeometry, pack_float_weights

from .binarizer_patterns import constant_array
from .call_rewriter import rewrite_calls


def _static_shape(expr: relax.Expr):
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    dims = [d for d in ty.shape.values]
    if not all(isinstance(d, tvm.tirx.IntImm) for d in dims):
        return None
    return tuple(int(d) for d in dims)


def match_float_conv(call: relax.Expr) -> bool:
    """Pattern: a call to ``relax.nn.conv2d``."""
    return isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.conv2d"


def check_float_conv(call: relax.Call, lookup) -> tuple[ConvGeometry, np.ndarray] | str:
    """Check: return ``(geometry, weights)`` if the kernel applies, else the reason it does not."""
    data, weight = call.args
    bound = lookup(weight) if isinstance(weight, relax.Var) else None
    w = constant_array(bound if bound is not None else weight)
    attrs = call.attrs
    shape, out_shape = _static_shape(data), _static_shape(call)
    if w is None or w.ndim != 4:
        return "weights are not a constant 4-D tensor"
    if int(attrs.groups) != 1 or any(int(d) != 1 for d in attrs.dilation):
        return "grouped or dilated conv"
    if attrs.data_layout != "NCHW" or attrs.kernel_layout != "OIHW" or attrs.out_layout not in ("NCHW", ""):
        return f"layout {attrs.data_layout}/{attrs.kernel_layout}"
    if shape is None or out_shape is None:
        return "dynamic shape"
    if data.ty.dtype != "float32" or call.ty.dtype != "float32" or w.dtype != np.float32:
        return f"dtype {data.ty.dtype}"
    pad = tuple(int(p) for p in attrs.padding)
    if len(pad) == 2:
        pad = (pad[0], pad[1], pad[0], pad[1])
    geom = ConvGeometry(
        batch=shape[0], in_channels=shape[1], height=shape[2], width=shape[3], out_channels=w.shape[0],
        kernel=(w.shape[2], w.shape[3]), stride=tuple(int(s) for s in attrs.strides), padding=pad,
    )
    if w.shape[1] != geom.in_channels or geom.out_shape != out_shape:
        return f"unexpected shapes {shape} * {w.shape} -> {out_shape}"
    return geom, w


@tvm.transform.module_pass(opt_level=0, name="LowerFloatConv2d")
class LowerFloatConv2d:
    """Lower float conv2d calls to the scheduled packed-weight kernel of ``schedules``.

    Parameters
    ----------
    schedules : object
        Provides ``float_lanes`` and ``schedule_float_conv2d(geom)`` (e.g.
        :class:`schedules.host.HostSchedules`); targets without them are left unchanged.
    """

    def __init__(self, schedules):
        self.schedules = schedules
        self.lowered = 0

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if not hasattr(self.schedules, "schedule_float_conv2d"):
            return mod
        mod, self.lowered = rewrite_calls(mod, self._rewrite)
        return mod

    def _rewrite(self, rewriter, call):
        if not match_float_conv(call):
            return None
        checked = check_float_conv(call, rewriter.lookup_binding)
        if isinstance(checked, str):
            return None
        geom, weight = checked
        symbol = f"float_conv2d_{rewriter.count}"
        func = self.schedules.schedule_float_conv2d(geom).with_attr("global_symbol", symbol)
        gvar = rewriter.builder_.add_func(func, symbol)
        wpack = relax.const(pack_float_weights(weight, self.schedules.float_lanes), "float32")
        return relax.call_tir(gvar, [call.args[0], wpack], relax.TensorType(geom.out_shape, "float32"))
