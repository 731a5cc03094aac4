/*
 * safetensors suite: small files are written into a temporary folder and read back
 * with their values checked. Each fault the reader must reject gets its own file,
 * checked for the error code and for a message that names the file and the tensor.
 */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <unmaskd/error.h>

#include "kernels.h"
#include "safetensors.h"
#include "testutil.h"

/* ------------------------------------------------------------------------- */
/* Temporary folder and file writers                                          */

static char s_dir[4096];

static void s_setup(void)
{
    const char *base = getenv("TMPDIR");
    snprintf(s_dir, sizeof s_dir, "%s/um-st-XXXXXX", base && *base ? base : "/tmp");
    ck_assert_ptr_nonnull(mkdtemp(s_dir));
}

static void s_teardown(void)
{
    DIR *d = opendir(s_dir);
    if (!d)
        return;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        char path[8192];
        snprintf(path, sizeof path, "%s/%s", s_dir, e->d_name);
        unlink(path);
    }
    closedir(d);
    rmdir(s_dir);
}

/* Path of a file in the temporary folder (static buffer, valid until the next call). */
static const char *s_path(const char *name)
{
    static char path[8192];
    snprintf(path, sizeof path, "%s/%s", s_dir, name);
    return path;
}

/* Write an 8-byte length (declared_len, or the header's own length when negative),
 * the header text and data_len bytes of data. */
static void s_write_raw(const char *name, const char *header, long long declared_len,
                        const void *data, size_t data_len)
{
    FILE *f = fopen(s_path(name), "wb");
    ck_assert_ptr_nonnull(f);
    uint64_t len = declared_len < 0 ? strlen(header) : (uint64_t)declared_len;
    unsigned char len_bytes[8];
    for (int i = 0; i < 8; i++)
        len_bytes[i] = (unsigned char)(len >> (8 * i));
    ck_assert_int_eq(fwrite(len_bytes, 1, 8, f), 8);
    ck_assert_int_eq(fwrite(header, 1, strlen(header), f), strlen(header));
    if (data_len > 0)
        ck_assert_int_eq(fwrite(data, 1, data_len, f), data_len);
    ck_assert_int_eq(fclose(f), 0);
}

/* Data for the valid files: a [2, 3] F32 tensor "a.weight" then a [4] F32 "b.bias". */
static const float s_a[6] = {0.5f, -1.25f, 3.0f, 1e-3f, -7.5f, 42.0f};
static const float s_b[4] = {1.0f, 2.0f, 4.0f, 8.0f};

#define S_VALID_HEADER                                                                        \
    "{\"__metadata__\":{\"format\":\"pt\"},"                                                  \
    "\"a.weight\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]},"              \
    "\"b.bias\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[24,40]}}"

static void s_write_valid(const char *name)
{
    unsigned char data[40];
    memcpy(data, s_a, 24);
    memcpy(data + 24, s_b, 16);
    s_write_raw(name, S_VALID_HEADER, -1, data, sizeof data);
}

/* Open a file expecting failure with code and a message containing every needle. */
static void s_expect_error(const char *name, int code, const char *const *needles,
                           size_t n_needles)
{
    char err[1024] = "";
    um_safetensors_t *st = NULL;
    int rc = um_safetensors_open_file(s_path(name), &st, err, sizeof err);
    ck_assert_msg(rc == code, "%s: got %s, expected %s (message: %s)", name, um_error_name(rc),
                  um_error_name(code), err);
    ck_assert_ptr_null(st);
    for (size_t i = 0; i < n_needles; i++)
        ck_assert_msg(strstr(err, needles[i]) != NULL, "%s: message \"%s\" does not mention \"%s\"",
                      name, err, needles[i]);
}

/* ------------------------------------------------------------------------- */
/* Valid files                                                                */

