#!/usr/bin/env python3
"""backstop side by side with its peers, in one run, on one model (BENCH.md, targets P1-P7,
P10, P11).

Peers: the raw engine (`backstop bench`: llama.cpp through llama-cpp-2 with no HTTP), llama.cpp's
own llama-server, and llama-cpp-python's server (both from scripts/build-peers.sh --python; the
latter is skipped with a note when it is not installed). Every server gets the same model,
threads, per-slot context, chat template (backstop's fallback, by the peer's name for it, when
the GGUF has none; the run stops if their prompts' lengths still differ) and requests (unique
prompts, so no prefix cache helps anyone; greedy; ignore_eos where the server honours it), and
each its own default flash attention (on a CPU llama-server turns it on, backstop leaves it
off; BACKSTOP_FLASH_ATTENTION=1 gives backstop and the raw engine the peer's kernels). Each of
1, 4 and 8 streaming clients measures decode tok/s per stream, TTFT p50/p95 and aggregate
tok/s; servers with slots get 4 slots for 1 and 4 clients and 8 for 8 (llama-cpp-python serves
one request at a time whatever it is given).
Single streams (P1, P2, P5) come first, with every server up at once (an idle server takes no
CPU time): in each repetition each server answers one client and the raw engine runs once, at
the cache depth backstop's streams decode at, in a rotating order and seconds apart. The rest
runs one server at a time, rotating the order (backstop, llama-server, llama-cpp-python; then
the next order, ...) so drift on a noisy machine hits all alike; every figure is the median
over --reps after a warm-up. The two ratios within one side (P1: backstop's decode over the
raw engine's; P4: backstop's 8 clients over its 1 client) and the ratios against llama-server
that the targets name (P2, P3, P5) are the median of the per-repetition ratios: the host can
move a whole repetition by 15% or more, which a ratio of medians taken minutes apart does not
cancel.

P6 (prompt-prefix reuse): a chat whose first user turn carries ~1,000 tokens of history, then a
second turn on top of it; TTFT of the second over the first (unique history per rep).
P7 (chunked prefill): 4 streams decode; once all are under way a ~2,000-token prompt arrives;
the 4 streams' worst inter-token gap over their median gap.

    scripts/bench-peers.py [--model PATH] [--threads 2] [--reps 5] [--max-tokens 128] [--ctx 4096]

Prints a markdown table of ratios against the targets and writes bench-results/peers-<time>.json
and bench-results/peers-<time>.png (matplotlib, installed the first time into the virtual
environment that runs the script: run it with ~/.cache/backstop/venv/bin/python).
"""

from __future__ import annotations

import argparse
import http.client
import importlib
import json
import os
import pathlib
import platform
import re
import select
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
CACHE = pathlib.Path(os.environ.get("BACKSTOP_CACHE", pathlib.Path.home() / ".cache" / "backstop"))
TARGET = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", CACHE / "target"))
MODELS = pathlib.Path(os.environ.get("BACKSTOP_MODELS", CACHE / "models"))
PEERS = CACHE / "peers" / "bin"
MIB = 1024 * 1024


T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def rss(pid: int) -> dict:
    out = {}
    for line in open(f"/proc/{pid}/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) * 1024
    return out


class Server:
    """One server process: started, timed to ready, measured, stopped."""

    def __init__(self, name: str, argv: list[str], port: int, env: dict | None = None, ready: str = "/health"):
        self.name, self.port = name, port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = pathlib.Path(f"/tmp/bench-{name}-{port}.log")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=open(self.log_path, "w"), stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
        )
        while True:
            try:
                with urllib.request.urlopen(self.url + ready, timeout=1) as r:
                    if r.status == 200:
                        break
            except Exception:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited: {self.log_path.read_text()[-2000:]}")
            if time.perf_counter() - t0 > 120:
                raise RuntimeError(f"{name} never became ready")
            time.sleep(0.005)
        self.ready_s = time.perf_counter() - t0

    def stop(self) -> None:
        """SIGTERM, and back as soon as the process exits (SIGKILL after 20 s). A timed
        `Popen.wait` polls, up to 50 ms apart, so the exit is awaited on a pidfd instead:
        bench-conversations.py times stops. A process already gone (and reaped) is left."""
        if self.proc.poll() is not None:
            return
        self.proc.terminate()
        fd = os.pidfd_open(self.proc.pid)
        try:
            exited, _, _ = select.select([fd], [], [], 20)
        finally:
            os.close(fd)
        if not exited:
            self.proc.kill()
        self.proc.wait()


