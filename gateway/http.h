/*
 * The gateway's HTTP server on libmicrohttpd: request bodies and their limit, routing,
 * JSON and server-sent-event responses, and the endpoints that are not OpenAI's
 * (the page, /api/info, /api/health, /api/generate).
 *
 * Threading: libmicrohttpd runs one thread per connection, and each request opens
 * its own ZeroMQ session to the daemon in that thread. A request that waits for the
 * daemon polls its client's socket, so a client that leaves cancels its generation.
 */
#ifndef UM_GW_HTTP_H
#define UM_GW_HTTP_H

#include <stddef.h>

#include "gateway.h"

/*
 * Start serving on gw->cfg.listen and gw->cfg.port and set gw->port to the port bound.
 * Returns 0, or -1 with err filled.
 */
int um_gw_http_start(um_gw_t *gw, char *err, size_t errlen);

/* Stop accepting, end every request (each waits for its daemon request to end), and
   release the server. */
void um_gw_http_stop(um_gw_t *gw);

#endif /* UM_GW_HTTP_H */
