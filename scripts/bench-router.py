#!/usr/bin/env python3
"""backstop's router side by side with LiteLLM proxy, in one run (BENCH.md, targets P8 and P9).

P8, router overhead: a fake cloud that answers at once (the `fake_cloud` example), reached
three ways with the same request (non-streamed chat, small body), 16 concurrent keep-alive
clients: (a) direct, (b) through backstop (`[[router.upstreams]]` kind openai, fallback
smollm2), (c) through LiteLLM proxy (the same upstream, a fallback to backstop's local model).
Added latency p50/p99 of (b) and (c) over (a), and requests/s of each. Each repetition runs
the three paths in ABBA order (a b c, then c b a, ...) after a warm-up; every figure is the
median over --reps. Each path runs long enough for --min-requests per repetition (at least
--min-seconds). Unloaded latency (1 client) is measured alongside, as information.

P9, failover: the fake cloud refuses connections. Time to first token (streamed) of a request
for `gpt-4o-mini` through backstop (it fails over to the local model) vs. the same request for
`smollm2` (local only), interleaved, median over --ttft-requests each; with the breaker closed
(`failures` very high: every request tries the cloud first) and open (after it opened: no
attempt). LiteLLM's failover time to first token in the same outage, through its fallback,
is measured too, as information.

Load generator: wrk (Debian's `wrk`, C, epoll, one thread, --clients connections, a Lua
script for the POST body). A Python client saturates long before backstop does on a small
machine, which would make the proxies look alike; the direct path's req/s is printed as the
client's ceiling and must stay well above the proxies'. P9 sends one request at a time, so
it uses Python's http.client (the same client for every arm).

    scripts/bench-router.py [--quick] [--reps 6] [--clients 16] [--min-requests 2000]
                            [--backstop BIN] [--fake-cloud BIN] [--model GGUF]

The machine is shared: the script measures how much CPU other processes took during every
P8 run and P9 series (/proc/stat minus its own processes), reports it, and runs a rep or a
series again (--redo-noisy) when that was over 10%; --wait-idle waits for quiet first.

Binaries: --backstop/--fake-cloud, else /tmp/bench-bin/{backstop,fake_cloud} when present,
else ${CARGO_TARGET_DIR:-~/.cache/backstop/target}/release/backstop and
.../release/examples/fake_cloud (nothing is built here: `cargo build --release --example
fake_cloud`). LiteLLM is installed on first use into ${BACKSTOP_CACHE:-~/.cache/backstop}/
litellm-venv (pinned below). Everything listens on free 127.0.0.1 ports and is stopped on
exit, errors and Ctrl-C. Prints a markdown table and writes bench-results/router-<ts>.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import pathlib
import platform
import re
import selectors
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
CACHE = pathlib.Path(os.environ.get("BACKSTOP_CACHE", pathlib.Path.home() / ".cache" / "backstop"))
TARGET = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", CACHE / "target"))
MODELS = pathlib.Path(os.environ.get("BACKSTOP_MODELS", CACHE / "models"))
PREBUILT = pathlib.Path("/tmp/bench-bin")

# Pinned. Releases 1.82.7/1.82.8 (March 2026) and 1.107.0 of the litellm package were
# reported compromised on PyPI; this one predates them. Change deliberately, not by drift.
LITELLM_VERSION = "1.81.13"
LITELLM_VENV = CACHE / "litellm-venv"

CLOUD_MODEL = "gpt-4o-mini"
LOCAL_MODEL = "smollm2"
# P8's request: small, non-streamed, the same bytes on every path.
P8_BODY = json.dumps({
    "model": CLOUD_MODEL,
    "messages": [{"role": "user", "content": "Say hello in one short sentence."}],
    "max_tokens": 16,
}, separators=(",", ":"))

T0 = time.perf_counter()
NOISY = 0.10  # share of the machine used by other work above which a P8 rep is run again


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


def loadavg() -> list[float] | None:
    try:
        return [float(x) for x in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        return None


def cpu_busy(seconds: float = 1.0) -> float | None:
    """Fraction of all cores busy over `seconds` (from /proc/stat), before we start anything."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait
    try:
        t0, i0 = snap()
        time.sleep(seconds)
        t1, i1 = snap()
    except OSError:
        return None
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def cpu_account() -> tuple[float, float, float] | None:
    """(wall s, machine busy CPU-s, CPU-s of this script, its reaped children and the live
    processes of the sessions it started): the gap between the two CPU figures over a span is
    what other work on the machine used in it."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    hz = os.sysconf("SC_CLK_TCK")
    t = os.times()
    ours = t.user + t.system + t.children_user + t.children_system
    sessions = {p.proc.pid for p in Proc.ALL}
    if sessions:
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat") as f:
                    raw = f.read()
            except OSError:
                continue
            fields = raw[raw.rindex(")") + 2:].split()  # fields 3.. of proc(5)
            if int(fields[3]) in sessions:  # session; then utime, stime, cutime, cstime
                ours += sum(int(x) for x in fields[11:15]) / hz
    return time.monotonic(), (sum(v[:8]) - v[3] - v[4]) / hz, ours


def foreign_share(a0, a1) -> float | None:
    """The share of the machine that other work used between two cpu_account() readings."""
    if not (a0 and a1) or a1[0] <= a0[0]:
        return None
    foreign = max(0.0, (a1[1] - a0[1]) - (a1[2] - a0[2]))
    return round(foreign / ((a1[0] - a0[0]) * (os.cpu_count() or 1)), 3)


def wait_quiet(limit_s: float) -> float | None:
    """Waits up to limit_s for the machine to be mostly idle (other work skews every figure
    here: llama.cpp's threads and the proxies share the cores); returns the last busy share."""
    t0 = time.perf_counter()
    busy = cpu_busy()
    while busy is not None and busy > 0.15 and time.perf_counter() - t0 < limit_s:
        log(f"    the machine is {busy:.0%} busy before we start; waiting (--wait-idle {limit_s:.0f})")
        time.sleep(4)
        busy = cpu_busy()
    if busy is not None and busy > 0.15:
        log(f"WARNING: the machine is {busy:.0%} busy with other work: figures will be noisy")
    return busy


def fmt_pct(x) -> str:
    return "?" if x is None else f"{x:.0%}"


def percentile(values: list[float], p: float) -> float | None:
    """Linear-interpolated percentile (p in 0..100); None for an empty list."""
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def summary(values: list[float], nd: int = 3) -> dict:
    """Median, p50/p90/p99, spread (min, max), mean and stdev of some samples."""
    if not values:
        return {"n": 0}

    def r(x):
        return None if x is None else round(x, nd)
    return {
        "n": len(values), "median": r(statistics.median(values)), "p50": r(percentile(values, 50)),
        "p90": r(percentile(values, 90)), "p99": r(percentile(values, 99)),
        "min": r(min(values)), "max": r(max(values)), "spread": [r(min(values)), r(max(values))],
        "mean": r(statistics.fmean(values)),
        "stdev": r(statistics.stdev(values)) if len(values) > 1 else 0.0,
    }


# ---------------------------------------------------------------------------------------------
# processes


class Proc:
    """A child process in its own session (so Ctrl-C reaches us, not it, and we stop its whole
    group: LiteLLM's workers included), logging to a file."""

    ALL: list["Proc"] = []

    def __init__(self, name: str, argv: list[str], workdir: pathlib.Path, env: dict | None = None,
                 stdout=None):
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=stdout if stdout is not None else self._log,
            stderr=self._log, env={**os.environ, **(env or {})}, start_new_session=True,
        )
        Proc.ALL.append(self)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self in Proc.ALL:
            Proc.ALL.remove(self)
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        else:
            # the leader is gone; its group (workers) may not be
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._log.close()

    @staticmethod
    def stop_all() -> None:
        for p in reversed(list(Proc.ALL)):
            try:
                p.stop()
            except Exception as e:  # keep stopping the others
                print(f"stopping {p.name}: {e!r}", file=sys.stderr)


