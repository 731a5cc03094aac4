/*
 * Tests of the byte-level BPE tokenizer plugin (build-plugins/bpe.so), loaded with
 * dlopen and driven through its descriptor and a host table of this file, the way
 * the daemon drives it.
 *
 * The cases cover the descriptor and probe, and the fixture texts whose ids the
 * Python reference (tools/um_tokenizer.py) wrote. Others check the buffer protocol
 * of encode and decode, special tokens, invalid input, the load errors of malformed
 * tokenizer.json files and features on small vocabularies written here. When
 * UNMASKD_DATA names the shared data folder, the TinyStories text and GPT-2's real
 * vocabulary are checked too.
 */
#include <dlfcn.h>
#include <errno.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <unmaskd/plugin.h>

#include "testutil.h"

/* ------------------------------------------------------------------------- */
/* Host table and plugin loading                                             */

static long s_live_blocks; /* host allocations not yet freed */
static char s_last_log[1024]; /* the last warning or error the plugin logged */

/* Keep the last warning or error for tests to inspect; print errors. */
static void s_host_log(int level, const char *plugin, const char *fmt, ...)
{
    if (level < UM_LOG_WARN)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(s_last_log, sizeof s_last_log, fmt, ap);
    va_end(ap);
    if (level >= UM_LOG_ERROR)
        fprintf(stderr, "%s: %s\n", plugin, s_last_log);
}

static void *s_host_alloc(size_t size)
{
    void *p = malloc(size);
    if (p)
        s_live_blocks++;
    return p;
}

static void s_host_free(void *ptr)
{
    if (ptr)
        s_live_blocks--;
    free(ptr);
}

static const um_host_t s_host = {
    .struct_size = sizeof(um_host_t),
    .log = s_host_log,
    .alloc = s_host_alloc,
    .free = s_host_free,
};

static void *s_handle;
static const um_plugin_desc_t *s_desc;
static const um_tokenizer_ops_t *s_ops;

static void s_plugin_open(void)
{
    const char *path = um_test_path(um_test_env("UM_TEST_PLUGINS"), "bpe.so");
    s_handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    ck_assert_msg(s_handle != NULL, "dlopen %s failed: %s", path, dlerror());
    um_plugin_describe_fn describe = (um_plugin_describe_fn)dlsym(s_handle, UM_PLUGIN_ENTRY);
    ck_assert_msg(describe != NULL, "%s does not export %s", path, UM_PLUGIN_ENTRY);
    s_desc = describe();
    ck_assert_ptr_nonnull(s_desc);
    s_ops = s_desc->tokenizer;
    ck_assert_ptr_nonnull(s_ops);
}

static void s_plugin_close(void)
{
    if (s_handle)
        dlclose(s_handle);
    s_handle = NULL;
    s_desc = NULL;
    s_ops = NULL;
}

/* Load the tokenizer of dir; fails the test with the plugin's message on error. */
static void *s_load(const char *dir)
{
    char err[1024] = "";
    void *tok = NULL;
    int rc = s_ops->load(&s_host, dir, &tok, err, sizeof err);
    ck_assert_msg(rc == UM_OK, "loading the tokenizer of %s failed: %s (%s)", dir, err,
                  um_error_name(rc));
    ck_assert_ptr_nonnull(tok);
    return tok;
}

/* Encode text into a malloc'ed array; fails the test on error. */
static int32_t *s_encode(void *tok, const char *text, size_t len, size_t *n)
{
    size_t cap = len + 16;
    int32_t *ids = malloc(cap * sizeof *ids);
    ck_assert_ptr_nonnull(ids);
    int rc = s_ops->encode(tok, text, len, ids, cap, n);
    ck_assert_msg(rc == UM_OK, "encode of %zu bytes returned %s", len, um_error_name(rc));
    return ids;
}

/* Decode ids into a malloc'ed string, sizing it with the UM_ENOSPACE protocol. */
static char *s_decode(void *tok, const int32_t *ids, size_t n, unsigned flags, size_t *len)
{
    size_t need = 0;
    int rc = s_ops->decode(tok, ids, n, flags, NULL, 0, &need);
    ck_assert_msg(rc == UM_ENOSPACE, "decode with no buffer returned %s, expected UM_ENOSPACE",
                  um_error_name(rc));
    char *out = malloc(need + 1);
    ck_assert_ptr_nonnull(out);
    rc = s_ops->decode(tok, ids, n, flags, out, need + 1, len);
    ck_assert_msg(rc == UM_OK, "decode of %zu ids returned %s", n, um_error_name(rc));
    ck_assert_uint_eq(*len, need);
    return out;
}

/* Check that text encodes to expected[0..n_expected) and decodes back to itself. */
static void s_check_text(void *tok, const char *label, const char *text, size_t len,
                         const int32_t *expected, size_t n_expected)
{
    size_t n = 0;
    int32_t *ids = s_encode(tok, text, len, &n);
    if (expected) {
        ck_assert_msg(n == n_expected, "%s: encoded to %zu ids, expected %zu", label, n,
                      n_expected);
        for (size_t i = 0; i < n; i++)
            ck_assert_msg(ids[i] == expected[i], "%s: id %zu is %d, expected %d", label, i,
                          (int)ids[i], (int)expected[i]);
    }
    size_t out_len = 0;
    char *out = s_decode(tok, ids, n, 0, &out_len);
    ck_assert_msg(out_len == len && memcmp(out, text, len) == 0,
                  "%s: decoded %zu bytes \"%.80s\", expected %zu bytes \"%.80s\"", label,
                  out_len, out, len, text);
    free(out);
    free(ids);
}

static int32_t s_id(void *tok, const char *piece)
{
    int32_t id = -1;
    int rc = s_ops->token_to_id(tok, piece, &id);
    ck_assert_msg(rc == UM_OK, "token_to_id(\"%s\") returned %s", piece, um_error_name(rc));
    return id;
}

/* ------------------------------------------------------------------------- */
/* Temporary model folders                                                   */

static char s_tmpdir[512];

static void s_tmpdir_create(void)
{
    const char *base = getenv("TMPDIR");
    snprintf(s_tmpdir, sizeof s_tmpdir, "%s/um-tokenizer-XXXXXX", base && *base ? base : "/tmp");
    ck_assert_msg(mkdtemp(s_tmpdir) != NULL, "mkdtemp %s failed: %s", s_tmpdir,
                  strerror(errno));
}

static void s_tmpdir_remove(void)
{
    if (!s_tmpdir[0])
        return;
    unlink(um_test_path(s_tmpdir, "tokenizer.json"));
    rmdir(s_tmpdir);
    s_tmpdir[0] = '\0';
}

static void s_write_text(const char *text)
{
    const char *path = um_test_path(s_tmpdir, "tokenizer.json");
    FILE *f = fopen(path, "wb");
    ck_assert_msg(f != NULL, "cannot write %s: %s", path, strerror(errno));
    fputs(text, f);
    fclose(f);
}

static void s_write_doc(json_t *doc)
{
    const char *path = um_test_path(s_tmpdir, "tokenizer.json");
    ck_assert_msg(json_dump_file(doc, path, 0) == 0, "cannot write %s", path);
}

