/*
 * Byte-level BPE tokenizer plugin: reads a Hugging Face tokenizer.json with a BPE
 * model and a ByteLevel pre-tokenizer (GPT-2, LLaMA-3, LLaDA and the bundled
 * TinyStories model), or the vocabulary and merges as separate files (GPT-2's
 * encoder.json and vocab.bpe, or vocab.json and merges.txt), and encodes text to ids
 * and back.
 *
 * This file contains the memory helpers, the vocabulary and merge hash tables,
 * GPT-2's byte-to-unicode map, UTF-8 checks, decode and the plugin descriptor. Loading is in
 * bpe_json.c and bpe_files.c, encoding in bpe_encode.c; bpe.h describes the shared structure and
 * its threading rule. All memory comes from the host's alloc and free, except what
 * jansson allocates while a file is parsed.
 */
#include "bpe.h"

#include <stdio.h>
#include <string.h>
#include <unistd.h>

/* ------------------------------------------------------------------------- */
/* Memory                                                                    */

void *um_bpe_alloc(um_bpe_t *bpe, size_t size)
{
    return bpe->host->alloc(size ? size : 1);
}

void um_bpe_free(um_bpe_t *bpe, void *ptr)
{
    if (ptr)
        bpe->host->free(ptr);
}

int um_bpe_buf_reserve(um_bpe_t *bpe, um_bpe_buf_t *buf, size_t size)
{
    if (size <= buf->cap)
        return UM_OK;
    size_t cap = buf->cap ? buf->cap : 256;
    while (cap < size) {
        if (cap > SIZE_MAX / 2)
            return UM_ENOMEM;
        cap *= 2;
    }
    unsigned char *data = um_bpe_alloc(bpe, cap);
    if (!data)
        return UM_ENOMEM;
    if (buf->data) {
        memcpy(data, buf->data, buf->cap);
        um_bpe_free(bpe, buf->data);
    }
    buf->data = data;
    buf->cap = cap;
    return UM_OK;
}

char *um_bpe_arena_copy(um_bpe_t *bpe, const void *src, size_t len)
{
    const size_t block_size = 256 * 1024;
    um_bpe_arena_block_t *block = bpe->arena;
    if (!block || block->cap - block->used < len + 1) {
        size_t cap = len + 1 > block_size ? len + 1 : block_size;
        block = um_bpe_alloc(bpe, sizeof *block + cap);
        if (!block)
            return NULL;
        block->cap = cap;
        block->used = 0;
        block->next = bpe->arena;
        bpe->arena = block;
    }
    char *dst = (char *)block->data + block->used;
    memcpy(dst, src, len);
    dst[len] = '\0';
    block->used += len + 1;
    return dst;
}

/* ------------------------------------------------------------------------- */
/* Hash tables                                                               */

