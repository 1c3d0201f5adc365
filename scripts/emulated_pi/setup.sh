#!/usr/bin/env bash
# Provision an emulated aarch64 Raspberry Pi on an x86-64 Debian/Ubuntu machine (idempotent).
#
#   scripts/emulated_pi/setup.sh            # prints the cache dir on its last line
#
# 1. Host tools, from apt when missing (needs root): qemu-user (the *dynamic* qemu-aarch64:
#    only it loads TCG plugins; qemu-user-static cannot), gcc/binutils-aarch64-linux-gnu
#    (cross-linking and objdump), gcc (the instruction-counting plugin).
# 2. An aarch64 userland in $SPARKS_PI_CACHE (default ~/.cache/sparks_tvm/emulated_pi):
#    Debian's arm64 python3.11 .debs fetched with a private apt state (no debootstrap, no
#    binfmt, the machine's own apt sources) and unpacked with dpkg -x; the aarch64 wheels of
#    TVM's runtime (same pins as setup.cfg) installed into sysroot/opt/tvm-site by host pip.
# 3. bin/pi-python: runs the aarch64 python3.11 under qemu; the device's sitecustomize.py
#    points sys.executable at it, so processes the RPC server spawns re-enter qemu.
# 4. plugin/libicount.so: the TCG instruction-counting plugin (icount.c).
#
# The cache is rebuilt only when BUILD_KEY changes. Exit status 3: provisioning impossible
# here (not root and tools missing); the message says what is missing.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${SPARKS_PI_CACHE:-${HOME:-/root}/.cache/sparks_tvm/emulated_pi}"
PYVER=3.11
WHEELS=(apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1 numpy==2.4.6 ml-dtypes==0.6.0
        typing-extensions==4.16.0 psutil==7.2.2 cloudpickle==3.1.3)
# libstdc++6: libtvm_ffi.so and libtvm_runtime.so are C++.
DEBS=("python$PYVER" libstdc++6 libgcc-s1)
BUILD_KEY="v1 ${DEBS[*]} ${WHEELS[*]}"
# Host pip: the repo's venv when present (same resolver the tests use), else any pip.
PIP="${SPARKS_PI_PIP:-}"
if [[ -z "$PIP" ]]; then
  if [[ -x "$HERE/../../.venv/bin/pip" ]]; then PIP="$HERE/../../.venv/bin/pip"; else PIP="python3 -m pip"; fi
fi

log() { echo "[emulated_pi] $*" >&2; }

