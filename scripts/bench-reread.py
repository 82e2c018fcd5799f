#!/usr/bin/env python3
"""What reading answers again while idle (`--reread-answers`) costs the work around it: backstop
with it on beside backstop with it off, in one run, on two models.

An idle backstop reads a greedy or seeded answer again, a chunk at a time, so that the next turn
of that conversation reuses it. That work must not slow anything else down:

- neighbour: a greedy answer on model A, then at once a stream on model B. A reads its answer
  again only once every model has been idle for 100 ms, so B's gaps between tokens should be
  what they are without re-reads. Measured: B's worst gap and 95th percentile against its
  median, and the tokens A read again while B streamed.
- arrival: a greedy answer on model A, then, 150-210 ms later (while A reads it again), a new
  question on A from another client. It waits at most for the chunk in flight (sized to take
  about 25 ms). Measured: its time to first token minus that of the same kind of question
  asked of the idle server.
- process: a greedy answer on model A, then at once a stream from another program on the same
  machine: llama-server, on model A with the same threads. A reads its answer again only while
  other programs leave the cores free, so that stream should run as it does after a server with
  re-reads off. Measured: its decode rate, median and worst gap.

Three servers, up at once (the two backstops with the same models, threads and slots, and
llama-server), taking turns in a rotating order; between turns each backstop's re-read is left
to end (so only one server works at a time). Ratios are on against off, the median of
per-repetition ratios.

    ~/.cache/backstop/venv/bin/python scripts/bench-reread.py [--model PATH] [--neighbour PATH]
        [--reps 5] [--max-tokens 200] [--threads N] [--backstop BINARY]

Writes bench-results/reread-<time>.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import random
import statistics
import subprocess
import sys
import time

spec = importlib.util.spec_from_file_location("bench_peers", pathlib.Path(__file__).with_name("bench-peers.py"))
peers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(peers)

SERVERS = {"reread on": "1", "reread off": "0"}


def ask(nonce: str, question: str) -> list[dict]:
    return [{"role": "system", "content": f"You are a helpful assistant (session {nonce})."},
            {"role": "user", "content": question}]


def quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    peers.side_by_side_args(ap, max_tokens=200)
    ap.add_argument("--neighbour", default=str(peers.MODELS / "gemma-3-270m-q4_k_m.gguf"),
                    help="model B, which streams while model A (--model) has an answer to read again")
    ap.add_argument("--parallel", type=int, default=2, help="slots per model, every server")
    ap.add_argument("--backstop", help="a backstop binary to measure (an earlier build, say) instead of "
                                       "building this checkout")
    args = ap.parse_args()
    model, neighbour = pathlib.Path(args.model), pathlib.Path(args.neighbour)
    if args.backstop:
        binary = pathlib.Path(args.backstop)
        subprocess.run([str(peers.ROOT / "scripts" / "build-peers.sh")], check=True)
    else:
        peers.build(with_python=False)
        binary = peers.TARGET / "release" / "backstop"
    template = peers.template_source(binary, model)

    def start(name: str, reread: str) -> peers.Server:
        port = peers.free_port()
        argv = [str(binary), "serve", "--host", f"127.0.0.1:{port}", "--model", f"a={model}",
                "--model", f"b={neighbour}", "--threads", str(args.threads), "--parallel", str(args.parallel),
                "--ctx", str(args.ctx), "--reread-answers", reread]
        return peers.Server(name.replace(" ", "-"), argv, port, ready="/health/ready")

    def answer_on_a(url: str, nonce: str) -> None:
        peers.stream(url, ask(nonce, "Write a story about a lighthouse keeper."), args.max_tokens, model="a")

    def neighbour_run(url: str, nonce: str) -> dict:
        answer_on_a(url, nonce)
        before = peers.reread_tokens(url, "a:latest")
        out = peers.stream(url, ask(nonce, "Explain how tides work, in detail."), args.max_tokens, model="b")
        read = peers.reread_tokens(url, "a:latest") - before
        gaps = [(b - a) * 1e3 for a, b in zip(out["times"][2:], out["times"][3:])]
        med = statistics.median(gaps)
        return {"median_gap_ms": med, "p95_gap_ms": quantile(gaps, 0.95), "max_gap_ms": max(gaps),
                "max_over_median": max(gaps) / med, "p95_over_median": quantile(gaps, 0.95) / med,
                "a_reread_tokens_during": read}

    def process_run(url: str, other: str, nonce: str) -> dict:
        answer_on_a(url, nonce)
        t = peers.stream(other, ask(nonce, "Explain how tides work, in detail."), args.max_tokens, model="m")["times"]
        gaps = [(b - a) * 1e3 for a, b in zip(t[2:], t[3:])]
        return {"tok_s": (len(t) - 2) / (t[-1] - t[1]), "median_gap_ms": statistics.median(gaps),
                "max_gap_ms": max(gaps)}

    def arrival_run(url: str, nonce: str) -> dict:
        answer_on_a(url, nonce)
        time.sleep(random.uniform(0.15, 0.21))
        during = peers.stream(url, ask(nonce + "x", "What is the capital of France?"), 2, model="a")["ttft_ms"]
        peers.settle(url)
        answer_on_a(url, nonce + "y")
        peers.settle(url)
        idle = peers.stream(url, ask(nonce + "z", "What is the capital of France?"), 2, model="a")["ttft_ms"]
        return {"ttft_during_ms": during, "ttft_idle_ms": idle, "extra_ms": during - idle}

    names = list(SERVERS)
    runs: dict[str, dict[str, list[dict]]] = {k: {"neighbour": [], "arrival": [], "process": []} for k in names}
    peers.log("==> starting the three servers")
    servers = {k: start(k, v) for k, v in SERVERS.items()}
    other = peers.serve_side_by_side("llama-server", peers.PEERS / "llama-server", model, args.threads,
                                     args.parallel, args.ctx, template, [])
    try:
        for k, s in servers.items():
            neighbour_run(s.url, f"warm-up {os.urandom(3).hex()}")
            peers.settle(s.url)
        peers.stream(other.url, ask("warm-up", "Hello!"), 8, model="m")
        for rep in range(args.reps):
            peers.log(f"==> rep {rep + 1}/{args.reps}")
            for k in names[rep % 2:] + names[:rep % 2]:
                url = servers[k].url
                runs[k]["neighbour"].append(neighbour_run(url, f"{rep} {os.urandom(3).hex()}"))
                peers.settle(url)
                runs[k]["arrival"].append(arrival_run(url, f"{rep} {os.urandom(3).hex()}"))
                peers.settle(url)
                runs[k]["process"].append(process_run(url, other.url, f"{rep} {os.urandom(3).hex()}"))
                peers.settle(url)
    finally:
        for s in [*servers.values(), other]:
            s.stop()

    def med(k: str, part: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[k][part])

    def ratio(part: str, key: str) -> str:
        return peers.paired_ratio([a[key] for a in runs["reread on"][part]], [b[key] for b in runs["reread off"][part]])

    machine = {"nproc": os.cpu_count(), "cpu": peers.cpu_model(), "threads": args.threads}
    print(f"\nmachine: {machine['nproc']} cores, {machine['cpu']}; threads {args.threads}; model A {model.name}, "
          f"model B {neighbour.name}; {args.max_tokens}-token greedy answers; median of {args.reps} rotated runs\n")
    print("| measure | reread on | reread off | on vs off (min-max per run) |")
    print("| --- | --- | --- | --- |")
    rows = [("B's median gap, ms", "neighbour", "median_gap_ms"),
            ("B's worst gap / median", "neighbour", "max_over_median"),
            ("B's p95 gap / median", "neighbour", "p95_over_median"),
            ("A's tokens read again while B streamed", "neighbour", "a_reread_tokens_during"),
            ("arrival TTFT during a re-read, ms", "arrival", "ttft_during_ms"),
            ("arrival TTFT on an idle server, ms", "arrival", "ttft_idle_ms"),
            ("llama-server's tok/s after A's answer", "process", "tok_s"),
            ("llama-server's median gap, ms", "process", "median_gap_ms"),
            ("llama-server's worst gap, ms", "process", "max_gap_ms")]
    for label, part, key in rows:
        on, off = med("reread on", part, key), med("reread off", part, key)
        versus = ratio(part, key) if off else "-"
        print(f"| {label} | {on:.2f} | {off:.2f} | {versus} |")
    extra = {k: med(k, "arrival", "extra_ms") for k in names}
    worst = {k: max(r["extra_ms"] for r in runs[k]["arrival"]) for k in names}
    print(f"| arrival's extra wait, ms (worst) | {extra['reread on']:.1f} ({worst['reread on']:.1f}) "
          f"| {extra['reread off']:.1f} ({worst['reread off']:.1f}) | - |")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / time.strftime("reread-%Y%m%d-%H%M%S.json")
    path.write_text(json.dumps({"machine": machine, "backstop": str(binary), "model_a": str(model), "model_b": str(neighbour),
                                "max_tokens": args.max_tokens, "reps": args.reps, "runs": runs}, indent=1))
    print(f"\n{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
