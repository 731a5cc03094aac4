/*
 * The model: configuration from config.json, weights from safetensors, and the
 * transformer forward pass. This is the engine's core. It depends on no ZeroMQ,
 * JSON request or plugin code, so tests and benchmarks drive it directly.
 *
 * Threading: a model is read-only after load except for its forward workspace, so
 * one thread at a time may call um_model_forward on a given model. The matrix
 * products inside a forward pass use all the threads OpenMP is given.
 */
#ifndef UM_MODEL_H
#define UM_MODEL_H

#include <stddef.h>
#include <stdint.h>

typedef enum um_arch {
    UM_ARCH_LLADA = 1,
} um_arch_t;

/* The fields of config.json the engine uses, after defaults are applied. */
typedef struct um_model_config {
    um_arch_t arch;
    char model_type[32];      /* as in config.json, e.g. "llada" */
    int32_t d_model;          /* hidden size */
    int32_t n_layers;
    int32_t n_heads;
    int32_t n_kv_heads;       /* equal to n_heads for LLaDA-8B */
    int32_t head_dim;         /* d_model / n_heads */
    int32_t mlp_hidden_size;  /* SwiGLU inner size */
    int32_t vocab_size;       /* tokenizer vocabulary */
    int32_t embedding_size;   /* rows of wte and of the LM head, >= vocab_size */
    int32_t max_sequence_length;
    float rope_theta;
    float rms_norm_eps;
    int32_t mask_token_id;
    int32_t eos_token_id;     /* -1 when config.json has none */
} um_model_config_t;

/* Weights of one transformer block, f32, PyTorch nn.Linear layout [out, in] row-major. */
typedef struct um_block_weights {
    const float *attn_norm; /* (d_model) */
    const float *q_proj;    /* (n_heads * head_dim, d_model) */
    const float *k_proj;    /* (n_kv_heads * head_dim, d_model) */
    const float *v_proj;    /* (n_kv_heads * head_dim, d_model) */
    const float *attn_out;  /* (d_model, n_heads * head_dim) */
    const float *ff_norm;   /* (d_model) */
    const float *ff_proj;   /* (mlp_hidden_size, d_model), the SwiGLU gate */
    const float *up_proj;   /* (mlp_hidden_size, d_model), the linear branch */
    const float *ff_out;    /* (d_model, mlp_hidden_size), the down projection */
} um_block_weights_t;

typedef struct um_model um_model_t;

/*
 * Load a Hugging Face model folder: config.json, then model.safetensors or the shards
 * listed in model.safetensors.index.json. Tensors may be F32 or BF16 and are mapped
 * read-only; BF16 tensors are widened to f32 copies at load.
 * Returns 0 and sets *out, or a negative UM_E* code with a message in err that names
 * the file, the tensor or field, and the fix.
 */
int um_model_load(const char *dir, um_model_t **out, char *err, size_t errlen);

/* Free the model and set *model to NULL; a NULL *model is ignored. */
void um_model_destroy(um_model_t **model);

const um_model_config_t *um_model_config(const um_model_t *model);

/* Folder the model was loaded from. */
const char *um_model_dir(const um_model_t *model);

/* Dtype of the weights as stored on disk: "f32", "bf16" or "mixed". */
const char *um_model_dtype(const um_model_t *model);

/*
 * Run the forward pass over n_seq sequences of seq_len tokens each (ids row-major,
 * (n_seq, seq_len)). Attention is bidirectional over the whole sequence. Writes
 * logits (n_seq * seq_len, embedding_size) in f32. Ids must be in [0, embedding_size).
 * Returns 0, UM_ERANGE for a bad id or seq_len past max_sequence_length, UM_ENOMEM,
 * or UM_EBACKEND when a matrix product fails.
 */
int um_model_forward(um_model_t *model, const int32_t *ids, int32_t n_seq, int32_t seq_len,
                     float *logits);

/*
 * Like um_model_forward, but computes the LM head only for the rows listed in
 * rows[] (indices into the n_seq * seq_len positions), writing (n_rows, embedding_size).
 * The hidden states of all positions are still computed, since attention needs them.
 */
int um_model_forward_rows(um_model_t *model, const int32_t *ids, int32_t n_seq,
                          int32_t seq_len, const int32_t *rows, int32_t n_rows,
                          float *logits);

/* Name of the matrix-product backend in use, e.g. "onednn 2.6.3 (f32)". */
const char *um_model_backend(const um_model_t *model);

/* ------------------------------------------------------------------------- */
/* For the forward pass (forward.c), tests and benchmarks                     */

/* The f32 weights bound at load; every pointer is valid until um_model_destroy. */
typedef struct um_model_weights {
    const float *wte;                 /* (embedding_size, d_model) token embeddings */
    const um_block_weights_t *blocks; /* (n_layers) */
    const float *ln_f;                /* (d_model) final RMSNorm weight */
    const float *lm_head;             /* (embedding_size, d_model), untied from wte */
} um_model_weights_t;

const um_model_weights_t *um_model_weights(const um_model_t *model);

/*
 * RoPE table, (max_sequence_length, head_dim / 2, 2) floats: for position p and pair i,
 * (cos, sin) of p * rope_theta^(-2i / head_dim), computed in double and stored in f32.
 */
const float *um_model_rope_table(const um_model_t *model);

/*
 * Grow the model's forward workspace to at least n_floats floats, 64-byte aligned, and
 * set *out to it. Growing discards the contents. The workspace belongs to the model
 * and is freed with it. Returns 0 or UM_ENOMEM (the old workspace is kept).
 */
int um_model_workspace(um_model_t *model, size_t n_floats, float **out);

#endif /* UM_MODEL_H */
