"""Zero padding as a correction, shared by the NEON binary kernels' mask-free paths.

A binary conv pads *after* binarization: a padded tap is 0, neither +1 nor -1. The mask-free
paths instead encode padding as +1 (the all-zero bit pattern, so no mask is needed in the
inner loop) and correct afterwards. A +1 padding tap ``t`` adds, per output channel ``o``,
the same count ``pop[o, t]`` to every pixel it pads (dense: the weights' -1 channels at ``t``,
which the +1 mismatches; Sparks: the channels whose codeword is +1 at ``t``, which it
matches). So the accumulator of a pixel loses ``sum(pop[o, t] for t in its padded taps)``,
and ``R`` (the real taps, the other term of the output) is ``C * (taps - padded taps)``.
The Sparks kernel's mixed path pads only its mask-free channels this way: ``pop`` per image
and ``C`` the image's count of those channels (``channels``), the masked ones' real taps
already in ``R``.

Pixels are flattened (``p = oh * OW + ow``); ``acc`` is ``(N, O, PP)`` and ``rsum`` ``(N, PP)``.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script.ir_builder import tirx as T

from .vector_tir import U8, bc, chunks, load, ramp, store, u8, vt


class PaddedTaps:
    """Which taps of an output pixel fall in the padding (mixed into the kernels' layouts).

    Subclasses set ``n, c, h, w, o, oh, ow, kh, kw, sh, sw, pt, pl`` and ``acc`` (the
    accumulator dtype) before using it.
    """

    @property
    def taps(self):
        return [(dy, dx) for dy in range(self.kh) for dx in range(self.kw)]

    def row_ok(self, oh, dy):
        y = oh * self.sh + dy - self.pt
        return 0 <= y < self.h

    def col_ok(self, ow, dx):
        x = ow * self.sw + dx - self.pl
        return 0 <= x < self.w


def real_tap_counts(g: PaddedTaps, rsum, channels=None):
    """``rsum[n, p] = C * (real taps of p)`` for every pixel.

    With ``channels`` (``channels(n)``: the channels of image ``n`` padded as +1, the others
    masked) the term is ``channels(n) * (real taps of p)``, added to what ``rsum`` holds (the
    masked channels' real taps, counted by the kernel).
    """
    with T.parallel(0, g.n) as n:
        with T.serial(0, g.oh) as oh:
            rv = None
            for dy in range(g.kh):
                y = oh * g.sh + dy - g.pt
                ok = tirx.Cast("int32", tirx.all(y >= 0, y < g.h))
                rv = ok if rv is None else rv + ok
            for x0, lanes in chunks(0, g.ow):
                cv = None
                for dx in range(g.kw):
                    xs = ramp(x0 * g.sw + dx - g.pl, g.sw, lanes)
                    ok = tirx.Cast(vt("int32", lanes), (xs >= bc(0, lanes)) & (xs < bc(g.w, lanes)))
                    cv = ok if cv is None else cv + ok
                value = tirx.Cast(vt(g.acc, lanes), cv * bc(rv * (g.c if channels is None else channels(n)), lanes))
                if channels is not None:
                    value = load(rsum, [n], oh * g.ow + x0, lanes) + value
                store(rsum, [n], oh * g.ow + x0, lanes, value)


def _pop(pop, n, o, t):
    """``pop[o, t]``, or ``pop[n, o, t]`` where the counts differ per image."""
    return pop[o, t] if len(pop.shape) == 2 else pop[n, o, t]


def subtract_padded_rows(g: PaddedTaps, pop, acc):
    """Output rows with padded taps: subtract those rows' taps (every column)."""
    rows = [oh for oh in range(g.oh) if not all(g.row_ok(oh, dy) for dy in range(g.kh))]
    if not rows:
        return
    with T.parallel(0, g.n * g.o) as no:
        n, o = no // g.o, no % g.o
        for oh in rows:
            fix = None
            for t, (dy, dx) in enumerate(g.taps):
                if not g.row_ok(oh, dy):
                    fix = _pop(pop, n, o, t) if fix is None else fix + _pop(pop, n, o, t)
            for x0, lanes in chunks(0, g.ow):
                at = oh * g.ow + x0
                store(acc, [n, o], at, lanes, load(acc, [n, o], at, lanes) - bc(tirx.Cast(g.acc, fix), lanes))


def subtract_padded_cols(g: PaddedTaps, pop, acc):
    """Output columns with padded taps: subtract those taps on real rows (the rows' are done)."""
    cols = [ow for ow in range(g.ow) if not all(g.col_ok(ow, dx) for dx in range(g.kw))]
    if not cols:
        return
    with T.parallel(0, g.n * g.o) as no:
        n, o = no // g.o, no % g.o
        with T.serial(0, g.oh) as oh:
            for ow in cols:
                fix = None
                for t, (dy, dx) in enumerate(g.taps):
                    if g.col_ok(ow, dx):
                        continue
                    y = oh * g.sh + dy - g.pt
                    term = tirx.Select(tirx.all(y >= 0, y < g.h), _pop(pop, n, o, t), tirx.const(0, "int32"))
                    fix = term if fix is None else fix + term
                at = oh * g.ow + ow
                T.buffer_store(acc, acc[n, o, at] - tirx.Cast(g.acc, fix), [n, o, at])


def correct_padding(g: PaddedTaps, pop, acc, rsum, channels=None):
    """The whole correction: ``R`` of every pixel, then the padded taps out of ``acc``.

    ``pop`` is ``[O, taps]``, or ``[N, O, taps]`` with ``channels`` (see :func:`real_tap_counts`).
    """
    real_tap_counts(g, rsum, channels)
    subtract_padded_rows(g, pop, acc)
    subtract_padded_cols(g, pop, acc)


def mask_free_or_masked(zflags, count: int, fast, masked):
    """Run ``fast()`` (the mask-free path) unless one of ``count`` zero flags is set, else
    ``masked()``; with no flags (the ``ge``/``gt`` binarizers never give a 0), ``fast()``."""
    if zflags is None:
        fast()
        return
    zeros = T.alloc_buffer([1], U8)
    T.buffer_store(zeros, u8(0), [0])
    with T.serial(0, count) as i:
        T.buffer_store(zeros, zeros[0] | zflags[i], [0])
    with T.If(zeros[0] == u8(0)):
        with T.Then():
            fast()
        with T.Else():
            masked()
