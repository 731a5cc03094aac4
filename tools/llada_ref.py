"""PyTorch reference for the LLaDA architecture and unmaskd's sampler.

This file is the independent oracle for the C engine. The forward pass follows the
released LLaDA-8B modelling code: pre-norm RMSNorm blocks, NeoX-style RoPE over the
whole head, bidirectional attention, a SwiGLU MLP with ff_proj as the gate and up_proj
as the linear branch, an untied LM head and no biases. The sampler follows the rules in
docs/sampling.md, written independently of the C code. It is also the model definition
used for training.

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
# Counter-based random numbers, shared with the C sampler (kernels/rng.h).
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
    u = ((z >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / 9007199254740992.0)
    # (2^53 - 0.5) / 2^53 rounds to 1.0; cap it below 1 as kernels/rng.h does.
    return np.minimum(u, np.nextafter(1.0, 0.0))


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
        return self._attend_and_mlp(x, q, k, v)

    def _attend_and_mlp(self, x, q, k, v):
        """Return the block's output for input x [B, Lq, d] given its rotated q [B, heads,
        Lq, hd] and the keys and values it attends over: attention, then the MLP."""
        c = self.c
        B, Lq, _ = x.shape
        hd = c.d_model // c.n_heads
        if c.n_kv_heads != c.n_heads:
            rep = c.n_heads // c.n_kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(hd)
        att = torch.matmul(torch.softmax(scores.float(), dim=-1).to(v.dtype), v)
        x = x + self.attn_out(att.transpose(1, 2).reshape(B, Lq, c.n_heads * hd))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))

    def forward_cached(self, x, layer_cache, q_start, cos, sin):
        """Run the window x [B, Lq, d] at positions q_start.. through a block cache.

        layer_cache is [k, v], each [B, n_kv_heads, T, hd] with keys before RoPE, as
        Fast-dLLM stores them. The window's keys and values replace their rows, then RoPE
        is applied to the whole key set at positions 0..T-1 and to the queries at their
        own absolute positions, and the queries attend over all T rows.
        """
        c = self.c
        B, Lq, _ = x.shape
        hd = c.d_model // c.n_heads
        h = self.attn_norm(x)
        q = self.q_proj(h).view(B, Lq, c.n_heads, hd).transpose(1, 2)
        k = self.k_proj(h).view(B, Lq, c.n_kv_heads, hd).transpose(1, 2)
        v = self.v_proj(h).view(B, Lq, c.n_kv_heads, hd).transpose(1, 2)
        layer_cache[0][:, :, q_start:q_start + Lq] = k
        layer_cache[1][:, :, q_start:q_start + Lq] = v
        T = layer_cache[0].shape[2]
        q = apply_rope(q, cos[q_start:q_start + Lq], sin[q_start:q_start + Lq])
        k = apply_rope(layer_cache[0], cos[:T], sin[:T])
        return self._attend_and_mlp(x, q, k, layer_cache[1])


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

    def new_cache(self, batch, seq_len):
        """Return an empty block cache: per layer [k, v] of [batch, n_kv_heads, seq_len, hd]."""
        c = self.config
        hd = c.d_model // c.n_heads
        return [[torch.zeros(batch, c.n_kv_heads, seq_len, hd) for _ in range(2)]
                for _ in range(c.n_layers)]

    def forward_cached(self, ids, cache, q_start, q_end):
        """Return logits [B, q_end - q_start, embedding_size] of the window of ids [B, T].

        Only the window runs through the blocks. Its keys and values replace their rows in
        cache (from new_cache), and every other row is read as last stored, so a window over
        the whole sequence fills the cache.
        """
        t = self.model.transformer
        x = t.wte(ids[:, q_start:q_end])
        for blk, layer_cache in zip(t.blocks, cache):
            x = blk.forward_cached(x, layer_cache, q_start, self.rope_cos, self.rope_sin)
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
    """Read a safetensors file into {name: tensor}: float32, or int64 for I64 buffers."""
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
        elif info["dtype"] == "I64":
            t = torch.frombuffer(raw, dtype=torch.int64)
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
# Sampler (rules in docs/sampling.md)
#
# Written from the rules in docs/sampling.md and the reference engines' semantics, not
# from the C code: token sampling, the schedules and every remasking policy are here in
# vectorised PyTorch and plain Python. Every decision also records its margin (how far
# its inputs are from changing it), so make_fixtures.py keeps only cases whose outcome
# cannot flip under the small differences between this forward pass and the C engine's.

GUMBEL = "gumbel"
CATEGORICAL = "categorical"
QUOTA = "quota"
TIMESTEP = "timestep"

# Per policy: how tokens are drawn, the default schedule, whether it sets its own count.
POLICIES = {
    "low_confidence": (GUMBEL, QUOTA, False),
    "random": (GUMBEL, QUOTA, False),
    "maskgit_plus": (CATEGORICAL, TIMESTEP, False),
    "topk_margin": (CATEGORICAL, TIMESTEP, False),
    "entropy": (CATEGORICAL, TIMESTEP, False),
    "threshold": (GUMBEL, QUOTA, True),
    "factor": (GUMBEL, QUOTA, True),
    "eb_sampler": (CATEGORICAL, QUOTA, True),
    "origin": (CATEGORICAL, TIMESTEP, True),
}

DEFAULT_PARAMS = {
    "maskgit_plus": {"alg_temp": 0.0},
    "topk_margin": {"alg_temp": 0.0},
    "entropy": {"alg_temp": 0.0},
    "threshold": {"threshold": 0.9},
    "factor": {"factor": 1.0},
    "eb_sampler": {"gamma": 0.01},
}


# The smallest margin a decision needs to be called safely, by the unit of its input.
# Measured on the bundled model, the C engine's logits differ from this forward pass by
# at most about 1.5e-5 (mean 1e-6), and a categorical draw's cumulative mass by at most
# about 5e-7. Each required margin is 4 or more times that. Guidance multiplies logit
# differences by up to 2 cfg_scale + 1.
MARGIN_REQUIRED = {"logit": 1e-4, "prob": 1e-4, "nats": 1e-4, "cdf": 2e-6}


class Margin:
    """The closest call among a generation's decisions, and where it was.

    Each decision records how far its input is from the value that would change it,
    in the input's own unit (see MARGIN_REQUIRED). The record kept is the smallest
    ratio of that distance to the unit's required margin, so a ratio of at least 1
    means no decision can flip under the differences between the two engines. Exact
    decisions (integer counts, shared random numbers) are not recorded.
    """

    def __init__(self, scale=1.0):
        self.scale = scale
        self.ratio = math.inf
        self.value = math.inf
        self.where = ""

    def note(self, value, where, unit="logit"):
        value = float(value)
        ratio = value / (MARGIN_REQUIRED[unit] * self.scale)
        if ratio < self.ratio:
            self.ratio = ratio
            self.value = value
            self.where = where + f" ({unit})"


def block_plan(gen_length, block_length, steps):
    """Return [(start, end, steps)] per block, offsets relative to the first generated position.

    The last block is shorter when gen_length is not a multiple of block_length. Steps are
    split evenly, the first steps % n_blocks blocks taking one extra, and a block never
    gets fewer than one step.
    """
    block_length = min(block_length, gen_length)
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


def timestep(i, n, eps):
    """Dream's linspace(1, eps, n + 1)[i], in float64."""
    return 1.0 - i * (1.0 - eps) / n


