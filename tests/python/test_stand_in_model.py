"""scripts/stand-in-model.py: the stand-in keeps the model's header, norms and block scales, makes
up the rest, and the real binary loads and measures it as it would the model."""

import importlib.util
import json
import math
import pathlib
import struct
import subprocess
import sys

import pytest

from conftest import GEMMA3, SMOLLM2, binary, model

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "stand-in-model.py"
spec = importlib.util.spec_from_file_location("stand_in_model", SCRIPT)
stand_in_model = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stand_in_model)


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def parts(path: pathlib.Path):
    """(header, norms, scales, values) of a GGUF file, each as one bytes object."""
    start, tensors = stand_in_model.layout(str(path))
    data = path.read_bytes()
    norms, scales, values = bytearray(), bytearray(), bytearray()
    for _, dims, ggml_type, offset in tensors:
        name, _, block, kept = stand_in_model.BLOCKS[ggml_type]
        t = data[start + offset:start + offset + stand_in_model.tensor_bytes(dims, ggml_type)]
        if name in stand_in_model.FLOATS:
            (norms if len(dims) == 1 else values).extend(t)
            continue
        keep = {b for s, e in kept for b in range(s, e)}
        for b in range(block):
            (scales if b in keep else values).extend(t[b::block])
    return data[:start], bytes(norms), bytes(scales), bytes(values)


