/* Few-row bf16 matrix products on CPUs with AVX512-BF16, for decoding (see bf16_rows.py).

   out[s, n] = sum_k x[s, k] * W_g[n, k] for the rows s of group g (rows sorted by group, `counts`
   rows per group; groups with no rows are skipped), each W_g [N, K] packed in 64-byte vectors of 16
   outputs by 2 inputs (one vdpbf16ps per pair of inputs and 16 outputs, the row's pair of inputs
   broadcast), ordered [N/64][K/2][4][16][2]: each 64 outputs are one sequential stream (the last
   group may hold fewer than 4 blocks). Products accumulate in float32 and are rounded once to bf16
   (round to nearest even), as oneDNN's bf16 products do.

   One call covers every group (all routed experts of a layer) with no per-product setup; work items
   are (group, 64 outputs) and are shared among OpenMP threads. */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef uint16_t bf16;

int sf_bf16_rows_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
}

#define ROWS 6 /* rows per register block: 4 x 6 accumulators + 4 weight vectors fit in 32 registers */

/* NB blocks of 16 outputs x R rows of x; block b's pair kp of inputs at w + kp * kstride + 32 * b. */
#define DEFINE_BLOCK(NB, R)                                                                          \
    static void block_##NB##_##R(const bf16 *x, int64_t K, const bf16 *w, int64_t kstride, bf16 *out, \
                                 int64_t N) {                                                        \
        __m512 acc[NB][R];                                                                           \
        for (int b = 0; b < NB; b++)                                                                 \
            for (int r = 0; r < R; r++) acc[b][r] = _mm512_setzero_ps();                             \
        const int32_t *pairs = (const int32_t *)x;                                                   \
        const int64_t half = K / 2;                                                                  \
        for (int64_t kp = 0; kp < half; kp++) {                                                      \
            __m512bh wv[NB];                                                                         \
            for (int b = 0; b < NB; b++)                                                             \
                wv[b] = (__m512bh)_mm512_loadu_si512((const void *)(w + kp * kstride + b * 32));     \
            for (int r = 0; r < R; r++) {                                                            \
                __m512bh xv = (__m512bh)_mm512_set1_epi32(pairs[r * half + kp]);                     \
                for (int b = 0; b < NB; b++) acc[b][r] = _mm512_dpbf16_ps(acc[b][r], xv, wv[b]);     \
            }                                                                                        \
        }                                                                                            \
        for (int b = 0; b < NB; b++)                                                                 \
            for (int r = 0; r < R; r++)                                                              \
                _mm256_storeu_si256((__m256i *)(out + r * N + b * 16),                               \
                                    (__m256i)_mm512_cvtneps_pbh(acc[b][r]));                         \
    }

DEFINE_BLOCK(4, 1)
DEFINE_BLOCK(4, 2)
DEFINE_BLOCK(4, 3)
DEFINE_BLOCK(4, 4)
DEFINE_BLOCK(4, 5)
DEFINE_BLOCK(4, 6)
DEFINE_BLOCK(1, 1)
DEFINE_BLOCK(1, 2)
DEFINE_BLOCK(1, 3)
DEFINE_BLOCK(1, 4)
DEFINE_BLOCK(1, 5)
DEFINE_BLOCK(1, 6)

typedef void (*block_fn)(const bf16 *, int64_t, const bf16 *, int64_t, bf16 *, int64_t);
static const block_fn BLOCKS4[ROWS] = {block_4_1, block_4_2, block_4_3, block_4_4, block_4_5, block_4_6};
static const block_fn BLOCKS1[ROWS] = {block_1_1, block_1_2, block_1_3, block_1_4, block_1_5, block_1_6};

/* Rows [row, row + count) of a weight through outputs [16 * nb0, 16 * (nb0 + nbs)), nb0 a multiple of 4:
   one packed group of nbs <= 4 blocks, which starts at w + 16 * nb0 * K, its pair kp of inputs for its
   nbs blocks side by side (nbs * 32 elements). */
