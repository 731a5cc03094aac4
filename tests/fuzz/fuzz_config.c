/*
 * Fuzz target: one config.json through um_model_config_load, which reads it from a
 * model folder, so each input is written to the scratch folder first. An accepted
 * configuration must satisfy the relations the forward pass relies on.
 */
#include <math.h>
#include <string.h>

#include "fuzz.h"
#include "model_internal.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    um_fuzz_write("config.json", data, size);
    um_model_config_t c;
    char err[1024];
    err[0] = '\0';
    int rc = um_model_config_load(um_fuzz_scratch_dir(), &c, err, sizeof err);
    if (rc != 0) {
        UM_FUZZ_CHECK(rc < 0);
        UM_FUZZ_CHECK(err[0] != '\0');
        return 0;
    }

    UM_FUZZ_CHECK(c.arch != 0);
    UM_FUZZ_CHECK(memchr(c.model_type, '\0', sizeof c.model_type) != NULL);
    UM_FUZZ_CHECK(c.d_model > 0 && c.n_layers > 0 && c.n_heads > 0 && c.n_kv_heads > 0);
    UM_FUZZ_CHECK(c.head_dim > 0 && c.head_dim * c.n_heads == c.d_model);
    UM_FUZZ_CHECK(c.n_heads % c.n_kv_heads == 0);
    UM_FUZZ_CHECK(!c.rope || c.head_dim % 2 == 0);
    UM_FUZZ_CHECK(c.mlp_hidden_size > 0 && c.max_sequence_length > 0);
    UM_FUZZ_CHECK(c.vocab_size > 0 && c.embedding_size >= c.vocab_size);
    UM_FUZZ_CHECK(c.mask_token_id >= 0 && c.mask_token_id < c.embedding_size);
    UM_FUZZ_CHECK(c.eos_token_id >= -1 && c.eos_token_id < c.embedding_size);
    UM_FUZZ_CHECK(c.pad_token_id >= -1 && c.pad_token_id < c.embedding_size);
    UM_FUZZ_CHECK(c.rms_norm_eps > 0.0f && isfinite(c.rms_norm_eps));
    UM_FUZZ_CHECK(!c.rope || (c.rope_theta > 0.0f && isfinite(c.rope_theta)));
    return 0;
}
