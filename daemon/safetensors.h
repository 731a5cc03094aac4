/*
 * Reader for the safetensors format: an 8-byte little-endian header length, a JSON
 * header mapping each tensor name to {dtype, shape, data_offsets}, then the raw data.
 * Files are mapped read-only and validated in full before any tensor is handed out.
 * A set is one file or the shards a model.safetensors.index.json lists.
 *
 * Ownership: the set owns the mappings, the names and the paths; every pointer it
 * returns stays valid until um_safetensors_close. Threading: opening and closing are
 * single-threaded; a set that is open may be read from any number of threads.
 */
#ifndef UM_SAFETENSORS_H
#define UM_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

/*
 * Element types unmaskd reads; other safetensors dtypes are rejected at open. I64 is
 * accepted for the integer buffers some checkpoints store beside the weights (BERT's
 * position_ids); the model never binds an I64 tensor as a weight.
 */
typedef enum um_dtype {
    UM_DTYPE_F32 = 1,
    UM_DTYPE_BF16 = 2,
    UM_DTYPE_I64 = 3,
} um_dtype_t;

#define UM_SAFETENSORS_MAX_DIMS 8

/* One tensor of an open set. */
typedef struct um_tensor_view {
    const char *name;                        /* as in the header */
    const char *path;                        /* the file it is stored in */
    um_dtype_t dtype;
    int32_t ndim;
    int64_t shape[UM_SAFETENSORS_MAX_DIMS];  /* first ndim entries used, row-major */
    int64_t numel;                           /* product of the shape; 1 when ndim is 0 */
    const void *data;                        /* in the read-only mapping, byte-aligned only */
    size_t nbytes;                           /* numel times the element size */
} um_tensor_view_t;

typedef struct um_safetensors um_safetensors_t;

/*
 * Map and validate one .safetensors file. The header length must fit in the file and
 * the header must be a JSON object of well-formed entries (`__metadata__` is skipped).
 * Each dtype must be F32 or BF16. Each data_offsets pair must lie inside the data
 * section, match shape times element size, and not overlap another tensor.
 * Returns 0 and sets *out, or UM_ENOTFOUND (no such file), UM_EIO (cannot read or
 * map it), UM_EFORMAT (malformed or truncated), UM_EUNSUPPORTED (another dtype) or
 * UM_ENOMEM, with a message in err naming the file, the tensor and the fix.
 */
int um_safetensors_open_file(const char *path, um_safetensors_t **out, char *err,
                             size_t errlen);

/*
 * Open the weights of a Hugging Face model folder: the shards listed in the
 * weight_map of model.safetensors.index.json when that file exists, otherwise
 * model.safetensors. Every file is validated as in um_safetensors_open_file. Every
 * weight_map entry must name a tensor stored in its shard, and no tensor may appear
 * in two shards. Same returns as um_safetensors_open_file.
 */
int um_safetensors_open_dir(const char *dir, um_safetensors_t **out, char *err,
                            size_t errlen);

/*
 * Drop the pages of t's data from this process's resident memory once it has been
 * copied elsewhere (the file stays mapped; a later read faults the pages back in from
 * the page cache). Reading t afterwards is still valid, only slower.
 */
void um_safetensors_release(const um_tensor_view_t *t);

/* Unmap and free the set and set *st to NULL; a NULL *st is ignored. */
void um_safetensors_close(um_safetensors_t **st);

/* Number of tensors over all files of the set. */
size_t um_safetensors_count(const um_safetensors_t *st);

/* Tensor i in name order, i < um_safetensors_count(st). */
const um_tensor_view_t *um_safetensors_at(const um_safetensors_t *st, size_t i);

/* The tensor with this exact name, or NULL. */
const um_tensor_view_t *um_safetensors_find(const um_safetensors_t *st, const char *name);

/* Where the set came from, for messages: the file, or the index file of a sharded folder. */
const char *um_safetensors_source(const um_safetensors_t *st);

/* Header spelling of a dtype: "F32" or "BF16". */
const char *um_dtype_name(um_dtype_t dtype);

/* Write a shape as "[2, 3]" into buf (len bytes), for error messages; truncates to fit. */
void um_shape_format(char *buf, size_t len, const int64_t *shape, int32_t ndim);

/* Size of one element in bytes: 4 or 2. */
size_t um_dtype_size(um_dtype_t dtype);

#endif /* UM_SAFETENSORS_H */
