"""FoldResidualBias: a residual sum's constant shifts move onto the residual.

After :class:`.fold_affine.FoldAffineChains`, a Bi-Real/ReActNet block ends in
``((conv * S + B) + x) + C``: BatchNorm's affine, the shortcut ``x``, then the learned shift
before the PReLU. Fused into the conv kernel's epilogue, that is four vector instructions per
four outputs on NEON: a register copy of ``B`` (a fused multiply-add overwrites its addend),
the multiply-add, and two adds. Written ``conv * S + (x + (B + C))``, the addend ``x + B'`` is
a fresh value, so it is two: one add and one multiply-add with no copy. The residual is taken
as it is, never looked through: it is another kernel's output (the previous block's, or the
float shortcut's), and reaching into its chain would make that kernel store an intermediate.

Pattern: ``add`` (through bindings, with constant ``add``/``subtract`` on top: the ``C``
part) of two non-constant float operands of the result's shape, one of them an affine chain
(:func:`.fold_affine.match_affine`) with a scale. Check: the constants on top do not scale
(only shifts), every constant is finite, and some shift is not on the residual already.
Rewrite: ``add(multiply(base, S), add(residual, B + C))``. The result differs
from the original by float rounding of the reassociated adds only (a few ulp); every binary
op runs before the epilogue and is unchanged.

Run it after :class:`.fold_affine.FoldAffineChains` (so BatchNorm is one multiply-add) and
before legalization and fusion.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from .call_rewriter import rewrite_calls
from .fold_affine import _FLOATS, _dtype, _shape, match_affine


def _is_add(expr) -> bool:
    return isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == "relax.add"


def match_residual(call, lookup):
    """Pattern: ``(conv side, residual side, shift on top)`` of a residual sum, or None.

    The conv side is an :class:`.fold_affine.Affine` (the side with a scale), the residual
    side the other operand as it is.
    """
    if _dtype(call) not in _FLOATS or _shape(call) is None:
        return None
    top = match_affine(call, lookup)
    if not np.all(top.scale == 1.0):
        return None  # a scale on top would scale the residual too: an extra multiply
    total = top.base if top.ops else call
    if isinstance(total, relax.Var):
        total = lookup(total)
    if not _is_add(total):
        return None
    sides = [match_affine(arg, lookup) for arg in total.args]
    shape = _shape(call)
    if any(_shape(s.base) != shape for s in sides):
        return None  # a side broadcasts, or is itself a constant
    scaled = [i for i, s in enumerate(sides) if not np.all(s.scale == 1.0)]
    if not scaled:
        return None
    return sides[scaled[0]], total.args[1 - scaled[0]], top


def _rewrite(rewriter, call, shifts: dict):
    if not (isinstance(call.op, tvm.ir.Op) and call.op.name in ("relax.add", "relax.subtract")):
        return None
    call = rewriter.builder_.normalize(call)
    found = match_residual(call, rewriter.lookup_binding)
    if found is None:
        return None
    conv, residual, top = found
    shift = conv.shift + top.shift
    # Post-order: the inner sum was rewritten first; its residual shift joins this one.
    if isinstance(residual, relax.Var) and residual in shifts:
        residual, inner = shifts[residual]
        shift = shift + inner
    if np.all(conv.shift == 0.0) and top.ops == 0:
        return None  # the shifts are on the residual already
    if not all(np.all(np.isfinite(v)) for v in (conv.scale, shift)):
        return None
    dtype, ndim = _dtype(call), len(_shape(call))

    def const(value):
        value = np.asarray(value)
        value = value.reshape((1,) * (ndim - value.ndim) + value.shape) if value.ndim else value
        return relax.const(value.astype(dtype), dtype)

    def emit(expr, name):
        return rewriter.builder_.emit(expr, name_hint=name)

    res = residual
    if not np.all(shift == 0.0):
        res = emit(relax.op.add(res, const(shift)), "residual_shift")
        shifts[res] = (residual, shift)
    scaled = emit(relax.op.multiply(conv.base, const(conv.scale)), "affine_scale")
    return relax.op.add(scaled, res)


@tvm.transform.module_pass(opt_level=0, name="FoldResidualBias")
class FoldResidualBias:
    """Move the constant shifts of each ``affine + residual (+ constants)`` onto the residual."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        shifts = {}  # residual_shift var -> (residual, shift), the rewrites made so far
        mod, _ = rewrite_calls(mod, lambda rewriter, call: _rewrite(rewriter, call, shifts))
        return relax.transform.DeadCodeElimination(["main"])(mod)
