#!/usr/bin/env bash
# The one entry point for a fresh Debian machine that has only Rust installed.
#
#   scripts/setup.sh serve [FLAGS...]   install what is missing, build, serve the default model
#   scripts/setup.sh test               install what is missing, build, run every test
#   scripts/setup.sh deps               only install what is missing (packages, models, venv)
#
# Safe to run any number of times: each step checks before it acts. Builds and models live
# outside the checkout, in $BACKSTOP_CACHE (default ~/.cache/backstop).
#
# BACKSTOP_FEATURES=cuda (or vulkan, rocm; several with commas) builds llama.cpp's GPU backend
# too, into a build folder of its own so the CPU build stays as it was.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
export BACKSTOP_CACHE="${BACKSTOP_CACHE:-$HOME/.cache/backstop}"
features="${BACKSTOP_FEATURES:-}"
features="${features// /}"
if [ -n "$features" ]; then
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$BACKSTOP_CACHE/target-${features//,/-}}"
  cargo_features=(--features "$features")
else
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$BACKSTOP_CACHE/target}"
  cargo_features=()
fi
venv="$BACKSTOP_CACHE/venv"
mode="${1:-}"
[ $# -gt 0 ] && shift

step() { printf '\n==> %s\n' "$*" >&2; }

# System packages: cmake + a C++ compiler build llama.cpp, libclang lets bindgen read its
# headers, python3-venv holds the model downloader and the client-library tests.
system_packages() {
  local want=(cmake clang libclang-dev g++ make pkg-config python3 python3-venv)
  # Vulkan's headers, loader and shader compiler are Debian packages; CUDA and ROCm are not.
  [[ ",$features," == *,vulkan,* ]] && want+=(libvulkan-dev glslc spirv-headers)
  if ! command -v dpkg >/dev/null 2>&1; then
    echo "not a Debian system: make sure these are installed: ${want[*]}" >&2
    return
  fi
  local missing=()
  for p in "${want[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return
  step "installing ${missing[*]}"
  local sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

python_env() {
  if [ ! -x "$venv/bin/python" ]; then
    step "creating $venv"
    python3 -m venv "$venv"
  fi
  local reqs=tests/python/requirements.txt stamp="$venv/.requirements"
  if [ "$1" = test ] && ! cmp -s "$reqs" "$stamp"; then
    step "installing Python test clients"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$reqs"
    cp "$reqs" "$stamp"
  fi
}

rust_components() {
  if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
    step "adding rustfmt and clippy"
    rustup component add rustfmt clippy
  fi
}

# A GPU backend's compiler is checked before the build starts, so a missing one is named here
# instead of in a CMake error minutes into the build. Without BACKSTOP_FEATURES, a machine
# with an NVIDIA GPU is told how to use it.
gpu_toolchain() {
  if [ -z "$features" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      echo "note: an NVIDIA GPU is present; BACKSTOP_FEATURES=cuda $0 $mode builds for it" >&2
    fi
    return
  fi
  local f dir
  for f in ${features//,/ }; do
    case "$f" in
      cuda)
        # The first toolkit found goes first on PATH: $CUDA_PATH wins over /usr/local/cuda.
        for dir in ${CUDA_PATH:+"$CUDA_PATH/bin"} /usr/local/cuda/bin; do
          if [ -x "$dir/nvcc" ]; then
            export PATH="$dir:$PATH"
            break
          fi
        done
        if ! command -v nvcc >/dev/null 2>&1; then
          echo "BACKSTOP_FEATURES=cuda needs NVIDIA's CUDA toolkit (nvcc): install it (NVIDIA's" \
            "cuda-toolkit packages, or Debian's nvidia-cuda-toolkit from non-free), or set" \
            "CUDA_PATH to where it is, and run this again" >&2
          exit 1
        fi
        ;;
      rocm)
        dir="${ROCM_PATH:-/opt/rocm}/bin"
        [ -x "$dir/hipcc" ] && export PATH="$dir:$PATH"
        if ! command -v hipcc >/dev/null 2>&1; then
          echo "BACKSTOP_FEATURES=rocm needs AMD's ROCm (hipcc): install it, or set ROCM_PATH" \
            "to where it is, and run this again" >&2
          exit 1
        fi
        ;;
      vulkan)
        # llama.cpp's Vulkan backend uses VK_EXT_layer_settings, in Vulkan's headers since
        # 1.3.272: Debian 13 and Ubuntu 24.04 have them, Debian 12 (1.3.239) does not.
        local header="${VULKAN_SDK:-/usr}/include/vulkan/vulkan_core.h" have="missing"
        if [ -f "$header" ]; then
          have="version $(sed -n 's/^#define VK_HEADER_VERSION_COMPLETE .*(0, *\([0-9]*\), *\([0-9]*\),.*/\1.\2/p' "$header")"
          have+=".$(sed -n 's/^#define VK_HEADER_VERSION \([0-9]*\).*/\1/p' "$header")"
        fi
        if ! grep -q "VK_EXT_layer_settings" "$header" 2>/dev/null; then
          echo "BACKSTOP_FEATURES=vulkan needs Vulkan headers 1.3.272 or newer; $header is" \
            "$have: install LunarG's Vulkan SDK (or a newer libvulkan-dev) and set VULKAN_SDK" \
            "to it, then run this again" >&2
          exit 1
        fi
        ;;
      metal)
        if [ "$(uname -s)" != Darwin ]; then
          echo "BACKSTOP_FEATURES=metal builds on macOS only" >&2
          exit 1
        fi
        ;;
      *)
        echo "BACKSTOP_FEATURES: unknown backend '$f' (cuda, vulkan, rocm, metal)" >&2
        exit 2
        ;;
    esac
  done
}

