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

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define LLAMA_LAB_AVX512_BF16 1
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define LLAMA_LAB_AVX2 1
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

#ifdef LLAMA_LAB_AVX512_BF16
// ----------------------------------------------------------------------------------------------
// bf16 on CPUs with AVX512-BF16: dot products with vdpbf16ps, softmax with a vector exp, the value
// rows converted to fp32 once and shared by the group's query heads held in registers.
inline __m512 exp512(__m512 x) {
  // 2^(x*log2e) = 2^i * 2^f with f in [-0.5, 0.5]; degree-6 polynomial, relative error ~2e-7.
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 i = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, i);
  __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, i);
}

inline __m512 bf16x16_to_f32(const uint16_t* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

template <int D, int G>
void attend_bf16(const uint16_t* q, const uint16_t* kc, const uint16_t* vc, const int32_t* table, int64_t bs,
                 int64_t num_blocks, int64_t h, int64_t k0, int64_t k1, float scale, float* part) {
  static_assert(D % 32 == 0, "head_dim must be a multiple of 32");
  constexpr int NV = D / 16;
  __m512i qv[G][D / 32];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < D / 32; ++c) qv[g][c] = _mm512_loadu_si512(q + (h * G + g) * D + c * 32);
  float m[G], l[G];
  __m512 acc[G][NV];
  for (int g = 0; g < G; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
    for (int c = 0; c < NV; ++c) acc[g][c] = _mm512_setzero_ps();
  }
  alignas(64) float s[G][kBlockKeys];
  const uint16_t *krows[kBlockKeys], *vrows[kBlockKeys];
  for (int64_t j0 = k0; j0 < k1;) {
    const int64_t n = key_rows(kc, vc, table, bs, num_blocks, D, h, j0, k1, krows, vrows);
    for (int64_t j = 0; j < n; ++j) {
      const uint16_t* krow = krows[j];
      __m512 dot[G];
      for (int g = 0; g < G; ++g) dot[g] = _mm512_setzero_ps();
      for (int c = 0; c < D / 32; ++c) {
        const __m512bh kk = (__m512bh)_mm512_loadu_si512(krow + c * 32);
        for (int g = 0; g < G; ++g) dot[g] = _mm512_dpbf16_ps(dot[g], (__m512bh)qv[g][c], kk);
      }
      for (int g = 0; g < G; ++g) s[g][j] = _mm512_reduce_add_ps(dot[g]) * scale;
    }
    for (int64_t j = n; j < kBlockKeys; ++j)
      for (int g = 0; g < G; ++g) s[g][j] = -INFINITY;
    for (int g = 0; g < G; ++g) {
      __m512 mx = _mm512_set1_ps(m[g]);
      for (int j = 0; j < kBlockKeys; j += 16) mx = _mm512_max_ps(mx, _mm512_load_ps(&s[g][j]));
      const float mnew = _mm512_reduce_max_ps(mx);
      const __m512 mv = _mm512_set1_ps(mnew);
      __m512 sum = _mm512_setzero_ps();
      for (int j = 0; j < kBlockKeys; j += 16) {
        const __m512 e = exp512(_mm512_sub_ps(_mm512_load_ps(&s[g][j]), mv));
        _mm512_store_ps(&s[g][j], e);
        sum = _mm512_add_ps(sum, e);
      }
      const float corr = std::exp(m[g] - mnew);
      l[g] = l[g] * corr + _mm512_reduce_add_ps(sum);
      m[g] = mnew;
      const __m512 cv = _mm512_set1_ps(corr);
      for (int c = 0; c < NV; ++c) acc[g][c] = _mm512_mul_ps(acc[g][c], cv);
    }
    for (int64_t j = 0; j < n; ++j) {
      const uint16_t* vrow = vrows[j];
      for (int c = 0; c < NV; ++c) {
        const __m512 v = bf16x16_to_f32(vrow + c * 16);
        for (int g = 0; g < G; ++g) acc[g][c] = _mm512_fmadd_ps(_mm512_set1_ps(s[g][j]), v, acc[g][c]);
      }
    }
    j0 += n;
  }
  for (int g = 0; g < G; ++g) {
    float* row = part + g * (D + 2);
    row[0] = m[g];
    row[1] = l[g];
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(row + 2 + c * 16, acc[g][c]);
  }
}

