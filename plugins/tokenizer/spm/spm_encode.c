/*
 * Encoding text to ids with a SentencePiece BPE model, in data-flow order:
 *
 * 1. Check the UTF-8 and normalize. remove_extra_whitespaces drops leading and
 *    trailing spaces and collapses runs of spaces. add_dummy_prefix puts one space
 *    before non-empty text. escape_whitespaces writes every space as U+2581. Only
 *    U+0020 counts as a space, because the identity rule maps nothing else to it.
 * 2. Cut the text into symbols: a user-defined piece where one matches (longest
 *    first, never merged further), else one Unicode character.
 * 3. Merge: repeatedly join the adjacent pair whose joined text is a NORMAL,
 *    USER_DEFINED or UNUSED piece with the highest score, the leftmost pair on ties,
 *    until no pair joins. SentencePiece ranks merges by these piece scores, not by a
 *    merge list as GPT-2-style BPE does.
 * 4. Emit each symbol's id. A symbol that became an UNUSED piece is split back into
 *    the two parts it was last formed from. A symbol that is no piece becomes its
 *    UTF-8 bytes as <0xNN> pieces with byte_fallback, else one unknown id for each run
 *    of such symbols.
 *
 * Encoding uses the scratch buffers of the um_spm_t, so only one call at a time may
 * run per tokenizer.
 */
#include "spm.h"

#include <string.h>

/* Ids written so far; counting continues past cap so the caller learns the size needed. */
typedef struct s_sink {
    int32_t *ids;
    size_t cap;
    size_t n;
    int last_unknown; /* the last id emitted was the unknown id */
} s_sink_t;

static inline void s_emit(s_sink_t *sink, int32_t id)
{
    if (sink->n < sink->cap)
        sink->ids[sink->n] = id;
    sink->n++;
}

/* ------------------------------------------------------------------------- */
/* Normalization                                                             */

/*
 * Write the normalized form of s[0..n) to spm->norm and its length to *out_len.
 * Returns 0 or UM_ENOMEM.
 */
static int s_normalize(um_spm_t *spm, const unsigned char *s, size_t n, size_t *out_len)
{
    if (n > (SIZE_MAX - UM_SPM_SPACE_LEN) / UM_SPM_SPACE_LEN ||
        um_tok_buf_reserve(spm->host, &spm->norm, n * UM_SPM_SPACE_LEN + UM_SPM_SPACE_LEN))
        return UM_ENOMEM;

    size_t begin = 0, end = n;
    if (spm->remove_extra_whitespaces) {
        while (begin < end && s[begin] == ' ')
            begin++;
        while (end > begin && s[end - 1] == ' ')
            end--;
    }

    unsigned char *out = spm->norm.data;
    size_t len = 0;
    if (begin < end && spm->add_dummy_prefix) {
        if (spm->escape_whitespaces) {
            memcpy(out, UM_SPM_SPACE, UM_SPM_SPACE_LEN);
            len = UM_SPM_SPACE_LEN;
        } else {
            out[len++] = ' ';
        }
    }
    for (size_t i = begin; i < end; i++) {
        if (s[i] != ' ') {
            out[len++] = s[i];
            continue;
        }
        if (spm->remove_extra_whitespaces && s[i - 1] == ' ')
            continue; /* i > begin here, since s[begin] is not a space */
        if (spm->escape_whitespaces) {
            memcpy(out + len, UM_SPM_SPACE, UM_SPM_SPACE_LEN);
            len += UM_SPM_SPACE_LEN;
        } else {
            out[len++] = ' ';
        }
    }
    *out_len = len;
    return UM_OK;
}

/* ------------------------------------------------------------------------- */
/* Merging                                                                   */

/* A symbol of the text being merged, in a doubly linked list over the text. */
typedef struct s_symbol {
    uint32_t start; /* byte offset in the normalized text */
    uint32_t len;   /* bytes; 0 once merged into the symbol on its left */
    int32_t prev, next;
    int32_t frozen; /* a user-defined piece, never merged */
} s_symbol_t;

/* Candidate merge of two adjacent symbols, valid while both keep their lengths. */
typedef struct s_candidate {
    float score;
    int32_t left, right; /* symbol indices */
    uint32_t len;        /* bytes of the joined text */
    int32_t id;          /* the joined piece */
} s_candidate_t;

/* Higher score first; among equal scores the leftmost pair, as SentencePiece orders them. */
static inline int s_before(const s_candidate_t *a, const s_candidate_t *b)
{
    return a->score != b->score ? a->score > b->score : a->left < b->left;
}

static void s_heap_push(s_candidate_t *heap, size_t *n, s_candidate_t c)
{
    size_t i = (*n)++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!s_before(&c, &heap[parent]))
            break;
        heap[i] = heap[parent];
        i = parent;
    }
    heap[i] = c;
}

