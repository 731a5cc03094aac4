#!/usr/bin/env python3
"""Write the model card (README.md) and the loss plot for an exported model folder.

Reads the training checkpoint (for the run's settings and times) and its loss.csv,
plots training and validation loss against the unigram baseline, and generates
sample continuations: for the LLaDA model with the PyTorch reference sampler, for the
DistilBERT model through the real daemon and client of the build folder --build,
which this tool starts on an ipc endpoint of its own and stops afterwards.

Usage: model_card.py --checkpoint runs/x/checkpoint.pt --log runs/x/loss.csv --model models/x
       [--build build]
"""

import argparse
import csv
import json
import os
import signal
import subprocess
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import llada_ref  # noqa: E402
from um_tokenizer import Tokenizer, WordPiece  # noqa: E402

PROMPTS = [
    "once upon a time, there was a little girl named lily. she",
    "one day, a boy named tim went to the park. he saw",
    "the little dog was very sad because",
]


def plot(rows, path, title="bundled TinyStories model: masked-diffusion objective"):
    steps = [int(r["step"]) for r in rows]
    plt.figure(figsize=(7, 4))
    plt.plot(steps, [float(r["train_loss"]) for r in rows], label="training (mean of window)")
    plt.plot(steps, [float(r["val_loss"]) for r in rows], label="validation")
    plt.axhline(float(rows[0]["unigram_val_loss"]), color="gray", linestyle="--",
                label="unigram baseline (validation)")
    plt.xlabel("optimizer step")
    plt.ylabel("masked-diffusion loss (nats per token)")
    plt.title(title)
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


DBERT_PROMPTS = ["once upon a time", "the little dog was very sad because",
                 "one day, a boy named tim went to the park. he saw"]
# Client options of the DistilBERT samples; the seed is 7 + the prompt's index.
DBERT_SAMPLING = ["--gen-length", "64", "--steps", "64", "--block-length", "32",
                  "--temperature", "0.7"]


def daemon_samples(model_dir, build):
    """Generate DBERT_PROMPTS through build/unmaskd and build/unmask.

    Returns (prompt, continuation) pairs and the commands that start the daemon and run
    the first prompt. The
    continuation is the prompt's ids and the reply's tokens decoded together by the
    Python WordPiece decoder, minus the prompt, up to the first [SEP]. Decoding them
    together puts the space between prompt and reply that WordPiece's decoder writes.
    """
    endpoint = f"ipc:///tmp/um-card-{os.getpid()}.sock"
    client = [os.path.join(build, "unmask"), "--connect", endpoint]
    daemon = subprocess.Popen([os.path.join(build, "unmaskd"), "--model", model_dir,
                               "--plugin-dir", os.path.join(build, "build-plugins"),
                               "--bind", endpoint, "--threads", "1", "--log-level", "warn"])
    try:
        deadline = time.time() + 60
        while subprocess.run(client + ["--info", "--timeout", "2"],
                             capture_output=True).returncode != 0:
            if daemon.poll() is not None or time.time() > deadline:
                raise SystemExit(f"the daemon on {endpoint} did not start")
            time.sleep(0.5)
        tok = WordPiece.from_file(os.path.join(model_dir, "vocab.txt"))
        sep = tok.vocab["[SEP]"]
        out = []
        for i, prompt in enumerate(DBERT_PROMPTS):
            cmd = client + ["--json"] + DBERT_SAMPLING + ["--seed", str(7 + i), prompt]
            r = subprocess.run(cmd, capture_output=True, text=True, check=True)
            reply = json.loads(r.stdout)["tokens"]
            reply = reply[:reply.index(sep)] if sep in reply else reply
            head = tok.decode(tok.encode(prompt))
            text = tok.decode(tok.encode(prompt) + reply)
            out.append((prompt, text[len(head):]))
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)
    name = os.path.basename(os.path.normpath(model_dir))
    commands = [f"build/unmaskd --model models/{name} --plugin-dir build/build-plugins "
             "--bind ipc:///tmp/card.sock --threads 1 &",
             " ".join(["build/unmask --connect ipc:///tmp/card.sock --json"] + DBERT_SAMPLING
                      + ["--seed", "7", f'"{DBERT_PROMPTS[0]}"'])]
    return out, commands


