#!/usr/bin/env python3
"""Write the fixtures the C tests compare with, from the PyTorch reference.

  logits.json + logits_*.bin  forward-pass logits for fixed inputs (f32, little-endian)
  generate.json               exact canvases of seeded generations, every policy over a
                              grid of settings, with each case's smallest decision margin
  tokenizer.json              texts and their token ids under the model's tokenizer

Usage: make_fixtures.py --model models/tinystories --out tests/fixtures
"""

import argparse
import json
import math
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


# Older single-policy cases, kept unchanged so a regression shows against known canvases.
# name, prompt, gen_length, block_length, steps, temperature, cfg, remasking, seed
LEGACY_CASES = [
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

POLICY_NAMES = ["low_confidence", "random", "maskgit_plus", "topk_margin", "entropy",
                "threshold", "factor", "eb_sampler", "origin"]

# The grid every policy runs: steps, block_length (one block, blocks, a partial last
# block), temperature 0 and above, guidance off and on.
# tag, prompt, gen_length, block_length, steps, temperature, cfg_scale, seed
GRID = [
    ("one_block", "once upon a time", 32, 32, 32, 0.0, 0.0, 1),
    ("blocks", "one day, a little boy named tim", 32, 8, 16, 0.0, 0.0, 2),
    ("partial_block_hot", "the cat sat on the mat and", 24, 10, 12, 0.7, 0.0, 3),
    ("cfg", "the little bird wanted to fly", 24, 12, 8, 0.0, 1.0, 4),
    ("cfg_hot", "mom said", 16, 16, 8, 0.6, 0.5, 5),
]

# Cases for one setting at a time: sampling filters, schedules, parameters, end-of-text
# controls, infilling. Each entry: name and the fields that differ from BASE.
BASE = {"prompt": "once upon a time, there was a little girl named lily. she",
        "gen_length": 24, "block_length": 24, "steps": 24, "temperature": 0.0,
        "cfg_scale": 0.0, "remasking": "low_confidence", "seed": 7}
SPECIAL = [
    ("top_k_gumbel", {"temperature": 0.9, "top_k": 5}),
    ("top_p_gumbel", {"temperature": 0.5, "top_p": 0.6}),
    ("top_p_top_k_gumbel", {"temperature": 0.6, "top_p": 0.7, "top_k": 10}),
    ("top_k_categorical", {"remasking": "maskgit_plus", "temperature": 0.8, "top_k": 8}),
    ("top_p_categorical", {"remasking": "entropy", "temperature": 0.5, "top_p": 0.6}),
    ("top_p_greedy_margin", {"remasking": "topk_margin", "top_p": 0.2}),
    ("top_k_greedy_entropy", {"remasking": "entropy", "top_k": 3}),
    ("timestep_low_confidence", {"schedule": "timestep", "steps": 10}),
    ("timestep_eps", {"remasking": "maskgit_plus", "schedule": "timestep", "eps": 0.2,
                      "steps": 6}),
    ("timestep_blocks", {"remasking": "topk_margin", "schedule": "timestep",
                         "block_length": 8, "steps": 12, "gen_length": 24}),
    ("timestep_many_steps", {"remasking": "entropy", "steps": 60}),
    ("quota_maskgit", {"remasking": "maskgit_plus", "schedule": "quota", "steps": 12}),
    ("alg_temp_maskgit", {"remasking": "maskgit_plus", "remasking_params": {"alg_temp": 0.5},
                          "steps": 12}),
    ("alg_temp_margin", {"remasking": "topk_margin", "remasking_params": {"alg_temp": 1.0},
                         "temperature": 0.5, "steps": 12}),
    ("alg_temp_entropy", {"remasking": "entropy", "remasking_params": {"alg_temp": 0.2},
                          "steps": 8, "block_length": 8}),
    ("threshold_low", {"remasking": "threshold", "remasking_params": {"threshold": 0.3}}),
    ("threshold_step_bound", {"remasking": "threshold", "steps": 4, "block_length": 12}),
    ("factor_high", {"remasking": "factor", "remasking_params": {"factor": 3.0}}),
    ("eb_gamma_large", {"remasking": "eb_sampler", "remasking_params": {"gamma": 2.0}}),
    ("eb_gamma_zero", {"remasking": "eb_sampler", "remasking_params": {"gamma": 0.0},
                       "steps": 30}),
    ("ban_eos", {"prompt": "the end.<|endoftext|>once upon a time", "gen_length": 16,
                 "block_length": 4, "steps": 16, "ban_eos": True}),
    ("suppress_eos_greedy", {"prompt": "the end.<|endoftext|>once upon a time",
                             "gen_length": 16, "block_length": 16, "steps": 16,
                             "suppress_eos_confidence": True}),
    ("suppress_eos_hot", {"prompt": "they were happy.", "gen_length": 16,
                          "block_length": 4, "steps": 16, "temperature": 1.0, "seed": 1,
                          "suppress_eos_confidence": True}),
    ("suppress_eos_entropy", {"remasking": "entropy", "prompt": "the end.",
                              "gen_length": 16, "block_length": 2, "steps": 16,
                              "temperature": 1.0, "seed": 1,
                              "suppress_eos_confidence": True}),
    ("early_stop_greedy", {"prompt": "the end.<|endoftext|>once upon a time",
                           "gen_length": 40, "block_length": 4, "steps": 40,
                           "early_stop": True}),
    ("early_stop_hot", {"prompt": "the end.", "gen_length": 40, "block_length": 1,
                        "steps": 40, "temperature": 1.0, "seed": 0, "early_stop": True}),
    ("early_stop_entropy", {"remasking": "entropy", "prompt": "the end.<|endoftext|>once "
                            "upon a time", "gen_length": 40, "block_length": 2, "steps": 40,
                            "early_stop": True}),
    ("early_stop_off", {"prompt": "the end.<|endoftext|>once upon a time",
                        "gen_length": 40, "block_length": 8, "steps": 40}),
    ("infill", {"prompt": "once upon a <|mdm_mask|> there was a <|mdm_mask|> dog.",
                "gen_length": 12, "block_length": 6, "steps": 8}),
    ("infill_cfg", {"prompt": "once upon a <|mdm_mask|> there was a <|mdm_mask|> dog.",
                    "gen_length": 12, "block_length": 12, "steps": 8, "cfg_scale": 1.0}),
    ("infill_cfg_entropy", {"remasking": "entropy", "prompt": "lily <|mdm_mask|> "
                            "<|mdm_mask|> the park", "gen_length": 8, "steps": 10,
                            "block_length": 8, "cfg_scale": 2.0, "temperature": 0.5}),
    ("fewer_steps_than_blocks", {"gen_length": 24, "block_length": 4, "steps": 3}),
]

# Cases whose outcome depends on the seed try this many seeds before giving up.
SEED_TRIES = 40

# Request fields of a case beyond the LLaDA ones, with the values that mean "off".
EXTRA_FIELDS = {"remasking_params": {}, "top_k": 0, "top_p": 1.0, "schedule": None,
                "eps": 1e-3, "ban_eos": False, "suppress_eos_confidence": False,
                "early_stop": False}

# Cases the daemon test also runs through a real unmaskd: one grid case per policy plus
# the specials that exercise a request field each.
DAEMON_CASES = {"top_p_top_k_gumbel", "top_p_categorical", "timestep_eps",
                "alg_temp_margin", "threshold_low", "suppress_eos_hot", "early_stop_greedy",
                "infill_cfg", "ban_eos"}


def gen_cases():
    """Every case as a dict of request fields plus its name."""
    cases = []
    for name, prompt, gl, bl, st, temp, cfg, remask, seed in LEGACY_CASES:
        cases.append({"name": name, "prompt": prompt, "gen_length": gl, "block_length": bl,
                      "steps": st, "temperature": temp, "cfg_scale": cfg,
                      "remasking": remask, "seed": seed})
    for policy in POLICY_NAMES:
        for tag, prompt, gl, bl, st, temp, cfg, seed in GRID:
            cases.append({"name": f"{policy}_{tag}", "prompt": prompt, "gen_length": gl,
                          "block_length": bl, "steps": st, "temperature": temp,
                          "cfg_scale": cfg, "remasking": policy, "seed": seed,
                          "daemon": tag == "cfg_hot"})
    for name, fields in SPECIAL:
        case = dict(BASE, name=name, **fields)
        case["daemon"] = name in DAEMON_CASES
        cases.append(case)
    return cases


def seed_matters(case):
    """Whether a case's tokens depend on its seed (so another seed may be tried)."""
    return (case["temperature"] > 0 or case["remasking"] in ("random", "origin")
            or case.get("remasking_params", {}).get("alg_temp", 0) > 0)


def run_case(model, tok, case):
    ids = tok.encode(case["prompt"])
    margin = llada_ref.Margin()
    stats = {}
    canvas = llada_ref.generate(
        model, ids, gen_length=case["gen_length"], block_length=case["block_length"],
        steps=case["steps"], temperature=case["temperature"], cfg_scale=case["cfg_scale"],
        remasking=case["remasking"], seed=case["seed"],
        params=case.get("remasking_params"), top_k=case.get("top_k", 0),
        top_p=case.get("top_p", 1.0), schedule=case.get("schedule"),
        eps=case.get("eps", 1e-3), ban_eos=case.get("ban_eos", False),
        suppress_eos=case.get("suppress_eos_confidence", False),
        early_stop=case.get("early_stop", False), margin=margin, stats=stats)
    return ids, canvas, margin, stats


def write_generate(model, tok, out):
    cases = []
    for case in gen_cases():
        tries = SEED_TRIES if seed_matters(case) else 1
        for _ in range(tries):
            ids, canvas, margin, stats = run_case(model, tok, case)
            if margin.ratio >= 1.0:
                break
            case["seed"] += 1
        else:
            raise SystemExit(f"case {case['name']}: the closest decision ({margin.where}) is "
                             f"{margin.value:.2g} from flipping, {margin.ratio:.2g} of the "
                             f"margin it needs: change the case's prompt or settings")
        for key, off in EXTRA_FIELDS.items():
            case.setdefault(key, off)
        case.update({"prompt_ids": ids, "canvas": canvas,
                     "text": tok.decode(canvas[len(ids):], skip_special=True),
                     "forward_passes": stats["forward_passes"],
                     "early_stopped": stats["early_stop"],
                     "eos_position": stats["eos_position"],
                     "margin": margin.value if math.isfinite(margin.value) else None,
                     "margin_ratio": margin.ratio if math.isfinite(margin.ratio) else None,
                     "margin_at": margin.where})
        cases.append(case)
        print(f"{case['name']:36s} seed {case['seed']:3d} passes {stats['forward_passes']:3d} "
              f"margin x{margin.ratio:.3g} ({margin.where})")
    with open(os.path.join(out, "generate.json"), "w") as f:
        json.dump({"margin_required": llada_ref.MARGIN_REQUIRED, "cases": cases}, f,
                  indent=1, ensure_ascii=False)


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
