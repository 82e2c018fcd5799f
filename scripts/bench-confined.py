#!/usr/bin/env python3
"""backstop beside llama-server on part of the machine, each with the threads it picks by
itself: in a container, a Kubernetes pod or a systemd unit a server may use fewer CPUs than
the machine has, and a server that counts the machine's cores starts threads that spin
against each other for the few it has.

Both servers are started without a thread count, confined the same way: to a CPU mask
(`--cpus 0`, as `taskset -c 0` or a container's cpuset confines), or with `--quota N` to N
CPUs' worth of time a period in a cgroup of their own (as `docker --cpus N` or a pod's CPU
limit does; needs root and a writable cgroup file system, v2 or v1's cpu controller). The
client runs outside. Each repetition, in a rotating order, each server is started, answers
one client (2 requests) and then 4 clients at once (1 request each, unique prompts, greedy,
--max-tokens each with ignore_eos), and is stopped. Same model, slots, per-slot context, chat
template and flash attention (off) for both, as bench-peers.py sets them. The ratios are the
median of per-repetition ratios, with their spread.

    ~/.cache/backstop/venv/bin/python scripts/bench-confined.py [--cpus 0 | --quota 1]
        [--model PATH] [--reps 5] [--max-tokens 128]

Writes bench-results/confined-<time>.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import re
import statistics
import sys
import time

spec = importlib.util.spec_from_file_location("bench_peers", pathlib.Path(__file__).with_name("bench-peers.py"))
peers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(peers)

KINDS = ["backstop", "llama-server"]
GROUP = "backstop-bench-confined"


class Quota:
    """A cgroup with a CPU quota of `cpus` CPUs, v2 where the cpu controller can be had, else
    v1's; removed on close."""

    PERIOD = 100_000

    def __init__(self, cpus: float):
        quota = int(cpus * self.PERIOD)
        v2 = pathlib.Path("/sys/fs/cgroup")
        v1 = pathlib.Path("/sys/fs/cgroup/cpu")
        if (v2 / "cgroup.controllers").exists() and "cpu" in (v2 / "cgroup.controllers").read_text().split():
            subtree = v2 / "cgroup.subtree_control"
            if "cpu" not in subtree.read_text().split():
                subtree.write_text("+cpu")
            self.dir = v2 / GROUP
            self.dir.mkdir(exist_ok=True)
            (self.dir / "cpu.max").write_text(f"{quota} {self.PERIOD}")
            self.procs = self.dir / "cgroup.procs"
        elif (v1 / "cpu.cfs_quota_us").exists():
            self.dir = v1 / GROUP
            self.dir.mkdir(exist_ok=True)
            (self.dir / "cpu.cfs_period_us").write_text(str(self.PERIOD))
            (self.dir / "cpu.cfs_quota_us").write_text(str(quota))
            self.procs = self.dir / "tasks"
        else:
            raise SystemExit("--quota needs a cgroup file system with the cpu controller, writable (root)")

    def wrap(self) -> list[str]:
        # The shell moves itself into the group, then becomes the server.
        return ["sh", "-c", f'echo $$ > {self.procs} && exec "$@"', "sh"]

    def close(self) -> None:
        try:
            self.dir.rmdir()
        except OSError as e:
            print(f"could not remove {self.dir}: {e}", file=sys.stderr)


def threads_chosen(kind: str, log: str) -> int | None:
    pattern = r"model loaded .*?threads=(\d+)" if kind == "backstop" else r"n_threads = (\d+)"
    found = re.search(pattern, log)
    return int(found.group(1)) if found else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    how = ap.add_mutually_exclusive_group()
    how.add_argument("--cpus", default="0", help="the CPU list both servers may run on (taskset's), default 0")
    how.add_argument("--quota", type=float, help="CPUs' worth of time a period both servers get, in a cgroup")
    ap.add_argument("--model", default=str(peers.MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--ctx", type=int, default=4096, help="context per slot, both servers")
    ap.add_argument("--parallel", type=int, default=4, help="slots, both servers")
    ap.add_argument("--out", default=str(peers.ROOT / "bench-results"))
    args = ap.parse_args()
    model = pathlib.Path(args.model)
    backstop, llama_server, peer_version, template = peers.backstop_and_llama_server(model)
    binaries = {"backstop": backstop, "llama-server": llama_server}
    quota = Quota(args.quota) if args.quota else None
    wrap = quota.wrap() if quota else ["taskset", "-c", args.cpus]
    unit = "CPU" if args.quota == 1 else "CPUs"
    confined = f"a cgroup quota of {args.quota:g} {unit}" if quota else f"CPUs {args.cpus} (taskset)"
    peers.log(f"==> both servers confined to {confined}, each with its own default threads")
    runs: dict[str, list[dict]] = {k: [] for k in KINDS}
    try:
        for rep in range(args.reps):
            for kind in KINDS[rep % 2:] + KINDS[:rep % 2]:
                peers.log(f"==> rep {rep + 1}/{args.reps}: {kind}")
                s = peers.serve_side_by_side(kind, binaries[kind], model, None, args.parallel, args.ctx,
                                             template, [], wrap)
                try:
                    one = peers.client(s.url, "m", 1, 2, args, warmup=1)
                    four = peers.client(s.url, "m", 4, 1, args)
                finally:
                    s.stop()
                runs[kind].append({
                    "threads": threads_chosen(kind, s.log_path.read_text()),
                    "decode_1": one["decode_tok_s_per_stream"]["median"],
                    "ttft_1_ms": one["ttft_ms"]["p50"],
                    "agg_4": four["aggregate_tok_s"],
                    "ttft_4_p50_ms": four["ttft_ms"]["p50"],
                })
    finally:
        if quota:
            quota.close()

    def ratio(key: str) -> dict:
        rs = [b[key] / p[key] for b, p in zip(runs["backstop"], runs["llama-server"]) if b[key] and p[key]]
        return {"median": statistics.median(rs), "spread": [min(rs), max(rs)]} if rs else {}

    rows = [("single stream decode, tok/s", "decode_1"), ("time to first token, ms", "ttft_1_ms"),
            (f"{args.parallel} clients aggregate, tok/s", "agg_4")]
    threads = {k: sorted({r["threads"] for r in runs[k]}, key=lambda t: (t is None, t)) for k in KINDS}
    print(f"\nconfined to {confined}; {peers.cpu_model()}, {os.cpu_count()} CPUs; "
          f"threads chosen: backstop {threads['backstop']}, llama-server {threads['llama-server']}\n")
    print("| measure | backstop | llama-server | ratio (spread) |")
    print("| --- | --- | --- | --- |")
    figures = {}
    for label, key in rows:
        b = statistics.median(r[key] for r in runs["backstop"])
        p = statistics.median(r[key] for r in runs["llama-server"])
        r = ratio(key)
        figures[key] = {"backstop": b, "llama-server": p, "ratio": r}
        spread = f" ({r['spread'][0]:.2f}-{r['spread'][1]:.2f})" if r else ""
        print(f"| {label} | {b:.1f} | {p:.1f} | {r.get('median', float('nan')):.2f}x{spread} |")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"confined-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({
        "machine": {"nproc": os.cpu_count(), "cpu": peers.cpu_model()}, "model": str(model),
        "confined": {"cpus": None if quota else args.cpus, "quota": args.quota}, "reps": args.reps,
        "max_tokens": args.max_tokens, "peer_version": peer_version, "threads": threads,
        "figures": figures, "runs": runs,
    }, indent=2) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
