/*
 * safetensors reader: see safetensors.h for the contract.
 *
 * Owns the read-only mappings of one or more files and the table of tensor views,
 * sorted by name for lookup. Nothing is handed out before every file of the set has
 * passed validation, so a caller never sees a half-checked tensor.
 * Threading: open and close on one thread; lookups on an open set from any thread.
 */
#include "safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <unmaskd/error.h>

#include "log.h"

/* The upstream format caps the header at 100 MB; a larger length means a corrupt file. */
#define S_MAX_HEADER_BYTES (100u * 1024u * 1024u)

typedef struct s_file {
    char *path;
    void *map;   /* whole file, PROT_READ */
    size_t size;
} s_file_t;

struct um_safetensors {
    char *source;               /* file or index path, for messages */
    s_file_t *files;
    size_t n_files;
    um_tensor_view_t *tensors;  /* sorted by name once the set is complete */
    size_t n_tensors;
    size_t cap_tensors;
};

/* Byte range of one tensor inside its file's data section, for the overlap check. */
typedef struct s_range {
    uint64_t begin, end;
    size_t tensor;              /* index into the set's tensors */
} s_range_t;

/* ------------------------------------------------------------------------- */
/* Helpers                                                                    */


void um_shape_format(char *buf, size_t len, const int64_t *shape, int32_t ndim)
{
    size_t used = (size_t)snprintf(buf, len, "[");
    for (int32_t i = 0; i < ndim && used < len; i++)
        used += (size_t)snprintf(buf + used, len - used, "%s%lld", i ? ", " : "",
                                 (long long)shape[i]);
    if (used < len)
        snprintf(buf + used, len - used, "]");
}

const char *um_dtype_name(um_dtype_t dtype)
{
    switch (dtype) {
    case UM_DTYPE_BF16:
        return "BF16";
    case UM_DTYPE_I64:
        return "I64";
    default:
        return "F32";
    }
}

size_t um_dtype_size(um_dtype_t dtype)
{
    switch (dtype) {
    case UM_DTYPE_BF16:
        return 2;
    case UM_DTYPE_I64:
        return 8;
    default:
        return 4;
    }
}

static uint64_t s_read_le64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

/* ------------------------------------------------------------------------- */
/* Header entries                                                             */

static int s_parse_dtype(const char *path, const char *name, json_t *entry, um_dtype_t *out,
                         char *err, size_t errlen)
{
    json_t *dtype = json_object_get(entry, "dtype");
    if (!json_is_string(dtype))
        return um_fail(err, errlen, UM_EFORMAT,
                      "tensor %s in %s has no dtype string in the header: the file is corrupt; "
                      "export it again", name, path);
    const char *s = json_string_value(dtype);
    if (strcmp(s, "F32") == 0)
        *out = UM_DTYPE_F32;
    else if (strcmp(s, "BF16") == 0)
        *out = UM_DTYPE_BF16;
    else if (strcmp(s, "I64") == 0)
        *out = UM_DTYPE_I64;
    else
        return um_fail(err, errlen, UM_EUNSUPPORTED,
                      "tensor %s in %s has dtype %s, but unmaskd reads only F32 and BF16 "
                      "weights: convert the checkpoint to BF16 or F32", name, path, s);
    return 0;
}

static int s_parse_shape(const char *path, const char *name, json_t *entry,
                         um_tensor_view_t *t, char *err, size_t errlen)
{
    json_t *shape = json_object_get(entry, "shape");
    if (!json_is_array(shape))
        return um_fail(err, errlen, UM_EFORMAT,
                      "tensor %s in %s has no shape array in the header: the file is corrupt; "
                      "export it again", name, path);
    size_t ndim = json_array_size(shape);
    if (ndim > UM_SAFETENSORS_MAX_DIMS)
        return um_fail(err, errlen, UM_EUNSUPPORTED,
                      "tensor %s in %s has %zu dimensions, more than the %d unmaskd reads",
                      name, path, ndim, UM_SAFETENSORS_MAX_DIMS);

    t->ndim = (int32_t)ndim;
    t->numel = 1;
    for (size_t i = 0; i < ndim; i++) {
        json_t *dim = json_array_get(shape, i);
        if (!json_is_integer(dim) || json_integer_value(dim) < 0)
            return um_fail(err, errlen, UM_EFORMAT,
                          "tensor %s in %s has dimension %zu that is not a non-negative "
                          "integer: the file is corrupt; export it again", name, path, i);
        int64_t d = json_integer_value(dim);
        t->shape[i] = d;
        /* Reject element counts whose byte size would not fit in 63 bits. */
        if (d != 0 && t->numel > (INT64_MAX / 4) / d)
            return um_fail(err, errlen, UM_EFORMAT,
                          "tensor %s in %s has a shape whose size overflows 64 bits: the file "
                          "is corrupt; export it again", name, path);
        t->numel *= d;
    }
    return 0;
}

