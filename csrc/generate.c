/*
 * generate.c: batched text generation with a key/value cache.
 *
 * Prompts arrive left-padded in one (B,Tp) batch with a key mask, so every
 * row's next token sits at the same cache index. Positions are counted over
 * real tokens only, which makes a row's result independent of the padding
 * its batch needed. The prefill step runs the whole prompt through the
 * blocks once, appending keys and values to the cache; each decode step then
 * feeds one token per row and attends over the cache. Only the last position
 * of each row goes through the final norm and LM head.
 *
 * Sampling: greedy argmax (first maximum on ties, as torch.argmax) when
 * temperature <= 0; otherwise softmax(logits / temperature) restricted to
 * the top_k most likely tokens and then to the smallest set whose probability
 * reaches top_p, drawn with a per-row splitmix64 generator seeded from seed
 * and the row index.
 */
#include "generate.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ops.h"

/* ------------------------------------------------------------------------ */
/* Random numbers and sampling */

static uint64_t splitmix64(uint64_t *state)
{
    uint64_t z = (*state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* Uniform double in [0, 1). */
static double uniform(uint64_t *state)
{
    return (double)(splitmix64(state) >> 11) * (1.0 / 9007199254740992.0);
}

static int32_t argmax(const float *x, int V)
{
    int32_t best = 0;
    for (int i = 1; i < V; i++) {
        if (x[i] > x[best]) {
            best = i;
        }
    }
    return best;
}

/* Sorts candidate ids by probability, largest first (ties by id). qsort passes
 * the comparator no context, so the probabilities go through this variable. It
 * is thread-local because two Engines may sample in two threads at once. */
static _Thread_local const float *sort_probs;
static int compare_by_prob(const void *a, const void *b)
{
    float pa = sort_probs[*(const int32_t *)a], pb = sort_probs[*(const int32_t *)b];
    if (pa != pb) {
        return pa > pb ? -1 : 1;
    }
    return *(const int32_t *)a - *(const int32_t *)b;
}

/* Draws one token id from logits (V) under the options. probs (V) and ids (V)
 * are scratch. */
static int32_t sample_token(const float *logits, int V, const GenerateOptions *o,
                            uint64_t *rng, float *probs, int32_t *ids)
{
    if (!(o->temperature > 0.0f)) {
        return argmax(logits, V);
    }

    /* p_i proportional to exp((logit_i - max) / temperature) */
    float max_logit = logits[argmax(logits, V)];
    for (int i = 0; i < V; i++) {
        probs[i] = expf((logits[i] - max_logit) / o->temperature);
        ids[i] = i;
    }

    /* candidates sorted by probability; top_k keeps the first k */
    int count = V;
    int need_sort = (o->top_k > 0 && o->top_k < V) || o->top_p < 1.0f;
    if (need_sort) {
        sort_probs = probs;
        qsort(ids, (size_t)V, sizeof(int32_t), compare_by_prob);
        if (o->top_k > 0 && o->top_k < V) {
            count = o->top_k;
        }
    }
    double total = 0.0;
    for (int i = 0; i < count; i++) {
        total += probs[ids[i]];
    }

    /* top_p: the shortest prefix whose probability reaches top_p of the total */
    if (o->top_p < 1.0f) {
        double kept = 0.0;
        int keep = 0;
        while (keep < count) {
            kept += probs[ids[keep]];
            keep++;
            if (kept >= o->top_p * total) {
                break;
            }
        }
        count = keep;
        total = kept;
    }

    double u = uniform(rng) * total, acc = 0.0;
    for (int i = 0; i < count; i++) {
        acc += probs[ids[i]];
        if (u < acc) {
            return ids[i];
        }
    }
    return ids[count - 1];
}

/* ------------------------------------------------------------------------ */
/* One model step over Tq new tokens per row */

typedef struct {
    int B, Tmax;
    float *kv;               /* (L, 2, B, Tmax, NKV, HS) */
    int32_t *cache_mask;     /* (B, Tmax) */
    float *x, *y;            /* (B*Tq_max, C) block input/output */
    float *embed;            /* (B*Tq_max, E) */
    float *cos, *sin;        /* (B*Tq_max, HS/2) */
    float *layer;            /* one block's activations */
    float *last, *fn, *fn_mean, *fn_rstd, *proj;  /* (B,C), (B,C), (B), (B), (B,E) */
    float *logits;           /* (B,V) */
} DecodeState;

/* Runs tokens (B,Tq) at positions (B,Tq) through the model, appending to the
 * cache at rows [q_offset, q_offset+Tq), and leaves the logits of each row's
 * last position in s->logits. */
static void decode_step(Model *m, float *const *P, DecodeState *s, const int32_t *tokens,
                        const int32_t *positions, int Tq, int q_offset, int use_lora)
{
    const ModelConfig *c = &m->cfg;
    int B = s->B, N = B * Tq, H2 = c->HS / 2;

    /* embeddings, as in model_forward */
    embedding_forward(s->embed, tokens, P[P_EMBED_TOKENS], N, c->E);
    if (c->E != c->C) {
        linear_forward(s->x, s->embed, P[P_PROJECT_IN], NULL, N, c->E, c->C, 0);
    } else {
        memcpy(s->x, s->embed, (size_t)N * c->C * sizeof(float));
    }
    if (!c->rope) {
        const float *wpe = P[P_EMBED_POSITIONS];
        for (int n = 0; n < N; n++) {
            const float *row = wpe + (size_t)(positions[n] + c->position_offset) * c->C;
            for (int i = 0; i < c->C; i++) {
                s->x[(size_t)n * c->C + i] += row[i];
            }
        }
    } else {
        for (int n = 0; n < N; n++) {
            for (int i = 0; i < H2; i++) {
                float angle = (float)positions[n] * m->inv_freq[i];
                s->cos[(size_t)n * H2 + i] = cosf(angle);
                s->sin[(size_t)n * H2 + i] = sinf(angle);
            }
        }
    }

    /* blocks, each appending its keys and values to its slice of the cache */
    LayerActs la;
    layer_layout(c, (size_t)N, (size_t)B, (size_t)Tq, (size_t)s->Tmax, s->layer, &la);
    size_t cache_floats = (size_t)B * s->Tmax * c->NKV * c->HS;
    for (int l = 0; l < c->L; l++) {
        BlockRun run = {
            .B = B, .Tq = Tq, .Tk = s->Tmax, .q_offset = q_offset,
            .x = s->x, .out = s->y, .rope_cos = s->cos, .rope_sin = s->sin,
            .key_mask = s->cache_mask,
            .k_cache = s->kv + (size_t)l * 2 * cache_floats,
            .v_cache = s->kv + ((size_t)l * 2 + 1) * cache_floats,
        };
        block_forward(c, block_params(m, P, l), l, use_lora, &la, &run);
        float *swap = s->x;
        s->x = s->y;
        s->y = swap;
    }

    /* last position of each row -> final norm -> project_out -> LM head */
    for (int b = 0; b < B; b++) {
        memcpy(s->last + (size_t)b * c->C, s->x + ((size_t)b * Tq + Tq - 1) * c->C,
               (size_t)c->C * sizeof(float));
    }
    const float *head_in = s->last;
    if (c->final_norm) {
        norm_forward(c, s->fn, s->fn_mean, s->fn_rstd, s->last, P[P_NORM_W], P[P_NORM_B], B);
        head_in = s->fn;
    }
    if (c->E != c->C) {
        linear_forward(s->proj, head_in, P[P_PROJECT_OUT], NULL, B, c->C, c->E, 0);
        head_in = s->proj;
    }
    const float *w_head = c->tied ? P[P_EMBED_TOKENS] : P[P_LM_HEAD];
    linear_forward(s->logits, head_in, w_head, NULL, B, c->E, c->V, 0);
}

/* ------------------------------------------------------------------------ */

static int is_stop(int32_t token, const GenerateOptions *o)
{
    for (int i = 0; i < o->num_stop; i++) {
        if (o->stop_ids[i] == token) {
            return 1;
        }
    }
    return 0;
}

int model_generate(Model *m, float *const *P, const int32_t *prompt,
                   const int32_t *prompt_mask, int B, int Tp, int max_new,
                   const GenerateOptions *opt, int32_t *out_tokens, int32_t *out_lengths)
{
    const ModelConfig *c = &m->cfg;
    int Tmax = Tp + max_new;
    size_t NP = (size_t)B * Tp;
    size_t layer_floats = layer_layout(c, NP, (size_t)B, (size_t)Tp, (size_t)Tmax, NULL, NULL);
    size_t floats = (size_t)c->L * 2 * B * Tmax * c->NKV * c->HS /* cache */
                    + 2 * NP * c->C                             /* x, y */
                    + NP * c->E                                 /* embed */
                    + 2 * NP * (c->HS / 2)                      /* cos, sin */
                    + layer_floats
                    + 2 * (size_t)B * c->C + 2 * (size_t)B + (size_t)B * c->E /* head */
                    + (size_t)B * c->V                          /* logits */
                    + (size_t)c->V;                             /* sampling probs */
    size_t ints = (size_t)B * Tmax /* cache mask */ + 2 * NP /* positions, step tokens */
                  + (size_t)B /* next position */ + (size_t)c->V /* sampling ids */;

    float *arena = malloc(floats * sizeof(float));
    int32_t *iarena = calloc(ints, sizeof(int32_t));
    int32_t *finished = calloc((size_t)B, sizeof(int32_t));
    uint64_t *rng = malloc((size_t)B * sizeof(uint64_t));
    if (arena == NULL || iarena == NULL || finished == NULL || rng == NULL) {
        free(arena);
        free(iarena);
        free(finished);
        free(rng);
        return -1;
    }

    DecodeState s = {.B = B, .Tmax = Tmax};
    float *p = arena;
    s.kv = p; p += (size_t)c->L * 2 * B * Tmax * c->NKV * c->HS;
    s.x = p; p += NP * c->C;
    s.y = p; p += NP * c->C;
    s.embed = p; p += NP * c->E;
    s.cos = p; p += NP * (c->HS / 2);
    s.sin = p; p += NP * (c->HS / 2);
    s.layer = p; p += layer_floats;
    s.last = p; p += (size_t)B * c->C;
    s.fn = p; p += (size_t)B * c->C;
    s.fn_mean = p; p += B;
    s.fn_rstd = p; p += B;
    s.proj = p; p += (size_t)B * c->E;
    s.logits = p; p += (size_t)B * c->V;
    float *probs = p;

    int32_t *ip = iarena;
    s.cache_mask = ip; ip += (size_t)B * Tmax;
    int32_t *positions = ip; ip += NP;
    int32_t *step_tokens = ip; ip += NP;
    int32_t *next_position = ip; ip += B;
    int32_t *ids = ip;

    /* prefill: positions count real tokens only, so left padding does not shift them */
    for (int b = 0; b < B; b++) {
        int count = 0;
        for (int t = 0; t < Tp; t++) {
            int real = prompt_mask[(size_t)b * Tp + t] != 0;
            s.cache_mask[(size_t)b * Tmax + t] = real;
            positions[(size_t)b * Tp + t] = real ? count : (count > 0 ? count - 1 : 0);
            count += real;
        }
        next_position[b] = count;
        rng[b] = opt->seed ^ (0xD1B54A32D192ED03ULL * (uint64_t)(b + 1));
        out_lengths[b] = 0;
    }
    decode_step(m, P, &s, prompt, positions, Tp, 0, opt->use_lora);

    for (int step = 0; step < max_new; step++) {
        int active = 0;
        for (int b = 0; b < B; b++) {
            int32_t token = opt->pad_id;
            if (!finished[b]) {
                token = sample_token(s.logits + (size_t)b * c->V, c->V, opt, &rng[b], probs, ids);
                out_lengths[b] = step + 1;
                if (is_stop(token, opt)) {
                    finished[b] = 1;
                }
            }
            out_tokens[(size_t)b * max_new + step] = token;
            step_tokens[b] = token;
            active += !finished[b];
        }
        if (active == 0 || step == max_new - 1) {
            for (int b = 0; b < B; b++) {
                for (int t = step + 1; t < max_new; t++) {
                    out_tokens[(size_t)b * max_new + t] = opt->pad_id;
                }
            }
            break;
        }

        /* feed the new token of every row; finished rows feed padding whose output is ignored */
        int q_offset = Tp + step;
        for (int b = 0; b < B; b++) {
            s.cache_mask[(size_t)b * Tmax + q_offset] = 1;
            positions[b] = next_position[b] < c->max_positions ? next_position[b]
                                                                 : c->max_positions - 1;
            next_position[b]++;
        }
        decode_step(m, P, &s, step_tokens, positions, 1, q_offset, opt->use_lora);
    }

    free(arena);
    free(iarena);
    free(finished);
    free(rng);
    return 0;
}
