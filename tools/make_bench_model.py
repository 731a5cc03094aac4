#!/usr/bin/python3
"""Write a random-weight model in LLaDA's exact layout, for benchmarks.

The weights are drawn from a fixed seed, so anyone regenerates the same files. They
carry no language: the model is only for timing and memory. Sizes:

  bundled  the shapes of models/tinystories (d 256, 5 layers, vocab 4096)
  1b       d 2048, 16 layers, 16 heads, intermediate 5632, vocab 126464
  8b       LLaDA-8B: d 4096, 32 layers, 32 heads, intermediate 12288, vocab 126464

Usage: make_bench_model.py --size 1b --out /tmp/bench-1b [--dtype bf16|f32] [--seed 0]
                           [--shards N]

--shards N splits the weights into model-0000K-of-0000N.safetensors files with a
model.safetensors.index.json, as large checkpoints ship.

The tokenizer is the bundled model's (4096 tokens) with an added token for every id
past it, so generated ids decode and the daemon can serve the model end to end.
"""

import argparse
import json
import os
import shutil
import struct
import sys

import numpy as np

SIZES = {
    "bundled": dict(d_model=256, n_layers=5, n_heads=4, mlp_hidden_size=704,
                    vocab_size=4096, max_sequence_length=128, rope_theta=10000.0),
    "1b": dict(d_model=2048, n_layers=16, n_heads=16, mlp_hidden_size=5632,
               vocab_size=126464, max_sequence_length=4096, rope_theta=500000.0),
    "8b": dict(d_model=4096, n_layers=32, n_heads=32, mlp_hidden_size=12288,
               vocab_size=126464, max_sequence_length=4096, rope_theta=500000.0),
}

HERE = os.path.dirname(os.path.abspath(__file__))
BUNDLED = os.path.join(os.path.dirname(HERE), "models", "tinystories")


def config_for(size):
    s = SIZES[size]
    # LLaDA-8B's ids: mask 126336, eos 126081; the bundled sizes keep the tokenizer's.
    big = s["vocab_size"] > 4096
    return {
        "architectures": ["LLaDAModelLM"],
        "model_type": "llada",
        "block_type": "llama",
        "d_model": s["d_model"],
        "n_layers": s["n_layers"],
        "n_heads": s["n_heads"],
        "n_kv_heads": s["n_heads"],
        "mlp_hidden_size": s["mlp_hidden_size"],
        "vocab_size": s["vocab_size"],
        "embedding_size": s["vocab_size"],
        "max_sequence_length": s["max_sequence_length"],
        "rope": True,
        "rope_theta": s["rope_theta"],
        "rms_norm_eps": 1e-5,
        "layer_norm_type": "rms",
        "activation_type": "silu",
        "include_bias": False,
        "weight_tying": False,
        "mask_token_id": 126336 if big else 4095,
        "eos_token_id": 126081 if big else 4094,
        "pad_token_id": 126081 if big else 4094,
        "torch_dtype": "bfloat16",
    }


def tensor_specs(c):
    """(name, shape, std) of every tensor, in LLaDA's naming."""
    d, mlp, V = c["d_model"], c["mlp_hidden_size"], c["embedding_size"]
    yield "model.transformer.wte.weight", (V, d), 0.02
    for l in range(c["n_layers"]):
        p = f"model.transformer.blocks.{l}."
        yield p + "attn_norm.weight", (d,), None
        for name, shape in [("q_proj", (d, d)), ("k_proj", (d, d)), ("v_proj", (d, d)),
                            ("attn_out", (d, d)), ("ff_proj", (mlp, d)),
                            ("up_proj", (mlp, d)), ("ff_out", (d, mlp))]:
            yield p + name + ".weight", shape, 1.0 / np.sqrt(shape[1])
        yield p + "ff_norm.weight", (d,), None
    yield "model.transformer.ln_f.weight", (d,), None
    yield "model.transformer.ff_out.weight", (V, d), 1.0 / np.sqrt(d)


def to_bf16_bytes(x):
    """Round f32 to bf16, nearest even, as raw little-endian bytes."""
    bits = x.astype(np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16).tobytes()


