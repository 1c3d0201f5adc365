"""``sparks_tvm.compile``: ONNX in, a compiled model with a per-conv report out."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import tempfile
import threading
import time

import numpy as np
import tvm
from tvm import relax
from tvm.support import cc, nvcc

import schedules
from relay_passes import pipeline
from relay_passes.pipeline import relax_pipeline

from . import frontend, library, toolchain
from .errors import CompileError, ExportError, LibraryError, SparksError, TuningError
from .library import SIDECAR_SUFFIX
from .report import Report
from .target import is_aarch64, resolve_target, target_json
from .tune.database import tuned_schedules

logger = logging.getLogger("sparks_tvm")

#: The phases :func:`compile` times (``link`` is :meth:`CompiledModel.export_library`).
PHASES = ("import", "passes", "build", "link")


class PhaseTimer:
    """Wall time per compilation phase; ``report(phase, seconds)`` once per phase.

    A phase may be timed in several pieces (``import`` is the checks, then TVM's importer):
    it is reported when the next phase starts, or at :meth:`finish`.
    """

    def __init__(self, report=None):
        self.times = {}
        self.report = report
        self._pending = None

    @contextlib.contextmanager
    def __call__(self, phase: str):
        if self._pending not in (None, phase):
            self.finish()
        self._pending = phase
        t0 = time.perf_counter()
        yield
        self.times[phase] = self.times.get(phase, 0.0) + time.perf_counter() - t0

    def finish(self) -> None:
        """Report the phase timed last (if any)."""
        if self._pending is not None and self.report is not None:
            self.report(self._pending, self.times[self._pending])
        self._pending = None


def build_relax(proto, specs, target, strict: bool = True, force_kind: str | None = None, kernel_schedules=None,
                fuse_epilogues: bool = False, dump_dir: str | None = None, timer=None):
    """Import and lower (:func:`relay_passes.pipeline.lower`). Returns ``(IRModule, Report)``.

    ``kernel_schedules`` replaces ``schedules.for_target(target)`` as the source of the binary
    kernels' schedules (:mod:`schedules.tuning`: records the kernels, or applies tuning records).
    ``fuse_epilogues`` emits the default CPU kernels unscheduled and fusable, for
    :func:`relax_pipeline` to fuse each with its elementwise epilogue and then schedule it,
    and folds a per-channel shift of each binarizer's input into its kernel (a tuned kernel's
    record is replayed on that kernel, after the fusion).
    """
    sched = kernel_schedules if kernel_schedules is not None else schedules.for_target(target)
    timer = timer if timer is not None else PhaseTimer()
    with timer("import"):
        imported = frontend.import_graph(proto, specs)
    with timer("passes"):
        mod, records = pipeline.lower(
            imported,
            pipeline.PipelineOptions(schedules=sched, strict=strict, force_kind=force_kind,
                                     conv_names=frontend.conv_names(proto), fuse_epilogues=fuse_epilogues,
                                     dump_dir=dump_dir),
        )
    return mod, Report(records)


def _tuned_schedules(tuning_db, tgt):
    try:
        return tuned_schedules(tuning_db, tgt)
    except SparksError:
        raise
    except Exception as err:
        # MetaSchedule's JSONDatabase reports corrupt records as bare RuntimeErrors (or
        # bad_alloc, UnicodeDecodeError): name the work dir instead.
        raise TuningError(
            f"tuning_db {os.fspath(tuning_db)}: the tuning database is corrupt or was not written by "
            f"sparks_tvm.tune ({err.__class__.__name__}: {str(err).strip().splitlines()[0][:300]}); "
            "re-tune into a fresh work dir") from None


def compile(model, target="llvm", shapes: dict | None = None, strict: bool = True, force_kind: str | None = None,  # noqa: A001
            tuning_db=None, *, base_dir=None, progress=None):
    """Compile an ONNX Sparks / binary network with TVM.

    Parameters
    ----------
    model : str, os.PathLike, bytes or onnx.ModelProto
        The ONNX model.
    target : str, dict or tvm.target.Target
        ``"llvm"`` (default) means this machine's CPU with its vector/popcount instructions.
    shapes : dict, optional
        ``{input_name: shape}`` for inputs whose shape the model leaves dynamic.
    strict : bool
        If True, a conv that reads binarized activations but whose weights are not
        +-alpha per channel is an error; if False it is compiled in float and reported.
    force_kind : {"sparks", "binary"}, optional
        Override the BOPs cost model's choice of kernel (for tests and benchmarks).
    tuning_db : str or os.PathLike, optional
        A work dir written by :func:`sparks_tvm.tune` for this target: each binary kernel
        with a record there gets its tuned schedule (the others keep the default one). A work
        dir tuned for another target raises :class:`sparks_tvm.tune.TuningError`.
    base_dir : str or os.PathLike, optional
        Folder of the model's ONNX external data files (default: the folder of a model given
        as a path; bytes or a ModelProto with external data need it).
    progress : callable, optional
        ``progress(phase, seconds)`` as each phase of :data:`PHASES` ends (``sparks-tvm
        compile`` prints them); the times are also in ``CompiledModel.phase_times``.

    Returns
    -------
    CompiledModel
    """
    timer = PhaseTimer(progress)
    with timer("import"):
        proto = frontend.load_onnx(model, base_dir=base_dir)
        frontend.check_supported_ops(proto)
        specs = frontend.input_specs(proto, shapes)
        tgt = resolve_target(target)
        kernel_schedules = None if tuning_db is None else _tuned_schedules(tuning_db, tgt)
    dump_dir = os.environ.get(pipeline.DUMP_ENV) or None
    mod, report = build_relax(proto, specs, tgt, strict=strict, force_kind=force_kind,
                              kernel_schedules=kernel_schedules, fuse_epilogues=tgt.kind.name == "llvm",
                              dump_dir=dump_dir, timer=timer)
    if kernel_schedules is not None and getattr(kernel_schedules, "missed", None):
        # A work dir tuned for another model (or other layer shapes) is legal but useless:
        # say so rather than silently compiling with default schedules.
        logger.warning(
            "tuning_db %s has no record for %d of the model's %d binary kernel(s) (%s): they keep the "
            "default schedule", os.fspath(tuning_db), len(kernel_schedules.missed),
            len(kernel_schedules.missed) + len(kernel_schedules.applied), ", ".join(kernel_schedules.missed[:3]))
    try:
        with timer("build"):
            ex = tvm.compile(mod, target=tgt, relax_pipeline=relax_pipeline(tgt, dump_dir))
    except Exception as err:
        raise CompileError(f"TVM failed to build the module for {target_json(tgt)}: {str(err).splitlines()[0]}") from err
    timer.finish()
    meta = {
        "inputs": [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in specs],
        "outputs": frontend.output_names(proto),
        "target": target_json(tgt),
        "report": json.loads(report.to_json()),
    }
    model = CompiledModel(ex, meta, report, tgt)
    model.phase_times = dict(timer.times)
    return model


class CompiledModel:
    """A compiled model: run it, read its report, export it.

    ``run`` and ``benchmark`` may be called from any number of threads at once: each thread
    gets its own TVM VirtualMachine on the shared executable (a VM keeps its registers and
    ``set_input`` state in the object, so one VM called from two threads returns wrong types
    or crashes). Per-thread VMs beat one lock around the model in every round measured (8
    threads x 100 runs, 2 cores: 1.4x-3.7x less time per run at load; docs/errors.md, "Threads",
    ``scripts/bench_threads.py``). A thread's first call creates its VM.

    Attributes
    ----------
    report : Report
        One record per convolution (``print(model.report)`` shows a table).
    inputs : list of dict
        Name, shape and dtype of each input, in order.
    phase_times : dict
        Seconds per phase of :data:`PHASES` (``compile``'s; ``link`` after an export).
    """

    def __init__(self, executable, meta: dict, report: Report, target=None):
        self._ex = executable
        self._meta = meta
        self.report = report
        self.target = target
        self.phase_times = {}
        self._local = threading.local()
        # Creating the first VM links the executable (Executable.jit), which is not thread-safe.
        self._vm_lock = threading.Lock()

    @property
    def inputs(self) -> list:
        return list(self._meta["inputs"])

    @property
    def output_names(self) -> list:
        return list(self._meta["outputs"])

    @property
    def vm(self):
        """This thread's VirtualMachine (created on the thread's first use)."""
        vm = getattr(self._local, "vm", None)
        if vm is None:
            if _default_cross_compiler(self.target):
                # Running foreign machine code in-process would crash, not raise.
                raise SparksError(
                    f"this model was compiled for {self.target.attrs.get('mtriple')}, not this machine: export it "
                    "and run it on the device (sparks_tvm.rpc.RemoteModel, or `sparks-tvm run --rpc host:port`)"
                )
            with self._vm_lock:
                vm = self._local.vm = relax.VirtualMachine(self._ex, self.device)
        return vm

    @property
    def device(self):
        """The device the model runs on here: the GPU for CUDA targets, else the CPU."""

        if self.target is not None and self.target.kind.name == "cuda":
            dev = tvm.cuda(0)
            if not dev.exist:
                raise SparksError("this model was compiled for CUDA but no GPU is visible here: export it "
                                  "(export_library) and run it on a machine with an NVIDIA GPU")
            return dev
        return tvm.cpu()

    def cuda_source(self) -> str:
        """The generated CUDA C of a model compiled for a CUDA target (all kernels)."""
        mods = [m for m in _walk_modules(self._ex.mod) if m.kind == "cuda"]
        if not mods:
            raise SparksError("this model was not compiled for a CUDA target")
        return "\n".join(m.inspect_source() for m in mods)

    def cuda_ptx(self, arch: str | None = None) -> bytes:
        """Build :meth:`cuda_source` to PTX with the machine's ``nvcc`` (no GPU needed)."""


        if shutil.which("nvcc") is None:
            raise SparksError("nvcc not found on PATH: install the CUDA toolkit to build PTX")
        arch = arch or str(self.target.attrs.get("arch", "sm_80"))
        with self.target:
            return nvcc.compile_cuda(self.cuda_source(), target_format="ptx", arch=arch, compiler="nvcc")

    def _specs(self):
        return [frontend.InputSpec(d["name"], tuple(d["shape"]), d["dtype"]) for d in self._meta["inputs"]]

    def run(self, *arrays) -> list:
        """Run on numpy inputs (positional, in model order); returns a list of numpy arrays."""

        arrays = frontend.as_input_arrays(self._specs(), arrays)
        dev = self.device
        out = self.vm["main"](*[tvm.runtime.tensor(a, dev) for a in arrays])
        return _flatten(out)

    def benchmark(self, *arrays, repeat: int = 20, number: int = 1) -> dict:
        """Median/mean latency in ms with TVM's time evaluator (after a warm-up run)."""

        arrays = frontend.as_input_arrays(self._specs(), arrays)
        dev = self.device
        tensors = [tvm.runtime.tensor(a, dev) for a in arrays]
        self.vm["main"](*tensors)
        self.vm.set_input("main", *tensors)
        res = self.vm.time_evaluator("invoke_stateful", dev, number=number, repeat=repeat)("main")
        times = np.array(res.results) * 1e3
        return {"median_ms": float(np.median(times)), "mean_ms": float(times.mean()), "repeat": repeat}

    def export_library(self, path, cross_compiler: str | None = None) -> str:
        """Write a shared library plus ``<path>.sparks.json`` (inputs, outputs, report).

        Parameters
        ----------
        path : str or os.PathLike
            ``*.so``: a shared library, linked on this machine (for an ARM target with the
            cross linker, e.g. ``aarch64-linux-gnu-gcc``). ``*.tar``: the object files, to be
            linked on the device itself (``tvm.runtime.load_module`` of the tar links it there
            with the device's ``gcc``).
        cross_compiler : str, optional
            Linker to use instead of the default for the target: for aarch64 targets
            ``aarch64-linux-gnu-gcc`` when on PATH, else zig from pip (the ``[arm]`` extra,
            :mod:`sparks_tvm.toolchain`); the host ``gcc`` otherwise.

        Returns
        -------
        str
            ``path``.
        """
        path = os.fspath(path)
        check_writable(path)
        kwargs = {}
        mtriple = self.target.attrs.get("mtriple", self.target) if self.target is not None else "this machine"
        linker = cross_compiler
        if linker is None and _default_cross_compiler(self.target):
            linker = toolchain.aarch64_linker()
            if linker is None:
                raise CompileError(toolchain.missing_linker_message(path, mtriple))
        if linker and not path.endswith(".tar"):
            if shutil.which(linker) is None:
                raise CompileError(
                    f"exporting {path} for {mtriple} needs the cross linker {linker!r}, which is not on PATH "
                    f"(or not executable): {toolchain.missing_linker_message(path, mtriple).split(': ', 1)[1]}"
                )
            kwargs["fcompile"] = cc.cross_compiler(linker)
        t0 = time.perf_counter()
        try:
            self._ex.export_library(path, **kwargs)
        except Exception as err:
            raise ExportError(f"exporting {path} failed: {linker_message(err)}") from err
        library.write_sidecar(path, self._meta)
        self.phase_times["link"] = time.perf_counter() - t0
        return path


