#!/usr/bin/env python3
"""backstop's embeddings beside llama-server's (`--embeddings --pooling mean`): what a
retrieval pipeline that embeds its documents waits for.

Both servers run at once on the same model and threads, each with its own defaults otherwise
(llama-server's flash attention `auto`, its 4 slots; backstop's `serve` defaults), idle but
for the one being asked. Each repetition asks each server, in a rotating order, for every
workload: `--requests` requests of N texts each from `--clients` clients at once, texts of
a given length, unique to the repetition (pseudo-random words, so no two inputs are alike).
A workload's figure is texts a second; the ratio is backstop's over llama-server's, the
median of the per-repetition ratios with their spread. The two servers' vectors for the same
texts are compared too (the least cosine similarity): they should be the same vectors.

    ~/.cache/backstop/venv/bin/python scripts/bench-embeddings.py [--model PATH] [--reps 5]
        [--threads N] [--clients 1] [--requests 4] [--backstop-args "--flash-attention 0"]

Writes bench-results/embeddings-<time>.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import math
import pathlib
import random
import shlex
import statistics
import sys
import time
import urllib.request

spec = importlib.util.spec_from_file_location("bench_peers", pathlib.Path(__file__).with_name("bench-peers.py"))
peers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(peers)

KINDS = ["backstop", "llama-server"]

# (name, texts a request, words a text): one short query at a time (a search box), a batch of
# sentences, a batch of paragraphs, and a few page-long chunks (under 512 tokens, both
# servers' largest input by default).
WORKLOADS = [
    ("1 query a request", 1, 12),
    ("16 sentences a request", 16, 16),
    ("8 paragraphs a request", 8, 100),
    ("2 pages a request", 2, 350),
]

WORDS = (
    "river stone garden light window paper market engine winter bridge forest music doctor "
    "island letter silver morning harbor voice table mountain coffee village station story "
    "number picture rain street answer kitchen field summer teacher ocean machine city road "
    "the a of and to in is was for on with as by at from that this it which"
).split()


def texts(rng: random.Random, count: int, words: int, tag: str) -> list[str]:
    """`count` texts of about `words` words, each opening with a tag no other repetition uses."""
    return [f"{tag}-{i} " + " ".join(rng.choice(WORDS) for _ in range(words)) for i in range(count)]


def embed(url: str, inputs: list[str]) -> dict:
    body = json.dumps({"model": "m", "input": inputs}).encode()
    req = urllib.request.Request(url + "/v1/embeddings", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def run(url: str, batches: list[list[str]], clients: int) -> tuple[float, int]:
    """Sends the batches from `clients` clients at once; the seconds it took and the tokens
    the server counted."""
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        outs = list(pool.map(lambda b: embed(url, b), batches))
    seconds = time.perf_counter() - t0
    for out, batch in zip(outs, batches):
        if len(out["data"]) != len(batch):
            raise SystemExit(f"{url}: {len(out['data'])} vectors for {len(batch)} texts")
    return seconds, sum(o["usage"]["prompt_tokens"] for o in outs)


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    peers.side_by_side_args(ap, max_tokens=0)
    # Nothing is generated here: the shared --max-tokens is taken and not shown.
    next(a for a in ap._actions if a.dest == "max_tokens").help = argparse.SUPPRESS
    ap.add_argument("--clients", type=int, default=1, help="clients asking at once")
    ap.add_argument("--requests", type=int, default=4, help="requests of each workload a repetition")
    ap.add_argument("--backstop-args", default="", help="extra `backstop serve` arguments")
    args = ap.parse_args()
    model = pathlib.Path(args.model)
    backstop, llama_server, peer_version, _ = peers.backstop_and_llama_server(model)
    port_b, port_l = peers.free_port(), peers.free_port()
    argv = {
        "backstop": [str(backstop), "serve", "--host", f"127.0.0.1:{port_b}", "--model", f"m={model}",
                     "--threads", str(args.threads), "--ctx", str(args.ctx), *shlex.split(args.backstop_args)],
        "llama-server": [str(llama_server), "-m", str(model), "-t", str(args.threads), "-c", str(4 * args.ctx),
                         "--host", "127.0.0.1", "--port", str(port_l), "--alias", "m",
                         "--embeddings", "--pooling", "mean"],
    }
    ports = {"backstop": port_b, "llama-server": port_l}
    peers.log(f"==> {model.name}, {args.threads} threads, {args.clients} client(s); llama-server {peer_version}")
    servers = {}
    try:
        for kind in KINDS:
            ready = "/health/ready" if kind == "backstop" else "/health"
            servers[kind] = peers.Server(kind, argv[kind], ports[kind], ready=ready)
        rng = random.Random(7)
        # Warm-up: every server creates its embedding context, every workload's shape once.
        for server in servers.values():
            for _, n, words in WORKLOADS:
                embed(server.url, texts(rng, n, words, "warm"))
        speeds = {w[0]: {k: [] for k in KINDS} for w in WORKLOADS}
        tokens = {w[0]: {} for w in WORKLOADS}
        least_cosine = {}
        for rep in range(args.reps):
            for name, n, words in WORKLOADS:
                batches = [texts(rng, n, words, f"r{rep}q{q}") for q in range(args.requests)]
                order = KINDS[rep % 2:] + KINDS[:rep % 2]
                for kind in order:
                    seconds, counted = run(servers[kind].url, batches, args.clients)
                    speeds[name][kind].append(n * args.requests / seconds)
                    tokens[name][kind] = counted / (n * args.requests)
                if rep == 0:
                    mine, theirs = (embed(servers[k].url, batches[0])["data"] for k in KINDS)
                    least_cosine[name] = min(cosine(a["embedding"], b["embedding"]) for a, b in zip(mine, theirs))
            peers.log(f"repetition {rep + 1}/{args.reps} done")
    finally:
        for server in servers.values():
            server.stop()
    rows = []
    print(f"\n{model.name}, {args.threads} threads, {args.clients} client(s), {args.requests} requests a "
          f"workload, {args.reps} repetitions; {peers.cpu_model()} ({peers.os.cpu_count()} CPUs)\n")
    print("| workload | tokens a text | backstop texts/s | llama-server texts/s | ratio (min-max) | least cosine |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, _, _ in WORKLOADS:
        b, l = speeds[name]["backstop"], speeds[name]["llama-server"]
        ratio = peers.paired_ratio(b, l)
        tok = tokens[name]
        print(f"| {name} | {tok['backstop']:.0f} / {tok['llama-server']:.0f} | {statistics.median(b):.1f} | "
              f"{statistics.median(l):.1f} | {ratio} | {least_cosine[name]:.5f} |")
        rows.append({"workload": name, "tokens_per_text": tok, "backstop": b, "llama_server": l, "ratio": ratio,
                     "least_cosine": least_cosine[name]})
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"embeddings-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({
        "model": model.name, "threads": args.threads, "clients": args.clients, "requests": args.requests,
        "reps": args.reps, "backstop_args": args.backstop_args, "peer": peer_version,
        "cpu": peers.cpu_model(), "rows": rows,
    }, indent=2))
    print(f"\nmedian texts a second after a warm-up; JSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