def measures(ck, run, best, hardware):
    """Format the run's measurements as a Markdown table, shared by both cards."""
    return [
        "| measure | value |",
        "|---|---|",
        f"| optimizer steps | {ck['step']:,} (batch {run['batch']} x {run['seq_len']} tokens) |",
        f"| tokens seen | {ck['tokens']:,} |",
        f"| wall time | {ck['wall_s'] / 60:.1f} min |",
        f"| CPU time | {ck['cpu_s'] / 60:.1f} min ({hardware}) |",
        f"| validation loss, final | {ck['val_loss']:.3f} nats per token |",
        f"| validation loss, best | {best:.3f} |",
        f"| unigram baseline | {ck['unigram_val_loss']:.3f} |",
    ]


def train_command(run, tokenizer, out_dir, arch=None):
    return ("/usr/bin/python3 tools/train.py "
            + (f"--arch {arch} " if arch else "")
            + f"--tokenizer {tokenizer} "
            f"--out-dir {out_dir} --minutes {run['minutes']:g} --d-model {run['d_model']} "
            f"--n-layers {run['n_layers']} --n-heads {run['n_heads']} --mlp {run['mlp']} "
            f"--seq-len {run['seq_len']} --batch {run['batch']} --lr {run['lr']:g} "
            f"--warmup {run['warmup']} --eval-every {run['eval_every']}"
            + (f" --threads {run['threads']} --pos-init {run['pos_init']}" if arch else ""))


def distilbert_card(ck, rows, model_dir, build):
    """Write the DistilBERT model card as a list of lines; the samples come from the daemon."""
    cfg, run = ck["config"], ck["args"]
    n_params = sum(t.numel() for t in ck["state"].values())
    gens, commands = daemon_samples(model_dir, build)
    name = os.path.basename(os.path.normpath(model_dir))
    span = run["seq_len"] - 2
    with open(os.path.join(model_dir, "vocab.txt"), encoding="utf-8") as f:
        vocab = [line.rstrip("\n") for line in f]
    n_cont = sum(1 for t in vocab if t.startswith("##"))
    lines = [
        f"# {name}: the bundled DistilBERT-architecture model",
        "",
        "A small masked-diffusion language model in the DistilBERT architecture, trained by",
        "the unmaskd project on TinyStories. It is stored as a Hugging Face",
        "`DistilBertForMaskedLM` checkpoint with an uncased WordPiece vocabulary. It",
        "exercises the daemon's BERT-family path (post-LN blocks, learned positions, tied",
        "MLM head, WordPiece, the [CLS]/[SEP] framing) as the LLaDA model in",
        "models/tinystories exercises the LLaDA path. It writes lower-case children's",
        "story phrases; it is a demonstration model: expect grammar slips, repeated words",
        "and no coherent plot.",
        "",
        "## Shapes",
        "",
        "| field | value |",
        "|---|---|",
        "| architecture | DistilBERT (`model_type` distilbert, `DistilBertForMaskedLM`): "
        "post-LN blocks, GELU (erf), learned positions, bidirectional attention, MLM head "
        "(vocab_transform, GELU, vocab_layer_norm, vocab_projector tied to the word "
        "embeddings, with bias) |",
        f"| parameters | {n_params:,} |",
        f"| dim / n_layers / n_heads | {cfg['dim']} / {cfg['n_layers']} / {cfg['n_heads']} "
        f"(head dim {cfg['dim'] // cfg['n_heads']}) |",
        f"| hidden_dim | {cfg['hidden_dim']} |",
        f"| vocabulary | {cfg['vocab_size']} (uncased WordPiece) |",
        f"| max_position_embeddings | {cfg['max_position_embeddings']} |",
        "| LayerNorm epsilon | 1e-12 (fixed by DistilBERT's modules) |",
        "| special tokens | [PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3, [MASK] 4 |",
        "| weights | bf16, one model.safetensors, tensor names as in DistilBertForMaskedLM; "
        "vocab_projector.weight is not stored (tied) |",
        "",
        "Released DistilBERT checkpoints are usually f32; unmaskd loads both.",
        "",
        "## Tokenizer",
        "",
        "Uncased WordPiece trained by `tools/train_wordpiece.py` on the training split.",
        "Normalization is BERT's: clean control characters, space out CJK characters, strip",
        "accents, lower case. Pre-tokenization is BERT's too: split at whitespace, and every",
        "punctuation character is a word of its own. Words become greedy",
        "longest-match-first pieces with `##` continuations, and words over 100 characters",
        "become `[UNK]`. The five special tokens come",
        f"first, then the characters and the `##` characters of the training text, then",
        f"pieces merged by pair frequency ({n_cont} of the {len(vocab)} entries are `##`",
        "pieces). The folder has it three ways: vocab.txt, tokenizer.json (the",
        "BertTokenizerFast layout, with the `[CLS] $A [SEP]` template) and",
        "tokenizer_config.json (BertTokenizer, do_lower_case).",
        "",
        "## Framing",
        "",
        "The token stream is the stories' WordPiece ids with `[SEP]` after each story. Every",
        f"training window is `[CLS]`, {span} tokens of the stream, `[SEP]` ({run['seq_len']}",
        "tokens); half the windows start at a story start, the rest anywhere. Generation",
        "runs on the same frame: the canvas is `[CLS] prompt [MASK]...[MASK] [SEP]`, and",
        "[MASK], [CLS] and [PAD] are never sampled. A `[SEP]` inside the generated text is",
        "a story end.",
        "",
    ]
    return lines + distilbert_training(ck, rows, name) + distilbert_samples(ck, rows, gens,
                                                                             commands)


