"""Third-party export idioms: each is recognised (and then exact against onnxruntime) or left
in float with the reason in the report.

The graphs are written with onnx.helper the way exporters write them; the weights use dyadic
scales so that onnxruntime's float conv is exact too and outputs compare with ``==``.
"""

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import sparks_tvm
from sparks_tvm.models import random_codebook

X_SHAPE = (2, 6, 7, 5)  # batch 2, channels not a multiple of 32, odd sizes
O = 10


def sparks_weight(rng, k=3, o=O, c=X_SHAPE[1], alpha=(0.5, 0.25, 2.0)):
    codebook = random_codebook(rng, k)
    idx = rng.integers(0, k, size=(o, c))
    idx[:k, 0] = np.arange(k)
    a = rng.choice(alpha, size=o).astype(np.float32)
    return (codebook[idx] * a.reshape(-1, 1, 1, 1)).astype(np.float32), codebook, idx, a


def const(name, value):
    return numpy_helper.from_array(np.asarray(value, np.float32) if np.asarray(value).dtype.kind == "f"
                                   else np.asarray(value), name)


def model_of(nodes, inits, y_shape, x_shape=X_SHAPE, opset=17):
    g = helper.make_graph(nodes, "idiom", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(y_shape))], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def conv_model(binarizer_nodes, w, extra_inits=(), after=(), pads=(1, 1, 1, 1), strides=(1, 1)):
    """``binarizer_nodes`` map ``x`` to ``b``; then ``Conv(b, w)`` -> ``c``; ``after`` maps ``c`` to ``y``."""
    oh = (X_SHAPE[2] + pads[0] + pads[2] - 3) // strides[0] + 1
    ow = (X_SHAPE[3] + pads[1] + pads[3] - 3) // strides[1] + 1
    conv_out = "c" if after else "y"
    nodes = list(binarizer_nodes) + [helper.make_node("Conv", ["b", "w"], [conv_out], name="conv",
                                                      pads=list(pads), strides=list(strides))] + list(after)
    return model_of(nodes, [const("w", w)] + list(extra_inits), (X_SHAPE[0], w.shape[0], oh, ow))


def activations(rng, shape=X_SHAPE):
    x = rng.integers(-3, 4, size=shape).astype(np.float32) * 0.5  # a seventh of them exactly 0
    x[rng.random(shape) < 0.05] = -0.0
    return x


def check(model, rng, kind=("sparks", "binary"), mode=None, exact=True):
    compiled = sparks_tvm.compile(model)
    rec = compiled.report[0]
    assert rec.kind in kind, compiled.report
    if mode is not None:
        assert rec.binarizer == mode, compiled.report
    x = activations(rng)
    got = compiled.run(x)[0]
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    if exact:
        assert np.array_equal(got, ref), np.abs(got - ref).max()
    else:
        assert np.allclose(got, ref, rtol=1e-5, atol=1e-5), np.abs(got - ref).max()
    return compiled


@pytest.mark.parametrize("c, mode", [(0.5, "ge"), (-0.25, "gt"), (0.0, "sign"), (0.999, "ge")])
def test_sign_of_shifted_sign(rng, c, mode):
    w = sparks_weight(rng)[0]
    nodes = [helper.make_node("Sign", ["x"], ["s"]), helper.make_node("Add", ["s", "c"], ["t"]),
             helper.make_node("Sign", ["t"], ["b"])]
    check(conv_model(nodes, w, [const("c", np.float32(c))]), rng, mode=mode)


def test_sign_of_shifted_sign_by_one_binarizes_the_sum(rng):
    """|c| >= 1: sign(sign(x) + c) is not a zero rule of x ({0, +1} here), so the outer Sign
    binarizes the float tensor sign(x) + c itself, zeros and all; still exact."""
    w = sparks_weight(rng)[0]
    nodes = [helper.make_node("Sign", ["x"], ["s"]), helper.make_node("Add", ["c", "s"], ["t"]),
             helper.make_node("Sign", ["t"], ["b"])]
    check(conv_model(nodes, w, [const("c", np.float32(1.0))]), rng, mode="sign")


