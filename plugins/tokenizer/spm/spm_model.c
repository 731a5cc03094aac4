/*
 * Loading a SentencePiece tokenizer.model into a um_spm_t. The file is a serialized
 * protobuf ModelProto (sentencepiece_model.proto). A small reader here decodes the
 * wire format directly and keeps only these fields, which encoding and decoding need.
 *
 *   ModelProto      1 pieces (repeated SentencePiece), 2 trainer_spec, 3 normalizer_spec
 *   SentencePiece   1 piece (string), 2 score (float), 3 type (enum, default NORMAL)
 *   TrainerSpec     3 model_type (default UNIGRAM), 24 treat_whitespace_as_suffix,
 *                   35 byte_fallback, 41 bos_id (default 1), 42 eos_id (default 2),
 *                   43 pad_id (default -1)
 *   NormalizerSpec  1 name, 2 precompiled_charsmap, 3 add_dummy_prefix (default true),
 *                   4 remove_extra_whitespaces (default true),
 *                   5 escape_whitespaces (default true)
 *
 * Other fields are skipped. Every error names the file and the byte offset of the
 * field at fault.
 */
#include "spm.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* What a loader step needs to report an error. */
typedef struct s_ctx {
    um_spm_t *spm;
    const char *path;
    const unsigned char *base; /* start of the file, for offsets */
    char *err;
    size_t errlen;
} s_ctx_t;

/* Write "path: offset N: message" (or "path: message" when offset is SIZE_MAX). */
__attribute__((format(printf, 4, 5))) static int s_fail(const s_ctx_t *ctx, int code,
                                                          size_t offset, const char *fmt, ...)
{
    if (!ctx->err || ctx->errlen == 0)
        return code;
    int n = offset == SIZE_MAX ? snprintf(ctx->err, ctx->errlen, "%s: ", ctx->path)
                               : snprintf(ctx->err, ctx->errlen, "%s: offset %zu: ", ctx->path,
                                          offset);
    if (n >= 0 && (size_t)n < ctx->errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(ctx->err + n, ctx->errlen - (size_t)n, fmt, ap);
        va_end(ap);
    }
    return code;
}

static int s_oom(const s_ctx_t *ctx)
{
    return s_fail(ctx, UM_ENOMEM, SIZE_MAX, "out of memory while loading the tokenizer");
}

/* ------------------------------------------------------------------------- */
/* Protobuf wire format                                                      */

enum { S_WIRE_VARINT = 0, S_WIRE_I64 = 1, S_WIRE_LEN = 2, S_WIRE_I32 = 5 };

typedef struct s_reader {
    const unsigned char *p, *end;
} s_reader_t;

/* One decoded field: its number and wire type, and its value by wire type. */
typedef struct s_field {
    uint32_t number;
    uint32_t wire;
    uint64_t varint;           /* S_WIRE_VARINT */
    const unsigned char *data; /* S_WIRE_LEN, S_WIRE_I32, S_WIRE_I64 */
    size_t len;
    size_t offset; /* of the field's key, from the start of the file */
} s_field_t;

/* Read a base-128 varint of at most 10 bytes; returns 0, or -1 when cut off or too long. */
static int s_varint(s_reader_t *r, uint64_t *value)
{
    uint64_t v = 0;
    for (unsigned shift = 0; shift < 70; shift += 7) {
        if (r->p == r->end)
            return -1;
        unsigned b = *r->p++;
        v |= (uint64_t)(b & 0x7F) << shift;
        if (!(b & 0x80)) {
            *value = v;
            return 0;
        }
    }
    return -1;
}

/*
 * Read the next field of the message in r. Returns 1 with *f filled, 0 at the end of
 * the message, or a negative UM_EFORMAT after writing the reason to ctx.
 */
