"""Building blocks of the hand-written vector TIR kernels (the NEON ones).

Whole-vector loads and stores over a flat index, lane-count-agnostic constructors (a 1-lane
"vector" is a scalar: TIR refuses 1-lane ramps and broadcasts), vector chunking of a range,
and the ``te.extern`` wrapper whose plain buffers Relax's FuseTIR can map.
"""

from __future__ import annotations

from tvm import te, tirx
from tvm.script.ir_builder import tirx as T

U8 = "uint8"
#: NEON register width in bytes.
VECTOR = 16


def u8(value):
    return tirx.const(value, U8)


def padded(pixels: int, tile: int) -> int:
    """``pixels`` rounded up to a multiple of ``tile``."""
    return -(-pixels // tile) * tile


def ramp(start, stride, lanes):
    return tirx.Ramp(start, stride, lanes) if lanes > 1 else start


def bc(value, lanes):
    return tirx.Broadcast(value, lanes) if lanes > 1 else value


def vt(dtype: str, lanes: int) -> str:
    return f"{dtype}x{lanes}" if lanes > 1 else dtype


def load(buf, prefix, start, lanes):
    """``buf[*prefix, start : start + lanes]``."""
    return tirx.BufferLoad(buf, [*prefix, ramp(start, 1, lanes)])


def store(buf, prefix, start, lanes, value):
    """``buf[*prefix, start : start + lanes] = value``."""
    T.buffer_store(buf, value, [*prefix, ramp(start, 1, lanes)])


def top_bytes(v, lanes: int):
    """The top byte (sign and the exponent's high 7 bits) of ``lanes`` float32 lanes (``uzp2``)."""
    raw = tirx.reinterpret(f"uint8x{4 * lanes}", v)
    return tirx.Shuffle([raw], [tirx.IntImm("int32", 4 * i + 3) for i in range(lanes)])


def sign_bits(v, lanes: int, top=None):
    """The sign bits of ``lanes`` float32 lanes as 0/1 bytes: each value's top byte (``uzp2``), >> 7.

    The -1 plane of ONNX ``Sign`` in three shuffles and a shift per 16 values (a compare
    costs four, plus the narrowing): it differs from ``v < 0`` only at -0.0, which is a zero
    (the kernels that use it mask zeros with a separate real-tap plane). ``top``: the
    values' :func:`top_bytes`, when the caller already has them.
    """
    top = top_bytes(v, lanes) if top is None else top
    return top >> bc(u8(7), lanes)


def zero_evidence(top, lanes: int):
    """Bytes that are 0 where a value may be 0: the top byte without its sign (``shl #1``).

    0 exactly when ``|v| < 2**-125``: every 0 of either sign, and the tiniest other values,
    which is safe where it only chooses a path (the masked one is exact for any value). A
    running unsigned minimum of these (one ``umin``) finds a 0 in two instructions per 16
    values, where ``v == 0`` compares cost four plus the narrowing.
    """
    return top << bc(u8(1), lanes)


def chunks(lo: int, hi: int, step: int = VECTOR) -> list:
    """``[lo, hi)`` as ``(start, lanes)`` vectors of ``step`` lanes and one shorter tail."""
    return [(x, min(step, hi - x)) for x in range(lo, hi, step)]


def whole_chunks(lo: int, hi: int, step: int = VECTOR) -> list:
    """``[lo, hi)`` as ``(start, lanes)`` vectors of power-of-two lanes, the last overlapping.

    Like :func:`chunks`, for stores that may be repeated (same value, same place): a tail of
    12 or 14 lanes becomes one 16-lane vector ending at ``hi`` (LLVM legalizes other lane
    counts into lane-by-lane moves); rows shorter than a vector take the largest power of two
    that fits, then one overlapping it; no vector is shorter than 8 lanes in a row of 8 or more
    (4 in a row of 4 to 7).
    """
    out, x = [], lo
    while x < hi:
        rest = min(hi - x, step)
        if rest == step:
            out.append((x, step))
            x += step
            continue
        # The tail: one vector ending at hi, of at least 8 lanes where the row has them (a
        # 4-lane byte vector legalizes into 16-bit lanes and back).
        up = max(1 << (rest - 1).bit_length(), 8 if hi - lo >= 8 else 4 if hi - lo >= 4 else 1)
        if hi - up >= lo:
            out.append((hi - up, up))
            break
        down = 1 << (rest.bit_length() - 1)
        out.append((x, down))
        x += down
    return out


def extern(name: str, ins: list, out_shapes: list, dtypes: list, out_names: list, body):
    """``te.extern`` of a hand-written body with plain buffers (``layout=None``, no symbolic
    element offset: te.extern's default ones make Relax's FuseTIR refuse the kernel)."""
    outs = te.extern(out_shapes, ins, body, name=name, dtype=list(dtypes),
                     in_buffers=[tirx.decl_buffer(t.shape, t.dtype, t.op.name, layout=None) for t in ins],
                     out_buffers=[tirx.decl_buffer(s, d, n, layout=None)
                                  for s, d, n in zip(out_shapes, dtypes, out_names)])
    return outs if isinstance(outs, (list, tuple)) else [outs]
