#!/usr/bin/python3
"""Write tiny random-weight checkpoints of each non-LLaDA family and their logits.

For each of Dream, BERT and DistilBERT this writes tests/fixtures/families/<name>/ with
config.json, model.safetensors (names and layout of that family's Hugging Face
checkpoints; vocab.txt for the BERT family, whose config.json has no mask id) and the
reference logits of tools/families_ref.py for two fixed id sequences:
logits.bin (f32, (2, seq, vocab) row-major) and case.json (the ids and the shape).

The checkpoints differ on purpose in what the loader must handle: Dream in bf16 with
grouped-query attention and an untied head; BERT in f32 with the decoder tied (no
decoder tensor stored) and extra tensors a MaskedLM checkpoint may carry; DistilBERT in
f32 with its decoder stored and the tanh GELU.

When models/tinystories-distilbert exists (the bundled DistilBERT model, bf16 with its
decoder tied), this also writes tests/fixtures/families/tinystories-distilbert/ with
the reference logits of that model for two framed sequences: "[CLS] story text with
some [MASK]s [SEP]", ids from its own vocabulary. Its case.json names the model folder,
relative to the source tree, instead of holding a checkpoint copy. Rerun this after
every export of the bundled model.

Usage: make_family_fixtures.py [--out tests/fixtures/families] [--bundled DIR]
"""

import argparse
import json
import os
import struct

import torch

import families_ref
import llada_ref
from um_tokenizer import WordPiece

HERE = os.path.dirname(os.path.abspath(__file__))
VOCAB = 97
SEQ = 11


def rand(g, *shape, std=0.3):
    return torch.randn(*shape, generator=g) * std


def dream(g):
    d, H, Hkv, mlp, n_layers = 48, 4, 2, 80, 2
    hd = d // H
    cfg = {"architectures": ["DreamModel"], "model_type": "Dream", "hidden_size": d,
           "num_hidden_layers": n_layers, "num_attention_heads": H,
           "num_key_value_heads": Hkv, "intermediate_size": mlp, "vocab_size": VOCAB,
           "max_position_embeddings": 64, "rope_theta": 1000.0, "rms_norm_eps": 1e-6,
           "hidden_act": "silu", "tie_word_embeddings": False, "mask_token_id": VOCAB - 1,
           "eos_token_id": VOCAB - 2, "pad_token_id": VOCAB - 2}
    t = {"model.embed_tokens.weight": rand(g, VOCAB, d, std=1.0),
         "model.norm.weight": 1 + rand(g, d, std=0.1), "lm_head.weight": rand(g, VOCAB, d)}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = 1 + rand(g, d, std=0.1)
        t[p + "post_attention_layernorm.weight"] = 1 + rand(g, d, std=0.1)
        for name, rows in (("q", H * hd), ("k", Hkv * hd), ("v", Hkv * hd)):
            t[p + f"self_attn.{name}_proj.weight"] = rand(g, rows, d)
            t[p + f"self_attn.{name}_proj.bias"] = rand(g, rows)
        t[p + "self_attn.o_proj.weight"] = rand(g, d, H * hd)
        t[p + "mlp.gate_proj.weight"] = rand(g, mlp, d)
        t[p + "mlp.up_proj.weight"] = rand(g, mlp, d)
        t[p + "mlp.down_proj.weight"] = rand(g, d, mlp)
    return cfg, t, torch.bfloat16


def _bert_layer(g, t, names, d, mlp):
    for key in ("q", "k", "v", "o"):
        t[names[key] + ".weight"] = rand(g, d, d)
        t[names[key] + ".bias"] = rand(g, d, std=0.1)
    t[names["up"] + ".weight"] = rand(g, mlp, d)
    t[names["up"] + ".bias"] = rand(g, mlp, std=0.1)
    t[names["down"] + ".weight"] = rand(g, d, mlp)
    t[names["down"] + ".bias"] = rand(g, d, std=0.1)
    for key in ("ln1", "ln2"):
        t[names[key] + ".weight"] = 1 + rand(g, d, std=0.1)
        t[names[key] + ".bias"] = rand(g, d, std=0.1)


