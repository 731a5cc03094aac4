/*
 * Generation: the masked-diffusion sampler over a loaded model, with the choice of
 * positions to commit delegated to a remasking plugin. It follows LLaDA's generate()
 * and, per request, Dream's timestep schedule and token sampling. docs/sampling.md
 * states every rule (block plan, schedules, token sampling, guidance, end-of-text
 * controls, tie-breaks) and where the reference engines differ.
 *
 * Threading: one generation runs on the calling thread; the model must not be used
 * by another thread meanwhile.
 */
#ifndef UM_GENERATE_H
#define UM_GENERATE_H

#include <stdint.h>

#include <unmaskd/plugin.h>

#include "model.h"

/*
 * Largest accepted cfg_scale. Guidance multiplies logit differences by cfg_scale + 1,
 * so past about 1e37 f32 logits overflow; useful scales are single digits.
 */
#define UM_GEN_MAX_CFG_SCALE 1000.0

/* Default final time of the timestep schedule, as in Dream. */
#define UM_GEN_DEFAULT_EPS 1e-3

/*
 * Fast-dLLM's approximate block caches (docs/sampling.md, "Block caches"). Each block's
 * first forward pass runs over the whole canvas and stores every layer's keys and
 * values; the block's later passes reuse them.
 */
typedef enum um_cache_mode {
    UM_CACHE_NONE = 0, /* every pass runs over the whole canvas */
    UM_CACHE_PREFIX,   /* later passes run the block and everything after it; the
                          positions before the block read their stored keys and values */
    UM_CACHE_DUAL,     /* later passes run the block only; every other position reads
                          its stored keys and values */
} um_cache_mode_t;

/* The request name of a cache mode: "none", "prefix" or "dual". */
const char *um_cache_mode_name(um_cache_mode_t mode);

/*
 * What one generation does. Every field after remask_state is off, or LLaDA's behaviour,
 * when zero (eot_id is read only with suppress_eos), so callers that set only the LLaDA
 * fields get LLaDA's generate().
 */
typedef struct um_gen_params {
    int32_t gen_length;   /* masked positions appended after the prompt, >= 1 */
    int32_t block_length; /* semi-autoregressive block size, >= 1; the last block of a
                             gen_length that is not a multiple is shorter */
    int32_t steps;        /* denoising steps over the whole generation, >= 1; an upper
                             bound for adaptive policies */
    double temperature;   /* 0: greedy; else in [UM_SAMPLE_MIN_TEMPERATURE, MAX] */
    double cfg_scale;     /* 0: off; > 0: classifier-free guidance */
    uint64_t seed;
    const um_remask_ops_t *remask; /* policy */
    void *remask_state;            /* from remask->request_begin */

    int32_t top_k;          /* 0: off */
    double top_p;           /* in [0, 1]; 0 and 1 are off */
    um_schedule_t schedule; /* how many commits each step requests */
    double eps;             /* final time of the timestep schedule, in [0, 1) */
    int32_t eot_id;         /* end-of-turn token, or -1; read only with suppress_eos. The
                               model's config gives EOS, the tokenizer knows EOT */
    int ban_eos;            /* EOS is never predicted (LLaDA's logits_eos_inf) */
    int suppress_eos;       /* EOS and EOT confidence suppressed at every temperature
                               (LLaDA's confidence_eos_eot_inf, fixed for T > 0) */
    int early_stop;         /* stop once the first committed EOS is followed only by EOS
                               and masks, with no mask before it; the masks become EOS */
    const int32_t *suffix;  /* (n_suffix) fixed tokens after the generated positions: the
                               model sees them, nothing changes them. BERT's closing [SEP]
                               (um_model_framing). May be NULL when n_suffix is 0 */
    int32_t n_suffix;
    um_cache_mode_t cache;  /* block cache; a prompt with mask tokens needs UM_CACHE_NONE */
    int full_lm_head;       /* compute the LM head for every position, as the reference
                               samplers do, and read the candidates' rows from it: the same
                               tokens, slower. For benchmarks and parity tests; ignored
                               with a block cache */
} um_gen_params_t;

/* What one denoising step did, passed to the step callback. */
typedef struct um_step_info {
    int32_t step;          /* 0-based index over the whole generation */
    int32_t n_steps;       /* planned steps over the whole generation */
    int32_t block;         /* 0-based block index */
    int32_t n_blocks;
    const int32_t *canvas; /* (canvas_length) tokens after this step's commits; the
                              suffix follows them */
    int32_t canvas_length; /* prompt plus gen_length */
    const int32_t *committed; /* positions committed this step, ascending */
    int32_t n_committed;
    int32_t n_masked;      /* mask tokens left on the canvas */
    double step_ms;        /* wall time of this step */
    int early_stop;        /* this step ended the generation early: the masks left after
                              the first EOS became EOS and are listed in committed */
} um_step_info_t;

/* Called after every step that ran a forward pass; return nonzero to cancel. */
typedef int (*um_step_fn)(void *user, const um_step_info_t *info);

typedef struct um_gen_stats {
    int32_t forward_passes; /* one per step run; guidance shares its pass */
    int32_t steps_planned;
    int32_t steps_run;      /* steps that ran a forward pass */
    int32_t early_stop;     /* 1 when early_stop ended the generation */
    int32_t eos_position;   /* canvas position of the first generated EOS, or -1 */
    int32_t cached_passes;  /* forward passes that reused the block cache */
    int64_t cache_bytes;    /* size of the block cache, 0 without one */
    int32_t batch_size;     /* most generations, this one included, whose steps shared
                               one forward pass (um_gen_step_batch); 1 when it ran alone */
    double total_ms;
    double forward_ms;
    double sample_ms;       /* token sampling and scores, in all steps */
} um_gen_stats_t;

