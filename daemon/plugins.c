/*
 * The plugin host: discovery, ABI checks and the registry (see plugins.h).
 *
 * A plugin is accepted only when every check passes; otherwise it is unloaded,
 * logged with the reason and skipped, and the daemon keeps going.
 */
#include "plugins.h"

#include <ctype.h>
#include <dirent.h>
#include <dlfcn.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "rng.h"

/* ------------------------------------------------------------------------- */
/* Host services                                                              */

static void s_host_log(int level, const char *plugin, const char *fmt, ...)
{
    if (level < um_log_threshold)
        return;
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    char component[96];
    snprintf(component, sizeof component, "plugin %s", plugin ? plugin : "?");
    um_log_write(level, component, "%s", msg);
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

static const um_host_t s_host = {
    .struct_size = sizeof(um_host_t),
    .log = s_host_log,
    .alloc = malloc,
    .free = free,
    .rng_uniform = um_rng_uniform,
    .select_top = s_select_top,
};

const um_host_t *um_plugin_host(void)
{
    return &s_host;
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

int um_plugins_load_file(um_plugin_registry_t *reg, const char *path, char *err, size_t errlen)
{
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
    if (reg->n == reg->cap) {
        size_t cap = reg->cap ? reg->cap * 2 : 8;
        um_plugin_t *items = realloc(reg->items, cap * sizeof *items);
        if (!items) {
            rc = UM_ENOMEM;
            snprintf(err, errlen, "out of memory");
            goto fail;
        }
        reg->items = items;
        reg->cap = cap;
    }
    copy = strdup(path);
    if (!copy) {
        rc = UM_ENOMEM;
        snprintf(err, errlen, "out of memory");
        goto fail;
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

/* Load every *.so in one folder, in name order so the outcome does not depend on readdir. */
static size_t s_scan_dir(um_plugin_registry_t *reg, const char *dir)
{
    DIR *d = opendir(dir);
    if (!d) {
        um_info("plugins", "plugin folder %s not found or not readable, skipped", dir);
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
    qsort(names, n, sizeof *names, s_cmp_str);
    for (size_t i = 0; i < n; i++) {
        char path[4096], err[512];
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        if (um_plugins_load_file(reg, path, err, sizeof err) == 0) {
            const um_plugin_desc_t *desc = reg->items[reg->n - 1].desc;
            um_info("plugins", "loaded %s plugin %s %s from %s", s_kind_name(desc->kind),
                    desc->name, desc->version ? desc->version : "", path);
            loaded++;
        } else {
            um_warn("plugins", "rejected %s: %s", path, err);
        }
        free(names[i]);
    }
    free(names);
    return loaded;
}

size_t um_plugins_scan(um_plugin_registry_t *reg, const char *dirs)
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
            loaded += s_scan_dir(reg, dir);
    free(copy);
    return loaded;
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
        dlclose(reg->items[i].handle);
        free(reg->items[i].path);
    }
    free(reg->items);
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
            snprintf(err, errlen, "parameter \"%s\" must be %s %s, got %s %s", p->name,
                     s_article(p->type), um_param_type_name(p->type), s_article(in[i].type),
                     um_param_type_name(in[i].type));
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