static int s_next_field(const s_ctx_t *ctx, s_reader_t *r, s_field_t *f, const char *message)
{
    if (r->p == r->end)
        return 0;
    f->offset = (size_t)(r->p - ctx->base);
    uint64_t key;
    if (s_varint(r, &key) != 0)
        return s_fail(ctx, UM_EFORMAT, f->offset, "%s: a field key is cut off or longer "
                      "than 10 bytes", message);
    f->number = (uint32_t)(key >> 3);
    f->wire = (uint32_t)(key & 7);
    if (f->number == 0 || key >> 32)
        return s_fail(ctx, UM_EFORMAT, f->offset, "%s: invalid field number %llu", message,
                      (unsigned long long)(key >> 3));

    size_t left;
    switch (f->wire) {
    case S_WIRE_VARINT:
        if (s_varint(r, &f->varint) != 0)
            return s_fail(ctx, UM_EFORMAT, f->offset, "%s: field %u: the varint is cut off "
                          "or longer than 10 bytes", message, f->number);
        return 1;
    case S_WIRE_I64:
    case S_WIRE_I32:
        f->len = f->wire == S_WIRE_I64 ? 8 : 4;
        break;
    case S_WIRE_LEN: {
        uint64_t len;
        if (s_varint(r, &len) != 0)
            return s_fail(ctx, UM_EFORMAT, f->offset, "%s: field %u: the length is cut off",
                          message, f->number);
        f->len = len > SIZE_MAX ? SIZE_MAX : (size_t)len;
        break;
    }
    default:
        return s_fail(ctx, UM_EFORMAT, f->offset, "%s: field %u has wire type %u; only 0, 1, "
                      "2 and 5 are valid here", message, f->number, f->wire);
    }
    left = (size_t)(r->end - r->p);
    if (f->len > left)
        return s_fail(ctx, UM_EFORMAT, f->offset, "%s: field %u claims %zu bytes but %zu "
                      "remain", message, f->number, f->len, left);
    f->data = r->p;
    r->p += f->len;
    return 1;
}

/* Check that field f of message has wire type wire. */
static int s_expect_wire(const s_ctx_t *ctx, const s_field_t *f, uint32_t wire,
                         const char *message, const char *name)
{
    if (f->wire == wire)
        return UM_OK;
    return s_fail(ctx, UM_EFORMAT, f->offset, "%s.%s (field %u) has wire type %u, expected %u",
                  message, name, f->number, f->wire, wire);
}

/* An int32 field: negative values are sign-extended to 64 bits on the wire. */
static int32_t s_int32(uint64_t v)
{
    return (int32_t)(uint32_t)v;
}

