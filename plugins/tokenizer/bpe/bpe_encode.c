/*
 * Encoding text to ids, in data-flow order. Check the UTF-8, then cut out added
 * tokens (longest literal match first). Run the pre-tokenizer chain on the text
 * between them and turn each resulting word into ids with ranked BPE merges, through
 * a word cache. Encoding uses the scratch buffers of the um_bpe_t, so only one call
 * at a time may run per tokenizer.
 */
#include "bpe.h"

#include <string.h>

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
/* BPE on one word                                                           */

/* Symbol of the word being merged, in a doubly linked list over the word's bytes. */
typedef struct s_symbol {
    int32_t id; /* -1 once merged into the symbol on its left */
    int32_t prev, next;
} s_symbol_t;

/* Candidate merge of two adjacent symbols, valid while both still have these ids. */
typedef struct s_candidate {
    uint32_t rank;
    int32_t left, right; /* symbol indices */
    int32_t left_id, right_id, merged;
} s_candidate_t;

/* Lower rank first; among equal ranks the leftmost pair, as a left-to-right scan finds it. */
static inline int s_before(const s_candidate_t *a, const s_candidate_t *b)
{
    return a->rank != b->rank ? a->rank < b->rank : a->left < b->left;
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

/* Push the merge of symbol left with its right neighbour, if the vocabulary has one. */
static void s_push_pair(const um_bpe_t *bpe, const s_symbol_t *sym, int32_t left,
                        s_candidate_t *heap, size_t *n)
{
    if (left < 0 || sym[left].next < 0)
        return;
    int32_t right = sym[left].next;
    s_candidate_t c = {.left = left, .right = right, .left_id = sym[left].id,
                       .right_id = sym[right].id};
    if (um_bpe_merge_find(bpe, c.left_id, c.right_id, &c.rank, &c.merged))
        s_heap_push(heap, n, c);
}

/*
 * Merge the bytes of word[0..n) into tokens: start from one symbol per byte and
 * repeatedly merge the adjacent pair of lowest rank (leftmost on ties) until no pair
 * has a merge. A heap of candidates with lazy invalidation makes this O(n log n), so
 * a long word (a run of thousands of letters) costs no more than its length suggests.
 * Writes the final ids to out[0..*n_out) (room for n). Returns UM_EINVAL when a byte
 * has no token of its own in the vocabulary.
 */
static int s_bpe_word(um_bpe_t *bpe, const unsigned char *word, size_t n, int32_t *out,
                      size_t *n_out)
{
    if (n > INT32_MAX / 4)
        return UM_ENOMEM;
    if (um_bpe_buf_reserve(bpe, &bpe->symbols, n * sizeof(s_symbol_t)) ||
        um_bpe_buf_reserve(bpe, &bpe->heap, 3 * n * sizeof(s_candidate_t)))
        return UM_ENOMEM;
    s_symbol_t *sym = (s_symbol_t *)bpe->symbols.data;
    s_candidate_t *heap = (s_candidate_t *)bpe->heap.data;

    for (size_t i = 0; i < n; i++) {
        int32_t id = bpe->byte_id[word[i]];
        if (id < 0) {
            UM_BPE_LOG(bpe, UM_LOG_WARN, "encode: byte 0x%02x has no token in the vocabulary",
                       word[i]);
            return UM_EINVAL;
        }
        sym[i] = (s_symbol_t){id, (int32_t)i - 1, i + 1 < n ? (int32_t)i + 1 : -1};
    }

    /* At most n - 1 initial pairs plus two new ones per merge, so 3n entries suffice. */
    size_t n_heap = 0;
    for (size_t i = 0; i + 1 < n; i++)
        s_push_pair(bpe, sym, (int32_t)i, heap, &n_heap);

    while (n_heap > 0) {
        s_candidate_t c = s_heap_pop(heap, &n_heap);
        s_symbol_t *left = &sym[c.left];
        if (left->id != c.left_id || left->next != c.right || sym[c.right].id != c.right_id)
            continue; /* one of the two symbols has merged since this was pushed */

        left->id = c.merged;
        left->next = sym[c.right].next;
        if (left->next >= 0)
            sym[left->next].prev = c.left;
        sym[c.right].id = -1;

        s_push_pair(bpe, sym, left->prev, heap, &n_heap);
        s_push_pair(bpe, sym, c.left, heap, &n_heap);
    }

    /* Symbol 0 only ever absorbs symbols to its right, so the list starts there. */
    size_t count = 0;
    for (int32_t i = 0; i >= 0; i = sym[i].next)
        out[count++] = sym[i].id;
    *n_out = count;
    return UM_OK;
}

/* ------------------------------------------------------------------------- */
/* Words                                                                     */

/* FNV-1a, 32-bit, never 0 because 0 marks an empty cache slot. */
static uint32_t s_word_hash(const unsigned char *s, size_t n)
{
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) {
        h ^= s[i];
        h *= 16777619u;
    }
    return h ? h : 1;
}

