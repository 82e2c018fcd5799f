#!/usr/bin/env python3
"""A greedy conversation's next turn: how soon its first token comes, backstop beside
llama-server, in one run, on one model.

A chat whose client asks for reproducible answers (temperature 0, or a seed) makes backstop
reuse only rows read as a cold read reads them, so its answers never depend on what the cache
held; the previous answer was computed one row at a time and would be read again by the next
turn. While the model is idle, backstop reads it again as a cold read would
(`--reread-answers`, on by default), so the next turn reuses it. llama-server reuses the
answer as it is.

Four servers, all up at once, with the same model, threads, slots, per-slot context, chat
template (backstop's fallback by the peer's name for it, as in bench-peers.py) and flash
attention (backstop's CPU default, off): backstop, backstop with `--reread-answers 0`, backstop
with `--exact-reuse 0` (the answer reused as computed, as llama-server does), and llama-server. Each repetition, in a rotating order, each server holds a conversation of its
own (a system prompt with a fresh nonce, then TURNS coding questions), greedy, each answer
streamed and run to --max-tokens (ignore_eos) so every server's turns are the same length.
Before each follow-up the client waits --pause seconds, as a person reading the answer or a
tool being run does (with 0 the follow-up comes at once, as from an agent that needs no
tool, and the re-read has no time). Between servers the script waits until backstop's re-read
has ended, so no server is measured while another works. The figure is the time to the first
token of each follow-up (turns 2 on), the median over repetitions and turns.

    ~/.cache/backstop/venv/bin/python scripts/bench-turns.py [--model PATH] [--reps 5]
        [--pause 1] [--max-tokens 200] [--threads N]

Writes bench-results/turns-<time>.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import statistics
import sys
import time

spec = importlib.util.spec_from_file_location("bench_peers", pathlib.Path(__file__).with_name("bench-peers.py"))
peers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(peers)

QUESTIONS = [
    "Write a Python function that parses a CSV file and returns a list of dictionaries.",
    "Now add error handling for a missing file.",
    "Write unit tests for it.",
    "Explain how the tests work.",
]

SERVERS = ["backstop", "backstop --reread-answers 0", "backstop --exact-reuse 0", "llama-server"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    peers.side_by_side_args(ap, max_tokens=200)
    ap.add_argument("--pause", type=float, default=1.0, help="seconds before each follow-up")
    ap.add_argument("--parallel", type=int, default=4, help="slots, every server")
    args = ap.parse_args()
    model = pathlib.Path(args.model)
    backstop, llama_server, peer_version, template = peers.backstop_and_llama_server(model)

    def start(kind: str) -> peers.Server:
        binary = backstop if kind.startswith("backstop") else llama_server
        return peers.serve_side_by_side(kind, binary, model, args.threads, args.parallel, args.ctx, template,
                                        kind.split()[1:] if kind.startswith("backstop") else [])

    def conversation(url: str, nonce: str) -> list[float]:
        messages = [{"role": "system", "content": f"You are a careful coding assistant (session {nonce})."}]
        ttfts = []
        for turn, question in enumerate(QUESTIONS):
            if turn:
                time.sleep(args.pause)
            messages.append({"role": "user", "content": question})
            out = peers.stream(url, messages, args.max_tokens)
            messages.append({"role": "assistant", "content": out["text"]})
            if turn:
                ttfts.append(out["ttft_ms"])
        return ttfts

    runs: dict[str, list[list[float]]] = {k: [] for k in SERVERS}
    peers.log("==> starting the four servers")
    servers = {kind: start(kind) for kind in SERVERS}
    try:
        for kind, s in servers.items():
            conversation(s.url, f"warm-up {os.urandom(3).hex()}")
            if kind.startswith("backstop"):
                peers.settle(s.url)
        for rep in range(args.reps):
            order = SERVERS[rep % len(SERVERS):] + SERVERS[:rep % len(SERVERS)]
            peers.log(f"==> rep {rep + 1}/{args.reps}")
            for kind in order:
                runs[kind].append(conversation(servers[kind].url, f"{rep} {os.urandom(3).hex()}"))
                if kind.startswith("backstop"):
                    peers.settle(servers[kind].url)
    finally:
        for s in servers.values():
            s.stop()

    fig = {k: statistics.median(t for rep in runs[k] for t in rep) for k in SERVERS}
    per_turn = {k: [statistics.median(rep[i] for rep in runs[k]) for i in range(len(QUESTIONS) - 1)]
                for k in SERVERS}
    # Ratios per repetition, each server's median follow-up over llama-server's.
    ratios = {k: [statistics.median(a) / statistics.median(b) for a, b in zip(runs[k], runs["llama-server"])]
              for k in SERVERS}
    machine = {"nproc": os.cpu_count(), "cpu": peers.cpu_model(), "threads": args.threads}
    print(f"\nmachine: {machine['nproc']} cores, {machine['cpu']}; threads {args.threads}; model {model.name}; "
          f"greedy, {len(QUESTIONS)} turns of {args.max_tokens} tokens, {args.pause} s before each follow-up; "
          f"median of {args.reps} rotated runs; llama-server {peer_version}\n")
    print("| server | follow-up TTFT ms (turns 2, 3, 4) | median | vs llama-server (min-max per run) |")
    print("| --- | --- | --- | --- |")
    for k in SERVERS:
        turns = ", ".join(f"{t:.0f}" for t in per_turn[k])
        r = ratios[k]
        print(f"| {k} | {turns} | {fig[k]:.0f} | {statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f}) |")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / time.strftime("turns-%Y%m%d-%H%M%S.json")
    path.write_text(json.dumps({"machine": machine, "model": str(model), "peer_version": peer_version,
                                "pause_s": args.pause, "max_tokens": args.max_tokens, "reps": args.reps,
                                "questions": QUESTIONS, "median_followup_ttft_ms": fig,
                                "per_turn_ms": per_turn, "ratio_vs_llama_server": ratios, "runs": runs},
                               indent=1))
    print(f"\n{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
