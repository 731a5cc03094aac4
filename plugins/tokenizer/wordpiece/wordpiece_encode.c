/*
 * Encoding text to ids with a WordPiece vocabulary, in data-flow order. The rules
 * follow BERT's normalizer and pre-tokenizer as Hugging Face tokenizers implements
 * them (BertNormalizer, BertPreTokenizer, WordPiece):
 *
 * 1. Check the UTF-8, then cut out special tokens (longest literal match first).
 * 2. Normalize the text between them. clean_text drops NUL, U+FFFD and control
 *    characters (categories Cc, Cf, Cs, Co, Cn, except tab, line feed and carriage
 *    return) and turns whitespace into spaces. handle_chinese_chars puts spaces around
 *    CJK ideographs. strip_accents decomposes (NFD) and drops nonspacing marks (Mn).
 *    lowercase maps each character to its full lower case.
 * 3. Pre-tokenize: split at whitespace (the Unicode White_Space property), and make
 *    every punctuation character (ASCII punctuation or categories Pc, Pd, Ps, Pe, Pi,
 *    Pf, Po) a word of its own.
 * 4. WordPiece each word: a word of more than max_chars characters is the unknown
 *    token. Otherwise take the longest vocabulary entry that starts the word, then
 *    the longest "##"-prefixed entry that continues it, and so on. When no entry
 *    matches at some point, the whole word is the unknown token.
 *
 * Unicode data (categories, decompositions, case mappings) comes from libutf8proc.
 * NOTE: Hugging Face uses the Unicode tables of its Rust crates, which may be older
 * than libutf8proc's: a character assigned in a recent Unicode version can be kept here
 * but dropped there as unassigned (Cn), or the other way round.
 *
 * Encoding uses the scratch buffers of the um_wp_t, so only one call at a time may run
 * per tokenizer.
 */
#include "wordpiece.h"

#include <string.h>

#include <utf8proc.h>

/* Ids written so far; counting continues past cap so the caller learns the size needed. */
typedef struct s_sink {
    int32_t *ids;
    size_t cap;
    size_t n;
} s_sink_t;

static inline void s_emit(s_sink_t *sink, int32_t id)
{
    if (sink->n < sink->cap)
        sink->ids[sink->n] = id;
    sink->n++;
}

/* ------------------------------------------------------------------------- */
/* Character classes                                                         */

/* The Unicode White_Space property, which Rust's char::is_whitespace tests. */
static int s_is_whitespace(uint32_t c)
{
    return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
           c == 0x205F || c == 0x3000;
}

/* Control, format, surrogate, private-use and unassigned characters, but not \t \n \r. */
static int s_is_control(uint32_t c)
{
    if (c == '\t' || c == '\n' || c == '\r')
        return 0;
    switch (utf8proc_category((utf8proc_int32_t)c)) {
    case UTF8PROC_CATEGORY_CC:
    case UTF8PROC_CATEGORY_CF:
    case UTF8PROC_CATEGORY_CS:
    case UTF8PROC_CATEGORY_CO:
    case UTF8PROC_CATEGORY_CN:
        return 1;
    default:
        return 0;
    }
}

/* ASCII punctuation (which includes symbols such as $ + < = > ^ ` | ~) or category P*. */
static int s_is_punctuation(uint32_t c)
{
    if (c < 0x80)
        return (c >= 33 && c <= 47) || (c >= 58 && c <= 64) || (c >= 91 && c <= 96) ||
               (c >= 123 && c <= 126);
    switch (utf8proc_category((utf8proc_int32_t)c)) {
    case UTF8PROC_CATEGORY_PC:
    case UTF8PROC_CATEGORY_PD:
    case UTF8PROC_CATEGORY_PS:
    case UTF8PROC_CATEGORY_PE:
    case UTF8PROC_CATEGORY_PI:
    case UTF8PROC_CATEGORY_PF:
    case UTF8PROC_CATEGORY_PO:
        return 1;
    default:
        return 0;
    }
}

/* The CJK Unified Ideographs blocks and extensions that BERT surrounds with spaces. */
static int s_is_cjk(uint32_t c)
{
    return (c >= 0x4E00 && c <= 0x9FFF) || (c >= 0x3400 && c <= 0x4DBF) ||
           (c >= 0x20000 && c <= 0x2A6DF) || (c >= 0x2A700 && c <= 0x2B73F) ||
           (c >= 0x2B740 && c <= 0x2B81F) || (c >= 0x2B820 && c <= 0x2CEAF) ||
           (c >= 0xF900 && c <= 0xFAFF) || (c >= 0x2F800 && c <= 0x2FA1F);
}

/* ------------------------------------------------------------------------- */
/* Normalization                                                             */

/* Swap the two code point buffers after a pass wrote its output into cps2. */
static void s_swap(um_wp_t *wp)
{
    um_tok_buf_t tmp = wp->cps;
    wp->cps = wp->cps2;
    wp->cps2 = tmp;
}

