"""Build CUDA libraries whose kernels are already compiled (no JIT on the GPU machine).

TVM 0.27 builds a CUDA device module through ``ffi.Module.create.cuda``, registered by
``libtvm_runtime_cuda.so``. When that library cannot load (no ``libcuda.so.1``: a machine
without an NVIDIA driver, like the build machine), codegen falls back to a module that keeps
the CUDA *source*, and ``export_library`` saves the source: loading it on the GPU then calls
``tvm_callback_cuda_compile`` (NVRTC through the ``cuda-bindings`` package, or ``nvcc``) --
neither exists in the runtime-only bundle, so the load fails.

``enable(arch)`` fixes that on a driverless build machine, before building:

1. loads ``libcuda.so.1`` (the real one if present, else a stub built here whose functions all
   return CUDA_ERROR_NO_DEVICE) and then ``libtvm_runtime_cuda.so``, so that
   ``ffi.Module.create.cuda`` is registered and codegen compiles at build time;
2. overrides ``tvm_callback_cuda_compile`` to run ``nvcc --fatbin`` with
   ``-gencode arch=compute_XX,code=[sm_XX,compute_XX]``: SASS for ``arch`` plus PTX the
   driver can JIT on newer GPUs.

Usage (full TVM, e.g. .venv/bin/python)::

    import sys; sys.path.insert(0, "scripts/gpu")
    import cuda_prebuild
    cuda_prebuild.enable("sm_90")          # H100 / H200
    ex = tvm.compile(mod, target=...)      # or sparks_tvm.compile(..., target={"kind": "cuda", "arch": "sm_90", ...})
    ex.export_library("x.so")
    assert cuda_prebuild.library_cuda_formats("x.so") == ["cubin"]   # not "cuda" (= source)

The stub is never shipped: it lives in ``$SPARKS_CUDA_STUB_DIR`` (default ~/.cache/sparks_tvm/cudastub).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile

_STATE: dict = {}

_KNOWN_CU_SYMBOLS = [
    "cuDeviceGetName", "cuFuncSetAttribute", "cuGetErrorName", "cuGetErrorString", "cuLaunchKernelEx",
    "cuModuleGetFunction", "cuModuleLoadData", "cuModuleUnload", "cuTensorMapEncodeTiled",
    "cuLaunchKernel", "cuLaunchCooperativeKernel", "cuModuleGetGlobal", "cuInit", "cuDriverGetVersion",
    "cuDeviceGetCount", "cuGetProcAddress", "cuGetProcAddress_v2", "cuGetExportTable",
]


def _runtime_cuda_path() -> str:
    from tvm.base import _LOADED_LIBS

    lib_dir = os.path.dirname(os.path.realpath(_LOADED_LIBS["tvm_runtime"]._name))
    return os.path.join(lib_dir, "libtvm_runtime_cuda.so")


def _needed_cu_symbols(lib: str) -> list[str]:
    names = set(_KNOWN_CU_SYMBOLS)
    try:
        out = subprocess.run(["nm", "-D", "--undefined-only", lib], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            sym = line.split()[-1]
            if sym.startswith("cu") and "@" not in sym:
                names.add(sym)
    except (OSError, subprocess.CalledProcessError):
        pass
    return sorted(names)


def build_stub(lib: str | None = None) -> str:
    """Compile a fake libcuda.so.1 (every call fails with CUDA_ERROR_NO_DEVICE); returns its path."""
    lib = lib or _runtime_cuda_path()
    out_dir = os.environ.get("SPARKS_CUDA_STUB_DIR", os.path.expanduser("~/.cache/sparks_tvm/cudastub"))
    path = os.path.join(out_dir, "libcuda.so.1")
    if os.path.exists(path):
        return path
    os.makedirs(out_dir, exist_ok=True)
    lines = ["/* build-machine stub for libcuda.so.1: never ship it */",
             'static const char *kMsg = "CUDA_ERROR_NO_DEVICE (build-machine libcuda stub)";']
    for sym in _needed_cu_symbols(lib):
        if sym == "cuGetErrorName" or sym == "cuGetErrorString":
            lines.append(f"int {sym}(int e, const char **s) {{ if (s) *s = kMsg; return 0; }}")
        elif sym == "cuDeviceGetCount":
            lines.append(f"int {sym}(int *c) {{ if (c) *c = 0; return 100; }}")
        else:
            lines.append(f"int {sym}(void) {{ return 100; }}")
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("building the libcuda stub needs gcc")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "stub.c")
        with open(src, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        tmp_out = os.path.join(tmp, "libcuda.so.1")
        subprocess.run([cc, "-shared", "-fPIC", "-O1", "-Wl,-soname,libcuda.so.1", "-o", tmp_out, src], check=True)
        shutil.move(tmp_out, path)
    return path


def load_cuda_runtime() -> str:
    """Make ``ffi.Module.create.cuda`` available; returns which libcuda was used."""
    import tvm  # noqa: F401
    import tvm_ffi
    from tvm.base import _LOADED_LIBS

    if tvm_ffi.get_global_func("ffi.Module.create.cuda", allow_missing=True) is not None:
        return _STATE.setdefault("libcuda", "already loaded")
    try:
        ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
        which = "system libcuda.so.1"
    except OSError:
        stub = build_stub()
        ctypes.CDLL(stub, mode=ctypes.RTLD_GLOBAL)
        which = f"stub {stub}"
    _LOADED_LIBS["tvm_runtime_cuda"] = ctypes.CDLL(_runtime_cuda_path(), mode=ctypes.RTLD_LOCAL)
    if tvm_ffi.get_global_func("ffi.Module.create.cuda", allow_missing=True) is None:
        raise RuntimeError("libtvm_runtime_cuda.so loaded but ffi.Module.create.cuda is not registered")
    _STATE["libcuda"] = which
    return which


def install_compile_callback(arch: str, ptx: bool = True, extra_options: list[str] | None = None) -> None:
    """Compile CUDA source with nvcc to a fatbin: SASS for ``arch`` (+ PTX for newer GPUs)."""
    import tvm
    import tvm_ffi
    from tvm.support import nvcc

    if shutil.which("nvcc") is None:
        raise RuntimeError("nvcc is not on PATH (CUDA toolkit needed to prebuild kernels)")
    num = arch.replace("sm_", "")
    code = f"[sm_{num},compute_{num}]" if ptx else f"sm_{num}"
    gencode = ["-gencode", f"arch=compute_{num},code={code}"]

    @tvm_ffi.register_global_func("tvm_callback_cuda_compile", override=True)
    def _compile(src):  # noqa: ANN001
        _STATE["compiled"] = _STATE.get("compiled", 0) + 1
        # nvcc.compile_cuda reads the compute version from Target.current(); none is in scope here.
        with tvm.target.Target({"kind": "cuda", "arch": f"sm_{num}"}):
            return nvcc.compile_cuda(src, target_format="fatbin", arch=gencode, options=extra_options,
                                     compiler="nvcc")

    _STATE["arch"] = arch


def enable(arch="sm_90", ptx: bool = True) -> dict:
    """Both steps; call before building. Returns a small status dict.

    ``arch``: ``"sm_90"``/``"sm_90a"`` or the CUDA ``tvm.target.Target`` being built (its ``arch``
    attribute is used, e.g. ``nvidia/nvidia-h100`` -> sm_90a). One arch per process.
    """
    if not isinstance(arch, str):
        arch = str(arch.attrs["arch"])
    which = load_cuda_runtime()
    install_compile_callback(arch, ptx=ptx)
    return {"libcuda": which, "arch": arch, "ptx": ptx}


def compiled_count() -> int:
    return int(_STATE.get("compiled", 0))


def library_cuda_formats(path: str) -> list[str]:
    """Formats of the CUDA modules inside an exported library, read without loading it.

    "cuda" means CUDA source (needs a compiler where it is loaded); "cubin"/"ptx"/"fatbin" are
    binaries. Heuristic scan of the embedded blob for the serialized ``[fmt][fmap][code]`` header.
    """
    with open(path, "rb") as fh:
        data = fh.read()
    kinds = []
    marker = b"\x04\x00\x00\x00\x00\x00\x00\x00cuda"  # the module kind "cuda", length-prefixed
    pos = data.find(marker)
    while pos >= 0:
        p = pos + len(marker)
        # skip the u64 length of the module payload if present, then read [fmt]
        for off in (p, p + 8):
            if off + 8 <= len(data):
                n = int.from_bytes(data[off:off + 8], "little")
                if 1 <= n <= 8:
                    fmt = data[off + 8:off + 8 + n]
                    if fmt in (b"cuda", b"cubin", b"ptx", b"fatbin"):
                        kinds.append(fmt.decode())
                        break
        pos = data.find(marker, pos + 1)
    return kinds


def build_target(spec="nvidia/nvidia-h100"):
    """Resolve a CUDA target for libraries that will run elsewhere, and enable prebuilding.

    Used by ``scripts/gpu/make_cases.py`` and ``benchmarks/bench_cuda.py build``: the target
    (alias, tag or dict, with a generic x86-64 host) and kernels compiled here by nvcc.
    """
    from sparks_tvm.target import resolve_target

    target = resolve_target(spec)
    if target.kind.name != "cuda":
        raise SystemExit(f"a CUDA target is needed, got {target}")
    print("prebuild:", enable(target), flush=True)
    return target
