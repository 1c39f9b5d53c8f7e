/* One decoding step of a Llama-style decoder (every row of the batch advances by one token), from token ids to
 * the final-normalised hidden state (and, when asked, the logits), in one call.
 *
 * Why: at one token per row the layers of a small model are a few MB of weights, so the step is bound by how
 * often work is dispatched, not by arithmetic. Through PyTorch each of the ~15 operations per layer costs 10-20 us
 * of dispatch whatever its size; here a layer is a handful of loops inside one OpenMP team. The output layer
 * (50k x 256 for the benchmark model) is done here only for one fp32 row, where this loop streams it ~25% faster
 * than oneDNN; in bf16 or for several rows oneDNN's packed kernels are faster and PyTorch does it. The math is
 * transformers' Llama: RMSNorm, rotate-half RoPE, GQA attention over the fp32 KV cache, SwiGLU. Weights are fp32
 * or bf16 (widened to fp32 as they are read); activations, residual stream and cache are fp32.
 *
 * Plain C that the compiler vectorises for the machine it is built on (fmkit/models/native.py builds it with
 * -O3 -march=native -fopenmp); hand-written AVX-512 intrinsics measured no faster at batch
 * 1 and ~10% faster at batch 8, not worth a second code path.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>

/* Mirrors fmkit.models.native.Model (ctypes): every integer is int64 so the layout has no padding. */
typedef struct {
    int64_t batch, hidden, n_heads, n_kv, head_dim, inter, n_layers, cache_len, threads, bf16;
    double eps;
    const void *embed;                      /* (vocab, hidden), weights' dtype */
    const float *cos, *sin;                 /* (max_positions, head_dim) */
    const float *const *ln1, *const *ln2;   /* per layer: (hidden,) fp32 */
    const void *const *wqkv, *const *wo, *const *wgu, *const *wd;  /* per layer: (out, in), weights' dtype */
    float *const *cache;                    /* per layer: (2, batch, n_kv, cache_len, head_dim) fp32 */
    const float *norm;                      /* (hidden,) */
    const void *head;                       /* (vocab, hidden), weights' dtype */
    int64_t vocab;
    float *work;                            /* scratch, fm_work_floats() floats */
} Model;

int64_t fm_abi_version(void) { return 3; }

/* the longest input row of any matrix: what a thread's `wide` buffer holds */
static int64_t widest_input(const Model *m) {
    int64_t nq = m->n_heads * m->head_dim, w = m->inter > m->hidden ? m->inter : m->hidden;
    return w > nq ? w : nq;
}

/* fm_step's scratch: x, h (batch x hidden each), qkv, attention output, gate/up and activation, then per thread
 * attention scores (cache_len) and a widened row */
int64_t fm_work_floats(const Model *m) {
    int64_t b = m->batch, nq = m->n_heads * m->head_dim, nkv = m->n_kv * m->head_dim;
    return b * m->hidden * 2 + b * (nq + 2 * nkv) + b * nq + b * m->inter * 3 +
           m->threads * (m->cache_len + widest_input(m));
}

