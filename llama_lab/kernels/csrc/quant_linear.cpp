// Weight-only quantized matrix products for the CPU: 4-bit and 8-bit weights in groups of 32, computed
// as llama.cpp computes them (activations quantized per group, integer dot products, one float multiply
// per group) but with int16 activations where llama.cpp uses int8: _mm256_madd_epi16 takes 16 int16
// pairs per instruction, so a group costs about the same instructions as maddubs on int8, and the
// activations' rounding error drops from 1/127 to 1/32767 of the group's largest value. The answers are
// then those of the dequantized float weights (with int8 activations, SmolLM2's greedy answers changed).
// An AVX2 path runs on every x86-64 CPU of the last decade; CPUs with AVX512BW (and VNNI) get 512-bit loops.
// A batch of 4 to 31 rows on a CPU with AVX512-BF16 takes bf16 tiles instead (bf16_tiles, below): the weights
// dequantized in registers and multiplied in bf16, the numbers of the bf16 GEMM that prompt chunks use.
// A batch of 2 to 127 rows on a CPU without AVX512-BF16 takes int8 tiles (below): llama.cpp's own int8
// activations, with 16 (AVX512-VNNI) or 8 (AVX2, q4/q5 from 4 rows) weight rows per vector ("column lanes"), else
// two groups per multiply-add chain; one row (a single stream) stays int16 everywhere.
//
// Why by hand: torch's own weight-only CPU ops (_weight_int8pack_mm, _weight_int4pack_mm_for_cpu) have a
// fast path only for AVX512; on an AVX2 CPU they run slower than the fp32 product they replace
// (docs/engine.md has the figures and the command). A decode step is a matrix-vector product per weight:
// the time is the weight bytes read, so 4.5-bit weights beat 32-bit ones only if unpacking them costs
// less than the bandwidth saved, which takes integer SIMD.
//
// Layouts (made by llama_lab/engine/quant.py from GGUF blocks or from float weights):
//   q4: qs uint8 [N, K/2]: group g of row n is 16 bytes; byte j holds element j (low nibble) and element
//       j+16 (high nibble), as GGUF's Q4_0/Q4_1 blocks; d, m float16 [N, K/32]: w = d * q + m.
//   q8: qs int8 [N, K]; d float16 [N, K/32]: w = d * q.
//   q5: q4's qs, d and m for the low four bits, and qh uint8 [N, K/8]: a group's four bytes are one
//       little-endian 32-bit word whose bit j is element j's fifth bit (GGUF's Q5_0/Q5_1 qh): w = d * q + m,
//       q in 0..31.
//   q4 and q5 without m (GGUF's Q4_0 and Q5_0, whose minimum is the scale times minus half the range):
//       m = -8 d (q4) or -16 d (q5), so those files are not charged 2 bytes per group for a copy of d.
// x is float32 [M, K]; the result is float32 [M, N]. K must be a multiple of 32.
// Per-operator headers, not <ATen/ATen.h>: the kernels build on a machine's first start, and the
// whole operator set takes that compile from ~20 s to ~10 s.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <utility>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define LLAMA_LAB_AVX2 1
// AVX512BW (Skylake-X, Ice Lake, Sapphire Rapids, Zen 4): one group of 32 int16 products per instruction,
// and with AVX512-VNNI the multiply and the add are one (vpdpwssd). The AVX2 code stays for the rest.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__BMI2__)
#define LLAMA_LAB_AVX512 1
// AVX512-BF16 (Zen 4 and 5, Cooper Lake, Sapphire Rapids): the bf16 tiles for batches (see bf16_tiles).
#ifdef __AVX512BF16__
#define LLAMA_LAB_BF16_TILES 1
#endif
#endif
// Every other AVX2 CPU (Zen 2 and 3, Haswell to Alder Lake, and AVX512 without BF16: Skylake-X to Ice Lake):
// the int8 tiles for batches (see int8 tiles).
#ifndef LLAMA_LAB_BF16_TILES
#define LLAMA_LAB_INT8_TILES 1
// With AVX512-VNNI (Cascade Lake, Ice Lake): one vpdpbusd multiplies four elements of 16 weight rows and sums
// four products per 32-bit lane (see int8 tiles).
#if defined(LLAMA_LAB_AVX512) && defined(__AVX512VNNI__)
#define LLAMA_LAB_INT8_VNNI 1
#endif
#endif
#endif

namespace {

constexpr int64_t kGroup = 32;
// Activation rows that share one unpacked weight group: eight where 32 vector registers hold their sums.
#ifdef LLAMA_LAB_AVX512
constexpr int64_t kRowTile = 8;
#else
constexpr int64_t kRowTile = 4;
#endif
#ifdef LLAMA_LAB_BF16_TILES
// From this many activation rows on, the bf16 tiles beat the int16 ones (at 2 rows they were up to 30% slower, at
// 4 as fast or faster, at 16 1.2-2x faster: bench/kernel_bench.py --rows, docs/engine.md).
constexpr int64_t kBf16TileRows = 4;
#endif
#ifdef LLAMA_LAB_INT8_TILES
// From this many activation rows on, the int8 tiles: a batch, never a single stream (see int8 tiles).
constexpr int64_t kInt8TileRows = 2;
#endif
constexpr int64_t kColTile = 16;   // weight rows per work item: their bytes stay in cache across row tiles
constexpr int64_t kGemmTile = 1024;  // weight rows dequantized at a time on that path
constexpr int64_t kMaxGroups = 1024;  // K up to 32768 (an 8B model's widest is 14336)

// A q5 group's fifth bits: its four qh bytes as one little-endian word, bit j for element j.
inline uint32_t high_bits(const uint8_t* qh) {
  uint32_t bits;
  std::memcpy(&bits, qh, 4);
  return bits;
}

// The minimum of a q4 or q5 group stored without one (GGUF's Q4_0, Q5_0), in units of its scale.
template <bool kHigh>
constexpr float implicit_offset() {
  return kHigh ? 16.f : 8.f;
}

// Weight row n of a q4 (kHigh false) or q5 matrix as the tiles read it. A minimum stored without one (GGUF's Q4_0,
// Q5_0) is -offset * d: the min terms then read the scales (m = d) with that factor instead of 1.
template <bool kHigh>
struct NibbleRow {
  const uint8_t* q;   // K/2 bytes of nibbles
  const uint8_t* h;   // K/8 bytes of fifth bits (q5), else nullptr
  const at::Half* d;  // a scale per group
  const at::Half* m;  // a minimum per group, or the scales where minimums are implicit
  float mfactor;
  NibbleRow(const uint8_t* qs, const uint8_t* qh, const at::Half* ds, const at::Half* ms, int64_t K, int64_t n)
      : q(qs + n * (K / 2)), h(kHigh ? qh + n * (K / 8) : nullptr), d(ds + n * (K / kGroup)),
        m(ms ? ms + n * (K / kGroup) : d), mfactor(ms ? 1.f : -implicit_offset<kHigh>()) {}
};

inline float half_to_float(const at::Half h) {
#ifdef LLAMA_LAB_AVX2
  return _cvtsh_ss(h.x);
#else
  return static_cast<float>(h);
#endif
}

// ---------------------------------------------------------------------------------------------
// Activations: each row of x becomes int16 groups with one scale each (and the group's exact float sum,
// which the q4 minimum term needs).
struct QuantizedRows {
  std::vector<int16_t> q;    // [M, K]
  std::vector<float> scale;  // [M, K/32]
  std::vector<float> sum;    // [M, K/32]
  std::vector<int16_t> paired;  // [M, K]: q's groups two by two in the AVX512 q4 loop's order (pair_groups)
};

#ifdef LLAMA_LAB_AVX2
// A group's 32 values loaded into v, and their largest |x| (returned) and their sum: what both activation
// quantizers (int16 here, int8 for the int8 tiles) scale by and keep.
inline float load_group(const float* x, __m256 (&v)[4], float* sum) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 amax = _mm256_setzero_ps(), s = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(x + 8 * i);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
    s = _mm256_add_ps(s, v[i]);
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
  *sum = _mm_cvtss_f32(s4);
  return _mm_cvtss_f32(m4);
}
#endif

void quantize_group(const float* x, int16_t* q, float* scale, float* sum) {
#ifdef LLAMA_LAB_AVX2
  __m256 v[4];
  const float mx = load_group(x, v, sum);
  const float d = mx / 32767.f;
  *scale = d;
  const __m256 inv = _mm256_set1_ps(d != 0.f ? 1.f / d : 0.f);
  __m256i i32[4];
  for (int i = 0; i < 4; ++i) i32[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], inv), _MM_ROUND_NEAREST));
  // pack 32 x int32 -> 32 x int16 in order (packs interleave 128-bit lanes; the permute restores the order)
  const __m256i a = _mm256_permute4x64_epi64(_mm256_packs_epi32(i32[0], i32[1]), 0xD8);
  const __m256i b = _mm256_permute4x64_epi64(_mm256_packs_epi32(i32[2], i32[3]), 0xD8);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), a);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 16), b);
#else
  float mx = 0.f, s = 0.f;
  for (int i = 0; i < kGroup; ++i) {
    mx = std::max(mx, std::fabs(x[i]));
    s += x[i];
  }
  *sum = s;
  const float d = mx / 32767.f;
  *scale = d;
  const float inv = d != 0.f ? 1.f / d : 0.f;
  for (int i = 0; i < kGroup; ++i) q[i] = static_cast<int16_t>(std::nearbyint(x[i] * inv));
#endif
}

// The AVX512 q4 loop multiplies two groups (g, g+1) at once, so that one float conversion and one FMA serve
// both: its int32 lanes alternate between them (even lanes g, odd lanes g+1), which takes the int16 pairs
// interleaved: lanes 4k..4k+3 of the first 32 are g's elements 2k, 2k+1 and g+1's 2k, 2k+1 (k < 8), the
// next 32 the same for elements 16 + 2k. An odd last group stays in q's order.
void pair_groups(const int16_t* q, int16_t* out, int64_t groups) {
  for (int64_t g = 0; g + 2 <= groups; g += 2) {
    const int16_t *a = q + g * kGroup, *b = a + kGroup;
    int16_t* o = out + g * kGroup;
    for (int half = 0; half < 2; ++half)
      for (int k = 0; k < 8; ++k) {
        const int e = 16 * half + 2 * k;
        int16_t* p = o + 32 * half + 4 * k;
        p[0] = a[e], p[1] = a[e + 1], p[2] = b[e], p[3] = b[e + 1];
      }
  }
}

QuantizedRows quantize_rows(const float* x, int64_t M, int64_t K, bool paired = false) {
  const int64_t groups = K / kGroup;
  QuantizedRows r{std::vector<int16_t>(M * K), std::vector<float>(M * groups), std::vector<float>(M * groups), {}};
  at::parallel_for(0, M * groups, 256, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g)
      quantize_group(x + g * kGroup, r.q.data() + g * kGroup, r.scale.data() + g, r.sum.data() + g);
  });
  if (paired) {
    r.paired.resize(M * K);
    for (int64_t i = 0; i < M; ++i) pair_groups(r.q.data() + i * K, r.paired.data() + i * K, groups);
  }
  return r;
}

// ---------------------------------------------------------------------------------------------
// Integer dot products of one group of 32.
#ifdef LLAMA_LAB_AVX2
// A group's 32 weights as two vectors of 16 int16 (elements 0..15, 16..31). Each byte widened to 16 bits
// holds element j in its low nibble and element j+16 in its high one, so one widening, a mask and a shift
// give both halves: three instructions where widening each nibble half separately takes five.
inline void unpack_q4(const uint8_t* p, __m256i& lo, __m256i& hi) {
  const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  lo = _mm256_and_si256(b, _mm256_set1_epi16(0x0F));
  hi = _mm256_srli_epi16(b, 4);
}

inline void unpack_q8(const int8_t* p, __m256i& lo, __m256i& hi) {
  lo = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  hi = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)));
}

// q4's unpacking plus the fifth bits: 16 in each int16 lane whose bit is set (a broadcast, an and and a
// compare give the lanes of one 16-bit half of the word).
inline void unpack_q5(const uint8_t* p, uint32_t bits, __m256i& lo, __m256i& hi) {
  unpack_q4(p, lo, hi);
  const __m256i lanes = _mm256_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384,
                                          static_cast<int16_t>(0x8000));
  const __m256i sixteen = _mm256_set1_epi16(16);
  const __m256i b0 = _mm256_and_si256(_mm256_set1_epi16(static_cast<int16_t>(bits & 0xFFFF)), lanes);
  const __m256i b1 = _mm256_and_si256(_mm256_set1_epi16(static_cast<int16_t>(bits >> 16)), lanes);
  lo = _mm256_add_epi16(lo, _mm256_and_si256(_mm256_cmpeq_epi16(b0, lanes), sixteen));
  hi = _mm256_add_epi16(hi, _mm256_and_si256(_mm256_cmpeq_epi16(b1, lanes), sixteen));
}

