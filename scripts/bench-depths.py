#!/usr/bin/env python3
"""Streams at different depths decoding together: short answers beside one long
conversation, backstop beside llama-server, in one run, on one model.

A server with a long conversation open (a document pasted in, an agent's history) and a few
short chats answering at the same time decodes them all in each step. llama.cpp attends
every sequence of one call over as many KV cells as the deepest holds, so the short answers
pay for the long one's history at every token; backstop decodes the deep sequence in a call
of its own where that is measured to be faster (src/engine/depths.rs).

The servers are all up at once, with the same model, threads, per-slot context, chat
template and flash attention (off, backstop's CPU default; as in bench-peers.py), with
--short + 1 slots. Each repetition, in a rotating order, each server is sent the long
conversation (about --history tokens of notes, the same every repetition, so after the first
its prefix is reused) with twice --max-tokens to answer; once it streams, --short short
prompts (a fresh nonce each) with --max-tokens each. Greedy, ignore_eos. The window is from
the moment every stream has shown two tokens to the moment the first one ends: the figures
are the tokens per second of all the streams together in it, and each kind of stream's
median inter-token gap in it. Ratios are per repetition, against llama-server.

    ~/.cache/backstop/venv/bin/python scripts/bench-depths.py [--model PATH] [--reps 5]
        [--short 3] [--history 3000] [--max-tokens 96] [--before BINARY] [--speculate N] [--ways]

--before BINARY adds an earlier backstop build as a third server. --speculate N serves the
backstop builds with prompt-lookup drafts (`serve --speculate N`); llama-server stays plain.
--ways adds this build twice more, told which way to decode (`serve --depth-split on` and
`off`), to show how near the measured choice comes to the better way. The table's last column
counts each backstop's steps decoded in two calls in a round (its whole round, median).
Writes bench-results/depths-<time>.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import statistics
import sys
import threading
import time

# Steps a backstop server decoded in two calls split by depth.
SPLIT_STEPS = "backstop_decode_split_steps_total"

spec = importlib.util.spec_from_file_location("bench_peers", pathlib.Path(__file__).with_name("bench-peers.py"))
peers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(peers)


def one_round(url: str, history: str, shorts: int, max_tokens: int, tag: str) -> dict:
    """The long conversation, then `shorts` short streams once it decodes; the window's
    aggregate tokens/s and median gaps."""
    started = threading.Event()
    results: dict = {}

    def long_stream() -> None:
        results["long"] = peers.stream(url, [{"role": "user", "content": history + "\nTell me more."}],
                                       2 * max_tokens, started)

    def short_stream(i: int) -> None:
        msg = [{"role": "user", "content": f"[{tag}-{i}] Write a long story about a lighthouse."}]
        results[i] = peers.stream(url, msg, max_tokens)

    threads = [threading.Thread(target=long_stream)]
    threads[0].start()
    if not started.wait(600):
        raise RuntimeError(f"{url}: the long conversation never streamed")
    threads += [threading.Thread(target=short_stream, args=(i,)) for i in range(shorts)]
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join()
    streams = [results["long"]] + [results[i] for i in range(shorts)]
    if any(len(s["times"]) < 3 for s in streams):
        raise RuntimeError(f"{url}: a stream ended with fewer than 3 tokens")
    begin = max(s["times"][1] for s in streams)
    end = min(s["times"][-1] for s in streams)
    if end <= begin:
        raise RuntimeError(f"{url}: the streams never all decoded at once")

    def gaps(s: dict) -> list[float]:
        ts = [t for t in s["times"] if begin <= t <= end]
        return [b - a for a, b in zip(ts, ts[1:])]

    tokens = sum(sum(1 for t in s["times"] if begin < t <= end) for s in streams)
    short_gaps = [g for s in streams[1:] for g in gaps(s)]
    return {"aggregate": tokens / (end - begin), "window_s": end - begin,
            "short_gap_ms": statistics.median(short_gaps) * 1e3,
            "long_gap_ms": statistics.median(gaps(streams[0])) * 1e3}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    peers.side_by_side_args(ap, max_tokens=96)
    ap.add_argument("--short", type=int, default=3, help="short streams beside the long conversation")
    ap.add_argument("--history", type=int, default=3000, help="tokens of notes the long conversation holds")
    ap.add_argument("--before", type=pathlib.Path, help="an earlier backstop build, measured beside")
    ap.add_argument("--speculate", type=int, help="backstop drafts up to N tokens a step by prompt lookup")
    ap.add_argument("--ways", action="store_true", help="also serve backstop with --depth-split on and off")
    args = ap.parse_args()
    if args.history + 3 * args.max_tokens > args.ctx:
        ap.error("--history and twice --max-tokens must fit --ctx")
    model = pathlib.Path(args.model)
    backstop, llama_server, peer_version, template = peers.backstop_and_llama_server(model)
    binaries = {"backstop": backstop, "llama-server": llama_server}
    if args.before:
        binaries["backstop (before)"] = args.before
    drafts = ["--speculate", str(args.speculate)] if args.speculate else []
    extra = {k: drafts for k in binaries if k.startswith("backstop")}
    if args.ways:
        for way in ("on", "off"):
            k = f"backstop --depth-split {way}"
            binaries[k] = backstop
            extra[k] = drafts + ["--depth-split", way]
    kinds = list(binaries)
    servers = {k: peers.serve_side_by_side(k, binaries[k], model, args.threads, args.short + 1, args.ctx,
                                           template, extra.get(k, []))
               for k in kinds}
    history = peers.history(args.history, "depths")
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    try:
        for rep in range(args.reps):
            for k in kinds[rep % len(kinds):] + kinds[:rep % len(kinds)]:
                url = servers[k].url
                split = (lambda: peers.counter(url, SPLIT_STEPS)) if k.startswith("backstop") else (lambda: 0.0)
                before = split()
                r = one_round(url, history, args.short, args.max_tokens, f"{rep}-{time.time()}")
                r["split_steps"] = split() - before
                runs[k].append(r)
                peers.log(f"rep {rep + 1}/{args.reps} {k}: {r['aggregate']:.1f} tok/s together, "
                          f"short gap {r['short_gap_ms']:.1f} ms, long gap {r['long_gap_ms']:.1f} ms")
    finally:
        for s in servers.values():
            s.stop()

    peer = runs["llama-server"]
    print(f"\n{args.short} short streams beside a {args.history}-token conversation, {model.name}, "
          f"{args.threads} threads, {args.reps} reps ({peers.cpu_model()}; llama-server {peer_version})"
          + (f"; backstop --speculate {args.speculate}" if args.speculate else "") + "\n")
    print("| server | tok/s, all streams together | vs llama-server | short streams' median gap ms "
          "| vs llama-server | long stream's median gap ms | vs llama-server | steps in two calls a round |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    figures = {}
    for k in kinds:
        rs = runs[k]
        row = {what: statistics.median(r[what] for r in rs) for what in ("aggregate", "short_gap_ms", "long_gap_ms")}
        ratios = {what: peers.paired_ratio([r[what] for r in rs], [p[what] for p in peer])
                  for what in ("aggregate", "short_gap_ms", "long_gap_ms")}
        figures[k] = {"median": row, "vs_llama_server": ratios, "runs": rs}
        split = f"{statistics.median(r['split_steps'] for r in rs):.0f}" if k.startswith("backstop") else "-"
        print(f"| {k} | {row['aggregate']:.1f} | {ratios['aggregate']} | {row['short_gap_ms']:.1f} | "
              f"{ratios['short_gap_ms']} | {row['long_gap_ms']:.1f} | {ratios['long_gap_ms']} | {split} |")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"depths-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"model": str(model), "threads": args.threads, "short": args.short,
                                "history": args.history, "max_tokens": args.max_tokens, "speculate": args.speculate, "cpu": peers.cpu_model(),
                                "llama_server": peer_version, "figures": figures}, indent=1))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
