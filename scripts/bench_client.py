#!/usr/bin/env python3
"""Streaming load generator for any OpenAI-compatible server (backstop, llama-server, ...).

Pure standard library: asyncio with raw HTTP/1.1 over sockets (chunked, Content-Length or
close-delimited bodies; one keep-alive connection per client unless --no-keepalive).

Each of --clients concurrent clients sends --requests-per-client requests, one after another:
    POST /v1/chat/completions  {"stream": true, "temperature": 0, "max_tokens": T,
                                "stream_options": {"include_usage": true}, ...}
The default prompt asks for a long story, so that small models use most of max_tokens without
the server-specific "ignore_eos" (pass it with --extra '{"ignore_eos": true}' if wanted).

Per request it records:
  ttft_ms            request start (connect included, if a new connection) -> first content delta
  completion_tokens  from the final usage chunk if present, else the number of content deltas
  decode_tok_s       (completion_tokens - 1) / (t_last_token - t_first_token)
For the whole run: aggregate_tok_s = total completion tokens / wall time of the run.

    scripts/bench_client.py --url http://127.0.0.1:18080 --model smollm2 \\
        --clients 4 --requests-per-client 2 --max-tokens 128 --json bench-results/x.json

Prints a one-line summary; --json writes the summary plus every request's figures.
Exit status: 0 if every request succeeded, 1 otherwise, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import os
import ssl
import statistics
import sys
import time
from typing import Any
from urllib.parse import urlsplit

DEFAULT_PROMPT = (
    "Write a long, detailed story about a lighthouse keeper who finds a mysterious map "
    "washed up on the shore. Describe the characters, the places and the journey at length."
)

FILLER = (
    "the quick brown fox jumps over the lazy dog while a small bird sings in the old tree "
    "and the river runs past the quiet town under a grey sky "
).split()


def make_prompt(approx_tokens: int) -> str:
    """A prompt of roughly approx_tokens tokens (common English words are ~1 token each)."""
    tail = " Now, ignoring the text above, " + DEFAULT_PROMPT[0].lower() + DEFAULT_PROMPT[1:]
    n = max(0, approx_tokens - 40)  # ~40 tokens for the request text and the chat template
    words = [FILLER[i % len(FILLER)] for i in range(n)]
    return "Background text: " + " ".join(words) + "." + tail


def percentile(values: list[float], p: float) -> float | None:
    """Linear-interpolated percentile (p in 0..100); None for an empty list."""
    if not values:
        return None
    v = sorted(values)
    if len(v) == 1:
        return v[0]
    k = (len(v) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


class HttpError(Exception):
    pass


class SseParser:
    """Incremental text/event-stream parser (WHATWG rules, 'data' field only).

    feed() takes raw bytes and returns the data payloads of the events it completed.
    Lines end with \\n, \\r\\n or \\r; lines starting with ':' are comments (keep-alives);
    'data:' drops one optional space; several data lines join with '\\n'; a blank line
    dispatches the event.
    """

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[str] = []
        self._pending_cr = False

    def feed(self, chunk: bytes) -> list[str]:
        if self._pending_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]  # the \n of a \r\n split across two reads
        self._pending_cr = False
        buf = self._buf + chunk
        out: list[str] = []
        start = 0
        n = len(buf)
        while True:
            # find the next line terminator
            i_n = buf.find(b"\n", start)
            i_r = buf.find(b"\r", start)
            if i_n < 0 and i_r < 0:
                break
            if i_r >= 0 and (i_n < 0 or i_r < i_n):
                end = i_r
                if i_r + 1 < n:
                    nxt = i_r + 2 if buf[i_r + 1:i_r + 2] == b"\n" else i_r + 1
                else:
                    nxt = i_r + 1
                    self._pending_cr = True
            else:
                end, nxt = i_n, i_n + 1
            self._line(buf[start:end].decode("utf-8", "replace"), out)
            start = nxt
        self._buf = buf[start:]
        return out

    def close(self) -> list[str]:
        """End of stream: an unterminated last event is still dispatched (lenient)."""
        out: list[str] = []
        if self._buf:
            self._line(self._buf.decode("utf-8", "replace"), out)
            self._buf = b""
        self._line("", out)
        return out

    def _line(self, line: str, out: list[str]) -> None:
        if line == "":
            if self._data:
                out.append("\n".join(self._data))
                self._data = []
            return
        if line.startswith(":"):
            return
        field, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data.append(value)
        # event:, id:, retry: and unknown fields are ignored


class Conn:
    """One HTTP/1.1 connection; reopened on demand."""

    def __init__(self, host: str, port: int, use_tls: bool, keepalive: bool) -> None:
        self.host, self.port, self.use_tls, self.keepalive = host, port, use_tls, keepalive
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def ensure(self) -> bool:
        """Open if needed; True if a new connection was made."""
        if (self.writer is not None and not self.writer.is_closing()
                and self.reader is not None and not self.reader.at_eof()):
            return False
        self.close()
        ctx = ssl.create_default_context() if self.use_tls else None
        self.reader, self.writer = await asyncio.open_connection(
            self.host, self.port, ssl=ctx, limit=1 << 20
        )
        return True

    def close(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception:
                pass
        self.reader = self.writer = None


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise HttpError(f"bad status line: {lines[0]!r}")
    headers: dict[str, str] = {}
    for h in lines[1:]:
        if not h:
            continue
        k, _, v = h.partition(":")
        k = k.strip().lower()
        v = v.strip()
        headers[k] = headers[k] + ", " + v if k in headers else v
    return int(parts[1]), headers


async def iter_body(reader: asyncio.StreamReader, headers: dict[str, str]):
    """Yield body bytes as they arrive, decoding the transfer framing."""
    te = headers.get("transfer-encoding", "").lower()
    if "chunked" in te:
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                # trailers, then the blank line
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                return
            remaining = size
            while remaining:
                data = await reader.read(remaining)
                if not data:
                    raise HttpError("connection closed inside a chunk")
                remaining -= len(data)
                yield data
            if await reader.readexactly(2) != b"\r\n":
                raise HttpError("bad chunk terminator")
    elif "content-length" in headers:
        remaining = int(headers["content-length"])
        while remaining:
            data = await reader.read(min(remaining, 1 << 16))
            if not data:
                raise HttpError("connection closed before Content-Length bytes")
            remaining -= len(data)
            yield data
    else:
        while True:
            data = await reader.read(1 << 16)
            if not data:
                return
            yield data


async def one_request(conn: Conn, path: str, host_header: str, body: bytes,
                      api_key: str | None, idx: dict[str, int]) -> dict[str, Any]:
    rec: dict[str, Any] = dict(idx)
    t0 = time.perf_counter()
    rec["start_s"] = t0
    content_deltas = 0
    usage: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None
    finish_reason = None
    t_first = t_last = None
    done = False
    reused = False
    try:
        for attempt in (0, 1):
            if attempt:
                # a kept-alive connection the server had closed (llama-server closes after each
                # streamed response): the failed try is the client's cost, not the server's
                t0 = time.perf_counter()
                rec["start_s"] = t0
            new = await conn.ensure()
            reused = not new
            head = (
                f"POST {path} HTTP/1.1\r\n"
                f"Host: {host_header}\r\n"
                "Content-Type: application/json\r\n"
                "Accept: text/event-stream\r\n"
                f"Content-Length: {len(body)}\r\n"
                + (f"Authorization: Bearer {api_key}\r\n" if api_key else "")
                + ("Connection: keep-alive\r\n" if conn.keepalive else "Connection: close\r\n")
                + "\r\n"
            )
            assert conn.writer is not None and conn.reader is not None
            try:
                conn.writer.write(head.encode("latin-1") + body)
                await conn.writer.drain()
                status, headers = await read_head(conn.reader)
                break
            except (ConnectionError, asyncio.IncompleteReadError) as e:
                conn.close()
                if attempt or not reused:
                    raise HttpError(f"connection failed: {e!r}") from e
        rec["new_connection"] = not reused
        if status != 200:
            err = b""
            async for b in iter_body(conn.reader, headers):
                err += b
                if len(err) > 4096:
                    break
            conn.close()
            raise HttpError(f"HTTP {status}: {err[:500].decode('utf-8', 'replace')}")
        parser = SseParser()
        stream_done = False
        # Read the body to its end (for chunked/Content-Length bodies that is right after
        # [DONE]), so that a kept-alive connection is left clean for the next request.
        async for chunk in iter_body(conn.reader, headers):
            if stream_done:
                continue
            now = time.perf_counter()
            for data in parser.feed(chunk):
                if data.strip() == "[DONE]":
                    stream_done = True
                    break
                try:
                    obj = json.loads(data)
                except json.JSONDecodeError:
                    raise HttpError(f"bad JSON event: {data[:200]!r}")
                if not isinstance(obj, dict):
                    continue
                if "error" in obj:
                    raise HttpError(f"stream error: {json.dumps(obj['error'])[:500]}")
                if obj.get("usage"):
                    usage = obj["usage"]
                if obj.get("timings"):
                    timings = obj["timings"]
                for ch in obj.get("choices") or []:
                    delta = ch.get("delta") or {}
                    text = delta.get("content") or delta.get("reasoning_content")
                    if text:
                        content_deltas += 1
                        if t_first is None:
                            t_first = now
                        t_last = now
                    if ch.get("finish_reason"):
                        finish_reason = ch["finish_reason"]
        if not stream_done:
            raise HttpError("stream ended without data: [DONE]")
        framed = "chunked" in headers.get("transfer-encoding", "").lower() or "content-length" in headers
        if not (conn.keepalive and framed and "close" not in headers.get("connection", "").lower()):
            conn.close()
        done = True
    except (HttpError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
            ValueError) as e:
        conn.close()
        rec["error"] = str(e) or repr(e)
    t_end = time.perf_counter()

    ctoks = None
    if usage and isinstance(usage.get("completion_tokens"), int):
        ctoks = usage["completion_tokens"]
        rec["prompt_tokens"] = usage.get("prompt_tokens")
    elif content_deltas:
        ctoks = content_deltas
    rec["ok"] = done
    rec["completion_tokens"] = ctoks
    rec["token_count_source"] = "usage" if usage else "deltas"
    rec["content_deltas"] = content_deltas
    rec["finish_reason"] = finish_reason
    rec["ttft_ms"] = (t_first - t0) * 1e3 if t_first is not None else None
    rec["total_ms"] = (t_end - t0) * 1e3
    if ctoks and ctoks > 1 and t_first is not None and t_last is not None and t_last > t_first:
        rec["decode_tok_s"] = (ctoks - 1) / (t_last - t_first)
    else:
        rec["decode_tok_s"] = None
    if timings:
        rec["server_timings"] = timings
    rec["end_s"] = t_end
    return rec


async def run(args: argparse.Namespace) -> dict[str, Any]:
    u = urlsplit(args.url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise SystemExit(f"--url must be http(s)://host:port[/prefix], got {args.url!r}")
    use_tls = u.scheme == "https"
    port = u.port or (443 if use_tls else 80)
    host_header = u.netloc
    base = u.path.rstrip("/")
    if base.endswith("/chat/completions"):
        path = base
    elif base.endswith("/v1"):
        path = base + "/chat/completions"
    else:
        path = base + "/v1/chat/completions"

    prompt = args.prompt if args.prompt is not None else (
        make_prompt(args.prompt_tokens_approx) if args.prompt_tokens_approx else DEFAULT_PROMPT)
    extra = json.loads(args.extra) if args.extra else {}
    if not isinstance(extra, dict):
        raise SystemExit("--extra must be a JSON object")

    def body_for(text: str, max_tokens: int) -> bytes:
        messages = []
        if args.system:
            messages.append({"role": "system", "content": args.system})
        messages.append({"role": "user", "content": text})
        b = {
            "model": args.model,
            "messages": messages,
            "stream": True,
            "temperature": 0,
            "max_tokens": max_tokens,
            "stream_options": {"include_usage": True},
        }
        b.update(extra)
        return json.dumps(b).encode()

    def prompt_for(c: int, r: int) -> str:
        return f"[run {nonce} request {c}.{r}] {prompt}" if args.unique_prompts else prompt

    nonce = os.urandom(4).hex()  # differs per run, so no earlier run's cache can serve it

    # Warm-up (not counted): sequential requests on a throwaway connection.
    for w in range(args.warmup):
        conn = Conn(u.hostname, port, use_tls, keepalive=False)
        rec = await asyncio.wait_for(
            one_request(conn, path, host_header, body_for(prompt_for(-1, w), args.max_tokens),
                        args.api_key, {"warmup": w}), args.timeout)
        conn.close()
        if not rec["ok"]:
            print(f"warm-up request failed: {rec.get('error')}", file=sys.stderr)

    start_gate = asyncio.Event()

    async def client(c: int) -> list[dict[str, Any]]:
        conn = Conn(u.hostname, port, use_tls, keepalive=not args.no_keepalive)
        out = []
        await start_gate.wait()
        for r in range(args.requests_per_client):
            idx = {"client": c, "request": r}
            try:
                rec = await asyncio.wait_for(
                    one_request(conn, path, host_header, body_for(prompt_for(c, r), args.max_tokens),
                                args.api_key, idx), args.timeout)
            except asyncio.TimeoutError:
                conn.close()
                rec = dict(idx, ok=False, error=f"timeout after {args.timeout} s",
                           completion_tokens=None, ttft_ms=None, decode_tok_s=None)
            out.append(rec)
        conn.close()
        return out

    tasks = [asyncio.create_task(client(c)) for c in range(args.clients)]
    await asyncio.sleep(0)
    t_run0 = time.perf_counter()
    start_gate.set()
    results = [rec for lst in await asyncio.gather(*tasks) for rec in lst]
    wall = time.perf_counter() - t_run0

    for rec in results:  # make times relative to the run start
        for k in ("start_s", "end_s"):
            if rec.get(k) is not None:
                rec[k] = round(rec[k] - t_run0, 6)
    ok = [r for r in results if r.get("ok")]
    ttfts = [r["ttft_ms"] for r in ok if r.get("ttft_ms") is not None]
    rates = [r["decode_tok_s"] for r in ok if r.get("decode_tok_s") is not None]
    total_tokens = sum(r["completion_tokens"] or 0 for r in ok)

    def rnd(x, nd=2):
        return None if x is None else round(x, nd)

    return {
        "url": args.url,
        "endpoint": path,
        "model": args.model,
        "clients": args.clients,
        "requests_per_client": args.requests_per_client,
        "requests": len(results),
        "requests_ok": len(ok),
        "requests_failed": len(results) - len(ok),
        "max_tokens": args.max_tokens,
        "prompt_chars": len(prompt),
        "prompt_tokens": statistics.median_low([r["prompt_tokens"] for r in ok if r.get("prompt_tokens")])
        if any(r.get("prompt_tokens") for r in ok) else None,
        "unique_prompts": bool(args.unique_prompts),
        "keepalive": not args.no_keepalive,
        "warmup": args.warmup,
        "extra": extra,
        "wall_s": rnd(wall, 4),
        "completion_tokens_total": total_tokens,
        "aggregate_tok_s": rnd(total_tokens / wall if wall > 0 else None),
        "ttft_ms": {
            "p50": rnd(percentile(ttfts, 50)),
            "p95": rnd(percentile(ttfts, 95)),
            "min": rnd(min(ttfts) if ttfts else None),
            "max": rnd(max(ttfts) if ttfts else None),
        },
        "decode_tok_s_per_stream": {
            "median": rnd(statistics.median(rates) if rates else None),
            "min": rnd(min(rates) if rates else None),
            "max": rnd(max(rates) if rates else None),
        },
        "completion_tokens_per_request": {
            "median": statistics.median([r["completion_tokens"] for r in ok if r["completion_tokens"]])
            if any(r["completion_tokens"] for r in ok) else None,
            "min": min((r["completion_tokens"] or 0 for r in ok), default=None),
        },
        "machine": {"nproc": os.cpu_count(), "cpu": cpu_model(), "python": platform.python_version()},
        "per_request": results,
    }


def cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:18080")
    p.add_argument("--model", required=True, help="model name sent in the request")
    p.add_argument("--clients", type=int, default=1, help="concurrent streaming clients")
    p.add_argument("--requests-per-client", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=128)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt", help="user message (default: asks for a long story)")
    g.add_argument("--prompt-tokens-approx", type=int,
                   help="build a user message of about this many tokens (filler + story request)")
    p.add_argument("--system", help="optional system message")
    p.add_argument("--unique-prompts", action="store_true",
                   help="prefix each prompt with a per-run nonce and its request id, so the server's\n"
                        "prefix cache cannot serve it (measures real prefill in TTFT)")
    p.add_argument("--extra", help='JSON object merged into each request body, e.g. \'{"ignore_eos": true}\'')
    p.add_argument("--warmup", type=int, default=0, help="uncounted sequential requests first")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, seconds")
    p.add_argument("--no-keepalive", action="store_true", help="new connection per request")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY") or None,
                   help="Bearer token (default: $OPENAI_API_KEY if set)")
    p.add_argument("--json", dest="json_out", help="write the JSON summary here")
    p.add_argument("--quiet", action="store_true", help="no summary line")
    args = p.parse_args()
    if args.clients < 1 or args.requests_per_client < 1 or args.max_tokens < 1:
        p.error("--clients, --requests-per-client and --max-tokens must be >= 1")

    summary = asyncio.run(run(args))

    if args.json_out:
        d = os.path.dirname(args.json_out)
        if d:
            os.makedirs(d, exist_ok=True)
        with open(args.json_out, "w") as f:
            json.dump(summary, f, indent=2)
            f.write("\n")
    if not args.quiet:
        t, r = summary["ttft_ms"], summary["decode_tok_s_per_stream"]

        def f(x, spec=".1f"):
            return "-" if x is None else format(x, spec)

        print(f"clients={summary['clients']} requests={summary['requests_ok']}/{summary['requests']} ok "
              f"max_tokens={summary['max_tokens']} prompt_tokens={f(summary['prompt_tokens'], '.0f')} | "
              f"TTFT p50 {f(t['p50'])} ms p95 {f(t['p95'])} ms | "
              f"per-stream decode median {f(r['median'])} tok/s | "
              f"aggregate {f(summary['aggregate_tok_s'])} tok/s "
              f"({summary['completion_tokens_total']} tokens in {summary['wall_s']:.2f} s)")
    for rec in summary["per_request"]:
        if not rec.get("ok"):
            print(f"  client {rec.get('client')} request {rec.get('request')}: {rec.get('error')}",
                  file=sys.stderr)
    return 0 if summary["requests_failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
