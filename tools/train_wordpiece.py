#!/usr/bin/env python3
"""Train an uncased WordPiece vocabulary and write it in Hugging Face's BERT layout.

The words of the training split go through BERT normalization and pre-tokenization (see
um_tokenizer.WordPiece). Each is spelled as its first character followed by `##`
continuation characters. Pairs are then merged by frequency as in BPE training
(train_tokenizer.learn_merges), and each merge adds one piece. Vocabulary layout: the
special tokens [PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3, [MASK] 4, then the characters, then
the `##` characters, then the merged pieces in the order they were learned. Encoding is
greedy longest-match-first, which is what BERT's WordPiece and the C plugin do.

Writes vocab.txt, tokenizer.json (BertTokenizerFast's layout) and tokenizer_config.json
into --out. With --fixture it also writes the ids and decoded text of a few sentences,
the expected values of the C plugin's test.

Usage: train_wordpiece.py --vocab-size 4096 --out models/tinystories-distilbert
"""

import argparse
import collections
import json
import os
import sys

import um_data
from train_tokenizer import learn_merges
from um_tokenizer import WP_SPECIAL_TOKENS, WordPiece, bert_normalize, bert_pre_tokenize

PREFIX = "##"
MAX_CHARS = 100

# Sentences for the C plugin's test: story-like text in the vocabulary's domain, and a
# few with what normalization changes (case, accents, control characters, spacing).
FIXTURE_TEXTS = [
    "once upon a time, there was a little girl named lily.",
    "the big dog ran to the park and saw a red ball. he was very happy!",
    "\"can i play with you?\" asked the small cat.",
    "mom said, \"it's time for bed.\" tim didn't want to sleep.",
    "they found a shiny treasure under the old tree and shared it with their friends.",
    "The Brave Knight met a Dragon near the CASTLE.",
    "Zoë ate a crème brûlée\tat the café\u00a0in Paris.",
    "a supercalifragilisticexpialidocious word, xylophones and 42 zebras...",
    "she smiled -- and the sun came out; everyone was glad: the end",
]


def count_words(texts):
    counts = collections.Counter()
    for text in texts:
        counts.update(bert_pre_tokenize(bert_normalize(text)))
    return counts


def spell(word):
    return (word[0],) + tuple(PREFIX + c for c in word[1:])


def join(a, b):
    return a + (b[len(PREFIX):] if b.startswith(PREFIX) else b)


def build_vocab(counts, size):
    """Return the vocabulary as a list: specials, characters, `##` characters, merges."""
    words = {spell(w): n for w, n in counts.items() if len(w) <= MAX_CHARS}
    firsts = sorted({s[0] for s in words})
    conts = sorted({c for s in words for c in s[1:]})
    vocab = list(WP_SPECIAL_TOKENS) + firsts + conts
    seen = set(vocab)
    # Two merges can spell the same piece ("ab" + "##c" and "a" + "##bc"), so learn a few
    # more than needed and keep the first occurrence of each piece.
    n_merges = size - len(vocab)
    for a, b in learn_merges(words, n_merges + n_merges // 8, join):
        piece = join(a, b)
        if piece not in seen and len(vocab) < size:
            seen.add(piece)
            vocab.append(piece)
    if len(vocab) < size:
        sys.exit(f"the training text allows only {len(vocab)} pieces, fewer than {size}")
    return vocab


def tokenizer_json(vocab):
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, t in enumerate(WP_SPECIAL_TOKENS)]
    cls, sep = WP_SPECIAL_TOKENS.index("[CLS]"), WP_SPECIAL_TOKENS.index("[SEP]")
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "BertNormalizer", "clean_text": True,
                       "handle_chinese_chars": True, "strip_accents": None,
                       "lowercase": True},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "[SEP]", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}},
                     {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
            "special_tokens": {
                "[CLS]": {"id": "[CLS]", "ids": [cls], "tokens": ["[CLS]"]},
                "[SEP]": {"id": "[SEP]", "ids": [sep], "tokens": ["[SEP]"]},
            },
        },
        "decoder": {"type": "WordPiece", "prefix": PREFIX, "cleanup": True},
        "model": {"type": "WordPiece", "unk_token": "[UNK]",
                  "continuing_subword_prefix": PREFIX, "max_input_chars_per_word": MAX_CHARS,
                  "vocab": {t: i for i, t in enumerate(vocab)}},
    }


def tokenizer_config(max_len):
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True}
             for i, t in enumerate(WP_SPECIAL_TOKENS)}
    return {
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": True,
        "strip_accents": None,
        "tokenize_chinese_chars": True,
        "model_max_length": max_len,
        "unk_token": "[UNK]",
        "sep_token": "[SEP]",
        "pad_token": "[PAD]",
        "cls_token": "[CLS]",
        "mask_token": "[MASK]",
        "clean_up_tokenization_spaces": True,
        "added_tokens_decoder": added,
    }


def write_fixture(path, tok):
    cases = []
    for text in FIXTURE_TEXTS:
        ids = tok.encode(text)
        normalized, decoded = bert_normalize(text), tok.decode(ids)
        # round_trip: the decoded text equals the normalized input, which holds when every
        # word is spellable and the punctuation is one the decode cleanup reattaches.
        cases.append({"text": text, "normalized": normalized, "ids": ids,
                      "decoded": decoded, "round_trip": decoded == normalized})
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"vocab_size": len(tok.vocab), "cases": cases}, f, ensure_ascii=False,
                  indent=1)
        f.write("\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--text", default=os.path.join(um_data.data_dir(),
                                                   "tinystories_train_head_lowercase.txt"))
    ap.add_argument("--max-len", type=int, default=128, help="model_max_length")
    ap.add_argument("--out", required=True, help="folder for the three tokenizer files")
    ap.add_argument("--fixture", help="also write the C plugin's test cases to this file")
    args = ap.parse_args()
    if not os.path.exists(args.text):
        sys.exit(f"training text {args.text} not found: set UNMASKD_DATA to the data folder")
    train, _ = um_data.split_stories(um_data.read_stories(args.text))
    vocab = build_vocab(count_words(train), args.vocab_size)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    for name, doc in (("tokenizer.json", tokenizer_json(vocab)),
                      ("tokenizer_config.json", tokenizer_config(args.max_len))):
        with open(os.path.join(args.out, name), "w", encoding="utf-8") as f:
            json.dump(doc, f, ensure_ascii=False, indent=1)
            f.write("\n")
    tok = WordPiece(vocab, max_chars=MAX_CHARS)
    n_tok = sum(len(tok.encode(s)) for s in train)
    print(f"wrote {args.out}: {len(vocab)} tokens; training split {n_tok} tokens, "
          f"{sum(len(s) for s in train) / n_tok:.2f} characters per token")
    if args.fixture:
        os.makedirs(os.path.dirname(os.path.abspath(args.fixture)), exist_ok=True)
        write_fixture(args.fixture, tok)
        print(f"wrote {args.fixture}")


if __name__ == "__main__":
    main()
