#!/usr/bin/env python3
"""A stand-in for a GGUF model: its shape and scales kept, its quantized values made up.

    scripts/stand-in-model.py [--shape] [--head-size N] MODEL.gguf OUT.gguf

The stand-in has the model's header (architecture, tokenizer, tensor shapes and types), its
1-D float tensors (the norms) and the scales of every quantized block; the quantized values
themselves are random, and so are any larger float tensors (small values). llama.cpp loads it
and does the same work per token as for the model, with numbers of the same sizes; only its
answers are nonsense. It is for speed figures on a machine the model cannot reach whole.

On the 2-core machine, in four alternated pairs per model of `backstop bench -p 128 -n 64
--parallel 4 -r 3`, stand-in over model ranged 0.84-1.25 from pair to pair, medians 1.05 (pp),
1.11 (tg), 1.04 (x4) for SmolLM2 and 0.92, 1.03, 0.97 for Gemma 3 270M: no difference that
machine's noise (10-20% per run) can show. Cruder stand-ins showed one: with all-zero weights
both models decoded 20-30% faster in every run, and with plain random bytes (NaNs, huge
scales) SmolLM2 came out 5-15% slower.

`--shape` writes the part that is kept and zeroes the values, which compresses well
(`xz -9`: SmolLM2's 98 MB to 9.9 MB, Gemma 3 270M's 253 MB to 13.8 MB): carry that,
and run this script on it at the other end to make the stand-in there.

`--head-size N` (a `llama` model only) also makes each attention head N wide: the query,
key, value and output projections are resized (their blocks' scales taken in turn from the
model's), and the header says so (`key_length`, `value_length`, the rotary dimension). It is
for asking how a kernel choice goes with head size without a model of each size at hand: on
the 2-core machine, flash attention against SmolLM2 made 64, 128 and 256 wide (see
`flash_attention` in src/engine/loader.rs).

`--like SHAPE [--layers N]` makes a model that exists nowhere here: a published model's
attention and feed-forward shape (one of LIKE's names; `gpt-oss-tiny` is gpt-oss's layout at a
size for tests, 8 experts 256 wide), with MODEL.gguf's tokenizer, F16
weights of small random values and, with `--layers`, fewer layers in the same pattern of
sliding-window and whole-context ones. `backstop quantize` then gives it a type (gpt-oss:
MXFP4_MOE, its published one). It is for asking how a kernel choice goes with a model's shape
before deciding a default: on the 2-core machine, Gemma 3 270M made so with Gemma's tokenizer
measured with and without flash attention as the real model does (see `flash_attention` in
src/engine/loader.rs).

Types with a known block layout only (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K-Q6_K).
Only the standard library. The GGUF layout: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md;
the block layouts: ggml's ggml-common.h.
"""

import argparse
import os
import struct
import sys

# Fixed sizes of GGUF's scalar value types; 8 is a string, 9 an array.
SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

# ggml type: (name, elements per block, bytes per block, the byte ranges of a block that hold
# its scales: kept from the model, the rest made up).
BLOCKS = {
    0: ("F32", 1, 4, []),
    1: ("F16", 1, 2, []),
    30: ("BF16", 1, 2, []),
    2: ("Q4_0", 32, 18, [(0, 2)]),
    3: ("Q4_1", 32, 20, [(0, 4)]),
    6: ("Q5_0", 32, 22, [(0, 2)]),
    7: ("Q5_1", 32, 24, [(0, 4)]),
    8: ("Q8_0", 32, 34, [(0, 2)]),
    10: ("Q2_K", 256, 84, [(0, 16), (80, 84)]),
    11: ("Q3_K", 256, 110, [(96, 110)]),
    12: ("Q4_K", 256, 144, [(0, 16)]),
    13: ("Q5_K", 256, 176, [(0, 16)]),
    14: ("Q6_K", 256, 210, [(192, 210)]),
}
FLOATS = ("F32", "F16", "BF16")


