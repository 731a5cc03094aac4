/*
 * Internal interface of the SentencePiece BPE tokenizer plugin (not installed).
 *
 * A um_spm_t contains one loaded tokenizer.model: the pieces by id with their scores
 * and types, a table from piece text to id, the byte pieces <0x00>..<0xFF>, the
 * user-defined pieces matched literally, the normalizer settings and the scratch
 * buffers that encode and decode reuse.
 *
 * The files of this folder split the work by data flow: spm_model.c reads the
 * protobuf file into a um_spm_t, spm_encode.c turns text into ids, spm.c contains
 * decode and the plugin descriptor.
 *
 * Threading: a um_spm_t is immutable after loading except for its scratch buffers, so
 * the host must use each one from one thread at a time (plugin.h requires that of the
 * host anyway). Nothing here is global.
 */
#ifndef UM_SPM_H
#define UM_SPM_H

#include <stddef.h>
#include <stdint.h>

#include <unmaskd/plugin.h>

#include "../common/tok_common.h"

#define UM_SPM_NAME "spm"
#define UM_SPM_FILE "tokenizer.model"

/* U+2581 LOWER ONE EIGHTH BLOCK, which SentencePiece writes in place of a space. */
#define UM_SPM_SPACE "\xE2\x96\x81"
#define UM_SPM_SPACE_LEN 3

/* Largest tokenizer.model read; real ones are below 5 MiB (LLaMA-2's is 0.5 MiB). */
#define UM_SPM_MAX_FILE (256u << 20)

/* Piece types of ModelProto.SentencePiece.Type, with the wire values. */
typedef enum um_spm_type {
    UM_SPM_NORMAL = 1,
    UM_SPM_UNKNOWN = 2,
    UM_SPM_CONTROL = 3,
    UM_SPM_USER_DEFINED = 4,
    UM_SPM_UNUSED = 5,
    UM_SPM_BYTE = 6,
} um_spm_type_t;

/* Log through the host table, skipping the call when the host offers no log. */
#define UM_SPM_LOG(spm, level, ...)                               \
    do {                                                          \
        if ((spm)->host->log)                                     \
            (spm)->host->log((level), UM_SPM_NAME, __VA_ARGS__);  \
    } while (0)

typedef struct um_spm_piece {
    const char *text; /* UTF-8, NUL-terminated, in the string block */
    uint32_t len;     /* bytes of text */
    float score;      /* merge priority: the pair whose merged piece scores highest merges first */
    uint8_t type;     /* um_spm_type_t */
    uint8_t byte;     /* the byte value of a BYTE piece */
} um_spm_piece_t;

/* One user-defined piece for the literal scan, ordered by first byte, then longest first. */
typedef struct um_spm_literal {
    const char *text;
    uint32_t len;
    int32_t id;
} um_spm_literal_t;

typedef struct um_spm {
    const um_host_t *host;

    um_spm_piece_t *pieces; /* (n_pieces) indexed by id */
    int32_t n_pieces;
    char *strings;          /* every piece's text, NUL-separated */
    um_tok_table_t table;   /* piece text -> id, every type */

    int32_t byte_id[256];   /* id of <0xNN> for each byte, -1 when absent */
    int32_t unk_id, bos_id, eos_id, pad_id; /* -1 when the model has none */

    um_spm_literal_t *literals; /* (n_literals) user-defined pieces */
    int32_t n_literals;
    int32_t literal_first[256]; /* index in literals of the first one starting with a byte */
    int32_t literal_count[256];

    /* Settings of the model file (TrainerSpec and NormalizerSpec). */
    int byte_fallback;
    int add_dummy_prefix;
    int remove_extra_whitespaces;
    int escape_whitespaces;
    /*
     * 1 when no merge can cross the start of a word (a marker after another character),
     * so encode may merge word by word. It holds when no mergeable piece has a marker
     * right after another character and no piece is UNUSED.
     */
    int word_chunks;

    /* Scratch reused by encode and decode; see the threading rule above. */
    um_tok_buf_t norm;    /* normalized text */
    um_tok_buf_t symbols; /* symbols of the text being merged */
    um_tok_buf_t heap;    /* candidate merges */
    um_tok_buf_t text;    /* decoded bytes */
    /* (n_pieces) bytes of the left part of the last pair that formed each UNUSED piece */
    uint32_t *unused_split;
    um_tok_buf_t touched;   /* ids whose unused_split this call set */
} um_spm_t;

/* ---- spm_model.c: loading ---- */

/*
 * Fill spm (already zeroed, host set) from the tokenizer.model at path. Returns 0, or
 * UM_ENOTFOUND / UM_EIO when the file cannot be read, UM_EFORMAT when it is not a
 * valid SentencePiece model (err names the byte offset), UM_EUNSUPPORTED for a valid
 * model this plugin cannot run (Unigram, a normalization rule other than identity),
 * UM_ENOMEM. The caller frees spm on failure.
 */
int um_spm_load_model(um_spm_t *spm, const char *path, char *err, size_t errlen);

/*
 * Score the tokenizer.model at path: 85 for a SentencePiece BPE model, 10 for a
 * SentencePiece model of another type (so that loading it explains what is missing
 * when no other plugin fits), 0 otherwise. 85 stays below the 90 of a tokenizer.json
 * that the bpe or wordpiece plugin reads, because Hugging Face transformers also
 * prefers tokenizer.json when a folder has both.
 */
int um_spm_probe_model(const char *path);

/* ---- spm_encode.c ---- */

/*
 * Encode len bytes of UTF-8 text into ids (room for cap). Returns 0, UM_EINVAL for
 * text that is not valid UTF-8, UM_ENOSPACE when cap is too small (*n_ids is then the
 * count needed) or UM_ENOMEM.
 */
int um_spm_encode(um_spm_t *spm, const char *text, size_t len, int32_t *ids, size_t cap,
                  size_t *n_ids);

#endif /* UM_SPM_H */