def bert(g):
    d, H, mlp, n_layers = 32, 4, 64, 2
    cfg = {"architectures": ["BertForMaskedLM"], "model_type": "bert", "hidden_size": d,
           "num_hidden_layers": n_layers, "num_attention_heads": H, "intermediate_size": mlp,
           "vocab_size": VOCAB, "max_position_embeddings": 40, "type_vocab_size": 2,
           "layer_norm_eps": 1e-12, "hidden_act": "gelu", "pad_token_id": 0,
           "position_embedding_type": "absolute"}
    e = "bert.embeddings."
    t = {e + "word_embeddings.weight": rand(g, VOCAB, d, std=1.0),
         e + "position_embeddings.weight": rand(g, 40, d),
         e + "token_type_embeddings.weight": rand(g, 2, d),
         e + "LayerNorm.weight": 1 + rand(g, d, std=0.1), e + "LayerNorm.bias": rand(g, d),
         e + "position_ids": torch.arange(40, dtype=torch.int64)[None],
         "cls.predictions.transform.dense.weight": rand(g, d, d),
         "cls.predictions.transform.dense.bias": rand(g, d, std=0.1),
         "cls.predictions.transform.LayerNorm.weight": 1 + rand(g, d, std=0.1),
         "cls.predictions.transform.LayerNorm.bias": rand(g, d, std=0.1),
         "cls.predictions.bias": rand(g, VOCAB, std=0.1)}
    for i in range(n_layers):
        p = f"bert.encoder.layer.{i}."
        _bert_layer(g, t, {"q": p + "attention.self.query", "k": p + "attention.self.key",
                           "v": p + "attention.self.value", "o": p + "attention.output.dense",
                           "ln1": p + "attention.output.LayerNorm",
                           "up": p + "intermediate.dense", "down": p + "output.dense",
                           "ln2": p + "output.LayerNorm"}, d, mlp)
    return cfg, t, torch.float32


def distilbert(g):
    d, H, mlp, n_layers = 32, 2, 48, 2
    cfg = {"architectures": ["DistilBertForMaskedLM"], "model_type": "distilbert", "dim": d,
           "n_layers": n_layers, "n_heads": H, "hidden_dim": mlp, "vocab_size": VOCAB,
           "max_position_embeddings": 40, "activation": "gelu_pytorch_tanh",
           "pad_token_id": 0, "sinusoidal_pos_embds": False}
    e = "distilbert.embeddings."
    t = {e + "word_embeddings.weight": rand(g, VOCAB, d, std=1.0),
         e + "position_embeddings.weight": rand(g, 40, d),
         e + "LayerNorm.weight": 1 + rand(g, d, std=0.1), e + "LayerNorm.bias": rand(g, d),
         "vocab_transform.weight": rand(g, d, d), "vocab_transform.bias": rand(g, d, std=0.1),
         "vocab_layer_norm.weight": 1 + rand(g, d, std=0.1),
         "vocab_layer_norm.bias": rand(g, d, std=0.1),
         "vocab_projector.weight": rand(g, VOCAB, d),
         "vocab_projector.bias": rand(g, VOCAB, std=0.1)}
    for i in range(n_layers):
        p = f"distilbert.transformer.layer.{i}."
        _bert_layer(g, t, {"q": p + "attention.q_lin", "k": p + "attention.k_lin",
                           "v": p + "attention.v_lin", "o": p + "attention.out_lin",
                           "ln1": p + "sa_layer_norm", "up": p + "ffn.lin1",
                           "down": p + "ffn.lin2", "ln2": p + "output_layer_norm"}, d, mlp)
    return cfg, t, torch.float32


def save_safetensors(path, tensors, dtype):
    """Write {name: tensor}: floating tensors in dtype, integer buffers as I64."""
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous()
        if t.dtype == torch.int64:
            tag, raw = "I64", t.numpy().tobytes()
        elif dtype == torch.bfloat16:
            tag, raw = "BF16", t.to(dtype).view(torch.int16).numpy().tobytes()
        else:
            tag, raw = "F32", t.float().numpy().tobytes()
        header[name] = {"dtype": tag, "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for raw in blobs:
            f.write(raw)


def bert_vocab():
    """[PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3, [MASK] 4, then plain tokens."""
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(VOCAB - 5)]


