/*
 * Internal interface of the byte-level BPE tokenizer plugin (not installed).
 *
 * A um_bpe_t contains everything one loaded vocabulary needs: the tokens by id,
 * a hash table from vocabulary entries to ids, the ranked merges keyed by the ids
 * of their two parts, the added tokens, the compiled pre-tokenizer regexes and the
 * scratch buffers and word cache that encode and decode reuse.
 *
 * The files of this folder split the work by data flow. bpe_json.c reads a
 * tokenizer.json into a um_bpe_t, and bpe_files.c turns separate vocabulary and merges
 * files into such a document. bpe_encode.c turns text into ids. bpe.c contains the
 * tables, decode and the plugin descriptor.
 *
 * Threading: a um_bpe_t is immutable after loading except for its scratch buffers
 * and word cache, so the host must use each one from one thread at a time (which
 * plugin.h requires of the host anyway). Nothing here is global.
 */
#ifndef UM_BPE_H
#define UM_BPE_H

#define PCRE2_CODE_UNIT_WIDTH 8

#include <pcre2.h>
#include <stddef.h>
#include <stdint.h>

#include <unmaskd/plugin.h>

#define UM_BPE_NAME "bpe"

/*
 * Largest token id accepted. Tokens live in an array indexed by id, so without a
 * limit a malformed file with a huge id would make loading allocate that much. Real
 * vocabularies stay far below 2^24 (LLaMA-3 has 128,256 ids).
 */
#define UM_BPE_MAX_ID ((1 << 24) - 1)

/* Regex steps a pre-tokenizer may chain (Split entries plus one ByteLevel). */
#define UM_BPE_MAX_STEPS 8

/* The pattern GPT-2 splits words with; ByteLevel with use_regex true means this. */
#define UM_BPE_GPT2_PATTERN                                                   \
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)" \
    "|\\s+"

/*
 * The pattern LLaMA-3 splits words with (tiktoken's cl100k_base pattern, as in its
 * tokenizer.json). Unlike GPT-2's, contractions match in any case, a letter run may
 * start with one character that is no letter, digit or line break, and digits group
 * in runs of at most three, never after a space.
 */
#define UM_BPE_LLAMA3_PATTERN                                                         \
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"              \
    "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"

/* Word cache: direct-mapped, each slot overwritten by the next word hashed to it. */
#define UM_BPE_CACHE_SLOTS 16384 /* power of two; 64 bytes each, 1 MiB per tokenizer */
#define UM_BPE_CACHE_KEY_MAX 26  /* longer words are not cached */
#define UM_BPE_CACHE_IDS_MAX 8   /* words of more tokens are not cached */

/* Log through the host table, skipping the call when the host offers no log. */
#define UM_BPE_LOG(bpe, level, ...)                                  \
    do {                                                             \
        if ((bpe)->host->log)                                        \
            (bpe)->host->log((level), UM_BPE_NAME, __VA_ARGS__);     \
    } while (0)

typedef struct um_bpe_token {
    const char *piece;    /* the entry as written in tokenizer.json, UTF-8, NUL-terminated */
    uint32_t piece_len;   /* bytes in piece, without the NUL */
    const unsigned char *bytes; /* (n_bytes) the text bytes the token represents */
    uint32_t n_bytes;
    uint8_t present;      /* 0 for ids no entry uses */
    uint8_t added;        /* from added_tokens: matched literally, decoded as content */
    uint8_t special;      /* added token with "special": true */
} um_bpe_token_t;

/* Open-addressing slot of the vocabulary table (entry text -> id). */
typedef struct um_bpe_piece_slot {
    const char *key; /* NULL when the slot is empty */
    uint32_t key_len;
    int32_t id;
} um_bpe_piece_slot_t;

/* Open-addressing slot of the merge table ((left id, right id) -> rank, merged id). */
typedef struct um_bpe_merge_slot {
    uint64_t key; /* (uint64_t)left << 32 | right; UM_BPE_EMPTY_KEY when empty */
    uint32_t rank;
    int32_t merged;
} um_bpe_merge_slot_t;

