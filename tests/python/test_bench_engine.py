"""scripts/bench-engine.py pairs `backstop bench`'s figures with llama-bench's by model, depth and
test. Our side is the real binary's JSON on the real model, so a change to that JSON that the
script does not follow fails here; llama-bench's side is its `-o json` shape as llama.cpp
0c1e57098 writes it (the peer is built only for benchmarks, not in CI)."""

import importlib.util
import json
import pathlib
import subprocess

import pytest

from conftest import SMOLLM2, binary, model

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "bench-engine.py"
spec = importlib.util.spec_from_file_location("bench_engine", SCRIPT)
bench_engine = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_engine)


def llama_bench_result(n_prompt: int, n_gen: int, n_depth: int, samples: list[float]) -> dict:
    return {
        "build_commit": "0c1e57098",
        "model_filename": f"/somewhere/else/{SMOLLM2}",
        "n_batch": 512,
        "n_ubatch": 512,
        "n_threads": 2,
        "flash_attn": 1,
        "n_prompt": n_prompt,
        "n_gen": n_gen,
        "n_depth": n_depth,
        "avg_ts": sum(samples) / len(samples),
        "samples_ts": samples,
    }


def test_each_test_and_depth_is_paired_with_llama_benchs():
    report = json.loads(subprocess.run(
        [binary(), "bench", "-p", "16,32", "-n", "4", "-d", "0,16", "--pg", "16,4", "-r", "1", "-t", "2",
         "--format", "json", str(model(SMOLLM2))],
        capture_output=True, text=True, check=True,
    ).stdout)
    got = bench_engine.ours(report)
    keys = [(SMOLLM2, d, t) for d in (0, 16) for t in ("pp16", "pp32", "tg4", "pp16+tg4")]
    assert sorted(got) == sorted(keys), got
    assert all(v > 0 for v in got.values()), got

    peer = [llama_bench_result(p, n, d, [100.0, 300.0, 200.0])
            for d in (0, 16) for p, n in ((16, 0), (32, 0), (0, 4), (16, 4))]
    # A test of neither has no counterpart and is left out.
    peer.append(llama_bench_result(0, 0, 0, [50.0]))
    theirs = bench_engine.theirs(peer)
    assert sorted(theirs) == sorted(keys), theirs
    # The median of the samples, as backstop reports, not llama-bench's mean.
    assert set(theirs.values()) == {200.0}

    rounds = [({k: 2 * v for k, v in theirs.items()}, theirs),
              ({k: 0.5 * v for k, v in theirs.items()}, theirs),
              ({k: 1.1 * v for k, v in theirs.items()}, theirs)]
    rows = bench_engine.ratios(rounds)
    assert len(rows) == 8
    for r in rows:
        assert r["ratio"] == pytest.approx(1.1)
        assert (r["ratio_min"], r["ratio_max"]) == pytest.approx((0.5, 2.0))
        assert r["llama_bench"] == 200.0 and r["backstop"] == pytest.approx(220.0)
    # A test one side lacks in any round is not compared.
    del rounds[1][1][keys[0]]
    assert len(bench_engine.ratios(rounds)) == 7
    assert "| SmolLM2-135M-Instruct.Q4_1.gguf | pp16 | 16 |" in bench_engine.table(rows)
