/*
 * ops.c: the tensor ops declared in ops.h, each forward next to its backward.
 *
 * Shapes in comments use the letters of ops.h. Index products are computed in
 * size_t, so no buffer offset overflows int even when N*V does.
 *
 * Determinism: every output element is written by one thread, which adds its
 * terms in a fixed order, so results never depend on how OpenMP schedules the
 * loops. Parameter gradients that sum over rows (norm weights, biases,
 * embedding rows) are split over blocks of channels, never over rows. Inside
 * one thread, `omp simd reduction` lets the compiler vectorize a sum. That
 * order is fixed when the code is compiled, not when it runs.
 * Matrix products go through OpenBLAS (sk_sgemm). Its results are reproducible
 * for a fixed thread count (the tests check this for two threads), but another
 * thread count may split the work differently and round differently.
 */
#include "ops.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "blas.h"

/* Channels per block when a gradient sums over rows: 16 floats fill one
 * 64-byte cache line, and 576 channels give 36 blocks to share out. */
#define CHANNEL_BLOCK 16

/* Fixed number of partial sums in sum_squares, whatever the thread count. */
#define SUM_CHUNKS 64

static inline int min_int(int a, int b) { return a < b ? a : b; }

/* Bit casts between float and uint32_t. Compilers turn these memcpy calls
 * into register moves, also inside vectorized loops. */
static inline uint32_t float_to_bits(float x)
{
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    return bits;
}

static inline float bits_to_float(uint32_t bits)
{
    float x;
    memcpy(&x, &bits, sizeof x);
    return x;
}

/* Returns term, or 0 where prob is 0, so that 0 * inf (from a logit of -inf)
 * gives 0 rather than NaN. Integer masks keep the calling loop vectorizable. */
static inline double zero_where_zero(float prob, double term)
{
    uint64_t keep = 0u - (uint64_t)(float_to_bits(prob) != 0u);
    uint64_t term_bits;
    memcpy(&term_bits, &term, sizeof term_bits);
    term_bits &= keep;
    memcpy(&term, &term_bits, sizeof term);
    return term;
}

/* exp(x) for x <= 0, written so that loops calling it vectorize: glibc's expf
 * is a scalar call, and with the default -ftrapping-math GCC does not
 * if-convert float comparisons, so the branches below are integer masks.
 * Reduction x = n ln2 + r with |r| <= ln2/2 (ln2 split into a short high part
 * and a low part, so n * ln2_hi is exact), then the degree-7 Taylor
 * polynomial of exp(r), then scaling by 2^n through the exponent bits.
 * Measured max error: 1.22 ulp against double exp, at 2^24 evenly spaced
 * points of [-87.3, 0].
 * exp(-inf) and results below exp(-87.3) = 1.2e-38 are 0, NaN stays NaN.
 * Valid up to x = 88.3 too, but every caller subtracts a max first. */
static inline float exp_nonpositive(float x)
{
    const float log2e = 1.44269504088896341f;
    const float ln2_hi = 0.693359375f;
    const float ln2_lo = -2.12194440e-4f;
    const float round_magic = 12582912.0f;   // 1.5 * 2^23: t = y + magic rounds y to an integer
    const uint32_t min_x_bits = 0xC2AE999Au; // -87.3f

    // Flush x < -87.3 (and -inf) to -87.3 here and to a result of 0 at the end.
    // For negative floats a larger bit pattern is a smaller value. NaN is kept.
    uint32_t x_bits = float_to_bits(x);
    uint32_t is_nan = (x_bits & 0x7FFFFFFFu) > 0x7F800000u;
    uint32_t underflow_mask = 0u - ((x_bits > min_x_bits) & !is_nan);
    float xc = bits_to_float((x_bits & ~underflow_mask) | (min_x_bits & underflow_mask));

    float t = xc * log2e + round_magic;
    float n = t - round_magic;
    float r = (xc - n * ln2_hi) - n * ln2_lo;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    // The bit pattern of t is 0x4B400000 + n, so this puts n + 127 into the
    // exponent field, which makes scale = 2^n.
    float scale = bits_to_float((float_to_bits(t) - 0x4B400000u + 127u) << 23);
    return bits_to_float(float_to_bits(p * scale) & ~underflow_mask);
}

/* sigmoid(x) = 1 / (1 + exp(-x)), computed from e = exp(-|x|) so the exp
 * never overflows: 1 / (1 + e) for x >= 0 and e / (1 + e) for x < 0. */
static inline float sigmoid(float x)
{
    uint32_t x_bits = float_to_bits(x);
    float e = exp_nonpositive(bits_to_float(x_bits | 0x80000000u));
    uint32_t negative_mask = 0u - (x_bits >> 31);
    float numerator = bits_to_float((float_to_bits(e) & negative_mask) |
                                    (float_to_bits(1.0f) & ~negative_mask));
    return numerator / (1.0f + e);
}

static inline float dot_product(const float *a, const float *b, int n)
{
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int i = 0; i < n; i++) {
        sum += a[i] * b[i];
    }
    return sum;
}

/* ---------------------------------------------------------------------- */
/* Embedding lookup                                                       */
/* ---------------------------------------------------------------------- */

void embedding_forward(float *out, const int32_t *tokens, const float *wte, int N, int C)
{
    // out (N,C), tokens (N), wte (V,C): copy row tokens[n] of the table.
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        memcpy(out + (size_t)n * C, wte + (size_t)tokens[n] * C, (size_t)C * sizeof(float));
    }
}

