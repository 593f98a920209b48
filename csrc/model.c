/*
 * model.c: forward and backward passes of skupy's decoder-only transformer.
 *
 * One config covers three families (see model.h):
 *   LLaMA  RMSNorm, RoPE, SwiGLU MLP, grouped-query attention, no biases.
 *   GPT-2  LayerNorm, learned positions, GELU (tanh) MLP, biases, tied head.
 *   OPT    LayerNorm, learned positions offset by 2, ReLU MLP, biases,
 *          pre-norm or post-norm blocks, optional project_in/project_out.
 *
 * A pre-norm block computes
 *   r1 = x + o_proj(attention(norm1(x)))
 *   r2 = r1 + down_proj(act(norm2(r1)))          -> next block's x
 * and a post-norm block (OPT-350m)
 *   mid = norm1(x + o_proj(attention(x)))
 *   out = norm2(mid + down_proj(act(mid)))       -> next block's x
 * Each linear layer may carry a LoRA delta: y += (alpha/R) * (x A^T) B^T.
 *
 * Backward mirrors the forward block by block. Every gradient accumulates,
 * so tied embeddings and residual branches need no special handling.
 */
#include "model.h"

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "blas.h"
#include "ops.h"

#define N_ROWS(m) ((size_t)(m)->B * (size_t)(m)->T)

/* ------------------------------------------------------------------------ */
/* Config and parameter slots */

static int linear_used(const ModelConfig *c, int which)
{
    return which != LIN_GATE || c->act == ACT_SWIGLU;
}

static int lora_used(const ModelConfig *c, int which)
{
    return c->lora_rank > 0 && linear_used(c, which) && (c->lora_targets & (1 << which));
}

static int linear_has_bias(const ModelConfig *c, int which)
{
    switch (which) {
    case LIN_Q: case LIN_K: case LIN_V: return c->attn_bias;
    case LIN_O: return c->attn_out_bias;
    case LIN_GATE: return 0;
    default: return c->mlp_bias;
    }
}

/* (out, in) features of each linear layer of a block. */
static void linear_dims(const ModelConfig *c, int which, int *out, int *in)
{
    int qw = c->NH * c->HS, kvw = c->NKV * c->HS;
    switch (which) {
    case LIN_Q: *out = qw; *in = c->C; break;
    case LIN_K: case LIN_V: *out = kvw; *in = c->C; break;
    case LIN_O: *out = c->C; *in = qw; break;
    case LIN_GATE: case LIN_UP: *out = c->F; *in = c->C; break;
    default: *out = c->C; *in = c->F; break;
    }
}

static const char *LINEAR_NAMES[NUM_LINEAR] = {
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};

int model_max_slots(const ModelConfig *cfg)
{
    return NUM_GLOBAL_SLOTS + cfg->L * NUM_LAYER_SLOTS;
}

static void add_spec(ParamSpec *specs, int *count, int slot, const char *name, int ndim,
                     long d0, long d1)
{
    ParamSpec *s = &specs[(*count)++];
    s->slot = slot;
    snprintf(s->name, sizeof s->name, "%s", name);
    s->ndim = ndim;
    s->shape[0] = d0;
    s->shape[1] = d1;
}

/* The order here must match skupy/layout.py: tests/test_model.py checks it. */
int model_param_specs(const ModelConfig *c, ParamSpec *specs)
{
    int n = 0;
    int layernorm = c->norm == NORM_LAYER;
    char name[64];

    add_spec(specs, &n, P_EMBED_TOKENS, "embed_tokens.weight", 2, c->V, c->E);
    if (!c->rope) {
        add_spec(specs, &n, P_EMBED_POSITIONS, "embed_positions.weight", 2,
                 c->max_positions + c->position_offset, c->C);
    }
    if (c->E != c->C) {
        add_spec(specs, &n, P_PROJECT_IN, "project_in.weight", 2, c->C, c->E);
        add_spec(specs, &n, P_PROJECT_OUT, "project_out.weight", 2, c->E, c->C);
    }
    if (c->final_norm) {
        add_spec(specs, &n, P_NORM_W, "norm.weight", 1, c->C, 0);
        if (layernorm) {
            add_spec(specs, &n, P_NORM_B, "norm.bias", 1, c->C, 0);
        }
    }
    if (!c->tied) {
        add_spec(specs, &n, P_LM_HEAD, "lm_head.weight", 2, c->V, c->E);
    }

    static const int attn_order[] = {LIN_Q, LIN_K, LIN_V, LIN_O};
    static const int mlp_order[] = {LIN_GATE, LIN_UP, LIN_DOWN};
    for (int l = 0; l < c->L; l++) {
        snprintf(name, sizeof name, "layers.%d.attn_norm.weight", l);
        add_spec(specs, &n, SLOT_LAYER(l, PL_ATTN_NORM_W), name, 1, c->C, 0);
        if (layernorm) {
            snprintf(name, sizeof name, "layers.%d.attn_norm.bias", l);
            add_spec(specs, &n, SLOT_LAYER(l, PL_ATTN_NORM_B), name, 1, c->C, 0);
        }
        for (int i = 0; i < 7; i++) {
            if (i == 4) {
                snprintf(name, sizeof name, "layers.%d.mlp_norm.weight", l);
                add_spec(specs, &n, SLOT_LAYER(l, PL_MLP_NORM_W), name, 1, c->C, 0);
                if (layernorm) {
                    snprintf(name, sizeof name, "layers.%d.mlp_norm.bias", l);
                    add_spec(specs, &n, SLOT_LAYER(l, PL_MLP_NORM_B), name, 1, c->C, 0);
                }
            }
            int which = i < 4 ? attn_order[i] : mlp_order[i - 4];
            if (!linear_used(c, which)) {
                continue;
            }
            int out, in;
            linear_dims(c, which, &out, &in);
            snprintf(name, sizeof name, "layers.%d.%s.weight", l, LINEAR_NAMES[which]);
            add_spec(specs, &n, SLOT_LAYER(l, PL_WEIGHT + which), name, 2, out, in);
            if (linear_has_bias(c, which)) {
                snprintf(name, sizeof name, "layers.%d.%s.bias", l, LINEAR_NAMES[which]);
                add_spec(specs, &n, SLOT_LAYER(l, PL_BIAS + which), name, 1, out, 0);
            }
        }
        for (int which = 0; which < NUM_LINEAR; which++) {
            if (!lora_used(c, which)) {
                continue;
            }
            int out, in;
            linear_dims(c, which, &out, &in);
            snprintf(name, sizeof name, "layers.%d.%s.lora_A", l, LINEAR_NAMES[which]);
            add_spec(specs, &n, SLOT_LAYER(l, PL_LORA_A + which), name, 2, c->lora_rank, in);
            snprintf(name, sizeof name, "layers.%d.%s.lora_B", l, LINEAR_NAMES[which]);
            add_spec(specs, &n, SLOT_LAYER(l, PL_LORA_B + which), name, 2, out, c->lora_rank);
        }
    }
    return n;
}

