"""Relax graph passes of sparks_tvm (the folder keeps its Relay-era name).

One pass per file; each separates its pattern, check and rewrite. :mod:`relay_passes.pipeline`
puts them in order, with TVM's own passes, for compile, tune and inspect alike.
"""

from .lower_binary_conv2d import LowerBinaryConv2d, LoweringOptions, lower_binary_conv2d
from .lower_float_conv2d import LowerFloatConv2d
from .lower_max_pool2d import LowerMaxPool2d
from .schedule_fused_kernels import ScheduleFusedKernels

__all__ = ["LowerBinaryConv2d", "LowerFloatConv2d", "LowerMaxPool2d", "LoweringOptions", "ScheduleFusedKernels", "lower_binary_conv2d"]