START_TEST(open_f32_values)
{
    s_write_valid("ok.safetensors");
    char err[1024];
    um_safetensors_t *st = NULL;
    int rc = um_safetensors_open_file(s_path("ok.safetensors"), &st, err, sizeof err);
    ck_assert_msg(rc == 0, "open failed: %s", err);

    /* __metadata__ is not a tensor. */
    ck_assert_uint_eq(um_safetensors_count(st), 2);
    ck_assert_ptr_null(um_safetensors_find(st, "__metadata__"));
    ck_assert_str_eq(um_safetensors_at(st, 0)->name, "a.weight");
    ck_assert_str_eq(um_safetensors_source(st), s_path("ok.safetensors"));

    const um_tensor_view_t *a = um_safetensors_find(st, "a.weight");
    ck_assert_ptr_nonnull(a);
    ck_assert_int_eq(a->dtype, UM_DTYPE_F32);
    ck_assert_int_eq(a->ndim, 2);
    ck_assert_int_eq(a->shape[0], 2);
    ck_assert_int_eq(a->shape[1], 3);
    ck_assert_int_eq(a->numel, 6);
    ck_assert_uint_eq(a->nbytes, 24);
    ck_assert_str_eq(a->path, s_path("ok.safetensors"));
    /* The bytes are copied verbatim, so the values compare exactly. */
    float a_values[6];
    memcpy(a_values, a->data, sizeof a_values);
    for (int i = 0; i < 6; i++)
        ck_assert_float_eq(a_values[i], s_a[i]);

    const um_tensor_view_t *b = um_safetensors_find(st, "b.bias");
    ck_assert_ptr_nonnull(b);
    ck_assert_int_eq(b->ndim, 1);
    ck_assert_int_eq(b->shape[0], 4);
    float b_values[4];
    memcpy(b_values, b->data, sizeof b_values);
    for (int i = 0; i < 4; i++)
        ck_assert_float_eq(b_values[i], s_b[i]);
    ck_assert_ptr_null(um_safetensors_find(st, "c.weight"));

    um_safetensors_close(&st);
    ck_assert_ptr_null(st);
}
END_TEST

START_TEST(open_bf16_values)
{
    /* bf16 is the upper half of an f32; these values are exact in bf16. */
    const float values[5] = {1.0f, -2.0f, 0.15625f, 65536.0f, -0.0f};
    uint16_t bits[5];
    for (int i = 0; i < 5; i++) {
        uint32_t u;
        memcpy(&u, &values[i], 4);
        bits[i] = (uint16_t)(u >> 16);
    }
    /* The bf16 values at 0, two bytes of padding, an f32 scalar 3.5 at 12. */
    unsigned char data[16] = {0};
    memcpy(data, bits, 10);
    const float scalar = 3.5f;
    memcpy(data + 12, &scalar, 4);
    s_write_raw("bf16.safetensors",
                "{\"w\":{\"dtype\":\"BF16\",\"shape\":[5],\"data_offsets\":[0,10]},"
                "\"scalar\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[12,16]}}",
                -1, data, sizeof data);

    char err[1024];
    um_safetensors_t *st = NULL;
    int rc = um_safetensors_open_file(s_path("bf16.safetensors"), &st, err, sizeof err);
    ck_assert_msg(rc == 0, "open failed: %s", err);
    const um_tensor_view_t *w = um_safetensors_find(st, "w");
    ck_assert_ptr_nonnull(w);
    ck_assert_int_eq(w->dtype, UM_DTYPE_BF16);
    ck_assert_uint_eq(w->nbytes, 10);
    ck_assert_str_eq(um_dtype_name(w->dtype), "BF16");
    float widened[5];
    uint16_t raw[5];
    memcpy(raw, w->data, sizeof raw);
    um_k_bf16_to_f32_ref(widened, raw, 5);
    for (int i = 0; i < 5; i++)
        ck_assert_float_eq(widened[i], values[i]);

    /* A 0-d tensor has one element. */
    const um_tensor_view_t *s = um_safetensors_find(st, "scalar");
    ck_assert_int_eq(s->ndim, 0);
    ck_assert_int_eq(s->numel, 1);
    float got;
    memcpy(&got, s->data, 4);
    ck_assert_float_eq(got, 3.5f);
    um_safetensors_close(&st);
}
END_TEST

/* A header with no tensors (only metadata, or nothing) gives an empty set. */
START_TEST(open_no_tensors)
{
    const char *headers[] = {"{}", "{\"__metadata__\":{\"format\":\"pt\"}}"};
    for (size_t i = 0; i < 2; i++) {
        s_write_raw("empty.safetensors", headers[i], -1, NULL, 0);
        char err[1024] = "";
        um_safetensors_t *st = NULL;
        int rc = um_safetensors_open_file(s_path("empty.safetensors"), &st, err, sizeof err);
        ck_assert_msg(rc == 0, "header %s: open failed: %s", headers[i], err);
        ck_assert_uint_eq(um_safetensors_count(st), 0);
        ck_assert_ptr_null(um_safetensors_at(st, 0));
        ck_assert_ptr_null(um_safetensors_find(st, "a.weight"));
        um_safetensors_close(&st);
    }
}
END_TEST

/* ------------------------------------------------------------------------- */
/* Faults in one file                                                         */