// 8 partial sums of a group's 32 int16 products, as floats. |w| <= 128, |x| <= 32767: each int32 lane
// adds four products, far from overflow.
inline __m256 dot_group(const __m256i wlo, const __m256i whi, const int16_t* x) {
  const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16));
  return _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_madd_epi16(wlo, x0), _mm256_madd_epi16(whi, x1)));
}

inline float hsum(const __m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

#ifdef LLAMA_LAB_AVX512
// acc + w0 . x0 + w1 . x1 over int16 pairs, per int32 lane.
inline __m512i dot2_512(const __m512i w0, const int16_t* x0, const __m512i w1, const int16_t* x1) {
  const __m512i a = _mm512_loadu_si512(x0), b = _mm512_loadu_si512(x1);
#ifdef __AVX512VNNI__
  return _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(_mm512_setzero_si512(), w0, a), w1, b);
#else
  return _mm512_add_epi32(_mm512_madd_epi16(w0, a), _mm512_madd_epi16(w1, b));
#endif
}

// w . x over int16 pairs, per int32 lane: one group of 32.
inline __m512i dot1_512(const __m512i w, const int16_t* x) {
#ifdef __AVX512VNNI__
  return _mm512_dpwssd_epi32(_mm512_setzero_si512(), w, _mm512_loadu_si512(x));
#else
  return _mm512_madd_epi16(w, _mm512_loadu_si512(x));
#endif
}

// Groups g and g+1 of a q4 row (32 bytes) as two vectors in pair_groups' order: the bytes widened to int16,
// their 32-bit units interleaved (g's unit k, then g+1's), then the low nibbles and the high ones.
inline void unpack_q4_pair(const uint8_t* p, __m512i& lo, __m512i& hi) {
  const __m512i order = _mm512_set_epi32(15, 7, 14, 6, 13, 5, 12, 4, 11, 3, 10, 2, 9, 1, 8, 0);
  const __m512i b = _mm512_permutexvar_epi32(order, _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
  lo = _mm512_and_si512(b, _mm512_set1_epi16(0x0F));
  hi = _mm512_srli_epi16(b, 4);
}

// [s[0], s[1]] repeated: the scales of the even (group g) and odd (group g+1) lanes.
inline __m512 pair_scales(const float* s) {
  return _mm512_castpd_ps(_mm512_broadcastsd_pd(_mm_castsi128_pd(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s)))));
}

// Groups g and g+1 of a q5 row in pair_groups' order: q4's pair unpacking, then 16 added to the lanes whose
// fifth bit is set. The lane masks are the two groups' 32-bit words with their bits dealt out as the lanes
// are (two of g's, then two of g+1's): pdep does that in a scalar port, off the vector ports the loop is
// bound by. (One group per vector in element order, with a masked add of the word as it stands, was
// 1.3x q4's time per product; this is q4's loop plus two masked adds.)
inline void unpack_q5_pair(const uint8_t* p, const uint8_t* qh, __m512i& lo, __m512i& hi) {
  unpack_q4_pair(p, lo, hi);
  const uint32_t a = high_bits(qh), b = high_bits(qh + 4);
  const __mmask32 mlo = _pdep_u32(a & 0xFFFF, 0x33333333u) | _pdep_u32(b & 0xFFFF, 0xCCCCCCCCu);
  const __mmask32 mhi = _pdep_u32(a >> 16, 0x33333333u) | _pdep_u32(b >> 16, 0xCCCCCCCCu);
  const __m512i sixteen = _mm512_set1_epi16(16);
  lo = _mm512_mask_add_epi16(lo, mlo, lo, sixteen);
  hi = _mm512_mask_add_epi16(hi, mhi, hi, sixteen);
}
#endif

#ifdef LLAMA_LAB_AVX2
// Group g of a q4 (kHigh false) or q5 row, as two vectors of 16 int16; qh is the row's fifth bits (q5 only).
template <bool kHigh>
inline void unpack_group(const uint8_t* p, const uint8_t* qh, int64_t g, __m256i& lo, __m256i& hi) {
  if constexpr (kHigh) unpack_q5(p, high_bits(qh + g * 4), lo, hi);
  else unpack_q4(p, lo, hi);
}
#endif
#ifdef LLAMA_LAB_AVX512
// Groups g and g+1 of a q4 or q5 row, in pair_groups' order.
template <bool kHigh>
inline void unpack_pair(const uint8_t* p, const uint8_t* qh, int64_t g, __m512i& lo, __m512i& hi) {
  if constexpr (kHigh) unpack_q5_pair(p, qh + g * 4, lo, hi);
  else unpack_q4_pair(p, lo, hi);
}
#endif

// Per weight row, the float part of each group's product is computed 8 groups at a time before the integer
// loop: scale[i][g] = d[g] * x_scale[i][g] (and, for q4, the minimum term sum_g m[g] * x_sum[i][g]), so the
// inner loop is integer work plus one broadcast load and one FMA per group. Scalar float16 conversions and
// multiplies in the inner loop made it 1.5-2x slower.
#ifdef LLAMA_LAB_AVX2
template <int MT>
inline void group_scales(const at::Half* wd, const float* xd, int64_t groups, float (*scale)[kMaxGroups]) {
  int64_t g = 0;
  for (; g + 8 <= groups; g += 8) {
    const __m256 d8 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wd + g)));
    for (int i = 0; i < MT; ++i) _mm256_storeu_ps(scale[i] + g, _mm256_mul_ps(d8, _mm256_loadu_ps(xd + i * groups + g)));
  }
  for (; g < groups; ++g) {
    const float dw = half_to_float(wd[g]);
    for (int i = 0; i < MT; ++i) scale[i][g] = dw * xd[i * groups + g];
  }
}

// sum_g factor * wm[g] * xs[i][g]: factor is 1 for stored minimums, and -8 or -16 with wm = d for implicit ones.
template <int MT>
inline void min_terms(const at::Half* wm, float factor, const float* xs, int64_t groups, float* mins) {
  __m256 acc[MT];
  for (int i = 0; i < MT; ++i) acc[i] = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= groups; g += 8) {
    const __m256 m8 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wm + g)));
    for (int i = 0; i < MT; ++i) acc[i] = _mm256_fmadd_ps(m8, _mm256_loadu_ps(xs + i * groups + g), acc[i]);
  }
  for (int i = 0; i < MT; ++i) mins[i] = hsum(acc[i]);
  for (; g < groups; ++g) {
    const float mw = half_to_float(wm[g]);
    for (int i = 0; i < MT; ++i) mins[i] += mw * xs[i * groups + g];
  }
  for (int i = 0; i < MT; ++i) mins[i] *= factor;
}
#endif

// One tile: weight rows [n0, n1) against MT activation rows from m0. MT is a template parameter so
// the accumulators live in registers (indexed by a run-time count they spill to the stack: 3x slower).
// q4 and q5 share it: kHigh (q5) adds each group's fifth bits (qh) to the unpacked nibbles, at compile time,
// so q4's loops are the same instructions as without it. m is nullptr where the minimum is implicit.
template <int MT, bool kHigh>
void nibble_tile(const QuantizedRows& a, const uint8_t* qs, const uint8_t* qh, const at::Half* d, const at::Half* m,
                 int64_t K, int64_t N, int64_t n0, int64_t n1, int64_t m0, float* out) {
  const int64_t groups = K / kGroup;
  const int16_t* xq = a.q.data() + m0 * K;
  const float* xd = a.scale.data() + m0 * groups;
  const float* xs = a.sum.data() + m0 * groups;
  for (int64_t n = n0; n < n1; ++n) {
    const NibbleRow<kHigh> w(qs, qh, d, m, K, n);
    float mins[MT];
#ifdef LLAMA_LAB_AVX512
    alignas(64) float scale[MT][kMaxGroups];
    group_scales<MT>(w.d, xd, groups, scale);
    min_terms<MT>(w.m, w.mfactor, xs, groups, mins);
    const int16_t* xp = a.paired.data() + m0 * K;
    __m512 acc[MT], acc2[MT];
    for (int i = 0; i < MT; ++i) acc[i] = _mm512_setzero_ps(), acc2[i] = _mm512_setzero_ps();
    int64_t g = 0;
    for (; g + 4 <= groups; g += 4) {  // two pairs per turn: two independent FMA chains
      __m512i lo0, hi0, lo1, hi1;
      unpack_pair<kHigh>(w.q + g * 16, w.h, g, lo0, hi0);
      unpack_pair<kHigh>(w.q + g * 16 + 32, w.h, g + 2, lo1, hi1);
      for (int i = 0; i < MT; ++i) {
        const int16_t* x = xp + i * K + g * kGroup;
        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot2_512(lo0, x, hi0, x + 32)), pair_scales(scale[i] + g), acc[i]);
        acc2[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot2_512(lo1, x + 64, hi1, x + 96)), pair_scales(scale[i] + g + 2),
                                  acc2[i]);
      }
    }
    for (; g + 2 <= groups; g += 2) {
      __m512i lo0, hi0;
      unpack_pair<kHigh>(w.q + g * 16, w.h, g, lo0, hi0);
      for (int i = 0; i < MT; ++i) {
        const int16_t* x = xp + i * K + g * kGroup;
        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot2_512(lo0, x, hi0, x + 32)), pair_scales(scale[i] + g), acc[i]);
      }
    }
    float tail[MT];
    for (int i = 0; i < MT; ++i) tail[i] = 0.f;
    if (g < groups) {  // an odd last group, in q's order
      __m256i a0, b0;
      unpack_group<kHigh>(w.q + g * 16, w.h, g, a0, b0);
      for (int i = 0; i < MT; ++i) tail[i] = hsum(dot_group(a0, b0, xq + i * K + g * kGroup)) * scale[i][g];
    }
    for (int i = 0; i < MT; ++i) out[(m0 + i) * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[i], acc2[i])) + tail[i] + mins[i];
#elif defined(LLAMA_LAB_AVX2)
    alignas(32) float scale[MT][kMaxGroups];
    group_scales<MT>(w.d, xd, groups, scale);
    min_terms<MT>(w.m, w.mfactor, xs, groups, mins);
    __m256 acc[MT], acc2[MT];
    for (int i = 0; i < MT; ++i) acc[i] = _mm256_setzero_ps(), acc2[i] = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 2 <= groups; g += 2) {  // two groups per turn: two independent FMA chains (one for q5, below)
      __m256i a0, b0, a1, b1;
      unpack_group<kHigh>(w.q + g * 16, w.h, g, a0, b0);
      unpack_group<kHigh>(w.q + g * 16 + 16, w.h, g + 1, a1, b1);
      for (int i = 0; i < MT; ++i) {
        const int16_t* x = xq + i * K + g * kGroup;
        acc[i] = _mm256_fmadd_ps(dot_group(a0, b0, x), _mm256_broadcast_ss(scale[i] + g), acc[i]);
        // q5's unpacking holds three more constants: with a second chain per row the 16 registers spilled
        // sums to the stack in the inner loop (perf annotate); one chain was 2-4% faster (16 rows, one thread)
        __m256& second = kHigh ? acc[i] : acc2[i];
        second = _mm256_fmadd_ps(dot_group(a1, b1, x + kGroup), _mm256_broadcast_ss(scale[i] + g + 1), second);
      }
    }
    for (; g < groups; ++g) {
      __m256i a0, b0;
      unpack_group<kHigh>(w.q + g * 16, w.h, g, a0, b0);
      for (int i = 0; i < MT; ++i)
        acc[i] = _mm256_fmadd_ps(dot_group(a0, b0, xq + i * K + g * kGroup), _mm256_broadcast_ss(scale[i] + g), acc[i]);
    }
    for (int i = 0; i < MT; ++i) out[(m0 + i) * N + n] = hsum(_mm256_add_ps(acc[i], acc2[i])) + mins[i];
#else
    float acc[MT];
    for (int i = 0; i < MT; ++i) acc[i] = 0.f, mins[i] = 0.f;
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* b = w.q + g * 16;
      uint32_t bits = 0;
      if constexpr (kHigh) bits = high_bits(w.h + g * 4);
      const float dw = half_to_float(w.d[g]), mw = w.mfactor * half_to_float(w.m[g]);
      for (int i = 0; i < MT; ++i) {
        const int16_t* x = xq + i * K + g * kGroup;
        int32_t dot = 0;
        for (int j = 0; j < 16; ++j)
          dot += ((b[j] & 0x0F) | (((bits >> j) & 1) << 4)) * x[j] + ((b[j] >> 4) | (((bits >> (j + 16)) & 1) << 4)) * x[j + 16];
        acc[i] += dw * xd[i * groups + g] * static_cast<float>(dot);
        mins[i] += mw * xs[i * groups + g];
      }
    }
    for (int i = 0; i < MT; ++i) out[(m0 + i) * N + n] = acc[i] + mins[i];
#endif
  }
}

