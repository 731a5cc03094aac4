/*
 * gguf-logits: run one forward pass of a GGUF model through a user's llama.cpp build and
 * write the logits of every position, to compare llama.cpp with unmaskd on the same ids.
 *
 * It uses only llama.h's public API, so it builds against any llama.cpp build folder:
 *
 *   cc -O2 -o gguf-logits tools/gguf_logits.c -I LLAMA/include -I LLAMA/ggml/include \
 *      -L LLAMA/build/bin -lllama -Wl,-rpath,LLAMA/build/bin
 *
 * Modes:
 *   gguf-logits MODEL.gguf --ids 1,2,3 --out LOGITS.f32 [--threads N] [--flash-attn]
 *       decodes the ids as one non-causal batch (positions 0..n-1) and writes n rows of
 *       n_vocab little-endian float32 logits, row by row
 *   gguf-logits MODEL.gguf --tokenize TEXT
 *       prints the ids llama.cpp's tokenizer gives TEXT, as llama-diffusion-cli calls it
 *       (special tokens added and parsed), comma-separated on one line
 *
 * The program is single-threaded apart from llama.cpp's own worker threads.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "llama.h"

static void s_usage(FILE *out)
{
    fprintf(out,
            "usage: gguf-logits MODEL.gguf --ids ID,ID,... --out FILE [--threads N]\n"
            "                   [--flash-attn]\n"
            "       gguf-logits MODEL.gguf --tokenize TEXT\n"
            "  --ids LIST      comma-separated token ids, decoded as one non-causal batch\n"
            "  --out FILE      where to write the logits (n_ids rows of n_vocab float32)\n"
            "  --threads N     llama.cpp threads (default 2)\n"
            "  --flash-attn    use llama.cpp's flash attention (default off: it rounds K and\n"
            "                  V to f16)\n"
            "  --tokenize TEXT print the ids of TEXT and exit\n");
}

/* llama.cpp logs model loading at length on stderr; keep only warnings and errors. */
static void s_log_quiet(enum ggml_log_level level, const char *text, void *user)
{
    (void)user;
    if (level == GGML_LOG_LEVEL_WARN || level == GGML_LOG_LEVEL_ERROR)
        fputs(text, stderr);
}

/* Parse "1,2,3" into a new array; returns the count, or -1 on an invalid list. */
static int s_parse_ids(const char *text, llama_token **ids_out)
{
    int cap = 16, n = 0;
    llama_token *ids = malloc((size_t)cap * sizeof *ids);
    const char *p = text;
    while (ids && *p) {
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno || v < 0 || v > 0x7fffffff || (*end && *end != ',')) {
            free(ids);
            return -1;
        }
        if (n == cap) {
            cap *= 2;
            llama_token *grown = realloc(ids, (size_t)cap * sizeof *ids);
            if (!grown) {
                free(ids);
                return -1;
            }
            ids = grown;
        }
        ids[n++] = (llama_token)v;
        p = *end ? end + 1 : end;
    }
    *ids_out = ids;
    return ids && n > 0 ? n : -1;
}

static int s_tokenize(const struct llama_vocab *vocab, const char *text)
{
    int len = (int)strlen(text);
    int cap = len + 8;
    llama_token *ids = malloc((size_t)cap * sizeof *ids);
    if (!ids)
        return 1;
    int n = llama_tokenize(vocab, text, len, ids, cap, true, true);
    if (n < 0) {
        fprintf(stderr, "gguf-logits: tokenizing failed (%d)\n", n);
        free(ids);
        return 1;
    }
    for (int i = 0; i < n; i++)
        printf("%s%d", i ? "," : "", ids[i]);
    printf("\n");
    free(ids);
    return 0;
}

