/*
 * CURVE keys for links that cross hosts: key files, key generation and the socket
 * options of both ends. The broker, unmaskd --connect and the unmask client share
 * this unit; the broker's allow-lists and ZAP handler are in zap.h.
 *
 * Key files use the layout of czmq's certificates, so its tools can read and write
 * them: text lines `public-key = "Z85"` and, in a secret file, `secret-key = "Z85"`.
 * A key is 32 bytes, written as 40 characters of Z85 (ZeroMQ RFC 32).
 *
 * Threading: no shared state.
 */
#ifndef UM_CURVE_H
#define UM_CURVE_H

#include <stddef.h>

#include <zmq.h>

/* Characters of a Z85 key, without the terminating NUL. */
#define UM_CURVE_KEY_LEN 40

typedef struct um_curve_keypair {
    char public_key[UM_CURVE_KEY_LEN + 1]; /* Z85 */
    char secret_key[UM_CURVE_KEY_LEN + 1]; /* Z85; "" when only the public key was read */
} um_curve_keypair_t;

/*
 * Read a key file. With need_secret the file must hold a secret key and be readable by
 * its owner only. Returns 0, or -1 with a message naming the file and the fix in err.
 */
int um_curve_load(const char *path, int need_secret, um_curve_keypair_t *out, char *err,
                  size_t errlen);

/*
 * Read a public key given as 40 Z85 characters or as the path of a key file into out
 * (UM_CURVE_KEY_LEN + 1 bytes). Returns 0, or -1 with a message in err.
 */
int um_curve_public_arg(const char *arg, char *out, char *err, size_t errlen);

/*
 * Generate a key pair and write it to BASE.key (both keys, mode 0600) and BASE.pub
 * (the public key). Existing files are not replaced. Returns 0, or -1 with a message.
 */
int um_curve_keygen(const char *base, char *err, size_t errlen);

/*
 * Make sock the CURVE client of a server whose public key is server_key. own is the
 * client's key pair; NULL makes a fresh one, which servers without an allow-list accept.
 * Call before zmq_connect. Returns 0, or -1 with a message in err.
 */
int um_curve_set_client(void *sock, const char *server_key, const um_curve_keypair_t *own,
                        char *err, size_t errlen);

/*
 * Make sock a CURVE server with key pair own; domain names its allow-list for the ZAP
 * handler (zap.h). Call before zmq_bind. Returns 0, or -1 with a message in err.
 */
int um_curve_set_server(void *sock, const um_curve_keypair_t *own, const char *domain,
                        char *err, size_t errlen);

/*
 * Whether a ZeroMQ endpoint accepts connections from other hosts: a tcp, ws or wss
 * endpoint whose host is not 127.0.0.0/8, localhost or [::1], or any other network
 * transport. A wildcard (*, 0.0.0.0), any other address and an interface name count as
 * reachable, so the check errs on the side of CURVE. ipc and inproc endpoints are not.
 */
int um_curve_endpoint_is_public(const char *endpoint);

/* ZeroMQ connection events that um_curve_read_event reports. */
#define UM_CURVE_EVENTS                                                                   \
    (ZMQ_EVENT_CONNECTED | ZMQ_EVENT_ACCEPTED | ZMQ_EVENT_DISCONNECTED                    \
     | ZMQ_EVENT_HANDSHAKE_SUCCEEDED | ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL               \
     | ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL | ZMQ_EVENT_HANDSHAKE_FAILED_AUTH)

/*
 * Read one event from a zmq_socket_monitor PAIR socket without waiting. Returns 1 with
 * the event in *event and a description in text ("handshake failed: ..."), with
 * *failed set for a failed handshake; 0 when no event is waiting.
 */
int um_curve_read_event(void *monitor, int *event, int *failed, char *text, size_t size);

#endif /* UM_CURVE_H */
