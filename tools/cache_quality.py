#!/usr/bin/python3
"""Measure what Fast-dLLM's block caches cost in quality on held-out TinyStories text.

Two measures, each for cache none, prefix and dual, with the PyTorch reference
(llada_ref.py), whose cached generations the C engine matches token for token
(tests/test_cache.c):

  agreement   greedy generations (low_confidence, temperature 0) from the first
              --prompt-tokens tokens of held-out stories; the share of generated
              positions whose token equals the uncached run's, and the share of
              generations equal in full.
  stale loss  the masked objective of one block under a stale cache. For each held-out
              window of max_sequence_length tokens: the block [s, s + block) follows
              --prompt-tokens true tokens and everything after it is masked. The cache
              is filled by a whole pass over the canvas as it stood at the block's
              start (the whole block masked). Then a share t ~ U(0, 1] of the block's
              positions stays masked (at least one) and the others show their true
              tokens, as in the middle of the block's steps. The loss is the mean
              cross-entropy, in nats per masked token, of the true tokens at the
              block's masked positions: fresh (an uncached pass), prefix (the block and
              everything after it run, the prompt read from the cache) and dual (the
              block runs, the prompt and the masked suffix read from the cache).

The held-out text is the validation split train.py makes of
$UNMASKD_DATA/tinystories-head/tinystories_train_head_lowercase.txt; without it the
tool prints a message and exits with 0.

Usage: cache_quality.py [--model models/tinystories] [--prompts 24] [--windows 64]
"""

import argparse
import copy
import os
import sys

import torch
import torch.nn.functional as F

import llada_ref
import um_data

MODES = ("none", "prefix", "dual")


@torch.no_grad()
def stale_loss(model, stream, n_windows, prompt_tokens, block, seed):
    """Return {mode: mean nats per masked token} of the stale-cache objective above."""
    c = model.config
    L = c.max_sequence_length
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - L, (n_windows,), generator=g).tolist()
    s, e = prompt_tokens, prompt_tokens + block
    total = {m: 0.0 for m in MODES}
    count = 0
    for start in starts:
        truth = stream[start:start + L].clone().unsqueeze(0)
        stale = truth.clone()
        stale[0, s:] = c.mask_token_id
        t = float(torch.rand(1, generator=g)) or 1.0
        hide = torch.rand(block, generator=g) < t
        if not hide.any():
            hide[int(torch.randint(0, block, (1,), generator=g))] = True
        current = stale.clone()
        current[0, s:e] = torch.where(hide, torch.full((block,), c.mask_token_id),
                                      truth[0, s:e])
        kv = model.new_cache(1, L)
        model.forward_cached(stale, kv, 0, L)
        target = truth[0, s:e][hide]
        logits = {
            "none": model(current)[0, s:e],
            "prefix": model.forward_cached(current, copy.deepcopy(kv), s, L)[0, :block],
            "dual": model.forward_cached(current, copy.deepcopy(kv), s, e)[0],
        }
        for m in MODES:
            total[m] += float(F.cross_entropy(logits[m][hide].double(), target,
                                              reduction="sum"))
        count += int(hide.sum())
    return {m: total[m] / count for m in MODES}, count


def agreement(model, prompts, gen_length, block, steps):
    """Return {mode: (share of positions equal to none, share of equal generations)}."""
    gens = {m: [] for m in MODES}
    for p in prompts:
        for m in MODES:
            out = llada_ref.generate(model, p, gen_length=gen_length, block_length=block,
                                     steps=steps, cache=m)
            gens[m].append(out[len(p):])
    res = {}
    for m in MODES:
        same = sum(x == y for a, b in zip(gens[m], gens["none"]) for x, y in zip(a, b))
        whole = sum(a == b for a, b in zip(gens[m], gens["none"]))
        res[m] = (same / (len(prompts) * gen_length), whole / len(prompts))
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=os.path.join(os.path.dirname(__file__), "..", "models",
                                                    "tinystories"))
    ap.add_argument("--prompts", type=int, default=24, help="generations per mode")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--block-length", type=int, default=16)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--windows", type=int, default=64, help="held-out windows for the loss")
    ap.add_argument("--loss-prompt-tokens", type=int, default=64)
    ap.add_argument("--loss-block", type=int, default=32)
    ap.add_argument("--seed", type=int, default=99)
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))

    stream, stories, tok = um_data.held_out(args.model)
    if stream is None:
        print("skipping: the TinyStories text was not found; set UNMASKD_DATA to the data "
              "folder (with tinystories-head/)")
        return 0
    model = llada_ref.load_model(args.model)

    loss, n_masked = stale_loss(model, stream, args.windows, args.loss_prompt_tokens,
                                args.loss_block, args.seed)
    print(f"stale loss: {args.windows} held-out windows of {model.config.max_sequence_length}"
          f" tokens, block [{args.loss_prompt_tokens}, "
          f"{args.loss_prompt_tokens + args.loss_block}), {n_masked} masked positions")
    for m in MODES:
        print(f"  {m:7s} {loss[m]:.4f} nats per masked token ({loss[m] - loss['none']:+.4f})")

    prompts = [tok.encode(s)[:args.prompt_tokens] for s in stories[:args.prompts]]
    agree = agreement(model, prompts, args.gen_length, args.block_length, args.steps)
    print(f"agreement: {len(prompts)} prompts of {args.prompt_tokens} tokens, gen "
          f"{args.gen_length}, block {args.block_length}, steps {args.steps}, greedy")
    for m in MODES:
        print(f"  {m:7s} {agree[m][0]:.3f} of positions, {agree[m][1]:.3f} of generations "
              "equal to none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