def distilbert_training(ck, rows, name):
    """Format the Training section of the DistilBERT card: data, objective, commands."""
    cfg, run = ck["config"], ck["args"]
    best = min(float(r["val_loss"]) for r in rows)
    span = run["seq_len"] - 2
    return [
        "## Training",
        "",
        "Data: the lowercase head of the TinyStories training split (about 4.2 MB, 5,478",
        "stories); the last 5% of stories are held out for validation.",
        "",
        "Objective: LLaDA's. The first `[CLS]` and the last `[SEP]` of a window are never",
        "masked; every other position, story separators included, is masked with",
        "probability p = (1 - 1e-3) t + 1e-3 for one t ~ U(0, 1) per sequence. The loss is",
        "the cross-entropy on the masked positions weighted by 1 / p, divided by the number",
        f"of maskable tokens ({span} per window). AdamW (betas 0.9/0.95, weight decay 0.1 on",
        "matrices and embeddings), gradient clipping at 1.0, no dropout, linear warmup then",
        "cosine decay to 10% over the time budget, float32, one PyTorch thread on 2 CPU",
        "cores shared with other work. Weights start as DistilBERT's do (normal with std",
        "0.02, zero biases)"
        + (", except the learned position embeddings, which start from sine and\n"
           "cosine codes scaled to the same variance." if run.get("pos_init") == "sinusoidal"
           else "."),
        "",
        "```",
        "/usr/bin/python3 tools/train_wordpiece.py --vocab-size "
        f"{cfg['vocab_size']} --out models/{name} \\",
        "    --fixture tests/fixtures/wordpiece-tinystories.json",
        train_command(run, f"models/{name}/vocab.txt", f"runs/{name}", "distilbert"),
        f"/usr/bin/python3 tools/export_hf.py --checkpoint runs/{name}/checkpoint.pt \\",
        f"    --tokenizer models/{name}/vocab.txt --out models/{name}",
        f"/usr/bin/python3 tools/model_card.py --checkpoint runs/{name}/checkpoint.pt \\",
        f"    --log runs/{name}/loss.csv --model models/{name} --build build",
        "/usr/bin/python3 tools/make_family_fixtures.py",
        "```",
        "",
    ] + measures(ck, run, best, "1 thread on 2 shared cores, AMD EPYC with AVX2") + [
        "",
        "Both losses are the masked objective on the same 64 validation windows with fixed",
        "masks; the unigram baseline predicts every masked token from the training token",
        "frequencies, which is the best a model that ignores context can do. The training",
        "loss is the mean over the steps since the previous row of loss.csv.",
        "",
        "![loss curve](loss.png)",
        "",
    ]