int model_init(Model *m, const ModelConfig *cfg, char *err, size_t errlen)
{
    memset(m, 0, sizeof *m);
    const ModelConfig *c = cfg;
    if (c->V <= 0 || c->C <= 0 || c->E <= 0 || c->L <= 0 || c->NH <= 0 || c->NKV <= 0 ||
        c->HS <= 0 || c->F <= 0 || c->max_positions <= 0) {
        snprintf(err, errlen, "all sizes (vocab_size, hidden_size, num_layers, heads, "
                              "head_dim, intermediate_size, max_position_embeddings) must be positive");
        return -1;
    }
    if (c->NH % c->NKV != 0) {
        snprintf(err, errlen, "num_heads=%d must be a multiple of num_kv_heads=%d", c->NH, c->NKV);
        return -1;
    }
    if (c->rope && c->HS % 2 != 0) {
        snprintf(err, errlen, "head_dim=%d must be even for rotary embeddings", c->HS);
        return -1;
    }
    if (c->lora_rank < 0 || c->position_offset < 0 || !(c->norm_eps > 0.0f)) {
        snprintf(err, errlen, "lora_rank and position_offset must be >= 0 and norm_eps > 0");
        return -1;
    }
    /* Slot numbers, linear widths and the position table size are computed in int. */
    if ((long long)c->L * NUM_LAYER_SLOTS + NUM_GLOBAL_SLOTS > INT_MAX ||
        (long long)c->NH * c->HS > INT_MAX ||
        (long long)c->max_positions + c->position_offset > INT_MAX) {
        snprintf(err, errlen, "sizes too large: num_layers * %d, num_heads * head_dim and "
                              "max_position_embeddings + position_offset must each fit in an int",
                 NUM_LAYER_SLOTS);
        return -1;
    }
    m->cfg = *cfg;
    m->num_slots = model_max_slots(cfg);
    m->slot_bf16 = calloc((size_t)m->num_slots, 1);
    m->block_slots = calloc((size_t)m->num_slots, sizeof(float *));
    if (m->slot_bf16 == NULL || m->block_slots == NULL) {
        free(m->slot_bf16);
        free(m->block_slots);
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    if (c->rope) {
        m->inv_freq = calloc((size_t)c->HS / 2, sizeof(float));
        if (m->inv_freq == NULL) {
            snprintf(err, errlen, "out of memory");
            return -1;
        }
        /* Default RoPE frequencies for theta = 10000; Python sets the real ones. */
        for (int i = 0; i < c->HS / 2; i++) {
            m->inv_freq[i] = 1.0f / powf(10000.0f, (float)(2 * i) / (float)c->HS);
        }
    }
    return 0;
}

void model_free(Model *m)
{
    free(m->slot_bf16);
    free(m->block_slots);
    free(m->block_weights);
    free(m->acts);
    free(m->grads);
    free(m->tokens);
    free(m->inv_freq);
    memset(m, 0, sizeof *m);
}

void model_set_inv_freq(Model *m, const float *inv_freq)
{
    if (m->inv_freq != NULL) {
        memcpy(m->inv_freq, inv_freq, (size_t)(m->cfg.HS / 2) * sizeof(float));
    }
}

/* ------------------------------------------------------------------------ */
/* Activation layout */

size_t layer_layout(const ModelConfig *c, size_t N, size_t B, size_t Tq, size_t Tk, float *base,
                    LayerActs *la)
{
    size_t used = 0;
    LayerActs dummy;
    if (la == NULL) {
        la = &dummy;
    }
    memset(la, 0, sizeof *la);
#define TAKE(ptr, count)                               \
    do {                                               \
        (ptr) = base != NULL ? base + used : NULL;     \
        used += (size_t)(count);                       \
    } while (0)

    size_t qw = (size_t)c->NH * c->HS, kvw = (size_t)c->NKV * c->HS;
    if (c->pre_norm) {
        TAKE(la->n1, N * c->C);
        TAKE(la->n1_mean, N);
        TAKE(la->n1_rstd, N);
    }
    TAKE(la->q, N * qw);
    TAKE(la->k, N * kvw);
    TAKE(la->v, N * kvw);
    TAKE(la->att, B * c->NH * Tq * Tk);
    TAKE(la->atty, N * qw);
    TAKE(la->r1, N * c->C);
    if (c->pre_norm) {
        TAKE(la->n2, N * c->C);
        TAKE(la->n2_mean, N);
        TAKE(la->n2_rstd, N);
    } else {
        TAKE(la->mid, N * c->C);
        TAKE(la->mid_mean, N);
        TAKE(la->mid_rstd, N);
        TAKE(la->r2, N * c->C);
        TAKE(la->out_mean, N);
        TAKE(la->out_rstd, N);
    }
    TAKE(la->fc, N * c->F);
    if (c->act == ACT_SWIGLU) {
        TAKE(la->up, N * c->F);
    }
    TAKE(la->act, N * c->F);
    for (int which = 0; which < NUM_LINEAR; which++) {
        if (lora_used(c, which)) {
            TAKE(la->lora[which], N * c->lora_rank);
        }
    }
#undef TAKE
    return used;
}

/* Backward scratch for one block plus the head and embedding. */
typedef struct {
    float *dres;           /* (N,C) gradient of the residual stream */
    float *tA, *tB, *tC;   /* (N,C) temporaries */
    float *dq, *dk, *dv, *datty;
    float *datt;           /* (B*NH*T) attention backward scratch */
    float *dfc, *dup, *dact;
    float *dlora;          /* (N,R) */
    float *dE;             /* (N,E) gradient at the embedding / project_out width */
    float *dhead;          /* (R,E) gradient of the gathered LM head input */
} GradScratch;

static size_t grad_layout(const ModelConfig *c, size_t N, size_t B, size_t T, float *base,
                          GradScratch *g)
{
    size_t used = 0;
    GradScratch dummy;
    if (g == NULL) {
        g = &dummy;
    }
#define TAKE(ptr, count)                               \
    do {                                               \
        (ptr) = base != NULL ? base + used : NULL;     \
        used += (size_t)(count);                       \
    } while (0)
    size_t qw = (size_t)c->NH * c->HS, kvw = (size_t)c->NKV * c->HS;
    TAKE(g->dres, N * c->C);
    TAKE(g->tA, N * c->C);
    TAKE(g->tB, N * c->C);
    TAKE(g->tC, N * c->C);
    TAKE(g->dq, N * qw);
    TAKE(g->dk, N * kvw);
    TAKE(g->dv, N * kvw);
    TAKE(g->datty, N * qw);
    TAKE(g->datt, B * c->NH * T);
    TAKE(g->dfc, N * c->F);
    TAKE(g->dup, N * c->F);
    TAKE(g->dact, N * c->F);
    TAKE(g->dlora, N * (c->lora_rank > 0 ? c->lora_rank : 1));
    TAKE(g->dE, N * c->E);
    TAKE(g->dhead, N * c->E);
#undef TAKE
    return used;
}

int model_reserve(Model *m, int B, int T)
{
    const ModelConfig *c = &m->cfg;
    size_t N = (size_t)B * T;
    size_t per_layer = layer_layout(c, N, B, T, T, NULL, NULL);
    size_t stored_layers = c->recompute ? 1 : (size_t)c->L;
    size_t need = N * c->E                    /* embed */
                  + (size_t)(c->L + 1) * N * c->C  /* resid */
                  + N * c->C + 2 * N         /* final norm */
                  + N * c->E                 /* project_out */
                  + N * (size_t)c->V         /* logits, R <= N rows */
                  + N * c->E                 /* gathered LM head input */
                  + 2 * N * (size_t)(c->HS / 2) /* rope tables */
                  + stored_layers * per_layer;
    size_t grad_need = grad_layout(c, N, B, T, NULL, NULL);

    if (need > m->acts_capacity) {
        float *acts = malloc(need * sizeof(float));
        if (acts == NULL) {
            return -1;
        }
        free(m->acts);
        m->acts = acts;
        m->acts_capacity = need;
    }
    if (grad_need > m->grads_capacity) {
        float *grads = malloc(grad_need * sizeof(float));
        if (grads == NULL) {
            return -1;
        }
        free(m->grads);
        m->grads = grads;
        m->grads_capacity = grad_need;
    }
    if (N > m->rows_capacity) {
        int32_t *ints = malloc(4 * N * sizeof(int32_t));
        if (ints == NULL) {
            return -1;
        }
        free(m->tokens);
        m->tokens = ints;
        m->rows_capacity = N;
    }
    m->B = B;
    m->T = T;
    m->positions = m->tokens + N;
    m->mask = m->tokens + 2 * N;
    m->head_rows = m->tokens + 3 * N;

    float *p = m->acts;
    m->embed = p; p += N * c->E;
    m->resid = p; p += (size_t)(c->L + 1) * N * c->C;
    m->fn = p; p += N * c->C;
    m->fn_mean = p; p += N;
    m->fn_rstd = p; p += N;
    m->proj = p; p += N * c->E;
    m->logits = p; p += N * (size_t)c->V;
    m->head_in = p; p += N * c->E;
    m->rope_cos = p; p += N * (size_t)(c->HS / 2);
    m->rope_sin = p; p += N * (size_t)(c->HS / 2);
    m->layer_store = p;
    m->layer_floats = per_layer;
    return 0;
}

static void layer_acts(Model *m, int l, LayerActs *la)
{
    size_t index = m->cfg.recompute ? 0 : (size_t)l;
    layer_layout(&m->cfg, N_ROWS(m), m->B, m->T, m->T, m->layer_store + index * m->layer_floats, la);
}

/* ------------------------------------------------------------------------ */
/* Small helpers: norms by type, linear layers with optional LoRA */

void norm_forward(const ModelConfig *c, float *out, float *mean, float *rstd,
                         const float *inp, const float *w, const float *b, int N)
{
    if (c->norm == NORM_RMS) {
        rmsnorm_forward(out, rstd, inp, w, N, c->C, c->norm_eps);
    } else {
        layernorm_forward(out, mean, rstd, inp, w, b, N, c->C, c->norm_eps);
    }
}

static void norm_backward(const ModelConfig *c, float *dinp, float *dw, float *db,
                          const float *dout, const float *inp, const float *w,
                          const float *mean, const float *rstd, int N)
{
    if (c->norm == NORM_RMS) {
        rmsnorm_backward(dinp, dw, dout, inp, w, rstd, N, c->C);
    } else {
        layernorm_backward(dinp, dw, db, dout, inp, w, mean, rstd, N, c->C);
    }
}

void block_linear_forward(const ModelConfig *c, float *const *P, int l, int which, int N,
                          float *out, const float *inp, float *lora_h, int use_lora)
{
    int OUT, IN;
    linear_dims(c, which, &OUT, &IN);
    linear_forward(out, inp, P[SLOT_LAYER(l, PL_WEIGHT + which)],
                   P[SLOT_LAYER(l, PL_BIAS + which)], N, IN, OUT, 0);
    if (use_lora && lora_used(c, which)) {
        int R = c->lora_rank;
        linear_forward(lora_h, inp, P[SLOT_LAYER(l, PL_LORA_A + which)], NULL, N, IN, R, 0);
        sk_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, OUT, R, c->lora_scale, lora_h, R,
                 P[SLOT_LAYER(l, PL_LORA_B + which)], R, 1.0f, out, OUT);
    }
}

