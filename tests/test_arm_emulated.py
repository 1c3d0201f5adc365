"""End to end on an emulated Raspberry Pi 4: compile for arm_cpu -> cross-link -> upload over
TVM RPC to a qemu-aarch64 rpc_server on 127.0.0.1 -> run -> compare with the host references.

The emulated device is provisioned by scripts/emulated_pi/setup.sh (apt + a cached aarch64
userland with TVM's runtime, ~1 min from scratch, ~1 s cached); the module starts one RPC
server on a free port and stops it at the end.
"""

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tvm

import schedules
import sparks_tvm
from sparks_tvm import cli, models, rpc
from sparks_tvm import reference as ref
from sparks_tvm.kernels import ConvGeometry
from sparks_tvm.models import random_codebook
from sparks_tvm.target import resolve_target

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts" / "emulated_pi"))
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_arm_icount as bench  # noqa: E402
import pi  # noqa: E402


@pytest.fixture(scope="module")
def device():
    try:
        pi.setup()
    except pi.ProvisionError as err:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the emulated-Pi tests, but provisioning is impossible: {err}")
        pytest.skip(f"cannot provision the emulated Pi here: {err}")
    with pi.EmulatedPi(startup_timeout=180) as server:
        yield server
    assert not server.alive()


@pytest.fixture(scope="module")
def arm():
    return resolve_target("arm_cpu")


def ort_run(data, x):
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def assert_close(got, want):
    # Same bound as test_models: binary layers are exact and the dyadic example weights keep
    # the float ops exact up to the average pool / classifier, which may round differently
    # (aarch64 fuses multiply-adds where x86 and onnxruntime may not).
    scale = max(1.0, float(np.abs(want).max()))
    assert np.abs(got - want).max() <= 2e-6 * scale, (np.abs(got - want).max(), scale)


# Random small layers: odd sizes, stride 2, batch > 1, channel counts that are not multiples
# of 32 (and above 32: two packed words), zeros in the input (Sign(0) = 0), all binarizers.
def _small_layers():
    rng = np.random.default_rng(2024)
    fixed = [
        (ConvGeometry(2, 33, 7, 9, 17, stride=(1, 1)), 5, "sign"),
        (ConvGeometry(1, 40, 11, 6, 24, stride=(2, 2)), 16, "ge"),
        (ConvGeometry(3, 5, 5, 5, 3, stride=(2, 2), padding=(0, 0, 0, 0)), 2, "gt"),
        (ConvGeometry(1, 64, 8, 8, 70, stride=(1, 1), padding=(1, 0, 1, 0)), 64, "sign"),
        # stride 1, 143 pixels: NEON's 64-pixel tile (flat planes), the last tile partial
        (ConvGeometry(2, 19, 11, 13, 21, stride=(1, 1)), 16, "sign"),
        # 14-wide rows (two overlapping 8-lane binarize vectors), 7 output columns at stride 2
        # (8-lane triples past the row), K = 16 with packed rows
        (ConvGeometry(1, 30, 14, 14, 20, stride=(2, 2)), 16, "sign"),
        # 128-pixel tiles: 64-byte rows gathered and stored by post-indexed ld1 / st1, K = 32
        # with one index per byte, K = 16 with two (stage 2 walks them field by field)
        (ConvGeometry(2, 36, 18, 18, 20, stride=(1, 1)), 32, "ge"),
        (ConvGeometry(1, 37, 18, 18, 12, stride=(1, 1)), 16, "sign"),
        # 28x28: the last tile of each image reads 32 of its rows' 64 bytes (batch 2: tasks
        # by tile; batch 1: 7 tiles for 4 cores, tasks by output-channel chunk)
        (ConvGeometry(2, 21, 28, 28, 6, stride=(1, 1)), 16, "ge"),
        (ConvGeometry(1, 23, 28, 28, 12, stride=(1, 1)), 16, "sign"),
        # the dense kernel's asm tiles (no zero under ge): 7 pixels x 16 channels on 14-wide rows
        # with a last block of one register (40 channels), 4 x 32 at stride 2 (36 channels)
        (ConvGeometry(1, 40, 14, 14, 40, stride=(1, 1)), 64, "ge"),
        (ConvGeometry(1, 24, 16, 16, 36, stride=(2, 2)), 64, "ge"),
    ]
    rand = []
    for _ in range(3):
        geom = ConvGeometry(int(rng.integers(1, 3)), int(rng.integers(1, 70)), int(rng.integers(3, 12)),
                            int(rng.integers(3, 12)), int(rng.integers(1, 50)),
                            stride=(int(rng.integers(1, 3)),) * 2)
        rand.append((geom, int(rng.integers(1, 65)), str(rng.choice(["sign", "ge", "gt"]))))
    return fixed + rand


