/*
 * generate.h: batched KV-cache text generation (see generate.c).
 */
#ifndef SKUPY_GENERATE_H
#define SKUPY_GENERATE_H

#include <stdint.h>

#include "model.h"

typedef struct {
    float temperature;        /* <= 0: greedy decoding */
    int top_k;                /* 0: no top-k filter */
    float top_p;              /* >= 1: no nucleus filter */
    uint64_t seed;
    const int32_t *stop_ids;  /* generation of a row ends after one of these */
    int num_stop;
    int32_t pad_id;           /* written after a row has stopped */
    int use_lora;
} GenerateOptions;

/* Generates up to max_new tokens for each of B left-padded prompts.
 * prompt, prompt_mask: (B,Tp) int32, ids validated by the caller, mask 1 for
 * real tokens. Tp + max_new must not exceed m->cfg.max_positions.
 * out_tokens (B,max_new) receives the new tokens (stop token included, then
 * pad_id); out_lengths (B) the count before padding.
 * Uses m->cfg, m->inv_freq and the bfloat16 expansion buffer, not the training
 * activations, and allocates its cache itself. Returns 0, or -1 when that allocation fails. */
int model_generate(Model *m, float *const *P, const int32_t *prompt,
                   const int32_t *prompt_mask, int B, int Tp, int max_new,
                   const GenerateOptions *opt, int32_t *out_tokens, int32_t *out_lengths);

#endif
