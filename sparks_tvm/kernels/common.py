"""Shared pieces of the binary kernels: geometry and activation binarization."""

from __future__ import annotations

from dataclasses import dataclass

from tvm import tirx

from .encoding import BINARIZE_MODES, activation_bits, activation_code, as_u32  # noqa: F401 - re-exported
from .reference import out_size


@dataclass(frozen=True)
class ConvGeometry:
    """Static shape of one binary convolution (NCHW activations, OIHW weights).

    Attributes
    ----------
    batch, in_channels, height, width : int
        Input activation shape.
    out_channels : int
    kernel : tuple of int
        (KH, KW).
    stride : tuple of int
        (SH, SW).
    padding : tuple of int
        (top, left, bottom, right) zero padding, applied after binarization.
    """

    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    kernel: tuple = (3, 3)
    stride: tuple = (1, 1)
    padding: tuple = (1, 1, 1, 1)

    @property
    def out_height(self) -> int:
        return out_size(self.height, self.kernel[0], self.stride[0], self.padding[0], self.padding[2])

    @property
    def out_width(self) -> int:
        return out_size(self.width, self.kernel[1], self.stride[1], self.padding[1], self.padding[3])

    @property
    def out_shape(self) -> tuple:
        return (self.batch, self.out_channels, self.out_height, self.out_width)

    @property
    def in_shape(self) -> tuple:
        return (self.batch, self.in_channels, self.height, self.width)

    def validate(self) -> None:
        """Raise ``ValueError`` if the geometry cannot be computed."""
        if min(self.batch, self.in_channels, self.height, self.width, self.out_channels) < 1:
            raise ValueError(f"empty convolution: {self}")
        if min(self.stride) < 1 or min(self.padding) < 0:
            raise ValueError(f"bad stride/padding: {self}")
        if self.out_height < 1 or self.out_width < 1:
            raise ValueError(f"convolution has an empty output: {self}")


def int64_shape(*dims) -> tuple:
    """A TE shape of int64 extents: FuseTIR and the Relax VM expect them (LegalizeOps does the same)."""
    return tuple(tirx.IntImm("int64", d) for d in dims)


def nchw_output(func, out_width: int):
    """``func`` with its last parameter, the ``(N, O, OH*OW)`` output, laid out as NCHW.

    The kernels compute over flattened output pixels (so that a pixel tile is a whole vector
    whatever the image width), but the graph wants NCHW. Changing only the output buffer's
    layout keeps the flattened loops: the store ``out[n, o, p // OW, p % OW]`` is address
    ``p``, so a vectorized pixel tile still writes contiguously, and the graph needs no
    reshape between the kernel and its elementwise epilogue -- which would stop Relax's
    FuseOps from fusing that epilogue into the kernel.
    """
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    sch.transform_layout("out", ("write", 0), lambda n, o, p: (n, o, p // out_width, p % out_width))
    return sch.mod["main"]
