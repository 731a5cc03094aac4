/*
 * A growable byte buffer for the gateway's text: prompts, SSE events, response
 * bodies. An allocation failure sets failed and drops later appends, so a caller
 * checks once at the end instead of after every append.
 */
#ifndef UM_GW_BUF_H
#define UM_GW_BUF_H

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct um_gw_buf {
    char *data; /* NUL-terminated while not failed */
    size_t len; /* bytes, without the NUL */
    size_t cap;
    int failed;
} um_gw_buf_t;

static inline int um_gw_buf_reserve(um_gw_buf_t *b, size_t extra)
{
    if (b->failed || extra > SIZE_MAX / 4 - b->len) {
        b->failed = 1;
        return -1;
    }
    if (b->len + extra + 1 <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra + 1)
        cap *= 2;
    char *bigger = realloc(b->data, cap);
    if (!bigger) {
        b->failed = 1;
        return -1;
    }
    b->data = bigger;
    b->cap = cap;
    return 0;
}

static inline void um_gw_buf_append(um_gw_buf_t *b, const char *s, size_t n)
{
    if (um_gw_buf_reserve(b, n) != 0)
        return;
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = '\0';
}

static inline void um_gw_buf_puts(um_gw_buf_t *b, const char *s)
{
    um_gw_buf_append(b, s, strlen(s));
}

static inline void um_gw_buf_printf(um_gw_buf_t *b, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static inline void um_gw_buf_printf(um_gw_buf_t *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0 || um_gw_buf_reserve(b, (size_t)n) != 0)
        return;
    va_start(ap, fmt);
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

/* Drop the first n bytes, keeping the rest. */
static inline void um_gw_buf_consume(um_gw_buf_t *b, size_t n)
{
    if (n >= b->len) {
        b->len = 0;
    } else {
        memmove(b->data, b->data + n, b->len - n);
        b->len -= n;
    }
    if (b->data)
        b->data[b->len] = '\0';
}

static inline void um_gw_buf_free(um_gw_buf_t *b)
{
    free(b->data);
    memset(b, 0, sizeof *b);
}

#endif /* UM_GW_BUF_H */
