#!/usr/bin/env python3
"""Train a small LLaDA-architecture model on TinyStories with the masked-diffusion objective.

Objective (LLaDA pretraining): per sequence draw t ~ U(0, 1), mask each token with
probability p = (1 - eps) * t + eps, and take cross-entropy on the masked positions
weighted by 1 / p, summed and divided by the number of tokens in the batch.

Training runs in float32: on CPUs without native bf16 arithmetic, torch 1.13's bf16
autocast path is many times slower than float32. The run is bounded by wall-clock
time: the learning rate warms up, then follows a cosine decay over the time budget. A checkpoint and the loss log are written every
--eval-every steps, so a run stopped early still leaves a usable model.

Usage: train.py --tokenizer T.json --out-dir runs/x --minutes 75
"""

import argparse
import json
import math
import os
import random
import resource
import sys
import time

import torch
import torch.nn.functional as F

import llada_ref
import um_data
from um_tokenizer import Tokenizer

EPS = 1e-3


def cpu_seconds():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def encode_stories(tok, stories, eos):
    """Concatenate stories as one token stream, each followed by EOS; also return story starts."""
    stream, starts = [], []
    for s in stories:
        starts.append(len(stream))
        stream.extend(tok.encode(s))
        stream.append(eos)
    return torch.tensor(stream, dtype=torch.long), starts


def sample_batch(stream, starts, batch, seq_len, gen):
    """Half the windows start at a story start, the rest anywhere in the stream."""
    rows = []
    limit = len(stream) - seq_len
    for _ in range(batch):
        if random.random() < 0.5:
            s = min(starts[gen.randrange(len(starts))], limit)
        else:
            s = gen.randrange(limit)
        rows.append(stream[s:s + seq_len])
    return torch.stack(rows)


def masked_loss(logits_fn, ids, mask_id, t):
    """LLaDA's masked objective for ids [B, L] at per-row times t [B]."""
    p = ((1 - EPS) * t + EPS)[:, None].expand_as(ids)
    masked = torch.rand(ids.shape) < p
    noisy = torch.where(masked, torch.full_like(ids, mask_id), ids)
    logits = logits_fn(noisy)
    ce = F.cross_entropy(logits[masked].float(), ids[masked], reduction="none")
    return (ce / p[masked]).sum() / ids.numel()


