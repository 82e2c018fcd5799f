#!/usr/bin/env python3
"""More conversations than slots: how soon each one's next turn starts, backstop beside
llama-server, in one run, on one model.

A server with P slots keeps the KV cache of P conversations. A team sharing one server, or
an agent running several threads, has more: each turn of one takes a slot from another.
(With no more conversations than slots, every one can keep a slot of its own: the run then
shows whether a new conversation takes a free slot or another conversation's.)
Without a prompt cache in host memory, a conversation whose slot was taken reads its whole
history again before its next first token; with one (backstop's and llama-server's
`--cache-ram`, 8 GiB by default in both), the slot's cache is copied into RAM when another
conversation takes it, and copied back for its next turn.

Four servers, all up at once, with the same model, threads, slots, per-slot context, chat
template and flash attention (off, backstop's CPU default; as in bench-peers.py): backstop,
backstop with `--cache-ram 0`, llama-server, and llama-server with `--cache-ram 0` (and any
given with --also). Each
repetition, in a rotating order, each server holds --conversations conversations (default 4,
against 2 slots), each opening with about --history tokens of notes under a fresh nonce, then
TURNS-1 short follow-ups; the turns go round the conversations (A1 B1 C1 D1 A2 B2 ...), so by
its next turn every conversation's slot went to another. Greedy, each answer streamed and run
to --max-tokens (ignore_eos), so every server's turns are the same length; --pause seconds
before each request, as a person reading (backstop reads a greedy answer again while idle,
`--reread-answers`, so the next turn reuses it). The figure is the time to the first token of
each follow-up (turns 2 on), the median over conversations, turns and repetitions; the
ratio is per repetition, against llama-server with its prompt cache.

With --unload, each backstop server unloads its model before every follow-up (Ollama's
`keep_alive: 0`, what a keep-alive that ran out does), so each follow-up loads it again
first: backstop keeps an unloading model's conversations in its host-memory cache for the
next load. llama-server has no unload; it keeps its model loaded throughout.

With --restart, every server is stopped (SIGTERM) and started again before every follow-up,
as an upgrade or a reboot does, and the follow-up is sent once it is ready (its model
loaded): backstop with a `--cache-dir` of its own (a fresh temporary folder per server),
into which it writes its conversations as it stops and from which the next start reads them.
llama-server keeps nothing across a restart (its `--slot-save-path` saves one slot at a time,
when a client asks). The table then shows what each stop cost too: SIGTERM to exit, the median
over the stops (backstop's writes its conversations into the folder).

With --streams N, N other streams decode throughout every follow-up: each follow-up is sent
once N streams (a short prompt each, greedy, ignore_eos) have begun, and they are cut off once
it is answered. The table then shows what the follow-up cost them: their worst inter-token gap
from the follow-up's request to its last token, beside their median gap before it (medians
over the follow-ups). They take N of the --parallel slots.

    ~/.cache/backstop/venv/bin/python scripts/bench-conversations.py [--model PATH] [--reps 5]
        [--conversations 4] [--parallel 2] [--history 1000] [--pause 0.5] [--max-tokens 32]
        [--also "backstop --exact-reuse 0"] [--unload | --restart] [--streams N]

Writes bench-results/conversations-<time>.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.request

spec = importlib.util.spec_from_file_location("bench_peers", pathlib.Path(__file__).with_name("bench-peers.py"))
peers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(peers)

FOLLOW_UPS = ["Which ships came most often?", "Give my notes a title."]
TURNS = 1 + len(FOLLOW_UPS)

SERVERS = ["backstop", "backstop --cache-ram 0", "llama-server", "llama-server --cache-ram 0"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    peers.side_by_side_args(ap, max_tokens=32)
    ap.add_argument("--conversations", type=int, default=4)
    ap.add_argument("--parallel", type=int, default=2, help="slots, every server")
    ap.add_argument("--history", type=int, default=1000, help="tokens of notes each conversation opens with")
    ap.add_argument("--pause", type=float, default=0.5, help="seconds before each request")
    ap.add_argument("--also", action="append", default=[], metavar="KIND",
                    help='another server beside the four, e.g. "backstop --exact-reuse 0" (repeatable)')
    ap.add_argument("--unload", action="store_true",
                    help="backstop unloads its model before every follow-up (keep_alive 0)")
    ap.add_argument("--restart", action="store_true",
                    help="every server restarts before every follow-up; backstop with a --cache-dir")
    ap.add_argument("--streams", type=int, default=0,
                    help="other streams decoding throughout every follow-up (they take slots)")
    args = ap.parse_args()
    if args.streams and args.streams >= args.parallel:
        ap.error("--streams must be fewer than --parallel, or no slot is left for the follow-ups")
    if args.unload and args.restart:
        ap.error("--unload and --restart are two different runs")
    kinds = SERVERS + [k for k in args.also if k not in SERVERS]
    model = pathlib.Path(args.model)
    backstop, llama_server, peer_version, template = peers.backstop_and_llama_server(model)

    folders = pathlib.Path(tempfile.mkdtemp(prefix="bench-conversations-"))

    def start(kind: str) -> peers.Server:
        binary = backstop if kind.startswith("backstop") else llama_server
        extra = kind.split()[1:]
        if args.restart and kind.startswith("backstop"):
            extra += ["--cache-dir", str(folders / kind.replace(" ", "").replace("/", "_"))]
        return peers.serve_side_by_side(kind, binary, model, args.threads, args.parallel, args.ctx, template,
                                        extra)

    def run(kind: str, tag: str) -> dict[str, list[float]]:
        """Every conversation's turns, round the conversations: first-turn and follow-up TTFTs,
        with --restart how long each stop took, and with --streams the other streams' worst and
        median gaps."""
        chats = [[{"role": "user", "content": peers.history(args.history, f"{tag} {c} {os.urandom(3).hex()}")
                   + "\nSummarize my notes."}] for c in range(args.conversations)]
        first, follow, stops, worst, usual = [], [], [], [], []
        for turn in range(TURNS):
            for messages in chats:
                if turn:
                    messages.append({"role": "user", "content": FOLLOW_UPS[turn - 1]})
                time.sleep(args.pause)
                if turn and args.unload and kind.startswith("backstop"):
                    unload(servers[kind].url)
                if turn and args.restart:
                    began = time.perf_counter()
                    servers[kind].stop()
                    stops.append((time.perf_counter() - began) * 1000)
                    servers[kind] = start(kind)
                others = Others(servers[kind].url, args.streams, args.ctx, tag) if turn and args.streams else None
                out = peers.stream(servers[kind].url, messages, args.max_tokens)
                messages.append({"role": "assistant", "content": out["text"]})
                (follow if turn else first).append(out["ttft_ms"])
                if others is not None:
                    gaps = others.cut_off(out["t0"], out["times"][-1])
                    worst.append(gaps[0])
                    usual.append(gaps[1])
        if kind.startswith("backstop"):
            peers.settle(servers[kind].url)
        return {"first": first, "follow": follow, "stop": stops, "worst_gap": worst, "median_gap": usual}

    runs: dict[str, list[dict[str, list[float]]]] = {k: [] for k in kinds}
    peers.log(f"==> starting the {len(kinds)} servers")
    servers = {kind: start(kind) for kind in kinds}
    try:
        for kind in kinds:
            peers.log(f"==> warm-up: {kind}")
            run(kind, "warm-up")
        for rep in range(args.reps):
            order = kinds[rep % len(kinds):] + kinds[:rep % len(kinds)]
            peers.log(f"==> rep {rep + 1}/{args.reps}")
            for kind in order:
                runs[kind].append(run(kind, str(rep)))
    finally:
        for s in servers.values():
            s.stop()
        shutil.rmtree(folders, ignore_errors=True)

    def median(kind: str, what: str) -> float:
        return statistics.median(t for rep in runs[kind] for t in rep[what])

    fig = {k: {"first": median(k, "first"), "follow": median(k, "follow")} for k in kinds}
    if args.restart:
        for k in kinds:
            fig[k]["stop"] = median(k, "stop")
    if args.streams:
        for k in kinds:
            fig[k]["worst_gap"] = median(k, "worst_gap")
            fig[k]["median_gap"] = median(k, "median_gap")
    ratios = {k: [statistics.median(a["follow"]) / statistics.median(b["follow"])
                  for a, b in zip(runs[k], runs["llama-server"])] for k in kinds}
    machine = {"nproc": os.cpu_count(), "cpu": peers.cpu_model(), "threads": args.threads}
    print(f"\nmachine: {machine['nproc']} cores, {machine['cpu']}; threads {args.threads}; model {model.name}; "
          f"{args.conversations} conversations on {args.parallel} slots, ~{args.history}-token history, "
          f"{TURNS} turns of {args.max_tokens} tokens (greedy), {args.pause} s before each request; "
          f"{'backstop unloads its model before each follow-up; ' if args.unload else ''}"
          f"{'every server restarts before each follow-up (backstop with --cache-dir); ' if args.restart else ''}"
          f"{f'{args.streams} other streams decode throughout each follow-up; ' if args.streams else ''}"
          f"median of {args.reps} rotated runs; llama-server {peer_version}\n")
    stop_head, stop_rule = (" stop ms (SIGTERM to exit) |", " --- |") if args.restart else ("", "")
    if args.streams:
        stop_head += " other streams' worst gap ms (their median gap) |"
        stop_rule += " --- |"
    print(f"| server | first turn TTFT ms | follow-up TTFT ms | follow-up vs llama-server (min-max per run) |"
          f"{stop_head}")
    print(f"| --- | --- | --- | --- |{stop_rule}")
    for k in kinds:
        r = ratios[k]
        stop = f" {fig[k]['stop']:.0f} |" if args.restart else ""
        if args.streams:
            stop += f" {fig[k]['worst_gap']:.0f} ({fig[k]['median_gap']:.0f}) |"
        print(f"| {k} | {fig[k]['first']:.0f} | {fig[k]['follow']:.0f} | "
              f"{statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f}) |{stop}")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / time.strftime("conversations-%Y%m%d-%H%M%S.json")
    path.write_text(json.dumps({"machine": machine, "model": str(model), "peer_version": peer_version,
                                "conversations": args.conversations, "parallel": args.parallel,
                                "history": args.history, "pause_s": args.pause, "max_tokens": args.max_tokens,
                                "reps": args.reps, "unload": args.unload, "restart": args.restart,
                                "streams": args.streams, "follow_ups": FOLLOW_UPS, "median_ttft_ms": fig,
                                "ratio_vs_llama_server": ratios, "runs": runs}, indent=1))
    print(f"\n{path}")
    return 0


class Others:
    """Streams decoding beside a follow-up: started, and begun, when made."""

    def __init__(self, url: str, n: int, ctx: int, tag: str):
        self.stop = threading.Event()
        self.outs: list[dict] = [{} for _ in range(n)]
        self.threads = []
        for i in range(n):
            started = threading.Event()
            messages = [{"role": "user", "content": f"Tell me a long story, number {i} ({tag} {os.urandom(3).hex()})."}]

            def run(i=i, messages=messages, started=started):
                self.outs[i] = peers.stream(url, messages, ctx - 64, started, stop=self.stop)
                started.set()  # a stream that ended early lets the follow-up go

            thread = threading.Thread(target=run, daemon=True)
            thread.start()
            self.threads.append((thread, started))
        for _, started in self.threads:
            started.wait(300)

    def cut_off(self, since: float, until: float) -> tuple[float, float]:
        """Stops the streams; their worst inter-token gap that ends after `since` and starts
        before `until`, and their median gap before `since`, in ms."""
        self.stop.set()
        for thread, _ in self.threads:
            thread.join(300)
        during, before = [], []
        for out in self.outs:
            times = out.get("times", [])
            for a, b in zip(times, times[1:]):
                if b >= since and a <= until:
                    during.append(b - a)
                elif b < since:
                    before.append(b - a)
        return max(during, default=0.0) * 1e3, (statistics.median(before) if before else 0.0) * 1e3


def unload(url: str) -> None:
    """Unloads backstop's model (Ollama's `keep_alive: 0`); returns once it is out."""
    body = json.dumps({"model": "m", "keep_alive": 0}).encode()
    req = urllib.request.Request(url + "/api/generate", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        reply = json.loads(r.read())
    if reply.get("done_reason") != "unload":
        raise RuntimeError(f"{url}: not unloaded: {reply}")


if __name__ == "__main__":
    sys.exit(main())
