#!/usr/bin/env python3
"""Time the PyTorch reference forward pass and sampler on a model folder.

Prints one JSON object with the same fields as bench/step-bench --json, so
bench/run can put the two engines side by side on the same weights and canvas.

Usage: bench_torch.py --model models/tinystories --prompt-tokens 16 --gen-length 64
       bench_torch.py --model DIR --forward-only --tokens 160 --dtype bf16

--forward-only times the forward pass alone over --tokens positions (what
bench/forward-run compares with forward-bench); --dtype bf16 casts the model
to bfloat16 first, as a plain PyTorch bf16 deployment would run it.
"""

import argparse
import json
import os
import statistics
import time

import torch

import llada_ref


def forward_only(model, args):
    """Time whole forward passes over a canvas of args.tokens positions."""
    c = model.config
    n_prompt = args.tokens // 5
    ids = torch.tensor([[(100 + 37 * i) % c.vocab_size for i in range(n_prompt)] +
                        [c.mask_token_id] * (args.tokens - n_prompt)])
    with torch.no_grad():
        model(ids)
        fwd = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            model(ids)
            fwd.append((time.perf_counter() - t0) * 1e3)
    print(json.dumps({
        "engine": "pytorch-reference", "torch": torch.__version__, "threads": args.threads,
        "dtype": args.dtype, "tokens": args.tokens, "repeat": args.repeat,
        "forward_ms_median": statistics.median(fwd), "forward_ms_min": min(fwd),
    }))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--forward-only", action="store_true")
    ap.add_argument("--tokens", type=int, default=160)
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = llada_ref.load_model(args.model)
    if args.dtype == "bf16":
        model = model.to(torch.bfloat16)
    c = model.config
    if args.forward_only:
        forward_only(model, args)
        return
    prompt = [(100 + 37 * i) % c.vocab_size for i in range(args.prompt_tokens)]
    ids = torch.tensor([prompt + [c.mask_token_id] * args.gen_length])
    with torch.no_grad():
        model(ids)
        fwd = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            model(ids)
            fwd.append((time.perf_counter() - t0) * 1e3)
    steps = []
    for _ in range(args.repeat):
        passes = [0]
        t0 = time.perf_counter()
        llada_ref.generate(model, prompt, gen_length=args.gen_length,
                           block_length=args.block_length, steps=args.steps,
                           on_step=lambda s, x: passes.__setitem__(0, passes[0] + 1))
        total = (time.perf_counter() - t0) * 1e3
        steps.append((total / passes[0], args.gen_length / (total / 1e3)))
    print(json.dumps({
        "engine": "pytorch-reference", "torch": torch.__version__, "threads": args.threads,
        "dtype": args.dtype, "prompt_tokens": args.prompt_tokens,
        "gen_length": args.gen_length, "steps": args.steps, "block_length": args.block_length,
        "repeat": args.repeat, "forward_passes": passes[0],
        "forward_ms_median": statistics.median(fwd), "forward_ms_min": min(fwd),
        "ms_per_step_median": statistics.median(s[0] for s in steps),
        "tokens_per_second_median": statistics.median(s[1] for s in steps),
    }))


if __name__ == "__main__":
    main()
