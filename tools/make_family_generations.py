#!/usr/bin/python3
"""Write reference generations for the model families beside LLaDA.

For each model folder (the Dream, BERT and DistilBERT fixtures in
tests/fixtures/families, and the bundled DistilBERT model, prompted with story
openings in its own vocabulary) this runs
tools/llada_ref.py's sampler over tools/families_ref.py's forward pass and writes
generate.json into tests/fixtures/families/<name>/: per case the settings, the prompt
ids as the daemon frames them, and the canvas the sampler produced.

Framing follows unmaskd: the BERT family reads "[CLS] prompt [MASK]... [SEP]", with
[MASK], [CLS] and [PAD] never predicted; Dream and LLaDA frame nothing and never
predict the mask token.

A case is kept only when its closest decision clears llada_ref.MARGIN_REQUIRED, the
same rule as tools/make_fixtures.py, because then f32 rounding differences between
engines cannot flip it. Otherwise the tool tries the next prompt.

Usage: make_family_generations.py [--out tests/fixtures/families] [--bundled DIR]
"""

import argparse
import json
import math
import os

import torch

import families_ref
import llada_ref
import um_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BERT_TYPES = ("bert", "distilbert")

# (name, settings): greedy over blocks, guidance (the suffix stays in the unconditional
# sequence), and a sampled case.
CASES = [
    ("greedy_blocks", {"gen_length": 12, "block_length": 6, "steps": 12}),
    ("greedy_cfg", {"gen_length": 8, "block_length": 8, "steps": 4, "cfg_scale": 1.5}),
    ("sampled", {"gen_length": 10, "block_length": 5, "steps": 10, "temperature": 0.8,
                 "seed": 11}),
]


def special_ids(folder):
    """Return the BERT special tokens of vocab.txt as {"[CLS]": id, ...}."""
    with open(os.path.join(folder, "vocab.txt"), encoding="utf-8") as f:
        vocab = [line.rstrip("\n") for line in f]
    return {t: vocab.index(t) for t in ("[PAD]", "[CLS]", "[SEP]", "[MASK]") if t in vocab}


class FamilyModel:
    """A Hugging Face folder of one family as the sampler's model: __call__ gives logits."""

    def __init__(self, folder):
        with open(os.path.join(folder, "config.json")) as f:
            self.cfg = json.load(f)
        self.tensors = {k: (v.float() if v.is_floating_point() else v)
                        for k, v in llada_ref.load_safetensors(
                            os.path.join(folder, "model.safetensors")).items()}
        self.type = self.cfg["model_type"]
        self.forward = families_ref.LOGITS[self.type]
        # A trained model's own tokenizer, for prompts of real text; None for fixtures.
        path = os.path.join(folder, "tokenizer.json")
        self.tokenizer = um_tokenizer.load(path) if os.path.isfile(path) else None
        vocab = self.cfg["vocab_size"]
        self.prefix, self.suffix = [], []
        if self.type in BERT_TYPES:
            ids = special_ids(folder)
            mask = self.cfg.get("mask_token_id", ids["[MASK]"])
            eos = ids["[SEP]"]
            self.prefix, self.suffix = [ids["[CLS]"]], [ids["[SEP]"]]
            self.never = [mask] + [t for t in (ids["[CLS]"], ids.get("[PAD]", -1))
                                   if t >= 0 and t not in (mask, eos)]
            self.specials = set(ids.values())
        else:
            mask, eos = self.cfg["mask_token_id"], self.cfg.get("eos_token_id")
            self.never = [mask]
            self.specials = {mask, eos}
        self.config = llada_ref.Config({
            "d_model": 1, "n_layers": 1, "n_heads": 1, "mlp_hidden_size": 1,
            "vocab_size": vocab, "max_sequence_length": 1, "mask_token_id": mask,
            "eos_token_id": eos})

    def __call__(self, ids):
        return self.forward(self.cfg, self.tensors, ids)


# Story openings for a trained model, whose decisions on random ids can be near ties.
STORY_PROMPTS = ["once upon a time, there was a little girl named lily.",
                 "one day, a boy named tom went to the park.",
                 "the cat saw a big red ball.", "there was a dog who liked to run.",
                 "mom and dad went to the store.", "a little bird sat on a tree."]


def run_case(model, settings, prompt_seed):
    if model.tokenizer:
        text = STORY_PROMPTS[prompt_seed % len(STORY_PROMPTS)]
        prompt = model.tokenizer.encode(text)
    else:
        g = torch.Generator().manual_seed(prompt_seed)
        plain = [t for t in range(model.config.vocab_size) if t not in model.specials]
        prompt = [plain[i] for i in torch.randint(0, len(plain), (5,), generator=g).tolist()]
    framed = model.prefix + prompt
    margin = llada_ref.Margin()
    stats = {}
    canvas = llada_ref.generate(
        model, framed, gen_length=settings["gen_length"],
        block_length=settings["block_length"], steps=settings["steps"],
        temperature=settings.get("temperature", 0.0), cfg_scale=settings.get("cfg_scale", 0.0),
        seed=settings.get("seed", 0), margin=margin, stats=stats, suffix=model.suffix,
        never_sampled=model.never)
    return framed, canvas, margin, stats


def write_cases(folder, out):
    model = FamilyModel(folder)
    cases = []
    for name, settings in CASES:
        for attempt in range(20):
            framed, canvas, margin, stats = run_case(model, settings, 1000 + attempt)
            if margin.ratio >= 1.0:
                break
        else:
            raise SystemExit(f"{folder}: case {name} found no prompt whose closest decision "
                             f"clears the required margin")
        full = dict({"temperature": 0.0, "cfg_scale": 0.0, "seed": 0}, **settings)
        cases.append(dict(full, name=name, prompt_ids=framed, suffix=model.suffix,
                          canvas=canvas, forward_passes=stats["forward_passes"],
                          margin=margin.value if math.isfinite(margin.value) else None,
                          margin_at=margin.where))
        print(f"{os.path.relpath(out, ROOT)}: {name}: margin x{margin.ratio:.3g} ({margin.where})")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "generate.json"), "w") as f:
        json.dump({"model": os.path.relpath(folder, ROOT),
                   "margin_required": llada_ref.MARGIN_REQUIRED, "cases": cases}, f)
        f.write("\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "families"))
    ap.add_argument("--bundled", default=os.path.join(ROOT, "models", "tinystories-distilbert"))
    args = ap.parse_args()
    for name in ("dream", "bert", "distilbert"):
        folder = os.path.join(args.out, name)
        write_cases(folder, folder)
    if os.path.isfile(os.path.join(args.bundled, "config.json")):
        write_cases(args.bundled, os.path.join(args.out, "tinystories-distilbert"))


if __name__ == "__main__":
    main()
