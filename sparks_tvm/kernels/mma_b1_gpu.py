"""Binary tensor-core MMA (``mma.sync ... .b1.b1.s32.xor.popc``, sm_80+) for the GPU kernels.

One warp-wide instruction, ``D = C + popc(A xor B)`` over ``K`` bits, with ``A`` a 16 x K bit
matrix (rows: output pixels), ``B`` a K x 8 bit matrix (columns: output channels or
codewords) and ``C``/``D`` 16 x 8 int32. The kernels read operands as 32-bit *slots*: a row
of ``A`` (or a column of ``B``) is ``K / 32`` words, one per slot.

The encoding that makes ``xor.popc`` exact with zeros and zero padding: every
(channel, tap) pair takes two bits, ``(neg, pos)``:

* an activation of -1 is ``(1, 0)``, +1 is ``(0, 1)``, 0 (ONNX ``Sign``, or padding) ``(0, 0)``;
* a weight (codeword tap) of -1 is ``(1, 0)``, +1 is ``(0, 1)``; a channel that does not exist
  (the tail of the last slot) is ``(0, 0)`` on both sides.

``popc`` of the XOR of one pair is ``1 - w * a``: 0 where they agree, 2 where they differ, 1
where the activation is 0. So over ``T`` real pairs ``sum w * a = T - popc(A xor B)`` exactly,
with no separate ``valid`` count and no mask.

This module holds what both kernels share: the fragment layouts (which lane holds which
slot of which row), the instruction call for TIR, and a numpy emulation of the instruction
written from the PTX ISA text (9.7.14.5, "Matrix Fragments for mma.m16n8k128 / k256"), which
the CPU references of the kernels' tiling use in place of the tensor core.

The layouts are transcribed from the ISA (the m16n8k128 .b1 and m16n8k64 .s4 pages, whose
pattern m16n8k256 follows; apache/tvm's ``test_tir_ptx_mma.py`` indexes its m16n8k256 b1
fragments the same way, without checking results), not measured: no kernel here has run on
a GPU.
"""

from __future__ import annotations

import contextlib

import numpy as np
from tvm.backend.cuda.op import ptx_legacy_mma
from tvm.script.ir_builder import IRBuilder
from tvm.tirx.script.builder import ir as T

#: Threads of a warp.
WARP = 32
#: Shapes used here: (registers of A, registers of B, 32-bit slots of K) per lane.
SHAPES = {"m16n8k128": (2, 1, 4), "m16n8k256": (4, 2, 8)}
#: Rows of A (pixels) and columns of B (channels / codewords) of one instruction.
MMA_M, MMA_N = 16, 8
#: Accumulator registers per lane (16 x 8 int32 over 32 lanes).
D_REGS = 4


def slots_of(shape: str) -> int:
    """32-bit slots (K / 32) of one instruction of ``shape``."""
    return SHAPES[shape][2]


def a_fragment(lane, reg):
    """``(row, slot)`` of A that register ``reg`` of ``lane`` holds (ints or TIR expressions).

    ISA: ``row = groupID`` for registers 0 and 2, ``groupID + 8`` for 1 and 3; the column
    (bit) is ``threadID_in_group * 32 + bit``, plus 128 for registers 2 and 3 (k256 only).
    """
    return lane // 4 + 8 * (reg % 2), lane % 4 + 4 * (reg // 2)


def b_fragment(lane, reg):
    """``(column, slot)`` of B held by register ``reg`` of ``lane``: column ``groupID``, slot
    ``threadID_in_group`` (+4 for register 1, k256 only)."""
    return lane // 4, lane % 4 + 4 * reg


def d_fragment(lane, reg):
    """``(row, column)`` of C/D held by register ``reg`` of ``lane``: rows ``groupID`` (registers
    0, 1) and ``groupID + 8`` (2, 3), columns ``2 * threadID_in_group + reg % 2``."""
    return lane // 4 + 8 * (reg // 2), 2 * (lane % 4) + reg % 2


def mma_b1(shape: str, a, a_offset, b, b_offset, acc, acc_offset, op: str = "xor"):
    """The TIR call of one ``mma.sync.aligned.<shape>.row.col.s32.b1.b1.s32.<op>.popc``.

    ``a``, ``b`` are uint32 and ``acc`` int32 local buffers (their ``.data``); the offsets are
    in elements. The accumulator is read and written in place (``D = C``).
    """
    if shape not in SHAPES or op not in ("xor", "and"):
        raise ValueError(f"unsupported binary MMA {shape}.{op}")
    return ptx_legacy_mma("int32", shape, "row", "col", "int1", "int1", "int32", a.data, a_offset, b.data, b_offset,
                          acc.data, acc_offset, False, op)


