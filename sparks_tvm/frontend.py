"""ONNX loading, validation and import into Relax, with errors a user can act on."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnx
import onnx.external_data_helper
import onnx.numpy_helper
import onnx.shape_inference
from onnx import helper

import tvm
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx
from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

from . import qonnx
from .errors import CompileError, InputValueError, ModelLoadError, ShapeError, SparksError, UnsupportedOpsError


@dataclass
class InputSpec:
    name: str
    shape: tuple
    dtype: str


def load_onnx(model, rewrite_qonnx: bool = True, base_dir=None) -> onnx.ModelProto:
    """Accept a path, raw bytes or an ``onnx.ModelProto``; check it.

    With ``rewrite_qonnx`` (default), QONNX quantization nodes (Brevitas/FINN exports) are
    rewritten into standard ONNX (:mod:`sparks_tvm.qonnx`) on a copy of the model, before the
    supported-ops check sees them.

    Weights stored as ONNX external data are read from ``base_dir``: by default the folder
    of a model given as a path, never the working directory (a ``w.bin`` there would be read
    silently instead). Bytes or a ModelProto with external data need ``base_dir``.
    """
    if isinstance(model, onnx.ModelProto):
        proto, origin = model, "the given ModelProto"
        if _external_tensors(proto):
            proto = _copy(proto)  # loading the external data must not change the caller's model
    else:
        if isinstance(model, (bytes, bytearray)):
            data, origin = bytes(model), "the given bytes"
        elif isinstance(model, (str, os.PathLike)):
            origin = os.fspath(model)
            if not os.path.exists(origin):
                raise ModelLoadError(f"{origin}: no such file")
            if os.path.isdir(origin):
                raise ModelLoadError(f"{origin}: a directory, not an ONNX file")
            base_dir = os.path.dirname(os.path.abspath(origin)) if base_dir is None else base_dir
            with open(origin, "rb") as fh:
                data = fh.read()
        else:
            raise ModelLoadError(f"expected an ONNX path, bytes or ModelProto, got {type(model).__name__}")
        if not data:
            raise ModelLoadError(f"{origin}: empty file, not an ONNX model")
        try:
            proto = onnx.load_model_from_string(data)
        except Exception as err:  # protobuf raises DecodeError and friends
            raise ModelLoadError(f"{origin}: not a readable ONNX model (truncated or corrupt?): {err}") from None
    if not proto.HasField("graph") or len(proto.graph.node) == 0:
        raise ModelLoadError(f"{origin}: the ONNX model has an empty graph")
    load_external_data(proto, base_dir, origin)
    try:
        onnx.checker.check_model(proto)
    except Exception as err:
        raise ModelLoadError(f"{origin}: invalid ONNX model: {str(err).splitlines()[0]}") from None
    if rewrite_qonnx:
        proto = qonnx.rewrite_qonnx(proto).model
    check_weights_finite(proto, origin)
    try:
        # The checker does not run the ops' shape inference; onnxruntime does, and TVM's
        # importer silently ignores e.g. a kernel_shape that contradicts the weight or a
        # dilations list of the wrong length. Strict inference rejects what ORT rejects.
        # (Not above protobuf's 2 GB limit, where the in-memory API cannot serialize.)
        if proto.ByteSize() < 2**31 - 1:
            onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except Exception as err:
        raise ModelLoadError(f"{origin}: invalid ONNX model (shape inference): {str(err).splitlines()[0]}") from None
    return proto


def _copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    return out


def _external_tensors(proto: onnx.ModelProto) -> list:
    return [t for t in onnx.external_data_helper._get_all_tensors(proto)
            if t.data_location == onnx.TensorProto.EXTERNAL]


def load_external_data(proto: onnx.ModelProto, base_dir, origin: str) -> None:
    """Read the external data of ``proto``'s tensors from ``base_dir`` into the tensors (in place).

    Raises :class:`ModelLoadError` naming the file when one is missing or too short, and
    when bytes or a ModelProto with external data come without ``base_dir``.
    """
    tensors = _external_tensors(proto)
    if not tensors:
        return
    files = sorted({onnx.external_data_helper.ExternalDataInfo(t).location for t in tensors})
    if base_dir is None:
        raise ModelLoadError(f"{origin} stores weights in external file(s) {files[:3]}: pass base_dir= (the "
                             "folder holding them), or the model's path instead of its bytes")
    base_dir = os.fspath(base_dir)
    for tensor in tensors:
        location = onnx.external_data_helper.ExternalDataInfo(tensor).location
        path = os.path.join(base_dir, location)
        if not os.path.isfile(path):
            raise ModelLoadError(f"{origin}: external data file {location!r} of weight {tensor.name!r} is missing "
                                 f"(looked for {path})")
        try:
            onnx.external_data_helper.load_external_data_for_tensor(tensor, base_dir)
        except Exception as err:  # noqa: BLE001 - onnx raises ValueError, OSError, ValidationError
            raise ModelLoadError(f"{origin}: cannot read weight {tensor.name!r} from external data file "
                                 f"{location!r} in {base_dir}: {str(err).splitlines()[0][:200]}") from None


#: Ops whose constant inputs are learned parameters: NaN/inf there is a corrupt model, not a
#: deliberate sentinel (unlike e.g. an infinite Clip bound or a -inf attention mask).
_WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "PRelu", "InstanceNormalization")


def check_weights_finite(proto: onnx.ModelProto, origin: str = "the model") -> None:
    """Raise :class:`ModelLoadError` if a weight initializer holds NaN or infinity.

    A binary kernel cannot carry NaN, so a NaN weight would make the compiled model and the
    float reference disagree silently; it is always a corrupt or diverged checkpoint.
    """
    inits = {t.name: t for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type not in _WEIGHT_OPS or node.domain not in ("", "ai.onnx"):
            continue
        for name in node.input[1:]:
            t = inits.get(name)
            if t is None or t.data_location == onnx.TensorProto.EXTERNAL:
                continue
            try:
                arr = onnx.numpy_helper.to_array(t)
            except Exception as err:
                raise ModelLoadError(f"{origin}: initializer {name!r} of node {node.name or node.op_type!r} "
                                     f"cannot be read: {err}") from None
            if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
                bad = int((~np.isfinite(arr)).sum())
                raise ModelLoadError(f"{origin}: weight {name!r} of node {node.name or node.op_type!r} holds "
                                     f"{bad} NaN/inf value(s): the model is corrupt")


def default_opset(proto: onnx.ModelProto) -> int:
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 11


def check_supported_ops(proto: onnx.ModelProto) -> None:
    """Raise :class:`UnsupportedOpsError` listing *every* unsupported op and its nodes."""
    known = set(_get_convert_map()) | {"If"}
    missing: dict[str, list] = {}
    for i, node in enumerate(proto.graph.node):
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        if node.domain not in ("", "ai.onnx") or node.op_type not in known:
            missing.setdefault(op, []).append(node.name or f"#{i}")
    if missing:
        hint = ""
        if any(op.split("::")[0] in qonnx.QONNX_DOMAINS for op in missing):
            hint = ("QONNX: BipolarQuant (binary) and Quant/IntQuant (integer, compiled in float) are "
                    "rewritten; the other QONNX operators listed are not supported.")
        raise UnsupportedOpsError(missing, hint)


def conv_names(proto: onnx.ModelProto) -> list:
    """Names of the Conv nodes in graph order (the order the importer emits them)."""
    return [node.name or f"Conv_{i}" for i, node in enumerate(n for n in proto.graph.node if n.op_type == "Conv")]


def input_specs(proto: onnx.ModelProto, shapes: dict | None = None) -> list:
    """Static shapes of the graph's real inputs, merging user-given ``shapes``."""
    shapes = dict(shapes or {})
    inits = {t.name for t in proto.graph.initializer}
    specs, problems = [], []
    names = []
    for vi in proto.graph.input:
        if vi.name in inits:
            continue
        names.append(vi.name)
        ttype = vi.type.tensor_type
        dtype = helper.tensor_dtype_to_np_dtype(ttype.elem_type).name if ttype.elem_type else "float32"
        dims = []
        for d in ttype.shape.dim:
            dims.append(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None)
        if vi.name in shapes:
            given = tuple(int(v) for v in shapes.pop(vi.name))
            if dims and len(given) != len(dims):
                problems.append(f"input {vi.name!r}: given shape {given} has rank {len(given)}, the model says {len(dims)}")
            elif any(m is not None and m != g for m, g in zip(dims, given)):
                problems.append(f"input {vi.name!r}: given shape {given} contradicts the model's {tuple(dims)}")
            elif any(g <= 0 for g in given):
                problems.append(f"input {vi.name!r}: shape {given} has empty dimensions")
            dims = list(given)
        if not dims or any(d is None for d in dims):
            shown = tuple("?" if d is None else d for d in dims)
            problems.append(f"input {vi.name!r} has dynamic shape {shown}: give it, e.g. shapes={{{vi.name!r}: (1, 3, 224, 224)}}")
        specs.append(InputSpec(vi.name, tuple(dims), dtype))
    if shapes:
        problems.append(f"shapes given for unknown input(s) {sorted(shapes)}; the model's inputs are {names}")
    if problems:
        raise ShapeError("; ".join(problems))
    return specs