def fixed_eval_set(stream, seq_len, n_rows, seed):
    """Return fixed validation rows, times and masks, so every evaluation uses the same data."""
    g = torch.Generator().manual_seed(seed)
    n = min(n_rows, len(stream) // seq_len)
    ids = stream[:n * seq_len].view(n, seq_len)
    t = torch.rand(n, generator=g)
    p = ((1 - EPS) * t + EPS)[:, None].expand_as(ids)
    masked = torch.rand(ids.shape, generator=g) < p
    return ids, p, masked


@torch.no_grad()
def eval_loss(model, ev, mask_id, unigram_logp=None):
    """Masked-objective loss on the fixed set; with unigram_logp, the unigram baseline instead."""
    ids, p, masked = ev
    total = 0.0
    for i in range(0, ids.shape[0], 16):
        r_ids, r_p, r_m = ids[i:i + 16], p[i:i + 16], masked[i:i + 16]
        if unigram_logp is None:
            noisy = torch.where(r_m, torch.full_like(r_ids, mask_id), r_ids)
            logits = model(noisy)
            ce = F.cross_entropy(logits[r_m].float(), r_ids[r_m], reduction="none")
        else:
            ce = -unigram_logp[r_ids[r_m]]
        total += float((ce / r_p[r_m]).sum())
    return total / ids.numel()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--minutes", type=float, default=75.0)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--n-layers", type=int, default=6)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--mlp", type=int, default=768)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = random.Random(args.seed)
    random.seed(args.seed)
    os.makedirs(args.out_dir, exist_ok=True)

    text = os.path.join(um_data.data_dir(), "tinystories_train_head_lowercase.txt")
    if not os.path.exists(text):
        sys.exit(f"training text {text} not found: set UNMASKD_DATA to the data folder")
    train_s, val_s = um_data.split_stories(um_data.read_stories(text))
    tok = Tokenizer(args.tokenizer)
    eos, mask_id = tok.added["<|endoftext|>"], tok.added["<|mdm_mask|>"]
    train, starts = encode_stories(tok, train_s, eos)
    val, _ = encode_stories(tok, val_s, eos)
    vocab = len(tok.vocab)
    print(f"stories: {len(train_s)} train, {len(val_s)} validation; "
          f"tokens: {len(train)} train, {len(val)} validation; vocab {vocab}", flush=True)

    config = {
        "architectures": ["LLaDAModelLM"], "model_type": "llada", "block_type": "llama",
        "d_model": args.d_model, "n_layers": args.n_layers, "n_heads": args.n_heads,
        "n_kv_heads": args.n_heads, "mlp_hidden_size": args.mlp, "vocab_size": vocab,
        "embedding_size": vocab, "max_sequence_length": args.seq_len, "rope": True,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "layer_norm_type": "rms",
        "activation_type": "silu", "include_bias": False, "weight_tying": False,
        "mask_token_id": mask_id, "eos_token_id": eos, "pad_token_id": eos,
        "torch_dtype": "bfloat16",
    }
    model = llada_ref.LLaDA(llada_ref.Config(config))
    for name, prm in model.named_parameters():
        if prm.dim() == 2:
            torch.nn.init.normal_(prm, std=0.02)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params}", flush=True)

    counts = torch.bincount(train, minlength=vocab).double() + 1.0
    unigram_logp = (counts / counts.sum()).log()
    ev = fixed_eval_set(val, args.seq_len, 64, seed=99)
    unigram = eval_loss(model, ev, mask_id, unigram_logp)
    print(f"unigram baseline of the masked objective: {unigram:.4f}", flush=True)

    decay, no_decay = [], []
    for name, prm in model.named_parameters():
        (decay if prm.dim() == 2 else no_decay).append(prm)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    budget = args.minutes * 60.0
    t0, c0 = time.time(), cpu_seconds()
    log = open(os.path.join(args.out_dir, "loss.csv"), "w")
    log.write("step,tokens,wall_s,cpu_s,train_loss,val_loss,unigram_val_loss,lr\n")
    step, tokens, run_loss, run_steps = 0, 0, 0.0, 0
    while True:
        elapsed = time.time() - t0
        frac = min(1.0, elapsed / budget)
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        ids = sample_batch(train, starts, args.batch, args.seq_len, gen)
        # Stratified times: one uniform offset, evenly spaced over the batch. Each t is still
        # U(0, 1), so the objective is unchanged, but the 1/p weights vary far less per batch.
        t = (torch.rand(1) + torch.arange(args.batch) / args.batch) % 1.0
        loss = masked_loss(model, ids, mask_id, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += ids.numel()
        run_loss += float(loss)
        run_steps += 1
        done = elapsed >= budget
        if step % args.eval_every == 0 or done:
            model.eval()
            vl = eval_loss(model, ev, mask_id)
            model.train()
            wall, cpu = time.time() - t0, cpu_seconds() - c0
            log.write(f"{step},{tokens},{wall:.1f},{cpu:.1f},{run_loss / run_steps:.4f},"
                      f"{vl:.4f},{unigram:.4f},{lr:.6f}\n")
            log.flush()
            print(f"step {step} tokens {tokens} wall {wall:.0f}s cpu {cpu:.0f}s "
                  f"train {run_loss / run_steps:.4f} val {vl:.4f} lr {lr:.2e}", flush=True)
            run_loss, run_steps = 0.0, 0
            torch.save({"config": config, "state": model.state_dict(), "step": step,
                        "tokens": tokens, "wall_s": wall, "cpu_s": cpu,
                        "val_loss": vl, "unigram_val_loss": unigram,
                        "args": vars(args)}, os.path.join(args.out_dir, "checkpoint.pt"))
        if done:
            break


if __name__ == "__main__":
    main()
