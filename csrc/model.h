/*
 * model.h: a config-driven decoder-only transformer (LLaMA, GPT-2, OPT) with
 * forward and backward passes over caller-owned parameter buffers.
 *
 * Ownership: parameters and their gradients are float32 buffers owned by the
 * caller (NumPy arrays in Python); the model only borrows pointers for the
 * duration of one call. Activations live in buffers the Model owns, sized once
 * per (B, T) and grown when a larger batch arrives.
 *
 * Shapes: B batch, T time, C channels (hidden size), E token-embedding width
 * (C except for some OPT models), V vocabulary, L layers, NH query heads, NKV
 * key/value heads, HS head size, F MLP width, R LoRA rank, N = B*T rows.
 */
#ifndef SKUPY_MODEL_H
#define SKUPY_MODEL_H

#include <stddef.h>
#include <stdint.h>

enum { NORM_RMS = 0, NORM_LAYER = 1 };
enum { ACT_SWIGLU = 0, ACT_GELU_TANH = 1, ACT_GELU = 2, ACT_RELU = 3 };

/* The linear layers of one block, in the order LoRA targets are numbered. */
enum { LIN_Q = 0, LIN_K, LIN_V, LIN_O, LIN_GATE, LIN_UP, LIN_DOWN, NUM_LINEAR };

typedef struct {
    int V, C, E, L, NH, NKV, HS, F;
    int max_positions;    /* positions must lie in [0, max_positions) */
    int position_offset;  /* learned position table row = position + offset (OPT: 2) */
    int norm;             /* NORM_RMS or NORM_LAYER */
    int act;              /* ACT_* */
    int rope;             /* 1: rotary embeddings; 0: learned position table */
    int rope_interleaved;
    int tied;             /* LM head shares embed_tokens.weight */
    int attn_bias, attn_out_bias, mlp_bias;
    int pre_norm;         /* 0: OPT-350m post-norm blocks */
    int final_norm;
    float norm_eps;
    int lora_rank;        /* R; 0 disables LoRA */
    float lora_scale;     /* alpha / R */
    int lora_targets;     /* bit (1 << LIN_*) set for each LoRA target */
    int recompute;        /* 1: keep only layer inputs, recompute the rest in backward */
} ModelConfig;

/* Parameter slots. Global slots come first, then NUM_LAYER_SLOTS per layer.
 * A slot the config does not use stays NULL and is absent from the list the
 * Python side passes (see model_param_count / model_param_slot). */
enum {
    P_EMBED_TOKENS = 0, P_EMBED_POSITIONS, P_PROJECT_IN, P_PROJECT_OUT,
    P_NORM_W, P_NORM_B, P_LM_HEAD, NUM_GLOBAL_SLOTS
};
enum {
    PL_ATTN_NORM_W = 0, PL_ATTN_NORM_B, PL_MLP_NORM_W, PL_MLP_NORM_B,
    PL_WEIGHT,                         /* + LIN_* : linear weights */
    PL_BIAS = PL_WEIGHT + NUM_LINEAR,  /* + LIN_* : linear biases */
    PL_LORA_A = PL_BIAS + NUM_LINEAR,  /* + LIN_* : LoRA A (R, in) */
    PL_LORA_B = PL_LORA_A + NUM_LINEAR,/* + LIN_* : LoRA B (out, R) */
    NUM_LAYER_SLOTS = PL_LORA_B + NUM_LINEAR
};
#define SLOT_LAYER(l, s) (NUM_GLOBAL_SLOTS + (l) * NUM_LAYER_SLOTS + (s))

/* Describes one used slot: its parameter name and shape (ndim 1 or 2). */
typedef struct {
    int slot;
    char name[64];
    int ndim;
    long shape[2];
} ParamSpec;

/* Activations of one block for one forward pass (pointers into Model.acts). */
typedef struct {
    float *n1, *n1_mean, *n1_rstd;   /* (N,C), (N), (N): norm before attention */
    float *q, *k, *v;                /* (N,NH*HS), (N,NKV*HS) x2, after RoPE */
    float *att;                      /* (B,NH,T,T) attention probabilities */
    float *atty;                     /* (N,NH*HS) attention output before o_proj */
    float *r1;                       /* (N,C) residual after attention */
    float *mid, *mid_mean, *mid_rstd;/* post-norm only: norm(r1) */
    float *n2, *n2_mean, *n2_rstd;   /* (N,C): norm before the MLP (pre-norm) */
    float *fc, *up, *act;            /* (N,F): gate or fc1, up (SwiGLU), activation */
    float *r2;                       /* (N,C) residual after the MLP */
    float *out_mean, *out_rstd;      /* post-norm only: stats of norm(r2) */
    float *lora[NUM_LINEAR];         /* (N,R) x @ A^T for LoRA targets */
} LayerActs;

