"""QONNX (Brevitas / FINN) graphs: BipolarQuant lands on the binary kernels, Quant compiles in
float to the spec, everything else is reported.

The Brevitas cases use real exports made here by ``brevitas.export.export_qonnx`` (the
TorchScript exporter; brevitas is pinned in the ``test`` extra). The hand-built cases follow
the QONNX operator specification for the older domains Brevitas no longer writes.
"""

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import sparks_tvm
from sparks_tvm import qonnx
from sparks_tvm.errors import QONNXError, UnsupportedOpsError
from sparks_tvm.models import random_codebook
from sparks_tvm.reference import binarize, binary_conv2d_ref

def _brevitas_classes():
    pytest.importorskip("brevitas")  # pinned in the test extra; only these cases need it
    import torch
    import brevitas.nn as qnn
    from brevitas.core.function_wrapper import TensorClamp
    from brevitas.core.scaling import ScalingImplType
    from brevitas.core.stats import StatsOp
    from brevitas.quant import SignedBinaryActPerTensorConst, SignedBinaryWeightPerTensorConst

    class PerChannelBinaryWeight(SignedBinaryWeightPerTensorConst):
        """alpha_o = mean |W_o| per output channel, the XNOR-Net / Sparks weight scale."""

        scaling_impl_type = ScalingImplType.STATS
        scaling_stats_op = StatsOp.AVE
        scaling_per_output_channel = True
        # Not the in-place clamp of the Const quantizer: with a statistics scale, every
        # forward (the export's too) would clamp the latent weights and change the scale.
        tensor_clamp_impl = TensorClamp

    class BinaryActScale2(SignedBinaryActPerTensorConst):
        min_val, max_val = -2.0, 2.0  # BipolarQuant scale 2: a Mul before the conv

    class Net(torch.nn.Module):
        def __init__(self, rng, cin, mid, cout, k):
            super().__init__()
            self.act0 = qnn.QuantIdentity(act_quant=BinaryActScale2, return_quant_tensor=True)
            self.conv0 = qnn.QuantConv2d(cin, mid, 3, stride=2, padding=1, bias=False,
                                         weight_quant=PerChannelBinaryWeight)
            self.bn = torch.nn.BatchNorm2d(mid)
            self.act1 = qnn.QuantIdentity(act_quant=SignedBinaryActPerTensorConst, return_quant_tensor=True)
            self.conv1 = qnn.QuantConv2d(mid, cout, 3, padding=1, bias=False,
                                         weight_quant=SignedBinaryWeightPerTensorConst)
            # Sparks-structured latent weights: sign(W[o, i]) is one of K codewords.
            codebook = random_codebook(rng, k)
            idx = rng.integers(0, k, size=(mid, cin))
            idx[:k, 0] = np.arange(k)
            mags = rng.uniform(0.05, 1.0, size=(mid, cin, 3, 3))
            with torch.no_grad():
                self.conv0.weight.copy_(torch.from_numpy((codebook[idx] * mags).astype(np.float32)))
                self.bn.running_mean.copy_(torch.from_numpy(rng.uniform(-2, 2, mid).astype(np.float32)))
                self.bn.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 4, mid).astype(np.float32)))
                self.bn.weight.copy_(torch.from_numpy(rng.uniform(-1, 1, mid).astype(np.float32)))

        def forward(self, x):
            y = self.bn(self.conv0(self.act0(x)))
            return self.conv1(self.act1(y))

    return Net


def _export(module, shape):
    import torch
    from brevitas.export import export_qonnx

    buf = io.BytesIO()
    with torch.no_grad():
        export_qonnx(module.eval(), torch.zeros(*shape), buf, dynamo=False)
    return onnx.load_model_from_string(buf.getvalue())


@pytest.fixture(scope="module")
def brevitas_net():
    rng = np.random.default_rng(7)
    net = _brevitas_classes()(rng, cin=13, mid=20, cout=24, k=4).eval()
    shape = (2, 13, 9, 7)
    return net, _export(net, shape), shape


def test_brevitas_export_has_bipolarquant(brevitas_net):
    _, model, _ = brevitas_net
    ops = [(n.domain, n.op_type) for n in model.graph.node]
    assert ops.count(("qonnx.custom_op.general", "BipolarQuant")) == 4


