#!/bin/sh
# tools/export_gguf.py on the bundled model, read back by an independent GGUF reader. It
# checks the header and the metadata llama.cpp's llada loader reads. It checks every
# tensor's name, shape, type and aligned offset, and its values against the checkpoint,
# with the RoPE row permutation of q and k undone. This part runs without llama.cpp.
#
# With UNMASKD_LLAMA_CPP set to a llama.cpp build folder (the one holding bin/libllama.so),
# it also builds tools/gguf_logits.c against it and compares llama.cpp's logits on the
# exported file with the PyTorch reference (tools/llada_ref.py), which matches unmaskd's
# engine to about 1.5e-5. make check sets the UM_TEST_* variables.
set -eu

fail() {
    echo "gguf_export: FAIL: $*" >&2
    exit 1
}

: "${UM_TEST_SRCDIR:?run through make check}"
if ! /usr/bin/python3 -c 'import numpy' 2>/dev/null; then
    echo "gguf_export: /usr/bin/python3 with numpy not found, skipped"
    exit 77
fi

tmp=$(mktemp -d /tmp/unmaskd-gguf-export-XXXXXX)
trap 'rm -rf "$tmp"' EXIT INT TERM
model=$UM_TEST_SRCDIR/models/tinystories
exporter=$UM_TEST_SRCDIR/tools/export_gguf.py

for dtype in f32 bf16; do
    /usr/bin/python3 "$exporter" "$model" "$tmp/model-$dtype.gguf" --dtype "$dtype" \
        >"$tmp/export-$dtype.txt" 2>&1 || {
        cat "$tmp/export-$dtype.txt" >&2
        fail "export_gguf.py --dtype $dtype exited with an error"
    }
done

# The reader below is written from the GGUF specification, not from the exporter.
/usr/bin/python3 - "$model" "$tmp" <<'PY' || fail "the exported files are wrong (see above)"
import json, os, struct, sys
import numpy as np

model, tmp = sys.argv[1], sys.argv[2]
problems = []


def check(cond, message):
    if not cond:
        problems.append(message)


def read_gguf(path):
    data = open(path, "rb").read()
    pos = 0

    def take(fmt):
        nonlocal pos
        values = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return values if len(values) > 1 else values[0]

    def string():
        nonlocal pos
        n = take("Q")
        s = data[pos:pos + n].decode("utf-8")
        pos += n
        return s

    scalars = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
               11: "q", 12: "d"}

    def value(vtype):
        if vtype == 8:
            return string()
        if vtype == 9:
            etype, n = take("I"), take("Q")
            return [value(etype) for _ in range(n)]
        return take(scalars[vtype])

    magic = data[:4]
    pos = 4
    version, n_tensors, n_kv = take("I"), take("Q"), take("Q")
    kv, types = {}, {}
    for _ in range(n_kv):
        key = string()
        vtype = take("I")
        kv[key], types[key] = value(vtype), vtype
    tensors = {}
    for _ in range(n_tensors):
        name = string()
        n_dims = take("I")
        dims = [take("Q") for _ in range(n_dims)]
        ggml_type, offset = take("I"), take("Q")
        tensors[name] = (dims, ggml_type, offset)
    alignment = kv.get("general.alignment", 32)
    base = pos + (-pos % alignment)
    return magic, version, kv, types, tensors, base, alignment, data


def read_safetensors(path):
    raw = open(path, "rb").read()
    n = struct.unpack_from("<Q", raw, 0)[0]
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        a, b = info["data_offsets"]
        assert info["dtype"] == "BF16", "the bundled model is stored in bf16"
        out[name] = np.frombuffer(raw[8 + n + a:8 + n + b], dtype=np.uint16).reshape(
            info["shape"])
    return out


