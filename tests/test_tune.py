"""Autotuning: design spaces (default point, exactness of sampled points), tune -> records ->
compile(tuning_db=), target refusal, nothing-measured error, kill-and-resume.

Budget: about 2-3 minutes on a 2-core machine (one short tuning run shared by the tests, one
killed-and-resumed CLI run in subprocesses).
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
import tvm
import tvm_ffi
from onnx import TensorProto, helper, numpy_helper
from tvm import s_tir

import sparks_tvm
from schedules import tuning
from schedules.host import HostSchedules
from sparks_tvm import frontend
from sparks_tvm import reference as ref
from sparks_tvm.kernels import ConvGeometry, pack_indices, sparks_out_shape
from sparks_tvm.models import random_codebook
from sparks_tvm.tune import RECORDS_FILE, TuningError, extract_tasks, open_database, tuned_schedules

from kernel_utils import random_activations

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def layer_model(n=2, c=20, h=9, w=9, o=24, k=8, stride=2, seed=0, shift=False):
    """ONNX ``Conv(Sign(x), alpha * codebook[idx])``: one Sparks layer (odd size, stride 2,
    batch 2, C=20 not a multiple of the int8 channel group); ``Sign(x + b)`` with ``shift``."""
    rng = np.random.default_rng(seed)
    cb = random_codebook(rng, k).astype(np.float32)
    idx = rng.integers(0, k, size=(o, c))
    weight = cb[idx] * np.float32(0.5)
    oh, ow = (h + 2 - 3) // stride + 1, (w + 2 - 3) // stride + 1
    inits = [numpy_helper.from_array(weight, "W")]
    nodes = [helper.make_node("Sign", ["x"], ["b"])]
    if shift:
        bias = rng.choice([-0.5, 0.25, 1.0], size=(1, c, 1, 1)).astype(np.float32)
        inits.append(numpy_helper.from_array(bias, "B"))
        nodes = [helper.make_node("Add", ["x", "B"], ["xs"]), helper.make_node("Sign", ["xs"], ["b"])]
    graph = helper.make_graph(
        nodes + [helper.make_node("Conv", ["b", "W"], ["y"], pads=[1, 1, 1, 1], strides=[stride, stride],
                                  kernel_shape=[3, 3])],
        "sparks_layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, c, h, w])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, o, oh, ow])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def onnx_reference(model_bytes, x):
    import onnxruntime as ort

    return ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, host):
    """One short tuning run (8 trials) of the layer, shared by the tests below."""
    work = str(tmp_path_factory.mktemp("tune") / "host")
    model = layer_model()
    t0 = time.perf_counter()
    result = sparks_tvm.tune(model, host, work, trials=8, batch=4, force_kind="sparks", progress=False)
    return model, work, result, time.perf_counter() - t0


# ----------------------------------------------------------------------------- design spaces

GEOMS = [
    ConvGeometry(1, 64, 56, 56, 64),
    ConvGeometry(2, 20, 9, 9, 24, stride=(2, 2)),
    ConvGeometry(1, 36, 7, 7, 40),
]


@pytest.mark.parametrize("geom", GEOMS, ids=lambda g: f"{g.in_channels}x{g.height}s{g.stride[0]}")
def test_default_schedule_is_a_point_of_the_space(host, geom):
    """The task's default schedule is the host's default schedule, primitive for primitive, and
    its seed point (``default_point``) is space 0 at the default's knob values: the default
    without the padding split, which TVM cannot print.

    If this fails, schedules/host.py changed its default schedule: update
    schedules.tuning.apply_sparks_schedule to match (else tuning no longer contains it).
    """
    base = HostSchedules.for_target(host)
    task = tuning.make_task(base, "sparks", geom, 16, "sign")
    mine = tuning._scheduled(task.default_schedule())
    theirs = base.schedule_sparks_conv2d(geom, 16, "sign").with_attr("global_symbol", "main")
    assert tvm_ffi.structural_equal(mine, theirs)
    point = task.default_point()
    point.trace.as_python()
    d = base.sparks_params(geom, 16)
    plain = tuning.apply_sparks_schedule(s_tir.Schedule(task.mod), d["tile"], d["block"], d["o_chunks"],
                                         split_padding=False)
    assert tvm_ffi.structural_equal(point.mod, plain.mod)
    # A sampled point, not plain ints: the search's mutator can move it.
    assert [int(v) for v in point.trace.decisions.values()] == [0, 0, 0]
    cand = tuning.sparks_knob_candidates(geom, 16, base.sparks_params(geom, 16), base.cores)
    # Each candidate list starts with the default's value: the default is reachable by sampling.
    for knob in ("tile", "block", "o_chunks"):
        assert cand[knob][0] == base.sparks_params(geom, 16)[knob]
    assert len(cand["tile"]) > 1 and len(cand["block"]) > 1


def _run_kernel(func, geom, x, codebook, idx, target):
    lib = tvm.compile(func.with_attr("global_symbol", "main"), target=target).jit()
    dev = tvm.cpu()
    k = codebook.shape[0]
    out = tvm.runtime.tensor(np.zeros(sparks_out_shape(geom), np.int32), dev)
    lib["main"](tvm.runtime.tensor(x, dev), tvm.runtime.tensor(ref.codes_to_bits(codebook), dev),
                tvm.runtime.tensor(pack_indices(idx, k), dev), out)
    return out.numpy().reshape(geom.out_shape)


def test_sampled_points_are_exact(host, rng):
    """Every structure of the Sparks space, at random decisions and at extreme ones, is exact."""
    geom = ConvGeometry(2, 20, 9, 9, 24, stride=(2, 2))
    k = 8
    codebook = random_codebook(rng, k).astype(np.int8)
    idx = rng.integers(0, k, size=(geom.out_channels, geom.in_channels))
    x = random_activations(rng, geom.in_shape)
    expect = ref.sparks_conv2d_ref(ref.binarize(x, "sign"), codebook, idx, geom.stride, geom.padding)
    task = tuning.make_task(HostSchedules.for_target(host), "sparks", geom, k, "sign")
    random.seed(7)
    spaces = task.space(s_tir.Schedule(task.mod))
    assert len(spaces) == len(tuning.SPARKS_STRUCTURES)
    decisions = set()
    for sch in spaces:
        decisions.add(tuple(int(v) for v in sch.trace.decisions.values()))
        sch.trace.as_python()  # MetaSchedule prints candidates' traces (a failed one, the design spaces)
        assert np.array_equal(_run_kernel(tuning._scheduled(sch), geom, x, codebook, idx, host), expect)
    assert len(decisions) > 1  # the points differ
    extreme = tuning.apply_sparks_schedule(s_tir.Schedule(task.mod), tile=16, block=1, o_chunks=4, unroll=True,
                                           o_block=4, stage1_at="task")
    assert np.array_equal(_run_kernel(tuning._scheduled(extreme), geom, x, codebook, idx, host), expect)


def test_binary_space_default_point_and_exact(host, rng):
    from sparks_tvm.kernels import pack_binary_weights

    geom = ConvGeometry(2, 40, 9, 9, 24, stride=(2, 2))
    base = HostSchedules.for_target(host)
    task = tuning.make_task(base, "binary", geom, None, "sign")
    theirs = base.schedule_binary_conv2d(geom, "sign").with_attr("global_symbol", "main")
    assert tvm_ffi.structural_equal(tuning._scheduled(task.default_schedule()), theirs)
    signs = np.where(rng.random((24, 40, 3, 3)) < 0.5, -1, 1).astype(np.int8)
    x = random_activations(rng, geom.in_shape)
    expect = ref.binary_conv2d_ref(ref.binarize(x, "sign"), signs, geom.stride, geom.padding)
    random.seed(4)
    dev = tvm.cpu()
    for sch in task.space(s_tir.Schedule(task.mod)):
        lib = tvm.compile(tuning._scheduled(sch), target=host).jit()
        out = tvm.runtime.tensor(np.zeros(geom.out_shape, np.int32), dev)
        lib["main"](tvm.runtime.tensor(x, dev), tvm.runtime.tensor(pack_binary_weights(signs), dev), out)
        assert np.array_equal(out.numpy(), expect)


def test_mutator_changes_one_decision(host):
    geom = ConvGeometry(1, 64, 14, 14, 64)
    task = tuning.make_task(HostSchedules.for_target(host), "sparks", geom, 16, "sign")
    random.seed(3)
    sch = task.space(s_tir.Schedule(task.mod))[2]
    mut = tuning.mutate_categorical()
    new = mut.apply(sch.trace)
    assert new is not None
    before = [int(v) for v in sch.trace.decisions.values()]
    after = [int(v) for v in new.decisions.values()]
    assert sum(a != b for a, b in zip(before, after)) == 1
    fresh = s_tir.Schedule(task.mod)
    new.apply_to_schedule(fresh, remove_postproc=True)  # the mutated trace replays


# ----------------------------------------------------------------------------- tune -> compile


def test_tune_writes_records_and_compile_applies_them(tuned, host):
    model, work, result, seconds = tuned
    assert os.path.getsize(os.path.join(work, RECORDS_FILE)) > 0
    assert os.path.exists(os.path.join(work, "database_workload.json"))
    assert os.path.exists(os.path.join(work, "logs"))
    (task,) = result.tasks
    assert task.trials == 8 and result.trials_run == 8 and result.measured >= 1
    assert task.default_ms > 0 and 0 < task.best_ms <= task.default_ms * 1.0001
    assert "speed-up" in result.table() and task.name in result.table()
    with open(os.path.join(work, RECORDS_FILE)) as fh:
        assert len(fh.read().splitlines()) == 1 + 8  # the default's measurement + 8 trials
    summary = json.load(open(os.path.join(work, "tune_summary.json")))
    assert summary["tasks"][0]["trials"] == 8
    if result.curve_png:
        with open(result.curve_png, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"

    x = random_activations(np.random.default_rng(5), (2, 20, 9, 9))
    compiled = sparks_tvm.compile(model, host, tuning_db=work, force_kind="sparks")
    assert np.array_equal(compiled.run(x)[0], onnx_reference(model, x))
    print(f"tuning 8 trials took {seconds:.1f} s")


def _kernel_funcs(model, target, work_dir):
    from sparks_tvm.compiler import build_relax

    proto = frontend.load_onnx(model)
    sched = tuned_schedules(work_dir, target)
    mod, _ = build_relax(proto, frontend.input_specs(proto, None), target, force_kind="sparks", kernel_schedules=sched)
    funcs = [f for gv, f in mod.functions_items() if gv.name_hint.startswith("sparks_conv2d")]
    return funcs, sched


def _with_best_record(work, tmp_path, model, host, **knobs):
    """A copy of the work dir whose best record is the Sparks schedule with ``knobs``:
    ``(work dir, task, schedule)``."""
    from tvm.s_tir import meta_schedule as ms

    work2 = str(tmp_path / "db")
    shutil.copytree(work, work2)
    proto = frontend.load_onnx(model)
    ((task, _),) = extract_tasks(proto, frontend.input_specs(proto, None), host, force_kind="sparks")
    sch = tuning.apply_sparks_schedule(s_tir.Schedule(task.mod), **knobs)
    db = open_database(work2)
    db.commit_tuning_record(ms.database.TuningRecord(
        sch.trace, db.commit_workload(task.mod), [tvm.tirx.FloatImm("float32", 1e-9)], host,
        ms.arg_info.ArgInfo.from_prim_func(task.mod["main"])))
    return work2, task, sch


def test_compile_uses_the_best_record_exactly(tuned, host, tmp_path):
    """A record with a non-default schedule, made the best: compile takes exactly that schedule."""
    model, work, _result, _ = tuned
    work2, task, sch = _with_best_record(work, tmp_path, model, host, tile=16, block=1, o_chunks=2, unroll=True,
                                         o_block=2)
    (func,), sched = _kernel_funcs(model, host, work2)
    assert sched.applied == [task.name] and not sched.missed
    assert tvm_ffi.structural_equal(func.without_attr("global_symbol"), tuning._scheduled(sch).without_attr(
        "global_symbol"))
    x = random_activations(np.random.default_rng(6), (2, 20, 9, 9))
    compiled = sparks_tvm.compile(model, host, tuning_db=work2, force_kind="sparks")
    assert np.array_equal(compiled.run(x)[0], onnx_reference(model, x))


def test_tuned_kernels_are_fused_and_take_the_input_shift(tuned, host, tmp_path):
    """compile(tuning_db=...) replays a record on the kernel the model needs -- its input shift
    folded in, its epilogue fused in -- and stays exact."""
    from relay_passes import ScheduleFusedKernels
    from schedules.host import DEFERRED_SCHEDULE
    from sparks_tvm.compiler import build_relax

    model, work, _result, _ = tuned
    work2, task, _sch = _with_best_record(work, tmp_path, model, host, tile=16, block=1, o_chunks=2, o_block=2)
    shifted = layer_model(shift=True)  # same layer, Sign(x + b): same tuning task
    proto = frontend.load_onnx(shifted)
    sched = tuned_schedules(work2, host)
    mod, _ = build_relax(proto, frontend.input_specs(proto, None), host, force_kind="sparks",
                         kernel_schedules=sched, fuse_epilogues=True)
    assert sched.applied == [task.name]
    (func,) = [f for gv, f in mod.functions_items() if gv.name_hint.startswith("sparks_conv2d")]
    assert len(func.params) == 5  # data, codes, idx, shift, out
    fsch = s_tir.Schedule(func)
    spec = fsch.get(fsch.get_sblock("out")).annotations[DEFERRED_SCHEDULE]
    assert json.loads(str(spec))["kind"] == "trace"
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    passed = ScheduleFusedKernels()
    with host:
        tvm.transform.Sequential(cpu_generic.legalize_passes(host) + [passed])(mod)
    assert any(name.startswith("fused_sparks") and n >= 2 for name, n in passed.inlined.items()), passed.inlined
    x = random_activations(np.random.default_rng(8), (2, 20, 9, 9))
    compiled = sparks_tvm.compile(shifted, host, tuning_db=work2, force_kind="sparks")
    assert np.array_equal(compiled.run(x)[0], onnx_reference(shifted, x))


def test_compile_reads_a_work_dir_without_writing_it(tuned, host, tmp_path):
    """A tune still appending (a partial last line): compile applies the complete records and
    leaves every file of the work dir byte for byte as it was."""
    model, work, _result, _ = tuned
    work2 = str(tmp_path / "db")
    shutil.copytree(work, work2)
    records = os.path.join(work2, RECORDS_FILE)
    with open(records, "ab") as fh:
        fh.write(b'[0, [["a partial line')
    before = {name: open(os.path.join(work2, name), "rb").read() for name in sorted(os.listdir(work2))
              if os.path.isfile(os.path.join(work2, name))}
    x = random_activations(np.random.default_rng(7), (2, 20, 9, 9))
    compiled = sparks_tvm.compile(model, host, tuning_db=work2, force_kind="sparks")
    assert np.array_equal(compiled.run(x)[0], onnx_reference(model, x))
    after = {name: open(os.path.join(work2, name), "rb").read() for name in before}
    assert after == before


def test_records_of_another_target_are_refused(tuned, host, tmp_path):
    model, work, _result, _ = tuned
    with pytest.raises(TuningError, match="made for target .*znver|made for target"):
        sparks_tvm.compile(model, "rpi4", tuning_db=work, force_kind="sparks")
    # Same ISA, other core count: still another target (schedules depend on the thread count).
    other = {"kind": "llvm", "mcpu": str(host.attrs["mcpu"]), "num-cores": 7}
    with pytest.raises(TuningError, match="num-cores=7"):
        sparks_tvm.compile(model, other, tuning_db=work, force_kind="sparks")
    with pytest.raises(TuningError, match="num-cores=7"):
        sparks_tvm.tune(model, other, work, trials=1, force_kind="sparks", progress=False)
    with pytest.raises(TuningError, match="no tuning records"):
        sparks_tvm.compile(model, host, tuning_db=str(tmp_path), force_kind="sparks")


def _failing_runner(after: int = 0, target=None):
    """A runner whose measurements fail, but for its first ``after`` calls (the local runner's)."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    from sparks_tvm.tune import default_runner

    @derived_object
    class Failing(ms.runner.PyRunner):
        def __init__(self, real=None, after=0):
            super().__init__()
            self.real, self.after, self.calls = real, after, 0

        def run(self, runner_inputs):
            self.calls += 1
            if self.calls <= self.after:
                return self.real.run(runner_inputs)
            res = ms.runner.RunnerResult(None, "simulated device failure")
            return [ms.runner.RunnerFuture(lambda: True, lambda: res) for _ in runner_inputs]

    return Failing(default_runner(target) if after else None, after)


def test_every_record_prints_as_python(tuned):
    """MetaSchedule prints the trace of each candidate that fails to run, and candidates descend
    from the records in the database; TVM cannot print ``decompose_padding`` (a type error), so
    one such record crashed a search on its first failed measurement (CI of 90f8593). The
    fixture's layer is padded, so its default schedule does use ``decompose_padding``."""
    _model, work, _result, _ = tuned
    records = open_database(work, read_only=True).get_all_tuning_records()
    assert len(records) > 1
    for rec in records:
        rec.trace.as_python()


def test_failed_candidates_from_the_seed_record_are_reported(host, tmp_path):
    """Only the default's seed record in the database: the search starts from it (its mutants
    are the candidates), every one fails to run, and tune says so instead of crashing; the
    seed then stands for the default, in compile and in the report."""
    model = layer_model(c=12, h=7, w=7, o=8, stride=1, seed=3)
    work = str(tmp_path / "w")
    proto = onnx.load_from_string(model)
    (task, _), = extract_tasks(proto, frontend.input_specs(proto, None), host, force_kind="sparks")
    assert "DecomposePadding" in [inst.kind.name for inst in task.default_schedule().trace.insts]
    # The default and its seed point measure (two runs), then every candidate fails.
    with pytest.raises(TuningError, match="none of the .* candidates could be measured.*simulated device failure"):
        sparks_tvm.tune(model, host, work, trials=8, batch=4, runner=_failing_runner(after=2, target=host),
                        force_kind="sparks", progress=False)
    # Nothing validated yet: compile keeps the default (with its padding split), not the seed.
    _funcs, sched = _kernel_funcs(model, host, work)
    assert sched.kept_default == [task.name] and not sched.applied
    result = sparks_tvm.tune(model, host, work, trials=0, force_kind="sparks", progress=False)
    assert result.tasks[0].chosen == "default"
    assert result.tasks[0].best_ms == result.tasks[0].default_ms  # the seed's own time is not reported
    _funcs, sched = _kernel_funcs(model, host, work)
    assert sched.kept_default == [task.name] and not sched.applied
    # A work dir seeded the old way (the default's own trace): refused with the reason, before
    # any search, and compile still reads it.
    from tvm.s_tir import meta_schedule as ms

    db = open_database(work)
    rec = db.get_top_k(db.commit_workload(task.mod), 1)[0]
    db.commit_tuning_record(ms.database.TuningRecord(task.default_schedule().trace, rec.workload, rec.run_secs,
                                                     rec.target, rec.args_info))
    with pytest.raises(TuningError, match="record whose trace TVM cannot print.*start a new one"):
        sparks_tvm.tune(model, host, work, trials=64, force_kind="sparks", progress=False)
    x = random_activations(np.random.default_rng(1), (2, 12, 7, 7))
    compiled = sparks_tvm.compile(model, host, tuning_db=work, force_kind="sparks")
    assert np.array_equal(compiled.run(x)[0], onnx_reference(model, x))


def test_nothing_measured_is_an_error(tuned, host, tmp_path):
    model, work, _result, _ = tuned
    # Default measurement fails: error before any search.
    with pytest.raises(TuningError, match="could not be measured.*simulated device failure"):
        sparks_tvm.tune(model, host, str(tmp_path / "a"), trials=2, runner=_failing_runner(), force_kind="sparks",
                        progress=False)
    # Defaults already measured (resume), every candidate fails: error, not success.
    work2 = str(tmp_path / "b")
    shutil.copytree(work, work2)
    with pytest.raises(TuningError, match="none of the 4 candidates could be measured"):
        sparks_tvm.tune(model, host, work2, trials=12, batch=4, runner=_failing_runner(), force_kind="sparks",
                        progress=False)


# ----------------------------------------------------------------------------- kill and resume


def _record_lines(path):
    if not os.path.exists(path):
        return []
    with open(path, "rb") as fh:
        return fh.read().split(b"\n")


def test_killed_run_resumes_without_losing_records(tmp_path):
    model_path = tmp_path / "layer.onnx"
    model_path.write_bytes(layer_model())
    work = tmp_path / "work"
    records = work / RECORDS_FILE
    cmd = [sys.executable, "-m", "sparks_tvm.cli", "tune", str(model_path), "--work-dir", str(work), "--batch", "4"]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(cmd + ["--trials", "200"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        # Kill once the default and at least one batch of 4 trials are on disk, complete: one
        # line more than that, since the last line read may be half written.
        while len([ln for ln in _record_lines(records) if ln.strip()]) < 1 + 4 + 1:
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            assert time.time() < deadline, "the tuning run wrote no batch in 240 s"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = _record_lines(records)
    complete_before = [ln for ln in before[:-1] if ln.strip()]  # the last piece may be a partial line
    done_before = len(complete_before) - 1
    meta_before = json.loads((work / "sparks_tuning.json").read_text())
    assert done_before >= 4

    target = max(done_before + 4, 12)
    out = subprocess.run(cmd + ["--trials", str(target)], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    after = [ln for ln in _record_lines(records) if ln.strip()]
    assert after[: len(complete_before)] == complete_before  # nothing finished was lost or rewritten
    assert len(after) == 1 + target  # resumed: only the missing trials were run
    for ln in after:
        json.loads(ln)
    meta_after = json.loads((work / "sparks_tuning.json").read_text())
    (name,) = meta_after["tasks"]
    assert meta_after["tasks"][name]["default_s"] == meta_before["tasks"][name]["default_s"]  # not re-measured
    assert meta_after["tasks"][name]["trials"] == target
    assert f"{target - done_before} trials this run" in out.stdout


# ----------------------------------------------------------------------------- ARM over RPC


def test_tune_on_the_emulated_pi_over_rpc(tmp_path, monkeypatch):
    """``tune`` for a Raspberry Pi target: candidates cross-linked here, measured on the emulated
    Pi through an RPC tracker; compile with the records and run exactly on the device."""
    from tvm.rpc.tracker import Tracker

    from schedules.arm import ArmSchedules

    monkeypatch.setattr(ArmSchedules, "default_neon_binary", False)

    from sparks_tvm import rpc
    from sparks_tvm.tune import rpc_runner

    sys.path.insert(0, os.path.join(REPO, "scripts", "emulated_pi"))
    import pi

    try:
        pi.setup()
    except pi.ProvisionError as err:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the emulated-Pi tests, but provisioning is impossible: {err}")
        pytest.skip(f"cannot provision the emulated Pi here: {err}")
    model = layer_model(n=1, c=16, h=6, w=6, o=16, k=4, stride=1)
    work = str(tmp_path / "rpi4")
    tport = pi.free_port()
    tracker = Tracker("127.0.0.1", tport, tport + 1, silent=True)
    addr = f"127.0.0.1:{tracker.port}"
    try:
        with pi.EmulatedPi(startup_timeout=180, tracker=addr, key="sparks-tune"):
            # MetaSchedule over RPC: the host core's dense binary kernel (NEON plans: runner="emulated-pi").
            res = sparks_tvm.tune(model, "rpi4", work, trials=2, batch=2, runner=rpc_runner(addr, "sparks-tune"),
                                  force_kind="binary", progress=False, plot=False)
            (task,) = res.tasks
            assert task.name.startswith("binary_")
            assert res.measured == 2 and task.trials == 2 and task.default_ms > 0
            compiled = sparks_tvm.compile(model, "rpi4", tuning_db=work, force_kind="binary")
            x = random_activations(np.random.default_rng(8), (1, 16, 6, 6))
            with rpc.deploy(compiled, tracker=addr, key="sparks-tune", timeout=60, session_timeout=300) as remote:
                assert np.array_equal(remote.run(x)[0], onnx_reference(model, x))
    finally:
        tracker.terminate()
    with pytest.raises(TuningError, match="does not run on this machine"):
        sparks_tvm.tune(model, "rpi4", str(tmp_path / "other"), trials=1, force_kind="binary", progress=False)


def test_arm_targets_keep_the_neon_sparks_kernel():
    """Tuning extracts no Sparks task for ARM (the NEON kernel is not the tuned kernel), and a
    work dir's records never replace it."""
    from sparks_tvm.tune.space import extract_tasks
    from sparks_tvm.target import resolve_target
    from sparks_tvm import frontend

    model = layer_model(n=1, c=16, h=6, w=6, o=16, k=4, stride=1)
    proto = frontend.load_onnx(model)
    specs = frontend.input_specs(proto)
    assert extract_tasks(proto, specs, resolve_target("rpi4"), force_kind="sparks") == []
    assert extract_tasks(proto, specs, resolve_target("rpi4"), force_kind="binary") == []


def test_arm_generic_binary_kernel_is_tunable(monkeypatch):
    """With ``neon_binary=False`` ARM builds the host core's dense binary kernel, and tunes it."""
    from schedules.arm import ArmSchedules
    from sparks_tvm import frontend
    from sparks_tvm.target import resolve_target
    from sparks_tvm.tune.space import extract_tasks

    monkeypatch.setattr(ArmSchedules, "default_neon_binary", False)
    proto = frontend.load_onnx(layer_model(n=1, c=16, h=6, w=6, o=16, k=4, stride=1))
    names = [t.name for t, _ in extract_tasks(proto, frontend.input_specs(proto), resolve_target("rpi4"),
                                              force_kind="binary")]
    assert names and all(n.startswith("binary_") for n in names)