def test_brevitas_model_compiles_to_binary_kernels_and_matches(brevitas_net):
    net, model, shape = brevitas_net
    compiled = sparks_tvm.compile(model)
    kinds = [(r.kind, r.binarizer, r.codewords) for r in compiled.report]
    assert kinds[0] == ("sparks", "ge", 4), compiled.report  # scale 2 folded, K=4 codewords
    assert kinds[1][0] in ("binary", "sparks") and kinds[1][1] == "ge"
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    x[rng.random(shape) < 0.2] = 0.0  # BipolarQuant(0) = +1
    got = compiled.run(x)[0]
    rewritten = qonnx.rewrite_qonnx(model).model
    ref = ort.InferenceSession(rewritten.SerializeToString()).run(None, {model.graph.input[0].name: x})[0]
    # (Not against torch here: its BatchNorm rounds differently from onnxruntime's, and a
    # value within an ulp of 0 before the second binarizer then flips a whole +-1 term.)
    assert np.abs(got - ref).max() <= 1e-5 * float(np.abs(ref).max())


def test_brevitas_first_conv_exact(brevitas_net):
    """The first conv alone: integers exact against numpy, 0 -> +1, scale 2 moved into alpha."""
    net, _, shape = brevitas_net
    import torch

    class First(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.act0, self.conv0 = net.act0, net.conv0

        def forward(self, x):
            return self.conv0(self.act0(x))

    model = _export(First(net), shape)
    compiled = sparks_tvm.compile(model)
    assert compiled.report[0].kind == "sparks"
    rng = np.random.default_rng(3)
    x = rng.integers(-2, 3, size=shape).astype(np.float32)  # many exact zeros
    got = compiled.run(x)[0]
    qw = net.conv0.quant_weight()
    w = (qw.value if hasattr(qw, "value") else qw).detach().numpy()
    alpha = np.abs(w).reshape(w.shape[0], -1).max(axis=1)
    ints = binary_conv2d_ref(binarize(x, "ge"), np.sign(w).astype(np.int8), (2, 2), (1, 1, 1, 1))
    expected = ints.astype(np.float32) * (alpha * np.float32(2.0)).astype(np.float32).reshape(1, -1, 1, 1)
    assert np.allclose(got, expected, rtol=1e-6, atol=0)
    # Exact up to the float epilogue: dividing the scale back out gives the integers.
    assert np.array_equal(np.rint(got / (2 * alpha.reshape(1, -1, 1, 1))).astype(np.int32), ints)
    with torch.no_grad():
        out = First(net)(torch.from_numpy(x))
    assert np.allclose(got, (out.value if hasattr(out, "value") else out).numpy(), rtol=1e-5, atol=1e-6)


def test_brevitas_integer_quant_export_compiles_in_float():
    """A real Brevitas 8-bit input / 4-bit weight / 4-bit ReLU export: Quant nodes (inputs from
    Constant nodes, as Brevitas writes them) are rewritten and compiled in float."""
    pytest.importorskip("brevitas")
    import torch
    import brevitas.nn as qnn

    class IntNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = qnn.QuantIdentity(bit_width=8, return_quant_tensor=True)
            self.conv = qnn.QuantConv2d(3, 5, 3, padding=1, weight_bit_width=4, bias=False)
            self.relu = qnn.QuantReLU(bit_width=4, return_quant_tensor=False)

        def forward(self, x):
            return self.relu(self.conv(self.inp(x)))

    torch.manual_seed(0)
    net = IntNet().eval()
    shape = (2, 3, 7, 6)
    model = _export(net, shape)
    assert sum(n.op_type == "Quant" for n in model.graph.node) == 3
    compiled = sparks_tvm.compile(model)
    assert [r.kind for r in compiled.report] == ["float"]
    notes = qonnx.rewrite_qonnx(model).notes
    assert [n.action.split(":")[0] for n in notes] == ["activation", "constant", "activation"]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    got = compiled.run(x)[0]
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    step = float(np.unique(np.diff(np.unique(ref)))[0])  # the 4-bit ReLU's quantization step
    # Same levels; a float-conv rounding difference may move a value sitting on a rounding
    # boundary by one step, nothing more.
    assert np.abs(got - ref).max() <= step * 1.001 and np.mean(got == ref) > 0.98


def _graph(nodes, inits, in_shape, out_shapes, domain, opset=13):
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in out_shapes]
    g = helper.make_graph(nodes, "qonnx", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
                          outs, inits)
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(g, opset_imports=imports)


