"""Builders and runners of a tuning run: build in this process; measure locally or over RPC.

- :func:`in_process_builder`: MetaSchedule's ``LocalBuilder`` starts fresh worker processes
  for every batch, each importing ``tvm.s_tir.tensor_intrin`` (35-80 s on a 2-core machine,
  more than its own 30 s time-out); this one compiles in the tuning process (no worker
  start-up, no tensor intrinsics: the binary kernels use none).
- :func:`default_runner`: ``LocalRunner`` on this machine's CPU or GPU.
- :func:`rpc_runner`: a device behind an RPC tracker (a Raspberry Pi; the emulated Pi of
  ``scripts/emulated_pi`` registers the same way).
- ``"emulated-pi"`` (:func:`runner_by_name`): not a MetaSchedule runner; ARM targets' NEON
  plans counted in instructions on the emulated Pi (:mod:`.arm`, :mod:`.emulated_pi`).
"""

from __future__ import annotations

import os
import platform
import tempfile
import time

import tvm
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
from tvm.support import cc
from tvm.tirx import build as tvm_build

from ..errors import TuningError
from ..target import is_aarch64


def _on_arm_host() -> bool:
    return platform.machine() in ("aarch64", "arm64")


@derived_object
class InProcessBuilder(PyBuilder):
    """Builds candidates in the tuning process: no worker start-up per batch.

    ``f_export(rt_mod, path)`` writes the library (default: a shared object linked by the
    host compiler; for an aarch64 target, by ``aarch64-linux-gnu-gcc``, since the
    device of an RPC runner may have no compiler).
    """

    def __init__(self, f_export=None):
        super().__init__()
        self.f_export = f_export
        self.seconds = 0.0
        self.count = 0

    def build(self, build_inputs):
        results = []
        t0 = time.perf_counter()
        for item in build_inputs:
            try:
                rt_mod = tvm_build(item.mod, target=item.target)
                path = os.path.join(tempfile.mkdtemp(prefix="sparks_tune_"), "candidate.so")
                if self.f_export is not None:
                    self.f_export(rt_mod, path)
                else:
                    export_for_target(rt_mod, path, item.target)
                results.append(BuilderResult(path, None))
            except Exception as err:  # a candidate that fails to build is a failed trial, not a crash
                results.append(BuilderResult(None, f"{err.__class__.__name__}: {err}"))
        self.seconds += time.perf_counter() - t0
        self.count += len(build_inputs)
        return results


def export_for_target(rt_mod, path, target):
    """Write ``rt_mod`` as a shared library, cross-linked for an aarch64 target on another host."""
    kwargs = {}
    if is_aarch64(target) and not _on_arm_host():
        kwargs["fcompile"] = cc.cross_compiler("aarch64-linux-gnu-gcc")
    rt_mod.export_library(path, **kwargs)


def in_process_builder(f_export=None):
    """A MetaSchedule builder that compiles candidates in this process (see module doc)."""
    return InProcessBuilder(f_export)


def default_runner(target, timeout_sec: float = 30.0):
    """The runner used when none is given: ``LocalRunner`` for a target this machine runs.

    Timing: one warm-up, then 3 repeats of at least 50 ms each; the tuner keeps the mean.
    A cross-compiled target (aarch64 from x86) needs an RPC runner: that is an error here.
    """
    if target.kind.name == "cuda":
        if not tvm.cuda(0).exist:
            raise TuningError("tuning a CUDA target measures on a GPU: none is visible here (run the tune on a GPU "
                              "machine, or pass an RPC runner whose devices have one)")
        return ms.runner.LocalRunner(
            timeout_sec=timeout_sec,
            evaluator_config=ms.runner.EvaluatorConfig(number=3, repeat=3, min_repeat_ms=20),
        )
    if target.kind.name != "llvm" or (is_aarch64(target) and not _on_arm_host()):
        raise TuningError(
            f"target {target.kind.name} {target.attrs.get('mtriple', '')} does not run on this machine: pass "
            "runner=sparks_tvm.tune.rpc_runner(tracker_host, tracker_port, key) (CLI: --rpc-tracker host:port "
            "--rpc-key KEY) to measure on the device, or for an ARM target runner='emulated-pi' (CLI: --runner "
            "emulated-pi) to count instructions on the emulated Pi"
        )
    return ms.runner.LocalRunner(
        timeout_sec=timeout_sec,
        evaluator_config=ms.runner.EvaluatorConfig(number=1, repeat=3, min_repeat_ms=50),
    )


#: Runner names :func:`sparks_tvm.tune` takes as ``runner=`` (CLI ``--runner``).
RUNNER_NAMES = ("local", "rpc", "emulated-pi")


def runner_by_name(runner):
    """``runner`` unless it is a name: ``"local"`` -> None (the default), ``"emulated-pi"`` kept.

    Raises :class:`TuningError` for an unknown name, and for ``"rpc"`` (it needs a tracker:
    :func:`rpc_runner`).
    """
    if not isinstance(runner, str):
        return runner
    if runner not in RUNNER_NAMES:
        raise TuningError(f"unknown runner {runner!r}: expected one of {', '.join(RUNNER_NAMES)} (or a MetaSchedule "
                          "Runner object)")
    if runner == "rpc":
        raise TuningError("runner 'rpc' needs the device's tracker: pass runner=sparks_tvm.tune.rpc_runner(host:port, "
                          "key) (CLI: --runner rpc --rpc-tracker HOST:PORT --rpc-key KEY)")
    return None if runner == "local" else runner


def rpc_runner(tracker: str, key: str, timeout_sec: float = 60.0):
    """A MetaSchedule ``RPCRunner`` measuring on devices registered at ``tracker`` (``host:port``) under ``key``."""
    host, sep, port = tracker.rpartition(":")
    if not sep or not port.isdigit():
        raise TuningError(f"bad RPC tracker {tracker!r}: expected host:port")
    return ms.runner.RPCRunner(
        ms.runner.RPCConfig(tracker_host=host, tracker_port=int(port), tracker_key=key, session_timeout_sec=timeout_sec),
        evaluator_config=ms.runner.EvaluatorConfig(number=1, repeat=3, min_repeat_ms=50),
        max_workers=1,
    )

