/*
 * ops.h: the tensor ops of skupy's C core, each a forward/backward pair.
 *
 * Conventions shared by every function in this header:
 *   - Tensors are contiguous, row-major float32 buffers owned by the caller.
 *     No function allocates, frees or keeps a pointer after it returns.
 *   - Shapes use fixed letters: B batch, T time, C channels, V vocabulary,
 *     NH query heads, NKV key/value heads, HS head size, N = B*T rows,
 *     IC/OC input/output channels of a linear layer.
 *   - Every backward function ACCUMULATES (+=) into each gradient output, so
 *     residual branches and tied weights need no extra buffers. The caller
 *     zeroes gradient buffers before a backward pass. A gradient pointer that
 *     is NULL is skipped (used for frozen parameters).
 *   - Index arguments (token ids, targets) are validated by the caller. These
 *     functions do not check them and have no error return; the Python
 *     bindings in module.c and ops_module.c reject bad input first.
 *   - Loops are threaded with OpenMP and matrix products go through
 *     cblas_sgemm. For a fixed thread count every result is bitwise
 *     reproducible: no function uses atomics or an unordered reduction.
 */
#ifndef SKUPY_OPS_H
#define SKUPY_OPS_H

#include <stddef.h>
#include <stdint.h>

/* ---------------------------------------------------------------------- */
/* Embedding lookup.
 * out (N,C) = wte[tokens[n]] (V,C).
 * backward: dwte[tokens[n]] += dout[n]. */
void embedding_forward(float *out, const int32_t *tokens, const float *wte, int N, int C);
void embedding_backward(float *dwte, const float *dout, const int32_t *tokens, int N, int C);

/* ---------------------------------------------------------------------- */
/* Linear layer, weight in the PyTorch layout (OC, IC).
 * out (N,OC) = inp (N,IC) @ w^T + bias (OC); bias may be NULL.
 * If accumulate is nonzero, out += the product instead of out =.
 * backward: dinp (N,IC) += dout @ w; dw (OC,IC) += dout^T @ inp;
 *           dbias (OC) += sum over N of dout. Any gradient may be NULL. */
void linear_forward(float *out, const float *inp, const float *w, const float *bias,
                    int N, int IC, int OC, int accumulate);
void linear_backward(float *dinp, float *dw, float *dbias, const float *dout,
                     const float *inp, const float *w, int N, int IC, int OC);

/* ---------------------------------------------------------------------- */
/* LayerNorm over the last dimension.
 * out (N,C) = (inp - mean) * rstd * w + b; saves mean (N) and rstd (N).
 * b may be NULL (no bias). */
void layernorm_forward(float *out, float *mean, float *rstd, const float *inp,
                       const float *w, const float *b, int N, int C, float eps);
void layernorm_backward(float *dinp, float *dw, float *db, const float *dout,
                        const float *inp, const float *w, const float *mean,
                        const float *rstd, int N, int C);

/* RMSNorm over the last dimension, as in LLaMA.
 * out (N,C) = inp * rstd * w with rstd = 1/sqrt(mean(inp^2) + eps); saves rstd (N). */
void rmsnorm_forward(float *out, float *rstd, const float *inp, const float *w,
                     int N, int C, float eps);
void rmsnorm_backward(float *dinp, float *dw, const float *dout, const float *inp,
                      const float *w, const float *rstd, int N, int C);

/* ---------------------------------------------------------------------- */
/* Rotary position embedding, in place on x (N,NH,HS).
 * cos, sin (N,HS/2): the rotation of frequency i at each row's position,
 * computed by the caller from the positions and inverse frequencies.
 * interleaved = 0: HF LLaMA layout, pairs (i, i + HS/2).
 * interleaved = 1: GPT-J / llama.cpp layout, pairs (2i, 2i + 1).
 * backward rotates dx by the opposite angle, also in place. */
void rope_forward(float *x, const float *cos, const float *sin, int N, int NH, int HS,
                  int interleaved);
void rope_backward(float *dx, const float *cos, const float *sin, int N, int NH, int HS,
                   int interleaved);

