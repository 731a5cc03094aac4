/* CURVE key files and socket options: see curve.h. */
#include "config.h"

#include "curve.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <zmq.h>

/* Whether s is 40 characters that decode as Z85. */
static int s_valid_z85(const char *s)
{
    uint8_t raw[32];
    return strlen(s) == UM_CURVE_KEY_LEN && zmq_z85_decode(raw, s) != NULL;
}

/*
 * Match one line against `name = "value"` (quotes optional) and copy a 40-character
 * value into out. Returns 1 when it matches with a valid key, 0 when the line is about
 * something else, -1 when it names the key but the value is malformed.
 */
static int s_match_line(const char *p, const char *name, char *out)
{
    size_t name_len = strlen(name);
    while (*p == ' ' || *p == '\t')
        p++;
    if (strncmp(p, name, name_len) != 0)
        return 0;
    p += name_len;
    while (*p == ' ' || *p == '\t')
        p++;
    if (*p != '=')
        return 0;
    p++;
    while (*p == ' ' || *p == '\t')
        p++;
    if (*p == '"')
        p++;
    size_t n = 0;
    while (p[n] && p[n] != '"' && p[n] != '\n' && p[n] != '\r' && p[n] != ' ')
        n++;
    if (n != UM_CURVE_KEY_LEN)
        return -1;
    memcpy(out, p, n);
    out[n] = '\0';
    return s_valid_z85(out) ? 1 : -1;
}

/* Find the first line of text that names key name: 1 found, 0 absent, -1 malformed. */
static int s_find_key(const char *text, const char *name, char *out)
{
    const char *line = text;
    while (line) {
        int rc = s_match_line(line, name, out);
        if (rc != 0)
            return rc;
        const char *nl = strchr(line, '\n');
        line = nl ? nl + 1 : NULL;
    }
    return 0;
}

/* Read a small text file into a malloc'ed string; NULL with errno set on failure. */
static char *s_read_small(const char *path)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return NULL;
    char *buf = malloc(8193);
    size_t n = buf ? fread(buf, 1, 8192, f) : 0;
    fclose(f);
    if (buf)
        buf[n] = '\0';
    else
        errno = ENOMEM;
    return buf;
}

int um_curve_load(const char *path, int need_secret, um_curve_keypair_t *out, char *err,
                  size_t errlen)
{
    memset(out, 0, sizeof *out);
    char *text = s_read_small(path);
    if (!text) {
        snprintf(err, errlen, "cannot read key file %s: %s: check the path, or create a key "
                 "pair with unmask-broker --keygen", path, strerror(errno));
        return -1;
    }
    int pub = s_find_key(text, "public-key", out->public_key);
    int sec = s_find_key(text, "secret-key", out->secret_key);
    free(text);
    if (pub <= 0) {
        snprintf(err, errlen, "key file %s has %s public-key line: expected public-key = "
                 "\"<40 Z85 characters>\" as unmask-broker --keygen writes it", path,
                 pub < 0 ? "a malformed" : "no");
        return -1;
    }
    if (sec < 0 || (need_secret && sec == 0)) {
        snprintf(err, errlen, "key file %s has %s secret-key line: give the .key file that "
                 "unmask-broker --keygen wrote, not the .pub file", path,
                 sec < 0 ? "a malformed" : "no");
        return -1;
    }
    if (sec > 0) {
        struct stat st;
        if (stat(path, &st) == 0 && (st.st_mode & 077) != 0) {
            snprintf(err, errlen, "key file %s holds a secret key but other users may read "
                     "it (mode %03o): run chmod 600 %s", path, (unsigned)(st.st_mode & 0777),
                     path);
            return -1;
        }
        /* The secret key must belong to the public key beside it. */
        char derived[UM_CURVE_KEY_LEN + 1];
        if (zmq_curve_public(derived, out->secret_key) != 0
            || strcmp(derived, out->public_key) != 0) {
            snprintf(err, errlen, "key file %s: the public key does not belong to the "
                     "secret key: the file was edited; create a new pair with "
                     "unmask-broker --keygen", path);
            return -1;
        }
    }
    return 0;
}

