"""TE compute definitions of the binary convolutions sparks_tvm lowers to.

Each kernel is an integer computation: float activations in, int32 dot products out.
The float epilogue (alpha, bias, BatchNorm, ...) is not part of them: it stays in the Relax
graph, so the kernels can be checked bit for bit against :mod:`.reference`, and on
CPUs it is fused into them after Relax's fusion (:mod:`relay_passes.schedule_fused_kernels`).
The bit encoding all of them share (binarizer rules, packing, accumulator width) is
:mod:`.encoding`; the numpy definitions they are checked against are :mod:`.reference`.
"""

from .common import ConvGeometry
from .encoding import BINARIZE_MODES, codes_to_bits, idx_dtype, index_bits, pack_indices, unpack_indices
from .sparks_conv2d import sparks_conv2d_compute, sparks_conv2d_primfunc, sparks_out_shape
from .float_conv2d import float_conv2d_compute, float_conv2d_primfunc, pack_float_weights
from .binary_conv2d import binary_conv2d_compute, binary_conv2d_primfunc, pack_binary_weights

__all__ = [
    "BINARIZE_MODES",
    "codes_to_bits",
    "ConvGeometry",
    "sparks_conv2d_compute",
    "sparks_conv2d_primfunc",
    "sparks_out_shape",
    "idx_dtype",
    "index_bits",
    "pack_indices",
    "unpack_indices",
    "binary_conv2d_compute",
    "binary_conv2d_primfunc",
    "pack_binary_weights",
    "float_conv2d_compute",
    "float_conv2d_primfunc",
    "pack_float_weights",
]