void embedding_backward(float *dwte, const float *dout, const int32_t *tokens, int N, int C)
{
    // dwte (V,C) += scatter of dout (N,C) by tokens (N). Rows with the same token
    // add into the same dwte row, so threads split the channels: each thread owns
    // a block of channels in every vocabulary row and adds rows n = 0..N-1 in order.
    int nblocks = (C + CHANNEL_BLOCK - 1) / CHANNEL_BLOCK;
#pragma omp parallel for schedule(static)
    for (int block = 0; block < nblocks; block++) {
        int c0 = block * CHANNEL_BLOCK;
        int width = min_int(CHANNEL_BLOCK, C - c0);
        for (int n = 0; n < N; n++) {
            float *drow = dwte + (size_t)tokens[n] * C + c0;
            const float *grow = dout + (size_t)n * C + c0;
            for (int c = 0; c < width; c++) {
                drow[c] += grow[c];
            }
        }
    }
}

/* ---------------------------------------------------------------------- */
/* Linear layer                                                           */
/* ---------------------------------------------------------------------- */

/* Products with at most this many input rows skip sgemm (see linear_forward_few_rows). */
#define FEW_ROWS 16

/* Stores or adds one output value of linear_forward_few_rows. */
static inline void put_output(float *dst, float value, int accumulate)
{
    *dst = accumulate ? *dst + value : value;
}

/* out (N,OC) (+)= inp (N,IC) @ w^T for N <= FEW_ROWS, as in decoding. sgemm
 * copies the whole weight matrix into its packed layout on every call, which
 * costs as much as the product when N is small. Here each thread takes two
 * weight rows at a time and multiplies them with four input rows, so each
 * loaded value serves several products. The function is compiled for AVX-512,
 * AVX2 and plain x86-64 and the loader picks the clone the CPU supports, so the
 * summation order depends on the CPU. */
__attribute__((target_clones("arch=skylake-avx512", "arch=haswell", "default")))
static void linear_forward_few_rows(float *out, const float *inp, const float *w, int N, int IC,
                                    int OC, int accumulate)
{
    int pairs = OC / 2;
#pragma omp parallel for schedule(static)
    for (int p = 0; p < pairs; p++) {
        int o = 2 * p;
        const float *w0 = w + (size_t)o * IC, *w1 = w0 + IC;
        int n = 0;
        for (; n + 4 <= N; n += 4) {
            const float *a0 = inp + (size_t)n * IC, *a1 = a0 + IC, *a2 = a1 + IC, *a3 = a2 + IC;
            float s00 = 0.0f, s10 = 0.0f, s20 = 0.0f, s30 = 0.0f;
            float s01 = 0.0f, s11 = 0.0f, s21 = 0.0f, s31 = 0.0f;
#pragma omp simd reduction(+ : s00, s10, s20, s30, s01, s11, s21, s31)
            for (int i = 0; i < IC; i++) {
                s00 += a0[i] * w0[i];
                s10 += a1[i] * w0[i];
                s20 += a2[i] * w0[i];
                s30 += a3[i] * w0[i];
                s01 += a0[i] * w1[i];
                s11 += a1[i] * w1[i];
                s21 += a2[i] * w1[i];
                s31 += a3[i] * w1[i];
            }
            float *row = out + (size_t)n * OC + o;
            put_output(row, s00, accumulate);
            put_output(row + 1, s01, accumulate);
            put_output(row + OC, s10, accumulate);
            put_output(row + OC + 1, s11, accumulate);
            put_output(row + 2 * (size_t)OC, s20, accumulate);
            put_output(row + 2 * (size_t)OC + 1, s21, accumulate);
            put_output(row + 3 * (size_t)OC, s30, accumulate);
            put_output(row + 3 * (size_t)OC + 1, s31, accumulate);
        }
        for (; n < N; n++) {
            const float *a = inp + (size_t)n * IC;
            float s0 = 0.0f, s1 = 0.0f;
#pragma omp simd reduction(+ : s0, s1)
            for (int i = 0; i < IC; i++) {
                s0 += a[i] * w0[i];
                s1 += a[i] * w1[i];
            }
            put_output(out + (size_t)n * OC + o, s0, accumulate);
            put_output(out + (size_t)n * OC + o + 1, s1, accumulate);
        }
    }
    if (OC % 2 != 0) {
        /* the last weight row when OC is odd */
        int o = OC - 1;
        const float *wrow = w + (size_t)o * IC;
        for (int n = 0; n < N; n++) {
            const float *a = inp + (size_t)n * IC;
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int i = 0; i < IC; i++) {
                sum += a[i] * wrow[i];
            }
            put_output(out + (size_t)n * OC + o, sum, accumulate);
        }
    }
}

void linear_forward(float *out, const float *inp, const float *w, const float *bias,
                    int N, int IC, int OC, int accumulate)
{
    // out (N,OC) (+)= inp (N,IC) @ w^T, with w (OC,IC) row-major as in PyTorch.
    if (N <= FEW_ROWS) {
        linear_forward_few_rows(out, inp, w, N, IC, OC, accumulate);
    } else {
        sk_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, OC, IC, 1.0f, inp, IC, w, IC,
                 accumulate ? 1.0f : 0.0f, out, OC);
    }
    if (bias == NULL) {
        return;
    }
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        float *row = out + (size_t)n * OC;
        for (int o = 0; o < OC; o++) {
            row[o] += bias[o];
        }
    }
}

