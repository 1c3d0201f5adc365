"""Issue 21: every command x every class of bad input ends in one line naming the bad thing,
exit status 1 or 2, no traceback (``--debug`` shows it); and the CLI's user-experience items
(``--version``, ``-o`` named after the input, per-phase times, ``--quiet``, one spelling of the
RPC flags, ``bench --json``'s target as an object).

Budget: about 25 s (one tiny compile through the CLI, the rest fails before any compiling).
"""

import contextlib
import io
import json
import os

import numpy as np
import pytest

from sparks_tvm import cli, models
from sparks_tvm.target import host_target, target_json
from sparks_tvm.tune import database

SHAPE = (1, 3, 7, 7)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Good and bad files: ``{name: path}`` (a compiled library, a model, damaged copies...)."""
    d = tmp_path_factory.mktemp("cli")
    model = d / "m.onnx"
    models.export_onnx(models.sparks_resnet_tiny(k=4, widths=(8, 12)), SHAPE, model)
    lib = d / "m.so"
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):
        assert cli.main(["compile", str(model), "-o", str(lib), "--quiet"]) == 0
    f = {"model": str(model), "lib": str(lib), "dir": str(d / "adir"), "file": str(d / "afile"),
         "quiet_output": quiet.getvalue()}
    os.mkdir(f["dir"])
    open(f["file"], "w").write("not a folder\n")
    (d / "bad.onnx").write_bytes(b"\x00\x01garbage")
    f["bad_onnx"] = str(d / "bad.onnx")
    data, side = lib.read_bytes(), (d / "m.so.sparks.json").read_bytes()
    for name, lib_bytes, side_bytes in (("truncated", data[: len(data) // 2], side), ("empty_side", data, b""),
                                        ("garbage_side", data, b"{\"inputs\": [1,"), ("no_side", data, None)):
        (d / f"{name}.so").write_bytes(lib_bytes)
        if side_bytes is not None:
            (d / f"{name}.so.sparks.json").write_bytes(side_bytes)
        f[name] = str(d / f"{name}.so")
    np.save(d / "x.npy", np.ones(SHAPE, np.float32))
    np.savez(d / "wrong_name.npz", data=np.ones(SHAPE, np.float32))
    np.savez(d / "wrong_shape.npz", input=np.ones((2, 3), np.float32))
    (d / "garbage.npz").write_bytes(b"PK\x03\x04 not really a zip")
    f.update(npy=str(d / "x.npy"), wrong_name=str(d / "wrong_name.npz"), wrong_shape=str(d / "wrong_shape.npz"),
             garbage_npz=str(d / "garbage.npz"))
    for name, meta, records in (("db_bad_meta", b"{oops", b""),
                                ("db_bad_records", json.dumps({"target": target_json(host_target()), "tasks": {}}),
                                 b"[1, 2]\n{damaged\n[3]\n"),
                                ("db_not_records", json.dumps({"target": target_json(host_target()), "tasks": {}}),
                                 b"[1, 2]\n")):
        w = d / name
        w.mkdir()
        (w / database.META_FILE).write_bytes(meta.encode() if isinstance(meta, str) else meta)
        (w / database.RECORDS_FILE).write_bytes(records)
        (w / database.WORKLOADS_FILE).write_bytes(b"")
        f[name] = str(w)
    f["missing_folder_out"] = str(d / "no" / "such" / "out")
    return f


#: (id, argv with {placeholders} from ``files``, text the error line must hold)
CASES = [
    # compile
    ("compile-missing", "compile {dir}/nope.onnx", "nope.onnx: no such file"),
    ("compile-directory", "compile {dir}", "a directory"),
    ("compile-corrupt", "compile {bad_onnx}", "bad.onnx"),
    ("compile-target-json", "compile {model} --target {{kind:llvm", "not valid JSON"),
    ("compile-target-unknown", "compile {model} --target nosuchcpu", "unknown target 'nosuchcpu'"),
    ("compile-shapes", "compile {model} --shapes input:1xAx7", "--shapes"),
    ("compile-out-unwritable", "compile {model} -o /proc/m.so", "cannot write to the output folder /proc"),
    ("compile-out-no-folder", "compile {model} -o {missing_folder_out}.so", "does not exist"),
    ("compile-out-directory", "compile {model} -o {dir}", "is a directory"),
    ("compile-tuning-db-file", "compile {model} --tuning-db {file}", "no such directory"),
    ("compile-tuning-db-meta", "compile {model} --tuning-db {db_bad_meta}", "unreadable tuning metadata"),
    ("compile-tuning-db-records", "compile {model} --tuning-db {db_bad_records}", "not a JSON record"),
    ("compile-tuning-db-not-records", "compile {model} --tuning-db {db_not_records}", "is corrupt"),
    # run
    ("run-missing", "run {dir}/nope.so", "nope.so: no such file"),
    ("run-directory", "run {dir}", "a directory"),
    ("run-truncated", "run {truncated}", "truncated"),
    ("run-empty-sidecar", "run {empty_side}", "empty_side.so.sparks.json is empty"),
    ("run-garbage-sidecar", "run {garbage_side}", "not valid JSON"),
    ("run-no-sidecar", "run {no_side}", "no_side.so.sparks.json is missing"),
    ("run-repeat-negative", "run {lib} --repeat -1", "--repeat: must be >= 0, got -1"),
    ("run-repeat-text", "run {lib} --repeat many", "--repeat: expected an integer"),
    ("run-npy", "run {lib} --inputs {npy}", "an .npy holds one unnamed array"),
    ("run-npz-name", "run {lib} --inputs {wrong_name}", "lacks input(s) ['input']"),
    ("run-npz-garbage", "run {lib} --inputs {garbage_npz}", "cannot read inputs"),
    ("run-npz-shape", "run {lib} --inputs {wrong_shape}", "expected shape (1, 3, 7, 7)"),
    ("run-inputs-missing", "run {lib} --inputs {dir}/none.npz", "no such file"),
    ("run-outputs-folder", "run {lib} --outputs {missing_folder_out}.npz", "does not exist"),
    ("run-rpc-address", "run {lib} --rpc nohostport", "bad RPC server address"),
    # bench
    ("bench-repeat-zero", "bench {lib} --repeat 0", "--repeat: must be >= 1"),
    ("bench-warmup-negative", "bench {lib} --warmup -1", "--warmup: must be >= 0"),
    ("bench-npy", "bench {lib} --inputs {npy}", "an .npy holds one unnamed array"),
    ("bench-npz-name", "bench {lib} --inputs {wrong_name}", "lacks input(s)"),
    ("bench-truncated", "bench {truncated}", "truncated"),
    ("bench-garbage-sidecar", "bench {garbage_side}", "not valid JSON"),
    # inspect
    ("inspect-directory", "inspect {dir}", "a directory"),
    ("inspect-missing", "inspect {dir}/nope.onnx", "no such file"),
    ("inspect-out-directory", "inspect {model} -o {dir}", "is a directory"),
    ("inspect-out-no-folder", "inspect {model} -o {missing_folder_out}.txt", "does not exist"),
    # tune
    ("tune-batch-zero", "tune {model} --work-dir {dir}/w --batch 0", "--batch: must be >= 1, got 0"),
    ("tune-trials-negative", "tune {model} --work-dir {dir}/w --trials -1", "--trials: must be >= 0"),
    ("tune-threads-zero", "tune {model} --work-dir {dir}/w --threads 0", "--threads: must be >= 1"),
    ("tune-work-dir-file", "tune {model} --work-dir {file}", "is a file, not a folder"),
    ("tune-corrupt-db", "tune {model} --work-dir {db_bad_records} --trials 1", "not a JSON record"),
    ("tune-db-not-records", "tune {model} --work-dir {db_not_records} --trials 1", "is corrupt"),
    ("tune-target-json", "tune {model} --work-dir {dir}/w --target {{bad", "not valid JSON"),
    ("tune-rpc-key-alone", "tune {model} --work-dir {dir}/w --rpc-key rpi4b", "go together"),
    ("tune-directory", "tune {dir} --work-dir {dir}/w", "a directory"),
    ("tune-no-work-dir", "tune {model}", "--work-dir"),
    # the top level
    ("no-command", "", "command"),
    ("unknown-command", "frobnicate", "frobnicate"),
]


def _argv(template, files):
    return template.format(**files).split()


@pytest.mark.parametrize("template,needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(files, capsys, template, needle):
    status = cli.main(_argv(template, files))
    out = capsys.readouterr()
    assert status in (1, 2), out
    assert "Traceback" not in out.err + out.out
    assert out.err.count("\n") == 1 and out.err.startswith("sparks-tvm"), out.err
    assert needle in out.err, out.err


ARGPARSE = ("--repeat", "--warmup", "--batch", "--trials", "--threads", "--work-dir", "command")


@pytest.mark.parametrize("template", [c[1] for c in CASES if not any(a in c[2] for a in ARGPARSE)
                                      and "frobnicate" not in c[1]][::4])
def test_debug_shows_the_traceback(files, capsys, template):
    assert cli.main(["--debug"] + _argv(template, files)) in (1, 2)
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("sparks-tvm: error:")


def test_ux_version_output_name_phases_quiet(files, tmp_path, monkeypatch, capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("sparks-tvm 0.")
    assert files["quiet_output"].splitlines() == [f"wrote {files['lib']} (+{files['lib']}.sparks.json)"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.so").write_bytes(b"an older library")
    assert cli.main(["compile", files["model"]]) == 0  # no -o: named after the input, here
    out = capsys.readouterr().out
    assert (tmp_path / "m.so").stat().st_size > 1000 and (tmp_path / "m.so.sparks.json").exists()
    phases = [line.split()[0] for line in out.splitlines()[:4]]
    assert phases == ["import", "passes", "build", "link"], out
    assert all(line.split()[-1] == "s" for line in out.splitlines()[:4])
    assert out.rstrip().splitlines()[-1] == "replaced m.so (+m.so.sparks.json)"


def test_ux_bench_json_target_is_an_object(files, capsys):
    assert cli.main(["bench", files["lib"], "--warmup", "0", "--repeat", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert isinstance(result["target"], dict) and result["target"]["kind"] == "llvm"


def test_ux_one_spelling_of_the_rpc_flags():
    parser = cli.build_parser()
    for cmd in (["run", "m.so"], ["tune", "m.onnx", "--work-dir", "w"]):
        new = parser.parse_args(cmd + ["--rpc-tracker", "h:9190", "--rpc-key", "rpi4b"])
        old = parser.parse_args(cmd + ["--tracker", "h:9190", "--key", "rpi4b"])
        assert (new.tracker, new.key) == (old.tracker, old.key) == ("h:9190", "rpi4b")
    assert parser.parse_args(["tune", "m.onnx", "--work-dir", "w", "--threads", "1", "--wait"]).threads == 1
