"""A byte-level BPE encoder and decoder that reads a Hugging Face tokenizer.json.

Used by the training script and as the independent reference for the C tokenizer
plugin. It supports what byte-level BPE vocabularies need: added tokens matched
before pre-tokenization, a Split regex pre-tokenizer (or the GPT-2 pattern when the
ByteLevel step has use_regex set), the byte-to-unicode map and ranked merges.
"""

import json

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
