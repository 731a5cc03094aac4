/*
 * Fuzz target: bytes in, ids out. Each input is encoded with the fixed tokenizer in
 * tests/fuzz/data/UM_FUZZ_TOKENIZER, loaded afresh for every input so that no state
 * (such as a word cache) carries from one input to the next. The ids must decode. With
 * UM_FUZZ_ROUNDTRIP (byte-level BPE, which normalizes nothing) they must decode to the
 * input itself.
 */
#include <string.h>

#include <unmaskd/error.h>

#include "fuzz.h"

#ifndef UM_FUZZ_TOKENIZER
#error "build with -DUM_FUZZ_TOKENIZER=\"<folder under tests/fuzz/data>\""
#endif

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const um_tokenizer_ops_t *ops = um_plugin_describe()->tokenizer;
    void *tok = NULL;
    char err[1024];
    int rc = ops->load(&um_fuzz_host, um_fuzz_data_dir(UM_FUZZ_TOKENIZER), &tok, err,
                       sizeof err);
    if (rc != UM_OK) {
        fprintf(stderr, "fuzz: cannot load the fixed tokenizer: %s\n", err);
        abort();
    }

    int32_t *ids;
    size_t n;
    rc = um_fuzz_encode(ops, tok, (const char *)data, size, 0, &ids, &n);
    UM_FUZZ_CHECK(rc == UM_OK || !um_fuzz_utf8_valid((const char *)data, size));
    if (rc == UM_OK) {
        char *text;
        size_t len;
        UM_FUZZ_CHECK(um_fuzz_decode(ops, tok, ids, n, 0, &text, &len) == UM_OK);
#ifdef UM_FUZZ_ROUNDTRIP
        UM_FUZZ_CHECK(len == size && memcmp(text, data, size) == 0);
#endif
        free(text);
        free(ids);
    }
    ops->unload(tok);
    return 0;
}