def _scaled_gap(gap, temperature):
    """Convert a gap between scaled logits (logits / T) to logit units."""
    return gap * (temperature if temperature > 0 else 1.0)


def _top_p(z, top_p, temperature, margin, where):
    """Dream's top_p_logits on one float64 row: keep a token when the softmax mass of
    the tokens sorted before it is at most top_p."""
    values, order = torch.sort(z, descending=True, stable=True)
    probs = torch.softmax(values, 0)
    cum = torch.cumsum(probs, 0)
    remove = torch.zeros_like(cum, dtype=torch.bool)
    remove[1:] = cum[:-1] > top_p
    finite = int(torch.isfinite(values).sum())
    keep = int((~remove[:finite]).sum())
    if finite > 1:
        margin.note(_scaled_gap(torch.min(torch.abs(cum[:finite - 1] - top_p)), temperature),
                    where + " top_p mass", "cdf")
    if keep < finite:
        margin.note(_scaled_gap(values[keep - 1] - values[keep], temperature),
                    where + " top_p boundary")
    out = z.clone()
    out[order[remove]] = -math.inf
    return out


def _top_k(z, k, temperature, margin, where):
    """Dream's top_k_logits on one float64 row: keep tokens >= the k-th largest value."""
    finite = int(torch.isfinite(z).sum())
    if k >= finite:
        return z
    values = torch.sort(z, descending=True).values
    kth = values[k - 1]
    margin.note(_scaled_gap(kth - values[k], temperature), where + " top_k boundary")
    out = z.clone()
    out[z < kth] = -math.inf
    return out


