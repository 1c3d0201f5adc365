"""ARM target: aliases, schedule dispatch, cross-compiled aarch64 ELF (NEON cnt), export errors, RPC errors.

Nothing here runs aarch64 code (see test_arm_emulated.py); the cross tools come from
scripts/emulated_pi/setup.sh (provisioned on first use, cached).
"""

import json
import logging
import os
import socket
import struct
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

import schedules
import sparks_tvm
from schedules.arm import ArmSchedules
from schedules.host import HostSchedules
from sparks_tvm import models, rpc
from sparks_tvm.errors import CompileError, SparksError
from sparks_tvm.target import resolve_target, target_json

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "emulated_pi"))
import pi  # noqa: E402

EM_AARCH64 = 183


def provision():
    """Provision the cross tools + emulated Pi (cached); skip only where that is impossible."""
    try:
        return pi.setup()
    except pi.ProvisionError as err:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the ARM tests, but provisioning is impossible: {err}")
        pytest.skip(f"ARM cross tools unavailable and cannot be installed here: {err}")


@pytest.fixture(scope="module")
def cross_tools():
    return provision()


def elf_machine(path) -> int:
    with open(path, "rb") as fh:
        head = fh.read(20)
    assert head[:4] == b"\x7fELF", f"{path} is not an ELF file"
    return struct.unpack("<H", head[18:20])[0]


def cnt_by_function(so_path) -> dict:
    """{function name: number of NEON ``cnt`` instructions} from objdump's disassembly."""
    dis = subprocess.run(["aarch64-linux-gnu-objdump", "-d", "--no-show-raw-insn", str(so_path)],
                         capture_output=True, text=True, check=True).stdout
    counts, fn = {}, None
    for line in dis.splitlines():
        if line.endswith(">:"):
            fn = line.split("<", 1)[1][:-2]
            counts.setdefault(fn, 0)
        elif fn and "\tcnt\t" in line and (".8b" in line or ".16b" in line):
            counts[fn] += 1
    return counts


# ---- targets ----------------------------------------------------------------------------------

@pytest.mark.parametrize("alias,mcpu", [("arm_cpu", "cortex-a72"), ("rpi4", "cortex-a72"), ("rpi3", "cortex-a53"),
                                        ("rpi5", "cortex-a76"), ("cortex-a76", "cortex-a76"), ("aarch64", "generic")])
def test_arm_aliases(alias, mcpu):
    tgt = resolve_target(alias)
    assert tgt.kind.name == "llvm"
    assert str(tgt.attrs["mtriple"]) == "aarch64-linux-gnu"
    assert str(tgt.attrs["mcpu"]) == mcpu
    assert int(tgt.attrs["num-cores"]) == 4
    assert "+neon" in [str(a) for a in tgt.attrs["mattr"]]
    assert "arm_cpu" in [str(k) for k in tgt.keys]


def test_resolved_target_is_logged_as_json(caplog):
    with caplog.at_level(logging.INFO, logger="sparks_tvm"):
        resolve_target("arm_cpu")
    msgs = [r.getMessage() for r in caplog.records if "resolved to" in r.getMessage()]
    assert msgs, caplog.text
    spec = json.loads(msgs[-1].split("resolved to ", 1)[1])
    assert spec["mtriple"] == "aarch64-linux-gnu" and spec["mcpu"] == "cortex-a72" and spec["num-cores"] == 4
    assert spec["keys"] == ["arm_cpu", "cpu"] and spec["mattr"] == ["+neon"]


def test_tags_and_dicts_are_logged_too(caplog):
    with caplog.at_level(logging.INFO, logger="sparks_tvm"):
        resolve_target("raspberry-pi/4b-aarch64")
        resolve_target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a55"})
    msgs = [r.getMessage().split("resolved to ", 1)[1] for r in caplog.records if "resolved to" in r.getMessage()]
    assert [json.loads(m)["mcpu"] for m in msgs] == ["cortex-a72", "cortex-a55"]


