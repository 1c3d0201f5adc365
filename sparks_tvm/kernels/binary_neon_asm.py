"""The dense NEON kernel's inner step, one tap row of one tile, as an AArch64 ``asm`` block.

Written as vector TIR, the row is right instruction for instruction, but LLVM's scheduler
hoists the loads and ``eor``\\ s of an unrolled tile far above their use and the registers
spill (a 2x range of instruction counts across layer shapes). An ``asm`` block fixes the
order and the registers, as the BGEMM kernels of Larq Compute Engine and ruy do.

One block, for ``P`` pixels of one output row and ``Q`` weight registers (``8 Q`` output
channels) at one channel-byte pair and one kernel row ``dy``:

- the row's input words (16 bits: the pair's two bytes) are broadcast once each (``ld1r``,
  post-indexed) and serve every pixel and column tap that reads them: pixel ``i``, column tap
  ``dx`` reads word ``i * sw + dx``; at column stride ``sw > 1`` the words are walked by
  residue class (``dx mod sw``), so a class's words die before the next class loads;
- per column tap, the ``Q`` weight registers load in one ``ld1`` (post-indexed);
- per (pixel, register): ``eor``, ``cnt``, ``uadalp`` into the accumulator, two temporaries
  alternating.

The accumulators are tied operands (LLVM keeps them in registers across the loop over
pairs); words and temporaries are early-clobbered outputs LLVM picks; the weights take fixed
consecutive registers from ``v16`` (a multi-register ``ld1`` needs consecutive ones), clobbered.
:func:`row_step_ir` is the LLVM function that wraps one block; :func:`row_step` calls it from TIR.
"""

from __future__ import annotations

from tvm import tirx

#: The register budget of a block's own values (words, weights, temporaries); the weights'
#: fixed registers are its first ones.
SCRATCH = tuple(range(16, 31))


def column_order(sw: int, kw: int) -> list:
    """The column taps of a kernel row in the order the blocks (and the packed weights) take
    them: by residue class ``dx mod sw``, then ``dx``."""
    return sorted(range(kw), key=lambda dx: (dx % sw, dx))


def class_words(pixels: int, sw: int, kw: int) -> list:
    """Per residue class ``g`` of the column taps (``dx mod sw``): the words read, in order."""
    groups = []
    for g in range(min(sw, kw)):
        taps = [dx for dx in range(kw) if dx % sw == g]
        words = sorted({i * sw + dx for i in range(pixels) for dx in taps})
        groups.append((taps, words))
    return groups


def live_words(pixels: int, sw: int, kw: int) -> int:
    """Most words live at once: a column tap's words, plus those a later tap of its class
    reads that it does not (loaded when first read, freed after their last read)."""
    most = 0
    for taps, _ in class_words(pixels, sw, kw):
        for n_dx, dx in enumerate(taps):
            now = {i * sw + dx for i in range(pixels)}
            before = {i * sw + d for i in range(pixels) for d in taps[:n_dx]}
            later = {i * sw + d for i in range(pixels) for d in taps[n_dx + 1:]}
            most = max(most, len(now | (before & later)))
    return most


def scratch(pixels: int, regs: int, sw: int, kw: int) -> tuple:
    """The vector registers a block uses itself (weights, two temporaries, live words)."""
    return SCRATCH[:regs + 2 + live_words(pixels, sw, kw)]


def fits(pixels: int, regs: int, sw: int, kw: int) -> bool:
    """Whether a tile's block fits the registers: its own (at most ``SCRATCH``'s 15), the
    accumulators (at most 16) in the rest."""
    return pixels * regs <= 16 and regs + 2 + live_words(pixels, sw, kw) <= len(SCRATCH)


def name(pixels: int, regs: int, sw: int, kw: int) -> str:
    return f"sparks_tvm_brow_p{pixels}_q{regs}_s{sw}_k{kw}"


