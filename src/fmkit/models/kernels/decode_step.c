/* One decoding step of a Llama-style decoder (every row of the batch advances by one token), from token ids to
 * the final-normalised hidden state (and, when asked, the logits), in one call. Rows are (cache row, slot) pairs,
 * so one call can also carry chunks of prompts: a cache row repeated at consecutive slots.
 *
 * Why: at one token per row the layers of a small model are a few MB of weights, so the step is bound by how
 * often work is dispatched, not by arithmetic. Through PyTorch each of the ~15 operations per layer costs 10-20 us
 * of dispatch whatever its size; here a layer is a handful of loops inside one OpenMP team. The output layer
 * (50k x 256 for the benchmark model) is done here only for one fp32 row, where this loop streams it ~25% faster
 * than oneDNN; in bf16 or for several rows oneDNN's packed kernels are faster and PyTorch does it. The math is
 * transformers' Llama: RMSNorm, rotate-half RoPE, GQA attention over the fp32 KV cache, SwiGLU. Weights are fp32
 * or bf16 (widened to fp32 as they are read); activations, residual stream and cache are fp32.
 *
 * The layers' products read their weights transposed, (in, out), and vectorise over outputs with the rows of x
 * broadcast: against dot products over (out, in) rows (one horizontal sum per output and row) that halved the
 * layers' time at 16 rows. Every output is computed by the same chains of multiply-adds whatever the number of
 * rows, so a row's result never depends on what else is in the call.
 *
 * Plain C with GCC/Clang vector types that the compiler maps to the machine it is built on
 * (fmkit/models/native.py builds it with -O3 -march=native -ffp-contract=fast -fopenmp).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>

/* Mirrors fmkit.models.native.Model (ctypes): every integer is int64 so the layout has no padding. `batch` is
 * the cache's rows; `width` the most input rows one call takes (a cache row may appear several times, at
 * different slots: a prompt's tokens). */
typedef struct {
    int64_t batch, width, hidden, n_heads, n_kv, head_dim, inter, n_layers, cache_len, threads, bf16;
    double eps;
    const void *embed;                      /* (vocab, hidden), weights' dtype */
    const float *cos, *sin;                 /* (max_positions, head_dim) */
    const float *const *ln1, *const *ln2;   /* per layer: (hidden,) fp32 */
    const void *const *wqkv, *const *wo, *const *wgu, *const *wd;  /* per layer: (in, out), weights' dtype */
    float *const *cache;                    /* per layer: (2, batch, n_kv, cache_len, head_dim) fp32 */
    const float *norm;                      /* (hidden,) */
    const float *head;                      /* (vocab, hidden) fp32: one row's output layer (fm_step) */
    int64_t vocab;
    float *work;                            /* scratch, fm_work_floats() floats */
    uint16_t *out16;                        /* (width, hidden) bf16 copy of `out` for a bf16 output layer, or NULL */
} Model;

int64_t fm_abi_version(void) { return 5; }

/* fm_step's scratch: x (width x hidden), per thread h (width x hidden), qkv, attention output, the MLP's
 * activation, then per thread attention scores (cache_len) */
int64_t fm_work_floats(const Model *m) {
    int64_t b = m->width, nq = m->n_heads * m->head_dim, nkv = m->n_kv * m->head_dim;
    return b * m->hidden * (1 + m->threads) + b * (nq + 2 * nkv) + b * nq + b * m->inter + m->threads * m->cache_len;
}

