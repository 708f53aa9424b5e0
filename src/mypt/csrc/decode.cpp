// Batch-1 decoding's matrix-vector products for CPUs with AVX2 + FMA (mypt.kernels builds this file
// and calls it; torch's own reach about half the memory bandwidth on small rows, BENCHMARKS.md).
// Both functions split the output rows between OpenMP threads in equal parts and multiply all M
// rows of x by one weight row while it is in L1, so W is read once per call.
//
// mypt_fp32_linear: y = x W^T, W fp32 (N, K) row-major: dot products with four accumulators.
//
// mypt_int8_linear: weight-only int8 (mypt.quant).
// y[m, n] = wscale[n] * sum_k W[n, k] * x[m, k], W int8 (N, K) row-major, one scale per output row.
// As llama.cpp's q8_0: each row of x is first quantised to int8 in blocks of 32 values, one fp32
// scale per block; a block's dot product is then exact int8 x int8 arithmetic (maddubs + madd, 32
// products in 4 instructions), scaled once per block. Output rows are split between OpenMP threads
// in equal parts (a static schedule: 25% faster than a dynamic one on 150M's matrices, BENCHMARKS.md).
// A block count K / 32 that is not whole leaves a tail, summed in scalar code.

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define QBLOCK 32

extern "C" {

// One full block of 32: xq = round(x / d) with d = max |x| / 127 (8 lanes at a time; the same
// products and round-to-nearest-even as the scalar tail below, so the same int8 values).
static inline float quantize_block(const float* x, int8_t* xq) {
    const __m256 sign = _mm256_set1_ps(-0.f);
    const __m256 v0 = _mm256_loadu_ps(x), v1 = _mm256_loadu_ps(x + 8), v2 = _mm256_loadu_ps(x + 16),
                 v3 = _mm256_loadu_ps(x + 24);
    const __m256 a = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                                   _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    const float d = _mm_cvtss_f32(h) / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
    const __m256 s = _mm256_set1_ps(inv);
    const __m256i p = _mm256_packs_epi16(  // four rows of 8 int32 -> 32 int8, lane-interleaved
        _mm256_packs_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v0, s)), _mm256_cvtps_epi32(_mm256_mul_ps(v1, s))),
        _mm256_packs_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v2, s)), _mm256_cvtps_epi32(_mm256_mul_ps(v3, s))));
    _mm256_storeu_si256((__m256i*)xq, _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    return d;
}

// x (M, K) fp32 -> xq (M, K) int8 and xs (M, ceil(K / 32)) fp32: x ~ xq * xs per block of 32.
static void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* xq, float* xs) {
    const int64_t nb = (K + QBLOCK - 1) / QBLOCK;
    for (int64_t m = 0; m < M; m++) {
        const float* xr = x + m * K;
        for (int64_t b = 0; b < nb; b++) {
            const int64_t k0 = b * QBLOCK, k1 = k0 + QBLOCK < K ? k0 + QBLOCK : K;
            if (k1 - k0 == QBLOCK) {
                xs[m * nb + b] = quantize_block(xr + k0, xq + m * K + k0);
                continue;
            }
            float amax = 0.f;
            for (int64_t k = k0; k < k1; k++) amax = fmaxf(amax, fabsf(xr[k]));
            const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
            xs[m * nb + b] = d;
            for (int64_t k = k0; k < k1; k++) xq[m * K + k] = (int8_t)lrintf(xr[k] * inv);
        }
    }
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// One weight row against one quantised activation row.
static inline float dot_row(const int8_t* w, const int8_t* xq, const float* xs, int64_t K) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc = _mm256_setzero_ps();
    const int64_t full = K / QBLOCK;
    for (int64_t b = 0; b < full; b++) {
        const __m256i wv = _mm256_loadu_si256((const __m256i*)(w + b * QBLOCK));
        const __m256i xv = _mm256_loadu_si256((const __m256i*)(xq + b * QBLOCK));
        // maddubs multiplies unsigned by signed: |w| times x with w's sign (exact: |w|, |x| <= 127)
        const __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
        const __m256 p = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
        acc = _mm256_fmadd_ps(p, _mm256_set1_ps(xs[b]), acc);
    }
    float sum = hsum(acc);
    if (full * QBLOCK < K) {
        int32_t tail = 0;
        for (int64_t k = full * QBLOCK; k < K; k++) tail += (int32_t)w[k] * (int32_t)xq[k];
        sum += (float)tail * xs[full];
    }
    return sum;
}

