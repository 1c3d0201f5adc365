"""Pattern: recognise the activation binarizers that real ONNX exports contain.

Each matcher looks at a Relax expression (resolving dataflow variables through ``lookup``)
and returns a :class:`Binarizer` naming the float tensor that is binarized and the rule
for an exact zero (see :data:`sparks_tvm.reference.BINARIZE_MODES`), or ``None``.

Recognised forms (``g`` any expression, constants may be scalars or broadcast tensors):

- ``sign(x)``: ONNX ``Sign``, 0 -> 0.
- ``where(x >= 0, 1, -1)``, ``where(x < 0, -1, 1)``: 0 -> +1.
- ``where(x > 0, 1, -1)``, ``where(x <= 0, -1, 1)``: 0 -> -1.
- ``cast(x >= 0) * 2 - 1`` (and ``x > 0``), in either operand order of the multiply.
- STE residues left by exporting ``b - g.detach() + g`` or ``x + (b - x).detach()``:
  ``(b - g) + g`` and ``g + (b - g)`` where ``b`` is any recognised binarizer.
- ``sign(sign(x) + c)`` with a constant ``|c| < 1`` (a zero-rule fix some code writes):
  ``c > 0``: 0 -> +1 (``ge``), ``c < 0``: 0 -> -1 (``gt``), ``c == 0``: plain sign.
  With ``|c| >= 1`` it is no zero rule of ``x``: the outer sign then binarizes the float
  tensor ``sign(x) + c`` like any other ``sign(y)``.
- Comparisons written with the zero first (``0 <= x``, ``0 > x``) in every form above.
- A constant threshold instead of 0 (``Where(x >= t, 1, -1)``, per tensor or broadcast, e.g.
  a learnt per-channel threshold): the match carries ``threshold`` and the rewrite feeds
  ``x - t`` to the kernel. Exact: for finite IEEE floats ``x - t`` is 0 iff ``x == t`` and
  has the sign of the exact difference.
- A cast to a float type of any recognised binarizer (``Cast(Where(x >= 0, 1, -1))`` with
  integer constants): the kernels read the float source, the intermediate type is moot.
- A scaled binarizer ``b * s``, ``s * b`` or ``b / s`` with a constant ``s`` (QONNX's
  ``BipolarQuant`` scale, XNOR-Net's activation scale): the match carries ``scale`` and
  the check (:func:`relay_passes.binary_weights.fold_input_scale`) decides whether it can
  be moved into the weights (per tensor or per input channel).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np
import tvm
from tvm import relax


@dataclass(frozen=True, eq=False)
class Binarizer:
    """A recognised binarization of ``source`` with the zero rule ``mode``."""

    source: relax.Expr
    mode: str
    #: Constant the binarized tensor is multiplied by (numpy, broadcastable), or None.
    scale: np.ndarray | None = None
    #: The idiom recognised, for reports (``"sign"``, ``"where"``, ``"ste"``, ...).
    form: str = ""
    #: Constant the source is compared with instead of 0 (a Relax constant), or None.
    threshold: relax.Expr | None = None


Lookup = Callable[[relax.Expr], relax.Expr]


def _resolve(expr: relax.Expr, lookup: Lookup) -> relax.Expr:
    seen = 0
    while isinstance(expr, relax.Var) and seen < 64:
        bound = lookup(expr)
        if bound is None:
            break
        expr = bound
        seen += 1
    return expr


def _op_name(expr: relax.Expr) -> str | None:
    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
        return expr.op.name
    return None


def constant_array(expr: relax.Expr) -> np.ndarray | None:
    """The value of a Relax constant (tensor or scalar PrimValue) as numpy, else None."""
    if not isinstance(expr, tvm.ir.expr.Constant):
        return None
    value = expr.value
    if isinstance(value, tvm.runtime.Tensor):
        return value.numpy()
    if hasattr(value, "value"):  # IntImm / FloatImm of a PrimValue
        return np.array(value.value)
    return None


def _const_value(expr: relax.Expr, lookup: Lookup) -> float | None:
    """The single value of a constant whose entries are all equal, else None."""
    arr = constant_array(_resolve(expr, lookup))
    if arr is not None and arr.size and np.all(arr == arr.flat[0]):
        return float(arr.flat[0])
    return None


_CMP_TO_MODE = {
    # (comparison, value where true, value where false) -> mode
    ("relax.greater_equal", 1.0, -1.0): "ge",
    ("relax.less", -1.0, 1.0): "ge",
    ("relax.greater", 1.0, -1.0): "gt",
    ("relax.less_equal", -1.0, 1.0): "gt",
}


#: ``0 <cmp> x`` is ``x <mirror(cmp)> 0``.
_MIRROR = {
    "relax.greater_equal": "relax.less_equal",
    "relax.less_equal": "relax.greater_equal",
    "relax.greater": "relax.less",
    "relax.less": "relax.greater",
}


def _comparison_with_zero(expr: relax.Expr, lookup: Lookup):
    """``(x, op_name, threshold)`` if expr is ``x <cmp> t`` (or ``t <cmp'> x``, normalised)
    with a constant finite float ``t``; ``threshold`` is None when ``t`` is all zeros."""
    expr = _resolve(expr, lookup)
    name = _op_name(expr)
    if name not in _MIRROR:
        return None
    for x, t, op in ((expr.args[0], expr.args[1], name), (expr.args[1], expr.args[0], _MIRROR[name])):
        t = _resolve(t, lookup)
        value = constant_array(t)
        if value is None or constant_array(_resolve(x, lookup)) is not None:
            continue
        if value.size and np.all(value == 0):
            return x, op, None
        if value.dtype.kind == "f" and value.size and np.all(np.isfinite(value)):
            return x, op, t
    return None


def _sign_of_shifted_sign(arg: relax.Expr, lookup: Lookup) -> Binarizer | None:
    """``sign(sign(x) + c)``: binary iff |c| < 1; ``c`` picks the value of x == 0."""
    arg = _resolve(arg, lookup)
    if _op_name(arg) != "relax.add":
        return None
    for inner, const in ((arg.args[0], arg.args[1]), (arg.args[1], arg.args[0])):
        c = _const_value(const, lookup)
        inner = _resolve(inner, lookup)
        if c is None or _op_name(inner) != "relax.sign" or not abs(c) < 1.0:
            continue
        # x > 0: sign(1 + c) = +1, x < 0: sign(-1 + c) = -1, x == 0: sign(c).
        mode = "ge" if c > 0 else ("gt" if c < 0 else "sign")
        return Binarizer(inner.args[0], mode, form="sign(sign(x)+c)")
    return None


def match_sign(expr: relax.Expr, lookup: Lookup) -> Binarizer | None:
    expr = _resolve(expr, lookup)
    if _op_name(expr) == "relax.sign":
        return _sign_of_shifted_sign(expr.args[0], lookup) or Binarizer(expr.args[0], "sign", form="sign")
    return None


def match_where(expr: relax.Expr, lookup: Lookup) -> Binarizer | None:
    expr = _resolve(expr, lookup)
    if _op_name(expr) != "relax.where":
        return None
    cmp = _comparison_with_zero(expr.args[0], lookup)
    if cmp is None:
        return None
    key = (cmp[1], _const_value(expr.args[1], lookup), _const_value(expr.args[2], lookup))
    mode = _CMP_TO_MODE.get(key)
    form = "where" if cmp[2] is None else "where(x>=t)"
    return Binarizer(cmp[0], mode, form=form, threshold=cmp[2]) if mode else None


def match_cast_affine(expr: relax.Expr, lookup: Lookup) -> Binarizer | None:
    """``cast(x >= 0) * 2 - 1`` and ``cast(x > 0) * 2 - 1``."""
    expr = _resolve(expr, lookup)
    if _op_name(expr) != "relax.subtract" or _const_value(expr.args[1], lookup) != 1.0:
        return None
    mul = _resolve(expr.args[0], lookup)
    if _op_name(mul) != "relax.multiply":
        return None
    a, b = mul.args
    if _const_value(a, lookup) == 2.0:
        a, b = b, a
    if _const_value(b, lookup) != 2.0:
        return None
    cast = _resolve(a, lookup)
    if _op_name(cast) != "relax.astype":
        return None
    cmp = _comparison_with_zero(cast.args[0], lookup)
    if cmp is None or cmp[1] not in ("relax.greater_equal", "relax.greater"):
        return None
    return Binarizer(cmp[0], "ge" if cmp[1] == "relax.greater_equal" else "gt",
                     form="cast*2-1" if cmp[2] is None else "cast(x>=t)*2-1", threshold=cmp[2])


def _same(a: relax.Expr, b: relax.Expr) -> bool:
    return a.same_as(b)


def match_ste_residue(expr: relax.Expr, lookup: Lookup, depth: int = 0) -> Binarizer | None:
    """``(b - g) + g`` or ``g + (b - g)``: the forward value of an STE is ``b``."""
    if depth > 4:
        return None
    expr = _resolve(expr, lookup)
    if _op_name(expr) != "relax.add":
        return None
    for sub_arg, other in ((expr.args[0], expr.args[1]), (expr.args[1], expr.args[0])):
        sub = _resolve(sub_arg, lookup)
        if _op_name(sub) == "relax.subtract" and _same(
            _resolve(sub.args[1], lookup), _resolve(other, lookup)
        ):
            inner = match_binarizer(sub.args[0], lookup, depth + 1)
            if inner is not None:
                return dataclasses.replace(inner, form=f"ste({inner.form})")
    return None


def match_scaled(expr: relax.Expr, lookup: Lookup, depth: int = 0) -> Binarizer | None:
    """``b * s``, ``s * b`` or ``b / s`` with ``b`` a binarizer and ``s`` a constant."""
    if depth > 4:
        return None
    expr = _resolve(expr, lookup)
    name = _op_name(expr)
    if name == "relax.multiply":
        pairs = ((expr.args[0], expr.args[1]), (expr.args[1], expr.args[0]))
    elif name == "relax.divide":
        pairs = ((expr.args[0], expr.args[1]),)
    else:
        return None
    for b_arg, s_arg in pairs:
        s = constant_array(_resolve(s_arg, lookup))
        if s is None or s.dtype.kind != "f":
            continue
        inner = match_binarizer(b_arg, lookup, depth + 1)
        if inner is None:
            continue
        s = (np.float32(1.0) / s.astype(np.float32)) if name == "relax.divide" else s.astype(np.float32)
        scale = s if inner.scale is None else inner.scale * s
        return dataclasses.replace(inner, scale=scale, form=f"{inner.form}*scale")
    return None


def match_float_cast(expr: relax.Expr, lookup: Lookup, depth: int = 0) -> Binarizer | None:
    """``astype(b, float*)`` of a binarizer ``b`` (exporters cast integer Where results)."""
    if depth > 4:
        return None
    expr = _resolve(expr, lookup)
    if _op_name(expr) != "relax.astype" or not str(expr.attrs.dtype).startswith("float"):
        return None
    return match_binarizer(expr.args[0], lookup, depth + 1)


MATCHERS = (match_sign, match_where, match_cast_affine)


def match_binarizer(expr: relax.Expr, lookup: Lookup, depth: int = 0) -> Binarizer | None:
    """Return the binarizer that produces ``expr``, or None if it is not a binarized tensor."""
    for matcher in MATCHERS:
        found = matcher(expr, lookup)
        if found is not None:
            return found
    return (match_ste_residue(expr, lookup, depth) or match_scaled(expr, lookup, depth)
            or match_float_cast(expr, lookup, depth))
