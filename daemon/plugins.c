/*
 * The plugin host: discovery, ABI checks and the registry (see plugins.h).
 *
 * A plugin is accepted only when every check passes; otherwise it is unloaded,
 * logged with the reason and skipped, and the daemon keeps going. A plugin runs inside
 * the daemon with its rights, so folders and files that other users may write are
 * refused before dlopen ever reads them.
 */
#include "plugins.h"

#include <ctype.h>
#include <dirent.h>
#include <dlfcn.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <errno.h>
#include <limits.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "log.h"
#include "rng.h"

/* ------------------------------------------------------------------------- */
/* Host services                                                              */

/* Write one plugin message at level, its component named after the plugin. */
static void s_host_vlog(int level, const char *plugin, const char *fmt, va_list ap)
{
    if (level < um_log_threshold)
        return;
    char msg[1024];
    vsnprintf(msg, sizeof msg, fmt, ap);
    char component[96];
    snprintf(component, sizeof component, "plugin %s", plugin ? plugin : "?");
    um_log_write(level, component, "%s", msg);
}

static void s_host_log(int level, const char *plugin, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    s_host_vlog(level, plugin, fmt, ap);
    va_end(ap);
}

/* Log as s_host_log, with information messages demoted to debug, for a second instance
   whose load would repeat the first one's messages. */
static void s_host_log_quiet(int level, const char *plugin, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    s_host_vlog(level == UM_LOG_INFO ? UM_LOG_DEBUG : level, plugin, fmt, ap);
    va_end(ap);
}

static int32_t s_select_top(const double *score, int32_t n, int32_t k, int32_t *out)
{
    /* Partial selection sort, O(n k): both are bounded by the canvas length. */
    int32_t n_written = 0;
    if (k > n)
        k = n;
    unsigned char *used = calloc((size_t)(n > 0 ? n : 1), 1);
    if (!used)
        return 0;
    while (n_written < k) {
        int32_t best = -1;
        for (int32_t i = 0; i < n; i++) {
            if (used[i] || score[i] == -INFINITY || isnan(score[i]))
                continue;
            if (best < 0 || score[i] > score[best])
                best = i;
        }
        if (best < 0)
            break;
        used[best] = 1;
        out[n_written++] = best;
    }
    free(used);
    return n_written;
}

/* Whether candidate a ranks before b: group, then score descending (NaN last), then index. */
static int s_ranks_before(const double *score, const uint8_t *demoted, int32_t a, int32_t b)
{
    int ga = demoted && demoted[a], gb = demoted && demoted[b];
    if (ga != gb)
        return ga < gb;
    int na = isnan(score[a]), nb = isnan(score[b]);
    if (na != nb)
        return nb;
    if (!na && score[a] != score[b])
        return score[a] > score[b];
    return a < b;
}

static int32_t s_rank(const double *score, const uint8_t *demoted, int32_t n, int32_t *order)
{
    if (n <= 0)
        return 0;
    int32_t *tmp = malloc((size_t)n * sizeof *tmp);
    if (!tmp)
        return UM_ENOMEM;
    for (int32_t i = 0; i < n; i++)
        order[i] = i;
    /* Bottom-up merge sort: stable and O(n log n) for canvases of any length. */
    for (int32_t width = 1; width < n; width *= 2) {
        for (int32_t lo = 0; lo < n; lo += 2 * width) {
            int32_t mid = lo + width < n ? lo + width : n;
            int32_t hi = lo + 2 * width < n ? lo + 2 * width : n;
            int32_t a = lo, b = mid, k = lo;
            while (a < mid && b < hi)
                tmp[k++] = s_ranks_before(score, demoted, order[b], order[a]) ? order[b++]
                                                                              : order[a++];
            while (a < mid)
                tmp[k++] = order[a++];
            while (b < hi)
                tmp[k++] = order[b++];
        }
        memcpy(order, tmp, (size_t)n * sizeof *order);
    }
    free(tmp);
    return n;
}

static const um_host_t s_host = {
    .struct_size = sizeof(um_host_t),
    .log = s_host_log,
    .alloc = malloc,
    .free = free,
    .rng_uniform = um_rng_uniform,
    .select_top = s_select_top,
    .rank = s_rank,
};

const um_host_t *um_plugin_host(void)
{
    return &s_host;
}

static const um_host_t s_host_quiet = {
    .struct_size = sizeof(um_host_t),
    .log = s_host_log_quiet,
    .alloc = malloc,
    .free = free,
    .rng_uniform = um_rng_uniform,
    .select_top = s_select_top,
    .rank = s_rank,
};