static void item(const bf16 *x, int64_t K, int64_t row, int64_t count, const bf16 *w, int64_t N, int64_t nb0,
                 int64_t nbs, bf16 *out) {
    const bf16 *group = w + 16 * nb0 * K;
    const int64_t kstride = 32 * nbs;
    for (int64_t r0 = 0; r0 < count; r0 += ROWS) {
        const int64_t R = count - r0 < ROWS ? count - r0 : ROWS;
        const bf16 *xr = x + (row + r0) * K;
        bf16 *o = out + (row + r0) * N + 16 * nb0;
        if (nbs == 4)
            BLOCKS4[R - 1](xr, K, group, kstride, o, N);
        else
            for (int64_t b = 0; b < nbs; b++) BLOCKS1[R - 1](xr, K, group + 32 * b, kstride, o + 16 * b, N);
    }
}

/* x [S, K] bf16 (rows sorted by group), counts [G] rows per group, weights of group g at
   w + g * group_stride (each [N/16][K/2][16][2]), out [S, N] bf16. N % 16 == 0, K % 2 == 0. */
void sf_bf16_grouped_rows(const bf16 *x, int64_t K, const int64_t *counts, int64_t G, const bf16 *w,
                          int64_t group_stride, int64_t N, bf16 *out, int threads) {
    const int64_t blocks = N / 16, per_item = 4, items_per_group = (blocks + per_item - 1) / per_item;
    int64_t busy = 0;
    for (int64_t g = 0; g < G; g++) busy += counts[g] > 0;
    int64_t starts[G > 0 ? G : 1];
    int64_t groups[G > 0 ? G : 1];
    int64_t row = 0, n = 0;
    for (int64_t g = 0; g < G; g++) {
        if (counts[g] > 0) {
            starts[n] = row;
            groups[n++] = g;
        }
        row += counts[g];
    }
    const int64_t items = busy * items_per_group;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && items > 1)
    for (int64_t i = 0; i < items; i++) {
        const int64_t j = i / items_per_group, nb0 = (i % items_per_group) * per_item;
        const int64_t nbs = blocks - nb0 < per_item ? blocks - nb0 : per_item;
        const int64_t g = groups[j];
        item(x, K, starts[j], counts[g], w + g * group_stride, N, nb0, nbs, out);
    }
}

/* The 16 x 16 tile of 32-bit values r[j] (row j) transposed in place: r[c] becomes column c. */
static inline void transpose16(__m512i r[16]) {
    __m512i t[16], u[16];
    for (int j = 0; j < 16; j += 2) {
        t[j] = _mm512_unpacklo_epi32(r[j], r[j + 1]);
        t[j + 1] = _mm512_unpackhi_epi32(r[j], r[j + 1]);
    }
    for (int j = 0; j < 16; j += 4) { /* u[j + c]: per 128-bit lane L, column 4 L + c of rows j..j+3 */
        u[j] = _mm512_unpacklo_epi64(t[j], t[j + 2]);
        u[j + 1] = _mm512_unpackhi_epi64(t[j], t[j + 2]);
        u[j + 2] = _mm512_unpacklo_epi64(t[j + 1], t[j + 3]);
        u[j + 3] = _mm512_unpackhi_epi64(t[j + 1], t[j + 3]);
    }
    for (int c = 0; c < 4; c++) {
        const __m512i v = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x88), w = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xDD);
        const __m512i v2 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x88);
        const __m512i w2 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xDD);
        r[c] = _mm512_shuffle_i32x4(v, v2, 0x88);
        r[8 + c] = _mm512_shuffle_i32x4(v, v2, 0xDD);
        r[4 + c] = _mm512_shuffle_i32x4(w, w2, 0x88);
        r[12 + c] = _mm512_shuffle_i32x4(w, w2, 0xDD);
    }
}

/* One group's weights into its stream: rows `src` [16 nbs, K] (bf16 pairs, row stride `half` pairs) to
   `dst`: for each pair kp of inputs, the group's blocks side by side, each 16 outputs x 2 inputs. Each
   block is transposed by tiles of 16 outputs x 16 pairs in registers. */
