#!/usr/bin/env bash
# The one entry point for a fresh Debian machine that has only Rust installed.
#
#   scripts/setup.sh serve [FLAGS...]   install what is missing, build, serve the default model
#   scripts/setup.sh test               install what is missing, build, run every test
#   scripts/setup.sh deps               only install what is missing (packages, models, venv)
#
# Safe to run any number of times: each step checks before it acts. Builds and models live
# outside the checkout, in $BACKSTOP_CACHE (default ~/.cache/backstop).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
export BACKSTOP_CACHE="${BACKSTOP_CACHE:-$HOME/.cache/backstop}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$BACKSTOP_CACHE/target}"
venv="$BACKSTOP_CACHE/venv"
mode="${1:-}"
[ $# -gt 0 ] && shift

step() { printf '\n==> %s\n' "$*" >&2; }

# System packages: cmake + a C++ compiler build llama.cpp, libclang lets bindgen read its
# headers, python3-venv holds the model downloader and the client-library tests.
system_packages() {
  local want=(cmake clang libclang-dev g++ make pkg-config python3 python3-venv)
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

build() {
  step "building (first build compiles llama.cpp: about 8 minutes on 2 cores)"
  cargo build --release --locked
}

case "$mode" in
  deps)
    system_packages
    python_env test
    BACKSTOP_PYTHON="$venv/bin/python" scripts/fetch-models.sh
    ;;
  serve)
    system_packages
    python_env serve
    BACKSTOP_PYTHON="$venv/bin/python" scripts/fetch-models.sh smollm2
    build
    step "serving on http://127.0.0.1:11434 (Ctrl-C to stop)"
    exec "$CARGO_TARGET_DIR/release/backstop" serve "$@"
    ;;
  test)
    system_packages
    python_env test
    BACKSTOP_PYTHON="$venv/bin/python" scripts/fetch-models.sh
    rust_components
    step "formatting and lints"
    cargo fmt --all -- --check
    cargo clippy --release --locked --all-targets -- -D warnings
    build
    step "unit and integration tests (real binary, real model)"
    cargo test --release --locked
    step "client-library compatibility tests (openai)"
    BACKSTOP_BIN="$CARGO_TARGET_DIR/release/backstop" "$venv/bin/python" -m pytest -q tests/python
    ;;
  *)
    echo "usage: scripts/setup.sh serve [backstop serve flags...] | test | deps" >&2
    exit 2
    ;;
esac
