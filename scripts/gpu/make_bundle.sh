#!/usr/bin/env bash
# Build .gpu/: a runtime-only TVM that fits in a device `carry` (no libtvm_compiler.so).
#
#   scripts/gpu/make_bundle.sh            # uses .venv/bin/python's installed tvm
#   PY=/path/to/python scripts/gpu/make_bundle.sh
#
# Produces (git-ignored through .git/info/exclude):
#   .gpu/site/tvm/     the tvm python package: runtime libs only, no compiler, sources, 3rdparty
#   .gpu/whl/          apache-tvm-ffi cp312 manylinux wheel (installed on the device by setup_device.sh)
#   .gpu/whl/extra/    typing_extensions wheel, installed only if the device python lacks it
#   .gpu/cuda/         libcudart.so.13 fallback (used only if no libcudart.so.13 is found on the device)
# Leaves .gpu/cases/ alone (that is where the cases to run go).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
FFI_VERSION="${FFI_VERSION:-0.1.14.post1}"
DEV_PYVER="${DEV_PYVER:-3.12}"
OUT="$ROOT/.gpu"

# 1. keep .gpu/ out of git without touching .gitignore
GITDIR="$(git -C "$ROOT" rev-parse --git-common-dir)"
case "$GITDIR" in /*) ;; *) GITDIR="$ROOT/$GITDIR" ;; esac
mkdir -p "$GITDIR/info"
touch "$GITDIR/info/exclude"
grep -qxF '/.gpu/' "$GITDIR/info/exclude" || echo '/.gpu/' >>"$GITDIR/info/exclude"

# 2. runtime-only copy of the tvm package
TVM_SRC="$("$PY" -c 'import importlib.util as u, os; print(os.path.dirname(u.find_spec("tvm").origin))')"
echo "tvm package: $TVM_SRC"
rm -rf "$OUT/site"
mkdir -p "$OUT/site"
# Not needed at run time: the compiler library, C++ sources/headers, 3rdparty (cutlass...),
# the web runtime, cmake files, and the compiler-only python packages (relax, topi, s_tir:
# tvm/__init__.py does not import relax when TVM_USE_RUNTIME_LIB=1; tvm.runtime.vm is the VM).
EXCLUDES=(
  --exclude=__pycache__ --exclude='*.pyc'
  --exclude=/lib/libtvm_compiler.so
  --exclude=/3rdparty --exclude=/src --exclude=/include --exclude=/web
  --exclude=/cmake --exclude=/lib64
  --exclude=/relax --exclude=/topi --exclude=/s_tir
)
if command -v rsync >/dev/null; then
  rsync -a "${EXCLUDES[@]}" "$TVM_SRC/" "$OUT/site/tvm/"
else
  "$PY" - "$TVM_SRC" "$OUT/site/tvm" <<'EOF'
import shutil, sys
src, dst = sys.argv[1:3]
top = {"3rdparty", "src", "include", "web", "cmake", "lib64", "relax", "topi", "s_tir"}
def ignore(d, names):
    rel = d[len(src):].strip("/")
    out = {n for n in names if n == "__pycache__" or n.endswith(".pyc")}
    if rel == "":
        out |= top & set(names)
    if rel == "lib":
        out |= {"libtvm_compiler.so"}
    return out
shutil.copytree(src, dst, ignore=ignore)
EOF
fi
for lib in libtvm_runtime.so libtvm_runtime_extra.so libtvm_runtime_cuda.so; do
  [ -f "$OUT/site/tvm/lib/$lib" ] || { echo "missing $lib in $TVM_SRC/lib" >&2; exit 1; }
done
[ ! -e "$OUT/site/tvm/lib/libtvm_compiler.so" ]
# Record what libtvm_runtime_cuda.so links against (libcuda.so.1 = driver, libcudart.so.13).
readelf -d "$OUT/site/tvm/lib/libtvm_runtime_cuda.so" | awk '/NEEDED/ {print $NF}' | tr -d '[]' \
  >"$OUT/site/tvm/lib/NEEDED_runtime_cuda.txt"

# 3. the tvm-ffi wheel for the device python (cp312, manylinux x86_64)
rm -rf "$OUT/whl"
mkdir -p "$OUT/whl/extra"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$DEV_PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$OUT/whl" "apache-tvm-ffi==$FFI_VERSION"
# tvm-ffi requires typing-extensions>=4.13 (torch brings it; this is a fallback, pure python)
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$OUT/whl/extra" "typing_extensions>=4.13"

# 4. libcudart.so.13 fallback (NVIDIA redistributable; ~0.7 MB)
rm -rf "$OUT/cuda"
CUDART=""
for c in ${CUDA_HOME:-/usr/local/cuda}/lib64/libcudart.so.13 ${CUDA_HOME:-/usr/local/cuda}/lib/libcudart.so.13 \
         /usr/local/cuda-13*/lib64/libcudart.so.13 /usr/local/cuda-13*/lib/libcudart.so.13 \
         /usr/local/cuda-13*/targets/x86_64-linux/lib/libcudart.so.13; do
  [ -f "$c" ] && { CUDART="$c"; break; }
done
if [ -n "$CUDART" ]; then
  mkdir -p "$OUT/cuda"
  cp -L "$CUDART" "$OUT/cuda/libcudart.so.13"
else
  echo "note: no libcudart.so.13 here; the device must provide it (torch's nvidia wheels do)" >&2
fi

"$PY" - "$OUT" "$TVM_SRC" <<'EOF'
import importlib.metadata as md, json, os, subprocess, sys
out, src = sys.argv[1:3]
git = subprocess.run(["git", "-C", os.path.dirname(out), "rev-parse", "HEAD"], capture_output=True, text=True)
info = {"apache-tvm": md.version("apache-tvm"), "apache-tvm-ffi": md.version("apache-tvm-ffi"),
        "tvm_src": src, "wheels": sorted(f for f in os.listdir(os.path.join(out, "whl")) if f.endswith(".whl")),
        "built_at_git": git.stdout.strip() or None}
with open(os.path.join(out, "BUNDLE.json"), "w") as fh:
    json.dump(info, fh, indent=1)
EOF
du -sh "$OUT/site" "$OUT/whl" "$OUT/cuda" 2>/dev/null || true
echo "runtime bundle (site+whl+cuda): $(du -shc "$OUT/site" "$OUT/whl" "$OUT/cuda" 2>/dev/null | tail -1 | cut -f1)   all of .gpu (with cases etc.): $(du -sh "$OUT" | cut -f1)"
# Warn about libraries that still hold CUDA source (the GPU machine has no compiler to JIT them).
"$PY" - "$OUT" <<'EOF'
import glob, os, sys
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(sys.argv[1])), "scripts", "gpu"))
from cuda_prebuild import library_cuda_formats
bad = [p for p in sorted(glob.glob(os.path.join(sys.argv[1], "**", "*.so"), recursive=True))
       if "/site/" not in p and "cuda" in library_cuda_formats(p)]
if bad:
    print(f"WARNING: {len(bad)} librar{'y' if len(bad) == 1 else 'ies'} under .gpu hold CUDA source, not compiled "
          "kernels; they will fail to load on the GPU machine. Rebuild after cuda_prebuild.enable('sm_90'):")
    for p in bad[:10]:
        print("   ", os.path.relpath(p, os.path.dirname(sys.argv[1])))
    if len(bad) > 10:
        print(f"    ... and {len(bad) - 10} more")
EOF
