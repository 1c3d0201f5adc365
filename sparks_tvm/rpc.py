"""Run compiled models on a remote device (a Raspberry Pi, or the emulated one) over TVM RPC.

    model = sparks_tvm.compile("model.onnx", target="arm_cpu")
    remote = sparks_tvm.rpc.deploy(model, "192.168.1.20:9090")     # or tracker="h:9190", key="rpi4b"
    (logits,) = remote.run(x)                                      # numpy in, numpy out
    print(remote.benchmark(x, repeat=20))                          # TVM's time evaluator, on the device

The device runs ``python -m tvm.exec.rpc_server`` with TVM's runtime (see the README's
"Raspberry Pi / ARM" section). The library is linked on this machine (``aarch64-linux-gnu-gcc``)
or, as a ``.tar`` of object files, on the device by its own ``gcc``.
"""

from __future__ import annotations

import gc
import os
import socket
import tempfile
import threading

import numpy as np
import tvm
from tvm import relax, rpc

from . import frontend, library
from .compiler import CompiledModel, _flatten
from .errors import LibraryError, SparksError


class RemoteError(SparksError):
    """The remote device could not be reached, or failed to load or run the model."""


def parse_address(address: str, what: str = "RPC server") -> tuple[str, int]:
    """``"host:port"`` -> ``(host, port)``, with a clear error for anything else."""
    host, sep, port = str(address).strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RemoteError(f"bad {what} address {address!r}: expected HOST:PORT, e.g. 192.168.1.20:9090")
    return host, int(port)