template <int MT>
void q8_tile(const QuantizedRows& a, const int8_t* qs, const at::Half* d, int64_t K, int64_t N, int64_t n0,
             int64_t n1, int64_t m0, float* out) {
  const int64_t groups = K / kGroup;
  const int16_t* xq = a.q.data() + m0 * K;
  const float* xd = a.scale.data() + m0 * groups;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wq = qs + n * K;
    const at::Half* wd = d + n * groups;
#ifdef LLAMA_LAB_AVX512
    alignas(64) float scale[MT][kMaxGroups];
    group_scales<MT>(wd, xd, groups, scale);
    __m512 acc[MT], acc2[MT];
    for (int i = 0; i < MT; ++i) acc[i] = _mm512_setzero_ps(), acc2[i] = _mm512_setzero_ps();
    int64_t g = 0;
    for (; g + 2 <= groups; g += 2) {  // one group of 32 per vector, two groups per turn: two FMA chains
      const __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + g * kGroup)));
      const __m512i w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + g * kGroup + kGroup)));
      for (int i = 0; i < MT; ++i) {
        const int16_t* x = xq + i * K + g * kGroup;
        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot1_512(w0, x)), _mm512_set1_ps(scale[i][g]), acc[i]);
        acc2[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot1_512(w1, x + kGroup)), _mm512_set1_ps(scale[i][g + 1]), acc2[i]);
      }
    }
    if (g < groups) {
      const __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + g * kGroup)));
      for (int i = 0; i < MT; ++i)
        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot1_512(w0, xq + i * K + g * kGroup)), _mm512_set1_ps(scale[i][g]),
                                 acc[i]);
    }
    for (int i = 0; i < MT; ++i) out[(m0 + i) * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[i], acc2[i]));
#elif defined(LLAMA_LAB_AVX2)
    alignas(32) float scale[MT][kMaxGroups];
    group_scales<MT>(wd, xd, groups, scale);
    __m256 acc[MT], acc2[MT];
    for (int i = 0; i < MT; ++i) acc[i] = _mm256_setzero_ps(), acc2[i] = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 2 <= groups; g += 2) {
      __m256i a0, b0, a1, b1;
      unpack_q8(wq + g * kGroup, a0, b0);
      unpack_q8(wq + g * kGroup + kGroup, a1, b1);
      for (int i = 0; i < MT; ++i) {
        const int16_t* x = xq + i * K + g * kGroup;
        acc[i] = _mm256_fmadd_ps(dot_group(a0, b0, x), _mm256_broadcast_ss(scale[i] + g), acc[i]);
        acc2[i] = _mm256_fmadd_ps(dot_group(a1, b1, x + kGroup), _mm256_broadcast_ss(scale[i] + g + 1), acc2[i]);
      }
    }
    for (; g < groups; ++g) {
      __m256i a0, b0;
      unpack_q8(wq + g * kGroup, a0, b0);
      for (int i = 0; i < MT; ++i)
        acc[i] = _mm256_fmadd_ps(dot_group(a0, b0, xq + i * K + g * kGroup), _mm256_broadcast_ss(scale[i] + g), acc[i]);
    }
    for (int i = 0; i < MT; ++i) out[(m0 + i) * N + n] = hsum(_mm256_add_ps(acc[i], acc2[i]));
#else
    float acc[MT];
    for (int i = 0; i < MT; ++i) acc[i] = 0.f;
    for (int64_t g = 0; g < groups; ++g) {
      const int8_t* b = wq + g * kGroup;
      const float dw = half_to_float(wd[g]);
      for (int i = 0; i < MT; ++i) {
        const int16_t* x = xq + i * K + g * kGroup;
        int32_t dot = 0;
        for (int j = 0; j < kGroup; ++j) dot += b[j] * x[j];
        acc[i] += dw * xd[i * groups + g] * static_cast<float>(dot);
      }
    }
    for (int i = 0; i < MT; ++i) out[(m0 + i) * N + n] = acc[i];
#endif
  }
}


template <typename Fn, int... MT>
void dispatch_rows_in(int64_t mt, std::integer_sequence<int, MT...>, Fn& fn) {
  ((mt == MT + 1 ? fn(std::integral_constant<int, MT + 1>{}) : void()), ...);
}

// Calls fn(std::integral_constant<int, mt>{}) for a run-time row count mt in 1..kMax (a tile's rows: kRowTile for
// the int16 tiles, kBf16RowTile and kInt8RowTile for the others), so each count gets accumulators sized at compile
// time: fn is a generic lambda that calls its tile with decltype(rows)::value rows.
template <int kMax, typename Fn>
void dispatch_rows(int64_t mt, Fn&& fn) {
  dispatch_rows_in(mt, std::make_integer_sequence<int, kMax>(), fn);
}

void check_common(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, int64_t K, const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, op, ": x must be float32 [M, K]");
  TORCH_CHECK(K % kGroup == 0 && x.size(1) == K, op, ": x has ", x.size(1), " columns; the weight has ", K,
              " (a multiple of 32)");
  TORCH_CHECK(K <= kGroup * kMaxGroups, op, ": rows wider than ", kGroup * kMaxGroups, " are not supported");
  TORCH_CHECK(d.scalar_type() == at::kHalf && d.dim() == 2 && d.size(0) == qs.size(0) && d.size(1) == K / kGroup,
              op, ": scales must be float16 [N, K/32]");
}

// Splits the output columns into tiles of kColTile weight rows, and within each tile walks the activation
// rows row_tile at a time, so a group unpacked once serves that many rows and a tile's weights stay cached.
template <typename Tile>
at::Tensor run_tiles(int64_t M, int64_t N, int64_t row_tile, Tile&& tile) {
  auto out = at::empty({M, N}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  const int64_t tiles = (N + kColTile - 1) / kColTile;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n0 = t * kColTile, n1 = std::min(N, n0 + kColTile);
      for (int64_t m0 = 0; m0 < M; m0 += row_tile) tile(n0, n1, m0, std::min(row_tile, M - m0), o);
    }
  });
  return out;
}

// One dequantized weight row (float32, K values): a prompt's GEMM dequantizes every weight once per chunk,
// so this runs N*K times per product and is vectorized where the CPU has AVX2.
// q4 (kHigh false) and q5 share it, as the tiles do.
template <bool kHigh>
void nibble_row(const uint8_t* qs, const uint8_t* qh, const at::Half* d, const at::Half* m, int64_t K, int64_t n,
                float* o) {
  const int64_t groups = K / kGroup;
  const uint8_t* wq = qs + n * (K / 2);
  for (int64_t g = 0; g < groups; ++g) {
    const float dw = half_to_float(d[n * groups + g]);
    const float mw = m ? half_to_float(m[n * groups + g]) : -implicit_offset<kHigh>() * dw;
    const uint8_t* b = wq + g * 16;
    uint32_t bits = 0;
    if constexpr (kHigh) bits = high_bits(qh + n * (K / 8) + g * 4);
    float* out = o + g * kGroup;
#ifdef LLAMA_LAB_AVX2
    const __m256 vd = _mm256_set1_ps(dw), vm = _mm256_set1_ps(mw);
    const __m256i mask = _mm256_set1_epi32(0x0F);
    for (int h = 0; h < 2; ++h) {  // bytes 0..7, then 8..15: elements j (low nibble) and j+16 (high)
      const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 8 * h)));
      __m256i ql = _mm256_and_si256(v, mask), qu = _mm256_srli_epi32(v, 4);
      if constexpr (kHigh) {  // 16 where the element's bit is set: broadcast its byte of the word, and, compare
        const __m256i lanes = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128), sixteen = _mm256_set1_epi32(16);
        const __m256i l = _mm256_and_si256(_mm256_set1_epi32(static_cast<int>((bits >> (8 * h)) & 0xFF)), lanes);
        const __m256i u = _mm256_and_si256(_mm256_set1_epi32(static_cast<int>((bits >> (16 + 8 * h)) & 0xFF)), lanes);
        ql = _mm256_add_epi32(ql, _mm256_and_si256(_mm256_cmpeq_epi32(l, lanes), sixteen));
        qu = _mm256_add_epi32(qu, _mm256_and_si256(_mm256_cmpeq_epi32(u, lanes), sixteen));
      }
      _mm256_storeu_ps(out + 8 * h, _mm256_fmadd_ps(vd, _mm256_cvtepi32_ps(ql), vm));
      _mm256_storeu_ps(out + 16 + 8 * h, _mm256_fmadd_ps(vd, _mm256_cvtepi32_ps(qu), vm));
    }
#else
    for (int j = 0; j < 16; ++j) {
      out[j] = dw * static_cast<float>((b[j] & 0x0F) | (((bits >> j) & 1) << 4)) + mw;
      out[j + 16] = dw * static_cast<float>((b[j] >> 4) | (((bits >> (j + 16)) & 1) << 4)) + mw;
    }
#endif
  }
}

void q8_row(const int8_t* qs, const at::Half* d, int64_t K, int64_t n, float* o) {
  const int64_t groups = K / kGroup;
  const int8_t* wq = qs + n * K;
  for (int64_t g = 0; g < groups; ++g) {
    const float dw = half_to_float(d[n * groups + g]);
    const int8_t* b = wq + g * kGroup;
    float* out = o + g * kGroup;
#ifdef LLAMA_LAB_AVX2
    const __m256 vd = _mm256_set1_ps(dw);
    for (int h = 0; h < 4; ++h)
      _mm256_storeu_ps(out + 8 * h, _mm256_mul_ps(vd, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                                          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 8 * h))))));
#else
    for (int j = 0; j < kGroup; ++j) out[j] = dw * static_cast<float>(b[j]);
#endif
  }
}

// Whether the int8 tiles are built (no bf16 tiles) and not turned off (LLAMA_LAB_INT8_TILES=0, read once per process).
bool int8_tiles_on() {
#ifdef LLAMA_LAB_INT8_TILES
  static const bool on = [] {
    const char* env = std::getenv("LLAMA_LAB_INT8_TILES");
    const std::string chosen = env ? env : "1";
    TORCH_CHECK(chosen == "0" || chosen == "1" || chosen.empty(), "LLAMA_LAB_INT8_TILES must be 0 or 1, not '", chosen, "'");
    return chosen != "0";
  }();
  return on;
#else
  return false;
#endif
}

// How a prompt's many rows (gemm_rows() and up) are multiplied, LLAMA_LAB_GEMM_DTYPE (read once per process):
// - bf16: dequantized weight tiles and oneDNN's bf16 GEMM (activations and weights rounded to bf16, float
//   accumulation), the default where the CPU multiplies bf16 natively (AVX512-BF16, AMX): 4-6x its fp32 GEMM
//   there, and bf16 keeps 8 bits of each value, as llama.cpp's int8 activations keep 7;
// - int16: no GEMM, the int16 tiles at any row count (the single stream's precision), the default with
//   AVX512-VNNI but no BF16 (Cascade Lake, Ice Lake), where they ran 1.1-1.8x the fp32 GEMM path at 128-512 rows
//   (on AVX2 the GEMM path is as fast from 128 rows and faster from 256);
// - fp32: the exact product, the default elsewhere.
enum class PromptProduct { kFp32, kBf16, kInt16 };

PromptProduct prompt_product() {
  static const PromptProduct chosen = [] {
    const char* env = std::getenv("LLAMA_LAB_GEMM_DTYPE");
    const std::string name = env ? env : "auto";
    if (name == "fp32") return PromptProduct::kFp32;
    if (name == "bf16") return PromptProduct::kBf16;
    if (name == "int16") return PromptProduct::kInt16;
    TORCH_CHECK(name == "auto" || name.empty(), "LLAMA_LAB_GEMM_DTYPE must be auto, fp32, bf16 or int16, not '", name, "'");
#if defined(__AVX512BF16__)
    return PromptProduct::kBf16;
#elif defined(LLAMA_LAB_AVX512) && defined(__AVX512VNNI__)
    return PromptProduct::kInt16;
#else
    return PromptProduct::kFp32;
#endif
  }();
  return chosen;
}

bool gemm_in_bf16() { return prompt_product() == PromptProduct::kBf16; }

std::string gemm_dtype() {
  switch (prompt_product()) {
    case PromptProduct::kBf16: return "bf16";
    case PromptProduct::kInt16: return "int16";
    default: return "fp32";
  }
}

// From this many activation rows on, the prompt product above; below, the decode tiles. A bf16 GEMM (AVX512-BF16,
// AMX) beats the tiles from ~32 rows. An fp32 one (AVX2 CPUs) does not before ~128-256 rows at two threads: the
// tiles cost 22-27 us per row of SmolLM2's gate+up at any count, the GEMM path 37 at 32 rows, 28 at 64, 23 at 128,
// 21 at 256 (bench/kernel_bench.py --rows, docs/engine.md). With int16 the rows below 128 are decode batches'
// (int8 tiles where built) or a prompt's (int16 tiles).
int64_t gemm_rows() { return gemm_in_bf16() ? 32 : 128; }

// From this many rows up to gemm_rows(), the bf16 tiles where they are built and the GEMM's precision is bf16;
// gemm_rows() where they are not (int16 tiles up to the GEMM).
int64_t bf16_tile_rows() {
#ifdef LLAMA_LAB_BF16_TILES
  if (gemm_in_bf16()) return kBf16TileRows;
#endif
  return gemm_rows();
}

