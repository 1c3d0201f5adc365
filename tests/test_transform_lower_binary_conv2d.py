"""The lowering phases of relay_passes.pipeline, Before/Expected in TVMScript (TVM's test_transform_* style).

The kernels themselves are checked against numpy elsewhere (tests/test_kernels.py); here the
graph rewrite: ``conv2d(sign(x), W)`` becomes a ``call_tir`` of the Sparks kernel on the float
input, with the codebook bits and packed indices as constants, cast and scaled by alpha.
"""

import numpy as np
import tvm
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from relay_passes import pipeline
from relay_passes.binary_weights import analyze_binary_weights
from sparks_tvm.kernels import ConvGeometry, codes_to_bits, pack_indices, sparks_conv2d_primfunc
from sparks_tvm.models import random_codebook

rng = np.random.default_rng(0)
CODEBOOK = random_codebook(rng, 4)
IDX = rng.integers(0, 4, size=(6, 5))
IDX[:4, 0] = np.arange(4)
W = (CODEBOOK[IDX] * 0.5).astype(np.float32)
BW = analyze_binary_weights(W)
CODES = codes_to_bits(BW.codebook).astype(np.int32)
PACKED = pack_indices(BW.idx, 4)
ALPHA = BW.alpha.reshape(1, -1, 1, 1).astype(np.float32)


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor((1, 5, 6, 6), "float32")) -> R.Tensor((1, 6, 6, 6), "float32"):
        with R.dataflow():
            b = R.sign(x)
            y = R.nn.conv2d(b, R.const(W), padding=(1, 1))
            R.output(y)
        return y


@I.ir_module(check_well_formed=False)  # the stub kernel below is replaced by the real one
class Expected:
    @T.prim_func(private=True)
    def sparks_conv2d_0(a: T.handle):  # stands for the kernel, put in below
        T.evaluate(0)

    @R.function
    def main(x: R.Tensor((1, 5, 6, 6), "float32")) -> R.Tensor((1, 6, 6, 6), "float32"):
        cls = Expected
        with R.dataflow():
            b = R.sign(x)  # dead: the kernel binarizes x itself (dropped by lower_float's DCE)
            sparks_acc = R.call_tir(cls.sparks_conv2d_0, (x, R.const(CODES), R.const(PACKED)),
                                    out_ty=R.Tensor((1, 6, 6, 6), "int32"))
            lv = R.astype(sparks_acc, "float32")
            y = R.multiply(lv, R.const(ALPHA))
            R.output(y)
        return y


def _expected():
    mod = Expected
    geom = ConvGeometry(1, 5, 6, 6, 6)
    kernel = sparks_conv2d_primfunc(geom, 4, "sign").with_attr("global_symbol", "sparks_conv2d_0")
    mod[mod.get_global_var("sparks_conv2d_0")] = kernel
    return mod


def test_lower_binary_phase():
    after, records = pipeline.lower(Before, pipeline.PipelineOptions(), until="lower_binary")
    tvm.ir.assert_structural_equal(after, _expected())
    (rec,) = records
    assert (rec.kind, rec.codewords, rec.binarizer) == ("sparks", 4, "sign")


@I.ir_module
class NotBinarized:
    @R.function
    def main(x: R.Tensor((1, 5, 6, 6), "float32")) -> R.Tensor((1, 6, 6, 6), "float32"):
        with R.dataflow():
            b = R.nn.relu(x)
            y = R.nn.conv2d(b, R.const(W), padding=(1, 1))
            R.output(y)
        return y


def test_float_input_left_alone():
    after, records = pipeline.lower(NotBinarized, pipeline.PipelineOptions(), until="lower_binary")
    tvm.ir.assert_structural_equal(after, NotBinarized)
    assert records[0].kind == "float" and records[0].reason == "input is not binarized"
