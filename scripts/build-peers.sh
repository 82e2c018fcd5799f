#!/usr/bin/env bash
# Build the peers (see /work/shared/BENCH.md): llama.cpp's own C++ `llama-server`,
# `llama-bench` and `llama-perplexity` (to check `backstop bench --quality`), CPU only, from the llama.cpp that llama-cpp-python's source distribution on
# PyPI vendors under vendor/llama.cpp (the llama-cpp-sys-2 crate strips llama.cpp's tools, so
# its copy cannot build them); and, with --python, llama-cpp-python's own server installed from
# that same source distribution into a venv (about 8 more minutes).
#
# Everything lives outside the repository, under ${BACKSTOP_CACHE:-$HOME/.cache/backstop}/peers/:
#   src/llama_cpp_python-X.tar.gz   the sdist          src/llama_cpp_python-X/   its unpacked tree
#   build-X/                        the cmake build    bin/llama-{server,bench,perplexity}, bin/STAMP
#   llama-cpp-python-venv/          llama-cpp-python[server] (--python only)
#
# Idempotent: when bin/ holds the three binaries and its stamp names the pinned version, it does
# nothing. About 9 minutes on 2 cores the first time (plus ~1.5 min for pip to fetch the sdist).
#
#   scripts/build-peers.sh           # build if needed
#   scripts/build-peers.sh --python  # also llama-cpp-python's server, if not installed yet
#   scripts/build-peers.sh --force   # rebuild (incremental cmake build, binaries re-copied)
#   scripts/build-peers.sh --cuda [--arch 90]
#
# --cuda builds llama-server and llama-bench for NVIDIA GPUs as scripts/build-cuda-bundle.sh
# builds backstop, with the same CUDA 13 toolkit from PyPI (that script fetches it), the same
# settings (one GPU architecture, no VMM, CPU code for x86-64-v3) and the same packing: shared
# libraries beside the binaries (found through $ORIGIN) in $BACKSTOP_CACHE/bundles/
# llama-cuda13-smARCH.tar.xz, to carry to the GPU machine beside backstop's bundle and compare
# there. About 30 minutes on 2 cores.
set -euo pipefail

# Pinned llama-cpp-python release; its CHANGELOG names the llama.cpp commit it vendors.
LLAMA_CPP_PYTHON_VERSION=0.3.36

cache="${BACKSTOP_CACHE:-$HOME/.cache/backstop}"
peers="$cache/peers"
src_root="$peers/src"
bin="$peers/bin"
stamp="$bin/STAMP"
build="$peers/build-$LLAMA_CPP_PYTHON_VERSION"
python="${BACKSTOP_PYTHON:-$cache/venv/bin/python}"
[ -x "$python" ] || python=python3

force=0
with_python=0
cuda=0
arch=90
while [ $# -gt 0 ]; do
  case "$1" in
    --force) force=1 ;;
    --python) with_python=1 ;;
    --cuda) cuda=1 ;;
    --arch) arch="${2:?--arch needs a number, e.g. 90}"; shift ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "usage: $0 [--force] [--python] | --cuda [--arch 90]" >&2; exit 2 ;;
  esac
  shift
done
case "$arch" in
  ''|*[!0-9a-z]*) echo "--arch: a CUDA architecture number such as 80, 89, 90 or 120a" >&2; exit 2 ;;
esac

# Built as backstop's llama.cpp is, with Intel AMX where the CPU has it and GCC's tile
# configuration intrinsic wrapped (cmake/amx.cmake says why); the stamp says so, so that peers
# built before (without AMX) are built again.
amx_include="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/cmake/amx.cmake"
want_stamp="llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION, AMX with whole tile configs"

