#!/usr/bin/env python3
"""backstop side by side with its peers, in one run, on one model (BENCH.md, targets P1-P5,
P10, P11).

Peers: the raw engine (llama.cpp through llama-cpp-2 with no HTTP: benches/raw_engine.rs)
and llama.cpp's own llama-server (scripts/build-peers.sh). Both servers get the same model,
threads, slots, per-slot context and requests (unique prompts, so no prefix cache helps
either side; greedy; ignore_eos, so every request generates exactly --max-tokens). Server
runs are interleaved (backstop, llama-server, backstop, ...) so drift in a noisy machine hits
both alike; every figure is the median over --reps after a warm-up.

    scripts/bench-peers.py [--model PATH] [--threads 2] [--reps 5] [--max-tokens 128]

Prints a markdown table of ratios against the targets and writes
bench-results/peers-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
CACHE = pathlib.Path(os.environ.get("BACKSTOP_CACHE", pathlib.Path.home() / ".cache" / "backstop"))
TARGET = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", CACHE / "target"))
MODELS = pathlib.Path(os.environ.get("BACKSTOP_MODELS", CACHE / "models"))
PEERS = CACHE / "peers" / "bin"
MIB = 1024 * 1024


T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def rss(pid: int) -> dict:
    out = {}
    for line in open(f"/proc/{pid}/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) * 1024
    return out


class Server:
    """One server process: started, timed to ready, measured, stopped."""

    def __init__(self, name: str, argv: list[str], port: int, env: dict | None = None, ready: str = "/health"):
        self.name, self.port = name, port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = pathlib.Path(f"/tmp/bench-{name}-{port}.log")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=open(self.log_path, "w"), stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
        )
        while True:
            try:
                with urllib.request.urlopen(self.url + ready, timeout=1) as r:
                    if r.status == 200:
                        break
            except Exception:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited: {self.log_path.read_text()[-2000:]}")
            if time.perf_counter() - t0 > 120:
                raise RuntimeError(f"{name} never became ready")
            time.sleep(0.005)
        self.ready_s = time.perf_counter() - t0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def client(url: str, model: str, clients: int, requests: int, args, warmup: int = 0) -> dict:
    cmd = [
        sys.executable, str(ROOT / "scripts" / "bench_client.py"), "--url", url, "--model", model,
        "--clients", str(clients), "--requests-per-client", str(requests),
        "--max-tokens", str(args.max_tokens), "--unique-prompts", "--warmup", str(warmup),
        "--extra", json.dumps({"ignore_eos": True}), "--quiet", "--json", "/dev/stdout",
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def build() -> pathlib.Path:
    log("==> building backstop and the raw-engine bench (release)")
    subprocess.run(["cargo", "build", "--release", "--locked"], cwd=ROOT, check=True)
    out = subprocess.run(
        ["cargo", "bench", "--bench", "raw_engine", "--no-run", "--locked", "--message-format=json"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout
    raw = None
    for line in out.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg["target"]["name"] == "raw_engine" and msg.get("executable"):
            raw = pathlib.Path(msg["executable"])
    if raw is None:
        sys.exit("could not find the raw_engine bench binary")
    log("==> building llama-server (cached after the first time)")
    subprocess.run([str(ROOT / "scripts" / "build-peers.sh")], check=True)
    return raw


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--ctx", type=int, default=4096, help="context per slot, both servers")
    ap.add_argument("--out", default=str(ROOT / "bench-results"))
    args = ap.parse_args()
    model = pathlib.Path(args.model)
    raw_bin = build()
    backstop = TARGET / "release" / "backstop"
    llama_server = PEERS / "llama-server"
    version = subprocess.run([str(llama_server), "--version"], capture_output=True, text=True)
    peer_version = (version.stdout + version.stderr).strip().splitlines()[0]

    log("==> raw engine")
    raw = json.loads(subprocess.run(
        [str(raw_bin), "--model", str(model), "--threads", str(args.threads), "--gen", str(args.max_tokens),
         "--seqs", "4", "--reps", str(args.reps), "--json"],
        check=True, capture_output=True, text=True,
    ).stdout)

    def start(kind: str, slots: int) -> Server:
        port = free_port()
        if kind == "backstop":
            argv = [str(backstop), "serve", "--host", f"127.0.0.1:{port}", "--model", f"m={model}",
                    "--threads", str(args.threads), "--parallel", str(slots), "--ctx", str(args.ctx)]
            return Server(kind, argv, port, {"BACKSTOP_LOG": "info,llama-cpp-2=info"}, ready="/health/ready")
        argv = [str(llama_server), "-m", str(model), "-t", str(args.threads), "-np", str(slots),
                "-c", str(args.ctx * slots), "--host", "127.0.0.1", "--port", str(port), "--alias", "m"]
        return Server(kind, argv, port)

    runs: dict[str, list[dict]] = {"backstop": [], "llama-server": []}
    for rep in range(args.reps):
        # ABBA order, so whichever server runs first in a pair (a warmer or cooler
        # machine) does not bias the comparison.
        order = ("backstop", "llama-server") if rep % 2 == 0 else ("llama-server", "backstop")
        for kind in order:
            log(f"==> rep {rep + 1}/{args.reps}: {kind}")
            s = start(kind, 4)
            try:
                one = client(s.url, "m", 1, 2, args, warmup=1)
                four = client(s.url, "m", 4, 1, args)
                mem = rss(s.proc.pid)
                ready = s.ready_s
            finally:
                s.stop()
            kv = None
            if kind == "backstop":
                m = re.findall(r"KV buffer size =\s+([\d.]+) MiB", s.log_path.read_text())
                kv = sum(float(x) for x in m) * MIB if m else None
            log(f"    {kind} with 8 slots")
            s8 = start(kind, 8)
            try:
                eight = client(s8.url, "m", 8, 1, args)
            finally:
                s8.stop()
            runs[kind].append({"ready_s": ready, "one": one, "four": four, "eight": eight, "rss": mem, "kv_bytes": kv})

    def med(kind: str, f) -> float:
        return statistics.median(f(r) for r in runs[kind])

    def spread(kind: str, f) -> list[float]:
        v = [f(r) for r in runs[kind]]
        return [round(min(v), 3), round(max(v), 3)]

    kv = statistics.median(r["kv_bytes"] for r in runs["backstop"] if r["kv_bytes"])
    size = model.stat().st_size
    fig = {}
    for kind in runs:
        fig[kind] = {
            "decode_1": med(kind, lambda r: r["one"]["decode_tok_s_per_stream"]["median"]),
            "ttft_1_ms": med(kind, lambda r: r["one"]["ttft_ms"]["p50"]),
            "agg_1": med(kind, lambda r: r["one"]["aggregate_tok_s"]),
            "agg_4": med(kind, lambda r: r["four"]["aggregate_tok_s"]),
            "agg_8": med(kind, lambda r: r["eight"]["aggregate_tok_s"]),
            "ttft_4_p95_ms": med(kind, lambda r: r["four"]["ttft_ms"]["p95"]),
            "ready_s": med(kind, lambda r: r["ready_s"]),
            "overhead_mib": med(kind, lambda r: (r["rss"]["VmRSS"] - size - kv) / MIB),
            "spread": {
                "decode_1": spread(kind, lambda r: r["one"]["decode_tok_s_per_stream"]["median"]),
                "ttft_1_ms": spread(kind, lambda r: r["one"]["ttft_ms"]["p50"]),
                "agg_4": spread(kind, lambda r: r["four"]["aggregate_tok_s"]),
                "agg_8": spread(kind, lambda r: r["eight"]["aggregate_tok_s"]),
            },
        }
    b, p = fig["backstop"], fig["llama-server"]
    raw_tg = raw["tg_tps"]["median"]
    rows = [
        ("P1 single-stream decode vs raw engine", f"{b['decode_1']:.1f} tok/s", f"{raw_tg:.1f} tok/s (raw)",
         b["decode_1"] / raw_tg, ">= 0.95", b["decode_1"] / raw_tg >= 0.95),
        ("P2 single-stream decode vs llama-server", f"{b['decode_1']:.1f} tok/s", f"{p['decode_1']:.1f} tok/s",
         b["decode_1"] / p["decode_1"], ">= 1.05", b["decode_1"] / p["decode_1"] >= 1.05),
        ("P3 aggregate, 4 clients, vs llama-server -np 4", f"{b['agg_4']:.1f} tok/s", f"{p['agg_4']:.1f} tok/s",
         b["agg_4"] / p["agg_4"], ">= 1.2", b["agg_4"] / p["agg_4"] >= 1.2),
        ("P4 aggregate, 8 clients vs 1 client", f"{b['agg_8']:.1f} tok/s", f"{b['agg_1']:.1f} tok/s (1 client)",
         b["agg_8"] / b["agg_1"], ">= 1.5", b["agg_8"] / b["agg_1"] >= 1.5),
        ("P5 time to first token vs llama-server", f"{b['ttft_1_ms']:.0f} ms", f"{p['ttft_1_ms']:.0f} ms",
         b["ttft_1_ms"] / p["ttft_1_ms"], "<= 0.8", b["ttft_1_ms"] / p["ttft_1_ms"] <= 0.8),
        ("P10 RSS minus model file and KV cache", f"{b['overhead_mib']:.1f} MiB", f"{p['overhead_mib']:.1f} MiB",
         b["overhead_mib"] / p["overhead_mib"], "<= 64 MB", b["overhead_mib"] * MIB <= 64e6),
        ("P11 start to ready (/health/ready; llama-server /health)", f"{b['ready_s'] * 1e3:.0f} ms", f"{p['ready_s'] * 1e3:.0f} ms",
         b["ready_s"] / p["ready_s"], "<= 1 s", b["ready_s"] <= 1.0),
    ]
    info = [
        ("aggregate, 8 clients (llama-server -np 8)", f"{b['agg_8']:.1f} tok/s", f"{p['agg_8']:.1f} tok/s", b["agg_8"] / p["agg_8"]),
        ("TTFT p95 with 4 clients", f"{b['ttft_4_p95_ms']:.0f} ms", f"{p['ttft_4_p95_ms']:.0f} ms", b["ttft_4_p95_ms"] / p["ttft_4_p95_ms"]),
        ("raw engine: 4 sequences in one batch", f"{raw['batched_tps']['median']:.1f} tok/s", "", None),
        ("raw engine: pp" + str(raw["prompt"]), f"{raw['pp_tps']['median']:.1f} tok/s", "", None),
    ]
    machine = {"nproc": os.cpu_count(), "cpu": cpu_model(), "threads": args.threads}
    print(f"\nmachine: {machine['nproc']} cores, {machine['cpu']}; threads {args.threads}; "
          f"model {model.name}; {args.max_tokens} tokens per request; median of {args.reps} interleaved runs")
    print(f"peer: llama-server {peer_version}\n")
    print("| measure | backstop | peer | ratio | target | pass |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, bv, pv, ratio, target, ok in rows:
        print(f"| {name} | {bv} | {pv} | {ratio:.2f}x | {target} | {'pass' if ok else 'FAIL'} |")
    for name, bv, pv, ratio in info:
        print(f"| {name} | {bv} | {pv} | {'' if ratio is None else f'{ratio:.2f}x'} | (info) | |")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"peers-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({
        "machine": machine, "model": str(model), "max_tokens": args.max_tokens, "reps": args.reps,
        "peer_version": peer_version, "raw": raw, "figures": fig,
        "targets": [{"measure": r[0], "backstop": r[1], "peer": r[2], "ratio": r[3], "target": r[4], "pass": r[5]} for r in rows],
        "runs": runs,
    }, indent=1))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