static float s_float(const unsigned char *p)
{
    uint32_t bits = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
                    (uint32_t)p[3] << 24;
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

/* ------------------------------------------------------------------------- */
/* Specs                                                                     */

typedef struct s_specs {
    uint64_t model_type; /* 1 UNIGRAM, 2 BPE, 3 WORD, 4 CHAR */
    int byte_fallback;
    int treat_whitespace_as_suffix;
    int32_t bos_id, eos_id, pad_id;
    const unsigned char *norm_name; /* (norm_name_len) */
    size_t norm_name_len;
    size_t charsmap_len;
    size_t charsmap_offset;
    int add_dummy_prefix, remove_extra_whitespaces, escape_whitespaces;
} s_specs_t;

static int s_read_trainer(const s_ctx_t *ctx, const s_field_t *spec, s_specs_t *out)
{
    static const char msg[] = "trainer_spec";
    s_reader_t r = {spec->data, spec->data + spec->len};
    s_field_t f;
    int more;
    while ((more = s_next_field(ctx, &r, &f, msg)) == 1) {
        const char *name = NULL;
        switch (f.number) {
        case 3: name = "model_type"; break;
        case 24: name = "treat_whitespace_as_suffix"; break;
        case 35: name = "byte_fallback"; break;
        case 41: name = "bos_id"; break;
        case 42: name = "eos_id"; break;
        case 43: name = "pad_id"; break;
        default: continue;
        }
        int rc = s_expect_wire(ctx, &f, S_WIRE_VARINT, msg, name);
        if (rc)
            return rc;
        switch (f.number) {
        case 3: out->model_type = f.varint; break;
        case 24: out->treat_whitespace_as_suffix = f.varint != 0; break;
        case 35: out->byte_fallback = f.varint != 0; break;
        case 41: out->bos_id = s_int32(f.varint); break;
        case 42: out->eos_id = s_int32(f.varint); break;
        default: out->pad_id = s_int32(f.varint); break;
        }
    }
    return more;
}

static int s_read_normalizer(const s_ctx_t *ctx, const s_field_t *spec, s_specs_t *out)
{
    static const char msg[] = "normalizer_spec";
    s_reader_t r = {spec->data, spec->data + spec->len};
    s_field_t f;
    int more, rc;
    while ((more = s_next_field(ctx, &r, &f, msg)) == 1) {
        switch (f.number) {
        case 1:
            if ((rc = s_expect_wire(ctx, &f, S_WIRE_LEN, msg, "name")))
                return rc;
            out->norm_name = f.data;
            out->norm_name_len = f.len;
            break;
        case 2:
            if ((rc = s_expect_wire(ctx, &f, S_WIRE_LEN, msg, "precompiled_charsmap")))
                return rc;
            out->charsmap_len = f.len;
            out->charsmap_offset = f.offset;
            break;
        case 3:
        case 4:
        case 5:
            if ((rc = s_expect_wire(ctx, &f, S_WIRE_VARINT, msg, f.number == 3 ?
                                    "add_dummy_prefix" : f.number == 4 ?
                                    "remove_extra_whitespaces" : "escape_whitespaces")))
                return rc;
            if (f.number == 3)
                out->add_dummy_prefix = f.varint != 0;
            else if (f.number == 4)
                out->remove_extra_whitespaces = f.varint != 0;
            else
                out->escape_whitespaces = f.varint != 0;
            break;
        default:
            break;
        }
    }
    return more;
}

/*
 * Walk the top level of the ModelProto: count the pieces and read both specs.
 * Returns 0 or UM_EFORMAT.
 */
static int s_read_top(const s_ctx_t *ctx, const unsigned char *data, size_t size,
                      int32_t *n_pieces, s_specs_t *specs)
{
    *specs = (s_specs_t){.model_type = 1, .bos_id = 1, .eos_id = 2, .pad_id = -1,
                         .add_dummy_prefix = 1, .remove_extra_whitespaces = 1,
                         .escape_whitespaces = 1};
    s_reader_t r = {data, data + size};
    s_field_t f;
    int more, rc;
    size_t count = 0;
    while ((more = s_next_field(ctx, &r, &f, "ModelProto")) == 1) {
        if (f.number == 1) {
            if ((rc = s_expect_wire(ctx, &f, S_WIRE_LEN, "ModelProto", "pieces")))
                return rc;
            if (++count > INT32_MAX / 2)
                return s_fail(ctx, UM_EFORMAT, f.offset, "more than %d pieces", INT32_MAX / 2);
        } else if (f.number == 2) {
            if ((rc = s_expect_wire(ctx, &f, S_WIRE_LEN, "ModelProto", "trainer_spec")) ||
                (rc = s_read_trainer(ctx, &f, specs)))
                return rc;
        } else if (f.number == 3) {
            if ((rc = s_expect_wire(ctx, &f, S_WIRE_LEN, "ModelProto", "normalizer_spec")) ||
                (rc = s_read_normalizer(ctx, &f, specs)))
                return rc;
        }
    }
    if (more < 0)
        return more;
    *n_pieces = (int32_t)count;
    return UM_OK;
}

/* ------------------------------------------------------------------------- */
/* Pieces                                                                    */

/* Parse "<0xHH>" (upper-case hex, as SentencePiece writes it) into *byte. */
static int s_byte_piece_value(const char *text, uint32_t len, uint8_t *byte)
{
    static const char hex[] = "0123456789ABCDEF";
    if (len != 6 || memcmp(text, "<0x", 3) != 0 || text[5] != '>')
        return -1;
    const char *hi = memchr(hex, text[3], 16), *lo = memchr(hex, text[4], 16);
    if (!hi || !lo)
        return -1;
    *byte = (uint8_t)((hi - hex) << 4 | (lo - hex));
    return 0;
}

/* Decode one SentencePiece message (field f of the ModelProto) into piece id. */
static int s_read_piece(const s_ctx_t *ctx, const s_field_t *f, int32_t id, char **strings)
{
    um_spm_t *spm = ctx->spm;
    um_spm_piece_t *p = &spm->pieces[id];
    s_reader_t r = {f->data, f->data + f->len};
    s_field_t g;
    int more, rc;
    const unsigned char *text = NULL;
    size_t len = 0;
    uint64_t type = UM_SPM_NORMAL;
    p->score = 0.0f;
    while ((more = s_next_field(ctx, &r, &g, "SentencePiece")) == 1) {
        if (g.number == 1) {
            if ((rc = s_expect_wire(ctx, &g, S_WIRE_LEN, "SentencePiece", "piece")))
                return rc;
            text = g.data;
            len = g.len;
        } else if (g.number == 2) {
            if ((rc = s_expect_wire(ctx, &g, S_WIRE_I32, "SentencePiece", "score")))
                return rc;
            p->score = s_float(g.data);
        } else if (g.number == 3) {
            if ((rc = s_expect_wire(ctx, &g, S_WIRE_VARINT, "SentencePiece", "type")))
                return rc;
            type = g.varint;
        }
    }
    if (more < 0)
        return more;

    if (!text || len == 0)
        return s_fail(ctx, UM_EFORMAT, f->offset, "piece %d has no text", (int)id);
    if (len > UINT32_MAX / 2 || memchr(text, '\0', len) ||
        um_utf8_invalid_at(text, len) != len)
        return s_fail(ctx, UM_EFORMAT, f->offset, "piece %d is not valid UTF-8 text without "
                      "NUL bytes", (int)id);
    if (type < UM_SPM_NORMAL || type > UM_SPM_BYTE)
        return s_fail(ctx, UM_EFORMAT, f->offset, "piece %d (\"%.*s\") has type %llu; "
                      "valid types are 1 to 6", (int)id, (int)(len > 60 ? 60 : len), text,
                      (unsigned long long)type);

    memcpy(*strings, text, len);
    (*strings)[len] = '\0';
    p->text = *strings;
    p->len = (uint32_t)len;
    p->type = (uint8_t)type;
    *strings += len + 1;

    if (p->type == UM_SPM_BYTE && s_byte_piece_value(p->text, p->len, &p->byte) != 0)
        return s_fail(ctx, UM_EFORMAT, f->offset, "piece %d \"%s\" has type BYTE but is not "
                      "of the form <0xHH>", (int)id, p->text);

    int32_t other = um_tok_table_put(&spm->table, p->text, p->len, id, 0);
    if (other >= 0)
        return s_fail(ctx, UM_EFORMAT, f->offset, "piece %d \"%.60s\" repeats piece %d",
                      (int)id, p->text, (int)other);
    return UM_OK;
}

static int s_compare_literals(const void *a, const void *b)
{
    const um_spm_literal_t *x = a, *y = b;
    unsigned char fx = (unsigned char)x->text[0], fy = (unsigned char)y->text[0];
    if (fx != fy)
        return fx < fy ? -1 : 1;
    if (x->len != y->len)
        return x->len > y->len ? -1 : 1; /* longest first */
    return x->id < y->id ? -1 : x->id > y->id;
}

/*
 * Read every piece, then derive the byte table, the unknown piece and the
 * user-defined literals from the types.
 */
static int s_read_pieces(const s_ctx_t *ctx, const unsigned char *data, size_t size,
                         int32_t n_pieces)
{
    um_spm_t *spm = ctx->spm;
    const um_host_t *host = spm->host;
    spm->pieces = host->alloc((size_t)n_pieces * sizeof *spm->pieces);
    spm->strings = host->alloc(size + (size_t)n_pieces);
    spm->unused_split = host->alloc((size_t)n_pieces * sizeof *spm->unused_split);
    if (!spm->pieces || !spm->strings || !spm->unused_split ||
        um_tok_table_init(host, &spm->table, (size_t)n_pieces))
        return s_oom(ctx);
    memset(spm->pieces, 0, (size_t)n_pieces * sizeof *spm->pieces);
    memset(spm->unused_split, 0, (size_t)n_pieces * sizeof *spm->unused_split);
    spm->n_pieces = n_pieces;

    char *strings = spm->strings;
    s_reader_t r = {data, data + size};
    s_field_t f;
    int32_t id = 0;
    int more, rc;
    while ((more = s_next_field(ctx, &r, &f, "ModelProto")) == 1) {
        if (f.number != 1)
            continue;
        if ((rc = s_read_piece(ctx, &f, id++, &strings)))
            return rc;
    }
    if (more < 0)
        return more;

    int32_t n_literals = 0;
    spm->unk_id = -1;
    for (int b = 0; b < 256; b++)
        spm->byte_id[b] = -1;
    for (id = 0; id < n_pieces; id++) {
        const um_spm_piece_t *p = &spm->pieces[id];
        if (p->type == UM_SPM_UNKNOWN && spm->unk_id < 0)
            spm->unk_id = id;
        else if (p->type == UM_SPM_BYTE && spm->byte_id[p->byte] < 0)
            spm->byte_id[p->byte] = id;
        else if (p->type == UM_SPM_USER_DEFINED)
            n_literals++;
    }
    if (n_literals == 0)
        return UM_OK;

    spm->literals = host->alloc((size_t)n_literals * sizeof *spm->literals);
    if (!spm->literals)
        return s_oom(ctx);
    for (id = 0; id < n_pieces; id++) {
        const um_spm_piece_t *p = &spm->pieces[id];
        if (p->type == UM_SPM_USER_DEFINED)
            spm->literals[spm->n_literals++] = (um_spm_literal_t){p->text, p->len, id};
    }
    qsort(spm->literals, (size_t)spm->n_literals, sizeof *spm->literals, s_compare_literals);
    for (int32_t k = spm->n_literals - 1; k >= 0; k--) {
        unsigned char first = (unsigned char)spm->literals[k].text[0];
        spm->literal_first[first] = k;
        spm->literal_count[first]++;
    }
    return UM_OK;
}

/* ------------------------------------------------------------------------- */
/* The whole file                                                            */

/* Read the file at path into a host buffer; *rc and the message explain a failure. */
static unsigned char *s_read_file(const s_ctx_t *ctx, const um_host_t *host, size_t *size,
                                  int *rc)
{
    FILE *f = fopen(ctx->path, "rb");
    if (!f) {
        int missing = errno == ENOENT;
        *rc = s_fail(ctx, missing ? UM_ENOTFOUND : UM_EIO, SIZE_MAX, "%s",
                     missing ? "not found: the model folder needs a tokenizer.model"
                             : strerror(errno));
        return NULL;
    }
    unsigned char *data = NULL;
    long end = -1;
    if (fseek(f, 0, SEEK_END) == 0)
        end = ftell(f);
    if (end < 0 || fseek(f, 0, SEEK_SET) != 0) {
        *rc = s_fail(ctx, UM_EIO, SIZE_MAX, "cannot be read: %s", strerror(errno));
    } else if ((unsigned long)end > UM_SPM_MAX_FILE) {
        *rc = s_fail(ctx, UM_EFORMAT, SIZE_MAX, "is %ld bytes, more than the %u a "
                     "SentencePiece model may have here", end, UM_SPM_MAX_FILE);
    } else if (!(data = host->alloc((size_t)end + 1))) {
        *rc = s_oom(ctx);
    } else if (fread(data, 1, (size_t)end, f) != (size_t)end) {
        *rc = s_fail(ctx, UM_EIO, SIZE_MAX, "cannot be read: %s", strerror(errno));
        host->free(data);
        data = NULL;
    } else {
        *size = (size_t)end;
    }
    fclose(f);
    return data;
}

static const char *s_model_type_name(uint64_t type)
{
    switch (type) {
    case 1: return "UNIGRAM";
    case 2: return "BPE";
    case 3: return "WORD";
    case 4: return "CHAR";
    default: return "unknown";
    }
}

/* Reject what this plugin cannot run, with the reason. */
static int s_check_specs(const s_ctx_t *ctx, const s_specs_t *specs)
{
    if (specs->model_type != 2)
        return s_fail(ctx, UM_EUNSUPPORTED, SIZE_MAX, "trainer_spec.model_type is %s (%llu); "
                      "this plugin runs only BPE (2) models", s_model_type_name(specs->model_type),
                      (unsigned long long)specs->model_type);
    if (specs->charsmap_len > 0)
        return s_fail(ctx, UM_EUNSUPPORTED, specs->charsmap_offset, "normalizer_spec uses the "
                      "rule \"%.*s\" with a precompiled character map of %zu bytes; only the "
                      "identity rule (no map) is supported", (int)(specs->norm_name_len > 40 ?
                      40 : specs->norm_name_len), (const char *)specs->norm_name,
                      specs->charsmap_len);
    if (specs->treat_whitespace_as_suffix)
        return s_fail(ctx, UM_EUNSUPPORTED, SIZE_MAX, "trainer_spec.treat_whitespace_as_suffix "
                      "is true; only the space marker as a prefix is supported");
    return UM_OK;
}

/*
 * Decide spm->word_chunks: scan every piece that takes part in merges for a space
 * marker (U+2581, or a space without escape_whitespaces) right after another character.
 */
static int s_word_chunks(const um_spm_t *spm)
{
    const char *marker = spm->escape_whitespaces ? UM_SPM_SPACE : " ";
    size_t marker_len = spm->escape_whitespaces ? UM_SPM_SPACE_LEN : 1;
    for (int32_t id = 0; id < spm->n_pieces; id++) {
        const um_spm_piece_t *p = &spm->pieces[id];
        if (p->type == UM_SPM_UNUSED)
            return 0;
        if (p->type != UM_SPM_NORMAL && p->type != UM_SPM_USER_DEFINED)
            continue;
        int after_other = 0; /* the previous character was no marker */
        for (size_t i = 0; i < p->len;) {
            if (p->len - i >= marker_len && memcmp(p->text + i, marker, marker_len) == 0) {
                if (after_other)
                    return 0;
                i += marker_len;
                continue;
            }
            uint32_t cp;
            size_t n = um_utf8_next((const unsigned char *)p->text + i, p->len - i, &cp);
            i += n ? n : 1;
            after_other = 1;
        }
    }
    return 1;
}

/* Take the special ids of the trainer spec when they name a piece, else -1. */
static int32_t s_special_id(const um_spm_t *spm, int32_t id)
{
    return id >= 0 && id < spm->n_pieces ? id : -1;
}

int um_spm_load_model(um_spm_t *spm, const char *path, char *err, size_t errlen)
{
    s_ctx_t ctx = {spm, path, NULL, err, errlen};
    int rc = UM_OK;
    size_t size = 0;
    unsigned char *data = s_read_file(&ctx, spm->host, &size, &rc);
    if (!data)
        return rc;
    ctx.base = data;

    int32_t n_pieces = 0;
    s_specs_t specs;
    rc = s_read_top(&ctx, data, size, &n_pieces, &specs);
    if (!rc && n_pieces == 0)
        rc = s_fail(&ctx, UM_EFORMAT, SIZE_MAX, "has no pieces; is it a SentencePiece model?");
    if (!rc)
        rc = s_check_specs(&ctx, &specs);
    if (!rc)
        rc = s_read_pieces(&ctx, data, size, n_pieces);
    if (!rc && spm->unk_id < 0)
        rc = s_fail(&ctx, UM_EFORMAT, SIZE_MAX, "no piece has type UNKNOWN; SentencePiece "
                    "models need one for text the vocabulary cannot spell");
    if (!rc && specs.byte_fallback) {
        for (int b = 0; b < 256 && !rc; b++) {
            if (spm->byte_id[b] < 0)
                rc = s_fail(&ctx, UM_EFORMAT, SIZE_MAX, "trainer_spec.byte_fallback is true "
                            "but the byte piece <0x%02X> is missing", b);
        }
    }
    if (!rc) {
        spm->byte_fallback = specs.byte_fallback;
        spm->add_dummy_prefix = specs.add_dummy_prefix;
        spm->remove_extra_whitespaces = specs.remove_extra_whitespaces;
        spm->escape_whitespaces = specs.escape_whitespaces;
        spm->bos_id = s_special_id(spm, specs.bos_id);
        spm->eos_id = s_special_id(spm, specs.eos_id);
        spm->pad_id = s_special_id(spm, specs.pad_id);
        spm->word_chunks = s_word_chunks(spm);
    }
    spm->host->free(data);
    return rc;
}

int um_spm_probe_model(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return 0;
    unsigned char *data = NULL;
    long end = -1;
    if (fseek(f, 0, SEEK_END) == 0)
        end = ftell(f);
    if (end > 0 && (unsigned long)end <= UM_SPM_MAX_FILE && fseek(f, 0, SEEK_SET) == 0) {
        data = malloc((size_t)end);
        if (data && fread(data, 1, (size_t)end, f) != (size_t)end) {
            free(data);
            data = NULL;
        }
    }
    fclose(f);
    if (!data)
        return 0;

    s_ctx_t ctx = {NULL, path, data, NULL, 0};
    int32_t n_pieces = 0;
    s_specs_t specs;
    int score = 0;
    if (s_read_top(&ctx, data, (size_t)end, &n_pieces, &specs) == UM_OK && n_pieces > 0)
        score = specs.model_type == 2 ? 85 : 10;
    free(data);
    return score;
}
