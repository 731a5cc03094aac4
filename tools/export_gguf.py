#!/usr/bin/python3
"""Export a LLaDA model folder to one GGUF file for llama.cpp's `llada` architecture.

Input: a Hugging Face folder as unmaskd reads it, with config.json (model_type "llada"),
model.safetensors (or a model.safetensors.index.json with shards) in LLaDA's tensor names,
and a byte-level BPE tokenizer.json. Output: a GGUF version 3 file with the metadata
llama.cpp's llada loader reads, the tensors in f32 or bf16, and the tokenizer as a
gpt2-style BPE vocabulary with merges.

Usage: export_gguf.py MODEL_DIR OUT.gguf [--dtype f32|bf16]

--dtype sets the storage of the 2-D weight matrices (default f32). The norm vectors stay
f32 either way, as llama.cpp's own converter keeps them. bf16 from a bf16 checkpoint
copies the bits, bf16 from an f32 checkpoint rounds to nearest even, and f32 from bf16 is
exact.

The file layout follows the GGUF specification (docs/gguf.md in the ggml repository): a
header, the key-value metadata, the tensor descriptors, padding to the alignment, then the
tensor data, each tensor at an aligned offset. Everything is little-endian.
"""

import argparse
import json
import os
import struct
import sys

try:
    import numpy as np
except ImportError:
    sys.exit("export_gguf.py: needs numpy: run it with /usr/bin/python3 or install "
             "python3-numpy")

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
ALIGNMENT = 32

# GGUF metadata value types.
T_UINT8, T_INT8, T_UINT16, T_INT16, T_UINT32, T_INT32, T_FLOAT32, T_BOOL, T_STRING, \
    T_ARRAY, T_UINT64, T_INT64, T_FLOAT64 = range(13)

# ggml tensor types, and llama.cpp's file types for general.file_type.
GGML_F32, GGML_BF16 = 0, 30
FILE_TYPE = {"f32": 0, "bf16": 32}

# llama.cpp's token types (llama_token_type in llama.h).
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5

# LLaDA's per-block tensor names and llama.cpp's names for them. ff_proj goes through
# SiLU and multiplies up_proj, so it is the gate.
BLOCK_NAMES = {
    "attn_norm": "attn_norm",
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "attn_out": "attn_output",
    "ff_norm": "ffn_norm",
    "ff_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "ff_out": "ffn_down",
}


# GPT-2's pre-tokenizer regex, as tokenizer.json stores it (JSON-escaped), which llama.cpp
# calls "gpt-2".
GPT2_SPLIT_REGEX = json.dumps(
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")

# A Jinja chat template that outputs the messages' text and nothing else.
PLAIN_CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"


class ExportError(Exception):
    """The input folder cannot be exported; the message names the file and the fix."""


# ----------------------------------------------------------------------------
# Reading the checkpoint


class SafetensorsFolder:
    """The tensors of a model folder, from one file or from the shards an index lists."""

    def __init__(self, model_dir):
        index = os.path.join(model_dir, "model.safetensors.index.json")
        single = os.path.join(model_dir, "model.safetensors")
        if os.path.isfile(single):
            files = [single]
        elif os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = [os.path.join(model_dir, n) for n in sorted(set(weight_map.values()))]
        else:
            raise ExportError(f"{model_dir} has neither model.safetensors nor "
                              "model.safetensors.index.json: pass a model folder")
        self.entries = {}
        for path in files:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            for name, info in header.items():
                self.entries[name] = (path, 8 + n, info)

    def has(self, name):
        return name in self.entries

    def shape(self, name):
        return tuple(self.entries[name][2]["shape"])

    def dtype(self, name):
        return self.entries[name][2]["dtype"]

    def raw(self, name):
        """Return the stored values: uint16 bits for BF16, float16 for F16, float32 for F32."""
        path, base, info = self.entries[name]
        begin, end = info["data_offsets"]
        kinds = {"BF16": np.uint16, "F32": np.float32, "F16": np.float16}
        if info["dtype"] not in kinds:
            raise ExportError(f"{path}: tensor {name} is {info['dtype']}: only BF16, F16 and "
                              "F32 checkpoints are supported")
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=base + begin,
                         shape=(end - begin,))
        return data.view(kinds[info["dtype"]]).reshape(info["shape"])


