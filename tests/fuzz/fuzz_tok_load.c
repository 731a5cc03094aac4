/*
 * Fuzz target: one tokenizer file through a tokenizer plugin's probe and load, built
 * once per plugin and file name (UM_FUZZ_FILE: tokenizer.json, vocab.txt or
 * tokenizer.model). Plugins load from a model folder, so each input is written to the
 * scratch folder first, alone. A tokenizer that loads must then encode and decode
 * within the plugin contract.
 */
#include <string.h>

#include <unmaskd/error.h>

#include "fuzz.h"

#ifndef UM_FUZZ_FILE
#error "build with -DUM_FUZZ_FILE=\"<file name the plugin reads>\""
#endif

/* Texts that reach the pre-tokenizers, the normalizers and special-token matching. */
static const char *const s_samples[] = {
    "once upon a time, there was a little girl named lily.",
    "She said, \"I'll go!\" 12345 caf\xc3\xa9 \xe6\x97\xa5\xe6\x9c\xac \xf0\x9f\x98\x80",
    "  tabs\tand\nnew lines [CLS] [MASK] <|endoftext|> <unk> <s>  ",
};

/* Largest number of ids decoded one by one after a load. */
#define S_DECODE_IDS 512

static void s_exercise(const um_tokenizer_ops_t *ops, void *tok)
{
    int32_t vocab = ops->vocab_size(tok);
    UM_FUZZ_CHECK(vocab > 0);

    for (size_t i = 0; i < sizeof s_samples / sizeof s_samples[0]; i++) {
        int32_t *ids;
        size_t n;
        if (um_fuzz_encode(ops, tok, s_samples[i], strlen(s_samples[i]), 1, &ids, &n) == 0) {
            char *text;
            size_t len;
            UM_FUZZ_CHECK(um_fuzz_decode(ops, tok, ids, n, 0, &text, &len) == 0);
            free(text);
            free(ids);
        }
    }

    /* Each id alone, then the last ones, where tables end. */
    for (int32_t k = 0; k < S_DECODE_IDS && k < vocab; k++) {
        int32_t id = k < S_DECODE_IDS / 2 ? k : vocab - (S_DECODE_IDS - k);
        if (id < 0)
            continue;
        char *text;
        size_t len;
        if (um_fuzz_decode(ops, tok, &id, 1, k & 1 ? UM_DECODE_SKIP_SPECIAL : 0, &text,
                           &len) == 0) {
            int32_t back;
            if (len > 0 && memchr(text, '\0', len) == NULL &&
                ops->token_to_id(tok, text, &back) == UM_OK)
                UM_FUZZ_CHECK(back >= 0 && back < vocab);
            free(text);
        }
        int special = ops->is_special(tok, id);
        UM_FUZZ_CHECK(special == 0 || special == 1);
    }
    int32_t past[2] = {vocab, -1};
    char *text;
    size_t len;
    UM_FUZZ_CHECK(um_fuzz_decode(ops, tok, &past[0], 1, 0, &text, &len) == UM_ERANGE);
    UM_FUZZ_CHECK(um_fuzz_decode(ops, tok, &past[1], 1, 0, &text, &len) == UM_ERANGE);
    UM_FUZZ_CHECK(ops->is_special(tok, vocab) == 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const um_tokenizer_ops_t *ops = um_plugin_describe()->tokenizer;
    const char *dir = um_fuzz_scratch_dir();
    um_fuzz_write(UM_FUZZ_FILE, data, size);

    int score = ops->probe(dir);
    UM_FUZZ_CHECK(score >= 0 && score <= 100);

    void *tok = NULL;
    char err[1024];
    err[0] = '\0';
    int rc = ops->load(&um_fuzz_host, dir, &tok, err, sizeof err);
    if (rc != UM_OK) {
        UM_FUZZ_CHECK(rc < 0);
        UM_FUZZ_CHECK(tok == NULL);
        UM_FUZZ_CHECK(err[0] != '\0');
        return 0;
    }
    UM_FUZZ_CHECK(tok != NULL);
    s_exercise(ops, tok);
    ops->unload(tok);
    return 0;
}
