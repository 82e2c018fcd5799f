#!/usr/bin/env python3
"""Every speed figure a GPU machine should give, in one command, into three files.

    scripts/bench-gpu.py [--backstop PATH|BUNDLE.tar.xz] [--peer DIR|BUNDLE.tar.xz] [--out DIR]
                         [--quick] [--skip STEP,...] [--step-timeout S] MODEL [MODEL...]

For the machine you rent for an hour, or the air-gapped GPU server a bundle is carried to
(scripts/build-cuda-bundle.sh): it runs, one after the other and the most wanted first,

    gpu      backstop bench on every model: -p 512 -n 128 -r 5 --parallel 4,8, and --pg 512,128
             (the prompt and its answer timed as one: a whole request's rate)
    peer     with --peer only: llama-bench on every model with gpu's sizes (-p, -n, -pg, -r;
             every layer on the GPU), and backstop's gpu figures over it
    ladder   the first model quantized to Q8_0, Q6_K, Q5_K_M, Q4_K_M and Q4_0, each benchmarked
    served   `backstop serve` of the first model with 8 slots, measured over HTTP by
             `backstop bench --server` with 1, 4 and 8 streaming clients; with --peer,
             llama-server beside it (same slots, context per slot and model name), the two
             measured in turns in the same run
    cpu      the same as gpu with no GPU visible (CUDA_VISIBLE_DEVICES=): the CPU beside it
    layers   --gpu-layers 0,10,20,99: what offloading part of the model gives
    batch    -p 2048 -n 0 -b 256,512,2048: prompt speed by batch size
    depth    -d 0,4096 --parallel 4: speed deep into a long context

--peer is llama.cpp's llama-bench and llama-server: a folder holding them, or the bundle from
`scripts/build-peers.sh --cuda`. It writes DIR/results.json (every step's JSON, exit status,
seconds, and the end of its stderr), DIR/summary.md (a table per step; also printed) and
DIR/log.txt (all stderr). A step that fails or runs past its time (--step-timeout) is recorded
and the next one runs; both files are rewritten after every step, so a run cut short keeps what
it finished. `--quick` is a dry run with tiny sizes (16-token prompts, 4 generated, one
repetition) that checks the plumbing in a minute or two, on a CPU too.

`--backstop` takes a binary (default: `backstop` on PATH, else this checkout's release build)
or a bundle from build-cuda-bundle.sh, which is unpacked into the work folder (so is --peer's).
When a bundle's CUDA 13 runtime is on neither $CUDA_PATH/lib64 nor /usr/local/cuda/lib64 nor
ldconfig's list, the folders under /usr/local, /opt and Python's site-packages holding
libcudart.so.13 and libcublas.so.13 (NVIDIA's pip wheels put them there) are added to
LD_LIBRARY_PATH.

A MODEL ending in .shape.gguf.xz (stand-in-model.py --shape, xz-compressed) is expanded into a
stand-in first: the same work per token as the model, with none of its weights carried.

Only the standard library, so it runs under any python3 >= 3.9.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LADDER = "Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q4_0"

# (name, extra arguments, whether every model or only the first); the sizes come from Sizes.
FULL = {"p": 512, "n": 128, "r": 5, "parallel": "4,8", "layers": "0,10,20,99", "ladder": LADDER,
        "batch_p": 2048, "batch": "256,512,2048", "depth": "0,4096", "depth_parallel": 4,
        "slots": 8, "step_s": 600}
QUICK = {"p": 16, "n": 4, "r": 1, "parallel": "2,4", "layers": "0,99", "ladder": "Q8_0,Q4_0",
         "batch_p": 64, "batch": "32,64", "depth": "0,32", "depth_parallel": 2,
         "slots": 4, "step_s": 300}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def unpack(bundle: Path, work: Path) -> Path:
    """A bundle (.tar.xz) unpacked into `work`: its top folder."""
    with tarfile.open(bundle) as tar:
        names = [m.name for m in tar.getmembers()]
        try:
            tar.extractall(work, filter="data")
        except TypeError:  # Python before 3.12 (and its backports) has no filter
            tar.extractall(work)
    return work / names[0].split("/")[0]


def is_bundle(path: Path) -> bool:
    return path.name.endswith((".tar.xz", ".tar.gz", ".tar"))


def find_backstop(given: str | None, work: Path) -> Path:
    """The binary to run: given, a bundle unpacked, on PATH, or this checkout's release build."""
    if given:
        path = Path(given)
        return unpack(path, work) / "backstop" if is_bundle(path) else path.resolve()
    found = shutil.which("backstop")
    if found:
        return Path(found)
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    return target / "release" / "backstop"


