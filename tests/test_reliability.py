"""Issue 21: no crash, no silent wrong answer, no traceback. One test (at least) per defect:
external data, threads, damaged libraries and sidecars, the tuning work dir's lock and
database, the linker's message, full disks; fuzzing of the sidecar and .npz readers.

Budget: about 40 s on a 2-core machine (three tiny compiles; the two concurrent tunes run in
subprocesses on a one-layer model with 2 trials each).
"""

import io
import json
import logging
import os
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import sparks_tvm
from sparks_tvm import cli, library, models
from sparks_tvm.errors import (
    ExportError,
    InputFileError,
    LibraryError,
    ModelLoadError,
    TuningDatabaseError,
    WorkDirLockedError,
)
from sparks_tvm.tune import database
from sparks_tvm.tune.progress import LogFile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (1, 3, 7, 7)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A compiled tiny Sparks ResNet, exported: ``(model, library path, input)``."""
    net = models.sparks_resnet_tiny(k=4, widths=(8, 12))
    model = sparks_tvm.compile(models.export_onnx(net, SHAPE))
    path = str(tmp_path_factory.mktemp("lib") / "tiny.so")
    model.export_library(path)
    return model, path, models.example_input(SHAPE, seed=9)


def conv_model(weight):
    """ONNX ``Conv(x, W)``: one float 3x3 conv, 2 -> 3 channels on 5x5."""
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["y"], kernel_shape=[3, 3])], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 3, 3])],
        [numpy_helper.from_array(weight, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def save_external(proto, path):
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="w.bin", size_threshold=0)


# 1. ONNX external data -------------------------------------------------------------------------

def test_external_data_is_read_from_the_models_folder(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    (tmp_path / "dir").mkdir()
    save_external(conv_model(weight), tmp_path / "dir" / "model.onnx")
    # A decoy w.bin of the same size in the working directory: it used to be read instead.
    (tmp_path / "cwd").mkdir()
    save_external(conv_model(weight + 150), tmp_path / "cwd" / "decoy.onnx")
    monkeypatch.chdir(tmp_path / "cwd")
    x = rng.standard_normal((1, 2, 5, 5)).astype(np.float32)
    want = sparks_tvm.compile(conv_model(weight)).run(x)[0]
    got = sparks_tvm.compile(str(tmp_path / "dir" / "model.onnx")).run(x)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    data = (tmp_path / "dir" / "model.onnx").read_bytes()
    with pytest.raises(ModelLoadError, match="w.bin.*base_dir"):
        sparks_tvm.compile(data)
    np.testing.assert_allclose(sparks_tvm.compile(data, base_dir=tmp_path / "dir").run(x)[0], want, rtol=1e-5,
                               atol=1e-5)
    os.remove(tmp_path / "dir" / "w.bin")
    with pytest.raises(ModelLoadError, match=r"external data file 'w.bin' of weight 'W' is missing"):
        sparks_tvm.compile(str(tmp_path / "dir" / "model.onnx"))


# 2. Threads ------------------------------------------------------------------------------------

def test_one_model_from_8_threads_x_100_runs(tiny):
    model, _, x = tiny
    want = model.run(x)[0]
    xs = [models.example_input(SHAPE, seed=s) for s in range(4)]
    wants = [model.run(v)[0] for v in xs]
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda i: (i % 4, model.run(xs[i % 4])[0]), range(800)))
    assert all(np.array_equal(out, wants[i]) for i, out in outs)
    with ThreadPoolExecutor(4) as pool:
        stats = list(pool.map(lambda _: model.benchmark(x, repeat=3), range(8)))
    assert all(s["repeat"] == 3 and s["median_ms"] > 0 for s in stats)
    assert np.array_equal(model.run(x)[0], want)


# 3./4. Damaged libraries and sidecars ----------------------------------------------------------

def _copy_library(path, tmp_path, name="copy.so"):
    dst = tmp_path / name
    dst.write_bytes(open(path, "rb").read())
    (tmp_path / (name + library.SIDECAR_SUFFIX)).write_bytes(open(path + library.SIDECAR_SUFFIX, "rb").read())
    return dst


def test_truncated_or_overwritten_library_is_refused_before_loading(tiny, tmp_path):
    _, path, x = tiny
    lib = _copy_library(path, tmp_path)
    data = lib.read_bytes()
    meta = json.loads((tmp_path / "copy.so.sparks.json").read_text())
    assert meta["library"]["size"] == len(data) and len(meta["library"]["sha256"]) == 64
    lib.write_bytes(data[: len(data) // 3])
    with pytest.raises(LibraryError, match="truncated"):
        sparks_tvm.load(lib)
    lib.write_bytes(data[:1000] + bytes([data[1000] ^ 0xFF]) + data[1001:])  # same size, one byte changed
    with pytest.raises(LibraryError, match="sha256"):
        sparks_tvm.load(lib)
    lib.write_bytes(data)
    assert np.array_equal(sparks_tvm.load(lib).run(x)[0], tiny[0].run(x)[0])


@pytest.mark.parametrize("content", [b"", b"   \n", b"{\"inputs\": [", b"\xff\xfe", b"[]", b"null",
                                     b'{"inputs": [], "outputs": []}'])
def test_corrupt_sidecar_is_a_named_error(tiny, tmp_path, content):
    lib = _copy_library(tiny[1], tmp_path)
    (tmp_path / "copy.so.sparks.json").write_bytes(content)
    with pytest.raises(LibraryError, match="copy.so.sparks.json"):
        sparks_tvm.load(lib)


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-5, 1 << 40) | st.floats() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                     max_leaves=12)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_fuzz_sidecar_reader(tiny, tmp_path_factory, data):
    # Random damage to a real sidecar (a field replaced, deleted, or the text cut): the reader
    # either accepts it or raises LibraryError, never anything else.
    tmp_path = tmp_path_factory.mktemp("fuzz")
    lib = _copy_library(tiny[1], tmp_path)
    side = tmp_path / "copy.so.sparks.json"
    meta = json.loads(side.read_text())
    how = data.draw(st.sampled_from(["replace", "delete", "cut", "bytes", "input"]))
    if how == "replace":
        meta[data.draw(st.sampled_from(sorted(meta)))] = data.draw(_JSON)
    elif how == "delete":
        del meta[data.draw(st.sampled_from(sorted(meta)))]
    elif how == "input":
        meta["inputs"][0][data.draw(st.sampled_from(["name", "shape", "dtype"]))] = data.draw(_JSON)
    text = json.dumps(meta).encode()
    if how == "cut":
        text = text[: data.draw(st.integers(0, len(text) - 1))]
    elif how == "bytes":
        text = data.draw(st.binary(max_size=200))
    side.write_bytes(text)
    try:
        meta = library.read_sidecar(str(lib))
        library.check_library(str(lib), meta)
    except LibraryError:
        return
    assert isinstance(meta, dict)


def _npz_bytes(**arrays):
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_fuzz_npz_reader(tmp_path_factory, data):
    good = _npz_bytes(input=np.ones((1, 3, 7, 7), np.float32), other=np.arange(5))
    how = data.draw(st.sampled_from(["cut", "flip", "bytes"]))
    if how == "cut":
        blob = good[: data.draw(st.integers(0, len(good) - 1))]
    elif how == "flip":
        i = data.draw(st.integers(0, len(good) - 1))
        blob = good[:i] + bytes([good[i] ^ data.draw(st.integers(1, 255))]) + good[i + 1:]
    else:
        blob = data.draw(st.binary(max_size=300))
    path = tmp_path_factory.mktemp("npz") / "x.npz"
    path.write_bytes(blob)
    try:
        arrays = library.read_inputs(str(path), ["input"])
    except InputFileError:
        return
    assert len(arrays) == 1


def test_npz_reader_names_the_problem(tmp_path):
    np.save(tmp_path / "x.npy", np.ones(3))
    with pytest.raises(InputFileError, match="an .npy holds one unnamed array.*'input'"):
        library.read_inputs(str(tmp_path / "x.npy"), ["input"])
    np.savez(tmp_path / "y.npz", data=np.ones(3))
    with pytest.raises(InputFileError, match=r"lacks input\(s\) \['input'\].*\['data'\]"):
        library.read_inputs(str(tmp_path / "y.npz"), ["input"])
    np.savez(tmp_path / "p.npz", input=np.array([{"a": 1}], dtype=object))
    with pytest.raises(InputFileError, match="p.npz"):
        library.read_inputs(str(tmp_path / "p.npz"), ["input"])


# 8. The linker's message -----------------------------------------------------------------------

def test_failed_export_shows_the_linkers_output(tiny, tmp_path):
    fake = tmp_path / "fake-ld"
    fake.write_text("#!/bin/sh\necho 'fake-ld: first line of noise' >&2\n"
                    "echo 'fake-ld: error: cannot find -lsparks_missing' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(ExportError, match="cannot find -lsparks_missing") as info:
        tiny[0].export_library(str(tmp_path / "out.so"), cross_compiler=str(fake))
    assert "fake-ld" in str(info.value)
    with pytest.raises(ExportError, match="cannot write to the output folder /proc"):
        tiny[0].export_library("/proc/out.so")


# 6. One tuner per work dir ---------------------------------------------------------------------

def layer_onnx(path):
    """One Sparks layer, ``Conv(Sign(x), alpha * codebook[idx])``: the smallest model to tune."""
    rng = np.random.default_rng(0)
    cb = models.random_codebook(rng, 4).astype(np.float32)
    weight = cb[rng.integers(0, 4, size=(8, 8))] * np.float32(0.5)
    graph = helper.make_graph(
        [helper.make_node("Sign", ["x"], ["b"]),
         helper.make_node("Conv", ["b", "W"], ["y"], pads=[1, 1, 1, 1], kernel_shape=[3, 3])], "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 6, 6])],
        [numpy_helper.from_array(weight, "W")])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return str(path)


def _tune_cmd(model, work_dir, *extra):
    return [sys.executable, "-m", "sparks_tvm.cli", "tune", model, "--work-dir", str(work_dir), "--trials", "2",
            "--batch", "2", *extra]


#: Another process holding a work dir's lock as a running tune does (flock + its PID).
HOLDER = ("import fcntl, os, sys\n"
          "fd = os.open(os.path.join(sys.argv[1], '.sparks-tune.lock'), os.O_RDWR | os.O_CREAT)\n"
          "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'%d\\n' % os.getpid())\n"
          "print('held', flush=True); sys.stdin.read()\n")


def test_second_tune_on_a_locked_work_dir_fails_naming_the_holder(tmp_path, capsys):
    model = layer_onnx(tmp_path / "layer.onnx")
    work = tmp_path / "work"
    work.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(work)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert cli.main(["tune", model, "--work-dir", str(work), "--trials", "1"]) == 2
        err = capsys.readouterr().err
        assert f"PID {holder.pid}" in err and "--wait" in err and err.count("\n") == 1
        with pytest.raises(WorkDirLockedError):
            sparks_tvm.tune(model, work_dir=work, trials=1)
    finally:
        holder.communicate("")  # closes its stdin: it exits, and the kernel drops the lock
    assert os.listdir(work) == [database.LOCK_FILE]  # the refused runs wrote nothing
    with database.lock_work_dir(str(work)):  # free again; another thread of ours is refused too
        assert (work / database.LOCK_FILE).read_text().strip() == str(os.getpid())
        with ThreadPoolExecutor(1) as pool:
            with pytest.raises(WorkDirLockedError, match=f"PID {os.getpid()}"):
                pool.submit(lambda: database.lock_work_dir(str(work)).__enter__()).result()


def test_two_concurrent_tunes_on_one_work_dir(tmp_path):
    model = layer_onnx(tmp_path / "layer.onnx")
    work = tmp_path / "work"
    env = dict(os.environ, PYTHONPATH=REPO, TVM_NUM_THREADS="1")
    procs = [subprocess.Popen(_tune_cmd(model, work, "--wait", "--threads", "1"), cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert all("Traceback" not in err for _, err in outs)
    for name in (database.RECORDS_FILE, database.WORKLOADS_FILE, database.TRIALS_FILE):
        lines = (work / name).read_bytes().split(b"\n")
        assert lines[-1] == b"" and all(json.loads(line) is not None for line in lines[:-1])
    # The second run found the first one's trials and ran none: one default seed, 2 trials.
    trials = (work / database.TRIALS_FILE).read_text().splitlines()
    assert len(trials) == 2
    meta = json.loads((work / database.META_FILE).read_text())
    assert len(meta["tasks"]) == 1


# 7. The tuning database ------------------------------------------------------------------------

def _records(tmp_path, text: bytes):
    work = tmp_path / "w"
    work.mkdir(exist_ok=True)
    (work / database.RECORDS_FILE).write_bytes(text)
    return work, work / database.RECORDS_FILE


def test_only_a_newline_less_last_line_is_dropped(tmp_path):
    work, path = _records(tmp_path, b'[1, 2]\n[3, 4]\n[5, 6')
    assert database.repair_records(str(work)) == 1
    assert path.read_bytes() == b'[1, 2]\n[3, 4]\n'
    work, path = _records(tmp_path, b'[1, 2]\n[3, 4]')  # whole, but its newline missing: finished
    assert database.repair_records(str(work)) == 0 and path.read_bytes() == b'[1, 2]\n[3, 4]\n'


@pytest.mark.parametrize("text", [b'[1, 2]\n[3, 4\n', b'[1, 2]\n{garbage\n[5, 6]\n', b'\x00\x00\n[1]\n'])
def test_other_damage_is_reported_and_the_file_kept(tmp_path, text):
    work, path = _records(tmp_path, text)
    with pytest.raises(TuningDatabaseError, match="line .* is not a JSON record.*kept"):
        database.repair_records(str(work))
    assert path.read_bytes() == text


# 5. (the API side) and full disks --------------------------------------------------------------

def test_log_file_on_a_full_disk_says_so_once(capsys):
    logger = logging.getLogger("sparks_tvm.test.fulldisk")
    handler = LogFile("/dev/full")
    logger.addHandler(handler)
    try:
        for i in range(3):
            logger.warning("line %d", i)
    finally:
        logger.removeHandler(handler)
        handler.close()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "Traceback" not in err


def test_cli_output_on_a_full_disk_is_one_line(tmp_path, capsys):
    model = layer_onnx(tmp_path / "layer.onnx")
    assert cli.main(["inspect", model, "-o", "/dev/full"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "/dev/full: No space left on device" in err, err
    with open("/dev/full", "w") as full:  # stdout itself full: the interpreter must not add its own message
        res = subprocess.run([sys.executable, "-m", "sparks_tvm.cli", "inspect", model], stdout=full,
                             stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=REPO), timeout=120)
    assert res.returncode == 1, res.stderr
    assert res.stderr.count("\n") == 1 and "No space left on device" in res.stderr, res.stderr


def test_zip_member_damage_is_an_input_file_error(tmp_path):
    path = tmp_path / "x.npz"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("input.npy", b"\x93NUMPY garbage")
    with pytest.raises(InputFileError, match="x.npz"):
        library.read_inputs(str(path), ["input"])