const um_host_t *um_plugin_host_quiet(void)
{
    return &s_host_quiet;
}

/* Whether a struct of struct_size bytes contains the whole of the field. */
#define S_COVERS(struct_size, type, field) \
    ((size_t)(struct_size) >= offsetof(type, field) + sizeof(((type *)0)->field))

um_remask_traits_t um_remask_traits(const um_remask_ops_t *ops)
{
    um_remask_traits_t t = {.flags = 0, .sampler = UM_SAMPLER_GUMBEL,
                            .schedule = UM_SCHEDULE_QUOTA};
    if (S_COVERS(ops->struct_size, um_remask_ops_t, flags))
        t.flags = ops->flags;
    if (S_COVERS(ops->struct_size, um_remask_ops_t, token_sampler)
        && ops->token_sampler == UM_SAMPLER_CATEGORICAL)
        t.sampler = UM_SAMPLER_CATEGORICAL;
    if (S_COVERS(ops->struct_size, um_remask_ops_t, schedule)
        && ops->schedule == UM_SCHEDULE_TIMESTEP)
        t.schedule = UM_SCHEDULE_TIMESTEP;
    return t;
}

const char *um_token_sampler_name(um_token_sampler_t sampler)
{
    return sampler == UM_SAMPLER_CATEGORICAL ? "categorical" : "gumbel";
}

const char *um_schedule_name(um_schedule_t schedule)
{
    return schedule == UM_SCHEDULE_TIMESTEP ? "timestep" : "quota";
}

/* ------------------------------------------------------------------------- */
/* Loading and checks                                                         */

static const char *s_kind_name(uint32_t kind)
{
    switch (kind) {
    case UM_PLUGIN_REMASK:
        return "remask";
    case UM_PLUGIN_TOKENIZER:
        return "tokenizer";
    default:
        return "unknown";
    }
}

static int s_valid_name(const char *name)
{
    if (!name || !*name || strlen(name) > 64)
        return 0;
    for (const char *p = name; *p; p++)
        if (!(islower((unsigned char)*p) || isdigit((unsigned char)*p) || *p == '_'))
            return 0;
    return 1;
}

/* Check a descriptor; on failure write the reason to err. */
static int s_check_desc(const um_plugin_registry_t *reg, const um_plugin_desc_t *d, char *err,
                        size_t errlen)
{
    if (d->abi_major != UM_PLUGIN_ABI_MAJOR) {
        snprintf(err, errlen, "built for plugin ABI %u.%u, this daemon has ABI %d.%d: rebuild "
                 "the plugin against this version's <unmaskd/plugin.h>",
                 d->abi_major, d->abi_minor, UM_PLUGIN_ABI_MAJOR, UM_PLUGIN_ABI_MINOR);
        return UM_EPLUGIN;
    }
    /* Fields up to and including the kind tables are part of ABI 1.0. */
    size_t need = offsetof(um_plugin_desc_t, tokenizer) + sizeof(d->tokenizer);
    if (d->struct_size < need) {
        snprintf(err, errlen, "descriptor is %u bytes, ABI %d.0 needs at least %zu: the plugin "
                 "was built against a broken header", d->struct_size, UM_PLUGIN_ABI_MAJOR, need);
        return UM_EPLUGIN;
    }
    if (!s_valid_name(d->name)) {
        snprintf(err, errlen, "invalid plugin name \"%s\": names use only a-z, 0-9 and _ "
                 "(at most 64 characters)", d->name ? d->name : "(null)");
        return UM_EPLUGIN;
    }
    if (d->kind == UM_PLUGIN_REMASK) {
        const um_remask_ops_t *r = d->remask;
        if (!r || r->struct_size < offsetof(um_remask_ops_t, request_end) + sizeof(r->request_end)
            || !r->request_begin || !r->select || !r->request_end
            || (r->n_params > 0 && !r->params) || r->n_params < 0) {
            snprintf(err, errlen, "remask plugin \"%s\" has no complete function table "
                     "(request_begin, select, request_end, params)", d->name);
            return UM_EPLUGIN;
        }
        if (d->abi_minor >= 1 && S_COVERS(r->struct_size, um_remask_ops_t, schedule)
            && (r->token_sampler > UM_SAMPLER_CATEGORICAL
                || r->schedule > UM_SCHEDULE_TIMESTEP
                || (r->flags & ~UM_REMASK_ADAPTIVE) != 0)) {
            snprintf(err, errlen, "remask plugin \"%s\" declares token_sampler %u, schedule "
                     "%u or flags 0x%x that this daemon does not know: rebuild it against "
                     "this version's <unmaskd/plugin.h>", d->name, r->token_sampler,
                     r->schedule, r->flags);
            return UM_EPLUGIN;
        }
    } else if (d->kind == UM_PLUGIN_TOKENIZER) {
        const um_tokenizer_ops_t *t = d->tokenizer;
        if (!t || t->struct_size < offsetof(um_tokenizer_ops_t, is_special) + sizeof(t->is_special)
            || !t->probe || !t->load || !t->unload || !t->vocab_size || !t->encode
            || !t->decode || !t->token_to_id || !t->is_special) {
            snprintf(err, errlen, "tokenizer plugin \"%s\" has no complete function table",
                     d->name);
            return UM_EPLUGIN;
        }
    } else {
        snprintf(err, errlen, "plugin \"%s\" has unknown kind %u: expected %d (remask) or %d "
                 "(tokenizer)", d->name, d->kind, UM_PLUGIN_REMASK, UM_PLUGIN_TOKENIZER);
        return UM_EPLUGIN;
    }
    if (um_plugins_find(reg, (um_plugin_kind_t)d->kind, d->name)) {
        snprintf(err, errlen, "a %s plugin named \"%s\" is already loaded: remove one of the "
                 "two files or rename the plugin", s_kind_name(d->kind), d->name);
        return UM_EPLUGIN;
    }
    return 0;
}