// From this many rows up to gemm_rows(), the int8 tiles where they are on, for a decode batch's rows (a prompt's
// never take them: see int8 tiles); gemm_rows() elsewhere.
int64_t int8_tile_rows() {
#ifdef LLAMA_LAB_INT8_TILES
  if (int8_tiles_on()) return std::min<int64_t>(kInt8TileRows, gemm_rows());
#endif
  return gemm_rows();
}

// n floats to bf16, rounded to nearest even as torch's .to(bfloat16) rounds.
void to_bf16(const float* src, at::BFloat16* dst, int64_t n) {
  int64_t i = 0;
#ifdef __AVX512BF16__
  for (; i + 16 <= n; i += 16) {
    const __m256bh v = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + i));
    std::memcpy(dst + i, &v, sizeof(v));
  }
#endif
  for (; i < n; ++i) dst[i] = at::BFloat16(src[i]);
}

// Many activation rows (a prompt chunk) make the product compute-bound, where a float GEMM beats integer
// dot products that unpack each weight group again for every four rows: dequantize kGemmTile weight rows
// at a time into a scratch matrix (a few MB, never the whole weight) and let ATen's GEMM take them.
template <typename Row>
at::Tensor dequant_gemm(const at::Tensor& x, int64_t N, int64_t K, Row&& row) {
  const int64_t M = x.size(0);
  auto out = at::empty({M, N}, x.options());
  const int64_t tile = std::min(N, kGemmTile);
  if (gemm_in_bf16()) {
    auto xb = at::empty({M, K}, x.options().dtype(at::kBFloat16));
    const float* xp = x.data_ptr<float>();
    at::BFloat16* xbp = xb.data_ptr<at::BFloat16>();
    at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) { to_bf16(xp + begin * K, xbp + begin * K, (end - begin) * K); });
    auto w = at::empty({tile, K}, xb.options());
    at::BFloat16* wp = w.data_ptr<at::BFloat16>();
    for (int64_t n0 = 0; n0 < N; n0 += tile) {
      const int64_t len = std::min(tile, N - n0);
      at::parallel_for(0, len, 16, [&](int64_t begin, int64_t end) {
        std::vector<float> scratch(K);
        for (int64_t i = begin; i < end; ++i) {
          row(n0 + i, scratch.data());
          to_bf16(scratch.data(), wp + i * K, K);
        }
      });
      out.narrow(1, n0, len).copy_(at::mm(xb, w.narrow(0, 0, len).t()));
    }
    return out;
  }
  auto w = at::empty({tile, K}, x.options());
  float* wp = w.data_ptr<float>();
  for (int64_t n0 = 0; n0 < N; n0 += tile) {
    const int64_t len = std::min(tile, N - n0);
    at::parallel_for(0, len, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) row(n0 + i, wp + i * K);
    });
    out.narrow(1, n0, len).copy_(at::mm(x, w.narrow(0, 0, len).t()));
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// bf16 tiles: from a few activation rows up to the GEMM's threshold, on CPUs that multiply bf16 natively
// (AVX512-BF16: Zen 4 and 5, Cooper Lake, Sapphire Rapids). Each weight group is dequantized in registers to
// 32 bf16 (scale and minimum applied, rounded as torch rounds) and multiplied with vdpbf16ps against the
// activation rows in bf16: the numbers of the dequantize-then-bf16-GEMM path that takes over at gemm_rows(),
// without writing the dequantized weights out and reading them back (at 16 rows that write cost the GEMM path
// more than its products). Per row a group is one multiply-add instruction, where the int16 tiles spend two
// products, a conversion and a float multiply-add on each pair of groups.
#ifdef LLAMA_LAB_BF16_TILES
constexpr int64_t kBf16RowTile = 16;  // 16 accumulators, a weight group and an activation load: 18 of 32 registers

inline __m512bh as_bf16(const __m512i v) { return reinterpret_cast<const __m512bh&>(v); }

// q4 / q5 group g of weight row n as 32 bf16 in element order: its 16 bytes widened to 16 int32 lanes give
// elements j (low nibble) and j+16 (high nibble); a q5 group adds 16 where its word's bit is set.
template <bool kHigh>
struct NibbleGroup {
  const uint8_t* qs;
  const uint8_t* qh;
  const at::Half* d;
  const at::Half* m;
  int64_t K;
  __m512bh operator()(int64_t n, int64_t g) const {
    const int64_t groups = K / kGroup;
    const float dw = half_to_float(d[n * groups + g]);
    const float mw = m ? half_to_float(m[n * groups + g]) : -implicit_offset<kHigh>() * dw;
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + n * (K / 2) + g * 16)));
    __m512i lo = _mm512_and_si512(b, _mm512_set1_epi32(0x0F)), hi = _mm512_srli_epi32(b, 4);
    if constexpr (kHigh) {
      const uint32_t bits = high_bits(qh + n * (K / 8) + g * 4);
      const __m512i sixteen = _mm512_set1_epi32(16);
      lo = _mm512_mask_add_epi32(lo, static_cast<__mmask16>(bits & 0xFFFF), lo, sixteen);
      hi = _mm512_mask_add_epi32(hi, static_cast<__mmask16>(bits >> 16), hi, sixteen);
    }
    const __m512 vd = _mm512_set1_ps(dw), vm = _mm512_set1_ps(mw);
    return _mm512_cvtne2ps_pbh(_mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), vd, vm), _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), vd, vm));
  }
  void prefetch(int64_t n, int64_t g) const {
    const int64_t groups = K / kGroup;
    _mm_prefetch(reinterpret_cast<const char*>(qs + n * (K / 2) + g * 16), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(d + n * groups + g), _MM_HINT_T0);
    if (m) _mm_prefetch(reinterpret_cast<const char*>(m + n * groups + g), _MM_HINT_T0);
    if constexpr (kHigh) _mm_prefetch(reinterpret_cast<const char*>(qh + n * (K / 8) + g * 4), _MM_HINT_T0);
  }
};

struct Q8Group {
  const int8_t* qs;
  const at::Half* d;
  int64_t K;
  __m512bh operator()(int64_t n, int64_t g) const {
    const __m512 vd = _mm512_set1_ps(half_to_float(d[n * (K / kGroup) + g]));
    const int8_t* p = qs + n * K + g * kGroup;
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))));
    return _mm512_cvtne2ps_pbh(_mm512_mul_ps(hi, vd), _mm512_mul_ps(lo, vd));
  }
  void prefetch(int64_t n, int64_t g) const {
    _mm_prefetch(reinterpret_cast<const char*>(qs + n * K + g * kGroup), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(d + n * (K / kGroup) + g), _MM_HINT_T0);
  }
};

// The 16 sums of v[0..15] (16 floats each) as one vector, r[k] = sum of v[k]: a transposing tree of adds,
// 45 instructions for 16 outputs where a horizontal sum of each takes about 8.
inline __m512 sum16(const float (*v)[16]) {
  __m512 a[8], b[4];
  for (int k = 0; k < 8; ++k) {  // per 128-bit lane: [v2k 0+2, v2k+1 0+2, v2k 1+3, v2k+1 1+3]
    const __m512 x = _mm512_load_ps(v[2 * k]), y = _mm512_load_ps(v[2 * k + 1]);
    a[k] = _mm512_add_ps(_mm512_unpacklo_ps(x, y), _mm512_unpackhi_ps(x, y));
  }
  for (int k = 0; k < 4; ++k) {  // per 128-bit lane: that lane's sums of v4k .. v4k+3
    const __m512d x = _mm512_castps_pd(a[2 * k]), y = _mm512_castps_pd(a[2 * k + 1]);
    b[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  const __m512 c0 = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_f32x4(b[0], b[1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 c1 = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_f32x4(b[2], b[3], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c0, c1, _MM_SHUFFLE(2, 0, 2, 0)), _mm512_shuffle_f32x4(c0, c1, _MM_SHUFFLE(3, 1, 3, 1)));
}

// Weight rows [n0, n1) (at most kColTile) against MT bf16 activation rows from m0, packed by bf16_tiles: x holds
// the tile's rows group by group, group g of row i at (g * MT + i) * 32. Each row's 16-lane sums wait in `sums`
// until the tile's weight rows are done, then sum16 turns them into 16 outputs. The groups are taken in blocks
// whose activations fit in 16 KB, so that the 16 weight rows read them from L1. (Row by row, an 8B model's
// K = 4096 put 16 rows 8 KB apart, all in the same L1 sets: 16 rows ran 1.2-1.6x slower than the int16 tiles.)
template <int MT, typename Group>
void bf16_tile(const at::BFloat16* x, int64_t K, int64_t N, int64_t n0, int64_t n1, int64_t m0, float* out,
               const Group& group) {
  static_assert(kColTile == 16, "sum16 reduces 16 weight rows");
  constexpr int64_t kBlock = std::max<int64_t>(4, 16384 / (MT * kGroup * 2));  // groups per block
  const int64_t groups = K / kGroup;
  alignas(64) float sums[MT][kColTile][16];
  if (groups == 0) std::memset(sums, 0, sizeof(sums));  // K = 0: every output is 0
  for (int64_t g0 = 0; g0 < groups;) {
    // a remainder of less than half a block joins the last block (SmolLM2's 18 groups are one block)
    const int64_t g1 = groups - g0 < kBlock + kBlock / 2 ? groups : g0 + kBlock;
    for (int64_t n = n0; n < n1; ++n) {
      __m512 acc[MT];
      for (int i = 0; i < MT; ++i) acc[i] = g0 == 0 ? _mm512_setzero_ps() : _mm512_load_ps(sums[i][n - n0]);
      // the next weight row's group g (or, after the last row, the first row's next block), so that the strided
      // reads of a block's rows do not wait on memory
      const bool last = n + 1 == n1;
      const int64_t pn = last ? n0 : n + 1, shift = last ? g1 - g0 : 0;
      for (int64_t g = g0; g < g1; ++g) {
        if (g + shift < groups) group.prefetch(pn, g + shift);
        const __m512bh w = group(n, g);
        for (int i = 0; i < MT; ++i)
          acc[i] = _mm512_dpbf16_ps(acc[i], w, as_bf16(_mm512_loadu_si512(x + (g * MT + i) * kGroup)));
      }
      for (int i = 0; i < MT; ++i) _mm512_store_ps(sums[i][n - n0], acc[i]);
    }
    g0 = g1;
  }
  for (int64_t n = n1 - n0; n < kColTile; ++n)  // a last, narrower tile: its missing rows sum to 0, not stored
    for (int i = 0; i < MT; ++i) _mm512_store_ps(sums[i][n], _mm512_setzero_ps());
  const __mmask16 cols = static_cast<__mmask16>((1u << (n1 - n0)) - 1);
  for (int i = 0; i < MT; ++i) _mm512_mask_storeu_ps(out + (m0 + i) * N + n0, cols, sum16(sums[i]));
}

// The product over all rows: x rounded to bf16 once, each tile of kBf16RowTile rows packed group by group (the
// tile's rows' group g side by side), then column tiles of kColTile weight rows in parallel.
template <typename Group>
at::Tensor bf16_tiles(const at::Tensor& x, int64_t N, int64_t K, const Group& group) {
  const int64_t M = x.size(0), groups = K / kGroup;
  auto xb = at::empty({M, K}, x.options().dtype(at::kBFloat16));
  const float* xf = x.data_ptr<float>();
  at::BFloat16* packed = xb.data_ptr<at::BFloat16>();
  for (int64_t m0 = 0; m0 < M; m0 += kBf16RowTile) {
    const int64_t mt = std::min(kBf16RowTile, M - m0);
    for (int64_t i = 0; i < mt; ++i)
      for (int64_t g = 0; g < groups; ++g)
        to_bf16(xf + (m0 + i) * K + g * kGroup, packed + m0 * K + (g * mt + i) * kGroup, kGroup);
  }
  return run_tiles(M, N, kBf16RowTile, [&](int64_t n0, int64_t n1, int64_t m0, int64_t mt, float* o) {
    const at::BFloat16* tile = packed + m0 * K;
    dispatch_rows<kBf16RowTile>(mt, [&](auto rows) { bf16_tile<decltype(rows)::value>(tile, K, N, n0, n1, m0, o, group); });
  });
}
#endif

// ---------------------------------------------------------------------------------------------
// int8 tiles: for a decode batch's rows, from two up to the GEMM's threshold, on AVX2 and AVX512 CPUs without
// AVX512-BF16 (which have no bf16 tiles; most of their products are the column lanes further below). The
// activations are quantized to int8 per group of 32, as llama.cpp quantizes them (Q8_0), and _mm256_maddubs_epi16
// multiplies 32 weight bytes by 32 activation bytes per instruction where the int16 tiles' _mm256_madd_epi16
// takes 16: a pair of groups costs a row two maddubs, an add, one madd, a
// conversion and one FMA, where the int16 tiles spend four madd, two adds, two conversions and two FMAs.
// The activations' rounding error is then 1/254 of a group's largest value (int16: 1/65534), what llama.cpp
// accepts for every product. One row (a single stream's decode) stays int16, whose answers are those of the
// float weights; at one row the int8 tiles were 1.0-1.2x faster, from 2 rows up 1.1-1.5x on most shapes
// (bench/kernel_bench.py, docs/engine.md).
//
// The pair tiles (q8 on AVX2, q4/q5 at 2-3 rows there): a pair of groups (g, g+1) is two vectors of 32 bytes
// whose 32-bit units alternate between the groups, so that after the byte and word sums the even int32 lanes hold
// g's partial sums and the odd ones g+1's, and one FMA with [s_g, s_g+1] repeated applies both scales. Vector A
// holds elements 0..15 of each group (unit 2k: g's elements 4k..4k+3, unit 2k+1: g+1's), vector B elements
// 16..31. An odd last group is one vector in element order.
#ifdef LLAMA_LAB_INT8_TILES
// 8 accumulators, two weight vectors, a constant and temporaries: 16 registers.
constexpr int64_t kInt8RowTile = 8;

// Units of x (g's 32 bytes) and y (g+1's) dealt out as above: a = elements 0..15, b = 16..31.
inline void interleave_pair(const __m256i x, const __m256i y, __m256i& a, __m256i& b) {
  const __m256i px = _mm256_permute4x64_epi64(x, 0xD8), py = _mm256_permute4x64_epi64(y, 0xD8);  // units 0,1,4,5,2,3,6,7
  a = _mm256_unpacklo_epi32(px, py);
  b = _mm256_unpackhi_epi32(px, py);
}

// 32 bytes: 0xFF where bit j of `bits` is set (byte j), else 0.
inline __m256i bytes_of_bits(uint32_t bits) {
  const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int32_t>(bits)),
                                             _mm256_setr_epi64x(0, 0x0101010101010101, 0x0202020202020202,
                                                                0x0303030303030303));
  const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ULL));
  return _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
}

