"""PyTorch reference forward passes for the model families beside LLaDA.

Each function takes a config dict (as in the family's Hugging Face config.json), a dict
of tensors named as in that family's checkpoints, and a LongTensor of ids of shape
(batch, seq), and returns f32 logits of shape (batch, seq, vocab). They follow the
families' own modeling code (transformers' Qwen2 for Dream, BertForMaskedLM,
DistilBertForMaskedLM) written out functionally, independently of unmaskd's C code:

  dream       pre-norm RMSNorm blocks, q/k/v biases, grouped-query attention, RoPE
              (rotate-half), SwiGLU, final RMSNorm, LM head; then the logits move one
              position right (position p predicts from hidden state p - 1), as Dream's
              sampler does before it reads them.
  bert        word + learned position + token type 0 embeddings, LayerNorm; post-LN
              blocks with GELU; MLM head: dense, GELU, LayerNorm, decoder tied to the
              word embeddings, bias.
  distilbert  as bert without token types, with DistilBERT's tensor names.

All attention is bidirectional with no mask, as masked diffusion uses it.
"""

import math

import torch
import torch.nn.functional as F


def _gelu(x, act):
    if act in ("gelu_new", "gelu_pytorch_tanh"):
        return F.gelu(x, approximate="tanh")
    return F.gelu(x)


def _attention(q, k, v, n_heads, n_kv_heads):
    """q (B, L, H*hd), k and v (B, L, Hkv*hd) -> (B, L, H*hd), softmax over all keys."""
    B, L, _ = q.shape
    hd = q.shape[-1] // n_heads
    q = q.view(B, L, n_heads, hd).transpose(1, 2)
    k = k.view(B, L, n_kv_heads, hd).transpose(1, 2)
    v = v.view(B, L, n_kv_heads, hd).transpose(1, 2)
    group = n_heads // n_kv_heads
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    out = torch.softmax(scores, dim=-1) @ v
    return out.transpose(1, 2).reshape(B, L, n_heads * hd)


