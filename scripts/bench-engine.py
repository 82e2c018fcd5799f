#!/usr/bin/env python3
"""`backstop bench` beside llama.cpp's own llama-bench, in one run: the same models, tests,
depths, threads, flash attention and batch, alternating which goes first each round so that
a noisy machine's drift hits both alike.

    scripts/bench-engine.py [--rounds 3] [--reps 3] [-p 128,512] [-n 32,128] [-d 0]
                            [--pg P,N ...] [--threads N] [--flash-attention 1] [--batch 512]
                            [MODEL...]

MODEL defaults to the two test models. Each round runs `backstop bench` and llama-bench
(scripts/build-peers.sh builds it, into ~/.cache/backstop/peers/bin) once each with `-r REPS`;
each side's figure in a round is the median of its samples, and the ratio per test is the
median over the rounds of that round's backstop over llama-bench (min–max beside it). A ratio of
1 is parity: both read the same llama.cpp kernels, so this checks that backstop's own loop
(batches, sampling, cache handling) costs nothing measurable, and shows any llama.cpp version
difference between the two builds.

Prints a markdown table and writes bench-results/engine-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
CACHE = pathlib.Path(os.environ.get("BACKSTOP_CACHE", pathlib.Path.home() / ".cache" / "backstop"))
TARGET = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", CACHE / "target"))
MODELS = pathlib.Path(os.environ.get("BACKSTOP_MODELS", CACHE / "models"))
PEERS = CACHE / "peers" / "bin"
DEFAULT_MODELS = ["SmolLM2-135M-Instruct.Q4_1.gguf", "gemma-3-270m-q4_k_m.gguf"]


def ours(report: dict) -> dict[tuple, float]:
    """`backstop bench --format json`'s figures by (file, depth, test): the median of each."""
    out = {}
    for r in report["results"]:
        name = pathlib.Path(r["file"]).name
        if r.get("pp"):
            out[(name, r["depth"], f"pp{r['prompt']}")] = r["pp"]["median"]
        if r.get("tg"):
            out[(name, r["depth"], f"tg{r['generate']}")] = r["tg"]["median"]
        if r.get("pg"):
            out[(name, r["depth"], f"pp{r['prompt']}+tg{r['generate']}")] = r["pg"]["median"]
    return out


def theirs(report: list) -> dict[tuple, float]:
    """llama-bench's `-o json` figures by (file, depth, test): the median of its samples, so
    that both sides are summarised alike (llama-bench's own table gives the mean)."""
    out = {}
    for r in report:
        name = pathlib.Path(r["model_filename"]).name
        if r["n_prompt"] > 0 and r["n_gen"] == 0:
            test = f"pp{r['n_prompt']}"
        elif r["n_gen"] > 0 and r["n_prompt"] == 0:
            test = f"tg{r['n_gen']}"
        elif r["n_gen"] > 0:
            # -pg: the prompt and the generation after it, timed as one.
            test = f"pp{r['n_prompt']}+tg{r['n_gen']}"
        else:
            continue
        out[(name, r.get("n_depth", 0), test)] = statistics.median(r["samples_ts"])
    return out


