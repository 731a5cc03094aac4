#!/usr/bin/env python3
"""Write tests/fixtures/cache.json: seeded generations through Fast-dLLM's block caches.

Each case runs the PyTorch reference (llada_ref.generate with cache "prefix" or "dual")
and records the exact canvas, the forward passes, how many of them reused the cache, and
whether the canvas equals the uncached one. As in make_fixtures.py, a case is kept only
when every decision is several times farther from flipping than the two engines' logits
differ. A case whose tokens depend on the seed tries further seeds first.

Usage: make_cache_fixtures.py --model models/tinystories --out tests/fixtures
"""

import argparse
import json
import math
import os

import torch

import llada_ref
from um_tokenizer import Tokenizer

# name, prompt, gen_length, block_length, steps, temperature, cfg_scale, remasking, seed,
# further request fields
CASES = [
    ("greedy_blocks", "once upon a time", 32, 8, 32, 0.0, 0.0, "low_confidence", 0, {}),
    ("greedy_partial_block", "the cat sat on the mat and", 20, 8, 10, 0.0, 0.0,
     "low_confidence", 0, {}),
    ("gumbel_seeded", "one day, a little boy named tim", 32, 8, 16, 0.8, 0.0,
     "low_confidence", 3, {}),
    ("random_policy", "mom said", 24, 8, 12, 0.0, 0.0, "random", 1, {}),
    ("cfg_greedy", "the little bird wanted to fly", 24, 8, 12, 0.0, 1.0, "low_confidence",
     0, {}),
    ("cfg_hot", "lily liked", 16, 8, 8, 0.6, 0.5, "low_confidence", 5, {}),
    ("timestep_entropy", "once upon a time, there was", 24, 8, 24, 0.0, 0.0, "entropy", 0,
     {"schedule": "timestep"}),
    ("threshold", "once upon a time", 24, 8, 24, 0.0, 0.0, "threshold", 0,
     {"remasking_params": {"threshold": 0.5}}),
    ("early_stop", "the end.<|endoftext|>once upon a time", 40, 8, 40, 0.0, 0.0,
     "low_confidence", 0, {"early_stop": True}),
    # One step per block: every pass is a block's first, so the cache is never read.
    ("one_step_per_block", "once upon a time", 32, 8, 4, 0.0, 0.0, "low_confidence", 0, {}),
]

MODES = ("prefix", "dual")
SEED_TRIES = 40


def seed_matters(temperature, remasking):
    return temperature > 0 or remasking in ("random", "origin")


def run(model, ids, case, seed, cache):
    name, _, gl, bl, st, temp, cfg, remask, _, extra = case
    margin = llada_ref.Margin()
    stats = {}
    canvas = llada_ref.generate(
        model, ids, gen_length=gl, block_length=bl, steps=st, temperature=temp,
        cfg_scale=cfg, remasking=remask, seed=seed, params=extra.get("remasking_params"),
        schedule=extra.get("schedule"), early_stop=extra.get("early_stop", False),
        margin=margin, stats=stats, cache=cache)
    return canvas, margin, stats


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = llada_ref.load_model(args.model)
    tok = Tokenizer(os.path.join(args.model, "tokenizer.json"))
    out = []
    for case in CASES:
        name, prompt, gl, bl, st, temp, cfg, remask, seed, extra = case
        ids = tok.encode(prompt)
        for mode in MODES:
            tries = SEED_TRIES if seed_matters(temp, remask) else 1
            s = seed
            for _ in range(tries):
                canvas, margin, stats = run(model, ids, case, s, mode)
                if margin.ratio >= 1.0:
                    break
                s += 1
            else:
                raise SystemExit(f"case {name} ({mode}): the closest decision "
                                 f"({margin.where}) is {margin.value:.2g} from flipping: "
                                 "change the case's prompt or settings")
            plain, _, _ = run(model, ids, case, s, "none")
            out.append({
                "name": f"{name}_{mode}", "cache": mode, "prompt": prompt, "prompt_ids": ids,
                "gen_length": gl, "block_length": bl, "steps": st, "temperature": temp,
                "cfg_scale": cfg, "remasking": remask, "seed": s,
                "remasking_params": extra.get("remasking_params", {}),
                "schedule": extra.get("schedule"), "early_stop": extra.get("early_stop", False),
                "canvas": canvas, "forward_passes": stats["forward_passes"],
                "cached_passes": stats["cached_passes"],
                "early_stopped": stats["early_stop"], "eos_position": stats["eos_position"],
                "matches_uncached": canvas == plain,
                "margin_ratio": margin.ratio if math.isfinite(margin.ratio) else None,
                "margin_at": margin.where,
            })
            print(f"{name + '_' + mode:32s} seed {s:3d} passes {stats['forward_passes']:3d} "
                  f"cached {stats['cached_passes']:3d} same as uncached {canvas == plain} "
                  f"margin x{margin.ratio:.3g}")
    path = os.path.join(args.out, "cache.json")
    with open(path, "w") as f:
        json.dump({"margin_required": llada_ref.MARGIN_REQUIRED, "cases": out}, f, indent=1,
                  ensure_ascii=False)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