static int s_parse_offsets(const char *path, const char *name, json_t *entry,
                           uint64_t data_len, s_range_t *range, char *err, size_t errlen)
{
    json_t *offsets = json_object_get(entry, "data_offsets");
    json_t *b = json_array_get(offsets, 0), *e = json_array_get(offsets, 1);
    if (!json_is_array(offsets) || json_array_size(offsets) != 2 || !json_is_integer(b) ||
        !json_is_integer(e) || json_integer_value(b) < 0 || json_integer_value(e) < 0)
        return um_fail(err, errlen, UM_EFORMAT,
                      "tensor %s in %s needs data_offsets as two non-negative integers: "
                      "the file is corrupt; export it again", name, path);
    range->begin = (uint64_t)json_integer_value(b);
    range->end = (uint64_t)json_integer_value(e);
    if (range->begin > range->end)
        return um_fail(err, errlen, UM_EFORMAT,
                      "tensor %s in %s has data_offsets [%llu, %llu] that end before they "
                      "begin: the file is corrupt; export it again", name, path,
                      (unsigned long long)range->begin, (unsigned long long)range->end);
    if (range->end > data_len)
        return um_fail(err, errlen, UM_EFORMAT,
                      "tensor %s in %s has data_offsets [%llu, %llu] past the end of the "
                      "data section (%llu bytes): the file is truncated or its header is "
                      "corrupt; download or export it again", name, path,
                      (unsigned long long)range->begin, (unsigned long long)range->end,
                      (unsigned long long)data_len);
    return 0;
}

/* Parse and check one header entry into a tensor view and its byte range. */
static int s_parse_entry(const char *path, const char *name, json_t *entry,
                         const unsigned char *data, uint64_t data_len, um_tensor_view_t *t,
                         s_range_t *range, char *err, size_t errlen)
{
    if (!json_is_object(entry))
        return um_fail(err, errlen, UM_EFORMAT,
                      "tensor %s in %s is not a JSON object in the header: the file is "
                      "corrupt; export it again", name, path);
    int rc = s_parse_dtype(path, name, entry, &t->dtype, err, errlen);
    if (rc == 0)
        rc = s_parse_shape(path, name, entry, t, err, errlen);
    if (rc == 0)
        rc = s_parse_offsets(path, name, entry, data_len, range, err, errlen);
    if (rc != 0)
        return rc;

    t->nbytes = (size_t)t->numel * um_dtype_size(t->dtype);
    if (range->end - range->begin != t->nbytes) {
        char shape[160];
        um_shape_format(shape, sizeof shape, t->shape, t->ndim);
        return um_fail(err, errlen, UM_EFORMAT,
                      "tensor %s in %s has data_offsets [%llu, %llu] (%llu bytes), but shape "
                      "%s of %s needs %zu bytes: the header is inconsistent; export the file "
                      "again", name, path, (unsigned long long)range->begin,
                      (unsigned long long)range->end,
                      (unsigned long long)(range->end - range->begin), shape,
                      um_dtype_name(t->dtype), t->nbytes);
    }
    t->data = data + range->begin;
    return 0;
}

static int s_range_cmp(const void *a, const void *b)
{
    const s_range_t *x = a, *y = b;
    if (x->begin != y->begin)
        return x->begin < y->begin ? -1 : 1;
    return x->end < y->end ? -1 : x->end > y->end;
}

/* Reject any two non-empty tensors of one file whose byte ranges intersect. */
static int s_check_overlap(const um_safetensors_t *st, const char *path, s_range_t *ranges,
                           size_t n, char *err, size_t errlen)
{
    qsort(ranges, n, sizeof *ranges, s_range_cmp);
    const s_range_t *prev = NULL;
    for (size_t i = 0; i < n; i++) {
        if (ranges[i].begin == ranges[i].end)
            continue;
        if (prev && ranges[i].begin < prev->end)
            return um_fail(err, errlen, UM_EFORMAT,
                          "tensors %s [%llu, %llu] and %s [%llu, %llu] in %s overlap: the file "
                          "is corrupt; export it again", st->tensors[prev->tensor].name,
                          (unsigned long long)prev->begin, (unsigned long long)prev->end,
                          st->tensors[ranges[i].tensor].name,
                          (unsigned long long)ranges[i].begin, (unsigned long long)ranges[i].end,
                          path);
        prev = &ranges[i];
    }
    return 0;
}

