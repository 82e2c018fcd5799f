#!/usr/bin/env python3
"""Speculative decoding by prompt lookup, backstop's (`serve --speculate N`) side by side with
llama-server's (`--spec-type ngram-simple`), in one run, on one model.

Five servers, all up at once (an idle server takes no CPU time), each with the same model,
threads, per-slot context, chat template (backstop's fallback by the peer's name for it, as in
bench-peers.py) and flash attention (backstop's CPU default, off, unless
BACKSTOP_FLASH_ATTENTION=1 turns it on for all of them), so that what differs is speculation: backstop without and with --speculate N, llama-server without and with
`--spec-type ngram-simple` (its other settings at their defaults, as a user who turns it on gets
them). Three tasks, each a greedy chat streamed to one client:
  edit   rename a function in 24 lines of Python and answer with the whole code: the answer
         repeats its prompt with a change
  quote  a passage, then "repeat it word for word"
  story  a story from nothing: little to look up, so drafting must cost little or nothing
A second backstop with --speculate N is asked with `speculative.n_min` N (every guess the lookup
finds that long checked whole, whatever the measured costs say, as llama-server's ngram-simple
checks its guesses): what its cost-weighed drafting gives up or saves on each task. It is a
server of its own because what a server drafts changes what it measures: the decode costs its
drafting is weighed by.
With --against BINARY (another build of backstop: a commit before a change to the drafting
policy, say), a sixth server runs that build with --speculate N, and a second table sets the two
builds' gains and their ratio side by side: a policy change measured against the one before
in the same run. `--against` a copy of this build's own binary shows how far apart two
identical servers come out: on the 2-core VM, with --reps 5, medians of 0.95x-1.03x and single
runs of 0.84x-1.13x, so a difference of a few percent needs more repetitions than that.
Each repetition runs every task on every server (after one warm-up request each, the first time),
in an order shuffled afresh each repetition (a fixed rotation keeps each server after the same
neighbour every time); decode tok/s per stream is (completion tokens - 1) / (last token -
first token), from bench_client.py. The table gives each server's median rate over the
repetitions, and as ratios (the median of the per-repetition ratios, with their spread) each
server's speculative rate over its plain one (the gain) and backstop's speculative rate over
llama-server's: servers asked within seconds of each other drift together, so a ratio taken
within one repetition is steadier than one of medians.

    ~/.cache/backstop/venv/bin/python scripts/bench-speculate.py [--model PATH] [--draft 16]
        [--reps 5] [--threads N] [--max-tokens 300] [--against BINARY]

Writes bench-results/speculate-<time>.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import random
import statistics
import sys
import time

spec = importlib.util.spec_from_file_location("bench_peers", pathlib.Path(__file__).with_name("bench-peers.py"))
peers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(peers)

CODE = '''def merge_sorted(left, right):
    """Merge two sorted lists into one sorted list."""
    result = []
    i = j = 0
    while i < len(left) and j < len(right):
        if left[i] <= right[j]:
            result.append(left[i])
            i += 1
        else:
            result.append(right[j])
            j += 1
    result.extend(left[i:])
    result.extend(right[j:])
    return result


def merge_sort(items):
    """Sort a list by splitting it in halves and merging them."""
    if len(items) <= 1:
        return items
    middle = len(items) // 2
    left = merge_sort(items[:middle])
    right = merge_sort(items[middle:])
    return merge_sorted(left, right)
'''

PASSAGE = ("The lighthouse stood on the northern point of the island for two hundred years. "
           "Every evening the keeper climbed its one hundred and twelve steps, trimmed the wick, "
           "filled the lamp with oil and wound the clockwork that turned the great lens. "
           "Ships passing in the night saw its beam sweep the water every ten seconds, and knew "
           "to keep well clear of the rocks that lay hidden beneath the waves to the west.")

TASKS = {
    "edit": "Rename the function merge_sorted to merge_lists everywhere in this code. Answer with "
            "the whole code and nothing else.\n\n```python\n" + CODE + "```",
    "quote": "Here is a passage:\n\n" + PASSAGE + "\n\nRepeat the passage above word for word.",
    "story": "Write a long story about a lighthouse keeper who finds a map washed up on the shore.",
}

# backstop --speculate N again, asked with speculative.n_min N.
FORCED = "backstop n_min"
KINDS = ["backstop", "backstop --speculate", FORCED, "llama-server", "llama-server ngram-simple"]
# --against's build, with --speculate N.
OTHER = "backstop other build --speculate"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    peers.side_by_side_args(ap, max_tokens=300)
    ap.add_argument("--draft", type=int, default=16, help="backstop's --speculate N")
    ap.add_argument("--against", help="another backstop binary to run with --speculate N beside this build")
    args = ap.parse_args()
    model = pathlib.Path(args.model)
    backstop, llama_server, peer_version, template = peers.backstop_and_llama_server(model)
    other = pathlib.Path(args.against) if args.against else None
    if other is not None and not other.is_file():
        raise SystemExit(f"--against {other}: no such file")
    kinds = KINDS + ([OTHER] if other else [])

    def start(kind: str) -> peers.Server:
        if kind.startswith("backstop"):
            extra = ["--speculate", str(args.draft)] if kind != "backstop" else []
            binary = other if kind == OTHER and other else backstop
            return peers.serve_side_by_side(kind, binary, model, args.threads, 1, args.ctx, template, extra)
        extra = ["--spec-type", "ngram-simple"] if kind.endswith("ngram-simple") else []
        return peers.serve_side_by_side(kind, llama_server, model, args.threads, 1, args.ctx, template, extra)

    def decode_rate(url: str, prompt: str, warmup: int, extra: dict | None = None) -> dict:
        # The answer ends where the model ends it: past a copy it would run on into other text.
        out = peers.client(url, "m", 1, 1, args, warmup=warmup, unique=False, prompt=prompt, ignore_eos=False,
                           extra=extra)
        return {"decode_tok_s": out["decode_tok_s_per_stream"]["median"],
                "completion_tokens": out["completion_tokens_total"]}

    runs: dict[str, dict[str, list[dict]]] = {k: {t: [] for t in TASKS} for k in kinds}
    peers.log(f"==> starting the {len(kinds)} servers")
    servers = {kind: start(kind) for kind in kinds}
    try:
        for rep in range(args.reps):
            order = list(kinds)
            random.Random(rep).shuffle(order)
            for task, prompt in TASKS.items():
                peers.log(f"==> rep {rep + 1}/{args.reps}: {task}")
                for kind in order:
                    extra = {"speculative.n_min": args.draft} if kind == FORCED else None
                    runs[kind][task].append(decode_rate(servers[kind].url, prompt, 1 if rep == 0 else 0, extra))
    finally:
        for s in servers.values():
            s.stop()

    fig = {k: {t: statistics.median(r["decode_tok_s"] for r in runs[k][t]) for t in TASKS} for k in kinds}
    tokens = {k: {t: statistics.median(r["completion_tokens"] for r in runs[k][t]) for t in TASKS} for k in kinds}
    machine = {"nproc": os.cpu_count(), "cpu": peers.cpu_model(), "threads": args.threads}

    def ratio(a: str, b: str, t: str) -> str:
        """a's rate over b's on task t, paired by repetition."""
        return peers.paired_ratio([x["decode_tok_s"] for x in runs[a][t]], [y["decode_tok_s"] for y in runs[b][t]])

    print(f"\nmachine: {machine['nproc']} cores, {machine['cpu']}; threads {args.threads}; model {model.name}; "
          f"greedy, up to {args.max_tokens} tokens; median of {args.reps} runs in shuffled orders")
    print(f"backstop --speculate {args.draft}; llama-server {peer_version} --spec-type ngram-simple\n")
    print(f"| task | backstop | --speculate | gain | n_min {args.draft} | gain | llama-server | ngram-simple | gain "
          "| speculating: backstop / llama-server |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for t in TASKS:
        b0, b1, bf = fig["backstop"][t], fig["backstop --speculate"][t], fig[FORCED][t]
        l0, l1 = fig["llama-server"][t], fig["llama-server ngram-simple"][t]
        print(f"| {t} | {b0:.1f} | {b1:.1f} | {ratio('backstop --speculate', 'backstop', t)} | {bf:.1f} "
              f"| {ratio(FORCED, 'backstop', t)} | {l0:.1f} | {l1:.1f} "
              f"| {ratio('llama-server ngram-simple', 'llama-server', t)} "
              f"| {ratio('backstop --speculate', 'llama-server ngram-simple', t)} |")
    if other:
        print(f"\nthis build against {other} (both --speculate {args.draft}), gains over this build without:\n")
        print("| task | this build | gain | other build | gain | this / other |")
        print("| --- | --- | --- | --- | --- | --- |")
        for t in TASKS:
            b1, o1 = fig["backstop --speculate"][t], fig[OTHER][t]
            print(f"| {t} | {b1:.1f} | {ratio('backstop --speculate', 'backstop', t)} | {o1:.1f} "
                  f"| {ratio(OTHER, 'backstop', t)} | {ratio('backstop --speculate', OTHER, t)} |")
    print("\ndecode tok/s per stream; answer lengths (tokens, median): "
          + "; ".join(f"{k}: " + ", ".join(f"{t} {tokens[k][t]:.0f}" for t in TASKS) for k in kinds))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"speculate-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"machine": machine, "model": str(model), "draft": args.draft,
                                "max_tokens": args.max_tokens, "reps": args.reps, "peer_version": peer_version,
                                "against": str(other) if other else None,
                                "figures": fig, "tokens": tokens, "runs": runs}, indent=1))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