def test_random_small_layers_exact_on_device(device, arm, tmp_path):
    """Both binary kernels, ARM schedules, in one cross-linked library: int32 bit-exact on the Pi."""
    from sparks_tvm.kernels import pack_indices

    rng = np.random.default_rng(7)
    sched = schedules.for_target(arm)
    funcs, cases = {}, []
    for i, (geom, k, mode) in enumerate(_small_layers()):
        x = rng.standard_normal(geom.in_shape).astype(np.float32)
        x[rng.random(geom.in_shape) < 0.2] = 0.0
        a = ref.binarize(x, mode)
        codebook = random_codebook(rng, k).astype(np.int8)
        idx = rng.integers(0, k, size=(geom.out_channels, geom.in_channels)).astype(np.int32)
        funcs[f"sparks_{i}"] = sched.schedule_sparks_conv2d(geom, k, mode)
        cases.append((f"sparks_{i}", [x, ref.codes_to_bits(codebook), pack_indices(idx, k)],
                      ref.sparks_conv2d_ref(a, codebook, idx, geom.stride, geom.padding),
                      bench.out_shape_of("sparks", geom)))
        signs = codebook[idx]  # (O, C, 3, 3) in {-1, +1}
        funcs[f"binary_{i}"] = sched.schedule_binary_conv2d(geom, mode)
        cases.append((f"binary_{i}", [x, sched.binary_weights(geom, mode, signs)],
                      ref.binary_conv2d_ref(a, signs, geom.stride, geom.padding),
                      bench.out_shape_of("binary", geom)))
    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    from tvm.support import cc

    path = tmp_path / "layers.so"
    tvm.compile(mod, target=arm).export_library(str(path), fcompile=cc.cross_compiler("aarch64-linux-gnu-gcc"))
    got = run_remote_functions(device.address, path, [(name, args, buf) for name, args, _, buf in cases])
    for (name, _, want, _), out in zip(cases, got):
        # The kernel may write NCHW or flattened pixels (N, O, OH*OW): same values either way.
        out = out.reshape(want.shape)
        assert np.array_equal(out, want), (name, int((out != want).sum()))


def run_remote_functions(address, lib_path, calls):
    """Upload a library and call each ``(function, inputs, output shape)`` on the device.

    Only numpy leaves this function, and its remote handles are dropped even when a call
    fails: the server serves one session at a time, so a leaked session would stall the
    other tests.
    """
    sess = rlib = dev = out = None
    try:
        sess = rpc.connect(address, timeout=60, session_timeout=300)
        sess.upload(str(lib_path))
        rlib = sess.load_module(lib_path.name)
        dev = sess.cpu()
        outs = []
        for name, args, shape in calls:
            out = tvm.runtime.tensor(np.zeros(shape, np.int32), dev)
            rlib[name](*[tvm.runtime.tensor(a, dev) for a in args], out)
            outs.append(out.numpy())
        return outs
    finally:
        sess = rlib = dev = out = None


@pytest.mark.parametrize("kind,shape", [("sparks", (2, 3, 9, 7)), ("binary", (1, 3, 11, 13))])
def test_tiny_model_on_device_matches_host(device, kind, shape):
    net = models.sparks_resnet_tiny(k=8, seed=11, widths=(9, 40), ste="detach")
    data = models.export_onnx(net, shape)
    model = sparks_tvm.compile(data, target="arm_cpu", force_kind=kind)
    assert [r.kind for r in model.report if r.binarizer] == [kind] * 4
    x = models.example_input(shape, seed=4)
    with rpc.deploy(model, device.address) as remote:
        got = remote.run(x)[0]
    host = sparks_tvm.compile(data, target="llvm", force_kind=kind).run(x)[0]
    assert_close(got, ort_run(data, x))
    assert_close(got, host)
    assert np.array_equal(np.argmax(got, 1), np.argmax(host, 1))