struct Int8Rows {
  std::vector<int8_t> q;       // [M, K]: the pair layout (AVX2's q8 tiles), or element order (the column lanes')
  std::vector<float> scale;    // [M, K/32]
  std::vector<float> sum;      // [M, K/32]: the exact float sums, for the q4/q5 minimum term
  std::vector<int32_t> bias8;  // [M, K/32] with kElementsBias8: -128 times the group's int8 sum (VNNI's q8 start)
};

// How quantize_rows_int8 leaves the int8 values: the pair tiles' layout, or element order (the column lanes'),
// with each group's -128 * sum where the VNNI q8 lanes need it.
enum class Int8Layout { kPairs, kElements, kElementsBias8 };

// One row: groups to int8 (round to nearest, scale = largest |x| / 127), then laid out as `layout` says.
void quantize_row_int8(const float* x, int64_t K, Int8Layout layout, int8_t* q, float* scale, float* sum,
                       int32_t* bias8) {
  const int64_t groups = K / kGroup;
  alignas(32) int8_t natural[2][kGroup];
  for (int64_t g = 0; g < groups; ++g) {
    __m256 v[4];
    const float d = load_group(x + g * kGroup, v, sum + g) / 127.f;
    scale[g] = d;
    const __m256 inv = _mm256_set1_ps(d != 0.f ? 1.f / d : 0.f);
    __m256i i32[4];
    for (int i = 0; i < 4; ++i) i32[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], inv), _MM_ROUND_NEAREST));
    // 32 x int32 -> 32 x int8 in order: packs work within 128-bit lanes, the permute restores the order
    const __m256i w16a = _mm256_packs_epi32(i32[0], i32[1]), w16b = _mm256_packs_epi32(i32[2], i32[3]);
    const __m256i b8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w16a, w16b), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    if (layout != Int8Layout::kPairs) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + g * kGroup), b8);
      if (layout == Int8Layout::kElements) continue;
      const __m256i s4 = _mm256_add_epi32(_mm256_add_epi32(i32[0], i32[1]), _mm256_add_epi32(i32[2], i32[3]));
      alignas(32) int32_t lanes[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), s4);
      int32_t total = 0;
      for (int l = 0; l < 8; ++l) total += lanes[l];
      bias8[g] = -128 * total;
      continue;
    }
    _mm256_store_si256(reinterpret_cast<__m256i*>(natural[g & 1]), b8);
    if (g & 1) {
      __m256i a, b;
      interleave_pair(_mm256_load_si256(reinterpret_cast<const __m256i*>(natural[0])), b8, a, b);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + (g - 1) * kGroup), a);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + (g - 1) * kGroup + 32), b);
    } else if (g + 1 == groups) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + g * kGroup), b8);
    }
  }
}

Int8Rows quantize_rows_int8(const float* x, int64_t M, int64_t K, Int8Layout layout) {
  const int64_t groups = K / kGroup;
  const bool bias8 = layout == Int8Layout::kElementsBias8;
  Int8Rows r{std::vector<int8_t>(M * K), std::vector<float>(M * groups), std::vector<float>(M * groups),
             std::vector<int32_t>(bias8 ? M * groups : 0)};
  at::parallel_for(0, M, 4, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      quantize_row_int8(x + i * K, K, layout, r.q.data() + i * K, r.scale.data() + i * groups,
                        r.sum.data() + i * groups, bias8 ? r.bias8.data() + i * groups : nullptr);
  });
  return r;
}

// Groups g, g+1 of a q4 or q5 row as unsigned bytes in the pair layout. The 32 bytes at the pair's start are g's
// 16 then g+1's; their low nibbles are each group's elements 0..15, the high ones 16..31; q5 ors in 16 where the
// group's word has the element's bit.
template <bool kHigh>
inline void nibble_pair_u8(const uint8_t* p, const uint8_t* qh, int64_t g, __m256i& a, __m256i& b) {
  const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i low = _mm256_set1_epi8(0x0F);
  __m256i lo = _mm256_and_si256(w, low), hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), low);
  if constexpr (kHigh) {
    const uint32_t h0 = high_bits(qh + g * 4), h1 = high_bits(qh + g * 4 + 4);
    const __m256i sixteen = _mm256_set1_epi8(16);
    lo = _mm256_or_si256(lo, _mm256_and_si256(bytes_of_bits((h0 & 0xFFFF) | (h1 << 16)), sixteen));
    hi = _mm256_or_si256(hi, _mm256_and_si256(bytes_of_bits((h0 >> 16) | (h1 & 0xFFFF0000u)), sixteen));
  }
  const __m256i units = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // [g's unit k, g+1's unit k] for k < 4
  a = _mm256_permutevar8x32_epi32(lo, units);
  b = _mm256_permutevar8x32_epi32(hi, units);
}

// A lone (last) q4/q5 group as 32 unsigned bytes in element order.
template <bool kHigh>
inline __m256i nibble_group_u8(const uint8_t* p, const uint8_t* qh, int64_t g) {
  const __m128i w = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i low = _mm_set1_epi8(0x0F);
  __m256i v = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(w, 4), low), _mm_and_si128(w, low));
  if constexpr (kHigh) v = _mm256_or_si256(v, _mm256_and_si256(bytes_of_bits(high_bits(qh + g * 4)), _mm256_set1_epi8(16)));
  return v;
}

// The q4/q5 minimum term, sum_g factor * wm[g] * xs[i][g], left as 8 lanes in acc[i] (the accumulators' start:
// the final sum adds their lanes anyway) plus a scalar for the last groups % 8.
template <int MT>
inline void min_lanes(const at::Half* wm, float factor, const float* xs, int64_t groups, __m256* acc, float* rest) {
  for (int i = 0; i < MT; ++i) acc[i] = _mm256_setzero_ps(), rest[i] = 0.f;
  int64_t g = 0;
  for (; g + 8 <= groups; g += 8) {
    const __m256 m8 = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wm + g))),
                                    _mm256_set1_ps(factor));
    for (int i = 0; i < MT; ++i) acc[i] = _mm256_fmadd_ps(m8, _mm256_loadu_ps(xs + i * groups + g), acc[i]);
  }
  for (; g < groups; ++g) {
    const float mw = factor * half_to_float(wm[g]);
    for (int i = 0; i < MT; ++i) rest[i] += mw * xs[i * groups + g];
  }
}

// out[(m0 + i) * N + n] = sum of acc[i]'s lanes + rest[i], for MT rows: with 8 rows a transposing tree of
// horizontal adds (one vector of 8 sums), with fewer one horizontal sum each.
template <int MT>
inline void store_sums(const __m256* acc, const float* rest, float* out, int64_t N, int64_t m0, int64_t n) {
  if constexpr (MT == 8) {
    const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
    const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
    alignas(32) float r[8];
    _mm256_store_ps(r, _mm256_add_ps(_mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31)),
                                     _mm256_loadu_ps(rest)));
    for (int i = 0; i < 8; ++i) out[(m0 + i) * N + n] = r[i];
  } else {
    for (int i = 0; i < MT; ++i) out[(m0 + i) * N + n] = hsum(acc[i]) + rest[i];
  }
}

// [s[0], s[1]] four times: the scales of the even (g) and odd (g+1) int32 lanes.
inline __m256 pair_scales_256(const float* s) { return _mm256_castpd_ps(_mm256_broadcast_sd(reinterpret_cast<const double*>(s))); }

// A lone (odd) last group g of a q4/q5 row against MT rows of int8 activations, added to their accumulators.
template <int MT, bool kHigh>
inline void nibble_lone_group(const uint8_t* wq, const uint8_t* wh, const int8_t* xq, int64_t K, int64_t g,
                              const float (*scale)[kMaxGroups], __m256* acc) {
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i w = nibble_group_u8<kHigh>(wq + g * 16, wh, g);
  for (int i = 0; i < MT; ++i) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + i * K + g * kGroup));
    acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones)),
                             _mm256_broadcast_ss(scale[i] + g), acc[i]);
  }
}

// The same for a q8 row: |w| times x with w's sign, as in q8_i8_tile.
template <int MT>
inline void q8_lone_group(const int8_t* wq, const int8_t* xq, int64_t K, int64_t g, const float (*scale)[kMaxGroups],
                          __m256* acc) {
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + g * kGroup));
  const __m256i u = _mm256_abs_epi8(w);
  for (int i = 0; i < MT; ++i) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + i * K + g * kGroup));
    acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(u, _mm256_sign_epi8(x, w)), ones)),
                             _mm256_broadcast_ss(scale[i] + g), acc[i]);
  }
}

// The nibble tile with int8 activations: q4 and q5 weights are unsigned bytes (0..31), which maddubs takes as
// they are. Per 32-bit lane a pair's two byte products add to at most 2 * 31 * 127 * 2 = 15748: int16 holds it.
template <int MT, bool kHigh>
void nibble_i8_tile(const Int8Rows& a, const uint8_t* qs, const uint8_t* qh, const at::Half* d, const at::Half* m,
                    int64_t K, int64_t N, int64_t n0, int64_t n1, int64_t m0, float* out) {
  const int64_t groups = K / kGroup;
  const int8_t* xq = a.q.data() + m0 * K;
  const float* xd = a.scale.data() + m0 * groups;
  const float* xs = a.sum.data() + m0 * groups;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t n = n0; n < n1; ++n) {
    const NibbleRow<kHigh> w(qs, qh, d, m, K, n);
    alignas(32) float scale[MT][kMaxGroups];
    group_scales<MT>(w.d, xd, groups, scale);
    __m256 acc[MT];
    alignas(32) float rest[MT];
    min_lanes<MT>(w.m, w.mfactor, xs, groups, acc, rest);
    int64_t g = 0;
    for (; g + 2 <= groups; g += 2) {
      __m256i wa, wb;
      nibble_pair_u8<kHigh>(w.q + g * 16, w.h, g, wa, wb);
      for (int i = 0; i < MT; ++i) {
        const int8_t* x = xq + i * K + g * kGroup;
        const __m256i s16 = _mm256_add_epi16(
            _mm256_maddubs_epi16(wa, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))),
            _mm256_maddubs_epi16(wb, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32))));
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(s16, ones)), pair_scales_256(scale[i] + g), acc[i]);
      }
    }
    if (g < groups) nibble_lone_group<MT, kHigh>(w.q, w.h, xq, K, g, scale, acc);
    store_sums<MT>(acc, rest, out, N, m0, n);
  }
}

