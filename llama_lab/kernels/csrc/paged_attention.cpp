// Paged attention for the CPU: every query token attends to keys 0..position of its own sequence,
// read from a block table, in one pass over the cache (decode and chunked prefill alike).
//
// Why by hand: torch's CPU SDPA runs a one-token query at ~1.4 GB/s of KV cache and needs the cache
// gathered into one tensor first; decoding at long context is then dominated by attention. This
// kernel streams each sequence's blocks once per kv head, shares every key row between the query
// heads of its group (GQA), splits long contexts into chunks so both cores work on one sequence, and
// merges the chunks with the usual log-sum-exp rescaling (flash-decoding). With the head-major layout the
// hardware prefetcher streams a head's blocks at ~25-28 GB/s on 2 cores; software prefetching (needed with
// block-major blocks) only got in its way (measured: 3.2-3.7 ms vs 4.8-5.8 ms for 30 layers at 4,000 tokens).
//
// Layout: q [N, H, D]; k_cache, v_cache [KV, num_blocks, block_size, D] (head-major: one head's blocks
// are contiguous, so a sequence with consecutive blocks is one long stream per head: 25% faster at a
// 4,000-token context than block-major, measured); block_tables [S, max_blocks] int32; rows [N] int64
// (row of block_tables for each token); positions [N] int64.
// Per-operator headers, not <ATen/ATen.h>: the kernels build on a machine's first start, and the
// whole operator set takes that compile from ~20 s to ~10 s.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define LLAMA_LAB_AVX2 1
#if defined(__AVX512F__)
#define LLAMA_LAB_AVX512 1
#if defined(__AVX512BF16__)
#define LLAMA_LAB_AVX512_BF16 1
#endif
#endif
#endif

namespace {

constexpr int64_t kChunk = 512;     // keys per work item
constexpr int kBlockKeys = 64;      // keys scored before one softmax update

struct Partial {  // one query head's result over one chunk of keys
  float max, sum;
};

template <typename T>
inline float to_f32(T v) { return static_cast<float>(v); }

// The key and value rows of positions j0 .. j0+n-1 of KV head h, n = min(kBlockKeys, k1 - j0), wherever their
// blocks lie: one softmax update per kBlockKeys keys whatever the block size. (Stopping at each block's end
// made 16-token blocks, which let the prefix cache share prompts at a finer grain, 17% slower on a 4k prompt.)
template <typename T>
inline int64_t key_rows(const T* kc, const T* vc, const int32_t* table, int64_t bs, int64_t num_blocks, int64_t d,
                        int64_t h, int64_t j0, int64_t k1, const T** krows, const T** vrows) {
  const int64_t n = std::min<int64_t>(kBlockKeys, k1 - j0);
  for (int64_t j = 0; j < n;) {
    const int64_t pos = j0 + j, off = pos % bs, run = std::min(n - j, bs - off);
    const int64_t base = ((h * num_blocks + table[pos / bs]) * bs + off) * d;
    for (int64_t r = 0; r < run; ++r) krows[j + r] = kc + base + r * d, vrows[j + r] = vc + base + r * d;
    j += run;
  }
  return n;
}

// ----------------------------------------------------------------------------------------------
// Generic path: any dtype, any x86/ARM CPU (the compiler vectorizes the inner loops over D).
template <typename T>
void attend_generic(const T* q, const T* kc, const T* vc, const int32_t* table, int64_t bs, int64_t num_blocks,
                    int64_t groups, int64_t d, int64_t h, int64_t k0, int64_t k1, float scale, float* part) {
  std::vector<float> qf(groups * d), acc(groups * d, 0.f), s(groups * kBlockKeys), m(groups, -INFINITY),
      l(groups, 0.f);
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t i = 0; i < d; ++i) qf[g * d + i] = to_f32(q[(h * groups + g) * d + i]) * scale;
  const T *krows[kBlockKeys], *vrows[kBlockKeys];
  for (int64_t j0 = k0; j0 < k1;) {
    const int64_t n = key_rows(kc, vc, table, bs, num_blocks, d, h, j0, k1, krows, vrows);
    for (int64_t j = 0; j < n; ++j)
      for (int64_t g = 0; g < groups; ++g) {
        float dot = 0.f;
        for (int64_t i = 0; i < d; ++i) dot += qf[g * d + i] * to_f32(krows[j][i]);
        s[g * kBlockKeys + j] = dot;
      }
    for (int64_t g = 0; g < groups; ++g) {
      float mx = m[g];
      for (int64_t j = 0; j < n; ++j) mx = std::max(mx, s[g * kBlockKeys + j]);
      const float corr = std::exp(m[g] - mx);
      float sum = 0.f;
      for (int64_t j = 0; j < n; ++j) {
        s[g * kBlockKeys + j] = std::exp(s[g * kBlockKeys + j] - mx);
        sum += s[g * kBlockKeys + j];
      }
      l[g] = l[g] * corr + sum;
      m[g] = mx;
      for (int64_t i = 0; i < d; ++i) acc[g * d + i] *= corr;
    }
    for (int64_t j = 0; j < n; ++j)
      for (int64_t g = 0; g < groups; ++g) {
        const float p = s[g * kBlockKeys + j];
        for (int64_t i = 0; i < d; ++i) acc[g * d + i] += p * to_f32(vrows[j][i]);
      }
    j0 += n;
  }
  for (int64_t g = 0; g < groups; ++g) {
    float* row = part + g * (d + 2);
    row[0] = m[g];
    row[1] = l[g];
    std::memcpy(row + 2, acc.data() + g * d, d * sizeof(float));
  }
}