def cuda_library_path() -> str | None:
    """The folders holding CUDA 13's runtime and cuBLAS, when the bundle's wrapper would not
    find them on its own (NVIDIA's pip wheels keep them under site-packages)."""
    wanted = ("libcudart.so.13", "libcublas.so.13")
    usual = [os.path.join(os.environ["CUDA_PATH"], "lib64")] if os.environ.get("CUDA_PATH") else []
    usual.append("/usr/local/cuda/lib64")
    usual += os.environ.get("LD_LIBRARY_PATH", "").split(":")
    if all(any(os.path.exists(os.path.join(d, w)) for d in usual if d) for w in wanted):
        return None
    try:
        listed = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
        if all(w in listed for w in wanted):
            return None
    except OSError:
        pass
    dirs: list[str] = []
    missing = set(wanted)
    # NVIDIA's wheels first (site-packages/nvidia/cu13/lib and the like), then a walk.
    for base in (*[os.path.join(p, "nvidia") for p in sys.path if p], "/usr/local", "/opt"):
        if not os.path.isdir(base):
            continue
        for dirpath, subdirs, files in os.walk(base):
            found = missing & set(files)
            if found:
                missing -= found
                dirs.append(dirpath)
            if not missing:
                return ":".join(dirs)
            if dirpath.count(os.sep) - base.count(os.sep) >= 8:
                subdirs.clear()
    return ":".join(dirs) or None


def stand_in(shape: Path, work: Path) -> Path:
    """The stand-in model for a carried shape (see stand-in-model.py)."""
    name = shape.name[: -len(".shape.gguf.xz")] + ".gguf"
    out = work / name
    if not out.exists():
        raw = work / (name + ".shape")
        with lzma.open(shape) as src, open(raw, "wb") as dst:
            shutil.copyfileobj(src, dst)
        subprocess.run([sys.executable, str(ROOT / "scripts" / "stand-in-model.py"), str(raw), str(out)],
                       check=True, stdout=subprocess.DEVNULL)
        raw.unlink()
    return out