START_TEST(reject_truncated)
{
    /* The valid file with its last 4 bytes cut off. */
    unsigned char data[40];
    memcpy(data, s_a, 24);
    memcpy(data + 24, s_b, 16);
    s_write_raw("cut.safetensors", S_VALID_HEADER, -1, data, 36);
    const char *needles[] = {"b.bias", "cut.safetensors", "truncated"};
    s_expect_error("cut.safetensors", UM_EFORMAT, needles, 3);

    /* Shorter than the length field itself. */
    FILE *f = fopen(s_path("tiny.safetensors"), "wb");
    ck_assert_ptr_nonnull(f);
    ck_assert_int_eq(fwrite("\x10\x00\x00", 1, 3, f), 3);
    ck_assert_int_eq(fclose(f), 0);
    const char *tiny[] = {"tiny.safetensors", "truncated"};
    s_expect_error("tiny.safetensors", UM_EFORMAT, tiny, 2);
}
END_TEST

START_TEST(reject_header_past_file)
{
    s_write_raw("long.safetensors", S_VALID_HEADER, 1 << 20, NULL, 0);
    const char *needles[] = {"long.safetensors", "1048576-byte header"};
    s_expect_error("long.safetensors", UM_EFORMAT, needles, 2);
}
END_TEST

START_TEST(reject_offsets_out_of_range)
{
    unsigned char data[24] = {0};
    s_write_raw("range.safetensors",
                "{\"x\":{\"dtype\":\"F32\",\"shape\":[6],\"data_offsets\":[0,24]},"
                "\"far\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[100,104]}}",
                -1, data, sizeof data);
    const char *needles[] = {"far", "range.safetensors", "[100, 104]"};
    s_expect_error("range.safetensors", UM_EFORMAT, needles, 3);

    s_write_raw("backwards.safetensors",
                "{\"back\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,4]}}", -1, data,
                sizeof data);
    const char *back[] = {"back", "backwards.safetensors", "end before"};
    s_expect_error("backwards.safetensors", UM_EFORMAT, back, 3);
}
END_TEST

START_TEST(reject_size_mismatch)
{
    unsigned char data[24] = {0};
    s_write_raw("size.safetensors",
                "{\"odd\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,24]}}", -1,
                data, sizeof data);
    const char *needles[] = {"odd", "size.safetensors", "[2, 2]", "needs 16 bytes"};
    s_expect_error("size.safetensors", UM_EFORMAT, needles, 4);
}
END_TEST

START_TEST(reject_overlap)
{
    unsigned char data[32] = {0};
    s_write_raw("overlap.safetensors",
                "{\"first\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
                "\"second\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[8,24]}}",
                -1, data, sizeof data);
    const char *needles[] = {"first", "second", "overlap.safetensors", "overlap"};
    s_expect_error("overlap.safetensors", UM_EFORMAT, needles, 4);
}
END_TEST

START_TEST(reject_unsupported_dtype)
{
    unsigned char data[16] = {0};
    s_write_raw("f16.safetensors",
                "{\"half\":{\"dtype\":\"F16\",\"shape\":[4],\"data_offsets\":[0,8]}}", -1, data,
                8);
    const char *f16[] = {"half", "F16", "f16.safetensors"};
    s_expect_error("f16.safetensors", UM_EUNSUPPORTED, f16, 3);

    s_write_raw("u8.safetensors",
                "{\"ids\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2]}}", -1, data,
                2);
    const char *u8[] = {"ids", "U8", "u8.safetensors"};
    s_expect_error("u8.safetensors", UM_EUNSUPPORTED, u8, 3);
}
END_TEST

START_TEST(accept_i64_buffers)
{
    /* Integer buffers such as BERT's position_ids open as I64 of 8 bytes each. */
    unsigned char data[16] = {1, 0, 0, 0, 0, 0, 0, 0, 2};
    s_write_raw("i64.safetensors",
                "{\"ids\":{\"dtype\":\"I64\",\"shape\":[2],\"data_offsets\":[0,16]}}", -1, data,
                16);
    char err[1024] = "";
    um_safetensors_t *st = NULL;
    int rc = um_safetensors_open_file(um_test_path(s_dir, "i64.safetensors"), &st, err, sizeof err);
    ck_assert_msg(rc == 0, "%s", err);
    const um_tensor_view_t *t = um_safetensors_find(st, "ids");
    ck_assert_ptr_nonnull(t);
    ck_assert_int_eq(t->dtype, UM_DTYPE_I64);
    ck_assert_uint_eq(t->nbytes, 16);
    ck_assert_str_eq(um_dtype_name(t->dtype), "I64");
    um_safetensors_close(&st);
}
END_TEST

