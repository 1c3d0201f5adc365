"""sparks_tvm: a TVM compiler backend for Sparks sub-bit binary neural networks."""

import os as _os

# TVM's CPU thread pool defaults to one thread on some VMs; use every core we may run on.
if "TVM_NUM_THREADS" not in _os.environ:
    try:
        _os.environ["TVM_NUM_THREADS"] = str(len(_os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover
        pass

from .compiler import CompiledModel, compile, load  # noqa: E402,A004
from .errors import (  # noqa: E402
    CompileError,
    InputValueError,
    ModelLoadError,
    NonBinaryWeightsError,
    QONNXError,
    ShapeError,
    SparksError,
    UnsupportedOpsError,
)
from .report import LayerRecord, Report  # noqa: E402
from .tune import TuningError, tune  # noqa: E402

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
]
