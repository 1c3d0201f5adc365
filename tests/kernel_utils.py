"""Build and run the binary kernels in isolation, against the numpy references."""

import re

import numpy as np
import tvm

from schedules.host import HostSchedules
from sparks_tvm import reference as ref
from sparks_tvm.kernels import binary_conv2d_primfunc, pack_binary_weights, pack_indices, sparks_conv2d_primfunc, sparks_out_shape
from sparks_tvm.models import random_codebook


def random_activations(rng, shape, zero_frac=0.2):
    x = rng.standard_normal(shape).astype(np.float32)
    x[rng.random(shape) < zero_frac] = 0.0  # exact zeros: Sign(0) = 0 must be honoured
    return x


def random_layer(rng, geom, k):
    codebook = random_codebook(rng, k).astype(np.int8)
    idx = rng.integers(0, k, size=(geom.out_channels, geom.in_channels)).astype(np.int32)
    return codebook, idx


def build(func, target):
    return tvm.compile(func.with_attr("global_symbol", "main"), target=target).jit()


def run_sparks(target, geom, x, codebook, idx, mode, scheduled=True):
    k = codebook.shape[0]
    func = (HostSchedules.for_target(target).schedule_sparks_conv2d(geom, k, mode) if scheduled
            else sparks_conv2d_primfunc(geom, k, mode))
    lib = build(func, target)
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros(sparks_out_shape(geom), np.int32), dev)
    lib["main"](tvm.runtime.tensor(x, dev), tvm.runtime.tensor(ref.codes_to_bits(codebook), dev),
                tvm.runtime.tensor(pack_indices(idx, k), dev), out)
    return out.numpy().reshape(geom.out_shape)


def run_binary(target, geom, x, signs, mode, scheduled=True):
    func = HostSchedules.for_target(target).schedule_binary_conv2d(geom, mode) if scheduled else binary_conv2d_primfunc(geom, mode)
    lib = build(func, target)
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros(geom.out_shape, np.int32), dev)
    lib["main"](tvm.runtime.tensor(x, dev), tvm.runtime.tensor(pack_binary_weights(signs), dev), out)
    return out.numpy()


def kernel_bodies(src: str, prefix: str) -> dict:
    """name -> body text of each __global__ kernel whose name starts with ``prefix``."""
    starts = [(m.group(1), m.start()) for m in re.finditer(r"__global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(", src)]
    bodies = {}
    for i, (name, pos) in enumerate(starts):
        end = starts[i + 1][1] if i + 1 < len(starts) else len(src)
        if name.startswith(prefix):
            bodies[name] = src[pos:end]
    return bodies


def run_on_host(func, args, out_shape, dtype="int32"):
    """Build ``func`` (inputs ``args``, then one output) for the host and return its output."""
    lib = build(func, "llvm")
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros(out_shape, dtype), dev)
    lib["main"](*[tvm.runtime.tensor(a, dev) for a in args], out)
    return out.numpy()


def relax_ops(mod):
    """Names of the Relax operators ``mod["main"]`` calls, in post order (graph-pass tests)."""
    from tvm import relax

    names = []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op):
            names.append(e.op.name)

    relax.analysis.post_order_visit(mod["main"], visit)
    return names
