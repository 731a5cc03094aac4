#!/usr/bin/env python3
"""PyTorch reference of unmaskd's int8 weights (--weight-dtype int8), its test fixtures,
and a quality report of the quantisation on the bundled model.

Weights: every linear layer's matrix W [N, K] is quantised per output channel (row):
scale[n] = max_k |W[n, k]| / 127 in float32, q = W / scale (a float32 division) rounded
half to even and clamped to [-127, 127]; an all-zero row gets scale 0 and q = 0. The
embedding table and the norms stay as they are. On oneDNN's int8 path, activations
are quantised the same way per row (one row per token), with `levels` steps each side
of 0. levels is 127 on CPUs with VNNI (and outside x86) and 63 on x86 CPUs without it
(um_gemm_int8_levels in kernels/kernels.h). The dequant path keeps activations in f32.

Commands:
  fixtures OUT_DIR   write quant.json and its .bin files for tests/test_gemm.c and
                     tests/test_model.c (the quantiser's exact values and scales, and the
                     quantised bundled model's logits for each activation mode)
  quality            masked-objective loss on held-out TinyStories text (the objective of
                     tools/train.py) and temperature-0 generation agreement, for f32,
                     bf16 and the int8 modes; the text is read from UNMASKD_DATA

Usage: quant_ref.py fixtures tests/fixtures
       quant_ref.py quality [--model models/tinystories] [--prompts 20] [--gen-length 64]
"""

import argparse
import json
import os
import sys

import torch
import torch.nn as nn

import llada_ref

HERE = os.path.dirname(os.path.abspath(__file__))


def quantize_rows(x, levels):
    """Return (q int8 [R, K], scale float32 [R]) of float32 rows x, as um_k_quantize_s8_ref."""
    x = x.float()
    max_abs = x.abs().amax(dim=1)
    scale = max_abs / float(levels)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.round(x / safe[:, None]).clamp(-levels, levels)
    q = torch.where(scale[:, None] == 0, torch.zeros_like(q), q)
    return q.to(torch.int8), scale


class QuantLinear(nn.Module):
    """A bias-free linear layer with int8 weights, as the engine multiplies them.

    act_levels None: the dequant path, f32 activations times the widened weights.
    Otherwise each activation row is quantised to act_levels steps, and the integer dot
    products (exact in float64 below, as the s32 sums are in oneDNN) are scaled per row
    and per output channel.
    """

    def __init__(self, weight, act_levels):
        super().__init__()
        self.q, self.scale = quantize_rows(weight.detach(), 127)
        self.act_levels = act_levels
        self.w_deq = self.q.float() * self.scale[:, None]

    def forward(self, x):
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).float()
        if self.act_levels is None:
            y = rows @ self.w_deq.t()
        else:
            qa, sa = quantize_rows(rows, self.act_levels)
            dots = qa.double() @ self.q.double().t()
            y = (sa.double()[:, None] * (self.scale.double()[None, :] * dots)).float()
        return y.reshape(*shape[:-1], -1)


class Bf16Linear(nn.Module):
    """A linear layer with native bf16 products: weights and activations rounded to bf16,
    products summed in f32 (what oneDNN does on AVX512-BF16 or AMX)."""

    def __init__(self, weight):
        super().__init__()
        self.w = weight.detach().to(torch.bfloat16).float()

    def forward(self, x):
        return x.to(torch.bfloat16).float() @ self.w.t()


LINEARS = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")


def convert(model, mode, lm_head=True):
    """Replace the model's linear layers in place. mode: "bf16" (native bf16 products),
    "int8" (the dequant path), or "int8-a127" / "int8-a63" (oneDNN's path with that many
    activation levels). lm_head False keeps the LM head in f32."""
    def make(layer):
        if mode == "bf16":
            return Bf16Linear(layer.weight)
        levels = None if mode == "int8" else int(mode.split("-a")[1])
        return QuantLinear(layer.weight, levels)

    t = model.model.transformer
    for blk in t.blocks:
        for name in LINEARS:
            setattr(blk, name, make(getattr(blk, name)))
    if lm_head:
        t.ff_out = make(t.ff_out)
    return model


# ----------------------------------------------------------------------------
# Fixtures


def quantiser_cases():
    """Matrices with ragged sizes, an all-zero row, and exact ties of the rounding."""
    g = torch.Generator().manual_seed(20240)
    cases = []
    for rows, cols in ((1, 1), (3, 17), (5, 33), (16, 255), (7, 1000), (2, 4097)):
        x = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g) * 3
        cases.append(x)
    cases[2][1].zero_()
    # max 127 gives scale 1, so halves are ties: 2.5 -> 2, 3.5 -> 4, -0.5 -> -0.
    ties = torch.tensor([[127.0, 2.5, 3.5, -2.5, 0.5, -0.5, 1.5, -1.5, 126.5, -126.5]])
    cases.append(ties)
    return cases