/* The descriptor's init, or NULL when it has none or predates ABI 1.1. */
static int (*s_desc_init(const um_plugin_desc_t *d))(const um_host_t *, char *, size_t)
{
    if (d->abi_minor < 1 || !S_COVERS(d->struct_size, um_plugin_desc_t, init))
        return NULL;
    return d->init;
}

static void (*s_desc_fini(const um_plugin_desc_t *d))(void)
{
    if (d->abi_minor < 1 || !S_COVERS(d->struct_size, um_plugin_desc_t, fini))
        return NULL;
    return d->fini;
}

/*
 * Check that only root and this process's user and group may write path: owned by root
 * or this process's user, not writable by every user, and group-writable only for
 * group root or the process's group. A plugin
 * folder or file that others can write lets them run code as the daemon. label names it
 * in the message ("plugin folder", "plugin file"). Returns 0, or -1 with the reason and
 * the fix in err.
 */
static int s_check_writers(const char *path, const char *label, char *err, size_t errlen)
{
    struct stat st;
    if (stat(path, &st) != 0) {
        snprintf(err, errlen, "cannot read the permissions of %s %s: %s", label, path,
                 strerror(errno));
        return -1;
    }
    unsigned mode = (unsigned)st.st_mode & 07777;
    if (st.st_uid != 0 && st.st_uid != geteuid()) {
        snprintf(err, errlen, "%s %s is owned by user %u, who is neither root nor unmaskd's "
                 "user %u, so that user could make unmaskd run their code: run chown %u %s",
                 label, path, (unsigned)st.st_uid, (unsigned)geteuid(), (unsigned)geteuid(),
                 path);
        return -1;
    }
    if (st.st_mode & S_IWOTH) {
        snprintf(err, errlen, "%s %s is writable by every user (mode %04o), so anyone could "
                 "make unmaskd run their code: run chmod o-w %s", label, path, mode, path);
        return -1;
    }
    if ((st.st_mode & S_IWGRP) && st.st_gid != 0 && st.st_gid != getegid()) {
        snprintf(err, errlen, "%s %s is writable by group %u (mode %04o), which is neither "
                 "root's nor unmaskd's group %u, so its members could make unmaskd run their "
                 "code: run chmod g-w %s", label, path, (unsigned)st.st_gid, mode,
                 (unsigned)getegid(), path);
        return -1;
    }
    return 0;
}

/*
 * Check the folders above folder (a resolved path) up to /: a user who may rename an entry
 * of one of them could put another folder in the plugin folder's place. A folder that
 * every user may write passes when its sticky bit is set (/tmp), because there only the
 * owner of an entry may rename it. Returns 0, or -1 with the reason in err.
 */
