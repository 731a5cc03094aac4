/*
 * The worker's side of the broker protocol (docs/worker-protocol.md), for unmaskd
 * --connect: a DEALER socket connected to the broker's back end, registration with
 * a ready message, heartbeats both ways, and the control messages.
 *
 * The server uses the socket as it uses its ROUTER when it binds: a request arrives
 * as [route, request] and every reply goes back as [route, reply], so its request
 * handling is the same in both modes. A message of one frame is a control message;
 * the server hands it to um_link_control.
 *
 * Threading: the server's main thread only.
 */
#ifndef UM_BROKER_LINK_H
#define UM_BROKER_LINK_H

#include <stddef.h>

#include <jansson.h>

typedef struct um_link_config {
    const char *endpoint;         /* the broker's back end */
    const char *model_name;       /* the name this worker serves its model under */
    size_t capacity;              /* generate requests it takes at once: 1 + max queue */
    long long max_frame;          /* ZMQ_MAXMSGSIZE of the socket; -1 for none */
    const char *curve_server_key; /* the broker's Z85 public key; NULL: no CURVE */
    const char *curve_public_key; /* this worker's Z85 key pair, with curve_server_key */
    const char *curve_secret_key;
} um_link_config_t;

/* What the server must do after a call. */
typedef enum um_link_event {
    UM_LINK_OK = 0,   /* nothing */
    UM_LINK_RESET,    /* the broker forgot this worker or went silent: drop every job,
                         whose replies would be dropped anyway, and call um_link_open */
    UM_LINK_REJECTED, /* the broker rejected this worker (logged): stop with an error */
} um_link_event_t;

typedef struct um_link um_link_t;

/* Copy cfg into a new link; no socket yet. Returns 0, or UM_ENOMEM with a message. */
int um_link_new(um_link_t **out, void *zctx, const um_link_config_t *cfg, char *err,
                size_t errlen);

/*
 * Close the current socket, if any, without waiting, open a new one with a new
 * routing id, connect it and send the ready message with info (the daemon's info
 * reply, which this call releases). Returns 0, or UM_EIO with a message in err.
 */
int um_link_open(um_link_t *link, json_t *info, char *err, size_t errlen);

/* The current socket; it changes with every um_link_open. */
void *um_link_socket(const um_link_t *link);

/* Milliseconds until um_link_tick has work. */
int um_link_timeout_ms(const um_link_t *link);

/* Send a heartbeat when due; UM_LINK_RESET when the broker has been silent too long. */
um_link_event_t um_link_tick(um_link_t *link);

/* Note that a message arrived from the broker. */
void um_link_heard(um_link_t *link);

/* Handle a one-frame control message from the broker. */
um_link_event_t um_link_control(um_link_t *link, const void *data, size_t len);

/*
 * Tell the broker that this worker reads no more requests (shutdown began). From
 * then on the link only sends heartbeats and never asks for a reset.
 */
void um_link_stopping(um_link_t *link);

/* Tell the broker that every final reply has been sent and this worker leaves. */
void um_link_disconnect(um_link_t *link);

/* Whether the broker has welcomed this worker on the current socket. */
int um_link_registered(const um_link_t *link);

/*
 * Write the default model name for a model folder into buf: its last path component
 * ("/srv/models/tinystories/" gives "tinystories").
 */
void um_link_default_name(const char *model_dir, char *buf, size_t size);

/* Close the socket, waiting up to one second to deliver what is queued, and free the
   link; sets *link to NULL. NULL is ignored. */
void um_link_destroy(um_link_t **link);

#endif /* UM_BROKER_LINK_H */
