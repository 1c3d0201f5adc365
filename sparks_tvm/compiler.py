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
from .errors import CompileError, ExportError, LibraryError, ShapeError, SparksError, TuningError
from .library import SIDECAR_SUFFIX
from .vm_runner import Runner as _Runner, aligned_empty as _aligned_empty, flatten as _flatten
from .vm_runner import flatten_tensors as _flatten_tensors, to_numpy as _to_numpy
from .report import Report
from .target import (
    HOST_ALIASES,
    THREADS_ENV,
    host_cpu_count,
    host_threads,
    is_aarch64,
    resolve_target,
    runs_here,
    target_json,
)
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
        ``"llvm"`` (default) means this machine's CPU with its vector/popcount instructions,
        its kernels split for ``TVM_NUM_THREADS`` threads when that is set, else for all
        usable cores (``CompiledModel.num_threads`` and ``threads_source`` say which; a
        ``TVM_NUM_THREADS`` that is not a positive integer is a :class:`SparksError`). A
        target's own ``num-cores`` is kept (a warning when TVM runs another count here).
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
        thread_plan = _thread_plan(target, tgt)
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
    meta["threads"] = thread_plan
    model = CompiledModel(ex, meta, report, tgt)
    model.phase_times = dict(timer.times)
    return model


def _thread_plan(target, tgt) -> dict:
    """``{"count", "source"}``: the CPU threads ``tgt``'s kernels split their work for.

    ``count`` is None for a target without CPU kernels (CUDA) or without ``num-cores``.
    Logged at INFO; a WARNING when the kernels will not run on as many threads here.
    """
    if tgt.kind.name != "llvm":
        return {"count": None, "source": f"none ({tgt.kind.name} target)"}
    cores = int(tgt.attrs["num-cores"]) if "num-cores" in tgt.attrs else None
    if isinstance(target, str) and target in HOST_ALIASES:
        # resolve_target read the same host_threads(): ask again only for its source.
        count, source = host_threads()
    else:
        count, source = cores, "target num-cores" if cores is not None else "none (the target has no num-cores)"
        if runs_here(tgt) and cores is not None:
            threads, why = host_threads()
            if threads != cores:
                logger.warning("the target's num-cores=%d splits the kernels for %d threads, but TVM runs %d here "
                               "(%s): set TVM_NUM_THREADS=%d, or compile with target='llvm'", cores, cores, threads,
                               why, cores)
    logger.info("compiling for %s CPU thread(s) (%s)", count, source)
    if count is not None and source == THREADS_ENV and count > host_cpu_count():
        logger.warning("%s=%d is more than the %d core(s) this process may use: threads will share cores",
                       THREADS_ENV, count, host_cpu_count())
    return {"count": count, "source": source}