void linear_backward(float *dinp, float *dw, float *dbias, const float *dout,
                     const float *inp, const float *w, int N, int IC, int OC)
{
    // dinp (N,IC) += dout (N,OC) @ w (OC,IC)
    if (dinp != NULL) {
        sk_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, IC, OC, 1.0f, dout, OC, w, IC,
                 1.0f, dinp, IC);
    }
    // dw (OC,IC) += dout^T (OC,N) @ inp (N,IC)
    if (dw != NULL) {
        sk_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, OC, IC, N, 1.0f, dout, OC, inp, IC,
                 1.0f, dw, IC);
    }
    // dbias (OC) += column sums of dout, in double, one block of channels per thread.
    if (dbias != NULL) {
        int nblocks = (OC + CHANNEL_BLOCK - 1) / CHANNEL_BLOCK;
#pragma omp parallel for schedule(static)
        for (int block = 0; block < nblocks; block++) {
            int o0 = block * CHANNEL_BLOCK;
            int width = min_int(CHANNEL_BLOCK, OC - o0);
            double acc[CHANNEL_BLOCK] = {0};
            for (int n = 0; n < N; n++) {
                const float *grow = dout + (size_t)n * OC + o0;
                for (int o = 0; o < width; o++) {
                    acc[o] += grow[o];
                }
            }
            for (int o = 0; o < width; o++) {
                dbias[o0 + o] += (float)acc[o];
            }
        }
    }
}

/* ---------------------------------------------------------------------- */
/* LayerNorm                                                              */
/* ---------------------------------------------------------------------- */

void layernorm_forward(float *out, float *mean, float *rstd, const float *inp,
                       const float *w, const float *b, int N, int C, float eps)
{
    // inp, out (N,C); w, b (C); mean, rstd (N).
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C;
        float *y = out + (size_t)n * C;

        // Two passes in double: the mean first, then the biased variance
        // mean((x - mean)^2), which does not cancel the way E[x^2] - mean^2 can.
        double sum = 0.0;
#pragma omp simd reduction(+ : sum)
        for (int c = 0; c < C; c++) {
            sum += x[c];
        }
        double m = sum / C;
        double var = 0.0;
#pragma omp simd reduction(+ : var)
        for (int c = 0; c < C; c++) {
            double d = x[c] - m;
            var += d * d;
        }
        var /= C;
        float s = (float)(1.0 / sqrt(var + (double)eps));
        float mf = (float)m;

        // y = (x - mean) * rstd * w + b
        if (b != NULL) {
            for (int c = 0; c < C; c++) {
                y[c] = (x[c] - mf) * s * w[c] + b[c];
            }
        } else {
            for (int c = 0; c < C; c++) {
                y[c] = (x[c] - mf) * s * w[c];
            }
        }
        mean[n] = mf;
        rstd[n] = s;
    }
}

void layernorm_backward(float *dinp, float *dw, float *db, const float *dout,
                        const float *inp, const float *w, const float *mean,
                        const float *rstd, int N, int C)
{
    // With norm = (x - mean) * rstd and dnorm = dout * w, the input gradient is
    // dinp = rstd * (dnorm - mean_c(dnorm) - norm * mean_c(dnorm * norm)).
    if (dinp != NULL) {
#pragma omp parallel for schedule(static)
        for (int n = 0; n < N; n++) {
            const float *x = inp + (size_t)n * C;
            const float *g = dout + (size_t)n * C;
            float *dx = dinp + (size_t)n * C;
            float m = mean[n];
            float s = rstd[n];

            double dnorm_sum = 0.0, dnorm_norm_sum = 0.0;
#pragma omp simd reduction(+ : dnorm_sum, dnorm_norm_sum)
            for (int c = 0; c < C; c++) {
                float norm = (x[c] - m) * s;
                float dnorm = g[c] * w[c];
                dnorm_sum += dnorm;
                dnorm_norm_sum += dnorm * norm;
            }
            float dnorm_mean = (float)(dnorm_sum / C);
            float dnorm_norm_mean = (float)(dnorm_norm_sum / C);
            for (int c = 0; c < C; c++) {
                float norm = (x[c] - m) * s;
                float dnorm = g[c] * w[c];
                dx[c] += (dnorm - dnorm_mean - norm * dnorm_norm_mean) * s;
            }
        }
    }

    // dw (C) += sum over rows of dout * norm; db (C) += sum over rows of dout.
    // One block of channels per thread, rows added in order, sums in double.
    if (dw == NULL && db == NULL) {
        return;
    }
    int nblocks = (C + CHANNEL_BLOCK - 1) / CHANNEL_BLOCK;
#pragma omp parallel for schedule(static)
    for (int block = 0; block < nblocks; block++) {
        int c0 = block * CHANNEL_BLOCK;
        int width = min_int(CHANNEL_BLOCK, C - c0);
        double acc_w[CHANNEL_BLOCK] = {0};
        double acc_b[CHANNEL_BLOCK] = {0};
        for (int n = 0; n < N; n++) {
            const float *x = inp + (size_t)n * C + c0;
            const float *g = dout + (size_t)n * C + c0;
            float m = mean[n];
            float s = rstd[n];
            for (int c = 0; c < width; c++) {
                float norm = (x[c] - m) * s;
                acc_w[c] += g[c] * norm;
                acc_b[c] += g[c];
            }
        }
        for (int c = 0; c < width; c++) {
            if (dw != NULL) {
                dw[c0 + c] += (float)acc_w[c];
            }
            if (db != NULL) {
                db[c0 + c] += (float)acc_b[c];
            }
        }
    }
}

