"""Shared pieces of the binary kernels: geometry and activation binarization."""

from __future__ import annotations

from dataclasses import dataclass

from tvm import tirx

from ..reference import BINARIZE_MODES, out_size


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


def activation_bits(x: tirx.PrimExpr, mode: str):
    """Return ``(neg, nonzero)`` as uint32 0/1 expressions for one activation.

    ``neg`` marks a -1, ``nonzero`` marks a tap that holds a real +-1 value.  Only ONNX
    ``Sign`` produces zeros; the ``x >= 0`` / ``x > 0`` forms never do.
    """
    zero = tirx.const(0, "float32")  # activations are float32 (checked by the lowering)
    if mode == "sign":
        return x < zero, x != zero
    if mode == "ge":
        return x < zero, tirx.const(True, "bool")
    if mode == "gt":
        return x <= zero, tirx.const(True, "bool")
    raise ValueError(f"unknown binarize mode {mode!r}; expected one of {BINARIZE_MODES}")


def activation_code(data, mode: str, n, c, y, x, shift=None) -> tirx.PrimExpr:
    """2-bit uint8 code of activation ``data[n, c, y, x]``, 0 outside the image (zero padding).

    Bit 0: the tap holds -1; bit 1: the tap holds a real +-1 (inside the image, and non-zero
    for ONNX ``Sign``). ``y``, ``x`` may be out of range: the load is clamped, the code masked.
    With ``shift`` (a per-channel float32 tensor), the value binarized is
    ``data[n, c, y, x] + shift[c]``: the same float add the graph would do, so the same bits.
    """
    h, w = int(data.shape[2]), int(data.shape[3])
    inside = tirx.all(y >= 0, y < h, x >= 0, x < w)
    val = data[n, c, tirx.max(tirx.min(y, h - 1), 0), tirx.max(tirx.min(x, w - 1), 0)]
    if shift is not None:
        val = val + shift[c]
    neg, nz = activation_bits(val, mode)
    code = tirx.Cast("uint8", as_u32(neg) | (as_u32(nz) << 1))
    return tirx.if_then_else(inside, code, tirx.const(0, "uint8"))


def as_u32(cond: tirx.PrimExpr) -> tirx.PrimExpr:
    return tirx.Cast("uint32", cond)


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