static void pack_group(const uint32_t *src, int64_t half, int64_t nbs, uint32_t *dst) {
    __m512i r[16];
    for (int64_t b = 0; b < nbs; b++)
        for (int64_t k0 = 0; k0 < half; k0 += 16) {
            const int64_t n = half - k0 < 16 ? half - k0 : 16;
            const __mmask16 m = (__mmask16)((1u << n) - 1);
            for (int j = 0; j < 16; j++) r[j] = _mm512_maskz_loadu_epi32(m, src + (16 * b + j) * half + k0);
            transpose16(r);
            for (int64_t c = 0; c < n; c++) _mm512_storeu_si512((void *)(dst + ((k0 + c) * nbs + b) * 16), r[c]);
        }
}

/* Pack `matrices` weights [N, K] bf16 (contiguous, one after another) into the layout above, in place in
   `out`: per group of 4 blocks of 16 outputs (fewer in the last), for each pair kp of inputs, the
   group's blocks side by side, each 16 outputs x 2 inputs; a group is then one sequential stream. */
void sf_bf16_pack(const bf16 *w, int64_t matrices, int64_t N, int64_t K, bf16 *out, int threads) {
    const int64_t half = K / 2, blocks = N / 16, groups = (blocks + 3) / 4;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && matrices * groups > 1)
    for (int64_t item = 0; item < matrices * groups; item++) {
        const int64_t m = item / groups, g = item % groups, at = m * N * half + 64 * g * half;
        pack_group((const uint32_t *)w + at, half, blocks - 4 * g < 4 ? blocks - 4 * g : 4, (uint32_t *)out + at);
    }
}

/* 16 float32 values to bf16 rounded to nearest even exactly as PyTorch's vectorised copy (NaN -> 0xFFFF,
   subnormals kept: the AVX512-BF16 conversion instructions would flush them to zero). */
static inline __m256i bf16_of(__m512 x) {
    const __m512i bits = _mm512_castps_si512(x);
    const __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1)),
                                          _mm512_set1_epi32(0x7FFF));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, bias), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0xFFFF));
    return _mm512_cvtepi32_epi16(r);
}

/* `sf_bf16_pack` from float32 weights, writing their bf16 copy `plain` [matrices, N, K] too, in one pass
   over the float32 weights: each group's rows are rounded into `plain`, then packed from there while
   they are in cache. */
void sf_bf16_pack_f32(const float *w, int64_t matrices, int64_t N, int64_t K, bf16 *plain, bf16 *out, int threads) {
    const int64_t half = K / 2, blocks = N / 16, groups = (blocks + 3) / 4;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && matrices * groups > 1)
    for (int64_t item = 0; item < matrices * groups; item++) {
        const int64_t m = item / groups, g = item % groups, nbs = blocks - 4 * g < 4 ? blocks - 4 * g : 4;
        const int64_t first = m * N * K + 64 * g * K, count = 16 * nbs * K;
        for (int64_t k = 0; k < count; k += 16) /* the group's rows, contiguous */
            _mm256_storeu_si256((__m256i *)(plain + first + k), bf16_of(_mm512_loadu_ps(w + first + k)));
        pack_group((const uint32_t *)(plain + first), half, nbs, (uint32_t *)(out + first));
    }
}

/* out [M, N] = x [M, K] times one packed weight: the grouped product with a single group. */
void sf_bf16_rows(const bf16 *x, int64_t M, int64_t K, const bf16 *w, int64_t N, bf16 *out, int threads) {
    sf_bf16_grouped_rows(x, K, &M, 1, w, 0, N, out, threads);
}

/* exp(x) for float32 lanes: x = n ln2 + f with |f| <= ln2 / 2, e^f by its Taylor polynomial to degree 7
   (relative error < 2e-7 there), times 2^n; -inf gives 0. */
static inline __m512 exp_ps(__m512 x) {
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
    const __m512 ln2_hi = _mm512_set1_ps(0.693359375f), ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f)); /* below this e^x is 0 in float32 */
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_fnmadd_ps(n, ln2_hi, x);
    f = _mm512_fnmadd_ps(n, ln2_lo, f);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