/*
 * Write the piece GPT-2's byte-to-unicode map gives byte b. It is built by counting,
 * as GPT-2's encoder builds it: printable bytes keep their value and the rest take
 * U+0100 upwards in order. The plugin uses a closed form instead.
 */
static void s_byte_piece(unsigned b, char out[3])
{
    unsigned next = 256, cp = 0;
    for (unsigned v = 0; v <= b; v++) {
        int printable = (v >= '!' && v <= '~') || (v >= 0xA1 && v <= 0xAC) || v >= 0xAE;
        cp = printable ? v : next++;
    }
    if (cp < 0x80) {
        out[0] = (char)cp;
        out[1] = '\0';
    } else {
        out[0] = (char)(0xC0 | cp >> 6);
        out[1] = (char)(0x80 | (cp & 0x3F));
        out[2] = '\0';
    }
}

/*
 * Build a small byte-level tokenizer.json: the 256 byte pieces (id = byte value), no
 * merges or added tokens, and pre_tokenizer, whose reference the document takes.
 */
static json_t *s_tiny_doc(json_t *pre_tokenizer)
{
    json_t *vocab = json_object();
    for (unsigned b = 0; b < 256; b++) {
        char piece[3];
        s_byte_piece(b, piece);
        json_object_set_new(vocab, piece, json_integer(b));
    }
    json_t *model = json_pack("{s:s, s:o, s:[]}", "type", "BPE", "vocab", vocab, "merges");
    return json_pack("{s:o, s:[], s:o, s:{s:s}}", "model", model, "added_tokens",
                     "pre_tokenizer", pre_tokenizer, "decoder", "type", "ByteLevel");
}

static json_t *s_byte_level(int add_prefix_space, int use_regex)
{
    return json_pack("{s:s, s:b, s:b, s:b}", "type", "ByteLevel", "add_prefix_space",
                     add_prefix_space, "trim_offsets", 1, "use_regex", use_regex);
}

/* Add piece a+b to the vocabulary (if new) and the merge "a b"; returns the piece's id. */
static int32_t s_tiny_merge(json_t *doc, const char *a, const char *b)
{
    json_t *model = json_object_get(doc, "model");
    json_t *vocab = json_object_get(model, "vocab");
    char joined[64];
    snprintf(joined, sizeof joined, "%s%s", a, b);
    if (!json_object_get(vocab, joined))
        json_object_set_new(vocab, joined, json_integer((json_int_t)json_object_size(vocab)));
    char merge[64];
    snprintf(merge, sizeof merge, "%s %s", a, b);
    json_array_append_new(json_object_get(model, "merges"), json_string(merge));
    return (int32_t)json_integer_value(json_object_get(vocab, joined));
}

static int32_t s_tiny_added(json_t *doc, const char *content, int special)
{
    json_t *vocab = json_object_get(json_object_get(doc, "model"), "vocab");
    json_t *added = json_object_get(doc, "added_tokens");
    int32_t id = (int32_t)(json_object_size(vocab) + json_array_size(added));
    json_array_append_new(added, json_pack("{s:i, s:s, s:b}", "id", (int)id, "content", content,
                                           "special", special));
    return id;
}

/* Write doc into the temporary folder, load it and release doc. */
static void *s_load_doc(json_t *doc)
{
    s_write_doc(doc);
    json_decref(doc);
    return s_load(s_tmpdir);
}

/* ------------------------------------------------------------------------- */
/* Descriptor and probe                                                      */

START_TEST(test_descriptor_fields)
{
    ck_assert_uint_eq(s_desc->abi_major, UM_PLUGIN_ABI_MAJOR);
    ck_assert_uint_eq(s_desc->abi_minor, UM_PLUGIN_ABI_MINOR);
    ck_assert_uint_eq(s_desc->struct_size, sizeof(um_plugin_desc_t));
    ck_assert_uint_eq(s_desc->kind, UM_PLUGIN_TOKENIZER);
    ck_assert_str_eq(s_desc->name, "bpe");
    ck_assert_ptr_null(s_desc->remask);
    ck_assert_uint_eq(s_ops->struct_size, sizeof(um_tokenizer_ops_t));
    ck_assert_ptr_nonnull(s_ops->probe);
    ck_assert_ptr_nonnull(s_ops->load);
    ck_assert_ptr_nonnull(s_ops->unload);
    ck_assert_ptr_nonnull(s_ops->vocab_size);
    ck_assert_ptr_nonnull(s_ops->encode);
    ck_assert_ptr_nonnull(s_ops->decode);
    ck_assert_ptr_nonnull(s_ops->token_to_id);
    ck_assert_ptr_nonnull(s_ops->is_special);
}
END_TEST

START_TEST(test_probe_scores)
{
    ck_assert_int_eq(s_ops->probe(um_test_env("UM_TEST_MODEL")), 90);
    ck_assert_int_eq(s_ops->probe("/nonexistent/model/folder"), 0);

    s_tmpdir_create();
    s_write_text("{\"model\": {\"type\": \"WordPiece\", \"vocab\": {}}, "
                 "\"pre_tokenizer\": {\"type\": \"BertPreTokenizer\"}}");
    ck_assert_int_eq(s_ops->probe(s_tmpdir), 0);
    s_write_text("{\"model\": {\"type\": \"BPE\"}, \"pre_tokenizer\": {\"type\": \"Metaspace\"}, "
                 "\"decoder\": {\"type\": \"Sequence\", \"decoders\": [{\"type\": \"ByteLevel\"}]}}");
    ck_assert_int_eq(s_ops->probe(s_tmpdir), 90);
    s_write_text("not json");
    ck_assert_int_eq(s_ops->probe(s_tmpdir), 0);
    s_tmpdir_remove();
}
END_TEST

/* ------------------------------------------------------------------------- */
/* The bundled TinyStories tokenizer                                         */

static void *s_tok; /* loaded once per TCase by the unchecked fixture */

static void s_tinystories_setup(void)
{
    s_plugin_open();
    s_tok = s_load(um_test_env("UM_TEST_MODEL"));
}

static void s_tinystories_teardown(void)
{
    if (s_tok)
        s_ops->unload(s_tok);
    s_tok = NULL;
    s_plugin_close();
}

START_TEST(test_fixture_cases)
{
    const char *path = um_test_path(um_test_env("UM_TEST_FIXTURES"), "tokenizer.json");
    json_error_t jerr;
    json_t *doc = json_load_file(path, JSON_ALLOW_NUL, &jerr);
    ck_assert_msg(doc != NULL, "%s: %s", path, jerr.text);
    json_t *cases = json_object_get(doc, "cases");
    ck_assert_msg(json_array_size(cases) >= 10, "%s has %zu cases, expected at least 10", path,
                  json_array_size(cases));

    /* The second pass finds every word in the cache, so both paths are compared. */
    for (int pass = 0; pass < 2; pass++) {
        size_t i;
        json_t *c;
        json_array_foreach(cases, i, c) {
            json_t *text = json_object_get(c, "text");
            json_t *ids = json_object_get(c, "ids");
            ck_assert(json_is_string(text) && json_is_array(ids));
            size_t n = json_array_size(ids);
            int32_t *expected = malloc((n + 1) * sizeof *expected);
            for (size_t k = 0; k < n; k++)
                expected[k] = (int32_t)json_integer_value(json_array_get(ids, k));
            char label[64];
            snprintf(label, sizeof label, "case %zu, pass %d", i, pass);
            s_check_text(s_tok, label, json_string_value(text), json_string_length(text),
                         expected, n);
            free(expected);
        }
    }
    json_decref(doc);
}
END_TEST

