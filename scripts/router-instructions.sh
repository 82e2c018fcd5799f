#!/usr/bin/env bash
# Instructions backstop executes per proxied request (P8's path: a non-streamed chat sent to
# a fake cloud that answers at once), counted by valgrind's callgrind.
#
# Why: on a shared machine the CPU time of a request moves by ±30% from minute to minute, so
# a change worth 5% cannot be seen in req/s or latency (scripts/bench-router.py). The number
# of instructions is the same from run to run (within 0.1%), so an A/B of two builds shows
# small changes at once. It counts user space only (not the kernel's socket work, about a
# third of the request's CPU) and says nothing about latency: use it to compare builds, and
# bench-router.py for the figures.
#
#     scripts/router-instructions.sh [--seconds 8] [--clients 16] [BACKSTOP_BINARY...]
#
# With no binary it builds this checkout for valgrind (which cannot run AVX-512 code, so not
# with .cargo/config.toml's target-cpu=native: x86-64-v2, in its own target folder,
# ${CARGO_TARGET_DIR:-~/.cache/backstop/target}-vg; the first build compiles llama.cpp,
# about 8 minutes on 2 cores). Binaries named on the command line must be built the same way,
# e.g. from another worktree:
#     RUSTFLAGS="-C target-cpu=x86-64-v2" CARGO_TARGET_DIR=~/.cache/backstop/target-vg \
#         cargo build --release --bin backstop --example fake_cloud
# Needs valgrind and wrk (apt-get install valgrind wrk) and the SmolLM2 test model
# (scripts/setup.sh test fetches it).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cache=${BACKSTOP_CACHE:-$HOME/.cache/backstop}
target=${CARGO_TARGET_DIR:-$cache/target}-vg
model=${BACKSTOP_MODELS:-$cache/models}/SmolLM2-135M-Instruct.Q4_1.gguf
seconds=8
clients=16
bins=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds=$2; shift 2 ;;
    --clients) clients=$2; shift 2 ;;
    -h|--help) sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) bins+=("$1"); shift ;;
  esac
done
for tool in valgrind callgrind_control wrk curl; do
  command -v "$tool" >/dev/null || { echo "$tool not found (apt-get install valgrind wrk curl)" >&2; exit 1; }
done
[ -f "$model" ] || { echo "no test model at $model: run scripts/setup.sh test first" >&2; exit 1; }

build=(--example fake_cloud)
if [ ${#bins[@]} -eq 0 ]; then
  build+=(--bin backstop)
  bins=("$target/release/backstop")
fi
(cd "$root" && RUSTFLAGS="-C target-cpu=x86-64-v2" CARGO_TARGET_DIR="$target" \
  cargo build --release --locked --quiet "${build[@]}")

work=$(mktemp -d /tmp/router-instructions-XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# Until $1 answers 2xx (-f), or answers at all (with a second argument).
wait_for() {
  local flags=-sf
  [ $# -gt 1 ] && flags=-s
  for _ in $(seq 600); do curl $flags -o /dev/null "$1" && return 0; sleep 0.2; done
  echo "no answer from $1" >&2; return 1
}

fport=$(free_port)
"$target/release/examples/fake_cloud" --port "$fport" >"$work/fake.log" 2>&1 &
pids+=($!)
wait_for "http://127.0.0.1:$fport/" any

cat >"$work/post.lua" <<'EOF'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello in one short sentence."}],"max_tokens":16}'
EOF
# The same request and upstream as bench-router.py's P8 (its P8_BODY and backstop_config),
# so the counts here explain its figures; change both together.
cat >"$work/backstop.toml" <<EOF
[models.smollm2]
path = "$model"

[router]
mode = "cloud-first"

[router.breaker]
failures = 1000000000

[[router.upstreams]]
name = "fake"
kind = "openai"
base_url = "http://127.0.0.1:$fport/v1"
models = ["gpt-4o-mini"]
fallback = "smollm2"
EOF

echo "| binary | requests counted | instructions per request |"
echo "| --- | --- | --- |"
for bin in "${bins[@]}"; do
  port=$(free_port)
  rm -f "$work"/callgrind.out*
  # OpenMP's spinning workers would hold valgrind's one running thread.
  OMP_WAIT_POLICY=passive valgrind --tool=callgrind --fair-sched=yes \
    --callgrind-out-file="$work/callgrind.out" \
    "$bin" serve --config "$work/backstop.toml" --host "127.0.0.1:$port" >"$work/backstop.log" 2>&1 &
  vg=$!
  pids+=($vg)
  wait_for "http://127.0.0.1:$port/health/ready"
  url="http://127.0.0.1:$port/v1/chat/completions"
  wrk -t1 -c"$clients" -d3s --timeout 30s -s "$work/post.lua" "$url" >/dev/null
  callgrind_control -z "$vg" >/dev/null 2>&1
  out=$(wrk -t1 -c"$clients" -d"${seconds}s" --timeout 30s -s "$work/post.lua" "$url")
  callgrind_control -d "$vg" >/dev/null 2>&1
  sleep 1
  requests=$(sed -n 's/^ *\([0-9]*\) requests in.*/\1/p' <<<"$out")
  if grep -q "Non-2xx\|Socket errors" <<<"$out"; then
    echo "wrk saw errors against $bin:" >&2; echo "$out" >&2; exit 1
  fi
  ir=$(grep -h '^summary:' "$work"/callgrind.out.* | awk '{s += $2} END {print s}')
  echo "| $bin | $requests | $((ir / requests)) |"
  kill "$vg"; wait "$vg" 2>/dev/null || true
done
