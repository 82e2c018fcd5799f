#!/usr/bin/env bash
# Build backstop for NVIDIA GPUs on a machine that has neither a GPU nor a CUDA install, and pack
# it to carry to one that has (an air-gapped GPU server, say): the binary and llama.cpp's shared
# libraries in one .tar.xz, with a wrapper that finds them.
#
# The CUDA 13.0 compiler and headers come from NVIDIA's wheels on PyPI (nvidia-cuda-nvcc,
# -nvvm, -crt, -runtime, -cccl, nvidia-cublas), unpacked under $BACKSTOP_CACHE/cuda13. llama.cpp
# is built as shared libraries (LLAMA_BUILD_SHARED_LIBS=1) because those wheels carry no static
# CUDA libraries, for one GPU architecture (default 90: H100 and H200; 80 A100, 89 L4/RTX 40xx,
# 120 RTX 50xx), which keeps the CUDA library near 40 MB and the build near 30 minutes on 2
# cores. GGML_CUDA_NO_VMM: nothing here links the driver library, which only a GPU machine has.
#
# The CPU code (ours and llama.cpp's CPU backend, which still runs what is not offloaded) is
# built for x86-64-v3 (AVX2, FMA, F16C: any x86 server since 2013), not for the CPU that builds
# it as the repository's .cargo/config.toml does: a bundle is carried to another machine, whose
# CPU (or the VM it runs in) may lack this one's AVX-512 subsets, and an instruction it lacks
# kills the process at the first use. `--cpu native`, or a newer level such as x86-64-v4, when
# the bundle runs where it is built or on a CPU known to have them.
#
# The GPU machine needs an NVIDIA driver for CUDA 13 (580 or newer) and CUDA 13's libcudart.so.13
# and libcublas.so.13 (a CUDA 13 toolkit, or the nvidia-cuda-runtime and nvidia-cublas wheels):
# the wrapper adds $CUDA_PATH/lib64 and /usr/local/cuda/lib64 to the library path.
#
#   scripts/build-cuda-bundle.sh [--arch 90] [--cpu x86-64-v3]
#   -> $BACKSTOP_CACHE/bundles/backstop-cuda13-sm90.tar.xz; on the GPU machine:
#      tar xJf backstop-cuda13-sm90.tar.xz && backstop-cuda13-sm90/backstop serve ...
set -euo pipefail

CUDA_VERSION=13.0
arch=90
cpu=x86-64-v3
while [ $# -gt 0 ]; do
  case "$1" in
    --arch) arch="${2:?--arch needs a number, e.g. 90}"; shift 2 ;;
    --cpu) cpu="${2:?--cpu needs a CPU name, e.g. x86-64-v3 or native}"; shift 2 ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "usage: $0 [--arch 90] [--cpu x86-64-v3]" >&2; exit 2 ;;
  esac
done
case "$arch" in
  ''|*[!0-9a-z]*) echo "--arch: a CUDA architecture number such as 80, 89, 90 or 120a" >&2; exit 2 ;;
esac
case "$cpu" in
  ''|*[!0-9a-z_-]*) echo "--cpu: a CPU name rustc knows, such as x86-64-v3, x86-64-v4 or native" >&2; exit 2 ;;
esac

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
cache="${BACKSTOP_CACHE:-$HOME/.cache/backstop}"
toolkit="$cache/cuda13"
wheels="$cache/downloads/cuda13-wheels"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache/target-cuda-bundle-sm$arch-$cpu}"
# Replaces .cargo/config.toml's target-cpu=native; llama-cpp-sys-2 passes it on to llama.cpp as
# -march, with GGML_NATIVE off.
export RUSTFLAGS="-C target-cpu=$cpu"
python="${BACKSTOP_PYTHON:-$cache/venv/bin/python}"
[ -x "$python" ] || python=python3
step() { printf '\n==> %s\n' "$*" >&2; }

for tool in cmake clang strip xz; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "$tool is missing: scripts/setup.sh deps installs what the build needs" >&2
    exit 1
  fi
done

