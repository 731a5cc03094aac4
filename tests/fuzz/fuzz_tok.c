/* Tokenizer contract checks shared by the tokenizer fuzz targets: see fuzz.h. */
#include <string.h>

#include <unmaskd/error.h>

#include "fuzz.h"

int um_fuzz_encode(const um_tokenizer_ops_t *ops, void *tok, const char *text, size_t len,
                   int any_error, int32_t **ids, size_t *n)
{
    *ids = NULL;
    *n = 0;
    size_t need = 0;
    int rc = ops->encode(tok, text, len, NULL, 0, &need);
    if (rc != UM_OK && rc != UM_ENOSPACE) {
        UM_FUZZ_CHECK(rc < 0);
        UM_FUZZ_CHECK(any_error || rc == UM_EINVAL);
        return rc;
    }
    UM_FUZZ_CHECK(rc == UM_OK ? need == 0 : need > 0);

    int32_t *out = malloc((need ? need : 1) * sizeof *out);
    UM_FUZZ_CHECK(out != NULL);
    size_t got = 0;
    if (need > 0) {
        rc = ops->encode(tok, text, len, out, need - 1, &got);
        UM_FUZZ_CHECK(rc == UM_ENOSPACE);
        UM_FUZZ_CHECK(got == need);
    }
    rc = ops->encode(tok, text, len, out, need, &got);
    UM_FUZZ_CHECK(rc == UM_OK);
    UM_FUZZ_CHECK(got == need);

    int32_t vocab = ops->vocab_size(tok);
    for (size_t i = 0; i < got; i++)
        UM_FUZZ_CHECK(out[i] >= 0 && out[i] < vocab);
    *ids = out;
    *n = got;
    return UM_OK;
}

int um_fuzz_decode(const um_tokenizer_ops_t *ops, void *tok, const int32_t *ids, size_t n,
                   unsigned flags, char **text, size_t *len)
{
    *text = NULL;
    *len = 0;
    size_t need = 0;
    int rc = ops->decode(tok, ids, n, flags, NULL, 0, &need);
    if (rc == UM_ERANGE)
        return rc;
    UM_FUZZ_CHECK(rc == UM_ENOSPACE);

    char *out = malloc(need + 1);
    UM_FUZZ_CHECK(out != NULL);
    size_t got = 0;
    rc = ops->decode(tok, ids, n, flags, out, need, &got);
    UM_FUZZ_CHECK(rc == UM_ENOSPACE);
    UM_FUZZ_CHECK(got == need);
    rc = ops->decode(tok, ids, n, flags, out, need + 1, &got);
    UM_FUZZ_CHECK(rc == UM_OK);
    UM_FUZZ_CHECK(got == need);
    UM_FUZZ_CHECK(out[need] == '\0');
    UM_FUZZ_CHECK(um_fuzz_utf8_valid(out, need));
    *text = out;
    *len = need;
    return UM_OK;
}
