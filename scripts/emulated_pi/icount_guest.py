"""Runs ON the emulated Pi (aarch64 python under qemu with the icount plugin): count kernels.

    QEMU_PLUGIN=<cache>/plugin/libicount.so,out=counts.txt pi-python icount_guest.py manifest.json

``manifest.json``::

    {"kernels": [{"tag": 0, "library": "k0.so", "function": "main",
                  "args": ["x.npy", "codes.npy", ...], "output": {"shape": [...], "dtype": "int32"},
                  "calls": 1, "warmup": 1}, ...]}

An entry with ``"vm": true`` is a whole compiled model (``sparks_tvm.compile(...).export_library``):
it runs through a Relax ``VirtualMachine`` (``args`` are the model's inputs, ``output`` is
ignored) and, with ``"symbols": [[name, offset, size], ...]`` (from the host's ``nm``), the
count is also written per symbol as ``<tag>:<name> <count>`` lines.

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


def load_base(path):
    """Address at which ``path`` is mapped (its offset-0 mapping): symbol offsets are relative to it."""
    real = os.path.realpath(path)
    with open("/proc/self/maps") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) >= 6 and parts[5] == real and int(parts[2], 16) == 0:
                return int(parts[0].split("-")[0], 16)
    raise RuntimeError(f"{real} is not mapped")


def _vm_call(lib, args, dev):
    from tvm.runtime.vm import VirtualMachine  # the runtime VM: no compiler on the device

    vm = VirtualMachine(lib, dev)
    main = vm["main"]
    return lambda: main(*args)


def main(manifest_path):
    with open(manifest_path) as fh:
        manifest = json.load(fh)
    base = os.path.dirname(os.path.abspath(manifest_path))
    dev = tvm.cpu()
    for spec in manifest["kernels"]:
        lib_path = os.path.join(base, spec["library"])
        lib = tvm.runtime.load_module(lib_path)
        args = [tvm.runtime.tensor(np.load(os.path.join(base, a)), dev) for a in spec["args"]]
        if spec.get("vm"):
            call = _vm_call(lib, args, dev)
            out = None
        else:
            func = lib[spec.get("function", "main")]
            out = tvm.runtime.tensor(np.zeros(spec["output"]["shape"], spec["output"]["dtype"]), dev)
            call = lambda: func(*args, out)  # noqa: E731
        for _ in range(spec.get("warmup", 1)):
            result = call()
        lo, hi = code_range(lib_path)
        _plugin(1)
        for _ in range(spec.get("calls", 1)):
            result = call()
        _plugin(2, lo, hi, int(spec["tag"]))
        if spec.get("symbols"):
            lib_base = load_base(lib_path)
            with open(os.path.join(base, f"symbols_{spec['tag']}.txt"), "w") as fh:
                for name, offset, size in spec["symbols"]:
                    fh.write(f"{name} {lib_base + offset} {lib_base + offset + size}\n")
            for i, (_name, offset, size) in enumerate(spec["symbols"]):
                # (tag + 1) * 100000 + i: the host maps these back to symbol names.
                _plugin(2, lib_base + offset, lib_base + offset + size, (int(spec["tag"]) + 1) * 100000 + i)
        if out is not None:
            np.save(os.path.join(base, f"out_{spec['tag']}.npy"), out.numpy())
        elif spec.get("save_output", True):
            first = result if hasattr(result, "numpy") else result[0]  # one tensor or a tuple
            np.save(os.path.join(base, f"out_{spec['tag']}.npy"), first.numpy())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