/*
 * Find the id of the vocabulary entry that is the whole word, or -1 into *id. With
 * model.ignore_merges such a word is that one token. Returns 0 or UM_ENOMEM.
 */
static int s_whole_word_id(um_bpe_t *bpe, const unsigned char *word, size_t n, int32_t *id)
{
    if (um_bpe_buf_reserve(bpe, &bpe->text, 2 * n))
        return UM_ENOMEM; /* each byte is at most a two-byte character, up to U+0143 */
    unsigned char *p = bpe->text.data;
    for (size_t i = 0; i < n; i++) {
        uint32_t cp = um_bpe_byte_to_codepoint(word[i]);
        if (cp < 0x80) {
            *p++ = (unsigned char)cp;
        } else {
            *p++ = (unsigned char)(0xC0 | cp >> 6);
            *p++ = (unsigned char)(0x80 | (cp & 0x3F));
        }
    }
    *id = um_bpe_piece_find(bpe, (const char *)bpe->text.data, (size_t)(p - bpe->text.data));
    return UM_OK;
}

static int s_encode_word(um_bpe_t *bpe, const unsigned char *word, size_t n, s_sink_t *sink)
{
    um_bpe_cache_slot_t *slot = NULL;
    uint32_t hash = 0;
    if (n <= UM_BPE_CACHE_KEY_MAX) {
        hash = s_word_hash(word, n);
        slot = &bpe->cache[hash & (UM_BPE_CACHE_SLOTS - 1)];
        if (slot->hash == hash && slot->key_len == n && memcmp(slot->key, word, n) == 0) {
            for (int i = 0; i < slot->n_ids; i++)
                s_emit(sink, slot->ids[i]);
            return UM_OK;
        }
    }

    int32_t whole = -1;
    if (bpe->ignore_merges && s_whole_word_id(bpe, word, n, &whole))
        return UM_ENOMEM;
    int32_t single[1] = {whole};
    const int32_t *ids = single;
    size_t n_ids = 1;
    if (whole < 0) {
        /* The ids go after the symbols in the same buffer: at most one id per byte. */
        if (um_bpe_buf_reserve(bpe, &bpe->symbols, n * (sizeof(s_symbol_t) + sizeof(int32_t))))
            return UM_ENOMEM;
        int32_t *out = (int32_t *)(bpe->symbols.data + n * sizeof(s_symbol_t));
        int rc = s_bpe_word(bpe, word, n, out, &n_ids);
        if (rc)
            return rc;
        ids = out;
    }

    for (size_t i = 0; i < n_ids; i++)
        s_emit(sink, ids[i]);
    if (slot && n_ids <= UM_BPE_CACHE_IDS_MAX) {
        slot->hash = hash;
        slot->key_len = (uint8_t)n;
        slot->n_ids = (uint8_t)n_ids;
        memcpy(slot->key, word, n);
        memcpy(slot->ids, ids, n_ids * sizeof *ids);
    }
    return UM_OK;
}

/* ------------------------------------------------------------------------- */
/* Pre-tokenization                                                          */

static int s_regex_error(um_bpe_t *bpe, int level, int code)
{
    PCRE2_UCHAR message[256];
    pcre2_get_error_message(code, message, sizeof message);
    UM_BPE_LOG(bpe, UM_LOG_WARN, "encode: pre-tokenizer regex %d failed: %s", level,
               (const char *)message);
    return code == PCRE2_ERROR_NOMEMORY ? UM_ENOMEM : UM_EPLUGIN;
}

/*
 * Run pre-tokenizer steps level.. on the split s[0..n) and encode the words that
 * come out of the last step. Matches of a step's regex are words, and so is any text
 * between two matches. An empty match produces no word. The search then resumes one
 * character later, and the skipped character joins the following text.
 */
