"""Default CPU schedules for the binary convolutions (x86 host; also valid for any LLVM CPU).

These are hand-written starting points, not tuned: parallel over output tiles, vectorized
over output pixels, stage 1 of the Sparks op computed per tile so that its K responses per
input channel stay in cache while stage 2 gathers them.
"""

from __future__ import annotations

from tvm import s_tir, tirx


def choose_rows_per_tile(out_height: int, out_width: int, target_pixels: int = 64) -> int:
    """Rows of output computed per tile of the Sparks op.

    A tile is ``rows * OW`` contiguous pixels: the vector loop of stage 2. Prefer a divisor of
    the output height (no padded rows) whose tile is closest to ``target_pixels``.
    """
    best, best_cost = 1, None
    for rows in range(1, out_height + 1):
        pixels = rows * out_width
        padded = -(-out_height // rows) * rows
        waste = (padded - out_height) / out_height
        cost = abs(pixels - target_pixels) / target_pixels + 4 * waste
        if best_cost is None or cost < best_cost:
            best, best_cost = rows, cost
    return best


def padded_rows(out_height: int, rows: int) -> int:
    return -(-out_height // rows) * rows


def _extent(sch, loop) -> int:
    return int(sch.get(loop).extent)


def _trailing_loops(sch, loops, extent: int) -> list:
    """The innermost loops whose extents multiply to ``extent``."""
    picked, total = [], 1
    for loop in reversed(loops):
        if total == extent:
            break
        picked.insert(0, loop)
        total *= _extent(sch, loop)
    assert total == extent, (total, extent)
    return picked


def output_chunks(out_height: int, rows: int, batch: int, out_channels: int, cores: int) -> int:
    """Split output channels across threads when there are too few row tiles to go around.

    Each chunk recomputes its tile's stage 1 (K responses per input channel), which is cheap
    next to stage 2's Cout gathers; without it a 7x7 layer runs on one core.
    """
    tiles = batch * (-(-out_height // rows))
    if cores <= 1 or tiles >= 2 * cores:
        return 1
    return max(1, min(out_channels // 16, -(-2 * cores // tiles)))


def schedule_sparks_conv2d(
    func: tirx.PrimFunc, rows: int, out_width: int, o_chunks: int = 1
) -> tirx.PrimFunc:
    """Schedule :func:`sparks_tvm.kernels.sparks_conv2d_compute` for a CPU.

    Parameters
    ----------
    func : PrimFunc
        Built with ``oh_pad = padded_rows(OH, rows)``.
    rows : int
        Output rows per tile (see :func:`choose_rows_per_tile`).
    out_width : int
        OW of the convolution.
    o_chunks : int
        Output-channel chunks run as separate parallel tasks (see :func:`output_chunks`).
    """
    sch = s_tir.Schedule(func)
    s2 = sch.get_sblock("stage2")
    n, o, oh, ow, ci = sch.get_loops(s2)
    ht, hr = sch.split(oh, [None, rows])
    oc, o = sch.split(o, [o_chunks, None])
    sch.reorder(n, ht, oc, o, ci, hr, ow)
    tile = sch.fuse(n, ht, oc)
    sch.parallel(tile)
    pix = sch.fuse(hr, ow)
    sch.vectorize(pix)

    # Stage 1 per tile: its C*K*rows*OW int8 responses are reused by all O output channels.
    s1 = sch.get_sblock("stage1")
    sch.compute_at(s1, tile)
    # Loops under the tile: c, k, then the tile's pixels; unit loops are dropped by
    # compute_at, so find the pixel loops by their extent rather than by position.
    pixels = _trailing_loops(sch, sch.get_loops(s1)[1:], rows * out_width)
    sch.vectorize(sch.fuse(*pixels) if len(pixels) > 1 else pixels[0])

    out = sch.get_sblock("out")
    sch.reverse_compute_at(out, o)
    sch.decompose_reduction(s2, ci)

    for name in ("patch_neg", "patch_mask", "patch_valid"):
        blk = sch.get_sblock(name)
        pn, pc, _, pw = sch.get_loops(blk)
        sch.parallel(sch.fuse(pn, pc))
        sch.vectorize(pw)

    bp = sch.get_sblock("bin_pad")
    bn, bc, _, _ = sch.get_loops(bp)
    sch.parallel(sch.fuse(bn, bc))
    return sch.mod["main"]


def schedule_binary_conv2d(func: tirx.PrimFunc, vector_width: int = 16) -> tirx.PrimFunc:
    """Schedule :func:`sparks_tvm.kernels.binary_conv2d_compute` for a CPU."""
    sch = s_tir.Schedule(func)
    acc = sch.get_sblock("mismatch")
    n, o, oh, ow, rc, ry, rx = sch.get_loops(acc)
    sch.reorder(n, oh, o, rc, ry, rx, ow)
    row = sch.fuse(n, oh)
    sch.parallel(row)
    sch.unroll(rx)
    sch.vectorize(ow)
    sch.decompose_reduction(acc, rc)
    # ``out`` reads the per-pixel valid count too, so it cannot move under ``o``.
    out = sch.get_sblock("out")
    on, oo, _, ow2 = sch.get_loops(out)
    sch.parallel(sch.fuse(on, oo))
    sch.vectorize(ow2)

    valid = sch.get_sblock("valid")
    vn, voh, vow, vc, vy, vx = sch.get_loops(valid)
    sch.reorder(vn, voh, vc, vy, vx, vow)
    sch.parallel(sch.fuse(vn, voh))
    sch.vectorize(vow)
    sch.decompose_reduction(valid, vc)

    for name in ("pack_neg", "pack_mask"):
        blk = sch.get_sblock(name)
        pn, pc, py, px = sch.get_loops(blk)
        sch.parallel(sch.fuse(pn, pc, py))
    return sch.mod["main"]


class HostSchedules:
    """Kernel builders for LLVM CPU targets: compute definition + default schedule."""

    name = "host"

    def __init__(self, cores: int = 1):
        self.cores = cores

    @classmethod
    def for_target(cls, target) -> "HostSchedules":
        return cls(int(target.attrs.get("num-cores", 1)) if "num-cores" in target.attrs else 1)

    def schedule_sparks_conv2d(self, geom, num_codewords: int, mode: str) -> tirx.PrimFunc:
        from sparks_tvm.kernels import sparks_conv2d_primfunc

        rows = choose_rows_per_tile(geom.out_height, geom.out_width)
        chunks = output_chunks(geom.out_height, rows, geom.batch, geom.out_channels, self.cores)
        func = sparks_conv2d_primfunc(geom, num_codewords, mode, padded_rows(geom.out_height, rows))
        return schedule_sparks_conv2d(func, rows, geom.out_width, chunks)

    @staticmethod
    def schedule_binary_conv2d(geom, mode: str) -> tirx.PrimFunc:
        from sparks_tvm.kernels import binary_conv2d_primfunc

        return schedule_binary_conv2d(binary_conv2d_primfunc(geom, mode))