/* Decode the ids as one batch, every position an output, and write the logits rows. */
static int s_logits(struct llama_model *model, const llama_token *ids, int n, int threads,
                    int flash_attn, const char *out_path)
{
    const struct llama_vocab *vocab = llama_model_get_vocab(model);
    int n_vocab = llama_vocab_n_tokens(vocab);
    for (int i = 0; i < n; i++) {
        if (ids[i] >= n_vocab) {
            fprintf(stderr, "gguf-logits: id %d is outside the vocabulary of %d: fix --ids\n",
                    ids[i], n_vocab);
            return 1;
        }
    }

    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t)n;
    cp.n_batch = (uint32_t)n;
    cp.n_ubatch = (uint32_t)n;
    cp.n_threads = threads;
    cp.n_threads_batch = threads;
    /* llama.cpp's CPU flash attention rounds K and V to f16. That moved the bundled
     * model's logits by up to 8e-3, against 2e-5 without it, so by default attention
     * stays in f32 and the comparison measures the export alone. */
    cp.flash_attn_type = flash_attn ? LLAMA_FLASH_ATTN_TYPE_ENABLED
                                    : LLAMA_FLASH_ATTN_TYPE_DISABLED;
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        fprintf(stderr, "gguf-logits: creating a llama.cpp context of %d positions failed\n",
                n);
        return 1;
    }
    /* A masked-diffusion model attends in both directions. */
    llama_set_causal_attn(ctx, false);

    int rc = 1;
    FILE *f = NULL;
    struct llama_batch batch = llama_batch_init(n, 0, 1);
    batch.n_tokens = n;
    for (int i = 0; i < n; i++) {
        batch.token[i] = ids[i];
        batch.pos[i] = i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = 1;
    }
    int status = llama_decode(ctx, batch);
    if (status != 0) {
        fprintf(stderr, "gguf-logits: llama_decode failed with status %d\n", status);
        goto done;
    }
    f = fopen(out_path, "wb");
    if (!f) {
        fprintf(stderr, "gguf-logits: cannot write %s: %s\n", out_path, strerror(errno));
        goto done;
    }
    for (int i = 0; i < n; i++) {
        const float *row = llama_get_logits_ith(ctx, i);
        if (!row || fwrite(row, sizeof *row, (size_t)n_vocab, f) != (size_t)n_vocab) {
            fprintf(stderr, "gguf-logits: writing the logits of position %d failed\n", i);
            goto done;
        }
    }
    rc = 0;
done:
    if (f && fclose(f) != 0 && rc == 0) {
        fprintf(stderr, "gguf-logits: closing %s failed: %s\n", out_path, strerror(errno));
        rc = 1;
    }
    llama_batch_free(batch);
    llama_free(ctx);
    return rc;
}

int main(int argc, char **argv)
{
    const char *model_path = NULL, *ids_text = NULL, *out_path = NULL, *text = NULL;
    int threads = 2, flash_attn = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        int has_value = i + 1 < argc;
        if (!strcmp(a, "--ids") && has_value) {
            ids_text = argv[++i];
        } else if (!strcmp(a, "--out") && has_value) {
            out_path = argv[++i];
        } else if (!strcmp(a, "--tokenize") && has_value) {
            text = argv[++i];
        } else if (!strcmp(a, "--threads") && has_value) {
            threads = atoi(argv[++i]);
        } else if (!strcmp(a, "--flash-attn")) {
            flash_attn = 1;
        } else if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            s_usage(stdout);
            return 0;
        } else if (a[0] != '-' && !model_path) {
            model_path = a;
        } else {
            fprintf(stderr, "gguf-logits: unknown or incomplete option %s\n", a);
            s_usage(stderr);
            return 2;
        }
    }
    if (!model_path || (!text && (!ids_text || !out_path)) || threads < 1) {
        s_usage(stderr);
        return 2;
    }

    llama_token *ids = NULL;
    int n = 0;
    if (!text && (n = s_parse_ids(ids_text, &ids)) < 0) {
        fprintf(stderr, "gguf-logits: --ids %s is not a list of non-negative integers\n",
                ids_text);
        return 2;
    }

    llama_log_set(s_log_quiet, NULL);
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    struct llama_model *model = llama_model_load_from_file(model_path, mp);
    if (!model) {
        fprintf(stderr, "gguf-logits: loading %s failed: check that it is a GGUF file for "
                        "this llama.cpp build\n", model_path);
        free(ids);
        return 1;
    }
    int rc = text ? s_tokenize(llama_model_get_vocab(model), text)
                  : s_logits(model, ids, n, threads, flash_attn, out_path);
    llama_model_free(model);
    llama_backend_free();
    free(ids);
    return rc;
}