def output_names(proto: onnx.ModelProto) -> list:
    return [o.name for o in proto.graph.output]


def import_onnx(proto: onnx.ModelProto, specs: list):
    """Relax IRModule of the model with constant weights (no params kept as inputs)."""
    mod = from_onnx(
        proto,
        shape_dict={s.name: list(s.shape) for s in specs},
        dtype_dict={s.name: s.dtype for s in specs},
        opset=default_opset(proto),
        keep_params_in_input=False,
    )
    check_no_empty_activations(mod, conv_names(proto))
    return mod


def import_graph(proto: onnx.ModelProto, specs: list):
    """ONNX -> Relax (:func:`import_onnx`), TVM's importer failures reported as :class:`CompileError`.

    The first phase of :mod:`relay_passes.pipeline` then folds the constants.
    """
    try:
        return import_onnx(proto, specs)
    except SparksError:
        raise
    except Exception as err:
        raise CompileError(f"TVM's ONNX importer failed: {err.__class__.__name__}: {str(err).splitlines()[0]}") from err


def _static_dims(expr):
    """Static shape of a Relax tensor expression as a tuple of ints, else None."""
    ty = getattr(expr, "ty", None)
    if not isinstance(ty, relax.TensorType) or ty.shape is None or not hasattr(ty.shape, "values"):
        return None
    if not all(isinstance(d, tvm.tirx.IntImm) for d in ty.shape.values):
        return None
    return tuple(int(d) for d in ty.shape.values)