/* ---------------------------------------------------------------------- */
/* RMSNorm                                                                */
/* ---------------------------------------------------------------------- */

void rmsnorm_forward(float *out, float *rstd, const float *inp, const float *w,
                     int N, int C, float eps)
{
    // inp, out (N,C); w (C); rstd (N) = 1 / sqrt(mean(x^2) + eps).
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C;
        float *y = out + (size_t)n * C;
        double sum_sq = 0.0;
#pragma omp simd reduction(+ : sum_sq)
        for (int c = 0; c < C; c++) {
            sum_sq += (double)x[c] * x[c];
        }
        float s = (float)(1.0 / sqrt(sum_sq / C + (double)eps));
        for (int c = 0; c < C; c++) {
            y[c] = x[c] * s * w[c];
        }
        rstd[n] = s;
    }
}

void rmsnorm_backward(float *dinp, float *dw, const float *dout, const float *inp,
                      const float *w, const float *rstd, int N, int C)
{
    // With norm = x * rstd and dnorm = dout * w:
    // dinp = rstd * (dnorm - norm * mean_c(dnorm * norm)).
    if (dinp != NULL) {
#pragma omp parallel for schedule(static)
        for (int n = 0; n < N; n++) {
            const float *x = inp + (size_t)n * C;
            const float *g = dout + (size_t)n * C;
            float *dx = dinp + (size_t)n * C;
            float s = rstd[n];
            double dnorm_norm_sum = 0.0;
#pragma omp simd reduction(+ : dnorm_norm_sum)
            for (int c = 0; c < C; c++) {
                dnorm_norm_sum += (g[c] * w[c]) * (x[c] * s);
            }
            float dnorm_norm_mean = (float)(dnorm_norm_sum / C);
            for (int c = 0; c < C; c++) {
                float norm = x[c] * s;
                dx[c] += (g[c] * w[c] - norm * dnorm_norm_mean) * s;
            }
        }
    }

    // dw (C) += sum over rows of dout * norm, one block of channels per thread.
    if (dw == NULL) {
        return;
    }
    int nblocks = (C + CHANNEL_BLOCK - 1) / CHANNEL_BLOCK;
#pragma omp parallel for schedule(static)
    for (int block = 0; block < nblocks; block++) {
        int c0 = block * CHANNEL_BLOCK;
        int width = min_int(CHANNEL_BLOCK, C - c0);
        double acc[CHANNEL_BLOCK] = {0};
        for (int n = 0; n < N; n++) {
            const float *x = inp + (size_t)n * C + c0;
            const float *g = dout + (size_t)n * C + c0;
            float s = rstd[n];
            for (int c = 0; c < width; c++) {
                acc[c] += g[c] * (x[c] * s);
            }
        }
        for (int c = 0; c < width; c++) {
            dw[c0 + c] += (float)acc[c];
        }
    }
}

/* ---------------------------------------------------------------------- */
/* Rotary position embedding                                              */
/* ---------------------------------------------------------------------- */

/* Rotates every pair of x (N,NH,HS) by the angle whose cos and sin (N,HS/2)
 * are given, or by the opposite angle when sin_sign is -1. A pair (a, b)
 * becomes (a cos - b sin, b cos + a sin). */
static void rope_rotate(float *x, const float *cos, const float *sin, int N, int NH, int HS,
                        int interleaved, float sin_sign)
{
    int half = HS / 2;
#pragma omp parallel for collapse(2) schedule(static)
    for (int n = 0; n < N; n++) {
        for (int h = 0; h < NH; h++) {
            float *vec = x + ((size_t)n * NH + h) * HS;
            const float *cos_row = cos + (size_t)n * half;
            const float *sin_row = sin + (size_t)n * half;
            if (interleaved) {
                // GPT-J / llama.cpp: pair i is (vec[2i], vec[2i+1]).
                for (int i = 0; i < half; i++) {
                    float c = cos_row[i], s = sin_sign * sin_row[i];
                    float a = vec[2 * i], b = vec[2 * i + 1];
                    vec[2 * i] = a * c - b * s;
                    vec[2 * i + 1] = b * c + a * s;
                }
            } else {
                // HF LLaMA rotate_half: pair i is (vec[i], vec[i + HS/2]).
                for (int i = 0; i < half; i++) {
                    float c = cos_row[i], s = sin_sign * sin_row[i];
                    float a = vec[i], b = vec[i + half];
                    vec[i] = a * c - b * s;
                    vec[i + half] = b * c + a * s;
                }
            }
        }
    }
}

void rope_forward(float *x, const float *cos, const float *sin, int N, int NH, int HS,
                  int interleaved)
{
    rope_rotate(x, cos, sin, N, NH, HS, interleaved, 1.0f);
}

void rope_backward(float *dx, const float *cos, const float *sin, int N, int NH, int HS,
                   int interleaved)
{
    // The rotation is orthogonal, so its gradient is the transposed rotation:
    // the same pairs rotated by the opposite angle.
    rope_rotate(dx, cos, sin, N, NH, HS, interleaved, -1.0f);
}

/* ---------------------------------------------------------------------- */
/* Attention                                                              */
/* ---------------------------------------------------------------------- */