/* Backward of block_linear_forward: dinp (N,IN) += dout W (+ LoRA path);
 * weight, bias and LoRA gradients accumulate where G has a buffer. */
static void block_linear_backward(Model *m, float *const *P, float *const *G, GradScratch *g,
                                  int l, int which, float *dinp, const float *dout,
                                  const float *inp, const float *lora_h)
{
    const ModelConfig *c = &m->cfg;
    int N = (int)N_ROWS(m), OUT, IN;
    linear_dims(c, which, &OUT, &IN);
    linear_backward(dinp, G[SLOT_LAYER(l, PL_WEIGHT + which)], G[SLOT_LAYER(l, PL_BIAS + which)],
                    dout, inp, P[SLOT_LAYER(l, PL_WEIGHT + which)], N, IN, OUT);
    if (m->lora_active && lora_used(c, which)) {
        int R = c->lora_rank;
        float s = c->lora_scale;
        const float *A = P[SLOT_LAYER(l, PL_LORA_A + which)];
        const float *Bm = P[SLOT_LAYER(l, PL_LORA_B + which)];
        float *dB = G[SLOT_LAYER(l, PL_LORA_B + which)];
        /* dB (OUT,R) += s * dout^T h */
        if (dB != NULL) {
            sk_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, OUT, R, N, s, dout, OUT, lora_h, R,
                     1.0f, dB, R);
        }
        /* dh (N,R) = s * dout B, then dA += dh^T inp and dinp += dh A */
        sk_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, R, OUT, s, dout, OUT, Bm, R, 0.0f,
                 g->dlora, R);
        linear_backward(dinp, G[SLOT_LAYER(l, PL_LORA_A + which)], NULL, g->dlora, inp, A, N, IN,
                        R);
    }
}

