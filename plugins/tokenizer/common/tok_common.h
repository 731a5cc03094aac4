/*
 * Helpers shared by the WordPiece and SentencePiece tokenizer plugins: UTF-8 checking
 * and repair, a growable byte buffer and an open-addressing table from strings to ids.
 * They allocate through the host table a plugin is given at load. The header has only
 * static functions, so each shared object gets its own private copy.
 *
 * Threading: nothing here is global; a buffer or table belongs to one tokenizer.
 */
#ifndef UM_TOK_COMMON_H
#define UM_TOK_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <unmaskd/plugin.h>

/* ------------------------------------------------------------------------- */
/* UTF-8                                                                     */

/*
 * Check the UTF-8 sequence at s[0..n). Returns its length and sets *cp when it is
 * valid (no overlong forms, surrogates or code points above U+10FFFF). Otherwise
 * returns 0 and sets *bad to the length of the maximal invalid subpart: the lead byte
 * plus the continuation bytes that were still allowed, at least 1.
 */
static inline size_t um_utf8_check(const unsigned char *s, size_t n, uint32_t *cp,
                                   size_t *bad)
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

/* Decode one valid UTF-8 sequence at s[0..n) into *cp; returns its length, 0 if invalid. */
static inline size_t um_utf8_next(const unsigned char *s, size_t n, uint32_t *cp)
{
    size_t bad;
    return um_utf8_check(s, n, cp, &bad);
}

/* Return the offset of the first byte of s[0..n) that starts no valid sequence, or n. */
static inline size_t um_utf8_invalid_at(const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        if (s[i] < 0x80) {
            i++;
            continue;
        }
        uint32_t cp;
        size_t len = um_utf8_next(s + i, n - i, &cp);
        if (!len)
            return i;
        i += len;
    }
    return n;
}

/*
 * Copy src to dst, replacing each maximal invalid subpart by U+FFFD (EF BF BD), as
 * Unicode recommends and Python's "replace" error handler does. Returns the output
 * length; with dst NULL it only measures.
 */
static inline size_t um_utf8_repair(const unsigned char *src, size_t n, unsigned char *dst)
{
    size_t out = 0, i = 0;
    while (i < n) {
        uint32_t cp;
        size_t bad = 0;
        size_t len = um_utf8_check(src + i, n - i, &cp, &bad);
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

/* Write the UTF-8 form of code point cp (at most U+10FFFF) to p; returns its length. */
static inline size_t um_utf8_put(unsigned char *p, uint32_t cp)
{
    if (cp < 0x80) {
        p[0] = (unsigned char)cp;
        return 1;
    }
    if (cp < 0x800) {
        p[0] = (unsigned char)(0xC0 | cp >> 6);
        p[1] = (unsigned char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        p[0] = (unsigned char)(0xE0 | cp >> 12);
        p[1] = (unsigned char)(0x80 | (cp >> 6 & 0x3F));
        p[2] = (unsigned char)(0x80 | (cp & 0x3F));
        return 3;
    }
    p[0] = (unsigned char)(0xF0 | cp >> 18);
    p[1] = (unsigned char)(0x80 | (cp >> 12 & 0x3F));
    p[2] = (unsigned char)(0x80 | (cp >> 6 & 0x3F));
    p[3] = (unsigned char)(0x80 | (cp & 0x3F));
    return 4;
}

/* ------------------------------------------------------------------------- */
/* Growable buffer                                                           */

typedef struct um_tok_buf {
    unsigned char *data;
    size_t cap;
} um_tok_buf_t;

/* Grow buf to at least size bytes, keeping its contents. Returns 0 or UM_ENOMEM. */
static inline int um_tok_buf_reserve(const um_host_t *host, um_tok_buf_t *buf, size_t size)
{
    if (size <= buf->cap)
        return UM_OK;
    size_t cap = buf->cap ? buf->cap : 256;
    while (cap < size) {
        if (cap > SIZE_MAX / 2)
            return UM_ENOMEM;
        cap *= 2;
    }
    unsigned char *data = host->alloc(cap);
    if (!data)
        return UM_ENOMEM;
    if (buf->data) {
        memcpy(data, buf->data, buf->cap);
        host->free(buf->data);
    }
    buf->data = data;
    buf->cap = cap;
    return UM_OK;
}

static inline void um_tok_buf_free(const um_host_t *host, um_tok_buf_t *buf)
{
    if (buf->data)
        host->free(buf->data);
    buf->data = NULL;
    buf->cap = 0;
}

/* ------------------------------------------------------------------------- */
/* String table                                                              */

/* Open-addressing slot: key points into memory that outlives the table. */
typedef struct um_tok_slot {
    const char *key; /* NULL when the slot is empty */
    uint32_t key_len;
    int32_t id;
} um_tok_slot_t;

/* A table from byte strings to ids, kept at most half full. */
typedef struct um_tok_table {
    um_tok_slot_t *slots; /* (mask + 1) */
    uint32_t mask;
    uint32_t count;
} um_tok_table_t;

/* FNV-1a, 64-bit. */
static inline uint64_t um_tok_hash(const void *data, size_t len)
{
    const unsigned char *p = data;
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < len; i++) {
        h ^= p[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

/* Size the table for n keys. Returns 0 or UM_ENOMEM. */
static inline int um_tok_table_init(const um_host_t *host, um_tok_table_t *t, size_t n)
{
    size_t size = 16;
    while (size < 2 * n) {
        if (size > UINT32_MAX / 2)
            return UM_ENOMEM;
        size *= 2;
    }
    t->slots = host->alloc(size * sizeof *t->slots);
    if (!t->slots)
        return UM_ENOMEM;
    memset(t->slots, 0, size * sizeof *t->slots);
    t->mask = (uint32_t)(size - 1);
    t->count = 0;
    return UM_OK;
}

static inline void um_tok_table_free(const um_host_t *host, um_tok_table_t *t)
{
    if (t->slots)
        host->free(t->slots);
    t->slots = NULL;
}

/*
 * Map key to id. Returns -1 when the key was new, else the id it had, which id then
 * replaces only when replace is set. The caller sized the table for every key.
 */
static inline int32_t um_tok_table_put(um_tok_table_t *t, const char *key, size_t len,
                                       int32_t id, int replace)
{
    uint32_t i = (uint32_t)um_tok_hash(key, len) & t->mask;
    for (;; i = (i + 1) & t->mask) {
        um_tok_slot_t *slot = &t->slots[i];
        if (!slot->key) {
            slot->key = key;
            slot->key_len = (uint32_t)len;
            slot->id = id;
            t->count++;
            return -1;
        }
        if (slot->key_len == len && memcmp(slot->key, key, len) == 0) {
            int32_t old = slot->id;
            if (replace)
                slot->id = id;
            return old;
        }
    }
}

/* Return the id of key, or -1. */
static inline int32_t um_tok_table_get(const um_tok_table_t *t, const char *key, size_t len)
{
    if (!t->slots)
        return -1;
    uint32_t i = (uint32_t)um_tok_hash(key, len) & t->mask;
    for (;; i = (i + 1) & t->mask) {
        const um_tok_slot_t *slot = &t->slots[i];
        if (!slot->key)
            return -1;
        if (slot->key_len == len && memcmp(slot->key, key, len) == 0)
            return slot->id;
    }
}

#endif /* UM_TOK_COMMON_H */