#define UM_BPE_EMPTY_KEY UINT64_MAX

/* One added token for the literal scan, ordered by first byte, then longest first. */
typedef struct um_bpe_added {
    const char *content;
    uint32_t len;
    int32_t id;
} um_bpe_added_t;

/*
 * Pre-tokenizer step, applied to every split the previous step produced. It prepends
 * a space when prefix_space is set and the split does not start with one. Then, when
 * re is set, it cuts the split into regex matches and the text between them.
 */
typedef struct um_bpe_step {
    pcre2_code *re;
    pcre2_match_data *match;
    int prefix_space;
} um_bpe_step_t;

typedef struct um_bpe_cache_slot {
    uint32_t hash;   /* 0 when the slot is empty */
    uint8_t key_len;
    uint8_t n_ids;
    char key[UM_BPE_CACHE_KEY_MAX];
    int32_t ids[UM_BPE_CACHE_IDS_MAX];
} um_bpe_cache_slot_t;

/* A growable byte buffer allocated through the host. */
typedef struct um_bpe_buf {
    unsigned char *data;
    size_t cap;
} um_bpe_buf_t;

/* Bump allocator for the strings of the vocabulary, freed all at once. */
typedef struct um_bpe_arena_block {
    struct um_bpe_arena_block *next;
    size_t used, cap;
    unsigned char data[];
} um_bpe_arena_block_t;

typedef struct um_bpe {
    const um_host_t *host;

    um_bpe_token_t *tokens; /* (n_tokens) indexed by id */
    int32_t n_tokens;       /* max id + 1 */
    um_bpe_arena_block_t *arena;

    um_bpe_piece_slot_t *pieces; /* (piece_mask + 1) slots */
    uint32_t piece_mask, n_pieces;

    um_bpe_merge_slot_t *merges; /* (merge_mask + 1) slots */
    uint32_t merge_mask, n_merges;

    int32_t byte_id[256]; /* id of the one-byte token of each byte value, -1 if none */

    um_bpe_added_t *added; /* (n_added) by first byte, then longest first */
    int32_t n_added;
    int32_t added_first[256]; /* index in added of the first token starting with a byte */
    int32_t added_count[256]; /* how many added tokens start with that byte */

    um_bpe_step_t steps[UM_BPE_MAX_STEPS];
    int n_steps;
    pcre2_general_context *pcre_general;
    pcre2_match_context *pcre_match;
    pcre2_jit_stack *jit_stack;

    int ignore_merges; /* model.ignore_merges: a word found whole in the vocabulary is one token */

    /* Scratch reused by encode and decode; see the threading rule above. */
    um_bpe_buf_t prefix[UM_BPE_MAX_STEPS]; /* a split with its prepended space, per step */
    um_bpe_buf_t symbols;                  /* BPE symbols of the current word */
    um_bpe_buf_t heap;                     /* candidate merges of the current word */
    um_bpe_buf_t text;                     /* byte-level text of a word, or decoded bytes */
    um_bpe_cache_slot_t *cache;            /* (UM_BPE_CACHE_SLOTS) */
} um_bpe_t;

/* ---- bpe.c: memory, tables, byte map ---- */

void *um_bpe_alloc(um_bpe_t *bpe, size_t size);
void um_bpe_free(um_bpe_t *bpe, void *ptr);

/* Grow buf to at least size bytes, keeping its contents. Returns 0 or UM_ENOMEM. */
int um_bpe_buf_reserve(um_bpe_t *bpe, um_bpe_buf_t *buf, size_t size);

/* Copy len bytes into the arena and add a NUL; NULL when out of memory. */
char *um_bpe_arena_copy(um_bpe_t *bpe, const void *src, size_t len);

/*
 * Size the vocabulary and merge tables for n_pieces entries and n_merges merges.
 * Must be called once before the inserts. Returns 0 or UM_ENOMEM.
 */
