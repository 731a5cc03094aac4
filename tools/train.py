#!/usr/bin/env python3
"""Train a small masked-diffusion model (LLaDA or DistilBERT architecture) on TinyStories.

Objective (LLaDA pretraining): per sequence draw t ~ U(0, 1), mask each token with
probability p = (1 - eps) * t + eps, and take cross-entropy on the masked positions
weighted by 1 / p, summed and divided by the number of maskable tokens in the batch.

--arch llada (byte-level BPE tokenizer.json): windows are seq_len tokens of the stream,
stories end with <|endoftext|>, every position is maskable.
--arch distilbert (WordPiece vocabulary): stories end with [SEP], and each window is
[CLS], seq_len - 2 tokens of the stream, [SEP]. That outer [CLS] and [SEP] are never
masked; every other position is, story separators included. The model is the
functional forward of families_ref.distilbert_logits over tensors with the names of
DistilBertForMaskedLM, the word embeddings tied to the MLM head.

Training runs in float32: on CPUs without native bf16 arithmetic, torch 1.13's bf16
autocast path is many times slower than float32. The run is bounded by wall-clock
time: the learning rate warms up, then follows a cosine decay over the time budget. A checkpoint and the loss log are written every
--eval-every steps, so a run stopped early still leaves a usable model.

Usage: train.py --tokenizer T.json --out-dir runs/x --minutes 75
       train.py --arch distilbert --tokenizer models/x/vocab.txt --out-dir runs/x ...
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

import families_ref
import llada_ref
import um_data
import um_tokenizer

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


def frame_rows(rows, frame):
    """With frame = (cls, sep), put cls before and sep after each row of [B, L - 2]."""
    if frame is None:
        return rows
    n = rows.shape[0]
    return torch.cat([torch.full((n, 1), frame[0], dtype=rows.dtype), rows,
                      torch.full((n, 1), frame[1], dtype=rows.dtype)], dim=1)


def maskable(seq_len, frame):
    """Positions the objective may mask: all, or all but the framing first and last."""
    m = torch.ones(seq_len, dtype=torch.bool)
    if frame is not None:
        m[0] = m[-1] = False
    return m


def sample_batch(stream, starts, batch, seq_len, gen, frame=None):
    """Half the windows start at a story start, the rest anywhere in the stream."""
    rows = []
    span = seq_len - (2 if frame else 0)
    limit = len(stream) - span
    for _ in range(batch):
        if random.random() < 0.5:
            s = min(starts[gen.randrange(len(starts))], limit)
        else:
            s = gen.randrange(limit)
        rows.append(stream[s:s + span])
    return frame_rows(torch.stack(rows), frame)


def masked_loss(logits_fn, ids, mask_id, t, frame=None):
    """LLaDA's masked objective for ids [B, L] at per-row times t [B]."""
    p = ((1 - EPS) * t + EPS)[:, None].expand_as(ids)
    can = maskable(ids.shape[1], frame)
    masked = (torch.rand(ids.shape) < p) & can
    noisy = torch.where(masked, torch.full_like(ids, mask_id), ids)
    logits = logits_fn(noisy)
    ce = F.cross_entropy(logits[masked].float(), ids[masked], reduction="none")
    return (ce / p[masked]).sum() / (ids.shape[0] * int(can.sum()))


