"""ARM (aarch64 NEON) schedules: the NEON Sparks kernel, and target choices over the host core.

The Sparks op on ARM is :mod:`sparks_tvm.kernels.sparks_conv2d_neon`, a kernel whose loop
nest is written out (only its ``out`` block, with the epilogue Relax fused into it, is
scheduled here: :func:`apply_neon_out_schedule`). The dense binary and float convs use the
host scheduling core (:mod:`schedules.host`). This file fixes what differs on an ARM board:

- the core count: a Raspberry Pi has 4 cores (the host default reads ``num-cores``, which
  an ARM target string often leaves out, and would fall back to 1 thread);
- the vector width: NEON registers are 128 bits (16 bytes). ``tirx.popcount`` on a vector of
  bytes (the Sparks op's stage 1 works on byte lanes) lowers through LLVM to ``cnt v.16b``,
  which the tests check in the cross-compiled ELF's disassembly;
- the generic Sparks kernel's pixel tile (see :meth:`ArmSchedules.sparks_tile`), picked by
  counting instructions on the emulated Pi; only tuning tasks build that kernel on ARM.

The dense binary conv is :mod:`sparks_tvm.kernels.binary_conv2d_neon` (a register-tiled
XOR-popcount micro-kernel) wherever it applies (at most 31 taps), else the host core's kernel;
the float convs :mod:`sparks_tvm.kernels.float_conv2d_neon` (column strides 1 and 2), max
pooling :mod:`sparks_tvm.kernels.max_pool2d_neon`; which of Sparks and dense a layer gets
follows an instruction model of the two NEON kernels (:meth:`ArmSchedules.sparks_is_cheaper`).

The NEON kernels are not MetaSchedule-tunable (``tuned_kinds`` leaves them out): their plans
are tuned by counting instructions on the emulated Pi (``sparks_tvm.tune.arm``), and
``compile(..., tuning_db=...)`` hands the records to :meth:`ArmSchedules.for_target`
(``plans``). ``ArmSchedules(neon_binary=False)`` builds the host core's dense binary kernel
instead, which MetaSchedule can search.
"""

from __future__ import annotations

from sparks_tvm.kernels.sparks_conv2d import DEFAULT_GROUP, padded_pixels
from sparks_tvm.cost import sparks_is_cheaper
from sparks_tvm.kernels import binary_conv2d_neon, float_conv2d_neon, max_pool2d_neon
from sparks_tvm.kernels.sparks_conv2d_neon import default_plan, sparks_conv2d_neon_primfunc
from sparks_tvm.kernels.sparks_conv2d_neon import padded_pixels as sparks_padded_pixels

from .host import HostSchedules, groups_per_block, output_chunks, register_deferred_kind

#: NEON vector register width in bytes (128 bits) on every aarch64 core.
NEON_BYTES = 16
#: Cores of a Raspberry Pi 3/4/5, used when the target does not say.
DEFAULT_ARM_CORES = 4
#: Output pixels per vector step of the NEON kernels' ``out`` blocks (8 float32 registers:
#: half the loop overhead of 16, about 1% fewer instructions per layer).
OUT_LANES = 32


def apply_neon_out_schedule(sch, lanes: int = OUT_LANES):
    """Schedule the ``out`` block of the NEON Sparks kernel (its loop nest is written out).

    ``out`` (with any epilogue inlined into it) runs over (n, o) in parallel, pixels in
    vectors of ``lanes`` (a divisor of the pixel count, so no predicated tail).
    """
    out = sch.get_sblock("out")
    n, o, p = sch.get_loops(out)
    sch.parallel(sch.fuse(n, o))
    pixels = int(sch.get(p).extent)
    step = max(d for d in range(1, min(lanes, pixels) + 1) if pixels % d == 0)
    sch.vectorize(sch.split(p, [None, step])[1])
    return sch


register_deferred_kind("sparks_neon", lambda sch, spec: apply_neon_out_schedule(sch, int(spec["lanes"])))
register_deferred_kind("binary_neon", lambda sch, spec: apply_neon_out_schedule(sch, int(spec["lanes"])))
register_deferred_kind("float_neon", lambda sch, spec: apply_neon_out_schedule(sch, int(spec["lanes"])))