/* ------------------------------------------------------------------------- */
/* Files                                                                      */

static int s_map_file(const char *path, s_file_t *f, char *err, size_t errlen)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return um_fail(err, errlen, errno == ENOENT ? UM_ENOTFOUND : UM_EIO,
                      "cannot open %s: %s", path, strerror(errno));

    int rc = 0;
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        rc = um_fail(err, errlen, UM_EIO, "cannot read the size of %s: %s", path,
                    strerror(errno));
        goto cleanup;
    }
    if (sb.st_size < 8) {
        rc = um_fail(err, errlen, UM_EFORMAT,
                    "%s is %lld bytes, too short for the 8-byte header length: the file is "
                    "truncated or not a safetensors file; download or export it again", path,
                    (long long)sb.st_size);
        goto cleanup;
    }
    f->size = (size_t)sb.st_size;
    f->map = mmap(NULL, f->size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (f->map == MAP_FAILED) {
        f->map = NULL;
        rc = um_fail(err, errlen, UM_EIO, "cannot map %s (%zu bytes) into memory: %s", path,
                    f->size, strerror(errno));
    }
cleanup:
    close(fd);
    return rc;
}

static int s_push_tensor(um_safetensors_t *st, um_tensor_view_t **out)
{
    if (st->n_tensors == st->cap_tensors) {
        size_t cap = st->cap_tensors ? 2 * st->cap_tensors : 64;
        um_tensor_view_t *grown = realloc(st->tensors, cap * sizeof *grown);
        if (!grown)
            return UM_ENOMEM;
        st->tensors = grown;
        st->cap_tensors = cap;
    }
    *out = &st->tensors[st->n_tensors];
    memset(*out, 0, sizeof **out);
    return 0;
}

/* Parse the header of a mapped file and append its tensors to the set. */
static int s_parse_file(um_safetensors_t *st, const s_file_t *f, char *err, size_t errlen)
{
    const unsigned char *bytes = f->map;
    uint64_t header_len = s_read_le64(bytes);
    if (header_len > f->size - 8)
        return um_fail(err, errlen, UM_EFORMAT,
                      "%s declares a %llu-byte header, but only %zu bytes follow the length "
                      "field: the file is truncated or not a safetensors file; download or "
                      "export it again", f->path, (unsigned long long)header_len, f->size - 8);
    if (header_len > S_MAX_HEADER_BYTES)
        return um_fail(err, errlen, UM_EFORMAT,
                      "%s declares a %llu-byte header, more than the 100 MB the format "
                      "allows: the file is corrupt", f->path, (unsigned long long)header_len);

    json_error_t jerr;
    json_t *header = json_loadb((const char *)bytes + 8, (size_t)header_len,
                                JSON_REJECT_DUPLICATES, &jerr);
    if (!header)
        return um_fail(err, errlen, UM_EFORMAT,
                      "the JSON header of %s is invalid (%s at line %d, column %d): the file "
                      "is corrupt; download or export it again", f->path, jerr.text, jerr.line,
                      jerr.column);

    int rc = 0;
    s_range_t *ranges = NULL;
    size_t n_ranges = 0;
    if (!json_is_object(header)) {
        rc = um_fail(err, errlen, UM_EFORMAT,
                    "the JSON header of %s is not an object of tensors: the file is corrupt; "
                    "download or export it again", f->path);
        goto cleanup;
    }
    ranges = malloc((json_object_size(header) + 1) * sizeof *ranges);
    if (!ranges) {
        rc = UM_ENOMEM;
        goto cleanup;
    }

    const unsigned char *data = bytes + 8 + header_len;
    uint64_t data_len = f->size - 8 - header_len;
    const char *name;
    json_t *entry;
    json_object_foreach(header, name, entry) {
        if (strcmp(name, "__metadata__") == 0)
            continue;
        um_tensor_view_t *t;
        rc = s_push_tensor(st, &t);
        if (rc != 0)
            goto cleanup;
        s_range_t *range = &ranges[n_ranges];
        rc = s_parse_entry(f->path, name, entry, data, data_len, t, range, err, errlen);
        if (rc != 0)
            goto cleanup;
        t->name = strdup(name);
        if (!t->name) {
            rc = UM_ENOMEM;
            goto cleanup;
        }
        t->path = f->path;
        range->tensor = st->n_tensors++;
        n_ranges++;
    }
    rc = s_check_overlap(st, f->path, ranges, n_ranges, err, errlen);
    if (rc == 0)
        um_debug("safetensors", "mapped %s: %zu tensors, %llu bytes of data", f->path,
                 n_ranges, (unsigned long long)data_len);

cleanup:
    if (rc == UM_ENOMEM)
        um_fail(err, errlen, rc, "out of memory while reading the header of %s", f->path);
    free(ranges);
    json_decref(header);
    return rc;
}

