"""Target aliases: what a user types -> a ``tvm.target.Target``."""

from __future__ import annotations

import json
import logging
import os
import platform
import sys

import tvm
from tvm.target import codegen

from .errors import SparksError

logger = logging.getLogger("sparks_tvm")


def host_cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


#: The environment variable TVM's CPU thread pool reads when it starts.
THREADS_ENV = "TVM_NUM_THREADS"


def host_threads() -> tuple:
    """How many CPU threads kernels compiled for this machine will run on, and why.

    ``TVM_NUM_THREADS`` sizes TVM's thread pool, so the kernels' parallel split
    (``num-cores``) must match it: a model split for 16 cores but run on one thread does
    16 chunks in a row, each with its own loop and cache overheads. ``import sparks_tvm``
    sets the variable to the usable cores when it is unset; that default is reported as
    ``"host cores"``, a value set by the user as ``"TVM_NUM_THREADS"``.

    Returns
    -------
    count : int
        Threads (at least 1).
    source : str
        ``"TVM_NUM_THREADS"`` or ``"host cores"``.

    Raises
    ------
    SparksError
        ``TVM_NUM_THREADS`` is set but is not a positive integer.
    """
    raw = os.environ.get(THREADS_ENV)
    package = sys.modules.get(__package__)
    if raw is None or raw == getattr(package, "_DEFAULT_TVM_NUM_THREADS", None):
        return host_cpu_count(), "host cores"
    try:
        count = int(raw.strip())
    except ValueError:
        count = 0
    if count < 1:
        raise SparksError(
            f"{THREADS_ENV}={raw!r} is not a positive integer: it is the number of CPU threads TVM runs the "
            f"kernels on, and compile splits the kernels' work for it; unset it (all {host_cpu_count()} usable "
            f"cores) or set e.g. {THREADS_ENV}=1"
        )
    return count, THREADS_ENV


#: The aliases that mean this machine's CPU (their ``num-cores`` is :func:`host_threads`).
HOST_ALIASES = ("llvm", "host", "cpu")


def runs_here(target: tvm.target.Target) -> bool:
    """True for an LLVM target whose code this machine runs in-process (no other triple)."""
    if target.kind.name != "llvm":
        return False
    triple = str(target.attrs.get("mtriple", ""))
    return not triple or triple.split("-")[0] == platform.machine() or (
        triple.startswith(("aarch64", "arm64")) and platform.machine() in ("aarch64", "arm64"))


def host_target(cores: int | None = None) -> tvm.target.Target:
    """This machine's CPU, with its real vector and popcount instructions.

    TVM's bare ``"llvm"`` is a generic x86-64 with neither; ``mcpu`` comes from LLVM's
    host detection instead.

    Parameters
    ----------
    cores : int, optional
        ``num-cores``, the thread count the kernels split their work for (default:
        :func:`host_threads`, i.e. ``TVM_NUM_THREADS`` when set, else the usable cores).
    """
    if cores is None:
        cores, _ = host_threads()
    return tvm.target.Target(
        {"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": int(cores)}
    )


ALIASES = {name: host_target for name in HOST_ALIASES}


def _aarch64(mcpu: str, cores: int = 4, model: str | None = None, mattr=("+neon",)):
    """An aarch64 Linux CPU target (Raspberry Pi class boards run 64-bit Raspberry Pi OS)."""

    def make() -> tvm.target.Target:
        spec = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": mcpu, "mattr": list(mattr),
                "num-cores": cores, "keys": ["arm_cpu", "cpu"]}
        if model:
            spec["model"] = model
        return tvm.target.Target(spec)

    return make


# ARM boards. ``arm_cpu`` is a TVM strategy key, not a target: ours means a Raspberry Pi 4
# (Cortex-A72, 4 cores, NEON), the most common board. The Pi 5's Cortex-A76 also has dotprod,
# which LLVM enables from ``mcpu``.
ARM_ALIASES = {
    "arm_cpu": _aarch64("cortex-a72", model="bcm2711"),
    "rpi4": _aarch64("cortex-a72", model="bcm2711"),
    "raspberry-pi-4": _aarch64("cortex-a72", model="bcm2711"),
    "rpi3": _aarch64("cortex-a53", model="bcm2837"),
    "raspberry-pi-3": _aarch64("cortex-a53", model="bcm2837"),
    "rpi5": _aarch64("cortex-a76", model="bcm2712"),
    "raspberry-pi-5": _aarch64("cortex-a76", model="bcm2712"),
    "cortex-a76": _aarch64("cortex-a76"),
    "aarch64": _aarch64("generic"),
}
ALIASES.update(ARM_ALIASES)


