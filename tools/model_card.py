#!/usr/bin/env python3
"""Write the model card (README.md) and the loss plot for an exported model folder.

Reads the training checkpoint (for the run's settings and times) and its loss.csv,
plots training and validation loss against the unigram baseline, and generates
sample continuations with the PyTorch reference sampler.

Usage: model_card.py --checkpoint runs/x/checkpoint.pt --log runs/x/loss.csv --model models/x
"""

import argparse
import csv
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import llada_ref  # noqa: E402
from um_tokenizer import Tokenizer  # noqa: E402

PROMPTS = [
    "once upon a time, there was a little girl named lily. she",
    "one day, a boy named tim went to the park. he saw",
    "the little dog was very sad because",
]


def plot(rows, path):
    steps = [int(r["step"]) for r in rows]
    plt.figure(figsize=(7, 4))
    plt.plot(steps, [float(r["train_loss"]) for r in rows], label="training (mean of window)")
    plt.plot(steps, [float(r["val_loss"]) for r in rows], label="validation")
    plt.axhline(float(rows[0]["unigram_val_loss"]), color="gray", linestyle="--",
                label="unigram baseline (validation)")
    plt.xlabel("optimizer step")
    plt.ylabel("masked-diffusion loss (nats per token)")
    plt.title("bundled TinyStories model: masked-diffusion objective")
    plt.legend()
    plt.grid(alpha=0.3)
    plt.tight_layout()
    plt.savefig(path, dpi=100)


