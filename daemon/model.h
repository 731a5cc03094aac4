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

#include "kernels.h"

/* Model families, chosen from config.json's model_type. */
typedef enum um_arch {
    UM_ARCH_LLADA = 1,  /* "llada": LLaMA-style pre-norm blocks, RoPE, SwiGLU, untied head */
    UM_ARCH_DREAM,      /* "Dream" (Qwen2 layout): as LLaDA plus q/k/v biases, GQA, and
                         * logits shifted right by one position */
    UM_ARCH_BERT,       /* "bert" (BertForMaskedLM): post-LayerNorm blocks, GELU, learned
                         * positions, MLM head tied to the embeddings */
    UM_ARCH_DISTILBERT, /* "distilbert" (DistilBertForMaskedLM): as BERT without token types */
} um_arch_t;

typedef enum um_activation {
    UM_ACT_SWIGLU = 1, /* silu(gate) * up */
    UM_ACT_GELU_ERF,   /* x/2 (1 + erf(x / sqrt 2)), BERT's "gelu" */
    UM_ACT_GELU_TANH,  /* the tanh approximation, "gelu_new" and "gelu_pytorch_tanh" */
} um_activation_t;

/* The fields of config.json the engine uses, after defaults are applied. */
typedef struct um_model_config {
    um_arch_t arch;
    char model_type[32];      /* as in config.json, e.g. "llada" */
    int32_t d_model;          /* hidden size */
    int32_t n_layers;
    int32_t n_heads;
    int32_t n_kv_heads;       /* equal to n_heads for LLaDA-8B and BERT */
    int32_t head_dim;         /* d_model / n_heads */
    int32_t mlp_hidden_size;  /* MLP inner size */
    int32_t vocab_size;       /* tokenizer vocabulary */
    int32_t embedding_size;   /* rows of wte and of the LM head, >= vocab_size */
    int32_t max_sequence_length;
    float rope_theta;         /* unused without RoPE */
    float rms_norm_eps;       /* epsilon of every norm, RMSNorm or LayerNorm */
    int32_t mask_token_id;
    int32_t eos_token_id;     /* -1 when config.json has none */

    /* Block structure; the LLaDA values are the zero-or-default ones noted. */
    int post_norm;              /* 1: x = norm(x + f(x)) (BERT); 0: x += f(norm(x)) */
    int layer_norm;             /* 1: LayerNorm with bias (BERT); 0: RMSNorm */
    um_activation_t activation; /* UM_ACT_SWIGLU for LLaDA and Dream */
    int rope;                   /* 1: RoPE; 0: learned absolute positions (BERT) */
    int qkv_bias;               /* q, k, v projections have biases (Dream, BERT) */
    int dense_bias;             /* attention output and MLP projections have biases (BERT) */
    int logits_shift;           /* logits of position p come from position p - 1 (Dream) */
    int mlm_head;               /* dense + activation + LayerNorm before the head (BERT) */
    int tied_embeddings;        /* the LM head is the token embedding matrix */
    int32_t type_vocab_size;    /* BERT token types (row 0 is added everywhere), else 0 */
    int32_t cls_token_id;       /* BERT's [CLS], -1 when the model has none */
    int32_t sep_token_id;       /* BERT's [SEP], -1 when the model has none */
    int32_t pad_token_id;       /* -1 when the model has none */
} um_model_config_t;

/* A token or position embedding table as stored, read row by row. */
typedef struct um_embedding {
    const void *data; /* (rows, d_model), f32 or bf16 */
    int bf16;
} um_embedding_t;

/*
 * Weights of one transformer block: f32 vectors (norms, biases; NULL where the family
 * has none), and matrices of PyTorch nn.Linear shape [out, in] prepared for the matrix
 * products (layout and dtype are the GEMM's). For post-norm families attn_norm and
 * ff_norm are the LayerNorms after the attention and the MLP.
 */
typedef struct um_block_weights {
    const float *attn_norm;      /* (d_model) */
    const float *attn_norm_bias; /* (d_model), LayerNorm only */
    um_gemm_weight_t *q_proj;    /* (n_heads * head_dim, d_model) */
    um_gemm_weight_t *k_proj;    /* (n_kv_heads * head_dim, d_model) */
    um_gemm_weight_t *v_proj;    /* (n_kv_heads * head_dim, d_model) */
    const float *q_bias, *k_bias, *v_bias;
    um_gemm_weight_t *attn_out;  /* (d_model, n_heads * head_dim) */
    const float *attn_out_bias;  /* (d_model) */
    const float *ff_norm;        /* (d_model) */
    const float *ff_norm_bias;   /* (d_model), LayerNorm only */
    um_gemm_weight_t *ff_proj;   /* (mlp_hidden_size, d_model): SwiGLU gate, or GELU input */
    const float *ff_proj_bias;   /* (mlp_hidden_size) */
    um_gemm_weight_t *up_proj;   /* (mlp_hidden_size, d_model), SwiGLU only */
    um_gemm_weight_t *ff_out;    /* (d_model, mlp_hidden_size), the down projection */
    const float *ff_out_bias;    /* (d_model) */
} um_block_weights_t;

