#!/usr/bin/env python3
"""Writes a random Llama-shaped model as a Q4_0 GGUF, for QLoRA benchmarks (bench/qlora.sh).

    python3 bench/make_llama_gguf.py OUT.gguf [--shape 8b|1b|tiny] [--seed 0]

Needs `pip install gguf numpy` (llama.cpp's gguf-py). Every 2-d weight, the token embedding and
the output head included, is written as valid random Q4_0 blocks (an f16 scale of about the size
a trained 8B model's has, 32 random 4-bit codes), so nothing is quantized here and an 8B file
(4.3 GiB) takes under a minute; the norms are f32 ones. Tensors are streamed to the file one at a
time, so the writer holds one tensor in memory. Shapes and hyper-parameters are those of the
model's config.json on the Hub (Llama-3.1-8B, Llama-3.2-1B); the llama3 RoPE scaling and its
`rope_freqs` tensor are left out (the model is random, only its shapes and costs matter).
"""

import argparse
import sys

import numpy as np

import gguf

SHAPES = {
    # meta-llama/Llama-3.1-8B
    "8b": dict(vocab=128256, hidden=4096, ffn=14336, layers=32, heads=32, kv_heads=8,
               context=131072, rope_theta=500000.0, tied=False),
    # meta-llama/Llama-3.2-1B
    "1b": dict(vocab=128256, hidden=2048, ffn=8192, layers=16, heads=32, kv_heads=8,
               context=131072, rope_theta=500000.0, tied=True),
    # a few MB, for checking the script and the loader
    "tiny": dict(vocab=512, hidden=128, ffn=256, layers=2, heads=4, kv_heads=2,
                 context=2048, rope_theta=10000.0, tied=False),
}

Q4_0 = gguf.GGMLQuantizationType.Q4_0
BLOCK_VALUES, BLOCK_BYTES = gguf.GGML_QUANT_SIZES[Q4_0]


def q4_0_blocks(rng, rows, cols):
    """Random Q4_0 blocks of a [rows, cols] weight: bytes [rows, cols / 32 * 18]."""
    n = rows * cols // BLOCK_VALUES
    blocks = rng.integers(0, 256, size=(n, BLOCK_BYTES), dtype=np.uint8)
    # v = (code - 8)·d with codes uniform in 0..15 has a standard deviation of about 4.6·d;
    # d ~ 0.004 gives weights of std ~0.02, as in trained Llama checkpoints.
    scales = rng.uniform(0.002, 0.006, size=n) * rng.choice([-1.0, 1.0], size=n)
    blocks[:, :2] = scales.astype(np.float16).view(np.uint8).reshape(n, 2)
    return blocks.reshape(rows, cols // BLOCK_VALUES * BLOCK_BYTES)


def tensors(s):
    """(name, [rows, cols] or [n]) in llama.cpp's names and file order."""
    head_dim = s["hidden"] // s["heads"]
    h, kv = s["hidden"], s["kv_heads"] * head_dim
    yield "token_embd.weight", [s["vocab"], h]
    for i in range(s["layers"]):
        p = f"blk.{i}."
        yield p + "attn_norm.weight", [h]
        yield p + "attn_q.weight", [h, h]
        yield p + "attn_k.weight", [kv, h]
        yield p + "attn_v.weight", [kv, h]
        yield p + "attn_output.weight", [h, h]
        yield p + "ffn_norm.weight", [h]
        yield p + "ffn_gate.weight", [s["ffn"], h]
        yield p + "ffn_up.weight", [s["ffn"], h]
        yield p + "ffn_down.weight", [h, s["ffn"]]
    yield "output_norm.weight", [h]
    if not s["tied"]:
        yield "output.weight", [s["vocab"], h]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    s = SHAPES[args.shape]
    rng = np.random.default_rng(args.seed)

    w = gguf.GGUFWriter(args.out, "llama")
    w.add_name(f"random Llama ({args.shape}), Q4_0")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    w.add_context_length(s["context"])
    w.add_embedding_length(s["hidden"])
    w.add_block_count(s["layers"])
    w.add_feed_forward_length(s["ffn"])
    w.add_rope_dimension_count(s["hidden"] // s["heads"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv_heads"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(s["rope_theta"])
    w.add_vocab_size(s["vocab"])
    plan = list(tensors(s))
    total = 0
    for name, shape in plan:
        if len(shape) == 1:
            w.add_tensor_info(name, shape, np.dtype(np.float32), shape[0] * 4)
            total += shape[0] * 4
        else:
            nbytes = shape[0] * shape[1] // BLOCK_VALUES * BLOCK_BYTES
            # byte shape [rows, bytes per row]; gguf-py turns it into the value shape
            w.add_tensor_info(name, [shape[0], nbytes // shape[0]], np.dtype(np.uint8), nbytes, raw_dtype=Q4_0)
            total += nbytes
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shape in plan:
        if len(shape) == 1:
            w.write_tensor_data(np.ones(shape, dtype=np.float32))
        else:
            w.write_tensor_data(q4_0_blocks(rng, *shape))
    w.close()
    params = sum(int(np.prod(shape)) for _, shape in plan)
    print(f"{args.out}: {params / 1e9:.2f} B parameters, {total / 2**30:.2f} GiB of tensors", file=sys.stderr)


if __name__ == "__main__":
    main()