def _rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, n_heads, theta):
    """Rotate-half RoPE on (B, L, H*hd) by position within the sequence."""
    B, L, D = x.shape
    hd = D // n_heads
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    angle = torch.arange(L, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos = torch.cat([angle.cos(), angle.cos()], -1).float()
    sin = torch.cat([angle.sin(), angle.sin()], -1).float()
    x = x.view(B, L, n_heads, hd)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    rotated = torch.cat([-x2, x1], -1)
    out = x * cos[None, :, None, :] + rotated * sin[None, :, None, :]
    return out.reshape(B, L, D)


def dream_logits(cfg, t, ids):
    H = cfg["num_attention_heads"]
    Hkv = cfg.get("num_key_value_heads", H)
    eps = cfg.get("rms_norm_eps", 1e-6)
    theta = cfg.get("rope_theta", 10000.0)
    x = t["model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = _rms_norm(x, t[p + "input_layernorm.weight"], eps)
        q = F.linear(h, t[p + "self_attn.q_proj.weight"], t[p + "self_attn.q_proj.bias"])
        k = F.linear(h, t[p + "self_attn.k_proj.weight"], t[p + "self_attn.k_proj.bias"])
        v = F.linear(h, t[p + "self_attn.v_proj.weight"], t[p + "self_attn.v_proj.bias"])
        a = _attention(_rope(q, H, theta), _rope(k, Hkv, theta), v, H, Hkv)
        x = x + F.linear(a, t[p + "self_attn.o_proj.weight"])
        h = _rms_norm(x, t[p + "post_attention_layernorm.weight"], eps)
        g = F.silu(F.linear(h, t[p + "mlp.gate_proj.weight"]))
        x = x + F.linear(g * F.linear(h, t[p + "mlp.up_proj.weight"]),
                         t[p + "mlp.down_proj.weight"])
    x = _rms_norm(x, t["model.norm.weight"], eps)
    head = t["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else t["lm_head.weight"]
    logits = F.linear(x, head)
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


def _bert_body(x, t, n_layers, H, eps, act, names):
    for i in range(n_layers):
        n = names(i)
        q = F.linear(x, t[n["q"] + ".weight"], t[n["q"] + ".bias"])
        k = F.linear(x, t[n["k"] + ".weight"], t[n["k"] + ".bias"])
        v = F.linear(x, t[n["v"] + ".weight"], t[n["v"] + ".bias"])
        a = F.linear(_attention(q, k, v, H, H), t[n["o"] + ".weight"], t[n["o"] + ".bias"])
        x = F.layer_norm(x + a, x.shape[-1:], t[n["ln1"] + ".weight"], t[n["ln1"] + ".bias"], eps)
        f = _gelu(F.linear(x, t[n["up"] + ".weight"], t[n["up"] + ".bias"]), act)
        f = F.linear(f, t[n["down"] + ".weight"], t[n["down"] + ".bias"])
        x = F.layer_norm(x + f, x.shape[-1:], t[n["ln2"] + ".weight"], t[n["ln2"] + ".bias"], eps)
    return x


def bert_logits(cfg, t, ids):
    eps = cfg.get("layer_norm_eps", 1e-12)
    act = cfg.get("hidden_act", "gelu")
    e = "bert.embeddings."
    L = ids.shape[1]
    x = (t[e + "word_embeddings.weight"][ids] + t[e + "position_embeddings.weight"][:L][None]
         + t[e + "token_type_embeddings.weight"][0][None, None])
    x = F.layer_norm(x, x.shape[-1:], t[e + "LayerNorm.weight"], t[e + "LayerNorm.bias"], eps)

    def names(i):
        p = f"bert.encoder.layer.{i}."
        return {"q": p + "attention.self.query", "k": p + "attention.self.key",
                "v": p + "attention.self.value", "o": p + "attention.output.dense",
                "ln1": p + "attention.output.LayerNorm", "up": p + "intermediate.dense",
                "down": p + "output.dense", "ln2": p + "output.LayerNorm"}

    x = _bert_body(x, t, cfg["num_hidden_layers"], cfg["num_attention_heads"], eps, act, names)
    c = "cls.predictions."
    h = _gelu(F.linear(x, t[c + "transform.dense.weight"], t[c + "transform.dense.bias"]), act)
    h = F.layer_norm(h, h.shape[-1:], t[c + "transform.LayerNorm.weight"],
                     t[c + "transform.LayerNorm.bias"], eps)
    decoder = t.get(c + "decoder.weight", t[e + "word_embeddings.weight"])
    return F.linear(h, decoder, t[c + "bias"])


def distilbert_logits(cfg, t, ids):
    eps = 1e-12
    act = cfg.get("activation", "gelu")
    e = "distilbert.embeddings."
    L = ids.shape[1]
    x = t[e + "word_embeddings.weight"][ids] + t[e + "position_embeddings.weight"][:L][None]
    x = F.layer_norm(x, x.shape[-1:], t[e + "LayerNorm.weight"], t[e + "LayerNorm.bias"], eps)

    def names(i):
        p = f"distilbert.transformer.layer.{i}."
        return {"q": p + "attention.q_lin", "k": p + "attention.k_lin",
                "v": p + "attention.v_lin", "o": p + "attention.out_lin",
                "ln1": p + "sa_layer_norm", "up": p + "ffn.lin1", "down": p + "ffn.lin2",
                "ln2": p + "output_layer_norm"}

    x = _bert_body(x, t, cfg["n_layers"], cfg["n_heads"], eps, act, names)
    h = _gelu(F.linear(x, t["vocab_transform.weight"], t["vocab_transform.bias"]), act)
    h = F.layer_norm(h, h.shape[-1:], t["vocab_layer_norm.weight"], t["vocab_layer_norm.bias"],
                     eps)
    decoder = t.get("vocab_projector.weight", t[e + "word_embeddings.weight"])
    return F.linear(h, decoder, t["vocab_projector.bias"])


LOGITS = {"Dream": dream_logits, "bert": bert_logits, "distilbert": distilbert_logits}
