"""PyTorch reference for the LLaDA architecture and unmaskd's sampler.

This file is the independent oracle for the C engine. The forward pass follows the
released LLaDA-8B modelling code: pre-norm RMSNorm blocks, NeoX-style RoPE over the
whole head, bidirectional attention, a SwiGLU MLP with ff_proj as the gate and up_proj
as the linear branch, an untied LM head and no biases. The sampler follows the rules in
docs/sampler.md. It is also the model definition used for training.

Numerics: everything runs in float32 (bf16 weights are widened on load), softmax
confidences are taken in float64, and Gumbel noise is drawn in float64 from the
counter-based generator below, which the C sampler implements bit for bit.
"""

import json
import math
import os
import struct

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------
# Counter-based random numbers, shared with the C sampler (daemon/rng.h).
# u64(seed, stream, index) = mix(mix(seed + GOLDEN * (stream + 1)) + GOLDEN * (index + 1)),
# where mix is the splitmix64 finalizer. Being a pure function of its counters, it gives
# the same numbers however the work is split across threads.

GOLDEN = 0x9E3779B97F4A7C15
MASK64 = (1 << 64) - 1


def _mix_np(z):
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def rng_uniform(seed, stream, index):
    """Return uniforms in (0, 1) as float64 for an array of indices under (seed, stream)."""
    with np.errstate(over="ignore"):
        key = _mix_np(np.array([(seed + GOLDEN * (stream + 1)) & MASK64], dtype=np.uint64))
        idx = np.asarray(index, dtype=np.uint64)
        z = _mix_np(key + np.uint64(GOLDEN) * (idx + np.uint64(1)))
    return ((z >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / 9007199254740992.0)


STREAM_GUMBEL = 0
STREAM_REMASK = 1

# ----------------------------------------------------------------------------
# Model


class Config:
    """The fields of a LLaDA config.json that the forward pass reads."""

    def __init__(self, d):
        self.d_model = d["d_model"]
        self.n_layers = d["n_layers"]
        self.n_heads = d["n_heads"]
        self.n_kv_heads = d.get("n_kv_heads") or self.n_heads
        self.mlp_hidden_size = d["mlp_hidden_size"]
        self.vocab_size = d["vocab_size"]
        self.embedding_size = d.get("embedding_size") or self.vocab_size
        self.max_sequence_length = d["max_sequence_length"]
        self.rope_theta = float(d.get("rope_theta", 10000.0))
        self.eps = float(d.get("rms_norm_eps", d.get("layer_norm_eps", 1e-5)))
        self.mask_token_id = d["mask_token_id"]
        self.eos_token_id = d.get("eos_token_id")
        self.raw = d


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def rope_tables(n_pos, head_dim, theta):
    """Return (cos, sin) of shape [n_pos, head_dim] for NeoX rotate-half RoPE, in float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    freqs = torch.outer(torch.arange(n_pos, dtype=torch.float64), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().float(), emb.sin().float()


def apply_rope(t, cos, sin):
    half = t.shape[-1] // 2
    rot = torch.cat([-t[..., half:], t[..., :half]], dim=-1)
    return (t.float() * cos + rot.float() * sin).to(t.dtype)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, hd = c.d_model, c.d_model // c.n_heads
        self.c = c
        self.attn_norm = RMSNorm(d, c.eps)
        self.q_proj = nn.Linear(d, c.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, c.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, c.n_kv_heads * hd, bias=False)
        self.attn_out = nn.Linear(c.n_heads * hd, d, bias=False)
        self.ff_norm = RMSNorm(d, c.eps)
        self.ff_proj = nn.Linear(d, c.mlp_hidden_size, bias=False)
        self.up_proj = nn.Linear(d, c.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(c.mlp_hidden_size, d, bias=False)

    def forward(self, x, cos, sin):
        c = self.c
        B, L, _ = x.shape
        hd = c.d_model // c.n_heads
        h = self.attn_norm(x)
        q = self.q_proj(h).view(B, L, c.n_heads, hd).transpose(1, 2)
        k = self.k_proj(h).view(B, L, c.n_kv_heads, hd).transpose(1, 2)
        v = self.v_proj(h).view(B, L, c.n_kv_heads, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if c.n_kv_heads != c.n_heads:
            rep = c.n_heads // c.n_kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(hd)
        att = torch.matmul(torch.softmax(scores.float(), dim=-1).to(v.dtype), v)
        x = x + self.attn_out(att.transpose(1, 2).reshape(B, L, c.n_heads * hd))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class Transformer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.wte = nn.Embedding(c.embedding_size, c.d_model)
        self.blocks = nn.ModuleList([Block(c) for _ in range(c.n_layers)])
        self.ln_f = RMSNorm(c.d_model, c.eps)
        self.ff_out = nn.Linear(c.d_model, c.embedding_size, bias=False)


class Inner(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.transformer = Transformer(c)


class LLaDA(nn.Module):
    """LLaDA model whose state_dict keys match the released checkpoints' tensor names."""

    def __init__(self, c):
        super().__init__()
        self.config = c
        self.model = Inner(c)
        hd = c.d_model // c.n_heads
        cos, sin = rope_tables(c.max_sequence_length, hd, c.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, ids):
        """Return logits [B, L, embedding_size] for token ids [B, L]."""
        t = self.model.transformer
        L = ids.shape[1]
        x = t.wte(ids)
        cos, sin = self.rope_cos[:L], self.rope_sin[:L]
        for blk in t.blocks:
            x = blk(x, cos, sin)
        return t.ff_out(t.ln_f(x))

# ----------------------------------------------------------------------------
# Hugging Face folder: config.json and model.safetensors, written and read without
# the safetensors package so that only python3-torch is needed.


def save_safetensors(path, tensors, dtype):
    """Write {name: tensor} to a safetensors file in dtype (torch.float32 or torch.bfloat16)."""
    tag = {torch.float32: "F32", torch.bfloat16: "BF16"}[dtype]
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().to(dtype).contiguous()
        raw = t.view(torch.int16).numpy().tobytes() if dtype == torch.bfloat16 \
            else t.numpy().tobytes()
        header[name] = {"dtype": tag, "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    hjson = json.dumps(header, separators=(",", ":")).encode()
    hjson += b" " * ((8 - len(hjson) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for raw in blobs:
            f.write(raw)


def load_safetensors(path):
    """Read a safetensors file into {name: float32 tensor}."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        raw = bytearray(data[base + a:base + b])
        if info["dtype"] == "F32":
            t = torch.frombuffer(raw, dtype=torch.float32)
        elif info["dtype"] == "BF16":
            t = torch.frombuffer(raw, dtype=torch.int16).view(torch.bfloat16).float()
        else:
            raise ValueError(f"tensor {name}: dtype {info['dtype']} is not supported")
        out[name] = t.reshape(info["shape"]).clone()
    return out


def load_model(folder):
    """Load config.json and model.safetensors (or an index of shards) into an LLaDA in float32."""
    with open(os.path.join(folder, "config.json")) as f:
        cfg = Config(json.load(f))
    index = os.path.join(folder, "model.safetensors.index.json")
    tensors = {}
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        for s in shards:
            tensors.update(load_safetensors(os.path.join(folder, s)))
    else:
        tensors = load_safetensors(os.path.join(folder, "model.safetensors"))
    model = LLaDA(cfg)
    model.load_state_dict(tensors, strict=True)
    return model.eval()

# ----------------------------------------------------------------------------
# Sampler (rules in docs/sampler.md)


def block_plan(gen_length, block_length, steps):
    """Return [(start, end, steps)] per block, offsets relative to the first generated position.

    The last block is shorter when gen_length is not a multiple of block_length. Steps are
    split evenly, the first steps % n_blocks blocks taking one extra, and a block never
    gets fewer than one step.
    """
    n_blocks = (gen_length + block_length - 1) // block_length
    plan = []
    for b in range(n_blocks):
        s = steps // n_blocks + (1 if b < steps % n_blocks else 0)
        plan.append((b * block_length, min((b + 1) * block_length, gen_length), max(1, s)))
    return plan


def step_quota(n_masked, n_steps):
    """LLaDA's per-step commit counts: n_masked spread over n_steps, remainder first."""
    base, rem = divmod(n_masked, n_steps)
    return [base + (1 if i < rem else 0) for i in range(n_steps)]


def top_positions(conf, k):
    """Indices of the k largest conf values; ties go to the lower position."""
    order = sorted(range(len(conf)), key=lambda i: (-conf[i], i))
    return [i for i in order[:k] if conf[i] != -math.inf]


@torch.no_grad()
def generate(model, prompt, gen_length=64, block_length=32, steps=64, temperature=0.0,
             cfg_scale=0.0, remasking="low_confidence", seed=0, on_step=None):
    """Run unmaskd's sampler and return the full canvas (prompt + generation) as a list."""
    mask_id = model.config.mask_token_id
    P = len(prompt)
    x = torch.tensor([list(prompt) + [mask_id] * gen_length], dtype=torch.long)
    prompt_index = torch.zeros_like(x, dtype=torch.bool)
    prompt_index[0, :P] = True
    prompt_index &= x != mask_id
    global_step = 0
    for start, end, n_steps in block_plan(gen_length, block_length, steps):
        block_end = P + end
        # Every mask left of the block's end counts, prompt masks (infilling) included.
        n_masked = int((x[0, :block_end] == mask_id).sum())
        for quota in step_quota(n_masked, n_steps):
            step = global_step
            global_step += 1
            if quota == 0:
                continue
            mask_index = x[0] == mask_id
            if cfg_scale > 0:
                un = x.clone()
                un[prompt_index] = mask_id
                both = model(torch.cat([x, un], 0)).float()
                logits = both[1] + (cfg_scale + 1.0) * (both[0] - both[1])
            else:
                logits = model(x)[0].float()
            logits = logits.double()
            # The mask token and padding rows past the vocabulary are never predicted.
            logits[:, mask_id] = -math.inf
            logits[:, model.config.vocab_size:] = -math.inf
            positions = torch.nonzero(mask_index).flatten().tolist()
            conf = [-math.inf] * x.shape[1]
            x0 = x[0].clone()
            V = logits.shape[1]
            for p in positions:
                row = logits[p]
                if temperature == 0:
                    tok = int(torch.argmax(row))
                else:
                    u = torch.from_numpy(rng_uniform(seed, 2 * step + STREAM_GUMBEL,
                                                     p * V + np.arange(V)))
                    tok = int(torch.argmax(row / temperature - torch.log(-torch.log(u))))
                x0[p] = tok
                if p >= block_end:
                    continue
                if remasking == "low_confidence":
                    conf[p] = float(torch.exp(row[tok] - torch.logsumexp(row, 0)))
                elif remasking == "random":
                    conf[p] = float(rng_uniform(seed, 2 * step + STREAM_REMASK, [p])[0])
                else:
                    raise ValueError(f"unknown remasking {remasking}")
            for p in top_positions(conf, quota):
                x[0, p] = x0[p]
            if on_step:
                on_step(step, x[0].tolist())
    return x[0].tolist()