static int s_check_ancestors(const char *folder, char *err, size_t errlen)
{
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s", folder);
    for (;;) {
        char *slash = strrchr(path, '/');
        if (!slash)
            return 0;
        if (slash == path)
            slash[1] = '\0';
        else
            *slash = '\0';
        struct stat st;
        if (stat(path, &st) != 0) {
            snprintf(err, errlen, "cannot read the permissions of folder %s: %s", path,
                     strerror(errno));
            return -1;
        }
        int sticky = (st.st_mode & S_ISVTX) != 0;
        if (!sticky && s_check_writers(path, "folder above the plugins", err, errlen) != 0)
            return -1;
        if (sticky && st.st_uid != 0 && st.st_uid != geteuid()) {
            snprintf(err, errlen, "folder above the plugins %s is owned by user %u, who is "
                     "neither root nor unmaskd's user %u: move the plugins elsewhere", path,
                     (unsigned)st.st_uid, (unsigned)geteuid());
            return -1;
        }
        if (strcmp(path, "/") == 0)
            return 0;
    }
}

/*
 * Check a plugin file and the folder that really contains it (after symbolic links,
 * since build-plugins/ links into .libs/). Returns 0, or -1 with the reason in err.
 */
static int s_check_plugin_file(const char *path, char *err, size_t errlen)
{
    char real[PATH_MAX];
    if (!realpath(path, real)) {
        snprintf(err, errlen, "cannot resolve %s: %s", path, strerror(errno));
        return -1;
    }
    if (s_check_writers(real, "plugin file", err, errlen) != 0)
        return -1;
    char *slash = strrchr(real, '/');
    if (slash && slash != real)
        *slash = '\0';
    else if (slash)
        slash[1] = '\0'; /* a file in / */
    if (s_check_writers(real, "plugin folder", err, errlen) != 0)
        return -1;
    return s_check_ancestors(real, err, errlen);
}

int um_plugins_load_file(um_plugin_registry_t *reg, const char *path, char *err, size_t errlen)
{
    if (s_check_plugin_file(path, err, errlen) != 0)
        return UM_EPLUGIN;
    if (reg->n == UM_PLUGINS_MAX) {
        snprintf(err, errlen, "the daemon holds at most %d plugins: remove unused plugin files "
                 "from the plugin folders", UM_PLUGINS_MAX);
        return UM_EPLUGIN;
    }
    void *handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!handle) {
        snprintf(err, errlen, "cannot load: %s", dlerror());
        return UM_EPLUGIN;
    }
    int rc = UM_EPLUGIN;
    char *copy = NULL;
    um_plugin_describe_fn describe;
    *(void **)&describe = dlsym(handle, UM_PLUGIN_ENTRY);
    if (!describe) {
        snprintf(err, errlen, "no %s symbol: not an unmaskd plugin", UM_PLUGIN_ENTRY);
        goto fail;
    }
    const um_plugin_desc_t *desc = describe();
    if (!desc) {
        snprintf(err, errlen, "%s returned NULL", UM_PLUGIN_ENTRY);
        goto fail;
    }
    rc = s_check_desc(reg, desc, err, errlen);
    if (rc != 0)
        goto fail;
    if (!reg->items) {
        /* Allocated once at its full size: entries must never move (see plugins.h). */
        reg->items = calloc(UM_PLUGINS_MAX, sizeof *reg->items);
        if (!reg->items) {
            rc = UM_ENOMEM;
            snprintf(err, errlen, "out of memory");
            goto fail;
        }
        reg->cap = UM_PLUGINS_MAX;
    }
    copy = strdup(path);
    if (!copy) {
        rc = UM_ENOMEM;
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    int (*init)(const um_host_t *, char *, size_t) = s_desc_init(desc);
    if (init) {
        char why[384] = "";
        rc = init(&s_host, why, sizeof why);
        if (rc != 0) {
            snprintf(err, errlen, "plugin \"%s\" failed to initialize (%s): %s", desc->name,
                     um_error_name(rc), why[0] ? why : um_strerror(rc));
            rc = UM_EPLUGIN;
            goto fail;
        }
    }
    reg->items[reg->n++] = (um_plugin_t){.desc = desc, .path = copy, .handle = handle};
    return 0;

fail:
    free(copy);
    dlclose(handle);
    return rc;
}

static int s_cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* A file that was rejected, remembered so rescans skip it until it changes. */
struct um_plugin_rejected {
    char *path;
    off_t size;
    struct timespec mtime;
};