class Header:
    def __init__(self, f):
        self.f = f

    def read(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise ValueError("the file ends inside its GGUF header")
        return b

    def u32(self) -> int:
        return struct.unpack("<I", self.read(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.read(8))[0]

    def string(self) -> bytes:
        return self.read(self.u64())

    def value(self, kind: int):
        if kind in SCALAR:
            raw = self.read(SCALAR[kind])
            return int.from_bytes(raw, "little") if kind in (4, 10) else raw
        if kind == 8:
            return self.string()
        if kind == 9:
            item, count = self.u32(), self.u64()
            if item in SCALAR:
                self.f.seek(SCALAR[item] * count, os.SEEK_CUR)
            else:
                for _ in range(count):
                    self.value(item)
            return None
        raise ValueError(f"unknown GGUF value type {kind}")


def header(path: str):
    """The GGUF version, each metadata entry as (key, value, its bytes in the file), the tensor
    data's alignment, each tensor's (name, dimensions, type, offset), and where the tensor data
    starts. A value is an int (u32, u64), bytes (a string, another scalar), or None (an array)."""
    with open(path, "rb") as f:
        h = Header(f)
        if h.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        version = h.u32()
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not 2 or 3")
        count, kvs = h.u64(), h.u64()
        alignment = 32
        entries = []
        for _ in range(kvs):
            at = f.tell()
            key = h.string()
            value = h.value(h.u32())
            end = f.tell()
            f.seek(at)
            entries.append((key, value, f.read(end - at)))
            if key == b"general.alignment" and isinstance(value, int):
                alignment = value
        tensors = []
        for _ in range(count):
            name = h.string().decode(errors="replace")
            dims = [h.u64() for _ in range(h.u32())]
            tensors.append((name, dims, h.u32(), h.u64()))
        end = f.tell()
    return version, entries, alignment, tensors, aligned(end, alignment)


def layout(path: str):
    """Where the tensor data starts, and each tensor's (name, dimensions, type, offset)."""
    _, _, _, tensors, start = header(path)
    return start, tensors


def aligned(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def entry(key: str | bytes, value) -> bytes:
    """One metadata entry: a u32 for an int, an f32 for a float, else a string."""
    raw = key.encode() if isinstance(key, str) else key
    head = struct.pack("<Q", len(raw)) + raw
    if isinstance(value, int):
        return head + struct.pack("<II", 4, value)
    if isinstance(value, float):
        return head + struct.pack("<If", 6, value)
    text = value.encode()
    return head + struct.pack("<IQ", 8, len(text)) + text


def gguf_header(version: int, entries: list[bytes], tensors, alignment: int):
    """A GGUF header of these metadata `entries` and `tensors` (name, dimensions, type), padded
    to `alignment`; each tensor's offset in the data after it; and the data's length."""
    info, offsets, offset = b"", [], 0
    for name, dims, ggml_type in tensors:
        raw = name.encode()
        info += struct.pack("<Q", len(raw)) + raw + struct.pack("<I", len(dims))
        info += b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", ggml_type, offset)
        offsets.append(offset)
        offset = aligned(offset + tensor_bytes(dims, ggml_type), alignment)
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(entries)) + b"".join(entries) + info
    return head + bytes(aligned(len(head), alignment) - len(head)), offsets, offset


def with_head_size(path: str, parsed, head: int):
    """The header of `path` (`parsed` by [`header`]) with every attention head `head` wide, as
    bytes; each tensor's (name, new dimensions, type, offset in the model, new offset); and
    the new tensor data's length. Every tensor type must be in BLOCKS."""
    version, entries, alignment, tensors, _ = parsed
    meta = {k: v for k, v, _ in entries}
    if meta.get(b"general.architecture") != b"llama":
        raise ValueError(f"{path}: --head-size knows the llama architecture's projections only")
    heads, kv_heads = meta.get(b"llama.attention.head_count"), meta.get(b"llama.attention.head_count_kv")
    if not isinstance(heads, int) or not isinstance(kv_heads, int):
        raise ValueError(f"{path}: no head counts (llama.attention.head_count, _kv) in its header")
    replaced = [b"llama.attention.key_length", b"llama.attention.value_length",
                b"llama.rope.dimension_count"]
    kv = [raw for k, _, raw in entries if k not in replaced] + [entry(k, head) for k in replaced]
    resized = []
    for name, dims, ggml_type, _ in tensors:
        dims = list(dims)
        if name.endswith("attn_q.weight"):
            dims[1] = heads * head
        elif name.endswith(("attn_k.weight", "attn_v.weight")):
            dims[1] = kv_heads * head
        elif name.endswith("attn_output.weight"):
            dims[0] = heads * head
        per_block = BLOCKS[ggml_type][1]
        if dims[0] % per_block:
            raise ValueError(f"{name}: rows of {dims[0]} do not fill {BLOCKS[ggml_type][0]}'s "
                             f"{per_block}-element blocks; choose another head size")
        resized.append((name, dims, ggml_type))
    head_bytes, offsets, length = gguf_header(version, kv, resized, alignment)
    out = [(name, dims, ggml_type, source, new)
           for (name, dims, ggml_type), (_, _, _, source), new in zip(resized, tensors, offsets)]
    return head_bytes, out, length


def cycled(data: bytes, n: int) -> bytes:
    """`data` repeated to `n` bytes (whole blocks of it, as both lengths are)."""
    return (data * (n // len(data) + 1))[:n]


def small_floats(count: int, kind: str) -> bytes:
    """`count` random floats of about 2**-6, either sign, little-endian."""
    if kind == "F16":  # s eeeee mm: exponent 9 (2**-6), two random mantissa bits
        data = bytearray(os.urandom(count * 2))
        data[1::2] = data[1::2].translate(bytes((b & 0x83) | (9 << 2) for b in range(256)))
        return bytes(data)
    width = 4 if kind == "F32" else 2
    data = bytearray(os.urandom(count * width))
    # The top byte holds the sign and the exponent's top 7 bits; the next one's top bit is
    # the exponent's lowest: 121 = 0b1111001 (2**-6).
    top = bytes((b & 0x80) | (121 >> 1) for b in range(256))
    data[width - 1::width] = data[width - 1::width].translate(top)
    data[width - 2::width] = data[width - 2::width].translate(bytes(b | 0x80 for b in range(256)))
    return bytes(data)


def stand_in(source: bytes, dims: list[int], ggml_type: int, shape_only: bool) -> bytes:
    """A tensor's data: the model's norms and block scales, the rest made up (or zero)."""
    name, _, block_bytes, kept = BLOCKS[ggml_type]
    if name in FLOATS:
        if len(dims) == 1:
            return source  # norms: tiny, and their sizes shape every activation
        if shape_only:
            return bytes(len(source))
        return small_floats(len(source) // block_bytes, name)
    data = bytearray(len(source)) if shape_only else bytearray(os.urandom(len(source)))
    for start, end in kept:
        for b in range(start, end):
            data[b::block_bytes] = source[b::block_bytes]
    return bytes(data)


def tensor_bytes(dims: list[int], ggml_type: int) -> int:
    _, per_block, block_bytes, _ = BLOCKS[ggml_type]
    elements = 1
    for d in dims:
        elements *= d
    return elements // per_block * block_bytes


# Published shapes, from each model's config.json on Hugging Face (google/gemma-3-270m,
# google/gemma-3-1b-pt, google/gemma-3-4b-pt, google/gemma-2-2b, openai/gpt-oss-20b): hidden
# size, query and key/value heads, head width, feed-forward width, sliding window, layers,
# and what else the architecture's header needs. The layer pattern is llama.cpp's for the
# architecture (gemma3: 5 windowed layers, then a whole-context one; gemma2 and gpt-oss: every
# other one windowed).
LIKE = {
    "gemma3-270m": ("gemma3", 640, 4, 1, 256, 2048, 512, 18, {}),
    "gemma3-1b": ("gemma3", 1152, 4, 1, 256, 6912, 512, 26, {}),
    "gemma3-4b": ("gemma3", 2560, 8, 4, 256, 10240, 1024, 34, {}),
    "gemma2-2b": ("gemma2", 2304, 8, 4, 256, 9216, 4096, 26,
                  {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}),
    "gpt-oss-20b": ("gpt-oss", 2880, 64, 8, 64, 2880, 128, 24,
                    {"expert_count": 32, "expert_used_count": 4,
                     "attention.layer_norm_rms_epsilon": 1e-5,
                     "expert_feed_forward_length": 2880, "rope.scaling.type": "yarn",
                     "rope.scaling.factor": 32.0, "rope.scaling.original_context_length": 4096}),
    # Not a published model: gpt-oss's layout at a size a test can make and run in seconds
    # (8 experts 256 wide, 2 used per token), for what only a mixture of experts exercises.
    "gpt-oss-tiny": ("gpt-oss", 256, 4, 1, 64, 256, 128, 2,
                     {"expert_count": 8, "expert_used_count": 2,
                      "attention.layer_norm_rms_epsilon": 1e-5,
                      "expert_feed_forward_length": 256, "rope.scaling.type": "yarn",
                      "rope.scaling.factor": 32.0, "rope.scaling.original_context_length": 4096}),
}


def like_tensors(arch: str, hidden, heads, kv_heads, head, ff, layers, vocab, extra):
    """Each tensor of the architecture's layout as (name, ggml dimensions, ggml type):
    llama.cpp's names and shapes for gemma2, gemma3 and gpt-oss (its src/models/*.cpp); F32
    vectors and biases (llama.cpp adds experts' biases in F32 only), F16 matrices."""
    q, kv = heads * head, kv_heads * head
    out = [("token_embd.weight", [hidden, vocab]), ("output_norm.weight", [hidden])]
    if arch == "gpt-oss":
        out.append(("output.weight", [hidden, vocab]))
    for i in range(layers):
        p = f"blk.{i}."
        out += [(p + "attn_norm.weight", [hidden]), (p + "attn_q.weight", [hidden, q]),
                (p + "attn_k.weight", [hidden, kv]), (p + "attn_v.weight", [hidden, kv]),
                (p + "attn_output.weight", [q, hidden]),
                (p + "post_attention_norm.weight", [hidden])]
        if arch == "gpt-oss":
            n = extra["expert_count"]
            out += [(p + "attn_q.bias", [q]), (p + "attn_k.bias", [kv]),
                    (p + "attn_v.bias", [kv]), (p + "attn_output.bias", [hidden]),
                    (p + "attn_sinks.weight", [heads]),
                    (p + "ffn_gate_inp.weight", [hidden, n]), (p + "ffn_gate_inp.bias", [n]),
                    (p + "ffn_gate_exps.weight", [hidden, ff, n]),
                    (p + "ffn_up_exps.weight", [hidden, ff, n]),
                    (p + "ffn_down_exps.weight", [ff, hidden, n]),
                    (p + "ffn_gate_exps.bias", [ff, n]), (p + "ffn_up_exps.bias", [ff, n]),
                    (p + "ffn_down_exps.bias", [hidden, n])]
            continue
        if arch == "gemma3":
            out += [(p + "attn_q_norm.weight", [head]), (p + "attn_k_norm.weight", [head])]
        out += [(p + "ffn_norm.weight", [hidden]), (p + "ffn_gate.weight", [hidden, ff]),
                (p + "ffn_up.weight", [hidden, ff]), (p + "ffn_down.weight", [ff, hidden]),
                (p + "post_ffw_norm.weight", [hidden])]
    return [(name, dims, 0 if len(dims) == 1 or name.endswith(".bias") else 1)
            for name, dims in out]


def write_like(src: str, parsed, shape: str, layers, out: str) -> str:
    """Writes `shape` (a LIKE name) with `src`'s tokenizer to `out`; says what it wrote."""
    arch, hidden, heads, kv_heads, head, ff, window, full, extra = LIKE[shape]
    layers = layers or full
    version, entries, _, _, _ = parsed
    alignment = 32  # GGUF's default: the source's general.alignment is not carried over
    tokenizer = [(k, raw) for k, _, raw in entries if k.startswith(b"tokenizer.")]
    tokens = [raw for k, raw in tokenizer if k == b"tokenizer.ggml.tokens"]
    if not tokens:
        raise ValueError(f"{src} has no tokenizer (tokenizer.ggml.tokens) to lend")
    # The array's entry: key length, key, type 9, item type, then the count.
    vocab = struct.unpack_from("<Q", tokens[0], 8 + len(b"tokenizer.ggml.tokens") + 8)[0]
    meta = {"context_length": 32768, "embedding_length": hidden, "block_count": layers,
            "feed_forward_length": ff, "attention.head_count": heads,
            "attention.head_count_kv": kv_heads, "attention.key_length": head,
            "attention.value_length": head, "attention.sliding_window": window,
            "attention.layer_norm_rms_epsilon": 1e-6,
            "rope.freq_base": 150000.0 if arch == "gpt-oss" else 1000000.0, **extra}
    kv = ([entry("general.architecture", arch), entry("general.name", f"stand-in like {shape}"),
           entry("general.file_type", 1)]
          + [entry(f"{arch}.{k}", v) for k, v in meta.items()] + [raw for _, raw in tokenizer])
    tensors = like_tensors(arch, hidden, heads, kv_heads, head, ff, layers, vocab, extra)
    head_bytes, offsets, length = gguf_header(version, kv, tensors, alignment)
    start = len(head_bytes)
    tmp = out + ".partial"
    with open(tmp, "wb") as o:
        o.write(head_bytes)
        o.truncate(start + length)
        for (name, dims, ggml_type), at in zip(tensors, offsets):
            o.seek(start + at)
            if ggml_type == 1:
                o.write(small_floats(tensor_bytes(dims, 1) // 2, "F16"))
            elif name.endswith("norm.weight"):
                o.write(struct.pack("<f", 1.0) * dims[0])
            # Biases and attention sinks stay zero.
    os.replace(tmp, out)
    return (f"like {shape}: {layers} layers, {len(tensors)} tensors, vocabulary of {vocab} "
            f"from {os.path.basename(src)}")


def whole_number(text: str) -> int:
    """A positive whole number, for argparse."""
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"takes a whole number, not {text!r}")
    return int(text)


def main() -> int:
    ap = argparse.ArgumentParser(
        usage="%(prog)s [--shape] [--head-size N] MODEL.gguf OUT.gguf\n"
              "       %(prog)s --like SHAPE [--layers N] MODEL.gguf OUT.gguf")
    ap.add_argument("model", metavar="MODEL.gguf")
    ap.add_argument("out", metavar="OUT.gguf")
    ap.add_argument("--shape", action="store_true", help="keep the shape and scales, zero the rest")
    ap.add_argument("--head-size", type=whole_number, metavar="N",
                    help="every attention head N elements wide (a llama model)")
    ap.add_argument("--like", choices=list(LIKE), metavar="SHAPE",
                    help=f"a published model's shape: {', '.join(LIKE)}")
    ap.add_argument("--layers", type=whole_number, metavar="N", help="with --like: N layers")
    args = ap.parse_args()
    if args.layers and not args.like:
        ap.error("--layers needs --like SHAPE")
    if args.like and (args.shape or args.head_size):
        ap.error("--like SHAPE makes a model of its own: no --shape or --head-size with it")
    src, out, shape_only, head, like = args.model, args.out, args.shape, args.head_size, args.like
    layers = args.layers
    if like:
        try:
            print(f"{out}: {write_like(src, header(src), like, layers, out)}")
        except (OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    try:
        parsed = header(src)
        _, _, _, tensors, start = parsed
        unknown = sorted({t for _, _, t, _ in tensors if t not in BLOCKS})
        if unknown:
            raise ValueError(f"{src}: ggml tensor types {unknown} have no block layout here")
        if head is not None:
            new_header, resized, data_bytes = with_head_size(src, parsed, head)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    size = os.path.getsize(src)
    short = [n for n, dims, t, offset in tensors if start + offset + tensor_bytes(dims, t) > size]
    if short:
        print(f"error: {src} ends inside tensor {short[0]}: the file is truncated", file=sys.stderr)
        return 1
    tmp = out + ".partial"
    with open(src, "rb") as f, open(tmp, "wb") as o:
        if head is None:
            o.write(f.read(start))
            o.truncate(size)  # zeros that take no disk until written
            for _, dims, ggml_type, offset in tensors:
                f.seek(start + offset)
                data = stand_in(f.read(tensor_bytes(dims, ggml_type)), dims, ggml_type, shape_only)
                o.seek(start + offset)
                o.write(data)
        else:
            o.write(new_header)
            o.truncate(len(new_header) + data_bytes)
            old_dims = {name: dims for name, dims, _, _ in tensors}
            for name, dims, ggml_type, offset, new_offset in resized:
                f.seek(start + offset)
                source = f.read(tensor_bytes(old_dims[name], ggml_type))
                source = cycled(source, tensor_bytes(dims, ggml_type))
                o.seek(len(new_header) + new_offset)
                o.write(stand_in(source, dims, ggml_type, shape_only))
    os.replace(tmp, out)
    what = "its shape and scales" if shape_only else "a stand-in"
    if head is not None:
        what += f", its attention heads {head} wide"
        start = len(new_header)
    print(f"{out}: {what} ({len(tensors)} tensors after a {start}-byte header)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
