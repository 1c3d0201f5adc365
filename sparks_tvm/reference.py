"""Compatibility name of :mod:`sparks_tvm.kernels.reference` (the numpy references live beside the kernels)."""

from .kernels.reference import *  # noqa: F401,F403
from .kernels.reference import BINARIZE_MODES, binarize, binary_conv2d_ref, codes_to_bits, out_size, sparks_conv2d_ref  # noqa: F401
