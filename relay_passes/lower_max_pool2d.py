"""Relax pass: float max_pool2d -> the target's own pooling kernel, where it has one.

Stock TVM legalizes ``relax.nn.max_pool2d`` into a padded copy and a window reduction that
the CPU schedule rule vectorizes over output columns with strided loads; on NEON those are
emitted lane by lane (the example ResNet-18's stem pool: 10.4 M aarch64 instructions of its
127.9 M). Targets whose schedules provide ``schedule_max_pool2d`` (ARM:
:mod:`sparks_tvm.kernels.max_pool2d_neon`) get their kernel instead; others, and pools the
kernel does not take, are left to stock TVM.

Pattern: a ``relax.nn.max_pool2d`` call. Check (:func:`check_max_pool`): float32 NCHW, static
shapes, dilation 1, every window holding an image element. Rewrite: ``call_tir`` of the kernel.
"""

from __future__ import annotations

import tvm
from tvm import relax

from sparks_tvm.kernels import max_pool2d_neon

from .call_rewriter import rewrite_calls
from .lower_float_conv2d import _static_shape


def match_max_pool(call: relax.Expr) -> bool:
    """Pattern: a call to ``relax.nn.max_pool2d``."""
    return isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.max_pool2d"


def check_max_pool(call: relax.Call) -> tuple | str:
    """Check: ``(in_shape, kernel, stride, padding, out_shape)`` if the kernel applies, else why not."""
    attrs = call.attrs
    shape, out_shape = _static_shape(call.args[0]), _static_shape(call)
    if shape is None or out_shape is None or len(shape) != 4:
        return "dynamic or non-4-D shape"
    if call.args[0].ty.dtype != "float32":
        return f"dtype {call.args[0].ty.dtype}"
    if attrs.layout != "NCHW" or attrs.out_layout not in ("NCHW", ""):
        return f"layout {attrs.layout}"
    if any(int(d) != 1 for d in attrs.dilation):
        return "dilated pool"
    kernel = tuple(int(k) for k in attrs.pool_size)
    stride = tuple(int(s) for s in attrs.strides)
    pad = tuple(int(p) for p in attrs.padding)
    pad = pad * 2 if len(pad) == 2 else pad
    if not max_pool2d_neon.supports(shape, kernel, stride, pad, out_shape):
        return "a window lies outside the image"
    return shape, kernel, stride, pad, out_shape


@tvm.transform.module_pass(opt_level=0, name="LowerMaxPool2d")
class LowerMaxPool2d:
    """Lower max_pool2d calls to ``schedules.schedule_max_pool2d`` (targets without it: unchanged)."""

    def __init__(self, schedules):
        self.schedules = schedules
        self.lowered = 0

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if not hasattr(self.schedules, "schedule_max_pool2d"):
            return mod
        mod, self.lowered = rewrite_calls(mod, self._rewrite)
        return mod

    def _rewrite(self, rewriter, call):
        if not match_max_pool(call):
            return None
        checked = check_max_pool(call)
        if isinstance(checked, str):
            return None
        symbol = f"max_pool2d_{rewriter.count}"
        func = self.schedules.schedule_max_pool2d(*checked).with_attr("global_symbol", symbol)
        gvar = rewriter.builder_.add_func(func, symbol)
        return relax.call_tir(gvar, [call.args[0]], relax.TensorType(checked[-1], "float32"))