/*
 * Clean and space out CJK: UTF-8 s[0..n) -> code points in wp->cps. The output has at
 * most n code points: every character takes at least one byte, and the ideographs that
 * get two spaces take three or four.
 */
static int s_clean(um_wp_t *wp, const unsigned char *s, size_t n, size_t *count)
{
    if (um_tok_buf_reserve(wp->host, &wp->cps, n * sizeof(uint32_t) + 1))
        return UM_ENOMEM;
    uint32_t *out = (uint32_t *)wp->cps.data;
    size_t k = 0;
    for (size_t i = 0; i < n;) {
        uint32_t c = 0;
        size_t len = um_utf8_next(s + i, n - i, &c);
        i += len ? len : 1; /* the text was checked, so len is never 0 */
        if (wp->clean_text) {
            if (c == 0 || c == 0xFFFD || s_is_control(c))
                continue;
            if (s_is_whitespace(c))
                c = ' ';
        }
        if (wp->handle_chinese_chars && s_is_cjk(c)) {
            out[k++] = ' ';
            out[k++] = c;
            out[k++] = ' ';
        } else {
            out[k++] = c;
        }
    }
    *count = k;
    return UM_OK;
}

static int s_combining_class(uint32_t c)
{
    return utf8proc_get_property((utf8proc_int32_t)c)->combining_class;
}

/*
 * NFD, then drop nonspacing marks. Each character is decomposed canonically and the
 * marks of each run are put in canonical order (stable by combining class), as NFD
 * requires, before the Mn ones are dropped.
 */
static int s_strip_accents(um_wp_t *wp, size_t *count)
{
    /* Canonical decompositions have at most 4 code points (U+1F82 has 4) in Unicode 15. */
    enum { S_DECOMP_MAX = 8 };
    size_t n = *count;
    const uint32_t *in = (const uint32_t *)wp->cps.data;
    uint32_t *out = (uint32_t *)wp->cps2.data;
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        /* Grow the output as decompositions lengthen it, keeping room for one more. */
        if ((k + S_DECOMP_MAX) * sizeof(uint32_t) > wp->cps2.cap) {
            if (um_tok_buf_reserve(wp->host, &wp->cps2, (n + k + S_DECOMP_MAX) *
                                                            sizeof(uint32_t)))
                return UM_ENOMEM;
            out = (uint32_t *)wp->cps2.data;
        }
        utf8proc_int32_t parts[S_DECOMP_MAX];
        int boundclass = 0;
        utf8proc_ssize_t m = utf8proc_decompose_char((utf8proc_int32_t)in[i], parts,
                                                     S_DECOMP_MAX, UTF8PROC_DECOMPOSE,
                                                     &boundclass);
        if (m < 1 || m > S_DECOMP_MAX) {
            out[k++] = in[i];
            continue;
        }
        for (utf8proc_ssize_t j = 0; j < m; j++) {
            /* Insertion sort by combining class within the run of marks (class > 0). */
            uint32_t c = (uint32_t)parts[j];
            int cc = s_combining_class(c);
            size_t pos = k;
            while (cc > 0 && pos > 0 && s_combining_class(out[pos - 1]) > cc) {
                out[pos] = out[pos - 1];
                pos--;
            }
            out[pos] = c;
            k++;
        }
    }

    size_t kept = 0;
    for (size_t i = 0; i < k; i++) {
        if (utf8proc_category((utf8proc_int32_t)out[i]) != UTF8PROC_CATEGORY_MN)
            out[kept++] = out[i];
    }
    *count = kept;
    s_swap(wp);
    return UM_OK;
}

/*
 * Full lower case. U+0130 (capital I with dot above) is the one character whose
 * unconditional lower case is two code points, i + U+0307; every other one maps to
 * one code point, which utf8proc_tolower returns.
 */
static int s_lowercase(um_wp_t *wp, size_t *count)
{
    size_t n = *count;
    if (um_tok_buf_reserve(wp->host, &wp->cps2, 2 * n * sizeof(uint32_t) + 1))
        return UM_ENOMEM;
    const uint32_t *in = (const uint32_t *)wp->cps.data;
    uint32_t *out = (uint32_t *)wp->cps2.data;
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        if (in[i] == 0x130) {
            out[k++] = 'i';
            out[k++] = 0x307;
        } else {
            out[k++] = (uint32_t)utf8proc_tolower((utf8proc_int32_t)in[i]);
        }
    }
    *count = k;
    s_swap(wp);
    return UM_OK;
}

/* ------------------------------------------------------------------------- */
/* WordPiece                                                                 */