// q8 weights are signed: maddubs takes |w| and x with w's sign (llama.cpp's way). A lane's pair of products reaches
// 2 * 128 * 127 = 32512, so the two halves of a pair are widened to int32 before they are added.
template <int MT>
void q8_i8_tile(const Int8Rows& a, const int8_t* qs, const at::Half* d, int64_t K, int64_t N, int64_t n0, int64_t n1,
                int64_t m0, float* out) {
  const int64_t groups = K / kGroup;
  const int8_t* xq = a.q.data() + m0 * K;
  const float* xd = a.scale.data() + m0 * groups;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wq = qs + n * K;
    alignas(32) float scale[MT][kMaxGroups];
    group_scales<MT>(d + n * groups, xd, groups, scale);
    __m256 acc[MT];
    alignas(32) float rest[MT];
    for (int i = 0; i < MT; ++i) acc[i] = _mm256_setzero_ps(), rest[i] = 0.f;
    int64_t g = 0;
    for (; g + 2 <= groups; g += 2) {
      __m256i wa, wb;
      interleave_pair(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + g * kGroup)),
                      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + g * kGroup + kGroup)), wa, wb);
      const __m256i ua = _mm256_abs_epi8(wa), ub = _mm256_abs_epi8(wb);
      for (int i = 0; i < MT; ++i) {
        const int8_t* x = xq + i * K + g * kGroup;
        const __m256i pa = _mm256_maddubs_epi16(ua, _mm256_sign_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)), wa));
        const __m256i pb = _mm256_maddubs_epi16(ub, _mm256_sign_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32)), wb));
        const __m256i s32 = _mm256_add_epi32(_mm256_madd_epi16(pa, ones), _mm256_madd_epi16(pb, ones));
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32), pair_scales_256(scale[i] + g), acc[i]);
      }
    }
    if (g < groups) q8_lone_group<MT>(wq, xq, K, g, scale, acc);
    store_sums<MT>(acc, rest, out, N, m0, n);
  }
}

// Column lanes: the int8 tiles turned around. With VNNI one 512-bit vector holds the same four consecutive
// elements of a group (one 32-bit unit) for each of 16 weight rows, so one vpdpbusd against the activation row's
// matching four bytes, broadcast from memory, adds four products to each of 16 outputs. A group is eight of them
// per activation row, then one conversion and one FMA with the 16 rows' scales times the row's (and one more for
// the minimums). The weights stay in their layout in memory: a tile's 16 rows are loaded, transposed and unpacked
// in registers once for every activation row of the call, and the sums end as adjacent outputs, with no
// horizontal adds and no per-row table of scales. The pair layout (above) spent three more instructions per
// vpdpbusd and a scale table per weight row and activation row; at 16 activation rows this takes about half its
// time. AVX2 has the same with 8 rows per vector, for q4 and q5 (further below; docs/engine.md has the figures).
static_assert(kColTile == 16, "a column tile is one vector of 16 lanes");
constexpr int64_t kLaneRows = 64;   // activation rows per pass over a tile (their 16 sums each stay in L1)
constexpr int64_t kLaneBlock = 8;   // groups whose scales (and fifth bits) are transposed at a time

// One array of a tile's 16 weight rows: lane c reads row n0 + c, or the tile's last row where the tile is short
// (those lanes are computed and never stored).
struct LaneRows {
  const uint8_t* p[16];
  int64_t ahead;  // bytes from a row to the same row of the next tile
  LaneRows(const void* base, int64_t n0, int64_t cols, int64_t row_bytes) : ahead(kColTile * row_bytes) {
    for (int64_t c = 0; c < 16; ++c) p[c] = static_cast<const uint8_t*>(base) + (n0 + std::min(c, cols - 1)) * row_bytes;
  }
  // Asks for the bytes at `at` of the next tile's rows. A tile reads its 16 rows a few bytes each in turn, too
  // short a run per row for the hardware prefetcher: at 2 activation rows the product over the 49,152-row output
  // head took 1.0-1.6x the time of the row-at-a-time tiles without this, 0.8-0.9x with it. A prefetch past the
  // matrix's end never faults.
  void prefetch(int64_t at, int first = 0, int count = 16) const {
    for (int c = first; c < first + count; ++c) _mm_prefetch(reinterpret_cast<const char*>(p[c] + ahead + at), _MM_HINT_T0);
  }
};

#ifdef LLAMA_LAB_INT8_VNNI
// Bytes at..at+15 of the 16 rows (only the first `bytes` of them are read, the rest are 0) as four vectors:
// vector j's lane c is row c's bytes at+4j..at+4j+3. Four rows per vector as 128-bit lanes, then two rounds of
// 32-bit permutes.
inline void transpose_16x4(const LaneRows& rows, int64_t at, int64_t bytes, __m512i (&r)[4]) {
  const __mmask16 k = bytes >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << bytes) - 1);
  const auto load = [&](int c) {
    const uint8_t* p = rows.p[c] + at;
    return bytes >= 16 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)) : _mm_maskz_loadu_epi8(k, p);
  };
  __m512i a[4];
  for (int q = 0; q < 4; ++q) {
    a[q] = _mm512_castsi128_si512(load(4 * q));
    for (int l = 1; l < 4; ++l) a[q] = _mm512_inserti32x4(a[q], load(4 * q + l), l);
  }
  // units 0 and 1 (or 2 and 3) of eight rows: a[0]'s rows 0..3 at 4c + j, a[1]'s rows 4..7 at 16 + 4c + j
  const __m512i units01 = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29);
  const __m512i units23 = _mm512_setr_epi32(2, 6, 10, 14, 18, 22, 26, 30, 3, 7, 11, 15, 19, 23, 27, 31);
  const __m512i lo01 = _mm512_permutex2var_epi32(a[0], units01, a[1]), hi01 = _mm512_permutex2var_epi32(a[2], units01, a[3]);
  const __m512i lo23 = _mm512_permutex2var_epi32(a[0], units23, a[1]), hi23 = _mm512_permutex2var_epi32(a[2], units23, a[3]);
  r[0] = _mm512_shuffle_i64x2(lo01, hi01, 0x44);  // rows 0..7, then 8..15
  r[1] = _mm512_shuffle_i64x2(lo01, hi01, 0xEE);
  r[2] = _mm512_shuffle_i64x2(lo23, hi23, 0x44);
  r[3] = _mm512_shuffle_i64x2(lo23, hi23, 0xEE);
}

// float16 values g0..g0+7 of the rows (one per group; fewer at a row's end) as lanes: out[k][c] is row c's g0 + k.
inline void transpose_halves(const LaneRows& rows, int64_t g0, int64_t groups, float (*out)[16]) {
  __m512i r[4];
  transpose_16x4(rows, g0 * 2, (groups - g0) * 2, r);
  for (int j = 0; j < 4; ++j) {
    _mm512_store_ps(out[2 * j], _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_and_si512(r[j], _mm512_set1_epi32(0xFFFF)))));
    _mm512_store_ps(out[2 * j + 1], _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(r[j], 16))));
  }
}

// Four bytes of activations as the broadcast operand of vpdpbusd (the compiler folds it into the instruction).
inline __m512i four_bytes_512(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return _mm512_set1_epi32(v);
}

// What a tile needs per block of kLaneBlock groups, as 16 lanes each: scales, minimums, q5's fifth-bit words.
struct LaneBlock {
  alignas(64) float scale[kLaneBlock][16];
  alignas(64) float mins[kLaneBlock][16];
  alignas(64) uint32_t high[kLaneBlock][16];
};

// A q4 (kHigh false) or q5 tile: group g's vector t has, in lane c, row c's elements 4t..4t+3 as unsigned bytes
// (0..31); the minimums are -8 or -16 times the scales where the file stores none.
template <bool kHigh>
struct NibbleLanes {
  const uint8_t* qs;
  const uint8_t* qh;
  const at::Half* d;
  const at::Half* m;
  int64_t K;
  static constexpr bool kMins = true, kBias8 = false;

  struct Tile {
    LaneRows q, h, d, m;
    bool stored_mins;
    int64_t groups;

    void block(int64_t g0, LaneBlock& b) const {
      d.prefetch(g0 * 2);
      transpose_halves(d, g0, groups, b.scale);
      if (stored_mins) {
        m.prefetch(g0 * 2);
        transpose_halves(m, g0, groups, b.mins);
      } else {
        for (int64_t k = 0; k < kLaneBlock; ++k)
          _mm512_store_ps(b.mins[k], _mm512_mul_ps(_mm512_load_ps(b.scale[k]), _mm512_set1_ps(-implicit_offset<kHigh>())));
      }
      if constexpr (kHigh) {
        for (int64_t half = 0; half < 2; ++half) {  // four groups' words per transposition
          const int64_t first = g0 + 4 * half;
          if (first >= groups) break;
          h.prefetch(first * 4);
          __m512i r[4];
          transpose_16x4(h, first * 4, (groups - first) * 4, r);
          for (int j = 0; j < 4; ++j) _mm512_store_si512(b.high[4 * half + j], r[j]);
        }
      }
    }

    void group(int64_t g, const LaneBlock& b, int64_t k, __m512i (&t)[8]) const {
      if (g % 4 == 0) q.prefetch(g * 16);
      __m512i r[4];
      transpose_16x4(q, g * 16, 16, r);
      const __m512i low = _mm512_set1_epi8(0x0F);
      for (int j = 0; j < 4; ++j) {  // byte i of unit j: element 4j + i (low nibble) and 16 + 4j + i (high)
        t[j] = _mm512_and_si512(r[j], low);
        t[4 + j] = _mm512_and_si512(_mm512_srli_epi16(r[j], 4), low);
      }
      if constexpr (kHigh) {
        // bits 4t..4t+3 of a row's word are vector t's fifth bits: a nibble n picks entry n of a table that has 16
        // in byte i where bit i of n is set (vpermd reads an index's low four bits only)
        const __m512i sixteens = _mm512_setr_epi32(0, 0x10, 0x1000, 0x1010, 0x100000, 0x100010, 0x101000, 0x101010,
                                                   0x10000000, 0x10000010, 0x10001000, 0x10001010, 0x10100000,
                                                   0x10100010, 0x10101000, 0x10101010);
        const __m512i words = _mm512_load_si512(b.high[k]);
        for (int j = 0; j < 8; ++j)
          t[j] = _mm512_or_si512(t[j], _mm512_permutexvar_epi32(_mm512_srli_epi32(words, 4 * j), sixteens));
      }
    }
  };

  Tile tile(int64_t n0, int64_t cols) const {
    const int64_t groups = K / kGroup;
    return Tile{LaneRows(qs, n0, cols, K / 2), LaneRows(kHigh ? qh : qs, n0, cols, kHigh ? K / 8 : 0),
                LaneRows(d, n0, cols, groups * 2), LaneRows(m ? m : d, n0, cols, groups * 2), m != nullptr, groups};
  }
};

// A q8 tile: the signed weights plus 128, as unsigned bytes (vpdpbusd's unsigned side); each activation row's sums
// start at -128 times its group's sum of int8 values (Int8Rows::bias8), which takes the 128 back out.
struct Q8Lanes {
  const int8_t* qs;
  const at::Half* d;
  int64_t K;
  static constexpr bool kMins = false, kBias8 = true;

  struct Tile {
    LaneRows q, d;
    int64_t groups;

    void block(int64_t g0, LaneBlock& b) const {
      d.prefetch(g0 * 2);
      transpose_halves(d, g0, groups, b.scale);
    }

    void group(int64_t g, const LaneBlock&, int64_t, __m512i (&t)[8]) const {
      if (g % 2 == 0) q.prefetch(g * kGroup);
      const __m512i bias = _mm512_set1_epi8(static_cast<char>(0x80));
      __m512i r[4];
      for (int half = 0; half < 2; ++half) {
        transpose_16x4(q, g * kGroup + 16 * half, 16, r);
        for (int j = 0; j < 4; ++j) t[4 * half + j] = _mm512_xor_si512(r[j], bias);
      }
    }
  };

  Tile tile(int64_t n0, int64_t cols) const {
    return Tile{LaneRows(qs, n0, cols, K), LaneRows(d, n0, cols, K / kGroup * 2), K / kGroup};
  }
};

// Output columns n0..n1 (at most 16) of activation rows m0..m0+mt (at most kLaneRows).
template <typename Lanes>
void lanes_tile(const Int8Rows& a, const Lanes& lanes, int64_t K, int64_t N, int64_t n0, int64_t n1, int64_t m0,
                int64_t mt, float* out) {
  const int64_t groups = K / kGroup;
  const typename Lanes::Tile w = lanes.tile(n0, n1 - n0);
  alignas(64) float acc[kLaneRows][16];
  LaneBlock b;
  for (int64_t i = 0; i < mt; ++i) _mm512_store_ps(acc[i], _mm512_setzero_ps());
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t k = g % kLaneBlock;
    if (k == 0) w.block(g, b);
    __m512i t[8];
    w.group(g, b, k, t);
    const __m512 scale = _mm512_load_ps(b.scale[k]);
    for (int64_t i = 0; i < mt; ++i) {
      const int64_t r = (m0 + i) * groups + g;
      const int8_t* x = a.q.data() + (m0 + i) * K + g * kGroup;
      __m512i s0 = Lanes::kBias8 ? _mm512_set1_epi32(a.bias8[r]) : _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
      for (int j = 0; j < 8; j += 2) {  // two chains
        s0 = _mm512_dpbusd_epi32(s0, t[j], four_bytes_512(x + 4 * j));
        s1 = _mm512_dpbusd_epi32(s1, t[j + 1], four_bytes_512(x + 4 * j + 4));
      }
      __m512 f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)), _mm512_mul_ps(scale, _mm512_set1_ps(a.scale[r])),
                                 _mm512_load_ps(acc[i]));
      if constexpr (Lanes::kMins) f = _mm512_fmadd_ps(_mm512_load_ps(b.mins[k]), _mm512_set1_ps(a.sum[r]), f);
      _mm512_store_ps(acc[i], f);
    }
  }
  const __mmask16 valid = static_cast<__mmask16>((1u << (n1 - n0)) - 1);
  for (int64_t i = 0; i < mt; ++i) _mm512_mask_storeu_ps(out + (m0 + i) * N + n0, valid, _mm512_load_ps(acc[i]));
}