def with_gpu_host(target: tvm.target.Target) -> tvm.target.Target:
    """A CUDA target without a host gets a generic x86-64 one.

    The host side of a CUDA module is only kernel-launch glue, so nothing is lost by not
    tuning it for this CPU, and the exported library then loads on the GPU machine whatever
    its CPU (a -mcpu=znver4 host would not). Jetson tags keep their aarch64 host.
    """
    if target.kind.name == "cuda" and target.host is None:
        return tvm.target.Target(target, host=tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu"}))
    return target


def cuda_target() -> tvm.target.Target:
    """The local GPU's architecture when one is present, else sm_80 (A100-class); generic x86-64 host."""
    arch = "sm_80"
    try:
        dev = tvm.cuda(0)
        if dev.exist:
            arch = "sm_" + str(dev.compute_version).replace(".", "")
    except Exception:  # noqa: BLE001 - no CUDA runtime at all
        pass
    return with_gpu_host(tvm.target.Target({"kind": "cuda", "arch": arch}))


ALIASES["cuda"] = cuda_target
ALIASES["gpu"] = cuda_target


def is_aarch64(target: tvm.target.Target) -> bool:
    """True for an LLVM target that generates 64-bit ARM code."""
    return target.kind.name == "llvm" and str(target.attrs.get("mtriple", "")).startswith(("aarch64", "arm64"))


def is_arm(target: tvm.target.Target) -> bool:
    """True for an LLVM target that generates ARM code (aarch64 or 32-bit ARM)."""
    triple = str(target.attrs.get("mtriple", "")) if target.kind.name == "llvm" else ""
    return triple.startswith(("aarch64", "arm64", "arm", "thumb"))


def resolve_target(target) -> tvm.target.Target:
    """Resolve an alias (``"llvm"``/``"host"``), a TVM tag, a dict or a Target."""
    if isinstance(target, tvm.target.Target):
        return target
    if isinstance(target, dict):
        resolved = with_gpu_host(tvm.target.Target(target))
        logger.info("target %r resolved to %s", target, target_json(resolved))
        return resolved
    if isinstance(target, str):
        if target in ALIASES:
            resolved = ALIASES[target]()
            # Always say what an alias became: "arm_cpu" or "llvm" hide a CPU model and core count.
            logger.info("target %r resolved to %s", target, target_json(resolved))
            return resolved
        try:
            resolved = with_gpu_host(tvm.target.Target(target))
            logger.info("target %r resolved to %s", target, target_json(resolved))  # a tag: same rule
            return resolved
        except Exception as err:  # TVM raises several error types for bad targets
            raise SparksError(
                f"unknown target {target!r}: use one of {sorted(ALIASES)}, a TVM tag, or a target dict "
                f"such as {{'kind': 'llvm', 'mcpu': 'cortex-a72'}} ({err.__class__.__name__})"
            ) from None
    raise SparksError(f"target must be a str, dict or tvm.target.Target, got {type(target).__name__}")


def with_cores(target: tvm.target.Target, cores: int) -> tvm.target.Target:
    """``target`` with ``num-cores`` set: the thread count its kernels are scheduled and tuned for."""
    return tvm.target.Target(dict(target.export(), **{"num-cores": int(cores)}))


def target_json(target: tvm.target.Target) -> str:
    return json.dumps(dict(target.export()), default=_jsonable, sort_keys=True)


def _jsonable(value):
    # TVM arrays (keys, mattr) and maps (host) become JSON lists/objects, not their repr.
    if hasattr(value, "items"):
        return dict(value.items())
    if hasattr(value, "__iter__") and not isinstance(value, (str, bytes)):
        return list(value)
    return str(value)