# llama-cpp-python's server, from the cached sdist, in its own venv (idempotent through a stamp).
python_peer() {
  local venv="$peers/llama-cpp-python-venv" sdist="$src_root/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
  if [ -f "$venv/STAMP" ] && [ "$(cat "$venv/STAMP")" = "$want_stamp" ]; then
    echo "ok      llama-cpp-python server already installed ($venv)"
    return
  fi
  [ -f "$sdist" ] || { echo "error: $sdist is missing" >&2; exit 1; }
  echo "install llama-cpp-python[server] from $sdist into $venv (about 8 minutes)"
  rm -rf "$venv"
  python3 -m venv "$venv"
  CMAKE_ARGS="-DGGML_NATIVE=ON -DCMAKE_PROJECT_INCLUDE=$amx_include -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$sdist[server]"
  "$venv/bin/python" -c "import llama_cpp.server" || { echo "error: llama_cpp.server does not import" >&2; exit 1; }
  echo "$want_stamp" >"$venv/STAMP"
  echo "ok      llama-cpp-python server installed ($venv)"
}

# llama-server and llama-bench for NVIDIA GPUs, packed to carry (--cuda). Called once the source
# is unpacked and its commit known.
cuda_peers() {
  local toolkit="$cache/cuda13" name="llama-cuda13-sm$arch" soname
  local cbuild="$peers/build-$LLAMA_CPP_PYTHON_VERSION-cuda13-sm$arch" stage="$cache/bundles/$name"
  [ -x "$toolkit/bin/nvcc" ] || { echo "error: no CUDA toolkit at $toolkit: scripts/build-cuda-bundle.sh fetches it" >&2; exit 1; }
  echo "build   $cbuild (CUDA sm_$arch, -j$(nproc); about 30 minutes on 2 cores)"
  # As the bundle is built: GGML_NATIVE off and -march=x86-64-v3 for the CPU code (the GPU
  # machine's CPU is another), no VMM (nothing links the driver library, which only a GPU
  # machine has), shared libraries found beside the binaries (the link finds CUDA's through
  # -rpath-link, since the binaries' own rpath names only their folder).
  CUDA_PATH="$toolkit" PATH="$toolkit/bin:$PATH" cmake -S "$llama" -B "$cbuild" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=ON \
    -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON -DCMAKE_INSTALL_RPATH='$ORIGIN' \
    -DCMAKE_EXE_LINKER_FLAGS="-Wl,-rpath-link,$toolkit/lib" \
    -DGGML_NATIVE=OFF -DCMAKE_C_FLAGS=-march=x86-64-v3 -DCMAKE_CXX_FLAGS=-march=x86-64-v3 \
    -DCMAKE_PROJECT_INCLUDE="$amx_include" \
    -DGGML_CUDA=ON -DGGML_CUDA_NO_VMM=ON \
    -DCMAKE_CUDA_COMPILER="$toolkit/bin/nvcc" -DCMAKE_CUDA_ARCHITECTURES="$arch-real" \
    -DCUDAToolkit_ROOT="$toolkit" \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_COMMIT="$commit" \
    -Wno-dev >"$peers/cmake-configure-cuda.log" 2>&1 \
    || { tail -n 40 "$peers/cmake-configure-cuda.log" >&2; echo "error: cmake configure failed (log: $peers/cmake-configure-cuda.log)" >&2; exit 1; }
  CUDA_PATH="$toolkit" PATH="$toolkit/bin:$PATH" cmake --build "$cbuild" --config Release -j"$(nproc)" --target llama-server llama-bench
  rm -rf "$stage"
  mkdir -p "$stage"
  for b in llama-server llama-bench; do strip -o "$stage/$b" "$cbuild/bin/$b"; done
  for lib in "$cbuild"/bin/lib*.so*; do
    # Each library once, under the name the binaries ask for (its soname).
    [ -L "$lib" ] && continue
    soname=$(readelf -d "$lib" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')
    strip --strip-unneeded -o "$stage/${soname:-$(basename "$lib")}" "$lib"
  done
  echo "llama.cpp $commit (llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION), CUDA 13.0, sm_$arch, CPU code for x86-64-v3" >"$stage/BUILD"
  tar -C "$cache/bundles" -cJf "$cache/bundles/$name.tar.xz" "$name"
  ls -l "$cache/bundles/$name.tar.xz"
  # It must at least start here: without a driver, llama.cpp finds no GPU and says so.
  LD_LIBRARY_PATH="$toolkit/lib" "$stage/llama-server" --version
}

if [ "$cuda" = 0 ] && [ "$force" = 0 ] && [ -x "$bin/llama-server" ] && [ -x "$bin/llama-bench" ] \
   && [ -x "$bin/llama-perplexity" ] && [ -f "$stamp" ] && [ "$(head -n1 "$stamp")" = "$want_stamp" ]; then
  echo "ok      peers already built ($want_stamp)"
  sed -n '2,$p' "$stamp"
  echo "        $bin/llama-server"
  echo "        $bin/llama-bench"
  echo "        $bin/llama-perplexity"
  [ "$with_python" = 0 ] || python_peer
  exit 0
fi

for tool in cmake make cc c++ tar; do
  command -v "$tool" >/dev/null 2>&1 || { echo "error: '$tool' not found; install it (cmake, build-essential)" >&2; exit 1; }
done

mkdir -p "$src_root" "$bin"
start=$(date +%s)

# 1. The sdist (pip prepares its metadata, which fetches build requirements: ~1.5 min, once).
sdist=$(ls "$src_root"/llama_cpp_python-"$LLAMA_CPP_PYTHON_VERSION".tar.gz 2>/dev/null | head -n1 || true)
if [ -z "$sdist" ]; then
  if ! "$python" -m pip --version >/dev/null 2>&1; then
    echo "error: '$python -m pip' is not available; run scripts/setup.sh first" >&2
    exit 1
  fi
  echo "fetch   llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION (sdist)"
  "$python" -m pip download --quiet --disable-pip-version-check --no-deps \
    --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$src_root"
  sdist="$src_root/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
  [ -f "$sdist" ] || { echo "error: pip did not leave $sdist" >&2; exit 1; }
fi

# 2. Unpack (into a temporary folder first, so an interrupted run never leaves half a tree).
tree="$src_root/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION"
llama="$tree/vendor/llama.cpp"
if [ ! -f "$llama/CMakeLists.txt" ]; then
  echo "unpack  $sdist"
  tmp="$src_root/.unpack.$$"
  rm -rf "$tmp" "$tree"
  mkdir -p "$tmp"
  tar -xzf "$sdist" -C "$tmp"
  mv "$tmp/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION" "$tree"
  rm -rf "$tmp"
  [ -f "$llama/CMakeLists.txt" ] || { echo "error: no vendor/llama.cpp in $sdist" >&2; exit 1; }
fi

# 3. Which llama.cpp is this? The sdist has no .git, so take the commit from the CHANGELOG entry
#    of the pinned release ("update llama.cpp to ggml-org/llama.cpp@<sha>") and hand it to cmake,
#    so that `llama-server --version` reports it (otherwise "unknown", or worse, the commit of
#    whatever git repository happens to enclose the cache).
commit=$(awk -v v="## [$LLAMA_CPP_PYTHON_VERSION]" '
  $0 == v { on = 1; next }
  on && /^## \[/ { exit }
  on && match($0, /llama\.cpp@[0-9a-f]+/) { print substr($0, RSTART + 10, RLENGTH - 10); exit }
' "$tree/CHANGELOG.md" 2>/dev/null || true)
commit=${commit:-unknown}
# The sdist also carries llama.cpp's (shallow, depth 1) git metadata; when present, take the full
# hash from it, but only if the repository is the vendored tree itself, not an enclosing one.
# (llama.cpp's cmake counts that shallow history, so `--version` says "build 1": ignore that.)
full_commit=""
if command -v git >/dev/null 2>&1 \
   && [ "$(git -C "$llama" rev-parse --show-toplevel 2>/dev/null)" = "$(cd "$llama" && pwd -P)" ]; then
  full_commit=$(git -C "$llama" rev-parse HEAD 2>/dev/null || true)
  if [ -n "$full_commit" ] && [ "${full_commit#"$commit"}" = "$full_commit" ]; then
    [ "$commit" = unknown ] || echo "warning: CHANGELOG says llama.cpp@$commit, vendored git says $full_commit; using the latter" >&2
    commit=${full_commit:0:9}
  fi
fi
llama_version=$(sed -n 's/^set(LLAMA_VERSION_\(MAJOR\|MINOR\|PATCH\) \([0-9]*\))/\2/p' "$llama/CMakeLists.txt" | paste -sd. -)
ggml_version=$(sed -n 's/^set(GGML_VERSION_\(MAJOR\|MINOR\|PATCH\) \([0-9]*\))/\2/p' "$llama/ggml/CMakeLists.txt" | paste -sd. -)
echo "source  llama.cpp commit $commit (LLAMA_VERSION ${llama_version:-?}, ggml ${ggml_version:-?})"
if [ "$cuda" = 1 ]; then
  cuda_peers
  exit 0
fi

# 4. Configure and build just the two targets. Static libraries so the copied binaries stand
#    alone (the default shared build leaves them needing libllama.so/libggml*.so beside them).
#    No web UI: the default would try to download prebuilt assets from Hugging Face.
echo "build   $build (-j$(nproc))"
cmake -S "$llama" -B "$build" \
  -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=OFF \
  -DGGML_NATIVE=ON \
  -DCMAKE_PROJECT_INCLUDE="$amx_include" \
  -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF \
  -DLLAMA_CURL=OFF \
  -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_TOOLS=ON \
  -DLLAMA_BUILD_SERVER=ON \
  -DLLAMA_BUILD_APP=OFF \
  -DLLAMA_BUILD_UI=OFF \
  -DLLAMA_USE_PREBUILT_UI=OFF \
  -DLLAMA_BUILD_COMMIT="$commit" \
  -Wno-dev >"$peers/cmake-configure.log" 2>&1 \
  || { tail -n 40 "$peers/cmake-configure.log" >&2; echo "error: cmake configure failed (log: $peers/cmake-configure.log)" >&2; exit 1; }
cmake --build "$build" --config Release -j"$(nproc)" --target llama-server llama-bench llama-perplexity

# 5. Install the binaries (copy then rename, so a reader never sees half a file) and check them.
for b in llama-server llama-bench llama-perplexity; do
  cp "$build/bin/$b" "$bin/.$b.tmp"
  mv -f "$bin/.$b.tmp" "$bin/$b"
done
for b in llama-bench llama-perplexity; do
  "$bin/$b" --help >/dev/null 2>&1 || { echo "error: $bin/$b --help failed" >&2; exit 1; }
done
server_version=$("$bin/llama-server" --version 2>&1) || { echo "error: $bin/llama-server --version failed:" >&2; echo "$server_version" >&2; exit 1; }

{
  echo "$want_stamp"
  echo "llama.cpp commit: $commit${full_commit:+ ($full_commit)} (LLAMA_VERSION ${llama_version:-?}, ggml ${ggml_version:-?})"
  echo "llama-server --version: $(echo "$server_version" | tr '\n' ' ' | sed 's/ *$//')"
  echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(nproc) cores in $(( $(date +%s) - start )) s"
} >"$stamp.tmp"
mv -f "$stamp.tmp" "$stamp"

echo "ok      built peers ($want_stamp)"
sed -n '2,$p' "$stamp"
echo "        $bin/llama-server"
echo "        $bin/llama-bench"
echo "        $bin/llama-perplexity"
[ "$with_python" = 0 ] || python_peer