def machine(backstop: Path) -> dict:
    """What the figures were measured on."""
    info: dict = {"host": platform.node(), "python": platform.python_version(), "cores": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and "cpu" not in info:
                info["cpu"] = value.strip()
            if key.strip() == "flags":
                flags = set(value.split())
                info["cpu_flags"] = sorted(flags & {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
                                                    "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile"})
                break
    except OSError:
        pass
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        info["gpus"] = [line.strip() for line in smi.stdout.splitlines() if line.strip()]
    except (OSError, subprocess.TimeoutExpired):
        info["gpus"] = []
    version = subprocess.run([str(backstop), "--version"], capture_output=True, text=True)
    info["backstop"] = version.stdout.strip() or version.stderr.strip()
    build = backstop.parent / "BUILD"
    if build.exists():
        info["bundle"] = build.read_text().strip()
    return info


def as_text(output: bytes | str | None) -> str:
    """What a timed-out subprocess had written (bytes even with text=True)."""
    return output.decode(errors="replace") if isinstance(output, bytes) else (output or "")


class Runner:
    """Runs the steps, keeping each one's figures, status and time."""

    def __init__(self, backstop: Path, out: Path, step_s: int, env: dict, head: dict):
        self.backstop, self.out, self.step_s, self.env, self.head = backstop, out, step_s, env, head
        self.steps: dict[str, dict] = {}
        self.ready_s: dict[str, float] = {}  # each server's start to ready, seconds
        self.log = open(out / "log.txt", "w")

    def save(self) -> str:
        """Writes results.json and summary.md as they stand: after every step, so a run cut
        short (a device's time limit) still leaves the steps it finished."""
        (self.out / "results.json").write_text(json.dumps({**self.head, "steps": self.steps}, indent=1))
        machine = self.head["machine"]
        text = "# backstop on " + ", ".join(machine.get("gpus") or [machine.get("cpu", "?")]) + "\n"
        text += summary(self.steps)
        (self.out / "summary.md").write_text(text)
        return text

    def run(self, name: str, argv: list[str], env: dict | None = None) -> tuple[int | str, str, str]:
        """Runs a tool within the step time, its stderr into the log: exit status ("timeout"
        when it ran out of time), stdout and stderr (what it wrote before a timeout)."""
        log(f"==> {name}: {' '.join(argv[1:])}")
        self.log.write(f"\n==> {name}: {' '.join(argv)}\n")
        self.log.flush()
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=self.step_s,
                                  env={**self.env, **(env or {})})
            rc, out, err = done.returncode, done.stdout, done.stderr
        except subprocess.TimeoutExpired as e:
            rc, out, err = "timeout", as_text(e.stdout), as_text(e.stderr)
        self.log.write(err)
        self.log.flush()
        return rc, out, err

    def bench(self, name: str, args: list[str], env: dict | None = None) -> None:
        # JSON Lines: each result is printed as soon as it is measured, so a step that runs out
        # of time or fails at a later model keeps the results it finished.
        argv = [str(self.backstop), "bench", "--format", "jsonl", *args]
        t0 = time.perf_counter()
        step = {"argv": argv[1:]}
        step["rc"], out, err = self.run(name, argv, env)
        step["seconds"] = round(time.perf_counter() - t0, 1)
        step["stderr_tail"] = err[-1500:]
        results = []
        for line in out.splitlines():
            try:
                results.append(json.loads(line))
            except json.JSONDecodeError:
                # a line cut off by the time limit, or not ours
                step["stdout_tail"] = out[-1500:]
        step["figures"] = {"results": results} if results else None
        self.steps[name] = step
        self.save()
        log(f"    rc {step['rc']} in {step['seconds']} s")

    def start(self, name: str, argv: list[str], port: int, ready: str) -> subprocess.Popen | str:
        """A server on a loopback port, once `ready` answers 200 (backstop's /health/ready and
        llama-server's /health: once the model is loaded); or why it is not there."""
        self.log.write(f"\n==> {name}: {' '.join(argv)}\n")
        self.log.flush()
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdout=self.log, stderr=self.log, env=self.env)
        deadline = t0 + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{ready}", timeout=1) as r:
                    if r.status == 200:
                        self.ready_s[name] = round(time.monotonic() - t0, 2)
                        return proc
            except OSError:
                time.sleep(0.2)
        if proc.poll() is None:
            stop(proc)
            return f"{name} was not ready in 120 s"
        return f"{name} exited with {proc.returncode}"

    def served(self, model: Path, port: int, slots: int, args: list[str], peer: Path | None) -> None:
        """`backstop serve` on a loopback port, measured by `backstop bench --server`; with a
        peer, llama-server beside it on the next port, the two measured in turns."""
        # Served under the file's name, so the table says which model it measured.
        name = "".join(c if c.isalnum() or c in "._-" else "-" for c in model.stem.lower())
        ctx = 4096  # per slot, for both
        procs: list[subprocess.Popen] = []
        try:
            urls = []
            servers = [("backstop", [str(self.backstop), "serve", "--host", f"127.0.0.1:{port}",
                                     "--model", f"{name}={model}", "--parallel", str(slots),
                                     "--ctx", str(ctx)], port, "/health/ready")]
            if peer:
                servers.append(("llama-server", [str(peer / "llama-server"), "-m", str(model), "-ngl", "99",
                                                 "-np", str(slots), "-c", str(ctx * slots), "--alias", name,
                                                 "--host", "127.0.0.1", "--port", str(port + 1)], port + 1,
                                "/health"))
            for kind, argv, p, ready in servers:
                started = self.start(kind, argv, p, ready)
                if isinstance(started, str):
                    self.steps["served"] = {"rc": started, "figures": None}
                    self.save()
                    return
                procs.append(started)
                urls += ["--server", f"127.0.0.1:{p}"]
            self.bench("served", [*urls, *args, name])
            self.steps["served"]["ready_s"] = dict(self.ready_s)
            self.save()
        finally:
            for proc in procs:
                stop(proc)

    def peer_bench(self, peer: Path, models: list[Path], size: dict) -> None:
        """llama-bench on every model with the gpu step's sizes, and backstop's figures over it."""
        t0 = time.perf_counter()
        step: dict = {"rc": 0, "results": []}
        for model in models:
            argv = [str(peer / "llama-bench"), "-m", str(model), "-p", str(size["p"]), "-n", str(size["n"]),
                    "-pg", f"{size['p']},{size['n']}", "-r", str(size["r"]), "-ngl", "99", "-o", "jsonl"]
            rc, out, err = self.run("peer", argv)
            step["stderr_tail"] = err[-1500:]
            if rc != 0:
                step["rc"] = rc
            for line in out.splitlines():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue
                samples = r.get("samples_ts") or []
                if samples:
                    step["results"].append({"file": model.name, "prompt": r.get("n_prompt"), "gen": r.get("n_gen"),
                                            "median": statistics.median(samples), "min": min(samples),
                                            "max": max(samples), "backend": r.get("backends"),
                                            "flash_attn": r.get("flash_attn"), "build": r.get("build_commit")})
        step["seconds"] = round(time.perf_counter() - t0, 1)
        step["ratios"] = peer_ratios(self.steps.get("gpu"), step["results"])
        self.steps["peer"] = step
        self.save()
        log(f"    rc {step['rc']} in {step['seconds']} s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


def peer_ratios(gpu: dict | None, peer: list[dict]) -> list[dict]:
    """backstop's gpu figures over llama-bench's, test by test (pp, tg, pp+tg) and model by model."""
    ours: dict[tuple, dict] = {}
    for r in ((gpu or {}).get("figures") or {}).get("results") or []:
        if r.get("pg"):
            ours[(r["file"], r["prompt"], r["generate"])] = r["pg"]
            continue
        if r.get("pp"):
            ours[(r["file"], r["prompt"], 0)] = r["pp"]
        if r.get("tg"):
            ours[(r["file"], 0, r["generate"])] = r["tg"]
    rows = []
    for p in peer:
        key = (p["file"], p["prompt"], p["gen"])
        if key in ours and p["median"]:
            rows.append({"file": p["file"], "prompt": p["prompt"], "gen": p["gen"], "backstop": ours[key]["median"],
                         "llama_bench": p["median"], "ratio": ours[key]["median"] / p["median"]})
    return rows


def cell(figure: dict | None, digits: int = 1) -> str:
    if not figure:
        return ""
    return f"{figure['median']:.{digits}f} ({figure['min']:.{digits}f}–{figure['max']:.{digits}f})"


def summary(steps: dict[str, dict]) -> str:
    """A markdown table per step: one row per result."""
    lines: list[str] = []
    for name, step in steps.items():
        lines.append(f"\n### {name} (rc {step.get('rc')}, {step.get('seconds', '?')} s)\n")
        if name == "peer":
            lines.append("| model | test | backstop tok/s | llama-bench tok/s (min–max) | ratio |")
            lines.append("| --- | --- | --- | --- | --- |")
            for r in step.get("ratios") or []:
                test = "+".join(t for t in (f"pp{r['prompt']}" if r["prompt"] else "",
                                             f"tg{r['gen']}" if r["gen"] else "") if t)
                peer = next((p for p in step["results"] if (p["file"], p["prompt"], p["gen"])
                             == (r["file"], r["prompt"], r["gen"])), {})
                lines.append(f"| {r['file']} | {test} | {r['backstop']:.1f} | {cell(peer)} | {r['ratio']:.2f} |")
            if not step.get("ratios"):
                lines.append("no figures to compare")
            continue
        if step.get("ready_s"):
            lines.append("start to ready: " + ", ".join(f"{k} {v} s" for k, v in step["ready_s"].items()) + "\n")
        results = (step.get("figures") or {}).get("results") or []
        if not results:
            last = (step.get("stderr_tail") or "").strip().splitlines()[-1:]
            lines.append("no figures" + (f": {last[0]}" if last else ""))
            continue
        if "clients" in results[0]:
            lines.append("| server | model | clients | TTFT p50 / p95 ms | decode per stream tok/s | aggregate tok/s "
                         "| aggregate over the first server's |")
            lines.append("| --- | --- | --- | --- | --- | --- | --- |")
            for r in results:
                t = r.get("ttft_ms") or {}
                ttft = f"{t['p50']:.1f} / {t['p95']:.1f}" if t else ""
                lines.append(f"| {r.get('server', '')} | {r['model']} | {r['clients']} | {ttft} | "
                             f"{cell(r.get('decode'))} | {cell(r.get('aggregate'))} | {cell(r.get('relative'), 2)} |")
            continue
        lines.append("| model | quant | backend | layers | batch | depth | test | tok/s | parallel |")
        lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in results:
            if r.get("pg"):
                test, speed = f"pp{r['prompt']}+tg{r['generate']}", cell(r["pg"])
            else:
                test = " ".join(x for x in (f"pp{r['prompt']}" if r.get("pp") else "",
                                            f"tg{r['generate']}" if r.get("tg") else "") if x)
                speed = " / ".join(cell(r[k]) for k in ("pp", "tg") if r.get(k))
            par = ", ".join(f"x{p['sequences']} {p['median']:.1f}" for p in r.get("parallel") or [])
            layers = "" if r.get("gpu_layers") is None else r["gpu_layers"]
            lines.append(f"| {r['file']} | {r['quantization']} | {r['backend']} | {layers} | {r['batch']} | "
                         f"{r['depth']} | {test} | {speed} | {par} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", metavar="MODEL", help="GGUF files (or .shape.gguf.xz)")
    ap.add_argument("--backstop", help="binary or bundle (.tar.xz) to run")
    ap.add_argument("--peer", help="llama.cpp's llama-bench and llama-server to compare against: their "
                                   "folder, or the bundle (.tar.xz) from scripts/build-peers.sh --cuda")
    ap.add_argument("--out", help="folder for results.json, summary.md, log.txt "
                                  "(default bench-results/gpu-<time>)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a dry run of every step")
    ap.add_argument("--port", type=int, default=18555, help="loopback port for the served step")
    ap.add_argument("--skip", default="", help="steps to leave out, comma-separated")
    ap.add_argument("--step-timeout", type=int, metavar="S",
                    help="seconds one step may take (default 600, 300 with --quick)")
    args = ap.parse_args()
    size = QUICK if args.quick else FULL
    out = Path(args.out or ROOT / "bench-results" / time.strftime("gpu-%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    skip = {s for s in args.skip.split(",") if s}

    work = Path(tempfile.mkdtemp(prefix="backstop-gpu-"))
    try:
        backstop = find_backstop(args.backstop, work)
        peer = None
        if args.peer:
            peer = unpack(Path(args.peer), work) if is_bundle(Path(args.peer)) else Path(args.peer).resolve()
        models = [stand_in(Path(m), work) if m.endswith(".shape.gguf.xz") else Path(m) for m in args.models]
        env = dict(os.environ)
        # Only an unpacked bundle (found under the work folder) needs CUDA's runtime found for it.
        extra = cuda_library_path() if work in backstop.parents or (peer and work in peer.parents) else None
        if extra:
            env["LD_LIBRARY_PATH"] = extra + (":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
        info = machine(backstop)
        info["ld_library_path_added"] = extra
        log(json.dumps(info, indent=1))

        run = Runner(backstop, out, args.step_timeout or size["step_s"], env,
                     {"machine": info, "quick": args.quick})
        names = [str(m) for m in models]
        base = ["-p", str(size["p"]), "-n", str(size["n"])]
        main_args = base + ["-r", str(size["r"]), "--parallel", size["parallel"]]
        whole = ["--pg", f"{size['p']},{size['n']}"]
        # Most wanted first, so that a run cut short (a rented machine's hour) has them.
        plan = [
            ("gpu", main_args + whole + names, None),
            ("ladder", main_args + ["--quantize", size["ladder"], "--quantize-dir", str(work / "ladder"),
                                    names[0]], None),
            ("served", [], None),
            ("cpu", main_args + whole + names, {"CUDA_VISIBLE_DEVICES": ""}),
            ("layers", base + ["-r", "3", "--gpu-layers", size["layers"]] + names, None),
            ("batch", ["-p", str(size["batch_p"]), "-n", "0", "-r", "3", "-b", size["batch"]] + names, None),
            ("depth", base + ["-r", "3", "-d", size["depth"], "--parallel", str(size["depth_parallel"])] + names,
             None),
        ]
        for name, bench_args, step_env in plan:
            if name in skip:
                continue
            if name == "served":
                run.served(models[0], args.port, size["slots"], main_args, peer)
            else:
                run.bench(name, bench_args, step_env)
            if name == "gpu" and peer and "peer" not in skip:
                run.peer_bench(peer, models, size)

        print(run.save())
        print(f"wrote {out}/results.json, summary.md, log.txt")
        failed = [n for n, s in run.steps.items() if s.get("rc") != 0]
        if failed:
            log(f"failed: {', '.join(failed)}")
        return 1 if failed else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