START_TEST(reject_bad_json)
{
    unsigned char data[8] = {0};
    s_write_raw("json.safetensors", "{\"x\":{\"dtype\":\"F32\",", -1, data, sizeof data);
    const char *needles[] = {"json.safetensors", "JSON header", "invalid"};
    s_expect_error("json.safetensors", UM_EFORMAT, needles, 3);

    s_write_raw("array.safetensors", "[1,2,3]", -1, data, sizeof data);
    const char *array[] = {"array.safetensors", "not an object"};
    s_expect_error("array.safetensors", UM_EFORMAT, array, 2);

    s_write_raw("dup.safetensors",
                "{\"x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                "\"x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
                -1, data, sizeof data);
    const char *dup[] = {"dup.safetensors", "duplicate"};
    s_expect_error("dup.safetensors", UM_EFORMAT, dup, 2);

    s_write_raw("shape.safetensors",
                "{\"neg\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", -1, data,
                sizeof data);
    const char *shape[] = {"neg", "shape.safetensors", "dimension 0"};
    s_expect_error("shape.safetensors", UM_EFORMAT, shape, 3);
}
END_TEST

START_TEST(reject_missing_file)
{
    const char *needles[] = {"absent.safetensors"};
    s_expect_error("absent.safetensors", UM_ENOTFOUND, needles, 1);
}
END_TEST

/* ------------------------------------------------------------------------- */
/* Folders                                                                    */

/* Write shard 1 with a.weight, shard 2 with b.bias, and index_text as the index. */
static void s_write_shards(const char *index_text)
{
    s_write_raw("model-00001-of-00002.safetensors",
                "{\"a.weight\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]}}", -1,
                s_a, 24);
    s_write_raw("model-00002-of-00002.safetensors",
                "{\"b.bias\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", -1, s_b,
                16);
    FILE *f = fopen(s_path("model.safetensors.index.json"), "w");
    ck_assert_ptr_nonnull(f);
    fputs(index_text, f);
    fclose(f);
}

static int s_open_dir(um_safetensors_t **st, char *err, size_t errlen)
{
    return um_safetensors_open_dir(s_dir, st, err, errlen);
}

START_TEST(open_dir_single_file)
{
    char err[1024];
    um_safetensors_t *st = NULL;
    const char *needles[] = {"model.safetensors", "model.safetensors.index.json", s_dir};
    int rc = s_open_dir(&st, err, sizeof err);
    ck_assert_int_eq(rc, UM_ENOTFOUND);
    for (int i = 0; i < 3; i++)
        ck_assert_msg(strstr(err, needles[i]) != NULL, "message \"%s\" lacks %s", err, needles[i]);

    s_write_valid("model.safetensors");
    rc = s_open_dir(&st, err, sizeof err);
    ck_assert_msg(rc == 0, "open_dir failed: %s", err);
    ck_assert_uint_eq(um_safetensors_count(st), 2);
    ck_assert_str_eq(um_safetensors_source(st), s_path("model.safetensors"));
    um_safetensors_close(&st);
}
END_TEST

START_TEST(open_dir_shards)
{
    s_write_shards("{\"metadata\":{},\"weight_map\":{"
                   "\"a.weight\":\"model-00001-of-00002.safetensors\","
                   "\"b.bias\":\"model-00002-of-00002.safetensors\"}}");
    /* The index wins over a stray single file. */
    s_write_raw("model.safetensors", "{}", -1, NULL, 0);

    char err[1024];
    um_safetensors_t *st = NULL;
    int rc = s_open_dir(&st, err, sizeof err);
    ck_assert_msg(rc == 0, "open_dir failed: %s", err);
    ck_assert_uint_eq(um_safetensors_count(st), 2);
    ck_assert_str_eq(um_safetensors_source(st), s_path("model.safetensors.index.json"));

    const um_tensor_view_t *a = um_safetensors_find(st, "a.weight");
    const um_tensor_view_t *b = um_safetensors_find(st, "b.bias");
    ck_assert_ptr_nonnull(a);
    ck_assert_ptr_nonnull(b);
    ck_assert_ptr_nonnull(strstr(a->path, "model-00001-of-00002.safetensors"));
    ck_assert_ptr_nonnull(strstr(b->path, "model-00002-of-00002.safetensors"));
    float values[6];
    memcpy(values, a->data, 24);
    for (int i = 0; i < 6; i++)
        ck_assert_float_eq(values[i], s_a[i]);
    memcpy(values, b->data, 16);
    for (int i = 0; i < 4; i++)
        ck_assert_float_eq(values[i], s_b[i]);
    um_safetensors_close(&st);
}
END_TEST

