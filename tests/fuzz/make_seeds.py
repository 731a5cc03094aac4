#!/usr/bin/env python3
"""Write the fuzzers' fixed tokenizers and seed corpora from the bundled model.

  data/bpe/tokenizer.json        the bundled byte-level BPE cut to ids below 512
  data/wordpiece/tokenizer.json  a small lower-casing BERT vocabulary
  data/spm/tokenizer.model       a SentencePiece BPE model with the pieces of data/bpe
  corpus/<target>/               small valid and nearly valid inputs for each target

The encode and decode targets load data/<tokenizer>/ for every input, so those files
stay small. Run from anywhere; the output replaces the files it names and leaves other
files (such as inputs the fuzzers added) alone.

Usage: make_seeds.py [--src SOURCE_TREE]
"""

import argparse
import json
import os
import struct

# ---------------------------------------------------------------------------
# Helpers


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    with open(path, "wb") as f:
        f.write(data)


def dump(obj):
    return json.dumps(obj, ensure_ascii=False, indent=1) + "\n"


def byte_to_unicode():
    """GPT-2's map from bytes to the printable characters of byte-level vocabularies."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) +
                 list(range(0xAE, 0x100)))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, codes)}


TEXTS = [
    "once upon a time, there was a little girl named lily.",
    "She said, \"I'll go!\" and they're happy; we've won, I'm sure, you'd see.",
    "numbers 12345 and 3.14159, dates 2026-12-04",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\nnewlines\n\n\nand   runs of    spaces",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00fcber stra\u00dfe",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8 \u4e2d\u6587 \ud55c\uad6d\uc5b4",
    "emoji \U0001F600\U0001F44D\U0001F3FD and symbols \u2192 \u2264 \u00a9",
    "the end.<|endoftext|>once upon a time<|mdm_mask|> there",
    "[CLS] hello [MASK] world [SEP]",
    "\u0000nul and \u007fdel",
]

# ---------------------------------------------------------------------------
# BPE: the bundled tokenizer.json with ids below 512 (the 256 bytes and the first 256
# merges) and its two added tokens moved to 512 and 513.


def small_bpe(full):
    vocab = {t: i for t, i in full["model"]["vocab"].items() if i < 512}
    merges = [m for m in full["model"]["merges"]
              if vocab.get(m.replace(" ", ""), 512) < 512][:256]
    added = []
    for k, tok in enumerate(full["added_tokens"]):
        tok = dict(tok)
        tok["id"] = 512 + k
        added.append(tok)
    doc = dict(full)
    doc["added_tokens"] = added
    doc["model"] = dict(full["model"], vocab=vocab, merges=merges)
    return doc


def bpe_variants(doc):
    """Other shapes the loader accepts or rejects, each a small change of doc."""
    out = {}
    gpt2 = dict(doc, pre_tokenizer={"type": "ByteLevel", "add_prefix_space": True,
                                    "trim_offsets": True, "use_regex": True})
    out["bytelevel_regex.json"] = gpt2
    llama3 = dict(doc, pre_tokenizer={"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": (
            "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"
            "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")},
         "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]})
    out["split_llama3.json"] = llama3
    literal = dict(doc, pre_tokenizer={"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"String": " "}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]})
    out["split_string.json"] = literal
    pairs = dict(doc, model=dict(doc["model"], ignore_merges=True,
                                 merges=[m.split(" ") for m in doc["model"]["merges"]]))
    out["merge_pairs.json"] = pairs
    out["nfc.json"] = dict(doc, normalizer={"type": "NFC"})
    out["no_bytelevel.json"] = dict(doc, pre_tokenizer={"type": "Whitespace"})
    return out


# ---------------------------------------------------------------------------
# WordPiece: a small uncased BERT vocabulary in tokenizer.json and vocab.txt form.

WP_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def wordpiece_vocab():
    words = ("the a once upon time there was little girl named lily she said and they "
             "happy we won sure see go end numbers dates cafe naive resume uber strasse "
             "hello world run runs of spaces tabs new lines play ##ing ##ed ##s ##er ##ly "
             "##es ##y").split()
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()[]<>|/\\")
    chars += ["\u00e9", "\u00fc", "\u00df", "\u65e5", "\u672c", "\u8a9e", "\u4e2d",
              "\u6587", "\u2192", "\u00a9"]
    tokens = WP_SPECIALS + ["[unused0]"] + chars + ["##" + c for c in chars[:36]] + words
    seen, out = set(), []
    for t in tokens:
        if t not in seen:
            seen.add(t)
            out.append(t)
    return out


def wordpiece_json(vocab, lowercase=True, strip_accents=None):
    added = [{"id": vocab.index(t), "content": t, "single_word": False, "lstrip": False,
              "rstrip": False, "normalized": False, "special": True} for t in WP_SPECIALS]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "BertNormalizer", "clean_text": True,
                       "handle_chinese_chars": True, "strip_accents": strip_accents,
                       "lowercase": lowercase},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": None,
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": True},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                  "max_input_chars_per_word": 100,
                  "vocab": {t: i for i, t in enumerate(vocab)}},
    }


# ---------------------------------------------------------------------------
# SentencePiece: protobuf wire format by hand (sentencepiece_model.proto field numbers).

UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 2, 3, 4, 5, 6


def varint(v):
    v &= (1 << 64) - 1
    out = bytearray()
    while True:
        c = v & 0x7F
        v >>= 7
        out.append(c | (0x80 if v else 0))
        if not v:
            return bytes(out)


def pb_uint(field, v):
    return varint(field << 3) + varint(v)


def pb_bytes(field, data):
    if isinstance(data, str):
        data = data.encode("utf-8")
    return varint(field << 3 | 2) + varint(len(data)) + data


def pb_piece(text, score, kind=0):
    body = pb_bytes(1, text) + varint(2 << 3 | 5) + struct.pack("<f", score)
    if kind:
        body += pb_uint(3, kind)
    return pb_bytes(1, body)


def spm_model(pieces, model_type=2, byte_fallback=True, dummy_prefix=True,
              extra_whitespace=False, charsmap=None):
    out = b"".join(pb_piece(*p) for p in pieces)
    trainer = pb_uint(3, model_type) + pb_uint(43, -1)
    if byte_fallback:
        trainer += pb_uint(35, 1)
    out += pb_bytes(2, trainer)
    norm = pb_bytes(1, "identity")
    if charsmap:
        norm += pb_bytes(2, charsmap)
    norm += pb_uint(3, int(dummy_prefix)) + pb_uint(4, int(extra_whitespace)) + pb_uint(5, 1)
    return out + pb_bytes(3, norm)


def spm_pieces(bpe_doc, with_bytes=True):
    """<unk>, <s>, </s>, the byte pieces, the BPE entries as text, their characters."""
    decode = {c: b for b, c in byte_to_unicode().items()}
    pieces = [("<unk>", 0.0, UNKNOWN), ("<s>", 0.0, CONTROL), ("</s>", 0.0, CONTROL)]
    if with_bytes:
        pieces += [("<0x%02X>" % b, 0.0, BYTE) for b in range(256)]
    merged, chars = [], []
    for entry, i in sorted(bpe_doc["model"]["vocab"].items(), key=lambda kv: kv[1]):
        try:
            text = bytes(decode[c] for c in entry).decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            continue
        text = text.replace(" ", "\u2581")
        if i >= 256:
            merged.append((text, -float(i - 256), 0))
        for c in text:
            if c not in chars and c.isprintable():
                chars.append(c)
    pieces += merged
    known = {p[0] for p in pieces}
    pieces += [(c, -1000.0 - k, 0) for k, c in enumerate(chars) if c not in known]
    pieces.append(("<|mdm_mask|>", 0.0, USER_DEFINED))
    return pieces


# ---------------------------------------------------------------------------
# safetensors


def safetensors(tensors, metadata=None, pad_header=True):
    """tensors: (name, dtype, shape, raw bytes); offsets follow in order."""
    header, data = {}, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape,
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header, separators=(",", ":")).encode()
    if pad_header:
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def safetensors_seeds(model_path):
    f32 = struct.pack("<6f", 1, 2, 3, 4, 5, 6)
    bf16 = struct.pack("<4H", 0x3F80, 0x4000, 0x4040, 0x4080)
    i64 = struct.pack("<3q", 0, 1, 2)
    seeds = {
        "three_dtypes.safetensors": safetensors(
            [("model.transformer.wte.weight", "F32", [2, 3], f32),
             ("model.transformer.ln_f.weight", "BF16", [4], bf16),
             ("bert.embeddings.position_ids", "I64", [1, 3], i64)],
            metadata={"format": "pt"}),
        "scalar_and_empty.safetensors": safetensors(
            [("scalar", "F32", [], f32[:4]), ("empty", "BF16", [0, 5], b"")]),
        "unsupported_dtype.safetensors": safetensors([("x", "F16", [2], b"\0" * 4)]),
        "empty_header.safetensors": safetensors([]),
    }
    with open(model_path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = f.read(n)
    # The bundled model's real header with the data cut off, then cut inside the header.
    seeds["bundled_no_data.safetensors"] = struct.pack("<Q", n) + header
    seeds["bundled_cut_header.safetensors"] = struct.pack("<Q", n) + header[:n // 3]
    return seeds


# ---------------------------------------------------------------------------
# Requests

REQUESTS = {
    "generate_full.json": {
        "op": "generate", "id": "g1", "prompt": "once upon a time", "gen_length": 32,
        "steps": 16, "block_length": 8, "temperature": 0.7, "cfg_scale": 0.0,
        "remasking": "low_confidence", "remasking_params": {"threshold": 0.9}, "seed": 7,
        "stream": True, "top_k": 40, "top_p": 0.95, "schedule": "timestep", "eps": 0.001,
        "ban_eos": False, "suppress_eos_confidence": True, "early_stop": True,
        "trim_eos": True},
    "generate_min.json": {"op": "generate", "prompt": "hi"},
    "tokenize.json": {"op": "tokenize", "id": 3, "text": "once upon a time"},
    "detokenize.json": {"op": "detokenize", "id": [1, 2], "tokens": [397, 419, 258, 4094]},
    "info.json": {"op": "info", "id": None},
    "health.json": {"op": "health", "id": {"k": "v"}},
    "cancel.json": {"op": "cancel", "id": "c", "target": "g1"},
    "typo_field.json": {"op": "generate", "prompt": "x", "gen_lenght": 4},
    "bad_op.json": {"op": "genrate", "id": "x"},
}

# ---------------------------------------------------------------------------


def ids_bytes(ids, flags=0):
    """The decode targets' input: a flags byte, then 16-bit little-endian id codes."""
    return bytes([flags]) + b"".join(struct.pack("<H", (i + 1) & 0xFFFF) for i in ids)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--src", default=os.path.join(here, "..", ".."),
                        help="source tree with models/tinystories (default: this tree)")
    args = parser.parse_args()
    model = os.path.join(args.src, "models", "tinystories")
    fam = os.path.join(args.src, "tests", "fixtures", "families")
    data = os.path.join(here, "data")
    corpus = os.path.join(here, "corpus")

    with open(os.path.join(model, "tokenizer.json"), encoding="utf-8") as f:
        full_bpe = json.load(f)
    bpe = small_bpe(full_bpe)
    write(os.path.join(data, "bpe", "tokenizer.json"), dump(bpe))
    write(os.path.join(corpus, "bpe_load", "small.json"), dump(bpe))
    for name, doc in bpe_variants(bpe).items():
        write(os.path.join(corpus, "bpe_load", name), dump(doc))

    vocab = wordpiece_vocab()
    write(os.path.join(data, "wordpiece", "tokenizer.json"), dump(wordpiece_json(vocab)))
    write(os.path.join(corpus, "wordpiece_json", "uncased.json"), dump(wordpiece_json(vocab)))
    write(os.path.join(corpus, "wordpiece_json", "cased.json"),
          dump(wordpiece_json(vocab, lowercase=False, strip_accents=False)))
    write(os.path.join(corpus, "wordpiece_vocab", "small.txt"), "\n".join(vocab) + "\n")
    write(os.path.join(corpus, "wordpiece_vocab", "crlf.txt"), "\r\n".join(vocab[:60]))
    for family in ("bert", "distilbert"):
        with open(os.path.join(fam, family, "vocab.txt"), "rb") as f:
            write(os.path.join(corpus, "wordpiece_vocab", family + ".txt"), f.read())

    pieces = spm_pieces(bpe)
    write(os.path.join(data, "spm", "tokenizer.model"), spm_model(pieces))
    write(os.path.join(corpus, "spm_load", "byte_fallback.model"), spm_model(pieces))
    plain = spm_pieces(bpe, with_bytes=False)
    plain.append(("\u2581th\u2581e", -5.0, UNUSED))
    write(os.path.join(corpus, "spm_load", "no_bytes.model"),
          spm_model(plain, byte_fallback=False, dummy_prefix=False, extra_whitespace=True))
    write(os.path.join(corpus, "spm_load", "unigram.model"), spm_model(pieces[:40], model_type=1))
    write(os.path.join(corpus, "spm_load", "charsmap.model"),
          spm_model(pieces[:40], charsmap=b"\x01\x02\x03"))

    for tok in ("bpe", "wordpiece", "spm"):
        for k, text in enumerate(TEXTS):
            write(os.path.join(corpus, tok + "_encode", "text%02d.txt" % k), text)
        write(os.path.join(corpus, tok + "_encode", "invalid_utf8.txt"), b"ok \xff\xc0\x80 end")
    # Ids as the decode targets read them: every id of each small vocabulary once,
    # then runs around the ends and the special tokens.
    sizes = {"bpe": 514, "wordpiece": len(vocab), "spm": len(pieces)}
    for tok, n in sizes.items():
        write(os.path.join(corpus, tok + "_decode", "all_ids.bin"), ids_bytes(range(n)))
        write(os.path.join(corpus, tok + "_decode", "skip_special.bin"),
              ids_bytes([0, 1, 2, 3, 4, n - 2, n - 1, 5, 6], flags=1))
        write(os.path.join(corpus, tok + "_decode", "out_of_range.bin"),
              ids_bytes([7, n, 8]))

    for name, req in REQUESTS.items():
        write(os.path.join(corpus, "request", name), json.dumps(req))
    write(os.path.join(corpus, "request", "prompt_nul.json"),
          '{"op":"tokenize","id":"n","text":"a\\u0000b\\ud83d\\ude00"}')
    write(os.path.join(corpus, "request", "not_object.json"), "[1,2,3]")

    for name, raw in safetensors_seeds(os.path.join(model, "model.safetensors")).items():
        write(os.path.join(corpus, "safetensors", name), raw)

    with open(os.path.join(model, "config.json"), "rb") as f:
        write(os.path.join(corpus, "config", "llada.json"), f.read())
    for family in ("bert", "distilbert", "dream"):
        with open(os.path.join(fam, family, "config.json"), "rb") as f:
            write(os.path.join(corpus, "config", family + ".json"), f.read())


if __name__ == "__main__":
    main()