int um_bpe_tables_init(um_bpe_t *bpe, size_t n_pieces, size_t n_merges);

/* Map key to id, replacing the id of an equal key. key must outlive bpe. */
void um_bpe_piece_insert(um_bpe_t *bpe, const char *key, size_t len, int32_t id);

/* Return the id of a vocabulary entry or added token, or -1. */
int32_t um_bpe_piece_find(const um_bpe_t *bpe, const char *key, size_t len);

/* Record that left followed by right merges into merged with the given rank. */
void um_bpe_merge_insert(um_bpe_t *bpe, int32_t left, int32_t right, uint32_t rank,
                         int32_t merged);

/* Find the merge of (left, right); returns 1 and fills rank and merged, else 0. */
int um_bpe_merge_find(const um_bpe_t *bpe, int32_t left, int32_t right, uint32_t *rank,
                      int32_t *merged);

/* Map byte b to its code point under GPT-2's byte-to-unicode map. */
uint32_t um_bpe_byte_to_codepoint(unsigned b);

/* Inverse of um_bpe_byte_to_codepoint: the byte for code point cp, or -1. */
int um_bpe_codepoint_to_byte(uint32_t cp);

/*
 * Decode one UTF-8 sequence at s[0..n) into *cp and return its length, or 0 when
 * the bytes there are not valid UTF-8 (overlong, surrogate, above U+10FFFF, cut off).
 */
size_t um_bpe_utf8_next(const unsigned char *s, size_t n, uint32_t *cp);

/* ---- bpe_json.c: loading ---- */

struct json_t;

/*
 * Fill bpe (already zeroed, host set) from the tokenizer.json at path. Returns 0,
 * or UM_ENOTFOUND / UM_EIO when the file cannot be read, UM_EFORMAT when a field is
 * missing or invalid, UM_EUNSUPPORTED for a valid file this plugin cannot run,
 * UM_ENOMEM; err then names the file and the field. The caller frees bpe on failure.
 */
int um_bpe_load_json(um_bpe_t *bpe, const char *path, char *err, size_t errlen);

/*
 * Fill bpe like um_bpe_load_json, from a tokenizer.json document already parsed;
 * messages name path. doc stays the caller's.
 */
int um_bpe_load_doc(um_bpe_t *bpe, struct json_t *doc, const char *path, char *err,
                    size_t errlen);

/*
 * Score how well this plugin reads the tokenizer.json at path: 90 when model.type
 * is "BPE" and the pre_tokenizer or decoder has a ByteLevel step, else 0.
 */
int um_bpe_probe_json(const char *path);

/* ---- bpe_files.c: the vocabulary and merges as separate files ---- */

/*
 * Fill bpe (already zeroed, host set) from model_dir's encoder.json and vocab.bpe
 * (GPT-2's release) or, failing those, vocab.json and merges.txt (with
 * special_tokens.txt or tokenizer_config.json for added tokens). Returns 0, or
 * UM_ENOTFOUND when neither pair exists, UM_EIO, UM_EFORMAT for a malformed file (err
 * names the file and the line or entry), UM_ENOMEM. The caller frees bpe on failure.
 */
int um_bpe_load_files(um_bpe_t *bpe, const char *model_dir, char *err, size_t errlen);

/* Score model_dir: 80 when encoder.json + vocab.bpe or vocab.json + merges.txt exist, else 0. */
int um_bpe_probe_files(const char *model_dir);

/* ---- bpe_encode.c ---- */

/*
 * Encode len bytes of UTF-8 text into ids (room for cap). Returns 0, UM_EINVAL for
 * text that is not valid UTF-8, UM_ENOSPACE when cap is too small (*n_ids is then
 * the count needed), UM_ENOMEM, or UM_EPLUGIN when the regex engine fails.
 */
int um_bpe_encode(um_bpe_t *bpe, const char *text, size_t len, int32_t *ids, size_t cap,
                  size_t *n_ids);

#endif /* UM_BPE_H */