START_TEST(test_vocabulary_queries)
{
    ck_assert_int_eq(s_ops->vocab_size(s_tok), 4096);
    ck_assert_int_eq(s_id(s_tok, "<|endoftext|>"), 4094);
    ck_assert_int_eq(s_id(s_tok, "<|mdm_mask|>"), 4095);
    ck_assert_int_eq(s_id(s_tok, "a"), 97);
    ck_assert_int_eq(s_id(s_tok, "\xC4\xA0the"), 260); /* "Ġthe", i.e. " the" */

    int32_t id = 12345;
    ck_assert_int_eq(s_ops->token_to_id(s_tok, "no such piece", &id), UM_ENOTFOUND);
    ck_assert_int_eq(id, 12345);

    ck_assert_int_eq(s_ops->is_special(s_tok, 4094), 1);
    ck_assert_int_eq(s_ops->is_special(s_tok, 4095), 1);
    ck_assert_int_eq(s_ops->is_special(s_tok, 260), 0);
    ck_assert_int_eq(s_ops->is_special(s_tok, -1), 0);
    ck_assert_int_eq(s_ops->is_special(s_tok, 4096), 0);
}
END_TEST

START_TEST(test_special_tokens_decode)
{
    size_t n = 0;
    int32_t *ids = s_encode(s_tok, "the end.<|endoftext|>x<|mdm_mask|>", 34, &n);
    ck_assert_uint_eq(n, 6);
    ck_assert_int_eq(ids[3], 4094);
    ck_assert_int_eq(ids[5], 4095);

    size_t len = 0;
    char *text = s_decode(s_tok, ids, n, 0, &len);
    ck_assert_str_eq(text, "the end.<|endoftext|>x<|mdm_mask|>");
    free(text);
    text = s_decode(s_tok, ids, n, UM_DECODE_SKIP_SPECIAL, &len);
    ck_assert_str_eq(text, "the end.x");
    ck_assert_uint_eq(len, 9);
    free(text);

    /* Only a whole special token is one; a near miss is ordinary text. */
    free(ids);
    ids = s_encode(s_tok, "<|endoftext|", 12, &n);
    for (size_t i = 0; i < n; i++)
        ck_assert_int_lt(ids[i], 4094);
    free(ids);
}
END_TEST

START_TEST(test_encode_enospace)
{
    const char *text = "once upon a time";
    const int32_t expected[] = {397, 419, 258, 2054};
    int32_t ids[8];
    size_t n = 0;

    ck_assert_int_eq(s_ops->encode(s_tok, text, strlen(text), NULL, 0, &n), UM_ENOSPACE);
    ck_assert_uint_eq(n, 4);

    for (size_t i = 0; i < 8; i++)
        ids[i] = -7;
    n = 0;
    ck_assert_int_eq(s_ops->encode(s_tok, text, strlen(text), ids, 3, &n), UM_ENOSPACE);
    ck_assert_uint_eq(n, 4);
    ck_assert_int_eq(ids[3], -7); /* nothing written past cap */

    ck_assert_int_eq(s_ops->encode(s_tok, text, strlen(text), ids, 4, &n), UM_OK);
    ck_assert_uint_eq(n, 4);
    for (size_t i = 0; i < 4; i++)
        ck_assert_int_eq(ids[i], expected[i]);

    ck_assert_int_eq(s_ops->encode(s_tok, "", 0, NULL, 0, &n), UM_OK);
    ck_assert_uint_eq(n, 0);
}
END_TEST

START_TEST(test_decode_enospace)
{
    const int32_t ids[] = {397, 419, 258, 2054}; /* "once upon a time", 16 bytes */
    char out[32];
    size_t len = 0;

    ck_assert_int_eq(s_ops->decode(s_tok, ids, 4, 0, NULL, 0, &len), UM_ENOSPACE);
    ck_assert_uint_eq(len, 16);

    memset(out, 'Z', sizeof out);
    len = 0;
    /* 16 bytes of room leave none for the NUL. */
    ck_assert_int_eq(s_ops->decode(s_tok, ids, 4, 0, out, 16, &len), UM_ENOSPACE);
    ck_assert_uint_eq(len, 16);
    ck_assert_int_eq(out[0], 'Z');

    ck_assert_int_eq(s_ops->decode(s_tok, ids, 4, 0, out, 17, &len), UM_OK);
    ck_assert_uint_eq(len, 16);
    ck_assert_str_eq(out, "once upon a time");

    ck_assert_int_eq(s_ops->decode(s_tok, ids, 0, 0, out, 1, &len), UM_OK);
    ck_assert_uint_eq(len, 0);
    ck_assert_str_eq(out, "");
}
END_TEST

START_TEST(test_decode_out_of_range)
{
    char out[64];
    size_t len = 0;
    const int32_t cases[][2] = {{-1, 97}, {97, 4096}, {97, INT32_MAX}, {INT32_MIN, 97}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        ck_assert_msg(s_ops->decode(s_tok, cases[i], 2, 0, out, sizeof out, &len) == UM_ERANGE,
                      "decode of ids {%d, %d} did not return UM_ERANGE", (int)cases[i][0],
                      (int)cases[i][1]);
}
END_TEST

START_TEST(test_decode_invalid_utf8)
{
    /* Byte tokens: 0xE2 is "â", 0x82 is "Ĥ" (moved to U+0124), 0x80 is "Ģ" (U+0122). */
    int32_t e2 = s_id(s_tok, "\xC3\xA2");
    int32_t x82 = s_id(s_tok, "\xC4\xA4");
    int32_t x80 = s_id(s_tok, "\xC4\xA2");
    int32_t a = s_id(s_tok, "a");
    size_t len = 0;

    /* A cut-off sequence is one U+FFFD (its maximal subpart), then the next character. */
    const int32_t cut[] = {e2, x82, a};
    char *text = s_decode(s_tok, cut, 3, 0, &len);
    ck_assert_str_eq(text, "\xEF\xBF\xBD" "a");
    free(text);

    /* Each stray continuation byte is its own U+FFFD. */
    const int32_t stray[] = {a, x80, x80, a};
    text = s_decode(s_tok, stray, 4, 0, &len);
    ck_assert_str_eq(text, "a\xEF\xBF\xBD\xEF\xBF\xBD" "a");
    ck_assert_uint_eq(len, 8);
    free(text);

    /* The three bytes of U+20AC in three tokens join into the character. */
    int32_t xac = s_id(s_tok, "\xC2\xAC");
    const int32_t euro[] = {e2, x82, xac};
    text = s_decode(s_tok, euro, 3, 0, &len);
    ck_assert_str_eq(text, "\xE2\x82\xAC");
    free(text);
}
END_TEST

START_TEST(test_encode_invalid_utf8)
{
    static const char *const bad[] = {
        "\x80",             /* continuation byte first */
        "ok \xC0\x80",      /* overlong NUL */
        "\xE0\x80\x80",     /* overlong three-byte form */
        "\xED\xA0\x80",     /* surrogate U+D800 */
        "\xF4\x90\x80\x80", /* above U+10FFFF */
        "\xF5\x80\x80\x80", /* invalid lead byte */
        "abc\xE2\x82",      /* cut off at the end */
        "\xFF",
    };
    int32_t ids[16];
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        size_t n = 99;
        int rc = s_ops->encode(s_tok, bad[i], strlen(bad[i]), ids, 16, &n);
        ck_assert_msg(rc == UM_EINVAL, "encode of invalid case %zu returned %s, expected "
                      "UM_EINVAL", i, um_error_name(rc));
    }

    /* The largest code points that are valid still round-trip. */
    s_check_text(s_tok, "U+FFFF", "\xEF\xBF\xBF", 3, NULL, 0);
    s_check_text(s_tok, "U+10FFFF", "\xF4\x8F\xBF\xBF", 4, NULL, 0);
}
END_TEST

