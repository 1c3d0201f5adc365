"""AArch64 instructions the NEON kernels reach only through LLVM's own intrinsics.

Some instructions have no TIR form: ``ld1`` and ``st1`` of two or four consecutive registers
take or return an LLVM struct, which a TIR call cannot. Small LLVM functions wrap them;
:func:`imported` links their IR into the kernel's module (TVM's ``pragma_import_llvm``) and
LLVM inlines them, so a call costs only the instruction it wraps. Their use is the point: a row load followed by
:func:`advance` of its pointer by a register becomes one post-indexed
``ld1 {v0.16b-v3.16b}, [x0], x1`` (LLVM folds the pointer update into the load).

Only for aarch64 targets: elsewhere the kernels keep their portable TIR.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script.ir_builder import tirx as T

#: Bytes per ``ld1`` / ``st1`` the helpers cover (two or four registers).
LD1_BYTES = (32, 64)


def _ld1_function(regs: int) -> str:
    struct = "{ " + ", ".join(["<16 x i8>"] * regs) + " }"
    lines = [f"declare {struct} @llvm.aarch64.neon.ld1x{regs}.v16i8.p0(ptr)",
             f"define linkonce_odr <{16 * regs} x i8> @sparks_tvm_ld1x{regs}(ptr %p) alwaysinline {{",
             f"  %r = call {struct} @llvm.aarch64.neon.ld1x{regs}.v16i8.p0(ptr %p)"]
    parts = []
    for i in range(regs):
        lines.append(f"  %v{i} = extractvalue {struct} %r, {i}")
        parts.append((f"%v{i}", 16))
    n = 0
    while len(parts) > 1:  # concatenate pairwise: <16> <16> -> <32> ... -> <16 * regs>
        merged = []
        for (a, la), (b, lb) in zip(parts[::2], parts[1::2]):
            mask = ", ".join(f"i32 {i}" for i in range(la + lb))
            lines.append(f"  %c{n} = shufflevector <{la} x i8> {a}, <{lb} x i8> {b}, <{la + lb} x i32> <{mask}>")
            merged.append((f"%c{n}", la + lb))
            n += 1
        parts = merged
    lines += [f"  ret <{16 * regs} x i8> {parts[0][0]}", "}"]
    return "\n".join(lines)


def _st1_function(regs: int) -> str:
    struct = ", ".join(["<16 x i8>"] * regs)
    lines = [f"declare void @llvm.aarch64.neon.st1x{regs}.v16i8.p0({struct}, ptr)",
             f"define linkonce_odr i32 @sparks_tvm_st1x{regs}(ptr %p, <{16 * regs} x i8> %v) alwaysinline {{"]
    for i in range(regs):
        mask = ", ".join(f"i32 {16 * i + j}" for j in range(16))
        lines.append(f"  %v{i} = shufflevector <{16 * regs} x i8> %v, <{16 * regs} x i8> poison, <16 x i32> <{mask}>")
    args = ", ".join(f"<16 x i8> %v{i}" for i in range(regs))
    lines += [f"  call void @llvm.aarch64.neon.st1x{regs}.v16i8.p0({args}, ptr %p)", "  ret i32 0", "}"]
    return "\n".join(lines)


def _count_step(masked: bool) -> str:
    """``acc + uaddlp(cnt(w ^ a [& m]))`` as one ``asm`` block (see :func:`count_step`)."""
    name = "sparks_tvm_count_step" + ("_masked" if masked else "")
    body = "eor $1.16b, $2.16b, $3.16b\\0A" + ("and $1.16b, $1.16b, $5.16b\\0A" if masked else "")
    body += "cnt $1.16b, $1.16b\\0Auadalp $0.8h, $1.16b"
    args = "<16 x i8> %w, <16 x i8> %a, <8 x i16> %acc" + (", <16 x i8> %m" if masked else "")
    cons = "=w,=&w,w,w,0" + (",w" if masked else "")
    return "\n".join([
        f"define linkonce_odr <8 x i16> @{name}({args}) alwaysinline {{",
        f"  %r = call {{ <8 x i16>, <16 x i8> }} asm \"{body}\", \"{cons}\"({args})",
        "  %s = extractvalue { <8 x i16>, <16 x i8> } %r, 0",
        "  ret <8 x i16> %s",
        "}"])


#: The helpers' LLVM IR (no triple: it takes the kernel module's).
HELPERS = "\n".join([_ld1_function(2), _ld1_function(4), _st1_function(2), _st1_function(4),
                     _count_step(False), _count_step(True),
                     "define linkonce_odr <8 x i16> @sparks_tvm_ld1r16(ptr %p) alwaysinline {",
                     "  %v = load i16, ptr %p, align 1",
                     "  %i = insertelement <8 x i16> poison, i16 %v, i64 0",
                     "  %s = shufflevector <8 x i16> %i, <8 x i16> poison, <8 x i32> zeroinitializer",
                     "  ret <8 x i16> %s",
                     "}",
                     "define linkonce_odr ptr @sparks_tvm_advance(ptr %p, i64 %d) alwaysinline {",
                     "  %q = getelementptr i8, ptr %p, i64 %d",
                     "  ret ptr %q",
                     "}"]) + "\n"


def imported(extra: str = ""):
    """Scope whose body may call the helpers (wrap a kernel's body once); ``extra``: more
    LLVM IR functions to link with them."""
    return T.attr(tirx.const(0, "int32"), "pragma_import_llvm", HELPERS + extra)


def ld1(ptr, nbytes: int):
    """``nbytes`` (:data:`LD1_BYTES`) bytes at ``ptr`` in one ``ld1``, as a uint8 vector.

    Not a pure call: bound once (``T.bind``) it stays one load, where TIR would copy a pure
    call into each use of the row.
    """
    if nbytes not in LD1_BYTES:
        raise ValueError(f"ld1 helpers load {LD1_BYTES} bytes, not {nbytes}")
    return tirx.call_extern(f"uint8x{nbytes}", f"sparks_tvm_ld1x{nbytes // 16}", ptr)


def st1(ptr, value, nbytes: int):
    """Store ``nbytes`` (:data:`LD1_BYTES`) bytes of ``value`` at ``ptr`` in one ``st1`` (a statement)."""
    if nbytes not in LD1_BYTES:
        raise ValueError(f"st1 helpers store {LD1_BYTES} bytes, not {nbytes}")
    T.evaluate(tirx.call_extern("int32", f"sparks_tvm_st1x{nbytes // 16}", ptr, value))


def ld1r16(ptr):
    """The 16-bit value at ``ptr`` in all eight lanes (one ``ld1r {v.8h}``); bind it once."""
    return tirx.call_extern("uint16x8", "sparks_tvm_ld1r16", ptr)


def count_step(acc, w, a, m=None):
    """``acc + uaddlp(cnt((w ^ a) & m))``: ``eor`` (``and``), ``cnt``, ``uadalp`` kept together.

    One ``asm`` block, so that the three stay in order around their one temporary register:
    as separate operations LLVM's scheduler computes every ``eor`` of an unrolled tile first,
    and the results spill. ``acc`` uint16x8; ``w``, ``a``, ``m`` uint8x16. Bind it once.
    """
    if m is None:
        return tirx.call_extern("uint16x8", "sparks_tvm_count_step", w, a, acc)
    return tirx.call_extern("uint16x8", "sparks_tvm_count_step_masked", w, a, acc, m)


def advance(ptr, delta):
    """``ptr + delta`` bytes (a handle)."""
    return tirx.call_pure_extern("handle", "sparks_tvm_advance", ptr, tirx.Cast("int64", delta))


def table_lanes(entries: int) -> int:
    """Size of a byte table :func:`table_lookup` reads whole: 16, 32 or 64 (``tbl`` registers)."""
    for size in (16, 32, 64):
        if entries <= size:
            return size
    return entries


def table_lookup(table, entries: int, index, lanes: int, aarch64: bool):
    """``table[index]`` lane by lane, ``index < entries``.

    On aarch64 a byte table of up to 64 entries is one ``tbl`` per vector (its 1, 2 or 4
    registers loaded once); elsewhere, or for other lane counts, a gather.
    """
    size = table_lanes(entries)
    if aarch64 and size <= 64 and lanes in (8, 16) and table.dtype == "uint8":
        regs = [tirx.BufferLoad(table, [tirx.Ramp(q, 1, 16)]) for q in range(0, size, 16)]
        return tirx.call_llvm_pure_intrin(f"uint8x{lanes}", f"llvm.aarch64.neon.tbl{len(regs)}", *regs,
                                          tirx.Cast(f"uint8x{lanes}", index))
    if lanes == 1:
        return tirx.BufferLoad(table, [tirx.Cast("int32", index)])
    picks = [tirx.BufferLoad(table, [tirx.Cast("int32", tirx.Shuffle([index], [tirx.IntImm("int32", i)]))])
             for i in range(lanes)]
    return tirx.Shuffle(picks, [tirx.IntImm("int32", i) for i in range(lanes)])
