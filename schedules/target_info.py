"""What the schedules need to know about a target, read once: :class:`TargetInfo`.

Every schedule rule (:mod:`schedules.host`, :mod:`schedules.arm`, :mod:`schedules.cuda`,
:mod:`schedules.cuda_binary`) and the tuning spaces (:mod:`schedules.tuning`) take their
machine facts from here instead of reading target attributes or keeping constants of their own.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm.target import codegen

#: Streaming multiprocessors assumed when no GPU is visible: the NVIDIA H100/H200 (132 SMs)
#: on which the CUDA knobs were measured.
DEFAULT_SM_COUNT = 132
#: Static shared memory per thread block (bytes): CUDA's limit without opt-in.
CUDA_STATIC_SHARED_BYTES = 48 * 1024
#: CUDA's limit on gridDim.y (and gridDim.z).
CUDA_GRID_Y_LIMIT = 65535


def vector_bytes_of(target) -> int:
    """Width of the target's widest integer vector register, in bytes."""
    if target is None:
        return 16
    try:
        if codegen.target_has_features("avx512bw", target):
            return 64
        if codegen.target_has_features("avx2", target):
            return 32
    except Exception:  # noqa: BLE001 - non-x86 LLVM targets have no such features
        pass
    return 16


def _has(feature: str, target) -> bool:
    try:
        return bool(codegen.target_has_features(feature, target))
    except Exception:  # noqa: BLE001 - the feature does not exist on this architecture
        return False


def _is_arm(target) -> bool:
    return str(target.attrs.get("mtriple", "")).startswith(("aarch64", "arm64", "arm", "thumb"))


@dataclass(frozen=True)
class TargetInfo:
    """Machine facts of one target.

    Attributes
    ----------
    kind : str
        ``"llvm"`` or ``"cuda"`` (TVM's target kind).
    family : str
        ``"host"`` (x86 or any other LLVM CPU), ``"arm"`` or ``"cuda"``: the schedules module.
    cores : int or None
        CPU threads from the target's ``num-cores`` (None: the target does not say).
    vector_bytes : int
        Widest integer vector register (64 AVX-512, 32 AVX2, 16 SSE/NEON; 4 on CUDA: a word).
    popcount : str
        The popcount instruction the kernels' ``tirx.popcount`` becomes: ``vpopcnt`` (AVX-512
        BITALG/VPOPCNTDQ), ``pshufb`` (an AVX2/SSSE3 table lookup), ``cnt`` (NEON), ``__popc``
        (CUDA) or ``scalar``.
    table_lookup : bool
        A byte shuffle usable as a 16-entry table lookup (``pshufb``, NEON ``tbl``).
    shared_bytes : int
        Static shared memory per thread block (CUDA; 0 on CPUs).
    max_threads : int
        Threads per block (CUDA; 1 on CPUs).
    sm_count : int
        Streaming multiprocessors: the visible GPU's when it is the target's architecture, else
        :data:`DEFAULT_SM_COUNT` (TVM's CUDA targets have no SM-count attribute; 0 on CPUs).
    arch : int
        CUDA compute capability from the target's ``arch`` (``sm_90a`` -> 90; 0 elsewhere).
    binary_mma : bool
        The target has binary tensor cores with ``mma.sync ... .b1 ... .xor.popc`` at the
        m16n8k128/k256 shapes the MMA kernels use (sm_80 and later).
    sm_source, shared_source : str
        Where ``sm_count`` / ``shared_bytes`` came from: ``"device"``, ``"target"`` or
        ``"default"`` (reports and tests say which).
    """

    kind: str
    family: str
    cores: int | None = None
    vector_bytes: int = 16
    popcount: str = "scalar"
    table_lookup: bool = False
    shared_bytes: int = 0
    max_threads: int = 1
    sm_count: int = 0
    arch: int = 0
    binary_mma: bool = False
    sm_source: str = "default"
    shared_source: str = "default"

    @classmethod
    def from_target(cls, target) -> "TargetInfo":
        kind = target.kind.name
        if kind == "cuda":
            return cls._cuda(target)
        if kind != "llvm":
            return cls(kind=kind, family=kind)
        cores = int(target.attrs["num-cores"]) if "num-cores" in target.attrs else None
        if _is_arm(target):
            return cls(kind=kind, family="arm", cores=cores, vector_bytes=16, popcount="cnt", table_lookup=True)
        vb = vector_bytes_of(target)
        if _has("avx512bitalg", target) or _has("avx512vpopcntdq", target):
            popcount = "vpopcnt"
        elif _has("ssse3", target):
            popcount = "pshufb"
        else:
            popcount = "scalar"
        return cls(kind=kind, family="host", cores=cores, vector_bytes=vb, popcount=popcount,
                   table_lookup=_has("ssse3", target))

    @classmethod
    def _cuda(cls, target) -> "TargetInfo":
        threads = int(target.attrs.get("max_num_threads", 1024))
        arch = arch_number(target)
        shared, shared_source = CUDA_STATIC_SHARED_BYTES, "default"
        if "max_shared_memory_per_block" in target.attrs:
            shared, shared_source = int(target.attrs["max_shared_memory_per_block"]), "target"
        sms, sm_source = DEFAULT_SM_COUNT, "default"
        dev = tvm.cuda(0)
        # The GPU this process will run on (or measure on, when tuning) -- unless it is another
        # architecture than the target's, as when compiling for a board on a workstation.
        if dev.exist and (not arch or _device_arch(dev) == arch):
            sms, sm_source = int(dev.multi_processor_count), "device"
            shared, shared_source = int(dev.max_shared_memory_per_block), "device"
        return cls(kind="cuda", family="cuda", vector_bytes=4, popcount="__popc", table_lookup=False,
                   shared_bytes=shared, max_threads=threads, sm_count=sms, arch=arch, binary_mma=arch >= 80,
                   sm_source=sm_source, shared_source=shared_source)


def arch_number(target) -> int:
    """Compute capability of a CUDA target's ``arch`` attribute (``"sm_90a"`` -> 90), 0 if absent."""
    digits = "".join(ch for ch in str(target.attrs.get("arch", "")).removeprefix("sm_") if ch.isdigit())
    return int(digits) if digits else 0


def _device_arch(dev) -> int:
    """Compute capability of a visible GPU (``"8.0"`` -> 80)."""
    major, _, minor = str(dev.compute_version).partition(".")
    return int(major) * 10 + int(minor or 0)
