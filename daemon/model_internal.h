/*
 * What model.c and model_config.c share, and nothing outside the model unit uses.
 */
#ifndef UM_MODEL_INTERNAL_H
#define UM_MODEL_INTERNAL_H

#include <stddef.h>

#include "model.h"

/*
 * Parse <dir>/config.json into c for any supported family, applying its defaults and
 * checking what the forward pass relies on. Returns 0 or a UM_E* code with a message in
 * err naming the file, the field and the fix.
 */
int um_model_config_load(const char *dir, um_model_config_t *c, char *err, size_t errlen);

#endif /* UM_MODEL_INTERNAL_H */