static inline __m512 bf16_to_ps(__m256i v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

/* Attention of every query row over a batch row's latent, the latent being both key and value (MLA's
   absorbed decode): for batch row b and query row i (step position t = i / heads),
   out[b, i] = softmax_j(scale * q[b, i] . latent[b, j] | mask[b, t, j]) . latent[b, j, :r].
   q [B, R, D], latent rows D apart and `latent_stride` apart per batch row (the first S used), mask
   [B or 1, T, S] bytes (1 = may attend; NULL: every key) `mask_stride` apart per batch row, out
   [B, R, r]. Scores, softmax and sums in float32 (products of bf16 exact), out rounded to bf16.
   `scores` is scratch of threads x S floats. */
void sf_latent_attention(const bf16 *q, int64_t B, int64_t R, int64_t D, const bf16 *latent, int64_t latent_stride,
                         int64_t S, int64_t r, const uint8_t *mask, int64_t mask_stride, int64_t heads, float scale,
                         bf16 *out, float *scores, int threads) {
    const int64_t chunks = (D + 31) / 32, out_chunks = (r + 15) / 16;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && B * R > 1)
    for (int64_t item = 0; item < B * R; item++) {
#ifdef _OPENMP
        float *s = scores + (int64_t)omp_get_thread_num() * S;
#else
        float *s = scores;
#endif
        const int64_t b = item / R, i = item % R;
        const bf16 *qi = q + item * D, *kv = latent + b * latent_stride;
        const uint8_t *allowed = mask ? mask + b * mask_stride + (i / heads) * S : NULL;
        float top = -INFINITY;
        for (int64_t j = 0; j < S; j++) {
            if (allowed && !allowed[j]) {
                s[j] = -INFINITY;
                continue;
            }
            __m512 acc = _mm512_setzero_ps();
            for (int64_t c = 0; c < chunks; c++) {
                const int64_t left = D - 32 * c;
                const __mmask32 m = left >= 32 ? 0xFFFFFFFFu : ((1u << left) - 1);
                const __m512bh a = (__m512bh)_mm512_maskz_loadu_epi16(m, qi + 32 * c);
                const __m512bh k = (__m512bh)_mm512_maskz_loadu_epi16(m, kv + j * D + 32 * c);
                acc = _mm512_dpbf16_ps(acc, a, k);
            }
            s[j] = _mm512_reduce_add_ps(acc) * scale;
            top = s[j] > top ? s[j] : top;
        }
        bf16 *o = out + item * r;
        if (top == -INFINITY) { /* no key allowed (callers always allow one): zeros, not NaN */
            for (int64_t c = 0; c < r; c++) o[c] = 0;
            continue;
        }
        float total = 0.0f;
        int64_t j = 0;
        const __m512 top_v = _mm512_set1_ps(top);
        for (; j + 16 <= S; j += 16) {
            const __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(s + j), top_v));
            _mm512_storeu_ps(s + j, e);
            total += _mm512_reduce_add_ps(e);
        }
        if (j < S) {
            const __mmask16 m = (__mmask16)((1u << (S - j)) - 1);
            const __m512 e = _mm512_maskz_mov_ps(m, exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j), top_v)));
            _mm512_mask_storeu_ps(s + j, m, e);
            total += _mm512_reduce_add_ps(e);
        }
        const float inv = 1.0f / total;
        for (int64_t c0 = 0; c0 < out_chunks; c0 += 8) {
            const int64_t n = out_chunks - c0 < 8 ? out_chunks - c0 : 8;
            __m512 acc[8];
            for (int64_t c = 0; c < n; c++) acc[c] = _mm512_setzero_ps();
            for (int64_t jj = 0; jj < S; jj++) {
                if (s[jj] == 0.0f) continue;
                const __m512 p = _mm512_set1_ps(s[jj]);
                const bf16 *v = kv + jj * D;
                for (int64_t c = 0; c < n; c++) {
                    const int64_t start = 16 * (c0 + c), left = r - start;
                    const __mmask16 m = left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1);
                    acc[c] = _mm512_fmadd_ps(p, bf16_to_ps(_mm256_maskz_loadu_epi16(m, v + start)), acc[c]);
                }
            }
            for (int64_t c = 0; c < n; c++) {
                const int64_t start = 16 * (c0 + c), left = r - start;
                const __mmask16 m = left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1);
                _mm256_mask_storeu_epi16(o + start, m, (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[c], _mm512_set1_ps(inv))));
            }
        }
    }
}

