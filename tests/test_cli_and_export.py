"""CLI compile/run and export_library/load round trip."""

import json

import numpy as np

import sparks_tvm
from sparks_tvm import cli, models


def test_parse_shapes():
    assert cli.parse_shapes("input:1x3x224x224,m:2x5") == {"input": (1, 3, 224, 224), "m": (2, 5)}


def test_compile_run_roundtrip(tmp_path, capsys):
    net = models.sparks_resnet_tiny(k=4, widths=(8, 12))
    onnx_path = tmp_path / "m.onnx"
    data = models.export_onnx(net, (2, 3, 7, 7), onnx_path)
    so = tmp_path / "m.so"
    assert cli.main(["compile", str(onnx_path), "--target", "llvm", "--shapes", "input:2x3x7x7", "-o", str(so)]) == 0
    out = capsys.readouterr().out
    assert "4 sparks" in out
    # the thread count compile built for, and where it came from (issue 22)
    model_threads = sparks_tvm.load(so).num_threads
    assert f"threads: {model_threads} (" in out
    x = models.example_input((2, 3, 7, 7), seed=9)
    np.savez(tmp_path / "x.npz", input=x)
    assert cli.main(["run", str(so), "--inputs", str(tmp_path / "x.npz"), "--outputs", str(tmp_path / "y.npz")]) == 0
    y = np.load(tmp_path / "y.npz")["output"]
    direct = sparks_tvm.compile(data).run(x)[0]
    assert np.array_equal(y, direct)
    loaded = sparks_tvm.load(so)
    assert loaded.report.count("sparks") == 4
    assert np.array_equal(loaded.run(x)[0], direct)
    meta = json.loads((tmp_path / "m.so.sparks.json").read_text())
    assert meta["inputs"][0]["shape"] == [2, 3, 7, 7]

    capsys.readouterr()
    assert cli.main(["bench", str(so), "--warmup", "1", "--repeat", "4", "--layers", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    lat = result["latency"]
    assert lat["runs"] == 4 and lat["min_ms"] <= lat["median_ms"] <= lat["p99_ms"] <= lat["max_ms"]
    assert lat["throughput_per_s"] > 0
    kernels = {r["kernel"]: r for r in result["layers"]}
    assert sum(1 for k in kernels if "sparks_conv2d_" in k) == 4  # fused_sparks_conv2d_1_cast_...: epilogue fused
    assert abs(sum(r["share"] for r in result["layers"]) - 1.0) < 1e-6
    assert cli.main(["bench", str(so), "--repeat", "0"]) == 2


def test_cli_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\x01garbage")
    assert cli.main(["compile", str(bad), "-o", str(tmp_path / "o.so")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparks-tvm: error:") and "bad.onnx" in err and "Traceback" not in err