int um_curve_public_arg(const char *arg, char *out, char *err, size_t errlen)
{
    if (s_valid_z85(arg)) {
        memcpy(out, arg, UM_CURVE_KEY_LEN + 1);
        return 0;
    }
    um_curve_keypair_t kp;
    if (um_curve_load(arg, 0, &kp, err, errlen) != 0)
        return -1;
    memcpy(out, kp.public_key, UM_CURVE_KEY_LEN + 1);
    return 0;
}

/* Write text to a new file with mode; fails when the file exists. */
static int s_write_new(const char *path, const char *text, mode_t mode, char *err, size_t errlen)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL, mode);
    if (fd < 0) {
        snprintf(err, errlen, "cannot create %s: %s%s", path, strerror(errno),
                 errno == EEXIST ? ": remove it first or choose another name" : "");
        return -1;
    }
    size_t len = strlen(text);
    ssize_t n = write(fd, text, len);
    int rc = n == (ssize_t)len ? 0 : -1;
    if (close(fd) != 0 || rc != 0) {
        snprintf(err, errlen, "cannot write %s: %s", path, strerror(errno));
        unlink(path);
        return -1;
    }
    return 0;
}

int um_curve_keygen(const char *base, char *err, size_t errlen)
{
    char pub[UM_CURVE_KEY_LEN + 1], sec[UM_CURVE_KEY_LEN + 1];
    if (zmq_curve_keypair(pub, sec) != 0) {
        snprintf(err, errlen, "cannot generate a CURVE key pair: %s: libzmq was built "
                 "without CURVE (install the Debian package libzmq5 with libsodium)",
                 zmq_strerror(errno));
        return -1;
    }
    char key_path[4096], pub_path[4096], text[512];
    snprintf(key_path, sizeof key_path, "%s.key", base);
    snprintf(pub_path, sizeof pub_path, "%s.pub", base);

    snprintf(text, sizeof text,
             "#   unmaskd CURVE secret key: keep this file private (mode 0600).\n"
             "#   Give it to --curve-key; share only the .pub file beside it.\n"
             "metadata\n"
             "curve\n"
             "    public-key = \"%s\"\n"
             "    secret-key = \"%s\"\n", pub, sec);
    if (s_write_new(key_path, text, 0600, err, errlen) != 0)
        return -1;
    snprintf(text, sizeof text,
             "#   unmaskd CURVE public key: copy it to the peers that must accept this key.\n"
             "metadata\n"
             "curve\n"
             "    public-key = \"%s\"\n", pub);
    if (s_write_new(pub_path, text, 0644, err, errlen) != 0) {
        unlink(key_path);
        return -1;
    }
    return 0;
}

int um_curve_set_client(void *sock, const char *server_key, const um_curve_keypair_t *own,
                        char *err, size_t errlen)
{
    um_curve_keypair_t fresh;
    if (!own) {
        if (zmq_curve_keypair(fresh.public_key, fresh.secret_key) != 0) {
            snprintf(err, errlen, "cannot generate a CURVE key pair: %s", zmq_strerror(errno));
            return -1;
        }
        own = &fresh;
    }
    /* libzmq reads a 41-byte value (40 characters and the NUL) as a Z85 key. */
    if (zmq_setsockopt(sock, ZMQ_CURVE_SERVERKEY, server_key, UM_CURVE_KEY_LEN + 1) != 0
        || zmq_setsockopt(sock, ZMQ_CURVE_PUBLICKEY, own->public_key, UM_CURVE_KEY_LEN + 1) != 0
        || zmq_setsockopt(sock, ZMQ_CURVE_SECRETKEY, own->secret_key, UM_CURVE_KEY_LEN + 1)
               != 0) {
        snprintf(err, errlen, "cannot set the CURVE client keys: %s", zmq_strerror(errno));
        return -1;
    }
    return 0;
}

/* The words for a ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL value (zmq_socket_monitor(3)). */
static const char *s_protocol_error(unsigned value)
{
    switch (value) {
    case ZMQ_PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
        return "a cryptographic error: the peers' CURVE keys do not match (a wrong server "
               "key?)";
    case ZMQ_PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
        return "one side uses CURVE and the other does not";
    case ZMQ_PROTOCOL_ERROR_ZMTP_KEY_EXCHANGE:
        return "the key exchange failed";
    default:
        if ((value & 0xF0000000u) == ZMQ_PROTOCOL_ERROR_ZAP_UNSPECIFIED)
            return "the authentication handler sent an invalid reply";
        return "a ZMTP protocol error";
    }
}

