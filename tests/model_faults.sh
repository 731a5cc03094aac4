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
expect_failure wrong_shape "has shape" "ff_proj.weight"

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

if [ "$failures" -ne 0 ]; then
    echo "model_faults: $failures of $cases cases failed" >&2
    exit 1
fi
echo "model_faults: all $cases broken model folders were rejected cleanly"