def samples(model_dir):
    model = llada_ref.load_model(model_dir)
    tok = Tokenizer(os.path.join(model_dir, "tokenizer.json"))
    out = []
    for i, prompt in enumerate(PROMPTS):
        ids = tok.encode(prompt)
        canvas = llada_ref.generate(model, ids, gen_length=96, block_length=32, steps=96,
                                    temperature=0.7, seed=7 + i)
        text = tok.decode(canvas[len(ids):], skip_special=False)
        text = text.split("<|endoftext|>")[0]
        out.append((prompt, text))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--model", required=True)
    args = ap.parse_args()
    ck = torch.load(args.checkpoint, map_location="cpu")
    cfg, run = ck["config"], ck["args"]
    with open(args.log) as f:
        rows = list(csv.DictReader(f))
    plot(rows, os.path.join(args.model, "loss.png"))
    with open(os.path.join(args.model, "loss.csv"), "w") as f:
        f.write(open(args.log).read())
    n_params = sum(t.numel() for t in ck["state"].values())
    best = min(float(r["val_loss"]) for r in rows)
    gens = samples(args.model)
    cmd = ("/usr/bin/python3 tools/train.py --tokenizer models/tinystories/tokenizer.json "
           f"--out-dir runs/tinystories --minutes {run['minutes']:g} --d-model {run['d_model']} "
           f"--n-layers {run['n_layers']} --n-heads {run['n_heads']} --mlp {run['mlp']} "
           f"--seq-len {run['seq_len']} --batch {run['batch']} --lr {run['lr']:g} "
           f"--warmup {run['warmup']} --eval-every {run['eval_every']}")
    lines = [
        "# tinystories: the bundled model",
        "",
        "A small masked-diffusion language model in the LLaDA architecture, trained by the",
        "unmaskd project on TinyStories so that a fresh machine can run the daemon at once.",
        "It writes in the vocabulary and phrasing of simple children's stories, in lower",
        "case. It is a demonstration model: expect frequent grammar slips, repeated words",
        "and no coherent plot.",
        "",
        "## Shapes",
        "",
        "| field | value |",
        "|---|---|",
        f"| architecture | LLaDA (`model_type` llada): pre-norm RMSNorm blocks, NeoX RoPE, "
        "bidirectional attention, SwiGLU, untied LM head, no biases |",
        f"| parameters | {n_params:,} |",
        f"| d_model / layers / heads | {cfg['d_model']} / {cfg['n_layers']} / {cfg['n_heads']} "
        f"(head_dim {cfg['d_model'] // cfg['n_heads']}) |",
        f"| mlp_hidden_size | {cfg['mlp_hidden_size']} |",
        f"| vocabulary | {cfg['vocab_size']} (byte-level BPE) |",
        f"| max_sequence_length | {cfg['max_sequence_length']} |",
        f"| rope_theta / rms_norm_eps | {cfg['rope_theta']:g} / {cfg['rms_norm_eps']:g} |",
        f"| mask_token_id / eos_token_id | {cfg['mask_token_id']} / {cfg['eos_token_id']} |",
        "| weights | bf16, one model.safetensors, tensor names as in LLaDA-8B |",
        "",
        "## Tokenizer",
        "",
        "Byte-level BPE trained by `tools/train_tokenizer.py` on the training split: the GPT-2",
        "pre-tokenizer pattern, 256 byte symbols, "
        f"{cfg['vocab_size'] - 258} merges, and two special tokens, `<|endoftext|>` "
        f"({cfg['eos_token_id']}, end of story) and `<|mdm_mask|>` ({cfg['mask_token_id']}).",
        "",
        "## Training",
        "",
        "Data: the lowercase head of the TinyStories training split (about 4.2 MB, 5,478",
        "stories); the last 5% of stories are held out for validation. Each story ends with",
        "`<|endoftext|>`; windows of the token stream start at a story start half of the time.",
        "",
        "Objective: LLaDA's. Per sequence t ~ U(0, 1), each token masked with probability",
        "p = (1 - 1e-3) t + 1e-3, cross-entropy on the masked positions weighted by 1 / p,",
        "divided by the number of tokens. AdamW (betas 0.9/0.95, weight decay 0.1 on",
        "matrices), gradient clipping at 1.0, linear warmup then cosine decay to 10% over",
        "the time budget, float32 on 2 CPU cores.",
        "",
        "```",
        "/usr/bin/python3 tools/train_tokenizer.py --vocab-size "
        f"{cfg['vocab_size']} --out models/tinystories/tokenizer.json",
        cmd,
        "/usr/bin/python3 tools/export_hf.py --checkpoint runs/tinystories/checkpoint.pt \\",
        "    --tokenizer models/tinystories/tokenizer.json --out models/tinystories",
        "/usr/bin/python3 tools/model_card.py --checkpoint runs/tinystories/checkpoint.pt \\",
        "    --log runs/tinystories/loss.csv --model models/tinystories",
        "```",
        "",
        "| measure | value |",
        "|---|---|",
        f"| optimizer steps | {ck['step']:,} (batch {run['batch']} x {run['seq_len']} tokens) |",
        f"| tokens seen | {ck['tokens']:,} |",
        f"| wall time | {ck['wall_s'] / 60:.1f} min |",
        f"| CPU time | {ck['cpu_s'] / 60:.1f} min (2 cores, AMD EPYC with AVX2) |",
        f"| validation loss, final | {ck['val_loss']:.3f} nats per token |",
        f"| validation loss, best | {best:.3f} |",
        f"| unigram baseline | {ck['unigram_val_loss']:.3f} |",
        "",
        "Both losses are the masked objective on the same 64 validation windows with fixed",
        "masks; the unigram baseline predicts every masked token from the training token",
        "frequencies, which is the best a model that ignores context can do.",
        "",
        "![loss curve](loss.png)",
        "",
        "## Samples",
        "",
        "From the PyTorch reference sampler: 96 tokens, blocks of 32, 96 steps,",
        "low_confidence remasking, temperature 0.7, text up to the first `<|endoftext|>`.",
        "",
    ]
    for prompt, text in gens:
        lines += [f"> **{prompt}**{text}", ""]
    lines += ["## License", "",
              "The weights are released with unmaskd under the MIT license. TinyStories is",
              "licensed CDLA-Sharing-1.0.", ""]
    with open(os.path.join(args.model, "README.md"), "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {args.model}/README.md and loss.png")


if __name__ == "__main__":
    main()