def sample_row(row, opts, seed, step, pos, n_embed, margin):
    """Predict one position's token from its float32 logits row (after guidance).

    Returns (token, prob, sampled_prob, margin, entropy, demoted). prob is LLaDA's
    confidence: the float64 softmax of the raw logits at the token, with suppressed
    tokens left out of the softmax and 0 for a suppressed token.
    """
    V = opts["n_vocab"]
    T = opts["temperature"]
    where = f"step {step} position {pos}"
    raw32 = row[:V].clone()
    for t in opts["banned"]:
        raw32[t] = -math.inf
    conf = raw32.double()
    for t in opts["suppressed"]:
        conf[t] = -math.inf
    conf_lse = torch.logsumexp(conf, 0)

    if T == 0:
        z = raw32.double()
    else:
        scale = torch.tensor(np.float32(1.0 / T))
        z = (raw32 * scale).double()
    if opts["top_p"] < 1.0:
        z = _top_p(z, opts["top_p"], T, margin, where)
    if opts["top_k"] > 0:
        z = _top_k(z, opts["top_k"], T, margin, where)
    lse = torch.logsumexp(z, 0)
    q = torch.exp(z - lse)

    if T == 0:
        top2 = torch.topk(z, 2).values
        token = int(torch.argmax(z))
        if torch.isfinite(top2[1]):
            margin.note(top2[0] - top2[1], where + " argmax")
    elif opts["sampler"] == CATEGORICAL:
        u = float(rng_uniform(seed, 2 * step + STREAM_GUMBEL, [pos * n_embed])[0])
        cum = torch.cumsum(q, 0)
        hits = torch.nonzero(cum > u).flatten()
        token = int(hits[0]) if len(hits) else int(torch.nonzero(q > 0).flatten()[-1])
        # The distance of u from the drawn token's interval ends, in mass at T = 1.
        before = float(cum[token - 1]) if token > 0 else 0.0
        margin.note(min(u - before, float(cum[token]) - u) * T, where + " categorical draw",
                    "cdf")
    else:
        g_raw = raw32.double()
        g_raw[~torch.isfinite(z)] = -math.inf
        u = torch.from_numpy(rng_uniform(seed, 2 * step + STREAM_GUMBEL,
                                         pos * n_embed + np.arange(V)))
        g = g_raw / T - torch.log(-torch.log(u))
        top2 = torch.topk(g, 2).values
        token = int(torch.argmax(g))
        if torch.isfinite(top2[1]):
            margin.note((top2[0] - top2[1]) * T, where + " Gumbel-max")

    sorted_q = torch.sort(q, descending=True).values
    q_margin = float(sorted_q[0] - sorted_q[1]) if V > 1 else float(sorted_q[0])
    logq = torch.where(q > 0, z - lse, torch.zeros_like(z))
    entropy = float(-(q * logq).sum())
    demoted = token in opts["suppressed"]
    prob = 0.0 if demoted else float(torch.exp(row[token].double() - conf_lse))
    return token, prob, float(q[token]), q_margin, entropy, demoted


def _rank(scores, demoted):
    """Candidate indices best first: undemoted by score descending, then demoted; ties
    to the lower index."""
    return sorted(range(len(scores)), key=lambda j: (demoted[j], -scores[j], j))


def _note_boundary(order, scores, demoted, k, scale, unit, margin, where):
    """Record the margin of taking the first k of an order: the score gap across the
    cut, times scale to bring it back to the score's unit."""
    if 0 < k < len(order) and demoted[order[k - 1]] == demoted[order[k]]:
        a, b = scores[order[k - 1]], scores[order[k]]
        # Scores of a degenerate distribution (one token left: probability 1, entropy 0)
        # or of a demoted candidate (0) are exact in both engines, so their ties are too.
        if a == b and a in (0.0, 1.0):
            return
        margin.note((a - b) * scale, where + " order", unit)


