"""Target aliases: what a user types -> a ``tvm.target.Target``."""

from __future__ import annotations

import json
import os

import tvm
from tvm.target import codegen

from .errors import SparksError


def host_cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def host_target() -> tvm.target.Target:
    """This machine's CPU, with its real vector and popcount instructions.

    TVM's bare ``"llvm"`` is a generic x86-64 with neither; ``mcpu`` comes from LLVM's
    host detection instead.
    """
    return tvm.target.Target(
        {"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": host_cpu_count()}
    )


ALIASES = {"llvm": host_target, "host": host_target, "cpu": host_target}


def resolve_target(target) -> tvm.target.Target:
    """Resolve an alias (``"llvm"``/``"host"``), a TVM tag, a dict or a Target."""
    if isinstance(target, tvm.target.Target):
        return target
    if isinstance(target, dict):
        return tvm.target.Target(target)
    if isinstance(target, str):
        if target in ALIASES:
            return ALIASES[target]()
        try:
            return tvm.target.Target(target)
        except Exception as err:  # TVM raises several error types for bad targets
            raise SparksError(
                f"unknown target {target!r}: use one of {sorted(ALIASES)}, a TVM tag, or a target dict "
                f"such as {{'kind': 'llvm', 'mcpu': 'cortex-a72'}} ({err.__class__.__name__})"
            ) from None
    raise SparksError(f"target must be a str, dict or tvm.target.Target, got {type(target).__name__}")


def target_json(target: tvm.target.Target) -> str:
    return json.dumps(dict(target.export()), default=str, sort_keys=True)