static int s_is_loaded(const um_plugin_registry_t *reg, const char *path)
{
    for (size_t i = 0; i < reg->n; i++)
        if (strcmp(reg->items[i].path, path) == 0)
            return 1;
    return 0;
}

/* The rejection record of path, or NULL. */
static struct um_plugin_rejected *s_find_rejected(um_plugin_registry_t *reg, const char *path)
{
    for (size_t i = 0; i < reg->n_rejected; i++)
        if (strcmp(reg->rejected[i].path, path) == 0)
            return &reg->rejected[i];
    return NULL;
}

static int s_same_file_state(const struct um_plugin_rejected *r, const struct stat *st)
{
    return r->size == st->st_size && r->mtime.tv_sec == st->st_mtim.tv_sec
           && r->mtime.tv_nsec == st->st_mtim.tv_nsec;
}

static void s_remember_rejected(um_plugin_registry_t *reg, const char *path,
                                const struct stat *st)
{
    struct um_plugin_rejected *r = s_find_rejected(reg, path);
    if (!r) {
        struct um_plugin_rejected *grown =
            realloc(reg->rejected, (reg->n_rejected + 1) * sizeof *grown);
        if (!grown)
            return;
        reg->rejected = grown;
        r = &reg->rejected[reg->n_rejected];
        r->path = strdup(path);
        if (!r->path)
            return;
        reg->n_rejected++;
    }
    r->size = st->st_size;
    r->mtime = st->st_mtim;
}

/*
 * Load every *.so in one folder, in name order so the outcome does not depend on
 * readdir. With only_new, files already loaded and files rejected before and unchanged
 * since are skipped silently.
 */
static size_t s_scan_dir(um_plugin_registry_t *reg, const char *dir, int only_new)
{
    DIR *d = opendir(dir);
    if (!d) {
        if (!only_new)
            um_info("plugins", "plugin folder %s not found or not readable, skipped", dir);
        return 0;
    }
    char why[1024];
    char real[PATH_MAX];
    if (s_check_writers(dir, "plugin folder", why, sizeof why) != 0
        || (realpath(dir, real) && s_check_ancestors(real, why, sizeof why) != 0)) {
        /* A rescan runs for every request that names an unknown plugin, so this repeats,
           but the log's rate limit bounds it. */
        um_warn("plugins", "skipped: %s", why);
        closedir(d);
        return 0;
    }
    char **names = NULL;
    size_t n = 0, cap = 0, loaded = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        size_t len = strlen(e->d_name);
        if (len < 4 || strcmp(e->d_name + len - 3, ".so") != 0)
            continue;
        if (n == cap) {
            cap = cap ? cap * 2 : 16;
            char **grown = realloc(names, cap * sizeof *names);
            if (!grown)
                break;
            names = grown;
        }
        names[n] = strdup(e->d_name);
        if (names[n])
            n++;
    }
    closedir(d);
    if (n > 1)
        qsort(names, n, sizeof *names, s_cmp_str);
    for (size_t i = 0; i < n; i++) {
        char path[4096], err[512];
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        free(names[i]);
        struct stat st;
        int have_stat = stat(path, &st) == 0;
        if (only_new) {
            const struct um_plugin_rejected *r = s_find_rejected(reg, path);
            if (s_is_loaded(reg, path) || (r && have_stat && s_same_file_state(r, &st)))
                continue;
        }
        if (um_plugins_load_file(reg, path, err, sizeof err) == 0) {
            const um_plugin_desc_t *desc = reg->items[reg->n - 1].desc;
            um_info("plugins", "loaded %s plugin %s %s (ABI %u.%u) from %s",
                    s_kind_name(desc->kind), desc->name, desc->version ? desc->version : "",
                    desc->abi_major, desc->abi_minor, path);
            loaded++;
        } else {
            um_warn("plugins", "rejected %s: %s", path, err);
            if (have_stat)
                s_remember_rejected(reg, path, &st);
        }
    }
    free(names);
    return loaded;
}

static size_t s_scan(um_plugin_registry_t *reg, const char *dirs, int only_new)
{
    size_t loaded = 0;
    if (!dirs)
        return 0;
    char *copy = strdup(dirs);
    if (!copy)
        return 0;
    char *save = NULL;
    for (char *dir = strtok_r(copy, ":", &save); dir; dir = strtok_r(NULL, ":", &save))
        if (*dir)
            loaded += s_scan_dir(reg, dir, only_new);
    free(copy);
    return loaded;
}

