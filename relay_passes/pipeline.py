"""The one compilation pipeline of sparks_tvm, in phases (compile, tune and inspect all run it).

A Relax module fresh from the ONNX importer (:func:`sparks_tvm.frontend.import_graph`) goes
through these phases, in order::

    import        FoldConstant: in-graph weight computation (scales, codebook gathers) becomes
                  constant, so the patterns below see the weights
    lower_binary  LowerBinaryConv2d: binarizer idioms (binarizer_patterns) -> binary weights
                  detected and the kernel chosen by the BOPs model (binary_weights, cost) ->
                  each binary conv rewritten to a call_tir of its kernel; the per-conv report
    lower_float   LowerFloatConv2d (the float convs left: stem, shortcuts) and dead code removal
    ---- the rest runs inside ``tvm.compile`` (:func:`relax_pipeline`) ----
    fuse          LLVM: inference BatchNorm decomposed, FoldAffineChains (constant arithmetic
                  chains as one multiply-add); TVM's library dispatch and legalization:
                  LegalizeOps, FuseOps, FuseTIR (the elementwise epilogue of each conv fused
                  into its kernel)
    schedule      LLVM: ScheduleFusedKernels (deferred kernel schedules, epilogue inlined) then
                  the InjectiveFallback dlight rule; CUDA: the WindowReduction rule, then TVM's
                  dlight defaults
    finalize      TVM's dataflow lowering and VM finalization passes

:func:`lower` runs the first three (inspect stops after ``lower_binary``; tune collects its
tasks from the schedules object these phases call), :func:`relax_pipeline` the last three.
With ``dump_dir`` (``SPARKS_DUMP_IR=dir`` in the environment for ``sparks_tvm.compile``), the
module is written after each phase as ``<dir>/<NN>_<phase>.py`` (TVMScript), in the manner of
mlc-llm's ``compiler_pass/pipeline.py``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu_generic
from tvm.relax.backend.cuda import pipeline as cuda_generic
from tvm.s_tir import dlight

from schedules.cpu_fallback import InjectiveFallback
from schedules.cuda_window_reduction import WindowReduction
from schedules.target_info import TargetInfo

from .fold_affine import FoldAffineChains
from .fold_residual_bias import FoldResidualBias
from .prelu_as_max import PReLUAsMax
from .lower_binary_conv2d import LoweringOptions, lower_binary_conv2d
from .lower_float_conv2d import LowerFloatConv2d
from .lower_max_pool2d import LowerMaxPool2d
from .schedule_fused_kernels import ScheduleFusedKernels

#: The phases, in order (see the module docstring).
PHASES = ("import", "lower_binary", "lower_float", "fuse", "schedule", "finalize")
#: Environment variable read by ``sparks_tvm.compile``: dump the IR after each phase there.
DUMP_ENV = "SPARKS_DUMP_IR"


@dataclass
class PipelineOptions:
    """What the lowering phases need.

    Attributes
    ----------
    schedules : object
        The target's kernel builders (:func:`schedules.for_target`, or tuning's wrappers of
        them: ``base`` is then the target's own); None leaves kernels unscheduled (inspect).
    strict, force_kind, conv_names, details
        As in :class:`relay_passes.lower_binary_conv2d.LoweringOptions`.
    fuse_epilogues : bool
        Emit the default CPU kernels unscheduled and fusable (``defer``), for the ``schedule``
        phase to fuse each with its elementwise epilogue and then schedule it, and fold a
        per-channel shift of each binarizer's input into its kernel.
    dump_dir : str, optional
        Write the module after each phase there.
    """

    schedules: object = None
    strict: bool = True
    force_kind: str | None = None
    conv_names: list = field(default_factory=list)
    details: list | None = None
    fuse_epilogues: bool = False
    dump_dir: str | None = None


def dump_ir(mod: tvm.IRModule, dump_dir: str | None, index: int, phase: str) -> None:
    """Write ``mod`` as TVMScript to ``<dump_dir>/<index>_<phase>.py`` (nothing without a dir)."""
    if not dump_dir:
        return
    os.makedirs(dump_dir, exist_ok=True)
    with open(os.path.join(dump_dir, f"{index:02d}_{phase}.py"), "w") as fh:
        fh.write(mod.script(show_meta=False))


@tvm.transform.module_pass(opt_level=0, name="DumpIR")
class DumpIR:
    """A pass that writes the module after a phase (see :func:`dump_ir`) and returns it unchanged."""

    def __init__(self, dump_dir: str, phase: str):
        self.dump_dir = dump_dir
        self.phase = phase

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        dump_ir(mod, self.dump_dir, PHASES.index(self.phase), self.phase)
        return mod


def lower(mod: tvm.IRModule, options: PipelineOptions, until: str = "lower_float"):
    """Run the phases ``import`` .. ``until`` (``lower_binary`` or ``lower_float``).

    Returns ``(module, layer records)``; raises the first user error the lowering found
    (:class:`sparks_tvm.errors.NonBinaryWeightsError`).
    """
    sched = options.schedules
    base = getattr(sched, "base", sched)  # tuning's schedules wrap the target's
    if options.fuse_epilogues and hasattr(base, "defer"):
        base.defer = True
    # In-graph weight computation (scales, codebook gathers) must be constant before matching.
    mod = relax.transform.FoldConstant()(mod)
    dump_ir(mod, options.dump_dir, 0, "import")
    mod, records = lower_binary_conv2d(
        mod,
        LoweringOptions(
            schedules=sched,
            # CUDA kernels take the shift too: no fusion there, so each add was its own launch.
            fold_shift=options.fuse_epilogues or getattr(base, "name", None) == "cuda",
            strict=options.strict,
            force_kind=options.force_kind,
            conv_names=options.conv_names,
            details=options.details,
        ),
    )
    dump_ir(mod, options.dump_dir, 1, "lower_binary")
    if until == "lower_binary":
        return mod, records
    # The float convs left (stem, shortcuts) get a real schedule too: stock TVM has none on CPUs.
    mod = LowerFloatConv2d(sched)(mod)
    mod = LowerMaxPool2d(sched)(mod)  # targets with their own pooling kernel (ARM)
    mod = relax.transform.DeadCodeElimination(["main"])(mod)
    dump_ir(mod, options.dump_dir, 2, "lower_float")
    return mod, records


def _phased(phases: list, dump_dir: str | None) -> list:
    """``[(phase, passes)]`` -> one pass list, with a :class:`DumpIR` after each phase if dumping."""
    out = []
    for phase, passes in phases:
        out += passes
        if dump_dir:
            out.append(DumpIR(dump_dir, phase))
    return out


def host_phases(target) -> list:
    """The ``fuse``, ``schedule`` and ``finalize`` phases for an LLVM CPU target.

    Stock ``tvm.compile`` runs no schedule rule on LLVM targets, so the fused elementwise
    functions between the binary convs would be serial scalar loops. After fusion, our conv
    kernels take in the elementwise epilogue FuseOps fused into them and get their schedules
    (:class:`ScheduleFusedKernels`), and :class:`schedules.cpu_fallback.InjectiveFallback` (a
    dlight rule) schedules what is left; our own kernels carry ``tirx.is_scheduled`` and are
    left alone.
    """
    neon = TargetInfo.from_target(target).family == "arm"
    return [
        # Inference BatchNorm as a multiply-add (legalized whole, it is an unfusable multi-output
        # op run as scalar code: 1.05 M of a 5.1 M-instruction 56x56 ARM layer); as elementwise
        # ops it fuses into the conv kernel's epilogue.
        # Then each chain of constant arithmetic (BatchNorm after a conv's scale) as one
        # multiply-add: the epilogue of every conv kernel runs it per output; a residual sum's
        # shifts then move onto the residual (one add and a multiply-add, no register copy).
        ("fuse", [relax.transform.DecomposeOpsForInference(), relax.transform.FoldConstant(), FoldAffineChains(),
                  FoldResidualBias(), PReLUAsMax(maxnum=neon)]
         + cpu_generic.library_dispatch_passes(target) + cpu_generic.legalize_passes(target)
         # FuseTIR leaves the unfused originals behind: drop them before scheduling.
         + [relax.transform.DeadCodeElimination(["main"])]),
        ("schedule", [ScheduleFusedKernels(),
                      dlight.ApplyDefaultSchedule(InjectiveFallback(TargetInfo.from_target(target).vector_bytes))]),
        ("finalize", cpu_generic.dataflow_lower_passes(target) + cpu_generic.finalize_passes(target)),
    ]


def cuda_phases(target) -> list:
    """The ``fuse``, ``schedule`` and ``finalize`` phases for a CUDA target.

    TVM's CUDA pipeline (``tvm.relax.backend.cuda.pipeline``), unchanged, with
    :class:`schedules.cuda_window_reduction.WindowReduction` as its own
    ``ApplyDefaultSchedule`` just before TVM's: stock dlight maps pooling windows to one thread
    block per output (a 2x2 pool: 4 threads a block), the rule one thread per output; the
    functions it schedules are marked scheduled, so TVM's rules skip them.
    """
    legalize = cuda_generic.legalize_passes(target)
    at = next(i for i, p in enumerate(legalize) if isinstance(p, dlight.ApplyDefaultSchedule))
    return [
        ("fuse", cuda_generic.library_dispatch_passes(target) + legalize[:at]),
        ("schedule", [dlight.ApplyDefaultSchedule(WindowReduction())] + legalize[at:]),
        ("finalize", cuda_generic.dataflow_lower_passes(target) + cuda_generic.finalize_passes(target)),
    ]


def relax_pipeline(target, dump_dir: str | None = None):
    """The ``relax_pipeline`` for ``tvm.compile``: the phases after the lowering.

    LLVM targets get :func:`host_phases`, CUDA targets :func:`cuda_phases`, others TVM's
    ``"default"`` pipeline (no dumps).
    """
    kind = target.kind.name
    if kind not in ("llvm", "cuda"):
        return "default"
    phases_of = host_phases if kind == "llvm" else cuda_phases
    name = "SparksHostPipeline" if kind == "llvm" else "SparksCudaPipeline"

    @tvm.transform.module_pass(opt_level=0, name=name)
    def _pipeline(mod, _ctx):
        with target:
            return tvm.transform.Sequential(_phased(phases_of(target), dump_dir))(mod)

    return _pipeline
