/*
 * unmaskd wire protocol constants.
 *
 * Requests and replies are JSON objects, one per ZeroMQ message frame, on a ROUTER
 * socket that the daemon binds. docs/protocol.md describes every field.
 */
#ifndef UNMASKD_PROTOCOL_H
#define UNMASKD_PROTOCOL_H

/* Bumped when a field changes meaning or goes away; new optional fields do not bump it. */
#define UM_PROTOCOL_VERSION 1

/* Loopback only, so a daemon started with defaults is not reachable from other hosts. */
#define UM_DEFAULT_ENDPOINT "tcp://127.0.0.1:5557"

/* Request operations ("op"). */
#define UM_OP_GENERATE "generate"
#define UM_OP_TOKENIZE "tokenize"
#define UM_OP_DETOKENIZE "detokenize"
#define UM_OP_INFO "info"
#define UM_OP_HEALTH "health"
#define UM_OP_CANCEL "cancel"

/* Reply types ("type"). Exactly one final type (done, error, cancelled) per request. */
#define UM_REPLY_STEP "step"
#define UM_REPLY_DONE "done"
#define UM_REPLY_ERROR "error"
#define UM_REPLY_CANCELLED "cancelled"

/* Error codes ("error.code") in error replies. */
#define UM_ERR_BAD_JSON "bad_json"
#define UM_ERR_INVALID "invalid_request"
#define UM_ERR_UNKNOWN_OP "unknown_op"
#define UM_ERR_UNKNOWN_FIELD "unknown_field"
#define UM_ERR_OUT_OF_RANGE "out_of_range"
#define UM_ERR_UNKNOWN_PLUGIN "unknown_plugin"
#define UM_ERR_DUPLICATE_ID "duplicate_id"
#define UM_ERR_NOT_FOUND "not_found"
#define UM_ERR_BUSY "busy"
#define UM_ERR_INTERNAL "internal"

#endif /* UNMASKD_PROTOCOL_H */