// out (M, N) = (x (M, K) @ W.T) * wscale; xq (M, K) and xs (M, ceil(K/32)) are scratch space.
static void int8_linear(const float* x, const int8_t* w, const float* wscale, float* out, int8_t* xq, float* xs,
                      int64_t M, int64_t N, int64_t K, int threads) {
    quantize_rows(x, M, K, xq, xs);
    const int64_t nb = (K + QBLOCK - 1) / QBLOCK;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const int8_t* wr = w + n * K;
        for (int64_t m = 0; m < M; m++) out[m * N + n] = dot_row(wr, xq + m * K, xs + m * nb, K) * wscale[n];
    }
}

void mypt_int8_linear(const float* x, const int8_t* w, const float* wscale, float* out, int8_t* xq, float* xs,
                      int64_t M, int64_t N, int64_t K, int threads) {
    int8_linear(x, w, wscale, out, xq, xs, M, N, K, threads);
}

// out (M, N) = x (M, K) @ W.T for W fp32 (N, K) row-major.
static void fp32_linear(const float* x, const float* w, float* out, int64_t M, int64_t N, int64_t K, int threads) {
    const int64_t K32 = K / 32 * 32;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const float* wr = w + n * K;
        for (int64_t m = 0; m < M; m++) {
            const float* xr = x + m * K;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            int64_t k = 0;
            for (; k < K32; k += 32) {
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + k), _mm256_loadu_ps(xr + k), a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + k + 8), _mm256_loadu_ps(xr + k + 8), a1);
                a2 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + k + 16), _mm256_loadu_ps(xr + k + 16), a2);
                a3 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + k + 24), _mm256_loadu_ps(xr + k + 24), a3);
            }
            float sum = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
            for (; k < K; k++) sum += wr[k] * xr[k];
            out[m * N + n] = sum;
        }
    }
}

void mypt_fp32_linear(const float* x, const float* w, float* out, int64_t M, int64_t N, int64_t K, int threads) {
    fp32_linear(x, w, out, M, N, K, threads);
}

// ---------------------------------------------------------------------------------------------
// mypt_decode_step: a few new tokens (one token of one row, a token and its drafted successors,
// one token of each of a few rows) through every block, as one call (mypt.decode_step lays the
// model out in these structs). Eager PyTorch spends about 20 operator calls a block on a token, a
// fixed cost that at batch 1 weighs as much as reading small weights (BENCHMARKS.md, Issue 23);
// here a block is its products (the kernels above: each weight row read once for all the tokens)
// and a few loops over vectors. The same arithmetic as mypt.model in fp32: norms, (qk-norm),
// rotary, attention over each row's cached keys (which this call extends), MLP, residuals, final
// norm.

struct MyptLinear {
    const void* w;       // fp32 (n, k) or int8 (n, k) row-major
    const float* scale;  // int8: one scale per output row; fp32: null
    const float* bias;   // (n,) or null
    int64_t n, k;
    int32_t int8;
};

struct MyptNorm {
    const float* w;  // gain (dim,); null: no norm here (qk-norm off)
    const float* b;  // bias (dim,) or null
    float eps;
    int32_t rms;  // 1: RMSNorm, 0: LayerNorm
};

struct MyptLayer {
    MyptNorm ln_1, q_norm, k_norm, ln_2;
    MyptLinear attn, attn_proj, fc, mlp_proj;
};

struct MyptModel {
    int64_t n_layer, n_embd, n_head, n_kv_head, head_dim, hidden, capacity;
    int32_t mlp;  // 0: tanh GELU, 1: squared ReLU, 2: SwiGLU (c_fc holds gate, then up)
    const float* wte;  // (vocab, n_embd)
    const float* wpe;  // (block_size, n_embd), or null: rotary positions
    const MyptLayer* layers;
    MyptNorm ln_f;
    float* scratch;  // MAX_TOKENS * (2 n_embd + qkv + n_head head_dim + fc rows) + n_head capacity
    int8_t* qscratch;  // int8 activations (MAX_TOKENS * max k) then their block scales (fp32, aligned)
};

// e^x of 8 floats: x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor polynomial to r^7 / 7!
// (relative error about 1e-7, as expf), times 2^n through the exponent bits. x is clamped to
// [-87, 88], so the result is finite and never a denormal.
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(88.f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.4426950408889634f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);  // ln 2 in two parts
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
    __m256 p = _mm256_set1_ps(1.f / 5040);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 720));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

