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

#define QBLOCK 32

extern "C" {

// x (M, K) fp32 -> xq (M, K) int8 and xs (M, ceil(K / 32)) fp32: x ~ xq * xs per block of 32.
static void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* xq, float* xs) {
    const int64_t nb = (K + QBLOCK - 1) / QBLOCK;
    for (int64_t m = 0; m < M; m++) {
        for (int64_t b = 0; b < nb; b++) {
            const int64_t k0 = b * QBLOCK, k1 = k0 + QBLOCK < K ? k0 + QBLOCK : K;
            const float* xr = x + m * K;
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
void mypt_int8_linear(const float* x, const int8_t* w, const float* wscale, float* out, int8_t* xq, float* xs,
                      int64_t M, int64_t N, int64_t K, int threads) {
    quantize_rows(x, M, K, xq, xs);
    const int64_t nb = (K + QBLOCK - 1) / QBLOCK;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const int8_t* wr = w + n * K;
        for (int64_t m = 0; m < M; m++) out[m * N + n] = dot_row(wr, xq + m * K, xs + m * nb, K) * wscale[n];
    }
}

// out (M, N) = x (M, K) @ W.T for W fp32 (N, K) row-major.
void mypt_fp32_linear(const float* x, const float* w, float* out, int64_t M, int64_t N, int64_t K, int threads) {
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

}