START_TEST(test_nul_bytes)
{
    static const char text[] = "a\0b\0\0 c\0";
    s_check_text(s_tok, "embedded NUL", text, sizeof text - 1, NULL, 0);
    size_t n = 0;
    int32_t *ids = s_encode(s_tok, "\0", 1, &n);
    ck_assert_uint_eq(n, 1);
    ck_assert_int_eq(ids[0], 0); /* byte 0 is piece U+0100, id 0 in this vocabulary */
    free(ids);
}
END_TEST

START_TEST(test_long_inputs)
{
    /* Long words run through the heap-based merge; long space runs through the regex. */
    const size_t n = 1 << 20;
    char *text = malloc(n);
    memset(text, ' ', n);
    s_check_text(s_tok, "1 MiB of spaces", text, n, NULL, 0);
    memset(text, 'a', n);
    s_check_text(s_tok, "1 MiB of one letter", text, n, NULL, 0);
    for (size_t i = 0; i < n; i++)
        text[i] = "ab \n\t"[(i * 7 + i / 3) % 5];
    s_check_text(s_tok, "1 MiB of letters and spaces", text, n, NULL, 0);
    free(text);
}
END_TEST

/* Append the UTF-8 form of code point cp to p; returns the new end. */
static char *s_put_utf8(char *p, uint32_t cp)
{
    if (cp < 0x80) {
        *p++ = (char)cp;
    } else if (cp < 0x800) {
        *p++ = (char)(0xC0 | cp >> 6);
        *p++ = (char)(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
        *p++ = (char)(0xE0 | cp >> 12);
        *p++ = (char)(0x80 | (cp >> 6 & 0x3F));
        *p++ = (char)(0x80 | (cp & 0x3F));
    } else {
        *p++ = (char)(0xF0 | cp >> 18);
        *p++ = (char)(0x80 | (cp >> 12 & 0x3F));
        *p++ = (char)(0x80 | (cp >> 6 & 0x3F));
        *p++ = (char)(0x80 | (cp & 0x3F));
    }
    return p;
}

START_TEST(test_random_text_roundtrip)
{
    /* Code points from ASCII, Latin-1, CJK, emoji and anywhere, seeded for repeatability. */
    uint64_t state = 0x9E3779B97F4A7C15ull;
    char text[4 * 200];
    for (int round = 0; round < 300; round++) {
        char *p = text;
        for (int k = 0; k < 200; k++) {
            state = state * 6364136223846793005ull + 1442695040888963407ull;
            uint32_t r = (uint32_t)(state >> 33);
            uint32_t cp;
            switch (r % 5) {
            case 0: cp = r / 5 % 128; break;
            case 1: cp = 0x80 + r / 5 % 0x180; break;
            case 2: cp = 0x4E00 + r / 5 % 0x5000; break;
            case 3: cp = 0x1F300 + r / 5 % 0x300; break;
            default: cp = r / 5 % 0x110000; break;
            }
            if (cp >= 0xD800 && cp <= 0xDFFF)
                cp = ' ';
            p = s_put_utf8(p, cp);
        }
        char label[32];
        snprintf(label, sizeof label, "random text %d", round);
        s_check_text(s_tok, label, text, (size_t)(p - text), NULL, 0);
    }
}
END_TEST

/* ------------------------------------------------------------------------- */
/* Load errors                                                               */

typedef struct s_bad_file {
    const char *label;
    const char *json;
    int code;
    const char *field; /* a substring the message must contain */
} s_bad_file_t;

#define S_VOCAB_AB "\"vocab\": {\"a\": 0, \"b\": 1, \"ab\": 2}"
#define S_BYTE_LEVEL "\"pre_tokenizer\": {\"type\": \"ByteLevel\"}"

static const s_bad_file_t s_bad_files[] = {
    {"invalid JSON", "{\"model\": ", UM_EFORMAT, "invalid JSON at line"},
    {"top level array", "[1, 2]", UM_EFORMAT, "top level"},
    {"no model", "{" S_BYTE_LEVEL "}", UM_EFORMAT, "model is missing"},
    {"model type", "{\"model\": {\"type\": \"WordPiece\", \"vocab\": {}}}", UM_EUNSUPPORTED,
     "model.type is \"WordPiece\""},
    {"no vocab", "{\"model\": {\"type\": \"BPE\", \"merges\": []}}", UM_EFORMAT, "model.vocab"},
    {"vocab not object", "{\"model\": {\"type\": \"BPE\", \"vocab\": [], \"merges\": []}}",
     UM_EFORMAT, "model.vocab"},
    {"no merges", "{\"model\": {\"type\": \"BPE\", " S_VOCAB_AB "}}", UM_EFORMAT,
     "model.merges"},
    {"empty vocab", "{\"model\": {\"type\": \"BPE\", \"vocab\": {}, \"merges\": []}, "
     S_BYTE_LEVEL "}", UM_EFORMAT, "model.vocab is empty"},
    {"id not a number", "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": \"0\"}, "
     "\"merges\": []}}", UM_EFORMAT, "model.vocab[\"a\"]"},
    {"negative id", "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": -3}, \"merges\": []}}",
     UM_EFORMAT, "model.vocab[\"a\"] is -3"},
    {"repeated id", "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 0}, "
     "\"merges\": []}}", UM_EFORMAT, "model.vocab gives id 0"},
    {"merge piece missing", "{\"model\": {\"type\": \"BPE\", " S_VOCAB_AB ", \"merges\": "
     "[\"a b\", \"a z\"]}, " S_BYTE_LEVEL "}", UM_EFORMAT,
     "model.merges[1] (\"a\" + \"z\"): piece \"z\" is not in model.vocab"},
    {"merged piece missing", "{\"model\": {\"type\": \"BPE\", " S_VOCAB_AB ", \"merges\": "
     "[\"b a\"]}, " S_BYTE_LEVEL "}", UM_EFORMAT, "merged piece \"ba\" is not in model.vocab"},
    {"merge without space", "{\"model\": {\"type\": \"BPE\", " S_VOCAB_AB ", \"merges\": "
     "[\"ab\"]}, " S_BYTE_LEVEL "}", UM_EFORMAT, "model.merges[0] is \"ab\""},
    {"merge wrong type", "{\"model\": {\"type\": \"BPE\", " S_VOCAB_AB ", \"merges\": "
     "[[\"a\"]]}, " S_BYTE_LEVEL "}", UM_EFORMAT, "model.merges[0] must be"},
    {"added without content", "{\"model\": {\"type\": \"BPE\", " S_VOCAB_AB ", \"merges\": "
     "[]}, \"added_tokens\": [{\"id\": 3}], " S_BYTE_LEVEL "}", UM_EFORMAT,
     "added_tokens[0].content"},
    {"added id missing", "{\"model\": {\"type\": \"BPE\", " S_VOCAB_AB ", \"merges\": "
     "[]}, \"added_tokens\": [{\"content\": \"<s>\"}], " S_BYTE_LEVEL "}", UM_EFORMAT,
     "added_tokens[0].id"},
    {"added id repeated", "{\"model\": {\"type\": \"BPE\", " S_VOCAB_AB ", \"merges\": "
     "[]}, \"added_tokens\": [{\"id\": 3, \"content\": \"<s>\"}, {\"id\": 3, \"content\": "
     "\"</s>\"}], " S_BYTE_LEVEL "}", UM_EFORMAT, "added_tokens[1] repeats id 3"},
    {"regex does not compile", "{\"model\": {\"type\": \"BPE\", " S_VOCAB_AB ", \"merges\": "
     "[]}, \"pre_tokenizer\": {\"type\": \"Sequence\", \"pretokenizers\": [{\"type\": "
     "\"Split\", \"pattern\": {\"Regex\": \"a(b\"}, \"behavior\": \"Isolated\"}, {\"type\": "
     "\"ByteLevel\"}]}}", UM_EFORMAT,
     "pre_tokenizer.pretokenizers[0].pattern.Regex: the regex does not compile: missing "
     "closing parenthesis at offset 3"},
    {"split behavior", "{\"model\": {\"type\": \"BPE\", " S_VOCAB_AB ", \"merges\": [] }, "
     "\"pre_tokenizer\": {\"type\": \"Sequence\", \"pretokenizers\": [{\"type\": \"Split\", "
     "\"pattern\": {\"Regex\": \"a\"}, \"behavior\": \"Removed\"}, {\"type\": "
     "\"ByteLevel\"}]}}", UM_EUNSUPPORTED, "pre_tokenizer.pretokenizers[0].behavior"},
    {"split without pattern", "{\"model\": {\"type\": \"BPE\", " S_VOCAB_AB ", \"merges\": "
     "[]}, \"pre_tokenizer\": {\"type\": \"Split\", \"behavior\": \"Isolated\"}}", UM_EFORMAT,
     "pre_tokenizer.pattern"},
    {"no ByteLevel", "{\"model\": {\"type\": \"BPE\", " S_VOCAB_AB ", \"merges\": []}, "
     "\"pre_tokenizer\": {\"type\": \"Whitespace\"}}", UM_EUNSUPPORTED,
     "pre_tokenizer.type \"Whitespace\""},
    {"Split after ByteLevel", "{\"model\": {\"type\": \"BPE\", " S_VOCAB_AB ", \"merges\": "
     "[]}, \"pre_tokenizer\": {\"type\": \"Sequence\", \"pretokenizers\": [{\"type\": "
     "\"ByteLevel\"}, {\"type\": \"Split\", \"pattern\": {\"Regex\": \"a\"}, \"behavior\": "
     "\"Isolated\"}]}}", UM_EUNSUPPORTED, "pre_tokenizer.pretokenizers[1] (Split)"},
    {"pre_tokenizer null", "{\"model\": {\"type\": \"BPE\", " S_VOCAB_AB ", \"merges\": []}, "
     "\"pre_tokenizer\": null}", UM_EUNSUPPORTED, "pre_tokenizer is null"},
    {"byte fallback", "{\"model\": {\"type\": \"BPE\", \"byte_fallback\": true, " S_VOCAB_AB
     ", \"merges\": []}, " S_BYTE_LEVEL "}", UM_EUNSUPPORTED, "model.byte_fallback"},
    {"normalizer", "{\"normalizer\": {\"type\": \"Lowercase\"}, \"model\": {\"type\": \"BPE\", "
     S_VOCAB_AB ", \"merges\": []}, " S_BYTE_LEVEL "}", UM_EUNSUPPORTED,
     "normalizer of type \"Lowercase\""},
};