static void add_inplace(float *y, const float *x, size_t n)
{
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) {
        y[i] += x[i];
    }
}

/* ------------------------------------------------------------------------ */
/* One block, forward and backward */

void block_forward(const ModelConfig *c, float *const *P, int l, int use_lora,
                   const LayerActs *acts, const BlockRun *run)
{
    LayerActs la = *acts;
    int B = run->B, N = run->B * run->Tq;
    size_t NC = (size_t)N * c->C;
    const float *x = run->x;
    float *out = run->out;

    /* attention: q, k, v projections of the (normed) input, RoPE, causal attention */
    const float *attn_in = x;
    if (c->pre_norm) {
        norm_forward(c, la.n1, la.n1_mean, la.n1_rstd, x, P[SLOT_LAYER(l, PL_ATTN_NORM_W)],
                     P[SLOT_LAYER(l, PL_ATTN_NORM_B)], N);
        attn_in = la.n1;
    }
    block_linear_forward(c, P, l, LIN_Q, N, la.q, attn_in, la.lora[LIN_Q], use_lora);
    block_linear_forward(c, P, l, LIN_K, N, la.k, attn_in, la.lora[LIN_K], use_lora);
    block_linear_forward(c, P, l, LIN_V, N, la.v, attn_in, la.lora[LIN_V], use_lora);
    if (c->rope) {
        rope_forward(la.q, run->rope_cos, run->rope_sin, N, c->NH, c->HS, c->rope_interleaved);
        rope_forward(la.k, run->rope_cos, run->rope_sin, N, c->NKV, c->HS, c->rope_interleaved);
    }
    const float *keys = la.k, *values = la.v;
    if (run->k_cache != NULL) {
        /* decoding: append this step's keys and values at rows [q_offset, q_offset+Tq) */
        size_t row = (size_t)c->NKV * c->HS;
        for (int b = 0; b < B; b++) {
            size_t dst = ((size_t)b * run->Tk + run->q_offset) * row;
            size_t src = (size_t)b * run->Tq * row;
            memcpy(run->k_cache + dst, la.k + src, (size_t)run->Tq * row * sizeof(float));
            memcpy(run->v_cache + dst, la.v + src, (size_t)run->Tq * row * sizeof(float));
        }
        keys = run->k_cache;
        values = run->v_cache;
    }
    attention_forward(la.atty, la.att, la.q, keys, values, run->key_mask, B, run->Tq, run->Tk,
                      run->q_offset, c->NH, c->NKV, c->HS, 1.0f / sqrtf((float)c->HS));

    /* r1 = x + o_proj(atty); post-norm blocks normalize the sum */
    block_linear_forward(c, P, l, LIN_O, N, la.r1, la.atty, la.lora[LIN_O], use_lora);
    add_inplace(la.r1, x, NC);
    const float *h = la.r1;
    if (!c->pre_norm) {
        norm_forward(c, la.mid, la.mid_mean, la.mid_rstd, la.r1,
                     P[SLOT_LAYER(l, PL_ATTN_NORM_W)], P[SLOT_LAYER(l, PL_ATTN_NORM_B)], N);
        h = la.mid;
    }

    /* MLP: SwiGLU (silu(gate) * up) or fc1 + GELU/ReLU, then down_proj */
    const float *mlp_in = h;
    if (c->pre_norm) {
        norm_forward(c, la.n2, la.n2_mean, la.n2_rstd, h, P[SLOT_LAYER(l, PL_MLP_NORM_W)],
                     P[SLOT_LAYER(l, PL_MLP_NORM_B)], N);
        mlp_in = la.n2;
    }
    size_t NF = (size_t)N * c->F;
    if (c->act == ACT_SWIGLU) {
        block_linear_forward(c, P, l, LIN_GATE, N, la.fc, mlp_in, la.lora[LIN_GATE], use_lora);
        block_linear_forward(c, P, l, LIN_UP, N, la.up, mlp_in, la.lora[LIN_UP], use_lora);
        swiglu_forward(la.act, la.fc, la.up, NF);
    } else {
        block_linear_forward(c, P, l, LIN_UP, N, la.fc, mlp_in, la.lora[LIN_UP], use_lora);
        if (c->act == ACT_GELU_TANH) {
            gelu_tanh_forward(la.act, la.fc, NF);
        } else if (c->act == ACT_GELU) {
            gelu_exact_forward(la.act, la.fc, NF);
        } else {
            relu_forward(la.act, la.fc, NF);
        }
    }
    float *r2 = c->pre_norm ? out : la.r2;
    block_linear_forward(c, P, l, LIN_DOWN, N, r2, la.act, la.lora[LIN_DOWN], use_lora);
    add_inplace(r2, h, NC);
    if (!c->pre_norm) {
        norm_forward(c, out, la.out_mean, la.out_rstd, la.r2, P[SLOT_LAYER(l, PL_MLP_NORM_W)],
                     P[SLOT_LAYER(l, PL_MLP_NORM_B)], N);
    }
}