BUNDLED_TEXTS = ["once upon a time, there was a little girl named lily. she loved",
                 "the dog ran to the park. he saw a big red ball and"]
BUNDLED_SEQ = 20


def bundled_case(folder, out):
    """Write the reference logits of the bundled DistilBERT model for two framed sequences."""
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    tok = WordPiece.from_file(os.path.join(folder, "vocab.txt"))
    cls, sep, mask = (tok.vocab[t] for t in ("[CLS]", "[SEP]", "[MASK]"))
    rows = []
    for text in BUNDLED_TEXTS:
        body = tok.encode(text)[:BUNDLED_SEQ - 2]
        body += [mask] * (BUNDLED_SEQ - 2 - len(body))
        body[3] = body[7] = mask  # masks inside the prompt as well as after it
        rows.append([cls] + body + [sep])
    ids = torch.tensor(rows)
    # bf16 tensors widen exactly to the f32 values the C loader computes with.
    tensors = llada_ref.load_safetensors(os.path.join(folder, "model.safetensors"))
    with torch.no_grad():
        logits = families_ref.distilbert_logits(cfg, tensors, ids).float()
    top2 = logits.topk(2, dim=-1).values
    gap = (top2[..., 0] - top2[..., 1]).min().item()
    if gap < 1e-3:
        # tests/test_families.c also compares the argmax at every position.
        raise SystemExit(f"{folder}: two logits of one position differ by only {gap:.1e}, "
                         "so the argmax could differ between engines: change BUNDLED_TEXTS")
    os.makedirs(out, exist_ok=True)
    logits.contiguous().numpy().tofile(os.path.join(out, "logits.bin"))
    rel = os.path.relpath(os.path.abspath(folder), os.path.dirname(HERE))
    with open(os.path.join(out, "case.json"), "w") as f:
        json.dump({"model": rel, "ids": ids.tolist(), "shape": list(logits.shape)}, f)
        f.write("\n")
    print(f"wrote {out}: logits {tuple(logits.shape)}, max |logit| "
          f"{logits.abs().max().item():.2f}, smallest top-1 to top-2 gap {gap:.2e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "tests", "fixtures",
                                                  "families"))
    ap.add_argument("--bundled", default=os.path.join(os.path.dirname(HERE), "models",
                                                      "tinystories-distilbert"))
    args = ap.parse_args()
    g = torch.Generator().manual_seed(20261204)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=g)
    for name, build in (("dream", dream), ("bert", bert), ("distilbert", distilbert)):
        cfg, tensors, dtype = build(g)
        out = os.path.join(args.out, name)
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
            f.write("\n")
        save_safetensors(os.path.join(out, "model.safetensors"), tensors, dtype)
        if name != "dream":
            with open(os.path.join(out, "vocab.txt"), "w") as f:
                f.write("\n".join(bert_vocab()) + "\n")
        # The reference uses the weights as stored, so bf16 rounding is included.
        stored = {k: (v.to(dtype).float() if v.is_floating_point() else v)
                  for k, v in tensors.items()}
        with torch.no_grad():
            logits = families_ref.LOGITS[cfg["model_type"]](cfg, stored, ids).float()
        logits.contiguous().numpy().tofile(os.path.join(out, "logits.bin"))
        with open(os.path.join(out, "case.json"), "w") as f:
            json.dump({"ids": ids.tolist(), "shape": list(logits.shape)}, f)
            f.write("\n")
        print(f"wrote {out}: logits {tuple(logits.shape)}, "
              f"max |logit| {logits.abs().max().item():.2f}")
    if os.path.exists(os.path.join(args.bundled, "config.json")):
        bundled_case(args.bundled, os.path.join(args.out, "tinystories-distilbert"))


if __name__ == "__main__":
    main()