/* FNV-1a, 64-bit. */
static uint64_t s_hash_bytes(const void *data, size_t len)
{
    const unsigned char *p = data;
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < len; i++) {
        h ^= p[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

/* The splitmix64 finalizer: spreads the bits of a merge key over the table. */
static uint64_t s_hash_u64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    x ^= x >> 31;
    return x;
}

/* Smallest power of two at least twice n, so tables stay at most half full. */
static size_t s_table_size(size_t n)
{
    size_t size = 16;
    while (size < 2 * n)
        size *= 2;
    return size;
}

int um_bpe_tables_init(um_bpe_t *bpe, size_t n_pieces, size_t n_merges)
{
    size_t piece_size = s_table_size(n_pieces);
    size_t merge_size = s_table_size(n_merges);
    if (piece_size > UINT32_MAX || merge_size > UINT32_MAX)
        return UM_ENOMEM;

    bpe->pieces = um_bpe_alloc(bpe, piece_size * sizeof *bpe->pieces);
    bpe->merges = um_bpe_alloc(bpe, merge_size * sizeof *bpe->merges);
    if (!bpe->pieces || !bpe->merges)
        return UM_ENOMEM;

    memset(bpe->pieces, 0, piece_size * sizeof *bpe->pieces);
    for (size_t i = 0; i < merge_size; i++)
        bpe->merges[i].key = UM_BPE_EMPTY_KEY;
    bpe->piece_mask = (uint32_t)(piece_size - 1);
    bpe->merge_mask = (uint32_t)(merge_size - 1);
    return UM_OK;
}

void um_bpe_piece_insert(um_bpe_t *bpe, const char *key, size_t len, int32_t id)
{
    uint32_t i = (uint32_t)s_hash_bytes(key, len) & bpe->piece_mask;
    for (;; i = (i + 1) & bpe->piece_mask) {
        um_bpe_piece_slot_t *slot = &bpe->pieces[i];
        if (!slot->key) {
            slot->key = key;
            slot->key_len = (uint32_t)len;
            slot->id = id;
            bpe->n_pieces++;
            return;
        }
        if (slot->key_len == len && memcmp(slot->key, key, len) == 0) {
            slot->id = id;
            return;
        }
    }
}

int32_t um_bpe_piece_find(const um_bpe_t *bpe, const char *key, size_t len)
{
    uint32_t i = (uint32_t)s_hash_bytes(key, len) & bpe->piece_mask;
    for (;; i = (i + 1) & bpe->piece_mask) {
        const um_bpe_piece_slot_t *slot = &bpe->pieces[i];
        if (!slot->key)
            return -1;
        if (slot->key_len == len && memcmp(slot->key, key, len) == 0)
            return slot->id;
    }
}

static uint64_t s_merge_key(int32_t left, int32_t right)
{
    return (uint64_t)(uint32_t)left << 32 | (uint32_t)right;
}

void um_bpe_merge_insert(um_bpe_t *bpe, int32_t left, int32_t right, uint32_t rank,
                         int32_t merged)
{
    uint64_t key = s_merge_key(left, right);
    uint32_t i = (uint32_t)s_hash_u64(key) & bpe->merge_mask;
    for (;; i = (i + 1) & bpe->merge_mask) {
        um_bpe_merge_slot_t *slot = &bpe->merges[i];
        if (slot->key == UM_BPE_EMPTY_KEY) {
            slot->key = key;
            bpe->n_merges++;
        } else if (slot->key != key) {
            continue;
        }
        /* A repeated pair keeps its last rank, as a dictionary built in file order would. */
        slot->rank = rank;
        slot->merged = merged;
        return;
    }
}

int um_bpe_merge_find(const um_bpe_t *bpe, int32_t left, int32_t right, uint32_t *rank,
                      int32_t *merged)
{
    uint64_t key = s_merge_key(left, right);
    uint32_t i = (uint32_t)s_hash_u64(key) & bpe->merge_mask;
    for (;; i = (i + 1) & bpe->merge_mask) {
        const um_bpe_merge_slot_t *slot = &bpe->merges[i];
        if (slot->key == UM_BPE_EMPTY_KEY)
            return 0;
        if (slot->key == key) {
            *rank = slot->rank;
            *merged = slot->merged;
            return 1;
        }
    }
}

/* ------------------------------------------------------------------------- */
/* Bytes and UTF-8                                                           */

/*
 * GPT-2's map keeps the printable bytes '!'..'~', 0xA1..0xAC and 0xAE..0xFF as the
 * code points of the same value and moves the other 68 bytes, in increasing order,
 * to U+0100..U+0143: 0x00..0x20 first, then 0x7F..0xA0, then 0xAD.
 */
uint32_t um_bpe_byte_to_codepoint(unsigned b)
{
    if (b <= 0x20)
        return 0x100 + b;
    if (b >= 0x7F && b <= 0xA0)
        return 0x100 + 33 + (b - 0x7F);
    if (b == 0xAD)
        return 0x100 + 67;
    return b;
}

int um_bpe_codepoint_to_byte(uint32_t cp)
{
    if ((cp >= 0x21 && cp <= 0x7E) || (cp >= 0xA1 && cp <= 0xAC) || (cp >= 0xAE && cp <= 0xFF))
        return (int)cp;
    if (cp >= 0x100 && cp < 0x100 + 33)
        return (int)(cp - 0x100);
    if (cp >= 0x100 + 33 && cp < 0x100 + 67)
        return (int)(cp - 0x100 - 33 + 0x7F);
    if (cp == 0x100 + 67)
        return 0xAD;
    return -1;
}

/*
 * Check the UTF-8 sequence at s[0..n). Returns its length and sets *cp when it is
 * valid. Otherwise returns 0 and sets *bad to the length of the maximal invalid
 * subpart: the lead byte plus the continuation bytes that were still allowed, at
 * least 1. Unicode recommends one U+FFFD per such subpart, and Python's "replace"
 * error handler does the same.
 */
static size_t s_utf8_check(const unsigned char *s, size_t n, uint32_t *cp, size_t *bad)
{
    unsigned c = s[0];
    if (c < 0x80) {
        *cp = c;
        return 1;
    }

    size_t need;
    uint32_t value;
    unsigned lo = 0x80, hi = 0xBF; /* allowed range of the next byte */
    if (c >= 0xC2 && c <= 0xDF) {
        need = 1;
        value = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
        need = 2;
        value = c & 0x0F;
        if (c == 0xE0)
            lo = 0xA0; /* overlong below U+0800 */
        else if (c == 0xED)
            hi = 0x9F; /* surrogates U+D800..U+DFFF */
    } else if (c >= 0xF0 && c <= 0xF4) {
        need = 3;
        value = c & 0x07;
        if (c == 0xF0)
            lo = 0x90; /* overlong below U+10000 */
        else if (c == 0xF4)
            hi = 0x8F; /* above U+10FFFF */
    } else {
        *bad = 1; /* continuation byte, C0, C1 or F5..FF */
        return 0;
    }

    size_t i = 1;
    for (; i <= need && i < n; i++) {
        unsigned b = s[i];
        if (b < lo || b > hi)
            break;
        value = value << 6 | (b & 0x3F);
        lo = 0x80;
        hi = 0xBF;
    }
    if (i == need + 1) {
        *cp = value;
        return i;
    }
    *bad = i;
    return 0;
}

size_t um_bpe_utf8_next(const unsigned char *s, size_t n, uint32_t *cp)
{
    size_t bad;
    return s_utf8_check(s, n, cp, &bad);
}

/*
 * Copy src to dst, replacing each maximal invalid subpart by U+FFFD (EF BF BD).
 * Returns the output length; with dst NULL it only measures.
 */
static size_t s_utf8_repair(const unsigned char *src, size_t n, unsigned char *dst)
{
    size_t out = 0;
    size_t i = 0;
    while (i < n) {
        uint32_t cp;
        size_t bad = 0;
        size_t len = s_utf8_check(src + i, n - i, &cp, &bad);
        if (len) {
            if (dst)
                memcpy(dst + out, src + i, len);
            out += len;
            i += len;
        } else {
            if (dst)
                memcpy(dst + out, "\xEF\xBF\xBD", 3);
            out += 3;
            i += bad;
        }
    }
    return out;
}

/* ------------------------------------------------------------------------- */
/* Decode                                                                    */

/*
 * Decode ids: concatenate the bytes of each token (the content of an added token),
 * then repair invalid UTF-8. With UM_DECODE_SKIP_SPECIAL, tokens marked special are
 * left out; added tokens with "special": false are kept, as Hugging Face does.
 */
static int s_decode(um_bpe_t *bpe, const int32_t *ids, size_t n, unsigned flags, char *out,
                    size_t cap, size_t *len)
{
    size_t raw = 0;
    for (size_t i = 0; i < n; i++) {
        int32_t id = ids[i];
        if (id < 0 || id >= bpe->n_tokens || !bpe->tokens[id].present) {
            UM_BPE_LOG(bpe, UM_LOG_DEBUG, "decode: id %d at index %zu is not in the vocabulary "
                       "(%d ids)", (int)id, i, (int)bpe->n_tokens);
            return UM_ERANGE;
        }
        const um_bpe_token_t *t = &bpe->tokens[id];
        if (!(t->special && (flags & UM_DECODE_SKIP_SPECIAL)))
            raw += t->n_bytes;
    }

    int rc = um_bpe_buf_reserve(bpe, &bpe->text, raw);
    if (rc)
        return rc;
    unsigned char *p = bpe->text.data;
    for (size_t i = 0; i < n; i++) {
        const um_bpe_token_t *t = &bpe->tokens[ids[i]];
        if (t->special && (flags & UM_DECODE_SKIP_SPECIAL))
            continue;
        memcpy(p, t->bytes, t->n_bytes);
        p += t->n_bytes;
    }

    size_t need = s_utf8_repair(bpe->text.data, raw, NULL);
    *len = need;
    if (!out || cap < need + 1)
        return UM_ENOSPACE;
    s_utf8_repair(bpe->text.data, raw, (unsigned char *)out);
    out[need] = '\0';
    return UM_OK;
}

/* ------------------------------------------------------------------------- */
/* Loading and unloading                                                     */

static void s_destroy(um_bpe_t *bpe)
{
    if (!bpe)
        return;
    for (int i = 0; i < bpe->n_steps; i++) {
        pcre2_match_data_free(bpe->steps[i].match);
        pcre2_code_free(bpe->steps[i].re);
    }
    pcre2_match_context_free(bpe->pcre_match);
    pcre2_jit_stack_free(bpe->jit_stack);
    pcre2_general_context_free(bpe->pcre_general);

    while (bpe->arena) {
        um_bpe_arena_block_t *next = bpe->arena->next;
        um_bpe_free(bpe, bpe->arena);
        bpe->arena = next;
    }
    for (int i = 0; i < UM_BPE_MAX_STEPS; i++)
        um_bpe_free(bpe, bpe->prefix[i].data);
    um_bpe_free(bpe, bpe->symbols.data);
    um_bpe_free(bpe, bpe->heap.data);
    um_bpe_free(bpe, bpe->text.data);
    um_bpe_free(bpe, bpe->cache);
    um_bpe_free(bpe, bpe->tokens);
    um_bpe_free(bpe, bpe->pieces);
    um_bpe_free(bpe, bpe->merges);
    um_bpe_free(bpe, bpe->added);
    bpe->host->free(bpe);
}

/* Join model_dir and "tokenizer.json" into a buffer from the host; NULL when out of memory. */
static char *s_tokenizer_path(const um_host_t *host, const char *model_dir)
{
    static const char name[] = "tokenizer.json";
    size_t len = strlen(model_dir);
    char *path = host->alloc(len + sizeof name + 1);
    if (!path)
        return NULL;
    memcpy(path, model_dir, len);
    path[len] = '/';
    memcpy(path + len + 1, name, sizeof name);
    return path;
}

/* tokenizer.json decides when it exists; the file pairs score lower. */
static int s_probe(const char *model_dir)
{
    if (!model_dir)
        return 0;
    char path[4096];
    int n = snprintf(path, sizeof path, "%s/tokenizer.json", model_dir);
    if (n < 0 || (size_t)n >= sizeof path)
        return 0;
    if (access(path, F_OK) == 0)
        return um_bpe_probe_json(path);
    return um_bpe_probe_files(model_dir);
}

static int s_load(const um_host_t *host, const char *model_dir, void **tok, char *err,
                  size_t errlen)
{
    if (!host || !tok || !model_dir || host->struct_size < offsetof(um_host_t, free) +
                                                               sizeof host->free ||
        !host->alloc || !host->free) {
        snprintf(err, errlen, "bpe: load needs a host table with alloc and free and a model "
                 "folder");
        return UM_EINVAL;
    }
    *tok = NULL;

    um_bpe_t *bpe = host->alloc(sizeof *bpe);
    if (!bpe) {
        snprintf(err, errlen, "bpe: out of memory loading %s", model_dir);
        return UM_ENOMEM;
    }
    memset(bpe, 0, sizeof *bpe);
    bpe->host = host;

    char *path = s_tokenizer_path(host, model_dir);
    if (!path) {
        s_destroy(bpe);
        snprintf(err, errlen, "bpe: out of memory loading %s", model_dir);
        return UM_ENOMEM;
    }
    int rc = access(path, F_OK) == 0 ? um_bpe_load_json(bpe, path, err, errlen)
                                     : um_bpe_load_files(bpe, model_dir, err, errlen);
    if (rc == UM_OK) {
        bpe->cache = um_bpe_alloc(bpe, UM_BPE_CACHE_SLOTS * sizeof *bpe->cache);
        if (bpe->cache) {
            memset(bpe->cache, 0, UM_BPE_CACHE_SLOTS * sizeof *bpe->cache);
        } else {
            snprintf(err, errlen, "%s: out of memory allocating the word cache", path);
            rc = UM_ENOMEM;
        }
    }
    if (rc == UM_OK)
        UM_BPE_LOG(bpe, UM_LOG_INFO, "loaded %s: %d ids, %u merges, %d added tokens, "
                   "%d pre-tokenizer steps", model_dir, (int)bpe->n_tokens, bpe->n_merges,
                   (int)bpe->n_added, bpe->n_steps);
    host->free(path);
    if (rc) {
        s_destroy(bpe);
        return rc;
    }
    *tok = bpe;
    return UM_OK;
}

/* ------------------------------------------------------------------------- */
/* Plugin table                                                              */

static void s_unload(void *tok)
{
    s_destroy(tok);
}

static int32_t s_vocab_size(void *tok)
{
    return ((um_bpe_t *)tok)->n_tokens;
}

static int s_encode(void *tok, const char *text, size_t len, int32_t *ids, size_t cap,
                    size_t *n_ids)
{
    if (!tok || !n_ids || (!text && len) || (!ids && cap))
        return UM_EINVAL;
    return um_bpe_encode(tok, text ? text : "", len, ids, cap, n_ids);
}

static int s_decode_op(void *tok, const int32_t *ids, size_t n, unsigned flags, char *out,
                       size_t cap, size_t *len)
{
    if (!tok || !len || (!ids && n))
        return UM_EINVAL;
    return s_decode(tok, ids, n, flags, out, cap, len);
}

static int s_token_to_id(void *tok, const char *piece, int32_t *id)
{
    if (!tok || !piece || !id)
        return UM_EINVAL;
    int32_t found = um_bpe_piece_find(tok, piece, strlen(piece));
    if (found < 0)
        return UM_ENOTFOUND;
    *id = found;
    return UM_OK;
}

static int s_is_special(void *tok, int32_t id)
{
    const um_bpe_t *bpe = tok;
    if (!bpe || id < 0 || id >= bpe->n_tokens)
        return 0;
    return bpe->tokens[id].special;
}

static const um_tokenizer_ops_t s_ops = {
    .struct_size = sizeof(um_tokenizer_ops_t),
    .probe = s_probe,
    .load = s_load,
    .unload = s_unload,
    .vocab_size = s_vocab_size,
    .encode = s_encode,
    .decode = s_decode_op,
    .token_to_id = s_token_to_id,
    .is_special = s_is_special,
};

static const um_plugin_desc_t s_desc = {
    .abi_major = UM_PLUGIN_ABI_MAJOR,
    .abi_minor = UM_PLUGIN_ABI_MINOR,
    .struct_size = sizeof(um_plugin_desc_t),
    .kind = UM_PLUGIN_TOKENIZER,
    .name = UM_BPE_NAME,
    .version = "1.0.0",
    .description = "byte-level BPE from tokenizer.json, encoder.json + vocab.bpe or vocab.json + "
                   "merges.txt (GPT-2, LLaMA-3, LLaDA)",
    .tokenizer = &s_ops,
};

UM_PLUGIN_EXPORT const um_plugin_desc_t *um_plugin_describe(void)
{
    return &s_desc;
}