def distilbert_samples(ck, rows, gens, commands):
    """Format the Samples, Limits and License sections of the DistilBERT card."""
    run = ck["args"]
    span = run["seq_len"] - 2
    first_below = next((r["step"] for r in rows
                        if float(r["val_loss"]) < float(r["unigram_val_loss"])), "none")
    lines = [
        "## Samples",
        "",
        "From the daemon and the client of this source tree, built in `build/`:",
        "",
        "```",
    ] + commands + [
        "```",
        "",
        "64 tokens, blocks of 32, 64 steps, low_confidence remasking, temperature 0.7,",
        "seeds 7, 8 and 9, bf16 weights widened to f32 (this CPU has no bf16 instructions).",
        "The prompt is in bold; the text shown is the prompt and the reply's tokens decoded",
        "together, up to the first `[SEP]` (a story end).",
        "",
    ]
    for prompt, text in gens:
        lines += [f"> **{prompt}**{text}", ""]
    lines += [
        "## Limits",
        "",
        f"- Trained for {ck['wall_s'] / 60:.0f} minutes on one CPU thread, it ends "
        f"{ck['unigram_val_loss'] - ck['val_loss']:.2f} nats below the",
        "  unigram baseline. It has learned frequent words and story openings, not",
        "  grammar: after a sentence or so, generations fill with punctuation and repeated",
        f"  words. The validation loss first went below the baseline at step {first_below}",
        "  and was still falling when the time budget ended.",
        f"- Context is {run['seq_len']} positions including `[CLS]` and `[SEP]`: the prompt and",
        f"  the generation together may hold at most {span} tokens.",
        "- Lower case only, and only the characters of the training text: digits are rare",
        "  and other words split into short pieces or become `[UNK]`.",
        "- It has seen nothing but TinyStories; it is no general-purpose model.",
        "",
        "## License",
        "",
        "The weights are released with unmaskd under the MIT license. TinyStories is",
        "licensed CDLA-Sharing-1.0.",
        "",
    ]
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--build", default="build",
                    help="build folder with unmaskd and unmask (DistilBERT samples)")
    args = ap.parse_args()
    ck = torch.load(args.checkpoint, map_location="cpu")
    cfg, run = ck["config"], ck["args"]
    with open(args.log) as f:
        rows = list(csv.DictReader(f))
    with open(os.path.join(args.model, "loss.csv"), "w") as f:
        f.write(open(args.log).read())
    if cfg["model_type"] == "distilbert":
        plot(rows, os.path.join(args.model, "loss.png"),
             "bundled DistilBERT model: masked-diffusion objective")
        lines = distilbert_card(ck, rows, args.model, args.build)
        with open(os.path.join(args.model, "README.md"), "w") as f:
            f.write("\n".join(lines))
        print(f"wrote {args.model}/README.md and loss.png")
        return
    plot(rows, os.path.join(args.model, "loss.png"))
    n_params = sum(t.numel() for t in ck["state"].values())
    best = min(float(r["val_loss"]) for r in rows)
    gens = samples(args.model)
    cmd = train_command(run, "models/tinystories/tokenizer.json", "runs/tinystories")
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
    ] + measures(ck, run, best, "2 cores, AMD EPYC with AVX2") + [
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
