#!/usr/bin/python3
"""Write reference likelihood estimates for the score request.

Runs tools/llada_ref.py's score() (LLaDA's Monte-Carlo estimate of log p(answer |
prompt), with unmaskd's random draws) on the bundled model and on the random-weight BERT
fixture (framed "[CLS] prompt answer [SEP]" as the daemon frames it), and writes
tests/fixtures/score.json: per case the ids, the settings, the estimate, its standard
error, the per-sample losses and the number of forward passes.

Usage: make_score_fixtures.py [--model models/tinystories] [--out tests/fixtures/score.json]
"""

import argparse
import json
import os

import llada_ref
from make_family_generations import FamilyModel
from um_tokenizer import Tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# (name, prompt, answer, settings) on the bundled model.
BUNDLED = [
    ("one_batch", "once upon a time, there was a little girl named lily.",
     " she liked to play in the park.", {"n_samples": 4, "batch_size": 4, "seed": 1}),
    ("partial_batch", "the dog ran to the", " big red ball.",
     {"n_samples": 7, "batch_size": 3, "seed": 2}),
    ("single_sample", "tom had a", " cat.", {"n_samples": 1, "batch_size": 16, "seed": 3}),
    ("guidance", "once upon a time", " there was a boy.",
     {"n_samples": 4, "batch_size": 2, "seed": 4, "cfg_scale": 1.0}),
]


def run(model, name, prompt_ids, answer_ids, settings, suffix=()):
    s = dict({"cfg_scale": 0.0}, **settings)
    ll, se, losses, passes = llada_ref.score(model, prompt_ids, answer_ids, suffix=suffix, **s)
    print(f"{name}: log p = {ll:.4f} +- {se:.4f} over {s['n_samples']} samples")
    return dict(s, name=name, prompt_ids=list(prompt_ids), answer_ids=list(answer_ids),
                suffix=list(suffix), log_likelihood=ll, std_error=se, losses=losses,
                forward_passes=passes)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "tinystories"))
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "score.json"))
    args = ap.parse_args()
    model = llada_ref.load_model(args.model)
    tok = Tokenizer(os.path.join(args.model, "tokenizer.json"))
    cases = [dict(run(model, name, tok.encode(p), tok.encode(a), s), prompt=p, answer=a,
                  model="bundled")
             for name, p, a, s in BUNDLED]
    bert = FamilyModel(os.path.join(ROOT, "tests", "fixtures", "families", "bert"))
    # The fixture's words w0, w1, ... are ids 5, 6, ...
    prompt = bert.prefix + [5 + 12, 5 + 40, 5 + 7]
    answer = [5 + 3, 5 + 21, 5 + 60, 5 + 9]
    case = run(bert, "bert_framed", prompt, answer, {"n_samples": 6, "batch_size": 4,
                                                     "seed": 9}, suffix=bert.suffix)
    case.update(prompt="w12 w40 w7", answer="w3 w21 w60 w9", model="bert")
    cases.append(case)
    with open(args.out, "w") as f:
        json.dump({"cases": cases}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