/* Load-time choices. Zero-initialised options mean the defaults. */
typedef struct um_model_options {
    /* Dtype of the matrix products. 0 reads the environment variable UNMASKD_WEIGHT_DTYPE
     * (f32, bf16 or auto). Auto picks bf16 where oneDNN runs bf16 natively (AVX512-BF16
     * or AMX) or where every tensor of the checkpoint is bf16, whose weights are then
     * widened to f32 inside each product. Otherwise it picks f32. */
    um_wdtype_t weight_dtype;
} um_model_options_t;

typedef struct um_model um_model_t;

/*
 * Load a Hugging Face model folder: config.json, then model.safetensors or the shards
 * listed in model.safetensors.index.json. Tensors may be F32 or BF16 and are mapped
 * read-only. Weight matrices are prepared once for the matrix products in the dtype of
 * opts (NULL: defaults); norm vectors are read as f32, the embedding table in place.
 * Returns 0 and sets *out, or a negative UM_E* code with a message in err that names
 * the file, the tensor or field, and the fix.
 */
int um_model_load_opts(const char *dir, const um_model_options_t *opts, um_model_t **out,
                       char *err, size_t errlen);

/* um_model_load_opts with the default options. */
int um_model_load(const char *dir, um_model_t **out, char *err, size_t errlen);

/* Free the model and set *model to NULL; a NULL *model is ignored. */
void um_model_destroy(um_model_t **model);

const um_model_config_t *um_model_config(const um_model_t *model);

/*
 * How a family frames the canvas it was trained on. BERT and DistilBERT read
 * "[CLS] text [SEP]": *prefix is set to [CLS], which goes before the prompt, and *suffix
 * to [SEP], which closes the canvas after the generated positions. Both are -1 for
 * LLaDA and Dream, whose prompts carry their own beginning-of-text token.
 */
void um_model_framing(const um_model_config_t *cfg, int32_t *prefix, int32_t *suffix);

/*
 * Write to out the tokens a sampler must never predict and return their count (at most
 * UM_MODEL_MAX_NEVER_SAMPLED): the mask token, and for the BERT family [CLS] and [PAD],
 * which only frame and pad sequences. LLaDA's and Dream's padding token is their EOS,
 * which stays a valid prediction.
 */
#define UM_MODEL_MAX_NEVER_SAMPLED 3
int32_t um_model_never_sampled(const um_model_config_t *cfg, int32_t *out);

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

/*
 * A forward pass over n_seq sequences of different lengths in one call, each an uncached
 * part of um_model_forward_parts. ids contains the sequences concatenated: sequence s is
 * ids[seq_offsets[s]] up to ids[seq_offsets[s + 1]] (exclusive). seq_offsets has n_seq +
 * 1 ascending entries from 0, and each sequence has 1 to max_sequence_length tokens. Each sequence attends only
 * to itself and its positions start at 0. So its logits are those of a separate pass up
 * to f32 rounding, because the weight products run over all rows at once, and a product's
 * summation order may depend on its row count. Writes the LM head's logits (n_rows,
 * embedding_size) for the positions in rows[] (indices into the concatenated positions).
 * Returns 0, UM_EINVAL for a NULL argument, UM_ERANGE for bad offsets, ids or rows,
 * UM_ENOMEM or UM_EBACKEND.
 */
int um_model_forward_ragged(um_model_t *model, const int32_t *ids,
                            const int32_t *seq_offsets, int32_t n_seq, const int32_t *rows,
                            int32_t n_rows, float *logits);

/*
 * Block cache for Fast-dLLM's approximate prefix and dual caches: every layer's keys
 * and values for every position of n_seq sequences of seq_len, 2 * n_layers * n_seq *
 * seq_len * n_kv_heads * head_dim floats. Keys are stored after RoPE (forward.c explains
 * why that equals caching them before). One cache serves one generation.
 */
typedef struct um_kv_cache um_kv_cache_t;

/*
 * Allocate an empty cache for n_seq sequences of seq_len positions of model. Returns 0
 * and sets *out (the caller owns it), UM_ERANGE for a bad size, or UM_ENOMEM.
 */
int um_kv_cache_new(const um_model_t *model, int32_t n_seq, int32_t seq_len,
                    um_kv_cache_t **out);

/* Free the cache and set *cache to NULL; a NULL *cache is ignored. */
void um_kv_cache_destroy(um_kv_cache_t **cache);

/* Bytes the cache's keys and values take. */
size_t um_kv_cache_bytes(const um_kv_cache_t *cache);

