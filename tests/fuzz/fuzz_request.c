/*
 * Fuzz target: one wire-protocol request frame through um_request_parse, then the
 * reply the server would build from the result. An accepted request has its fields
 * inside the documented limits. A rejected one gets an error reply whose message is
 * valid UTF-8 and whose dump is valid JSON, however odd the frame was.
 */
#include <jansson.h>
#include <string.h>

#include <unmaskd/protocol.h>

#include "fuzz.h"
#include "request.h"

/* Dump reply, which it consumes, and check that the text parses back as JSON. */
static void s_check_dump(json_t *reply)
{
    UM_FUZZ_CHECK(reply != NULL);
    size_t len = 0;
    char *text = um_reply_dump(reply, &len);
    UM_FUZZ_CHECK(text != NULL);
    UM_FUZZ_CHECK(len == strlen(text));
    json_t *back = json_loadb(text, len, JSON_DECODE_ANY | JSON_ALLOW_NUL, NULL);
    UM_FUZZ_CHECK(back != NULL);
    json_decref(back);
    free(text);
}

static void s_check_error(const um_request_t *req, const um_req_error_t *err)
{
    UM_FUZZ_CHECK(err->code != NULL);
    UM_FUZZ_CHECK(memchr(err->field, '\0', sizeof err->field) != NULL);
    UM_FUZZ_CHECK(memchr(err->message, '\0', sizeof err->message) != NULL);
    UM_FUZZ_CHECK(err->message[0] != '\0');
    UM_FUZZ_CHECK(um_fuzz_utf8_valid(err->message, strlen(err->message)));
    UM_FUZZ_CHECK(um_fuzz_utf8_valid(err->field, strlen(err->field)));

    json_t *reply = um_reply_error(req->id, err);
    UM_FUZZ_CHECK(reply != NULL);
    json_t *message = json_object_get(json_object_get(reply, "error"), "message");
    UM_FUZZ_CHECK(json_is_string(message));
    UM_FUZZ_CHECK(strcmp(json_string_value(message), err->message) == 0);
    s_check_dump(reply);
}

static void s_check_generate(const um_request_t *req)
{
    static const char *const policies[] = {"low_confidence", "random", "entropy",
                                           "topk_margin", "maskgit_plus", "threshold"};
    UM_FUZZ_CHECK(req->prompt != NULL || json_is_array(req->messages));
    UM_FUZZ_CHECK(req->gen_length >= 1);
    UM_FUZZ_CHECK(req->steps >= 1);
    UM_FUZZ_CHECK(req->block_length >= 1);
    UM_FUZZ_CHECK(req->remasking != NULL);
    UM_FUZZ_CHECK(req->top_k >= 0);
    /* top_p above 1, temperature and eps are the engine's to check (um_gen_check). */
    UM_FUZZ_CHECK(req->top_p > 0.0);
    UM_FUZZ_CHECK(req->remasking_params == NULL || json_is_object(req->remasking_params));
    um_request_suggest(req->remasking, policies, sizeof policies / sizeof policies[0]);
    if (req->prompt)
        s_check_dump(um_reply_textn(req->prompt, req->prompt_len));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    um_request_t req;
    um_req_error_t err;
    memset(&err, 0, sizeof err);
    int rc = um_request_parse((const char *)data, size, &req, &err);

    char id[64];
    const char *id_text = um_request_id_text(req.id, id, sizeof id);
    UM_FUZZ_CHECK(id_text != NULL && strlen(id_text) < sizeof id);

    if (rc != 0) {
        UM_FUZZ_CHECK(rc == -1);
        s_check_error(&req, &err);
        um_request_clear(&req);
        return 0;
    }

    UM_FUZZ_CHECK(json_is_object(req.root));
    UM_FUZZ_CHECK(strcmp(um_request_op_name(req.op), "?") != 0);
    switch (req.op) {
    case UM_REQ_GENERATE:
        s_check_generate(&req);
        break;
    case UM_REQ_TOKENIZE:
        UM_FUZZ_CHECK(req.text != NULL || json_is_array(req.messages));
        if (req.text)
            s_check_dump(um_reply_textn(req.text, req.text_len));
        break;
    case UM_REQ_DETOKENIZE:
        UM_FUZZ_CHECK(req.n_tokens == 0 || req.tokens != NULL);
        break;
    case UM_REQ_CANCEL:
        UM_FUZZ_CHECK(req.target != NULL);
        break;
    case UM_REQ_SCORE:
        UM_FUZZ_CHECK(req.prompt != NULL || json_is_array(req.messages));
        UM_FUZZ_CHECK(req.answer != NULL);
        UM_FUZZ_CHECK(req.n_samples >= 1 && req.batch_size >= 1);
        s_check_dump(um_reply_textn(req.answer, req.answer_len));
        break;
    case UM_REQ_INFO:
    case UM_REQ_HEALTH:
        break;
    }
    json_t *reply = um_reply_new(req.id, UM_REPLY_DONE);
    json_object_set_new(reply, "op", json_string(um_request_op_name(req.op)));
    s_check_dump(reply);
    um_request_clear(&req);
    return 0;
}