def _bounded(fn, timeout: float, what: str):
    """Run ``fn()`` with a deadline: TVM's C++ socket calls can block with no timeout of their own."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as err:  # re-raised in the caller's thread
            box["error"] = err

    th = threading.Thread(target=target, daemon=True, name=f"sparks-rpc: {what}")
    th.start()
    th.join(timeout)
    if th.is_alive():
        raise RemoteError(f"{what}: no answer within {timeout:.0f} s (is the server alive, reachable, and not "
                          "busy with another client's session? TVM's rpc_server serves one session at a time)")
    if "error" in box:
        err = box["error"]
        if isinstance(err, SparksError):
            raise err
        lines = str(err).strip().splitlines()
        detail = lines[-1] if lines else ""  # TVM puts the reason last, after its C++ backtrace
        raise RemoteError(f"{what} failed ({err.__class__.__name__}: {detail}); "
                          "did the device's server stop or crash?") from err
    return box.get("value")


def _check_listening(host: str, port: int, timeout: float, what: str) -> None:
    # A plain TCP probe first: "connection refused" is the common mistake and should say so.
    try:
        with socket.create_connection((host, port), timeout=min(timeout, 10.0)):
            pass
    except OSError as err:
        module = "rpc_tracker" if "tracker" in what else "rpc_server"
        raise RemoteError(f"cannot reach the {what} at {host}:{port}: {err.strerror or err} "
                          f"(is `python -m tvm.exec.{module} --port {port}` running there?)") from None


def connect(address: str | None = None, *, tracker: str | None = None, key: str | None = None,
            timeout: float = 60.0, session_timeout: float = 600.0):
    """Open an RPC session to a device.

    Parameters
    ----------
    address : str, optional
        ``host:port`` of the device's ``tvm.exec.rpc_server``.
    tracker : str, optional
        ``host:port`` of an RPC tracker (instead of ``address``); needs ``key``.
    key : str, optional
        Device key registered with the tracker (e.g. ``rpi4b``).
    timeout : float
        Seconds to wait for the connection (and, with a tracker, for a free device).
    session_timeout : float
        Seconds after which the server ends the session (0: never). Bounds a stuck run.

    Returns
    -------
    tvm.rpc.RPCSession
    """
    if (address is None) == (tracker is None):
        raise RemoteError("give either address='host:port' of an RPC server or tracker='host:port' with key=")
    if tracker is not None:
        if not key:
            raise RemoteError(f"a tracker ({tracker}) needs the device key, e.g. key='rpi4b'")
        host, port = parse_address(tracker, "RPC tracker")
        _check_listening(host, port, timeout, "RPC tracker")

        def request():
            trk = rpc.connect_tracker(host, port)
            return trk.request(key, priority=1, session_timeout=session_timeout, max_retry=max(1, int(timeout // 5)))

        return _bounded(request, timeout, f"requesting a {key!r} device from the tracker at {tracker}")
    host, port = parse_address(address)
    _check_listening(host, port, timeout, "RPC server")
    return _bounded(lambda: rpc.connect(host, port, session_timeout=session_timeout), timeout,
                    f"connecting to the RPC server at {address}")


class RemoteModel:
    """A compiled model loaded on a remote device.

    Attributes
    ----------
    session : tvm.rpc.RPCSession
    inputs : list of dict
        Name, shape and dtype of each input (from the library's ``.sparks.json``).
    """

    def __init__(self, session, library_path, meta: dict, timeout: float = 600.0):
        self.session = session
        self.timeout = timeout
        self._meta = meta
        path = os.fspath(library_path)
        name = os.path.basename(path)
        _bounded(lambda: session.upload(path), timeout, f"uploading {name}")
        self._rlib = _bounded(lambda: session.load_module(name), timeout, f"loading {name} on the device")
        self.device = session.cpu()
        self._vm = _bounded(lambda: relax.VirtualMachine(self._rlib, self.device), timeout,
                            "creating the Relax VM on the device")

    def close(self) -> None:
        """End the RPC session (drop every remote handle).

        TVM's RPC server serves one session at a time: a session kept alive (e.g. by a
        traceback that references this object) makes the next client wait. Closing drops the
        VM, the module and the session; the server ends the session when the last goes.
        """
        self._vm = self._rlib = self.device = self.session = None
        gc.collect()

    def __enter__(self) -> "RemoteModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _live_vm(self):
        if self._vm is None:
            raise RemoteError("this RemoteModel is closed; deploy the model again")
        return self._vm

    @property
    def inputs(self) -> list:
        return list(self._meta["inputs"])

    @property
    def output_names(self) -> list:
        return list(self._meta["outputs"])

    def _tensors(self, arrays):
        specs = [frontend.InputSpec(d["name"], tuple(d["shape"]), d["dtype"]) for d in self._meta["inputs"]]
        arrays = frontend.as_input_arrays(specs, arrays)
        return [tvm.runtime.tensor(a, self.device) for a in arrays]

    def run(self, *arrays) -> list:
        """Run on the device; numpy inputs (model order) in, list of numpy outputs back."""
        vm = self._live_vm()

        def call():
            # Uploading inputs and fetching outputs are RPC calls too: all under the deadline.
            tensors = self._tensors(arrays)
            return _flatten(vm["main"](*tensors))

        try:
            return _bounded(call, self.timeout, "running the model on the device")
        finally:
            # A traceback keeps this frame: remote handles in it would keep the session open.
            vm = None

    def benchmark(self, *arrays, repeat: int = 10, number: int = 1) -> dict:
        """Device-side latency (TVM's time evaluator, timed on the device) in ms."""
        vm, dev = self._live_vm(), self.device

        def timed():
            tensors = self._tensors(arrays)
            vm.set_input("main", *tensors)
            ev = vm.time_evaluator("invoke_stateful", dev, number=number, repeat=repeat)
            return ev("main").results

        try:
            results = _bounded(timed, self.timeout, "timing the model on the device")
        finally:
            vm = dev = None  # see run()
        times = np.array(results) * 1e3
        return {"median_ms": float(np.median(times)), "mean_ms": float(times.mean()), "repeat": repeat}


def deploy(model, address: str | None = None, *, tracker: str | None = None, key: str | None = None,
           session=None, timeout: float = 60.0, session_timeout: float = 600.0,
           link_on_device: bool = False, cross_compiler: str | None = None) -> RemoteModel:
    """Upload a compiled model to a device and load it there.

    Parameters
    ----------
    model : CompiledModel or str
        A model from :func:`sparks_tvm.compile` (exported here, cross-linked for its target),
        or the path of a library written by ``export_library`` (with its ``.sparks.json``).
    address, tracker, key, timeout, session_timeout
        Where the device is; see :func:`connect`. Or pass an open ``session``.
    link_on_device : bool
        Ship a ``.tar`` of object files and let the device link it (needs ``gcc`` there).
    cross_compiler : str, optional
        Linker for the library exported here (default: Debian's ``aarch64-linux-gnu-gcc`` when
        on PATH, else zig from the ``[arm]`` extra; see :mod:`sparks_tvm.toolchain`).

    Returns
    -------
    RemoteModel
    """
    if session is None:
        session = connect(address, tracker=tracker, key=key, timeout=timeout, session_timeout=session_timeout)
    if isinstance(model, CompiledModel):
        with tempfile.TemporaryDirectory(prefix="sparks_rpc_") as tmp:
            path = model.export_library(os.path.join(tmp, "model.tar" if link_on_device else "model.so"),
                                        cross_compiler=cross_compiler)
            return RemoteModel(session, path, model._meta, timeout=max(timeout, session_timeout or timeout))
    path = os.fspath(model)
    if not os.path.exists(path):
        raise RemoteError(f"{path}: no such file")
    # The same checks as sparks_tvm.load: a damaged library must fail here, named, not on the device.
    try:
        meta = library.read_sidecar(path)
        library.check_library(path, meta)
    except LibraryError as err:
        raise RemoteError(str(err)) from None
    return RemoteModel(session, path, meta, timeout=max(timeout, session_timeout or timeout))