START_TEST(test_malformed_files)
{
    s_tmpdir_create();
    for (size_t i = 0; i < sizeof s_bad_files / sizeof s_bad_files[0]; i++) {
        const s_bad_file_t *bad = &s_bad_files[i];
        s_write_text(bad->json);
        char err[1024] = "";
        void *tok = (void *)&err;
        long live = s_live_blocks;
        int rc = s_ops->load(&s_host, s_tmpdir, &tok, err, sizeof err);
        ck_assert_msg(rc == bad->code, "%s: load returned %s, expected %s (message: %s)",
                      bad->label, um_error_name(rc), um_error_name(bad->code), err);
        ck_assert_msg(tok == NULL, "%s: load failed but set the tokenizer", bad->label);
        ck_assert_msg(strstr(err, bad->field) != NULL, "%s: message \"%s\" does not contain "
                      "\"%s\"", bad->label, err, bad->field);
        ck_assert_msg(strstr(err, "tokenizer.json") != NULL, "%s: message \"%s\" does not "
                      "name the file", bad->label, err);
        ck_assert_msg(s_live_blocks == live, "%s: the failed load leaked %ld allocations",
                      bad->label, s_live_blocks - live);
    }
    s_tmpdir_remove();
}
END_TEST

START_TEST(test_missing_file)
{
    s_tmpdir_create();
    char err[1024] = "";
    void *tok = NULL;
    int rc = s_ops->load(&s_host, s_tmpdir, &tok, err, sizeof err);
    ck_assert_int_eq(rc, UM_ENOTFOUND);
    ck_assert_msg(strstr(err, s_tmpdir) && strstr(err, "tokenizer.json"),
                  "message \"%s\" does not name the missing file", err);
    s_tmpdir_remove();
}
END_TEST

START_TEST(test_unload_frees_all)
{
    long live = s_live_blocks;
    void *tok = s_load(um_test_env("UM_TEST_MODEL"));
    ck_assert_int_gt(s_live_blocks, live);
    size_t n = 0;
    int32_t *ids = s_encode(tok, "once upon a time<|endoftext|> there", 35, &n);
    size_t len = 0;
    free(s_decode(tok, ids, n, 0, &len));
    free(ids);
    s_ops->unload(tok);
    ck_assert_msg(s_live_blocks == live, "unload left %ld host allocations",
                  s_live_blocks - live);
}
END_TEST

/* ------------------------------------------------------------------------- */
/* Features on small vocabularies                                            */

