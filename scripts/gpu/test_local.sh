#!/usr/bin/env bash
# Local check of the runtime-only path (no GPU needed), everything outside git under $T:
#  1. builds CPU cases with the full TVM (.venv), plus two cases that must fail;
#  2. runs run_cases.py --device cpu with the RUNTIME-ONLY bundle (.gpu/site + a cp311 tvm-ffi
#     unpacked in $T/site, set up by setup_device.sh) and checks statuses and the exit code;
#  3. builds the CUDA smoke cases (prebuilt sm_90 kernels) and checks that the runtime-only
#     bundle loads them without any CUDA compiler (a stub libcuda.so.1 stands in for the driver).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="$ROOT/.venv/bin/python"
T="${T:-/tmp/sparks_gpu_local}"
rm -rf "$T" && mkdir -p "$T/whl"
[ -d "$ROOT/.gpu/site/tvm" ] || "$ROOT/scripts/gpu/make_bundle.sh"
PYV="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d "$T/whl" \
  "apache-tvm-ffi==$("$PY" -c 'import importlib.metadata as m; print(m.version("apache-tvm-ffi"))')" 2>/dev/null

echo "== build CPU cases (full TVM)"
"$PY" "$ROOT/scripts/gpu/make_test_cases.py" --target llvm --dir "$T/cases_cpu" --bad 2>/dev/null | tail -1
echo "== build CUDA cases (full TVM, prebuilt sm_90)"
"$PY" "$ROOT/scripts/gpu/make_test_cases.py" --target cuda --arch sm_90 --dir "$T/cases_cuda" 2>/dev/null | tail -4

echo "== runtime-only run (setup_device.sh with a cp$PYV wheel)"
"$PY" -m pip install -q --no-index --no-deps --no-compile --target "$T/site" "$T"/whl/*.whl
(
  export GPU_SITE="$T/site" PYTHON="$PY"
  # shellcheck disable=SC1091
  source "$ROOT/scripts/gpu/setup_device.sh"
  cd "$T"
  set +e
  "$PY" "$ROOT/scripts/gpu/run_cases.py" --device cpu --cases "$T/cases_cpu" --out "$T/out/gpu_results.json"
  echo "rc=$?" >"$T/rc"
  set -e
  "$PY" - "$T" <<'EOF'
import json, sys
T = sys.argv[1]
r = json.load(open(f"{T}/out/gpu_results.json"))
st = {c["name"] if "name" in c else c["file"]: c["status"] for c in r["cases"]}
want = {"add_i32": "ok", "matmul_f32": "ok", "tiny_sparks": "ok", "add_i32_bad_expected": "mismatch",
        "missing_lib": "error"}
assert st == want, st
assert r["runtime"]["runtime_only"] and r["runtime"]["tvm_file"].endswith(".gpu/site/tvm/__init__.py"), r["runtime"]
assert open(f"{T}/rc").read().strip() == "rc=1"
import tvm, tvm.runtime.vm  # same env: make sure no compiler and no tvm.relax got in
assert "tvm_compiler" not in tvm.base._LOADED_LIBS and "tvm.relax" not in sys.modules
assert "libtvm_compiler" not in open("/proc/self/maps").read()
print("CPU runtime-only: OK", st)
EOF
  # CUDA libraries load with the runtime-only bundle and no compiler (stub driver: no GPU run here)
  STUB="$("$PY" -c "import sys; sys.path.insert(0, '$ROOT/scripts/gpu'); import cuda_prebuild as c; print(c.build_stub('$ROOT/.gpu/site/tvm/lib/libtvm_runtime_cuda.so'))")"
  LD_LIBRARY_PATH="$(dirname "$STUB"):${LD_LIBRARY_PATH:-}" "$PY" - "$T" "$ROOT" <<'EOF'
import sys
T, ROOT = sys.argv[1:3]
sys.path.insert(0, f"{ROOT}/scripts/gpu")
import run_cases
info = run_cases.load_runtime("cuda")
assert info["runtime_only"] and "tvm_runtime_cuda" in info["loaded_libs"], info
import tvm, tvm_ffi
tvm_ffi.register_global_func("tvm_callback_cuda_compile", override=True)(
    lambda src: (_ for _ in ()).throw(RuntimeError("JIT compile requested: library holds CUDA source")))
for name in ("add_i32", "matmul_f32", "tiny_sparks"):
    m = tvm.runtime.load_module(f"{T}/cases_cuda/{name}.so")
    print(f"  loaded {name}: {m.kind} imports={[i.kind for i in m.imports]}")
print("CUDA libs load runtime-only without a compiler: OK")
EOF
)
du -sh "$ROOT/.gpu" "$T/cases_cuda"
