"""Bad input gets a named sparks_tvm error, never a bare TVM stack trace."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import sparks_tvm
from sparks_tvm import models
from sparks_tvm.errors import (ModelLoadError, NonBinaryWeightsError, ShapeError, SparksError,
                               UnsupportedOpsError)


@pytest.fixture(scope="module")
def tiny_onnx():
    return models.export_onnx(models.sparks_resnet_tiny(k=4, widths=(8, 12)), (1, 3, 8, 8))


def test_not_onnx(tmp_path):
    p = tmp_path / "x.onnx"
    p.write_text("hello, not a model")
    with pytest.raises(ModelLoadError, match="x.onnx"):
        sparks_tvm.compile(str(p))


def test_truncated(tmp_path, tiny_onnx):
    p = tmp_path / "t.onnx"
    p.write_bytes(tiny_onnx[: len(tiny_onnx) // 2])
    with pytest.raises(ModelLoadError, match="t.onnx"):
        sparks_tvm.compile(p)


def test_missing_and_empty(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        sparks_tvm.compile(str(tmp_path / "nope.onnx"))
    with pytest.raises(ModelLoadError, match="empty"):
        sparks_tvm.compile(b"")


def _graph(nodes, inits=(), in_shape=(1, 4, 6, 6)):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(in_shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, None, 6, 6])], list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_unsupported_ops_listed_at_once():
    m = _graph([
        helper.make_node("Sign", ["input"], ["a"], name="s"),
        helper.make_node("FancyOp", ["a"], ["b"], name="fancy1", domain="my.domain"),
        helper.make_node("FancyOp", ["b"], ["c"], name="fancy2", domain="my.domain"),
        helper.make_node("OtherOp", ["c"], ["y"], name="other", domain="my.domain"),
    ])
    m.opset_import.append(helper.make_opsetid("my.domain", 1))
    with pytest.raises(UnsupportedOpsError) as err:
        sparks_tvm.compile(m)
    msg = str(err.value)
    assert "fancy1" in msg and "fancy2" in msg and "other" in msg and "2 unsupported" in msg


def test_non_binary_weights_named(rng):
    w = np.where(rng.random((3, 4, 3, 3)) < 0.5, -1.0, 1.0).astype(np.float32)  # 3 output channels
    w[1, 2, 0, 0] = 0.5
    m = _graph([helper.make_node("Sign", ["input"], ["a"]),
                helper.make_node("Conv", ["a", "w"], ["y"], name="my_conv", pads=[1, 1, 1, 1])],
               [numpy_helper.from_array(w, "w")])
    with pytest.raises(NonBinaryWeightsError, match=r"my_conv.*output channel 1"):
        sparks_tvm.compile(m)
    lenient = sparks_tvm.compile(m, strict=False)
    assert lenient.report[0].kind == "float" and "output channel 1" in lenient.report[0].reason
    x = rng.standard_normal((1, 4, 6, 6)).astype(np.float32)
    import onnxruntime as ort
    ref = ort.InferenceSession(m.SerializeToString()).run(None, {"input": x})[0]
    assert np.allclose(lenient.run(x)[0], ref, atol=1e-5)


def test_shapes(tiny_onnx):
    with pytest.raises(ShapeError, match="contradicts"):
        sparks_tvm.compile(tiny_onnx, shapes={"input": (1, 3, 9, 9)})
    with pytest.raises(ShapeError, match="unknown input"):
        sparks_tvm.compile(tiny_onnx, shapes={"image": (1, 3, 8, 8)})
    m = onnx.load_model_from_string(tiny_onnx)
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    with pytest.raises(ShapeError, match="dynamic shape"):
        sparks_tvm.compile(m)
    compiled = sparks_tvm.compile(m, shapes={"input": (2, 3, 8, 8)})
    with pytest.raises(ShapeError, match=r"expected shape \(2, 3, 8, 8\)"):
        compiled.run(np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(ShapeError, match="takes 1 input"):
        compiled.run()


def test_bad_target(tiny_onnx):
    with pytest.raises(SparksError, match="unknown target"):
        sparks_tvm.compile(tiny_onnx, target="no-such-board")