@pytest.mark.parametrize("form", ["le_zero_first", "gt_zero_first", "ge_tensor_consts"])
def test_where_forms(rng, form):
    w = sparks_weight(rng)[0]
    if form == "le_zero_first":  # Where(0 <= x, 1, -1): 0 -> +1
        nodes = [helper.make_node("LessOrEqual", ["z", "x"], ["m"]), helper.make_node("Where", ["m", "p", "n"], ["b"])]
        mode = "ge"
    elif form == "gt_zero_first":  # Where(0 > x, -1, 1): 0 -> +1
        nodes = [helper.make_node("Greater", ["z", "x"], ["m"]), helper.make_node("Where", ["m", "n", "p"], ["b"])]
        mode = "ge"
    else:  # torch.where(x >= 0, ones_like, -ones_like) folded to full tensors
        nodes = [helper.make_node("GreaterOrEqual", ["x", "z"], ["m"]),
                 helper.make_node("Where", ["m", "pt", "nt"], ["b"])]
        mode = "ge"
    inits = [const("z", np.float32(0)), const("p", np.float32(1)), const("n", np.float32(-1)),
             const("pt", np.ones(X_SHAPE, np.float32)), const("nt", -np.ones(X_SHAPE, np.float32))]
    check(conv_model(nodes, w, inits), rng, mode=mode)


@pytest.mark.parametrize("where", ["mul_before", "mul_before_first", "div_before", "per_channel_signs", "mul_after"])
def test_scale_before_or_after_conv(rng, where):
    w = sparks_weight(rng)[0]
    sign = [helper.make_node("Sign", ["x"], ["s"])]
    after = ()
    if where == "mul_before":
        nodes, s = sign + [helper.make_node("Mul", ["s", "k"], ["b"])], np.float32(0.75)
    elif where == "mul_before_first":
        nodes, s = sign + [helper.make_node("Mul", ["k", "s"], ["b"])], np.full((1, 6, 1, 1), 0.25, np.float32)
    elif where == "div_before":
        nodes, s = sign + [helper.make_node("Div", ["s", "k"], ["b"])], np.float32(4.0)
    elif where == "per_channel_signs":  # per-input-channel scale with sign flips: still binary
        nodes, s = sign + [helper.make_node("Mul", ["s", "k"], ["b"])], np.array([0.5, -0.5, 0.5, 0.5, -0.5, 0.5],
                                                                                  np.float32).reshape(6, 1, 1)
    else:
        nodes = [helper.make_node("Sign", ["x"], ["b"])]
        s = np.array([0.5, 2.0] * 5, np.float32).reshape(1, 10, 1, 1)
        after = [helper.make_node("Mul", ["c", "k"], ["y"])]
    check(conv_model(nodes, w, [const("k", s)], after=after), rng, mode="sign")


@pytest.mark.parametrize("scale, why", [(np.array([0.5, 1.0, 0.5, 0.5, 0.5, 0.5], np.float32).reshape(1, 6, 1, 1),
                                         "differs between input channels"),
                                        (np.full((1, 1, 7, 1), 0.5, np.float32), "varies over batch or space"),
                                        (np.float32(0.0), "scale is 0")])
def test_scale_that_cannot_move_into_weights_stays_float(rng, scale, why):
    w = sparks_weight(rng)[0]
    nodes = [helper.make_node("Sign", ["x"], ["s"]), helper.make_node("Mul", ["s", "k"], ["b"])]
    compiled = check(conv_model(nodes, w, [const("k", scale)]), rng, kind=("float",), exact=False)
    assert why in compiled.report[0].reason and "binarized but scaled" in compiled.report[0].reason


def test_batchnorm_not_folded(rng):
    """Conv -> BatchNormalization kept as a node (dynamo-style export): BN stays in float after."""
    w, *_ = sparks_weight(rng, alpha=(1.0,))
    c = O
    bn = [const("g", rng.choice([-1.0, 0.5, 2.0], c)), const("bb", rng.choice([-0.5, 0.25], c)),
          const("mu", rng.choice([-1.0, 0.0, 1.0], c)), const("var", rng.choice([1.0, 4.0], c))]
    after = [helper.make_node("BatchNormalization", ["c", "g", "bb", "mu", "var"], ["y"], epsilon=0.0)]
    check(conv_model([helper.make_node("Sign", ["x"], ["b"])], w, bn, after=after), rng, mode="sign")


