/*
 * Chat template suite: unmaskd's C renderer against Jinja's rendering of the templates
 * masked-diffusion models ship (tests/fixtures/chat/cases.json, written by
 * tools/make_chat_fixtures.py), byte for byte, and the errors for folders without a
 * template or with one unmaskd does not render.
 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <unmaskd/error.h>

#include "chat.h"
#include "request.h"
#include "testutil.h"

static char s_dir[] = "/tmp/unmaskd-chat-XXXXXX";

static void s_setup(void)
{
    strcpy(s_dir, "/tmp/unmaskd-chat-XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(s_dir));
}

static void s_teardown(void)
{
    unlink(um_test_path(s_dir, "tokenizer_config.json"));
    rmdir(s_dir);
}

static void s_write_config(const char *text)
{
    FILE *f = fopen(um_test_path(s_dir, "tokenizer_config.json"), "w");
    ck_assert_ptr_nonnull(f);
    fputs(text, f);
    fclose(f);
}

START_TEST(chat_matches_jinja)
{
    const char *path = um_test_path(um_test_env("UM_TEST_FIXTURES"), "chat/cases.json");
    json_error_t jerr;
    json_t *doc = json_load_file(path, 0, &jerr);
    ck_assert_msg(doc != NULL, "cannot read %s: %s (run tools/make_chat_fixtures.py)", path,
                  jerr.text);
    json_t *conversations = json_object_get(doc, "conversations");
    size_t i;
    json_t *t;
    int n_rendered = 0;
    json_array_foreach(json_object_get(doc, "templates"), i, t) {
        const char *name = json_string_value(json_object_get(t, "name"));
        char *config = json_dumps(json_object_get(t, "tokenizer_config"), 0);
        s_write_config(config);
        free(config);

        um_chat_template_t chat;
        char err[512] = "";
        ck_assert_int_eq(um_chat_load(s_dir, &chat, err, sizeof err), 0);
        const char *kind = um_chat_kind_name(chat.kind);
        ck_assert_msg(kind && strcmp(kind, json_string_value(json_object_get(t, "kind"))) == 0,
                      "%s: read as %s", name, kind ? kind : "none");
        size_t j;
        json_t *messages;
        json_array_foreach(conversations, j, messages) {
            char *text = NULL;
            size_t len = 0;
            int rc = um_chat_render(&chat, messages, &text, &len, err, sizeof err);
            json_t *want = json_array_get(json_object_get(t, "rendered"), j);
            if (!want) {
                ck_assert_int_eq(rc, UM_EUNSUPPORTED);
                ck_assert_msg(strstr(err, "apply it yourself") != NULL, "%s: %s", name, err);
                continue;
            }
            ck_assert_msg(rc == 0, "%s: %s", name, err);
            ck_assert_msg(len == json_string_length(want)
                              && memcmp(text, json_string_value(want), len) == 0,
                          "%s conversation %zu:\n got  \"%s\"\n want \"%s\"", name, j, text,
                          json_string_value(want));
            n_rendered++;
            free(text);
        }
        um_chat_free(&chat);
    }
    ck_assert_int_ge(n_rendered, 12);
    json_decref(doc);
}
END_TEST

START_TEST(chat_none_and_errors)
{
    um_chat_template_t chat;
    char err[512] = "";
    /* No tokenizer_config.json: no template, and messages get a clear error. */
    ck_assert_int_eq(um_chat_load(s_dir, &chat, err, sizeof err), 0);
    ck_assert_int_eq(chat.kind, UM_CHAT_NONE);
    ck_assert_ptr_null(um_chat_kind_name(chat.kind));
    json_t *messages = json_pack("[{s:s, s:s}]", "role", "user", "content", "hi");
    char *text = NULL;
    size_t len;
    ck_assert_int_eq(um_chat_render(&chat, messages, &text, &len, err, sizeof err),
                     UM_EUNSUPPORTED);
    ck_assert_msg(strstr(err, "no chat_template") && strstr(err, "\"prompt\""), "%s", err);
    ck_assert_ptr_null(text);
    um_chat_free(&chat);

    /* A file without chat_template is the same. */
    s_write_config("{\"eos_token\": \"</s>\"}");
    ck_assert_int_eq(um_chat_load(s_dir, &chat, err, sizeof err), 0);
    ck_assert_int_eq(chat.kind, UM_CHAT_NONE);

    /* A malformed file names itself. */
    s_write_config("{\"chat_template\": ");
    ck_assert_int_eq(um_chat_load(s_dir, &chat, err, sizeof err), UM_EFORMAT);
    ck_assert_msg(strstr(err, "tokenizer_config.json") != NULL, "%s", err);
    json_decref(messages);
}
END_TEST

/* A chat is instruct-style use, so its generate request stops early at EOS by default. */
START_TEST(chat_early_stop_default)
{
    static const struct {
        const char *json;
        int early_stop;
    } cases[] = {
        {"{\"op\":\"generate\",\"id\":1,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}", 1},
        {"{\"op\":\"generate\",\"id\":2,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],"
         "\"early_stop\":false}", 0},
        {"{\"op\":\"generate\",\"id\":3,\"prompt\":\"hi\"}", 0},
        {"{\"op\":\"generate\",\"id\":4,\"prompt\":\"hi\",\"early_stop\":true}", 1},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        um_request_t req;
        um_req_error_t err;
        ck_assert_msg(um_request_parse(cases[i].json, strlen(cases[i].json), &req, &err) == 0,
                      "%s: %s", cases[i].json, err.message);
        ck_assert_msg(req.early_stop == cases[i].early_stop, "%s: early_stop %d", cases[i].json,
                      req.early_stop);
        um_request_clear(&req);
    }
}
END_TEST

Suite *um_chat_suite(void)
{
    Suite *s = suite_create("chat");
    TCase *tc = tcase_create("templates");
    tcase_add_checked_fixture(tc, s_setup, s_teardown);
    tcase_add_test(tc, chat_matches_jinja);
    tcase_add_test(tc, chat_none_and_errors);
    tcase_add_test(tc, chat_early_stop_default);
    suite_add_tcase(s, tc);
    return s;
}
