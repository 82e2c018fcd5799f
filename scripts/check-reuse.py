#!/usr/bin/env python3
"""Does reusing a conversation's cache change a reproducible answer? Greedy multi-turn chats
against one backstop server: each follow-up is asked with the cache (`cache_prompt: true`, the
default), and read afresh (`cache_prompt: false`) by a second server that serves nothing else,
and the two answers must match. With --pause S the first server is left idle for S seconds
before each follow-up, so it reads the previous answer again in the meantime
(`--reread-answers`) and the follow-up reuses it.

Conversations are random notes of a few hundred to two thousand tokens, then three follow-up
turns; with --sampled, a sampled follow-up without a seed (which reuses all it can) comes
before about half of the greedy ones. For a sliding-window model (Gemma 3) with its default
windowed cache, this exercises reuse after the window wrote over a conversation's start.

    ~/.cache/backstop/venv/bin/python scripts/check-reuse.py [--conversations 8] [--sampled] [--pause S] [MODEL.gguf]

Prints each turn (prompt tokens, tokens reused, same answer) and a count; exit status 1 if any
answer differed. Default model: Gemma 3 270M from the test models.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import random
import sys
import time
import urllib.request

spec = importlib.util.spec_from_file_location("bench_peers", pathlib.Path(__file__).with_name("bench-peers.py"))
peers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(peers)

PHRASES = ["the keeper", "climbed the stairs", "of the old lighthouse", "and wrote down",
           "which ships had passed", "in the storm", "at dawn"]
QUESTIONS = ["Now give them a title.", "Count the ships.", "Say it shorter.", "What came first?"]


def chat(url: str, messages: list[dict], temperature: float, cache: bool, max_tokens: int,
         seed: int | None) -> tuple[str, int, int]:
    body = {"model": "m", "messages": messages, "temperature": temperature,
            "max_tokens": max_tokens, "cache_prompt": cache}
    if seed is not None:
        body["seed"] = seed
    req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        out = json.load(r)
    usage = out["usage"]
    return (out["choices"][0]["message"]["content"], usage["prompt_tokens"],
            usage.get("prompt_tokens_details", {}).get("cached_tokens", 0))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=str(peers.MODELS / "gemma-3-270m-q4_k_m.gguf"))
    p.add_argument("--backstop", default=str(peers.CACHE / "target" / "release" / "backstop"))
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--sampled", action="store_true", help="sampled follow-ups between greedy ones")
    p.add_argument("--seed", type=int, default=5, help="for the random conversations")
    p.add_argument("--pause", type=float, default=0.0, help="seconds idle before each follow-up")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--server-args", default="--parallel 2", help="extra `backstop serve` arguments")
    args = p.parse_args()

    def serve(name: str) -> peers.Server:
        port = peers.free_port()
        argv = [args.backstop, "serve", "--host", f"127.0.0.1:{port}", "--model", f"m={args.model}",
                *args.server_args.split()]
        if args.threads:
            argv += ["--threads", str(args.threads)]
        return peers.Server(name, argv, port)

    server = serve("check-reuse")
    fresh = serve("check-reuse-cold")
    rng = random.Random(args.seed)
    turns = reused = differing = 0
    try:
        for c in range(args.conversations):
            notes = " ".join(rng.choice(PHRASES) for _ in range(rng.randint(250, 700)))
            messages = [{"role": "user", "content": f"My notes: {notes}.\nSummarize my notes."}]
            said, _, _ = chat(server.url, messages, 0, True, rng.choice([8, 40, 120, 300]), 3)
            for t in range(3):
                messages = messages + [{"role": "assistant", "content": said},
                                       {"role": "user", "content": rng.choice(QUESTIONS)}]
                n = rng.choice([8, 40, 120])
                if args.sampled and rng.random() < 0.5:
                    _, _, cached = chat(server.url, messages, 0.8, True, rng.choice([8, 60, 200]), None)
                    print(f"conversation {c} turn {t}: sampled first, reused {cached}")
                time.sleep(args.pause)
                warm, prompt, cached = chat(server.url, messages, 0, True, n, 3)
                cold, _, _ = chat(fresh.url, messages, 0, False, n, 3)
                turns += 1
                reused += cached > 0
                differing += warm != cold
                print(f"conversation {c} turn {t}: prompt {prompt}, reused {cached}, "
                      f"{'same answer' if warm == cold else 'DIFFERENT ANSWER'}", flush=True)
                said = warm
    finally:
        server.stop()
        fresh.stop()
    print(f"{turns} greedy follow-ups: {reused} reused the cache, {differing} answered differently "
          "from a cold read")
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
