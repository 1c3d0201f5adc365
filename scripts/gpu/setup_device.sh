# Source this on the GPU machine from the repository root (the .gpu/ bundle carried along):
#
#   source scripts/gpu/setup_device.sh && python3 scripts/gpu/run_cases.py --out "$OUT/gpu_results.json"
#
# Installs the cp312 tvm-ffi wheel into $GPU_SITE (default /tmp/site), then exports
# PYTHONPATH=$GPU_SITE:<repo>/.gpu/site, TVM_USE_RUNTIME_LIB=1 and, when libcudart.so.13 is
# found (torch's nvidia wheels, the CUDA toolkit, or the copy in .gpu/cuda), LD_LIBRARY_PATH.
# No network needed. Returns non-zero (without exiting the shell) if something is missing.

_gpu_setup() {
  local root site py cudart_dir
  # repo root: from this file's path under bash, else (sh/dash) the current directory
  if [ -n "${BASH_SOURCE:-}" ]; then root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"; else root="$PWD"; fi
  root="${GPU_ROOT:-$root}"
  site="${GPU_SITE:-/tmp/site}"
  py="${PYTHON:-python3}"
  if [ ! -d "$root/.gpu/site/tvm" ] || ! ls "$root"/.gpu/whl/*.whl >/dev/null 2>&1; then
    echo "setup_device: $root/.gpu is missing or incomplete (run scripts/gpu/make_bundle.sh and carry .gpu)" >&2
    return 1
  fi
  mkdir -p "$site"
  _gpu_install() {  # pip --target; a wheel is a zip, so unzip it if pip is missing
    "$py" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$@" 2>/dev/null && return 0
    local w; for w in "$@"; do "$py" -m zipfile -e "$w" "$site" || return 1; done
  }
  if ! PYTHONPATH="$site" "$py" -c "import tvm_ffi" >/dev/null 2>&1; then
    _gpu_install "$root"/.gpu/whl/*.whl || { echo "setup_device: installing the tvm-ffi wheel failed" >&2; return 1; }
  fi
  if ! "$py" -c "import typing_extensions" >/dev/null 2>&1 && ls "$root"/.gpu/whl/extra/*.whl >/dev/null 2>&1; then
    _gpu_install "$root"/.gpu/whl/extra/*.whl || return 1
  fi
  export PYTHONPATH="$site:$root/.gpu/site${PYTHONPATH:+:$PYTHONPATH}"
  export TVM_USE_RUNTIME_LIB=1
  # libtvm_runtime_cuda.so NEEDS libcudart.so.13 and libcuda.so.1 (the driver's, from the system).
  cudart_dir="$("$py" - "$root" <<'EOF' 2>/dev/null
import glob, os, site, sys, sysconfig
roots = list(dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
                            *getattr(site, "getsitepackages", lambda: [])()]))
pats = [os.path.join(r, "nvidia", "*", "lib", "libcudart.so.13") for r in roots]
pats += ["/usr/local/cuda/lib64/libcudart.so.13", "/usr/local/cuda*/lib64/libcudart.so.13",
         "/usr/local/cuda*/targets/x86_64-linux/lib/libcudart.so.13", "/usr/lib/x86_64-linux-gnu/libcudart.so.13"]
pats += [os.path.join(sys.argv[1], ".gpu", "cuda", "libcudart.so.13")]
for p in pats:
    hits = sorted(glob.glob(p))
    if hits:
        print(os.path.dirname(hits[0]))
        break
EOF
)"
  if [ -n "$cudart_dir" ]; then
    export LD_LIBRARY_PATH="$cudart_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "setup_device: libcudart.so.13 from $cudart_dir"
  else
    echo "setup_device: warning: no libcudart.so.13 found; CUDA runtime may fail to load" >&2
  fi
  echo "setup_device: PYTHONPATH=$PYTHONPATH TVM_USE_RUNTIME_LIB=1"
}
_gpu_setup
