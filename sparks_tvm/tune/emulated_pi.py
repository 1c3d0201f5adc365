"""Exact aarch64 instruction counts of single kernels on the emulated Raspberry Pi 4.

The cost of the ARM tuning runner (``--runner emulated-pi``): each kernel is compiled for the
ARM target here, cross-linked, and called on the emulated Pi (qemu-user aarch64 with the
instruction-counting TCG plugin, ``scripts/emulated_pi``), one thread, after one warm-up
call. The count is every instruction executed inside the kernel's library: exact and
repeatable, so one measurement per candidate is enough. Outputs come back and are compared
with a reference, bit for bit.

Many kernels go into one emulator launch (a manifest, ``scripts/emulated_pi/icount_guest.py``):
starting the emulated Python and importing TVM under qemu costs more than most kernels.

``benchmarks/bench_arm_icount.py`` and the tests count through :func:`count` too.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import TuningError

#: ``scripts/emulated_pi`` of the source tree (the emulated Pi is a development tool, not
#: part of the installed package).
SCRIPTS = Path(__file__).resolve().parents[2] / "scripts" / "emulated_pi"
GUEST = SCRIPTS / "icount_guest.py"
SETUP_HINT = "run scripts/emulated_pi/setup.sh (needs apt or a prepared cache; see its header)"


@dataclass
class Kernel:
    """One kernel to count: a PrimFunc, its input arrays and its output's shape/dtype.

    ``expected`` (optional) is the exact output; ``calls`` calls are counted together.
    """

    tag: int
    label: str
    func: object
    args: list
    out_shape: tuple
    out_dtype: str = "int32"
    calls: int = 1
    expected: np.ndarray | None = field(default=None, repr=False)


def pi_module():
    """``scripts/emulated_pi/pi.py`` as a module (:class:`TuningError` if the tree lacks it)."""
    path = SCRIPTS / "pi.py"
    if not path.exists():
        raise TuningError(f"the emulated Pi runner needs the source tree's scripts/emulated_pi ({path} is missing): "
                          "run from a checkout of sparks_tvm")
    spec = importlib.util.spec_from_file_location("sparks_emulated_pi", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def require(timeout: float = 600.0):
    """Provision (or find the cached) emulated Pi; :class:`TuningError` saying what to run if impossible."""
    pi = pi_module()
    try:
        pi.setup(timeout=timeout)
    except pi.PiError as err:  # ProvisionError included
        raise TuningError(f"the emulated Pi is not set up ({str(err).strip().splitlines()[-1][:300]}): "
                          f"{SETUP_HINT}") from None
    return pi


def export(func, target, path) -> None:
    """Compile a PrimFunc for the ARM target and cross-link it into a shared library."""
    import tvm
    from tvm.support import cc

    ex = tvm.compile(func.with_attr("global_symbol", "main"), target=target)
    ex.export_library(str(path), fcompile=cc.cross_compiler("aarch64-linux-gnu-gcc"))


@dataclass
class Counted:
    """One kernel's result: its instruction count and whether its output was exact."""

    count: int
    exact: bool | None  # None: no reference given
    mismatches: int = 0


def run_manifest(pi, base: Path, manifest: dict, env: dict | None = None, timeout: float = 1800.0) -> dict:
    """Run one manifest on the emulated Pi under the counting plugin: ``{tag: instructions}``.

    Parameters
    ----------
    pi
        The emulated Pi module (:func:`require`).
    base : Path
        The folder holding the manifest's libraries and arrays; outputs are written there.
    manifest : dict
        ``{"kernels": [...]}`` as ``scripts/emulated_pi/icount_guest.py`` reads it.
    env : dict, optional
        Extra environment for the guest.
    timeout : float
        Seconds before the launch is abandoned.

    Raises
    ------
    RuntimeError
        The launch failed (a kernel crashed, or the emulator did).
    """
    (base / "manifest.json").write_text(json.dumps(manifest, indent=1))
    counts_file = base / "counts.txt"
    counts_file.unlink(missing_ok=True)
    # One thread: the plugin's counters are plain adds, and the count is the work, not the split.
    env = {**os.environ, **(env or {}), "QEMU_PLUGIN": f"{pi.plugin_path()},out={counts_file}",
           "TVM_NUM_THREADS": "1"}
    proc = subprocess.run([str(pi.python_launcher()), str(GUEST), str(base / "manifest.json")], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"counting on the emulated Pi failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    raw = {}
    for line in counts_file.read_text().split("\n"):
        if line.strip():
            tag, value = line.split()
            raw[int(tag)] = int(value)
    return raw


def count_checked(kernels: list, target, workdir=None, timeout: float = 1800.0) -> dict:
    """Count each kernel on the emulated Pi in one launch: ``{tag: Counted}`` (outputs compared).

    Raises
    ------
    TuningError
        The emulated Pi is not set up.
    RuntimeError
        The launch failed (a kernel crashed, or the emulator did): no count for any kernel.
    """
    pi = require()
    tmp = tempfile.TemporaryDirectory(prefix="icount_") if workdir is None else None
    base = Path(workdir or tmp.name)
    base.mkdir(parents=True, exist_ok=True)
    try:
        manifest = {"kernels": []}
        for kern in kernels:
            lib = f"k{kern.tag}.so"
            export(kern.func, target, base / lib)
            names = []
            for i, arr in enumerate(kern.args):
                names.append(f"a{kern.tag}_{i}.npy")
                np.save(base / names[-1], arr)
            manifest["kernels"].append({"tag": kern.tag, "library": lib, "function": "main", "args": names,
                                        "output": {"shape": list(kern.out_shape), "dtype": kern.out_dtype},
                                        "calls": kern.calls, "warmup": 1})
        raw = run_manifest(pi, base, manifest, timeout=timeout)
        missing = [k.tag for k in kernels if k.tag not in raw]
        if missing:
            raise RuntimeError(f"no count for kernel tags {missing}")
        out = {}
        for kern in kernels:
            exact, bad = None, 0
            if kern.expected is not None:
                got = np.load(base / f"out_{kern.tag}.npy")
                exact = got.shape == kern.expected.shape and bool(np.array_equal(got, kern.expected))
                bad = 0 if exact else int((got != kern.expected).sum()) if got.shape == kern.expected.shape else got.size
            out[kern.tag] = Counted(raw[kern.tag], exact, bad)
        return out
    finally:
        if tmp is not None:
            tmp.cleanup()


def count(kernels: list, target, workdir=None, timeout: float = 1800.0) -> dict:
    """``{tag: instructions}``; :class:`AssertionError` if a kernel's output differs from ``expected``."""
    counted = count_checked(kernels, target, workdir, timeout)
    for kern in kernels:
        if counted[kern.tag].exact is False:
            raise AssertionError(f"{kern.label} (tag {kern.tag}): {counted[kern.tag].mismatches} outputs differ "
                                 "from the reference")
    return {tag: c.count for tag, c in counted.items()}
