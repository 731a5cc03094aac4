/*
 * unmaskd error codes.
 *
 * Every function in unmaskd and its plugins that can fail returns 0 or one of the
 * negative codes below. The table is an X-macro, so the code, its name and its text
 * come from one place. Both helpers are static inline, so plugins can use them
 * without linking against the daemon.
 */
#ifndef UNMASKD_ERROR_H
#define UNMASKD_ERROR_H

#define UM_ERROR_TABLE(X)                                                  \
    X(UM_OK, 0, "success")                                                 \
    X(UM_ENOMEM, -1, "out of memory")                                      \
    X(UM_EINVAL, -2, "invalid argument")                                   \
    X(UM_EIO, -3, "input/output error")                                    \
    X(UM_EFORMAT, -4, "malformed file or message")                         \
    X(UM_ENOTFOUND, -5, "not found")                                       \
    X(UM_EUNSUPPORTED, -6, "not supported")                                \
    X(UM_ERANGE, -7, "value out of range")                                 \
    X(UM_ECANCELLED, -8, "cancelled")                                      \
    X(UM_EBUSY, -9, "busy")                                                \
    X(UM_EPLUGIN, -10, "plugin failure")                                   \
    X(UM_EBACKEND, -11, "compute backend failure")                         \
    X(UM_ENOSPACE, -12, "output buffer too small")

enum um_error {
#define UM_ERROR_ENUM(name, value, text) name = value,
    UM_ERROR_TABLE(UM_ERROR_ENUM)
#undef UM_ERROR_ENUM
};

/* Return the text of an error code; unknown codes map to "unknown error". */
static inline const char *um_strerror(int code)
{
    switch (code) {
#define UM_ERROR_TEXT(name, value, text) \
    case value:                          \
        return text;
        UM_ERROR_TABLE(UM_ERROR_TEXT)
#undef UM_ERROR_TEXT
    default:
        return "unknown error";
    }
}

/* Return the symbolic name of an error code ("UM_EINVAL"), or "UM_EUNKNOWN". */
static inline const char *um_error_name(int code)
{
    switch (code) {
#define UM_ERROR_NAME(name, value, text) \
    case value:                          \
        return #name;
        UM_ERROR_TABLE(UM_ERROR_NAME)
#undef UM_ERROR_NAME
    default:
        return "UM_EUNKNOWN";
    }
}

#endif /* UNMASKD_ERROR_H */