@pytest.mark.parametrize("domain", qonnx.QONNX_DOMAINS)
def test_bipolarquant_domains_exact(domain):
    """Hand-built to the QONNX spec, scales as Constant nodes and initializers; 0 -> +1."""
    rng = np.random.default_rng(11)
    codebook = random_codebook(rng, 3)
    idx = rng.integers(0, 3, size=(6, 5))
    latent = (codebook[idx] * rng.uniform(0.1, 2, size=(6, 5, 3, 3))).astype(np.float32)
    wscale = rng.choice([0.25, 0.5, 2.0], size=(6, 1, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["one"], value=numpy_helper.from_array(np.ones(1, np.float32))),
        helper.make_node("BipolarQuant", ["x", "one"], ["xb"], name="act_q", domain=domain),
        helper.make_node("BipolarQuant", ["latent", "wscale"], ["wb"], name="w_q", domain=domain),
        helper.make_node("Conv", ["xb", "wb"], ["y"], name="conv", pads=[1, 0, 0, 1], strides=[2, 1]),
    ]
    inits = [numpy_helper.from_array(latent, "latent"), numpy_helper.from_array(wscale, "wscale")]
    model = _graph(nodes, inits, (3, 5, 8, 7), [("y", [3, 6, 4, 6])], domain)
    compiled = sparks_tvm.compile(model, force_kind="sparks")
    rec = compiled.report[0]
    assert (rec.name, rec.kind, rec.binarizer, rec.codewords) == ("conv", "sparks", "ge", 3)
    x = rng.integers(-2, 3, size=(3, 5, 8, 7)).astype(np.float32)
    ints = binary_conv2d_ref(binarize(x, "ge"), np.where(latent >= 0, 1, -1).astype(np.int8), (2, 1), (1, 0, 0, 1))
    assert np.array_equal(compiled.run(x)[0], ints.astype(np.float32) * wscale.reshape(1, -1, 1, 1))
    notes = qonnx.rewrite_qonnx(model).notes
    assert [n.node for n in notes] == ["act_q", "w_q"] and "weights" in notes[1].action


def test_rewrite_leaves_the_given_model_alone():
    nodes = [helper.make_node("BipolarQuant", ["x", "s"], ["y"], name="q", domain="qonnx.custom_op.general")]
    model = _graph(nodes, [numpy_helper.from_array(np.float32(0.5), "s")], (1, 2, 3, 3), [("y", [1, 2, 3, 3])],
                   "qonnx.custom_op.general")
    before = model.SerializeToString()
    out = qonnx.rewrite_qonnx(model).model
    assert model.SerializeToString() == before
    assert [n.op_type for n in out.graph.node] == ["Less", "Where", "Mul"]
    assert all(o.domain != "qonnx.custom_op.general" for o in out.opset_import)
    x = np.array([-1.0, -0.0, 0.0, 1e-30, -1e-30, 3.0, 2.0, -4.0, 0.5] * 2, np.float32).reshape(1, 2, 3, 3)
    got = ort.InferenceSession(out.SerializeToString()).run(None, {"x": x})[0]
    assert np.array_equal(got, qonnx.bipolar_quant(x, np.float32(0.5)))
    assert np.array_equal(qonnx.bipolar_quant(np.array([np.nan, 0.0, -0.0], np.float32), 1.0), [-1.0, 1.0, 1.0])


def test_int_quant_reference_spec_values():
    x = np.array([-1.3, 0.5, 2.6, 0.25, 0.75], np.float32)
    # x / 0.5 = [-2.6, 1, 5.2, 0.5, 1.5] -> clip [-2, 1] -> round half even [-2, 1, 1, 0, 1]
    assert np.array_equal(qonnx.int_quant(x, 0.5, 0.0, 2, signed=1, narrow=0), [-1.0, 0.5, 0.5, 0.0, 0.5])
    # narrow signed 2-bit: [-1, 1]; FLOOR
    assert np.array_equal(qonnx.int_quant(x, 0.5, 0.0, 2, 1, 1, "FLOOR"), [-0.5, 0.5, 0.5, 0.0, 0.5])
    # unsigned 3-bit, zero point 1, ROUND_TO_ZERO: x/0.5+1 = [-1.6, 2, 6.2, 1.5, 2.5] -> [0, 2, 6, 1, 2]
    assert np.allclose(qonnx.int_quant(x, 0.5, 1.0, 3, 0, 0, "ROUND_TO_ZERO"), [-0.5, 0.5, 2.5, 0.0, 0.5])
    assert qonnx.int_range(True, False, 1) == (-1, 0) and qonnx.int_range(False, True, 4) == (0, 14)


