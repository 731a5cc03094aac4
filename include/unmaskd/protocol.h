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
#define UM_OP_SCORE "score"

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
/* Only a broker (unmask-broker) sends these two. */
#define UM_ERR_UNKNOWN_MODEL "unknown_model" /* no worker has ever served the requested model */
#define UM_ERR_WORKER_LOST "worker_lost"     /* the worker running the request died or went silent */

/*
 * Request fields that only a broker reads. It removes them before a worker sees the
 * request, so a daemon reached directly rejects them as unknown fields.
 */
#define UM_FIELD_MODEL "model" /* string: route to a worker that serves this model */
#define UM_FIELD_RETRY "retry" /* boolean: resend once to another worker when the first
                                  dies before the request streamed a step */

/*
 * The worker protocol between unmask-broker and unmaskd --connect (docs/worker-protocol.md).
 * A one-frame message is a control message: a JSON object whose "ctl" field is one of
 * the names below. A two-frame message is [route, request] or [route, reply]. The
 * version is bumped when a message or field changes meaning or goes away.
 */
#define UM_WORKER_PROTOCOL_VERSION 1

/* Worker to broker. */
#define UM_CTL_READY "ready"           /* register: version, models, capacity, info */
#define UM_CTL_STOPPING "stopping"     /* shutting down: send no more requests */
/* Broker to worker. */
#define UM_CTL_WELCOME "welcome"       /* registered: heartbeat_ms and liveness to use */
#define UM_CTL_REJECT "reject"         /* not registered, with a message; the worker exits */
/* Both ways. */
#define UM_CTL_HEARTBEAT "heartbeat"   /* sent every heartbeat_ms; any message proves liveness */
#define UM_CTL_DISCONNECT "disconnect" /* worker: every final reply is sent, it leaves;
                                          broker: it forgot the worker, which registers again */

/* The broker's default endpoints: clients keep the daemon's default. */
#define UM_BROKER_DEFAULT_FRONTEND UM_DEFAULT_ENDPOINT
#define UM_BROKER_DEFAULT_BACKEND "tcp://127.0.0.1:5558"

#endif /* UNMASKD_PROTOCOL_H */