// v[i] = v[i] * sigmoid(a * u(v[i])) for the MLP's activations, 8 at a time (scalar tail):
// tanh GELU, 0.5 x (1 + tanh(u)) = x sigmoid(2u) with u = sqrt(2 / pi) (x + 0.044715 x^3), and
// SiLU, x sigmoid(x), times `up` (SwiGLU's other half) when given.
static void gelu_or_silu(float* v, const float* up, int64_t n, bool gelu) {
    const __m256 one = _mm256_set1_ps(1.f), c = _mm256_set1_ps(-2.f * 0.7978845608028654f);
    const __m256 c3 = _mm256_set1_ps(0.044715f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 x = _mm256_loadu_ps(v + i);
        // -2u for GELU, -x for SiLU: sigmoid(z) = 1 / (1 + e^-z)
        const __m256 z = gelu ? _mm256_mul_ps(c, _mm256_fmadd_ps(_mm256_mul_ps(c3, x), _mm256_mul_ps(x, x), x))
                              : _mm256_sub_ps(_mm256_setzero_ps(), x);
        __m256 y = _mm256_div_ps(x, _mm256_add_ps(one, exp8(z)));
        if (up) y = _mm256_mul_ps(y, _mm256_loadu_ps(up + i));
        _mm256_storeu_ps(v + i, y);
    }
    for (; i < n; i++) {
        const float x = v[i];
        const float z = gelu ? -2.f * 0.7978845608028654f * (x + 0.044715f * x * x * x) : -x;
        const float y = x / (1.f + expf(fminf(z, 88.f)));
        v[i] = up ? y * up[i] : y;
    }
}

static inline float dot(const float* a, const float* b, int64_t n) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    }
    float s = hsum(_mm256_add_ps(acc0, acc1));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

// LayerNorm (or RMSNorm: no mean) of x (n) with a gain and maybe a bias; sums in double, so a mean
// large against the spread (a residual stream far from zero) loses no precision.
static void apply_norm(const MyptNorm& nm, const float* x, float* out, int64_t n) {
    double sum = 0.0;
    if (!nm.rms)
        for (int64_t i = 0; i < n; i++) sum += x[i];
    const double mu = sum / (double)n;
    double var = 0.0;
    for (int64_t i = 0; i < n; i++) var += (x[i] - mu) * (x[i] - mu);
    const float mean = (float)mu, rstd = (float)(1.0 / sqrt(var / (double)n + nm.eps));
    for (int64_t i = 0; i < n; i++) {
        const float y = (x[i] - mean) * rstd * nm.w[i];
        out[i] = nm.b ? y + nm.b[i] : y;
    }
}

// out (M, n) = x (M, k) W^T + bias
static void linear(const MyptModel* m, const MyptLinear& l, const float* x, float* out, int64_t M, int threads) {
    if (l.int8) {
        const int64_t at = (M * l.k + 15) / 16 * 16;
        int8_linear(x, (const int8_t*)l.w, l.scale, out, m->qscratch, (float*)(m->qscratch + at), M, l.n, l.k,
                    threads);
    } else {
        fp32_linear(x, (const float*)l.w, out, M, l.n, l.k, threads);
    }
    if (l.bias)
        for (int64_t r = 0; r < M; r++)
            for (int64_t i = 0; i < l.n; i++) out[r * l.n + i] += l.bias[i];
}

// Rotate each pair (v[2j], v[2j + 1]) by the complex number (rot[2j], rot[2j + 1]).
static inline void rotate(float* v, const float* rot, int64_t hs) {
    for (int64_t j = 0; j < hs / 2; j++) {
        const float a = v[2 * j], b = v[2 * j + 1], c = rot[2 * j], s = rot[2 * j + 1];
        v[2 * j] = a * c - b * s;
        v[2 * j + 1] = a * s + b * c;
    }
}