def half_split_rows(w, n_head):
    """Undo the interleave: row 2i of a head goes back to row i, row 2i + 1 to i + hd/2."""
    hd = w.shape[0] // n_head
    out = np.empty_like(w)
    for h in range(n_head):
        for i in range(hd // 2):
            out[h * hd + i] = w[h * hd + 2 * i]
            out[h * hd + hd // 2 + i] = w[h * hd + 2 * i + 1]
    return out


cfg = json.load(open(os.path.join(model, "config.json")))
tok = json.load(open(os.path.join(model, "tokenizer.json")))
weights = read_safetensors(os.path.join(model, "model.safetensors"))
names = {"attn_norm": "attn_norm", "q_proj": "attn_q", "k_proj": "attn_k",
         "v_proj": "attn_v", "attn_out": "attn_output", "ff_norm": "ffn_norm",
         "ff_proj": "ffn_gate", "up_proj": "ffn_up", "ff_out": "ffn_down"}
expected = {"token_embd.weight": "model.transformer.wte.weight",
            "output_norm.weight": "model.transformer.ln_f.weight",
            "output.weight": "model.transformer.ff_out.weight"}
for i in range(cfg["n_layers"]):
    for hf, gg in names.items():
        expected[f"blk.{i}.{gg}.weight"] = f"model.transformer.blocks.{i}.{hf}.weight"

for dtype in ("f32", "bf16"):
    path = os.path.join(tmp, f"model-{dtype}.gguf")
    magic, version, kv, types, tensors, base, alignment, data = read_gguf(path)
    where = f"{dtype}:"
    check(magic == b"GGUF" and version == 3, f"{where} magic {magic!r} version {version}")
    want = {
        "general.architecture": "llada",
        "general.file_type": 0 if dtype == "f32" else 32,
        "llada.context_length": cfg["max_sequence_length"],
        "llada.embedding_length": cfg["d_model"],
        "llada.block_count": cfg["n_layers"],
        "llada.feed_forward_length": cfg["mlp_hidden_size"],
        "llada.attention.head_count": cfg["n_heads"],
        "llada.attention.head_count_kv": cfg["n_kv_heads"],
        "llada.rope.dimension_count": cfg["d_model"] // cfg["n_heads"],
        "llada.vocab_size": cfg["vocab_size"],
        "llada.attention.causal": False,
        "diffusion.shift_logits": False,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.mask_token_id": cfg["mask_token_id"],
        "tokenizer.ggml.eos_token_id": cfg["eos_token_id"],
        "tokenizer.ggml.padding_token_id": cfg["pad_token_id"],
        "tokenizer.ggml.add_bos_token": False,
    }
    for key, value in want.items():
        check(kv.get(key) == value, f"{where} {key} is {kv.get(key)!r}, expected {value!r}")
    for key, value in (("llada.rope.freq_base", cfg["rope_theta"]),
                       ("llada.attention.layer_norm_rms_epsilon", cfg["rms_norm_eps"])):
        check(key in kv and abs(kv[key] - value) <= 1e-6 * value,
              f"{where} {key} is {kv.get(key)!r}, expected {value}")
    check(types.get("llada.rope.freq_base") == 6, f"{where} freq_base is not a float32")
    check(types.get("llada.attention.causal") == 7, f"{where} causal is not a bool")

    tokens = kv.get("tokenizer.ggml.tokens", [])
    ttypes = kv.get("tokenizer.ggml.token_type", [])
    check(len(tokens) == cfg["vocab_size"] and len(ttypes) == len(tokens),
          f"{where} {len(tokens)} tokens and {len(ttypes)} types, expected {cfg['vocab_size']}")
    if len(tokens) == cfg["vocab_size"]:
        for text, i in list(tok["model"]["vocab"].items())[:4000:97]:
            check(tokens[i] == text, f"{where} token {i} is {tokens[i]!r}, expected {text!r}")
        check(tokens[cfg["mask_token_id"]] == "<|mdm_mask|>", f"{where} mask token text")
        check(ttypes[cfg["mask_token_id"]] == 3 and ttypes[cfg["eos_token_id"]] == 3,
              f"{where} mask and eos are not control tokens")
        check(ttypes[0] == 1, f"{where} token 0 is not a normal token")
    merges = kv.get("tokenizer.ggml.merges", [])
    check(merges[:3] == tok["model"]["merges"][:3] and len(merges) == len(tok["model"]["merges"]),
          f"{where} merges differ from tokenizer.json")

    check(sorted(tensors) == sorted(expected), f"{where} tensor names differ: "
          f"{sorted(set(tensors) ^ set(expected))}")
    for gg, hf in expected.items():
        if gg not in tensors:
            continue
        dims, ggml_type, offset = tensors[gg]
        src = weights[hf]
        check(dims == list(reversed(src.shape)), f"{where} {gg} dims {dims}, source "
              f"{list(src.shape)}")
        want_type = 0 if dtype == "f32" or src.ndim == 1 else 30
        check(ggml_type == want_type, f"{where} {gg} type {ggml_type}, expected {want_type}")
        check(offset % alignment == 0, f"{where} {gg} offset {offset} is not aligned")
        count = int(np.prod(src.shape))
        start = base + offset
        if ggml_type == 0:
            got = np.frombuffer(data, np.float32, count, start).reshape(src.shape)
            ref = (src.astype(np.uint32) << 16).view(np.float32)
        else:
            got = np.frombuffer(data, np.uint16, count, start).reshape(src.shape)
            ref = src
        if gg.endswith(("attn_q.weight", "attn_k.weight")):
            check(not np.array_equal(got, ref), f"{where} {gg} was not permuted")
            got = half_split_rows(got, cfg["n_heads"])
        check(np.array_equal(got, ref), f"{where} {gg} values differ from {hf}")
    last = max(o + int(np.prod(d)) * (4 if t == 0 else 2) for d, t, o in tensors.values())
    check(len(data) >= base + last, f"{where} file ends before its last tensor")

for p in problems:
    print("gguf_export:", p, file=sys.stderr)
sys.exit(1 if problems else 0)
PY
echo "gguf_export: f32 and bf16 exports read back correctly"

# ---------------------------------------------------------------------------
# The logits check, with a llama.cpp build folder.
llama=${UNMASKD_LLAMA_CPP:-}
if [ -z "$llama" ]; then
    echo "gguf_export: UNMASKD_LLAMA_CPP is not set, so the llama.cpp logits check is" \
        "skipped (set it to a llama.cpp build folder to run it)"
    exit 0
fi
if ! /usr/bin/python3 -c 'import torch' 2>/dev/null; then
    echo "gguf_export: PyTorch not found, so the llama.cpp logits check is skipped"
    exit 0
fi
src=$(sed -n 's/^CMAKE_HOME_DIRECTORY:INTERNAL=//p' "$llama/CMakeCache.txt" 2>/dev/null || true)
[ -n "$src" ] && [ -f "$src/include/llama.h" ] ||
    fail "UNMASKD_LLAMA_CPP=$llama has no CMakeCache.txt naming a llama.cpp source folder"
${CC:-cc} -O2 -o "$tmp/gguf-logits" "$UM_TEST_SRCDIR/tools/gguf_logits.c" \
    -I "$src/include" -I "$src/ggml/include" -L "$llama/bin" -lllama \
    -Wl,-rpath,"$llama/bin" || fail "building tools/gguf_logits.c against $llama failed"

# A prompt of ordinary tokens, then masks: the canvas of a first denoising step.
ids=$(/usr/bin/python3 -c 'print(",".join(str((100 + 37 * i) % 4094) if i < 16 else "4095"
                                       for i in range(48)))')
for dtype in f32 bf16; do
    "$tmp/gguf-logits" "$tmp/model-$dtype.gguf" --ids "$ids" --out "$tmp/llama-$dtype.f32" \
        --threads 2 || fail "gguf-logits on the $dtype export failed"
done
PYTHONPATH=$UM_TEST_SRCDIR/tools /usr/bin/python3 - "$model" "$tmp" "$ids" <<'PY' ||
import sys
import numpy as np
import torch
import llada_ref

model_dir, tmp, ids = sys.argv[1], sys.argv[2], [int(x) for x in sys.argv[3].split(",")]
model = llada_ref.load_model(model_dir)
with torch.no_grad():
    ref = model(torch.tensor([ids]))[0].double().numpy()
bad = False
top2 = np.sort(ref, -1)[:, -2:]
lead = top2[:, 1] - top2[:, 0]
# The bundled checkpoint is bf16, so both exports hold its exact weight values, and the
# logits span about -20 to 7. The f32 export measured 1.7e-5 from the reference, which is
# what f32 sums in another order give (unmaskd measured 1.3e-5). The bf16 export measured
# 0.032, because llama.cpp's bf16 products also round the activations to bf16. Each bound
# is about 5 times the measured difference, so a wrong tensor or a wrong permutation
# (errors of order 1) still fails.
for dtype, bound in (("f32", 1e-4), ("bf16", 0.15)):
    got = np.fromfile(f"{tmp}/llama-{dtype}.f32", dtype=np.float32).reshape(ref.shape)
    diff = np.abs(got - ref).max()
    same = got.argmax(-1) == ref.argmax(-1)
    # A position whose top two logits are closer than twice the difference may flip.
    clear = lead > 2 * diff
    print(f"gguf_export: llama.cpp {dtype} vs reference: max abs diff {diff:.3g}, argmax "
          f"agreement {same.mean():.3f} ({same[clear].mean():.3f} where the lead is clear)")
    if diff > bound:
        print(f"gguf_export: {dtype} logits differ by {diff:.3g}, over {bound}",
              file=sys.stderr)
        bad = True
    if not same[clear].all():
        print(f"gguf_export: {dtype} argmax differs at a position with a clear lead",
              file=sys.stderr)
        bad = True
sys.exit(1 if bad else 0)
PY
    fail "llama.cpp's logits do not match the reference (see above)"
