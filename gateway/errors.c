/*
 * HTTP errors of the gateway and the daemon requests that every endpoint shares.
 * Daemon error codes map to HTTP statuses here, in one table.
 */
#include "config.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include <unmaskd/protocol.h>

#include "gateway.h"
#include "log.h"

void um_gw_error_set(um_gw_error_t *e, int status, const char *code, const char *param,
                     const char *fmt, ...)
{
    e->status = status;
    snprintf(e->code, sizeof e->code, "%s", code ? code : "error");
    e->retry_after_s = 0;
    snprintf(e->param, sizeof e->param, "%s", param ? param : "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof e->message, fmt, ap);
    va_end(ap);
}

/* OpenAI's error "type" for a status: clients branch on it. */
static const char *s_error_type(int status)
{
    if (status >= 500)
        return "server_error";
    if (status == 404)
        return "not_found_error";
    return "invalid_request_error";
}

json_t *um_gw_error_json(const um_gw_error_t *e)
{
    json_t *inner = json_pack("{s:s, s:s, s:o, s:s}", "message", e->message, "type",
                              s_error_type(e->status), "param",
                              e->param[0] ? json_string(e->param) : json_null(), "code",
                              e->code);
    if (!inner) /* a message that is not UTF-8 cannot be packed, but the status stays */
        inner = json_pack("{s:s, s:s, s:n, s:s}", "message", "(message not valid UTF-8)",
                          "type", s_error_type(e->status), "param", "code",
                          e->code);
    return json_pack("{s:o}", "error", inner);
}

void um_gw_error_from_status(um_gw_error_t *e, int status, const char *endpoint)
{
    switch (status) {
    case UM_GW_UNREACHABLE:
        um_gw_error_set(e, 503, "daemon_unavailable", NULL, "unmaskd at %s cannot be reached: "
                        "start it (unmaskd --bind %s), or start the gateway with --connect set "
                        "to its endpoint", endpoint, endpoint);
        e->retry_after_s = 1;
        break;
    case UM_GW_LOST:
        um_gw_error_set(e, 502, "daemon_lost", NULL, "unmaskd at %s closed the connection "
                        "before it finished the request: check whether it crashed or was "
                        "restarted, and retry", endpoint);
        break;
    case UM_GW_TIMEOUT:
        um_gw_error_set(e, 504, "daemon_timeout", NULL, "unmaskd at %s sent nothing within the "
                        "gateway's timeout: check its log, or start the gateway with a larger "
                        "--timeout for slow models", endpoint);
        break;
    case UM_GW_BAD_REPLY:
        um_gw_error_set(e, 502, "bad_daemon_reply", NULL, "unmaskd at %s sent a reply that is "
                        "not a JSON object with a type: is --connect pointing at an unmaskd "
                        "or a broker?", endpoint);
        break;
    case UM_GW_ABORTED:
        um_gw_error_set(e, 503, "gateway_stopping", NULL, "the gateway stopped waiting for "
                        "unmaskd because it is shutting down (or the HTTP client left): retry "
                        "once it is back");
        break;
    default:
        um_gw_error_set(e, 500, "internal", NULL, "gateway failure: %s",
                        um_gw_status_text(status));
        break;
    }
}

/* HTTP status of a daemon error code. Codes that only a gateway bug can cause are 500. */
static int s_status_of_code(const char *code)
{
    static const struct {
        const char *code;
        int status;
    } table[] = {
        {UM_ERR_BAD_JSON, 400},       {UM_ERR_INVALID, 400},
        {UM_ERR_UNKNOWN_FIELD, 400},  {UM_ERR_OUT_OF_RANGE, 400},
        {UM_ERR_UNKNOWN_PLUGIN, 400}, {UM_ERR_BUSY, 503},
        {UM_ERR_INTERNAL, 500},       {UM_ERR_UNKNOWN_OP, 500},
        {UM_ERR_DUPLICATE_ID, 500},   {UM_ERR_NOT_FOUND, 500},
    };
    for (size_t i = 0; code && i < sizeof table / sizeof table[0]; i++)
        if (strcmp(code, table[i].code) == 0)
            return table[i].status;
    return 500;
}

void um_gw_error_from_reply(um_gw_error_t *e, const json_t *reply, um_gw_field_map_fn map,
                            void *map_arg)
{
    const char *type = um_gw_reply_type(reply);
    if (strcmp(type, UM_REPLY_CANCELLED) == 0) {
        const char *reason = json_string_value(json_object_get(reply, "reason"));
        um_gw_error_set(e, 503, "cancelled", NULL, "unmaskd cancelled the request (%s): %s",
                        reason ? reason : "no reason given",
                        reason && strcmp(reason, "shutdown") == 0
                            ? "the daemon is shutting down; retry once it is back"
                            : "retry the request");
        e->retry_after_s = 1;
        return;
    }
    const json_t *err = json_object_get(reply, "error");
    const char *code = json_string_value(json_object_get(err, "code"));
    const char *field = json_string_value(json_object_get(err, "field"));
    const char *message = json_string_value(json_object_get(err, "message"));
    if (strcmp(type, UM_REPLY_ERROR) != 0 || !code) {
        um_gw_error_set(e, 502, "bad_daemon_reply", NULL, "unmaskd sent a final reply of type "
                        "\"%s\" without an error code", type);
        return;
    }
    int status = s_status_of_code(code);
    const char *param = field;
    if (field && map) {
        const char *renamed = map(field, map_arg);
        if (renamed)
            param = renamed;
    }
    if (param != field && param)
        um_gw_error_set(e, status, code, param, "%s: %s (the gateway sends %s to unmaskd as "
                        "%s)", param, message ? message : "no message", param, field);
    else
        um_gw_error_set(e, status, code, param, "%s", message ? message : "no message");
    if (status == 503)
        e->retry_after_s = 1;
}

json_t *um_gw_fetch_info(um_gw_session_t *s, um_gw_error_t *e)
{
    json_t *req = json_pack("{s:s}", "op", UM_OP_INFO);
    json_t *reply = NULL;
    int rc = req ? um_gw_session_call(s, req, &reply) : UM_GW_NOMEM;
    json_decref(req);
    if (rc != 0) {
        um_gw_error_from_status(e, rc, s->up->endpoint);
        return NULL;
    }
    if (strcmp(um_gw_reply_type(reply), UM_REPLY_DONE) != 0) {
        um_gw_error_from_reply(e, reply, NULL, NULL);
        json_decref(reply);
        return NULL;
    }
    return reply;
}

const char *um_gw_model_id(const um_gw_t *gw, const json_t *info, char *buf, size_t len)
{
    if (gw->cfg.model_name) {
        snprintf(buf, len, "%s", gw->cfg.model_name);
        return buf;
    }
    const char *dir = json_string_value(json_object_get(json_object_get(info, "model"), "dir"));
    if (!dir || !*dir) {
        snprintf(buf, len, "unmaskd");
        return buf;
    }
    /* The last non-empty path part: "/models/tinystories/" gives "tinystories". */
    size_t end = strlen(dir);
    while (end > 1 && dir[end - 1] == '/')
        end--;
    size_t start = end;
    while (start > 0 && dir[start - 1] != '/')
        start--;
    snprintf(buf, len, "%.*s", (int)(end - start), dir + start);
    if (!buf[0])
        snprintf(buf, len, "unmaskd");
    return buf;
}
