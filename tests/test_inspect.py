"""``sparks-tvm inspect``: agrees with what compile does, explains float convs, JSON option."""

import json

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import sparks_tvm
from sparks_tvm import cli, models
from sparks_tvm.errors import NonBinaryWeightsError, UnsupportedOpsError
from sparks_tvm.inspect import inspect_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("inspect") / "tiny.onnx"
    models.export_onnx(models.sparks_resnet_tiny(k=[3, 4, 40, 5], widths=(9, 14), ste="detach"), (2, 3, 9, 7),
                       path=path)
    return path


def test_inspect_agrees_with_compile_report(tiny):
    ins = inspect_model(tiny)
    rep = sparks_tvm.compile(tiny).report
    assert len(ins.convs) == len(rep) == 6
    for c, r in zip(ins.convs, rep):
        assert (c.name, c.kind, c.codewords, c.dense_bops, c.sparks_bops, c.binarizer) == \
               (r.name, r.kind, r.codewords, r.dense_bops, r.sparks_bops, r.binarizer)
        assert c.binary == (r.kind != "float")
    kinds = [c.kind for c in ins.convs]
    assert kinds.count("float") == 2  # the stem and the 1x1 shortcut
    big = next(c for c in ins.convs if c.kind == "binary")  # K=40 drawn, 38 used: dense is cheaper
    assert big.kind == "binary" and "dense is cheaper" in big.why and big.lowered_to.startswith("dense binary")
    small = next(c for c in ins.convs if c.codewords == 3)
    assert small.kind == "sparks" and small.binarizer_form == "ste(sign)" and small.kernel_symbol.startswith("sparks")
    stem = ins.convs[0]
    assert not stem.binary and stem.why == "input is not binarized" and stem.dense_bops is None
    t = ins.totals
    assert (t["convs"], t["float"], t["strict_errors"]) == (6, 2, 0)
    assert t["compiled_bops"] < t["dense_bops"]


def _one_conv(w, scale=None, groups=1):
    nodes = [helper.make_node("Sign", ["x"], ["b0"])]
    inits = [numpy_helper.from_array(w, "w")]
    src = "b0"
    if scale is not None:
        nodes.append(helper.make_node("Mul", ["b0", "k"], ["b1"]))
        inits.append(numpy_helper.from_array(scale, "k"))
        src = "b1"
    nodes.append(helper.make_node("Conv", [src, "w"], ["y"], name="odd_conv", pads=[1, 1, 1, 1], group=groups))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, w.shape[0], 5, 5])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_non_binary_weights_inspected_not_raised(rng):
    w = np.where(rng.random((3, 4, 3, 3)) < 0.5, -1.0, 1.0).astype(np.float32)
    w[2, 1, 1, 1] = 0.3
    m = _one_conv(w)
    ins = inspect_model(m)
    (c,) = ins.convs
    assert c.kind == "float" and c.strict_error and "odd_conv" in c.strict_error and "output channel 2" in c.why
    assert "would fail" in str(ins) and ins.totals["strict_errors"] == 1
    with pytest.raises(NonBinaryWeightsError, match="odd_conv"):
        sparks_tvm.compile(m)


def test_reasons_for_grouped_and_scaled(rng):
    w = np.where(rng.random((4, 2, 3, 3)) < 0.5, -1.0, 1.0).astype(np.float32)
    (c,) = inspect_model(_one_conv(w, groups=2)).convs
    assert c.kind == "float" and "grouped conv (groups=2)" in c.why and c.binarizer == "sign"
    w = np.where(rng.random((4, 4, 3, 3)) < 0.5, -1.0, 1.0).astype(np.float32)
    scale = np.array([1, 2, 1, 1], np.float32).reshape(1, 4, 1, 1)
    (c,) = inspect_model(_one_conv(w, scale=scale)).convs
    assert c.kind == "float" and "differs between input channels" in c.why
    (c,) = inspect_model(_one_conv(w, scale=np.float32(0.5))).convs
    assert c.binary and c.input_scale == 0.5 and c.binarizer_form == "sign*scale"


def test_cli_inspect_json_and_text(tiny, tmp_path, capsys):
    assert cli.main(["inspect", str(tiny), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [c["kind"] for c in data["convs"]] == [c.kind for c in inspect_model(tiny).convs]
    assert data["inputs"] == [{"name": "input", "shape": [2, 3, 9, 7], "dtype": "float32"}]
    assert data["totals"]["convs"] == 6
    out = tmp_path / "ins.txt"
    assert cli.main(["inspect", str(tiny), "-o", str(out)]) == 0
    text = out.read_text()
    assert "lowered to" in text and "sparks" in text and "6 convs:" in text


def test_cli_inspect_qonnx_and_errors(tmp_path, capsys):
    dom = "qonnx.custom_op.general"
    w = np.where(np.random.default_rng(0).random((5, 4, 3, 3)) < 0.5, -1.0, 1.0).astype(np.float32)
    nodes = [helper.make_node("BipolarQuant", ["x", "s"], ["xb"], name="aq", domain=dom),
             helper.make_node("BipolarQuant", ["w", "s"], ["wb"], name="wq", domain=dom),
             helper.make_node("Conv", ["xb", "wb"], ["y"], name="c", pads=[1, 1, 1, 1])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 5, 5])],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.float32(1.0), "s")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(dom, 1)])
    p = tmp_path / "q.onnx"
    p.write_bytes(m.SerializeToString())
    assert cli.main(["inspect", str(p)]) == 0
    text = capsys.readouterr().out
    assert "QONNX nodes rewritten" in text and "aq (BipolarQuant)" in text and "[0->+1]" in text
    assert cli.main(["inspect", str(tmp_path / "missing.onnx")]) == 2
    assert "no such file" in capsys.readouterr().err
    m.graph.node.append(helper.make_node("Trunc", ["y", "s", "s", "s", "s"], ["z"], name="t", domain=dom))
    with pytest.raises(UnsupportedOpsError, match="Trunc"):
        inspect_model(m)
