#!/usr/bin/env python3
"""Time the PyTorch reference forward pass and sampler on a model folder.

Prints one JSON object with the same fields as bench/step-bench --json, so
bench/run can put the two engines side by side on the same weights and canvas.

Usage: bench_torch.py --model models/tinystories --prompt-tokens 16 --gen-length 64
"""

import argparse
import json
import os
import statistics
import time

import torch

import llada_ref


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = llada_ref.load_model(args.model)
    c = model.config
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
        "forward_ms_median": statistics.median(fwd), "forward_ms_min": min(fwd),
        "ms_per_step_median": statistics.median(s[0] for s in steps),
        "tokens_per_second_median": statistics.median(s[1] for s in steps),
    }))


if __name__ == "__main__":
    main()