// One head's attention: y (hs) = softmax(q . keys[s] * scale) . values over the first `length` slots.
static void attend(const float* q, const float* keys, const float* values, float* scores, float* y, int64_t length,
                   int64_t hs, float scale) {
    float top = -INFINITY;
    for (int64_t s = 0; s < length; s++) {
        scores[s] = dot(q, keys + s * hs, hs) * scale;
        top = fmaxf(top, scores[s]);
    }
    __m256 sum8 = _mm256_setzero_ps();
    int64_t s = 0;
    for (; s + 8 <= length; s += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + s), _mm256_set1_ps(top)));
        _mm256_storeu_ps(scores + s, e);
        sum8 = _mm256_add_ps(sum8, e);
    }
    float total = hsum(sum8);
    for (; s < length; s++) total += (scores[s] = expf(scores[s] - top));
    for (int64_t i = 0; i < hs; i++) y[i] = 0.f;
    const float inv = 1.f / total;
    for (s = 0; s < length; s++) {
        const float p = scores[s] * inv;
        const float* v = values + s * hs;
        for (int64_t i = 0; i < hs; i++) y[i] += p * v[i];
    }
}

// Greedy decoding's pick: for each of n rows of logits (row i at x + i * stride, `width` values),
// the index of its first largest value, and whether every value is finite (no NaN, no infinity;
// else the index means nothing). Two passes over a row (its maximum and finiteness, then the first
// place it is reached), 8 lanes at a time: torch needs an argmax and two more reductions for this.
void mypt_greedy_rows(const float* x, int64_t n, int64_t width, int64_t stride, int64_t* index, uint8_t* finite) {
    for (int64_t i = 0; i < n; i++) {
        const float* r = x + i * stride;
        __m256 top = _mm256_set1_ps(-INFINITY), bad = _mm256_setzero_ps();
        int64_t k = 0;
        for (; k + 8 <= width; k += 8) {
            const __m256 v = _mm256_loadu_ps(r + k), z = _mm256_mul_ps(v, _mm256_setzero_ps());  // NaN unless finite
            top = _mm256_max_ps(top, v);
            bad = _mm256_or_ps(bad, _mm256_cmp_ps(z, z, _CMP_UNORD_Q));
        }
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        float best = _mm_cvtss_f32(h);
        bool ok = _mm256_movemask_ps(bad) == 0;
        for (; k < width; k++) {
            ok = ok && isfinite(r[k]);
            best = r[k] > best ? r[k] : best;
        }
        finite[i] = ok;
        index[i] = 0;
        if (!ok) continue;
        const __m256 b8 = _mm256_set1_ps(best);
        for (k = 0; k + 8 <= width; k += 8) {
            const int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(r + k), b8, _CMP_EQ_OQ));
            if (mask) break;
        }
        while (r[k] != best) k++;  // within the 8 found above, or in the tail
        index[i] = k;
    }
}

// One query per row for n rows of a KV cache's layer (a server's decoding step): out[i, j] is head j
// of query i attending to the first lengths[i] slots of row rows[i], whose keys start at
// k + rows[i] * row_stride, laid out (n_kv_head, capacity, head_dim). Each row reads only its own
// slots: a batched attention over the rows pads them all to the longest and masks the rest.
void mypt_attend_rows(const float* q, const float* k, const float* v, const int64_t* rows, const int64_t* lengths,
                      float* out, int64_t n, int64_t n_head, int64_t n_kv_head, int64_t capacity, int64_t head_dim,
                      int64_t row_stride, int threads) {
    const int64_t hs = head_dim, group = n_head / n_kv_head;
    const float scale = 1.f / sqrtf((float)hs);
#pragma omp parallel num_threads(threads)
    {
        float* scores = (float*)malloc(capacity * sizeof(float));
#pragma omp for schedule(dynamic, 4)
        for (int64_t ij = 0; ij < n * n_head; ij++) {
            const int64_t i = ij / n_head, j = ij % n_head;
            const int64_t at = rows[i] * row_stride + (j / group) * capacity * hs;
            attend(q + ij * hs, k + at, v + at, scores, out + ij * hs, lengths[i], hs, scale);
        }
        free(scores);
    }
}