def client(url: str, model: str, clients: int, requests: int, args, warmup: int = 0,
           unique: bool = True, extra: dict | None = None, prompt: str | None = None,
           ignore_eos: bool = True) -> dict:
    """Runs bench_client.py: unique prompts per request unless `unique` is false (then every
    request repeats the same prompt); `extra` is merged into each request body; `prompt` is the
    user message (bench_client's long-story request by default); answers run to max_tokens
    unless `ignore_eos` is false."""
    cmd = [
        sys.executable, str(ROOT / "scripts" / "bench_client.py"), "--url", url, "--model", model,
        "--clients", str(clients), "--requests-per-client", str(requests),
        "--max-tokens", str(args.max_tokens), "--warmup", str(warmup),
        "--extra", json.dumps({**({"ignore_eos": True} if ignore_eos else {}), **(extra or {})}),
        "--quiet", "--json", "/dev/stdout",
    ] + (["--unique-prompts"] if unique else []) + (["--prompt", prompt] if prompt is not None else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def paired_ratio(xs: list[float], ys: list[float]) -> str:
    """xs over ys, paired by repetition: the median of the ratios, and their spread (min-max).
    Servers asked within seconds of each other drift together, so a ratio taken within one
    repetition is steadier than a ratio of medians."""
    r = [x / y for x, y in zip(xs, ys)]
    return f"{statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f})"


def connect(url: str, timeout: float) -> http.client.HTTPConnection:
    host, port = url.removeprefix("http://").split(":")
    return http.client.HTTPConnection(host, int(port), timeout=timeout)


def stream(url: str, messages: list[dict], max_tokens: int, started: threading.Event | None = None,
           model: str = "m", stop: threading.Event | None = None) -> dict:
    """One streamed greedy chat request to `model`; the time of every content delta
    (perf_counter seconds). `started` is set at the second delta; once `stop` is set, the
    next delta closes the connection (the server then cancels the request)."""
    conn = connect(url, 300)
    body = json.dumps({"model": model, "messages": messages, "stream": True, "temperature": 0,
                       "max_tokens": max_tokens, "ignore_eos": True})
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"{url}: HTTP {resp.status}: {resp.read()[:300]!r}")
    times, text = [], []
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data:") or line == "data: [DONE]":
            continue
        for ch in json.loads(line[5:]).get("choices") or []:
            piece = (ch.get("delta") or {}).get("content")
            if piece:
                times.append(time.perf_counter())
                text.append(piece)
                if started is not None and len(times) == 2:
                    started.set()
        if stop is not None and stop.is_set():
            break
    conn.close()
    return {"t0": t0, "times": times, "text": "".join(text),
            "ttft_ms": (times[0] - t0) * 1e3 if times else None}