template <typename Lanes>
at::Tensor lanes_linear(const at::Tensor& x, int64_t N, int64_t K, const Lanes& lanes) {
  const int64_t M = x.size(0);
  const Int8Rows a = quantize_rows_int8(x.data_ptr<float>(), M, K,
                                       Lanes::kBias8 ? Int8Layout::kElementsBias8 : Int8Layout::kElements);
  return run_tiles(M, N, kLaneRows, [&](int64_t n0, int64_t n1, int64_t m0, int64_t mt, float* o) {
    lanes_tile(a, lanes, K, N, n0, n1, m0, mt, o);
  });
}
#else
// Column lanes on AVX2 (no VNNI): 8 weight rows per vector, a tile's 16 rows in two halves. vpmaddubsw multiplies
// the rows' unsigned bytes (0..31) by the activation's four bytes broadcast, two products per 16-bit lane; four of
// them add in 16 bits (at most 4 * 2 * 31 * 127 = 31496) before vpmaddwd widens them. A group is then eight
// multiplies, six 16-bit adds and two widenings per activation row for 8 outputs, where the pair layout spends
// per output row two loads, two vpmaddubsw, an add, a widening, a conversion and an FMA per two groups plus a
// scale table and a minimum term. 2 and 3 rows, and q8, keep the pair layout: the transposition costs the same
// whatever the rows, and q8's signed weights need |w| and the activation's sign per product, which a broadcast
// activation cannot carry (a sign per weight row).

// From this many rows on the AVX2 column lanes beat the pair layout for q4 and q5: at 2 rows they took 1.0-1.25x
// its time (the transposition is paid per group whatever the rows), at 4 0.85-1.1x, at 16 0.6-0.8x (docs/engine.md).
constexpr int64_t kLanes8Rows = 4;

// 8 lanes of -1 then 8 of 0: a window into it is a mask of the first n lanes (n 0..8), for maskload and maskstore.
alignas(64) constexpr int32_t kFirstLanes[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};

inline __m256i first_lanes(int64_t n) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kFirstLanes + 8 - n)); }

// The first `bytes` (an even count below 16) of p, the rest 0, read without touching a byte past them: whole 32-bit
// units by a masked load, a last 16-bit value put in its place under a mask.
inline __m128i load_tail(const uint8_t* p, int64_t bytes) {
  const int64_t units = bytes / 4;
  __m128i v = _mm_maskload_epi32(reinterpret_cast<const int*>(p), _mm256_castsi256_si128(first_lanes(units)));
  if (bytes % 4) {
    uint16_t last;
    std::memcpy(&last, p + 4 * units, sizeof(last));
    const __m128i at_unit = _mm_xor_si128(_mm256_castsi256_si128(first_lanes(units + 1)), _mm256_castsi256_si128(first_lanes(units)));
    v = _mm_or_si128(v, _mm_and_si128(_mm_set1_epi32(last), at_unit));
  }
  return v;
}

// 8 rows' (rows.p[c0..c0+7]) 16 bytes at `at` (only the first `bytes` read, the rest 0) as four vectors: vector
// j's lane c is row c0 + c's bytes at+4j..at+4j+3. Rows c and c+4 share a vector as its two 128-bit lanes, then
// the 4 x 4 transposition of 32-bit units within each lane.
inline void transpose_8x4(const LaneRows& rows, int c0, int64_t at, int64_t bytes, __m256i (&r)[4]) {
  const auto load = [&](int c) {
    const uint8_t* p = rows.p[c0 + c] + at;
    return bytes >= 16 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)) : load_tail(p, bytes);
  };
  __m256i a[4];
  for (int c = 0; c < 4; ++c) a[c] = _mm256_set_m128i(load(c + 4), load(c));
  const __m256i t0 = _mm256_unpacklo_epi32(a[0], a[1]), t1 = _mm256_unpackhi_epi32(a[0], a[1]);
  const __m256i t2 = _mm256_unpacklo_epi32(a[2], a[3]), t3 = _mm256_unpackhi_epi32(a[2], a[3]);
  r[0] = _mm256_unpacklo_epi64(t0, t2);
  r[1] = _mm256_unpackhi_epi64(t0, t2);
  r[2] = _mm256_unpacklo_epi64(t1, t3);
  r[3] = _mm256_unpackhi_epi64(t1, t3);
}

// The low (or high) 16 bits of 8 lanes as 8 floats.
inline __m256 halves_to_float(const __m256i units) {
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(units, units), 0x08);
  return _mm256_cvtph_ps(_mm256_castsi256_si128(packed));
}

// float16 values g0..g0+7 of rows c0..c0+7 (one per group; fewer at a row's end) as lanes: out[k][c] is row c0 + c's
// g0 + k (transpose_halves' 8-lane twin).
inline void transpose_halves8(const LaneRows& rows, int c0, int64_t g0, int64_t groups, float (*out)[8]) {
  __m256i r[4];
  transpose_8x4(rows, c0, g0 * 2, (groups - g0) * 2, r);
  for (int j = 0; j < 4; ++j) {
    _mm256_store_ps(out[2 * j], halves_to_float(_mm256_and_si256(r[j], _mm256_set1_epi32(0xFFFF))));
    _mm256_store_ps(out[2 * j + 1], halves_to_float(_mm256_srli_epi32(r[j], 16)));
  }
}

// Four bytes of activations, broadcast.
inline __m256i four_bytes(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return _mm256_set1_epi32(v);
}

struct LaneBlock8 {
  alignas(32) float scale[kLaneBlock][8];
  alignas(32) float mins[kLaneBlock][8];
  alignas(32) uint32_t high[kLaneBlock][8];
};

// Output columns n0 + c0 .. n0 + c0 + 7 of a q4 (kHigh false) or q5 tile, for activation rows m0..m0+mt.
template <bool kHigh>
void nibble_lanes8(const Int8Rows& a, const LaneRows& q, const LaneRows& h, const LaneRows& d, const LaneRows* m,
                   int c0, int64_t K, int64_t groups, int64_t m0, int64_t mt, float (*acc)[8]) {
  LaneBlock8 b;
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1), sixteen = _mm256_set1_epi8(16);
  for (int64_t i = 0; i < mt; ++i) _mm256_store_ps(acc[i], _mm256_setzero_ps());
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t k = g % kLaneBlock;
    __m256i r[4];
    if (k == 0) {
      transpose_halves8(d, c0, g, groups, b.scale);
      if (m != nullptr) {
        transpose_halves8(*m, c0, g, groups, b.mins);
      } else {
        for (int64_t j = 0; j < kLaneBlock; ++j)
          _mm256_store_ps(b.mins[j], _mm256_mul_ps(_mm256_load_ps(b.scale[j]), _mm256_set1_ps(-implicit_offset<kHigh>())));
      }
      if constexpr (kHigh) {
        for (int64_t half = 0; half < 2 && g + 4 * half < groups; ++half) {
          transpose_8x4(h, c0, (g + 4 * half) * 4, (groups - g - 4 * half) * 4, r);
          for (int j = 0; j < 4; ++j) _mm256_store_si256(reinterpret_cast<__m256i*>(b.high[4 * half + j]), r[j]);
        }
      }
    }
    if (g % 4 == 0) q.prefetch(g * 16, c0, 8);
    transpose_8x4(q, c0, g * 16, 16, r);
    __m256i t[8];
    for (int j = 0; j < 4; ++j) {  // byte i of unit j: element 4j + i (low nibble) and 16 + 4j + i (high)
      t[j] = _mm256_and_si256(r[j], low);
      t[4 + j] = _mm256_and_si256(_mm256_srli_epi16(r[j], 4), low);
    }
    if constexpr (kHigh) {
      // vector u's fifth bits are bits 4u..4u+3 of the row's word: its byte u/2 copied to the unit's four bytes,
      // and byte i keeps bit i (of that nibble) as 16
      const __m256i words = _mm256_load_si256(reinterpret_cast<const __m256i*>(b.high[k]));
      const __m256i bit_lo = _mm256_set1_epi32(0x08040201), bit_hi = _mm256_set1_epi32(static_cast<int32_t>(0x80402010));
      for (int u = 0; u < 8; ++u) {
        const int byte = u / 2;
        const __m256i spread = _mm256_shuffle_epi8(words, _mm256_setr_epi8(
            byte, byte, byte, byte, 4 + byte, 4 + byte, 4 + byte, 4 + byte, 8 + byte, 8 + byte, 8 + byte, 8 + byte,
            12 + byte, 12 + byte, 12 + byte, 12 + byte, byte, byte, byte, byte, 4 + byte, 4 + byte, 4 + byte, 4 + byte,
            8 + byte, 8 + byte, 8 + byte, 8 + byte, 12 + byte, 12 + byte, 12 + byte, 12 + byte));
        const __m256i bit = u % 2 ? bit_hi : bit_lo;
        t[u] = _mm256_or_si256(t[u], _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), sixteen));
      }
    }
    const __m256 scale = _mm256_load_ps(b.scale[k]), mins = _mm256_load_ps(b.mins[k]);
    for (int64_t i = 0; i < mt; ++i) {
      const int64_t row = (m0 + i) * groups + g;
      const int8_t* x = a.q.data() + (m0 + i) * K + g * kGroup;
      __m256i s[2];
      for (int half = 0; half < 2; ++half) {
        const int8_t* xh = x + 16 * half;
        const __m256i* th = t + 4 * half;
        s[half] = _mm256_madd_epi16(
            _mm256_add_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(th[0], four_bytes(xh)), _mm256_maddubs_epi16(th[1], four_bytes(xh + 4))),
                             _mm256_add_epi16(_mm256_maddubs_epi16(th[2], four_bytes(xh + 8)), _mm256_maddubs_epi16(th[3], four_bytes(xh + 12)))),
            ones);
      }
      __m256 f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(s[0], s[1])), _mm256_mul_ps(scale, _mm256_set1_ps(a.scale[row])),
                                 _mm256_load_ps(acc[i]));
      _mm256_store_ps(acc[i], _mm256_fmadd_ps(mins, _mm256_set1_ps(a.sum[row]), f));
    }
  }
}

template <bool kHigh>
at::Tensor nibble_lanes_linear(const at::Tensor& x, int64_t N, int64_t K, const uint8_t* qs, const uint8_t* qh,
                               const at::Half* d, const at::Half* m) {
  const int64_t M = x.size(0), groups = K / kGroup;
  const Int8Rows a = quantize_rows_int8(x.data_ptr<float>(), M, K, Int8Layout::kElements);
  return run_tiles(M, N, kLaneRows, [&](int64_t n0, int64_t n1, int64_t m0, int64_t mt, float* out) {
    const int64_t cols = n1 - n0;
    const LaneRows q(qs, n0, cols, K / 2), h(kHigh ? qh : qs, n0, cols, kHigh ? K / 8 : 0), ds(d, n0, cols, groups * 2),
        ms(m ? m : d, n0, cols, groups * 2);
    alignas(32) float acc[kLaneRows][8];
    for (int c0 = 0; c0 < cols; c0 += 8) {
      nibble_lanes8<kHigh>(a, q, h, ds, m ? &ms : nullptr, c0, K, groups, m0, mt, acc);
      const __m256i stored = first_lanes(std::min<int64_t>(8, cols - c0));
      for (int64_t i = 0; i < mt; ++i) _mm256_maskstore_ps(out + (m0 + i) * N + n0 + c0, stored, _mm256_load_ps(acc[i]));
    }
  });
}
#endif
#endif

// A q4/q5 weight's minimums, contiguous, or an undefined tensor where they are implicit (absent).
at::Tensor mins_of(const std::optional<at::Tensor>& m, const at::Tensor& d, const char* op) {
  if (!m.has_value() || !m->defined()) return at::Tensor();
  TORCH_CHECK(m->sizes() == d.sizes() && m->scalar_type() == at::kHalf, op, ": mins must match the scales");
  return m->contiguous();
}

// A q5 weight's fifth bits: one 32-bit word per group of each of its N rows (read without bounds checks after).
void check_high_bits(const at::Tensor& qh, int64_t N, int64_t K, const char* op) {
  TORCH_CHECK(qh.scalar_type() == at::kByte && qh.dim() == 2 && qh.size(0) == N && qh.size(1) == K / 8, op,
              ": qh must be uint8 [N, K/8]");
}