def test_bn_folded_with_negative_gamma_counts_codewords_once(rng):
    w, codebook, idx, a = sparks_weight(rng, k=4)
    flip = np.where(np.arange(O) % 3 == 0, -1.0, 1.0).astype(np.float32).reshape(-1, 1, 1, 1)
    compiled = check(conv_model([helper.make_node("Sign", ["x"], ["b"])], w * flip), rng, mode="sign")
    assert compiled.report[0].codewords == 4


def test_weights_gathered_from_codebook_in_graph(rng):
    """weight = Gather(codebook, idx) * alpha computed in the graph, as a Sparks layer's forward."""
    _, codebook, idx, a = sparks_weight(rng, k=4)
    nodes = [helper.make_node("Gather", ["codebook", "idx"], ["kern"], axis=0),  # (O, C, 3, 3)
             helper.make_node("Mul", ["kern", "alpha"], ["w"]),
             helper.make_node("Sign", ["x"], ["b"]),
             helper.make_node("Conv", ["b", "w"], ["y"], name="conv", pads=[1, 1, 1, 1], strides=[2, 2])]
    inits = [const("codebook", codebook), const("idx", idx.astype(np.int64)), const("alpha", a.reshape(-1, 1, 1, 1))]
    model = model_of(nodes, inits, (2, O, 4, 3))
    compiled = check(model, rng, mode="sign")
    assert compiled.report[0].codewords == 4