/* ------------------------------------------------------------------------ */
/* bfloat16 frozen weights */

size_t block_weights_floats(const ModelConfig *c)
{
    size_t total = 0;
    for (int which = 0; which < NUM_LINEAR; which++) {
        if (linear_used(c, which)) {
            int out, in;
            linear_dims(c, which, &out, &in);
            total += (size_t)out * in;
        }
    }
    return total;
}

/* bfloat16 is the top half of a float32, so widening is a 16-bit shift. */
static void bf16_to_f32(float *dst, const uint16_t *src, size_t n)
{
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) {
        uint32_t bits = (uint32_t)src[i] << 16;
        memcpy(&dst[i], &bits, sizeof bits);
    }
}

int model_prepare_bf16(Model *m)
{
    int any = 0;
    for (int i = 0; i < m->num_slots; i++) {
        any |= m->slot_bf16[i];
    }
    size_t need = block_weights_floats(&m->cfg);
    if (!any || need <= m->block_weights_capacity) {
        return 0;
    }
    float *buffer = malloc(need * sizeof(float));
    if (buffer == NULL) {
        return -1;
    }
    free(m->block_weights);
    m->block_weights = buffer;
    m->block_weights_capacity = need;
    return 0;
}

float *const *block_params(Model *m, float *const *P, int l)
{
    const ModelConfig *c = &m->cfg;
    int any = 0;
    for (int which = 0; which < NUM_LINEAR; which++) {
        any |= m->slot_bf16[SLOT_LAYER(l, PL_WEIGHT + which)];
    }
    if (!any) {
        return P;
    }
    memcpy(m->block_slots, P, (size_t)m->num_slots * sizeof(float *));
    float *next = m->block_weights;
    for (int which = 0; which < NUM_LINEAR; which++) {
        int slot = SLOT_LAYER(l, PL_WEIGHT + which);
        if (!linear_used(c, which) || !m->slot_bf16[slot]) {
            continue;
        }
        int out, in;
        linear_dims(c, which, &out, &in);
        bf16_to_f32(next, (const uint16_t *)P[slot], (size_t)out * in);
        m->block_slots[slot] = next;
        next += (size_t)out * in;
    }
    return m->block_slots;
}