def select(policy, params, cands, quota, step_info, seed, margin):
    """Return the candidate indices a policy commits at a step that is not a block's last.

    cands contains per-candidate lists: position, token, prob, sampled_prob, margin,
    entropy, demoted.
    """
    n = len(cands["position"])
    dem = cands["demoted"]
    step = step_info["step"]
    where = f"step {step} {policy}"
    stream = 2 * step + STREAM_REMASK

    def uniforms():
        return rng_uniform(seed, stream, cands["position"])

    if policy in ("low_confidence", "random", "maskgit_plus", "topk_margin", "entropy"):
        scale, unit = 1.0, "nats" if policy == "entropy" else "prob"
        if policy == "low_confidence":
            scores = list(cands["prob"])
        elif policy == "random":
            scores = [float(u) for u in uniforms()]
            scale = 0.0  # shared random numbers: exact
        else:
            base = {"maskgit_plus": cands["sampled_prob"], "topk_margin": cands["margin"],
                    "entropy": [-h for h in cands["entropy"]]}[policy]
            alg_temp = params.get("alg_temp", 0.0)
            if alg_temp > 0:
                u = uniforms()
                scores = [base[j] / alg_temp - math.log(-math.log(float(u[j])))
                          for j in range(n)]
                scale = alg_temp
            else:
                scores = list(base)
        order = _rank(scores, dem)
        k = min(quota, n)
        if scale > 0:
            _note_boundary(order, scores, dem, k, scale, unit, margin, where)
        return order[:k]

    if policy == "threshold":
        tau = params.get("threshold", 0.9)
        c = cands["prob"]
        order = _rank(c, dem)
        k = 1
        while k < n and not dem[order[k]] and c[order[k]] >= tau:
            margin.note(c[order[k]] - tau, where + " threshold", "prob")
            k += 1
        if k < n and not dem[order[k]]:
            margin.note(tau - c[order[k]], where + " threshold", "prob")
        if k == 1 and n > 1 and c[order[0]] < tau:
            _note_boundary(order, c, dem, 1, 1.0, "prob", margin, where)
        return order[:k]

    if policy == "factor":
        f = params.get("factor", 1.0)
        c = cands["prob"]
        order = _rank(c, dem)
        k = 1
        while k < n and not dem[order[k]]:
            bound = 1.0 - f / (k + 2)
            margin.note(abs(c[order[k]] - bound), where + " factor bound", "prob")
            if c[order[k]] < bound:
                break
            k += 1
        _note_boundary(order, c, dem, k, 1.0, "prob", margin, where)
        return order[:k]

    if policy == "eb_sampler":
        gamma = params.get("gamma", 0.01)
        h = cands["entropy"]
        scores = [-x for x in h]
        order = _rank(scores, dem)
        total = h[order[0]]
        biggest = total
        k = 1
        while k < n and not dem[order[k]]:
            nxt = max(biggest, h[order[k]])
            value = total + h[order[k]] - nxt
            margin.note(abs(value - gamma), where + " entropy bound", "nats")
            if value > gamma:
                break
            total += h[order[k]]
            biggest = nxt
            k += 1
        _note_boundary(order, scores, dem, k, 1.0, "nats", margin, where)
        return order[:k]

    if policy == "origin":
        p = 1.0 - step_info["s"] / step_info["t"]
        u = uniforms()
        return [j for j in range(n) if not dem[j] and float(u[j]) < p]

    raise ValueError(f"unknown remasking policy {policy}")


