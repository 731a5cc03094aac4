#!/bin/sh
# Model folder faults at startup: the real daemon must exit with status 1 and an error
# that names the file (and the tensor or field), never crash, for each broken copy of
# the bundled model. make check sets the UM_TEST_* variables.
set -eu
: "${UM_TEST_DAEMON:?run through make check}" "${UM_TEST_MODEL:?}" "${UM_TEST_PLUGINS:?}"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT INT TERM
failures=0
cases=0

# A fresh copy of the bundled model in $tmp/$1.
copy_model() {
    rm -rf "${tmp:?}/$1"
    mkdir "$tmp/$1"
    cp "$UM_TEST_MODEL"/config.json "$UM_TEST_MODEL"/tokenizer.json \
        "$UM_TEST_MODEL"/tokenizer_config.json "$UM_TEST_MODEL"/model.safetensors "$tmp/$1/"
}

# Start the daemon on $tmp/$1 and expect exit status 1 with every other argument
# appearing in its log.
expect_failure() {
    name=$1
    shift
    cases=$((cases + 1))
    status=0
    timeout 60 "$UM_TEST_DAEMON" --model "$tmp/$name" --plugin-dir "$UM_TEST_PLUGINS" \
        --bind "ipc://$tmp/$name.sock" --log-level warn > "$tmp/$name.log" 2>&1 || status=$?
    if [ "$status" -ne 1 ]; then
        echo "model_faults: $name: exit status $status, expected 1; log:" >&2
        cat "$tmp/$name.log" >&2
        failures=$((failures + 1))
        return
    fi
    for needle in "$@"; do
        if ! grep -qF -- "$needle" "$tmp/$name.log"; then
            echo "model_faults: $name: the log does not mention \"$needle\":" >&2
            cat "$tmp/$name.log" >&2
            failures=$((failures + 1))
            return
        fi
    done
    echo "model_faults: $name: exit 1, $(grep -m1 error "$tmp/$name.log" | cut -c1-150)"
}

copy_model missing_weights
rm "$tmp/missing_weights/model.safetensors"
expect_failure missing_weights "model.safetensors"

copy_model truncated
size=$(wc -c < "$tmp/truncated/model.safetensors")
truncate -s $((size / 2)) "$tmp/truncated/model.safetensors"
expect_failure truncated "model.safetensors"

copy_model header_past_end
printf '\377\377\377\377\000\000\000\000' > "$tmp/header_past_end/model.safetensors"
expect_failure header_past_end "model.safetensors"

copy_model missing_tensor
sed -i 's/"n_layers": [0-9]*/"n_layers": 9/' "$tmp/missing_tensor/config.json"
expect_failure missing_tensor "model.transformer.blocks.5." "model.safetensors"

copy_model wrong_shape
sed -i 's/"mlp_hidden_size": [0-9]*/"mlp_hidden_size": 100/' "$tmp/wrong_shape/config.json"
expect_failure wrong_shape "has shape" "ff_proj.weight" "model.safetensors"

copy_model missing_field
sed -i '/"n_heads"/d' "$tmp/missing_field/config.json"
expect_failure missing_field "n_heads" "config.json"

copy_model unknown_type
sed -i 's/"model_type": "llada"/"model_type": "mamba"/' "$tmp/unknown_type/config.json"
expect_failure unknown_type "mamba" "model_type"

copy_model bad_config_json
printf '{"model_type": "llada",' > "$tmp/bad_config_json/config.json"
expect_failure bad_config_json "config.json" "JSON"

copy_model bad_tokenizer
printf '{"model": {"type": "BPE", "vocab": [' > "$tmp/bad_tokenizer/tokenizer.json"
expect_failure bad_tokenizer "tokenizer.json" "not valid JSON"

copy_model short_file
printf '\020\000\000' > "$tmp/short_file/model.safetensors"
expect_failure short_file "model.safetensors"

copy_model header_not_json
printf '\010\000\000\000\000\000\000\000{"a":1,}' > "$tmp/header_not_json/model.safetensors"
expect_failure header_not_json "model.safetensors" "JSON"

copy_model no_config
rm "$tmp/no_config/config.json"
expect_failure no_config "config.json"

copy_model wrong_field_type
sed -i 's/"n_layers": [0-9]*/"n_layers": "five"/' "$tmp/wrong_field_type/config.json"
expect_failure wrong_field_type "config.json" "n_layers"

copy_model no_tokenizer
rm "$tmp/no_tokenizer/tokenizer.json" "$tmp/no_tokenizer/tokenizer_config.json"
expect_failure no_tokenizer "tokenizer"

# Faults inside the safetensors header: rewrite it with Python, keeping the data.
# Each case gets the header as the dict h and changes it.
edit_header() {
    python3 - "$tmp/$1/model.safetensors" "$2" <<'PYEOF'
import json, struct, sys
path, change = sys.argv[1], sys.argv[2]
with open(path, "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    h = json.loads(f.read(n))
    data = f.read()
exec(change)
head = json.dumps(h).encode()
with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(head)) + head + data)
PYEOF
}

if command -v python3 > /dev/null 2>&1; then
    b0=model.transformer.blocks.0
    b1=model.transformer.blocks.1

    copy_model overlap
    edit_header overlap "h['$b1.attn_norm.weight']['data_offsets'] = h['$b0.attn_norm.weight']['data_offsets']"
    expect_failure overlap "overlap" "$b0.attn_norm.weight" "$b1.attn_norm.weight" "model.safetensors"

    copy_model offsets_past_end
    edit_header offsets_past_end "h['$b0.attn_norm.weight']['data_offsets'] = [len(data), len(data) + 512]"
    expect_failure offsets_past_end "$b0.attn_norm.weight" "past the end" "model.safetensors"

    copy_model offsets_reversed
    edit_header offsets_reversed "h['$b0.attn_norm.weight']['data_offsets'] = [512, 0]"
    expect_failure offsets_reversed "$b0.attn_norm.weight" "model.safetensors"

    copy_model unsupported_dtype
    edit_header unsupported_dtype "h['$b0.attn_norm.weight']['dtype'] = 'F64'"
    expect_failure unsupported_dtype "$b0.attn_norm.weight" "F64" "model.safetensors"

    copy_model dtype_size
    edit_header dtype_size "h['$b0.attn_norm.weight']['dtype'] = 'F32'"
    expect_failure dtype_size "$b0.attn_norm.weight" "model.safetensors"

    copy_model header_missing_tensor
    edit_header header_missing_tensor "del h['$b1.q_proj.weight']"
    expect_failure header_missing_tensor "$b1.q_proj.weight" "model.safetensors"

    copy_model header_wrong_shape
    edit_header header_wrong_shape "h['$b0.ff_proj.weight']['shape'] = [256, 704]"
    expect_failure header_wrong_shape "$b0.ff_proj.weight" "has shape [256, 704]" \
        "model.safetensors"
else
    echo "model_faults: python3 not found, the safetensors header cases are skipped"
fi

if [ "$failures" -ne 0 ]; then
    echo "model_faults: $failures of $cases cases failed" >&2
    exit 1
fi
echo "model_faults: all $cases broken model folders were rejected cleanly"
