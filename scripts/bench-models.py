#!/usr/bin/env python3
"""What other loaded models cost a model's stream: backstop serving one model against backstop
serving several, in one run.

Per repetition, rotating the order:
  alone     a server with only model M; one streaming client      -> M's decode tok/s
  beside    a server with every model; one client for M at a time -> M's decode tok/s
  at once   the same server; one client per model, all together  -> each one's tok/s, and the sum
The table gives the medians, `beside / alone` per model (idle models should cost nothing:
>= 0.95), and `at once` against the models' alone figures (busy models take turns on the
cores, so each gets its share: the sum of the at-once rates over the alone rates, which is 1
when turns are free, is the last column).

    ~/.cache/backstop/venv/bin/python scripts/bench-models.py [--reps 3] [--threads N] [MODEL.gguf ...]

Default models: the two test models. Writes JSON to bench-results/models-<time>.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import statistics
import sys
import threading
import time

spec = importlib.util.spec_from_file_location("bench_peers", pathlib.Path(__file__).with_name("bench-peers.py"))
peers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(peers)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", help="GGUF files (default: the two test models)")
    p.add_argument("--backstop", default=str(peers.CACHE / "target" / "release" / "backstop"))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--port", type=int, default=18790)
    args = p.parse_args()
    files = args.models or [str(peers.MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"),
                            str(peers.MODELS / "gemma-3-270m-q4_k_m.gguf")]
    if len(files) < 2:
        p.error("give at least two models")
    names = [f"m{i}" for i in range(len(files))]

    def serve(which: list[int]) -> peers.Server:
        argv = [args.backstop, "serve", "--host", f"127.0.0.1:{args.port}", "--threads", str(args.threads),
                "--parallel", "1", "--max-loaded", str(len(files))]
        for i in which:
            argv += ["--model", f"{names[i]}={files[i]}"]
        return peers.Server("backstop", argv, args.port)

    def rate(url: str, i: int) -> float:
        return peers.client(url, names[i], 1, 1, args, warmup=1)["decode_tok_s_per_stream"]["median"]

    alone: list[list[float]] = [[] for _ in files]
    beside: list[list[float]] = [[] for _ in files]
    together: list[list[float]] = [[] for _ in files]
    for rep in range(args.reps):
        order = [(i + rep) % len(files) for i in range(len(files))]
        for i in order:
            s = serve([i])
            try:
                alone[i].append(rate(s.url, i))
            finally:
                s.stop()
        s = serve(order)
        try:
            for i in order:
                beside[i].append(rate(s.url, i))
            # Each client's own warm-up request runs beside the others' too, so the timed
            # streams start together.
            got: dict[int, float] = {}
            threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, rate(s.url, i))) for i in order]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for i in order:
                together[i].append(got[i])
        finally:
            s.stop()
        print(f"rep {rep + 1}/{args.reps} done", file=sys.stderr)

    med = statistics.median
    print(f"| model | alone tok/s | beside the others, idle | ratio (>= 0.95) | all at once | share |")
    print("| --- | --- | --- | --- | --- | --- |")
    for i, f in enumerate(files):
        ratio = med(b / a for a, b in zip(alone[i], beside[i]))
        print(f"| {f.rsplit('/', 1)[-1]} | {med(alone[i]):.1f} | {med(beside[i]):.1f} | {ratio:.2f} "
              f"{'pass' if ratio >= 0.95 else 'FAIL'} | {med(together[i]):.1f} | "
              f"{med(together[i]) / med(alone[i]):.2f} |")
    turns = sum(med(together[i]) / med(alone[i]) for i in range(len(files)))
    print(f"\nAll at once, the models' shares add up to {turns:.2f} of a model alone "
          f"({args.threads} threads, {args.reps} repetitions, {args.max_tokens} tokens; {peers.cpu_model()})")
    out = peers.ROOT / "bench-results" / f"models-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"models": files, "threads": args.threads, "alone": alone, "beside": beside,
                               "together": together}, indent=1))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
