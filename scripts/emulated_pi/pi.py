"""An emulated Raspberry Pi (aarch64 under qemu-user) running TVM's RPC server on 127.0.0.1.

    python scripts/emulated_pi/pi.py setup                 # provision (cached), print the cache dir
    python scripts/emulated_pi/pi.py serve --port 9090     # RPC server until Ctrl-C
    python scripts/emulated_pi/pi.py python -c "import platform; print(platform.machine())"

From Python (tests, benchmarks)::

    from pi import EmulatedPi
    with EmulatedPi() as pi:                # a free port, bounded start-up, stopped on exit
        sess = tvm.rpc.connect(pi.host, pi.port)

Everything the device needs is built by ``setup.sh`` beside this file in
``$SPARKS_PI_CACHE`` (default ``~/.cache/sparks_tvm/emulated_pi``) and reused between runs.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SETUP = HERE / "setup.sh"
#: setup.sh's exit status when it cannot provision (not root and tools missing).
CANNOT_PROVISION = 3


class PiError(RuntimeError):
    """The emulated Pi could not be provisioned, started or reached."""


class ProvisionError(PiError):
    """Provisioning is impossible on this machine (the message says what is missing)."""


def cache_dir() -> Path:
    default = Path(os.environ.get("HOME", "/root")) / ".cache" / "sparks_tvm" / "emulated_pi"
    return Path(os.environ.get("SPARKS_PI_CACHE", default))


def setup(timeout: float = 600) -> Path:
    """Run ``setup.sh`` (fast when cached); return the cache directory.

    Raises
    ------
    ProvisionError
        Tools are missing and cannot be installed here (not root / no apt).
    PiError
        Provisioning failed or took longer than ``timeout`` seconds.
    """
    try:
        proc = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise PiError(f"{SETUP} did not finish within {timeout:.0f} s") from None
    if proc.returncode == CANNOT_PROVISION:
        raise ProvisionError(proc.stderr.strip().splitlines()[-1])
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise PiError(f"{SETUP} failed (exit {proc.returncode}):\n{tail}")
    return Path(proc.stdout.strip().splitlines()[-1])


def python_launcher() -> Path:
    """The device's ``python3.11`` (a host script that runs it under qemu)."""
    return cache_dir() / "bin" / "pi-python"


def plugin_path() -> Path:
    """The instruction-counting TCG plugin built by ``setup.sh``."""
    return cache_dir() / "plugin" / "libicount.so"


#: TVM's extra runtime functions on the device (``random_fill_for_measure``, which
#: MetaSchedule's RPC runner calls to fill arguments): loaded into the server by default.
DEVICE_EXTRA_LIB = "/opt/tvm-site/tvm/lib/libtvm_runtime_extra.so"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _accepts(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True  # TVM's server reads no magic, drops us and keeps listening
    except OSError:
        return False


class EmulatedPi:
    """TVM's ``rpc_server`` on an emulated aarch64 Pi, as a context manager.

    Parameters
    ----------
    port : int, optional
        Port on 127.0.0.1; a free one by default. A port already in use is an error (TVM's
        server would otherwise silently take the next free one).
    startup_timeout : float
        Seconds to wait for the server to listen (importing TVM under qemu takes ~5-20 s).
    tracker : str, optional
        ``host:port`` of an RPC tracker to register with, under ``key``.
    key : str
        Device key for the tracker.
    env : dict, optional
        Extra environment for the device (e.g. ``{"TVM_NUM_THREADS": "1"}``).
    load_library : str or None
        Device path of a library the server loads (``--load-library``); by default TVM's
        ``libtvm_runtime_extra.so``, which remote tuning (MetaSchedule's RPC runner) needs.
    """

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", startup_timeout: float = 120.0,
                 tracker: str | None = None, key: str = "rpi4b", env: dict | None = None,
                 load_library: str | None = DEVICE_EXTRA_LIB):
        self.host = host
        self.port = port
        self.startup_timeout = startup_timeout
        self.tracker = tracker
        self.key = key
        self.env = dict(env or {})
        self.load_library = load_library
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def log_tail(self, lines: int = 20) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        with open(self._log.name, errors="replace") as fh:
            return "".join(fh.readlines()[-lines:])

    def start(self) -> "EmulatedPi":
        launcher = python_launcher()
        if not launcher.exists():
            raise PiError(f"{launcher} is missing: run {SETUP} first (or pi.setup())")
        if self.port is None:
            self.port = free_port(self.host)
        elif port_in_use(self.host, self.port):
            raise PiError(f"port {self.address} is already in use: stop what listens there or pick another port")
        cmd = [str(launcher), "-m", "tvm.exec.rpc_server", "--host", self.host, "--port", str(self.port),
               "--port-end", str(self.port + 1)]
        if self.tracker:
            cmd += ["--tracker", self.tracker, "--key", self.key]
        if self.load_library and (cache_dir() / "sysroot" / self.load_library.lstrip("/")).exists():
            cmd += ["--load-library", self.load_library]
        self._log = tempfile.NamedTemporaryFile("w+", prefix="emulated_pi_", suffix=".log", delete=False)
        env = {**os.environ, **self.env}
        # Its own process group: stop() must also end the forked session servers.
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        try:
            self._wait_listening()
        except BaseException:  # PiError, or an interrupt while waiting: never orphan the server
            self.stop()
            raise
        return self

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PiError(f"the emulated Pi's RPC server exited (status {self.proc.returncode}) while starting "
                              f"on {self.address}:\n{self.log_tail()}")
            if "bind to" in self.log_tail(50) and _accepts(self.host, self.port):
                return
            time.sleep(0.3)
        raise PiError(f"the emulated Pi's RPC server did not listen on {self.address} within "
                      f"{self.startup_timeout:.0f} s:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server and every process it started (bounded: SIGTERM, then SIGKILL)."""
        if self.proc is not None and self.proc.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(timeout=timeout)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self.proc is not None:
            try:  # the server's forked children share its group: make sure none outlive it
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self._log is not None:
            self._log.close()
            try:
                os.unlink(self._log.name)
            except OSError:
                pass
            self._log = None

    def __enter__(self) -> "EmulatedPi":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM/SIGHUP: leave the `with` block, which stops the server


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["python"]:  # everything after it belongs to the device's python, options too
        try:
            setup()
        except PiError as err:
            print(f"emulated_pi: error: {err}", file=sys.stderr)
            return 2
        return subprocess.call([str(python_launcher()), *argv[1:]])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("setup", help="provision the emulated Pi (cached)")
    s = sub.add_parser("serve", help="run TVM's RPC server on the emulated Pi until interrupted")
    s.add_argument("--port", type=int, default=9090)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--tracker", help="host:port of an RPC tracker")
    s.add_argument("--key", default="rpi4b")
    sub.add_parser("python", help="run the device's python3.11 with the arguments that follow")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "setup":
            print(setup())
        elif args.cmd == "serve":
            setup()
            signal.signal(signal.SIGTERM, _interrupt)
            signal.signal(signal.SIGHUP, _interrupt)
            with EmulatedPi(args.port, args.host, tracker=args.tracker, key=args.key) as pi:
                print(f"emulated Pi RPC server on {pi.address} (Ctrl-C to stop)", flush=True)
                while pi.alive():
                    time.sleep(1)
                print(pi.log_tail(), file=sys.stderr)
                return 1
    except KeyboardInterrupt:
        return 0
    except PiError as err:
        print(f"emulated_pi: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
