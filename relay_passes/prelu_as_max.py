"""PReLUAsMax: a PReLU whose slopes all lie in [0, 1] becomes ``max(x, alpha * x)``.

TVM legalizes ``nn.prelu`` to ``select(x > 0, x, x * alpha)``: on NEON a multiply, a compare
and a bit select per four values, in the epilogue of every Bi-Real/ReActNet block. For
``0 <= alpha <= 1``, ``x >= alpha * x`` exactly when ``x >= 0``, so the PReLU is
``max(x, alpha * x)``: two instructions (``fmul``, ``fmaxnm``) for the same value, zeros of
either sign included. NEON's ``fmaxnm`` (``llvm.maxnum``) is emitted directly, since TVM lowers
a float ``max`` to a compare and a select there; the two differ only on NaN, which compiled
models refuse at their inputs (:class:`sparks_tvm.errors.InputValueError`) and weights.

Pattern: ``nn.prelu(x, alpha)`` with a constant ``alpha`` (through bindings) and a float32
``x`` of static shape. Check: every slope is in ``[0, 1]`` (a slope outside it keeps the
select). Rewrite: a ``call_tir`` of an elementwise TE function, fused like any legalized op.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te, tirx

from .binarizer_patterns import constant_array
from .call_rewriter import rewrite_calls


def match_prelu(call, lookup):
    """Pattern + check: ``(x, alpha array, axis)`` of a PReLU that is a max, or None."""
    if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.prelu"):
        return None
    x, alpha = call.args
    if isinstance(alpha, relax.Var):
        alpha = lookup(alpha)
    value = constant_array(alpha)
    ty = x.ty
    if value is None or not isinstance(ty, relax.TensorType) or str(ty.dtype) != "float32" or ty.shape is None:
        return None
    value = np.asarray(value, dtype=np.float32).reshape(-1)
    if not (np.all(np.isfinite(value)) and np.all(value >= 0.0) and np.all(value <= 1.0)):
        return None
    return x, value, int(call.attrs.axis)


def _max(a, b, maxnum: bool):
    if maxnum:
        return tirx.call_llvm_pure_intrin("float32", "llvm.maxnum", a, b)
    return te.max(a, b)


def _rewrite(rewriter, call, maxnum: bool):
    found = match_prelu(call, rewriter.lookup_binding)
    if found is None:
        return None
    x, value, axis = found
    ndim = len(x.ty.shape)
    axis = axis % ndim
    if value.size not in (1, int(x.ty.shape[axis])):
        return None

    def compute(data, slope):
        def body(*i):
            s = slope[i[axis]] if value.size > 1 else slope[0]
            return _max(data(*i), data(*i) * s, maxnum)

        return te.compute(data.shape, body, name="prelu_max")

    return rewriter.builder_.call_te(compute, x, relax.const(value, "float32"), primfunc_name_hint="prelu_max")


@tvm.transform.module_pass(opt_level=0, name="PReLUAsMax")
class PReLUAsMax:
    """Rewrite each PReLU with slopes in [0, 1] as ``max(x, alpha * x)``.

    Parameters
    ----------
    maxnum : bool
        Emit ``llvm.maxnum`` (NEON's ``fmaxnm``) rather than TVM's ``max`` (a compare and a
        select on NEON; one ``maxps`` on x86).
    """

    def __init__(self, maxnum: bool = False):
        self.maxnum = maxnum

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        mod, _ = rewrite_calls(mod, lambda rewriter, call: _rewrite(rewriter, call, self.maxnum))
        return relax.transform.DeadCodeElimination(["main"])(mod)