@contextlib.contextmanager
def when(cond):
    """IR builder: the statements of the block run only where ``cond`` holds (a TIR ``if``)."""
    with T.If(cond):
        with T.Then():
            yield


def store(buf, value, *indices) -> None:
    """IR builder: ``buf[indices] = value``."""
    T.buffer_store(buf, value, list(indices))


class PerThread:
    """A thread's registers (``regs`` values): a local buffer on CUDA, one row per thread on a CPU."""

    def __init__(self, ir: "KernelIR", buf):
        self.ir, self.buf = ir, buf

    def _at(self, reg):
        return (*self.ir.thread_index(), reg)

    def __getitem__(self, reg):
        return self.buf[self._at(reg)]

    def set(self, reg, value) -> None:
        store(self.buf, value, *self._at(reg))


class KernelIR:
    """Builds one kernel's statements for CUDA, or the same statements for a CPU.

    On CUDA the block and thread axes are launched once and every ``phase`` is straight code
    of one thread. On a CPU (``cpu=True``) the block axes are serial loops and each ``phase``
    loops over the block's threads, one after another: a phase ends where the CUDA kernel
    has a barrier (or a warp-wide MMA), so running the phases in order keeps the meaning.
    Per-thread registers (:meth:`local`) get one row per thread, shared memory is a plain
    buffer of the block, and :meth:`mma` is a TIR loop nest that computes the instruction
    from the lanes' fragments (the ISA's layout). The CPU build then runs the kernel's own
    index arithmetic, only the tensor core replaced.
    """

    def __init__(self, cpu: bool = False):
        self.cpu = cpu
        self._extent: dict = {}
        self._var: dict = {}

    @contextlib.contextmanager
    def grid(self, blocks: dict, threads: dict):
        """Launch (CUDA) or loop over (CPU) ``blocks`` ({"blockIdx.x": n, ...}); declare ``threads``
        ({"threadIdx.x": 32, "threadIdx.y": warps}). Yields the block variables."""
        self._extent = dict(threads)
        with contextlib.ExitStack() as stack:
            if self.cpu:
                yield [stack.enter_context(T.serial(0, ext)) for ext in blocks.values()]
                return
            block_vars = [stack.enter_context(T.launch_thread(ax, ext)) for ax, ext in blocks.items()]
            self._var = {ax: stack.enter_context(T.launch_thread(ax, ext)) for ax, ext in threads.items()}
            yield block_vars

    @contextlib.contextmanager
    def phase(self, *axes):
        """The code of one thread along ``axes``; yields their variables (in the order given)."""
        if not self.cpu:
            yield [self._var[ax] for ax in axes]
            return
        with contextlib.ExitStack() as stack:
            for ax in axes:
                self._var[ax] = stack.enter_context(T.serial(0, self._extent[ax]))
            yield [self._var[ax] for ax in axes]
        for ax in axes:
            del self._var[ax]

    def _axes(self) -> list:
        """Thread axes outermost first (threadIdx.z, .y, .x): a lane's row is the last index."""
        return sorted(self._extent, reverse=True)

    def thread_index(self) -> tuple:
        """Indices of the current thread's row in a :meth:`local` buffer (none on CUDA)."""
        if not self.cpu:
            return ()
        return tuple(self._var[ax] for ax in self._axes())

    def local(self, name: str, regs: int, dtype: str) -> PerThread:
        """Per-thread registers, allocated where the block starts."""
        rows = tuple(self._extent[ax] for ax in self._axes()) if self.cpu else ()
        return PerThread(self, IRBuilder.name(name, T.alloc_buffer((*rows, regs), dtype, scope="local")))

    def shared(self, name: str, size: int, dtype: str):
        """A block's shared memory (a plain buffer per block on a CPU)."""
        scope = "global" if self.cpu else "shared"
        return IRBuilder.name(name, T.alloc_buffer((size,), dtype, scope=scope))

    def view(self, name: str, buf, size: int, dtype: str):
        """The same memory as ``buf`` read as ``size`` elements of ``dtype``."""
        scope = "global" if self.cpu else "shared"
        return IRBuilder.name(name, T.decl_buffer((size,), dtype, data=buf.data, scope=scope))

    def barrier(self) -> None:
        """``__syncthreads()`` on CUDA; on a CPU the phases already run in order."""
        if not self.cpu:
            T.evaluate(T.tvm_storage_sync("shared"))

    def mma(self, shape: str, a: PerThread, a_off: int, b: PerThread, b_off: int, acc: PerThread, acc_off: int,
            op: str = "xor") -> None:
        """One warp's ``D += popc(A op B)``: the instruction on CUDA (in a lane's code), a loop nest
        over the warp's lanes on a CPU (outside any lane phase)."""
        if not self.cpu:
            T.evaluate(mma_b1(shape, a.buf, a_off, b.buf, b_off, acc.buf, acc_off, op))
            return
        slots = slots_of(shape)
        warp_at = tuple(self._var[ax] for ax in self._axes() if ax != "threadIdx.x")
        with T.serial(0, WARP) as lane:
            for reg in range(D_REGS):
                row, col = d_fragment(lane, reg)
                total = acc.buf[(*warp_at, lane, acc_off + reg)]
                for slot in range(slots):
                    # Which lane and register hold A[row, slot] and B[slot, col] (the ISA's layout).
                    a_word = a.buf[(*warp_at, (row % 8) * 4 + slot % 4, a_off + row // 8 + 2 * (slot // 4))]
                    b_word = b.buf[(*warp_at, col * 4 + slot % 4, b_off + slot // 4)]
                    bits = a_word ^ b_word if op == "xor" else a_word & b_word
                    total = total + T.Cast("int32", T.popcount(bits))
                store(acc.buf, total, *warp_at, lane, acc_off + reg)


def pair_word(neg: np.ndarray, real: np.ndarray, half: int) -> np.ndarray:
    """numpy: ``half`` bits of (neg, pos) pairs into one slot word: neg at bits 0..half-1, pos
    (real and not neg) at bits half..2*half-1. ``neg``/``real`` are (..., half) booleans."""
    weights = np.uint64(1) << np.arange(half, dtype=np.uint64)
    neg_bits = ((neg & real).astype(np.uint64) * weights).sum(axis=-1)
    pos_bits = ((~neg & real).astype(np.uint64) * weights).sum(axis=-1)
    return (neg_bits | (pos_bits << np.uint64(half))).astype(np.uint32)


def _bit_matrix(words: np.ndarray) -> np.ndarray:
    """(..., regs) uint32 -> (..., regs * 32) bits, bit i of register r at index 32 r + i."""
    shifts = np.arange(32, dtype=np.uint32)
    return ((words[..., None] >> shifts) & 1).reshape(*words.shape[:-1], -1).astype(np.uint8)


def emulate_mma_b1(shape: str, a: np.ndarray, b: np.ndarray, c: np.ndarray, op: str = "xor") -> np.ndarray:
    """numpy model of one warp's binary MMA, element by element as the PTX ISA lays it out.

    Parameters
    ----------
    shape : str
        ``"m16n8k128"`` or ``"m16n8k256"``.
    a, b : np.ndarray
        uint32 (32, regs) fragments of each lane (``SHAPES[shape]`` registers).
    c : np.ndarray
        int32 (32, 4) accumulators.
    op : str
        ``"xor"`` or ``"and"``.

    Returns
    -------
    np.ndarray
        int32 (32, 4): ``D`` in the same fragment layout.

    Notes
    -----
    Written from the ISA's per-element formulas (element ``i`` of a lane's fragment is bit
    ``i % 32`` of register ``i // 32``), independently of :func:`a_fragment` and friends, which
    the kernels use: an indexing slip in a kernel then shows up as a mismatch on the CPU.
    """
    k = 32 * slots_of(shape)
    lanes = np.arange(WARP)
    group, tig = lanes // 4, lanes % 4
    a_bits, b_bits = _bit_matrix(a), _bit_matrix(b)
    mat_a = np.zeros((MMA_M, k), np.uint8)
    mat_b = np.zeros((k, MMA_N), np.uint8)
    for i in range(a_bits.shape[1]):
        # k256: rows groupID for a0..a31 and a64..a95, +8 otherwise; +128 columns from a64.
        # k128: rows groupID for a0..a31, +8 for a32..a63.
        upper = (32 <= i < 64 or i >= 96) if k == 256 else i >= 32
        col = tig * 32 + (i & 31) + (128 if (k == 256 and i >= 64) else 0)
        mat_a[group + 8 * upper, col] = a_bits[:, i]
    for i in range(b_bits.shape[1]):
        row = tig * 32 + (i & 31) + (128 if i >= 32 else 0)
        mat_b[row, group] = b_bits[:, i]
    pairs = mat_a[:, :, None] ^ mat_b[None] if op == "xor" else mat_a[:, :, None] & mat_b[None]
    full = pairs.sum(axis=1, dtype=np.int64)  # (16, 8)
    out = np.empty((WARP, D_REGS), np.int64)
    for i in range(D_REGS):
        out[:, i] = c[:, i] + full[group + 8 * (i >= 2), tig * 2 + (i & 1)]
    return out.astype(np.int32)
