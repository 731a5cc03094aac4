/*
 * The broker's ZAP handler (ZeroMQ RFC 27): a thread that accepts or rejects each
 * CURVE handshake by the peer's public key. Each ZAP domain has its own allow-list:
 * UM_ZAP_CLIENTS for the front end, UM_ZAP_WORKERS for the back end.
 *
 * Threading: um_zap_start and um_zap_stop are called from one thread; the handler
 * thread owns its sockets and the allow-lists, which never change while it runs.
 */
#ifndef UM_ZAP_H
#define UM_ZAP_H

#include <stddef.h>

/* ZAP domains that the broker's sockets set (ZMQ_ZAP_DOMAIN). */
#define UM_ZAP_CLIENTS "clients"
#define UM_ZAP_WORKERS "workers"

typedef struct um_zap um_zap_t;

/*
 * Load the allow-lists and start the handler in zctx. clients_dir and workers_dir are
 * folders of *.pub key files; NULL lets any key of that domain in (CURVE still
 * encrypts, and a peer must know the broker's public key). Call before any socket of
 * zctx binds with CURVE. Returns 0, or -1 with a message in err (an unreadable folder
 * or key file, a folder without keys, a failed bind).
 */
int um_zap_start(um_zap_t **out, void *zctx, const char *clients_dir, const char *workers_dir,
                 char *err, size_t errlen);

/* Stop and join the handler thread and free it; sets *zap to NULL. NULL is ignored. */
void um_zap_stop(um_zap_t **zap);

#endif /* UM_ZAP_H */