def check_no_empty_activations(mod, convs: list = ()) -> None:
    """Raise :class:`ShapeError` if an op's float activation (rank >= 3) has an empty dimension.

    The importer accepts e.g. a 3x3 conv on a 2x2 input without padding (output 0x0); TVM's
    passes then fail with a bare ValueError. Caught here with the op and the shapes.
    """
    conv_i = 0
    for func in mod.functions.values():
        if not isinstance(func, relax.Function):
            continue
        for block in func.body.blocks:
            for binding in block.bindings:
                value = binding.value
                if not isinstance(value, relax.Call):
                    continue
                op = getattr(value.op, "name", str(value.op))
                label = op
                if op == "relax.nn.conv2d":
                    label = f"conv {convs[conv_i]!r}" if conv_i < len(convs) else "a conv"
                    conv_i += 1
                dims = _static_dims(binding.var)
                if dims is None or len(dims) < 3 or not str(binding.var.ty.dtype).startswith("float"):
                    continue
                if min(dims) <= 0:
                    ins = [d for d in (_static_dims(a) for a in value.args) if d is not None][:1]
                    raise ShapeError(f"{label} produces an empty tensor of shape {dims}"
                                     + (f" from input {ins[0]}" if ins else "")
                                     + ": the input is too small for its kernel/stride/padding")


def as_input_arrays(specs: list, arrays) -> list:
    """Validate run-time inputs against the compiled shapes and dtypes."""
    if len(arrays) != len(specs):
        raise ShapeError(f"the model takes {len(specs)} input(s) {[s.name for s in specs]}, got {len(arrays)}")
    out = []
    for spec, arr in zip(specs, arrays):
        arr = np.asarray(arr)
        if tuple(arr.shape) != tuple(spec.shape):
            raise ShapeError(f"input {spec.name!r}: expected shape {tuple(spec.shape)}, got {tuple(arr.shape)}")
        if arr.dtype != np.dtype(spec.dtype):
            if not np.can_cast(arr.dtype, spec.dtype, casting="same_kind"):
                raise ShapeError(f"input {spec.name!r}: expected dtype {spec.dtype}, got {arr.dtype}")
            arr = arr.astype(spec.dtype)
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            # Binary kernels turn every activation into one bit: a NaN cannot propagate as it
            # does through onnxruntime's Sign, and inf easily becomes NaN in the float layers
            # before a binarizer. Refuse rather than return a result that differs silently.
            bad = ~np.isfinite(arr)
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise InputValueError(
                f"input {spec.name!r} holds {int(bad.sum())} non-finite value(s) (NaN/inf), first at "
                f"index {first} ({arr[first]}); binarized models need finite inputs"
            )
        out.append(np.ascontiguousarray(arr))
    return out
