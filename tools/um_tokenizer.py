"""Byte-level BPE and WordPiece encoders and decoders that read Hugging Face files.

Used by the training scripts and as the independent reference for the C tokenizer
plugins. Tokenizer supports what byte-level BPE vocabularies need: added tokens matched
before pre-tokenization, a Split regex pre-tokenizer (or the GPT-2 pattern when the
ByteLevel step has use_regex set), the byte-to-unicode map and ranked merges.
WordPiece is BERT's uncased scheme, read from vocab.txt or a tokenizer.json.
"""

import json
import unicodedata

import regex

GPT2_PATTERN = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"
                r"|\s+(?!\S)|\s+")


def bytes_to_unicode():
    """Return GPT-2's reversible map from the 256 byte values to printable characters."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


def _split_pattern(pre):
    """Find the split regex of a pre_tokenizer entry, or None."""
    if pre is None:
        return None
    if pre.get("type") == "Sequence":
        for p in pre.get("pretokenizers", []):
            found = _split_pattern(p)
            if found:
                return found
        return None
    if pre.get("type") == "Split":
        return pre["pattern"].get("Regex")
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return GPT2_PATTERN
    return None


class Tokenizer:
    """Byte-level BPE tokenizer loaded from a tokenizer.json file."""

    def __init__(self, path):
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        model = doc["model"]
        self.vocab = dict(model["vocab"])
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
                  for m in model["merges"]]
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.added = {t["content"]: t["id"] for t in doc.get("added_tokens", [])}
        for tok, i in self.added.items():
            self.vocab[tok] = i
        self.id_to_token = {i: t for t, i in self.vocab.items()}
        pattern = _split_pattern(doc.get("pre_tokenizer")) or GPT2_PATTERN
        self.pattern = regex.compile(pattern)
        self.b2u = bytes_to_unicode()
        self.u2b = {c: b for b, c in self.b2u.items()}
        alt = "|".join(regex.escape(t) for t in sorted(self.added, key=len, reverse=True))
        self.added_re = regex.compile(f"({alt})") if alt else None
        self.cache = {}

    def _bpe(self, word):
        syms = [self.b2u[b] for b in word.encode("utf-8")]
        while len(syms) > 1:
            best, best_rank = None, None
            for i in range(len(syms) - 1):
                r = self.ranks.get((syms[i], syms[i + 1]))
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = i, r
            if best is None:
                break
            syms = syms[:best] + [syms[best] + syms[best + 1]] + syms[best + 2:]
        return [self.vocab[s] for s in syms]

    def encode(self, text):
        """Encode text to a list of token ids; added tokens in the text map to their ids."""
        parts = self.added_re.split(text) if self.added_re else [text]
        ids = []
        for part in parts:
            if part in self.added:
                ids.append(self.added[part])
                continue
            for word in self.pattern.findall(part):
                if word not in self.cache:
                    self.cache[word] = self._bpe(word)
                ids.extend(self.cache[word])
        return ids

    def decode(self, ids, skip_special=False):
        """Decode token ids back to text; invalid UTF-8 becomes U+FFFD."""
        out = bytearray()
        for i in ids:
            tok = self.id_to_token[i]
            if tok in self.added:
                if not skip_special:
                    out += tok.encode("utf-8")
                continue
            out += bytes(self.u2b[c] for c in tok)
        return out.decode("utf-8", errors="replace")


# WordPiece (BERT) ---------------------------------------------------------------------

WP_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _is_cjk(cp):
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F
            or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF
            or 0x2F800 <= cp <= 0x2FA1F)


def bert_normalize(text, lowercase=True):
    """BERT's normalizer: clean control characters, space out CJK, strip accents, lower case."""
    out = []
    for ch in text:
        cp = ord(ch)
        if cp == 0 or cp == 0xFFFD:
            continue
        cat = unicodedata.category(ch)
        if ch in "\t\n\r":
            out.append(" ")
        elif cat.startswith("C"):
            continue
        elif ch.isspace():
            out.append(" ")
        elif _is_cjk(cp):
            out.append(" " + ch + " ")
        else:
            out.append(ch)
    text = "".join(out)
    if lowercase:
        text = "".join(c for c in unicodedata.normalize("NFD", text)
                       if unicodedata.category(c) != "Mn")
        text = text.lower()
    return text


def _is_punct(ch):
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def bert_pre_tokenize(text):
    """Split normalized text at whitespace and make each punctuation character a word."""
    words = []
    for chunk in text.split():
        cur = ""
        for ch in chunk:
            if _is_punct(ch):
                if cur:
                    words.append(cur)
                    cur = ""
                words.append(ch)
            else:
                cur += ch
        if cur:
            words.append(cur)
    return words


class WordPiece:
    """Uncased WordPiece tokenizer: BERT normalization and pre-tokenization, then greedy
    longest-match-first pieces with `##` continuations. A word that cannot be spelled, or
    that has more than max_chars characters, becomes one [UNK]."""

    def __init__(self, vocab, unk="[UNK]", prefix="##", max_chars=100, lowercase=True):
        self.vocab = {t: i for i, t in enumerate(vocab)} if isinstance(vocab, list) else vocab
        self.id_to_token = {i: t for t, i in self.vocab.items()}
        self.unk, self.prefix, self.max_chars = unk, prefix, max_chars
        self.lowercase = lowercase
        self.added = {t: self.vocab[t] for t in WP_SPECIAL_TOKENS if t in self.vocab}
        self.longest = max(len(t) for t in self.vocab)
        self.cache = {}

    @classmethod
    def from_file(cls, path):
        """Load vocab.txt (one token per line) or a tokenizer.json with a WordPiece model."""
        if path.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
            m = doc["model"]
            norm = doc.get("normalizer") or {}
            return cls(dict(m["vocab"]), m.get("unk_token", "[UNK]"),
                       m.get("continuing_subword_prefix", "##"),
                       m.get("max_input_chars_per_word", 100), norm.get("lowercase", True))
        with open(path, encoding="utf-8") as f:
            return cls([line.rstrip("\n") for line in f])

    def _word(self, word):
        if len(word) > self.max_chars:
            return [self.vocab[self.unk]]
        ids, start = [], 0
        while start < len(word):
            end = min(len(word), start + self.longest)
            while end > start:
                piece = word[start:end] if start == 0 else self.prefix + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    break
                end -= 1
            if end == start:
                return [self.vocab[self.unk]]
            start = end
        return ids

    def encode(self, text):
        """Encode text to ids; special tokens are not added and not matched in the text."""
        ids = []
        for word in bert_pre_tokenize(bert_normalize(text, self.lowercase)):
            if word not in self.cache:
                self.cache[word] = self._word(word)
            ids.extend(self.cache[word])
        return ids

    def decode(self, ids, skip_special=False, cleanup=True):
        """BERT's decoder: `##` pieces join the previous token, others follow a space; then
        transformers' clean_up_tokenization replacements."""
        out = []
        for i in ids:
            tok = self.id_to_token[i]
            if skip_special and tok in self.added:
                continue
            if out and tok.startswith(self.prefix):
                out[-1] += tok[len(self.prefix):]
            else:
                out.append(tok)
        text = " ".join(out)
        if cleanup:
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                         (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                         (" 're", "'re")):
                text = text.replace(a, b)
        return text


def load(path):
    """Load a byte-level BPE or WordPiece tokenizer by what the file holds."""
    if path.endswith(".txt"):
        return WordPiece.from_file(path)
    with open(path, encoding="utf-8") as f:
        kind = json.load(f)["model"]["type"]
    return WordPiece.from_file(path) if kind == "WordPiece" else Tokenizer(path)