static s_candidate_t s_heap_pop(s_candidate_t *heap, size_t *n)
{
    s_candidate_t top = heap[0];
    s_candidate_t last = heap[--*n];
    size_t i = 0;
    for (;;) {
        size_t child = 2 * i + 1;
        if (child >= *n)
            break;
        if (child + 1 < *n && s_before(&heap[child + 1], &heap[child]))
            child++;
        if (!s_before(&heap[child], &last))
            break;
        heap[i] = heap[child];
        i = child;
    }
    if (*n > 0)
        heap[i] = last;
    return top;
}

/* Only these types take part in merges; CONTROL, UNKNOWN and BYTE pieces never do. */
static inline int s_mergeable(uint8_t type)
{
    return type == UM_SPM_NORMAL || type == UM_SPM_USER_DEFINED || type == UM_SPM_UNUSED;
}

/* The state of one merge run. */
typedef struct s_merge {
    um_spm_t *spm;
    const unsigned char *text;
    s_symbol_t *sym;
    s_candidate_t *heap;
    size_t n_heap;
    size_t n_touched; /* ids in spm->touched whose unused_split this call set */
} s_merge_t;

/* Push the merge of symbol left with its right neighbour when the joined text is a piece. */
static int s_push_pair(s_merge_t *m, int32_t left)
{
    if (left < 0)
        return UM_OK;
    const s_symbol_t *l = &m->sym[left];
    int32_t right = l->next;
    if (right < 0 || l->frozen || m->sym[right].frozen)
        return UM_OK;
    uint32_t len = l->len + m->sym[right].len;
    int32_t id = um_tok_table_get(&m->spm->table, (const char *)m->text + l->start, len);
    if (id < 0)
        return UM_OK;
    const um_spm_piece_t *piece = &m->spm->pieces[id];
    if (!s_mergeable(piece->type))
        return UM_OK;
    s_heap_push(m->heap, &m->n_heap, (s_candidate_t){piece->score, left, right, len, id});

    if (piece->type == UM_SPM_UNUSED) {
        /* Remember how the UNUSED piece splits, as the last such pair formed it. */
        um_spm_t *spm = m->spm;
        if (um_tok_buf_reserve(spm->host, &spm->touched, (m->n_touched + 1) * sizeof(int32_t)))
            return UM_ENOMEM;
        ((int32_t *)spm->touched.data)[m->n_touched++] = id;
        spm->unused_split[id] = l->len;
    }
    return UM_OK;
}

/* Find the longest user-defined piece starting at s[0..n); NULL when none does. */
static const um_spm_literal_t *s_literal_at(const um_spm_t *spm, const unsigned char *s,
                                            size_t n)
{
    int32_t count = spm->literal_count[s[0]];
    const um_spm_literal_t *lit = spm->literals + spm->literal_first[s[0]];
    for (int32_t k = 0; k < count; k++) {
        if (lit[k].len <= n && memcmp(lit[k].text, s, lit[k].len) == 0)
            return &lit[k];
    }
    return NULL;
}

/* Cut text[0..n) into symbols; returns their count. */
static int32_t s_make_symbols(const um_spm_t *spm, const unsigned char *text, size_t n,
                              s_symbol_t *sym)
{
    int32_t count = 0;
    for (size_t i = 0; i < n;) {
        const um_spm_literal_t *lit = spm->literal_count[text[i]] ? s_literal_at(spm, text + i,
                                                                                 n - i) : NULL;
        uint32_t cp = 0;
        size_t len = lit ? lit->len : um_utf8_next(text + i, n - i, &cp);
        if (len == 0)
            len = 1; /* not reached: the text was checked */
        sym[count] = (s_symbol_t){(uint32_t)i, (uint32_t)len, count - 1, -1, lit != NULL};
        if (count > 0)
            sym[count - 1].next = count;
        count++;
        i += len;
    }
    return count;
}

/* Return 1 when a new word starts at symbol i: a marker right after another character. */
static int s_word_starts(const s_merge_t *m, int32_t i)
{
    const char *marker = m->spm->escape_whitespaces ? UM_SPM_SPACE : " ";
    uint32_t marker_len = m->spm->escape_whitespaces ? UM_SPM_SPACE_LEN : 1;
    const s_symbol_t *prev = &m->sym[i - 1], *cur = &m->sym[i];
    return cur->len >= marker_len && memcmp(m->text + cur->start, marker, marker_len) == 0 &&
           (prev->len < marker_len ||
            memcmp(m->text + prev->start + prev->len - marker_len, marker, marker_len) != 0);
}