/*
 * A forward pass through a block cache. ids is the whole canvas (n_seq, seq_len), but
 * only the query window [q_start, q_start + q_len) of each sequence runs through the
 * blocks: its keys and values replace their rows in the cache, and its queries attend
 * over all seq_len rows, fresh inside the window and as last stored outside it. A pass
 * over the whole sequence (q_start 0, q_len seq_len) fills every row; a narrower
 * window needs a filled cache. Writes logits (n_rows, embedding_size) for the listed
 * positions (indices into the n_seq * seq_len positions), whose hidden state (their
 * own, or the one before for Dream) must lie in the window. Returns 0, UM_EINVAL for a
 * cache of another shape or not yet filled, UM_ERANGE for a bad id, window or row,
 * UM_ENOMEM or UM_EBACKEND.
 */
int um_model_forward_cached(um_model_t *model, um_kv_cache_t *cache, const int32_t *ids,
                            int32_t n_seq, int32_t seq_len, int32_t q_start, int32_t q_len,
                            const int32_t *rows, int32_t n_rows, float *logits);

/*
 * One part of a batched pass (um_model_forward_parts): the arguments of one
 * um_model_forward_cached call, or of one um_model_forward_rows call when cache is NULL
 * (then the window must be the whole sequence).
 */
typedef struct um_forward_part {
    const int32_t *ids;     /* (n_seq, seq_len) the whole canvas */
    int32_t n_seq, seq_len;
    um_kv_cache_t *cache;   /* the part's own block cache, or NULL */
    int32_t q_start, q_len; /* the query window of each sequence */
    const int32_t *rows;    /* (n_rows) positions, indices into the n_seq * seq_len */
    int32_t n_rows;
} um_forward_part_t;

/*
 * The passes of n_parts parts in one call, for batching generations with or without
 * block caches. The weight products run once over every part's window rows, and each
 * part's attention reads only its own sequences (and its own cache). So its logits are
 * those of its own call up to f32 rounding, because a product's summation order may
 * depend on its row count. Writes logits (sum of n_rows, embedding_size), part p's rows after
 * those of parts 0 to p - 1. Two parts may not share a cache. Returns 0, or the error
 * the part's own call would return (UM_EINVAL, UM_ERANGE), UM_ENOMEM or UM_EBACKEND.
 */
int um_model_forward_parts(um_model_t *model, const um_forward_part_t *parts,
                           int32_t n_parts, float *logits);

/*
 * Where a forward pass spends its time, summed over the passes run while the profile
 * is attached. gemm_ms covers the weight products of the blocks; attention_ms the fused
 * attention (its own score and value products included); lm_head_ms the LM head
 * product; other_ms the embedding lookup and, implicitly, total_ms minus the rest.
 */
typedef struct um_forward_profile {
    double total_ms, gemm_ms, attention_ms, lm_head_ms;
    double norm_ms, rope_ms, activation_ms, other_ms;
    int64_t passes;
} um_forward_profile_t;

/* Attach a profile that every later forward pass adds to (NULL detaches). */
void um_model_set_profile(um_model_t *model, um_forward_profile_t *profile);

/* The attached profile, or NULL. */
um_forward_profile_t *um_model_profile(const um_model_t *model);

/* Dtype of the prepared weight matrices. */
um_wdtype_t um_model_weight_dtype(const um_model_t *model);

/* Name of the matrix-product backend in use, e.g. "onednn 2.6.3 (bf16)". */
const char *um_model_backend(const um_model_t *model);

/* ------------------------------------------------------------------------- */
/* For the forward pass (forward.c), tests and benchmarks                     */

/* The weights bound at load; every pointer is valid until um_model_destroy. */
typedef struct um_model_weights {
    um_embedding_t wte;               /* (embedding_size, d_model) token embeddings */
    um_embedding_t wpe;               /* (max_sequence_length, d_model), learned positions */
    um_embedding_t wtte;              /* (type_vocab_size, d_model), BERT token types */
    const float *emb_norm;            /* (d_model) LayerNorm after the embeddings (BERT) */
    const float *emb_norm_bias;
    const um_block_weights_t *blocks; /* (n_layers) */
    const float *ln_f;                /* (d_model) final RMSNorm weight (pre-norm families) */
    um_gemm_weight_t *head_dense;     /* (d_model, d_model) MLM transform (BERT) */
    const float *head_dense_bias;
    const float *head_norm;           /* (d_model) MLM LayerNorm (BERT) */
    const float *head_norm_bias;
    um_gemm_weight_t *lm_head;        /* (embedding_size, d_model), possibly tied to wte */
    const float *lm_head_bias;        /* (embedding_size), BERT only */
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

/*
 * Grow the buffer for the logits of a batch's shared pass (um_gen_step_batch) to at
 * least n_floats floats, and set *out to it. It is kept between steps, so that a batch
 * does not map and fault in fresh pages at every step. Like the workspace, it belongs to
 * the model, one batch at a time may use it, and growing discards the contents. Returns
 * 0 or UM_ENOMEM.
 */
int um_model_batch_logits(um_model_t *model, size_t n_floats, float **out);

#endif /* UM_MODEL_H */