/* ---------------------------------------------------------------------- */
/* Causal multi-head attention with grouped-query heads and a key padding mask.
 * q (B,Tq,NH,HS), k and v (B,Tk,NKV,HS), NH a multiple of NKV: query head h
 * reads key/value head h / (NH/NKV).
 * Query i sits at absolute position q_offset + i and attends key j when
 * j <= q_offset + i and key_mask[b*Tk + j] != 0; key_mask (B,Tk) may be NULL
 * (all keys valid). Training uses Tq = Tk = T, q_offset = 0; KV-cache
 * decoding uses Tq new queries against Tk cached keys.
 * out (B,Tq,NH,HS) = softmax(scale * q k^T + mask) v.
 * att (B,NH,Tq,Tk) receives the attention probabilities for backward. A query
 * with no valid key gets probabilities 0 and output 0.
 * backward (Tq = Tk = T, q_offset = 0 only): dq, dk, dv accumulate.
 * scratch must hold B*NH*T floats. */
void attention_forward(float *out, float *att, const float *q, const float *k,
                       const float *v, const int32_t *key_mask, int B, int Tq, int Tk,
                       int q_offset, int NH, int NKV, int HS, float scale);
void attention_backward(float *dq, float *dk, float *dv, float *scratch,
                        const float *dout, const float *att, const float *q,
                        const float *k, const float *v, int B, int T, int NH, int NKV,
                        int HS, float scale);

/* ---------------------------------------------------------------------- */
/* Pointwise activations on N elements. out and inp may not alias. */
void gelu_tanh_forward(float *out, const float *inp, size_t N);
void gelu_tanh_backward(float *dinp, const float *inp, const float *dout, size_t N);
void gelu_exact_forward(float *out, const float *inp, size_t N);
void gelu_exact_backward(float *dinp, const float *inp, const float *dout, size_t N);
void relu_forward(float *out, const float *inp, size_t N);
void relu_backward(float *dinp, const float *inp, const float *dout, size_t N);
void silu_forward(float *out, const float *inp, size_t N);
void silu_backward(float *dinp, const float *inp, const float *dout, size_t N);

/* SwiGLU gate: out (N) = silu(gate) * up. */
void swiglu_forward(float *out, const float *gate, const float *up, size_t N);
void swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate,
                     const float *up, size_t N);

/* ---------------------------------------------------------------------- */
/* Token cross-entropy from logits (N,V) with per-row weights (N).
 * losses (N) receives -log softmax(logits)[targets[n]] for rows with
 * weights[n] != 0 and 0 elsewhere; rows of weight 0 are not computed and their
 * target is not read. Returns sum over n of weights[n] * losses[n], in double.
 * backward writes dlogits = scale * weights[n] * (softmax - onehot(target)),
 * and 0 on rows of weight 0. dlogits may alias logits (in place), which is how
 * the model avoids a second (N,V) buffer; it overwrites, it does not accumulate. */
double crossentropy_forward(float *losses, const float *logits, const int32_t *targets,
                            const float *weights, int N, int V);
void crossentropy_backward(float *dlogits, const float *logits, const int32_t *targets,
                           const float *weights, float scale, int N, int V);

/* KL divergence between the softmax of ref_logits (N,V), p_ref, and that of
 * logits (N,V), p, per row with weights (N).
 * reverse = 0: losses[n] = KL(p_ref || p) = sum_v p_ref (log p_ref - log p).
 * reverse = 1: losses[n] = KL(p || p_ref).
 * Rows of weight 0 are skipped. Returns sum of weights[n] * losses[n].
 * backward writes the gradient with respect to logits (not ref_logits):
 *   reverse = 0: scale * w * (p - p_ref)
 *   reverse = 1: scale * w * p * (log p - log p_ref - KL(p || p_ref))
 * dlogits may alias logits; it overwrites, it does not accumulate. */
double kl_forward(float *losses, const float *logits, const float *ref_logits,
                  const float *weights, int N, int V, int reverse);
void kl_backward(float *dlogits, const float *logits, const float *ref_logits,
                 const float *weights, float scale, int N, int V, int reverse);

/* ---------------------------------------------------------------------- */
/* AdamW step as torch.optim.AdamW computes it (decoupled weight decay,
 * bias correction), on n elements; step is the 1-based step count. */
void adamw_update(float *param, const float *grad, float *m, float *v, size_t n,
                  double lr, double beta1, double beta2, double eps, double weight_decay,
                  int step);

/* Sum of squares in double with a fixed summation order. */
double sum_squares(const float *x, size_t n);

/* x *= s, in place. */
void scale_inplace(float *x, size_t n, float s);

/* out = a * x + b * y, elementwise over n; out may alias x or y. Chunked and
 * threaded: the task-vector arithmetic of knowledge negation. */
void axpby(float *out, const float *x, const float *y, float a, float b, size_t n);

#endif
