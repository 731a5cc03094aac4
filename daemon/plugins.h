/*
 * The plugin host: finds plugin shared objects, checks them against the ABI,
 * and keeps the accepted ones in a registry that requests select from by name.
 *
 * Threading: one thread (the daemon's main thread) loads plugins, at startup and on
 * rescans, and only that thread reads the registry's arrays. Entries never move once
 * added, so other threads may keep pointers to them and call into loaded plugins while
 * the loading thread appends new ones.
 */
#ifndef UM_PLUGINS_H
#define UM_PLUGINS_H

#include <stddef.h>

#include <unmaskd/plugin.h>

typedef struct um_plugin {
    const um_plugin_desc_t *desc;
    char *path;   /* file it was loaded from */
    void *handle; /* dlopen handle */
} um_plugin_t;

/* Maximum number of plugins in a registry, whose storage is allocated once so entries
   never move. */
#define UM_PLUGINS_MAX 256

typedef struct um_plugin_registry {
    um_plugin_t *items; /* (UM_PLUGINS_MAX) once the first plugin loads, n used */
    size_t n;
    size_t cap;
    /* Files rejected before, so a rescan skips them until they change. */
    struct um_plugin_rejected *rejected;
    size_t n_rejected;
} um_plugin_registry_t;

/* The ABI 1.1 fields of a remasking policy, with 1.0's meaning for older plugins. */
typedef struct um_remask_traits {
    uint32_t flags;                /* UM_REMASK_ADAPTIVE */
    um_token_sampler_t sampler;
    um_schedule_t schedule;        /* the default for requests that name none */
} um_remask_traits_t;

/* Read the traits of ops, honouring its struct_size. */
um_remask_traits_t um_remask_traits(const um_remask_ops_t *ops);

/* "gumbel" or "categorical"; "quota" or "timestep". */
const char *um_token_sampler_name(um_token_sampler_t sampler);
const char *um_schedule_name(um_schedule_t schedule);

/* The service table handed to every plugin. */
const um_host_t *um_plugin_host(void);

/* The same services, with a plugin's information messages logged at debug level: for
   a second instance whose load would repeat the first one's messages. */
const um_host_t *um_plugin_host_quiet(void);

/*
 * Load one plugin file and run its init. Returns 0, or a negative UM_E* code with the
 * reason in err (the file or its folder is writable by users other than root and the
 * daemon's user or group, not a shared object, no um_plugin_describe, ABI major mismatch,
 * descriptor too small, unknown kind, missing function table, invalid or duplicate
 * name, init failed, registry full). A rejected file is unloaded.
 */
int um_plugins_load_file(um_plugin_registry_t *reg, const char *path, char *err,
                         size_t errlen);

/*
 * Scan each folder in the colon-separated list for *.so files and load them in name
 * order. Every plugin loaded or rejected is logged with the reason. Missing folders
 * are logged at info and skipped, and so are folders that users other than root and
 * the daemon's user or group may write (at warn). Returns the number of plugins loaded.
 */
size_t um_plugins_scan(um_plugin_registry_t *reg, const char *dirs);

/*
 * Scan the folders again and load the *.so files not loaded yet, so a plugin dropped
 * into a plugin folder becomes available without a restart. A file rejected before is
 * tried again only when its size or modification time changed. Returns the number of
 * plugins loaded; each outcome is logged as by um_plugins_scan.
 */
size_t um_plugins_rescan(um_plugin_registry_t *reg, const char *dirs);

/* Find a plugin of the given kind by name, or NULL. */
const um_plugin_t *um_plugins_find(const um_plugin_registry_t *reg, um_plugin_kind_t kind,
                                   const char *name);

/* Call every plugin's fini, unload them all and free the registry's storage. */
void um_plugins_clear(um_plugin_registry_t *reg);

/*
 * Check request parameters against a plugin's spec: every name must be listed, and
 * numbers must be finite and in range. Missing parameters get their defaults.
 * On failure writes a message naming the parameter and the accepted range to err.
 * *out (n_spec entries) is owned by the caller; string values point into in[].
 */
int um_params_check(const um_param_spec_t *spec, int32_t n_spec, const um_param_t *in,
                    int32_t n_in, um_param_t *out, char *err, size_t errlen);

/* Name of a parameter type as the protocol reports it: "number", "integer", "bool", "string". */
const char *um_param_type_name(um_param_type_t type);

#endif /* UM_PLUGINS_H */
