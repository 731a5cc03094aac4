#!/usr/bin/env python3
"""Write the fixtures the C tests compare with, from the PyTorch reference.

  logits.json + logits_*.bin  forward-pass logits for fixed inputs (f32, little-endian)
  generate.json               exact canvases of deterministic generations
  tokenizer.json              texts and their token ids under the model's tokenizer

Usage: make_fixtures.py --model models/tinystories --out tests/fixtures
"""

import argparse
import json
import os

import numpy as np
import torch

import llada_ref
from um_tokenizer import Tokenizer

TOKENIZER_TEXTS = [
    "once upon a time, there was a little girl named lily.",
    "She said, \"I'll go!\" and they're happy; we've won, I'm sure, you'd see.",
    "numbers 12345 and 3.14159, dates 2026-12-04",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\nnewlines\n\n\nand   runs of    spaces",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00fcber stra\u00dfe",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8 \u4e2d\u6587 \ud55c\uad6d\uc5b4",
    "emoji \U0001F600\U0001F44D\U0001F3FD and symbols \u2192 \u2264 \u00a9",
    "the end.<|endoftext|>once upon a time<|mdm_mask|> there",
    "",
    " ",
    "a",
    "!!!???...,,,",
    "don't won't can't shouldn't",
    "\u0000nul and \u007fdel",
]


def write_logits(model, tok, out):
    c = model.config
    mask = c.mask_token_id
    prompt = tok.encode("once upon a time, there was a little dog")
    g = torch.Generator().manual_seed(7)
    rand = torch.randint(0, c.vocab_size - 2, (2, 33), generator=g)
    rand[0, 5:12] = mask
    rand[1, ::3] = mask
    cases = {
        "prompt_masks": torch.tensor([prompt + [mask] * 16]),
        "random_batch": rand,
        "single_token": torch.tensor([[mask]]),
    }
    manifest = []
    for name, ids in cases.items():
        with torch.no_grad():
            logits = model(ids).float().numpy().astype("<f4")
        fname = f"logits_{name}.bin"
        logits.tofile(os.path.join(out, fname))
        manifest.append({"name": name, "ids": ids.tolist(), "file": fname,
                         "shape": list(logits.shape)})
    with open(os.path.join(out, "logits.json"), "w") as f:
        json.dump({"cases": manifest}, f, indent=1)


GEN_CASES = [
    # name, prompt, gen_length, block_length, steps, temperature, cfg, remasking, seed
    ("greedy_one_block", "once upon a time", 32, 32, 32, 0.0, 0.0, "low_confidence", 0),
    ("greedy_blocks", "one day, a little boy named tim", 48, 16, 24, 0.0, 0.0,
     "low_confidence", 0),
    ("greedy_partial_block", "the cat sat", 20, 8, 7, 0.0, 0.0, "low_confidence", 0),
    ("greedy_more_steps_than_tokens", "lily liked", 8, 8, 12, 0.0, 0.0, "low_confidence", 0),
    ("random_seed_1", "once upon a time", 32, 16, 16, 0.0, 0.0, "random", 1),
    ("random_seed_2", "once upon a time", 32, 16, 16, 0.0, 0.0, "random", 2),
    ("gumbel_seed_3", "once upon a time, there was", 32, 8, 16, 0.8, 0.0,
     "low_confidence", 3),
    ("cfg_greedy", "the little bird wanted to fly", 24, 8, 12, 0.0, 1.5, "low_confidence", 0),
    ("cfg_gumbel_random", "mom said", 24, 12, 8, 1.0, 0.5, "random", 42),
]


def write_generate(model, tok, out):
    cases = []
    for name, prompt, gl, bl, st, temp, cfg, remask, seed in GEN_CASES:
        ids = tok.encode(prompt)
        canvas = llada_ref.generate(model, ids, gen_length=gl, block_length=bl, steps=st,
                                    temperature=temp, cfg_scale=cfg, remasking=remask,
                                    seed=seed)
        cases.append({"name": name, "prompt": prompt, "prompt_ids": ids, "gen_length": gl,
                      "block_length": bl, "steps": st, "temperature": temp,
                      "cfg_scale": cfg, "remasking": remask, "seed": seed,
                      "canvas": canvas,
                      "text": tok.decode(canvas[len(ids):], skip_special=True)})
    with open(os.path.join(out, "generate.json"), "w") as f:
        json.dump({"cases": cases}, f, indent=1, ensure_ascii=False)


def write_tokenizer(tok, out):
    cases = [{"text": t, "ids": tok.encode(t)} for t in TOKENIZER_TEXTS]
    with open(os.path.join(out, "tokenizer.json"), "w") as f:
        json.dump({"cases": cases}, f, indent=1, ensure_ascii=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    model = llada_ref.load_model(args.model)
    tok = Tokenizer(os.path.join(args.model, "tokenizer.json"))
    write_tokenizer(tok, args.out)
    write_logits(model, tok, args.out)
    write_generate(model, tok, args.out)
    print(f"wrote fixtures to {args.out}")


if __name__ == "__main__":
    main()
