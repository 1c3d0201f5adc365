"""Runs ON the emulated Pi (aarch64 python under qemu with the icount plugin): count kernels.

    QEMU_PLUGIN=<cache>/plugin/libicount.so,out=counts.txt pi-python icount_guest.py manifest.json

``manifest.json``::

    {"kernels": [{"tag": 0, "library": "k0.so", "function": "main",
                  "args": ["x.npy", "codes.npy", ...], "output": {"shape": [...], "dtype": "int32"},
                  "calls": 1, "warmup": 1}, ...]}

For each kernel: load the library, call it ``warmup`` times (first-call work: thread pool,
workspace allocation), zero the plugin's counters, call it ``calls`` times, then ask the
plugin to write the count of instructions executed inside the library's code segment
(its ``r-xp`` mappings in /proc/self/maps) as the line ``<tag> <count>``. The output of the
last call is saved next to the manifest as ``out_<tag>.npy`` so the host can check it.
Run single-threaded (TVM_NUM_THREADS=1): the plugin's counters are plain, not atomic, adds.
"""

import ctypes
import json
import os
import sys

import numpy as np
import tvm

ICOUNT_SYSCALL = 0x5BA4
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _plugin(*args):
    _libc.syscall(ctypes.c_long(ICOUNT_SYSCALL), *[ctypes.c_long(a) for a in args])


def code_range(path):
    """[lo, hi) of the executable mappings of ``path`` in this process."""
    real = os.path.realpath(path)
    lo, hi = None, None
    with open("/proc/self/maps") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) >= 6 and parts[5] == real and "x" in parts[1]:
                a, b = (int(v, 16) for v in parts[0].split("-"))
                lo = a if lo is None else min(lo, a)
                hi = b if hi is None else max(hi, b)
    if lo is None:
        raise RuntimeError(f"{real} has no executable mapping in /proc/self/maps")
    return lo, hi


def main(manifest_path):
    with open(manifest_path) as fh:
        manifest = json.load(fh)
    base = os.path.dirname(os.path.abspath(manifest_path))
    dev = tvm.cpu()
    for spec in manifest["kernels"]:
        lib_path = os.path.join(base, spec["library"])
        lib = tvm.runtime.load_module(lib_path)
        func = lib[spec.get("function", "main")]
        args = [tvm.runtime.tensor(np.load(os.path.join(base, a)), dev) for a in spec["args"]]
        out = tvm.runtime.tensor(np.zeros(spec["output"]["shape"], spec["output"]["dtype"]), dev)
        for _ in range(spec.get("warmup", 1)):
            func(*args, out)
        lo, hi = code_range(lib_path)
        _plugin(1)
        for _ in range(spec.get("calls", 1)):
            func(*args, out)
        _plugin(2, lo, hi, int(spec["tag"]))
        np.save(os.path.join(base, f"out_{spec['tag']}.npy"), out.numpy())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
