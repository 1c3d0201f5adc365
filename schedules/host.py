"""Default CPU schedules for the binary convolutions (x86 host; also valid for any LLVM CPU).

Hand-written defaults, not tuned: parallel over pixel tiles (and output-channel chunks when
tiles are few), vectorized over flattened output pixels, stage 1 of the Sparks op computed
per block of input channels so that the rows stage 2 gathers stay in L1.
"""

from __future__ import annotations

import json
import math

import tvm
from tvm import s_tir, tirx

from sparks_tvm.kernels import binary_conv2d_primfunc, float_conv2d_primfunc, pack_binary_weights, sparks_conv2d_primfunc
from sparks_tvm.kernels.sparks_conv2d import DEFAULT_GROUP, padded_pixels

from .target_info import TargetInfo, vector_bytes_of  # noqa: F401 - vector_bytes_of: re-exported


def pixel_tile(vector_bytes: int) -> int:
    """Pixels per stage-2 row: one int8 vector register, at least 32.

    Measured on znver4 (AVX-512) over the ResNet-18 shapes: 64 beats 32 and 128.
    """
    return max(32, vector_bytes)


def groups_per_block(in_channels: int, num_codewords: int, tile: int, group: int, block_bytes: int = 64 * 1024) -> int:
    """Int8 channel groups whose stage-1 block (``groups * G * K * T`` bytes) is computed at once.

    Stage 2 re-reads that block once per output channel, so it has to stay close: with the
    whole channel range (1 MB at C=512, K=16, int16) stage 2 was bound by L2 bandwidth.
    64 KB measured best on znver4 (32 KB L1d + a fast L2) for K=16, T=64 (CB=64 channels).
    Prefers a divisor of the group count (no partial block) when one is at least half the cap.
    """
    total = -(-in_channels // group)
    cap = max(1, min(total, block_bytes // (num_codewords * tile * group)))
    best = max(d for d in range(1, cap + 1) if total % d == 0)
    return best if 2 * best >= cap else cap


def _scheduled(sch) -> tirx.PrimFunc:
    # The attribute tells dlight's default rules (run on the rest of the model) to keep off.
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


#: Annotation on a kernel's output block holding its deferred schedule (JSON, see :func:`deferred`).
DEFERRED_SCHEDULE = "sparks_tvm.deferred_schedule"


def deferred(func: tirx.PrimFunc, spec: dict) -> tirx.PrimFunc:
    """An unscheduled kernel that carries its schedule, to be applied after Relax fusion.

    ``op_pattern`` 4 (``kOutEWiseFusable``) lets Relax's FuseOps fuse the elementwise ops
    after the conv into its PrimFunc. The schedule's knobs ride on the ``out`` block as an
    annotation (FuseTIR keeps block annotations, not function attributes);
    :class:`relay_passes.ScheduleFusedKernels` inlines the fused epilogue into that block and
    then applies :func:`apply_deferred`, so the epilogue runs inside the kernel's tiles.
    """
    sch = s_tir.Schedule(func)
    sch.annotate(sch.get_sblock("out"), DEFERRED_SCHEDULE, json.dumps(spec, sort_keys=True))
    return sch.mod["main"].with_attr("op_pattern", 4)


#: Deferred-schedule kinds: ``spec["kind"]`` -> ``fn(sch, spec) -> sch`` (see :func:`register_deferred_kind`).
_DEFERRED_KINDS: dict = {}


def register_deferred_kind(name: str, fn) -> None:
    """Let :func:`apply_deferred` apply specs of kind ``name`` with ``fn(sch, spec)`` (returns ``sch``).

    A target module registers its own kernels' schedules here (at import), so a new kind needs
    no edit of this file. Registering a name twice replaces the earlier function.
    """
    _DEFERRED_KINDS[name] = fn


def apply_deferred(sch, spec: dict):
    """Apply the schedule a :func:`deferred` kernel carries (``spec["kind"]`` picks it)."""
    fn = _DEFERRED_KINDS.get(spec["kind"])
    if fn is None:
        raise ValueError(f"unknown deferred kernel kind {spec['kind']!r}")
    return fn(sch, spec)


def _apply_trace(sch, spec: dict):
    """A tuning record's schedule (:class:`schedules.tuning.TunedSchedules`), replayed."""
    s_tir.Trace.apply_json_to_schedule(tvm.ir.load_json(spec["trace"]), sch)
    return sch


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

        for gb in channel blocks:             # block = `block` int8 groups of G channels
            stage1[gb channels, :, tile]      # int8, reused by every output channel
            for o in chunk:
                for g in block:
                    part[0:T] = 0             # int8, one vector register
                    for j in G:               # part += stage1[c, idx[o, c], 0:T]
                        for p in T (vector)
                    acc[o, 0:T] += widen(part)
        out[:, tile] = acc

    Parameters
    ----------
    func : PrimFunc
        Built with the same ``tile``.
    tile : int
        Pixel tile T (see :func:`pixel_tile`).
    block : int
        Int8 channel groups per stage-1 block (see :func:`groups_per_block`).
    o_chunks : int
        Output-channel chunks run as separate parallel tasks (see :func:`output_chunks`).
    """
    return _scheduled(apply_sparks_schedule(s_tir.Schedule(func), tile, block, o_chunks))


def _value(sch, knob) -> int:
    # A knob is an int here, or a MetaSchedule random variable when the tuner samples it.
    return knob if isinstance(knob, int) else int(sch.get(knob))


def apply_sparks_schedule(sch, tile, block, o_chunks, unroll: bool = False, o_block=None, stage1_at: str = "block",
                          split_padding: bool = True):
    """Schedule the Sparks op in ``sch`` (in place) with the given knob values.

    Knobs may be Python ints or MetaSchedule random variables (``sch.sample_categorical``);
    ``unroll=False``, ``o_block=None``, ``stage1_at="block"`` reproduce
    the default schedule, :func:`schedule_sparks_conv2d`. The tuning space (:mod:`schedules.tuning`)
    samples the knobs of this one function, so the default is always a point of it.

    Loop nest (G = the kernel's int8 channel group)::

        for task in (n, pixel tile T, o chunk):             # parallel
            [stage 1, all channels of the tile]             # stage1_at == "task"
            for gb in blocks of `block` groups:
                [stage 1 for the block's channels]          # stage1_at == "block"
                for o_out in chunk / OB:
                    for g in block:
                        for o_in in OB:   (unrolled)        # OB independent chains
                            part[0:T] = 0                   # int8
                            for j in G:   (unrolled if `unroll`)
                                part += stage1[c, idx[o, c], 0:T]     (vector)
                            acc[o, 0:T] += widen(part)
            out[:, tile] = acc
    """
    s2, gb, task = _schedule_stages(sch, tile, block, o_chunks, unroll, o_block, stage1_at)
    _schedule_output(sch, tile, task)
    sch.decompose_reduction(s2, gb)
    _schedule_patch_planes(sch)
    _schedule_binarize(sch, split_padding)
    schedule_index_unpack(sch)  # tau-bit indices unpacked per call (absent at tau = 8)
    return sch


def _schedule_stages(sch, tile, block, o_chunks, unroll, o_block, stage1_at):
    """Stage 2's loop nest (tasks, channel blocks, register block), its partial sums, stage 1."""
    s2 = sch.get_sblock("stage2")
    n, o, p, g = sch.get_loops(s2)
    pt, pi = sch.split(p, [None, tile])
    oc, o = sch.split(o, [o_chunks, None])
    gb, gi = sch.split(g, [None, block])
    if o_block is None:
        sch.reorder(n, pt, oc, gb, o, gi, pi)
        anchor = gi
    else:
        oo, oi = sch.split(o, [None, o_block])
        sch.reorder(n, pt, oc, gb, oo, gi, oi, pi)
        sch.unroll(oi)
        anchor = oi
    task = sch.fuse(n, pt, oc)
    sch.parallel(task)
    sch.vectorize(pi)

    part = sch.get_sblock("stage2_group")
    sch.compute_at(part, anchor)
    loops = sch.get_loops(part)
    if _extent(sch, loops[-1]) == _value(sch, tile):  # G = 1: compute_at dropped the channel loop
        sch.vectorize(loops[-1])
    else:
        sch.reorder(loops[-1], loops[-2])  # (p, j) -> (j, p): pixels innermost, vectorized
        loops = sch.get_loops(part)
        sch.vectorize(loops[-1])
        if unroll:
            sch.unroll(loops[-2])
        sch.decompose_reduction(part, loops[-2])

    s1 = sch.get_sblock("stage1")
    sch.compute_at(s1, gb if stage1_at == "block" else task)
    sch.vectorize(sch.get_loops(s1)[-1])

    return s2, gb, task


def _schedule_output(sch, tile, task) -> None:
    """``out`` (and the epilogue fused into it) per pixel tile, or after the tiles when the last is partial."""
    out = sch.get_sblock("out")
    pixels = _extent(sch, sch.get_loops(out)[-1])
    if pixels % _value(sch, tile) == 0:
        sch.reverse_compute_at(out, task)
        sch.vectorize(sch.get_loops(out)[-1])
    else:
        # The last tile is partial: under the tile loop `out` would carry a predicate, which
        # TVM's vectorizer cannot handle, and the whole block -- with any epilogue fused into it
        # (relay_passes.ScheduleFusedKernels) -- ran as scalar code (2x slower on 28x28 and
        # 14x14 layers with the ResNet-18 epilogue). It runs after the tiles instead, over
        # whole output channels, reading the accumulator back from L2 (<= 256 KB on ResNet-18).
        on, oo, op = sch.get_loops(out)
        sch.parallel(sch.fuse(on, oo))
        lanes = max(d for d in range(1, min(pixels, 64) + 1) if pixels % d == 0)
        sch.vectorize(sch.split(op, [None, lanes])[1])


def _schedule_patch_planes(sch) -> None:
    """The row triples and patch planes: parallel over (image, channel), vectorized."""
    # Row stride 1: the patch planes are flat, (n, c, padded pixel), not (n, c, row, column).
    flat = len(sch.get_loops(sch.get_sblock("patch_neg"))) == 3
    for name in ("row_triple", "patch_neg", "patch_mask", "patch_bias"):
        blk = sch.get_sblock(name)
        loops = sch.get_loops(blk)
        sch.parallel(sch.fuse(*loops[:2]))
        if flat and name != "row_triple":
            # Whole vectors over the padded pixels, a multiple of the tile (64->64: 5% over
            # one ragged vector of OW lanes per row; 256->256: 15%).
            lanes = math.gcd(_extent(sch, loops[-1]), 64)
            sch.vectorize(sch.split(loops[-1], [None, lanes])[1])
        else:
            sch.vectorize(loops[-1])


def _schedule_binarize(sch, split_padding: bool) -> None:
    """The binarization into padded 2-bit codes (and the phase split of strided convs)."""
    try:
        codes = sch.get_sblock("bin_codes")  # strided convs: natural-layout binarization first
    except Exception:  # noqa: BLE001 - stride 1: bin_pad binarizes directly
        codes = None
    binarize = codes if codes is not None else sch.get_sblock("bin_pad")
    loops = sch.get_loops(binarize)  # (n, c, y, [phase,] x)
    if split_padding and sch.can_decompose_padding(binarize, loops[2]):  # not when unpadded
        # Zero padding as its own block (a constant fill) and the in-image part without the
        # border test: with `if_then_else(inside, code(load), 0)` in one vectorized loop, TVM
        # cannot speculate the loads and emits scalar code (7% of the 128->128 layer, 1 thread).
        fill = sch.decompose_padding(binarize, loops[2])
        sch.vectorize(sch.get_loops(fill)[-1])
    sch.vectorize(sch.get_loops(binarize)[-1])
    sch.parallel(sch.fuse(*loops[:2]))
    if codes is not None:
        bp = sch.get_sblock("bin_pad")
        loops = sch.get_loops(bp)  # (n, c, y, phase, q)
        sch.parallel(sch.fuse(*loops[:2]))
        # The phase split reads bytes at stride SW. Vectorized here, TVM emits one insert per
        # byte; as a scalar loop over q with the phases unrolled inside, LLVM's loop vectorizer
        # sees one interleaved group and uses wide loads + shuffles (1.05-1.2x on the stride-2
        # ResNet-18 layers, 1 thread, znver4).
        sch.reorder(loops[-1], loops[-2])
        sch.unroll(loops[-2])



def schedule_index_unpack(sch) -> None:
    """Vectorize the unpacking of tau-bit codeword indices (present when tau < 8)."""
    try:
        blk = sch.get_sblock("idx_unpack")
    except Exception:  # noqa: BLE001 - no such block: indices are stored a byte each
        return
    o, _, q = sch.get_loops(blk)
    sch.parallel(o)
    sch.vectorize(q)


def schedule_binary_conv2d(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Schedule :func:`sparks_tvm.kernels.binary_conv2d_compute` for a CPU (the default point)."""
    return _scheduled(apply_binary_schedule(s_tir.Schedule(func)))


def apply_binary_schedule(sch, o_block=None, columns=None):
    """Schedule the dense binary conv in ``sch``; ``o_block=None`` is the default schedule.

    With ``o_block``: the mismatch loop nest becomes ``(n, oh) | o_out | ow_out | rc ry rx |
    o_in (unrolled) | ow_in (vector)``: each packed activation word loaded feeds ``OB``
    output channels' accumulators.
    """
    acc = sch.get_sblock("mismatch")
    n, o, oh, ow, rc, ry, rx = sch.get_loops(acc)
    if o_block is None:
        sch.reorder(n, oh, o, rc, ry, rx, ow)
        row = sch.fuse(n, oh)
        sch.parallel(row)
        sch.unroll(rx)
        sch.vectorize(ow)
        sch.decompose_reduction(acc, rc)
    else:
        oo, oi = sch.split(o, [None, o_block])
        wo, wi = sch.split(ow, [None, columns])
        sch.reorder(n, oh, oo, wo, rc, ry, rx, oi, wi)
        row = sch.fuse(n, oh)
        sch.parallel(row)
        sch.unroll(rx)
        sch.unroll(oi)
        sch.vectorize(wi)
        sch.decompose_reduction(acc, rc)
    out = sch.get_sblock("out")
    on, oo2, _, ow2 = sch.get_loops(out)
    sch.parallel(sch.fuse(on, oo2))
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
    return sch


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
    return _scheduled(apply_float_schedule(s_tir.Schedule(func), columns, padded))


def apply_float_schedule(sch, columns: int, padded: bool):
    """Schedule the float conv in ``sch`` (in place); see :func:`schedule_float_conv2d`."""
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
    return sch


class HostSchedules:
    """Kernel builders for LLVM CPU targets: compute definition + default schedule.

    Parameters
    ----------
    cores : int
        Threads the schedules split work across.
    vector_bytes : int
        Width of the widest integer vector register (64 AVX-512, 32 AVX2, 16 SSE/NEON).

    Attributes
    ----------
    defer : bool
        False (default): each ``schedule_*`` method returns the scheduled kernel. True: it
        returns the :func:`deferred` kernel, scheduled after Relax has fused its epilogue into
        it (what :func:`sparks_tvm.compile` uses; the LLVM pipeline runs
        :class:`relay_passes.ScheduleFusedKernels`).
    """

    name = "host"
    defer = False

    def __init__(self, cores: int = 1, vector_bytes: int = 64):
        self.cores = cores
        self.vector_bytes = vector_bytes

    def _finish(self, func: tirx.PrimFunc, spec: dict) -> tirx.PrimFunc:
        return deferred(func, spec) if self.defer else _scheduled(apply_deferred(s_tir.Schedule(func), spec))

    @classmethod
    def for_target(cls, target) -> "HostSchedules":
        info = TargetInfo.from_target(target)
        return cls(cores=max(1, info.cores or 1), vector_bytes=info.vector_bytes)

    def sparks_params(self, geom, num_codewords: int) -> dict:
        """The default schedule's knobs for one layer: pixel tile, channel block, chunks."""
        tile = pixel_tile(self.vector_bytes)
        tiles = geom.batch * padded_pixels(geom, tile) // tile
        return {
            "tile": tile,
            "block": groups_per_block(geom.in_channels, num_codewords, tile, DEFAULT_GROUP),
            "o_chunks": output_chunks(tiles, geom.out_channels, self.cores),
        }

    #: The kernels can take a per-channel shift of their input (``shift=True``).
    folds_shift = True

    def schedule_sparks_conv2d(self, geom, num_codewords: int, mode: str, shift: bool = False) -> tirx.PrimFunc:
        knobs = self.sparks_params(geom, num_codewords)
        func = sparks_conv2d_primfunc(geom, num_codewords, mode, knobs["tile"], shift=shift)
        return self._finish(func, {"kind": "sparks", **knobs})

    @property
    def float_lanes(self) -> int:
        """float32 lanes per vector: output channels computed together by the float conv."""
        return max(4, self.vector_bytes // 4)

    def schedule_float_conv2d(self, geom) -> tirx.PrimFunc:
        """The packed float conv (weights from ``pack_float_weights(w, self.float_lanes)``)."""
        func = float_conv2d_primfunc(geom, self.float_lanes)
        return self._finish(func, {"kind": "float", "columns": register_tile(geom.out_width),
                                   "padded": bool(any(geom.padding))})

    def schedule_binary_conv2d(self, geom, mode: str, shift: bool = False) -> tirx.PrimFunc:
        return self._finish(binary_conv2d_primfunc(geom, mode, shift), {"kind": "binary"})

    def binary_weights(self, geom, mode: str, signs):
        """The weight constant :meth:`schedule_binary_conv2d`'s kernel takes for ``signs`` (+-1)."""
        return pack_binary_weights(signs)


register_deferred_kind("sparks", lambda sch, spec: apply_sparks_schedule(
    sch, int(spec["tile"]), int(spec["block"]), int(spec["o_chunks"])))
register_deferred_kind("binary", lambda sch, spec: apply_binary_schedule(sch))
register_deferred_kind("float", lambda sch, spec: apply_float_schedule(sch, int(spec["columns"]), bool(spec["padded"])))
register_deferred_kind("trace", _apply_trace)