def counter(url: str, name: str, model: str | None = None) -> float:
    """A backstop server's counter `name` (from /metrics), for one model (its name as /metrics
    labels it, e.g. `m:latest`) or all."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    series = name + (f'{{model="{model}"}}' if model else "")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(series))


def reread_tokens(url: str, model: str | None = None) -> float:
    """Answer tokens a backstop server has read again while idle (`--reread-answers`), for
    one model or all."""
    return counter(url, "backstop_reread_tokens_total", model)


def settle(url: str) -> None:
    """Waits until a backstop server has read nothing again for half a second."""
    last = reread_tokens(url)
    while True:
        time.sleep(0.5)
        now = reread_tokens(url)
        if now == last:
            return
        last = now


def history(tokens: int, nonce: str) -> str:
    """About `tokens` tokens of text that no earlier request has sent (the nonce leads it)."""
    words = ("the keeper climbed the stairs of the old lighthouse each night and wrote in his log "
             "what ships had passed the point and what the sea had brought to the shore ").split()
    return f"[{nonce}] Here are my notes so far: " + " ".join(words[i % len(words)] for i in range(tokens))


def prompt_length(url: str) -> int:
    """The tokens a server reads for a conversation of the roles the benchmark sends (its
    `usage`). No system message: llama-cpp-python's `gemma` format drops it."""
    conn = connect(url, 120)
    messages = [{"role": "user", "content": "What does a lighthouse keeper do?"},
                {"role": "assistant", "content": "Keeps the light burning."},
                {"role": "user", "content": "And at dawn?"}]
    conn.request("POST", "/v1/chat/completions",
                 json.dumps({"model": "m", "messages": messages, "max_tokens": 1, "temperature": 0}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    body = resp.read()
    if resp.status != 200:
        raise RuntimeError(f"{url}: HTTP {resp.status}: {body[:300]!r}")
    return json.loads(body)["usage"]["prompt_tokens"]


def prefix_reuse(url: str, nonce: str) -> dict:
    """P6: TTFT of a first turn carrying ~1,000 tokens of history, then of the second turn."""
    first = [{"role": "user", "content": history(1000, nonce) + "\nSummarize my notes."}]
    a = stream(url, first, 16)
    second = first + [{"role": "assistant", "content": a["text"]},
                      {"role": "user", "content": "Now give them a title."}]
    b = stream(url, second, 16)
    return {"first_ms": a["ttft_ms"], "second_ms": b["ttft_ms"]}


def prefill_fairness(url: str, nonce: str, max_tokens: int) -> dict:
    """P7: 4 streams decode; a ~2,000-token prompt arrives; their worst gap over their median."""
    results: list[dict] = [{} for _ in range(4)]
    started = [threading.Event() for _ in range(4)]

    def run(i: int) -> None:
        msg = [{"role": "user", "content": f"[{nonce}-{i}] Write a long story about a lighthouse."}]
        results[i] = stream(url, msg, max_tokens, started[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for e in started:
        e.wait(120)
    time.sleep(0.3)  # all four are in steady decoding
    long = stream(url, [{"role": "user", "content": history(2000, nonce + "-long") + "\nOne word?"}], 1)
    arrived = long["t0"]
    for t in threads:
        t.join()
    gaps, during = [], []
    for r in results:
        ts = r["times"]
        for a, b in zip(ts, ts[1:]):
            gaps.append(b - a)
            if b > arrived and a < long["times"][-1] + 0.5:
                during.append(b - a)
    median = statistics.median(gaps)
    return {"median_gap_ms": median * 1e3, "worst_gap_ms": max(gaps) * 1e3,
            "worst_while_prefilling_ms": max(during) * 1e3 if during else None,
            "long_prompt_ttft_ms": long["ttft_ms"], "ratio": max(gaps) / median}


# The peers' names for the templates backstop falls back to when a GGUF carries none (its
# load log's `chat template ... source=`): llama-server's built-in (non-Jinja) template and
# llama-cpp-python's chat format. Left alone, a GGUF without a template gets ChatML from
# llama-server and Llama 2's format from llama-cpp-python, so each would read another prompt.
PEER_TEMPLATES = {"DefaultChatml": "chatml", 'Architecture("gemma")': "gemma"}


def template_source(backstop: pathlib.Path, model: pathlib.Path) -> str:
    """Where backstop's chat template for `model` comes from, as its load log names it:
    `Gguf`, `DefaultChatml` or `Architecture("…")`. Starts backstop once (about half a second)."""
    port = free_port()
    probe = Server("template-probe", [str(backstop), "serve", "--host", f"127.0.0.1:{port}",
                                      "--model", f"m={model}", "--parallel", "1"],
                   port, {"BACKSTOP_LOG": "warn,backstop::engine::loader=info"}, ready="/health/ready")
    probe.stop()
    found = re.search(r"chat template .*source=(\S+)", probe.log_path.read_text())
    if not found:
        raise RuntimeError(f"backstop did not say where its chat template comes from: {probe.log_path}")
    return found.group(1)


def peer_template_args(kind: str, source: str) -> list[str]:
    """The flags that give a peer backstop's template: none when the GGUF has its own (every
    server renders that one)."""
    if source == "Gguf":
        return []
    name = PEER_TEMPLATES.get(source)
    if name is None:
        raise RuntimeError(f"no peer template for backstop's {source}: add it to PEER_TEMPLATES")
    if kind == "llama-server":
        return ["--no-jinja", "--chat-template", name]
    return ["--chat_format", name]


def build(with_python: bool) -> None:
    log("==> building backstop (release)")
    # Into the same target folder the binary is then taken from (setup.sh's, by default).
    env = dict(os.environ, CARGO_TARGET_DIR=str(TARGET))
    subprocess.run(["cargo", "build", "--release", "--locked"], cwd=ROOT, check=True, env=env)
    log("==> building the peers (cached after the first time)")
    argv = [str(ROOT / "scripts" / "build-peers.sh")] + (["--python"] if with_python else [])
    subprocess.run(argv, check=True)


def backstop_and_llama_server(model: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, str, str]:
    """Builds both (cached), for a script that puts backstop beside llama-server on `model`:
    backstop's binary, llama-server's, llama-server's version line, and the chat template both
    are to use (see template_source)."""
    build(with_python=False)
    backstop = TARGET / "release" / "backstop"
    llama_server = PEERS / "llama-server"
    version = subprocess.run([str(llama_server), "--version"], capture_output=True, text=True)
    peer_version = (version.stdout + version.stderr).strip().splitlines()[0]
    return backstop, llama_server, peer_version, template_source(backstop, model)


def side_by_side_args(ap: argparse.ArgumentParser, max_tokens: int) -> None:
    """The arguments every script that puts backstop beside llama-server on one model takes."""
    ap.add_argument("--model", default=str(MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=max_tokens)
    ap.add_argument("--ctx", type=int, default=4096, help="context per slot, every server")
    ap.add_argument("--out", default=str(ROOT / "bench-results"))


def serve_side_by_side(kind: str, binary: pathlib.Path, model: pathlib.Path, threads: int | None, parallel: int,
                       ctx: int, template: str, extra: list[str], wrap: list[str] | None = None) -> Server:
    """Starts backstop (a `kind` starting with "backstop") or llama-server on `model` with the
    same threads (each its own default with None), slots, per-slot context and chat template,
    flash attention as backstop's CPU default (off; BACKSTOP_FLASH_ATTENTION=1 turns it on for
    both), plus `extra` arguments; `wrap` goes before the command (`taskset -c 0`, say)."""
    port = free_port()
    name = kind.replace(" ", "").replace("/", "_")  # a name for its log file, whatever paths it has
    told = [] if threads is None else [str(threads)]
    if kind.startswith("backstop"):
        argv = [str(binary), "serve", "--host", f"127.0.0.1:{port}", "--model", f"m={model}",
                *(["--threads"] + told if told else []), "--parallel", str(parallel), "--ctx", str(ctx), *extra]
        return Server(name, (wrap or []) + argv, port, ready="/health/ready")
    fa = os.environ.get("BACKSTOP_FLASH_ATTENTION", "0").lower() in ("1", "true", "on")
    argv = [str(binary), "-m", str(model), *(["-t"] + told if told else []), "-np", str(parallel),
            "-c", str(ctx * parallel), "--host", "127.0.0.1", "--port", str(port), "--alias", "m",
            "--flash-attn", "on" if fa else "off", *peer_template_args("llama-server", template), *extra]
    return Server(name, (wrap or []) + argv, port)


PY_PEER = CACHE / "peers" / "llama-cpp-python-venv"


def pyplot():
    """matplotlib's pyplot, installed into this python's virtual environment the first time it
    is missing there (as build() installs the peers), so the chart needs no step of its own.
    None, having said why, outside a virtual environment (the system's python is not ours to
    change) or when pip fails (no package index)."""
    try:
        import matplotlib
    except ImportError:
        if sys.prefix == sys.base_prefix:
            log("matplotlib is missing and this python is no virtual environment to install it "
                "into: run the script with ~/.cache/backstop/venv/bin/python for the chart")
            return None
        log("==> installing matplotlib for the chart into " + sys.prefix)
        pip = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "matplotlib"]
        if subprocess.run(pip).returncode != 0:
            log("pip could not install matplotlib")
            return None
        # The import system caches what each folder held; pip just added to one.
        importlib.invalidate_caches()
        import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def chart(path: pathlib.Path, fig: dict, title: str) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    kinds = list(fig)
    clients = [1, 4, 8]
    f, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(kinds)
    for i, k in enumerate(kinds):
        xs = [c + (i - (len(kinds) - 1) / 2) * width for c in range(len(clients))]
        ax1.bar(xs, [fig[k][f"agg_{c}"] for c in clients], width, label=k)
        ax2.bar(xs, [fig[k][f"ttft_{c}_p50_ms"] for c in clients], width, label=k)
    for ax, ylabel in ((ax1, "aggregate decode tok/s"), (ax2, "time to first token p50, ms")):
        ax.set_xticks(range(len(clients)), [f"{c} client{'s' if c > 1 else ''}" for c in clients])
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
        ax.legend()
    f.suptitle(title, fontsize=9)
    f.tight_layout()
    f.savefig(path, dpi=120)
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--ctx", type=int, default=4096, help="context per slot, every server")
    ap.add_argument("--no-python-peer", action="store_true", help="leave llama-cpp-python's server out")
    ap.add_argument("--out", default=str(ROOT / "bench-results"))
    args = ap.parse_args()
    model = pathlib.Path(args.model)
    build(not args.no_python_peer)
    backstop = TARGET / "release" / "backstop"
    llama_server = PEERS / "llama-server"
    version = subprocess.run([str(llama_server), "--version"], capture_output=True, text=True)
    peer_version = (version.stdout + version.stderr).strip().splitlines()[0]
    kinds = ["backstop", "llama-server"] + ([] if args.no_python_peer else ["llama-cpp-python"])
    template = template_source(backstop, model)
    log(f"chat template: backstop's {template}; the peers get "
        + (" ".join(peer_template_args("llama-server", template)) or "the GGUF's") + " (llama-server), "
        + (" ".join(peer_template_args("llama-cpp-python", template)) or "the GGUF's") + " (llama-cpp-python)")

    def raw_engine(prompt_tokens: int, parallel: int = 4, prompt: int = 128) -> dict:
        """One repetition of `backstop bench` (after its warm-up): the raw engine's figures,
        decoding at the cache depth the HTTP streams decode at. `backstop bench` generates after
        a 16-token start, so `-d` is the streams' prompt less 16: on the 2-core machine decode
        runs 2-3% slower 64 tokens deeper, which a raw engine decoding from an empty cache
        would count against HTTP."""
        depth = max(prompt_tokens - 16, 0)
        # `bench` takes no environment variable; the server's flash attention, if set, is its.
        fa = os.environ.get("BACKSTOP_FLASH_ATTENTION")
        out = json.loads(subprocess.run(
            [str(backstop), "bench", "--format", "json", "-p", str(prompt), "-n", str(args.max_tokens),
             "-d", str(depth), "-r", "1", "-t", str(args.threads), "--parallel", str(parallel),
             "--ctx", str(args.ctx), *(["--flash-attention", fa] if fa else []), str(model)],
            check=True, capture_output=True, text=True,
        ).stdout)
        return out["results"][0]  # its `depth` is the one asked for

    def start(kind: str, slots: int) -> Server:
        port = free_port()
        if kind == "backstop":
            argv = [str(backstop), "serve", "--host", f"127.0.0.1:{port}", "--model", f"m={model}",
                    "--threads", str(args.threads), "--parallel", str(slots), "--ctx", str(args.ctx)]
            return Server(kind, argv, port, {"BACKSTOP_LOG": "info,llama-cpp-2=info"}, ready="/health/ready")
        if kind == "llama-server":
            argv = [str(llama_server), "-m", str(model), "-t", str(args.threads), "-np", str(slots),
                    "-c", str(args.ctx * slots), "--host", "127.0.0.1", "--port", str(port), "--alias", "m",
                    *peer_template_args(kind, template)]
            return Server(kind, argv, port)
        argv = [str(PY_PEER / "bin" / "python"), "-m", "llama_cpp.server", "--model", str(model),
                "--model_alias", "m", "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
                "--n_ctx", str(args.ctx), "--host", "127.0.0.1", "--port", str(port),
                # by default a new request interrupts the one in flight; queue them instead
                "--interrupt_requests", "False", *peer_template_args(kind, template)]
        return Server(kind, argv, port, ready="/v1/models")

    # One stream each (P1, P2, P5), every server up at once. Taken a minute apart, as the rest
    # of a repetition is, SmolLM2's single streams against llama-server's gave per-repetition
    # ratios from 0.86 to 1.02 on the 2-core VM; taken seconds apart, 1.00 to 1.02.
    ones: dict[str, list[dict]] = {k: [] for k in kinds}
    raws: list[dict] = []
    batched: list[dict] = []  # the raw engine: one stream, then 8 sequences in one batch
    log("==> one stream: every server up at once")
    servers = {kind: start(kind, 4) for kind in kinds}
    try:
        warm = {kind: client(s.url, "m", 1, 1, args) for kind, s in servers.items()}
        # The raw engine decodes at the cache depth backstop's streams decode at.
        prompt_tokens = warm["backstop"]["prompt_tokens"] or 0
        # The same messages must make the same prompt everywhere, or TTFT compares other work.
        read = {kind: prompt_length(s.url) for kind, s in servers.items()}
        if len(set(read.values())) > 1:
            raise RuntimeError(f"the servers read prompts of different lengths, {read} tokens: "
                               "their chat templates differ (see PEER_TEMPLATES)")
        members = kinds + ["raw engine"]
        for rep in range(args.reps):
            log(f"==> rep {rep + 1}/{args.reps}: one stream each")
            for kind in members[rep % len(members):] + members[:rep % len(members)]:
                if kind == "raw engine":
                    raws.append(raw_engine(prompt_tokens))
                    # A run of its own, so that P1's figure comes from the same run as ever
                    # (with `-r 1`, adding 8 sequences to that run moved its one stream by 6%).
                    batched.append(raw_engine(prompt_tokens, parallel=8, prompt=0))
                else:
                    ones[kind].append(client(servers[kind].url, "m", 1, 2, args))
    finally:
        for s in servers.values():
            s.stop()

    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    for rep in range(args.reps):
        # Rotate the servers' order, so whichever runs first (on a warmer or cooler machine)
        # does not bias the comparison.
        order = kinds[rep % len(kinds):] + kinds[:rep % len(kinds)]
        for kind in order:
            log(f"==> rep {rep + 1}/{args.reps}: {kind}")
            nonce = f"{kind}-{rep}-{os.urandom(3).hex()}"
            s = start(kind, 4)
            try:
                one = ones[kind][rep]
                four = client(s.url, "m", 4, 1, args, warmup=1)
                mem = rss(s.proc.pid)
                ready = s.ready_s
                p6 = prefix_reuse(s.url, nonce) if kind != "llama-cpp-python" else None
                # TTFT beside P5: every prompt read afresh (llama.cpp server's cache_prompt:
                # false, which backstop accepts too), and the very same prompt again.
                cold = again = None
                if kind != "llama-cpp-python":
                    cold = client(s.url, "m", 1, 2, args, extra={"cache_prompt": False})
                    again = client(s.url, "m", 1, 2, args, warmup=1, unique=False)
                eight = client(s.url, "m", 8, 1, args) if kind == "llama-cpp-python" else None
            finally:
                s.stop()
            kv = None
            if kind == "backstop":
                m = re.findall(r"KV buffer size =\s+([\d.]+) MiB", s.log_path.read_text())
                kv = sum(float(x) for x in m) * MIB if m else None
            p7 = None
            if kind != "llama-cpp-python":
                log(f"    {kind} with 8 slots")
                s8 = start(kind, 8)
                try:
                    eight = client(s8.url, "m", 8, 1, args)
                    p7 = prefill_fairness(s8.url, nonce, args.max_tokens)
                finally:
                    s8.stop()
            runs[kind].append({"ready_s": ready, "one": one, "four": four, "eight": eight, "rss": mem,
                               "kv_bytes": kv, "p6": p6, "p7": p7, "cold": cold, "again": again})

    def med(kind: str, f) -> float | None:
        v = [f(r) for r in runs[kind]]
        v = [x for x in v if x is not None]
        return statistics.median(v) if v else None

    def spread(kind: str, f) -> list[float] | None:
        v = [x for x in (f(r) for r in runs[kind]) if x is not None]
        return [round(min(v), 3), round(max(v), 3)] if v else None

    kv = statistics.median(r["kv_bytes"] for r in runs["backstop"] if r["kv_bytes"])
    size = model.stat().st_size
    fig = {}
    for kind in runs:
        fig[kind] = {
            "decode_1": med(kind, lambda r: r["one"]["decode_tok_s_per_stream"]["median"]),
            "ttft_1_ms": med(kind, lambda r: r["one"]["ttft_ms"]["p50"]),
            "ready_s": med(kind, lambda r: r["ready_s"]),
            "overhead_mib": med(kind, lambda r: (r["rss"]["VmRSS"] - size - kv) / MIB),
            "p6_first_ms": med(kind, lambda r: r["p6"] and r["p6"]["first_ms"]),
            "p6_second_ms": med(kind, lambda r: r["p6"] and r["p6"]["second_ms"]),
            "p6_ratio": med(kind, lambda r: r["p6"] and r["p6"]["second_ms"] / r["p6"]["first_ms"]),
            "p7_ratio": med(kind, lambda r: r["p7"] and r["p7"]["ratio"]),
            "p7_median_gap_ms": med(kind, lambda r: r["p7"] and r["p7"]["median_gap_ms"]),
            "p7_worst_gap_ms": med(kind, lambda r: r["p7"] and r["p7"]["worst_gap_ms"]),
            "ttft_cold_ms": med(kind, lambda r: r["cold"] and r["cold"]["ttft_ms"]["p50"]),
            "ttft_again_ms": med(kind, lambda r: r["again"] and r["again"]["ttft_ms"]["p50"]),
            "spread": {
                "decode_1": spread(kind, lambda r: r["one"]["decode_tok_s_per_stream"]["median"]),
                "ttft_1_ms": spread(kind, lambda r: r["one"]["ttft_ms"]["p50"]),
                "agg_4": spread(kind, lambda r: r["four"]["aggregate_tok_s"]),
                "agg_8": spread(kind, lambda r: r["eight"]["aggregate_tok_s"]),
            },
        }
        for n, key in ((1, "one"), (4, "four"), (8, "eight")):
            fig[kind][f"agg_{n}"] = med(kind, lambda r: r[key]["aggregate_tok_s"])
            fig[kind][f"ttft_{n}_p50_ms"] = med(kind, lambda r: r[key]["ttft_ms"]["p50"])
            fig[kind][f"ttft_{n}_p95_ms"] = med(kind, lambda r: r[key]["ttft_ms"]["p95"])
            fig[kind][f"decode_{n}_per_stream"] = med(kind, lambda r: r[key]["decode_tok_s_per_stream"]["median"])
    b, p = fig["backstop"], fig["llama-server"]
    def summary(v: list[float]) -> dict:
        return {"median": statistics.median(v), "spread": [round(min(v), 3), round(max(v), 3)]}

    # The raw engine's figures over the repetitions: prompt, one stream, 4 sequences together.
    raw = {key: summary([r[key]["median"] for r in raws]) for key in ("pp", "tg")}
    raw["x4"] = summary([r["parallel"][0]["median"] for r in raws])
    # What 8 sequences together gain over one, in the same run: P4's counterpart without HTTP
    # or prompts. It moves with the machine: from 1.2x to 1.46x within one day on the 2-core VM.
    raw["x8"] = summary([r["parallel"][0]["median"] for r in batched])
    raw["x8_gain"] = summary([r["parallel"][0]["median"] / r["tg"]["median"] for r in batched])
    raw["depth"] = statistics.median_low(r["depth"] for r in raws)
    raw_tg = raw["tg"]["median"]
    # Paired within each repetition (see the top of the file).
    bruns = runs["backstop"]
    p1 = summary([r["one"]["decode_tok_s_per_stream"]["median"] / w["tg"]["median"] for r, w in zip(bruns, raws)])
    p4 = summary([r["eight"]["aggregate_tok_s"] / r["one"]["aggregate_tok_s"] for r in bruns])
    raw["p1_ratio"], fig["backstop"]["p4_ratio"] = p1, p4

    def vs_peer(f) -> dict:
        """backstop over llama-server, the median of the per-repetition ratios."""
        return summary([f(r) / f(q) for r, q in zip(bruns, runs["llama-server"])])

    p2 = vs_peer(lambda r: r["one"]["decode_tok_s_per_stream"]["median"])
    p3 = vs_peer(lambda r: r["four"]["aggregate_tok_s"])
    p5 = vs_peer(lambda r: r["one"]["ttft_ms"]["p50"])
    fig["backstop"]["vs_llama_server"] = {"p2": p2, "p3": p3, "p5": p5}

    def per_rep(s: dict) -> str:
        return f"ratio per rep {s['spread'][0]:.2f}–{s['spread'][1]:.2f}"
    rows = [
        ("P1 single-stream decode vs raw engine", f"{b['decode_1']:.1f} tok/s",
         f"{raw_tg:.1f} tok/s (raw; {per_rep(p1)})", p1["median"], ">= 0.95", p1["median"] >= 0.95),
        ("P2 single-stream decode vs llama-server", f"{b['decode_1']:.1f} tok/s",
         f"{p['decode_1']:.1f} tok/s ({per_rep(p2)})", p2["median"], ">= 1.05", p2["median"] >= 1.05),
        ("P3 aggregate, 4 clients, vs llama-server -np 4", f"{b['agg_4']:.1f} tok/s",
         f"{p['agg_4']:.1f} tok/s ({per_rep(p3)})", p3["median"], ">= 1.2", p3["median"] >= 1.2),
        ("P4 aggregate, 8 clients vs 1 client", f"{b['agg_8']:.1f} tok/s",
         f"{b['agg_1']:.1f} tok/s (1 client; {per_rep(p4)})", p4["median"], ">= 1.5", p4["median"] >= 1.5),
        ("P5 time to first token vs llama-server", f"{b['ttft_1_ms']:.0f} ms",
         f"{p['ttft_1_ms']:.0f} ms ({per_rep(p5)})", p5["median"], "<= 0.8", p5["median"] <= 0.8),
        ("P6 second turn on a 1,000-token history: TTFT vs first turn", f"{b['p6_second_ms']:.0f} ms",
         f"{b['p6_first_ms']:.0f} ms (first turn)", b["p6_ratio"], "<= 0.25", b["p6_ratio"] <= 0.25),
        ("P7 4 streams + a 2,000-token prompt: worst gap vs median", f"{b['p7_worst_gap_ms']:.0f} ms",
         f"{b['p7_median_gap_ms']:.0f} ms (median)", b["p7_ratio"], "<= 4", b["p7_ratio"] <= 4),
        ("P10 RSS minus model file and KV cache", f"{b['overhead_mib']:.1f} MiB", f"{p['overhead_mib']:.1f} MiB",
         b["overhead_mib"] / p["overhead_mib"], "<= 64 MB", b["overhead_mib"] * MIB <= 64e6),
        ("P11 start to ready (/health/ready; llama-server /health)", f"{b['ready_s'] * 1e3:.0f} ms", f"{p['ready_s'] * 1e3:.0f} ms",
         b["ready_s"] / p["ready_s"], "<= 1 s", b["ready_s"] <= 1.0),
    ]
    info = [
        ("aggregate, 8 clients (llama-server -np 8)", f"{b['agg_8']:.1f} tok/s", f"{p['agg_8']:.1f} tok/s", b["agg_8"] / p["agg_8"]),
        ("TTFT p95 with 4 clients", f"{b['ttft_4_p95_ms']:.0f} ms", f"{p['ttft_4_p95_ms']:.0f} ms", b["ttft_4_p95_ms"] / p["ttft_4_p95_ms"]),
        ("P6 ratio, llama-server (its own prompt cache)", f"{b['p6_ratio']:.2f}", f"{p['p6_ratio']:.2f}", b["p6_ratio"] / p["p6_ratio"]),
        ("P7 ratio, llama-server", f"{b['p7_ratio']:.2f}", f"{p['p7_ratio']:.2f}", b["p7_ratio"] / p["p7_ratio"]),
        ("TTFT, prompt read afresh (cache_prompt: false)", f"{b['ttft_cold_ms']:.0f} ms", f"{p['ttft_cold_ms']:.0f} ms",
         b["ttft_cold_ms"] / p["ttft_cold_ms"]),
        ("TTFT, the same prompt again", f"{b['ttft_again_ms']:.1f} ms", f"{p['ttft_again_ms']:.1f} ms",
         b["ttft_again_ms"] / p["ttft_again_ms"]),
        ("raw engine: 4 sequences in one batch", f"{raw['x4']['median']:.1f} tok/s", "", None),
        ("raw engine: 8 sequences in one batch vs 1 (compare P4)", f"{raw['x8']['median']:.1f} tok/s",
         f"one: {statistics.median(r['tg']['median'] for r in batched):.1f} tok/s ({per_rep(raw['x8_gain'])})",
         raw["x8_gain"]["median"]),
        (f"raw engine: pp128 @ d{raw['depth']}", f"{raw['pp']['median']:.1f} tok/s", "", None),
    ]
    if "llama-cpp-python" in fig and not fig["llama-cpp-python"]["agg_1"]:
        # It ignores ignore_eos: a model that ends its answer at once (Gemma on this prompt)
        # streams no text there, so there is nothing to compare.
        print("llama-cpp-python streamed no text (it ignores ignore_eos); left out of the tables",
              file=sys.stderr)
        del fig["llama-cpp-python"]
    if "llama-cpp-python" in fig:
        q = fig["llama-cpp-python"]
        for n in (1, 4, 8):
            info.append((f"aggregate, {n} client{'s' if n > 1 else ''} vs llama-cpp-python", f"{b[f'agg_{n}']:.1f} tok/s",
                         f"{q[f'agg_{n}']:.1f} tok/s", b[f"agg_{n}"] / q[f"agg_{n}"]))
        info.append(("TTFT p50 with 4 clients vs llama-cpp-python", f"{b['ttft_4_p50_ms']:.0f} ms",
                     f"{q['ttft_4_p50_ms']:.0f} ms", b["ttft_4_p50_ms"] / q["ttft_4_p50_ms"]))
    machine = {"nproc": os.cpu_count(), "cpu": cpu_model(), "threads": args.threads}
    title = (f"{machine['nproc']} cores, {machine['cpu']}; threads {args.threads}; model {model.name}; "
             f"{args.max_tokens} tokens per request; median of {args.reps} rotated runs")
    print(f"\nmachine: {title}")
    print(f"peers: llama-server {peer_version}" + ("" if args.no_python_peer else
          f"; llama-cpp-python {(PY_PEER / 'STAMP').read_text().strip()}") + "\n")
    print("| measure | backstop | peer | ratio | target | pass |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, bv, pv, ratio, target, ok in rows:
        print(f"| {name} | {bv} | {pv} | {ratio:.2f}x | {target} | {'pass' if ok else 'FAIL'} |")
    for name, bv, pv, ratio in info:
        print(f"| {name} | {bv} | {pv} | {'' if ratio is None else f'{ratio:.2f}x'} | (info) | |")
    print("\n| server | clients | decode tok/s per stream | TTFT p50 | TTFT p95 | aggregate tok/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for kind in fig:
        for n in (1, 4, 8):
            f = fig[kind]
            print(f"| {kind} | {n} | {f[f'decode_{n}_per_stream']:.1f} | {f[f'ttft_{n}_p50_ms']:.0f} ms "
                  f"| {f[f'ttft_{n}_p95_ms']:.0f} ms | {f[f'agg_{n}']:.1f} |")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"peers-{time.strftime('%Y%m%d-%H%M%S')}"
    stem.with_suffix(".json").write_text(json.dumps({
        "machine": machine, "model": str(model), "max_tokens": args.max_tokens, "reps": args.reps,
        "peer_version": peer_version, "raw": raw, "figures": fig,
        "targets": [{"measure": r[0], "backstop": r[1], "peer": r[2], "ratio": r[3], "target": r[4], "pass": r[5]} for r in rows],
        "runs": runs,
    }, indent=1))
    print(f"\nwrote {stem.with_suffix('.json')}")
    if chart(stem.with_suffix(".png"), fig, title):
        print(f"wrote {stem.with_suffix('.png')}")
    else:
        print("no chart: no matplotlib (why is above)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
