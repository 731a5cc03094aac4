/*
 * The plugin host: finds plugin shared objects, checks them against the ABI,
 * and keeps the accepted ones in a registry that requests select from by name.
 *
 * Threading: the registry is built once at startup and read-only afterwards.
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

typedef struct um_plugin_registry {
    um_plugin_t *items;
    size_t n;
    size_t cap;
} um_plugin_registry_t;

/* The service table handed to every plugin. */
const um_host_t *um_plugin_host(void);

/*
 * Load one plugin file. Returns 0, or a negative UM_E* code with the reason in err
 * (not a shared object, no um_plugin_describe, ABI major mismatch, descriptor too
 * small, unknown kind, missing function table, invalid or duplicate name).
 */
int um_plugins_load_file(um_plugin_registry_t *reg, const char *path, char *err,
                         size_t errlen);

/*
 * Scan each folder in the colon-separated list for *.so files and load them in name
 * order. Every plugin loaded or rejected is logged with the reason. Missing folders
 * are logged at debug and skipped. Returns the number of plugins loaded.
 */
size_t um_plugins_scan(um_plugin_registry_t *reg, const char *dirs);

/* Find a plugin of the given kind by name, or NULL. */
const um_plugin_t *um_plugins_find(const um_plugin_registry_t *reg, um_plugin_kind_t kind,
                                   const char *name);

/* Unload every plugin and free the registry's storage. */
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