/* RMSNorm of bf16 rows as `layers.RMSNorm` computes it: y = bf16(x * 1 / sqrt(mean(x^2) + eps)) in float32,
   out = bf16(weight * y). x rows of `dim` values `stride` apart, out [rows, dim] contiguous. */
void sf_bf16_rms_norm(const bf16 *x, int64_t rows, int64_t dim, int64_t stride, const bf16 *weight, float eps,
                      bf16 *out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && rows * dim > 65536)
    for (int64_t row = 0; row < rows; row++) {
        const bf16 *xr = x + row * stride;
        bf16 *o = out + row * dim;
        __m512 squares = _mm512_setzero_ps();
        for (int64_t c = 0; c < dim; c += 16) {
            const __mmask16 m = dim - c >= 16 ? 0xFFFF : (__mmask16)((1u << (dim - c)) - 1);
            const __m512 v = bf16_to_ps(_mm256_maskz_loadu_epi16(m, xr + c));
            squares = _mm512_fmadd_ps(v, v, squares);
        }
        const float scale = 1.0f / sqrtf(_mm512_reduce_add_ps(squares) / (float)dim + eps);
        const __m512 s = _mm512_set1_ps(scale);
        for (int64_t c = 0; c < dim; c += 16) {
            const __mmask16 m = dim - c >= 16 ? 0xFFFF : (__mmask16)((1u << (dim - c)) - 1);
            const __m512 y = bf16_to_ps((__m256i)_mm512_cvtneps_pbh(
                _mm512_mul_ps(bf16_to_ps(_mm256_maskz_loadu_epi16(m, xr + c)), s)));
            const __m512 w = bf16_to_ps(_mm256_maskz_loadu_epi16(m, weight + c));
            _mm256_mask_storeu_epi16(o + c, m, (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(w, y)));
        }
    }
}

/* RoPE of adjacent pairs (DeepSeek's layout) for bf16 x [P positions][H heads][D] (positions `pos_stride`
   apart, heads `head_stride` apart, each head's D values contiguous) with float32 cos, sin [P][D/2]:
   pair j = (a, b) = (x[2j], x[2j+1]) becomes out[j] = a cos_j - b sin_j, out[D/2 + j] = a sin_j + b cos_j
   (each product and sum rounded in float32, as the complex product a + ib times cos + i sin), out
   [P][H][D] contiguous in bf16. */
void sf_bf16_rope_pairs(const bf16 *x, int64_t P, int64_t H, int64_t D, int64_t pos_stride, int64_t head_stride,
                        const float *cos, const float *sin, bf16 *out) {
    const int64_t half = D / 2;
    for (int64_t p = 0; p < P; p++)
        for (int64_t h = 0; h < H; h++) {
            const uint32_t *pairs = (const uint32_t *)(x + p * pos_stride + h * head_stride);
            bf16 *o = out + (p * H + h) * D;
            for (int64_t j = 0; j < half; j += 16) {
                const __mmask16 m = half - j >= 16 ? 0xFFFF : (__mmask16)((1u << (half - j)) - 1);
                const __m512i v = _mm512_maskz_loadu_epi32(m, pairs + j);
                const __m512 a = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
                const __m512 b = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xFFFF0000u)));
                const __m512 c = _mm512_maskz_loadu_ps(m, cos + p * half + j);
                const __m512 s = _mm512_maskz_loadu_ps(m, sin + p * half + j);
                const __m512 re = _mm512_sub_ps(_mm512_mul_ps(a, c), _mm512_mul_ps(b, s));
                const __m512 im = _mm512_add_ps(_mm512_mul_ps(a, s), _mm512_mul_ps(b, c));
                _mm256_mask_storeu_epi16(o + j, m, (__m256i)_mm512_cvtneps_pbh(re));
                _mm256_mask_storeu_epi16(o + half + j, m, (__m256i)_mm512_cvtneps_pbh(im));
            }
        }
}