static inline float widen(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline float weight(const void *w, int64_t i, int bf16) {
    return bf16 ? widen(((const uint16_t *)w)[i]) : ((const float *)w)[i];
}

/* sum_j W[j] x[j]; one loop per dtype so the compiler vectorises each */
static inline float dot(const void *w, int bf16, const float *x, int64_t n) {
    float t = 0;
    if (bf16) {
        const uint16_t *v = w;
        #pragma omp simd reduction(+:t)
        for (int64_t j = 0; j < n; j++) t += widen(v[j]) * x[j];
    } else {
        const float *v = w;
        #pragma omp simd reduction(+:t)
        for (int64_t j = 0; j < n; j++) t += v[j] * x[j];
    }
    return t;
}

/* y[b, o] (+)= sum_i W[o, i] x[b, i] for the output rows this thread owns. W (n_out, n_in) is walked row by row
 * and each row serves every batch row while it sits in L1, so a weight leaves memory once per step. A bf16 row
 * serving more than four batch rows is widened once into `wide` (n_in floats of this thread's own) instead. */
static void matvec(const void *w, int bf16, const float *x, int64_t batch, int64_t n_in, int64_t n_out, float *y,
                   int accumulate, float *wide) {
    #pragma omp for schedule(static)
    for (int64_t o = 0; o < n_out; o++) {
        const void *row = bf16 ? (const void *)((const uint16_t *)w + o * n_in)
                               : (const void *)((const float *)w + o * n_in);
        int row_bf16 = bf16;
        if (bf16 && batch > 4) {
            #pragma omp simd
            for (int64_t i = 0; i < n_in; i++) wide[i] = widen(((const uint16_t *)row)[i]);
            row = wide;
            row_bf16 = 0;
        }
        for (int64_t b = 0; b < batch; b++) {
            float s = dot(row, row_bf16, x + b * n_in, n_in), *dst = y + b * n_out + o;
            *dst = accumulate ? *dst + s : s;
        }
    }
}

static void rms_norm(const float *x, const float *w, int64_t n, double eps, float *y) {
    float ss = 0;
    #pragma omp simd reduction(+:ss)
    for (int64_t i = 0; i < n; i++) ss += x[i] * x[i];
    float r = 1.0f / sqrtf(ss / (float)n + (float)eps);
    for (int64_t i = 0; i < n; i++) y[i] = x[i] * r * w[i];
}

/* rotate-half RoPE in place: out[i] = x[i] cos[i] - x[i+h] sin[i], out[i+h] = x[i+h] cos[i+h] + x[i] sin[i+h] */
static void rope(float *x, const float *cos, const float *sin, int64_t d) {
    int64_t h = d / 2;
    for (int64_t i = 0; i < h; i++) {
        float a = x[i], b = x[i + h];
        x[i] = a * cos[i] - b * sin[i];
        x[i + h] = b * cos[i + h] + a * sin[i + h];
    }
}

/* The step for B input rows. Input row b is cache row rows[b] (NULL: b); its new key/value go to cache slot
 * slots[b] (NULL: `slot` for every row) and it attends over slots [0, its slot] where key_mask (B, mask_stride;
 * NULL = all) is non-zero. Each row's arithmetic is the same whatever else is in the batch, so a request's tokens
 * do not depend on its neighbours. */
static void step(const Model *m, int64_t B, const int64_t *rows, const int64_t *ids, const int64_t *pos,
                 const int64_t *slots, int64_t slot, const uint8_t *key_mask, int64_t mask_stride, float *out,
                 float *logits) {
    const int64_t H = m->hidden, D = m->head_dim, NH = m->n_heads, NKV = m->n_kv, I = m->inter, CB = m->batch;
    const int64_t nq = NH * D, nkv = NKV * D, nqkv = nq + 2 * nkv, T = m->cache_len;
    const int bf16 = (int)m->bf16;
    float *x = m->work, *h = x + B * H, *qkv = h + B * H, *attn = qkv + B * nqkv, *gu = attn + B * nq;
    float *act = gu + B * 2 * I, *scratch = act + B * I;
    const int64_t widest = widest_input(m);
    const float scale = 1.0f / sqrtf((float)D);

    #pragma omp parallel num_threads((int)m->threads)
    {
        float *scores = scratch + omp_get_thread_num() * (T + widest), *wide = scores + T;
        #pragma omp for
        for (int64_t b = 0; b < B; b++)
            for (int64_t i = 0; i < H; i++) x[b * H + i] = weight(m->embed, ids[b] * H + i, bf16);

        for (int64_t l = 0; l < m->n_layers; l++) {
            float *k_cache = m->cache[l], *v_cache = k_cache + CB * NKV * T * D;
            #pragma omp for
            for (int64_t b = 0; b < B; b++) rms_norm(x + b * H, m->ln1[l], H, m->eps, h + b * H);
            matvec(m->wqkv[l], bf16, h, B, H, nqkv, qkv, 0, wide);

            /* RoPE on queries and keys; keys and values into the cache */
            #pragma omp for collapse(2)
            for (int64_t b = 0; b < B; b++)
                for (int64_t j = 0; j < NH + 2 * NKV; j++) {
                    float *v = qkv + b * nqkv + j * D;
                    if (j < NH + NKV) rope(v, m->cos + pos[b] * D, m->sin + pos[b] * D, D);
                    if (j >= NH) {
                        int64_t g = j < NH + NKV ? j - NH : j - NH - NKV;
                        int64_t cb = rows ? rows[b] : b, at = slots ? slots[b] : slot;
                        float *c = (j < NH + NKV ? k_cache : v_cache) + ((cb * NKV + g) * T + at) * D;
                        memcpy(c, v, D * sizeof(float));
                    }
                }

            #pragma omp for collapse(2)
            for (int64_t b = 0; b < B; b++)
                for (int64_t hh = 0; hh < NH; hh++) {
                    const float *q = qkv + b * nqkv + hh * D;
                    int64_t g = hh / (NH / NKV);
                    int64_t cb = rows ? rows[b] : b, end = (slots ? slots[b] : slot) + 1;
                    const float *kc = k_cache + (cb * NKV + g) * T * D, *vc = v_cache + (cb * NKV + g) * T * D;
                    const uint8_t *mask = key_mask ? key_mask + b * mask_stride : NULL;
                    float *sc = scores, top = -INFINITY;
                    for (int64_t t = 0; t < end; t++) {
                        if (mask && !mask[t]) { sc[t] = -INFINITY; continue; }
                        float s = 0;
                        #pragma omp simd reduction(+:s)
                        for (int64_t d = 0; d < D; d++) s += q[d] * kc[t * D + d];
                        sc[t] = s * scale;
                        if (sc[t] > top) top = sc[t];
                    }
                    float total = 0, *o = attn + b * nq + hh * D;
                    for (int64_t t = 0; t < end; t++) total += sc[t] = sc[t] == -INFINITY ? 0 : expf(sc[t] - top);
                    for (int64_t d = 0; d < D; d++) o[d] = 0;
                    for (int64_t t = 0; t < end && total > 0; t++) {  /* all masked: zeros, as SDPA */
                        float p = sc[t] / total;
                        if (p == 0) continue;
                        #pragma omp simd
                        for (int64_t d = 0; d < D; d++) o[d] += p * vc[t * D + d];
                    }
                }
            matvec(m->wo[l], bf16, attn, B, nq, H, x, 1, wide);

            #pragma omp for
            for (int64_t b = 0; b < B; b++) rms_norm(x + b * H, m->ln2[l], H, m->eps, h + b * H);
            matvec(m->wgu[l], bf16, h, B, H, 2 * I, gu, 0, wide);
            #pragma omp for collapse(2)
            for (int64_t b = 0; b < B; b++)
                for (int64_t i = 0; i < I; i++) {
                    float g = gu[b * 2 * I + i];
                    act[b * I + i] = g / (1.0f + expf(-g)) * gu[b * 2 * I + I + i];
                }
            matvec(m->wd[l], bf16, act, B, I, H, x, 1, wide);
        }
        #pragma omp for
        for (int64_t b = 0; b < B; b++) rms_norm(x + b * H, m->norm, H, m->eps, out + b * H);
        if (logits) matvec(m->head, bf16, out, B, H, m->vocab, logits, 0, wide);
    }
}

/* ids (batch,), pos (batch,) RoPE positions; every row's new keys/values go to cache slot `slot` and attention
 * covers slots [0, slot] where key_mask (batch, mask_stride; NULL = all) is non-zero. out (batch, hidden) gets the
 * final-normed hidden state, and logits (batch, vocab), unless NULL, the output layer applied to it. */
void fm_step(const Model *m, const int64_t *ids, const int64_t *pos, int64_t slot, const uint8_t *key_mask,
             int64_t mask_stride, float *out, float *logits) {
    step(m, m->batch, NULL, ids, pos, NULL, slot, key_mask, mask_stride, out, logits);
}

/* Continuous batching: n (<= batch) rows, row b being cache row rows[b] at its own slot slots[b], attending over
 * its slots [0, slots[b]]. Sequences join and leave the cache's rows independently. */
void fm_step_rows(const Model *m, int64_t n, const int64_t *rows, const int64_t *ids, const int64_t *pos,
                  const int64_t *slots, float *out, float *logits) {
    step(m, n, rows, ids, pos, slots, 0, NULL, 0, out, logits);
}