// q4_linear and q5_linear: qh is the q5 weight's fifth bits, or nullptr for q4.
template <bool kHigh>
at::Tensor nibble_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor* qh, const at::Tensor& d,
                         const std::optional<at::Tensor>& m, bool prompt, const char* op) {
  const int64_t K = qs.size(1) * 2, N = qs.size(0);
  TORCH_CHECK(qs.scalar_type() == at::kByte && qs.dim() == 2, op, ": qs must be uint8 [N, K/2]");
  if constexpr (kHigh) check_high_bits(*qh, N, K, op);
  check_common(x, qs, d, K, op);
  const at::Tensor xc = x.contiguous(), qc = qs.contiguous(), dc = d.contiguous(), mc = mins_of(m, d, op);
  const at::Tensor hc = kHigh ? qh->contiguous() : at::Tensor();
  const int64_t M = xc.size(0);
  const uint8_t* qp = qc.data_ptr<uint8_t>();
  const uint8_t* hp = kHigh ? hc.data_ptr<uint8_t>() : nullptr;
  const at::Half* dp = dc.data_ptr<at::Half>();
  const at::Half* mp = mc.defined() ? mc.data_ptr<at::Half>() : nullptr;
  if (M >= gemm_rows() && prompt_product() != PromptProduct::kInt16)
    return dequant_gemm(xc, N, K, [&](int64_t n, float* o) { nibble_row<kHigh>(qp, hp, dp, mp, K, n, o); });
#ifdef LLAMA_LAB_BF16_TILES
  if (M >= bf16_tile_rows() && M < gemm_rows()) return bf16_tiles(xc, N, K, NibbleGroup<kHigh>{qp, hp, dp, mp, K});
#endif
#ifdef LLAMA_LAB_INT8_TILES
#ifdef LLAMA_LAB_INT8_VNNI
  if (!prompt && M >= int8_tile_rows() && M < gemm_rows())
    return lanes_linear(xc, N, K, NibbleLanes<kHigh>{qp, hp, dp, mp, K});
#else
  if (!prompt && M >= std::max(int8_tile_rows(), kLanes8Rows) && M < gemm_rows())
    return nibble_lanes_linear<kHigh>(xc, N, K, qp, hp, dp, mp);
  if (!prompt && M >= int8_tile_rows() && M < gemm_rows()) {
    const Int8Rows a = quantize_rows_int8(xc.data_ptr<float>(), M, K, Int8Layout::kPairs);
    return run_tiles(M, N, kInt8RowTile, [&](int64_t n0, int64_t n1, int64_t m0, int64_t mt, float* o) {
      dispatch_rows<kInt8RowTile>(mt, [&](auto rows) {
        nibble_i8_tile<decltype(rows)::value, kHigh>(a, qp, hp, dp, mp, K, N, n0, n1, m0, o);
      });
    });
  }
#endif
#endif
#ifdef LLAMA_LAB_AVX512
  const QuantizedRows a = quantize_rows(xc.data_ptr<float>(), M, K, /*paired=*/true);
#else
  const QuantizedRows a = quantize_rows(xc.data_ptr<float>(), M, K);
#endif
  return run_tiles(M, N, kRowTile, [&](int64_t n0, int64_t n1, int64_t m0, int64_t mt, float* o) {
    dispatch_rows<kRowTile>(mt, [&](auto rows) {
      nibble_tile<decltype(rows)::value, kHigh>(a, qp, hp, dp, mp, K, N, n0, n1, m0, o);
    });
  });
}

// prompt: the rows are a prompt's (prefill), which never take the int8 tiles: a prompt's keys and values stay in
// the cache for the whole conversation, and with int8 activations the embedded model's answer to "What is the
// capital of France?" turned on float rounding noise (docs/engine.md).
at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d,
                     const std::optional<at::Tensor>& m, bool prompt) {
  return nibble_linear<false>(x, qs, nullptr, d, m, prompt, "q4_linear");
}

at::Tensor q5_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& qh, const at::Tensor& d,
                     const std::optional<at::Tensor>& m, bool prompt) {
  return nibble_linear<true>(x, qs, &qh, d, m, prompt, "q5_linear");
}

at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, bool prompt) {
  const int64_t K = qs.size(1), N = qs.size(0);
  TORCH_CHECK(qs.scalar_type() == at::kChar && qs.dim() == 2, "q8_linear: qs must be int8 [N, K]");
  check_common(x, qs, d, K, "q8_linear");
  const at::Tensor xc = x.contiguous(), qc = qs.contiguous(), dc = d.contiguous();
  const int64_t M = xc.size(0);
  const int8_t* qp = qc.data_ptr<int8_t>();
  const at::Half* dp = dc.data_ptr<at::Half>();
  if (M >= gemm_rows() && prompt_product() != PromptProduct::kInt16)
    return dequant_gemm(xc, N, K, [&](int64_t n, float* o) { q8_row(qp, dp, K, n, o); });
#ifdef LLAMA_LAB_BF16_TILES
  if (M >= bf16_tile_rows() && M < gemm_rows()) return bf16_tiles(xc, N, K, Q8Group{qp, dp, K});
#endif
#ifdef LLAMA_LAB_INT8_TILES
#ifdef LLAMA_LAB_INT8_VNNI
  if (!prompt && M >= int8_tile_rows() && M < gemm_rows())
    return lanes_linear(xc, N, K, Q8Lanes{qp, dp, K});
#else
  if (!prompt && M >= int8_tile_rows() && M < gemm_rows()) {
    const Int8Rows a = quantize_rows_int8(xc.data_ptr<float>(), M, K, Int8Layout::kPairs);
    return run_tiles(M, N, kInt8RowTile, [&](int64_t n0, int64_t n1, int64_t m0, int64_t mt, float* o) {
      dispatch_rows<kInt8RowTile>(mt, [&](auto rows) { q8_i8_tile<decltype(rows)::value>(a, qp, dp, K, N, n0, n1, m0, o); });
    });
  }
#endif
#endif
  const QuantizedRows a = quantize_rows(xc.data_ptr<float>(), M, K);
  return run_tiles(M, N, kRowTile, [&](int64_t n0, int64_t n1, int64_t m0, int64_t mt, float* o) {
    dispatch_rows<kRowTile>(mt, [&](auto rows) { q8_tile<decltype(rows)::value>(a, qp, dp, K, N, n0, n1, m0, o); });
  });
}

// ---------------------------------------------------------------------------------------------
// Rows of the dequantized matrix: the embedding lookup (whose table is the tied lm_head's weight).
template <typename Row>
at::Tensor gather_rows(const at::Tensor& ids, int64_t N, int64_t K, Row&& row, const char* op) {
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 1, op, ": ids must be int64 [T]");
  const at::Tensor ic = ids.contiguous();
  const int64_t T = ic.size(0);
  const int64_t* ip = ic.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(ip[t] >= 0 && ip[t] < N, op, ": id ", ip[t], " out of range");
  auto out = at::empty({T, K}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) row(ip[t], o + t * K);
  });
  return out;
}

template <bool kHigh>
at::Tensor nibble_rows(const at::Tensor& ids, const at::Tensor& qs, const at::Tensor* qh, const at::Tensor& d,
                       const std::optional<at::Tensor>& m, const char* op) {
  const int64_t K = qs.size(1) * 2;
  if constexpr (kHigh) check_high_bits(*qh, qs.size(0), K, op);
  const at::Tensor qc = qs.contiguous(), dc = d.contiguous(), mc = mins_of(m, d, op);
  const at::Tensor hc = kHigh ? qh->contiguous() : at::Tensor();
  const uint8_t* qp = qc.data_ptr<uint8_t>();
  const uint8_t* hp = kHigh ? hc.data_ptr<uint8_t>() : nullptr;
  const at::Half* dp = dc.data_ptr<at::Half>();
  const at::Half* mp = mc.defined() ? mc.data_ptr<at::Half>() : nullptr;
  return gather_rows(ids, qs.size(0), K, [&](int64_t n, float* o) { nibble_row<kHigh>(qp, hp, dp, mp, K, n, o); }, op);
}

at::Tensor q4_rows(const at::Tensor& ids, const at::Tensor& qs, const at::Tensor& d,
                   const std::optional<at::Tensor>& m) {
  return nibble_rows<false>(ids, qs, nullptr, d, m, "q4_rows");
}

at::Tensor q5_rows(const at::Tensor& ids, const at::Tensor& qs, const at::Tensor& qh, const at::Tensor& d,
                   const std::optional<at::Tensor>& m) {
  return nibble_rows<true>(ids, qs, &qh, d, m, "q5_rows");
}

at::Tensor q8_rows(const at::Tensor& ids, const at::Tensor& qs, const at::Tensor& d) {
  const int64_t K = qs.size(1);
  const at::Tensor qc = qs.contiguous(), dc = d.contiguous();
  const int8_t* qp = qc.data_ptr<int8_t>();
  const at::Half* dp = dc.data_ptr<at::Half>();
  return gather_rows(ids, qs.size(0), K, [&](int64_t n, float* o) { q8_row(qp, dp, K, n, o); }, "q8_rows");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llama_lab, m) {
  m.def("q4_linear(Tensor x, Tensor qs, Tensor d, Tensor? m, bool prompt=False) -> Tensor");
  m.def("q8_linear(Tensor x, Tensor qs, Tensor d, bool prompt=False) -> Tensor");
  m.def("q5_linear(Tensor x, Tensor qs, Tensor qh, Tensor d, Tensor? m, bool prompt=False) -> Tensor");
  m.def("q5_rows(Tensor ids, Tensor qs, Tensor qh, Tensor d, Tensor? m) -> Tensor");
  m.def("q4_rows(Tensor ids, Tensor qs, Tensor d, Tensor? m) -> Tensor");
  m.def("q8_rows(Tensor ids, Tensor qs, Tensor d) -> Tensor");
  m.def("gemm_dtype() -> str", &gemm_dtype);
  m.def("gemm_rows() -> int", &gemm_rows);
  m.def("bf16_tile_rows() -> int", &bf16_tile_rows);
  m.def("int8_tile_rows() -> int", &int8_tile_rows);
}

TORCH_LIBRARY_IMPL(llama_lab, CPU, m) {
  m.impl("q4_linear", &q4_linear);
  m.impl("q8_linear", &q8_linear);
  m.impl("q5_linear", &q5_linear);
  m.impl("q5_rows", &q5_rows);
  m.impl("q4_rows", &q4_rows);
  m.impl("q8_rows", &q8_rows);
}

// ---------------------------------------------------------------- grammar bitmasks
//
// A constrained row's grammar allows a few tokens of a 49k-150k vocabulary; its mask is one bit per token
// (llguidance's layout: int32 words, token t is bit t % 32 of word t / 32), applied to the batch's logits
// in place. Unpacked with torch ops (shift, and, compare, masked_fill, index_copy: about ten passes over
// the rows) it cost the whole batch, free rows included, a share of every step (docs/structured_outputs.md
// has the figures); one pass here writes -inf where a bit is 0 and skips words that allow all 32 tokens.
// It lives in this file, not one of its own: the library is compiled on a machine's first start, beside
// the GGUF repack, and a third source would cost that start a few seconds of header parsing.

namespace {

void apply_token_bitmask_(at::Tensor logits, const at::Tensor& mask, const at::Tensor& index) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.is_contiguous() && logits.is_cpu(),
              "apply_token_bitmask_: logits must be a contiguous float32 [B, V] CPU tensor");
  TORCH_CHECK(mask.dim() == 2 && mask.scalar_type() == at::kInt && mask.is_contiguous() && mask.is_cpu(),
              "apply_token_bitmask_: mask must be a contiguous int32 [R, words] CPU tensor");
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong && index.size(0) == mask.size(0),
              "apply_token_bitmask_: index must be int64 [R], one logits row per mask row");
  const int64_t B = logits.size(0), V = logits.size(1), W = mask.size(1);
  float* lp = logits.data_ptr<float>();
  const uint32_t* mp = reinterpret_cast<const uint32_t*>(mask.data_ptr<int32_t>());
  const at::Tensor ic = index.contiguous();
  const int64_t* ip = ic.data_ptr<int64_t>();
  const float forbidden = -std::numeric_limits<float>::infinity();
  for (int64_t r = 0; r < index.size(0); ++r) {
    const int64_t row = ip[r];
    TORCH_CHECK(row >= 0 && row < B, "apply_token_bitmask_: index ", row, " is outside the ", B, " logits rows");
    float* out = lp + row * V;
    const uint32_t* words = mp + r * W;
    for (int64_t base = 0; base < V; base += 32) {
      const int64_t w = base / 32;
      const uint32_t bits = w < W ? words[w] : 0u;  // tokens past the mask's vocabulary are never allowed
      if (bits == 0xFFFFFFFFu) continue;
      const int64_t end = base + 32 < V ? base + 32 : V;
      if (bits == 0u) {  // the common word of a grammar's mask: nothing allowed
        std::fill(out + base, out + end, forbidden);
        continue;
      }
      for (int64_t t = base; t < end; ++t) {  // branch-free: a select the compiler vectorizes
        out[t] = ((bits >> (t - base)) & 1u) ? out[t] : forbidden;
      }
    }
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llama_lab, m) {
  m.def("apply_token_bitmask_(Tensor(a!) logits, Tensor mask, Tensor index) -> ()");
}

TORCH_LIBRARY_IMPL(llama_lab, CPU, m) { m.impl("apply_token_bitmask_", &apply_token_bitmask_); }