@torch.no_grad()
def generate(model, prompt, gen_length=64, block_length=32, steps=64, temperature=0.0,
             cfg_scale=0.0, remasking="low_confidence", seed=0, on_step=None, params=None,
             top_k=0, top_p=1.0, schedule=None, eps=1e-3, ban_eos=False, suppress_eos=False,
             early_stop=False, eot_id=-1, margin=None, stats=None, suffix=(),
             never_sampled=None, cache="none"):
    """Run unmaskd's sampler and return the full canvas (prompt + generation) as a list.

    cache: "none", or Fast-dLLM's "prefix" or "dual" block cache. A block's first forward
    pass runs the whole canvas and fills the cache. Its later passes run the block and
    everything after it (prefix) or the block alone (dual); the other positions read the
    keys and values of that first pass.

    margin (a Margin) collects the closest decision; stats (a dict) receives
    forward_passes, steps_run, early_stop and eos_position. suffix: fixed tokens after
    the generation that the model sees (BERT's closing [SEP]); they are not returned.
    never_sampled: tokens never predicted, by default the mask token only.
    """
    c = model.config
    mask_id = c.mask_token_id
    eos_id = c.eos_token_id if c.eos_token_id is not None else -1
    sampler, default_schedule, adaptive = POLICIES[remasking]
    schedule = schedule or default_schedule
    params = dict(DEFAULT_PARAMS.get(remasking, {}), **(params or {}))
    margin = margin if margin is not None else Margin()
    margin.scale = 2.0 * cfg_scale + 1.0
    n_embed = c.embedding_size
    banned = list(never_sampled if never_sampled is not None else [mask_id])
    banned += [eos_id] if ban_eos and eos_id >= 0 else []
    suppressed = []
    if suppress_eos:
        suppressed = [t for t in (eos_id, eot_id) if t >= 0]
        suppressed = sorted(set(suppressed), key=suppressed.index)
    opts = {"n_vocab": min(c.vocab_size, n_embed), "temperature": temperature,
            "top_k": top_k, "top_p": top_p if 0 < top_p < 1 else 1.0, "sampler": sampler,
            "banned": banned, "suppressed": suppressed}

    P = len(prompt)
    L = P + gen_length
    x = torch.tensor([list(prompt) + [mask_id] * gen_length + list(suffix)], dtype=torch.long)
    # Prompt positions that hold a token: guidance masks exactly these.
    prompt_index = torch.zeros_like(x, dtype=torch.bool)
    prompt_index[0, :P] = True
    prompt_index &= x != mask_id
    st = {"forward_passes": 0, "steps_run": 0, "early_stop": False, "eos_position": -1,
          "cached_passes": 0}
    n_seq = 2 if cfg_scale > 0 else 1
    T = x.shape[1]
    if cache != "none":
        if mask_id in prompt:
            raise ValueError("a block cache cannot serve a prompt with mask tokens")
        kv = model.new_cache(n_seq, T)
    global_step = 0
    done = False
    for start, end, n_steps in block_plan(gen_length, block_length, steps):
        block_end = P + end
        refresh = True
        # Every mask left of the block's end counts, prompt masks (infilling) included.
        n_masked_block = int((x[0, :block_end] == mask_id).sum())
        quotas = step_quota(n_masked_block, n_steps)
        for i in range(n_steps):
            step = global_step + i
            positions = torch.nonzero(x[0, :block_end] == mask_id).flatten().tolist()
            if not positions:
                break
            last = i == n_steps - 1
            e = eps if schedule == TIMESTEP else 0.0
            t, s = timestep(i, n_steps, e), timestep(i + 1, n_steps, e)
            if schedule == TIMESTEP:
                quota = max(0, math.floor(len(positions) * (1.0 - s / t)))
            else:
                quota = quotas[i]
            if last or quota > len(positions):
                quota = len(positions)
            if quota == 0 and not adaptive:
                continue

            batch = x
            if cfg_scale > 0:
                un = x.clone()
                un[prompt_index] = mask_id
                batch = torch.cat([x, un], 0)
            if cache == "none":
                out = model(batch).float()
            else:
                q_start, q_end = 0, T
                if not refresh:
                    q_start, q_end = P + start, (P + end if cache == "dual" else T)
                    st["cached_passes"] += 1
                refresh = False
                out = torch.full((n_seq, T, n_embed), math.nan)
                out[:, q_start:q_end] = model.forward_cached(batch, kv, q_start, q_end).float()
            if cfg_scale > 0:
                scale = torch.tensor(np.float32(cfg_scale + 1.0))
                logits = out[1] + scale * (out[0] - out[1])
            else:
                logits = out[0]
            st["forward_passes"] += 1
            st["steps_run"] += 1

            cands = {k: [] for k in ("position", "token", "prob", "sampled_prob", "margin",
                                     "entropy", "demoted")}
            for pos in positions:
                tok, prob, sprob, qm, ent, dem = sample_row(logits[pos], opts, seed, step, pos,
                                                            n_embed, margin)
                for k, v in zip(cands, (pos, tok, prob, sprob, qm, ent, dem)):
                    cands[k].append(v)
            if last:
                chosen = list(range(len(positions)))
            else:
                chosen = select(remasking, params, cands, quota,
                                {"step": step, "t": t, "s": s}, seed, margin)
                if not chosen:
                    chosen = _rank(cands["prob"], cands["demoted"])[:1]
            for j in chosen:
                x[0, cands["position"][j]] = cands["token"][j]

            if early_stop and eos_id >= 0:
                row = x[0, :L].tolist()
                eos_at = [p for p in range(P, L) if row[p] == eos_id]
                if eos_at:
                    first = eos_at[0]
                    tail = row[first + 1:]
                    if (mask_id not in row[:first] and mask_id in tail
                            and all(v in (eos_id, mask_id) for v in tail)):
                        for p in range(first + 1, L):
                            if row[p] == mask_id:
                                x[0, p] = eos_id
                        st["early_stop"] = True
                        st["eos_position"] = first
                        done = True
            if on_step:
                on_step(step, x[0, :L].tolist())
            if done:
                break
        global_step += n_steps
        if done:
            break
    if st["eos_position"] < 0 and eos_id >= 0:
        row = x[0, :L].tolist()
        eos_at = [p for p in range(P, L) if row[p] == eos_id]
        st["eos_position"] = eos_at[0] if eos_at else -1
    if stats is not None:
        stats.update(st)
    return x[0, :L].tolist()