static inline float widen(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* fp32 -> bf16 rounded to nearest even, NaN to 0x7FC0: torch's conversion, so the copy equals out.to(bfloat16) */
static inline uint16_t narrow(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if (f != f) return 0x7FC0;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static inline float weight(const void *w, int64_t i, int bf16) {
    return bf16 ? widen(((const uint16_t *)w)[i]) : ((const float *)w)[i];
}

#define LANES 16   /* outputs per panel: one AVX-512 register of fp32, two of AVX2 */
#define RB 8       /* input rows per block: 16 independent accumulators (of AVX-512's 32 registers) */

/* GCC/Clang vector types: LANES floats, loaded from any float-aligned address; the compiler maps them to the
 * machine's widest registers (plain arrays of accumulators were spilled to the stack on every step) */
typedef float vf __attribute__((vector_size(4 * LANES), aligned(4)));
typedef uint16_t vh __attribute__((vector_size(2 * LANES), aligned(2)));
typedef uint32_t vu __attribute__((vector_size(4 * LANES)));

/* LANES weights W[i, o0:o0+lanes] as fp32 (bf16 widened exactly), zeros past `lanes` */
static inline vf load_lanes(const void *w, int bf16, int64_t at, int64_t lanes) {
    if (lanes == LANES) {
        if (bf16) return (vf)(__builtin_convertvector(*(const vh *)((const uint16_t *)w + at), vu) << 16);
        return *(const vf *)((const float *)w + at);
    }
    float tail[LANES] = {0};
    for (int64_t l = 0; l < lanes; l++) tail[l] = weight(w, at + l, bf16);
    return *(const vf *)tail;
}

/* y[r, o0:o0+lanes] (+)= sum_i x[r, i] W[i, o0:o0+lanes] for nr (a constant once inlined) rows of x. Each output
 * is the same two chains of multiply-adds over i in order, whatever nr and whichever rows share the block: a
 * row's result is the same bits at any batch size. */
static inline __attribute__((always_inline)) void panel(const void *w, int bf16, const float *x, int64_t n_in,
                                                        int64_t n_out, int64_t o0, int64_t lanes, float *y,
                                                        int64_t ys, int accumulate, const int nr) {
    vf even[RB], odd[RB];   /* two chains per output (even and odd i), so one row still has two in flight */
    for (int r = 0; r < nr; r++) even[r] = odd[r] = (vf){0};
    int64_t i = 0;
    for (; i + 1 < n_in; i += 2) {
        vf w0 = load_lanes(w, bf16, i * n_out + o0, lanes), w1 = load_lanes(w, bf16, (i + 1) * n_out + o0, lanes);
        for (int r = 0; r < nr; r++) {
            even[r] += x[r * n_in + i] * w0;
            odd[r] += x[r * n_in + i + 1] * w1;
        }
    }
    if (i < n_in) {
        vf w0 = load_lanes(w, bf16, i * n_out + o0, lanes);
        for (int r = 0; r < nr; r++) even[r] += x[r * n_in + i] * w0;
    }
    for (int r = 0; r < nr; r++) {
        float out[LANES];
        *(vf *)out = even[r] + odd[r];
        for (int64_t l = 0; l < lanes; l++) {
            float *dst = y + r * ys + l;
            *dst = accumulate ? *dst + out[l] : out[l];
        }
    }
}

/* nr (<= RB) rows of x through one panel: y (row stride ys) gets outputs o0..o0+lanes. The switch makes nr a
 * constant in each inlined copy of panel, so its accumulators stay in registers. */
static void panel_rows(const void *w, int bf16, const float *x, int64_t n_in, int64_t n_out, int64_t o0,
                       int64_t lanes, float *y, int64_t ys, int accumulate, int64_t nr) {
    switch (nr < RB ? nr : RB) {
        case 1: panel(w, bf16, x, n_in, n_out, o0, lanes, y, ys, accumulate, 1); break;
        case 2: panel(w, bf16, x, n_in, n_out, o0, lanes, y, ys, accumulate, 2); break;
        case 3: panel(w, bf16, x, n_in, n_out, o0, lanes, y, ys, accumulate, 3); break;
        case 4: panel(w, bf16, x, n_in, n_out, o0, lanes, y, ys, accumulate, 4); break;
        case 5: panel(w, bf16, x, n_in, n_out, o0, lanes, y, ys, accumulate, 5); break;
        case 6: panel(w, bf16, x, n_in, n_out, o0, lanes, y, ys, accumulate, 6); break;
        case 7: panel(w, bf16, x, n_in, n_out, o0, lanes, y, ys, accumulate, 7); break;
        default: panel(w, bf16, x, n_in, n_out, o0, lanes, y, ys, accumulate, RB); break;
    }
}

/* y[b, o] (+)= sum_i x[b, i] W[i, o] for the panels of LANES outputs this thread owns; W (n_in, n_out) row-major
 * (the transpose of nn.Linear's weight), so LANES outputs are one contiguous load and x's values are broadcast:
 * no horizontal sums, and a panel of W is read once per RB rows of x. */
static void matmul(const void *w, int bf16, const float *x, int64_t batch, int64_t n_in, int64_t n_out, float *y,
                   int accumulate) {
    int64_t panels = (n_out + LANES - 1) / LANES;
    #pragma omp for schedule(static)
    for (int64_t p = 0; p < panels; p++) {
        int64_t o0 = p * LANES, lanes = n_out - o0 < LANES ? n_out - o0 : LANES;
        for (int64_t b = 0; b < batch; b += RB)
            panel_rows(w, bf16, x + b * n_in, n_in, n_out, o0, lanes, y + b * n_out + o0, n_out, accumulate, batch - b);
    }
}

/* The MLP's gate and up projections (W (n_in, 2 inter): gates, then ups) and SiLU(gate) * up in one pass: each
 * thread takes a gate panel with the up panel of the same outputs, so the activation needs no barrier of its own.
 * Every gate and up value is the same panel arithmetic as in matmul(). */
static void matmul_glu(const void *w, int bf16, const float *x, int64_t batch, int64_t n_in, int64_t inter,
                       float *act) {
    int64_t panels = (inter + LANES - 1) / LANES;
    #pragma omp for schedule(static)
    for (int64_t p = 0; p < panels; p++) {
        int64_t o0 = p * LANES, lanes = inter - o0 < LANES ? inter - o0 : LANES;
        for (int64_t b = 0; b < batch; b += RB) {
            float g[RB * LANES], u[RB * LANES];
            int64_t nr = batch - b < RB ? batch - b : RB;
            panel_rows(w, bf16, x + b * n_in, n_in, 2 * inter, o0, lanes, g, LANES, 0, nr);
            panel_rows(w, bf16, x + b * n_in, n_in, 2 * inter, inter + o0, lanes, u, LANES, 0, nr);
            for (int64_t r = 0; r < nr; r++)
                for (int64_t l = 0; l < lanes; l++) {
                    float gg = g[r * LANES + l];
                    act[(b + r) * inter + o0 + l] = gg / (1.0f + expf(-gg)) * u[r * LANES + l];
                }
        }
    }
}

/* The output layer for one fp32 row: y[o] = sum_i W[o, i] x[i] over the (vocab, hidden) weight as stored (no
 * transposed copy of the largest matrix), each of its rows streamed through once. */
static void head_row(const float *w, const float *x, int64_t n_in, int64_t n_out, float *y) {
    #pragma omp for schedule(static)
    for (int64_t o = 0; o < n_out; o++) {
        const float *row = w + o * n_in;
        float t = 0;
        #pragma omp simd reduction(+:t)
        for (int64_t j = 0; j < n_in; j++) t += row[j] * x[j];
        y[o] = t;
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

/* h = rms_norm(x) for every one of the B rows, into the calling thread's own h. Each thread normalises all rows
 * (a few flops a value) instead of half of them followed by a barrier: at a barrier the threads wait for the
 * slowest, and on a busy machine that is one preempted by another process. */
static void rms_rows(const float *x, const float *w, int64_t B, int64_t H, double eps, float *h) {
    for (int64_t b = 0; b < B; b++) rms_norm(x + b * H, w, H, eps, h + b * H);
}

/* Head j of input row b, just projected (v: its D values in qkv): RoPE for query and key heads, and keys and
 * values into the row's cache slot. */
static void rope_store(const Model *m, float *v, int64_t j, int64_t b, const int64_t *rows, const int64_t *pos,
                       const int64_t *slots, int64_t slot, float *k_cache, float *v_cache) {
    const int64_t D = m->head_dim, NH = m->n_heads, NKV = m->n_kv, T = m->cache_len;
    if (j < NH + NKV) rope(v, m->cos + pos[b] * D, m->sin + pos[b] * D, D);
    if (j >= NH) {
        int64_t g = j < NH + NKV ? j - NH : j - NH - NKV;
        int64_t cb = rows ? rows[b] : b, at = slots ? slots[b] : slot;
        float *c = (j < NH + NKV ? k_cache : v_cache) + ((cb * NKV + g) * T + at) * D;
        memcpy(c, v, D * sizeof(float));
    }
}

/* The step for B input rows. Input row b is cache row rows[b] (NULL: b); its new key/value go to cache slot
 * slots[b] (NULL: `slot` for every row) and it attends over slots [0, its slot] where key_mask (B, mask_stride;
 * NULL = all) is non-zero. Each row's arithmetic is the same whatever else is in the batch, so a request's tokens
 * do not depend on its neighbours.
 *
 * A layer has five barriers (the ends of the parallel loops: projections with RoPE, attention, output projection,
 * gate/up with the activation, down projection); the norms are computed by every thread for itself. */
static void step(const Model *m, int64_t B, const int64_t *rows, const int64_t *ids, const int64_t *pos,
                 const int64_t *slots, int64_t slot, const uint8_t *key_mask, int64_t mask_stride, float *out,
                 float *logits) {
    const int64_t H = m->hidden, D = m->head_dim, NH = m->n_heads, NKV = m->n_kv, I = m->inter, CB = m->batch;
    const int64_t nq = NH * D, nkv = NKV * D, nqkv = nq + 2 * nkv, T = m->cache_len, heads = NH + 2 * NKV;
    const int bf16 = (int)m->bf16;
    float *x = m->work, *hs = x + B * H, *qkv = hs + m->threads * B * H, *attn = qkv + B * nqkv;
    float *act = attn + B * nq, *scratch = act + B * I;
    const float scale = 1.0f / sqrtf((float)D);

    #pragma omp parallel num_threads((int)m->threads)
    {
        const int tid = omp_get_thread_num();
        float *scores = scratch + tid * T, *h = hs + tid * B * H;
        /* whole heads per thread when they split evenly: a head's RoPE and cache writes follow its projection
         * without a barrier (the same value on every thread, so all take the same loops) */
        const int by_head = D % LANES == 0 && heads % omp_get_num_threads() == 0;
        #pragma omp for
        for (int64_t b = 0; b < B; b++)
            for (int64_t i = 0; i < H; i++) x[b * H + i] = weight(m->embed, ids[b] * H + i, bf16);

        for (int64_t l = 0; l < m->n_layers; l++) {
            float *k_cache = m->cache[l], *v_cache = k_cache + CB * NKV * T * D;
            rms_rows(x, m->ln1[l], B, H, m->eps, h);
            if (by_head) {
                #pragma omp for schedule(static)
                for (int64_t j = 0; j < heads; j++)
                    for (int64_t b = 0; b < B; b += RB) {
                        int64_t nr = B - b < RB ? B - b : RB;
                        for (int64_t o0 = j * D; o0 < (j + 1) * D; o0 += LANES)
                            panel_rows(m->wqkv[l], bf16, h + b * H, H, nqkv, o0, LANES, qkv + b * nqkv + o0, nqkv,
                                       0, nr);
                        for (int64_t r = b; r < b + nr; r++)
                            rope_store(m, qkv + r * nqkv + j * D, j, r, rows, pos, slots, slot, k_cache, v_cache);
                    }
            } else {
                matmul(m->wqkv[l], bf16, h, B, H, nqkv, qkv, 0);
                #pragma omp for collapse(2)
                for (int64_t b = 0; b < B; b++)
                    for (int64_t j = 0; j < heads; j++)
                        rope_store(m, qkv + b * nqkv + j * D, j, b, rows, pos, slots, slot, k_cache, v_cache);
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
            matmul(m->wo[l], bf16, attn, B, nq, H, x, 1);

            rms_rows(x, m->ln2[l], B, H, m->eps, h);
            matmul_glu(m->wgu[l], bf16, h, B, H, I, act);
            matmul(m->wd[l], bf16, act, B, I, H, x, 1);
        }
        #pragma omp for
        for (int64_t b = 0; b < B; b++) {
            rms_norm(x + b * H, m->norm, H, m->eps, out + b * H);
            if (m->out16)
                for (int64_t i = 0; i < H; i++) m->out16[b * H + i] = narrow(out[b * H + i]);
        }
        if (logits) head_row(m->head, out, H, m->vocab, logits);   /* one fp32 row (fm_step's caller checks) */
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

/* The first index of the maximum of row r of x (rows, n), fp32 or bf16, NaN counting as the maximum: torch.argmax's
 * answer. Blocks of ARGMAX_BLOCK values are reduced with vector max; only the first block holding the maximum
 * (or the first NaN) is searched value by value. One call for all rows: the engine's greedy rows need only this,
 * not a tensor of indices made by half a dozen PyTorch operations. */
#define ARGMAX_BLOCK 256

static int64_t argmax_row(const void *x, int64_t n, int bf16) {
    float best = -INFINITY;
    int64_t from = 0;
    for (int64_t b0 = 0; b0 < n; b0 += ARGMAX_BLOCK) {
        int64_t end = b0 + ARGMAX_BLOCK < n ? b0 + ARGMAX_BLOCK : n;
        float top = -INFINITY;
        int nan = 0;
        #pragma omp simd reduction(max:top) reduction(|:nan)
        for (int64_t i = b0; i < end; i++) {
            float v = weight(x, i, bf16);
            top = v > top ? v : top;
            nan |= v != v;
        }
        if (nan)
            for (int64_t i = b0; i < end; i++) {
                float v = weight(x, i, bf16);
                if (v != v) return i;
            }
        if (top > best) best = top, from = b0;
    }
    for (int64_t i = from; i < n; i++)
        if (weight(x, i, bf16) == best) return i;
    return 0;   /* every value -inf: the first */
}

void fm_argmax_rows(const void *x, int64_t rows, int64_t n, int64_t bf16, int64_t threads, int64_t *out) {
    #pragma omp parallel for num_threads((int)threads) if (rows * n >= (1 << 16))
    for (int64_t r = 0; r < rows; r++)
        out[r] = argmax_row((const char *)x + r * n * (bf16 ? 2 : 4), n, (int)bf16);
}