def test_resnet18_on_device(device, tmp_path):
    """The example Sparks ResNet-18 (K=16, 224x224) on the emulated Pi: ~5 s of emulated run."""
    net = models.sparks_resnet18(k=16)
    data = models.export_onnx(net, (1, 3, 224, 224), tmp_path / "r18.onnx")
    model = sparks_tvm.compile(str(tmp_path / "r18.onnx"), target="arm_cpu")
    kinds = [r.kind for r in model.report]
    assert kinds.count("sparks") == 16 and kinds.count("float") == 4
    x = models.example_input((1, 3, 224, 224), seed=2)
    with rpc.deploy(model, device.address, session_timeout=300) as remote:
        got = remote.run(x)[0]
        stats = remote.benchmark(x, repeat=1)  # TVM's time evaluator, run on the device
    want = ort_run(data, x)
    assert_close(got, want)
    assert np.argmax(got) == np.argmax(want)
    assert stats["median_ms"] > 0 and stats["repeat"] == 1


def test_cli_compile_arm_and_run_over_rpc(device, tmp_path, capsys):
    net = models.sparks_resnet_tiny(k=4, widths=(8, 12))
    onnx_path = tmp_path / "m.onnx"
    data = models.export_onnx(net, (2, 3, 7, 7), onnx_path)
    so = tmp_path / "m.so"
    assert cli.main(["compile", str(onnx_path), "--target", "arm_cpu", "-o", str(so)]) == 0
    out = capsys.readouterr().out
    assert '"mtriple": "aarch64-linux-gnu"' in out and "4 sparks" in out
    x = models.example_input((2, 3, 7, 7), seed=9)
    np.savez(tmp_path / "x.npz", input=x)
    assert cli.main(["run", str(so), "--rpc", device.address, "--inputs", str(tmp_path / "x.npz"),
                     "--outputs", str(tmp_path / "y.npz"), "--repeat", "2"]) == 0
    out = capsys.readouterr().out
    assert "remote device" in out and "latency: median" in out
    assert_close(np.load(tmp_path / "y.npz")["output"], ort_run(data, x))
    meta = json.loads((tmp_path / "m.so.sparks.json").read_text())
    assert "aarch64" in meta["target"]