static void s_tiny_setup(void)
{
    s_tmpdir_create();
}

static void s_tiny_teardown(void)
{
    s_tmpdir_remove();
}

/* Encode text and compare with the expected ids, then check the round trip. */
#define S_EXPECT_IDS(tok, text, ...)                                                   \
    do {                                                                               \
        const int32_t expected_[] = {__VA_ARGS__};                                    \
        s_check_text((tok), (text), (text), strlen(text), expected_,                   \
                     sizeof expected_ / sizeof expected_[0]);                          \
    } while (0)

START_TEST(test_merge_rank_order)
{
    /* "b c" ranks before "a b", so "abc" becomes a + bc, never ab + c. */
    json_t *doc = s_tiny_doc(s_byte_level(0, 1));
    int32_t bc = s_tiny_merge(doc, "b", "c");
    s_tiny_merge(doc, "a", "b");
    void *tok = s_load_doc(doc);
    S_EXPECT_IDS(tok, "abc", 'a', bc);
    s_ops->unload(tok);

    doc = s_tiny_doc(s_byte_level(0, 1));
    int32_t ab = s_tiny_merge(doc, "a", "b");
    s_tiny_merge(doc, "b", "c");
    tok = s_load_doc(doc);
    S_EXPECT_IDS(tok, "abc", ab, 'c');
    s_ops->unload(tok);
}
END_TEST

START_TEST(test_merge_leftmost_first)
{
    /* Equal ranks merge from the left: "aaa" is aa + a, "aaaa" is aa + aa. */
    json_t *doc = s_tiny_doc(s_byte_level(0, 1));
    int32_t aa = s_tiny_merge(doc, "a", "a");
    void *tok = s_load_doc(doc);
    S_EXPECT_IDS(tok, "aaa", aa, 'a');
    S_EXPECT_IDS(tok, "aaaa", aa, aa);
    s_ops->unload(tok);
}
END_TEST

START_TEST(test_merges_as_pairs)
{
    json_t *doc = s_tiny_doc(s_byte_level(0, 1));
    int32_t sp_h = s_tiny_merge(doc, "\xC4\xA0", "h"); /* "Ġ h" */
    int32_t sp_hi = s_tiny_merge(doc, "\xC4\xA0h", "i");
    json_t *merges = json_object_get(json_object_get(doc, "model"), "merges");
    json_array_clear(merges);
    json_array_append_new(merges, json_pack("[s, s]", "\xC4\xA0", "h"));
    json_array_append_new(merges, json_pack("[s, s]", "\xC4\xA0h", "i"));
    void *tok = s_load_doc(doc);
    S_EXPECT_IDS(tok, "a hi", 'a', sp_hi);
    S_EXPECT_IDS(tok, "a ha", 'a', sp_h, 'a');
    s_ops->unload(tok);
}
END_TEST

START_TEST(test_add_prefix_space)
{
    json_t *doc = s_tiny_doc(s_byte_level(1, 1));
    s_tiny_merge(doc, "\xC4\xA0", "h");
    int32_t sp_hi = s_tiny_merge(doc, "\xC4\xA0h", "i");
    int32_t sep = s_tiny_added(doc, "<sep>", 1);
    void *tok = s_load_doc(doc);

    /* The space goes before the text and after each added token; decode keeps it. */
    size_t n = 0;
    int32_t *ids = s_encode(tok, "hi<sep>hi", 9, &n);
    ck_assert_uint_eq(n, 3);
    ck_assert_int_eq(ids[0], sp_hi);
    ck_assert_int_eq(ids[1], sep);
    ck_assert_int_eq(ids[2], sp_hi);
    size_t len = 0;
    char *text = s_decode(tok, ids, n, 0, &len);
    ck_assert_str_eq(text, " hi<sep> hi");
    free(text);
    free(ids);

    /* Text that starts with a space gets none added. */
    S_EXPECT_IDS(tok, " hi", sp_hi);
    s_ops->unload(tok);

    doc = s_tiny_doc(s_byte_level(0, 1));
    s_tiny_merge(doc, "\xC4\xA0", "h");
    s_tiny_merge(doc, "\xC4\xA0h", "i");
    tok = s_load_doc(doc);
    S_EXPECT_IDS(tok, "hi", 'h', 'i');
    s_ops->unload(tok);
}
END_TEST

START_TEST(test_byte_level_without_regex)
{
    /* Without use_regex nothing splits the text, so merges may cross a space. */
    json_t *doc = s_tiny_doc(s_byte_level(0, 0));
    int32_t a_sp = s_tiny_merge(doc, "a", "\xC4\xA0");
    void *tok = s_load_doc(doc);
    S_EXPECT_IDS(tok, "a b", a_sp, 'b');
    s_ops->unload(tok);

    doc = s_tiny_doc(s_byte_level(0, 1));
    s_tiny_merge(doc, "a", "\xC4\xA0");
    tok = s_load_doc(doc);
    S_EXPECT_IDS(tok, "a b", 'a', ' ', 'b'); /* ids here are byte values */
    s_ops->unload(tok);
}
END_TEST

START_TEST(test_split_string_pattern)
{
    /* A Split on the literal "-" keeps "a-" from merging; text between matches stays. */
    json_t *split = json_pack("{s:s, s:{s:s}, s:s, s:b}", "type", "Split", "pattern", "String",
                              "-", "behavior", "Isolated", "invert", 0);
    json_t *pre = json_pack("{s:s, s:[o, o]}", "type", "Sequence", "pretokenizers", split,
                            s_byte_level(0, 0));
    json_t *doc = s_tiny_doc(pre);
    s_tiny_merge(doc, "a", "-");
    int32_t bb = s_tiny_merge(doc, "b", "b");
    void *tok = s_load_doc(doc);
    S_EXPECT_IDS(tok, "a-bb", 'a', '-', bb);
    S_EXPECT_IDS(tok, "bb--a", bb, '-', '-', 'a');
    s_ops->unload(tok);
}
END_TEST

START_TEST(test_split_regex_then_byte_level_regex)
{
    /* A Split on digits runs first, then ByteLevel's own GPT-2 pattern splits further. */
    json_t *split = json_pack("{s:s, s:{s:s}, s:s}", "type", "Split", "pattern", "Regex",
                              "\\p{N}", "behavior", "Isolated");
    json_t *pre = json_pack("{s:s, s:[o, o]}", "type", "Sequence", "pretokenizers", split,
                            s_byte_level(0, 1));
    json_t *doc = s_tiny_doc(pre);
    s_tiny_merge(doc, "1", "2");
    int32_t sp_x = s_tiny_merge(doc, "\xC4\xA0", "x");
    void *tok = s_load_doc(doc);
    S_EXPECT_IDS(tok, "12 x", '1', '2', sp_x);
    s_ops->unload(tok);
}
END_TEST