START_TEST(reject_bad_shards)
{
    char err[1024];
    um_safetensors_t *st = NULL;

    /* The index names the wrong shard for b.bias. */
    s_write_shards("{\"weight_map\":{"
                   "\"a.weight\":\"model-00001-of-00002.safetensors\","
                   "\"b.bias\":\"model-00001-of-00002.safetensors\"}}");
    int rc = s_open_dir(&st, err, sizeof err);
    ck_assert_int_eq(rc, UM_EFORMAT);
    ck_assert_msg(strstr(err, "b.bias") && strstr(err, "model-00001-of-00002.safetensors"),
                  "message: %s", err);

    /* A shard that does not exist. */
    s_write_shards("{\"weight_map\":{\"a.weight\":\"model-00001-of-00002.safetensors\","
                   "\"c.weight\":\"model-00003-of-00003.safetensors\"}}");
    rc = s_open_dir(&st, err, sizeof err);
    ck_assert_int_eq(rc, UM_ENOTFOUND);
    ck_assert_msg(strstr(err, "model-00003-of-00003.safetensors") && strstr(err, "c.weight"),
                  "message: %s", err);

    /* A tensor stored in two shards. */
    s_write_shards("{\"weight_map\":{\"a.weight\":\"model-00001-of-00002.safetensors\","
                   "\"b.bias\":\"model-00002-of-00002.safetensors\","
                   "\"extra\":\"model-00003-of-00002.safetensors\"}}");
    s_write_raw("model-00003-of-00002.safetensors",
                "{\"b.bias\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
                "\"extra\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[16,20]}}",
                -1, (const unsigned char[20]){0}, 20);
    rc = s_open_dir(&st, err, sizeof err);
    ck_assert_int_eq(rc, UM_EFORMAT);
    ck_assert_msg(strstr(err, "b.bias") && strstr(err, "both"), "message: %s", err);

    /* A shard name that leaves the folder. */
    s_write_shards("{\"weight_map\":{\"a.weight\":\"../model.safetensors\"}}");
    rc = s_open_dir(&st, err, sizeof err);
    ck_assert_int_eq(rc, UM_EFORMAT);
    ck_assert_msg(strstr(err, "a.weight") && strstr(err, "shard name"), "message: %s", err);

    /* An index without a weight_map. */
    s_write_shards("{\"metadata\":{}}");
    rc = s_open_dir(&st, err, sizeof err);
    ck_assert_int_eq(rc, UM_EFORMAT);
    ck_assert_msg(strstr(err, "weight_map") && strstr(err, "model.safetensors.index.json"),
                  "message: %s", err);

    /* A fault inside a shard is reported with the shard's name. */
    s_write_shards("{\"weight_map\":{\"a.weight\":\"model-00001-of-00002.safetensors\","
                   "\"h\":\"model-00002-of-00002.safetensors\"}}");
    s_write_raw("model-00002-of-00002.safetensors",
                "{\"h\":{\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[0,4]}}", -1,
                (const unsigned char[4]){0}, 4);
    rc = s_open_dir(&st, err, sizeof err);
    ck_assert_int_eq(rc, UM_EUNSUPPORTED);
    ck_assert_msg(strstr(err, "model-00002-of-00002.safetensors") && strstr(err, "F16"),
                  "message: %s", err);
    ck_assert_ptr_null(st);
}
END_TEST

Suite *um_safetensors_suite(void)
{
    Suite *s = suite_create("safetensors");

    TCase *tc = tcase_create("file");
    tcase_set_timeout(tc, 30);
    tcase_add_checked_fixture(tc, s_setup, s_teardown);
    tcase_add_test(tc, open_f32_values);
    tcase_add_test(tc, open_bf16_values);
    tcase_add_test(tc, open_no_tensors);
    tcase_add_test(tc, reject_truncated);
    tcase_add_test(tc, reject_header_past_file);
    tcase_add_test(tc, reject_offsets_out_of_range);
    tcase_add_test(tc, reject_size_mismatch);
    tcase_add_test(tc, reject_overlap);
    tcase_add_test(tc, reject_unsupported_dtype);
    tcase_add_test(tc, accept_i64_buffers);
    tcase_add_test(tc, reject_bad_json);
    tcase_add_test(tc, reject_missing_file);
    suite_add_tcase(s, tc);

    tc = tcase_create("folder");
    tcase_set_timeout(tc, 30);
    tcase_add_checked_fixture(tc, s_setup, s_teardown);
    tcase_add_test(tc, open_dir_single_file);
    tcase_add_test(tc, open_dir_shards);
    tcase_add_test(tc, reject_bad_shards);
    suite_add_tcase(s, tc);
    return s;
}
