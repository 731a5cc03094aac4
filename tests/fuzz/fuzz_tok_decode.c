/*
 * Fuzz target: ids in, text out, with the fixed tokenizer in
 * tests/fuzz/data/UM_FUZZ_TOKENIZER, loaded afresh for every input. The first byte of
 * an input is the decode flags. Each following pair of bytes is a little-endian code v
 * for the id v mod (vocabulary size + 2) - 1. So most ids are valid, and -1 and the
 * vocabulary size stand for the ids just outside. Text must come out as valid UTF-8
 * of the size the plugin reports, or the call must fail with UM_ERANGE when an id is
 * outside the vocabulary.
 */
#include <string.h>

#include <unmaskd/error.h>

#include "fuzz.h"

#ifndef UM_FUZZ_TOKENIZER
#error "build with -DUM_FUZZ_TOKENIZER=\"<folder under tests/fuzz/data>\""
#endif

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0)
        return 0;
    const um_tokenizer_ops_t *ops = um_plugin_describe()->tokenizer;
    void *tok = NULL;
    char err[1024];
    int rc = ops->load(&um_fuzz_host, um_fuzz_data_dir(UM_FUZZ_TOKENIZER), &tok, err,
                       sizeof err);
    if (rc != UM_OK) {
        fprintf(stderr, "fuzz: cannot load the fixed tokenizer: %s\n", err);
        abort();
    }

    int32_t vocab = ops->vocab_size(tok);
    unsigned flags = data[0] & UM_DECODE_SKIP_SPECIAL;
    size_t n = (size - 1) / 2;
    int32_t *ids = malloc((n ? n : 1) * sizeof *ids);
    UM_FUZZ_CHECK(ids != NULL);
    int in_range = 1;
    for (size_t i = 0; i < n; i++) {
        unsigned v = (unsigned)data[1 + 2 * i] | (unsigned)data[2 + 2 * i] << 8;
        ids[i] = (int32_t)(v % ((unsigned)vocab + 2)) - 1;
        if (ids[i] < 0 || ids[i] >= vocab)
            in_range = 0;
    }

    char *text;
    size_t len;
    rc = um_fuzz_decode(ops, tok, ids, n, flags, &text, &len);
    /* Holes in the id space (ids no entry uses) also give UM_ERANGE. */
    UM_FUZZ_CHECK(rc == UM_OK || rc == UM_ERANGE);
    UM_FUZZ_CHECK(in_range || rc == UM_ERANGE);
    free(text);
    free(ids);
    ops->unload(tok);
    return 0;
}