START_TEST(test_ignore_merges)
{
    /* "abc" is in the vocabulary but no merge reaches it from "ab" + "c". */
    json_t *doc = s_tiny_doc(s_byte_level(0, 1));
    int32_t ab = s_tiny_merge(doc, "a", "b");
    json_t *model = json_object_get(doc, "model");
    json_object_set_new(json_object_get(model, "vocab"), "abc", json_integer(400));
    json_object_set_new(model, "ignore_merges", json_true());
    void *tok = s_load_doc(doc);
    S_EXPECT_IDS(tok, "abc", 400);
    S_EXPECT_IDS(tok, "abcd", ab, 'c', 'd');
    s_ops->unload(tok);

    doc = s_tiny_doc(s_byte_level(0, 1));
    ab = s_tiny_merge(doc, "a", "b");
    json_object_set_new(json_object_get(json_object_get(doc, "model"), "vocab"), "abc",
                        json_integer(400));
    tok = s_load_doc(doc);
    S_EXPECT_IDS(tok, "abc", ab, 'c');
    s_ops->unload(tok);
}
END_TEST

START_TEST(test_added_tokens_longest_first)
{
    json_t *doc = s_tiny_doc(s_byte_level(0, 1));
    int32_t short_id = s_tiny_added(doc, "<a>", 1);
    int32_t long_id = s_tiny_added(doc, "<a><b>", 1);
    int32_t plain = s_tiny_added(doc, "[X]", 0);
    void *tok = s_load_doc(doc);

    S_EXPECT_IDS(tok, "<a><b><a>x[X]", long_id, short_id, 'x', plain);
    S_EXPECT_IDS(tok, "<a><b", short_id, '<', 'b');
    ck_assert_int_eq(s_ops->is_special(tok, short_id), 1);
    ck_assert_int_eq(s_ops->is_special(tok, plain), 0);
    ck_assert_int_eq(s_ops->vocab_size(tok), plain + 1);

    /* Skipping special tokens keeps added tokens that are not special. */
    const int32_t ids[] = {long_id, 'x', plain, short_id};
    size_t len = 0;
    char *text = s_decode(tok, ids, 4, UM_DECODE_SKIP_SPECIAL, &len);
    ck_assert_str_eq(text, "x[X]");
    free(text);
    s_ops->unload(tok);
}
END_TEST

START_TEST(test_normalizer_nfc_accepted)
{
    json_t *doc = s_tiny_doc(s_byte_level(0, 1));
    json_object_set_new(doc, "normalizer", json_pack("{s:s}", "type", "NFC"));
    s_last_log[0] = '\0';
    void *tok = s_load_doc(doc);
    ck_assert_msg(strstr(s_last_log, "NFC") != NULL, "no warning about NFC; last log: %s",
                  s_last_log);
    S_EXPECT_IDS(tok, "ab", 'a', 'b');
    s_ops->unload(tok);
}
END_TEST

/* ------------------------------------------------------------------------- */
/* Shared data (UNMASKD_DATA)                                                */

/* Return the path of a file in the shared data folder, or NULL (after a skip message). */
static const char *s_data_file(const char *test, const char *rel)
{
    static char path[4096];
    const char *base = getenv("UNMASKD_DATA");
    if (!base || !*base) {
        printf("%s: skipped, UNMASKD_DATA is not set (point it at the shared data folder)\n",
               test);
        return NULL;
    }
    snprintf(path, sizeof path, "%s/%s", base, rel);
    if (access(path, R_OK) != 0) {
        printf("%s: skipped, %s is not readable\n", test, path);
        return NULL;
    }
    return path;
}

static double s_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/*
 * Split TinyStories text into stories as tools/um_data.py does. Lines are stripped,
 * paragraphs of one story are joined by a blank line, and a story ends where two
 * non-empty lines touch. Returns the number of stories, each malloc'ed.
 */
static size_t s_read_stories(char *text, char ***stories_out)
{
    size_t cap = 1024, n = 0;
    char **stories = malloc(cap * sizeof *stories);
    char *current = NULL;
    size_t cur_len = 0;
    int prev_blank = 1;
    for (char *line = text; line;) {
        char *nl = strchr(line, '\n');
        if (nl)
            *nl = '\0';
        char *start = line;
        while (*start == ' ' || *start == '\t' || *start == '\r')
            start++;
        size_t len = strlen(start);
        while (len > 0 && (start[len - 1] == ' ' || start[len - 1] == '\t' ||
                           start[len - 1] == '\r'))
            len--;
        line = nl ? nl + 1 : NULL;
        if (len == 0) {
            prev_blank = 1;
            continue;
        }
        if (!prev_blank && current) {
            if (n == cap)
                stories = realloc(stories, (cap *= 2) * sizeof *stories);
            stories[n++] = current;
            current = NULL;
            cur_len = 0;
        }
        current = realloc(current, cur_len + len + 3);
        if (cur_len) {
            memcpy(current + cur_len, "\n\n", 2);
            cur_len += 2;
        }
        memcpy(current + cur_len, start, len);
        cur_len += len;
        current[cur_len] = '\0';
        prev_blank = 0;
    }
    if (current) {
        if (n == cap)
            stories = realloc(stories, (cap + 1) * sizeof *stories);
        stories[n++] = current;
    }
    *stories_out = stories;
    return n;
}

START_TEST(test_tinystories_roundtrip)
{
    const char *path = s_data_file("tinystories round trip",
                                   "tinystories-head/tinystories_train_head_lowercase.txt");
    if (!path)
        return;
    size_t len = 0;
    char *text = um_test_read_file(path, &len);
    ck_assert_msg(text != NULL, "cannot read %s", path);

    /* Time the whole file once, then round-trip it. */
    int32_t *ids = malloc((len + 16) * sizeof *ids);
    size_t n = 0;
    double t0 = s_seconds();
    ck_assert_int_eq(s_ops->encode(s_tok, text, len, ids, len + 16, &n), UM_OK);
    double elapsed = s_seconds() - t0;
    printf("tinystories: encoded %zu bytes into %zu ids in %.3f s (%.1f MB/s, %.2f bytes "
           "per id)\n", len, n, elapsed, (double)len / 1e6 / elapsed, (double)len / (double)n);
    size_t out_len = 0;
    char *out = s_decode(s_tok, ids, n, 0, &out_len);
    ck_assert_msg(out_len == len && memcmp(out, text, len) == 0,
                  "%s does not round-trip (%zu bytes in, %zu out)", path, len, out_len);
    free(out);
    free(ids);

    /* The validation stories (the last 5%, as the training tools hold out) one by one. */
    char **stories;
    size_t n_stories = s_read_stories(text, &stories);
    ck_assert_uint_gt(n_stories, 100);
    size_t n_val = n_stories / 20 > 0 ? n_stories / 20 : 1;
    for (size_t i = n_stories - n_val; i < n_stories; i++) {
        char label[64];
        snprintf(label, sizeof label, "validation story %zu", i);
        s_check_text(s_tok, label, stories[i], strlen(stories[i]), NULL, 0);
    }
    for (size_t i = 0; i < n_stories; i++)
        free(stories[i]);
    free(stories);
    free(text);
}
END_TEST