/* Runs block l of the training forward on the batch stored in m. */
static void train_block_forward(Model *m, float *const *P, int l)
{
    const ModelConfig *c = &m->cfg;
    size_t NC = N_ROWS(m) * c->C;
    LayerActs la;
    layer_acts(m, l, &la);
    BlockRun run = {
        .B = m->B, .Tq = m->T, .Tk = m->T, .q_offset = 0,
        .x = m->resid + (size_t)l * NC, .out = m->resid + (size_t)(l + 1) * NC,
        .rope_cos = m->rope_cos, .rope_sin = m->rope_sin, .key_mask = m->mask,
        .k_cache = NULL, .v_cache = NULL,
    };
    block_forward(c, block_params(m, P, l), l, m->lora_active, &la, &run);
}

/* On entry g->dres holds d(block output); on exit d(block input). */
static void block_backward(Model *m, float *const *P, float *const *G, GradScratch *g, int l)
{
    const ModelConfig *c = &m->cfg;
    int N = (int)N_ROWS(m);
    size_t NC = (size_t)N * c->C, NF = (size_t)N * c->F;
    size_t qw = (size_t)c->NH * c->HS, kvw = (size_t)c->NKV * c->HS;
    const float *x = m->resid + (size_t)l * NC;
    LayerActs la;
    layer_acts(m, l, &la);

    /* post-norm: out = norm2(r2) */
    float *dr2 = g->dres;
    if (!c->pre_norm) {
        dr2 = g->tA;
        memset(dr2, 0, NC * sizeof(float));
        norm_backward(c, dr2, G[SLOT_LAYER(l, PL_MLP_NORM_W)], G[SLOT_LAYER(l, PL_MLP_NORM_B)],
                      g->dres, la.r2, P[SLOT_LAYER(l, PL_MLP_NORM_W)], la.out_mean, la.out_rstd,
                      N);
    }

    /* r2 = h + down_proj(act(...)) */
    memset(g->dact, 0, NF * sizeof(float));
    block_linear_backward(m, P, G, g, l, LIN_DOWN, g->dact, dr2, la.act, la.lora[LIN_DOWN]);
    memset(g->dfc, 0, NF * sizeof(float));
    const float *h = c->pre_norm ? la.r1 : la.mid;
    const float *mlp_in = c->pre_norm ? la.n2 : h;
    float *dmlp_in = g->tB;
    memset(dmlp_in, 0, NC * sizeof(float));
    if (c->act == ACT_SWIGLU) {
        memset(g->dup, 0, NF * sizeof(float));
        swiglu_backward(g->dfc, g->dup, g->dact, la.fc, la.up, NF);
        block_linear_backward(m, P, G, g, l, LIN_GATE, dmlp_in, g->dfc, mlp_in, la.lora[LIN_GATE]);
        block_linear_backward(m, P, G, g, l, LIN_UP, dmlp_in, g->dup, mlp_in, la.lora[LIN_UP]);
    } else {
        if (c->act == ACT_GELU_TANH) {
            gelu_tanh_backward(g->dfc, la.fc, g->dact, NF);
        } else if (c->act == ACT_GELU) {
            gelu_exact_backward(g->dfc, la.fc, g->dact, NF);
        } else {
            relu_backward(g->dfc, la.fc, g->dact, NF);
        }
        block_linear_backward(m, P, G, g, l, LIN_UP, dmlp_in, g->dfc, mlp_in, la.lora[LIN_UP]);
    }

    /* dh = dr2 (residual) + the MLP input path; accumulated into dr2 */
    float *dh = dr2;
    if (c->pre_norm) {
        norm_backward(c, dh, G[SLOT_LAYER(l, PL_MLP_NORM_W)], G[SLOT_LAYER(l, PL_MLP_NORM_B)],
                      dmlp_in, la.r1, P[SLOT_LAYER(l, PL_MLP_NORM_W)], la.n2_mean, la.n2_rstd, N);
    } else {
        add_inplace(dh, dmlp_in, NC);
    }

    /* post-norm: h = norm1(r1) */
    float *dr1 = dh;
    if (!c->pre_norm) {
        dr1 = g->tC;
        memset(dr1, 0, NC * sizeof(float));
        norm_backward(c, dr1, G[SLOT_LAYER(l, PL_ATTN_NORM_W)], G[SLOT_LAYER(l, PL_ATTN_NORM_B)],
                      dh, la.r1, P[SLOT_LAYER(l, PL_ATTN_NORM_W)], la.mid_mean, la.mid_rstd, N);
    }

    /* r1 = x + o_proj(atty) */
    memset(g->datty, 0, (size_t)N * qw * sizeof(float));
    block_linear_backward(m, P, G, g, l, LIN_O, g->datty, dr1, la.atty, la.lora[LIN_O]);
    memset(g->dq, 0, (size_t)N * qw * sizeof(float));
    memset(g->dk, 0, (size_t)N * kvw * sizeof(float));
    memset(g->dv, 0, (size_t)N * kvw * sizeof(float));
    attention_backward(g->dq, g->dk, g->dv, g->datt, g->datty, la.att, la.q, la.k, la.v, m->B,
                       m->T, c->NH, c->NKV, c->HS, 1.0f / sqrtf((float)c->HS));
    if (c->rope) {
        rope_backward(g->dq, m->rope_cos, m->rope_sin, N, c->NH, c->HS, c->rope_interleaved);
        rope_backward(g->dk, m->rope_cos, m->rope_sin, N, c->NKV, c->HS, c->rope_interleaved);
    }
    const float *attn_in = c->pre_norm ? la.n1 : x;
    float *dattn_in = g->tB;
    memset(dattn_in, 0, NC * sizeof(float));
    block_linear_backward(m, P, G, g, l, LIN_Q, dattn_in, g->dq, attn_in, la.lora[LIN_Q]);
    block_linear_backward(m, P, G, g, l, LIN_K, dattn_in, g->dk, attn_in, la.lora[LIN_K]);
    block_linear_backward(m, P, G, g, l, LIN_V, dattn_in, g->dv, attn_in, la.lora[LIN_V]);

    /* dx = dr1 (residual) + the attention input path */
    float *dx = dr1;
    if (c->pre_norm) {
        norm_backward(c, dx, G[SLOT_LAYER(l, PL_ATTN_NORM_W)], G[SLOT_LAYER(l, PL_ATTN_NORM_B)],
                      dattn_in, x, P[SLOT_LAYER(l, PL_ATTN_NORM_W)], la.n1_mean, la.n1_rstd, N);
    } else {
        add_inplace(dx, dattn_in, NC);
    }
    if (dx != g->dres) {
        memcpy(g->dres, dx, NC * sizeof(float));
    }
}