size_t um_plugins_scan(um_plugin_registry_t *reg, const char *dirs)
{
    return s_scan(reg, dirs, 0);
}

size_t um_plugins_rescan(um_plugin_registry_t *reg, const char *dirs)
{
    return s_scan(reg, dirs, 1);
}

const um_plugin_t *um_plugins_find(const um_plugin_registry_t *reg, um_plugin_kind_t kind,
                                   const char *name)
{
    for (size_t i = 0; i < reg->n; i++)
        if (reg->items[i].desc->kind == (uint32_t)kind
            && strcmp(reg->items[i].desc->name, name) == 0)
            return &reg->items[i];
    return NULL;
}

void um_plugins_clear(um_plugin_registry_t *reg)
{
    for (size_t i = reg->n; i-- > 0;) {
        void (*fini)(void) = s_desc_fini(reg->items[i].desc);
        if (fini)
            fini();
        dlclose(reg->items[i].handle);
        free(reg->items[i].path);
    }
    free(reg->items);
    for (size_t i = 0; i < reg->n_rejected; i++)
        free(reg->rejected[i].path);
    free(reg->rejected);
    *reg = (um_plugin_registry_t){0};
}

/* ------------------------------------------------------------------------- */
/* Parameters                                                                 */

static const char *s_article(um_param_type_t t)
{
    return t == UM_PARAM_INTEGER ? "an" : "a";
}

const char *um_param_type_name(um_param_type_t t)
{
    switch (t) {
    case UM_PARAM_NUMBER:
        return "number";
    case UM_PARAM_INTEGER:
        return "integer";
    case UM_PARAM_BOOL:
        return "bool";
    case UM_PARAM_STRING:
        return "string";
    }
    return "unknown";
}

int um_params_check(const um_param_spec_t *spec, int32_t n_spec, const um_param_t *in,
                    int32_t n_in, um_param_t *out, char *err, size_t errlen)
{
    for (int32_t s = 0; s < n_spec; s++)
        out[s] = (um_param_t){.name = spec[s].name, .type = spec[s].type,
                              .number = spec[s].default_value, .string = NULL};
    for (int32_t i = 0; i < n_in; i++) {
        int32_t s = 0;
        while (s < n_spec && strcmp(spec[s].name, in[i].name) != 0)
            s++;
        if (s == n_spec) {
            int len = snprintf(err, errlen, "unknown parameter \"%s\"", in[i].name);
            if (n_spec == 0)
                snprintf(err + len, errlen - (size_t)len, ": this policy takes no parameters");
            else {
                len += snprintf(err + len, errlen - (size_t)len, ": accepted parameters are");
                for (int32_t k = 0; k < n_spec && (size_t)len < errlen; k++)
                    len += snprintf(err + len, errlen - (size_t)len, "%s %s", k ? "," : "",
                                    spec[k].name);
            }
            return UM_EINVAL;
        }
        const um_param_spec_t *p = &spec[s];
        int type_ok = in[i].type == p->type
                      || (p->type == UM_PARAM_NUMBER && in[i].type == UM_PARAM_INTEGER);
        if (!type_ok) {
            int len = snprintf(err, errlen, "parameter \"%s\" must be %s %s, got %s %s",
                               p->name, s_article(p->type), um_param_type_name(p->type),
                               s_article(in[i].type), um_param_type_name(in[i].type));
            if (in[i].type == UM_PARAM_STRING && in[i].string && len >= 0 &&
                (size_t)len < errlen)
                len += snprintf(err + len, errlen - (size_t)len, " \"%.40s\"", in[i].string);
            if ((p->type == UM_PARAM_NUMBER || p->type == UM_PARAM_INTEGER) && len >= 0 &&
                (size_t)len < errlen)
                snprintf(err + len, errlen - (size_t)len, ": give a finite number in [%g, %g]",
                         p->min, p->max);
            return UM_EINVAL;
        }
        if (p->type == UM_PARAM_NUMBER || p->type == UM_PARAM_INTEGER) {
            double v = in[i].number;
            if (!isfinite(v) || v < p->min || v > p->max
                || (p->type == UM_PARAM_INTEGER && v != floor(v))) {
                snprintf(err, errlen, "parameter \"%s\" must be %s %s in [%g, %g], got %g",
                         p->name, s_article(p->type), um_param_type_name(p->type), p->min, p->max, v);
                return UM_ERANGE;
            }
        }
        out[s].number = in[i].number;
        out[s].string = in[i].string;
    }
    return 0;
}
