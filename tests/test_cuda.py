"""CUDA target: built and checked without a GPU (source + nvcc PTX); run only where a GPU is."""

import re
import shutil

import numpy as np
import pytest
import tvm

import sparks_tvm
from sparks_tvm import models

HAS_GPU = tvm.cuda(0).exist
NEEDS_NVCC = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) not on PATH")
NEEDS_GPU = pytest.mark.skipif(not HAS_GPU, reason="no NVIDIA GPU visible to TVM on this machine")


def _kernel_bodies(src: str, prefix: str) -> dict:
    """name -> body text of each __global__ kernel whose name starts with ``prefix``."""
    starts = [(m.group(1), m.start()) for m in re.finditer(r"__global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(", src)]
    bodies = {}
    for i, (name, pos) in enumerate(starts):
        end = starts[i + 1][1] if i + 1 < len(starts) else len(src)
        if name.startswith(prefix):
            bodies[name] = src[pos:end]
    return bodies


@pytest.fixture(scope="module")
def tiny_cuda(tmp_path_factory):
    net = models.sparks_resnet_tiny(k=4, widths=(8, 12))
    path = tmp_path_factory.mktemp("cuda") / "tiny.onnx"
    models.export_onnx(net, (2, 3, 9, 9), path)
    return path, sparks_tvm.compile(path, target="cuda")


def test_cuda_alias_and_kernels_are_ours(tiny_cuda):
    _, compiled = tiny_cuda
    assert compiled.target.kind.name == "cuda" and str(compiled.target.attrs["arch"]).startswith("sm_")
    assert compiled.report.count("sparks") == 4
    src = compiled.cuda_source()
    sparks = _kernel_bodies(src, "sparks_conv2d_")
    assert sparks, "no Sparks kernels in the CUDA source"
    # Stage 1 of every Sparks layer is a popcount kernel: __popc on 32-bit words, not a fallback.
    for layer in {re.match(r"sparks_conv2d_\d+", n).group(0) for n in sparks}:
        assert any("__popc" in body for name, body in sparks.items() if name.startswith(layer + "_")), layer
    # Stock TVM convs appear only for the convs the report calls float (stem, shortcuts).
    stock = [n for n in _kernel_bodies(src, "") if "conv2d" in n and not n.startswith(("sparks", "binary"))]
    assert len(stock) <= compiled.report.count("float")


def test_dense_binary_kernel_for_cuda(tmp_path):
    net = models.sparks_resnet_tiny(k=4, widths=(8, 12))
    path = tmp_path / "tiny.onnx"
    models.export_onnx(net, (1, 3, 9, 9), path)
    compiled = sparks_tvm.compile(path, target="cuda", force_kind="binary")
    bodies = _kernel_bodies(compiled.cuda_source(), "binary_conv2d_")
    assert bodies and any("__popc" in b for b in bodies.values())


@NEEDS_NVCC
def test_resnet18_builds_to_ptx_with_nvcc(tmp_path):
    path = tmp_path / "r18.onnx"
    models.export_onnx(models.sparks_resnet18(k=16), (1, 3, 224, 224), path)
    compiled = sparks_tvm.compile(path, target="cuda")
    assert compiled.report.count("sparks") == 16
    ptx = compiled.cuda_ptx()
    text = ptx.decode(errors="replace")
    assert ".entry sparks_conv2d_" in text and "popc.b32" in text


def test_running_without_a_gpu_is_a_clear_error(tiny_cuda):
    if HAS_GPU:
        pytest.skip("a GPU is present: the model runs (see test_gpu_matches_host)")
    _, compiled = tiny_cuda
    with pytest.raises(sparks_tvm.SparksError, match="no GPU"):
        compiled.run(np.zeros((2, 3, 9, 9), np.float32))


@NEEDS_GPU
def test_gpu_matches_host(tiny_cuda):
    path, compiled = tiny_cuda
    x = models.example_input((2, 3, 9, 9), seed=3)
    host = sparks_tvm.compile(path, target="llvm")
    np.testing.assert_allclose(compiled.run(x)[0], host.run(x)[0], rtol=1e-5, atol=1e-5 * 100)
