"""Default CPU schedules for the binary convolutions (x86 host; also valid for any LLVM CPU).

Hand-written defaults, not tuned: parallel over pixel tiles (and output-channel chunks when
tiles are few), vectorized over flattened output pixels, stage 1 of the Sparks op computed
per block of input channels so that the rows stage 2 gathers stay in L1.
"""

from __future__ import annotations

from tvm import s_tir, tirx


def vector_bytes_of(target) -> int:
    """Width of the target's widest integer vector register, in bytes."""
    from tvm.target import codegen

    if target is None:
        return 16
    try:
        if codegen.target_has_features("avx512bw", target):
            return 64
        if codegen.target_has_features("avx2", target):
            return 32
    except Exception:  # non-x86 LLVM targets have no such features
        pass
    return 16


def pixel_tile(vector_bytes: int) -> int:
    """Pixels per stage-2 row: two int16 vectors (two independent add chains), >= 32.

    Measured on znver4 (AVX-512) over the ResNet-18 shapes: 64 beats 32 and 128.
    """
    return max(32, vector_bytes)


def channel_block(in_channels: int, num_codewords: int, tile: int, l1_bytes: int = 32 * 1024) -> int:
    """Input channels whose stage-1 block (``CB * K * T`` int16) fits in L1.

    Stage 2 re-reads that block once per output channel, so it has to stay in L1: with the
    whole channel range (128 KB at C=64, K=16) stage 2 was bound by L2 bandwidth.
    Prefers a divisor of ``in_channels`` (no predicated tail) when one is at least half the cap.
    """
    cap = max(1, min(in_channels, l1_bytes // (num_codewords * tile * 2)))
    best = max(d for d in range(1, cap + 1) if in_channels % d == 0)
    return best if 2 * best >= cap else cap


def _scheduled(sch) -> tirx.PrimFunc:
    # The attribute tells dlight's default rules (run on the rest of the model) to keep off.
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _extent(sch, loop) -> int:
    return int(sch.get(loop).extent)


def output_chunks(tiles: int, out_channels: int, cores: int) -> int:
    """Split output channels across threads when there are too few pixel tiles to go around.

    Each chunk recomputes its tile's stage 1 (K responses per input channel), which is cheap
    next to stage 2's Cout gathers; without it a 7x7 layer (one tile) runs on one core.
    """
    if cores <= 1 or tiles >= 2 * cores:
        return 1
    return max(1, min(out_channels // 16, -(-2 * cores // tiles)))


def schedule_sparks_conv2d(func: tirx.PrimFunc, tile: int, block: int, o_chunks: int = 1) -> tirx.PrimFunc:
    """Schedule :func:`sparks_tvm.kernels.sparks_conv2d_compute` for a CPU.

    Loop nest (per parallel task = pixel tile x output-channel chunk)::

        for cb in channel blocks:            # stage 1 for CB channels: CB*K*T int16, in L1
            stage1[cb*CB:(cb+1)*CB, :, tile]
            for o in chunk:
                for cj in CB:                # acc[o, 0:T] += stage1[c, idx[o, c], 0:T]
                    for p in T (vector)
        out[:, tile] = acc

    Parameters
    ----------
    func : PrimFunc
        Built with the same ``tile``.
    tile : int
        Pixel tile T (see :func:`pixel_tile`).
    block : int
        Input-channel block CB (see :func:`channel_block`).
    o_chunks : int
        Output-channel chunks run as separate parallel tasks (see :func:`output_chunks`).
    """
    sch = s_tir.Schedule(func)
    s2 = sch.get_sblock("stage2")
    n, o, p, ci = sch.get_loops(s2)
    pt, pi = sch.split(p, [None, tile])
    oc, o = sch.split(o, [o_chunks, None])
    cb, cj = sch.split(ci, [None, block])
    sch.reorder(n, pt, oc, cb, o, cj, pi)
    task = sch.fuse(n, pt, oc)
    sch.parallel(task)
    sch.vectorize(pi)

    # Stage 1 per channel block: its CB*K*T responses are reused by every output channel.
    s1 = sch.get_sblock("stage1")
    sch.compute_at(s1, cb)
    sch.vectorize(sch.get_loops(s1)[-1])

    out = sch.get_sblock("out")
    sch.reverse_compute_at(out, task)
    sch.vectorize(sch.get_loops(out)[-1])
    sch.decompose_reduction(s2, cb)

    for name in ("patch_neg", "patch_mask", "patch_valid"):
        blk = sch.get_sblock(name)
        pn, pc, _, pw = sch.get_loops(blk)
        sch.parallel(sch.fuse(pn, pc))
        sch.vectorize(pw)

    bp = sch.get_sblock("bin_pad")
    bn, bc, _, bx = sch.get_loops(bp)
    sch.parallel(sch.fuse(bn, bc))
    sch.vectorize(bx)
    return _scheduled(sch)


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
    return _scheduled(sch)


def register_tile(out_width: int, cap: int = 12) -> int:
    """Output columns held in registers by the float conv: the largest divisor of OW <= cap.

    Each column is one vector accumulator (V output channels); 12 leaves room for the
    weight vector and broadcasts in AVX-512's 32 registers.
    """
    return max(d for d in range(1, min(out_width, cap) + 1) if out_width % d == 0)


def schedule_float_conv2d(func: tirx.PrimFunc, columns: int, padded: bool) -> tirx.PrimFunc:
    """Schedule :func:`sparks_tvm.kernels.float_conv2d_compute` for a CPU.

    Parallel over (batch, channel block, output row); a register tile of ``columns`` output
    pixels x V lanes accumulates over (c, kh, kw), each input value broadcast into one FMA.
    """
    sch = s_tir.Schedule(func)
    conv = sch.get_sblock("conv")
    n, ob, oh, ow, v, rc, ry, rx = sch.get_loops(conv)
    owo, owi = sch.split(ow, [None, columns])
    sch.reorder(n, ob, oh, owo, rc, ry, rx, owi, v)
    task = sch.fuse(n, ob, oh)
    sch.parallel(task)
    sch.unroll(owi)
    sch.vectorize(v)
    acc = sch.cache_write(conv, 0, "local")
    sch.reverse_compute_at(acc, owo)
    sch.decompose_reduction(conv, rc)
    out = sch.get_sblock("out")
    sch.reverse_compute_at(out, task)
    sch.vectorize(sch.get_loops(out)[-1])
    if padded:
        pad = sch.get_sblock("pad")
        pn, pc, _, px = sch.get_loops(pad)
        sch.parallel(sch.fuse(pn, pc))
        sch.vectorize(px)
    return _scheduled(sch)


class HostSchedules:
    """Kernel builders for LLVM CPU targets: compute definition + default schedule.

    Parameters
    ----------
    cores : int
        Threads the schedules split work across.
    vector_bytes : int
        Width of the widest integer vector register (64 AVX-512, 32 AVX2, 16 SSE/NEON).
    """

    name = "host"

    def __init__(self, cores: int = 1, vector_bytes: int = 64):
        self.cores = cores
        self.vector_bytes = vector_bytes

    @classmethod
    def for_target(cls, target) -> "HostSchedules":
        cores = int(target.attrs["num-cores"]) if "num-cores" in target.attrs else 1
        return cls(cores=max(1, cores), vector_bytes=vector_bytes_of(target))

    def sparks_params(self, geom, num_codewords: int) -> dict:
        """The default schedule's knobs for one layer: pixel tile, channel block, chunks."""
        from sparks_tvm.kernels.sparks_conv2d import padded_pixels

        tile = pixel_tile(self.vector_bytes)
        tiles = geom.batch * padded_pixels(geom, tile) // tile
        return {
            "tile": tile,
            "block": channel_block(geom.in_channels, num_codewords, tile),
            "o_chunks": output_chunks(tiles, geom.out_channels, self.cores),
        }

    def schedule_sparks_conv2d(self, geom, num_codewords: int, mode: str) -> tirx.PrimFunc:
        from sparks_tvm.kernels import sparks_conv2d_primfunc

        knobs = self.sparks_params(geom, num_codewords)
        func = sparks_conv2d_primfunc(geom, num_codewords, mode, knobs["tile"])
        return schedule_sparks_conv2d(func, knobs["tile"], knobs["block"], knobs["o_chunks"])

    @property
    def float_lanes(self) -> int:
        """float32 lanes per vector: output channels computed together by the float conv."""
        return max(4, self.vector_bytes // 4)

    def schedule_float_conv2d(self, geom) -> tirx.PrimFunc:
        """The packed float conv (weights from ``pack_float_weights(w, self.float_lanes)``)."""
        from sparks_tvm.kernels.float_conv2d import float_conv2d_primfunc

        func = float_conv2d_primfunc(geom, self.float_lanes)
        return schedule_float_conv2d(func, register_tile(geom.out_width), any(geom.padding))

    @staticmethod
    def schedule_binary_conv2d(geom, mode: str) -> tirx.PrimFunc:
        from sparks_tvm.kernels import binary_conv2d_primfunc

        return schedule_binary_conv2d(binary_conv2d_primfunc(geom, mode))
