"""The errors sparks_tvm raises. Every one says what is wrong in the user's terms."""


class SparksError(Exception):
    """Base class of all sparks_tvm errors."""


class ModelLoadError(SparksError):
    """The model file or bytes are not a readable ONNX model."""


class UnsupportedOpsError(SparksError):
    """The model uses ONNX operators that cannot be compiled; all of them are listed."""

    def __init__(self, ops: dict, hint: str = ""):
        self.ops = ops
        lines = [f"  {op}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}" for op, names in ops.items()]
        super().__init__(
            f"the model uses {len(ops)} unsupported ONNX operator(s) (operator: nodes):\n" + "\n".join(lines)
            + (f"\n{hint}" if hint else "")
        )


class NonBinaryWeightsError(SparksError):
    """A convolution reads binarized activations but its weights are not +-alpha per channel."""


class ShapeError(SparksError):
    """Input shapes are missing, dynamic, or do not match the model."""


class CompileError(SparksError):
    """TVM failed to compile the model; the message says at which stage."""


class QONNXError(SparksError):
    """A QONNX quantization node (BipolarQuant, Quant) has inputs or attributes that cannot be
    rewritten into standard ONNX (non-constant bit width, unknown rounding mode, ...)."""


class InputValueError(SparksError):
    """A run-time input holds NaN or infinity: the binary kernels cannot reproduce the float
    reference's NaN propagation, so such inputs are refused rather than answered wrongly."""


class TuningError(SparksError):
    """Tuning could not be done or its records cannot be used (wrong target, nothing measured...)."""


class ExportError(CompileError):
    """Writing the shared library failed: the linker's own message (its stderr tail) is shown,
    or the output folder is not writable."""


class LibraryError(SparksError):
    """A compiled library or its ``.sparks.json`` sidecar is missing, unreadable, truncated or
    does not match (size and sha256 are recorded at export and checked before loading, because
    loading a damaged shared library crashes the process instead of raising)."""


class InputFileError(SparksError):
    """An inputs file (``--inputs x.npz``) cannot be read or lacks an input of the model."""


class WorkDirLockedError(TuningError):
    """Another ``tune`` is running on the same work dir (the message gives its PID)."""


class TuningDatabaseError(TuningError):
    """The tuning database in a work dir is damaged in a way that is not a partial last write;
    the file is kept as it is, for the user to inspect, move away, or truncate."""