@pytest.mark.parametrize("file", [SMOLLM2, GEMMA3])
def test_a_stand_in_is_the_model_with_its_values_made_up(tmp_path, file):
    real = model(file)
    shape, stand_in = tmp_path / "shape.gguf", tmp_path / "stand-in.gguf"
    assert run("--shape", str(real), str(shape)).returncode == 0
    assert run(str(shape), str(stand_in)).returncode == 0
    assert shape.stat().st_size == stand_in.stat().st_size == real.stat().st_size

    header, norms, scales, values = parts(real)
    assert len(norms) > 0 and len(scales) > 0 and len(values) > len(scales)
    s_header, s_norms, s_scales, s_values = parts(shape)
    assert (s_header, s_norms, s_scales) == (header, norms, scales)
    assert s_values.count(0) == len(s_values)
    i_header, i_norms, i_scales, i_values = parts(stand_in)
    assert (i_header, i_norms, i_scales) == (header, norms, scales)
    # Random bytes: about 1 in 256 matches the model's by chance.
    same = sum(a == b for a, b in zip(i_values[:1 << 20], values[:1 << 20]))
    assert same < (1 << 20) / 64, same
    assert i_values.count(0) < len(i_values) / 64

    out = subprocess.run([binary(), "bench", "-p", "16", "-n", "8", "-r", "1", "-t", "2",
                          "--format", "json", str(real), str(stand_in)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)["results"]
    for key in ("quantization", "parameters", "architecture", "size"):
        assert got[0][key] == got[1][key], (key, got)
    assert all(r["tg"]["median"] > 0 for r in got), got


def test_what_is_not_a_gguf_model_is_refused_and_nothing_is_written(tmp_path):
    notes = tmp_path / "notes.gguf"
    notes.write_bytes(b"not a model at all")
    out = tmp_path / "out.gguf"
    r = run(str(notes), str(out))
    assert r.returncode == 1 and "not a GGUF file" in r.stderr, r.stderr
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(model(SMOLLM2).read_bytes()[:4096])
    r = run(str(truncated), str(out))
    assert r.returncode == 1 and "ends inside its GGUF header" in r.stderr, r.stderr
    # The header whole, the weights cut short.
    truncated.write_bytes(model(SMOLLM2).read_bytes()[:50_000_000])
    r = run(str(truncated), str(out))
    assert r.returncode == 1 and "ends inside tensor" in r.stderr, r.stderr
    assert run().returncode == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.gguf", "truncated.gguf"]


def test_a_head_size_stand_in_resizes_the_attention_and_loads(tmp_path):
    real = model(SMOLLM2)
    shape, wide = tmp_path / "shape-128.gguf", tmp_path / "wide-128.gguf"
    r = run("--shape", "--head-size", "128", str(real), str(shape))
    assert r.returncode == 0, r.stderr
    assert run(str(shape), str(wide)).returncode == 0

    _, entries, _, tensors, _ = stand_in_model.header(str(wide))
    meta = {k: v for k, v, _ in entries}
    heads, kv_heads = meta[b"llama.attention.head_count"], meta[b"llama.attention.head_count_kv"]
    assert (heads, kv_heads) == (9, 3)
    for key in (b"llama.attention.key_length", b"llama.attention.value_length",
                b"llama.rope.dimension_count"):
        assert meta[key] == 128, key
    assert len(entries) == len(stand_in_model.header(str(real))[1]) + 2  # rope's was there
    dims = {name: d for name, d, _, _ in tensors}
    real_dims = {name: d for name, d, _, _ in stand_in_model.layout(str(real))[1]}
    assert dims["blk.0.attn_q.weight"] == [576, 9 * 128]
    assert dims["blk.0.attn_k.weight"] == dims["blk.0.attn_v.weight"] == [576, 3 * 128]
    assert dims["blk.0.attn_output.weight"] == [9 * 128, 576]
    assert dims["blk.0.ffn_up.weight"] == real_dims["blk.0.ffn_up.weight"]

    out = subprocess.run([binary(), "bench", "-p", "16", "-n", "8", "-r", "1", "-t", "2",
                          "--format", "json", str(real), str(wide)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)["results"]
    # 30 layers, each with 2 x 576 x 9 x 64 more (q, output) and 2 x 576 x 3 x 64 (k, v):
    # 26.54M, in the report's millions.
    millions = [float(r["parameters"].removesuffix("M")) for r in got]
    assert round(millions[1] - millions[0], 2) == round(30 * 2 * 576 * 12 * 64 / 1e6, 2), got
    assert got[1]["tg"]["median"] > 0, got


def test_a_head_size_that_cannot_be_made_is_refused_and_nothing_is_written(tmp_path):
    out = tmp_path / "out.gguf"
    r = run("--head-size", "100", str(model(SMOLLM2)), str(out))
    assert r.returncode == 1 and "do not fill Q4_1's 32-element blocks" in r.stderr, r.stderr
    r = run("--head-size", "128", str(model(GEMMA3)), str(out))
    assert r.returncode == 1 and "llama architecture" in r.stderr, r.stderr
    r = run("--head-size", "wide", str(model(SMOLLM2)), str(out))
    assert r.returncode == 2 and "whole number" in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_model_like_a_published_shape_has_its_layout_and_loads(tmp_path):
    real = model(SMOLLM2)
    like, quantized = tmp_path / "like.gguf", tmp_path / "like-q8.gguf"
    r = run("--like", "gemma3-270m", "--layers", "2", str(real), str(like))
    assert r.returncode == 0, r.stderr
    assert "2 layers, 28 tensors, vocabulary of 49152" in r.stdout, r.stdout

    _, entries, _, tensors, start = stand_in_model.header(str(like))
    meta = {k: v for k, v, _ in entries}
    assert meta[b"general.architecture"] == b"gemma3"
    for key, value in [(b"block_count", 2), (b"embedding_length", 640),
                       (b"attention.head_count", 4), (b"attention.head_count_kv", 1),
                       (b"attention.key_length", 256), (b"attention.sliding_window", 512)]:
        assert meta[b"gemma3." + key] == value, key
    # The tokenizer is the source's, entry for entry.
    lent = [raw for k, _, raw in stand_in_model.header(str(real))[1] if k.startswith(b"tokenizer.")]
    assert [raw for k, _, raw in entries if k.startswith(b"tokenizer.")] == lent
    dims = {name: (d, t) for name, d, t, _ in tensors}
    assert dims["token_embd.weight"] == ([640, 49152], 1)
    assert dims["blk.1.attn_q.weight"] == ([640, 4 * 256], 1)
    assert dims["blk.1.attn_k.weight"] == ([640, 256], 1)
    assert dims["blk.1.ffn_down.weight"] == ([2048, 640], 1)
    assert dims["blk.1.attn_q_norm.weight"] == ([256], 0)
    assert "output.weight" not in dims  # Gemma ties its output to the embeddings
    data = like.read_bytes()
    name, offset = "blk.0.attn_norm.weight", next(o for n, _, _, o in tensors if n == "blk.0.attn_norm.weight")
    assert data[start + offset:start + offset + 640 * 4] == struct.pack("<f", 1.0) * 640, name

    # llama.cpp loads it and runs it, with every parameter counted, and quantizes it.
    params = sum(math.prod(d) for d, _ in dims.values())
    r = subprocess.run([binary(), "quantize", str(like), str(quantized), "Q8_0"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = subprocess.run([binary(), "bench", "-p", "16", "-n", "4", "-r", "1", "-t", "2",
                          "--format", "json", str(like), str(quantized)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)["results"]
    assert [r["architecture"] for r in got] == ["gemma3", "gemma3"], got
    assert [r["quantization"] for r in got] == ["F16", "Q8_0"], got
    assert got[0]["parameters"] == f"{params / 1e6:.2f}M", (params, got)
    assert all(r["tg"]["median"] > 0 for r in got), got


def test_gpt_oss_is_laid_out_as_llama_cpp_reads_it():
    arch, hidden, heads, kv_heads, head, ff, _, _, extra = stand_in_model.LIKE["gpt-oss-20b"]
    tensors = stand_in_model.like_tensors(arch, hidden, heads, kv_heads, head, ff, 2, 1000, extra)
    dims = {name: (d, t) for name, d, t in tensors}
    assert dims["blk.1.ffn_gate_exps.weight"] == ([2880, 2880, 32], 1)
    assert dims["blk.1.ffn_down_exps.weight"] == ([2880, 2880, 32], 1)
    assert dims["blk.1.attn_q.weight"] == ([2880, 64 * 64], 1)
    assert dims["blk.1.attn_k.weight"] == ([2880, 8 * 64], 1)
    assert dims["blk.1.attn_sinks.weight"] == ([64], 0)
    assert dims["output.weight"] == ([2880, 1000], 1)
    # Every bias in F32, the experts' 2-D ones too: llama.cpp's CPU backend adds them in F32 only.
    biases = [(n, t) for n, _, t in tensors if n.endswith(".bias")]
    assert len(biases) == 2 * 8 and all(t == 0 for _, t in biases), biases
    assert dims["blk.0.ffn_up_exps.bias"] == ([2880, 32], 0)


def test_a_shape_that_cannot_be_made_is_refused_and_nothing_is_written(tmp_path):
    out = tmp_path / "out.gguf"
    r = run("--like", "llama-9000", str(model(SMOLLM2)), str(out))
    assert r.returncode == 2 and "gpt-oss-20b" in r.stderr, r.stderr
    r = run("--like", "gemma3-1b", "--layers", "0", str(model(SMOLLM2)), str(out))
    assert r.returncode == 2 and "whole number" in r.stderr, r.stderr
    r = run("--layers", "2", str(model(SMOLLM2)), str(out))
    assert r.returncode == 2 and "--like SHAPE" in r.stderr, r.stderr
    r = run("--like", "gemma3-1b", "--shape", str(model(SMOLLM2)), str(out))
    assert r.returncode == 2, r.stderr
    bare = tmp_path / "bare.gguf"
    bare.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 0))
    r = run("--like", "gemma3-1b", str(bare), str(out))
    assert r.returncode == 1 and "no tokenizer" in r.stderr, r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["bare.gguf"]


def imatrix_entries(path: pathlib.Path) -> dict:
    """An imatrix GGUF's entries: name -> (sums, counts), read with the script's own parser."""
    start, tensors = stand_in_model.layout(str(path))
    data = path.read_bytes()
    values = {}
    for name, dims, ggml_type, offset in tensors:
        assert ggml_type == 0, name  # F32
        n = math.prod(dims)
        values[name] = struct.unpack_from(f"<{n}f", data, start + offset)
    return {name[:-len(".in_sum2")]: (values[name], values[name[:-len(".in_sum2")] + ".counts"])
            for name in values if name.endswith(".in_sum2")}


def test_a_mixture_of_experts_gets_an_importance_matrix_per_expert(tmp_path):
    """`backstop imatrix` on a small gpt-oss-like stand-in (8 experts, 2 used per token): each
    expert tensor gets sums and a row count per expert, every token counted once per pick, and
    `quantize --imatrix` takes the matrix for a type that needs one."""
    moe, matrix, quantized = tmp_path / "moe.gguf", tmp_path / "moe.imatrix.gguf", tmp_path / "q.gguf"
    r = run("--like", "gpt-oss-tiny", str(model(SMOLLM2)), str(moe))
    assert r.returncode == 0, r.stderr
    readme = pathlib.Path(__file__).resolve().parents[2] / "README.md"
    r = subprocess.run([binary(), "imatrix", str(moe), "-f", str(readme), "-o", str(matrix),
                        "--chunk", "128", "--chunks", "2", "-t", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    # Per layer: attention q, k, v, output, the router, and the three expert tensors.
    assert "16 weight matrices from 2 chunks of 128 tokens" in r.stdout, r.stdout
    entries = imatrix_entries(matrix)
    assert len(entries) == 16, sorted(entries)
    tokens = 2 * 128
    for layer in (0, 1):
        for kind in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
            sums, counts = entries[f"blk.{layer}.{kind}.weight"]
            assert len(counts) == 8 and len(sums) == 8 * 256, kind
            # Each token picked two experts: its row was counted for each.
            assert sum(counts) == 2 * tokens, (kind, counts)
            # An expert's sums are positive exactly where it was picked.
            for e in range(8):
                picked = any(s > 0 for s in sums[e * 256:(e + 1) * 256])
                assert picked == (counts[e] > 0), (kind, e, counts)
        for kind in ("attn_q", "ffn_gate_inp"):
            sums, counts = entries[f"blk.{layer}.{kind}.weight"]
            assert counts == (float(tokens),) and len(sums) == 256, kind

    r = subprocess.run([binary(), "quantize", "--imatrix", str(matrix), str(moe), str(quantized),
                        "Q2_K_S"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    # The output layer is a matrix the quantizer would weigh too; by default it is not read.
    assert "importance matrix for 16 of 17 weight matrices" in r.stderr, r.stderr
    assert quantized.stat().st_size < moe.stat().st_size / 3

    # With --process-output it is: a row per token, as wide as the model.
    with_output = tmp_path / "with-output.imatrix.gguf"
    r = subprocess.run([binary(), "imatrix", str(moe), "-f", str(readme), "-o", str(with_output),
                        "--chunk", "128", "--chunks", "2", "-t", "2", "--process-output"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    entries = imatrix_entries(with_output)
    assert len(entries) == 17, sorted(entries)
    sums, counts = entries["output.weight"]
    assert counts == (float(tokens),) and len(sums) == 256 and min(sums) > 0
    r = subprocess.run([binary(), "quantize", "--imatrix", str(with_output), str(moe),
                        str(quantized), "Q2_K_S"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "importance matrix for 17 of 17 weight matrices" in r.stderr, r.stderr


def test_the_output_layer_options_reach_a_model_with_its_own_output_layer(tmp_path):
    """SmolLM2 and Gemma 3 share their output layer with the embeddings; the gpt-oss stand-in
    has its own, which `--output-tensor-type` sets and `--leave-output-tensor` leaves alone."""
    moe = tmp_path / "moe.gguf"
    assert run("--like", "gpt-oss-tiny", str(model(SMOLLM2)), str(moe)).returncode == 0

    def output_type(*args: str) -> int:
        out = tmp_path / "q.gguf"
        r = subprocess.run([binary(), "quantize", str(moe), str(out), "Q4_0", *args],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        _, tensors = stand_in_model.layout(str(out))
        return next(t for name, _, t, _ in tensors if name == "output.weight")

    f16, q8_0 = 1, 8
    assert output_type() not in (f16, q8_0)
    assert output_type("--output-tensor-type", "Q8_0") == q8_0
    assert output_type("--leave-output-tensor") == f16