#ifdef LLAMA_LAB_AVX2
// ----------------------------------------------------------------------------------------------
// Vector paths: AVX2 + FMA + F16C (8 lanes, every x86-64 CPU of the last decade) and AVX512F (16 lanes),
// for fp32, fp16 or bf16 caches; with AVX512-BF16, bf16 caches score their keys with vdpbf16ps instead.
// One template serves both widths. The query heads of a group share every key and value row, each row
// converted once. Scores are taken KS keys at a time, so one transposing tree of adds gives KS sums where a
// horizontal sum per key and head cost ~6 instructions (as much as the dot product itself at head_dim 64).
// The value rows are accumulated a column block at a time with the block's sums in registers for all the
// group's heads: holding a whole head_dim x G in registers spilled to the stack on every FMA (24 AVX2
// registers for SmolLM2's 64 x 3, 32 AVX512 ones for Llama-3-8B's 128 x 4).
struct V8 {
  using R = __m256;
  static constexpr int W = 8, kRegs = 16;
  static R zero() { return _mm256_setzero_ps(); }
  static R set1(float x) { return _mm256_set1_ps(x); }
  static R load(const float* p) { return _mm256_loadu_ps(p); }
  static R load(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static R load(const at::BFloat16* p) {
    return _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
  }
  static void store(float* p, R v) { _mm256_storeu_ps(p, v); }
  static R fmadd(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static R add(R a, R b) { return _mm256_add_ps(a, b); }
  static R sub(R a, R b) { return _mm256_sub_ps(a, b); }
  static R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static R max(R a, R b) { return _mm256_max_ps(a, b); }
  static float hmax(R v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static float hsum(R v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // the sums of four vectors: three hadds and one add
  static __m128 hsum4(R a, R b, R c, R d) {
    const R abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
  }
  static R round(R x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static R times_pow2(R p, R i) {  // p * 2^i for integral i, through the exponent bits
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(i), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  }
};

#ifdef LLAMA_LAB_AVX512
struct V16 {
  using R = __m512;
  static constexpr int W = 16, kRegs = 32;
  static R zero() { return _mm512_setzero_ps(); }
  static R set1(float x) { return _mm512_set1_ps(x); }
  static R load(const float* p) { return _mm512_loadu_ps(p); }
  static R load(const at::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static R load(const at::BFloat16* p) {
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
  }
  static void store(float* p, R v) { _mm512_storeu_ps(p, v); }
  static R fmadd(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static R add(R a, R b) { return _mm512_add_ps(a, b); }
  static R sub(R a, R b) { return _mm512_sub_ps(a, b); }
  static R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static R max(R a, R b) { return _mm512_max_ps(a, b); }
  static float hmax(R v) { return _mm512_reduce_max_ps(v); }
  static float hsum(R v) { return _mm512_reduce_add_ps(v); }
  static __m256 fold(R v) {
    return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  }
  static __m128 hsum4(R a, R b, R c, R d) { return V8::hsum4(fold(a), fold(b), fold(c), fold(d)); }
  static R round(R x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static R times_pow2(R p, R i) { return _mm512_scalef_ps(p, i); }
};
#endif

// e^x for either width: 2^(x*log2e) = 2^i * 2^f with f in [-0.5, 0.5]; degree-6 polynomial, relative error ~2e-7.
template <class VT>
inline typename VT::R exp_vec(typename VT::R x) {
  using R = typename VT::R;
  x = VT::max(x, VT::set1(-87.3f));
  const R t = VT::mul(x, VT::set1(1.44269504088896341f));
  const R i = VT::round(t);
  const R f = VT::sub(t, i);
  R p = VT::set1(1.535336188319500e-4f);
  p = VT::fmadd(p, f, VT::set1(1.339887440266574e-3f));
  p = VT::fmadd(p, f, VT::set1(9.618437357674640e-3f));
  p = VT::fmadd(p, f, VT::set1(5.550332471162809e-2f));
  p = VT::fmadd(p, f, VT::set1(2.402264791363012e-1f));
  p = VT::fmadd(p, f, VT::set1(6.931472028550421e-1f));
  p = VT::fmadd(p, f, VT::set1(1.0f));
  return VT::times_pow2(p, i);
}

// Keys scored at once: as many as leave the G x KS sums and a key vector in registers (1, 2 or 4).
template <class VT, int G>
constexpr int keys_at_once() {
  constexpr int fit = (VT::kRegs - 2) / G;
  return fit >= 4 ? 4 : fit >= 2 ? 2 : 1;
}

// Store KS sums of G heads' dot vectors into s[g][j .. j+KS).
template <class VT, int G, int KS>
inline void store_sums(typename VT::R (&dot)[G][KS], float (*s)[kBlockKeys], int64_t j) {
  for (int g = 0; g < G; ++g) {
    if constexpr (KS == 4) {
      _mm_storeu_ps(&s[g][j], VT::hsum4(dot[g][0], dot[g][1], dot[g][2], dot[g][3]));
    } else {
      for (int k = 0; k < KS; ++k) s[g][j + k] = VT::hsum(dot[g][k]);
    }
  }
}

// Query heads in fp32 with the scale folded in; each key row converted to fp32 once, FMA'd with all G heads.
template <class VT, typename T, int D, int G>
struct FloatScores {
  static constexpr int KS = keys_at_once<VT, G>();
  static constexpr bool kScaled = true;  // the scale is folded into the query
  alignas(64) float qf[G][D];
  FloatScores(const T* q, float scale) {
    for (int g = 0; g < G; ++g)
      for (int i = 0; i < D; ++i) qf[g][i] = static_cast<float>(q[g * D + i]) * scale;
  }
  void operator()(const T* const* krows, float (*s)[kBlockKeys], int64_t j) const {
    typename VT::R dot[G][KS];
    for (int g = 0; g < G; ++g)
      for (int k = 0; k < KS; ++k) dot[g][k] = VT::zero();
    for (int c = 0; c < D; c += VT::W)  // a query vector loaded once for KS keys (key-row order: AVX2 prefill +17%)
      for (int k = 0; k < KS; ++k) {
        const typename VT::R kk = VT::load(krows[j + k] + c);
        for (int g = 0; g < G; ++g) dot[g][k] = VT::fmadd(VT::load(&qf[g][c]), kk, dot[g][k]);
      }
    store_sums<VT, G, KS>(dot, s, j);
  }
};

#ifdef LLAMA_LAB_AVX512_BF16
// bf16 caches with AVX512-BF16: query and key pairs multiplied by vdpbf16ps (32 products an instruction),
// no conversion of the keys; the scale applied to the sums.
template <int D, int G>
struct Bf16Scores {
  static_assert(D % 32 == 0, "head_dim must be a multiple of 32");
  static constexpr int KS = keys_at_once<V16, G>();
  // The sums are scaled by the softmax's first pass: scaling each one here, right after the vector store of four,
  // stalled on store forwarding (decode at 4k, caches from memory: 96-115 against 71-74 us a layer).
  static constexpr bool kScaled = false;
  __m512i qv[G][D / 32];
  float scale;
  Bf16Scores(const at::BFloat16* q, float scale_) : scale(scale_) {
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < D / 32; ++c) qv[g][c] = _mm512_loadu_si512(q + g * D + c * 32);
  }
  void operator()(const at::BFloat16* const* krows, float (*s)[kBlockKeys], int64_t j) const {
    __m512 dot[G][KS];
    for (int g = 0; g < G; ++g)
      for (int k = 0; k < KS; ++k) dot[g][k] = _mm512_setzero_ps();
    for (int k = 0; k < KS; ++k)  // the query is in registers: key rows in address order
      for (int c = 0; c < D / 32; ++c) {
        const __m512bh kk = (__m512bh)_mm512_loadu_si512(krows[j + k] + c * 32);
        for (int g = 0; g < G; ++g) dot[g][k] = _mm512_dpbf16_ps(dot[g][k], (__m512bh)qv[g][c], kk);
      }
    store_sums<V16, G, KS>(dot, s, j);
  }
};
#endif

// One query token's G heads over keys k0 .. k1-1 of KV head h: scores a block of kBlockKeys keys, updates
// each head's running max and sum, rescales its sums and adds the block's weighted value rows.
template <class VT, typename T, int D, int G, class Scores>
void attend_vec(const T* q, const T* kc, const T* vc, const int32_t* table, int64_t bs, int64_t num_blocks,
                int64_t h, int64_t k0, int64_t k1, float scale, bool cold, float* part) {
  static_assert(D % VT::W == 0, "head_dim must be a multiple of the vector width");
  using R = typename VT::R;
  constexpr int NV = D / VT::W;
  constexpr int KS = Scores::KS;
  // value columns per pass: G x CB sums, a value vector and a weight in registers
  constexpr int fit = (VT::kRegs - 2) / G;
  constexpr int CB = std::min(NV, fit >= 8 ? 8 : fit >= 4 ? 4 : fit >= 2 ? 2 : 1);
  static_assert(NV % CB == 0, "column blocks must tile head_dim");
  const Scores score(q + h * G * D, scale);
  float m[G], l[G], corr[G];
  alignas(64) float acc[G][D];
  for (int g = 0; g < G; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
    for (int i = 0; i < D; ++i) acc[g][i] = 0.f;
  }
  alignas(64) float s[G][kBlockKeys];
  const T *krows[kBlockKeys], *vrows[kBlockKeys];
  for (int64_t j0 = k0; j0 < k1;) {
    const int64_t n = key_rows(kc, vc, table, bs, num_blocks, D, h, j0, k1, krows, vrows);
    const int64_t n_up = (n + KS - 1) / KS * KS;  // <= kBlockKeys: KS divides it
    for (int64_t j = n; j < n_up; ++j) krows[j] = krows[n - 1];
    for (int64_t j = 0; j < n_up; j += KS) score(krows, s, j);
    for (int64_t j = n; j < kBlockKeys; ++j)
      for (int g = 0; g < G; ++g) s[g][j] = -INFINITY;
    for (int g = 0; g < G; ++g) {
      R mx = VT::set1(m[g]);
      for (int j = 0; j < kBlockKeys; j += VT::W) {
        if constexpr (Scores::kScaled) {
          mx = VT::max(mx, VT::load(&s[g][j]));
        } else {  // the scale applied here, a vector at a time
          const R sj = VT::mul(VT::load(&s[g][j]), VT::set1(score.scale));
          VT::store(&s[g][j], sj);
          mx = VT::max(mx, sj);
        }
      }
      const float mnew = VT::hmax(mx);
      const R mv = VT::set1(mnew);
      R sum = VT::zero();
      for (int j = 0; j < kBlockKeys; j += VT::W) {
        const R e = exp_vec<VT>(VT::sub(VT::load(&s[g][j]), mv));
        VT::store(&s[g][j], e);
        sum = VT::add(sum, e);
      }
      corr[g] = std::exp(m[g] - mnew);
      l[g] = l[g] * corr[g] + VT::hsum(sum);
      m[g] = mnew;
    }
    for (int c0 = 0; c0 < NV; c0 += CB) {
      R a[G][CB];
      for (int g = 0; g < G; ++g)
        for (int c = 0; c < CB; ++c) a[g][c] = VT::mul(VT::load(&acc[g][(c0 + c) * VT::W]), VT::set1(corr[g]));
      const bool ask = CB < NV && cold && c0 == 0;  // the later passes read the rows' other lines: ask for them now
      for (int64_t j = 0; j < n; ++j) {
        const T* vrow = vrows[j] + c0 * VT::W;
        if (ask)
          for (size_t off = CB * VT::W * sizeof(T); off < D * sizeof(T); off += 64)
            _mm_prefetch(reinterpret_cast<const char*>(vrows[j]) + off, _MM_HINT_T0);
        for (int c = 0; c < CB; ++c) {
          const R v = VT::load(vrow + c * VT::W);
          for (int g = 0; g < G; ++g) a[g][c] = VT::fmadd(VT::set1(s[g][j]), v, a[g][c]);
        }
      }
      for (int g = 0; g < G; ++g)
        for (int c = 0; c < CB; ++c) VT::store(&acc[g][(c0 + c) * VT::W], a[g][c]);
    }
    j0 += n;
  }
  for (int g = 0; g < G; ++g) {
    float* row = part + g * (D + 2);
    row[0] = m[g];
    row[1] = l[g];
    std::memcpy(row + 2, acc[g], D * sizeof(float));
  }
}

template <typename T>
using VecKernel = void (*)(const T*, const T*, const T*, const int32_t*, int64_t, int64_t, int64_t, int64_t, int64_t,
                           float, bool, float*);

// The widest kernel this build has for (dtype, head_dim, group size); nullptr for the generic loop.
template <typename T>
VecKernel<T> pick_vec(int64_t d, int64_t g) {
#ifdef LLAMA_LAB_AVX512_BF16
#define LLAMA_LAB_SCORES(DD, GG)                                                                        \
  std::conditional_t<std::is_same_v<T, at::BFloat16>, Bf16Scores<DD, GG>, FloatScores<LLAMA_LAB_VT, T, DD, GG>>
#else
#define LLAMA_LAB_SCORES(DD, GG) FloatScores<LLAMA_LAB_VT, T, DD, GG>
#endif
#ifdef LLAMA_LAB_AVX512
#define LLAMA_LAB_VT V16
#else
#define LLAMA_LAB_VT V8
#endif
#define LLAMA_LAB_CASE(DD, GG) \
  if (d == DD && g == GG) return &attend_vec<LLAMA_LAB_VT, T, DD, GG, LLAMA_LAB_SCORES(DD, GG)>;
  LLAMA_LAB_CASE(64, 1) LLAMA_LAB_CASE(64, 2) LLAMA_LAB_CASE(64, 3) LLAMA_LAB_CASE(64, 4)
  LLAMA_LAB_CASE(64, 8) LLAMA_LAB_CASE(128, 1) LLAMA_LAB_CASE(128, 2) LLAMA_LAB_CASE(128, 4)
  LLAMA_LAB_CASE(128, 8)
#undef LLAMA_LAB_CASE
#undef LLAMA_LAB_VT
#undef LLAMA_LAB_SCORES
  return nullptr;
}
#endif

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& rows, const at::Tensor& positions,
                           double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "paged_attention: bad shapes");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "paged_attention: q and the cache must share a dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && rows.scalar_type() == at::kLong &&
                  positions.scalar_type() == at::kLong, "paged_attention: int32 tables, int64 rows and positions");
  const at::Tensor qc = q.contiguous(), kc = k_cache.contiguous(), vc = v_cache.contiguous();
  const at::Tensor tables = block_tables.contiguous(), rows_c = rows.contiguous(), pos_c = positions.contiguous();
  const int64_t n_tok = qc.size(0), heads = qc.size(1), d = qc.size(2);
  const int64_t kv_heads = kc.size(0), num_blocks = kc.size(1), bs = kc.size(2), max_blocks = tables.size(1);
  TORCH_CHECK(kc.size(3) == d && heads % kv_heads == 0, "paged_attention: head_dim or head counts do not match");
  const int64_t groups = heads / kv_heads;
  auto out = at::empty_like(qc);
  if (n_tok == 0) return out;
  const int64_t* rows_p = rows_c.data_ptr<int64_t>();
  const int64_t* pos_p = pos_c.data_ptr<int64_t>();
  const int32_t* table_p = tables.data_ptr<int32_t>();

  // Work items: (kv head, token, chunk of keys). first[t] = index of token t's first chunk.
  std::vector<int64_t> first(n_tok + 1, 0);
  for (int64_t t = 0; t < n_tok; ++t) {
    TORCH_CHECK(pos_p[t] >= 0 && pos_p[t] < max_blocks * bs, "paged_attention: position outside the block table");
    first[t + 1] = first[t] + (pos_p[t] + kChunk) / kChunk;
  }
  const int64_t per_head = first[n_tok];
  const int64_t stride = groups * (d + 2);
  std::vector<float> part(per_head * kv_heads * stride);

  auto run_items = [&](auto&& attend) {
    at::parallel_for(0, per_head * kv_heads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t it = begin; it < end; ++it) {
        const int64_t h = it / per_head, rem = it % per_head;
        const int64_t t = std::upper_bound(first.begin(), first.end(), rem) - first.begin() - 1;
        const int64_t k0 = (rem - first[t]) * kChunk, k1 = std::min<int64_t>(k0 + kChunk, pos_p[t] + 1);
        attend(t, h, k0, k1, part.data() + it * stride);
      }
    });
  };
  const float fscale = static_cast<float>(scale);
  // A decode batch (every token its own sequence) reads each key once, from memory; a prompt's tokens share their
  // keys, which stay in cache. Only the first gains from asking for the value rows' other lines (AVX2, SmolLM2, 4k
  // context over 30 layers' caches: decode 102 -> 84-91 us a layer; asked for in a prompt's chunks too, prefill
  // went 107 -> 125 ms a layer).
  bool cold = true;
  for (int64_t t = 1; t < n_tok && cold; ++t) cold = rows_p[t] != rows_p[t - 1];
  bool done = false;
#ifdef LLAMA_LAB_AVX2
  if (!done) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qc.scalar_type(), "paged_attention_vec", [&] {
      if constexpr (!std::is_same_v<scalar_t, double>) {
        if (VecKernel<scalar_t> kernel = pick_vec<scalar_t>(d, groups)) {
          const scalar_t* qp = qc.data_ptr<scalar_t>();
          const scalar_t* kp = kc.data_ptr<scalar_t>();
          const scalar_t* vp = vc.data_ptr<scalar_t>();
          run_items([&](int64_t t, int64_t h, int64_t k0, int64_t k1, float* dst) {
            kernel(qp + t * heads * d, kp, vp, table_p + rows_p[t] * max_blocks, bs, num_blocks, h, k0, k1, fscale, cold,
                   dst);
          });
          done = true;
        }
      }
    });
  }
#endif
  if (!done) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qc.scalar_type(), "paged_attention", [&] {
      const scalar_t* qp = qc.data_ptr<scalar_t>();
      const scalar_t* kp = kc.data_ptr<scalar_t>();
      const scalar_t* vp = vc.data_ptr<scalar_t>();
      run_items([&](int64_t t, int64_t h, int64_t k0, int64_t k1, float* dst) {
        attend_generic<scalar_t>(qp + t * heads * d, kp, vp, table_p + rows_p[t] * max_blocks, bs, num_blocks, groups,
                                 d, h, k0, k1, fscale, dst);
      });
    });
  }

  // Merge each (token, kv head)'s chunks: rescale by exp(max_c - max) and normalize.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qc.scalar_type(), "paged_attention_merge", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, n_tok * kv_heads, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> acc(d);
      for (int64_t w = begin; w < end; ++w) {
        const int64_t t = w / kv_heads, h = w % kv_heads;
        for (int64_t g = 0; g < groups; ++g) {
          float mx = -INFINITY;
          for (int64_t c = first[t]; c < first[t + 1]; ++c) mx = std::max(mx, part[(h * per_head + c) * stride + g * (d + 2)]);
          float denom = 0.f;
          std::fill(acc.begin(), acc.end(), 0.f);
          for (int64_t c = first[t]; c < first[t + 1]; ++c) {
            const float* row = part.data() + (h * per_head + c) * stride + g * (d + 2);
            const float w8 = std::exp(row[0] - mx);
            denom += row[1] * w8;
            for (int64_t i = 0; i < d; ++i) acc[i] += row[2 + i] * w8;
          }
          scalar_t* o = op + (t * heads + h * groups + g) * d;
          for (int64_t i = 0; i < d; ++i) o[i] = static_cast<scalar_t>(acc[i] / denom);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(llama_lab, m) {
  m.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor rows, "
        "Tensor positions, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(llama_lab, CPU, m) { m.impl("paged_attention", &paged_attention); }