// T vectors (T <= mypt.decode_step.MAX_TOKENS), each a token at a position of a cache row: vector t
// is tokens[t] at positions[t] of row rows[t]. Row r's layer-0 keys start at k + r * row_stride (layer l's
// l * layer_stride further on, laid out (n_kv_head, capacity, head_dim)); position p's keys and
// values go to slot p % capacity, and its query attends to the first min(capacity, p + 1) slots of
// its row. The vectors are written and attend in order, each just before it attends, so vectors of
// one row must come in the order of their positions (a token with its drafted successors): none
// sees a later one, and in a full rotary row each sees the capacity positions ending at itself.
// rot: the rotations of the T positions (head_dim / 2 complex numbers each, as (cos, sin) pairs),
// null for learned positions. out (T, n_embd): the final norm's output for each vector.
void mypt_decode_step(const MyptModel* m, const int64_t* tokens, const int64_t* positions, const int64_t* rows,
                      int64_t T, const float* rot, float* k, float* v, int64_t row_stride, int64_t layer_stride,
                      float* out, int threads) {
    const int64_t C = m->n_embd, nh = m->n_head, nkv = m->n_kv_head, hs = m->head_dim, S = m->capacity;
    const int64_t group = nh / nkv, nq = nh * hs, nqkv = nq + 2 * nkv * hs, H = m->hidden;
    const int64_t fc_n = m->layers[0].fc.n;
    const float scale = 1.f / sqrtf((float)hs);
    float* x = m->scratch;  // (T, C) the residual stream
    float* h = x + T * C;  // (T, C)
    float* qkv = h + T * C;  // (T, nqkv)
    float* y = qkv + T * nqkv;  // (T, nq)
    float* f = y + T * nq;  // (T, fc_n)
    float* scores = f + T * fc_n;  // (nh, S)
    for (int64_t t = 0; t < T; t++)
        for (int64_t i = 0; i < C; i++)
            x[t * C + i] = m->wte[tokens[t] * C + i] + (m->wpe ? m->wpe[positions[t] * C + i] : 0.f);
    for (int64_t layer = 0; layer < m->n_layer; layer++) {
        const MyptLayer& L = m->layers[layer];
        for (int64_t t = 0; t < T; t++) apply_norm(L.ln_1, x + t * C, h + t * C, C);
        linear(m, L.attn, h, qkv, T, threads);
        for (int64_t t = 0; t < T; t++) {
            float* row = qkv + t * nqkv;  // queries, keys, values
            for (int64_t j = 0; j < nh + nkv; j++) {  // each query head, then each key head
                const MyptNorm& nm = j < nh ? L.q_norm : L.k_norm;
                if (nm.w) apply_norm(nm, row + j * hs, row + j * hs, hs);
                if (rot) rotate(row + j * hs, rot + t * hs, hs);
            }
            const int64_t p = positions[t], slot = p % S, length = p + 1 < S ? p + 1 : S;
            float* kc = k + rows[t] * row_stride + layer * layer_stride;
            float* vc = v + rows[t] * row_stride + layer * layer_stride;
            for (int64_t g = 0; g < nkv; g++) {
                memcpy(kc + (g * S + slot) * hs, row + nq + g * hs, hs * sizeof(float));
                memcpy(vc + (g * S + slot) * hs, row + nq + (nkv + g) * hs, hs * sizeof(float));
            }
#pragma omp parallel for schedule(static) num_threads(threads)
            for (int64_t j = 0; j < nh; j++)
                attend(row + j * hs, kc + (j / group) * S * hs, vc + (j / group) * S * hs, scores + j * S,
                       y + t * nq + j * hs, length, hs, scale);
        }
        linear(m, L.attn_proj, y, h, T, threads);
        for (int64_t i = 0; i < T * C; i++) x[i] += h[i];
        for (int64_t t = 0; t < T; t++) apply_norm(L.ln_2, x + t * C, h + t * C, C);
        linear(m, L.fc, h, f, T, threads);
        for (int64_t t = 0; t < T; t++) {
            float* r = f + t * fc_n;
            if (m->mlp == 1) {
                for (int64_t i = 0; i < H; i++) r[i] = r[i] > 0.f ? r[i] * r[i] : 0.f;
            } else {  // SwiGLU: silu(gate) * up, written over the gate half (row t's H values at f + t * fc_n)
                gelu_or_silu(r, m->mlp == 2 ? r + H : nullptr, H, m->mlp == 0);
            }
        }
        if (m->mlp == 2)  // the products want the T rows of H values contiguous
            for (int64_t t = 1; t < T; t++) memmove(f + t * H, f + t * fc_n, H * sizeof(float));
        linear(m, L.mlp_proj, f, h, T, threads);
        for (int64_t i = 0; i < T * C; i++) x[i] += h[i];
    }
    for (int64_t t = 0; t < T; t++) apply_norm(m->ln_f, x + t * C, out + t * C, C);
}

}