/* ------------------------------------------------------------------------ */
/* Whole model */

/* The input of the LM head: project_out output, final norm output or last residual. */
static float *head_input(Model *m)
{
    const ModelConfig *c = &m->cfg;
    if (c->E != c->C) {
        return m->proj;
    }
    if (c->final_norm) {
        return m->fn;
    }
    return m->resid + (size_t)c->L * N_ROWS(m) * c->C;
}

/* Copies the head rows of src (N,E) into dst (R,E), or scatters them back when
 * gather is 0 (dst rows outside the head rows are left as they are). */
static void move_head_rows(float *dst, const float *src, const int32_t *rows, int R, int E,
                           int gather)
{
#pragma omp parallel for schedule(static)
    for (int r = 0; r < R; r++) {
        size_t n = (size_t)rows[r];
        if (gather) {
            memcpy(dst + (size_t)r * E, src + n * E, (size_t)E * sizeof(float));
        } else {
            memcpy(dst + n * E, src + (size_t)r * E, (size_t)E * sizeof(float));
        }
    }
}

/* The (R,E) rows the LM head reads: head_input itself when every row has
 * logits, else the gathered copy in m->head_in. */
static const float *head_rows_input(Model *m)
{
    return m->R == (int)N_ROWS(m) ? head_input(m) : m->head_in;
}