def test_weights_selected_by_argmax_in_graph(rng):
    """Research code: nearest codeword by argmax <w, c>, then alpha = mean|W|, all in the graph."""
    w_true, codebook, idx, _ = sparks_weight(rng, k=5)
    latent = (w_true * rng.uniform(0.5, 1.5, size=w_true.shape)).astype(np.float32)  # same signs
    k = codebook.shape[0]
    nodes = [
        helper.make_node("Reshape", ["latent", "flat_shape"], ["lf"]),                 # (O*C, 9)
        helper.make_node("MatMul", ["lf", "code_t"], ["sim"]),                         # (O*C, K)
        helper.make_node("ArgMax", ["sim"], ["best"], axis=1, keepdims=0),
        helper.make_node("Gather", ["codes", "best"], ["kf"], axis=0),                 # (O*C, 9)
        helper.make_node("Reshape", ["kf", "w_shape"], ["kern"]),
        helper.make_node("Abs", ["latent"], ["absw"]),
        helper.make_node("ReduceMean", ["absw"], ["alpha"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Mul", ["kern", "alpha"], ["w"]),
        helper.make_node("Sign", ["x"], ["s"]),
        helper.make_node("Sub", ["s", "x"], ["d"]),   # STE residue x + (sign(x) - x).detach()
        helper.make_node("Add", ["x", "d"], ["b"]),
        helper.make_node("Conv", ["b", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    inits = [const("latent", latent), const("flat_shape", np.array([-1, 9], np.int64)),
             const("code_t", codebook.reshape(k, 9).T.copy()), const("codes", codebook.reshape(k, 9)),
             const("w_shape", np.array(latent.shape, np.int64))]
    model = model_of(nodes, inits, (2, O, 7, 5), opset=17)
    compiled = check(model, rng, mode="sign", exact=False)  # alpha = mean|W|: not dyadic
    assert compiled.report[0].codewords == 5 and compiled.report[0].kind == "sparks"


def test_torch_research_module_export_unfolded(rng):
    """A torch module computing its binary weight in forward, exported without constant folding."""
    import torch

    codebook = torch.from_numpy(random_codebook(rng, 6).reshape(6, 9))

    class ResearchSparksConv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(O, X_SHAPE[1], 3, 3, generator=torch.Generator().manual_seed(0)))
            self.register_buffer("codebook", codebook)

        def forward(self, x):
            flat = self.weight.reshape(-1, 9)
            best = (flat @ self.codebook.t()).argmax(dim=1)
            kern = self.codebook[best].reshape(self.weight.shape)
            alpha = self.weight.abs().mean(dim=(1, 2, 3), keepdim=True)
            wb = kern * alpha
            xb = x + (torch.sign(x) - x).detach()
            return torch.nn.functional.conv2d(xb, wb, padding=1, stride=2)

    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(ResearchSparksConv().eval(), (torch.zeros(*X_SHAPE),), buf, input_names=["x"],
                          output_names=["y"], opset_version=17, dynamo=False, do_constant_folding=False)
    model = onnx.load_model_from_string(buf.getvalue())
    assert any(n.op_type == "ArgMax" for n in model.graph.node)  # really computed in the graph
    compiled = check(model, rng, kind=("sparks", "binary"), mode="sign", exact=False)
    assert 1 <= compiled.report[0].codewords <= 6


def test_soft_binarizer_reported(rng):
    """tanh is not a binarizer: the conv stays float and the report says so."""
    w = sparks_weight(rng)[0]
    compiled = check(conv_model([helper.make_node("Tanh", ["x"], ["b"])], w), rng, kind=("float",), exact=False)
    assert compiled.report[0].reason == "input is not binarized"


@pytest.mark.parametrize("int_type", [TensorProto.INT64, TensorProto.INT8])
def test_integer_where_cast_to_float(rng, int_type):
    """Where(x >= 0, 1, -1) on integer constants, then Cast to float (an exporter's choice)."""
    w = sparks_weight(rng)[0]
    np_t = {TensorProto.INT64: np.int64, TensorProto.INT8: np.int8}[int_type]
    nodes = [helper.make_node("GreaterOrEqual", ["x", "z"], ["m"]), helper.make_node("Where", ["m", "pi", "ni"], ["bi"]),
             helper.make_node("Cast", ["bi"], ["b"], to=TensorProto.FLOAT)]
    inits = [const("z", np.float32(0)), numpy_helper.from_array(np.array(1, np_t), "pi"),
             numpy_helper.from_array(np.array(-1, np_t), "ni")]
    check(conv_model(nodes, w, inits), rng, mode="ge")


@pytest.mark.parametrize("form", ["where_ge_scalar", "where_gt_channel", "zero_first_channel", "cast_affine_scalar"])
def test_threshold_instead_of_zero(rng, form):
    """Where(x >= t, 1, -1) with a constant t (per tensor or per input channel): exact,
    including the values equal to t (x is a multiple of 0.5, so ties occur)."""
    w = sparks_weight(rng)[0]
    t_channel = np.array([0.5, -1.0, 0.0, 1.5, -0.5, 1.0], np.float32).reshape(1, 6, 1, 1)
    if form == "where_ge_scalar":
        t, mode = np.float32(0.5), "ge"
        nodes = [helper.make_node("GreaterOrEqual", ["x", "t"], ["m"]), helper.make_node("Where", ["m", "p", "n"], ["b"])]
    elif form == "where_gt_channel":
        t, mode = t_channel, "gt"
        nodes = [helper.make_node("Greater", ["x", "t"], ["m"]), helper.make_node("Where", ["m", "p", "n"], ["b"])]
    elif form == "zero_first_channel":  # Where(t > x, -1, 1): x >= t -> +1
        t, mode = t_channel.reshape(6, 1, 1), "ge"
        nodes = [helper.make_node("Greater", ["t", "x"], ["m"]), helper.make_node("Where", ["m", "n", "p"], ["b"])]
    else:
        t, mode = np.float32(-0.5), "ge"
        nodes = [helper.make_node("GreaterOrEqual", ["x", "t"], ["m"]),
                 helper.make_node("Cast", ["m"], ["f"], to=TensorProto.FLOAT), helper.make_node("Mul", ["f", "two"], ["d"]),
                 helper.make_node("Sub", ["d", "p"], ["b"])]
    inits = [const("t", t), const("p", np.float32(1)), const("n", np.float32(-1)), const("two", np.float32(2))]
    check(conv_model(nodes, w, inits), rng, mode=mode)
    from sparks_tvm.inspect import inspect_model

    assert inspect_model(conv_model(nodes, w, inits)).convs[0].binarizer_form.endswith(">=t)*2-1" if "cast" in form
                                                                                   else "where(x>=t)")


def test_full_shape_threshold(rng):
    """A threshold with the activation's full shape (one per position) is exact too."""
    w = sparks_weight(rng)[0]
    t = (rng.integers(-2, 3, size=X_SHAPE) * 0.5).astype(np.float32)
    nodes = [helper.make_node("GreaterOrEqual", ["x", "t"], ["m"]), helper.make_node("Where", ["m", "p", "n"], ["b"])]
    inits = [const("t", t), const("p", np.float32(1)), const("n", np.float32(-1))]
    check(conv_model(nodes, w, inits), rng, mode="ge")