def write_tokenizer(out, c):
    """The bundled tokenizer, with one added token per id past its vocabulary.

    Generated ids then decode to text ("<t4096>" and so on), so the daemon serves a bench
    model end to end; the model's mask and end-of-text ids get LLaDA's token names.
    """
    with open(os.path.join(BUNDLED, "tokenizer.json")) as f:
        tok = json.load(f)
    base = len(tok["model"]["vocab"])
    names = {c["mask_token_id"]: "<|mdm_mask|>", c["eos_token_id"]: "<|eot_id|>"}
    if c["vocab_size"] > base:
        # The bundled specials keep their ids but lose the names the new ones take.
        vocab = tok["model"]["vocab"]
        for t in tok["added_tokens"]:
            del vocab[t["content"]]
            t["content"] = f"<|bundled_{t['id']}|>"
            vocab[t["content"]] = t["id"]
        for i in range(base, c["vocab_size"]):
            special = i in names
            tok["added_tokens"].append({
                "id": i, "content": names.get(i, f"<t{i}>"), "single_word": False,
                "lstrip": False, "rstrip": False, "normalized": False, "special": special})
    with open(os.path.join(out, "tokenizer.json"), "w") as f:
        json.dump(tok, f)
    shutil.copy(os.path.join(BUNDLED, "tokenizer_config.json"),
                os.path.join(out, "tokenizer_config.json"))


def write_shard(path, specs, dtype, rng, seed, size):
    """Write one safetensors file holding the tensors in specs, drawn from rng in order."""
    elem = 2 if dtype == "bf16" else 4
    header, offset = {"__metadata__": {"format": "pt", "note": f"random {size}, seed {seed}"}}, 0
    for name, shape, _ in specs:
        n = int(np.prod(shape)) * elem
        header[name] = {"dtype": "BF16" if dtype == "bf16" else "F32", "shape": list(shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header).encode()
    text += b" " * (-(8 + len(text)) % 8)  # tensors start 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name, shape, std in specs:
            if std is None:  # norm weights start at one, as in training
                x = np.ones(shape, dtype=np.float32)
                f.write(to_bf16_bytes(x) if dtype == "bf16" else x.tobytes())
                continue
            # Chunks of 16M values keep the peak memory small for the 8b LM head.
            rows_per_chunk = max(1, (1 << 24) // shape[1])
            for r0 in range(0, shape[0], rows_per_chunk):
                rows = min(rows_per_chunk, shape[0] - r0)
                x = rng.standard_normal((rows, shape[1]), dtype=np.float32) * std
                f.write(to_bf16_bytes(x) if dtype == "bf16" else x.astype(np.float32).tobytes())
    return offset


def write(out, size, dtype, seed, shards):
    c = config_for(size)
    os.makedirs(out, exist_ok=True)
    specs = list(tensor_specs(c))
    rng = np.random.default_rng(seed)
    total = 0
    if shards <= 1:
        total = write_shard(os.path.join(out, "model.safetensors"), specs, dtype, rng, seed, size)
    else:
        # Consecutive tensors per shard, cut where the running size passes each 1/N.
        elem = 2 if dtype == "bf16" else 4
        sizes = [int(np.prod(shape)) * elem for _, shape, _ in specs]
        target = sum(sizes) / shards
        groups, current, acc = [], [], 0
        for spec, n in zip(specs, sizes):
            current.append(spec)
            acc += n
            if acc >= target * (len(groups) + 1) and len(groups) < shards - 1:
                groups.append(current)
                current = []
        groups.append(current)
        weight_map = {}
        for k, group in enumerate(groups):
            name = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
            total += write_shard(os.path.join(out, name), group, dtype, rng, seed, size)
            for tensor, _, _ in group:
                weight_map[tensor] = name
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
            f.write("\n")
    c["torch_dtype"] = "bfloat16" if dtype == "bf16" else "float32"
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(c, f, indent=2)
        f.write("\n")
    write_tokenizer(out, c)
    print(f"wrote {out}: {size}, {dtype}, {total / 1e9:.2f} GB of weights in "
          f"{max(shards, 1)} file(s), seed {seed}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shards", type=int, default=1)
    a = ap.parse_args()
    if os.path.exists(os.path.join(a.out, "config.json")):
        sys.exit(f"make_bench_model.py: {a.out} already holds a model: remove it or pass "
                 "another --out")
    write(a.out, a.size, a.dtype, a.seed, a.shards)


if __name__ == "__main__":
    main()