int um_curve_read_event(void *monitor, int *event, int *failed, char *text, size_t size)
{
    zmq_msg_t head, address;
    zmq_msg_init(&head);
    if (zmq_msg_recv(&head, monitor, ZMQ_DONTWAIT) < 0) {
        zmq_msg_close(&head);
        return 0;
    }
    uint16_t id = 0;
    uint32_t value = 0;
    if (zmq_msg_size(&head) >= 6) {
        memcpy(&id, zmq_msg_data(&head), sizeof id);
        memcpy(&value, (char *)zmq_msg_data(&head) + 2, sizeof value);
    }
    int more = zmq_msg_more(&head);
    zmq_msg_close(&head);
    char where[128] = "";
    zmq_msg_init(&address);
    if (more && zmq_msg_recv(&address, monitor, 0) >= 0)
        snprintf(where, sizeof where, "%.*s", (int)zmq_msg_size(&address),
                 (char *)zmq_msg_data(&address));
    zmq_msg_close(&address);

    *event = id;
    *failed = 0;
    switch (id) {
    case ZMQ_EVENT_CONNECTED:
        snprintf(text, size, "connected to %s", where);
        break;
    case ZMQ_EVENT_ACCEPTED:
        snprintf(text, size, "accepted a connection on %s", where);
        break;
    case ZMQ_EVENT_DISCONNECTED:
        snprintf(text, size, "a connection on %s closed", where);
        break;
    case ZMQ_EVENT_HANDSHAKE_SUCCEEDED:
        snprintf(text, size, "handshake succeeded on %s", where);
        break;
    case ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL:
        *failed = 1;
        snprintf(text, size, "handshake failed on %s: %s (0x%08x)", where,
                 s_protocol_error(value), value);
        break;
    case ZMQ_EVENT_HANDSHAKE_FAILED_AUTH:
        *failed = 1;
        snprintf(text, size, "handshake failed on %s: the key was rejected (status %u)", where,
                 value);
        break;
    case ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL:
        *failed = 1;
        snprintf(text, size, "handshake failed on %s: %s", where, zmq_strerror((int)value));
        break;
    default:
        snprintf(text, size, "event 0x%x on %s", id, where);
        break;
    }
    return 1;
}

int um_curve_endpoint_is_public(const char *endpoint)
{
    if (strncmp(endpoint, "ipc://", 6) == 0 || strncmp(endpoint, "inproc://", 9) == 0)
        return 0;
    const char *host = NULL;
    if (strncmp(endpoint, "tcp://", 6) == 0 || strncmp(endpoint, "wss://", 6) == 0)
        host = endpoint + 6;
    else if (strncmp(endpoint, "ws://", 5) == 0)
        host = endpoint + 5;
    /* Any other transport (udp, pgm, norm, ...) reaches the network. */
    if (!host)
        return 1;
    return !(strncmp(host, "127.", 4) == 0 || strncmp(host, "localhost:", 10) == 0
             || strncmp(host, "[::1]:", 6) == 0);
}

int um_curve_set_server(void *sock, const um_curve_keypair_t *own, const char *domain,
                        char *err, size_t errlen)
{
    int on = 1;
    if (zmq_setsockopt(sock, ZMQ_CURVE_SERVER, &on, sizeof on) != 0
        || zmq_setsockopt(sock, ZMQ_CURVE_PUBLICKEY, own->public_key, UM_CURVE_KEY_LEN + 1) != 0
        || zmq_setsockopt(sock, ZMQ_CURVE_SECRETKEY, own->secret_key, UM_CURVE_KEY_LEN + 1) != 0
        || zmq_setsockopt(sock, ZMQ_ZAP_DOMAIN, domain, strlen(domain)) != 0) {
        snprintf(err, errlen, "cannot set the CURVE server key: %s", zmq_strerror(errno));
        return -1;
    }
    return 0;
}