def check_writable(path: str) -> None:
    """Raise :class:`ExportError` unless a file can be created in ``path``'s folder.

    Tried by creating a file there: TVM would otherwise fail deep in the linker, and
    ``os.access`` says yes to root even on a read-only mount.
    """
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ExportError(f"{path}: is a directory; give the library's file name, e.g. {os.path.join(path, 'model.so')}")
    if not os.path.isdir(folder):
        raise ExportError(f"{path}: the output folder {folder} does not exist (or is not a folder)")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".sparks-write-test-"):
            pass
    except OSError as err:
        raise ExportError(f"{path}: cannot write to the output folder {folder} ({err.strerror or err})") from None


def linker_message(err: Exception, lines: int = 8) -> str:
    """The tail of the linker's own output from TVM's ``Compilation error`` (not just its first line).

    TVM's ``cc`` raises ``RuntimeError("Compilation error:\n<output>\nCommand line: <cmd>")``.
    """
    text = str(err).strip()
    body, _, cmd = text.partition("\nCommand line: ")
    body_lines = [ln for ln in body.splitlines() if ln.strip() and ln.strip() != "Compilation error:"]
    tail = " | ".join(ln.strip() for ln in body_lines[-lines:]) or text.splitlines()[0] if text else repr(err)
    linker = cmd.split()[0] if cmd.strip() else None
    return f"{'the linker ' + linker + ' said: ' if linker else ''}{tail[-1500:]}"