def bf16_bits_to_f32(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(x):
    """Round f32 to bf16, nearest even; NaN stays NaN."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


def convert(raw, src_dtype, out_dtype):
    """Return raw in the output storage: float32 for f32, uint16 bf16 bits for bf16."""
    if out_dtype == "f32":
        if src_dtype == "BF16":
            return bf16_bits_to_f32(raw)
        return np.asarray(raw, dtype=np.float32)
    if src_dtype == "BF16":
        return np.asarray(raw)
    return f32_to_bf16_bits(np.asarray(raw, dtype=np.float32))


# ----------------------------------------------------------------------------
# The RoPE row permutation


def permute_rope_rows(w, n_head):
    """Reorder the rows of a q or k projection from half-split to interleaved RoPE pairs.

    LLaDA rotates each head's dimension i together with dimension i + head_dim/2 (the
    half-split or NeoX layout). llama.cpp's llada graph uses its "normal" RoPE, which
    rotates dimension 2i together with 2i + 1. Moving row i of each head to row 2i and row
    i + head_dim/2 to row 2i + 1 makes the interleaved rotation compute what the
    half-split one did. Attention only uses the dot products of q and k within a head, and
    q and k get the same permutation, so the scores and the output stay the same. v and
    the output projection are not touched. llama.cpp's convert_hf_to_gguf.py applies the
    same permutation to LLaDA's q_proj and k_proj.
    """
    rows = w.shape[0]
    head_dim = rows // n_head
    return (w.reshape(n_head, 2, head_dim // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape))


# ----------------------------------------------------------------------------
# Model description


def read_config(model_dir):
    path = os.path.join(model_dir, "config.json")
    try:
        with open(path) as f:
            c = json.load(f)
    except OSError as e:
        raise ExportError(f"cannot read {path}: {e.strerror}: pass a model folder")
    if c.get("model_type") != "llada":
        raise ExportError(f"{path} has model_type {c.get('model_type')!r}: only \"llada\" "
                          "folders are exported")
    for key in ("d_model", "n_layers", "n_heads", "mlp_hidden_size", "vocab_size"):
        if not isinstance(c.get(key), int) or c[key] <= 0:
            raise ExportError(f"{path} has no positive integer {key}: fix it")
    if c.get("include_bias") or c.get("include_qkv_bias"):
        raise ExportError(f"{path} sets include_bias: only LLaDA-8B's bias-free layout "
                          "is exported")
    if c["d_model"] % c["n_heads"] or (c["d_model"] // c["n_heads"]) % 2:
        raise ExportError(f"{path}: d_model {c['d_model']} is not n_heads {c['n_heads']} "
                          "times an even head size")
    return c


def tensor_plan(c, st):
    """Yield (gguf name, safetensors name, permute heads or 0) for every tensor to write."""
    yield "token_embd.weight", "model.transformer.wte.weight", 0
    n_kv = c.get("n_kv_heads") or c["n_heads"]
    for i in range(c["n_layers"]):
        for hf, gg in BLOCK_NAMES.items():
            heads = 0
            if hf == "q_proj":
                heads = c["n_heads"]
            elif hf == "k_proj":
                heads = n_kv
            yield f"blk.{i}.{gg}.weight", f"model.transformer.blocks.{i}.{hf}.weight", heads
    yield "output_norm.weight", "model.transformer.ln_f.weight", 0
    # With tied weights the checkpoint has no ff_out, and llama.cpp reuses token_embd.
    if st.has("model.transformer.ff_out.weight"):
        yield "output.weight", "model.transformer.ff_out.weight", 0
    elif not c.get("weight_tying"):
        raise ExportError("the checkpoint has no model.transformer.ff_out.weight and "
                          "config.json does not set weight_tying: the folder is incomplete")


# ----------------------------------------------------------------------------
# Tokenizer


def read_tokenizer(model_dir, c, n_vocab):
    """Return tokens, token types, merges and the special ids for a gpt2-style BPE vocab."""
    path = os.path.join(model_dir, "tokenizer.json")
    try:
        with open(path, encoding="utf-8") as f:
            tok = json.load(f)
    except OSError as e:
        raise ExportError(f"cannot read {path}: {e.strerror}: export needs the tokenizer")
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        raise ExportError(f"{path} has a {model.get('type')} tokenizer: only byte-level "
                          "BPE tokenizers are exported")
    pre = json.dumps(tok.get("pre_tokenizer"))
    if "ByteLevel" not in pre:
        raise ExportError(f"{path} has no ByteLevel pre-tokenizer: only byte-level BPE "
                          "tokenizers are exported")
    # NOTE: only GPT-2's split regex is mapped to a llama.cpp pre-tokenizer name; other
    # byte-level tokenizers (LLaDA-8B's among them) need their own name added here.
    if GPT2_SPLIT_REGEX not in pre:
        raise ExportError(f"{path} splits words with another regex than GPT-2's: llama.cpp "
                          "would tokenize differently, so the export stops")

    tokens = [None] * n_vocab
    types = [TOKEN_UNUSED] * n_vocab
    for text, i in model["vocab"].items():
        if i < n_vocab:
            tokens[i], types[i] = text, TOKEN_NORMAL
    for t in tok.get("added_tokens", []):
        if t["id"] < n_vocab:
            tokens[t["id"]] = t["content"]
            types[t["id"]] = TOKEN_CONTROL if t.get("special") else TOKEN_USER_DEFINED
    for i in range(n_vocab):
        if tokens[i] is None:  # ids the tokenizer never produces: embedding padding
            tokens[i] = f"[PAD{i}]"

    merges = []
    for m in model.get("merges", []):
        # Newer tokenizer.json files store a merge as a pair, older ones as "a b".
        merges.append(" ".join(m) if isinstance(m, list) else m)

    config_path = os.path.join(model_dir, "tokenizer_config.json")
    tconf = {}
    if os.path.isfile(config_path):
        with open(config_path) as f:
            tconf = json.load(f)

    eos = c.get("eos_token_id")
    specials = {
        "eos_token_id": eos,
        # A tokenizer without a beginning-of-text token gets the end-of-text id, which
        # llama.cpp never adds because add_bos_token stays false.
        "bos_token_id": c.get("bos_token_id", eos),
        "padding_token_id": c.get("pad_token_id", eos),
        "mask_token_id": c.get("mask_token_id"),
    }
    specials = {k: v for k, v in specials.items() if isinstance(v, int) and 0 <= v < n_vocab}
    if "mask_token_id" not in specials:
        raise ExportError("config.json has no mask_token_id inside the vocabulary: "
                          "llama.cpp's diffusion generation needs it")
    add_bos = bool(tconf.get("add_bos_token", False))
    # llama-diffusion-cli always formats the prompt with the model's chat template and
    # falls back to ChatML without one, which would add dozens of tokens to a plain
    # prompt. A tokenizer without a template gets one that passes the messages through.
    template = tconf.get("chat_template") or PLAIN_CHAT_TEMPLATE
    return tokens, types, merges, specials, add_bos, template


# ----------------------------------------------------------------------------
# Writing GGUF


def pack_string(s):
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


SCALAR_FORMATS = {T_UINT32: "<I", T_INT32: "<i", T_FLOAT32: "<f", T_BOOL: "<?",
                  T_UINT64: "<Q", T_FLOAT64: "<d"}


def pack_value(vtype, value):
    if vtype == T_STRING:
        return pack_string(value)
    if vtype == T_ARRAY:
        etype, items = value
        out = [struct.pack("<IQ", etype, len(items))]
        if etype == T_STRING:
            out.extend(pack_string(s) for s in items)
        else:
            fmt = SCALAR_FORMATS[etype]
            out.append(np.asarray(items, dtype=np.dtype(fmt)).tobytes())
        return b"".join(out)
    return struct.pack(SCALAR_FORMATS[vtype], value)


def metadata(c, dtype, tokenizer, n_vocab):
    tokens, types, merges, specials, add_bos, template = tokenizer
    arch = "llada"
    head_dim = c["d_model"] // c["n_heads"]
    kv = [
        ("general.architecture", T_STRING, arch),
        ("general.name", T_STRING, c.get("_name_or_path") or "llada"),
        ("general.alignment", T_UINT32, ALIGNMENT),
        ("general.file_type", T_UINT32, FILE_TYPE[dtype]),
        (f"{arch}.vocab_size", T_UINT32, n_vocab),
        (f"{arch}.context_length", T_UINT32, c.get("max_sequence_length", 4096)),
        (f"{arch}.embedding_length", T_UINT32, c["d_model"]),
        (f"{arch}.block_count", T_UINT32, c["n_layers"]),
        (f"{arch}.feed_forward_length", T_UINT32, c["mlp_hidden_size"]),
        (f"{arch}.attention.head_count", T_UINT32, c["n_heads"]),
        (f"{arch}.attention.head_count_kv", T_UINT32, c.get("n_kv_heads") or c["n_heads"]),
        (f"{arch}.rope.dimension_count", T_UINT32, head_dim),
        (f"{arch}.rope.freq_base", T_FLOAT32, float(c.get("rope_theta", 10000.0))),
        (f"{arch}.attention.layer_norm_rms_epsilon", T_FLOAT32,
         float(c.get("rms_norm_eps", c.get("layer_norm_eps", 1e-5)))),
        (f"{arch}.attention.causal", T_BOOL, False),
        # LLaDA predicts each position's own token, not the next one.
        ("diffusion.shift_logits", T_BOOL, False),
        ("tokenizer.ggml.model", T_STRING, "gpt2"),
        # llama.cpp's name for GPT-2's pre-tokenizer regex, checked in read_tokenizer.
        ("tokenizer.ggml.pre", T_STRING, "gpt-2"),
        ("tokenizer.ggml.tokens", T_ARRAY, (T_STRING, tokens)),
        ("tokenizer.ggml.token_type", T_ARRAY, (T_INT32, types)),
        ("tokenizer.ggml.merges", T_ARRAY, (T_STRING, merges)),
        ("tokenizer.ggml.add_bos_token", T_BOOL, add_bos),
        ("tokenizer.ggml.add_eos_token", T_BOOL, False),
        ("tokenizer.chat_template", T_STRING, template),
    ]
    for key, value in sorted(specials.items()):
        kv.append((f"tokenizer.ggml.{key}", T_UINT32, value))
    return kv


def align(n):
    return n + (-n % ALIGNMENT)


def export(model_dir, out_path, dtype, log=print):
    c = read_config(model_dir)
    st = SafetensorsFolder(model_dir)
    plan = list(tensor_plan(c, st))
    for _, hf, _ in plan:
        if not st.has(hf):
            raise ExportError(f"{model_dir}: the checkpoint has no tensor {hf}")
    n_vocab = st.shape("model.transformer.wte.weight")[0]
    tokenizer = read_tokenizer(model_dir, c, n_vocab)

    # Descriptors first: a tensor's offset depends on the sizes before it.
    infos, offset = [], 0
    for gg, hf, heads in plan:
        shape = st.shape(hf)
        kind = GGML_F32 if len(shape) == 1 or dtype == "f32" else GGML_BF16
        nbytes = int(np.prod(shape)) * (4 if kind == GGML_F32 else 2)
        infos.append((gg, hf, heads, shape, kind, offset))
        offset = align(offset + nbytes)

    kv = metadata(c, dtype, tokenizer, n_vocab)
    head = [GGUF_MAGIC, struct.pack("<IQQ", GGUF_VERSION, len(infos), len(kv))]
    for key, vtype, value in kv:
        head += [pack_string(key), struct.pack("<I", vtype), pack_value(vtype, value)]
    for gg, _, _, shape, kind, off in infos:
        # GGUF lists dimensions fastest first: a [rows, cols] matrix is (cols, rows).
        dims = list(reversed(shape))
        head += [pack_string(gg), struct.pack("<I", len(dims)),
                 struct.pack(f"<{len(dims)}Q", *dims), struct.pack("<IQ", kind, off)]
    header = b"".join(head)

    tmp = out_path + ".partial"
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(b"\0" * (align(len(header)) - len(header)))
            base = f.tell()
            for gg, hf, heads, shape, kind, off in infos:
                f.write(b"\0" * (base + off - f.tell()))
                data = convert(st.raw(hf), st.dtype(hf),
                               "f32" if kind == GGML_F32 else "bf16")
                if heads:
                    data = permute_rope_rows(data, heads)
                f.write(np.ascontiguousarray(data).tobytes())
            f.write(b"\0" * (base + offset - f.tell()))
        # Renamed into place only when complete, so a cache never contains half a file.
        os.replace(tmp, out_path)
    except OSError as e:
        remove_partial(tmp)
        if e.filename and e.filename not in (tmp, out_path):
            raise ExportError(f"cannot read {e.filename}: {e.strerror or e}")
        raise ExportError(f"cannot write {out_path}: {e.strerror or e}: pass a writable "
                          "file path")
    except BaseException:
        remove_partial(tmp)
        raise
    log(f"wrote {out_path}: {len(infos)} tensors, {dtype} matrices, vocabulary {n_vocab}, "
        f"{os.path.getsize(out_path) / 1e6:.1f} MB")


def remove_partial(path):
    """Remove a half-written output; it may not exist."""
    try:
        os.unlink(path)
    except OSError:
        pass


def check_out_path(path):
    """Fail early, before the model is read, on an output path that cannot be written."""
    if os.path.isdir(path):
        raise ExportError(f"{path} is a folder: pass a file path such as "
                          f"{os.path.join(path, 'model.gguf')}")
    if os.path.exists(path) and not os.path.isfile(path):
        raise ExportError(f"{path} is not a regular file: pass a file path such as "
                          "DIR/model.gguf")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ExportError(f"cannot write {path}: the folder {folder} does not exist: pass a "
                          "writable file path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write {path}: the folder {folder} is not writable: pass a "
                          "writable file path")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", help="LLaDA model folder (config.json, safetensors, "
                    "tokenizer.json)")
    ap.add_argument("out", help="GGUF file to write")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32",
                    help="storage of the weight matrices (default %(default)s)")
    a = ap.parse_args()
    try:
        check_out_path(a.out)
        export(a.model_dir, a.out, a.dtype)
    except ExportError as e:
        sys.exit(f"export_gguf.py: {e}")


if __name__ == "__main__":
    main()
