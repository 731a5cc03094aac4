/*
 * Internal interface of the WordPiece tokenizer plugin (not installed).
 *
 * A um_wp_t contains one loaded BERT-style vocabulary: the tokens by id, a table from
 * token text to id and the special tokens matched literally in the input. It also
 * contains the settings of BERT's normalizer, pre-tokenizer and decoder, and the
 * scratch buffers that encode and decode reuse.
 *
 * The files of this folder split the work by data flow: wordpiece_load.c reads
 * vocab.txt, tokenizer.json and tokenizer_config.json into a um_wp_t,
 * wordpiece_encode.c turns text into ids, wordpiece.c contains decode and the plugin
 * descriptor.
 *
 * Threading: a um_wp_t is immutable after loading except for its scratch buffers, so
 * the host must use each one from one thread at a time (plugin.h requires that of the
 * host anyway). Nothing here is global.
 */
#ifndef UM_WORDPIECE_H
#define UM_WORDPIECE_H

#include <stddef.h>
#include <stdint.h>

#include <unmaskd/plugin.h>

#include "../common/tok_common.h"

#define UM_WP_NAME "wordpiece"

/* Largest token id accepted, so that a malformed file cannot make loading allocate more. */
#define UM_WP_MAX_ID ((1 << 24) - 1)

/* Maximum length of the continuing-subword prefix in bytes ("##" in BERT vocabularies). */
#define UM_WP_PREFIX_MAX 15

/* Log through the host table, skipping the call when the host offers no log. */
#define UM_WP_LOG(wp, level, ...)                                \
    do {                                                         \
        if ((wp)->host->log)                                     \
            (wp)->host->log((level), UM_WP_NAME, __VA_ARGS__);   \
    } while (0)

typedef struct um_wp_token {
    const char *text; /* UTF-8, NUL-terminated, in the arena */
    uint32_t len;
    uint8_t present;  /* 0 for ids no entry uses */
    uint8_t special;  /* matched literally before normalization, left out by SKIP_SPECIAL */
} um_wp_token_t;

/* One special token for the literal scan, ordered by first byte, then longest first. */
typedef struct um_wp_literal {
    const char *text;
    uint32_t len;
    int32_t id;
} um_wp_literal_t;

/* Bump allocator for token strings, freed all at once. */
typedef struct um_wp_arena_block {
    struct um_wp_arena_block *next;
    size_t used, cap;
    unsigned char data[];
} um_wp_arena_block_t;

typedef struct um_wp {
    const um_host_t *host;

    um_wp_token_t *tokens; /* (n_tokens) indexed by id */
    int32_t n_tokens;      /* max id + 1 */
    um_wp_arena_block_t *arena;
    um_tok_table_t table;  /* token text -> id */
    uint32_t max_token_len; /* max entry length in bytes, which bounds the longest-match search */

    int32_t unk_id;
    char prefix[UM_WP_PREFIX_MAX + 1]; /* continuing-subword prefix, "##" */
    uint32_t prefix_len;
    int32_t max_chars; /* max_input_chars_per_word: longer words become the unknown token */

    /* BERT's normalizer, in the order it runs. */
    int clean_text;           /* drop control characters, turn whitespace into spaces */
    int handle_chinese_chars; /* put spaces around CJK ideographs */
    int strip_accents;        /* NFD, then drop nonspacing marks (Mn) */
    int lowercase;            /* full lower-case mapping */
    int cleanup;              /* decode removes the spaces BERT puts before punctuation */

    um_wp_literal_t *literals; /* (n_literals) special tokens */
    int32_t n_literals;
    int32_t literal_first[256];
    int32_t literal_count[256];

    /* Scratch reused by encode and decode; see the threading rule above. */
    um_tok_buf_t cps;     /* code points of the segment being normalized, then of a pass */
    um_tok_buf_t cps2;    /* the other buffer of a normalization pass */
    um_tok_buf_t word;    /* UTF-8 bytes of the current word */
    um_tok_buf_t bounds;  /* byte offset of each character of the word */
    um_tok_buf_t key;     /* prefix + candidate bytes for lookups */
    um_tok_buf_t pieces;  /* ids of the current word before it is accepted */
    um_tok_buf_t text;    /* decoded text */
} um_wp_t;

/* ---- wordpiece.c: memory and tables ---- */

/* Copy len bytes into the arena and add a NUL; NULL when out of memory. */
char *um_wp_arena_copy(um_wp_t *wp, const void *src, size_t len);

/*
 * Add the special token text (len bytes) with id to the literal list, which has room
 * for capacity entries. Returns 0 or UM_ENOMEM.
 */
int um_wp_add_literal(um_wp_t *wp, const char *text, size_t len, int32_t id, int32_t capacity);

/* Sort the literals and build the first-byte index; call once after the last add. */
void um_wp_index_literals(um_wp_t *wp);

/* ---- wordpiece_load.c ---- */

/*
 * Score model_dir: 90 when tokenizer.json has a WordPiece model, 80 when there is no
 * tokenizer.json and vocab.txt has the unknown token and "##" continuation entries,
 * else 0.
 */
int um_wp_probe_dir(const char *model_dir);

/*
 * Fill wp (already zeroed, host set) from the tokenizer files of model_dir. Returns
 * 0, or UM_ENOTFOUND when neither file exists, UM_EIO when one cannot be read,
 * UM_EFORMAT for a malformed file (err names the file and the line, offset or
 * field), UM_EUNSUPPORTED for a valid file this plugin cannot run, UM_ENOMEM. The
 * caller frees wp on failure.
 */
int um_wp_load_dir(um_wp_t *wp, const char *model_dir, char *err, size_t errlen);

/* ---- wordpiece_encode.c ---- */

/*
 * Encode len bytes of UTF-8 text into ids (room for cap). Returns 0, UM_EINVAL for
 * text that is not valid UTF-8, UM_ENOSPACE when cap is too small (*n_ids is then the
 * count needed) or UM_ENOMEM.
 */
int um_wp_encode(um_wp_t *wp, const char *text, size_t len, int32_t *ids, size_t cap,
                 size_t *n_ids);

#endif /* UM_WORDPIECE_H */
