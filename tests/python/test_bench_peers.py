"""scripts/bench-peers.py gives every server backstop's chat template: it reads where the real
binary's template comes from in its load log and names it in each peer's own flags. A change
to that log line, or a template source the peers have no name for, fails here rather than in
a benchmark run (the peers themselves are built only for benchmarks, not in CI)."""

import importlib.util
import pathlib

import pytest

from conftest import GEMMA3, SMOLLM2, binary, model

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "bench-peers.py"
spec = importlib.util.spec_from_file_location("bench_peers", SCRIPT)
bench_peers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_peers)


def test_a_model_with_its_own_template_gives_the_peers_no_template_flags():
    source = bench_peers.template_source(pathlib.Path(binary()), model(SMOLLM2))
    assert source == "Gguf"
    for kind in ("llama-server", "llama-cpp-python"):
        assert bench_peers.peer_template_args(kind, source) == []


def test_a_model_without_one_gives_each_peer_backstops_fallback_by_its_own_name():
    source = bench_peers.template_source(pathlib.Path(binary()), model(GEMMA3))
    assert source == 'Architecture("gemma")'
    assert bench_peers.peer_template_args("llama-server", source) == [
        "--no-jinja", "--chat-template", "gemma"]
    assert bench_peers.peer_template_args("llama-cpp-python", source) == ["--chat_format", "gemma"]
    assert bench_peers.peer_template_args("llama-server", "DefaultChatml") == [
        "--no-jinja", "--chat-template", "chatml"]
    with pytest.raises(RuntimeError, match="PEER_TEMPLATES"):
        bench_peers.peer_template_args("llama-server", 'Architecture("mystery")')
