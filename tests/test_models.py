"""Whole models exported by torch, compiled by sparks_tvm, compared with onnxruntime."""

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given
from hypothesis import strategies as st

import sparks_tvm
from sparks_tvm import models


def ort_run(data, x):
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def assert_close(got, ref):
    # Binary layers are exact and the dyadic example weights keep every float op exact up to
    # the final average pool; only the pool/classifier may round differently.
    scale = max(1.0, float(np.abs(ref).max()))
    assert np.abs(got - ref).max() <= 2e-6 * scale, (np.abs(got - ref).max(), scale)


@given(
    w0=st.integers(3, 40),
    w1=st.integers(3, 70),
    k=st.integers(2, 64),
    batch=st.integers(1, 3),
    h=st.integers(5, 13),
    w=st.integers(5, 13),
    ste=st.sampled_from(["none", "detach", "bireal"]),
    zero=st.sampled_from(["sign", "ge"]),
    seed=st.integers(0, 1000),
)
def test_tiny_models_match_onnxruntime(w0, w1, k, batch, h, w, ste, zero, seed):
    net = models.sparks_resnet_tiny(k=k, seed=seed, widths=(w0, w1), ste=ste, zero=zero)
    shape = (batch, 3, h, w)
    data = models.export_onnx(net, shape)
    compiled = sparks_tvm.compile(data)
    kinds = [r.kind for r in compiled.report if r.binarizer]
    assert len(kinds) == 4 and all(kd in ("sparks", "binary") for kd in kinds)
    for r in compiled.report:
        if r.binarizer:
            assert r.binarizer == zero
            # At most K codewords (never doubled by folded negative BatchNorm scales); the
            # model uses codeword j in output channel j, so at least min(K, Cout) appear.
            assert min(k, r.out_channels) <= r.codewords <= k
    x = models.example_input(shape, seed=seed)
    assert_close(compiled.run(x)[0], ort_run(data, x))


@pytest.mark.parametrize("kind", ["sparks", "binary"])
def test_forced_kernel_kind(kind):
    net = models.sparks_resnet_tiny(k=8, seed=3, widths=(9, 17))
    data = models.export_onnx(net, (2, 3, 8, 9))
    compiled = sparks_tvm.compile(data, force_kind=kind)
    assert [r.kind for r in compiled.report if r.binarizer] == [kind] * 4
    x = models.example_input((2, 3, 8, 9), seed=5)
    assert_close(compiled.run(x)[0], ort_run(data, x))


@pytest.mark.slow
def test_resnet18_all_block_convs_sparks(tmp_path):
    net = models.sparks_resnet18(k=16)
    path = tmp_path / "r18.onnx"
    data = models.export_onnx(net, (1, 3, 224, 224), path)
    compiled = sparks_tvm.compile(str(path))
    kinds = [r.kind for r in compiled.report]
    assert kinds.count("sparks") == 16 and kinds.count("float") == 4 and len(kinds) == 20
    assert all(r.codewords == 16 for r in compiled.report if r.kind == "sparks")
    x = models.example_input((1, 3, 224, 224), seed=2)
    got = compiled.run(x)[0]
    ref = ort_run(data, x)
    assert_close(got, ref)
    assert np.argmax(got) == np.argmax(ref)