void attention_forward(float *out, float *att, const float *q, const float *k,
                       const float *v, const int32_t *key_mask, int B, int Tq, int Tk,
                       int q_offset, int NH, int NKV, int HS, float scale)
{
    // q, out (B,Tq,NH,HS); k, v (B,Tk,NKV,HS); att (B,NH,Tq,Tk); key_mask (B,Tk).
    int group = NH / NKV;
    size_t q_stride = (size_t)NH * HS;   // floats between time steps of q and out
    size_t kv_stride = (size_t)NKV * HS; // floats between time steps of k and v

    // One (b, h, i) query row per iteration. Row i attends up to q_offset + i + 1
    // keys, so a chunk size of 1 deals long and short rows evenly to the threads.
#pragma omp parallel for collapse(3) schedule(static, 1)
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < NH; h++) {
            for (int i = 0; i < Tq; i++) {
                const float *qi = q + ((size_t)b * Tq + i) * q_stride + (size_t)h * HS;
                const float *kb = k + (size_t)b * Tk * kv_stride + (size_t)(h / group) * HS;
                const float *vb = v + (size_t)b * Tk * kv_stride + (size_t)(h / group) * HS;
                const int32_t *mask = key_mask != NULL ? key_mask + (size_t)b * Tk : NULL;
                float *arow = att + (((size_t)b * NH + h) * Tq + i) * Tk;
                float *oi = out + ((size_t)b * Tq + i) * q_stride + (size_t)h * HS;

                // Causal limit: keys 0..last, clipped to the Tk keys present.
                long long last = (long long)q_offset + i;
                int nkeys = last < Tk ? (int)last + 1 : Tk;

                // Scores scale * q.k, with -inf for masked keys, and their max.
                float max_score = -INFINITY;
                int nvalid = 0;
                for (int j = 0; j < nkeys; j++) {
                    if (mask != NULL && mask[j] == 0) {
                        arow[j] = -INFINITY;
                        continue;
                    }
                    float score = scale * dot_product(qi, kb + (size_t)j * kv_stride, HS);
                    arow[j] = score;
                    max_score = fmaxf(max_score, score);
                    nvalid++;
                }
                for (int j = nkeys; j < Tk; j++) {
                    arow[j] = 0.0f;
                }
                for (int d = 0; d < HS; d++) {
                    oi[d] = 0.0f;
                }
                if (nvalid == 0) {
                    // No key to attend: probabilities 0 and output 0.
                    for (int j = 0; j < nkeys; j++) {
                        arow[j] = 0.0f;
                    }
                    continue;
                }

                // Softmax with the max subtracted; masked keys give exp(-inf) = 0.
                double sum = 0.0;
#pragma omp simd reduction(+ : sum)
                for (int j = 0; j < nkeys; j++) {
                    float e = exp_nonpositive(arow[j] - max_score);
                    arow[j] = e;
                    sum += e;
                }
                float inv_sum = (float)(1.0 / sum);
                for (int j = 0; j < nkeys; j++) {
                    arow[j] *= inv_sum;
                }

                // out_i = sum_j att_ij v_j
                for (int j = 0; j < nkeys; j++) {
                    float p = arow[j];
                    if (p == 0.0f) {
                        continue;
                    }
                    const float *vj = vb + (size_t)j * kv_stride;
                    for (int d = 0; d < HS; d++) {
                        oi[d] += p * vj[d];
                    }
                }
            }
        }
    }
}

void attention_backward(float *dq, float *dk, float *dv, float *scratch,
                        const float *dout, const float *att, const float *q,
                        const float *k, const float *v, int B, int T, int NH, int NKV,
                        int HS, float scale)
{
    // dout, q, dq (B,T,NH,HS); k, v, dk, dv (B,T,NKV,HS); att (B,NH,T,T);
    // scratch (B,NH,T) stores datt of one query row of each head at a time.
    // Per query row i of head h, with p = att[b,h,i,:]:
    //   dv_j += p_j dout_i
    //   datt_j = dout_i . v_j
    //   dscore_j = p_j (datt_j - sum_j' p_j' datt_j')      (softmax backward)
    //   dq_i += scale sum_j dscore_j k_j,   dk_j += scale dscore_j q_i
    // The query heads of one kv head add into the same dk and dv rows, so each
    // thread owns one (b, kv head) pair and visits its heads and rows in order.
    int group = NH / NKV;
    size_t q_stride = (size_t)NH * HS;
    size_t kv_stride = (size_t)NKV * HS;

#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++) {
        for (int kvh = 0; kvh < NKV; kvh++) {
            size_t kv_base = (size_t)b * T * kv_stride + (size_t)kvh * HS;
            const float *kb = k + kv_base;
            const float *vb = v + kv_base;
            for (int h = kvh * group; h < (kvh + 1) * group; h++) {
                float *datt = scratch + ((size_t)b * NH + h) * T;
                for (int i = 0; i < T; i++) {
                    size_t row_offset = ((size_t)b * T + i) * q_stride + (size_t)h * HS;
                    const float *arow = att + (((size_t)b * NH + h) * T + i) * T;
                    const float *gi = dout + row_offset;
                    const float *qi = q + row_offset;

                    // Keys 0..i only (causal). A probability of exactly 0 (masked
                    // key, or a query without keys) contributes nothing, so skip it.
                    double weighted_sum = 0.0;
                    for (int j = 0; j <= i; j++) {
                        float p = arow[j];
                        if (p == 0.0f) {
                            continue;
                        }
                        datt[j] = dot_product(gi, vb + (size_t)j * kv_stride, HS);
                        weighted_sum += (double)p * datt[j];
                        if (dv != NULL) {
                            float *dvj = dv + kv_base + (size_t)j * kv_stride;
                            for (int d = 0; d < HS; d++) {
                                dvj[d] += p * gi[d];
                            }
                        }
                    }
                    float datt_mean = (float)weighted_sum;

                    for (int j = 0; j <= i; j++) {
                        float p = arow[j];
                        if (p == 0.0f) {
                            continue;
                        }
                        float dscore = scale * p * (datt[j] - datt_mean);
                        if (dq != NULL) {
                            const float *kj = kb + (size_t)j * kv_stride;
                            float *dqi = dq + row_offset;
                            for (int d = 0; d < HS; d++) {
                                dqi[d] += dscore * kj[d];
                            }
                        }
                        if (dk != NULL) {
                            float *dkj = dk + kv_base + (size_t)j * kv_stride;
                            for (int d = 0; d < HS; d++) {
                                dkj[d] += dscore * qi[d];
                            }
                        }
                    }
                }
            }
        }
    }
}