def _asm_text(pixels: int, regs: int, sw: int, kw: int) -> str:
    """The block's assembly. Operands: outputs ``$0 .. $(A-1)`` the accumulators, then the word
    pointers (one per residue class) and the weight pointer, then the scratch registers
    (early-clobbered outputs: LLVM picks them); the accumulators and pointers again as tied
    inputs; last, the word step register (bytes, ``2 sw``)."""
    acc_n = pixels * regs
    groups = class_words(pixels, sw, kw)
    wptr = acc_n + len(groups)
    first = wptr + 1  # scratch operands
    n_scratch = len(scratch(pixels, regs, sw, kw)) - regs
    step = first + n_scratch + wptr + 1
    free = [f"${first + i}" for i in range(n_scratch)]
    # ld1 of several registers takes consecutive ones: the weights' are fixed (clobbered)
    weights = [f"v{r}" for r in SCRATCH[:regs]]
    temps, words = free[:2], free[2:]
    lines, temp = [], 0
    for g, (taps, cls) in enumerate(groups):
        regs_of, pool, loaded = {}, list(words), set()
        for n_dx, dx in enumerate(taps):
            for k in sorted({i * sw + dx for i in range(pixels)} - set(regs_of) - loaded):  # ascending
                regs_of[k] = pool.pop(0)
                loaded.add(k)
                lines.append(f"ld1r {{{regs_of[k]}.8h}}, [${acc_n + g}], {'#2' if sw == 1 else f'${step}'}")
            wl = ", ".join(f"{r}.16b" for r in weights)
            lines.append(f"ld1 {{{wl}}}, [${wptr}], #{16 * regs}")
            for i in range(pixels):
                a = regs_of[i * sw + dx]
                for r in range(regs):
                    t = temps[temp]
                    temp ^= 1
                    lines += [f"eor {t}.16b, {weights[r]}.16b, {a}.16b", f"cnt {t}.16b, {t}.16b",
                              f"uadalp ${i * regs + r}.8h, {t}.16b"]
            later = {i * sw + d for i in range(pixels) for d in taps[n_dx + 1:]}
            for k in [k for k in regs_of if k not in later]:
                pool.append(regs_of.pop(k))  # the word is dead: its register serves the next ones
    return "\\0A".join(lines)


def row_step_ir(pixels: int, regs: int, sw: int, kw: int) -> str:
    """LLVM IR of ``name(...)(acc, words..., weights, step)``: the block on the ``P * Q``
    uint16x8 accumulators at ``acc`` (loaded, updated, stored back: after inlining they are
    registers)."""
    acc_n = pixels * regs
    groups = len(class_words(pixels, sw, kw))
    n_scratch = len(scratch(pixels, regs, sw, kw)) - regs
    vec = "<8 x i16>"
    ptrs = [f"%p{g}" for g in range(groups)]
    ret = "{ " + ", ".join([vec] * acc_n + ["ptr"] * (groups + 1) + ["<16 x i8>"] * n_scratch) + " }"
    cons = ",".join(["=w"] * acc_n + ["=r"] * (groups + 1) + ["=&w"] * n_scratch
                    + [str(i) for i in range(acc_n + groups + 1)] + ["r"] + [f"~{{v{r}}}" for r in SCRATCH[:regs]])
    lines = [f"define linkonce_odr i32 @{name(pixels, regs, sw, kw)}(ptr %acc, "
             + ", ".join(f"ptr {p}" for p in ptrs) + ", ptr %w, i64 %step) alwaysinline {"]
    args = []
    for i in range(acc_n):
        lines.append(f"  %g{i} = getelementptr i8, ptr %acc, i64 {16 * i}")
        lines.append(f"  %a{i} = load {vec}, ptr %g{i}, align 2")
        args.append(f"{vec} %a{i}")
    args += [f"ptr {p}" for p in ptrs] + ["ptr %w", "i64 %step"]
    lines.append(f"  %r = call {ret} asm \"{_asm_text(pixels, regs, sw, kw)}\", \"{cons}\"({', '.join(args)})")
    for i in range(acc_n):
        lines.append(f"  %s{i} = extractvalue {ret} %r, {i}")
        lines.append(f"  store {vec} %s{i}, ptr %g{i}, align 2")
    lines += ["  ret i32 0", "}"]
    return "\n".join(lines) + "\n"


def row_step(pixels: int, regs: int, sw: int, kw: int, acc, words: list, weights, step):
    """Call the block (an ``int32`` expression to evaluate): ``acc`` the accumulators'
    address, ``words`` each residue class's first word address, ``weights`` the tap row's."""
    return tirx.call_extern("int32", name(pixels, regs, sw, kw), acc, *words, weights,
                            tirx.Cast("int64", step))
