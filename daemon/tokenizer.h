/*
 * The daemon's view of a tokenizer: a loaded tokenizer plugin plus the special ids
 * the sampler needs, with encode and decode that size their own buffers.
 *
 * Threading: a tokenizer is used by one thread at a time.
 */
#ifndef UM_TOKENIZER_H
#define UM_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "plugins.h"

typedef struct um_tokenizer {
    const um_plugin_t *plugin;
    const um_tokenizer_ops_t *ops;
    void *state;
} um_tokenizer_t;

/*
 * Load the tokenizer of model_dir with the plugin named name, or, when name is NULL,
 * with the tokenizer plugin whose probe scores highest. Returns 0 or a UM_E* code
 * with a message in err.
 */
int um_tokenizer_open(um_tokenizer_t *tok, const um_plugin_registry_t *reg, const char *name,
                      const char *model_dir, char *err, size_t errlen);

/*
 * Load a second instance of the tokenizer src holds, from the same model_dir, for
 * another thread. Its load messages go to the debug level, because src's load logged
 * the same ones.
 */
int um_tokenizer_open_copy(um_tokenizer_t *tok, const um_tokenizer_t *src,
                           const char *model_dir, char *err, size_t errlen);

void um_tokenizer_close(um_tokenizer_t *tok);

/* Encode text into a malloc'ed array the caller frees; *n gets its length. */
int um_tokenizer_encode(um_tokenizer_t *tok, const char *text, size_t len, int32_t **ids,
                        size_t *n);

/*
 * Decode ids into a malloc'ed NUL-terminated string the caller frees; *len (when not
 * NULL) gets its length in bytes, which counts any NUL bytes the tokens decode to.
 */
int um_tokenizer_decode(um_tokenizer_t *tok, const int32_t *ids, size_t n, unsigned flags,
                        char **text, size_t *len);

#endif /* UM_TOKENIZER_H */