/* Write a tokenizer.json for GPT-2 from encoder.json and vocab.bpe into s_tmpdir. */
static void s_write_gpt2(const char *encoder_path, const char *merges_path)
{
    json_error_t jerr;
    json_t *vocab = json_load_file(encoder_path, 0, &jerr);
    ck_assert_msg(vocab != NULL, "%s: %s", encoder_path, jerr.text);
    char *lines = um_test_read_file(merges_path, NULL);
    ck_assert_msg(lines != NULL, "cannot read %s", merges_path);
    json_t *merges = json_array();
    for (char *line = lines; line && *line;) {
        char *nl = strchr(line, '\n');
        if (nl)
            *nl = '\0';
        if (*line && strncmp(line, "#version", 8) != 0)
            json_array_append_new(merges, json_string(line));
        line = nl ? nl + 1 : NULL;
    }
    free(lines);
    ck_assert_uint_eq(json_array_size(merges), 50000);

    json_t *doc = json_pack(
        "{s:{s:s, s:o, s:o}, s:[{s:i, s:s, s:b}], s:o, s:{s:s}}", "model", "type", "BPE",
        "vocab", vocab, "merges", merges, "added_tokens", "id", 50256, "content",
        "<|endoftext|>", "special", 1, "pre_tokenizer", s_byte_level(0, 1), "decoder", "type",
        "ByteLevel");
    ck_assert_ptr_nonnull(doc);
    s_write_doc(doc);
    json_decref(doc);
}

/*
 * Check the test strings of llama.cpp for GPT-2 (one string per separator-terminated
 * block in .inp, one line of ids per string in .out).
 */
static void s_check_llamacpp_vectors(void *tok)
{
    const char *inp_path = s_data_file("gpt2 llama.cpp vectors",
                                       "llamacpp-vocab-tests/ggml-vocab-gpt-2.gguf.inp");
    if (!inp_path)
        return;
    char *inp = um_test_read_file(inp_path, NULL);
    const char *out_path = s_data_file("gpt2 llama.cpp vectors",
                                       "llamacpp-vocab-tests/ggml-vocab-gpt-2.gguf.out");
    char *out = out_path ? um_test_read_file(out_path, NULL) : NULL;
    ck_assert_msg(inp && out, "cannot read the llama.cpp GPT-2 test vectors");

    static const char sep[] = "\n__ggml_vocab_test__\n";
    char *text = inp, *line = out;
    int count = 0;
    for (;;) {
        char *end = strstr(text, sep);
        if (!end || !line || !*line)
            break;
        char *nl = strchr(line, '\n');
        if (nl)
            *nl = '\0';
        int32_t expected[256];
        size_t n_expected = 0;
        for (char *p = line, *q; n_expected < 256; p = q) {
            long v = strtol(p, &q, 10);
            if (q == p)
                break;
            expected[n_expected++] = (int32_t)v;
        }
        char label[64];
        snprintf(label, sizeof label, "llama.cpp GPT-2 string %d", count);
        s_check_text(tok, label, text, (size_t)(end - text), expected, n_expected);
        count++;
        text = end + sizeof sep - 1;
        line = nl ? nl + 1 : NULL;
    }
    ck_assert_int_ge(count, 40);
    free(inp);
    free(out);
}

START_TEST(test_gpt2_vocabulary)
{
    const char *encoder = s_data_file("gpt2 vocabulary", "gpt2-tokenizer/encoder.json");
    if (!encoder)
        return;
    char encoder_path[4096];
    snprintf(encoder_path, sizeof encoder_path, "%s", encoder);
    const char *merges = s_data_file("gpt2 vocabulary", "gpt2-tokenizer/vocab.bpe");
    if (!merges)
        return;

    s_tmpdir_create();
    s_write_gpt2(encoder_path, merges);
    ck_assert_int_eq(s_ops->probe(s_tmpdir), 90);
    void *tok = s_load(s_tmpdir);
    ck_assert_int_eq(s_ops->vocab_size(tok), 50257);
    ck_assert_int_eq(s_ops->is_special(tok, 50256), 1);

    S_EXPECT_IDS(tok, "Hello world", 15496, 995);
    S_EXPECT_IDS(tok, " Hello", 18435);
    S_EXPECT_IDS(tok, "<|endoftext|>", 50256);
    S_EXPECT_IDS(tok, "Hello world<|endoftext|> Hello", 15496, 995, 50256, 18435);
    const char *accents = "caf\xC3\xA9 na\xC3\xAFve \xE2\x86\x92 \xF0\x9F\x98\x80";
    s_check_text(tok, "accents", accents, strlen(accents), NULL, 0);
    s_check_llamacpp_vectors(tok);

    s_ops->unload(tok);
    s_tmpdir_remove();
}
END_TEST

/* ------------------------------------------------------------------------- */
/* Suite                                                                     */

Suite *um_tokenizer_suite(void)
{
    Suite *s = suite_create("tokenizer");

    TCase *tc = tcase_create("plugin");
    tcase_add_unchecked_fixture(tc, s_plugin_open, s_plugin_close);
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, test_descriptor_fields);
    tcase_add_test(tc, test_probe_scores);
    suite_add_tcase(s, tc);

    tc = tcase_create("tinystories");
    tcase_add_unchecked_fixture(tc, s_tinystories_setup, s_tinystories_teardown);
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_fixture_cases);
    tcase_add_test(tc, test_vocabulary_queries);
    tcase_add_test(tc, test_special_tokens_decode);
    tcase_add_test(tc, test_encode_enospace);
    tcase_add_test(tc, test_decode_enospace);
    tcase_add_test(tc, test_decode_out_of_range);
    tcase_add_test(tc, test_decode_invalid_utf8);
    tcase_add_test(tc, test_encode_invalid_utf8);
    tcase_add_test(tc, test_nul_bytes);
    tcase_add_test(tc, test_long_inputs);
    tcase_add_test(tc, test_random_text_roundtrip);
    suite_add_tcase(s, tc);

    tc = tcase_create("load_errors");
    tcase_add_unchecked_fixture(tc, s_plugin_open, s_plugin_close);
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, test_malformed_files);
    tcase_add_test(tc, test_missing_file);
    tcase_add_test(tc, test_unload_frees_all);
    suite_add_tcase(s, tc);

    tc = tcase_create("features");
    tcase_add_unchecked_fixture(tc, s_plugin_open, s_plugin_close);
    tcase_add_checked_fixture(tc, s_tiny_setup, s_tiny_teardown);
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, test_merge_rank_order);
    tcase_add_test(tc, test_merge_leftmost_first);
    tcase_add_test(tc, test_merges_as_pairs);
    tcase_add_test(tc, test_add_prefix_space);
    tcase_add_test(tc, test_byte_level_without_regex);
    tcase_add_test(tc, test_split_string_pattern);
    tcase_add_test(tc, test_split_regex_then_byte_level_regex);
    tcase_add_test(tc, test_ignore_merges);
    tcase_add_test(tc, test_added_tokens_longest_first);
    tcase_add_test(tc, test_normalizer_nfc_accepted);
    suite_add_tcase(s, tc);

    tc = tcase_create("data");
    tcase_add_unchecked_fixture(tc, s_tinystories_setup, s_tinystories_teardown);
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_tinystories_roundtrip);
    tcase_add_test(tc, test_gpt2_vocabulary);
    suite_add_tcase(s, tc);

    return s;
}
