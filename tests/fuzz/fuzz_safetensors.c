/*
 * Fuzz target: one .safetensors file through um_safetensors_open_file. The loader
 * takes a path, so each input is written to the scratch folder first. An accepted file
 * must hand out only views that agree with their shape and dtype, that can be found by
 * name, and whose bytes can all be read.
 */
#include <string.h>

#include "fuzz.h"
#include "safetensors.h"

/* Read every byte of t, so a view past the mapping faults here. */
static unsigned s_touch(const um_tensor_view_t *t)
{
    const unsigned char *p = t->data;
    unsigned sum = 0;
    for (size_t i = 0; i < t->nbytes; i++)
        sum += p[i];
    return sum;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *path = um_fuzz_write("model.safetensors", data, size);
    um_safetensors_t *st = NULL;
    char err[1024];
    err[0] = '\0';
    int rc = um_safetensors_open_file(path, &st, err, sizeof err);
    if (rc != 0) {
        UM_FUZZ_CHECK(rc < 0);
        UM_FUZZ_CHECK(st == NULL);
        UM_FUZZ_CHECK(err[0] != '\0');
        return 0;
    }
    UM_FUZZ_CHECK(st != NULL);

    size_t n = um_safetensors_count(st), total = 0;
    unsigned sum = 0;
    for (size_t i = 0; i < n; i++) {
        const um_tensor_view_t *t = um_safetensors_at(st, i);
        UM_FUZZ_CHECK(t != NULL && t->name != NULL);
        UM_FUZZ_CHECK(t->ndim >= 0 && t->ndim <= UM_SAFETENSORS_MAX_DIMS);
        int64_t numel = 1;
        for (int32_t d = 0; d < t->ndim; d++)
            numel *= t->shape[d];
        UM_FUZZ_CHECK(numel == t->numel);
        UM_FUZZ_CHECK(t->nbytes == (size_t)t->numel * um_dtype_size(t->dtype));
        UM_FUZZ_CHECK(um_safetensors_find(st, t->name) == t);
        UM_FUZZ_CHECK(i == 0 || strcmp(um_safetensors_at(st, i - 1)->name, t->name) < 0);
        /* Tensors do not overlap, so together they fit in the file. */
        total += t->nbytes;
        UM_FUZZ_CHECK(total <= size);
        sum += s_touch(t);

        char shape[160];
        um_shape_format(shape, sizeof shape, t->shape, t->ndim);
        UM_FUZZ_CHECK(strlen(shape) < sizeof shape);
    }
    /* Keep the reads: the compiler may not drop the loop that computed sum. */
    __asm__ volatile("" : : "r"(sum) : "memory");
    UM_FUZZ_CHECK(um_safetensors_at(st, n) == NULL);
    um_safetensors_close(&st);
    UM_FUZZ_CHECK(st == NULL);
    return 0;
}