typedef struct {
    ModelConfig cfg;
    int num_slots;
    /* Activation storage, sized for max_rows = B*T rows and T <= max_T. */
    int B, T;
    size_t acts_capacity, grads_capacity, rows_capacity;
    float *acts;       /* one buffer for everything below */
    float *grads;      /* backward scratch, one layer's worth */
    int32_t *tokens;   /* (N) copy of the batch */
    int32_t *positions;/* (N) */
    int32_t *mask;     /* (N) key padding mask, 1 = real token */
    float *rope_cos, *rope_sin;  /* (N, HS/2) */
    float *inv_freq;   /* (HS/2) set by model_set_inv_freq */
    float *embed;      /* (N,E) token embeddings (before project_in) */
    float *resid;      /* (L+1, N, C): input of each block and the final one */
    float *fn, *fn_mean, *fn_rstd;  /* (N,C): final norm */
    float *proj;       /* (N,E): project_out output */
    float *logits;     /* (R,V); the loss functions overwrite it with dlogits */
    int32_t *head_rows;/* (R) rows of the batch whose logits the LM head computes */
    int R;             /* number of head rows; R == B*T when every row has logits */
    float *head_in;    /* (R,E) LM head input gathered from the head rows */
    float *layer_store;/* per-layer activations, L blocks or one when recomputing */
    size_t layer_floats;
    int lora_active;   /* whether the last forward applied LoRA */
    /* bfloat16 storage of frozen block weights: slot_bf16[slot] != 0 marks a slot
     * whose pointer holds uint16 bfloat16 values (set by the caller per call).
     * block_params() expands one block's such weights into block_weights. */
    uint8_t *slot_bf16;        /* (num_slots) */
    float **block_slots;       /* (num_slots) pointer copy handed to one block */
    float *block_weights;      /* float32 copies of one block's bfloat16 weights */
    size_t block_weights_capacity;
} Model;

/* Returns 0, or -1 with a message in err (size errlen) when cfg is invalid. */
int model_init(Model *m, const ModelConfig *cfg, char *err, size_t errlen);
void model_free(Model *m);

/* Lists the used slots in the order the Python side passes parameters.
 * specs must hold model_max_slots(cfg) entries; returns the count. */
int model_max_slots(const ModelConfig *cfg);
int model_param_specs(const ModelConfig *cfg, ParamSpec *specs);

/* Sets RoPE inverse frequencies (HS/2 floats, copied). */
void model_set_inv_freq(Model *m, const float *inv_freq);

/* Makes room for a batch of B sequences of length T. Returns 0, or -1 when
 * memory cannot be allocated (the old buffers stay valid). */
int model_reserve(Model *m, int B, int T);

/* Forward pass. params: array of num_slots pointers (NULL for unused slots).
 * tokens, positions, mask: (B,T) int32, already validated (ids in [0,V),
 * positions in [0,max_positions)); model_reserve(m, B, T) must have succeeded.
 * use_lora: apply LoRA deltas when the config has them.
 * head_rows: NULL to compute logits for all N = B*T rows, or R strictly
 * increasing row indices in [0,N) (validated by the caller, copied): only
 * those rows go through the LM head, which is what a loss with zero weight
 * elsewhere needs. Leaves logits (R,V) in m->logits (R = N without head_rows)
 * and the activations backward needs. */
void model_forward(Model *m, float *const *params, const int32_t *tokens,
                   const int32_t *positions, const int32_t *mask, int B, int T,
                   int use_lora, const int32_t *head_rows, int R);

/* Backward pass from m->logits holding dlogits (R,V) (written by the loss
 * functions of ops.h); rows outside the head rows get no gradient. grads: num_slots pointers, NULL to skip a parameter.
 * Gradients accumulate (+=). Needs the same params as the forward. */
void model_backward(Model *m, float *const *params, float *const *grads);

/* ------------------------------------------------------------------------ */
/* Block-level pieces shared by model.c (training) and generate.c (decoding). */

/* Where one block reads its input and keys. Rows: N = B*Tq.
 * Training: Tk = Tq = T, q_offset = 0, k_cache = v_cache = NULL, and attention
 * reads the block's own keys. Decoding: the block appends its Tq new keys and
 * values to k_cache/v_cache (B,Tk,NKV,HS) at rows [q_offset, q_offset+Tq) and
 * attends over all Tk rows under key_mask (B,Tk). */
typedef struct {
    int B, Tq, Tk, q_offset;
    const float *x;        /* (N,C) block input */
    float *out;            /* (N,C) block output */
    const float *rope_cos, *rope_sin;  /* (N,HS/2) */
    const int32_t *key_mask;
    float *k_cache, *v_cache;
} BlockRun;

/* Carves one block's activations for N rows (att sized B*NH*Tq*Tk) from base,
 * or only counts when base is NULL. Returns the number of floats. */
size_t layer_layout(const ModelConfig *c, size_t N, size_t B, size_t Tq, size_t Tk, float *base,
                    LayerActs *la);
void block_forward(const ModelConfig *c, float *const *P, int l, int use_lora,
                   const LayerActs *acts, const BlockRun *run);
/* out (N,OUT) = inp (N,IN) W^T + b, plus scale * (inp A^T) B^T when use_lora and
 * the layer is a LoRA target; lora_h (N,R) keeps inp A^T for backward. */
void block_linear_forward(const ModelConfig *c, float *const *P, int l, int which, int N,
                          float *out, const float *inp, float *lora_h, int use_lora);
void norm_forward(const ModelConfig *c, float *out, float *mean, float *rstd, const float *inp,
                  const float *w, const float *b, int N);

/* Allocates m->block_weights when any slot is marked bfloat16 in
 * m->slot_bf16. Call after setting the flags and before a pass. Returns 0, or
 * -1 when the allocation fails. */
int model_prepare_bf16(Model *m);

/* Returns the parameter pointers for block l: P itself when no weight of block
 * l is stored in bfloat16, else m->block_slots with those weights expanded to
 * float32 in m->block_weights (model_prepare_bf16 must have succeeded).
 * Only block linear weights may be bfloat16. */
float *const *block_params(Model *m, float *const *P, int l);

/* Floats of scratch that one block's linear weights need in float32. */
size_t block_weights_floats(const ModelConfig *c);

/* LoRA merge: w (OUT,IN) += scale * b (OUT,R) @ a (R,IN). */
void lora_merge(float *w, const float *a, const float *b, int OUT, int IN, int R, float scale);

#endif
