"""MetaSchedule design spaces for sparks_tvm's binary kernels (LLVM CPUs: x86 and ARM; CUDA).

Generic MetaSchedule rules do not fit the Sparks op (STACK.md: a naive two-stage op tuned
generically ends slower than a float conv; AutoInline folds stage 1 back into stage 2), so
each binary kernel gets a hand-written space: the structure of :mod:`schedules.host`'s
default schedule, with its knobs as sampled decisions.

Sparks op (:func:`sparks_space`), knobs sampled with ``SampleCategorical``:

- pixel tile ``T`` (parallel tasks x vector width): a divisor of the padded pixel count
  ``Ppad``, which is fixed by the default tile the kernel was built with, so every tile
  sampled is a sub-tile of the default layout and the default tile is one of them;
- channel block ``CB`` (stage 1 computed per CB input channels; its ``CB*K*T`` responses
  should stay in L1);
- output-channel chunks (parallel tasks when pixel tiles are few);
- unroll factor of the gather-accumulate loop over input channels;
- output-channel register block (``OB`` accumulator rows updated per input channel: more
  independent add chains);
- where stage 1 is computed: per channel block (default) or once per task (all channels).

Structural choices (whether the unroll / register-block splits exist, stage 1's location)
are separate design spaces: a trace is replayed with new decisions but the same
instructions. Space 0 is exactly the default schedule's structure, so with the default
decisions it yields the default schedule itself (``tests/test_tune.py`` checks that it is
structurally equal to :func:`schedules.host.schedule_sparks_conv2d`'s): tuning can match
it and only keeps something else if it measures faster.

Dense binary conv (:func:`binary_space`): the default schedule, and a variant with an
output-channel register block (one packed activation word reused by ``OB`` output
channels) and a split of the output columns.
"""

from __future__ import annotations

import dataclasses
import random

import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm.ir.utils import derived_object
from tvm.s_tir.meta_schedule.mutator import PyMutator
from tvm.s_tir.schedule import Trace

from sparks_tvm.kernels import binary_conv2d_primfunc, sparks_conv2d_primfunc
from sparks_tvm.kernels.sparks_conv2d import DEFAULT_GROUP, padded_pixels
from sparks_tvm.kernels.sparks_conv2d_gpu import sparks_conv2d_gpu_primfunc

from . import host
from .cuda import apply_sparks_gpu_schedule
from .cuda_binary import apply_binary_gpu_schedule

#: Name of the workload function in a tuning task (MetaSchedule's convention).
WORKLOAD_NAME = "main"


def _scheduled(sch) -> tirx.PrimFunc:
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _divisors(n: int) -> list:
    return [d for d in range(1, n + 1) if n % d == 0]


def _uniq(values) -> list:
    out = []
    for v in values:
        if v not in out:
            out.append(int(v))
    return out


# ----------------------------------------------------------------------------- Sparks op