# ---- 1. host tools -------------------------------------------------------------------
need=()
command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu)
command -v aarch64-linux-gnu-objdump >/dev/null || need+=(binutils-aarch64-linux-gnu)
# crti.o & co. for linking shared libraries (only a Recommends of the cross gcc).
[[ -f /usr/aarch64-linux-gnu/lib/crti.o ]] || need+=(libc6-dev-arm64-cross)
command -v gcc >/dev/null || need+=(gcc)
command -v dpkg-deb >/dev/null || need+=(dpkg)
if ((${#need[@]})); then
  if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null; then
    log "cannot provision: missing ${need[*]} and not root with apt-get; install them and rerun"
    exit 3
  fi
  log "apt-get install ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"      # concurrent test processes: one builds, the others wait
flock -w 900 9 || { log "timed out waiting for $CACHE/.lock"; exit 1; }

# ---- 2. the aarch64 userland --------------------------------------------------------
SYSROOT="$CACHE/sysroot"
if [[ "$(cat "$SYSROOT/.build_key" 2>/dev/null)" != "$BUILD_KEY" ]]; then
  log "building the aarch64 sysroot in $SYSROOT"
  rm -rf "$SYSROOT" "$CACHE/sysroot.new"
  NEW="$CACHE/sysroot.new"
  APTD="$CACHE/apt-arm64"
  mkdir -p "$APTD/state/lists/partial" "$APTD/cache/archives/partial" "$APTD/etc/parts" "$APTD/etc/prefs" "$NEW"
  : > "$APTD/state/status"       # an empty dpkg status: every dependency is downloaded
  cat > "$APTD/apt.conf" <<EOF
APT::Architecture "arm64";
APT::Architectures { "arm64"; };
Dir::State "$APTD/state";
Dir::State::Lists "$APTD/state/lists";
Dir::State::status "$APTD/state/status";
Dir::Cache "$APTD/cache";
Dir::Etc::Parts "$APTD/etc/parts";
Dir::Etc::PreferencesParts "$APTD/etc/prefs";
Debug::NoLocking "true";
APT::Sandbox::User "root";
APT::Install-Recommends "false";
EOF
  export APT_CONFIG="$APTD/apt.conf"
  if [[ "$(id -u)" != 0 ]]; then
    echo 'APT::Sandbox::User "";' >> "$APTD/apt.conf"
  fi
  apt-get update -qq >&2
  apt-get install -y -qq --download-only "${DEBS[@]}" >&2
  unset APT_CONFIG
  for deb in "$APTD"/cache/archives/*.deb; do dpkg-deb -x "$deb" "$NEW"; done
  # Merged /usr: the loader and libraries are looked up under /lib and /usr/lib alike.
  for d in bin sbin lib; do
    if [[ -d "$NEW/$d" && ! -L "$NEW/$d" ]]; then
      mkdir -p "$NEW/usr/$d" && cp -a "$NEW/$d/." "$NEW/usr/$d/" && rm -rf "$NEW/$d"
    fi
    ln -sfn "usr/$d" "$NEW/$d"
  done
  # Absolute symlinks would point into the host's /usr once qemu follows them: make them relative.
  while IFS= read -r link; do
    tgt="$(readlink "$link")"
    [[ "$tgt" == /* ]] || continue
    rel="$(realpath -m --relative-to="$(dirname "$link")" "$NEW$tgt")"
    ln -sfn "$rel" "$link"
  done < <(find "$NEW" -type l)
  # qemu maps guest paths into the prefix whenever they exist there: keep the host's
  # /tmp, /home, /root, /proc visible to the device.
  rm -rf "$NEW/tmp" "$NEW/home" "$NEW/root" "$NEW/proc" "$NEW/var"
  [[ -x "$NEW/usr/bin/python$PYVER" ]] || { log "python$PYVER missing from the arm64 .debs"; exit 1; }
  log "installing aarch64 wheels: ${WHEELS[*]}"
  $PIP install -q --no-deps --only-binary=:all: --no-compile --disable-pip-version-check \
    --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 \
    --platform any --python-version "$PYVER" --implementation cp \
    --target "$NEW/opt/tvm-site" "${WHEELS[@]}" >&2
  # The device only runs compiled libraries: the 250 MB compiler library is not needed
  # (TVM_USE_RUNTIME_LIB=1 makes `import tvm` load libtvm_runtime.so instead).
  rm -f "$NEW/opt/tvm-site/tvm/lib/libtvm_compiler.so" "$NEW/opt/tvm-site/tvm/lib/libtvm.so" \
        "$NEW/opt/tvm-site/tvm/lib/libtvm_runtime_cuda.so"
  cat > "$NEW/opt/tvm-site/sitecustomize.py" <<'EOF'
# Written by scripts/emulated_pi/setup.sh: on the emulated device, processes started with
# sys.executable (TVM's PopenWorker, multiprocessing) must go through qemu again.
import os
import sys

_launcher = os.environ.get("SPARKS_PI_PYTHON")
if _launcher:
    sys.executable = _launcher
EOF
  echo "$BUILD_KEY" > "$NEW/.build_key"
  mv "$NEW" "$SYSROOT"
  rm -rf "$APTD"     # 160 MB of arm64 package lists, not needed once the sysroot exists
fi

# ---- 3. launcher --------------------------------------------------------------------
mkdir -p "$CACHE/bin"
cat > "$CACHE/bin/pi-python.new" <<EOF
#!/bin/sh
# aarch64 python$PYVER with the TVM runtime, under qemu (written by scripts/emulated_pi/setup.sh).
# QEMU_PLUGIN (optional): a -plugin argument, e.g. "$CACHE/plugin/libicount.so,out=/tmp/c.txt".
export QEMU_LD_PREFIX="$SYSROOT"
export PYTHONPATH="/opt/tvm-site"
export PYTHONNOUSERSITE=1
export TVM_USE_RUNTIME_LIB=1
export SPARKS_PI_PYTHON="$CACHE/bin/pi-python"
if [ -n "\${QEMU_PLUGIN:-}" ]; then
  exec qemu-aarch64 -cpu cortex-a72 -plugin "\$QEMU_PLUGIN" "$SYSROOT/usr/bin/python$PYVER" "\$@"
fi
exec qemu-aarch64 -cpu cortex-a72 "$SYSROOT/usr/bin/python$PYVER" "\$@"
EOF
chmod +x "$CACHE/bin/pi-python.new"
mv "$CACHE/bin/pi-python.new" "$CACHE/bin/pi-python"

# ---- 4. the instruction-counting plugin ----------------------------------------------
mkdir -p "$CACHE/plugin"
if [[ ! -f "$CACHE/plugin/libicount.so" || "$HERE/icount.c" -nt "$CACHE/plugin/libicount.so" ]]; then
  gcc -O2 -shared -fPIC -Wall -Werror -o "$CACHE/plugin/libicount.so.new" "$HERE/icount.c"
  mv "$CACHE/plugin/libicount.so.new" "$CACHE/plugin/libicount.so"
fi

# Smoke check (fast): the device imports TVM's runtime.
if [[ "$(cat "$CACHE/.checked" 2>/dev/null)" != "$BUILD_KEY" ]]; then
  "$CACHE/bin/pi-python" -c "import platform, tvm; assert platform.machine() == 'aarch64', platform.machine(); print(tvm.__version__)" >&2
  echo "$BUILD_KEY" > "$CACHE/.checked"
fi
echo "$CACHE"