/* Map, parse and append one file. */
static int s_add_file(um_safetensors_t *st, const char *path, char *err, size_t errlen)
{
    s_file_t *grown = realloc(st->files, (st->n_files + 1) * sizeof *grown);
    if (!grown)
        return um_fail(err, errlen, UM_ENOMEM, "out of memory while opening %s", path);
    st->files = grown;
    s_file_t *f = &st->files[st->n_files];
    memset(f, 0, sizeof *f);
    f->path = strdup(path);
    if (!f->path)
        return um_fail(err, errlen, UM_ENOMEM, "out of memory while opening %s", path);
    /* Count the file before mapping it, so that um_safetensors_close frees it if a
     * later step fails. */
    st->n_files++;

    int rc = s_map_file(path, f, err, errlen);
    if (rc == 0)
        rc = s_parse_file(st, f, err, errlen);
    return rc;
}

static int s_name_cmp(const void *a, const void *b)
{
    const um_tensor_view_t *x = a, *y = b;
    return strcmp(x->name, y->name);
}

/* Sort the tensors by name and reject a name stored in two files. */
static int s_finish(um_safetensors_t *st, char *err, size_t errlen)
{
    /* A header with no tensors leaves st->tensors NULL, which qsort must not get. */
    if (st->n_tensors > 1)
        qsort(st->tensors, st->n_tensors, sizeof *st->tensors, s_name_cmp);
    for (size_t i = 1; i < st->n_tensors; i++)
        if (strcmp(st->tensors[i - 1].name, st->tensors[i].name) == 0)
            return um_fail(err, errlen, UM_EFORMAT,
                          "tensor %s is stored in both %s and %s: the shards overlap; export "
                          "the model again", st->tensors[i].name, st->tensors[i - 1].path,
                          st->tensors[i].path);
    return 0;
}

static um_safetensors_t *s_set_new(const char *source)
{
    um_safetensors_t *st = calloc(1, sizeof *st);
    if (!st)
        return NULL;
    st->source = strdup(source);
    if (!st->source) {
        free(st);
        return NULL;
    }
    return st;
}

/* ------------------------------------------------------------------------- */
/* Public functions                                                           */

int um_safetensors_open_file(const char *path, um_safetensors_t **out, char *err,
                             size_t errlen)
{
    *out = NULL;
    um_safetensors_t *st = s_set_new(path);
    if (!st)
        return um_fail(err, errlen, UM_ENOMEM, "out of memory while opening %s", path);
    int rc = s_add_file(st, path, err, errlen);
    if (rc == 0)
        rc = s_finish(st, err, errlen);
    if (rc != 0) {
        um_safetensors_close(&st);
        return rc;
    }
    *out = st;
    return 0;
}

/* Open the shards named by the weight_map of an index file, then match them up. */
static int s_open_index(um_safetensors_t *st, const char *dir, const char *index_path,
                        char *err, size_t errlen)
{
    json_error_t jerr;
    json_t *index = json_load_file(index_path, JSON_REJECT_DUPLICATES, &jerr);
    if (!index)
        return um_fail(err, errlen, UM_EFORMAT,
                      "%s is not valid JSON (%s at line %d, column %d): fix or regenerate the "
                      "index", index_path, jerr.text, jerr.line, jerr.column);

    int rc = 0;
    json_t *map = json_object_get(index, "weight_map");
    if (!json_is_object(map) || json_object_size(map) == 0) {
        rc = um_fail(err, errlen, UM_EFORMAT,
                    "%s has no weight_map object naming the shard of each tensor: fix or "
                    "regenerate the index", index_path);
        goto cleanup;
    }

    /* Each distinct shard is opened once, in the order the map first names it. */
    const char *name;
    json_t *shard;
    json_object_foreach(map, name, shard) {
        const char *file = json_string_value(shard);
        if (!file || *file == '\0' || strchr(file, '/') || strcmp(file, "..") == 0) {
            rc = um_fail(err, errlen, UM_EFORMAT,
                        "%s maps tensor %s to an invalid shard name: each value must be a "
                        "file name inside %s", index_path, name, dir);
            goto cleanup;
        }
        int seen = 0;
        for (size_t i = 0; i < st->n_files && !seen; i++) {
            const char *base = strrchr(st->files[i].path, '/');
            seen = strcmp(base ? base + 1 : st->files[i].path, file) == 0;
        }
        if (seen)
            continue;
        char path[PATH_MAX];
        if ((size_t)snprintf(path, sizeof path, "%s/%s", dir, file) >= sizeof path) {
            rc = um_fail(err, errlen, UM_EINVAL, "shard path %s/%s is too long", dir, file);
            goto cleanup;
        }
        rc = s_add_file(st, path, err, errlen);
        if (rc == UM_ENOTFOUND)
            um_fail(err, errlen, rc,
                   "shard %s, listed in %s for tensor %s, was not found: download the "
                   "missing shard", path, index_path, name);
        if (rc != 0)
            goto cleanup;
    }
    rc = s_finish(st, err, errlen);
    if (rc != 0)
        goto cleanup;

    json_object_foreach(map, name, shard) {
        const um_tensor_view_t *t = um_safetensors_find(st, name);
        const char *base = t ? strrchr(t->path, '/') : NULL;
        if (!t || strcmp(base ? base + 1 : t->path, json_string_value(shard)) != 0) {
            rc = um_fail(err, errlen, UM_EFORMAT,
                        "%s maps tensor %s to shard %s, but that shard does not contain it: "
                        "the index and the shards do not match; download them again",
                        index_path, name, json_string_value(shard));
            goto cleanup;
        }
    }

cleanup:
    json_decref(index);
    return rc;
}

