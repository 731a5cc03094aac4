/*
 * Helpers the benchmark programs share: strict parsing of whole-number options and
 * JSON string output. Header-only, since each program is a single file.
 */
#ifndef UM_BENCH_UTIL_H
#define UM_BENCH_UTIL_H

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>

/*
 * Parse option `name`'s value `text` as a whole number of at least `min` into *out.
 * Prints an error that names the option, the value and the expected range, and returns
 * -1, when text is empty, has trailing characters or is out of range.
 */
static inline int um_bench_parse_int(const char *prog, const char *name, const char *text,
                                     int min, int *out)
{
    char *end = NULL;
    errno = 0;
    long v = strtol(text, &end, 10);
    /* strtol skips leading spaces and takes a sign; an option's value starts with a digit. */
    if (text[0] < '0' || text[0] > '9' || errno != 0 || *end != '\0' || v < min
        || v > INT_MAX) {
        fprintf(stderr, "%s: %s must be a whole number from %d to %d, got \"%s\"\n", prog,
                name, min, INT_MAX, text);
        return -1;
    }
    *out = (int)v;
    return 0;
}

/* Write s to f as a JSON string, quotes included, escaping what JSON requires. */
static inline void um_bench_json_string(FILE *f, const char *s)
{
    fputc('"', f);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\')
            fprintf(f, "\\%c", *p);
        else if (*p < 0x20)
            fprintf(f, "\\u%04x", *p);
        else
            fputc(*p, f);
    }
    fputc('"', f);
}

#endif /* UM_BENCH_UTIL_H */