class CompiledModel:
    """A compiled model: run it, read its report, export it.

    ``run`` and ``benchmark`` may be called from any number of threads at once: each thread
    gets its own TVM VirtualMachine on the shared executable (a VM keeps its registers and
    ``set_input`` state in the object, so one VM called from two threads returns wrong types
    or crashes). Per-thread VMs beat one lock around the model in every round measured (8
    threads x 100 runs, 2 cores: 1.4x-3.7x less time per run at load; docs/errors.md, "Threads",
    ``scripts/bench_threads.py``). A thread's first call creates its VM and its input buffers.

    Attributes
    ----------
    report : Report
        One record per convolution (``print(model.report)`` shows a table).
    inputs : list of dict
        Name, shape and dtype of each input, in order.
    phase_times : dict
        Seconds per phase of :data:`PHASES` (``compile``'s; ``link`` after an export).
    num_threads : int or None
        The CPU threads the kernels split their work for (the target's ``num-cores``; for
        ``target="llvm"`` ``TVM_NUM_THREADS`` when set, else the usable cores). None for a
        CUDA target, or a library exported before this was recorded.
    threads_source : str
        Where ``num_threads`` came from: ``"TVM_NUM_THREADS"``, ``"host cores"``,
        ``"target num-cores"`` or ``"none (...)"``.
    """

    def __init__(self, executable, meta: dict, report: Report, target=None):
        self._ex = executable
        self._meta = meta
        self.report = report
        self.target = target
        self.phase_times = {}
        plan = meta.get("threads") if isinstance(meta.get("threads"), dict) else {}
        self.num_threads = plan.get("count")
        self.threads_source = plan.get("source", "none (not recorded)")
        self._local = threading.local()
        # Creating the first VM links the executable (Executable.jit), which is not thread-safe.
        self._vm_lock = threading.Lock()
        specs = self._specs()
        self._input_specs = tuple((s.name, tuple(int(d) for d in s.shape), np.dtype(s.dtype)) for s in specs)
        # Which outputs are the VM's own storage (a constant the model returns as it is), the
        # same for every call of the executable: learnt by each thread's first two calls.
        self._persistent = None

    @property
    def inputs(self) -> list:
        return list(self._meta["inputs"])

    @property
    def output_names(self) -> list:
        return list(self._meta["outputs"])

    @property
    def vm(self):
        """This thread's VirtualMachine (created on the thread's first use)."""
        return self._runner().vm

    def _runner(self) -> "_Runner":
        runner = getattr(self._local, "runner", None)
        if runner is None:
            if _default_cross_compiler(self.target):
                # Running foreign machine code in-process would crash, not raise.
                raise SparksError(
                    f"this model was compiled for {self.target.attrs.get('mtriple')}, not this machine: export it "
                    "and run it on the device (sparks_tvm.rpc.RemoteModel, or `sparks-tvm run --rpc host:port`)"
                )
            dev = self.device
            with self._vm_lock:
                vm = relax.VirtualMachine(self._ex, dev)
            runner = self._local.runner = _Runner(vm, dev, self._input_specs)
        return runner

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

    def empty_inputs(self) -> list:
        """New numpy arrays of the inputs' shapes and dtypes that :meth:`run` reads in place.

        TVM's kernels assume 64-byte aligned data, which numpy does not promise (its arrays
        are usually 16-byte aligned), so ``run`` copies an input unless it is aligned. Fill
        these arrays and pass them to skip that copy (it matters for large inputs only: a
        1x3x224x224 float32 input is a 0.6 MB copy).

        Returns
        -------
        list of numpy.ndarray
            One zero-filled, C-contiguous, 64-byte aligned array per input, in model order.
        """
        return [_aligned_empty(shape, dtype) for _, shape, dtype in self._input_specs]

    def run(self, *arrays, out=None) -> list:
        """Run on numpy inputs (positional, in model order); returns a list of numpy arrays.

        Parameters
        ----------
        *arrays : array_like
            One per input, of the compiled shape; a dtype that casts safely (``same_kind``)
            to the compiled one is converted. An input that is a C-contiguous, writeable,
            64-byte aligned numpy array of exactly the compiled shape and dtype is read in
            place (no copy; :meth:`empty_inputs` makes such arrays, so do ``torch`` CPU
            tensors); any other is copied into this thread's input buffer. The model never
            writes its inputs.
        out : sequence of numpy.ndarray, optional
            One array per output, of its shape and dtype: the results are copied into them
            and ``out`` is returned as a list (for results that must live in memory of the
            caller's choosing).

        Returns
        -------
        list of numpy.ndarray
            One per output. Each is a fresh array (a view of the output tensor the VM
            allocated for this call, without a copy) that no later call, other output, input
            or the model itself shares or overwrites: results stay valid and may be changed
            freely.

        Raises
        ------
        ShapeError
            Wrong number of inputs, or an input (named) of the wrong shape or dtype; an
            ``out`` array of the wrong count, shape or dtype.
        InputValueError
            A float input holds NaN or inf.
        """
        runner = self._runner()
        if runner.views is None:  # a GPU: inputs and outputs cross to the device and back
            arrays = frontend.as_input_arrays(self._specs(), arrays)
            values = _flatten(runner.main(*[tvm.runtime.tensor(a, runner.device) for a in arrays]))
            return values if out is None else self._into(out, values)
        tensors, spans = runner.bind(self._checked(arrays))
        result = runner.main(*tensors)
        outputs = [result] if isinstance(result, tvm.runtime.Tensor) else _flatten_tensors(result)
        values = self._results(runner, outputs, spans)
        return values if out is None else self._into(out, values)

    def _checked(self, arrays) -> tuple:
        """``arrays`` if each is an exact, finite numpy input; else ``as_input_arrays``'s conversion.

        The slow path is the only one that raises, so every error keeps its message.
        """
        specs = self._input_specs
        if len(arrays) == len(specs):
            for arr, (_, shape, dtype) in zip(arrays, specs):
                if not (isinstance(arr, np.ndarray) and arr.dtype == dtype and arr.shape == shape):
                    break
                # Tried against a sum and a dot product (overflow warnings, slower on large
                # inputs): the mask is the fastest exact check.
                if dtype.kind == "f" and not np.isfinite(arr).all():
                    break
            else:
                return arrays
        return frontend.as_input_arrays(self._specs(), arrays)

    def _results(self, runner, outputs: list, spans: list) -> list:
        """Numpy views of the outputs, copied where the memory is not this call's alone.

        A VM returns an input's own buffer for an output that is the input (``Identity``),
        one tensor for two outputs that are the same value, and its constant for a constant
        output: views of those would change with the next call, each other, or the model.
        """
        persistent = self._persistent
        if persistent is None:
            persistent = runner.learn_persistent(outputs)
            if persistent is not None:
                self._persistent = persistent
        values = []
        for i, tensor in enumerate(outputs):
            if persistent is None or persistent[i][0]:
                values.append(tensor.numpy())
                continue
            lo = tensor.data_ptr()
            hi = lo + persistent[i][1]
            shared = any(lo < b and a < hi for a, b in spans)
            if not shared:
                spans.append((lo, hi))
            values.append(_to_numpy(tensor, copy=shared))
        return values

    def _into(self, out, values: list) -> list:
        names = self.output_names
        if isinstance(out, np.ndarray) or len(out) != len(values):
            got = "one array" if isinstance(out, np.ndarray) else f"{len(out)}"
            raise ShapeError(f"out: the model has {len(values)} output(s) {names}, got {got}; pass a list of arrays")
        for i, (dst, val) in enumerate(zip(out, values)):
            name = names[i] if i < len(names) else f"#{i}"
            if not isinstance(dst, np.ndarray):
                raise ShapeError(f"out[{i}] (output {name!r}): expected a numpy array, got {type(dst).__name__}")
            if dst.shape != val.shape or dst.dtype != val.dtype:
                raise ShapeError(f"out[{i}] (output {name!r}): expected shape {val.shape} and dtype {val.dtype}, "
                                 f"got {dst.shape} {dst.dtype}")
            if not dst.flags.writeable:
                raise ShapeError(f"out[{i}] (output {name!r}): the array is read-only")
            np.copyto(dst, val)
        return list(out)

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
