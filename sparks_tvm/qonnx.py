"""Rewrite QONNX quantization nodes (Brevitas / FINN exports) into standard ONNX.

TVM's ONNX importer has no hook for custom operators, so QONNX nodes are rewritten in the
ONNX graph *before* the supported-ops check and the import. The rewrite targets exactly the
forms the binary lowering pass recognises, so a Brevitas binary network lands on the same
Sparks / dense binary kernels as a torch export.

Handled (QONNX spec, ``qonnx.custom_op.general``; older exports use the domains
``onnx.brevitas`` and ``finn.custom_op.general``):

``BipolarQuant(X, scale)``, ``Y = (X >= 0 ? +1 : -1) * scale`` (0 -> +1, NaN -> -1)
    - ``X`` and ``scale`` constant (a weight): evaluated here with numpy into an initializer
      (``+-scale``, per tensor or per output channel: a binary weight).
    - otherwise (an activation): ``Where(Less(X, 0), -1, 1)`` then ``Mul(., scale)`` when
      ``scale`` is not exactly 1. The lowering pass reads ``Where(x < 0, -1, 1)`` as the
      binarizer with the ``ge`` zero rule and folds a constant scale into the weights.
``Quant`` / ``IntQuant(X, scale, zeropt, bitwidth)``: integer quantization
    ``(round(clip(X / scale + zeropt, min_int, max_int)) - zeropt) * scale`` with the
    ``signed`` / ``narrow`` / ``rounding_mode`` attributes. Constant inputs are evaluated
    here; otherwise the formula is written out in ONNX ops (Div, Add, Max, Min, Round /
    Floor / Ceil, Sub, Mul) and compiles in float: it is not a binarizer (even at 1 bit,
    where its levels are {-1, 0} or {0, 1}, not {-1, +1}).

Every other node of those domains (``Trunc``, ``FloatQuant``, ``MultiThreshold``,
``QuantAvgPool2d``, ...) is left in place, so the supported-ops check lists it, with a
hint, in one :class:`~sparks_tvm.errors.UnsupportedOpsError`. A handled node whose
arguments are unusable (a non-constant bit width, an unknown rounding mode, a wrong number
of inputs) raises :class:`~sparks_tvm.errors.QONNXError` naming the node.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import QONNXError

#: The domains QONNX quantization nodes are exported in, newest first.
QONNX_DOMAINS = ("qonnx.custom_op.general", "onnx.brevitas", "finn.custom_op.general")

#: QONNX rounding modes and the ONNX op that implements each (``None``: written out).
ROUNDING_MODES = {
    "ROUND": "Round",  # numpy's round: half to even, as ONNX Round
    "HALF_EVEN": "Round",
    "FLOOR": "Floor",
    "CEIL": "Ceil",
    "ROUND_TO_ZERO": None,  # sign(x) * floor(|x|)
    "DOWN": None,
}


@dataclass
class RewriteNote:
    """What the rewrite did with one QONNX node (inspect prints these)."""

    node: str
    op: str
    action: str


@dataclass
class RewriteResult:
    """The rewritten model and one note per QONNX node seen."""

    model: onnx.ModelProto
    notes: list = field(default_factory=list)


def is_qonnx_node(node: onnx.NodeProto) -> bool:
    return node.domain in QONNX_DOMAINS


def has_qonnx_nodes(model: onnx.ModelProto) -> bool:
    return any(is_qonnx_node(n) for n in model.graph.node)


def _constants(graph: onnx.GraphProto) -> dict:
    """Name -> numpy value of initializers and ``Constant`` node outputs."""
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.output) == 1:
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
                elif attr.name in ("value_float", "value_int"):
                    values[node.output[0]] = np.array(helper.get_attribute_value(attr))
                elif attr.name in ("value_floats", "value_ints"):
                    values[node.output[0]] = np.array(helper.get_attribute_value(attr))
    return values


def _elem_types(graph: onnx.GraphProto) -> dict:
    """Name -> ONNX element type, where the graph records one."""
    types = {}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for t in graph.initializer:
        types[t.name] = t.data_type
    return types


def bipolar_quant(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """QONNX ``BipolarQuant`` reference: ``where(x >= 0, 1, -1) * scale`` (NaN -> -1)."""
    x = np.asarray(x)
    return (np.where(x >= 0, 1.0, -1.0).astype(x.dtype) * np.asarray(scale, dtype=x.dtype)).astype(x.dtype)


def int_range(signed: bool, narrow: bool, bitwidth: int) -> tuple:
    """``(min_int, max_int)`` of a QONNX ``Quant`` (qonnx.custom_op.general.quant)."""
    if signed:
        return -(2 ** (bitwidth - 1)) + int(narrow), 2 ** (bitwidth - 1) - 1
    return 0, 2**bitwidth - 1 - int(narrow)


def _round(y: np.ndarray, mode: str) -> np.ndarray:
    if mode in ("ROUND", "HALF_EVEN"):
        return np.round(y)
    if mode == "FLOOR":
        return np.floor(y)
    if mode == "CEIL":
        return np.ceil(y)
    return np.fix(y)  # ROUND_TO_ZERO / DOWN


def int_quant(x, scale, zeropt, bitwidth, signed=True, narrow=False, rounding_mode="ROUND") -> np.ndarray:
    """QONNX ``Quant`` reference (clip, then round, as qonnx's own executor does)."""
    x = np.asarray(x)
    dt = x.dtype
    lo, hi = int_range(bool(signed), bool(narrow), int(bitwidth))
    y = x / scale + zeropt
    y = np.minimum(np.maximum(y, lo), hi)
    y = _round(y, rounding_mode)
    return ((y - zeropt) * scale).astype(dt)


class _Rewriter:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.consts = _constants(self.graph)
        self.types = _elem_types(self.graph)
        self.new_inits: list = []
        self.notes: list = []
        self.counter = 0

    def fresh(self, base: str) -> str:
        self.counter += 1
        return f"{base}__qonnx{self.counter}"

    def const(self, base: str, value) -> str:
        name = self.fresh(base)
        self.new_inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def np_dtype(self, name: str):
        et = self.types.get(name, onnx.TensorProto.FLOAT)
        try:
            dt = helper.tensor_dtype_to_np_dtype(et)
        except Exception:  # pragma: no cover - exotic element types
            dt = np.dtype(np.float32)
        return dt if np.issubdtype(dt, np.floating) else np.dtype(np.float32)

    def label(self, node: onnx.NodeProto, i: int) -> str:
        return node.name or f"{node.op_type}#{i}"

    # -- BipolarQuant ---------------------------------------------------------------
    def bipolar(self, node, i) -> list:
        name = self.label(node, i)
        if len(node.input) != 2 or len(node.output) != 1:
            raise QONNXError(f"QONNX BipolarQuant node {name!r} must have inputs (X, scale) and one output, "
                             f"got {len(node.input)} input(s) and {len(node.output)} output(s)")
        x, scale = node.input
        y = node.output[0]
        if x in self.consts and scale in self.consts:
            value = bipolar_quant(self.consts[x], self.consts[scale])
            self.new_inits.append(numpy_helper.from_array(value, y))
            self.consts[y] = value
            self.notes.append(RewriteNote(name, "BipolarQuant", "constant (weights): evaluated to +-scale"))
            return []
        dt = self.np_dtype(x)
        zero, minus, plus = (self.const(f"{name}_{v}", np.array(c, dt)) for v, c in (("zero", 0), ("m1", -1), ("p1", 1)))
        lt = self.fresh(f"{name}_lt0")
        nodes = [helper.make_node("Less", [x, zero], [lt], name=f"{name}/Less")]
        sc = self.consts.get(scale)
        if sc is not None and sc.size and np.all(sc == 1):
            nodes.append(helper.make_node("Where", [lt, minus, plus], [y], name=f"{name}/Where"))
            action = "activation: Where(x < 0, -1, 1) (0 -> +1)"
        else:
            b = self.fresh(f"{name}_bipolar")
            nodes.append(helper.make_node("Where", [lt, minus, plus], [b], name=f"{name}/Where"))
            if sc is not None and sc.dtype != dt:
                scale = self.const(f"{name}_scale", sc.astype(dt))
            nodes.append(helper.make_node("Mul", [b, scale], [y], name=f"{name}/Mul"))
            action = "activation: Where(x < 0, -1, 1) * scale (0 -> +1)"
        self.notes.append(RewriteNote(name, "BipolarQuant", action))
        return nodes

    # -- Quant / IntQuant -------------------------------------------------------------
    def quant(self, node, i) -> list:
        name = self.label(node, i)
        if len(node.input) != 4 or len(node.output) != 1:
            raise QONNXError(f"QONNX {node.op_type} node {name!r} must have inputs (X, scale, zeropt, bitwidth), "
                             f"got {len(node.input)}")
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        signed = int(attrs.get("signed", 1))
        narrow = int(attrs.get("narrow", 0))
        mode = attrs.get("rounding_mode", b"ROUND")
        mode = (mode.decode() if isinstance(mode, bytes) else str(mode)).upper()
        if mode not in ROUNDING_MODES:
            raise QONNXError(f"QONNX {node.op_type} node {name!r}: rounding_mode {mode!r} is not supported "
                             f"(supported: {', '.join(ROUNDING_MODES)})")
        x, scale, zeropt, bitwidth = node.input
        missing = [n for n, v in (("scale", scale), ("zeropt", zeropt), ("bitwidth", bitwidth)) if v not in self.consts]
        if missing:
            raise QONNXError(f"QONNX {node.op_type} node {name!r}: {', '.join(missing)} must be constant")
        bw = self.consts[bitwidth]
        if bw.size != 1 or float(bw.flat[0]) != int(bw.flat[0]) or int(bw.flat[0]) < 1:
            raise QONNXError(f"QONNX {node.op_type} node {name!r}: bitwidth must be one integer >= 1, got {bw.tolist()}")
        bits = int(bw.flat[0])
        y = node.output[0]
        if x in self.consts:
            value = int_quant(self.consts[x], self.consts[scale], self.consts[zeropt], bits, signed, narrow, mode)
            self.new_inits.append(numpy_helper.from_array(value, y))
            self.consts[y] = value
            self.notes.append(RewriteNote(name, node.op_type, f"constant: evaluated ({bits}-bit)"))
            return []
        dt = self.np_dtype(x)
        lo, hi = int_range(bool(signed), bool(narrow), bits)
        s = self.const(f"{name}_scale", self.consts[scale].astype(dt))
        z = self.const(f"{name}_zeropt", self.consts[zeropt].astype(dt))
        c_lo, c_hi = self.const(f"{name}_min", np.array(lo, dt)), self.const(f"{name}_max", np.array(hi, dt))
        t = [self.fresh(f"{name}_{k}") for k in ("div", "add", "max", "min", "rnd", "sub")]
        nodes = [
            helper.make_node("Div", [x, s], [t[0]], name=f"{name}/Div"),
            helper.make_node("Add", [t[0], z], [t[1]], name=f"{name}/Add"),
            helper.make_node("Max", [t[1], c_lo], [t[2]], name=f"{name}/Max"),
            helper.make_node("Min", [t[2], c_hi], [t[3]], name=f"{name}/Min"),
        ]
        op = ROUNDING_MODES[mode]
        if op is not None:
            nodes.append(helper.make_node(op, [t[3]], [t[4]], name=f"{name}/{op}"))
        else:  # toward zero: sign(v) * floor(|v|)
            a, f, sg = self.fresh(f"{name}_abs"), self.fresh(f"{name}_floor"), self.fresh(f"{name}_sgn")
            nodes += [
                helper.make_node("Abs", [t[3]], [a], name=f"{name}/Abs"),
                helper.make_node("Floor", [a], [f], name=f"{name}/Floor"),
                helper.make_node("Sign", [t[3]], [sg], name=f"{name}/Sign"),
                helper.make_node("Mul", [sg, f], [t[4]], name=f"{name}/MulSign"),
            ]
        nodes += [
            helper.make_node("Sub", [t[4], z], [t[5]], name=f"{name}/Sub"),
            helper.make_node("Mul", [t[5], s], [y], name=f"{name}/Mul"),
        ]
        self.notes.append(RewriteNote(name, node.op_type, f"activation: {bits}-bit integer quantization in float "
                                                          "(not a binarizer)"))
        return nodes

    def run(self) -> onnx.ModelProto:
        out_nodes = []
        for i, node in enumerate(self.graph.node):
            if is_qonnx_node(node) and node.op_type == "BipolarQuant":
                out_nodes += self.bipolar(node, i)
            elif is_qonnx_node(node) and node.op_type in ("Quant", "IntQuant"):
                out_nodes += self.quant(node, i)
            else:
                if is_qonnx_node(node):
                    self.notes.append(RewriteNote(self.label(node, i), node.op_type, "not supported"))
                out_nodes.append(node)
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        del model.graph.node[:]
        model.graph.node.extend(out_nodes)
        # Outputs evaluated to initializers replace nothing in graph.input; drop duplicates of names.
        have = {t.name for t in model.graph.initializer}
        model.graph.initializer.extend(t for t in self.new_inits if t.name not in have)
        used = {n.domain for n in model.graph.node}
        keep = [o for o in model.opset_import if o.domain not in QONNX_DOMAINS or o.domain in used]
        del model.opset_import[:]
        model.opset_import.extend(keep)
        _drop_dead_constants(model)
        _drop_unused_initializers(model)
        return model


def _names_read(graph: onnx.GraphProto) -> set:
    """Every tensor name a node (or a node of a subgraph, e.g. If branches) or output reads."""
    read = {o.name for o in graph.output}
    for n in graph.node:
        read.update(n.input)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                read |= _names_read(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    read |= _names_read(g)
    return read


def _drop_dead_constants(model: onnx.ModelProto) -> None:
    """Remove ``Constant`` nodes whose value only fed an evaluated QONNX node (the scales)."""
    read = _names_read(model.graph)
    keep = [n for n in model.graph.node if not (n.op_type == "Constant" and n.domain in ("", "ai.onnx")
                                                 and all(o not in read for o in n.output))]
    if len(keep) != len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(keep)


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    """Remove initializers nothing reads any more (latent weights a BipolarQuant consumed)."""
    read = _names_read(model.graph)
    keep = [t for t in model.graph.initializer if t.name in read]
    if len(keep) != len(model.graph.initializer):
        # Old exports list initializers among graph inputs too: drop only the removed ones.
        gone = {t.name for t in model.graph.initializer} - {t.name for t in keep}
        inputs = [vi for vi in model.graph.input if vi.name not in gone]
        del model.graph.input[:]
        model.graph.input.extend(inputs)
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)


def rewrite_qonnx(model: onnx.ModelProto) -> RewriteResult:
    """Rewrite the QONNX nodes of ``model`` (never modified) into standard ONNX.

    Parameters
    ----------
    model : onnx.ModelProto

    Returns
    -------
    RewriteResult
        ``model`` itself (and no notes) when it has no QONNX node, else a rewritten copy.

    Raises
    ------
    QONNXError
        A BipolarQuant / Quant node whose inputs or attributes cannot be rewritten.
    """
    if not has_qonnx_nodes(model):
        return RewriteResult(model, [])
    rw = _Rewriter(model)
    return RewriteResult(rw.run(), rw.notes)