def sparks_knob_candidates(geom, num_codewords: int, default: dict, cores: int) -> dict:
    """Candidate values of each Sparks knob; each list starts with the default's value.

    Parameters
    ----------
    geom : ConvGeometry
    num_codewords : int
    default : dict
        ``{"tile", "block", "o_chunks"}`` of the default schedule
        (:meth:`schedules.host.HostSchedules.sparks_params`); ``tile`` also fixed ``Ppad``.
    cores : int
        Threads of the target (bounds the output-channel chunks worth trying).
    """
    t0 = int(default["tile"])
    ppad = padded_pixels(geom, t0)
    # Sub-tiles of whole vectors (>= 16 int8 lanes, one 128-bit NEON/SSE register).
    tiles = [t0] + [t for t in (16, 32, 64, 128, 256) if t != t0 and ppad % t == 0]
    groups = -(-geom.in_channels // DEFAULT_GROUP)
    # Stage-1 block of b groups = b*G*K*T int8: from one group up to 256 KB (L2-sized) at the default tile.
    cap = max(1, (256 * 1024) // (DEFAULT_GROUP * num_codewords * t0))
    blocks = [int(default["block"])] + [d for d in _divisors(groups) if d <= cap]
    chunks = [int(default["o_chunks"])] + [d for d in (1, 2, 4, 8) if d <= max(1, geom.out_channels // 8)
                                            and d <= 4 * cores]
    return {
        "tile": _uniq(tiles),
        "block": _uniq(blocks)[:8],
        "o_chunks": _uniq(chunks),
        "o_block": [2, 4],
    }


#: The schedule core lives in host.py; the space samples its knobs.
apply_sparks_schedule = host.apply_sparks_schedule


#: Structural variants of the Sparks space: (unroll the group loop, o register block, stage-1 place).
SPARKS_STRUCTURES = (
    (False, False, "block"),  # the default schedule's structure
    (True, False, "block"),
    (False, True, "block"),
    (True, True, "block"),
    (True, False, "task"),
)


def _sample(sch, values):
    """A categorical decision over ``values``, uniform; a lone value needs no sampling."""
    if len(values) == 1:
        return int(values[0])
    return sch.sample_categorical(candidates=[int(v) for v in values], probs=[1.0 / len(values)] * len(values))


def sparks_space(geom, num_codewords: int, default: dict, cores: int):
    """The Sparks op's design space: a ``ScheduleFn`` function returning one schedule per structure."""
    cand = sparks_knob_candidates(geom, num_codewords, default, cores)

    def space(sch: s_tir.Schedule):
        outs = []
        for unroll, with_oblock, stage1_at in SPARKS_STRUCTURES:
            s = sch.copy()
            s.seed(random.randrange(1 << 30))
            apply_sparks_schedule(
                s,
                tile=_sample(s, cand["tile"]),
                block=_sample(s, cand["block"]),
                o_chunks=_sample(s, cand["o_chunks"]),
                unroll=unroll,
                o_block=_sample(s, cand["o_block"]) if with_oblock else None,
                stage1_at=stage1_at,
                split_padding=False,  # MetaSchedule prints traces; TVM cannot print decompose_padding
            )
            outs.append(s)
        return outs

    return space


def describe_trace(trace) -> str:
    """Knob values of a Sparks-op trace, e.g. ``T=32 chunks=1 blocks=2 OB=2 unroll stage1@block``.

    Reads the split factors from the trace (sampled or literal), so it describes the default
    schedule's trace too. Relies on :func:`apply_sparks_schedule`'s instruction order.
    """
    splits, unrolls, fuses, compute_ats = [], 0, [], []
    loop_splits = None  # splits of the stage-2 loop nest: those before the first compute_at
    for inst in trace.insts:
        name = inst.kind.name
        if name == "Split":
            splits.append([_factor(trace, f) for f in inst.inputs[1:]])
        elif name == "Unroll" and len(compute_ats) == 1:
            unrolls += 1  # the group loop's, right after stage 2's partial sums are placed
        elif name == "Fuse":
            fuses.append(inst.outputs[0])
        elif name == "ComputeAt":
            compute_ats.append(inst)
            if loop_splits is None:
                loop_splits = len(splits)
    if len(splits) < 3:
        return "?"
    parts = [f"T={splits[0][1]}", f"chunks={splits[1][0]}", f"blocks={splits[2][1]}"]
    # Later splits (the output's vector lanes, flat patch planes) are not knobs.
    has_oblock = (loop_splits if loop_splits is not None else len(splits)) >= 4
    if has_oblock:
        parts.append(f"OB={splits[3][1]}")
    if unrolls > 0:
        parts.append("unroll")
    at_task = len(compute_ats) >= 2 and bool(fuses) and compute_ats[1].inputs[1].same_as(fuses[0])
    parts.append("stage1@" + ("task" if at_task else "block"))
    return " ".join(parts)


def _factor(trace, f):
    if f is None:
        return None
    if isinstance(f, tirx.IntImm):
        return int(f)
    for inst, v in trace.decisions.items():
        if inst.kind.name == "SampleCategorical" and inst.outputs[0].same_as(f):
            return int(inst.attrs[0][int(v)])
    return None


# ----------------------------------------------------------------------------- dense binary conv


def binary_knob_candidates(geom) -> dict:
    ow = geom.out_width
    return {
        "o_block": [2, 4, 8],
        "columns": _uniq([ow] + [d for d in _divisors(ow) if d >= 4][-3:]),
    }


#: The dense binary schedule core lives in host.py too.
apply_binary_schedule = host.apply_binary_schedule


def binary_space(geom):
    """The dense binary conv's design space (default structure + register-blocked variant)."""
    cand = binary_knob_candidates(geom)

    def space(sch: s_tir.Schedule):
        base = sch.copy()
        apply_binary_schedule(base)
        blocked = sch.copy()
        blocked.seed(random.randrange(1 << 30))
        apply_binary_schedule(blocked, o_block=_sample(blocked, cand["o_block"]),
                              columns=_sample(blocked, cand["columns"]))
        return [base, blocked]

    return space


# ----------------------------------------------------------------------------- CUDA


def cuda_sparks_space(params):
    """The CUDA Sparks kernel's design space around the default knobs ``params``.

    The kernel is built with ``params.tile_words``, ``params.group`` and ``params.splits``
    (they shape the computation), so the space keeps them and varies how the tile is mapped:

    - structure (one design space each): stage-1 words per thread ``vec`` in {1, 2, 4}
      dividing the tile, with ``threads_x = tile_words / vec`` (so the default is one point);
    - sampled: output-channel lanes per block ``out_threads`` in {4, 8, 16} and output
      channels per thread ``out_regs`` in {2, 4, 8, 16} (register tile).

    Knob sets over the block's thread or shared-memory limits are dropped by MetaSchedule's
    ``VerifyGPUCode`` post-processor when the candidate is built.
    """
    vecs = [params.vec] + [v for v in (1, 2, 4) if v != params.vec and params.tile_words % v == 0]

    def space(sch: s_tir.Schedule):
        outs = []
        for vec in vecs:
            s = sch.copy()
            s.seed(random.randrange(1 << 30))
            threads_x = params.tile_words // vec
            lanes = _uniq([params.out_threads] + [t for t in (4, 8, 16) if t * threads_x <= 1024])
            regs = _uniq([params.out_regs, 2, 4, 8, 16])
            # Sampled decisions (ExprRVs) stand in for the ints: the schedule only splits by them.
            knobs = dataclasses.replace(params, vec=vec, threads_x=threads_x,
                                        out_threads=_sample(s, lanes), out_regs=_sample(s, regs))
            apply_sparks_gpu_schedule(s, knobs)
            outs.append(s)
        return outs

    return space


def cuda_binary_space(params):
    """The tiled CUDA dense binary conv: its per-layer default (a fixed point, no knobs sampled)."""
    def space(sch: s_tir.Schedule):
        s = sch.copy()
        apply_binary_gpu_schedule(s, params)
        return [s]

    return space


def space_point(mod, space, structure: int = 0):
    """Design space ``structure`` of ``space`` with every sampled decision at its first candidate.

    Each knob's candidate list starts with the default's value, so structure 0 at the first
    candidates is the default's point of the space: unlike a schedule built from plain ints,
    its trace keeps the ``SampleCategorical`` decisions, so the search can mutate it.
    """
    sampled = space(s_tir.Schedule(mod))[structure].trace
    decisions = {inst: (0 if inst.kind.name == "SampleCategorical" else d) for inst, d in sampled.decisions.items()}
    point = s_tir.Schedule(mod)
    Trace(sampled.insts, decisions).apply_to_schedule(point, remove_postproc=True)
    return point


# ----------------------------------------------------------------------------- mutator


@derived_object
class MutateCategorical(PyMutator):
    """A MetaSchedule mutator that re-draws one ``SampleCategorical`` decision of a trace.

    MetaSchedule's own mutators only touch tile sizes, unroll annotations, parallel extents
    and compute locations; without this one, evolutionary search could not move between
    neighbouring points of these spaces (it would only re-sample them at random).
    """

    def __init__(self, seed: int = 0):
        self._rng = random.Random(seed)

    def _initialize_with_tune_context(self, context) -> None:
        pass

    def apply(self, trace, _rand_state=None):
        choices = []
        for inst in trace.insts:
            if inst.kind.name == "SampleCategorical":
                cands = inst.attrs[0]
                if len(cands) > 1:
                    choices.append((inst, len(cands)))
        if not choices:
            return None
        inst, count = self._rng.choice(choices)
        current = int(trace.decisions[inst])
        new = self._rng.choice([i for i in range(count) if i != current])
        return trace.with_decision(inst, new, remove_postproc=True)

    def clone(self):
        return MutateCategorical(self._rng.randrange(1 << 30))


def mutate_categorical():
    """A fresh :class:`MutateCategorical` (one per tuning task)."""
    return MutateCategorical()


# ----------------------------------------------------------------------------- schedules objects


def tuned_kinds(base) -> tuple:
    """Kernel kinds whose tuning records a schedules object uses (all by default)."""
    return getattr(base, "tuned_kinds", ("sparks", "binary"))


class RecordingSchedules:
    """Wraps a target's schedules object and records every binary kernel the lowering emits.

    Used by :func:`sparks_tvm.tune` to extract tuning tasks: the lowering pass calls
    ``schedule_sparks_conv2d(geom, K, mode)`` / ``schedule_binary_conv2d(geom, mode)`` once
    per conv; the defaults are returned unchanged.
    """

    def __init__(self, base):
        self.base = base
        self.calls = []  # (kind, geom, K or None, mode)

    def __getattr__(self, name):
        return getattr(self.base, name)

    def schedule_sparks_conv2d(self, geom, num_codewords: int, mode: str, **shift):
        self.calls.append(("sparks", geom, num_codewords, mode))
        return self.base.schedule_sparks_conv2d(geom, num_codewords, mode, **shift)

    def schedule_binary_conv2d(self, geom, mode: str, **shift):
        self.calls.append(("binary", geom, None, mode))
        return self.base.schedule_binary_conv2d(geom, mode, **shift)


def _kernel_with_shift(base, kind, geom, num_codewords, mode):
    """The task's kernel with a folded input shift (same shape knobs, so the same loops for a trace)."""
    if kind == "sparks" and getattr(base, "name", None) == "cuda":
        params = base.sparks_params(geom, num_codewords)
        return sparks_conv2d_gpu_primfunc(geom, num_codewords, mode, params.tile_words, params.group, params.splits,
                                          shift=True)
    if kind == "sparks":
        tile = base.sparks_params(geom, num_codewords)["tile"]
        return sparks_conv2d_primfunc(geom, num_codewords, mode, tile, shift=True)
    return binary_conv2d_primfunc(geom, mode, shift=True)


class TunedSchedules(RecordingSchedules):
    """Schedules object that takes each binary kernel's schedule from a tuning database.

    A kernel with no record keeps the default schedule, and so does one whose best record
    was not faster than the default when :func:`sparks_tvm.tune` re-measured both together
    (``keep_default``: task name -> structural hash of that record's schedule).
    ``self.applied`` / ``self.missed`` / ``self.kept_default`` say which did which.

    Parameters
    ----------
    base : HostSchedules or ArmSchedules
    database : tvm.s_tir.meta_schedule.database.Database
    target : tvm.target.Target
    """

    def __init__(self, base, database, target, keep_default: dict | None = None):
        super().__init__(base)
        self.database = database
        self.target = target
        self.keep_default = keep_default or {}
        self.applied = []
        self.missed = []
        self.kept_default = []

    def _lookup(self, kind, geom, num_codewords, mode, default, shift: bool = False):
        task = make_task(self.base, kind, geom, num_codewords, mode)
        sch = self.database.query_schedule(task.mod, self.target, WORKLOAD_NAME)
        if sch is None:
            self.missed.append(task.name)
            return default()
        if self.keep_default.get(task.name) == str(tvm_ffi.structural_hash(sch.mod)):
            # The best record did not beat the default when both were re-measured together.
            self.kept_default.append(task.name)
            return default()
        self.applied.append(task.name)
        defer = getattr(self.base, "defer", False)
        if not (shift or defer):
            return _scheduled(sch)
        # The record's trace, replayed on the kernel the model needs: with its input shift
        # folded, and/or after Relax fused its epilogue into it (host.deferred). The tuning
        # space names its blocks and has no postprocessors, so the replay is the same schedule.
        func = _kernel_with_shift(self.base, kind, geom, num_codewords, mode) if shift else task.mod[WORKLOAD_NAME]
        trace = str(tvm.ir.save_json(sch.trace.as_json()))
        if defer:
            return host.deferred(func, {"kind": "trace", "trace": trace})
        return _scheduled(host.apply_deferred(s_tir.Schedule(func), {"kind": "trace", "trace": trace}))

    def schedule_sparks_conv2d(self, geom, num_codewords: int, mode: str, shift: bool = False):
        self.calls.append(("sparks", geom, num_codewords, mode))
        default = lambda: self.base.schedule_sparks_conv2d(geom, num_codewords, mode, shift=shift)  # noqa: E731
        if "sparks" not in tuned_kinds(self.base):
            return default()  # the target's Sparks kernel is not the tuned one (ARM: NEON kernel)
        return self._lookup("sparks", geom, num_codewords, mode, default, shift)

    def schedule_binary_conv2d(self, geom, mode: str, shift: bool = False):
        self.calls.append(("binary", geom, None, mode))
        return self._lookup("binary", geom, None, mode,
                            lambda: self.base.schedule_binary_conv2d(geom, mode, shift=shift), shift)


class KernelTask:
    """One tuning task: an unscheduled binary kernel, its design space and default schedule.

    Attributes
    ----------
    name : str
        ``sparks_<C>x<H>x<W>_<O>_s<stride>_K<K>_<mode>`` or ``binary_...``.
    mod : IRModule
        The unscheduled kernel as ``{"main": PrimFunc}`` (the database's workload key).
    space : callable
        ``ScheduleFn`` function of the design space.
    default_schedule : callable
        ``() -> s_tir.Schedule`` (with trace) of the default schedule: what compile uses
        without a record.
    default_point : callable
        ``() -> s_tir.Schedule`` of the default's knobs as a point of the space
        (:func:`space_point`), the record :func:`sparks_tvm.tune` seeds the search with. It
        differs from the default only where the default uses a primitive whose trace TVM
        cannot print (``decompose_padding``, on padded Sparks layers): MetaSchedule prints the
        trace of every candidate that fails to run, and candidates descend from the records in
        the database, so an unprintable seed crashes the search on the first failed
        measurement.
    """

    def __init__(self, name, mod, space, default_schedule, default_point):
        self.name = name
        self.mod = mod
        self.space = space
        self.default_schedule = default_schedule
        self.default_point = default_point


def _geom_name(geom) -> str:
    s = "x".join(str(v) for v in geom.stride)
    return (f"{geom.batch}x{geom.in_channels}x{geom.height}x{geom.width}_o{geom.out_channels}_s{s}"
            f"_p{''.join(str(v) for v in geom.padding)}")


def make_task(base, kind: str, geom, num_codewords, mode: str) -> KernelTask:
    """The tuning task of one binary kernel for a schedules object (host or ARM choices)."""
    if getattr(base, "name", None) == "cuda":
        return _make_cuda_task(base, kind, geom, num_codewords, mode)
    if kind == "sparks":
        default = base.sparks_params(geom, num_codewords)
        func = sparks_conv2d_primfunc(geom, num_codewords, mode, default["tile"])
        mod = tvm.IRModule({WORKLOAD_NAME: func.with_attr("global_symbol", WORKLOAD_NAME)})
        space = sparks_space(geom, num_codewords, default, base.cores)

        def default_schedule():
            sch = s_tir.Schedule(mod)
            return apply_sparks_schedule(sch, default["tile"], default["block"], default["o_chunks"])

        return KernelTask(f"sparks_{_geom_name(geom)}_K{num_codewords}_{mode}", mod, space, default_schedule,
                          lambda: space_point(mod, space))
    if kind == "binary":
        func = binary_conv2d_primfunc(geom, mode)
        mod = tvm.IRModule({WORKLOAD_NAME: func.with_attr("global_symbol", WORKLOAD_NAME)})

        def default_schedule():
            return apply_binary_schedule(s_tir.Schedule(mod))

        space = binary_space(geom)
        return KernelTask(f"binary_{_geom_name(geom)}_{mode}", mod, space, default_schedule,
                          lambda: space_point(mod, space))
    raise ValueError(f"unknown kernel kind {kind!r}")


def _make_cuda_task(base, kind: str, geom, num_codewords, mode: str) -> KernelTask:
    if kind == "sparks":
        params = base.sparks_params(geom, num_codewords)
        func = sparks_conv2d_gpu_primfunc(geom, num_codewords, mode, params.tile_words, params.group, params.splits)
        mod = tvm.IRModule({WORKLOAD_NAME: func.with_attr("global_symbol", WORKLOAD_NAME)})

        def default_schedule():
            return apply_sparks_gpu_schedule(s_tir.Schedule(mod), params)

        space = cuda_sparks_space(params)
        return KernelTask(f"sparks_{_geom_name(geom)}_K{num_codewords}_{mode}_cuda", mod, space, default_schedule,
                          lambda: space_point(mod, space))
    if kind == "binary":
        params = base.binary_params(geom)
        mod = tvm.IRModule({WORKLOAD_NAME: binary_conv2d_primfunc(geom, mode).with_attr("global_symbol", WORKLOAD_NAME)})

        def default_schedule():
            return apply_binary_gpu_schedule(s_tir.Schedule(mod), params)

        space = cuda_binary_space(params)
        return KernelTask(f"binary_{_geom_name(geom)}_{mode}_cuda", mod, space, default_schedule,
                          lambda: space_point(mod, space))
    raise ValueError(f"unknown kernel kind {kind!r}")


#: The NEON kernels' plan spaces (ARM) are :mod:`schedules.tuning_neon`'s.