build() {
  step "building${features:+ with $features} (first build compiles llama.cpp: about 8 minutes on 2 cores)"
  cargo build --release --locked "${cargo_features[@]}"
  # A build cache from before cmake/amx.cmake holds a llama.cpp built without Intel AMX (the
  # include before it left AMX out), or one built with GCC's own tile intrinsic if the include
  # was bypassed, which crashes on the first prompt on a CPU with AMX. Cargo cannot see that
  # the CMake setting changed (llama-cpp-sys-2 does not watch CMAKE_* variables), so llama.cpp
  # is built again, once, when the newest llama.cpp CMake cache lacks the include's mark.
  local cache="" c
  for c in "$CARGO_TARGET_DIR"/release/build/llama-cpp-sys-2-*/out/build/CMakeCache.txt; do
    if [ -f "$c" ] && { [ -z "$cache" ] || [ "$c" -nt "$cache" ]; }; then cache="$c"; fi
  done
  if [ -n "$cache" ] && ! grep -q "^BACKSTOP_AMX_INCLUDE:INTERNAL=gcc-tilecfg$" "$cache"; then
    step "this build cache holds llama.cpp built before cmake/amx.cmake: building it again"
    cargo clean --release --locked -p llama-cpp-sys-2
    cargo build --release --locked "${cargo_features[@]}"
  fi
}

case "$mode" in
  deps)
    system_packages
    gpu_toolchain
    python_env test
    BACKSTOP_PYTHON="$venv/bin/python" scripts/fetch-models.sh
    ;;
  serve)
    system_packages
    gpu_toolchain
    python_env serve
    BACKSTOP_PYTHON="$venv/bin/python" scripts/fetch-models.sh smollm2
    build
    step "serving (on http://127.0.0.1:11434 unless --host says otherwise; Ctrl-C to stop)"
    exec "$CARGO_TARGET_DIR/release/backstop" serve "$@"
    ;;
  test)
    system_packages
    gpu_toolchain
    python_env test
    BACKSTOP_PYTHON="$venv/bin/python" scripts/fetch-models.sh
    rust_components
    step "formatting and lints"
    cargo fmt --all -- --check
    cargo clippy --release --locked --all-targets "${cargo_features[@]}" -- -D warnings
    build
    step "unit and integration tests (real binary, real model)"
    cargo test --release --locked "${cargo_features[@]}"
    step "client-library compatibility tests (openai)"
    BACKSTOP_BIN="$CARGO_TARGET_DIR/release/backstop" "$venv/bin/python" -m pytest -q tests/python
    ;;
  *)
    echo "usage: scripts/setup.sh serve [backstop serve flags...] | test | deps" >&2
    exit 2
    ;;
esac