def test_cli_run_rpc_dead_server_is_one_line_error(tmp_path, capsys):
    net = models.sparks_resnet_tiny(k=4, widths=(8, 12))
    onnx_path = tmp_path / "m.onnx"
    models.export_onnx(net, (1, 3, 7, 7), onnx_path)
    so = tmp_path / "m.so"
    try:
        cli.main(["compile", str(onnx_path), "--target", "arm_cpu", "-o", str(so)])
    except Exception:  # pragma: no cover - cross tools missing
        pytest.skip("cross linker unavailable")
    capsys.readouterr()
    port = pi.free_port()
    t0 = time.monotonic()
    assert cli.main(["run", str(so), "--rpc", f"127.0.0.1:{port}", "--rpc-timeout", "5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparks-tvm: error: cannot reach the RPC server") and "Traceback" not in err
    assert time.monotonic() - t0 < 10


def test_instruction_counts_exact_and_repeatable(device, arm):
    """The icount plugin: same count on every run; two calls count exactly twice one call."""
    rng = np.random.default_rng(0)
    geom = ConvGeometry(1, 16, 9, 9, 24)
    one = bench.sparks_kernel(0, geom, 8, rng, arm)
    two = bench.Kernel(1, "x2", one.func, one.args, one.out_shape, calls=2, expected=one.expected)
    dense = bench.dense_kernel(2, geom, rng, arm)
    first = bench.count([one, two, dense], arm)
    again = bench.count([one, two, dense], arm)
    assert first == again
    assert first[0] > 10_000 and first[1] == 2 * first[0]
    assert first[2] > 10_000 and first[2] != first[0]


def test_tracker_deploy_and_server_dying_mid_session(device):
    """A second emulated Pi registered with an RPC tracker under a key: deploy through the
    tracker, run; then the Pi dies mid-session: the next run is a RemoteError, fast."""
    from tvm.rpc.tracker import Tracker

    net = models.sparks_resnet_tiny(k=4, widths=(8, 12))
    data = models.export_onnx(net, (1, 3, 7, 7))
    model = sparks_tvm.compile(data, target="arm_cpu")
    x = models.example_input((1, 3, 7, 7), seed=1)
    tport = pi.free_port()
    tracker = Tracker("127.0.0.1", tport, tport + 1, silent=True)
    try:
        with pi.EmulatedPi(startup_timeout=180, tracker=f"127.0.0.1:{tracker.port}", key="rpi4b") as other:
            remote = rpc.deploy(model, tracker=f"127.0.0.1:{tracker.port}", key="rpi4b", timeout=60,
                                session_timeout=120)
            assert_close(remote.run(x)[0], ort_run(data, x))
            other.stop()
            assert not other.alive()
            t0 = time.monotonic()
            with pytest.raises(rpc.RemoteError, match="running the model on the device"):
                remote.run(x)
            assert time.monotonic() - t0 < 60
            remote.close()
    finally:
        tracker.terminate()
    with pytest.raises(rpc.RemoteError, match="cannot reach"):
        rpc.connect(other.address, timeout=5)


def test_pi_script_python_and_serve(device):
    """scripts/emulated_pi/pi.py: `python` runs the device's interpreter; `serve` stops its
    server (no orphaned qemu process) when it is sent SIGTERM."""
    import signal
    import subprocess

    script = str(ROOT / "scripts" / "emulated_pi" / "pi.py")
    out = subprocess.run([sys.executable, script, "python", "-c", "import platform; print(platform.machine())"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "aarch64", out.stderr[-2000:]

    port = pi.free_port()
    proc = subprocess.Popen([sys.executable, script, "serve", "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()  # the server prints one line once it listens (bounded by its timeout)
        assert f"emulated Pi RPC server on 127.0.0.1:{port}" in line, line
        sess = rpc.connect(f"127.0.0.1:{port}", timeout=60)
        assert sess.cpu().exist
        # libtvm_runtime_extra.so is loaded: MetaSchedule's RPC runner fills arguments with it.
        assert sess.get_function("tvm.contrib.random.random_fill_for_measure") is not None
        sess = None
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    assert not pi.port_in_use("127.0.0.1", port)
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert f"--port {port} " not in ps, "the emulated Pi's server outlived `pi.py serve`"



def test_whole_layer_counts_exact_with_breakdown(device):
    """bench_arm_icount's whole-layer path: an ONNX Sign -> Conv -> BatchNormalization layer
    compiled for arm_cpu, run through the VM on the device; the count repeats exactly, the
    output matches onnxruntime, and the per-kernel breakdown covers the whole count."""
    import arm_layers

    data = arm_layers.layer_onnx(24, 20, 9, 1, "sparks", 16, seed=3)
    x = np.random.default_rng(5).standard_normal((1, 24, 9, 9)).astype(np.float32)
    compiled = sparks_tvm.compile(data, target="arm_cpu")
    assert [r.kind for r in compiled.report] == ["sparks"]
    model = arm_layers.Model(0, "layer", compiled, [x], ort_run(data, x), atol=1e-4)
    first = arm_layers.count_models([model])
    again = arm_layers.count_models([model])
    assert first == again
    total, per = first[0]
    assert total > 10_000
    # Every instruction of the library is in some symbol's range; the fused conv kernel dominates.
    assert sum(per.values()) == total
    conv = [v for name, v in per.items() if "sparks_conv2d" in name]
    assert conv and max(conv) > total // 2


def test_zig_linked_library_runs_on_device(device, tmp_path, capsys):
    """The pip-only toolchain: `sparks-tvm compile --cross-compiler <zig cc>` links the aarch64
    library with zig; on the Pi it gives the host's outputs exactly."""
    from sparks_tvm import toolchain

    net = models.sparks_resnet_tiny(k=8, seed=3, widths=(9, 24), ste="detach")
    onnx_path = tmp_path / "tiny.onnx"
    models.export_onnx(net, (1, 3, 9, 9), onnx_path)
    so = tmp_path / "tiny_zig.so"
    assert cli.main(["compile", str(onnx_path), "--target", "arm_cpu", "-o", str(so),
                     "--cross-compiler", toolchain.zig_linker(tmp_path)]) == 0
    capsys.readouterr()
    x = models.example_input((1, 3, 9, 9), seed=2)
    with rpc.deploy(str(so), device.address) as remote:
        got = remote.run(x)[0]
    host = sparks_tvm.compile(str(onnx_path), target="llvm").run(x)[0]
    assert_close(got, host)