def ratios(rounds: list[tuple[dict, dict]]) -> list[dict]:
    """Per test found on both sides: each side's median over the rounds, and the median,
    lowest and highest of the per-round ratios (backstop over llama-bench)."""
    keys = [k for k in rounds[0][0] if all(k in a and k in b for a, b in rounds)]
    rows = []
    for k in keys:
        per_round = [a[k] / b[k] for a, b in rounds]
        rows.append(
            {
                "model": k[0],
                "depth": k[1],
                "test": k[2],
                "backstop": statistics.median(a[k] for a, _ in rounds),
                "llama_bench": statistics.median(b[k] for _, b in rounds),
                "ratio": statistics.median(per_round),
                "ratio_min": min(per_round),
                "ratio_max": max(per_round),
                "ratios": per_round,
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    out = [
        "| model | test | depth | backstop tok/s | llama-bench tok/s | ratio (min–max over rounds) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        out.append(
            f"| {r['model']} | {r['test']} | {r['depth']} | {r['backstop']:.1f} | {r['llama_bench']:.1f} "
            f"| {r['ratio']:.2f} ({r['ratio_min']:.2f}–{r['ratio_max']:.2f}) |"
        )
    return "\n".join(out)


def run(cmd: list[str]) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    return p.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", help="GGUF files [default: the two test models]")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("-p", "--prompt", default="128,512")
    ap.add_argument("-n", "--gen", default="32,128")
    ap.add_argument("-d", "--depth", default="0")
    ap.add_argument("--pg", action="append", default=[], metavar="P,N",
                    help="a prompt and the generation after it, timed as one (llama-bench's -pg); "
                         "again for more")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--flash-attention", choices=["0", "1"], default="1")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--backstop", default=str(TARGET / "release" / "backstop"))
    ap.add_argument("--llama-bench", default=str(PEERS / "llama-bench"))
    ap.add_argument("--out", default=str(ROOT / "bench-results"))
    a = ap.parse_args()
    if a.rounds < 1 or a.reps < 1:
        sys.exit("--rounds and --reps must be at least 1")
    models = a.models or [str(MODELS / m) for m in DEFAULT_MODELS]
    for path in [a.backstop, a.llama_bench, *models]:
        if not pathlib.Path(path).exists():
            sys.exit(f"{path} is missing (scripts/setup.sh builds backstop and fetches the models; "
                     "scripts/build-peers.sh builds llama-bench)")
    shape = ["-p", a.prompt, "-n", a.gen, "-d", a.depth, "-r", str(a.reps), "-t", str(a.threads)]
    backstop = [a.backstop, "bench", *shape, *(f for pg in a.pg for f in ("--pg", pg)),
                "--flash-attention", a.flash_attention, "-b", str(a.batch), "--format", "json", *models]
    # llama-bench's n_batch and n_ubatch both set, as `backstop bench -b` sets both.
    peer = [a.llama_bench, *shape, *(f for pg in a.pg for f in ("-pg", pg)), "-fa", a.flash_attention,
            "-b", str(a.batch), "-ub", str(a.batch), "-o", "json"]
    for m in models:
        peer += ["-m", m]
    rounds, raw = [], []
    for i in range(a.rounds):
        first_ours = i % 2 == 0
        started = time.perf_counter()
        outputs = {}
        for side in (["backstop", "llama-bench"] if first_ours else ["llama-bench", "backstop"]):
            outputs[side] = json.loads(run(backstop if side == "backstop" else peer))
        rounds.append((ours(outputs["backstop"]), theirs(outputs["llama-bench"])))
        raw.append(outputs)
        print(f"round {i + 1}/{a.rounds} ({'backstop' if first_ours else 'llama-bench'} first): "
              f"{time.perf_counter() - started:.0f} s", file=sys.stderr)
    rows = ratios(rounds)
    if not rows:
        sys.exit("no test was measured by both sides")
    peer_build = raw[0]["llama-bench"][0].get("build_commit", "?")
    machine = raw[0]["backstop"]["machine"]
    print(table(rows))
    print(f"\nmedian over {a.rounds} rounds of {a.reps} repetitions each; {a.threads} threads, "
          f"flash attention {'on' if a.flash_attention == '1' else 'off'}, batch {a.batch}")
    print(f"{machine['cpu']} ({machine['cores']} cores, {machine['logical']} logical); "
          f"backstop {machine['backstop']}, llama-bench {peer_build}")
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"engine-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({
        "command": {"backstop": backstop, "llama_bench": peer},
        "machine": machine,
        "host": platform.node(),
        "llama_bench_build": peer_build,
        "rows": rows,
        "raw": raw,
    }, indent=1))
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
