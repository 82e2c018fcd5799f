"""scripts/bench-gpu.py, the one command for a GPU machine, run here on the CPU the way it runs
there: a bundle to unpack (a wrapper around the real binary, as build-cuda-bundle.sh packs one),
a carried model shape to expand into a stand-in, a bench step and the served step, and its
three files. A step that fails is recorded and the others still run."""

import json
import lzma
import pathlib
import socket
import subprocess
import sys
import tarfile

import pytest

from conftest import SMOLLM2, binary, model

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "bench-gpu.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bundle(tmp: pathlib.Path) -> pathlib.Path:
    """A bundle laid out as build-cuda-bundle.sh packs one, around the binary under test."""
    top = tmp / "backstop-test-bundle"
    top.mkdir()
    wrapper = top / "backstop"
    wrapper.write_text(f'#!/bin/sh\nexec "{binary()}" "$@"\n')
    wrapper.chmod(0o755)
    (top / "BUILD").write_text("backstop test\nCPU code for x86-64-v3\n")
    path = tmp / "backstop-test-bundle.tar.xz"
    with tarfile.open(path, "w:xz") as tar:
        tar.add(top, arcname=top.name)
    return path


def shape(tmp: pathlib.Path) -> pathlib.Path:
    """SmolLM2's carried shape (stand-in-model.py --shape, xz-compressed)."""
    raw = tmp / "smollm2.shape"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "stand-in-model.py"), "--shape",
                    str(model(SMOLLM2)), str(raw)], check=True, capture_output=True)
    path = tmp / SMOLLM2.replace(".gguf", ".shape.gguf.xz")
    with open(raw, "rb") as src, lzma.open(path, "wb", preset=0) as dst:
        dst.write(src.read())
    return path


def run(tmp: pathlib.Path, out: str, *args: str, quick: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *(["--quick"] if quick else []), "--out", str(tmp / out),
                           "--port", str(free_port()), *args], capture_output=True, text=True, timeout=600)


def test_a_bundle_and_a_shape_give_bench_and_served_figures(tmp_path):
    done = run(tmp_path, "ok", "--backstop", str(bundle(tmp_path)),
               "--skip", "ladder,cpu,layers,batch,depth", str(shape(tmp_path)))
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "ok"
    assert sorted(p.name for p in out.iterdir()) == ["log.txt", "results.json", "summary.md"]
    results = json.loads((out / "results.json").read_text())
    assert results["quick"] is True
    assert results["machine"]["bundle"].startswith("backstop test"), results["machine"]
    assert list(results["steps"]) == ["gpu", "served"]

    gpu = results["steps"]["gpu"]
    assert gpu["rc"] == 0
    r, whole = gpu["figures"]["results"]
    # The stand-in carries the model's name, type and shape.
    assert (r["file"], r["quantization"], r["parameters"]) == (SMOLLM2, "Q4_1", "134.52M")
    assert (r["prompt"], r["generate"]) == (16, 4)
    assert r["pp"]["median"] > 0 and r["tg"]["median"] > 0
    assert [p["sequences"] for p in r["parallel"]] == [2, 4]
    # The same lengths again, as one request: one figure over both.
    assert (whole["prompt"], whole["generate"], whole["together"]) == (16, 4, True)
    assert whole["pg"]["median"] > 0 and whole["pp"] is None and whole["parallel"] == []

    served = results["steps"]["served"]
    assert served["rc"] == 0, served
    rows = served["figures"]["results"]
    assert [s["clients"] for s in rows] == [1, 2, 4]
    assert all(s["errors"] == 0 and s["tokens"] == 4 for s in rows), rows
    assert {s["model"] for s in rows} == {"smollm2-135m-instruct.q4_1"}

    summary = (out / "summary.md").read_text()
    assert "### gpu (rc 0" in summary and "### served (rc 0" in summary
    assert f"| {SMOLLM2} | Q4_1 | CPU |  | 512 | 0 | pp16 tg4 |" in summary, summary
    assert f"| {SMOLLM2} | Q4_1 | CPU |  | 512 | 0 | pp16+tg4 | " in summary, summary
    assert summary in done.stdout
    assert "==> gpu: " in (out / "log.txt").read_text()


