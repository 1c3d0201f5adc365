"""FoldAffineChains: a chain of elementwise constant arithmetic becomes one multiply-add.

Inference BatchNorm decomposes (``DecomposeOpsForInference``) into ``(x - mean) / sqrt(var +
eps) * gamma + beta``, after a binary conv's ``cast`` and its scale ``alpha``: five
elementwise ops (one a division) per output, fused into the conv kernel's epilogue and run for
every output pixel. Any chain of ``add``/``subtract``/``multiply``/``divide`` by constants is
``x * S + B`` with per-channel constants ``S`` and ``B``; this pass writes it so, which the
epilogue runs as one fused multiply-add. The result differs from the chain by float rounding
only (a few ulp), never in any binary op: they all come before the epilogue.

Pattern: a call of one of the four ops with a constant on one side (a Relax constant, or a
variable bound to one), whose other side is the rest of the chain (looked through bindings).
Check: float dtypes, constants that broadcast to the chain's shape without enlarging it, and
fewer ops after the rewrite than before. Rewrite: ``multiply(x, S)`` then ``add(., B)``, each
left out when the identity; the chain's old bindings become dead (``DeadCodeElimination``).

Run it after ``DecomposeOpsForInference`` and ``FoldConstant`` (so ``sqrt(var + eps)`` is a
constant), before legalization and fusion.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from .binarizer_patterns import constant_array
from .call_rewriter import rewrite_calls

_OPS = {"relax.add", "relax.subtract", "relax.multiply", "relax.divide"}
_FLOATS = {"float16", "float32", "float64"}


@dataclass
class Affine:
    """``base * scale + shift``, the result of ``ops`` elementwise ops (scale/shift float64)."""

    base: relax.Expr
    scale: np.ndarray
    shift: np.ndarray
    ops: int


def _constant(expr, lookup):
    """The value of a constant operand, else None."""
    if isinstance(expr, relax.Var):
        expr = lookup(expr)
    value = constant_array(expr)
    return None if value is None else np.asarray(value, dtype=np.float64)


def _shape(expr):
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    if not all(isinstance(d, tvm.tirx.IntImm) for d in ty.shape.values):
        return None  # symbolic dims
    return tuple(int(d) for d in ty.shape.values)


def _dtype(expr):
    ty = expr.ty
    return str(ty.dtype) if isinstance(ty, relax.TensorType) else None


def match_affine(expr, lookup, depth: int = 0):
    """Pattern: ``expr`` as an :class:`Affine` of a non-affine base (through bindings), or None."""
    if depth > 64:
        return None
    if isinstance(expr, relax.Var):
        bound = lookup(expr)
        if isinstance(bound, relax.Call):
            found = match_affine(bound, lookup, depth + 1)
            if found is not None:
                return found
        return Affine(expr, np.ones(()), np.zeros(()), 0)
    if not (isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name in _OPS):
        return Affine(expr, np.ones(()), np.zeros(()), 0)
    a, b = expr.args
    ca, cb = _constant(a, lookup), _constant(b, lookup)
    if (ca is None) == (cb is None) or _dtype(expr) not in _FLOATS:
        return Affine(expr, np.ones(()), np.zeros(()), 0)
    inner = match_affine(b if cb is None else a, lookup, depth + 1)
    out_shape, in_shape = _shape(expr), _shape(inner.base)
    const = ca if cb is None else cb
    if out_shape is None or out_shape != in_shape or const.ndim > len(out_shape):
        return Affine(expr, np.ones(()), np.zeros(()), 0)  # the constant broadcasts the chain up
    s, t, op = inner.scale, inner.shift, expr.op.name
    if op == "relax.add":
        s, t = s, t + const
    elif op == "relax.multiply":
        s, t = s * const, t * const
    elif op == "relax.subtract":
        s, t = (s, t - const) if cb is not None else (-s, const - t)
    else:  # divide
        if cb is None or not np.all(const != 0):  # const / x is not affine; x / 0 keeps inf/nan
            return Affine(expr, np.ones(()), np.zeros(()), 0)
        s, t = s / const, t / const
    return Affine(inner.base, s, t, inner.ops + 1)


def _rewrite(rewriter, call):
    if not (isinstance(call.op, tvm.ir.Op) and call.op.name in _OPS):
        return None
    call = rewriter.builder_.normalize(call)  # the type of the freshly rebuilt call
    found = match_affine(call, rewriter.lookup_binding)
    if found.ops < 2:
        return None
    dtype = _dtype(call)
    ndim = len(_shape(call))
    use_scale = not np.all(found.scale == 1.0)
    use_shift = not np.all(found.shift == 0.0)
    if int(use_scale) + int(use_shift) >= found.ops:  # nothing saved
        return None
    if not (np.all(np.isfinite(found.scale)) and np.all(np.isfinite(found.shift))):
        return None  # a division by zero in the chain: keep its own inf/nan semantics

    def const(value):
        value = np.asarray(value)
        value = value.reshape((1,) * (ndim - value.ndim) + value.shape) if value.ndim else value
        return relax.const(value.astype(dtype), dtype)

    out = found.base
    if use_scale:
        out = relax.op.multiply(out, const(found.scale))
        if use_shift:
            out = rewriter.builder_.emit(out, name_hint="affine_scale")
    if use_shift:
        out = relax.op.add(out, const(found.shift))
    return out if out is not found.base else None


@tvm.transform.module_pass(opt_level=0, name="FoldAffineChains")
class FoldAffineChains:
    """Rewrite each chain of constant elementwise arithmetic as one multiply and one add."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        mod, _ = rewrite_calls(mod, _rewrite)
        return relax.transform.DeadCodeElimination(["main"])(mod)