def fixed_eval_set(stream, seq_len, n_rows, seed, frame=None):
    """Return fixed validation rows, times and masks, so every evaluation uses the same data."""
    g = torch.Generator().manual_seed(seed)
    span = seq_len - (2 if frame else 0)
    n = min(n_rows, len(stream) // span)
    ids = frame_rows(stream[:n * span].view(n, span), frame)
    t = torch.rand(n, generator=g)
    p = ((1 - EPS) * t + EPS)[:, None].expand_as(ids)
    can = maskable(seq_len, frame)
    masked = (torch.rand(ids.shape, generator=g) < p) & can
    return ids, p, masked, n * int(can.sum())


@torch.no_grad()
def eval_loss(model, ev, mask_id, unigram_logp=None):
    """Masked-objective loss on the fixed set; with unigram_logp, the unigram baseline instead."""
    ids, p, masked, n_maskable = ev
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
    return total / n_maskable


class TensorModel(torch.nn.Module):
    """A model given as tensors with checkpoint names and a functional forward(cfg, t, ids)."""

    def __init__(self, config, tensors, forward):
        super().__init__()
        self.config, self.forward_fn = config, forward
        self.names = sorted(tensors)
        self.params = torch.nn.ParameterList([torch.nn.Parameter(tensors[n])
                                              for n in self.names])

    def tensors(self):
        return dict(zip(self.names, self.params))

    def forward(self, ids):
        return self.forward_fn(self.config, self.tensors(), ids)


def distilbert_config(args, vocab, pad_id):
    """config.json of a DistilBertForMaskedLM checkpoint, with the fields transformers writes."""
    return {
        "architectures": ["DistilBertForMaskedLM"], "model_type": "distilbert",
        "activation": "gelu", "attention_dropout": 0.0, "dim": args.d_model, "dropout": 0.0,
        "hidden_dim": args.mlp, "initializer_range": 0.02,
        "max_position_embeddings": args.seq_len, "n_heads": args.n_heads,
        "n_layers": args.n_layers, "pad_token_id": pad_id, "qa_dropout": 0.1,
        "seq_classif_dropout": 0.2, "sinusoidal_pos_embds": False, "tie_weights_": True,
        "torch_dtype": "bfloat16", "vocab_size": vocab,
    }


def sinusoidal_positions(n_pos, dim, std):
    """Transformer sine/cosine position codes, scaled so each entry has variance std^2."""
    pos = torch.arange(n_pos, dtype=torch.float64)[:, None]
    angle = pos / torch.pow(10000.0, torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    out = torch.zeros(n_pos, dim, dtype=torch.float64)
    out[:, 0::2] = torch.sin(angle)
    out[:, 1::2] = torch.cos(angle)
    return (out * std * math.sqrt(2.0)).float()


def distilbert_init(cfg, pos_init="sinusoidal"):
    """Initialize as DistilBERT does: matrices and embeddings N(0, initializer_range), biases
    zero, LayerNorm weights one. The MLM decoder is the word embedding matrix (no tensor).

    With pos_init "sinusoidal" the learned position embeddings start from scaled sine and
    cosine codes instead of noise, so their dot products depend on the distance between
    positions. In one comparison at the bundled model's settings, the validation loss at
    step 300 was 5.894 with them and 5.945 with noise (unigram baseline 5.922)."""
    d, f, std = cfg["dim"], cfg["hidden_dim"], cfg["initializer_range"]
    t = {}

    def linear(name, rows, cols):
        t[name + ".weight"] = torch.randn(rows, cols) * std
        t[name + ".bias"] = torch.zeros(rows)

    def norm(name):
        t[name + ".weight"] = torch.ones(d)
        t[name + ".bias"] = torch.zeros(d)

    e = "distilbert.embeddings."
    t[e + "word_embeddings.weight"] = torch.randn(cfg["vocab_size"], d) * std
    n_pos = cfg["max_position_embeddings"]
    if pos_init == "sinusoidal":
        t[e + "position_embeddings.weight"] = sinusoidal_positions(n_pos, d, std)
    else:
        t[e + "position_embeddings.weight"] = torch.randn(n_pos, d) * std
    norm(e + "LayerNorm")
    for i in range(cfg["n_layers"]):
        p = f"distilbert.transformer.layer.{i}."
        for name in ("q_lin", "k_lin", "v_lin", "out_lin"):
            linear(p + "attention." + name, d, d)
        norm(p + "sa_layer_norm")
        linear(p + "ffn.lin1", f, d)
        linear(p + "ffn.lin2", d, f)
        norm(p + "output_layer_norm")
    linear("vocab_transform", d, d)
    norm("vocab_layer_norm")
    t["vocab_projector.bias"] = torch.zeros(cfg["vocab_size"])
    return t


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", choices=["llada", "distilbert"], default="llada")
    ap.add_argument("--tokenizer", required=True,
                    help="tokenizer.json (llada), vocab.txt or tokenizer.json (distilbert)")
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
    ap.add_argument("--pos-init", choices=["sinusoidal", "normal"], default="sinusoidal",
                    help="start of DistilBERT's learned position embeddings")
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
    tok = um_tokenizer.load(args.tokenizer)
    if args.arch == "distilbert":
        eos, mask_id = tok.added["[SEP]"], tok.added["[MASK]"]
        frame = (tok.added["[CLS]"], eos)
    else:
        eos, mask_id = tok.added["<|endoftext|>"], tok.added["<|mdm_mask|>"]
        frame = None
    train, starts = encode_stories(tok, train_s, eos)
    val, _ = encode_stories(tok, val_s, eos)
    vocab = len(tok.vocab)
    print(f"stories: {len(train_s)} train, {len(val_s)} validation; "
          f"tokens: {len(train)} train, {len(val)} validation; vocab {vocab}", flush=True)

    if args.arch == "distilbert":
        config = distilbert_config(args, vocab, tok.added["[PAD]"])
        model = TensorModel(config, distilbert_init(config, args.pos_init),
                            families_ref.distilbert_logits)
    else:
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
    ev = fixed_eval_set(val, args.seq_len, 64, seed=99, frame=frame)
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
        ids = sample_batch(train, starts, args.batch, args.seq_len, gen, frame)
        # Stratified times: one uniform offset, evenly spaced over the batch. Each t is still
        # U(0, 1), so the objective is unchanged, but the 1/p weights vary far less per batch.
        t = (torch.rand(1) + torch.arange(args.batch) / args.batch) % 1.0
        loss = masked_loss(model, ids, mask_id, t, frame)
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
            state = model.tensors() if args.arch == "distilbert" else model.state_dict()
            state = {k: v.detach().clone() for k, v in state.items()}
            torch.save({"config": config, "state": state, "step": step,
                        "tokens": tokens, "wall_s": wall, "cpu_s": cpu,
                        "val_loss": vl, "unigram_val_loss": unigram,
                        "args": vars(args)}, os.path.join(args.out_dir, "checkpoint.pt"))
        if done:
            break


if __name__ == "__main__":
    main()
