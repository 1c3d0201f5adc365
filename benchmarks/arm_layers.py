"""Whole compiled layers and models on the emulated Pi: ONNX in, instructions counted.

A layer is the ONNX graph a user exports for one binary conv: ``Sign -> Conv 3x3 ->
BatchNormalization`` (``kind`` ``sparks``: weights ``+-alpha_o`` from K codewords; ``binary``:
the same graph compiled with the dense binary kernel; ``float``: ``Conv -> BatchNormalization``
without the Sign, our float conv). Each is compiled with ``sparks_tvm.compile(...,
target="arm_cpu")``, exported as a cross-linked library, and run on the emulated Pi through a
Relax VirtualMachine; the count is every instruction executed inside the library's code
(binarization, conv, epilogue: all its kernels) for one call, batch 1, one thread, with a
per-symbol breakdown.

Used by ``bench_arm_icount.py``; importable for tests.
"""

from __future__ import annotations

import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sparks_tvm.tune import emulated_pi


def layer_onnx(cin: int, cout: int, side: int, stride: int, kind: str, k: int = 16, seed: int = 0) -> bytes:
    """The ONNX graph of one layer (see the module docstring), random weights and statistics."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from sparks_tvm.models import random_codebook

    rng = np.random.default_rng(seed)
    if kind == "float":
        w = rng.standard_normal((cout, cin, 3, 3)).astype(np.float32) * 0.1
    else:
        codebook = random_codebook(rng, k)
        idx = rng.integers(0, k, size=(cout, cin))
        alpha = rng.uniform(0.5, 1.5, size=(cout, 1, 1, 1)).astype(np.float32)
        w = (codebook[idx] * alpha).astype(np.float32)
    bn = [rng.uniform(0.5, 1.5, cout), rng.standard_normal(cout), rng.standard_normal(cout), rng.uniform(0.5, 2, cout)]
    inits = [numpy_helper.from_array(w, "w")] + [numpy_helper.from_array(v.astype(np.float32), n)
                                                for v, n in zip(bn, ("gamma", "beta", "mean", "var"))]
    nodes = []
    conv_in = "input"
    if kind != "float":
        nodes.append(helper.make_node("Sign", ["input"], ["a"]))
        conv_in = "a"
    nodes.append(helper.make_node("Conv", [conv_in, "w"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                                  strides=[stride, stride]))
    nodes.append(helper.make_node("BatchNormalization", ["y", "gamma", "beta", "mean", "var"], ["output"]))
    osz = (side - 1) // stride + 1
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, cin, side, side])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, cout, osz, osz])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


@dataclass
class Model:
    """One compiled model to count: its library, inputs and (optionally) expected output."""

    tag: int
    label: str
    compiled: object  # sparks_tvm.CompiledModel
    inputs: list
    expected: np.ndarray | None = field(default=None, repr=False)
    atol: float = 0.0


def symbols(lib: Path) -> list:
    """``[name, offset, size]`` of the library's code symbols, each extended to the next one.

    LLVM emits a kernel's parallel bodies as unnamed functions right after it: extending each
    symbol to the next start attributes them to their kernel.
    """
    out = subprocess.run(["aarch64-linux-gnu-nm", "-S", "--defined-only", str(lib)], capture_output=True,
                         text=True, check=True).stdout
    starts = sorted({(int(p[0], 16), p[3]) for p in (line.split() for line in out.splitlines())
                     if len(p) == 4 and p[2] in "tT" and int(p[1], 16) > 0})
    end = 1 << 40  # the last kernel's parallel bodies run to the end of the code
    return [[name, off, (starts[i + 1][0] if i + 1 < len(starts) else end) - off]
            for i, (off, name) in enumerate(starts)]


def kernel_name(symbol: str) -> str:
    """The TVM function a code symbol belongs to (parallel bodies are named after their kernel)."""
    for suffix in ("_compute_", "_compute"):
        if suffix in symbol:
            return symbol.split(suffix)[0]
    return symbol


def count_models(models: list, workdir=None, timeout: float = 3600.0) -> dict:
    """Count each model on the emulated Pi: ``{tag: (total, {kernel: count})}``; checks outputs."""
    pi = emulated_pi.require()
    tmp = tempfile.TemporaryDirectory(prefix="icount_models_") if workdir is None else None
    base = Path(workdir or tmp.name)
    base.mkdir(parents=True, exist_ok=True)
    try:
        manifest = {"kernels": []}
        syms = {}
        for m in models:
            lib = base / f"m{m.tag}.so"
            m.compiled.export_library(str(lib))
            syms[m.tag] = symbols(lib)
            names = []
            for i, arr in enumerate(m.inputs):
                names.append(f"m{m.tag}_{i}.npy")
                np.save(base / names[-1], arr)
            manifest["kernels"].append({"tag": m.tag, "library": lib.name, "vm": True, "args": names,
                                        "symbols": syms[m.tag], "calls": 1, "warmup": 1})
        raw = emulated_pi.run_manifest(pi, base, manifest, env={"TVM_USE_RUNTIME_LIB": "1"}, timeout=timeout)
        result = {}
        for m in models:
            per = {}
            for i, (name, _, _) in enumerate(syms[m.tag]):
                c = raw.get((m.tag + 1) * 100000 + i, 0)
                if c:
                    key = kernel_name(name)
                    per[key] = per.get(key, 0) + c
            result[m.tag] = (raw[m.tag], per)
            if m.expected is not None:
                got = np.load(base / f"out_{m.tag}.npy")
                err = float(np.abs(got - m.expected).max())
                scale = max(1.0, float(np.abs(m.expected).max()))
                if err > m.atol * scale:
                    raise AssertionError(f"{m.label} (tag {m.tag}): output differs from the reference by {err}")
        return result
    finally:
        if tmp is not None:
            tmp.cleanup()