/* ---------------------------------------------------------------------- */
/* Pointwise activations                                                  */
/* ---------------------------------------------------------------------- */

#define GELU_TANH_BETA 0.7978845608028654f  /* sqrt(2 / pi) */
#define GELU_TANH_KAPPA 0.044715f
#define INV_SQRT_2 0.7071067811865476f      /* 1 / sqrt(2) */
#define INV_SQRT_2PI 0.3989422804014327f    /* 1 / sqrt(2 pi) */

void gelu_tanh_forward(float *out, const float *inp, size_t N)
{
    // out = 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3), as torch's
    // approximate='tanh'. The identity 0.5 (1 + tanh u) = sigmoid(2u) avoids
    // the cancellation in 1 + tanh u for large negative x.
#pragma omp parallel for simd schedule(static)
    for (size_t i = 0; i < N; i++) {
        float x = inp[i];
        float u = GELU_TANH_BETA * (x + GELU_TANH_KAPPA * x * x * x);
        out[i] = x * sigmoid(2.0f * u);
    }
}

void gelu_tanh_backward(float *dinp, const float *inp, const float *dout, size_t N)
{
    // With s = sigmoid(2u) = 0.5 (1 + tanh u):
    // d/dx = s + 2 x s (1 - s) du/dx,  du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2).
#pragma omp parallel for simd schedule(static)
    for (size_t i = 0; i < N; i++) {
        float x = inp[i];
        float u = GELU_TANH_BETA * (x + GELU_TANH_KAPPA * x * x * x);
        float s = sigmoid(2.0f * u);
        float du_dx = GELU_TANH_BETA * (1.0f + 3.0f * GELU_TANH_KAPPA * x * x);
        float grad = s + 2.0f * x * s * (1.0f - s) * du_dx;
        dinp[i] += grad * dout[i];
    }
}

void gelu_exact_forward(float *out, const float *inp, size_t N)
{
    // out = x Phi(x) = 0.5 x (1 + erf(x / sqrt 2)).
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < N; i++) {
        float x = inp[i];
        out[i] = 0.5f * x * (1.0f + erff(x * INV_SQRT_2));
    }
}

void gelu_exact_backward(float *dinp, const float *inp, const float *dout, size_t N)
{
    // d/dx = Phi(x) + x phi(x), with phi the standard normal density.
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < N; i++) {
        float x = inp[i];
        float cdf = 0.5f * (1.0f + erff(x * INV_SQRT_2));
        float pdf = INV_SQRT_2PI * exp_nonpositive(-0.5f * x * x);
        dinp[i] += (cdf + x * pdf) * dout[i];
    }
}

void relu_forward(float *out, const float *inp, size_t N)
{
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < N; i++) {
        out[i] = inp[i] > 0.0f ? inp[i] : 0.0f;
    }
}

void relu_backward(float *dinp, const float *inp, const float *dout, size_t N)
{
    // The gradient at x = 0 is taken as 0, as in PyTorch. x > 0 is tested on
    // the bits (a positive int32), which keeps the loop vectorizable.
#pragma omp parallel for simd schedule(static)
    for (size_t i = 0; i < N; i++) {
        uint32_t positive_mask = 0u - (uint32_t)((int32_t)float_to_bits(inp[i]) > 0);
        dinp[i] += bits_to_float(float_to_bits(dout[i]) & positive_mask);
    }
}

void silu_forward(float *out, const float *inp, size_t N)
{
    // out = x sigmoid(x)
#pragma omp parallel for simd schedule(static)
    for (size_t i = 0; i < N; i++) {
        out[i] = inp[i] * sigmoid(inp[i]);
    }
}

void silu_backward(float *dinp, const float *inp, const float *dout, size_t N)
{
    // d/dx = s (1 + x (1 - s)) with s = sigmoid(x)
#pragma omp parallel for simd schedule(static)
    for (size_t i = 0; i < N; i++) {
        float x = inp[i];
        float s = sigmoid(x);
        dinp[i] += s * (1.0f + x * (1.0f - s)) * dout[i];
    }
}

void swiglu_forward(float *out, const float *gate, const float *up, size_t N)
{
    // out = silu(gate) * up
#pragma omp parallel for simd schedule(static)
    for (size_t i = 0; i < N; i++) {
        out[i] = gate[i] * sigmoid(gate[i]) * up[i];
    }
}

void swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate,
                     const float *up, size_t N)
{
    // dgate += dout * up * silu'(gate), silu'(g) = s (1 + g (1 - s)), s = sigmoid(g);
    // dup += dout * silu(gate)
    if (dgate != NULL) {
#pragma omp parallel for simd schedule(static)
        for (size_t i = 0; i < N; i++) {
            float g = gate[i];
            float s = sigmoid(g);
            dgate[i] += dout[i] * up[i] * s * (1.0f + g * (1.0f - s));
        }
    }
    if (dup != NULL) {
#pragma omp parallel for simd schedule(static)
        for (size_t i = 0; i < N; i++) {
            dup[i] += dout[i] * gate[i] * sigmoid(gate[i]);
        }
    }
}

/* ---------------------------------------------------------------------- */
/* Cross-entropy and KL divergence over a vocabulary                      */
/* ---------------------------------------------------------------------- */

/* Returns the max of one row of V logits. fmaxf skips NaN entries, but a NaN
 * still turns the sums computed from this max into NaN. */
static float row_max(const float *x, int V)
{
    float max_value = -INFINITY;
#pragma omp simd reduction(max : max_value)
    for (int j = 0; j < V; j++) {
        max_value = fmaxf(max_value, x[j]);
    }
    return max_value;
}

/* Returns log sum_v exp(x[v]) of one row of V logits, and its max in *max_out.
 * The max is subtracted before exp, and the sum of up to V = 50k terms is
 * accumulated in double. */
static double row_logsumexp(const float *x, int V, float *max_out)
{
    float max_value = row_max(x, V);
    double sum = 0.0;
#pragma omp simd reduction(+ : sum)
    for (int j = 0; j < V; j++) {
        sum += exp_nonpositive(x[j] - max_value);
    }
    *max_out = max_value;
    return max_value + log(sum);
}

double crossentropy_forward(float *losses, const float *logits, const int32_t *targets,
                            const float *weights, int N, int V)
{
    // logits (N,V); targets, weights, losses (N).
    // losses[n] = logsumexp(logits[n]) - logits[n, targets[n]]
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        if (weights[n] == 0.0f) {
            losses[n] = 0.0f;
            continue;
        }
        const float *x = logits + (size_t)n * V;
        float max_value;
        double lse = row_logsumexp(x, V, &max_value);
        losses[n] = (float)(lse - x[targets[n]]);
    }

    // The weighted sum runs on one thread in row order, so it is reproducible.
    double total = 0.0;
    for (int n = 0; n < N; n++) {
        if (weights[n] != 0.0f) {
            total += (double)weights[n] * losses[n];
        }
    }
    return total;
}

void crossentropy_backward(float *dlogits, const float *logits, const int32_t *targets,
                           const float *weights, float scale, int N, int V)
{
    // dlogits (N,V) = scale * w * (softmax(logits) - onehot(target)).
    // Per row: the max of x, then dx = exp(x - max) and its sum, then dx is
    // scaled by scale * w / sum. x is read only in the first two passes, each
    // element before it is overwritten, so dlogits may alias logits. That is
    // also why omp simd is safe: the only overlap is dx == x, element for element.
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float *x = logits + (size_t)n * V;
        float *dx = dlogits + (size_t)n * V;
        if (weights[n] == 0.0f) {
            memset(dx, 0, (size_t)V * sizeof(float));
            continue;
        }
        float max_value = row_max(x, V);
        double sum = 0.0;
#pragma omp simd reduction(+ : sum)
        for (int j = 0; j < V; j++) {
            float e = exp_nonpositive(x[j] - max_value);
            dx[j] = e;
            sum += e;
        }
        float row_scale = scale * weights[n];
        float factor = (float)(row_scale / sum);
#pragma omp simd
        for (int j = 0; j < V; j++) {
            dx[j] *= factor;
        }
        dx[targets[n]] -= row_scale;
    }
}

/* Reads one row of logits x and ref_logits r, (V) each, and returns
 * KL(p_ref || p) when reverse is 0 or KL(p || p_ref) when reverse is 1, in
 * double. lse_x and lse_r receive the two log-normalizers. */
static double row_kl(const float *x, const float *r, int V, int reverse, double *lse_x,
                     double *lse_r)
{
    float max_x, max_r;
    *lse_x = row_logsumexp(x, V, &max_x);
    *lse_r = row_logsumexp(r, V, &max_r);

    // log p - log p_ref = (x - r) - (lse_x - lse_r). The sum is over the
    // distribution named first, and terms of probability 0 add nothing, even
    // where a logit of -inf makes the log ratio infinite.
    double lse_diff = *lse_x - *lse_r;
    double kl = 0.0;
    float lse_x_f = (float)*lse_x, lse_r_f = (float)*lse_r;
    if (reverse) {
#pragma omp simd reduction(+ : kl)
        for (int j = 0; j < V; j++) {
            float prob = exp_nonpositive(x[j] - lse_x_f);
            double term = prob * (((double)x[j] - r[j]) - lse_diff);
            kl += zero_where_zero(prob, term);
        }
    } else {
#pragma omp simd reduction(- : kl)
        for (int j = 0; j < V; j++) {
            float prob = exp_nonpositive(r[j] - lse_r_f);
            double term = prob * (((double)x[j] - r[j]) - lse_diff);
            kl -= zero_where_zero(prob, term);
        }
    }
    return kl;
}