def http_json(method: str, url: str, body: dict | None = None, timeout: float = 10.0):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, dict(e.headers), json.loads(raw)
        except ValueError:
            return e.code, dict(e.headers), raw.decode("utf-8", "replace")


def wait_ready(p: Proc, url: str, timeout: float) -> float:
    t0 = time.perf_counter()
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return time.perf_counter() - t0
        except Exception:
            pass
        if not p.alive():
            raise RuntimeError(f"{p.name} exited with status {p.proc.returncode}:\n{p.tail()}")
        if time.perf_counter() - t0 > timeout:
            raise RuntimeError(f"{p.name} not ready at {url} after {timeout:.0f} s:\n{p.tail()}")
        time.sleep(0.05)


class FakeCloud:
    def __init__(self, binary: pathlib.Path, workdir: pathlib.Path):
        self.p = Proc("fake_cloud", [str(binary)], workdir, stdout=subprocess.PIPE)
        lines: list[str] = []
        buf = b""
        sel = selectors.DefaultSelector()
        sel.register(self.p.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + 20
        while len(lines) < 2:
            if time.monotonic() > deadline or not sel.select(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"fake_cloud printed no URLs within 20 s:\n{self.p.tail()}")
            chunk = os.read(self.p.proc.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError(f"fake_cloud exited:\n{self.p.tail()}")
            buf += chunk
            *done, buf = buf.split(b"\n")
            lines += [x.decode().strip() for x in done]
        sel.close()
        self.base, self.control = lines[0], lines[1]
        self.v1 = self.base + "/v1"

    def set(self, **kw) -> dict:
        status, _, body = http_json("POST", self.control + "/_control", kw)
        if status != 200:
            raise RuntimeError(f"fake_cloud control {kw}: HTTP {status} {body}")
        return body

    def requests(self) -> int:
        return int(http_json("GET", self.control + "/_control")[2]["requests"])


def backstop_config(model: pathlib.Path, fake_v1: str, failures: int, cooldown: str) -> str:
    return f"""# generated by scripts/bench-router.py
[models.{LOCAL_MODEL}]
path = "{model}"

[router]
mode = "cloud-first"

[router.breaker]
failures = {failures}
cooldown = "{cooldown}"

[[router.upstreams]]
name = "fake"
kind = "openai"
base_url = "{fake_v1}"
models = ["{CLOUD_MODEL}"]
fallback = "{LOCAL_MODEL}"
"""


class Backstop:
    def __init__(self, binary: pathlib.Path, name: str, config: str, workdir: pathlib.Path, env: dict):
        self.config_text = config
        cfg = workdir / f"{name}.toml"
        cfg.write_text(config)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.p = Proc(name, [str(binary), "serve", "--config", str(cfg), "--host", f"127.0.0.1:{self.port}"],
                      workdir, env)
        self.ready_s = wait_ready(self.p, self.url + "/health", 120)

    def breaker(self) -> str:
        return http_json("GET", self.url + "/admin/router")[2]["upstreams"][0]["breaker"]


def litellm_yaml(fake_v1: str, backstop_v1: str) -> str:
    return f"""# generated by scripts/bench-router.py: LiteLLM proxy at its leanest (no database, no master
# key, no callbacks, no telemetry, no UI, no retries, access log off), one cloud deployment and
# a fallback to the local model through backstop's OpenAI API.
model_list:
  - model_name: {CLOUD_MODEL}
    litellm_params:
      model: openai/{CLOUD_MODEL}
      api_base: {fake_v1}
      api_key: sk-bench-dummy
  - model_name: {LOCAL_MODEL}
    litellm_params:
      model: openai/{LOCAL_MODEL}
      api_base: {backstop_v1}
      api_key: sk-bench-dummy
litellm_settings:
  telemetry: false
  callbacks: []
  success_callback: []
  failure_callback: []
  turn_off_message_logging: true
  drop_params: true
  num_retries: 0
  request_timeout: 60
router_settings:
  num_retries: 0
  fallbacks: [{{"{CLOUD_MODEL}": ["{LOCAL_MODEL}"]}}]
general_settings:
  disable_spend_logs: true
  disable_error_logs: true
  disable_spend_updates: true
  disable_reset_budget: true
  disable_adding_master_key_hash_to_db: true
"""


LITELLM_LOG_CONFIG = {
    "version": 1, "disable_existing_loggers": False,
    "handlers": {"null": {"class": "logging.NullHandler"},
                 "err": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr"}},
    "loggers": {"uvicorn.access": {"handlers": ["null"], "level": "CRITICAL", "propagate": False},
                "uvicorn": {"handlers": ["err"], "level": "WARNING", "propagate": False},
                "uvicorn.error": {"handlers": ["err"], "level": "INFO", "propagate": False}},
}
LITELLM_ENV = {
    "LITELLM_LOG": "ERROR",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch of the price list at start
    "DISABLE_ADMIN_UI": "True",
    "NO_DOCS": "True",
    "NO_REDOC": "True",
    "LITELLM_MODE": "PRODUCTION",  # no .env loading
}


def ensure_litellm() -> tuple[pathlib.Path, str]:
    py = LITELLM_VENV / "bin" / "python"
    exe = LITELLM_VENV / "bin" / "litellm"

    def installed() -> str | None:
        if not (py.exists() and exe.exists()):
            return None
        r = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
                           capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    have = installed()
    if have != LITELLM_VERSION:
        log(f"==> installing litellm[proxy]=={LITELLM_VERSION} into {LITELLM_VENV} (have: {have or 'none'})")
        if not py.exists():
            subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", f"litellm[proxy]=={LITELLM_VERSION}"], check=True)
        have = installed()
        if have != LITELLM_VERSION:
            sys.exit(f"litellm {LITELLM_VERSION} did not install into {LITELLM_VENV} (found {have})")
    return exe, have


class LiteLLM:
    def __init__(self, exe: pathlib.Path, fake_v1: str, backstop_v1: str, workers: int, workdir: pathlib.Path):
        self.config_text = litellm_yaml(fake_v1, backstop_v1)
        cfg = workdir / "litellm.yaml"
        cfg.write_text(self.config_text)
        logcfg = workdir / "litellm-logging.json"
        logcfg.write_text(json.dumps(LITELLM_LOG_CONFIG))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = [str(exe), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(self.port),
                     "--num_workers", str(workers), "--telemetry", "False", "--log_config", str(logcfg)]
        self.p = Proc("litellm", self.argv, workdir, LITELLM_ENV)
        self.ready_s = wait_ready(self.p, self.url + "/health/liveliness", 180)


# ---------------------------------------------------------------------------------------------
# P8: wrk

WRK_LUA = r"""
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench-dummy"
wrk.body = os.getenv("BENCH_BODY")
function done(summary, latency, requests)
  local p = {}
  for _, q in ipairs({50, 90, 99, 99.9}) do
    p[#p + 1] = string.format('"p%s":%d', tostring(q), latency:percentile(q))
  end
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"min":%d,"max":%d,"mean":%.1f,"stdev":%.1f,%s}}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.max, latency.mean, latency.stdev, table.concat(p, ",")))
end
"""


def wrk_run(wrk: str, lua: pathlib.Path, url: str, clients: int, threads: int, seconds: float) -> dict:
    secs = max(1, math.ceil(seconds))
    cmd = [wrk, f"-t{min(threads, clients)}", f"-c{clients}", f"-d{secs}s", "--timeout", "10s",
           "-s", str(lua), url + "/v1/chat/completions"]
    a0 = cpu_account()
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "BENCH_BODY": P8_BODY},
                         timeout=secs + 60)
    a1 = cpu_account()
    m = re.search(r"^BENCHJSON (.*)$", out.stdout, re.M)
    if out.returncode != 0 or not m:
        raise RuntimeError(f"wrk failed ({out.returncode}): {' '.join(cmd)}\n{out.stdout}\n{out.stderr}")
    r = json.loads(m.group(1))
    errs = sum(r["errors"].values())
    if errs or r["requests"] == 0:
        raise RuntimeError(f"wrk against {url}: {r['requests']} requests, errors {r['errors']}")
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    r["foreign_cpu_share"] = foreign_share(a0, a1)
    r["clients"] = clients
    r["seconds"] = secs
    return r


# ---------------------------------------------------------------------------------------------
# P9: one streamed request at a time, time to the first content delta


class Streamer:
    """A keep-alive HTTP/1.1 connection for streamed chat requests."""

    def __init__(self, base_url: str):
        host, port = base_url.split("//", 1)[1].split(":")
        self.host, self.port = host, int(port)
        self.conn: http.client.HTTPConnection | None = None

    def ttft(self, model: str, prompt: str, max_tokens: int) -> dict:
        body = json.dumps({"model": model, "stream": True, "temperature": 0, "max_tokens": max_tokens,
                           "messages": [{"role": "user", "content": prompt}]})
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
                self.conn.connect()
                self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t0 = time.perf_counter()
            try:
                self.conn.request("POST", "/v1/chat/completions", body=body,
                                  headers={"Content-Type": "application/json",
                                           "Authorization": "Bearer sk-bench-dummy"})
                resp = self.conn.getresponse()
                break
            except (http.client.RemoteDisconnected, ConnectionError, BrokenPipeError):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
        t_head = time.perf_counter()
        headers = {k.lower(): v for k, v in resp.getheaders()}
        if resp.status != 200:
            text = resp.read()[:500].decode("utf-8", "replace")
            self.conn.close()
            self.conn = None
            raise RuntimeError(f"{model}: HTTP {resp.status}: {text}")
        t_first = None
        text = ""
        done = False
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                continue
            obj = json.loads(data)
            if "error" in obj:
                raise RuntimeError(f"{model}: stream error {obj['error']}")
            for ch in obj.get("choices") or []:
                c = (ch.get("delta") or {}).get("content")
                if c:
                    if t_first is None:
                        t_first = time.perf_counter()
                    text += c
        t_end = time.perf_counter()
        if resp.will_close:
            self.conn.close()
            self.conn = None
        if t_first is None or not done:
            raise RuntimeError(f"{model}: stream without content or [DONE] (headers {headers})")
        return {"ttft_ms": (t_first - t0) * 1e3, "headers_ms": (t_head - t0) * 1e3,
                "total_ms": (t_end - t0) * 1e3, "text": text,
                "backend": headers.get("x-backstop-backend"), "failover": headers.get("x-backstop-failover"),
                "litellm_fallbacks": headers.get("x-litellm-attempted-fallbacks"),
                "litellm_api_base": headers.get("x-litellm-model-api-base")}

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def ttft_series(arms: dict[str, tuple[Streamer, str]], n: int, warmup: int, max_tokens: int,
                check) -> dict[str, list[dict]]:
    """n rounds after `warmup` uncounted ones; each round sends one request per arm, always in
    the same rotation (A B C A B C ...), so every request follows one of another arm and drift
    hits all arms alike. Every prompt is unique and of the same length, starting with its arm
    (`Arm K, request NNNN: ...`), so the prefix a slot has cached for it is the same for every
    arm: the chat template plus its own arm's previous `Arm K, request 00..`. Not ABBA: a
    request right after one of its own arm would find more of its prompt cached (a few tokens,
    ~25 ms of prefill here) than one after another arm's, and ABBA pairs arms unevenly. Nor
    one prompt shared by the arms of a round: the second would find it whole in the KV cache
    and skip its prefill."""
    names = list(arms)
    out: dict[str, list[dict]] = {a: [] for a in names}
    out_warm: dict[str, list[dict]] = {a: [] for a in names}
    a0 = None
    for i in range(-warmup, n):
        if i == 0:
            a0 = cpu_account()
        for a in names:
            s, model = arms[a]
            prompt = f"Arm {names.index(a)}, request {i + warmup:04d}: say hello in one short sentence."
            rec = s.ttft(model, prompt, max_tokens)
            check(a, rec)
            rec["round"] = i
            (out[a] if i >= 0 else out_warm[a]).append(rec)
    out["_warmup"] = out_warm  # type: ignore[assignment]
    out["_foreign_cpu_share"] = foreign_share(a0, cpu_account())  # type: ignore[assignment]
    return out


# ---------------------------------------------------------------------------------------------


def find_binary(given: str | None, prebuilt: str, built: pathlib.Path, what: str) -> pathlib.Path:
    if given:
        p = pathlib.Path(given)
    elif (PREBUILT / prebuilt).exists():
        p = PREBUILT / prebuilt
    else:
        p = built
    if not (p.is_file() and os.access(p, os.X_OK)):
        sys.exit(f"{what} not found or not executable: {p}\n"
                 f"  build it (cargo build --release{' --example fake_cloud' if 'fake' in prebuilt else ''}) "
                 f"or pass --{'fake-cloud' if 'fake' in prebuilt else 'backstop'} BIN")
    return p


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backstop", help="backstop binary")
    ap.add_argument("--fake-cloud", help="fake_cloud example binary")
    ap.add_argument("--model", default=str(MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"), help="local model GGUF")
    ap.add_argument("--quick", action="store_true", help="a short smoke run (2 reps, few requests)")
    ap.add_argument("--reps", type=int, help="P8 repetitions (default 6; --quick 2)")
    ap.add_argument("--clients", type=int, default=16, help="P8 concurrent keep-alive connections")
    ap.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (the machine may have 2 cores)")
    ap.add_argument("--min-requests", type=int, help="P8 requests per path per rep, at least (default 2000; --quick 300)")
    ap.add_argument("--min-seconds", type=float, help="P8 seconds per path per rep, at least (default 3; --quick 1)")
    ap.add_argument("--single-seconds", type=float, help="P8 1-client (unloaded) run per path per rep (default 2; --quick 1)")
    ap.add_argument("--ttft-requests", type=int, help="P9 requests per arm (default 40; --quick 6)")
    ap.add_argument("--ttft-max-tokens", type=int, default=8, help="P9 max_tokens per request")
    ap.add_argument("--litellm-workers", type=int, default=os.cpu_count() or 1,
                    help="LiteLLM uvicorn workers (default: nproc, its best on this machine)")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                    help="wait up to this long for other work on the machine to stop before starting")
    ap.add_argument("--redo-noisy", type=int, default=None, metavar="N",
                    help=f"run a P8 rep or a P9 series again when other work took over {NOISY:.0%} of the CPU "
                         "during it (after waiting up to 300 s for quiet), at most N times in all (default 10; --quick 0)")
    ap.add_argument("--out", default=str(ROOT / "bench-results"))
    args = ap.parse_args()
    q = args.quick
    reps = args.reps or (2 if q else 6)
    min_requests = args.min_requests or (300 if q else 2000)
    min_seconds = args.min_seconds or (1.0 if q else 3.0)
    single_seconds = args.single_seconds or (1.0 if q else 2.0)
    ttft_n = args.ttft_requests or (6 if q else 40)
    warm_s = 1.0 if q else 3.0
    if args.redo_noisy is None:
        args.redo_noisy = 0 if q else 10
    command = shlex.join([sys.argv[0]] + sys.argv[1:])

    backstop_bin = find_binary(args.backstop, "backstop", TARGET / "release" / "backstop", "backstop")
    fake_bin = find_binary(args.fake_cloud, "fake_cloud", TARGET / "release" / "examples" / "fake_cloud", "fake_cloud")
    model = pathlib.Path(args.model).expanduser()
    if not model.is_file():
        sys.exit(f"model not found: {model} (scripts/fetch-models.sh fetches it)")
    wrk = shutil.which("wrk")
    if not wrk:
        sys.exit("wrk not found: apt-get install wrk (the P8 load generator)")
    litellm_exe, litellm_version = ensure_litellm()

    def version(argv: list[str]) -> str:
        r = subprocess.run(argv, capture_output=True, text=True)
        return ((r.stdout + r.stderr).strip().splitlines() or ["?"])[0]

    versions = {
        "backstop": version([str(backstop_bin), "--version"]),
        "backstop_binary": str(backstop_bin),
        "fake_cloud_binary": str(fake_bin),
        "litellm": litellm_version,
        "wrk": version([wrk, "-v"]).split(" Copyright")[0],
        "python": platform.python_version(),
        "kernel": platform.release(),
    }
    busy = wait_quiet(args.wait_idle)
    acct0 = cpu_account()
    machine = {"nproc": os.cpu_count(), "cpu": cpu_model(), "loadavg_start": loadavg(),
               "busy_before_start": None if busy is None else round(busy, 3)}
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="bench-router-"))
    lua = workdir / "post.lua"
    lua.write_text(WRK_LUA)
    log(f"==> logs and generated configs in {workdir}")

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)

    result: dict = {"command": command, "machine": machine, "versions": versions, "workdir": str(workdir)}
    try:
        # ------------------------------------------------------------------ processes
        fake = FakeCloud(fake_bin, workdir)
        log(f"fake cloud at {fake.base} (control {fake.control})")
        bs_env = {}  # backstop's default log level: what a user runs (no per-request lines on success)
        bs_closed = Backstop(backstop_bin, "backstop-closed",
                             backstop_config(model, fake.v1, 1_000_000_000, "1h"), workdir, bs_env)
        log(f"backstop at {bs_closed.url} (ready in {bs_closed.ready_s * 1e3:.0f} ms)")
        ll = LiteLLM(litellm_exe, fake.v1, bs_closed.url + "/v1", args.litellm_workers, workdir)
        log(f"litellm {litellm_version} at {ll.url} ({args.litellm_workers} workers, ready in {ll.ready_s:.1f} s)")
        result["configs"] = {"backstop": bs_closed.config_text, "litellm": ll.config_text,
                             "litellm_argv": ll.argv, "litellm_env": LITELLM_ENV,
                             "litellm_log_config": LITELLM_LOG_CONFIG}

        # sanity: each path answers, from the cloud
        for name, url in (("backstop", bs_closed.url), ("litellm", ll.url)):
            st, hd, body = http_json("POST", url + "/v1/chat/completions", json.loads(P8_BODY))
            content = (body or {}).get("choices", [{}])[0].get("message", {}).get("content", "") if st == 200 else ""
            if st != 200 or not content.startswith("cloud says"):
                raise RuntimeError(f"{name} did not answer from the fake cloud: {st} {hd} {body}")
        if http_json("GET", bs_closed.url + "/admin/router")[2]["upstreams"][0]["breaker"] != "closed":
            raise RuntimeError("backstop's breaker is not closed at start")

        # ------------------------------------------------------------------ P8
        paths = {"direct": fake.base, "backstop": bs_closed.url, "litellm": ll.url}
        log(f"==> P8 warm-up ({warm_s:.0f} s per path, {args.clients} clients)")
        dur: dict[str, float] = {}
        warm = {}
        for name, url in paths.items():
            w = wrk_run(wrk, lua, url, args.clients, args.wrk_threads, warm_s)
            warm[name] = w
            dur[name] = min(60.0, max(min_seconds, 1.15 * min_requests / w["rps"]))
            log(f"    {name}: {w['rps']:.0f} req/s -> {math.ceil(dur[name])} s per rep")
        p8: dict[str, list[dict]] = {n: [] for n in paths}
        p8_single: dict[str, list[dict]] = {n: [] for n in paths}
        discarded: list[dict] = []
        rep = 0
        redo_left = args.redo_noisy
        while rep < reps:
            order = list(paths) if rep % 2 == 0 else list(paths)[::-1]
            got: dict[str, tuple[dict, dict]] = {}
            for name in order:
                before = fake.requests()
                r = wrk_run(wrk, lua, paths[name], args.clients, args.wrk_threads, dur[name])
                r["fake_requests"] = fake.requests() - before
                if r["fake_requests"] < r["requests"]:
                    raise RuntimeError(f"{name}: {r['requests']} answers but the fake cloud saw only "
                                       f"{r['fake_requests']} requests (not answered by the cloud?)")
                s = wrk_run(wrk, lua, paths[name], 1, 1, single_seconds)
                got[name] = (r, s)
                log(f"    rep {rep + 1}/{reps} {name:8s}: {r['rps']:8.0f} req/s  p50 {r['latency_us']['p50']:7d} us"
                    f"  p99 {r['latency_us']['p99']:7d} us  ({r['requests']} req) | 1 client p50 "
                    f"{s['latency_us']['p50']} us | other work {fmt_pct(r['foreign_cpu_share'])} of the CPU")
            noisy = max((r["foreign_cpu_share"] or 0.0) for r, _ in got.values())
            if noisy > NOISY and redo_left > 0:
                redo_left -= 1
                log(f"    rep {rep + 1}: other work took {noisy:.0%} of the CPU during it; discarded, "
                    f"waiting for quiet and running it again ({redo_left} redo(s) left)")
                discarded.append({"rep": rep, "runs": {n: r for n, (r, _) in got.items()}})
                wait_quiet(max(300.0, args.wait_idle))
                continue
            for name, (r, s) in got.items():
                p8[name].append(r)
                p8_single[name].append(s)
            rep += 1

        def added(path: str, key: str, runs=p8) -> list[float]:
            """Per-rep added latency (ms) of a path over the direct one in the same rep."""
            return [(runs[path][i]["latency_us"][key] - runs["direct"][i]["latency_us"][key]) / 1e3
                    for i in range(reps)]

        fig8 = {}
        for name in paths:
            fig8[name] = {
                "rps": summary([r["rps"] for r in p8[name]], 1),
                "p50_ms": summary([r["latency_us"]["p50"] / 1e3 for r in p8[name]]),
                "p99_ms": summary([r["latency_us"]["p99"] / 1e3 for r in p8[name]]),
                "requests_per_rep": [r["requests"] for r in p8[name]],
                "single_client_p50_ms": summary([r["latency_us"]["p50"] / 1e3 for r in p8_single[name]]),
                "single_client_p99_ms": summary([r["latency_us"]["p99"] / 1e3 for r in p8_single[name]]),
                "single_client_rps": summary([r["rps"] for r in p8_single[name]], 1),
            }
            if name != "direct":
                fig8[name]["added_p50_ms"] = summary(added(name, "p50"))
                fig8[name]["added_p99_ms"] = summary(added(name, "p99"))
                fig8[name]["single_client_added_p50_ms"] = summary(added(name, "p50", p8_single))
        result["p8"] = {"discarded_noisy_reps": discarded, "clients": args.clients, "wrk_threads": args.wrk_threads, "reps": reps,
                        "seconds_per_rep": {k: math.ceil(v) for k, v in dur.items()},
                        "body": P8_BODY, "figures": fig8, "warmup": warm, "runs": p8, "single_client_runs": p8_single}

        # ------------------------------------------------------------------ P9
        p9_discarded: list[dict] = []

        def series(label: str, arms: dict, check) -> dict:
            """ttft_series, run again (budget shared with P8) when other work was busy during it."""
            nonlocal redo_left
            while True:
                out = ttft_series(arms, ttft_n, 5, args.ttft_max_tokens, check)
                share = out.get("_foreign_cpu_share") or 0.0
                if share <= NOISY or redo_left <= 0:
                    return out
                redo_left -= 1
                log(f"    {label}: other work took {share:.0%} of the CPU during it; discarded, waiting for "
                    f"quiet and running it again ({redo_left} redo(s) left)")
                p9_discarded.append({"series": label, "foreign_cpu_share": share})
                wait_quiet(max(300.0, args.wait_idle))

        fake.set(mode="refuse")
        # The fake resets the connections backstop keeps alive from P8 when it starts refusing,
        # but each reset lands when that connection's task next runs: a request sent at once
        # may still go out on one of them and fail as `broken` (the connection closed before
        # an answer) instead of being refused. Let the resets land first.
        time.sleep(0.5)
        log(f"==> P9 failover: fake cloud refusing; breaker closed (failures = 1e9), {ttft_n} requests per arm")

        def check_closed(arm: str, rec: dict) -> None:
            if arm == "failover" and (rec["backend"] != "local" or rec["failover"] != "connect"):
                raise RuntimeError(f"closed breaker: expected a local answer after a connect failure, got {rec}")
            if arm == "litellm" and rec["litellm_api_base"] != bs_closed.url + "/v1":
                raise RuntimeError(f"LiteLLM answered without its fallback to backstop's {LOCAL_MODEL}: {rec}")
        streams = {"failover": Streamer(bs_closed.url), "local": Streamer(bs_closed.url),
                   "litellm": Streamer(ll.url)}
        closed = series("closed", {"failover": (streams["failover"], CLOUD_MODEL),
                                   "local": (streams["local"], LOCAL_MODEL)}, check_closed)
        # LiteLLM in its own series against the same local-only request, so whatever it does
        # after a request (its logging tasks) cannot land on backstop's failover requests.
        log(f"==> P9 failover through LiteLLM's fallback (same outage), {ttft_n} requests")
        closed_ll = series("litellm", {"litellm": (streams["litellm"], CLOUD_MODEL),
                                       "local": (streams["local"], LOCAL_MODEL)}, check_closed)
        for s in streams.values():
            s.close()
        breaker_after = bs_closed.breaker()
        if breaker_after != "closed":
            raise RuntimeError(f"the breaker was meant to stay closed, it is {breaker_after}")
        # backstop logs each failover with the time spent on the cloud attempt
        attempt_ms = [int(x) for x in re.findall(r"elapsed_ms=(\d+)", bs_closed.p.tail(10**9))]
        ll.p.stop()
        bs_closed.p.stop()

        log("==> P9 failover: breaker open (failures = 3, cooldown 1h)")
        bs_open = Backstop(backstop_bin, "backstop-open", backstop_config(model, fake.v1, 3, "1h"), workdir, bs_env)
        opener = Streamer(bs_open.url)
        for i in range(10):
            if bs_open.breaker() == "open":
                break
            opener.ttft(CLOUD_MODEL, f"open the breaker {i}", 1)
        opener.close()
        if bs_open.breaker() != "open":
            raise RuntimeError(f"backstop's breaker did not open: {bs_open.breaker()}")

        def check_open(arm: str, rec: dict) -> None:
            if arm == "failover" and (rec["backend"] != "local" or rec["failover"] != "breaker_open"):
                raise RuntimeError(f"open breaker: expected a local answer, reason breaker_open, got {rec}")
        streams = {"failover": Streamer(bs_open.url), "local": Streamer(bs_open.url)}
        opened = series("open", {"failover": (streams["failover"], CLOUD_MODEL),
                                 "local": (streams["local"], LOCAL_MODEL)}, check_open)
        for s in streams.values():
            s.close()
        if bs_open.breaker() != "open":
            raise RuntimeError("the breaker closed during the open-breaker measurement")
        bs_open.p.stop()
        fake.set(mode="ok")
        fake.p.stop()
        machine["loadavg_end"] = loadavg()
        busy_end = cpu_busy()
        machine["busy_after_end"] = None if busy_end is None else round(busy_end, 3)

        def ttft_fig(series: dict[str, list[dict]]) -> dict:
            series = {a: rs for a, rs in series.items() if not a.startswith("_")}
            f = {a: {"ttft_ms": summary([r["ttft_ms"] for r in rs]),
                     "headers_ms": summary([r["headers_ms"] for r in rs])} for a, rs in series.items()}
            loc = [r["ttft_ms"] for r in series["local"]]
            for a in series:
                if a == "local":
                    continue
                mine = [r["ttft_ms"] for r in series[a]]
                f[a]["added_ms_median_diff"] = round(statistics.median(mine) - statistics.median(loc), 3)
                f[a]["added_ms_paired"] = summary([x - y for x, y in zip(mine, loc)])
            return f

        result["p9"] = {
            "discarded_noisy_series": p9_discarded, "requests_per_arm": ttft_n, "max_tokens": args.ttft_max_tokens,
            "closed": {"figures": ttft_fig(closed), "cloud_attempt_ms_from_log": summary([float(x) for x in attempt_ms]),
                       "samples": closed},
            "open": {"figures": ttft_fig(opened), "samples": opened},
            "litellm_closed": {"figures": ttft_fig(closed_ll), "samples": closed_ll},
        }
    finally:
        Proc.stop_all()
    acct1 = cpu_account()
    if acct0 and acct1:
        wall = acct1[0] - acct0[0]
        foreign = max(0.0, (acct1[1] - acct0[1]) - (acct1[2] - acct0[2]))
        machine["run_wall_s"] = round(wall, 1)
        machine["foreign_cpu_s"] = round(foreign, 1)
        machine["foreign_cpu_share"] = foreign_share(acct0, acct1)

    # ------------------------------------------------------------------ report
    b8, l8, d8 = fig8["backstop"], fig8["litellm"], fig8["direct"]
    c9, o9 = result["p9"]["closed"]["figures"], result["p9"]["open"]["figures"]
    add50_b, add50_l = b8["added_p50_ms"]["median"], l8["added_p50_ms"]["median"]
    add99_b, add99_l = b8["added_p99_ms"]["median"], l8["added_p99_ms"]["median"]
    rps_b, rps_l, rps_d = b8["rps"]["median"], l8["rps"]["median"], d8["rps"]["median"]
    s50_b, s50_l = b8["single_client_added_p50_ms"]["median"], l8["single_client_added_p50_ms"]["median"]
    l9 = result["p9"]["litellm_closed"]["figures"]
    cf, cl = c9["failover"]["ttft_ms"]["median"], c9["local"]["ttft_ms"]["median"]
    cll, cll_local = l9["litellm"]["ttft_ms"]["median"], l9["local"]["ttft_ms"]["median"]
    of, ol = o9["failover"]["ttft_ms"]["median"], o9["local"]["ttft_ms"]["median"]
    c_add, o_add = cf - cl, of - ol

    shares = [r["foreign_cpu_share"] for n in paths for r in p8[n] if r.get("foreign_cpu_share") is not None]
    fg8 = (f"median {fmt_pct(statistics.median(shares))}, max {fmt_pct(max(shares))}" if shares else "?")

    def sp(fig: dict, unit: str, nd: int = 2) -> str:
        return f"[{fig['min']:.{nd}f}–{fig['max']:.{nd}f}]{unit}"

    rows = [
        (f"P8 added latency p50, {args.clients} clients (over direct {d8['p50_ms']['median']:.3f} ms)",
         f"{add50_b:+.3f} ms {sp(b8['added_p50_ms'], '')}", f"{add50_l:+.2f} ms (LiteLLM)",
         f"{add50_b / add50_l:.4f}x" if add50_l else "-", "<= +1 ms", add50_b <= 1.0),
        (f"P8 requests/s, {args.clients} clients", f"{rps_b:.0f} {sp(b8['rps'], '', 0)}",
         f"{rps_l:.0f} {sp(l8['rps'], '', 0)} (LiteLLM)", f"{rps_b / rps_l:.1f}x", ">= 5x", rps_b >= 5 * rps_l),
        ("P9 failover TTFT, breaker closed (cloud refuses connections)",
         f"{cf:.1f} ms ({c_add:+.2f} ms)", f"{cl:.1f} ms (local-only)", f"{cf / cl:.3f}x", "<= +10 ms", c_add <= 10.0),
        ("P9 failover TTFT, breaker open", f"{of:.1f} ms ({o_add:+.2f} ms)", f"{ol:.1f} ms (local-only)",
         f"{of / ol:.3f}x", "<= +1 ms", o_add <= 1.0),
    ]
    info = [
        (f"P8 added latency p99, {args.clients} clients (over direct {d8['p99_ms']['median']:.3f} ms)",
         f"{add99_b:+.3f} ms", f"{add99_l:+.2f} ms (LiteLLM)", f"{add99_b / add99_l:.4f}x" if add99_l else "-"),
        ("P8 direct to the fake cloud (the load generator's ceiling)", f"{rps_b:.0f} req/s (backstop)",
         f"{rps_d:.0f} req/s (direct)", f"{rps_d / rps_b:.2f}x direct/backstop"),
        (f"P8 added latency p50, 1 client (over direct {d8['single_client_p50_ms']['median']:.3f} ms)",
         f"{s50_b:+.3f} ms", f"{s50_l:+.2f} ms (LiteLLM)", f"{s50_b / s50_l:.4f}x" if s50_l else "-"),
        ("P9 failover TTFT, LiteLLM through its fallback (breaker-closed outage)",
         f"{cf:.1f} ms (backstop)", f"{cll:.1f} ms (LiteLLM; {cll - cll_local:+.1f} ms over local-only {cll_local:.1f} ms)", f"{cf / cll:.3f}x"),
        ("P9 paired added TTFT (median of per-round differences): closed / open",
         f"{c9['failover']['added_ms_paired']['median']:+.2f} / {o9['failover']['added_ms_paired']['median']:+.2f} ms",
         "", ""),
    ]
    lines = [
        f"machine: {machine['nproc']} cores, {machine['cpu']}; nothing pinned; other work before start: "
        f"{fmt_pct(machine['busy_before_start'])} CPU busy, after the end: {fmt_pct(machine['busy_after_end'])}; "
        f"load average {machine['loadavg_start']} at start, {machine['loadavg_end']} at end; other processes used "
        f"{machine.get('foreign_cpu_s', '?')} CPU-s of the {machine.get('run_wall_s', '?')} s run "
        f"({fmt_pct(machine.get('foreign_cpu_share'))} of the machine)",
        f"versions: {versions['backstop']} ({backstop_bin}); LiteLLM {litellm_version} ({args.litellm_workers} "
        f"uvicorn workers); {versions['wrk']}; Python {versions['python']}",
        f"command: {command}",
        f"P8: wrk, {args.wrk_threads} thread, {args.clients} keep-alive connections, non-streamed chat "
        f"({len(P8_BODY)}-byte body), median of {reps} reps (ABBA), per rep ≥{min_requests} requests and "
        f"≥{min_seconds:.0f} s per path ({', '.join(f'{k} {math.ceil(v)} s' for k, v in dur.items())}); "
        f"[min–max] over reps; other work on the machine during the 16-client runs: "
        f"{fg8}; {len(discarded)} rep(s) discarded for other work and run again",
        f"P9: {ttft_n} streamed requests per arm, interleaved in rotation, max_tokens {args.ttft_max_tokens}, unique prompts; "
        f"median TTFT; backstop's own log puts the failed cloud attempt at "
        f"{result['p9']['closed']['cloud_attempt_ms_from_log'].get('median', '-')} ms median (it logs whole ms); "
        f"other work on the machine: closed {fmt_pct(closed.get('_foreign_cpu_share'))}, open "
        f"{fmt_pct(opened.get('_foreign_cpu_share'))}, LiteLLM series {fmt_pct(closed_ll.get('_foreign_cpu_share'))}; "
        f"{len(p9_discarded)} series discarded for other work and run again",
        "",
        "| measure | backstop | peer | ratio | target | pass |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, bv, pv, ratio, target, ok in rows:
        lines.append(f"| {name} | {bv} | {pv} | {ratio} | {target} | {'pass' if ok else 'FAIL'} |")
    for name, bv, pv, ratio in info:
        lines.append(f"| {name} | {bv} | {pv} | {ratio} | (info) | |")
    report = "\n".join(lines)
    print("\n" + report)
    result["targets"] = [{"measure": r[0], "backstop": r[1], "peer": r[2], "ratio": r[3], "target": r[4],
                          "pass": r[5]} for r in rows]
    result["info"] = [{"measure": r[0], "backstop": r[1], "peer": r[2], "ratio": r[3]} for r in info]
    result["report"] = report
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"router-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {path}\nlogs and configs: {workdir}")
    print("\nLiteLLM config used:\n" + result["configs"]["litellm"])
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        Proc.stop_all()
        print("interrupted; every process this script started is stopped", file=sys.stderr)
        sys.exit(130)
    except Exception:
        Proc.stop_all()
        raise
