/*
 * Tests of the tokenizer plugins (build-plugins/bpe.so, wordpiece.so and spm.so),
 * loaded with dlopen and driven through their descriptors and a host table of this
 * file, the way the daemon drives them.
 *
 * For byte-level BPE the cases cover the descriptor and probe, and the fixture texts
 * whose ids the Python reference (tools/um_tokenizer.py) wrote. Others check the
 * buffer protocol of encode and decode, special tokens, invalid input, the load errors
 * of malformed tokenizer.json files and of the vocabulary and merges files, and
 * features on small vocabularies written here. WordPiece and SentencePiece get the same
 * kinds of cases on small vocabularies written here (a protobuf writer builds the
 * tokenizer.model files). A probe case checks which plugin the daemon's own choice
 * (um_tokenizer_open) takes for each folder layout.
 *
 * When UNMASKD_DATA names the shared data folder, the real vocabularies are checked:
 * bert-base-uncased, GPT-2 and LLaMA-2 against the expected ids of llama.cpp's
 * tokenizer test vectors, LLaMA-3 against ids written out in the test, and all four
 * with round trips of long texts. Without it those cases print why they skip.
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

#include "plugins.h"
#include "testutil.h"
#include "tokenizer.h"

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

/* Open build-plugins/FILE as the plugin under test (s_handle, s_desc, s_ops). */
static void s_plugin_open_file(const char *file)
{
    const char *path = um_test_path(um_test_env("UM_TEST_PLUGINS"), file);
    s_handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    ck_assert_msg(s_handle != NULL, "dlopen %s failed: %s", path, dlerror());
    um_plugin_describe_fn describe = (um_plugin_describe_fn)dlsym(s_handle, UM_PLUGIN_ENTRY);
    ck_assert_msg(describe != NULL, "%s does not export %s", path, UM_PLUGIN_ENTRY);
    s_desc = describe();
    ck_assert_ptr_nonnull(s_desc);
    s_ops = s_desc->tokenizer;
    ck_assert_ptr_nonnull(s_ops);
}