STREAM_SCORE = 1 << 62


def score_mask_counts(k, L, b):
    """Stratified mask counts of one batch: ((round(k + j L / b) - 1) mod L) + 1."""
    return [((round(k + j * L / b) - 1) % L) + 1 for j in range(b)]


@torch.no_grad()
def score(model, prompt, answer, n_samples=128, batch_size=16, cfg_scale=0.0, seed=0,
          suffix=()):
    """LLaDA's Monte-Carlo estimate of log p(answer | prompt), with unmaskd's draws.

    Returns (log_likelihood, std_error, per-sample losses, forward passes). Unlike
    LLaDA's get_log_likelihood, a last batch smaller than batch_size is run, not dropped.
    """
    mask_id = model.config.mask_token_id
    P, L = len(prompt), len(answer)
    base = list(prompt) + list(answer) + list(suffix)
    losses, passes, done = [], 0, 0
    batch = 0
    while done < n_samples:
        b = min(batch_size, n_samples - done)
        stream = STREAM_SCORE + batch
        k = 1 + int(rng_uniform(seed, stream, [0])[0] * L)
        counts = score_mask_counts(min(k, L), L, b)
        x = torch.tensor([base] * b, dtype=torch.long)
        masked = []
        for j in range(b):
            u = rng_uniform(seed, stream, [1 + j * L + i for i in range(L)])
            order = np.argsort(u, kind="stable")[:counts[j]]
            masked.append(sorted(int(i) for i in order))
            for i in masked[-1]:
                x[j, P + i] = mask_id
        if cfg_scale > 0:
            un = x.clone()
            for j in range(b):
                for i in range(P):
                    if prompt[i] != mask_id:
                        un[j, i] = mask_id
            both = model(torch.cat([x, un], 0)).float()
            scale = torch.tensor(np.float32(cfg_scale + 1.0))
            logits = both[b:] + scale * (both[:b] - both[b:])
        else:
            logits = model(x).float()
        passes += 1
        logp = torch.log_softmax(logits.double(), dim=-1)
        for j in range(b):
            nll = -sum(float(logp[j, P + i, answer[i]]) for i in masked[j])
            losses.append(nll * L / counts[j])
        done += b
        batch += 1
    mean = float(np.mean(losses))
    se = float(np.std(losses, ddof=1) / math.sqrt(len(losses))) if len(losses) > 1 else 0.0
    return -mean, se, losses, passes