def test_quant_activations_compile_in_float_to_spec():
    """Four Quant configurations in one model; each output equals the numpy spec exactly."""
    dom = "qonnx.custom_op.general"
    configs = [
        dict(signed=1, narrow=0, rounding_mode="ROUND", bw=4, scale=0.25, zp=0.0),
        dict(signed=1, narrow=1, rounding_mode="FLOOR", bw=2, scale=0.5, zp=0.0),
        dict(signed=0, narrow=0, rounding_mode="CEIL", bw=3, scale=0.125, zp=2.0),
        dict(signed=1, narrow=0, rounding_mode="ROUND_TO_ZERO", bw=1, scale=1.0, zp=0.0),
    ]
    nodes, inits, outs = [], [], []
    for i, c in enumerate(configs):
        for name, v in (("s", c["scale"]), ("z", c["zp"]), ("b", c["bw"])):
            inits.append(numpy_helper.from_array(np.array(v, np.float32), f"{name}{i}"))
        op = "IntQuant" if i == 3 else "Quant"
        nodes.append(helper.make_node(op, ["x", f"s{i}", f"z{i}", f"b{i}"], [f"y{i}"], name=f"q{i}", domain=dom,
                                      signed=c["signed"], narrow=c["narrow"], rounding_mode=c["rounding_mode"]))
        outs.append((f"y{i}", [2, 3, 5, 5]))
    # A Quant on constant weights is evaluated; the conv reads a 4-bit activation: float.
    w = np.random.default_rng(5).standard_normal((4, 3, 3, 3)).astype(np.float32)
    inits += [numpy_helper.from_array(w, "w")]
    nodes += [helper.make_node("Quant", ["w", "s0", "z0", "b0"], ["wq"], name="wq", domain=dom),
              helper.make_node("Conv", ["y0", "wq"], ["yc"], name="conv_q", pads=[1, 1, 1, 1])]
    outs.append(("yc", [2, 4, 5, 5]))
    model = _graph(nodes, inits, (2, 3, 5, 5), outs, dom)
    compiled = sparks_tvm.compile(model)
    assert compiled.report[0].kind == "float" and compiled.report[0].reason == "input is not binarized"
    x = np.random.default_rng(1).uniform(-3, 3, size=(2, 3, 5, 5)).astype(np.float32)
    x.flat[:12] = [-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.0, -0.0, 0.125, -0.125, 0.375, 0.625]  # ties
    got = compiled.run(x)
    for i, c in enumerate(configs):
        ref = qonnx.int_quant(x, np.float32(c["scale"]), np.float32(c["zp"]), c["bw"], c["signed"], c["narrow"],
                              c["rounding_mode"])
        assert np.array_equal(got[i], ref), (i, c)
    rewritten = qonnx.rewrite_qonnx(model).model
    ref_conv = ort.InferenceSession(rewritten.SerializeToString()).run(["yc"], {"x": x})[0]
    assert np.allclose(got[4], ref_conv, atol=1e-5)


def test_other_qonnx_ops_reported_together():
    dom = "qonnx.custom_op.general"
    nodes = [
        helper.make_node("Trunc", ["x", "s", "z", "b", "b"], ["t"], name="trunc0", domain=dom),
        helper.make_node("MultiThreshold", ["t", "thr"], ["y"], name="mt0", domain="finn.custom_op.general"),
    ]
    inits = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("s", 1.0), ("z", 0.0), ("b", 4.0))]
    inits.append(numpy_helper.from_array(np.zeros((2, 3), np.float32), "thr"))
    model = _graph(nodes, inits, (1, 2, 3, 3), [("y", [1, 2, 3, 3])], dom)
    model.opset_import.append(helper.make_opsetid("finn.custom_op.general", 1))
    with pytest.raises(UnsupportedOpsError) as err:
        sparks_tvm.compile(model)
    msg = str(err.value)
    assert "Trunc: trunc0" in msg and "MultiThreshold: mt0" in msg and "QONNX" in msg


@pytest.mark.parametrize("case", ["bitwidth_input", "rounding", "arity"])
def test_malformed_qonnx_nodes_named(case):
    dom = "onnx.brevitas"
    inits = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("s", 1.0), ("z", 0.0), ("b", 4.0))]
    if case == "bitwidth_input":  # the bit width computed at run time
        nodes = [helper.make_node("ReduceMax", ["x"], ["bw"], keepdims=0),
                 helper.make_node("Quant", ["x", "s", "z", "bw"], ["y"], name="badq", domain=dom)]
        match = "badq.*bitwidth must be constant"
    elif case == "rounding":
        nodes = [helper.make_node("Quant", ["x", "s", "z", "b"], ["y"], name="badq", domain=dom,
                                  rounding_mode="STOCHASTIC")]
        match = "badq.*STOCHASTIC"
    else:
        nodes = [helper.make_node("BipolarQuant", ["x", "s", "z"], ["y"], name="badq", domain=dom)]
        match = "badq.*inputs"
    model = _graph(nodes, inits, (1, 2, 3, 3), [("y", [1, 2, 3, 3])], dom)
    with pytest.raises(QONNXError, match=match):
        sparks_tvm.compile(model)