def test_a_failing_step_is_recorded_and_the_next_still_runs(tmp_path):
    missing = tmp_path / "missing.gguf"
    done = run(tmp_path, "bad", "--backstop", binary(), "--skip", "ladder,cpu,layers,batch,depth",
               str(model(SMOLLM2)), str(missing))
    assert done.returncode == 1
    steps = json.loads((tmp_path / "bad" / "results.json").read_text())["steps"]
    assert steps["gpu"]["rc"] != 0 and steps["gpu"]["figures"] is None
    assert "missing.gguf" in steps["gpu"]["stderr_tail"]
    # The served step uses the first model only, which is there.
    assert steps["served"]["rc"] == 0
    assert [s["clients"] for s in steps["served"]["figures"]["results"]] == [1, 2, 4]
    summary = (tmp_path / "bad" / "summary.md").read_text()
    assert "no figures: " in summary and "missing.gguf" in summary
    assert "failed: gpu" in done.stderr


def test_a_step_that_fails_part_way_keeps_the_results_it_finished(tmp_path):
    # The second file's header reads, but its tensors were cut off: llama.cpp fails to load
    # it after the first model was measured.
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(model(SMOLLM2).read_bytes()[:10_000_000])
    done = run(tmp_path, "part", "--backstop", binary(),
               "--skip", "ladder,cpu,layers,batch,depth,served", str(model(SMOLLM2)), str(cut))
    assert done.returncode == 1
    gpu = json.loads((tmp_path / "part" / "results.json").read_text())["steps"]["gpu"]
    assert gpu["rc"] != 0 and "could not load" in gpu["stderr_tail"]
    assert [(r["file"], r["together"]) for r in gpu["figures"]["results"]] == \
        [(SMOLLM2, False), (SMOLLM2, True)]
    summary = (tmp_path / "part" / "summary.md").read_text()
    assert f"| {SMOLLM2} | Q4_1 | CPU |  | 512 | 0 | pp16 tg4 |" in summary, summary


def test_cuda_13_libraries_are_found_where_nvidias_wheels_put_them(tmp_path, monkeypatch):
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    bench_gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_gpu)
    site = tmp_path / "site-packages"
    for lib, folder in (("libcudart.so.13", "cu13/lib"), ("libcublas.so.13", "cublas/lib")):
        (site / "nvidia" / folder).mkdir(parents=True)
        (site / "nvidia" / folder / lib).touch()
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.delenv("LD_LIBRARY_PATH", raising=False)
    if bench_gpu.cuda_library_path() is not None:
        pytest.skip("this machine has CUDA 13's runtime where the bundle's wrapper looks already")
    monkeypatch.setattr(sys, "path", [str(site), *sys.path])
    found = bench_gpu.cuda_library_path().split(":")
    assert sorted(found) == sorted([str(site / "nvidia" / "cu13" / "lib"), str(site / "nvidia" / "cublas" / "lib")])
    # Once they are on LD_LIBRARY_PATH, nothing is added.
    monkeypatch.setenv("LD_LIBRARY_PATH", ":".join(found))
    assert bench_gpu.cuda_library_path() is None


def test_a_step_past_its_time_is_stopped_and_recorded(tmp_path):
    # The full sizes (pp512, tg128, 5 repetitions): no CPU runs that step within a second, where
    # --quick's finished in 0.9 s once llama.cpp multiplied with Intel AMX.
    done = run(tmp_path, "slow", "--backstop", binary(), "--step-timeout", "1",
               "--skip", "ladder,cpu,layers,batch,depth,served", str(model(SMOLLM2)), quick=False)
    assert done.returncode == 1
    step = json.loads((tmp_path / "slow" / "results.json").read_text())["steps"]["gpu"]
    assert step["rc"] == "timeout" and step["figures"] is None
    assert 1 <= step["seconds"] < 30
    assert "### gpu (rc timeout" in (tmp_path / "slow" / "summary.md").read_text()
