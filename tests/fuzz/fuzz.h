/*
 * Helpers shared by the fuzz targets in tests/fuzz/ (docs/testing.md): a private
 * scratch folder for the loaders that only take a path, a host table for the tokenizer
 * plugins, a check macro whose failure libFuzzer reports as a crash, and the folder of
 * the fixed tokenizers the encode and decode targets load.
 *
 * Every target is a libFuzzer entry point, LLVMFuzzerTestOneInput. With --enable-fuzz
 * the programs link libFuzzer; otherwise replay_main.c gives them a main() that runs
 * the files named on the command line, which is how make check replays the corpora.
 *
 * Threading: a target runs one input at a time on one thread. The scratch folder is
 * the only process-wide state, and every input overwrites the file it writes there.
 */
#ifndef UM_FUZZ_H
#define UM_FUZZ_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include <unmaskd/plugin.h>

/* The libFuzzer entry point each target defines; returns 0. */
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/*
 * Check an invariant of the code under test. A failure prints the expression and
 * aborts, which libFuzzer reports as a crash with the input that caused it.
 */
#define UM_FUZZ_CHECK(expr)                                                      \
    do {                                                                         \
        if (!(expr)) {                                                           \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #expr); \
            abort();                                                             \
        }                                                                        \
    } while (0)

/*
 * The process's scratch folder, created under TMPDIR (or /tmp) on the first call and
 * removed with its files at exit. Aborts when it cannot be created.
 */
const char *um_fuzz_scratch_dir(void);

/*
 * Write size bytes to the file name in the scratch folder, replacing it, and return
 * its path (a static buffer, valid until the next call). Aborts on a write error.
 */
const char *um_fuzz_write(const char *name, const uint8_t *data, size_t size);

/*
 * The folder of a fixed tokenizer: UM_FUZZ_DATA from the environment, else the
 * tests/fuzz/data folder of the source tree, joined with sub. Static buffer.
 */
const char *um_fuzz_data_dir(const char *sub);

/* Host services for tokenizer plugins: malloc, free, and a log that formats and drops. */
extern const um_host_t um_fuzz_host;

/* 1 when s[0..len) is valid UTF-8 (NUL bytes allowed), else 0. */
int um_fuzz_utf8_valid(const char *s, size_t len);

/* ------------------------------------------------------------------------- */
/* Tokenizer plugins (fuzz_tok.c)                                            */

/* The descriptor of the one tokenizer plugin a target is linked with. */
const um_plugin_desc_t *um_plugin_describe(void);

/*
 * Encode len bytes through ops and check the encode contract: the size query with
 * cap 0, the same count with room for it, UM_ENOSPACE one short, and every id inside
 * the vocabulary. Returns 0 with a malloc'ed array in *ids (the caller frees it) and
 * its length in *n, or the plugin's negative code with *ids NULL. Only UM_EINVAL (text
 * that is not UTF-8) is accepted as a failure unless any_error is set.
 */
int um_fuzz_encode(const um_tokenizer_ops_t *ops, void *tok, const char *text, size_t len,
                   int any_error, int32_t **ids, size_t *n);

/*
 * Decode n ids through ops and check the decode contract: the size query, UM_ENOSPACE
 * without room for the NUL, and valid UTF-8 of the reported length. Returns 0 with a
 * malloc'ed NUL-terminated text in *text (the caller frees it) and its length in *len,
 * or UM_ERANGE when an id is outside the vocabulary, with *text NULL.
 */
int um_fuzz_decode(const um_tokenizer_ops_t *ops, void *tok, const int32_t *ids, size_t n,
                   unsigned flags, char **text, size_t *len);

#endif /* UM_FUZZ_H */