/* Emit the pieces of the word cps[0..n) (step 4 of the file comment). */
static int s_encode_word(um_wp_t *wp, const uint32_t *cps, size_t n, s_sink_t *sink)
{
    if (n > (size_t)wp->max_chars) {
        s_emit(sink, wp->unk_id);
        return UM_OK;
    }
    if (um_tok_buf_reserve(wp->host, &wp->word, 4 * n) ||
        um_tok_buf_reserve(wp->host, &wp->bounds, (n + 1) * sizeof(uint32_t)) ||
        um_tok_buf_reserve(wp->host, &wp->key, wp->prefix_len + 4 * n) ||
        um_tok_buf_reserve(wp->host, &wp->pieces, n * sizeof(int32_t)))
        return UM_ENOMEM;
    unsigned char *word = wp->word.data;
    uint32_t *bounds = (uint32_t *)wp->bounds.data;
    int32_t *pieces = (int32_t *)wp->pieces.data;
    size_t bytes = 0;
    for (size_t i = 0; i < n; i++) {
        bounds[i] = (uint32_t)bytes;
        bytes += um_utf8_put(word + bytes, cps[i]);
    }
    bounds[n] = (uint32_t)bytes;

    size_t n_pieces = 0;
    for (size_t start = 0; start < n;) {
        size_t prefix = start > 0 ? wp->prefix_len : 0;
        memcpy(wp->key.data, wp->prefix, prefix);
        size_t end = n;
        while (end > start && prefix + bounds[end] - bounds[start] > wp->max_token_len)
            end--; /* no entry is that long */
        int32_t id = -1;
        for (; end > start; end--) {
            size_t len = bounds[end] - bounds[start];
            memcpy(wp->key.data + prefix, word + bounds[start], len);
            id = um_tok_table_get(&wp->table, (const char *)wp->key.data, prefix + len);
            if (id >= 0)
                break;
        }
        if (id < 0) {
            s_emit(sink, wp->unk_id);
            return UM_OK;
        }
        pieces[n_pieces++] = id;
        start = end;
    }
    for (size_t i = 0; i < n_pieces; i++)
        s_emit(sink, pieces[i]);
    return UM_OK;
}

/* Normalize, pre-tokenize and WordPiece the text s[0..n) between special tokens. */
static int s_encode_segment(um_wp_t *wp, const unsigned char *s, size_t n, s_sink_t *sink)
{
    if (n == 0)
        return UM_OK;
    size_t count = 0;
    int rc = s_clean(wp, s, n, &count);
    if (!rc && wp->strip_accents)
        rc = s_strip_accents(wp, &count);
    if (!rc && wp->lowercase)
        rc = s_lowercase(wp, &count);
    if (rc)
        return rc;

    const uint32_t *cps = (const uint32_t *)wp->cps.data;
    for (size_t i = 0; i < count && rc == UM_OK;) {
        if (s_is_whitespace(cps[i])) {
            i++;
            continue;
        }
        size_t j = i + 1;
        if (!s_is_punctuation(cps[i])) {
            while (j < count && !s_is_whitespace(cps[j]) && !s_is_punctuation(cps[j]))
                j++;
        }
        rc = s_encode_word(wp, cps + i, j - i, sink);
        i = j;
    }
    return rc;
}

/* ------------------------------------------------------------------------- */
/* Text                                                                      */

/* Find the longest special token starting at s[0..n); NULL when none does. */
static const um_wp_literal_t *s_literal_at(const um_wp_t *wp, const unsigned char *s, size_t n)
{
    int32_t count = wp->literal_count[s[0]];
    const um_wp_literal_t *lit = wp->literals + wp->literal_first[s[0]];
    for (int32_t k = 0; k < count; k++) {
        if (lit[k].len <= n && memcmp(lit[k].text, s, lit[k].len) == 0)
            return &lit[k];
    }
    return NULL;
}

int um_wp_encode(um_wp_t *wp, const char *text, size_t len, int32_t *ids, size_t cap,
                 size_t *n_ids)
{
    const unsigned char *s = (const unsigned char *)text;
    *n_ids = 0;
    size_t bad = um_utf8_invalid_at(s, len);
    if (bad < len) {
        UM_WP_LOG(wp, UM_LOG_DEBUG, "encode: invalid UTF-8 at byte %zu of %zu (0x%02x)", bad,
                  len, s[bad]);
        return UM_EINVAL;
    }

    s_sink_t sink = {ids, cap, 0};
    size_t segment = 0; /* start of the text not yet encoded */
    int rc = UM_OK;
    for (size_t pos = 0; wp->n_literals > 0 && pos < len && rc == UM_OK;) {
        const um_wp_literal_t *lit = wp->literal_count[s[pos]] ? s_literal_at(wp, s + pos,
                                                                              len - pos) : NULL;
        if (!lit) {
            pos++;
            continue;
        }
        rc = s_encode_segment(wp, s + segment, pos - segment, &sink);
        s_emit(&sink, lit->id);
        pos += lit->len;
        segment = pos;
    }
    if (rc == UM_OK)
        rc = s_encode_segment(wp, s + segment, len - segment, &sink);
    if (rc)
        return rc;

    *n_ids = sink.n;
    return sink.n > cap ? UM_ENOSPACE : UM_OK;
}
