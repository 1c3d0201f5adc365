"""Plan spaces of the NEON kernels (ARM tuning on the emulated Pi, :mod:`sparks_tvm.tune.arm`).

The NEON kernels are written-out loop nests built from plain plans (dataclasses), which
MetaSchedule traces cannot express: each family has a knob space (candidate values, the
default's first) and a constructor from knobs to a plan (``None`` when invalid). The
output-channel chunks only split work across threads, which a one-thread instruction count
cannot see, so they follow the kernels' own rule rather than being a knob.
"""

from __future__ import annotations

from sparks_tvm.kernels import binary_conv2d_neon as dense_neon
from sparks_tvm.kernels import binary_neon_asm
from sparks_tvm.kernels import sparks_conv2d_neon as neon
from sparks_tvm.kernels.sparks_conv2d import index_bits

from .tuning import _uniq


def _o_chunks(tiles: int, blocks: int, cores: int) -> int:
    """The kernels' rule: split output channels when pixel tiles are fewer than ``2 * cores``."""
    if cores <= 1 or tiles >= 2 * cores:
        return 1
    want = -(-2 * cores // tiles)
    return max(d for d in range(1, min(want, blocks) + 1) if blocks % d == 0)


def neon_sparks_knobs(geom, num_codewords: int, cores: int) -> dict:
    """Candidate values of the NEON Sparks plan's knobs; each list starts with the default's.

    - ``tile``: pixels per task and gathered row, 16..128 (powers of two: LLVM legalizes other
      vector lengths into much longer code);
    - ``chunk``: pixels per stage-1 pass, a multiple of 16 dividing the tile;
    - ``block``: input channels per stage-1 block, a multiple of the index fields per byte,
      at most 28 (one byte sum): the balanced blocks for the fewest block counts, and a few
      short ones (stage 1's responses for a short block stay in fewer registers).
    """
    d = neon.default_plan(geom, num_codewords, cores)
    bits = index_bits(num_codewords)
    per = 8 // bits if bits < 8 else 1
    c = geom.in_channels
    blocks = []
    nmin = -(-c // neon.MAX_BLOCK)
    for nblk in range(nmin, nmin + 4):
        blocks.append(min(neon.MAX_BLOCK // per * per, -(-(-(-c // nblk)) // per) * per))
    blocks += [b for b in (8, 12, 16, 20, 24) if b % per == 0 and b < c]
    chunks = [ch for ch in neon.TILES if ch <= neon.CHUNK]  # powers of two, as the tiles
    return {"tile": _uniq([d.tile, *neon.TILES]), "chunk": _uniq([d.chunk, *chunks]),
            "block": _uniq([d.block, *blocks])}


def neon_sparks_plan(geom, num_codewords: int, cores: int, tile: int, chunk: int, block: int):
    """The NEON Sparks plan of these knobs (``o_chunks`` by the default rule), or None if invalid."""
    bits = index_bits(num_codewords)
    per = 8 // bits if bits < 8 else 1
    if tile % neon.VECTOR or chunk % neon.VECTOR or tile % chunk or chunk > neon.CHUNK or not 1 <= block <= neon.MAX_BLOCK \
            or block % per:
        return None
    tiles = geom.batch * neon.padded_pixels(geom.out_height * geom.out_width, tile, chunk) // tile
    return neon.NeonSparksPlan(tile, chunk, block, _o_chunks(tiles, geom.out_channels, cores))


def neon_dense_knobs(geom, cores: int) -> dict:
    """Candidate values of the NEON dense binary plan: pixels per tile, weight registers."""
    d = dense_neon.default_plan(geom, cores)
    oregs = -(-geom.out_channels // dense_neon.O_LANES)
    return {"pixels": _uniq([d.pixels, 2, 3, 4, 5, 6, 7]),
            "o_regs": _uniq([d.o_regs] + [q for q in (1, 2, 3, 4) if q <= oregs])}


def neon_dense_plan(geom, cores: int, pixels: int, o_regs: int):
    """The NEON dense plan of these knobs (``o_chunks`` by the default rule), or None if invalid
    (a tile that does not fit the registers of its ``asm`` block)."""
    if pixels < 1 or o_regs < 1 or not binary_neon_asm.fits(pixels, o_regs, geom.stride[1], geom.kernel[1]):
        return None
    tiles = geom.batch * geom.out_height * -(-geom.out_width // pixels)
    blocks = -(-(-(-geom.out_channels // dense_neon.O_LANES)) // o_regs)
    return dense_neon.NeonBinaryPlan(pixels, o_regs, _o_chunks(tiles, blocks, cores))


#: The NEON plan spaces by kernel family: (knobs(geom, K, cores), plan(geom, K, cores, **knobs)).
NEON_SPACES = {
    "sparks": (neon_sparks_knobs, neon_sparks_plan),
    "dense": (lambda geom, k, cores: neon_dense_knobs(geom, cores),
              lambda geom, k, cores, **kn: neon_dense_plan(geom, cores, **kn)),
}