class ArmSchedules(HostSchedules):
    """Kernel builders for LLVM ARM CPU targets (aarch64 with NEON, e.g. a Raspberry Pi 4).

    Parameters
    ----------
    cores : int
        Threads the schedules split work across (TVM's thread pool on the device).
    vector_bytes : int
        Width of one vector register in bytes (16 for NEON).
    neon_binary : bool
        Dense binary convs on the NEON kernel (default); ``False``: the host core's kernel,
        which tuning can search.
    """

    name = "arm"
    #: ``neon_binary`` when the constructor is not told (what ``for_target`` builds).
    default_neon_binary = True

    def __init__(self, cores: int = DEFAULT_ARM_CORES, vector_bytes: int = NEON_BYTES, neon_binary: bool | None = None):
        super().__init__(cores)
        self.vector_bytes = vector_bytes  # set after: the host default is its widest (AVX-512) vector
        self.neon_binary = self.default_neon_binary if neon_binary is None else neon_binary

    @property
    def tuned_kinds(self) -> tuple:
        """Kernel kinds tuning may replace (not the NEON kernels)."""
        return () if self.neon_binary else ("binary",)

    #: Tuned NEON plans and Sparks-vs-dense choices (``sparks_tvm.tune.arm_records.ArmPlans``),
    #: or None: the defaults. Set by :meth:`for_target` for ``compile(..., tuning_db=...)``.
    plans = None
    #: The target is aarch64 (AArch64 intrinsics allowed); :meth:`for_target` sets it.
    aarch64 = True

    @classmethod
    def for_target(cls, target, plans=None) -> "ArmSchedules":
        """Choices for a ``tvm.target.Target`` (``num-cores`` if given, else a Pi's 4 cores).

        ``plans``: the records of an ARM tuning run (``sparks_tvm.tune.arm_records.ArmPlans``),
        consulted by :meth:`neon_plan`, :meth:`schedule_binary_conv2d` and
        :meth:`sparks_is_cheaper` before their defaults.
        """
        cores = int(target.attrs["num-cores"]) if "num-cores" in target.attrs else DEFAULT_ARM_CORES
        sched = cls(cores=max(1, cores))
        sched.plans = plans
        sched.aarch64 = str(target.attrs.get("mtriple", "")).startswith(("aarch64", "arm64"))
        return sched

    #: Stage-2 pixel tile of the Sparks op on NEON, chosen with benchmarks/bench_arm_icount.py's
    #: instruction counter (the 7 ResNet-18 shapes, one call each). int16 stage 1: 64 gave
    #: 15-25% fewer aarch64 instructions than the host rule's 32 for 16-byte vectors. int8 stage 1:
    #: 64 -> 47.6 M, 32 -> 48.0 M, 128 -> 66.9 M. Byte-lane stage 1: 32 -> 32.5 M, 64 -> 33.9 M,
    #: 128 -> 45.2 M in total (32 wins on 4 of 7 layers); 32.
    sparks_pixel_tile = 32
    #: The tile for row-stride-1 layers of more than one tile, whose patch planes are flat
    #: (whole vectors over the padded pixels): 64 there is 10-20% fewer instructions at every
    #: K (K=16: 64->64 6.10 -> 5.41 M, 128->128 4.72 -> 4.24 M, 256->256 5.31 -> 4.81 M), while
    #: the stride-2 and 7x7 layers stay best at 32 (64->128 s2: 3.06 M at 32, 3.64 M at 64).
    flat_pixel_tile = 64

    def sparks_tile(self, geom) -> int:
        """NEON pixel tile for one layer (see :attr:`flat_pixel_tile`)."""
        many = geom.out_height * geom.out_width > self.flat_pixel_tile
        return self.flat_pixel_tile if geom.stride[0] == 1 and many else self.sparks_pixel_tile

    def sparks_params(self, geom, num_codewords: int) -> dict:
        """The host core's knobs, with the NEON pixel tile (channel block and chunks follow it)."""
        knobs = super().sparks_params(geom, num_codewords)
        tile = self.sparks_tile(geom)
        if knobs.get("tile") != tile:
            tiles = geom.batch * padded_pixels(geom, tile) // tile
            knobs.update(tile=tile, block=groups_per_block(geom.in_channels, num_codewords, tile, DEFAULT_GROUP),
                         o_chunks=output_chunks(tiles, geom.out_channels, self.cores))
        return knobs

    def neon_plan(self, geom, num_codewords: int):
        """The NEON Sparks kernel's plan for one layer (tile, chunk, channel block, o-chunks).

        The tuned plan where :attr:`plans` has one for the layer, else :func:`default_plan`.
        """
        tuned = self.plans.sparks_plan(geom, num_codewords) if self.plans is not None else None
        return tuned if tuned is not None else default_plan(geom, num_codewords, self.cores)

    def schedule_sparks_conv2d(self, geom, num_codewords: int, mode: str, shift: bool = False):
        """The NEON Sparks kernel (same parameters and output as the host kernel)."""
        plan = self.neon_plan(geom, num_codewords)
        func = sparks_conv2d_neon_primfunc(geom, num_codewords, mode, plan, shift=shift, aarch64=self.aarch64)
        return self._finish(func, {"kind": "sparks_neon", "lanes": OUT_LANES})

    def dense_plan(self, geom, mode: str):
        """The NEON dense kernel's plan for one layer: the tuned one where :attr:`plans` has it."""
        plan = self.plans.dense_plan(geom, mode) if self.plans is not None else None
        return plan if plan is not None else binary_conv2d_neon.default_plan(geom, self.cores)

    def schedule_binary_conv2d(self, geom, mode: str, shift: bool = False):
        """The NEON dense binary kernel where it applies, else the host core's."""
        if not (self.neon_binary and binary_conv2d_neon.supports(geom)):
            return super().schedule_binary_conv2d(geom, mode, shift=shift)
        func = binary_conv2d_neon.binary_conv2d_neon_primfunc(geom, mode, self.dense_plan(geom, mode), shift=shift,
                                                              aarch64=self.aarch64)
        return self._finish(func, {"kind": "binary_neon", "lanes": OUT_LANES})

    def binary_weights(self, geom, mode: str, signs):
        """The weight constant :meth:`schedule_binary_conv2d`'s kernel takes for ``signs`` (+-1)."""
        if not (self.neon_binary and binary_conv2d_neon.supports(geom)):
            return super().binary_weights(geom, mode, signs)
        return binary_conv2d_neon.pack_weights(geom, signs, self.dense_plan(geom, mode))

    #: Whole-layer aarch64 instruction model of the two NEON kernels, least-squares fitted to
    #: counted layers: Sparks to the 21 of ``benchmarks/results/arm_icount.json`` (7 ResNet-18
    #: shapes x K 16/32/64, code 1bdab85), dense to its kernel's 7 shapes; with both it picks
    #: the cheaper kernel on all 21 (test_neon_binary_kernel checks the counted choice). Sparks:
    #: per ``C*K*PP`` (stage 1), ``C*O*PP`` (stage 2), input element (binarize, triples),
    #: ``PP`` the kernel's padded pixels. Dense (the output-channel-lane kernel, fitted to its
    #: 7 ResNet-18 shapes counted kernel by kernel): per step of one pixel x 8 output channels x
    #: 16 channels x tap (pixels padded to whole tiles per row), input element, output element
    #: (no per-call term: with one, the fit extrapolates to small layers badly).
    SPARKS_MODEL = (0.218, 0.1263, 1.1318)
    DENSE_MODEL = (3.674, 1.781, -0.7436)

    def estimated_instructions(self, geom, num_codewords: int | None) -> float:
        """Modelled instructions of one whole layer (Sparks with ``num_codewords``, else dense)."""
        pixels = geom.out_height * geom.out_width * geom.batch
        inputs = geom.batch * geom.in_channels * geom.height * geom.width
        c, o = geom.in_channels, geom.out_channels
        if num_codewords is not None:
            plan = self.neon_plan(geom, num_codewords)
            pp = geom.batch * sparks_padded_pixels(geom.out_height * geom.out_width, plan.tile, plan.chunk)
            a, b, e = self.SPARKS_MODEL
            return a * c * num_codewords * pp + b * c * o * pp + e * inputs
        taps = geom.kernel[0] * geom.kernel[1]
        tile = self.dense_plan(geom, "sign").pixels
        padded = geom.batch * geom.out_height * -(-geom.out_width // tile) * tile
        a, e, g = self.DENSE_MODEL
        return a * padded * -(-o // 8) * -(-c // 16) * taps + e * inputs + g * o * pixels

    def sparks_is_cheaper(self, geom, num_codewords: int) -> bool:
        """Sparks or dense for one layer on NEON: as measured by tuning (:attr:`plans`), else
        by :meth:`estimated_instructions`."""
        if not (self.neon_binary and binary_conv2d_neon.supports(geom)):
            return True  # the host core's dense kernel is 2-7x the NEON Sparks kernel
        measured = self.plans.sparks_is_cheaper(geom, num_codewords) if self.plans is not None else None
        if measured is not None:
            return measured
        if geom.in_channels < 64 or geom.out_height * geom.out_width < 49:
            # outside the fitted layers (ResNet-18's): the BOPs model, which favours the codebook
            pixels = geom.batch * geom.out_height * geom.out_width
            return sparks_is_cheaper(geom.in_channels, geom.out_channels, pixels, num_codewords)
        return self.estimated_instructions(geom, num_codewords) < self.estimated_instructions(geom, None)

    @property
    def float_lanes(self) -> int:
        """Output channels per float tile: 8 (two NEON registers; the packed weights' V)."""
        return float_conv2d_neon.LANES

    def schedule_float_conv2d(self, geom):
        """The NEON float conv (``fmla`` by element over an 8x8 register tile) where it applies."""
        if not float_conv2d_neon.supports(geom):
            return super().schedule_float_conv2d(geom)
        return self._finish(float_conv2d_neon.float_conv2d_neon_primfunc(geom), {"kind": "float_neon", "lanes": OUT_LANES})

    def schedule_max_pool2d(self, in_shape, kernel, stride, padding, out_shape):
        """The NEON max pool (:mod:`sparks_tvm.kernels.max_pool2d_neon`), already scheduled."""
        return max_pool2d_neon.max_pool2d_neon_primfunc(in_shape, kernel, stride, padding, out_shape)

    @property
    def int8_lanes(self) -> int:
        """int8 lanes per NEON register (16): stage-1 responses and popcount bytes."""
        return self.vector_bytes

    @property
    def int16_lanes(self) -> int:
        """int16 lanes per NEON register (8): the Sparks accumulator."""
        return self.vector_bytes // 2

    def __repr__(self) -> str:
        return f"ArmSchedules(cores={self.cores}, vector_bytes={self.vector_bytes}, neon_binary={self.neon_binary})"
