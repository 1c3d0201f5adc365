"""sparks_tvm: a TVM compiler backend for Sparks sub-bit binary neural networks.

The API (``compile``, ``load``, ``tune``, ``CompiledModel``) is imported on first use
(PEP 562), so that importing a lower layer -- ``sparks_tvm.kernels``, ``sparks_tvm.errors`` --
does not import the compiler above it (see docs/design.md, "Layers").
"""

import importlib as _importlib
import os as _os
from typing import TYPE_CHECKING

# TVM's CPU thread pool defaults to one thread on some VMs; use every core we may run on.
# The value set here is remembered so that ``compile`` can tell it from a user's choice.
_DEFAULT_TVM_NUM_THREADS = None
if "TVM_NUM_THREADS" not in _os.environ:
    try:
        _DEFAULT_TVM_NUM_THREADS = _os.environ["TVM_NUM_THREADS"] = str(len(_os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover
        pass

from .errors import (  # noqa: E402
    CompileError,
    ExportError,
    InputFileError,
    InputValueError,
    LibraryError,
    ModelLoadError,
    NonBinaryWeightsError,
    QONNXError,
    ShapeError,
    SparksError,
    TuningDatabaseError,
    TuningError,
    UnsupportedOpsError,
    WorkDirLockedError,
)
from .report import LayerRecord, Report  # noqa: E402

if TYPE_CHECKING:  # what the lazy names below resolve to, for readers and type checkers
    from . import tune  # noqa: F401 - the sparks_tvm.tune package is callable: sparks_tvm.tune(...)
    from .compiler import CompiledModel, compile, load  # noqa: F401,A004

#: Lazily imported names -> the module that defines them (``tune`` is the callable package).
_LAZY = {"compile": "compiler", "load": "compiler", "CompiledModel": "compiler", "tune": "tune"}

__version__ = "0.1.0"

__all__ = [
    "compile",
    "load",
    "tune",
    "TuningError",
    "CompiledModel",
    "Report",
    "LayerRecord",
    "SparksError",
    "ModelLoadError",
    "UnsupportedOpsError",
    "NonBinaryWeightsError",
    "ShapeError",
    "CompileError",
    "QONNXError",
    "InputValueError",
    "ExportError",
    "LibraryError",
    "InputFileError",
    "WorkDirLockedError",
    "TuningDatabaseError",
]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'sparks_tvm' has no attribute {name!r}")
    module = _importlib.import_module(f".{_LAZY[name]}", __name__)
    value = module if name == "tune" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