def write_fixtures(out_dir, model_dir):
    """Write quant.json, quant_x.bin, quant_q.bin, quant_scale.bin and quant_logits_*.bin.

    The model test compares the engine's int8 logits with these and with its own f32
    logits, so no f32 logits are written here."""
    os.makedirs(out_dir, exist_ok=True)
    xs, qs, scales, shapes = [], [], [], []
    for x in quantiser_cases():
        q, s = quantize_rows(x, 127)
        xs.append(x.float().reshape(-1))
        qs.append(q.reshape(-1))
        scales.append(s)
        shapes.append(list(x.shape))
    torch.cat(xs).numpy().tofile(os.path.join(out_dir, "quant_x.bin"))
    torch.cat(qs).numpy().tofile(os.path.join(out_dir, "quant_q.bin"))
    torch.cat(scales).numpy().tofile(os.path.join(out_dir, "quant_scale.bin"))

    # One canvas of 32 positions: a prompt of story tokens, then masks.
    base = llada_ref.load_model(model_dir)
    c = base.config
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, c.vocab_size - 2, (1, 32), generator=g)
    ids[0, 12:] = c.mask_token_id
    ids[0, 20] = 300
    logits = {}
    for mode in ("int8", "int8-a127", "int8-a63"):
        model = convert(llada_ref.load_model(model_dir), mode)
        with torch.no_grad():
            out = model(ids).float()
        name = f"quant_logits_{mode}.bin"
        out.numpy().tofile(os.path.join(out_dir, name))
        logits[mode] = name
    meta = {
        "comment": "written by tools/quant_ref.py fixtures; int8 modes: int8 is the dequant "
                   "path, int8-aN quantises activations to N levels",
        "quantiser": {"levels": 127, "shapes": shapes, "x": "quant_x.bin",
                      "q": "quant_q.bin", "scale": "quant_scale.bin"},
        "model": {"ids": ids[0].tolist(), "shape": [1, 32, c.embedding_size], "logits": logits},
    }
    with open(os.path.join(out_dir, "quant.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    print(f"wrote quant.json and its files to {out_dir}")


# ----------------------------------------------------------------------------
# Quality report


def quality(args):
    import train
    import um_data

    val, val_s, tok = um_data.held_out(args.model)
    if val is None:
        print("skipping the quality report: the TinyStories text was not found; set "
              "UNMASKD_DATA to the data folder (with tinystories-head/)")
        return 0
    base = llada_ref.load_model(args.model)
    c = base.config
    ev = train.fixed_eval_set(val, c.max_sequence_length, args.rows, seed=99)
    modes = [("f32", None, True), ("bf16", "bf16", True), ("int8 dequant", "int8", True),
             ("int8 a127", "int8-a127", True), ("int8 a63", "int8-a63", True),
             ("int8 a63, f32 head", "int8-a63", False),
             ("int8 a127, f32 head", "int8-a127", False)]
    prompts = []
    for story in val_s[:args.prompts]:
        ids = tok.encode(story)
        prompts.append(ids[:args.prompt_tokens])

    results = {}
    for label, mode, head in modes:
        model = llada_ref.load_model(args.model)
        if mode:
            convert(model, mode, lm_head=head)
        loss = train.eval_loss(model, ev, c.mask_token_id)
        gens = []
        with torch.no_grad():
            for p in prompts:
                out = llada_ref.generate(model, p, gen_length=args.gen_length,
                                         block_length=args.gen_length, steps=args.gen_length)
                gens.append(out[len(p):])
        results[label] = (loss, gens)
        print(f"{label:22s} masked loss {loss:.4f}", flush=True)

    def agree(a, b):
        same = sum(x == y for ga, gb in zip(a, b) for x, y in zip(ga, gb))
        total = sum(len(g) for g in a)
        return same / total

    print(f"\n{len(ev[0])} held-out windows of {c.max_sequence_length} tokens; "
          f"{len(prompts)} prompts of {args.prompt_tokens} tokens, gen {args.gen_length}, "
          f"temperature 0, low_confidence")
    print(f"{'weights':22s} {'loss':>8s} {'vs f32':>8s} {'tokens = f32':>13s} "
          f"{'tokens = bf16':>14s}")
    f32_loss, f32_gens = results["f32"]
    bf16_gens = results["bf16"][1]
    for label, (loss, gens) in results.items():
        print(f"{label:22s} {loss:8.4f} {loss - f32_loss:+8.4f} {agree(gens, f32_gens):13.3f} "
              f"{agree(gens, bf16_gens):14.3f}")
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    fx = sub.add_parser("fixtures", help="write the test fixtures")
    fx.add_argument("out_dir")
    fx.add_argument("--model", default=os.path.join(HERE, "..", "models", "tinystories"))
    q = sub.add_parser("quality", help="loss and generation agreement per weight dtype")
    q.add_argument("--model", default=os.path.join(HERE, "..", "models", "tinystories"))
    q.add_argument("--rows", type=int, default=64, help="held-out windows (default 64)")
    q.add_argument("--prompts", type=int, default=20, help="story prompts (default 20)")
    q.add_argument("--prompt-tokens", type=int, default=16, help="tokens per prompt")
    q.add_argument("--gen-length", type=int, default=64, help="generated tokens per prompt")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.cmd == "fixtures":
        write_fixtures(args.out_dir, args.model)
        return 0
    return quality(args)


if __name__ == "__main__":
    sys.exit(main())
