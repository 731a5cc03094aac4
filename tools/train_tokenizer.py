#!/usr/bin/env python3
"""Train a byte-level BPE tokenizer and write it as a Hugging Face tokenizer.json.

The pre-tokenizer is the GPT-2 split pattern followed by the GPT-2 byte-to-unicode
mapping, so the file loads in any byte-level BPE implementation that reads
tokenizer.json. Vocabulary layout: the 256 byte symbols, then the merges in the
order they were learned, then the special tokens.

Usage: train_tokenizer.py --vocab-size 4096 --out models/tinystories-7m/tokenizer.json
"""

import argparse
import collections
import heapq
import json
import os
import sys

import regex

import um_data
from um_tokenizer import GPT2_PATTERN, bytes_to_unicode

SPECIAL_TOKENS = ["<|endoftext|>", "<|mdm_mask|>"]


def count_words(texts, pattern):
    """Count pre-tokenized words, each as a tuple of byte-symbol strings."""
    b2u = bytes_to_unicode()
    counts = collections.Counter()
    for text in texts:
        for piece in pattern.findall(text):
            counts[piece] += 1
    return {tuple(b2u[b] for b in w.encode("utf-8")): n for w, n in counts.items()}


def learn_merges(words, n_merges, join=lambda a, b: a + b):
    """Learn BPE merges greedily by pair frequency; ties go to the smaller pair.

    join(a, b) spells the merged symbol (WordPiece drops the `##` of the second part).

    Pair counts are updated incrementally: only the words that contain the merged
    pair are re-scanned, so each merge costs time in proportion to those words.
    """
    words = [(list(w), n) for w, n in words.items()]
    pair_counts = collections.Counter()
    where = collections.defaultdict(set)
    for i, (w, n) in enumerate(words):
        for a, b in zip(w, w[1:]):
            pair_counts[(a, b)] += n
            where[(a, b)].add(i)
    heap = [(-n, p) for p, n in pair_counts.items()]
    heapq.heapify(heap)
    merges = []
    while len(merges) < n_merges and heap:
        neg, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg or -neg <= 0:
            continue
        merges.append(pair)
        joined = join(pair[0], pair[1])
        for i in list(where[pair]):
            w, n = words[i]
            for a, b in zip(w, w[1:]):
                pair_counts[(a, b)] -= n
            out, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and w[j] == pair[0] and w[j + 1] == pair[1]:
                    out.append(joined)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[i] = (out, n)
            for a, b in zip(out, out[1:]):
                pair_counts[(a, b)] += n
                where[(a, b)].add(i)
                heapq.heappush(heap, (-pair_counts[(a, b)], (a, b)))
        del pair_counts[pair]
        del where[pair]
    return merges


def build_tokenizer_json(merges, pattern_text):
    """Assemble the tokenizer.json document for a byte-level BPE vocabulary."""
    b2u = bytes_to_unicode()
    vocab = {}
    for b in range(256):
        vocab[b2u[b]] = len(vocab)
    for a, b in merges:
        vocab[a + b] = len(vocab)
    added = []
    for tok in SPECIAL_TOKENS:
        added.append({"id": len(vocab), "content": tok, "single_word": False, "lstrip": False,
                      "rstrip": False, "normalized": False, "special": True})
        vocab[tok] = len(vocab)
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": pattern_text},
                 "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                 "use_regex": False},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                    "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False,
                  "vocab": vocab, "merges": [a + " " + b for a, b in merges]},
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--text", default=os.path.join(um_data.data_dir(),
                                                   "tinystories_train_head_lowercase.txt"))
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if not os.path.exists(args.text):
        sys.exit(f"training text {args.text} not found: set UNMASKD_DATA to the data folder")
    train, _ = um_data.split_stories(um_data.read_stories(args.text))
    words = count_words(train, regex.compile(GPT2_PATTERN))
    n_merges = args.vocab_size - 256 - len(SPECIAL_TOKENS)
    merges = learn_merges(words, n_merges)
    doc = build_tokenizer_json(merges, GPT2_PATTERN)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, indent=1)
    print(f"wrote {args.out}: {len(doc['model']['vocab'])} tokens, {len(merges)} merges")


if __name__ == "__main__":
    main()