using Bf16Kernel = void (*)(const uint16_t*, const uint16_t*, const uint16_t*, const int32_t*, int64_t, int64_t,
                            int64_t, int64_t, int64_t, float, float*);

Bf16Kernel pick_bf16(int64_t d, int64_t g) {
#define LLAMA_LAB_CASE(DD, GG) \
  if (d == DD && g == GG) return &attend_bf16<DD, GG>;
  LLAMA_LAB_CASE(64, 1) LLAMA_LAB_CASE(64, 2) LLAMA_LAB_CASE(64, 3) LLAMA_LAB_CASE(64, 4)
  LLAMA_LAB_CASE(64, 8) LLAMA_LAB_CASE(128, 1) LLAMA_LAB_CASE(128, 2) LLAMA_LAB_CASE(128, 4)
  LLAMA_LAB_CASE(128, 8)
#undef LLAMA_LAB_CASE
  return nullptr;
}
#endif

#ifdef LLAMA_LAB_AVX2
// ----------------------------------------------------------------------------------------------
// AVX2 + FMA + F16C (every x86-64 CPU of the last decade): fp32, fp16 or bf16 caches, eight lanes at a time.
// The query heads of a group are held in fp32 (scale folded in), each key row is converted once and
// scored against all of them, the softmax uses a vector exp, and each value row is converted once and
// accumulated into all of the group's heads.
inline __m256 exp256(__m256 x) {
  // 2^(x*log2e) = 2^i * 2^f with f in [-0.5, 0.5]; degree-6 polynomial, relative error ~2e-7.
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
  const __m256 i = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(t, i);
  __m256 p = _mm256_set1_ps(1.535336188319500e-4f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.339887440266574e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618437357674640e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550332471162809e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402264791363012e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931472028550421e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(i), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

inline float hsum256(const __m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax256(const __m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load8(const at::BFloat16* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

template <typename T, int D, int G>
void attend_avx2(const T* q, const T* kc, const T* vc, const int32_t* table, int64_t bs, int64_t num_blocks,
                 int64_t h, int64_t k0, int64_t k1, float scale, float* part) {
  static_assert(D % 8 == 0, "head_dim must be a multiple of 8");
  constexpr int NV = D / 8;
  alignas(32) float qf[G][D];
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < D; ++i) qf[g][i] = static_cast<float>(q[(h * G + g) * D + i]) * scale;
  float m[G], l[G];
  __m256 acc[G][NV];
  for (int g = 0; g < G; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
    for (int c = 0; c < NV; ++c) acc[g][c] = _mm256_setzero_ps();
  }
  alignas(32) float s[G][kBlockKeys];
  const T *krows[kBlockKeys], *vrows[kBlockKeys];
  for (int64_t j0 = k0; j0 < k1;) {
    const int64_t n = key_rows(kc, vc, table, bs, num_blocks, D, h, j0, k1, krows, vrows);
    for (int64_t j = 0; j < n; ++j) {
      const T* krow = krows[j];
      __m256 dot[G];
      for (int g = 0; g < G; ++g) dot[g] = _mm256_setzero_ps();
      for (int c = 0; c < NV; ++c) {
        const __m256 kk = load8(krow + c * 8);
        for (int g = 0; g < G; ++g) dot[g] = _mm256_fmadd_ps(_mm256_load_ps(&qf[g][c * 8]), kk, dot[g]);
      }
      for (int g = 0; g < G; ++g) s[g][j] = hsum256(dot[g]);
    }
    for (int64_t j = n; j < kBlockKeys; ++j)
      for (int g = 0; g < G; ++g) s[g][j] = -INFINITY;
    for (int g = 0; g < G; ++g) {
      __m256 mx = _mm256_set1_ps(m[g]);
      for (int j = 0; j < kBlockKeys; j += 8) mx = _mm256_max_ps(mx, _mm256_load_ps(&s[g][j]));
      const float mnew = hmax256(mx);
      const __m256 mv = _mm256_set1_ps(mnew);
      __m256 sum = _mm256_setzero_ps();
      for (int j = 0; j < kBlockKeys; j += 8) {
        const __m256 e = exp256(_mm256_sub_ps(_mm256_load_ps(&s[g][j]), mv));
        _mm256_store_ps(&s[g][j], e);
        sum = _mm256_add_ps(sum, e);
      }
      const float corr = std::exp(m[g] - mnew);
      l[g] = l[g] * corr + hsum256(sum);
      m[g] = mnew;
      const __m256 cv = _mm256_set1_ps(corr);
      for (int c = 0; c < NV; ++c) acc[g][c] = _mm256_mul_ps(acc[g][c], cv);
    }
    for (int64_t j = 0; j < n; ++j) {
      const T* vrow = vrows[j];
      for (int c = 0; c < NV; ++c) {
        const __m256 v = load8(vrow + c * 8);
        for (int g = 0; g < G; ++g) acc[g][c] = _mm256_fmadd_ps(_mm256_set1_ps(s[g][j]), v, acc[g][c]);
      }
    }
    j0 += n;
  }
  for (int g = 0; g < G; ++g) {
    float* row = part + g * (D + 2);
    row[0] = m[g];
    row[1] = l[g];
    for (int c = 0; c < NV; ++c) _mm256_storeu_ps(row + 2 + c * 8, acc[g][c]);
  }
}

template <typename T>
using Avx2Kernel = void (*)(const T*, const T*, const T*, const int32_t*, int64_t, int64_t, int64_t, int64_t, int64_t,
                            float, float*);

template <typename T>
Avx2Kernel<T> pick_avx2(int64_t d, int64_t g) {
#define LLAMA_LAB_CASE(DD, GG) \
  if (d == DD && g == GG) return &attend_avx2<T, DD, GG>;
  LLAMA_LAB_CASE(64, 1) LLAMA_LAB_CASE(64, 2) LLAMA_LAB_CASE(64, 3) LLAMA_LAB_CASE(64, 4)
  LLAMA_LAB_CASE(64, 8) LLAMA_LAB_CASE(128, 1) LLAMA_LAB_CASE(128, 2) LLAMA_LAB_CASE(128, 4)
  LLAMA_LAB_CASE(128, 8)
#undef LLAMA_LAB_CASE
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
  bool done = false;
#ifdef LLAMA_LAB_AVX512_BF16
  if (qc.scalar_type() == at::kBFloat16) {
    if (Bf16Kernel kernel = pick_bf16(d, groups)) {
      const auto* qp = reinterpret_cast<const uint16_t*>(qc.data_ptr());
      const auto* kp = reinterpret_cast<const uint16_t*>(kc.data_ptr());
      const auto* vp = reinterpret_cast<const uint16_t*>(vc.data_ptr());
      run_items([&](int64_t t, int64_t h, int64_t k0, int64_t k1, float* dst) {
        kernel(qp + t * heads * d, kp, vp, table_p + rows_p[t] * max_blocks, bs, num_blocks, h, k0, k1, fscale, dst);
      });
      done = true;
    }
  }
#endif
#ifdef LLAMA_LAB_AVX2
  if (!done) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qc.scalar_type(), "paged_attention_avx2", [&] {
      if constexpr (!std::is_same_v<scalar_t, double>) {
        if (Avx2Kernel<scalar_t> kernel = pick_avx2<scalar_t>(d, groups)) {
          const scalar_t* qp = qc.data_ptr<scalar_t>();
          const scalar_t* kp = kc.data_ptr<scalar_t>();
          const scalar_t* vp = vc.data_ptr<scalar_t>();
          run_items([&](int64_t t, int64_t h, int64_t k0, int64_t k1, float* dst) {
            kernel(qp + t * heads * d, kp, vp, table_p + rows_p[t] * max_blocks, bs, num_blocks, h, k0, k1, fscale, dst);
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