double kl_forward(float *losses, const float *logits, const float *ref_logits,
                  const float *weights, int N, int V, int reverse)
{
    // logits, ref_logits (N,V); weights, losses (N).
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        if (weights[n] == 0.0f) {
            losses[n] = 0.0f;
            continue;
        }
        double lse_x, lse_r;
        losses[n] = (float)row_kl(logits + (size_t)n * V, ref_logits + (size_t)n * V, V,
                                  reverse, &lse_x, &lse_r);
    }

    double total = 0.0;
    for (int n = 0; n < N; n++) {
        if (weights[n] != 0.0f) {
            total += (double)weights[n] * losses[n];
        }
    }
    return total;
}

void kl_backward(float *dlogits, const float *logits, const float *ref_logits,
                 const float *weights, float scale, int N, int V, int reverse)
{
    // Gradient with respect to logits, per row of weight w:
    //   reverse = 0: d KL(p_ref || p) = scale w (p - p_ref)
    //   reverse = 1: d KL(p || p_ref) = scale w p (log p - log p_ref - KL(p || p_ref))
    // dlogits may alias logits: every read of a row (the normalizers and, for
    // reverse = 1, the KL) finishes before the loop that overwrites it, and
    // that loop reads x[j] before it writes dx[j] (so omp simd is safe too).
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float *x = logits + (size_t)n * V;
        const float *r = ref_logits + (size_t)n * V;
        float *dx = dlogits + (size_t)n * V;
        if (weights[n] == 0.0f) {
            memset(dx, 0, (size_t)V * sizeof(float));
            continue;
        }
        double row_scale = (double)scale * weights[n];
        double lse_x, lse_r;
        if (reverse) {
            double kl = row_kl(x, r, V, 1, &lse_x, &lse_r);
            double shift = lse_x - lse_r + kl;
            float lse_x_f = (float)lse_x;
#pragma omp simd
            for (int j = 0; j < V; j++) {
                float prob = exp_nonpositive(x[j] - lse_x_f);
                // log p - log p_ref - KL = (x - r) - (lse_x - lse_r) - KL
                double grad = row_scale * prob * (((double)x[j] - r[j]) - shift);
                dx[j] = (float)zero_where_zero(prob, grad);
            }
        } else {
            float max_x, max_r;
            lse_x = row_logsumexp(x, V, &max_x);
            lse_r = row_logsumexp(r, V, &max_r);
            float shift_x = (float)(lse_x - max_x);
            float shift_r = (float)(lse_r - max_r);
            float row_scale_f = (float)row_scale;
#pragma omp simd
            for (int j = 0; j < V; j++) {
                float p = exp_nonpositive(x[j] - max_x - shift_x);
                float p_ref = exp_nonpositive(r[j] - max_r - shift_r);
                dx[j] = row_scale_f * (p - p_ref);
            }
        }
    }
}

/* ---------------------------------------------------------------------- */
/* Optimizer and vector arithmetic                                        */
/* ---------------------------------------------------------------------- */

void adamw_update(float *param, const float *grad, float *m, float *v, size_t n,
                  double lr, double beta1, double beta2, double eps, double weight_decay,
                  int step)
{
    // torch.optim.AdamW (single-tensor path), with t = step:
    //   param *= 1 - lr * weight_decay
    //   m = m + (1 - beta1) (grad - m)             (torch: m.lerp_(grad, 1 - beta1))
    //   v = beta2 v + (1 - beta2) grad^2
    //   denom = sqrt(v) / sqrt(1 - beta2^t) + eps
    //   param -= lr / (1 - beta1^t) * m / denom
    // The scalar factors are computed in double, as Python computes them for torch.
    double bias_correction1 = 1.0 - pow((double)beta1, step);
    double bias_correction2 = 1.0 - pow((double)beta2, step);
    float step_size = (float)((double)lr / bias_correction1);
    float bias_correction2_sqrt = (float)sqrt(bias_correction2);
    float decay = (float)(1.0 - (double)lr * weight_decay);
    float one_minus_beta1 = (float)(1.0 - beta1);
    float one_minus_beta2 = (float)(1.0 - beta2);
    float beta2_f = (float)beta2, eps_f = (float)eps;

#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) {
        float g = grad[i];
        float mi = m[i] + one_minus_beta1 * (g - m[i]);
        float vi = beta2_f * v[i] + one_minus_beta2 * g * g;
        float denom = sqrtf(vi) / bias_correction2_sqrt + eps_f;
        param[i] = param[i] * decay - step_size * (mi / denom);
        m[i] = mi;
        v[i] = vi;
    }
}

double sum_squares(const float *x, size_t n)
{
    // SUM_CHUNKS fixed chunks summed in parallel, then added in chunk order,
    // so the result does not depend on the thread count.
    double partial[SUM_CHUNKS];
    size_t chunk = (n + SUM_CHUNKS - 1) / SUM_CHUNKS;
#pragma omp parallel for schedule(static)
    for (int c = 0; c < SUM_CHUNKS; c++) {
        size_t lo = (size_t)c * chunk;
        size_t hi = lo + chunk < n ? lo + chunk : n;
        double sum = 0.0;
#pragma omp simd reduction(+ : sum)
        for (size_t i = lo; i < hi; i++) {
            sum += (double)x[i] * x[i];
        }
        partial[c] = sum;
    }
    double total = 0.0;
    for (int c = 0; c < SUM_CHUNKS; c++) {
        total += partial[c];
    }
    return total;
}

void scale_inplace(float *x, size_t n, float s)
{
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) {
        x[i] *= s;
    }
}

void axpby(float *out, const float *x, const float *y, float a, float b, size_t n)
{
    // out may alias x or y: element i is read before it is written.
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) {
        out[i] = a * x[i] + b * y[i];
    }
}