/*
 * Check params against the model (ranges, prompt plus gen_length plus suffix within
 * max_sequence_length). Returns 0 or UM_EINVAL / UM_ERANGE with a message in err
 * that names the field, the value and the fix; *field is set to the field name.
 */
int um_gen_check(const um_model_config_t *cfg, int32_t n_prompt, const um_gen_params_t *p,
                 const char **field, char *err, size_t errlen);

/*
 * A generation as a stepper, so that several can advance in lockstep and share each
 * step's forward pass (um_gen_step_batch):
 *
 *     um_gen_begin -> while (!um_gen_done(g)) um_gen_step(g) -> um_gen_end
 *
 * which is what um_generate does, or per step um_gen_step_prepare, one forward pass the
 * caller runs for the rows it lists, then um_gen_step_finish. Each generation keeps its
 * own seed, policy state, schedule, steps, step callback and early stop, so its tokens
 * do not depend on which others share its passes, up to f32 rounding of the shared pass
 * (um_model_forward_parts). A generation that finishes, fails or is cancelled leaves the
 * batch; the others go on.
 */
typedef struct um_gen um_gen_t;

/*
 * One step's forward pass as um_gen_step_prepare describes it: the arguments of one
 * um_forward_part_t. The caller computes the LM head's rows into logits. It may instead
 * point logits at its own buffer of n_rows * embedding_size floats, which must stay
 * valid until um_gen_step_finish returns, because the finish step combines guidance
 * there in place. Then the caller sets rc, forward_ms and batch_size.
 */
typedef struct um_gen_forward {
    const int32_t *ids;   /* (n_seq, seq_len): the canvas, then with guidance the
                             unconditional canvas */
    int32_t n_seq, seq_len;
    const int32_t *rows;  /* (n_rows) indices into the n_seq * seq_len positions: the
                             candidates, or every position with full_lm_head */
    int32_t n_rows;
    um_kv_cache_t *cache; /* the generation's block cache, or NULL */
    int32_t q_start, q_len; /* the query window: the whole canvas, or with a cache the
                               block's window between refreshes */
    float *logits;        /* (n_rows, embedding_size); the generation's own buffer */
    int rc;               /* set by the caller: the pass's result */
    double forward_ms;    /* set by the caller: the pass's wall time */
    int32_t batch_size;   /* set by the caller: generations that shared the pass */
} um_gen_forward_t;

/*
 * Check params (um_gen_check), set up the canvas as um_generate does and find the first
 * step. p (with its remask_state and suffix), canvas, and user for on_step must stay
 * valid until um_gen_end; prompt is copied into canvas here. Returns 0 and sets *out
 * (free it with um_gen_end), or a UM_E* code with a message in err.
 */
int um_gen_begin(um_model_t *model, const int32_t *prompt, int32_t n_prompt,
                 const um_gen_params_t *p, um_step_fn on_step, void *user, int32_t *canvas,
                 um_gen_t **out, char *err, size_t errlen);

/* Nonzero once the generation has finished, failed or been cancelled. */
int um_gen_done(const um_gen_t *g);

/*
 * Write the forward pass the next step needs into *fwd (views into the generation's
 * buffers, valid until um_gen_step_finish). Returns 0, or UM_EINVAL when the generation
 * is done.
 */
int um_gen_step_prepare(um_gen_t *g, um_gen_forward_t *fwd);

/*
 * Finish the prepared step with the pass's logits: guidance, sampling, the policy's
 * choice, commits, early stop and the step callback, then find the next step. Returns 0
 * while the generation goes on or when it has just finished. Otherwise it returns the
 * UM_E* code that ended it, UM_ECANCELLED when the callback asked to stop, and
 * um_gen_end gives the message.
 */
int um_gen_step_finish(um_gen_t *g, const um_gen_forward_t *fwd);

/* Run one step with a forward pass of its own. Returns as um_gen_step_finish. */
int um_gen_step(um_gen_t *g);

/*
 * Advance every generation of gens[0..n) that is not done (NULL entries are skipped) by
 * one step. They share one forward pass (um_model_forward_parts), each generation with
 * a block cache running its own window against its own cache in it. The generations
 * must all use one model. A failed shared pass
 * ends every generation that shared it, with its error. Returns 0, UM_EINVAL for
 * generations of different models, or UM_ENOMEM (nothing stepped); each generation's own
 * result is um_gen_done and um_gen_end's.
 */
int um_gen_step_batch(um_gen_t *const *gens, int32_t n);

/*
 * Free the generation, set *g to NULL and write its stats. Returns its result: 0 when it
 * finished, UM_ECANCELLED when the callback stopped it or it was ended before it
 * finished (canvas then contains the partial result), or the UM_E* code that ended it, with
 * a message in err.
 */
int um_gen_end(um_gen_t **g, um_gen_stats_t *stats, char *err, size_t errlen);

/*
 * Generate: canvas = prompt, then gen_length mask tokens, then the suffix; the masks are
 * denoised in place. canvas must have room for n_prompt + gen_length + n_suffix ids.
 * Predictions never include the tokens um_model_never_sampled lists. Returns 0, UM_ECANCELLED when
 * the callback requested a stop (canvas then contains the partial result), or another
 * UM_E* code with a message in err.
 */
int um_generate(um_model_t *model, const int32_t *prompt, int32_t n_prompt,
                const um_gen_params_t *p, um_step_fn on_step, void *user, int32_t *canvas,
                um_gen_stats_t *stats, char *err, size_t errlen);

#endif /* UM_GENERATE_H */
