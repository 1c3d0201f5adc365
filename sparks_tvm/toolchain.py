"""Linkers for cross-compiled libraries: Debian's aarch64 gcc, or zig from pip.

Exporting an aarch64 library on an x86 machine needs a linker for aarch64 Linux. Debian's
``aarch64-linux-gnu-gcc`` is used when it is on PATH; otherwise the ``ziglang`` wheel (the
``[arm]`` extra: ``pip install 'sparks-tvm[arm]'``), whose ``zig cc`` links TVM's aarch64
objects against glibc 2.36 (Raspberry Pi OS Bookworm) with nothing but pip.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import stat
import sys
from pathlib import Path

#: Debian's cross linker for aarch64 Linux.
AARCH64_GCC = "aarch64-linux-gnu-gcc"
#: zig's target for a 64-bit Raspberry Pi OS (Bookworm ships glibc 2.36).
ZIG_AARCH64_TARGET = "aarch64-linux-gnu.2.36"


def zig_available() -> bool:
    """True if the ``ziglang`` wheel is installed."""
    return importlib.util.find_spec("ziglang") is not None


def zig_linker(cache: str | os.PathLike | None = None) -> str:
    """Path of a ``cc``-style script running ``python -m ziglang cc -target aarch64-linux-gnu.2.36``.

    TVM's ``cross_compiler`` calls one executable; the script (written once into the cache
    directory, default ``~/.cache/sparks_tvm/toolchain``) is that executable.
    """
    base = Path(cache or os.environ.get("SPARKS_TVM_CACHE", Path.home() / ".cache" / "sparks_tvm")) / "toolchain"
    base.mkdir(parents=True, exist_ok=True)
    script = base / "zig-aarch64-linux-gnu-cc"
    text = f'#!/bin/sh\nexec "{sys.executable}" -m ziglang cc -target {ZIG_AARCH64_TARGET} "$@"\n'
    if not script.exists() or script.read_text() != text:
        tmp = script.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        tmp.replace(script)
    return str(script)


def aarch64_linker() -> str | None:
    """The linker to use for aarch64 libraries: Debian's gcc, else zig, else None."""
    if shutil.which(AARCH64_GCC):
        return AARCH64_GCC
    if zig_available():
        return zig_linker()
    return None


def missing_linker_message(path: str, mtriple: str) -> str:
    """What to do when no aarch64 linker exists (one line)."""
    return (f"exporting {path} for {mtriple} needs an aarch64 linker and none was found: "
            f"pip install 'sparks-tvm[arm]' (zig, from pip), or apt-get install gcc-aarch64-linux-gnu "
            f"(or scripts/emulated_pi/setup.sh), or pass cross_compiler=..., or export a .tar and link it "
            f"on the device")