def _default_cross_compiler(target) -> str | None:
    """The cross linker for a target this machine cannot link natively (None: host gcc)."""
    if target is not None and target.kind.name == "cuda":
        target = target.host  # the host code decides the linker (a Jetson's is aarch64)
    if target is None or not is_aarch64(target) or platform.machine() in ("aarch64", "arm64"):
        return None
    return "aarch64-linux-gnu-gcc"


def load(path) -> CompiledModel:
    """Load a library written by :meth:`CompiledModel.export_library`.

    The sidecar is validated and the library's size and sha256 compared with the recorded
    ones first: loading a truncated or overwritten shared library would crash the process.

    Raises
    ------
    LibraryError
        The library or its sidecar is missing, corrupt, or they do not match.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise LibraryError(f"{path}: no such file")
    if os.path.isdir(path):
        raise LibraryError(f"{path}: a directory, not a library written by sparks-tvm compile")
    meta = library.read_sidecar(path)
    library.check_library(path, meta)
    try:
        lib = tvm.runtime.load_module(path)
    except Exception as err:
        raise LibraryError(f"{path}: not a loadable TVM library: {str(err).splitlines()[0]}") from None
    try:
        report = Report.from_json(json.dumps(meta.get("report", [])))
    except Exception as err:  # noqa: BLE001 - a damaged report must not stop the model from running
        logger.warning("%s%s: unreadable report (%s); the model runs, its report is empty", path, SIDECAR_SUFFIX, err)
        report = Report([])
    return CompiledModel(lib, meta, report)


def _walk_modules(mod):
    yield mod
    for sub in mod.imports:
        yield from _walk_modules(sub)


def _flatten(value) -> list:
    if isinstance(value, tvm.runtime.Tensor):
        return [value.numpy()]
    out = []
    for item in value:
        out.extend(_flatten(item))
    return out