def test_tags_and_dicts_pass_through():
    tag = resolve_target("raspberry-pi/4b-aarch64")
    assert str(tag.attrs["mcpu"]) == "cortex-a72"
    spec = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a55", "num-cores": 8}
    assert json.loads(target_json(resolve_target(spec)))["mcpu"] == "cortex-a55"
    with pytest.raises(SparksError, match="unknown target 'arm-cpu'"):
        resolve_target("arm-cpu")


def test_schedule_dispatch():
    arm = schedules.for_target(resolve_target("arm_cpu"))
    assert isinstance(arm, ArmSchedules) and isinstance(arm, HostSchedules)  # shares the host core
    assert arm.cores == 4 and arm.vector_bytes == 16 and arm.int16_lanes == 8
    # No num-cores in the target: a Pi's 4, not the host core's single-thread fallback.
    bare = schedules.for_target(resolve_target({"kind": "llvm", "mtriple": "aarch64-linux-gnu"}))
    assert isinstance(bare, ArmSchedules) and bare.cores == 4
    assert isinstance(schedules.for_target(resolve_target("arm/rasp3b")), ArmSchedules)  # 32-bit Pi 3 tag
    host = schedules.for_target(resolve_target("llvm"))
    assert type(host) is HostSchedules


def test_arm_sparks_knobs():
    from sparks_tvm.kernels import ConvGeometry

    arm = schedules.for_target(resolve_target("arm_cpu"))
    # NEON choices (instruction counts): 64 for stride-1 layers of several tiles, else 32.
    for geom, tile in ((ConvGeometry(1, 64, 56, 56, 64), 64), (ConvGeometry(1, 256, 14, 14, 256), 64),
                       (ConvGeometry(1, 64, 56, 56, 128, stride=(2, 2)), 32), (ConvGeometry(1, 512, 7, 7, 512), 32),
                       (ConvGeometry(2, 33, 5, 9, 17), 32)):
        knobs = arm.sparks_params(geom, 16)
        assert knobs["tile"] == tile, geom
        assert 1 <= knobs["block"] <= geom.in_channels
    # A 7x7 layer is two pixel tiles: its output channels are split so that 4 cores get work.
    assert arm.sparks_params(ConvGeometry(1, 512, 7, 7, 512), 16)["o_chunks"] >= 4


# ---- cross-compilation ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_onnx():
    net = models.sparks_resnet_tiny(k=8, seed=3, widths=(9, 40))
    return models.export_onnx(net, (2, 3, 9, 7))


@pytest.mark.parametrize("kind", ["sparks", "binary"])
def test_aarch64_library_has_neon_cnt_in_binary_kernels(cross_tools, tiny_onnx, tmp_path, kind):
    model = sparks_tvm.compile(tiny_onnx, target="arm_cpu", force_kind=kind)
    assert [r.kind for r in model.report if r.binarizer] == [kind] * 4
    so = Path(model.export_library(tmp_path / "m.so"))
    assert elf_machine(so) == EM_AARCH64
    assert json.loads((tmp_path / "m.so.sparks.json").read_text())["target"].find("aarch64") >= 0
    counts = cnt_by_function(so)
    prefix = "sparks_conv2d" if kind == "sparks" else "binary_conv2d"
    # sparks_conv2d_1 or, with its epilogue fused, fused_sparks_conv2d_1_cast_...; not the FFI wrappers.
    kernels = {fn: n for fn, n in counts.items() if prefix in fn and not fn.startswith("__tvm_ffi")}
    assert len(kernels) >= 3, sorted(counts)  # one per distinct binary layer shape
    # Every binary-conv kernel's popcount is NEON's vector cnt, not a scalar bit-twiddling loop.
    assert all(n > 0 for n in kernels.values()), kernels


def test_export_tar_for_linking_on_device(cross_tools, tiny_onnx, tmp_path):
    model = sparks_tvm.compile(tiny_onnx, target="arm_cpu")
    tar = model.export_library(tmp_path / "m.tar")
    with tarfile.open(tar) as tf:
        names = tf.getnames()
        assert names and all(n.endswith(".o") for n in names), names
        tf.extractall(tmp_path / "objs")
    assert all(elf_machine(tmp_path / "objs" / n) == EM_AARCH64 for n in names)
    assert (tmp_path / "m.tar.sparks.json").exists()