# The toolkit: fetched once; the stamp names the version that was unpacked.
if ! [ -x "$toolkit/bin/nvcc" ] || [ "$(cat "$toolkit/STAMP" 2>/dev/null)" != "$CUDA_VERSION" ]; then
  step "fetching CUDA $CUDA_VERSION's compiler and headers from PyPI (about 530 MB)"
  mkdir -p "$wheels"
  "$python" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 -d "$wheels" \
    "nvidia-cuda-nvcc==$CUDA_VERSION.*" "nvidia-nvvm==$CUDA_VERSION.*" \
    "nvidia-cuda-crt==$CUDA_VERSION.*" "nvidia-cuda-runtime==$CUDA_VERSION.*" \
    "nvidia-cuda-cccl==$CUDA_VERSION.*" "nvidia-cublas==$CUDA_VERSION.*"
  rm -rf "$toolkit" "$toolkit.tmp"
  mkdir -p "$toolkit.tmp"
  for w in "$wheels"/*.whl; do
    "$python" -m zipfile -e "$w" "$toolkit.tmp"
  done
  mv "$toolkit.tmp/nvidia/cu13" "$toolkit"
  rm -rf "$toolkit.tmp"
  chmod +x "$toolkit"/bin/* "$toolkit"/nvvm/bin/*
  # nvcc's profile looks in lib64; CMake links the unversioned names.
  ln -sfn lib "$toolkit/lib64"
  for l in cudart cublas cublasLt; do ln -sf "lib$l.so.13" "$toolkit/lib/lib$l.so"; done
  echo "$CUDA_VERSION" > "$toolkit/STAMP"
fi

step "building for sm_$arch and CPU $cpu into $CARGO_TARGET_DIR (the first build takes about 30 minutes on 2 cores)"
CUDA_PATH="$toolkit" PATH="$toolkit/bin:$PATH" CMAKE_CUDA_COMPILER="$toolkit/bin/nvcc" \
  CMAKE_CUDA_ARCHITECTURES="$arch-real" GGML_CUDA_NO_VMM=ON LLAMA_BUILD_SHARED_LIBS=1 \
  cargo build --release --locked --features cuda

name="backstop-cuda13-sm$arch"
stage="$cache/bundles/$name"
step "packing $cache/bundles/$name.tar.xz"
rm -rf "$stage"
mkdir -p "$stage"
# llama-cpp-sys-2 leaves the libraries it built in its CMake folder, under their soname; a
# build folder left by an earlier configuration may sit beside it, so take the newest.
libs=$(ls -dt "$CARGO_TARGET_DIR"/release/build/llama-cpp-sys-2-*/out/build/bin | head -n 1)
strip -o "$stage/backstop.bin" "$CARGO_TARGET_DIR/release/backstop"
for lib in "$libs"/lib*.so.0; do
  strip --strip-unneeded -o "$stage/$(basename "$lib")" "$lib"
done
cat > "$stage/backstop" <<'EOF'
#!/bin/sh
# backstop with the llama.cpp libraries beside it and CUDA 13's runtime from the system.
here=$(cd "$(dirname "$0")" && pwd)
LD_LIBRARY_PATH="$here:${CUDA_PATH:+$CUDA_PATH/lib64:}/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH
found=
for dir in $(echo "$LD_LIBRARY_PATH" | tr ':' ' '); do
  [ -e "$dir/libcudart.so.13" ] && found=1
done
if [ -z "$found" ] && ! { ldconfig -p || /sbin/ldconfig -p; } 2>/dev/null | grep -q 'libcudart\.so\.13'; then
  echo "backstop: CUDA 13's libcudart.so.13 and libcublas.so.13 are not on this machine's library" \
    "path: set CUDA_PATH to a CUDA 13 toolkit, or add their folder to LD_LIBRARY_PATH" >&2
fi
exec "$here/backstop.bin" "$@"
EOF
chmod +x "$stage/backstop"
printf 'backstop %s (%s)\nCUDA %s, sm_%s\nCPU code for %s\n' "$(git describe --always --dirty 2>/dev/null || echo '?')" \
  "$(date -u +%Y-%m-%d)" "$CUDA_VERSION" "$arch" "$cpu" > "$stage/BUILD"
tar -C "$cache/bundles" -cJf "$cache/bundles/$name.tar.xz" "$name"
ls -l "$cache/bundles/$name.tar.xz"
# It must at least start here: without a driver, llama.cpp finds no GPU and says so.
LD_LIBRARY_PATH="$toolkit/lib" "$stage/backstop" --version