static int s_split(um_bpe_t *bpe, int level, const unsigned char *s, size_t n, s_sink_t *sink)
{
    if (n == 0)
        return UM_OK;
    if (level == bpe->n_steps)
        return s_encode_word(bpe, s, n, sink);

    um_bpe_step_t *step = &bpe->steps[level];
    if (step->prefix_space && s[0] != ' ') {
        um_bpe_buf_t *buf = &bpe->prefix[level];
        if (um_bpe_buf_reserve(bpe, buf, n + 1))
            return UM_ENOMEM;
        buf->data[0] = ' ';
        memcpy(buf->data + 1, s, n);
        s = buf->data;
        n++;
    }
    if (!step->re)
        return s_split(bpe, level + 1, s, n, sink);

    size_t start = 0, last = 0;
    int rc = UM_OK;
    while (start < n && rc == UM_OK) {
        int m = pcre2_match(step->re, s, n, start, PCRE2_NO_UTF_CHECK, step->match,
                            bpe->pcre_match);
        if (m == PCRE2_ERROR_NOMATCH)
            break;
        if (m < 0)
            return s_regex_error(bpe, level, m);

        const PCRE2_SIZE *ov = pcre2_get_ovector_pointer(step->match);
        size_t begin = ov[0], end = ov[1];
        if (end <= begin) {
            uint32_t cp;
            size_t len = um_bpe_utf8_next(s + begin, n - begin, &cp);
            start = begin + (len ? len : 1);
            continue;
        }
        if (begin > last)
            rc = s_split(bpe, level + 1, s + last, begin - last, sink);
        if (rc == UM_OK)
            rc = s_split(bpe, level + 1, s + begin, end - begin, sink);
        last = start = end;
    }
    if (rc == UM_OK && last < n)
        rc = s_split(bpe, level + 1, s + last, n - last, sink);
    return rc;
}

/* ------------------------------------------------------------------------- */
/* Text                                                                      */

/* Return the offset of the first byte of s[0..n) that starts no valid UTF-8 sequence, or n. */
static size_t s_utf8_invalid_at(const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        if (s[i] < 0x80) {
            i++;
            continue;
        }
        uint32_t cp;
        size_t len = um_bpe_utf8_next(s + i, n - i, &cp);
        if (!len)
            return i;
        i += len;
    }
    return n;
}

/* Find the longest added token starting at s[0..n); NULL when none does. */
static const um_bpe_added_t *s_added_at(const um_bpe_t *bpe, const unsigned char *s, size_t n)
{
    int32_t count = bpe->added_count[s[0]];
    const um_bpe_added_t *a = bpe->added + bpe->added_first[s[0]];
    for (int32_t k = 0; k < count; k++) {
        if (a[k].len <= n && memcmp(a[k].content, s, a[k].len) == 0)
            return &a[k];
    }
    return NULL;
}

int um_bpe_encode(um_bpe_t *bpe, const char *text, size_t len, int32_t *ids, size_t cap,
                  size_t *n_ids)
{
    const unsigned char *s = (const unsigned char *)text;
    *n_ids = 0;
    size_t bad = s_utf8_invalid_at(s, len);
    if (bad < len) {
        UM_BPE_LOG(bpe, UM_LOG_DEBUG, "encode: invalid UTF-8 at byte %zu of %zu (0x%02x)", bad,
                   len, s[bad]);
        return UM_EINVAL;
    }

    s_sink_t sink = {ids, cap, 0};
    size_t segment = 0; /* start of the text not yet encoded */
    int rc = UM_OK;
    for (size_t pos = 0; bpe->n_added > 0 && pos < len && rc == UM_OK;) {
        const um_bpe_added_t *a = bpe->added_count[s[pos]] ? s_added_at(bpe, s + pos, len - pos)
                                                           : NULL;
        if (!a) {
            pos++;
            continue;
        }
        rc = s_split(bpe, 0, s + segment, pos - segment, &sink);
        s_emit(&sink, a->id);
        pos += a->len;
        segment = pos;
    }
    if (rc == UM_OK)
        rc = s_split(bpe, 0, s + segment, len - segment, &sink);
    if (rc)
        return rc;

    *n_ids = sink.n;
    return sink.n > cap ? UM_ENOSPACE : UM_OK;
}