def test_missing_cross_linker_is_a_clear_error(tiny_onnx, tmp_path):
    model = sparks_tvm.compile(tiny_onnx, target="arm_cpu")
    with pytest.raises(CompileError, match="no-such-aarch64-gcc.*not on PATH"):
        model.export_library(tmp_path / "m.so", cross_compiler="no-such-aarch64-gcc")


def test_running_an_arm_model_on_the_host_is_refused(tiny_onnx):
    model = sparks_tvm.compile(tiny_onnx, target="arm_cpu")
    with pytest.raises(SparksError, match="compiled for aarch64-linux-gnu.*rpc"):
        model.run(models.example_input((2, 3, 9, 7)))


# ---- RPC errors (no device needed) ------------------------------------------------------------

@pytest.mark.parametrize("address", ["nohost", "host:", ":9090", "h:99999", "h:port"])
def test_bad_rpc_addresses(address):
    with pytest.raises(rpc.RemoteError, match="expected HOST:PORT"):
        rpc.connect(address)


def test_connect_to_dead_server_fails_fast():
    port = pi.free_port()  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(rpc.RemoteError, match=f"cannot reach the RPC server at 127.0.0.1:{port}"):
        rpc.connect(f"127.0.0.1:{port}", timeout=5)
    assert time.monotonic() - t0 < 5


def test_connect_to_silent_server_times_out():
    # Accepts the TCP connection but never answers TVM's handshake: must not hang.
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    conns = []
    stop = threading.Event()

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])
            except OSError:
                continue

    th = threading.Thread(target=accept, daemon=True)
    th.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(rpc.RemoteError, match="no answer within 3 s"):
            rpc.connect(f"127.0.0.1:{srv.getsockname()[1]}", timeout=3)
        assert time.monotonic() - t0 < 10
    finally:
        stop.set()
        th.join(2)
        for c in conns:
            c.close()
        srv.close()


def test_tracker_needs_a_key():
    with pytest.raises(rpc.RemoteError, match="needs the device key"):
        rpc.connect(tracker="127.0.0.1:9190")
    with pytest.raises(rpc.RemoteError, match="either address"):
        rpc.connect()


def test_port_in_use_is_reported(cross_tools):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(pi.PiError, match=f"port 127.0.0.1:{port} is already in use"):
            pi.EmulatedPi(port=port).start()
        assert time.monotonic() - t0 < 2


def test_deploy_missing_library_is_a_clear_error(tmp_path):
    with pytest.raises(rpc.RemoteError, match="no such file"):
        rpc.deploy(str(tmp_path / "none.so"), session=object())
    (tmp_path / "lib.so").write_bytes(b"\x7fELF")
    with pytest.raises(rpc.RemoteError, match="sparks.json is missing"):
        rpc.deploy(str(tmp_path / "lib.so"), session=object())


def test_no_aarch64_linker_at_all_is_a_clear_error(tiny_onnx, tmp_path, monkeypatch):
    from sparks_tvm import toolchain

    model = sparks_tvm.compile(tiny_onnx, target="arm_cpu")
    monkeypatch.setattr(toolchain.shutil, "which", lambda name: None)
    monkeypatch.setattr(toolchain, "zig_available", lambda: False)
    with pytest.raises(CompileError, match=r"none was found: pip install 'sparks-tvm\[arm\]'"):
        model.export_library(tmp_path / "m.so")


def test_zig_is_the_default_linker_without_debian_gcc(monkeypatch, tmp_path):
    from sparks_tvm import toolchain

    real_which = toolchain.shutil.which
    monkeypatch.setattr(toolchain.shutil, "which",
                        lambda name: None if name == toolchain.AARCH64_GCC else real_which(name))
    monkeypatch.setenv("SPARKS_TVM_CACHE", str(tmp_path))
    linker = toolchain.aarch64_linker()
    assert linker == str(tmp_path / "toolchain" / "zig-aarch64-linux-gnu-cc")
    text = open(linker).read()
    assert "-m ziglang cc -target aarch64-linux-gnu.2.36" in text and os.access(linker, os.X_OK)