/* Merge the symbols first..end-1 until no pair of them joins. */
static int s_merge_range(s_merge_t *m, int32_t first, int32_t end)
{
    int rc;
    for (int32_t i = first; i + 1 < end; i++) {
        if ((rc = s_push_pair(m, i)))
            return rc;
    }
    while (m->n_heap > 0) {
        s_candidate_t c = s_heap_pop(m->heap, &m->n_heap);
        s_symbol_t *left = &m->sym[c.left];
        s_symbol_t *right = &m->sym[c.right];
        if (left->len == 0 || right->len == 0 || left->next != c.right ||
            left->len + right->len != c.len)
            continue; /* one of the two has merged since this was pushed */

        left->len = c.len;
        left->next = right->next;
        if (right->next >= 0)
            m->sym[right->next].prev = c.left;
        right->len = 0;

        if ((rc = s_push_pair(m, left->prev)) || (rc = s_push_pair(m, c.left)))
            return rc;
    }
    return UM_OK;
}

/*
 * Merge all symbols. With word_chunks no piece spans the start of a word, so every
 * pair across one is left out anyway and each word can be merged with its own small
 * heap: the result is the same as one heap over the whole text, only faster.
 */
static int s_merge_all(s_merge_t *m, int32_t n_symbols)
{
    if (!m->spm->word_chunks)
        return s_merge_range(m, 0, n_symbols);
    int32_t first = 0;
    for (int32_t i = 1; i <= n_symbols; i++) {
        if (i < n_symbols && !s_word_starts(m, i))
            continue;
        int rc = s_merge_range(m, first, i);
        if (rc)
            return rc;
        first = i;
    }
    return UM_OK;
}

/* ------------------------------------------------------------------------- */
/* Output                                                                    */

/* Emit the ids of the symbol text s[0..len) (step 4 of the file comment). */
static void s_emit_symbol(const um_spm_t *spm, const unsigned char *s, uint32_t len,
                          s_sink_t *sink)
{
    int32_t id = um_tok_table_get(&spm->table, (const char *)s, len);
    if (id >= 0 && spm->pieces[id].type == UM_SPM_UNUSED) {
        uint32_t left = spm->unused_split[id];
        if (left > 0 && left < len) {
            s_emit_symbol(spm, s, left, sink);
            s_emit_symbol(spm, s + left, len - left, sink);
            return;
        }
    }
    if (id >= 0 && spm->pieces[id].type != UM_SPM_UNKNOWN) {
        s_emit(sink, id);
        sink->last_unknown = 0;
        return;
    }
    if (spm->byte_fallback) {
        for (uint32_t i = 0; i < len; i++)
            s_emit(sink, spm->byte_id[s[i]]);
        sink->last_unknown = 0;
        return;
    }
    if (!sink->last_unknown)
        s_emit(sink, spm->unk_id);
    sink->last_unknown = 1;
}

int um_spm_encode(um_spm_t *spm, const char *text, size_t len, int32_t *ids, size_t cap,
                  size_t *n_ids)
{
    const unsigned char *s = (const unsigned char *)text;
    *n_ids = 0;
    size_t bad = um_utf8_invalid_at(s, len);
    if (bad < len) {
        UM_SPM_LOG(spm, UM_LOG_DEBUG, "encode: invalid UTF-8 at byte %zu of %zu (0x%02x)", bad,
                   len, s[bad]);
        return UM_EINVAL;
    }

    size_t n = 0;
    int rc = s_normalize(spm, s, len, &n);
    if (rc)
        return rc;
    if (n > INT32_MAX / 4)
        return UM_ENOMEM; /* symbol offsets and heap indices are 32-bit */
    if (um_tok_buf_reserve(spm->host, &spm->symbols, (n + 1) * sizeof(s_symbol_t)) ||
        um_tok_buf_reserve(spm->host, &spm->heap, (3 * n + 1) * sizeof(s_candidate_t)))
        return UM_ENOMEM;

    /* At most n - 1 initial pairs plus two new ones per merge, so 3n entries suffice. */
    s_merge_t m = {spm, spm->norm.data, (s_symbol_t *)spm->symbols.data,
                   (s_candidate_t *)spm->heap.data, 0, 0};
    int32_t n_symbols = s_make_symbols(spm, m.text, n, m.sym);
    rc = s_merge_all(&m, n_symbols);

    s_sink_t sink = {ids, cap, 0, 0};
    if (rc == UM_OK && n_symbols > 0) {
        /* Symbol 0 only ever absorbs symbols to its right, so the list starts there. */
        for (int32_t i = 0; i >= 0; i = m.sym[i].next)
            s_emit_symbol(spm, m.text + m.sym[i].start, m.sym[i].len, &sink);
    }
    for (size_t k = 0; k < m.n_touched; k++)
        spm->unused_split[((int32_t *)spm->touched.data)[k]] = 0;
    if (rc)
        return rc;

    *n_ids = sink.n;
    return sink.n > cap ? UM_ENOSPACE : UM_OK;
}