static void s_plugin_open(void)
{
    s_plugin_open_file("bpe.so");
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

/* Every file name the tests write into the temporary folder. */
static const char *const s_tmp_files[] = {
    "tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model", "encoder.json",
    "vocab.bpe", "vocab.json", "merges.txt", "special_tokens.txt",
};

static void s_tmpdir_remove(void)
{
    if (!s_tmpdir[0])
        return;
    for (size_t i = 0; i < sizeof s_tmp_files / sizeof s_tmp_files[0]; i++)
        unlink(um_test_path(s_tmpdir, s_tmp_files[i]));
    rmdir(s_tmpdir);
    s_tmpdir[0] = '\0';
}

/* Write len bytes to NAME in the temporary folder. */
static void s_write_file(const char *name, const void *data, size_t len)
{
    const char *path = um_test_path(s_tmpdir, name);
    FILE *f = fopen(path, "wb");
    ck_assert_msg(f != NULL, "cannot write %s: %s", path, strerror(errno));
    ck_assert_uint_eq(fwrite(data, 1, len, f), len);
    fclose(f);
}

static void s_write_str(const char *name, const char *text)
{
    s_write_file(name, text, strlen(text));
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

/* Text that is not UTF-8: every plugin's encode must return UM_EINVAL for each. */
static const char *const s_invalid_utf8[] = {
    "\x80",                 /* continuation byte first */
    "ok \xC0\x80",          /* overlong NUL */
    "\xE0\x80\x80",         /* overlong three-byte form */
    "\xED\xA0\x80",         /* surrogate U+D800 */
    "\xF4\x90\x80\x80",     /* above U+10FFFF */
    "\xF5\x80\x80\x80",     /* invalid lead byte */
    "abc\xE2\x82",          /* cut off at the end */
    "\xFF",
    "caf\xE9 au lait",      /* Latin-1, not UTF-8 */
    "\xF0\x9F\x98 smile",   /* emoji cut off before a space */
};

static void s_check_invalid_utf8(void *tok)
{
    int32_t ids[64];
    for (size_t i = 0; i < sizeof s_invalid_utf8 / sizeof s_invalid_utf8[0]; i++) {
        size_t n = 99;
        int rc = s_ops->encode(tok, s_invalid_utf8[i], strlen(s_invalid_utf8[i]), ids, 64, &n);
        ck_assert_msg(rc == UM_EINVAL, "encode of invalid case %zu returned %s, expected "
                      "UM_EINVAL", i, um_error_name(rc));
    }
}

START_TEST(test_encode_invalid_utf8)
{
    s_check_invalid_utf8(s_tok);

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
 * Check that text encodes to expected[0..n_expected). A reversible tokenizer must
 * decode the ids back to text; for the others (WordPiece) decoding and encoding
 * again must give the same ids.
 */
static void s_check_ids(void *tok, const char *label, const char *text, size_t len,
                        const int32_t *expected, size_t n_expected, int reversible)
{
    if (reversible) {
        s_check_text(tok, label, text, len, expected, n_expected);
        return;
    }
    size_t n = 0;
    int32_t *ids = s_encode(tok, text, len, &n);
    ck_assert_msg(n == n_expected, "%s: encoded to %zu ids, expected %zu", label, n,
                  n_expected);
    for (size_t i = 0; i < n; i++)
        ck_assert_msg(ids[i] == expected[i], "%s: id %zu is %d, expected %d", label, i,
                      (int)ids[i], (int)expected[i]);
    size_t out_len = 0, n_again = 0;
    char *out = s_decode(tok, ids, n, 0, &out_len);
    int32_t *again = s_encode(tok, out, out_len, &n_again);
    ck_assert_msg(n_again == n, "%s: decoded to \"%.80s\", which encodes to %zu ids, not %zu",
                  label, out, n_again, n);
    for (size_t i = 0; i < n; i++)
        ck_assert_msg(again[i] == ids[i], "%s: decoded to \"%.80s\", whose id %zu is %d, not "
                      "%d", label, out, i, (int)again[i], (int)ids[i]);
    free(again);
    free(out);
    free(ids);
}

/* Parse a line of decimal ids into expected (room for cap); returns the count. */
static size_t s_parse_ids(const char *line, int32_t *expected, size_t cap)
{
    size_t n = 0;
    for (const char *p = line; n < cap;) {
        char *q;
        long v = strtol(p, &q, 10);
        if (q == p)
            break;
        expected[n++] = (int32_t)v;
        p = q;
    }
    return n;
}

/*
 * Check llama.cpp's test vectors for the vocabulary NAME (ggml-vocab-NAME.gguf.inp and
 * .out under UNMASKD_DATA): one string per separator-terminated block of .inp, one
 * line of ids per string in .out. Returns the number of strings checked, 0 when the
 * files are missing (after a skip message).
 */
static int s_check_llamacpp_vectors(void *tok, const char *name, int reversible)
{
    char rel[256], label[96];
    snprintf(label, sizeof label, "llama.cpp %s vectors", name);
    snprintf(rel, sizeof rel, "llamacpp-vocab-tests/ggml-vocab-%s.gguf.inp", name);
    const char *inp_path = s_data_file(label, rel);
    if (!inp_path)
        return 0;
    char *inp = um_test_read_file(inp_path, NULL);
    snprintf(rel, sizeof rel, "llamacpp-vocab-tests/ggml-vocab-%s.gguf.out", name);
    const char *out_path = s_data_file(label, rel);
    char *out = out_path ? um_test_read_file(out_path, NULL) : NULL;
    ck_assert_msg(inp && out, "cannot read the llama.cpp %s test vectors", name);

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
        int32_t expected[512];
        size_t n_expected = s_parse_ids(line, expected, 512);
        char case_label[96];
        snprintf(case_label, sizeof case_label, "llama.cpp %s string %d", name, count);
        s_check_ids(tok, case_label, text, (size_t)(end - text), expected, n_expected,
                    reversible);
        count++;
        text = end + sizeof sep - 1;
        line = nl ? nl + 1 : NULL;
    }
    ck_assert_msg(count == 46, "%s: checked %d strings, expected 46", name, count);
    free(inp);
    free(out);
    return count;
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
    s_check_llamacpp_vectors(tok, "gpt-2", 1);

    s_ops->unload(tok);
    s_tmpdir_remove();
}
END_TEST

/* ------------------------------------------------------------------------- */
/* Byte-level BPE from separate vocabulary and merges files                  */

/* Write the 256 byte pieces of s_tiny_doc (id = byte value) plus extra as vocab JSON. */
static void s_write_tiny_vocab(const char *name, json_t *extra)
{
    json_t *doc = s_tiny_doc(s_byte_level(0, 1));
    json_t *vocab = json_object_get(json_object_get(doc, "model"), "vocab");
    if (extra)
        json_object_update(vocab, extra);
    ck_assert_msg(json_dump_file(vocab, um_test_path(s_tmpdir, name), 0) == 0,
                  "cannot write %s", name);
    json_decref(doc);
    json_decref(extra);
}

START_TEST(test_bpe_gpt2_file_pair)
{
    s_write_tiny_vocab("encoder.json", json_pack("{s:i, s:i}", "ab", 256, "<|endoftext|>", 257));
    s_write_str("vocab.bpe", "#version: 0.2\na b\n");
    ck_assert_int_eq(s_ops->probe(s_tmpdir), 80);
    void *tok = s_load(s_tmpdir);
    ck_assert_int_eq(s_ops->vocab_size(tok), 258);
    S_EXPECT_IDS(tok, "ab a", 256, ' ', 'a');
    S_EXPECT_IDS(tok, "x<|endoftext|>ab", 'x', 257, 256);
    ck_assert_int_eq(s_ops->is_special(tok, 257), 1);
    ck_assert_int_eq(s_ops->is_special(tok, 256), 0);
    s_ops->unload(tok);
}
END_TEST

/*
 * Write vocab.json and merges.txt where "1234" splits differently under the two
 * patterns: GPT-2 keeps the digits one word, which the merges "3 4" (first) and
 * "1 2" turn into 12 + 34; LLaMA-3 cuts "123" + "4" and merges "123" whole. "xyz" is
 * in the vocabulary but no merge reaches it.
 */
static void s_write_pattern_files(void)
{
    s_write_tiny_vocab("vocab.json", json_pack("{s:i, s:i, s:i, s:i, s:i}", "34", 256, "12",
                                               257, "123", 258, "xyz", 259, "'RE", 260));
    s_write_str("merges.txt", "3 4\n1 2\n12 3\n");
}

START_TEST(test_bpe_pattern_gpt2_default)
{
    s_write_pattern_files();
    ck_assert_int_eq(s_ops->probe(s_tmpdir), 80);
    void *tok = s_load(s_tmpdir);
    S_EXPECT_IDS(tok, "1234", 257, 256);
    S_EXPECT_IDS(tok, "xyz", 'x', 'y', 'z'); /* no ignore_merges */
    S_EXPECT_IDS(tok, "'RE", '\'', 'R', 'E'); /* GPT-2's contractions are lower case only */
    s_ops->unload(tok);
}
END_TEST

START_TEST(test_bpe_pattern_llama3_selected)
{
    s_write_pattern_files();
    s_write_str("special_tokens.txt", "300\t<|begin_of_text|>\n301\t<|eot_id|>\n");
    void *tok = s_load(s_tmpdir);
    ck_assert_int_eq(s_ops->vocab_size(tok), 302);
    S_EXPECT_IDS(tok, "1234", 258, '4');
    S_EXPECT_IDS(tok, "xyz", 259); /* ignore_merges: a word in the vocabulary is one token */
    S_EXPECT_IDS(tok, "'RE", 260); /* LLaMA-3's contractions match in any case */
    S_EXPECT_IDS(tok, "<|begin_of_text|>12<|eot_id|>", 300, 257, 301);
    ck_assert_int_eq(s_ops->is_special(tok, 300), 1);
    s_ops->unload(tok);

    /* tokenizer_config.json's added_tokens_decoder selects it as well. */
    unlink(um_test_path(s_tmpdir, "special_tokens.txt"));
    s_write_str("tokenizer_config.json", "{\"added_tokens_decoder\": {\"300\": {\"content\": "
                "\"<|begin_of_text|>\", \"special\": true}}}");
    tok = s_load(s_tmpdir);
    S_EXPECT_IDS(tok, "1234", 258, '4');
    s_ops->unload(tok);
}
END_TEST

/* A malformed file of a vocabulary + merges pair: the other files are valid. */
typedef struct s_bad_pair {
    const char *label;
    const char *file;    /* the file written with content */
    const char *content;
    int code;
    const char *message; /* a substring the message must contain */
} s_bad_pair_t;

static const s_bad_pair_t s_bad_pairs[] = {
    {"merge of three parts", "merges.txt", "a c\na c c\n", UM_EFORMAT,
     "merges.txt: line 2 is \"a c c\"; expected two pieces separated by one space"},
    {"merge piece missing", "merges.txt", "a b\n", UM_EFORMAT,
     "merges.txt: line 1 (\"a b\"): the second piece is not in the vocabulary"},
    {"merged piece missing", "merges.txt", "a c\nc a\n", UM_EFORMAT,
     "merges.txt: line 2 (\"c a\"): the merged piece is not in the vocabulary"},
    {"merge invalid UTF-8", "merges.txt", "a c\n\xff c\n", UM_EFORMAT,
     "merges.txt: line 2 is not valid UTF-8: byte 0xff at byte offset 4"},
    {"merge empty line", "merges.txt", "a c\n\na c\n", UM_EFORMAT,
     "merges.txt: line 2 is empty"},
    {"merge NUL byte", "merges.txt", "a c\nc\0 a\n", UM_EFORMAT,
     "merges.txt: line 2 contains a NUL byte at byte offset 5"},
    {"vocab invalid JSON", "vocab.json", "{\"a\": 0,\n \"c\" 1}", UM_EFORMAT,
     "vocab.json: invalid JSON at line 2"},
    {"vocab not an object", "vocab.json", "[\"a\"]", UM_EFORMAT,
     "vocab.json: the top level must be a JSON object"},
    {"vocab negative id", "vocab.json", "{\"a\": -1, \"c\": 1, \"ac\": 2}", UM_EFORMAT,
     "vocab.json: entry \"a\" must map a non-empty piece to an integer id"},
    {"vocab repeated id", "vocab.json", "{\"a\": 0, \"c\": 0, \"ac\": 2}", UM_EFORMAT,
     "vocab.json: entry \"c\" repeats id 0"},
    {"special token line", "special_tokens.txt", "300 <s>\n", UM_EFORMAT,
     "special_tokens.txt: line 1 is \"300 <s>\"; expected a token id"},
    {"config added tokens", "tokenizer_config.json", "{\"added_tokens_decoder\": {\"x\": "
     "{\"content\": \"<s>\"}}}", UM_EFORMAT, "tokenizer_config.json: added_tokens_decoder[\"x\"]"},
};

START_TEST(test_bpe_malformed_file_pairs)
{
    char err[1024];
    for (size_t i = 0; i < sizeof s_bad_pairs / sizeof s_bad_pairs[0]; i++) {
        const s_bad_pair_t *bad = &s_bad_pairs[i];
        s_write_str("vocab.json", "{\"a\": 0, \"c\": 1, \"ac\": 2}");
        s_write_str("merges.txt", "a c\n");
        unlink(um_test_path(s_tmpdir, "special_tokens.txt"));
        unlink(um_test_path(s_tmpdir, "tokenizer_config.json"));
        size_t len = strlen(bad->content);
        if (strstr(bad->label, "NUL"))
            len = 9; /* "a c\nc\0 a\n" */
        s_write_file(bad->file, bad->content, len);

        err[0] = '\0';
        void *tok = (void *)&err;
        long live = s_live_blocks;
        int rc = s_ops->load(&s_host, s_tmpdir, &tok, err, sizeof err);
        ck_assert_msg(rc == bad->code, "%s: load returned %s, expected %s (message: %s)",
                      bad->label, um_error_name(rc), um_error_name(bad->code), err);
        ck_assert_msg(tok == NULL, "%s: load failed but set the tokenizer", bad->label);
        ck_assert_msg(strstr(err, bad->message) != NULL, "%s: message \"%s\" does not contain "
                      "\"%s\"", bad->label, err, bad->message);
        ck_assert_msg(s_live_blocks == live, "%s: the failed load leaked %ld allocations",
                      bad->label, s_live_blocks - live);
    }
}
END_TEST

/* ------------------------------------------------------------------------- */
/* WordPiece                                                                 */

static void s_wordpiece_open(void)
{
    s_plugin_open_file("wordpiece.so");
}

/*
 * The small vocabulary of the WordPiece cases, one token per line, so the id of a
 * token is its line number - 1. It has no upper-case entries, so it loads as uncased.
 */
static const char *const s_wp_vocab[] = {
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",           /* 0..4 */
    "hello", "world", "un", "##aff", "##able",              /* 5..9 */
    ",", ".", "!", "'", "t",                                /* 10..14 */
    "don", "the", "cafe", "\xE4\xB8\xAD", "\xE6\x96\x87",   /* 15..19: 中 文 */
    "i", "##s", "a", "##a", "\xC3\xA9",                     /* 20..24: é */
};

enum { S_WP_UNK = 1, S_WP_CLS = 2, S_WP_SEP = 3, S_WP_MASK = 4, S_WP_HELLO = 5, S_WP_WORLD = 6 };

/* Write vocab.txt from s_wp_vocab followed by the lines of extra (may be NULL). */
static void s_write_wp_vocab(const char *extra)
{
    char text[2048] = "";
    for (size_t i = 0; i < sizeof s_wp_vocab / sizeof s_wp_vocab[0]; i++) {
        strcat(text, s_wp_vocab[i]);
        strcat(text, "\n");
    }
    if (extra)
        strcat(text, extra);
    s_write_str("vocab.txt", text);
}

/* Encode text and compare with the expected ids; the decoded text must encode the same. */
#define S_EXPECT_WP(tok, text, ...)                                                    \
    do {                                                                               \
        const int32_t expected_[] = {__VA_ARGS__};                                    \
        s_check_ids((tok), (text), (text), strlen(text), expected_,                    \
                    sizeof expected_ / sizeof expected_[0], 0);                        \
    } while (0)

/* Decode ids and compare with text. */
static void s_expect_decode(void *tok, const int32_t *ids, size_t n, unsigned flags,
                            const char *text)
{
    size_t len = 0;
    char *out = s_decode(tok, ids, n, flags, &len);
    ck_assert_msg(strcmp(out, text) == 0, "decoded \"%s\", expected \"%s\"", out, text);
    ck_assert_uint_eq(len, strlen(text));
    free(out);
}

#define S_EXPECT_DECODE(tok, flags, text, ...)                                          \
    do {                                                                                \
        const int32_t ids_[] = {__VA_ARGS__};                                           \
        s_expect_decode((tok), ids_, sizeof ids_ / sizeof ids_[0], (flags), (text));    \
    } while (0)

START_TEST(test_wordpiece_descriptor)
{
    ck_assert_uint_eq(s_desc->abi_major, UM_PLUGIN_ABI_MAJOR);
    ck_assert_uint_eq(s_desc->kind, UM_PLUGIN_TOKENIZER);
    ck_assert_str_eq(s_desc->name, "wordpiece");
    ck_assert_ptr_null(s_desc->remask);
    ck_assert_uint_eq(s_ops->struct_size, sizeof(um_tokenizer_ops_t));
    ck_assert_int_eq(s_ops->probe("/nonexistent/model/folder"), 0);
}
END_TEST

START_TEST(test_wordpiece_basic_rules)
{
    s_write_wp_vocab(NULL);
    ck_assert_int_eq(s_ops->probe(s_tmpdir), 80);
    void *tok = s_load(s_tmpdir);
    ck_assert_int_eq(s_ops->vocab_size(tok), 25);

    S_EXPECT_WP(tok, "Hello World", S_WP_HELLO, S_WP_WORLD);  /* lowercased */
    S_EXPECT_WP(tok, "unaffable", 7, 8, 9);                     /* ## continuation */
    S_EXPECT_WP(tok, "hello,world!", S_WP_HELLO, 10, S_WP_WORLD, 12); /* punctuation */
    S_EXPECT_WP(tok, "Don't", 15, 13, 14);
    S_EXPECT_WP(tok, "aaaa", 22, 23, 23, 23);
    S_EXPECT_WP(tok, "xyz", S_WP_UNK);                          /* no piece at all */
    S_EXPECT_WP(tok, "unaffz hello", S_WP_UNK, S_WP_HELLO);     /* a whole word fails */
    size_t n = 0;
    int32_t *ids = s_encode(tok, " \t\n ", 4, &n);
    ck_assert_uint_eq(n, 0);
    free(ids);
    ids = s_encode(tok, "", 0, &n);
    ck_assert_uint_eq(n, 0);
    free(ids);
    s_ops->unload(tok);
}
END_TEST

START_TEST(test_wordpiece_hard_cases)
{
    s_write_wp_vocab(NULL);
    void *tok = s_load(s_tmpdir);

    /* Accents go, whether precomposed, combining (U+0301) or on a capital. */
    S_EXPECT_WP(tok, "caf\xC3\xA9", 17);
    S_EXPECT_WP(tok, "cafe\xCC\x81", 17);
    S_EXPECT_WP(tok, "CAF\xC3\x89", 17);
    S_EXPECT_WP(tok, "\xC4\xB0", 20); /* U+0130 capital I with dot: NFD drops the dot */
    /* CJK ideographs are words of their own even without spaces. */
    S_EXPECT_WP(tok, "\xE4\xB8\xAD\xE6\x96\x87", 18, 19);
    S_EXPECT_WP(tok, "hello\xE4\xB8\xAD" "world", S_WP_HELLO, 18, S_WP_WORLD);
    /* Emoji are not in the vocabulary; U+200D (format) and U+FE0F (mark) vanish. */
    S_EXPECT_WP(tok, "hello \xF0\x9F\x98\x80", S_WP_HELLO, S_WP_UNK);
    S_EXPECT_WP(tok, "\xF0\x9F\x98\xB6\xE2\x80\x8D\xF0\x9F\x8C\xAB\xEF\xB8\x8F", S_WP_UNK);
    /* Control and format characters vanish inside a word. */
    S_EXPECT_WP(tok, "hel\x01lo", S_WP_HELLO);
    S_EXPECT_WP(tok, "hel\xE2\x80\x8Dlo", S_WP_HELLO);
    /* Other whitespace separates words: NBSP, U+3000, U+2028, tabs and newlines. */
    S_EXPECT_WP(tok, "hello\xC2\xA0world", S_WP_HELLO, S_WP_WORLD);
    S_EXPECT_WP(tok, "hello\xE3\x80\x80world", S_WP_HELLO, S_WP_WORLD);
    S_EXPECT_WP(tok, "hello\xE2\x80\xA8world", S_WP_HELLO, S_WP_WORLD);
    S_EXPECT_WP(tok, "\thello\r\n\nworld\n", S_WP_HELLO, S_WP_WORLD);

    /* A long run of whitespace is one separator. */
    size_t len = 5 + 100000 + 5;
    char *text = malloc(len + 1);
    memcpy(text, "hello", 5);
    for (size_t i = 5; i < len - 5; i++)
        text[i] = " \t\n"[i % 3];
    memcpy(text + len - 5, "world", 6);
    const int32_t expected[] = {S_WP_HELLO, S_WP_WORLD};
    s_check_ids(tok, "100000 whitespace characters", text, len, expected, 2, 0);
    free(text);

    s_check_invalid_utf8(tok);
    s_ops->unload(tok);
}
END_TEST

START_TEST(test_wordpiece_max_chars)
{
    s_write_wp_vocab(NULL);
    void *tok = s_load(s_tmpdir);
    /* The default limit is 100 characters: 100 a's are 100 pieces, 101 are unknown. */
    char word[102];
    memset(word, 'a', 101);
    word[100] = '\0';
    size_t n = 0;
    int32_t *ids = s_encode(tok, word, 100, &n);
    ck_assert_uint_eq(n, 100);
    ck_assert_int_eq(ids[0], 22);
    ck_assert_int_eq(ids[99], 23);
    free(ids);
    word[100] = 'a';
    word[101] = '\0';
    S_EXPECT_WP(tok, word, S_WP_UNK);
    /* The limit counts characters, not bytes: 100 á's (200 bytes) are still pieces. */
    char accents[203];
    for (int i = 0; i < 101; i++)
        memcpy(accents + 2 * i, "\xC3\xA1", 2);
    accents[202] = '\0';
    ids = s_encode(tok, accents, 200, &n);
    ck_assert_uint_eq(n, 100);
    ck_assert_int_eq(ids[0], 22); /* stripped to "a" */
    free(ids);
    S_EXPECT_WP(tok, accents, S_WP_UNK);
    s_ops->unload(tok);
}
END_TEST

START_TEST(test_wordpiece_special_tokens)
{
    s_write_wp_vocab(NULL);
    void *tok = s_load(s_tmpdir);
    S_EXPECT_WP(tok, "[CLS]hello [SEP][MASK]", S_WP_CLS, S_WP_HELLO, S_WP_SEP, S_WP_MASK);
    /* Special tokens match before lowercasing, so "[cls]" is three unknown words. */
    S_EXPECT_WP(tok, "[cls]", S_WP_UNK, S_WP_UNK, S_WP_UNK);
    ck_assert_int_eq(s_ops->is_special(tok, S_WP_CLS), 1);
    ck_assert_int_eq(s_ops->is_special(tok, S_WP_UNK), 1);
    ck_assert_int_eq(s_ops->is_special(tok, S_WP_HELLO), 0);
    ck_assert_int_eq(s_ops->is_special(tok, 25), 0);
    ck_assert_int_eq(s_id(tok, "##aff"), 8);
    int32_t id = 77;
    ck_assert_int_eq(s_ops->token_to_id(tok, "aff", &id), UM_ENOTFOUND);
    ck_assert_int_eq(id, 77);
    s_ops->unload(tok);
}
END_TEST

START_TEST(test_wordpiece_decode_rules)
{
    s_write_wp_vocab(NULL);
    void *tok = s_load(s_tmpdir);
    /* "##" pieces join their word; other tokens follow a space. */
    S_EXPECT_DECODE(tok, 0, "unaffable hello", 7, 8, 9, S_WP_HELLO);
    /* Cleanup takes the space off before . , ! ? and around a lone apostrophe. */
    S_EXPECT_DECODE(tok, 0, "hello, world!", S_WP_HELLO, 10, S_WP_WORLD, 12);
    S_EXPECT_DECODE(tok, 0, "don't.", 15, 13, 14, 11);
    /* The first token keeps its "##". */
    S_EXPECT_DECODE(tok, 0, "##aff hello", 8, S_WP_HELLO);
    S_EXPECT_DECODE(tok, 0, "[CLS] hello [SEP]", S_WP_CLS, S_WP_HELLO, S_WP_SEP);
    S_EXPECT_DECODE(tok, UM_DECODE_SKIP_SPECIAL, "hello world", S_WP_CLS, S_WP_HELLO, S_WP_SEP,
                    S_WP_WORLD);
    char out[8];
    size_t len = 0;
    const int32_t bad[] = {S_WP_HELLO, 25};
    ck_assert_int_eq(s_ops->decode(tok, bad, 2, 0, out, sizeof out, &len), UM_ERANGE);
    s_ops->unload(tok);

    /* clean_up_tokenization_spaces false keeps every space. */
    s_write_str("tokenizer_config.json", "{\"clean_up_tokenization_spaces\": false}");
    tok = s_load(s_tmpdir);
    S_EXPECT_DECODE(tok, 0, "hello , world !", S_WP_HELLO, 10, S_WP_WORLD, 12);
    s_ops->unload(tok);
}
END_TEST

START_TEST(test_wordpiece_config_case)
{
    /* A cased model: nothing is lowercased, and accents stay by default. */
    s_write_wp_vocab("Hello\n");
    s_write_str("tokenizer_config.json", "{\"do_lower_case\": false}");
    void *tok = s_load(s_tmpdir);
    S_EXPECT_WP(tok, "Hello hello HELLO", 25, S_WP_HELLO, S_WP_UNK);
    S_EXPECT_WP(tok, "\xC3\xA9", 24);
    s_ops->unload(tok);

    /* Lowercase without stripping accents: é stays, and U+0130 keeps its dot (U+0307). */
    s_write_str("tokenizer_config.json", "{\"do_lower_case\": true, \"strip_accents\": false}");
    tok = s_load(s_tmpdir);
    S_EXPECT_WP(tok, "\xC3\x89", 24);
    S_EXPECT_WP(tok, "\xC4\xB0", S_WP_UNK);
    s_ops->unload(tok);

    /* Without a config, many capitalized entries make the vocabulary cased. */
    unlink(um_test_path(s_tmpdir, "tokenizer_config.json"));
    s_write_wp_vocab("Hello\nWorld\nThe\n");
    tok = s_load(s_tmpdir);
    S_EXPECT_WP(tok, "Hello World", 25, 26);
    s_ops->unload(tok);
}
END_TEST

/* A WordPiece tokenizer.json with the vocabulary of s_wp_vocab and max_chars 5. */
static json_t *s_wp_json(void)
{
    json_t *vocab = json_object();
    json_t *added = json_array();
    for (size_t i = 0; i < sizeof s_wp_vocab / sizeof s_wp_vocab[0]; i++) {
        json_object_set_new(vocab, s_wp_vocab[i], json_integer((json_int_t)i));
        if (i <= S_WP_MASK)
            json_array_append_new(added, json_pack("{s:i, s:s, s:b}", "id", (int)i, "content",
                                                   s_wp_vocab[i], "special", 1));
    }
    return json_pack("{s:{s:s, s:s, s:s, s:i, s:o}, s:{s:s, s:b, s:b, s:n, s:b}, s:{s:s}, "
                     "s:{s:s, s:s, s:b}, s:o}",
                     "model", "type", "WordPiece", "unk_token", "[UNK]",
                     "continuing_subword_prefix", "##", "max_input_chars_per_word", 5, "vocab",
                     vocab, "normalizer", "type", "BertNormalizer", "clean_text", 1,
                     "handle_chinese_chars", 1, "strip_accents", "lowercase", 1,
                     "pre_tokenizer", "type", "BertPreTokenizer", "decoder", "type",
                     "WordPiece", "prefix", "##", "cleanup", 1, "added_tokens", added);
}

START_TEST(test_wordpiece_tokenizer_json)
{
    json_t *doc = s_wp_json();
    s_write_doc(doc);
    json_decref(doc);
    ck_assert_int_eq(s_ops->probe(s_tmpdir), 90);
    void *tok = s_load(s_tmpdir);
    S_EXPECT_WP(tok, "AAAAA", 22, 23, 23, 23, 23);
    S_EXPECT_WP(tok, "aaaaaa", S_WP_UNK); /* over max_input_chars_per_word */
    S_EXPECT_WP(tok, "[MASK] Caf\xC3\xA9!", S_WP_MASK, 17, 12);
    ck_assert_int_eq(s_ops->is_special(tok, S_WP_MASK), 1);
    S_EXPECT_DECODE(tok, 0, "hello, world!", S_WP_HELLO, 10, S_WP_WORLD, 12);
    s_ops->unload(tok);

    /* With a null normalizer nothing is lowercased or split around CJK. */
    doc = s_wp_json();
    json_object_set_new(doc, "normalizer", json_null());
    s_write_doc(doc);
    json_decref(doc);
    tok = s_load(s_tmpdir);
    S_EXPECT_WP(tok, "Hello hello", S_WP_UNK, S_WP_HELLO);
    S_EXPECT_WP(tok, "\xE4\xB8\xAD\xE6\x96\x87", S_WP_UNK);
    s_ops->unload(tok);

    /* A tokenizer.json of another model type makes the probe decline the folder. */
    s_write_wp_vocab(NULL);
    s_write_text("{\"model\": {\"type\": \"BPE\", \"vocab\": {}, \"merges\": []}}");
    ck_assert_int_eq(s_ops->probe(s_tmpdir), 0);
}
END_TEST

/* A malformed WordPiece folder: files written before loading, and what load returns. */
typedef struct s_bad_wp {
    const char *label;
    const char *vocab_txt;      /* NULL: no vocab.txt */
    size_t vocab_len;           /* 0: strlen(vocab_txt) */
    const char *tokenizer_json; /* NULL: none */
    const char *config;         /* NULL: no tokenizer_config.json */
    int code;
    const char *message;
} s_bad_wp_t;

#define S_WP_OK_VOCAB "[UNK]\nhello\n"

static const s_bad_wp_t s_bad_wps[] = {
    {"invalid UTF-8", "[UNK]\nhello\nab\xff\xfe\n", 0, NULL, NULL, UM_EFORMAT,
     "vocab.txt: line 3 is not valid UTF-8: byte 0xff at byte offset 14"},
    {"empty line", "[UNK]\n\nhello\n", 0, NULL, NULL, UM_EFORMAT,
     "vocab.txt: line 2 (byte offset 6) is empty"},
    {"NUL byte", "[UNK]\nhel\0lo\n", 13, NULL, NULL, UM_EFORMAT,
     "vocab.txt: line 2 contains a NUL byte at byte offset 9"},
    {"empty file", "", 0, NULL, NULL, UM_EFORMAT, "vocab.txt: the file is empty"},
    {"no unknown token", "hello\nworld\n", 0, NULL, NULL, UM_EFORMAT,
     "vocab.txt: the unknown token \"[UNK]\" is not in the vocabulary"},
    {"no files", NULL, 0, NULL, NULL, UM_ENOTFOUND, "vocab.txt: not found"},
    {"config not boolean", S_WP_OK_VOCAB, 0, NULL, "{\"do_lower_case\": \"yes\"}", UM_EFORMAT,
     "tokenizer_config.json: do_lower_case must be true or false"},
    {"config invalid JSON", S_WP_OK_VOCAB, 0, NULL, "{\"do_lower_case\": }", UM_EFORMAT,
     "tokenizer_config.json: invalid JSON at line 1"},
    {"config added token mismatch", S_WP_OK_VOCAB, 0, NULL, "{\"added_tokens_decoder\": "
     "{\"1\": {\"content\": \"[SEP]\", \"special\": true}}}", UM_EFORMAT,
     "tokenizer_config.json: added_tokens_decoder gives id 1 to \"[SEP]\" but vocab.txt line "
     "2 is \"hello\""},
    {"json model type", NULL, 0, "{\"model\": {\"type\": \"BPE\", \"vocab\": {}}}", NULL,
     UM_EUNSUPPORTED, "tokenizer.json: model.type is \"BPE\""},
    {"json invalid", NULL, 0, "{\"model\": \n\n[", NULL, UM_EFORMAT,
     "tokenizer.json: invalid JSON at line 3"},
    {"json normalizer", NULL, 0, "{\"model\": {\"type\": \"WordPiece\", \"vocab\": "
     "{\"[UNK]\": 0}}, \"normalizer\": {\"type\": \"Lowercase\"}}", NULL, UM_EUNSUPPORTED,
     "tokenizer.json: normalizer of type \"Lowercase\" is not supported"},
    {"json pre-tokenizer", NULL, 0, "{\"model\": {\"type\": \"WordPiece\", \"vocab\": {\"[UNK]\": "
     "0}}, \"pre_tokenizer\": {\"type\": \"Whitespace\"}}", NULL, UM_EUNSUPPORTED,
     "tokenizer.json: pre_tokenizer of type \"Whitespace\" is not supported"},
    {"json repeated id", NULL, 0, "{\"model\": {\"type\": \"WordPiece\", \"vocab\": {\"[UNK]\": 0, "
     "\"a\": 0}}, \"pre_tokenizer\": {\"type\": \"BertPreTokenizer\"}}", NULL, UM_EFORMAT,
     "tokenizer.json: model.vocab gives id 0 to both"},
    {"json id not a number", NULL, 0, "{\"model\": {\"type\": \"WordPiece\", \"vocab\": "
     "{\"[UNK]\": \"0\"}}, \"pre_tokenizer\": {\"type\": \"BertPreTokenizer\"}}", NULL,
     UM_EFORMAT,
     "tokenizer.json: model.vocab[\"[UNK]\"] must be an integer token id"},
};

START_TEST(test_wordpiece_malformed_files)
{
    for (size_t i = 0; i < sizeof s_bad_wps / sizeof s_bad_wps[0]; i++) {
        const s_bad_wp_t *bad = &s_bad_wps[i];
        unlink(um_test_path(s_tmpdir, "vocab.txt"));
        unlink(um_test_path(s_tmpdir, "tokenizer.json"));
        unlink(um_test_path(s_tmpdir, "tokenizer_config.json"));
        if (bad->vocab_txt)
            s_write_file("vocab.txt", bad->vocab_txt,
                         bad->vocab_len ? bad->vocab_len : strlen(bad->vocab_txt));
        if (bad->tokenizer_json)
            s_write_str("tokenizer.json", bad->tokenizer_json);
        if (bad->config)
            s_write_str("tokenizer_config.json", bad->config);

        char err[1024] = "";
        void *tok = (void *)&err;
        long live = s_live_blocks;
        int rc = s_ops->load(&s_host, s_tmpdir, &tok, err, sizeof err);
        ck_assert_msg(rc == bad->code, "%s: load returned %s, expected %s (message: %s)",
                      bad->label, um_error_name(rc), um_error_name(bad->code), err);
        ck_assert_msg(tok == NULL, "%s: load failed but set the tokenizer", bad->label);
        ck_assert_msg(strstr(err, bad->message) != NULL, "%s: message \"%s\" does not contain "
                      "\"%s\"", bad->label, err, bad->message);
        ck_assert_msg(strstr(err, s_tmpdir) != NULL, "%s: message \"%s\" does not name the "
                      "folder", bad->label, err);
        ck_assert_msg(s_live_blocks == live, "%s: the failed load leaked %ld allocations",
                      bad->label, s_live_blocks - live);
    }
}
END_TEST

START_TEST(test_wordpiece_buffers)
{
    s_write_wp_vocab(NULL);
    long live = s_live_blocks;
    void *tok = s_load(s_tmpdir);
    int32_t ids[4] = {-7, -7, -7, -7};
    size_t n = 0;
    ck_assert_int_eq(s_ops->encode(tok, "hello, world", 12, NULL, 0, &n), UM_ENOSPACE);
    ck_assert_uint_eq(n, 3);
    ck_assert_int_eq(s_ops->encode(tok, "hello, world", 12, ids, 2, &n), UM_ENOSPACE);
    ck_assert_int_eq(ids[2], -7); /* nothing written past cap */
    ck_assert_int_eq(s_ops->encode(tok, "hello, world", 12, ids, 3, &n), UM_OK);
    ck_assert_int_eq(ids[1], 10);

    char out[16];
    size_t len = 0;
    ck_assert_int_eq(s_ops->decode(tok, ids, 3, 0, out, 12, &len), UM_ENOSPACE);
    ck_assert_uint_eq(len, 12); /* "hello, world" needs 13 bytes with the NUL */
    ck_assert_int_eq(s_ops->decode(tok, ids, 3, 0, out, 13, &len), UM_OK);
    ck_assert_str_eq(out, "hello, world");
    s_ops->unload(tok);
    ck_assert_msg(s_live_blocks == live, "unload left %ld host allocations",
                  s_live_blocks - live);
}
END_TEST

/*
 * The vocabulary of the bundled DistilBERT model (models/tinystories-distilbert) against
 * the ids and decoded text that tools/train_wordpiece.py's own WordPiece encoder wrote
 * into tests/fixtures/wordpiece-tinystories.json. Cases marked round_trip decode to the
 * normalized input; every case re-encodes its decoded text to the same ids.
 */
START_TEST(test_wordpiece_bundled_model)
{
    char dir[4096];
    snprintf(dir, sizeof dir, "%s/models/tinystories-distilbert", um_test_env("UM_TEST_SRCDIR"));
    ck_assert_int_eq(s_ops->probe(dir), 90); /* tokenizer.json with a WordPiece model */
    long live = s_live_blocks;
    void *tok = s_load(dir);
    ck_assert_int_eq(s_ops->vocab_size(tok), 4096);
    const char *specials[] = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"};
    for (int32_t i = 0; i < 5; i++) {
        ck_assert_int_eq(s_id(tok, specials[i]), i);
        ck_assert_int_eq(s_ops->is_special(tok, i), 1);
    }
    ck_assert_int_eq(s_ops->is_special(tok, s_id(tok, "the")), 0);

    const char *path = um_test_path(um_test_env("UM_TEST_FIXTURES"), "wordpiece-tinystories.json");
    json_error_t jerr;
    json_t *doc = json_load_file(path, 0, &jerr);
    ck_assert_msg(doc != NULL, "%s: %s (run tools/train_wordpiece.py --fixture)", path, jerr.text);
    ck_assert_int_eq(json_integer_value(json_object_get(doc, "vocab_size")), 4096);
    json_t *cases = json_object_get(doc, "cases");
    size_t i, n_round_trip = 0;
    json_t *c;
    json_array_foreach(cases, i, c) {
        const char *text = json_string_value(json_object_get(c, "text"));
        const char *normalized = json_string_value(json_object_get(c, "normalized"));
        const char *decoded = json_string_value(json_object_get(c, "decoded"));
        json_t *want = json_object_get(c, "ids");
        ck_assert(text && normalized && decoded && json_is_array(want));

        size_t n = 0;
        int32_t *ids = s_encode(tok, text, strlen(text), &n);
        ck_assert_msg(n == json_array_size(want), "case %zu \"%s\": %zu ids, expected %zu", i,
                      text, n, json_array_size(want));
        for (size_t k = 0; k < n; k++)
            ck_assert_msg(ids[k] == json_integer_value(json_array_get(want, k)),
                          "case %zu \"%s\": id %zu is %d, expected %d", i, text, k,
                          (int)ids[k], (int)json_integer_value(json_array_get(want, k)));

        size_t len = 0;
        char *out = s_decode(tok, ids, n, 0, &len);
        ck_assert_msg(strcmp(out, decoded) == 0, "case %zu: decoded \"%s\", expected \"%s\"", i,
                      out, decoded);
        if (json_is_true(json_object_get(c, "round_trip"))) {
            ck_assert_msg(strcmp(out, normalized) == 0,
                          "case %zu: decoded \"%s\", expected the normalized text \"%s\"", i,
                          out, normalized);
            n_round_trip++;
        }

        size_t n_again = 0;
        int32_t *again = s_encode(tok, out, len, &n_again);
        ck_assert_msg(n_again == n && memcmp(again, ids, n * sizeof *ids) == 0,
                      "case %zu: the decoded text \"%s\" encodes to other ids", i, out);
        free(again);
        free(out);
        free(ids);
    }
    ck_assert_uint_ge(json_array_size(cases), 8);
    ck_assert_uint_ge(n_round_trip, 5);
    json_decref(doc);
    s_ops->unload(tok);
    ck_assert_msg(s_live_blocks == live, "unload left %ld host allocations",
                  s_live_blocks - live);
}
END_TEST

/* ------------------------------------------------------------------------- */
/* SentencePiece                                                             */

static void s_spm_open(void)
{
    s_plugin_open_file("spm.so");
}

/* A growable buffer of protobuf wire format, for writing tokenizer.model files. */
typedef struct s_pb {
    unsigned char *data;
    size_t len, cap;
} s_pb_t;

static void s_pb_raw(s_pb_t *b, const void *p, size_t n)
{
    if (b->len + n > b->cap) {
        b->cap = 2 * (b->len + n) + 64;
        b->data = realloc(b->data, b->cap);
        ck_assert_ptr_nonnull(b->data);
    }
    memcpy(b->data + b->len, p, n);
    b->len += n;
}

static void s_pb_varint(s_pb_t *b, uint64_t v)
{
    do {
        unsigned char c = (unsigned char)(v & 0x7F);
        v >>= 7;
        if (v)
            c |= 0x80;
        s_pb_raw(b, &c, 1);
    } while (v);
}

static void s_pb_uint(s_pb_t *b, uint32_t field, uint64_t v)
{
    s_pb_varint(b, (uint64_t)field << 3 | 0);
    s_pb_varint(b, v);
}

static void s_pb_float(s_pb_t *b, uint32_t field, float v)
{
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    unsigned char le[4] = {(unsigned char)bits, (unsigned char)(bits >> 8),
                           (unsigned char)(bits >> 16), (unsigned char)(bits >> 24)};
    s_pb_varint(b, (uint64_t)field << 3 | 5);
    s_pb_raw(b, le, 4);
}

static void s_pb_bytes(s_pb_t *b, uint32_t field, const void *p, size_t n)
{
    s_pb_varint(b, (uint64_t)field << 3 | 2);
    s_pb_varint(b, n);
    s_pb_raw(b, p, n);
}

/* Append sub as a length-delimited field and empty it. */
static void s_pb_message(s_pb_t *b, uint32_t field, s_pb_t *sub)
{
    s_pb_bytes(b, field, sub->data, sub->len);
    free(sub->data);
    *sub = (s_pb_t){0};
}

/* A ModelProto.SentencePiece; type 0 leaves the field out (NORMAL by default). */
static void s_pb_piece(s_pb_t *model, const char *text, float score, int type)
{
    s_pb_t piece = {0};
    s_pb_bytes(&piece, 1, text, strlen(text));
    s_pb_float(&piece, 2, score);
    if (type)
        s_pb_uint(&piece, 3, (uint64_t)type);
    s_pb_message(model, 1, &piece);
}

/* Piece types of the wire format. */
enum { S_NORMAL = 1, S_UNKNOWN = 2, S_CONTROL = 3, S_USER = 4, S_UNUSED = 5, S_BYTE = 6 };

typedef struct s_spm_piece {
    const char *text;
    float score;
    int type; /* 0: NORMAL */
} s_spm_piece_t;

typedef struct s_spm_spec {
    int model_type;      /* 0: BPE (2) */
    int byte_fallback;
    int no_byte_pieces;  /* with byte_fallback, leave the <0xNN> pieces out */
    int no_dummy_prefix;
    int remove_extra_whitespaces;
    int no_specials;     /* leave out <unk>, <s> and </s> */
    const char *charsmap;
} s_spm_spec_t;

/*
 * Build a tokenizer.model: <unk>, <s>, </s> (ids 0..2), the 256 byte pieces with
 * byte_fallback (ids 3..258), then pieces. Returns the id of pieces[0]. The
 * trainer spec writes pad_id -1 as the 10-byte varint protobuf uses for it.
 */
static s_pb_t s_build_spm(const s_spm_spec_t *spec, const s_spm_piece_t *pieces, size_t n,
                          int32_t *first)
{
    s_pb_t model = {0}, sub = {0};
    int32_t next = 0;
    if (!spec->no_specials) {
        s_pb_piece(&model, "<unk>", 0, S_UNKNOWN);
        s_pb_piece(&model, "<s>", 0, S_CONTROL);
        s_pb_piece(&model, "</s>", 0, S_CONTROL);
        next = 3;
    }
    if (spec->byte_fallback && !spec->no_byte_pieces) {
        for (int b = 0; b < 256; b++) {
            char text[8];
            snprintf(text, sizeof text, "<0x%02X>", b);
            s_pb_piece(&model, text, 0, S_BYTE);
        }
        next += 256;
    }
    if (first)
        *first = next;
    for (size_t i = 0; i < n; i++)
        s_pb_piece(&model, pieces[i].text, pieces[i].score, pieces[i].type);

    s_pb_uint(&sub, 3, (uint64_t)(spec->model_type ? spec->model_type : 2));
    if (spec->byte_fallback)
        s_pb_uint(&sub, 35, 1);
    s_pb_uint(&sub, 43, (uint64_t)(int64_t)-1);
    s_pb_message(&model, 2, &sub);

    s_pb_bytes(&sub, 1, "identity", 8);
    if (spec->charsmap)
        s_pb_bytes(&sub, 2, spec->charsmap, strlen(spec->charsmap));
    s_pb_uint(&sub, 3, !spec->no_dummy_prefix);
    s_pb_uint(&sub, 4, (uint64_t)spec->remove_extra_whitespaces);
    s_pb_message(&model, 3, &sub);
    return model;
}

/* Write the model of s_build_spm to tokenizer.model; returns the id of pieces[0]. */
static int32_t s_write_spm(const s_spm_spec_t *spec, const s_spm_piece_t *pieces, size_t n)
{
    int32_t first = 0;
    s_pb_t model = s_build_spm(spec, pieces, n, &first);
    s_write_file("tokenizer.model", model.data, model.len);
    free(model.data);
    return first;
}

#define S_SPACE "\xE2\x96\x81" /* U+2581, SentencePiece's space marker */

START_TEST(test_spm_descriptor)
{
    ck_assert_uint_eq(s_desc->abi_major, UM_PLUGIN_ABI_MAJOR);
    ck_assert_uint_eq(s_desc->kind, UM_PLUGIN_TOKENIZER);
    ck_assert_str_eq(s_desc->name, "spm");
    ck_assert_ptr_null(s_desc->remask);
    ck_assert_uint_eq(s_ops->struct_size, sizeof(um_tokenizer_ops_t));
    ck_assert_int_eq(s_ops->probe("/nonexistent/model/folder"), 0);
}
END_TEST

START_TEST(test_spm_merge_by_score)
{
    /* "▁a" scores above "ab", so "ab" (normalized "▁ab") is ▁a + b ... */
    s_spm_piece_t pieces[] = {
        {S_SPACE, -1, 0}, {"a", -2, 0}, {"b", -3, 0}, {S_SPACE "a", -0.5f, 0}, {"ab", -0.8f, 0},
    };
    const s_spm_spec_t spec = {0};
    int32_t f = s_write_spm(&spec, pieces, 5);
    ck_assert_int_eq(s_ops->probe(s_tmpdir), 85);
    void *tok = s_load(s_tmpdir);
    ck_assert_int_eq(s_ops->vocab_size(tok), 8);
    S_EXPECT_IDS(tok, "ab", f + 3, f + 2);
    s_ops->unload(tok);

    /* ... and when "ab" scores higher it is ▁ + ab: the score decides, not the id. */
    pieces[4].score = -0.2f;
    f = s_write_spm(&spec, pieces, 5);
    tok = s_load(s_tmpdir);
    S_EXPECT_IDS(tok, "ab", f, f + 4);
    s_ops->unload(tok);

    /* Equal scores merge from the left: "aaa" is aa + a. */
    const s_spm_piece_t tie[] = {{"a", -1, 0}, {"aa", -0.5f, 0}};
    const s_spm_spec_t plain = {.no_dummy_prefix = 1};
    f = s_write_spm(&plain, tie, 2);
    tok = s_load(s_tmpdir);
    S_EXPECT_IDS(tok, "aaa", f + 1, f);
    S_EXPECT_IDS(tok, "aaaa", f + 1, f + 1);
    s_ops->unload(tok);
}
END_TEST

START_TEST(test_spm_byte_fallback)
{
    const s_spm_piece_t pieces[] = {
        {S_SPACE, -1, 0}, {"h", -2, 0}, {"i", -3, 0}, {S_SPACE "h", -1.5f, 0},
        {S_SPACE "hi", -1.2f, 0},
    };
    const s_spm_spec_t spec = {.byte_fallback = 1};
    int32_t f = s_write_spm(&spec, pieces, 5);
    void *tok = s_load(s_tmpdir);
    ck_assert_int_eq(s_ops->vocab_size(tok), 264);
    /* é is not a piece, so it becomes its UTF-8 bytes C3 A9 (byte b is id 3 + b). */
    S_EXPECT_IDS(tok, "hi \xC3\xA9", f + 4, f, 3 + 0xC3, 3 + 0xA9);
    /* Emoji, combining accents and CJK all round-trip through bytes. */
    S_EXPECT_IDS(tok, "\xF0\x9F\x98\x80", f, 3 + 0xF0, 3 + 0x9F, 3 + 0x98, 3 + 0x80);
    const char *hard = "e\xCC\x81 \xE4\xB8\xAD\xE6\x96\x87 \xF0\x9F\x98\xB6\xE2\x80\x8D"
                       "\xF0\x9F\x8C\xAB\xEF\xB8\x8F hi\t\n";
    s_check_text(tok, "hard cases", hard, strlen(hard), NULL, 0);
    ck_assert_int_eq(s_ops->is_special(tok, 3 + 0xC3), 0);

    /* Bytes that are no UTF-8 sequence decode to U+FFFD. */
    S_EXPECT_DECODE(tok, 0, "hi\xEF\xBF\xBD", f + 4, 3 + 0xC3);

    /* Long whitespace runs keep every space. */
    size_t len = 20000;
    char *text = malloc(len + 2);
    memset(text, ' ', len);
    memcpy(text + len, "hi", 2);
    s_check_text(tok, "20000 spaces", text, len + 2, NULL, 0);
    free(text);

    s_check_invalid_utf8(tok);
    s_ops->unload(tok);
}
END_TEST

START_TEST(test_spm_unknown_runs)
{
    /* Without byte fallback a run of characters that are no piece is one <unk>. */
    const s_spm_piece_t pieces[] = {{S_SPACE, -1, 0}, {"x", -2, 0}, {S_SPACE "x", -0.5f, 0}};
    const s_spm_spec_t spec = {0};
    int32_t f = s_write_spm(&spec, pieces, 3);
    void *tok = s_load(s_tmpdir);
    size_t n = 0;
    int32_t *ids = s_encode(tok, "\xC3\xA9\xC3\xA9 x \xC3\xBC", 9, &n);
    const int32_t expected[] = {f, 0, f + 2, f, 0};
    ck_assert_uint_eq(n, 5);
    for (size_t i = 0; i < n; i++)
        ck_assert_int_eq(ids[i], expected[i]);
    free(ids);
    ck_assert_int_eq(s_ops->is_special(tok, 0), 1);
    S_EXPECT_DECODE(tok, 0, "<unk> x <unk>", f, 0, f + 2, f, 0);
    S_EXPECT_DECODE(tok, UM_DECODE_SKIP_SPECIAL, " x ", f, 0, f + 2, f, 0);
    s_ops->unload(tok);
}
END_TEST

START_TEST(test_spm_user_defined)
{
    /* A user-defined piece matches literally and never merges with its neighbours. */
    const s_spm_piece_t pieces[] = {
        {S_SPACE, -1, 0}, {"a", -2, 0}, {"b", -3, 0}, {"<sep>", 0, S_USER},
        {S_SPACE "a", -0.5f, 0}, {"ab", -0.1f, 0}, {">b", -0.1f, 0},
    };
    const s_spm_spec_t spec = {0};
    int32_t f = s_write_spm(&spec, pieces, 7);
    void *tok = s_load(s_tmpdir);
    S_EXPECT_IDS(tok, "a<sep>b", f + 4, f + 3, f + 2);
    S_EXPECT_IDS(tok, "<sep><sep>", f, f + 3, f + 3);
    ck_assert_int_eq(s_ops->is_special(tok, f + 3), 0);
    s_ops->unload(tok);
}
END_TEST

START_TEST(test_spm_unused_piece)
{
    /* An UNUSED piece takes part in merges but is never emitted: it splits back. */
    const s_spm_piece_t pieces[] = {
        {"a", -1, 0}, {"b", -2, 0}, {"c", -3, 0}, {"ab", -0.1f, S_UNUSED}, {"abc", -0.5f, 0},
    };
    const s_spm_spec_t spec = {.no_dummy_prefix = 1};
    int32_t f = s_write_spm(&spec, pieces, 5);
    void *tok = s_load(s_tmpdir);
    S_EXPECT_IDS(tok, "ab", f, f + 1);
    S_EXPECT_IDS(tok, "abc", f + 4);
    S_EXPECT_IDS(tok, "abab", f, f + 1, f, f + 1);
    s_ops->unload(tok);
}
END_TEST

START_TEST(test_spm_normalizer_options)
{
    const s_spm_piece_t pieces[] = {
        {S_SPACE, -1, 0}, {"a", -2, 0}, {"b", -3, 0}, {S_SPACE "a", -0.5f, 0},
        {S_SPACE "b", -0.6f, 0},
    };
    /* remove_extra_whitespaces drops leading and trailing spaces and collapses runs. */
    s_spm_spec_t spec = {.remove_extra_whitespaces = 1};
    int32_t f = s_write_spm(&spec, pieces, 5);
    void *tok = s_load(s_tmpdir);
    const int32_t expected[] = {f + 3, f + 4};
    s_check_ids(tok, "extra spaces", "  a   b  ", 9, expected, 2, 0);
    S_EXPECT_IDS(tok, "a b", f + 3, f + 4);
    size_t n = 9;
    int32_t *ids = s_encode(tok, "    ", 4, &n);
    ck_assert_uint_eq(n, 0);
    free(ids);
    s_ops->unload(tok);

    /* Without the dummy prefix the first word has no space marker. */
    spec = (s_spm_spec_t){.no_dummy_prefix = 1};
    f = s_write_spm(&spec, pieces, 5);
    tok = s_load(s_tmpdir);
    S_EXPECT_IDS(tok, "a b", f + 1, f + 4);
    S_EXPECT_IDS(tok, " a", f + 3);
    s_ops->unload(tok);
}
END_TEST

START_TEST(test_spm_decode_rules)
{
    const s_spm_piece_t pieces[] = {
        {S_SPACE, -1, 0}, {"h", -2, 0}, {"i", -3, 0}, {S_SPACE "h", -1.5f, 0},
        {S_SPACE "hi", -1.2f, 0},
    };
    const s_spm_spec_t spec = {.byte_fallback = 1};
    int32_t f = s_write_spm(&spec, pieces, 5);
    const int32_t hi = f + 4, space = f;
    void *tok = s_load(s_tmpdir);

    ck_assert_int_eq(s_id(tok, "<s>"), 1);
    ck_assert_int_eq(s_id(tok, "</s>"), 2);
    ck_assert_int_eq(s_id(tok, "<0x41>"), 3 + 0x41);
    ck_assert_int_eq(s_ops->is_special(tok, 1), 1);
    ck_assert_int_eq(s_ops->is_special(tok, hi), 0);
    ck_assert_int_eq(s_ops->is_special(tok, -1), 0);

    /* The dummy prefix space of the first piece goes; a special token before it keeps it. */
    S_EXPECT_DECODE(tok, 0, "hi hi", hi, hi);
    S_EXPECT_DECODE(tok, 0, " hi", space, hi);
    S_EXPECT_DECODE(tok, 0, "<s> hi</s>", 1, hi, 2);
    S_EXPECT_DECODE(tok, UM_DECODE_SKIP_SPECIAL, "hi", 1, hi, 2);
    /* Control tokens are never matched in text: "<s>" is spelled with bytes. */
    size_t n = 0;
    int32_t *ids = s_encode(tok, "<s>", 3, &n);
    for (size_t i = 0; i < n; i++)
        ck_assert_int_ne(ids[i], 1);
    free(ids);
    /* U+2581 in the text decodes as a space: the one input that does not round-trip. */
    ids = s_encode(tok, "h" S_SPACE "i", 5, &n);
    size_t len = 0;
    char *text = s_decode(tok, ids, n, 0, &len);
    ck_assert_str_eq(text, "h i");
    free(text);
    free(ids);

    char out[8];
    const int32_t bad[] = {hi, f + 5};
    ck_assert_int_eq(s_ops->decode(tok, bad, 2, 0, out, sizeof out, &len), UM_ERANGE);
    ck_assert_int_eq(s_ops->encode(tok, "hi hi", 5, NULL, 0, &n), UM_ENOSPACE);
    ck_assert_uint_eq(n, 2);
    ck_assert_int_eq(s_ops->decode(tok, bad, 1, 0, out, 2, &len), UM_ENOSPACE);
    ck_assert_uint_eq(len, 2);
    s_ops->unload(tok);
}
END_TEST

/* Write tokenizer.model from raw bytes and check what load returns. */
static void s_expect_spm_error(const char *label, const void *data, size_t len, int code,
                               const char *message)
{
    s_write_file("tokenizer.model", data, len);
    char err[1024] = "";
    void *tok = (void *)&err;
    long live = s_live_blocks;
    int rc = s_ops->load(&s_host, s_tmpdir, &tok, err, sizeof err);
    ck_assert_msg(rc == code, "%s: load returned %s, expected %s (message: %s)", label,
                  um_error_name(rc), um_error_name(code), err);
    ck_assert_msg(tok == NULL, "%s: load failed but set the tokenizer", label);
    ck_assert_msg(strstr(err, message) != NULL, "%s: message \"%s\" does not contain \"%s\"",
                  label, err, message);
    ck_assert_msg(strstr(err, "tokenizer.model") != NULL, "%s: message \"%s\" does not name "
                  "the file", label, err);
    ck_assert_msg(s_live_blocks == live, "%s: the failed load leaked %ld allocations", label,
                  s_live_blocks - live);
}

/* Build a model with the given spec and pieces and expect load to fail. */
static void s_expect_spm_spec_error(const char *label, const s_spm_spec_t *spec,
                                    const s_spm_piece_t *pieces, size_t n, int code,
                                    const char *message)
{
    s_pb_t model = s_build_spm(spec, pieces, n, NULL);
    s_expect_spm_error(label, model.data, model.len, code, message);
    free(model.data);
}

START_TEST(test_spm_malformed_models)
{
    const s_spm_piece_t ok[] = {{"a", -1, 0}};
    const s_spm_spec_t plain = {0};

    s_expect_spm_error("empty file", "", 0, UM_EFORMAT, "has no pieces");
    s_pb_t model = s_build_spm(&plain, ok, 1, NULL);
    s_expect_spm_error("cut off", model.data, model.len - 3, UM_EFORMAT, "offset");
    free(model.data);

    /* A piece whose text field is a varint. */
    model = (s_pb_t){0};
    s_pb_t piece = {0}, trainer = {0};
    s_pb_uint(&piece, 1, 7);
    s_pb_message(&model, 1, &piece);
    s_pb_uint(&trainer, 3, 2);
    s_pb_message(&model, 2, &trainer);
    s_expect_spm_error("piece wire type", model.data, model.len, UM_EFORMAT,
                       "tokenizer.model: offset 2: SentencePiece.piece (field 1) has wire type "
                       "0, expected 2");
    free(model.data);

    /* A group (wire type 3), which protobuf 3 no longer writes. */
    const unsigned char group[] = {0x0B, 0x0C};
    s_expect_spm_error("group", group, sizeof group, UM_EFORMAT,
                       "offset 0: ModelProto: field 1 has wire type 3");

    const s_spm_piece_t twice[] = {{"a", -1, 0}, {"a", -2, 0}};
    s_expect_spm_spec_error("repeated piece", &plain, twice, 2, UM_EFORMAT,
                            "piece 4 \"a\" repeats piece 3");
    const s_spm_piece_t latin1[] = {{"caf\xE9", -1, 0}};
    s_expect_spm_spec_error("invalid UTF-8", &plain, latin1, 1, UM_EFORMAT,
                            "piece 3 is not valid UTF-8");
    const s_spm_piece_t odd_type[] = {{"a", -1, 9}};
    s_expect_spm_spec_error("piece type", &plain, odd_type, 1, UM_EFORMAT,
                            "piece 3 (\"a\") has type 9");
    const s_spm_piece_t bad_byte[] = {{"<0x4G>", 0, S_BYTE}};
    s_expect_spm_spec_error("byte piece text", &plain, bad_byte, 1, UM_EFORMAT,
                            "\"<0x4G>\" has type BYTE but is not of the form <0xHH>");
    const s_spm_spec_t unigram = {.model_type = 1};
    s_expect_spm_spec_error("unigram", &unigram, ok, 1, UM_EUNSUPPORTED,
                            "trainer_spec.model_type is UNIGRAM (1)");
    const s_spm_spec_t charsmap = {.charsmap = "\x01\x02\x03"};
    s_expect_spm_spec_error("charsmap", &charsmap, ok, 1, UM_EUNSUPPORTED,
                            "precompiled character map of 3 bytes");
    const s_spm_spec_t no_unk = {.no_specials = 1};
    s_expect_spm_spec_error("no unknown piece", &no_unk, ok, 1, UM_EFORMAT,
                            "no piece has type UNKNOWN");
    const s_spm_spec_t no_bytes = {.byte_fallback = 1, .no_byte_pieces = 1};
    s_expect_spm_spec_error("missing byte pieces", &no_bytes, ok, 1, UM_EFORMAT,
                            "byte_fallback is true but the byte piece <0x00> is missing");

    unlink(um_test_path(s_tmpdir, "tokenizer.model"));
    char err[1024] = "";
    void *tok = NULL;
    ck_assert_int_eq(s_ops->load(&s_host, s_tmpdir, &tok, err, sizeof err), UM_ENOTFOUND);
    ck_assert_msg(strstr(err, "tokenizer.model") && strstr(err, s_tmpdir),
                  "message \"%s\" does not name the missing file", err);
}
END_TEST

START_TEST(test_spm_probe_scores)
{
    const s_spm_piece_t ok[] = {{"a", -1, 0}};
    const s_spm_spec_t unigram = {.model_type = 1};
    s_write_spm(&unigram, ok, 1);
    ck_assert_int_eq(s_ops->probe(s_tmpdir), 10);
    s_write_str("tokenizer.model", "not a protobuf\n");
    ck_assert_int_eq(s_ops->probe(s_tmpdir), 0);
    /* LLaMA-3's original/tokenizer.model is tiktoken text: base64 and a rank per line. */
    s_write_str("tokenizer.model", "IQ== 0\nIg== 1\n");
    ck_assert_int_eq(s_ops->probe(s_tmpdir), 0);
}
END_TEST

/* ------------------------------------------------------------------------- */
/* The daemon's choice of plugin                                             */

static um_plugin_registry_t s_registry;

static void s_registry_open(void)
{
    s_registry = (um_plugin_registry_t){0};
    um_plugins_scan(&s_registry, um_test_env("UM_TEST_PLUGINS"));
}

static void s_registry_close(void)
{
    um_plugins_clear(&s_registry);
}

/* Check that the daemon, choosing by probe, loads dir with the plugin named name. */
static void s_expect_choice(const char *label, const char *dir, const char *name)
{
    um_tokenizer_t tok;
    char err[1024] = "";
    int rc = um_tokenizer_open(&tok, &s_registry, NULL, dir, err, sizeof err);
    ck_assert_msg(rc == UM_OK, "%s: no tokenizer loads %s: %s", label, dir, err);
    ck_assert_msg(strcmp(tok.plugin->desc->name, name) == 0, "%s: the daemon chose %s, "
                  "expected %s", label, tok.plugin->desc->name, name);
    um_tokenizer_close(&tok);
}

/* Remove every file of the temporary folder, keeping the folder. */
static void s_tmpdir_clear(void)
{
    for (size_t i = 0; i < sizeof s_tmp_files / sizeof s_tmp_files[0]; i++)
        unlink(um_test_path(s_tmpdir, s_tmp_files[i]));
}

START_TEST(test_probe_folder_layouts)
{
    ck_assert_ptr_nonnull(um_plugins_find(&s_registry, UM_PLUGIN_TOKENIZER, "bpe"));
    ck_assert_ptr_nonnull(um_plugins_find(&s_registry, UM_PLUGIN_TOKENIZER, "wordpiece"));
    ck_assert_ptr_nonnull(um_plugins_find(&s_registry, UM_PLUGIN_TOKENIZER, "spm"));

    json_t *doc = s_tiny_doc(s_byte_level(0, 1));
    s_write_doc(doc);
    json_decref(doc);
    s_expect_choice("byte-level tokenizer.json", s_tmpdir, "bpe");

    s_tmpdir_clear();
    doc = s_wp_json();
    s_write_doc(doc);
    json_decref(doc);
    s_expect_choice("WordPiece tokenizer.json", s_tmpdir, "wordpiece");

    s_tmpdir_clear();
    s_write_wp_vocab(NULL);
    s_expect_choice("vocab.txt", s_tmpdir, "wordpiece");

    s_tmpdir_clear();
    s_write_tiny_vocab("encoder.json", NULL);
    s_write_str("vocab.bpe", "#version: 0.2\n");
    s_expect_choice("encoder.json + vocab.bpe", s_tmpdir, "bpe");

    s_tmpdir_clear();
    s_write_pattern_files();
    s_expect_choice("vocab.json + merges.txt", s_tmpdir, "bpe");

    s_tmpdir_clear();
    const s_spm_piece_t pieces[] = {{S_SPACE, -1, 0}, {"a", -2, 0}};
    const s_spm_spec_t spec = {.byte_fallback = 1};
    s_write_spm(&spec, pieces, 2);
    s_expect_choice("tokenizer.model", s_tmpdir, "spm");

    /* LLaMA-2's Hugging Face folders add a tokenizer.json without a ByteLevel step. */
    s_write_text("{\"model\": {\"type\": \"BPE\", \"byte_fallback\": true, \"vocab\": {}, "
                 "\"merges\": []}, \"pre_tokenizer\": null, \"decoder\": {\"type\": "
                 "\"Sequence\", \"decoders\": [{\"type\": \"ByteFallback\"}]}}");
    s_expect_choice("tokenizer.model + LLaMA-2 tokenizer.json", s_tmpdir, "spm");
    /* A byte-level tokenizer.json beside a tokenizer.model wins, as in transformers. */
    doc = s_tiny_doc(s_byte_level(0, 1));
    s_write_doc(doc);
    json_decref(doc);
    s_expect_choice("tokenizer.model + byte-level tokenizer.json", s_tmpdir, "bpe");

    /* A Unigram model: only spm claims it, and its load explains why it cannot. */
    s_tmpdir_clear();
    const s_spm_spec_t unigram = {.model_type = 1};
    s_write_spm(&unigram, pieces, 2);
    um_tokenizer_t tok;
    char err[1024] = "";
    int rc = um_tokenizer_open(&tok, &s_registry, NULL, s_tmpdir, err, sizeof err);
    ck_assert_int_eq(rc, UM_EUNSUPPORTED);
    ck_assert_msg(strstr(err, "spm") && strstr(err, "UNIGRAM"), "message: %s", err);

    s_tmpdir_clear();
    rc = um_tokenizer_open(&tok, &s_registry, NULL, s_tmpdir, err, sizeof err);
    ck_assert_int_eq(rc, UM_ENOTFOUND);

    /* --tokenizer forces a plugin, which then reports what it cannot read. */
    doc = s_tiny_doc(s_byte_level(0, 1));
    s_write_doc(doc);
    json_decref(doc);
    rc = um_tokenizer_open(&tok, &s_registry, "wordpiece", s_tmpdir, err, sizeof err);
    ck_assert_int_eq(rc, UM_EUNSUPPORTED);
    ck_assert_msg(strstr(err, "model.type is \"BPE\""), "message: %s", err);
}
END_TEST

/* ------------------------------------------------------------------------- */
/* Real vocabularies (UNMASKD_DATA)                                          */

/* Return UNMASKD_DATA/dir when it contains file, else NULL (after a skip message). */
static const char *s_data_dir(const char *test, const char *dir, const char *file)
{
    static char path[4096];
    char rel[512];
    snprintf(rel, sizeof rel, "%s/%s", dir, file);
    if (!s_data_file(test, rel))
        return NULL;
    snprintf(path, sizeof path, "%s/%s", getenv("UNMASKD_DATA"), dir);
    return path;
}

/*
 * Encode the data file rel whole, print the speed, and check the round trip: the text
 * itself for a reversible tokenizer, else the same ids after decoding and encoding
 * again.
 */
static void s_check_long_text(void *tok, const char *test, const char *rel, int reversible)
{
    const char *path = s_data_file(test, rel);
    if (!path)
        return;
    size_t len = 0;
    char *text = um_test_read_file(path, &len);
    ck_assert_msg(text != NULL, "cannot read %s", path);
    int32_t *ids = malloc((len + 16) * sizeof *ids);
    size_t n = 0;
    double t0 = s_seconds();
    int rc = s_ops->encode(tok, text, len, ids, len + 16, &n);
    double elapsed = s_seconds() - t0;
    ck_assert_msg(rc == UM_OK, "%s: encode of %s returned %s", test, rel, um_error_name(rc));
    printf("%s: %s: encoded %zu bytes into %zu ids in %.3f s (%.1f MB/s)\n", test, rel, len, n,
           elapsed, (double)len / 1e6 / elapsed);

    size_t out_len = 0;
    char *out = s_decode(tok, ids, n, 0, &out_len);
    if (reversible) {
        size_t at = 0;
        while (at < len && at < out_len && out[at] == text[at])
            at++;
        ck_assert_msg(out_len == len && at == len, "%s: %s does not round-trip: %zu bytes in, "
                      "%zu out, first difference at byte %zu", test, rel, len, out_len, at);
    } else {
        int32_t *again = malloc((out_len + 16) * sizeof *again);
        size_t n_again = 0;
        ck_assert_int_eq(s_ops->encode(tok, out, out_len, again, out_len + 16, &n_again), UM_OK);
        size_t at = 0;
        while (at < n && at < n_again && again[at] == ids[at])
            at++;
        ck_assert_msg(n_again == n && at == n, "%s: %s decoded and encoded again gives %zu ids "
                      "instead of %zu, first difference at id %zu", test, rel, n_again, n, at);
        free(again);
    }
    free(out);
    free(ids);
    free(text);
}

/* Text a reversible tokenizer must give back exactly. */
typedef struct s_hard_case {
    const char *label;
    const char *text;
    size_t len; /* 0: strlen(text) */
} s_hard_case_t;

static const s_hard_case_t s_hard_cases[] = {
    {"emoji", "\xF0\x9F\x98\x80 \xF0\x9F\x9A\x80\xF0\x9F\xA6\x99!", 0},
    {"emoji ZWJ family", "\xF0\x9F\x91\xA8\xE2\x80\x8D\xF0\x9F\x91\xA9\xE2\x80\x8D\xF0\x9F\x91"
     "\xA7", 0},
    {"flag and skin tone", "\xF0\x9F\x87\xAB\xF0\x9F\x87\xB7 \xF0\x9F\x91\x8D\xF0\x9F\x8F\xBD", 0},
    {"combining accents", "cafe\xCC\x81 vs caf\xC3\xA9, a\xCC\x88\xCC\x81\xCC\xA3 Z\xCD\x91\xCC"
     "\x9E", 0},
    {"CJK", "\xE6\x88\x91\xE6\x83\xB3\xE5\x9C\xA8" "apple\xE5\xB7\xA5\xE4\xBD\x9C 1314151",
     0},
    {"Japanese and Korean", "\xE3\x81\x93\xE3\x82\x93\xE3\x81\xAB\xE3\x81\xA1\xE3\x81\xAF "
     "\xEC\x95\x88\xEB\x85\x95", 0},
    {"right to left", "\xD9\x85\xD8\xB1\xD8\xAD\xD8\xA8\xD8\xA7 \xD7\xA9\xD7\x9C\xD7\x95\xD7\x9D",
     0},
    {"whitespace mix", "\n\n\n\t \t\t  \r\n \xC2\xA0\xE3\x80\x80x  ", 0},
    {"NUL bytes", "a\0b\0\0 c", 7},
    {"largest code points", "\xEF\xBF\xBF\xF4\x8F\xBF\xBF\xEF\xBF\xBD", 0},
};

/* Round-trip s_hard_cases and a 10000-character run of spaces and tabs. */
static void s_check_hard_cases(void *tok, const char *name)
{
    char label[128];
    for (size_t i = 0; i < sizeof s_hard_cases / sizeof s_hard_cases[0]; i++) {
        const s_hard_case_t *c = &s_hard_cases[i];
        snprintf(label, sizeof label, "%s: %s", name, c->label);
        s_check_text(tok, label, c->text, c->len ? c->len : strlen(c->text), NULL, 0);
    }
    size_t len = 10000;
    char *run = malloc(len + 3);
    for (size_t i = 0; i < len; i++)
        run[i] = i % 100 == 99 ? '\t' : ' ';
    memcpy(run + len, "end", 3);
    snprintf(label, sizeof label, "%s: 10000 spaces and tabs", name);
    s_check_text(tok, label, run, len + 3, NULL, 0);
    free(run);
    s_check_invalid_utf8(tok);
}

START_TEST(test_bert_vocabulary)
{
    const char *dir = s_data_dir("bert vocabulary", "bert-base-uncased-vocab", "vocab.txt");
    if (!dir)
        return;
    s_plugin_open_file("wordpiece.so");
    ck_assert_int_eq(s_ops->probe(dir), 80);
    void *tok = s_load(dir);
    ck_assert_int_eq(s_ops->vocab_size(tok), 30522);
    ck_assert_int_eq(s_id(tok, "[PAD]"), 0);
    ck_assert_int_eq(s_id(tok, "[UNK]"), 100);
    ck_assert_int_eq(s_id(tok, "[CLS]"), 101);
    ck_assert_int_eq(s_id(tok, "[SEP]"), 102);
    ck_assert_int_eq(s_id(tok, "[MASK]"), 103);
    ck_assert_int_eq(s_ops->is_special(tok, 103), 1);
    ck_assert_int_eq(s_ops->is_special(tok, 7592), 0);

    S_EXPECT_WP(tok, "[CLS] Hello, World! [SEP]", 101, 7592, 1010, 2088, 999, 102);
    S_EXPECT_DECODE(tok, UM_DECODE_SKIP_SPECIAL, "hello, world!", 101, 7592, 1010, 2088, 999,
                    102);
    /* Accents go whether precomposed or combining; CJK splits; emoji are unknown. */
    S_EXPECT_WP(tok, "Caf\xC3\xA9 cafe\xCC\x81", 7668, 7668);
    S_EXPECT_WP(tok, "\xE6\x88\x91\xE6\x83\xB3", 1855, 100);
    S_EXPECT_WP(tok, "\xF0\x9F\x98\x80", 100);

    s_check_llamacpp_vectors(tok, "bert-bge", 0);
    s_check_long_text(tok, "bert vocabulary", "austen-novels/emma.txt", 0);
    s_check_invalid_utf8(tok);
    s_ops->unload(tok);
    s_plugin_close();
}
END_TEST

START_TEST(test_gpt2_files)
{
    const char *dir = s_data_dir("gpt2 files", "gpt2-tokenizer", "vocab.bpe");
    if (!dir)
        return;
    s_plugin_open_file("bpe.so");
    ck_assert_int_eq(s_ops->probe(dir), 80);
    void *tok = s_load(dir);
    ck_assert_int_eq(s_ops->vocab_size(tok), 50257);
    ck_assert_int_eq(s_ops->is_special(tok, 50256), 1);
    S_EXPECT_IDS(tok, "Hello world<|endoftext|>", 15496, 995, 50256);
    s_check_llamacpp_vectors(tok, "gpt-2", 1);
    s_check_hard_cases(tok, "gpt-2");
    s_check_long_text(tok, "gpt2 files", "austen-novels/pride_and_prejudice.txt", 1);
    s_ops->unload(tok);
    s_plugin_close();
}
END_TEST

START_TEST(test_llama3_files)
{
    const char *dir = s_data_dir("llama3 files", "llama3-tokenizer", "merges.txt");
    if (!dir)
        return;
    s_plugin_open_file("bpe.so");
    ck_assert_int_eq(s_ops->probe(dir), 80);
    void *tok = s_load(dir);
    ck_assert_int_eq(s_ops->vocab_size(tok), 128256);
    ck_assert_int_eq(s_id(tok, "<|begin_of_text|>"), 128000);
    ck_assert_int_eq(s_id(tok, "<|eot_id|>"), 128009);
    ck_assert_int_eq(s_ops->is_special(tok, 128009), 1);
    ck_assert_int_eq(s_ops->is_special(tok, 9906), 0);
    S_EXPECT_IDS(tok, "<|begin_of_text|>Hello world<|eot_id|>", 128000, 9906, 1917, 128009);
    /* Digits group in threes; contractions match in any case. */
    S_EXPECT_IDS(tok, "3333333", 8765, 8765, 18);
    s_check_hard_cases(tok, "llama-3");
    s_check_long_text(tok, "llama3 files", "austen-novels/persuasion.txt", 1);
    s_ops->unload(tok);
    s_plugin_close();
}
END_TEST

/*
 * Check that merging word by word (what LLaMA-2's vocabulary allows) gives the ids of
 * merging over the whole text: a copy of the model with one UNUSED piece appended,
 * which never matches, turns word-by-word merging off. Compares Emma's ids.
 */
static void s_check_spm_whole_text(void *tok, const char *dir)
{
    const char *path = s_data_file("llama2 whole-text merge", "austen-novels/emma.txt");
    if (!path)
        return;
    size_t len = 0;
    char *text = um_test_read_file(path, &len);
    size_t model_len = 0;
    char *model = um_test_read_file(um_test_path(dir, "tokenizer.model"), &model_len);
    ck_assert_msg(text && model, "cannot read Emma or LLaMA-2's tokenizer.model");

    s_tmpdir_create();
    s_pb_t copy = {0};
    s_pb_raw(&copy, model, model_len);
    s_pb_piece(&copy, "\xF0\x9F\x9B\xB8zz", -1000, S_UNUSED); /* repeated fields append */
    s_write_file("tokenizer.model", copy.data, copy.len);
    free(copy.data);
    free(model);
    void *whole = s_load(s_tmpdir);

    int32_t *a = malloc((len + 16) * sizeof *a), *b = malloc((len + 16) * sizeof *b);
    size_t n_a = 0, n_b = 0;
    double t0 = s_seconds();
    ck_assert_int_eq(s_ops->encode(whole, text, len, b, len + 16, &n_b), UM_OK);
    printf("llama2 model: emma.txt merged over the whole text in %.3f s\n", s_seconds() - t0);
    ck_assert_int_eq(s_ops->encode(tok, text, len, a, len + 16, &n_a), UM_OK);
    size_t at = 0;
    while (at < n_a && at < n_b && a[at] == b[at])
        at++;
    ck_assert_msg(n_a == n_b && at == n_a, "word-by-word merging gives %zu ids, whole-text "
                  "merging %zu, first difference at id %zu", n_a, n_b, at);
    s_ops->unload(whole);
    s_tmpdir_remove();
    free(a);
    free(b);
    free(text);
}

START_TEST(test_llama2_model)
{
    const char *dir = s_data_dir("llama2 model", "llama2-tokenizer", "tokenizer.model");
    if (!dir)
        return;
    s_plugin_open_file("spm.so");
    ck_assert_int_eq(s_ops->probe(dir), 85);
    void *tok = s_load(dir);
    ck_assert_int_eq(s_ops->vocab_size(tok), 32000);
    ck_assert_int_eq(s_id(tok, "<unk>"), 0);
    ck_assert_int_eq(s_id(tok, "<s>"), 1);
    ck_assert_int_eq(s_id(tok, "</s>"), 2);
    ck_assert_int_eq(s_id(tok, "<0x0A>"), 13);
    ck_assert_int_eq(s_ops->is_special(tok, 1), 1);
    ck_assert_int_eq(s_ops->is_special(tok, 2), 1);
    ck_assert_int_eq(s_ops->is_special(tok, 13), 0);
    ck_assert_int_eq(s_ops->is_special(tok, 15043), 0);

    S_EXPECT_IDS(tok, "Hello world", 15043, 3186);
    /* An emoji has no piece: the space marker, then its four UTF-8 bytes (id = byte + 3). */
    S_EXPECT_IDS(tok, "\xF0\x9F\x98\x80", 29871, 243, 162, 155, 131);
    S_EXPECT_DECODE(tok, 0, "<s> Hello world</s>", 1, 15043, 3186, 2);
    S_EXPECT_DECODE(tok, UM_DECODE_SKIP_SPECIAL, "Hello world", 1, 15043, 3186, 2);

    s_check_llamacpp_vectors(tok, "llama-spm", 1);
    s_check_hard_cases(tok, "llama-2");
    s_check_spm_whole_text(tok, dir);
    s_check_long_text(tok, "llama2 model", "tinystories-head/tinystories_train_head_cased.txt",
                      1);
    s_check_long_text(tok, "llama2 model", "austen-novels/emma.txt", 1);
    s_ops->unload(tok);
    s_plugin_close();
}
END_TEST

START_TEST(test_probe_shared_folders)
{
    static const struct {
        const char *dir, *file, *plugin;
    } cases[] = {
        {"bert-base-uncased-vocab", "vocab.txt", "wordpiece"},
        {"gpt2-tokenizer", "encoder.json", "bpe"},
        {"llama3-tokenizer", "vocab.json", "bpe"},
        {"llama2-tokenizer", "tokenizer.model", "spm"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const char *dir = s_data_dir("shared folder choice", cases[i].dir, cases[i].file);
        if (!dir)
            return;
        s_expect_choice(cases[i].dir, dir, cases[i].plugin);
    }
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

    tc = tcase_create("bpe_files");
    tcase_add_unchecked_fixture(tc, s_plugin_open, s_plugin_close);
    tcase_add_checked_fixture(tc, s_tiny_setup, s_tiny_teardown);
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, test_bpe_gpt2_file_pair);
    tcase_add_test(tc, test_bpe_pattern_gpt2_default);
    tcase_add_test(tc, test_bpe_pattern_llama3_selected);
    tcase_add_test(tc, test_bpe_malformed_file_pairs);
    suite_add_tcase(s, tc);

    tc = tcase_create("wordpiece");
    tcase_add_unchecked_fixture(tc, s_wordpiece_open, s_plugin_close);
    tcase_add_checked_fixture(tc, s_tiny_setup, s_tiny_teardown);
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, test_wordpiece_descriptor);
    tcase_add_test(tc, test_wordpiece_basic_rules);
    tcase_add_test(tc, test_wordpiece_hard_cases);
    tcase_add_test(tc, test_wordpiece_max_chars);
    tcase_add_test(tc, test_wordpiece_special_tokens);
    tcase_add_test(tc, test_wordpiece_decode_rules);
    tcase_add_test(tc, test_wordpiece_config_case);
    tcase_add_test(tc, test_wordpiece_tokenizer_json);
    tcase_add_test(tc, test_wordpiece_malformed_files);
    tcase_add_test(tc, test_wordpiece_buffers);
    tcase_add_test(tc, test_wordpiece_bundled_model);
    suite_add_tcase(s, tc);

    tc = tcase_create("spm");
    tcase_add_unchecked_fixture(tc, s_spm_open, s_plugin_close);
    tcase_add_checked_fixture(tc, s_tiny_setup, s_tiny_teardown);
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, test_spm_descriptor);
    tcase_add_test(tc, test_spm_merge_by_score);
    tcase_add_test(tc, test_spm_byte_fallback);
    tcase_add_test(tc, test_spm_unknown_runs);
    tcase_add_test(tc, test_spm_user_defined);
    tcase_add_test(tc, test_spm_unused_piece);
    tcase_add_test(tc, test_spm_normalizer_options);
    tcase_add_test(tc, test_spm_decode_rules);
    tcase_add_test(tc, test_spm_malformed_models);
    tcase_add_test(tc, test_spm_probe_scores);
    suite_add_tcase(s, tc);

    tc = tcase_create("probe");
    tcase_add_unchecked_fixture(tc, s_registry_open, s_registry_close);
    tcase_add_checked_fixture(tc, s_tiny_setup, s_tiny_teardown);
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, test_probe_folder_layouts);
    tcase_add_test(tc, test_probe_shared_folders);
    suite_add_tcase(s, tc);

    tc = tcase_create("data");
    tcase_add_unchecked_fixture(tc, s_tinystories_setup, s_tinystories_teardown);
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_tinystories_roundtrip);
    tcase_add_test(tc, test_gpt2_vocabulary);
    suite_add_tcase(s, tc);

    /* Each case opens the plugin it checks. */
    tc = tcase_create("vocabularies");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, test_bert_vocabulary);
    tcase_add_test(tc, test_gpt2_files);
    tcase_add_test(tc, test_llama3_files);
    tcase_add_test(tc, test_llama2_model);
    suite_add_tcase(s, tc);

    return s;
}