void model_forward(Model *m, float *const *P, const int32_t *tokens, const int32_t *positions,
                   const int32_t *mask, int B, int T, int use_lora, const int32_t *head_rows, int R)
{
    const ModelConfig *c = &m->cfg;
    size_t N = (size_t)B * T;
    m->B = B;
    m->T = T;
    m->lora_active = use_lora && c->lora_rank > 0;
    m->R = head_rows != NULL ? R : (int)N;
    if (head_rows != NULL) {
        memcpy(m->head_rows, head_rows, (size_t)R * sizeof(int32_t));
    }
    memcpy(m->tokens, tokens, N * sizeof(int32_t));
    memcpy(m->positions, positions, N * sizeof(int32_t));
    memcpy(m->mask, mask, N * sizeof(int32_t));

    /* rotation angles pos * inv_freq[i], in float32 as HF computes them */
    if (c->rope) {
        int H2 = c->HS / 2;
#pragma omp parallel for schedule(static)
        for (size_t n = 0; n < N; n++) {
            for (int i = 0; i < H2; i++) {
                float angle = (float)positions[n] * m->inv_freq[i];
                m->rope_cos[n * H2 + i] = cosf(angle);
                m->rope_sin[n * H2 + i] = sinf(angle);
            }
        }
    }

    /* token embedding, optional project_in, learned positions */
    float *x0 = m->resid;
    embedding_forward(m->embed, tokens, P[P_EMBED_TOKENS], (int)N, c->E);
    if (c->E != c->C) {
        linear_forward(x0, m->embed, P[P_PROJECT_IN], NULL, (int)N, c->E, c->C, 0);
    } else {
        memcpy(x0, m->embed, N * c->C * sizeof(float));
    }
    if (!c->rope) {
        const float *wpe = P[P_EMBED_POSITIONS];
#pragma omp parallel for schedule(static)
        for (size_t n = 0; n < N; n++) {
            const float *row = wpe + (size_t)(positions[n] + c->position_offset) * c->C;
            for (int i = 0; i < c->C; i++) {
                x0[n * c->C + i] += row[i];
            }
        }
    }

    for (int l = 0; l < c->L; l++) {
        train_block_forward(m, P, l);
    }

    /* final norm, optional project_out, LM head */
    float *last = m->resid + (size_t)c->L * N * c->C;
    if (c->final_norm) {
        norm_forward(c, m->fn, m->fn_mean, m->fn_rstd, last, P[P_NORM_W], P[P_NORM_B], (int)N);
        last = m->fn;
    }
    if (c->E != c->C) {
        linear_forward(m->proj, last, P[P_PROJECT_OUT], NULL, (int)N, c->C, c->E, 0);
    }
    /* LM head on the R head rows only: logits (R,V) = head_in (R,E) W^T */
    const float *w_head = c->tied ? P[P_EMBED_TOKENS] : P[P_LM_HEAD];
    if (m->R < (int)N) {
        move_head_rows(m->head_in, head_input(m), m->head_rows, m->R, c->E, 1);
    }
    linear_forward(m->logits, head_rows_input(m), w_head, NULL, m->R, c->E, c->V, 0);
}

void model_backward(Model *m, float *const *P, float *const *G)
{
    const ModelConfig *c = &m->cfg;
    int N = (int)N_ROWS(m);
    size_t NC = (size_t)N * c->C;
    GradScratch g;
    grad_layout(c, N, m->B, m->T, m->grads, &g);

    /* LM head: logits = head_in W^T, W tied to the embedding or separate */
    float *dW_head = c->tied ? G[P_EMBED_TOKENS] : G[P_LM_HEAD];
    const float *w_head = c->tied ? P[P_EMBED_TOKENS] : P[P_LM_HEAD];
    float *d_head_in = c->E != c->C ? g.dE : g.tA;
    memset(d_head_in, 0, (size_t)N * c->E * sizeof(float));
    if (m->R < N) {
        /* gradient of the gathered rows, then scattered; other rows stay zero */
        memset(g.dhead, 0, (size_t)m->R * c->E * sizeof(float));
        linear_backward(g.dhead, dW_head, NULL, m->logits, m->head_in, w_head, m->R, c->E, c->V);
        move_head_rows(d_head_in, g.dhead, m->head_rows, m->R, c->E, 0);
    } else {
        linear_backward(d_head_in, dW_head, NULL, m->logits, head_input(m), w_head, N, c->E, c->V);
    }

    float *dfn = d_head_in;
    if (c->E != c->C) {
        dfn = g.tA;
        memset(dfn, 0, NC * sizeof(float));
        const float *fn_out = c->final_norm ? m->fn : m->resid + (size_t)c->L * NC;
        linear_backward(dfn, G[P_PROJECT_OUT], NULL, g.dE, fn_out, P[P_PROJECT_OUT], N, c->C, c->E);
    }
    if (c->final_norm) {
        memset(g.dres, 0, NC * sizeof(float));
        norm_backward(c, g.dres, G[P_NORM_W], G[P_NORM_B], dfn, m->resid + (size_t)c->L * NC,
                      P[P_NORM_W], m->fn_mean, m->fn_rstd, N);
    } else {
        memcpy(g.dres, dfn, NC * sizeof(float));
    }

    for (int l = c->L - 1; l >= 0; l--) {
        if (c->recompute) {
            train_block_forward(m, P, l);
        }
        block_backward(m, block_params(m, P, l), G, &g, l);
    }

    /* learned positions and token embeddings (through project_in) */
    if (!c->rope && G[P_EMBED_POSITIONS] != NULL) {
        int32_t *rows = (int32_t *)g.datt; /* B*NH*T floats >= N ints */
        for (int n = 0; n < N; n++) {
            rows[n] = m->positions[n] + c->position_offset;
        }
        embedding_backward(G[P_EMBED_POSITIONS], g.dres, rows, N, c->C);
    }
    if (c->E != c->C) {
        memset(g.dE, 0, (size_t)N * c->E * sizeof(float));
        linear_backward(g.dE, G[P_PROJECT_IN], NULL, g.dres, m->embed, P[P_PROJECT_IN], N, c->E,
                        c->C);
        if (G[P_EMBED_TOKENS] != NULL) {
            embedding_backward(G[P_EMBED_TOKENS], g.dE, m->tokens, N, c->E);
        }
    } else if (G[P_EMBED_TOKENS] != NULL) {
        embedding_backward(G[P_EMBED_TOKENS], g.dres, m->tokens, N, c->E);
    }
}

void lora_merge(float *w, const float *a, const float *b, int OUT, int IN, int R, float scale)
{
    /* w (OUT,IN) += scale * b (OUT,R) @ a (R,IN) */
    sk_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, OUT, IN, R, scale, b, R, a, IN, 1.0f, w,
             IN);
}