int um_safetensors_open_dir(const char *dir, um_safetensors_t **out, char *err, size_t errlen)
{
    *out = NULL;
    char index_path[PATH_MAX], single_path[PATH_MAX];
    if ((size_t)snprintf(index_path, sizeof index_path, "%s/model.safetensors.index.json",
                         dir) >= sizeof index_path ||
        (size_t)snprintf(single_path, sizeof single_path, "%s/model.safetensors", dir) >=
            sizeof single_path)
        return um_fail(err, errlen, UM_EINVAL, "model folder path %s is too long", dir);

    int sharded = access(index_path, F_OK) == 0;
    if (!sharded && access(single_path, F_OK) != 0)
        return um_fail(err, errlen, UM_ENOTFOUND,
                      "%s has neither model.safetensors nor model.safetensors.index.json: "
                      "pass a Hugging Face model folder that contains the weights", dir);

    um_safetensors_t *st = s_set_new(sharded ? index_path : single_path);
    if (!st)
        return um_fail(err, errlen, UM_ENOMEM, "out of memory while opening %s", dir);
    int rc;
    if (sharded) {
        rc = s_open_index(st, dir, index_path, err, errlen);
    } else {
        rc = s_add_file(st, single_path, err, errlen);
        if (rc == 0)
            rc = s_finish(st, err, errlen);
    }
    if (rc != 0) {
        um_safetensors_close(&st);
        return rc;
    }
    *out = st;
    return 0;
}

void um_safetensors_close(um_safetensors_t **st_p)
{
    if (!st_p || !*st_p)
        return;
    um_safetensors_t *st = *st_p;
    for (size_t i = 0; i < st->n_tensors; i++)
        free((char *)st->tensors[i].name);
    free(st->tensors);
    for (size_t i = st->n_files; i-- > 0;) {
        if (st->files[i].map)
            munmap(st->files[i].map, st->files[i].size);
        free(st->files[i].path);
    }
    free(st->files);
    free(st->source);
    free(st);
    *st_p = NULL;
}

size_t um_safetensors_count(const um_safetensors_t *st)
{
    return st->n_tensors;
}

const um_tensor_view_t *um_safetensors_at(const um_safetensors_t *st, size_t i)
{
    return i < st->n_tensors ? &st->tensors[i] : NULL;
}

void um_safetensors_release(const um_tensor_view_t *t)
{
    long page = sysconf(_SC_PAGESIZE);
    if (!t || page <= 0 || t->nbytes == 0)
        return;
    /* Only whole pages inside the tensor: its neighbours may still be read. */
    uintptr_t start = ((uintptr_t)t->data + (uintptr_t)page - 1) & ~((uintptr_t)page - 1);
    uintptr_t end = ((uintptr_t)t->data + t->nbytes) & ~((uintptr_t)page - 1);
    if (end > start)
        madvise((void *)start, end - start, MADV_DONTNEED);
}

const um_tensor_view_t *um_safetensors_find(const um_safetensors_t *st, const char *name)
{
    um_tensor_view_t key = {.name = name};
    if (st->n_tensors == 0)
        return NULL;
    return bsearch(&key, st->tensors, st->n_tensors, sizeof key, s_name_cmp);
}

const char *um_safetensors_source(const um_safetensors_t *st)
{
    return st->source;
}
