// Paged decode attention for the CPU: one query token per sequence attends to its K/V blocks
// read in place from the block pool (no gather copy), softmax in fp32, split-K for long
// sequences when the batch alone cannot keep every thread busy.
//
// Layout: see paged_layout.h.
//
// Work item = (sequence, key partition), all heads. Items are handed out dynamically (an atomic
// counter), longest first, on ATen's thread pool; partitions of a split sequence are merged in a
// second, cheap pass. Three code paths, chosen at run time:
// - bf16 on a CPU with AVX512-BF16 and D in {32, 64, 128}: one pass over the blocks with an
//   online softmax (see attend_avx512_bf16). This is the engine's decode path on such CPUs.
// - float32/bf16 with AVX-512F and D % 16 == 0: block by block for all KV heads (see
//   attend_avx512), bf16 widened to fp32 by a shift, fp32 FMAs, a polynomial exp.
// - anything else: plain loops computing the same.
// Scores and softmax are fp32 on every path (more exact than a bf16 matmul's rounded scores).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "paged_layout.h"
#include "simd.h"

namespace splitserve {
namespace {

#ifdef SPLITSERVE_X86
using namespace simd;
#endif

constexpr int64_t kPartition = 512;  // keys per work item when a sequence is split

struct Problem : PagedLayout {
  int64_t num_seqs;
};

struct Item {
  int64_t seq, part, begin, end;  // keys [begin, end) of one sequence, for all its KV heads
};

// One run = the item's keys inside one block: `len` rows from element offset `base` of a
// per-layer K (or V) view, the first of them key `t` of the item.
struct Run {
  int64_t base, len, t;
};

// The item's keys cut at block boundaries, in order; returns how many runs were written.
inline int64_t build_runs(const Problem& p, const int32_t* table, const Item& it, Run* runs) {
  const int64_t n = it.end - it.begin;
  int64_t num_runs = 0;
  for (int64_t t = 0; t < n;) {
    const int64_t pos = it.begin + t, off = pos % p.block_size;
    const int64_t len = std::min(p.block_size - off, n - t);
    runs[num_runs++] = {table[pos / p.block_size] * p.block_stride + off * p.token_stride, len, t};
    t += len;
  }
  return num_runs;
}

// ---------------------------------------------------------------- scalar path (any CPU, any D)

inline float widen(float x) { return x; }
inline float widen(c10::BFloat16 x) { return static_cast<float>(x); }

template <typename T>
void attend_scalar(const Problem& p, const T* q, const T* k_cache, const T* v_cache,
                   const int32_t* table, const Item& it, int64_t kv_head, float* scores, float* acc,
                   float* stats) {
  const int64_t G = p.G, D = p.D, n = it.end - it.begin;
  for (int64_t g = 0; g < G; ++g) {
    const T* qg = q + it.seq * p.q_stride + (kv_head * G + g) * D;
    for (int64_t t = 0; t < n; ++t) {
      const int64_t pos = it.begin + t;
      const T* kr = k_cache + table[pos / p.block_size] * p.block_stride +
                    (pos % p.block_size) * p.token_stride + kv_head * D;
      float s = 0.f;
      for (int64_t d = 0; d < D; ++d) s += widen(qg[d]) * widen(kr[d]);
      scores[g * n + t] = s * p.scale;
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* sg = scores + g * n;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < n; ++t) m = std::max(m, sg[t]);
    float l = 0.f;
    for (int64_t t = 0; t < n; ++t) l += (sg[t] = std::exp(sg[t] - m));
    stats[2 * g] = m;
    stats[2 * g + 1] = l;
    std::fill(acc + g * D, acc + (g + 1) * D, 0.f);
  }
  for (int64_t t = 0; t < n; ++t) {
    const int64_t pos = it.begin + t;
    const T* vr = v_cache + table[pos / p.block_size] * p.block_stride +
                  (pos % p.block_size) * p.token_stride + kv_head * D;
    for (int64_t g = 0; g < G; ++g) {
      const float w = scores[g * n + t];
      float* ag = acc + g * D;
      for (int64_t d = 0; d < D; ++d) ag[d] += w * widen(vr[d]);
    }
  }
}

// ---------------------------------------------------------------- AVX-512 path (D % 16 == 0)

#ifdef SPLITSERVE_X86
SPLITSERVE_AVX512 inline __m512 load16(const float* x) { return _mm512_loadu_ps(x); }
SPLITSERVE_AVX512 inline __m512 load16(const c10::BFloat16* x) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}


constexpr int64_t kMaxGroup = 16;
constexpr int64_t kMaxChunks = 16;  // D <= 256

// Prefetch a run's `len` token rows (`row_bytes` each, contiguous inside a block) into L1.
SPLITSERVE_AVX512 inline void prefetch_run(const char* first, int64_t len, int64_t row_bytes) {
  for (int64_t b = 0; b < len * row_bytes; b += 64) _mm_prefetch(first + b, _MM_HINT_T0);
}

// All KV heads of one item, block by block: each block's K (then V) slab of a layer is one
// contiguous read of every head's rows, the next block's prefetched while this one is used.
// (Walking one head at a time read 128-256 bytes a token at a stride of Hkv rows through
// scattered blocks, which the hardware prefetchers do not follow: 2-4 GB/s where a stream reads
// ~9.) Scores of every query head are kept ([Hq, n], fp32), then softmax pieces per head, then
// P @ V with the accumulators in `acc` ([Hq, D]) between blocks.
template <typename T>
SPLITSERVE_AVX512 void attend_avx512(const Problem& p, const T* q, const T* k_cache,
                                     const T* v_cache, const Run* runs, int64_t num_runs,
                                     const Item& it, float* scores, float* acc, float* stats) {
  const int64_t Hkv = p.Hkv, G = p.G, D = p.D, C = D / 16, n = it.end - it.begin;
  const int64_t ts = p.token_stride, slab = ts * static_cast<int64_t>(sizeof(T));
  auto first_row = [&](const T* cache, int64_t r) {
    return reinterpret_cast<const char*>(cache + runs[r].base);
  };
  prefetch_run(first_row(k_cache, 0), runs[0].len, slab);
  // Pass 1: scores[head, t] = q_head . k_t, 16 keys at a time: each key's 16-lane partial sums
  // are folded together by one transposing add tree (sum16x16) rather than each reduced
  // horizontally on its own (~8x fewer shuffle/add ops at small batches).
  __m512 qv[kMaxGroup * kMaxChunks];
  __m512 part[kMaxGroup][16];
  for (int64_t r = 0; r < num_runs; ++r) {
    if (r + 1 < num_runs) prefetch_run(first_row(k_cache, r + 1), runs[r + 1].len, slab);
    else prefetch_run(first_row(v_cache, 0), runs[0].len, slab);
    const int64_t t = runs[r].t;
    for (int64_t h = 0; h < Hkv; ++h) {
      // The G queries of this KV head, widened and pre-scaled (L1 reads, once a block).
      for (int64_t g = 0; g < G; ++g) {
        const T* qg = q + it.seq * p.q_stride + (h * G + g) * D;
        for (int64_t c = 0; c < C; ++c)
          qv[g * C + c] = _mm512_mul_ps(load16(qg + 16 * c), _mm512_set1_ps(p.scale));
      }
      for (int64_t j0 = 0; j0 < runs[r].len; j0 += 16) {
        const int64_t m = std::min<int64_t>(16, runs[r].len - j0);
        const T* kr = k_cache + runs[r].base + j0 * ts + h * D;
        for (int64_t j = 0; j < m; ++j, kr += ts) {
          __m512 kc[kMaxChunks];
          for (int64_t c = 0; c < C; ++c) kc[c] = load16(kr + 16 * c);
          for (int64_t g = 0; g < G; ++g) {
            __m512 s = _mm512_mul_ps(qv[g * C], kc[0]);
            for (int64_t c = 1; c < C; ++c) s = _mm512_fmadd_ps(qv[g * C + c], kc[c], s);
            part[g][j] = s;
          }
        }
        const __mmask16 mask = static_cast<__mmask16>((1u << m) - 1);
        for (int64_t g = 0; g < G; ++g) {
          for (int64_t j = m; j < 16; ++j) part[g][j] = _mm512_setzero_ps();
          _mm512_mask_storeu_ps(scores + (h * G + g) * n + t + j0, mask, sum16x16(part[g]));
        }
      }
    }
  }
  // Softmax pieces per query head: max, exp, sum (normalised later, after any merge).
  for (int64_t head = 0; head < p.Hq; ++head) {
    float* sg = scores + head * n;
    __m512 mv = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    int64_t t = 0;
    for (; t + 16 <= n; t += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(sg + t));
    float m = _mm512_reduce_max_ps(mv);
    for (; t < n; ++t) m = std::max(m, sg[t]);
    const __m512 mb = _mm512_set1_ps(m);
    __m512 lv = _mm512_setzero_ps();
    for (t = 0; t + 16 <= n; t += 16) {
      const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(sg + t), mb));
      _mm512_storeu_ps(sg + t, e);
      lv = _mm512_add_ps(lv, e);
    }
    if (t < n) {
      const __mmask16 mask = static_cast<__mmask16>((1u << (n - t)) - 1);
      const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, sg + t), mb));
      _mm512_mask_storeu_ps(sg + t, mask, e);
      lv = _mm512_add_ps(lv, _mm512_maskz_mov_ps(mask, e));
    }
    stats[2 * head] = m;
    stats[2 * head + 1] = _mm512_reduce_add_ps(lv);
  }
  // Pass 2: acc[head] = sum_t p[head, t] * v_t, block by block, the accumulators of one KV
  // head's G query heads in registers while its rows of the block are read.
  std::fill(acc, acc + p.Hq * D, 0.f);
  __m512 av[kMaxGroup * kMaxChunks];
  for (int64_t r = 0; r < num_runs; ++r) {
    if (r + 1 < num_runs) prefetch_run(first_row(v_cache, r + 1), runs[r + 1].len, slab);
    const int64_t t = runs[r].t;
    for (int64_t h = 0; h < Hkv; ++h) {
      float* ah = acc + h * G * D;
      for (int64_t i = 0; i < G * C; ++i) av[i] = _mm512_loadu_ps(ah + 16 * i);
      const T* vr = v_cache + runs[r].base + h * D;
      for (int64_t j = 0; j < runs[r].len; ++j, vr += ts) {
        __m512 vc[kMaxChunks];
        for (int64_t c = 0; c < C; ++c) vc[c] = load16(vr + 16 * c);
        for (int64_t g = 0; g < G; ++g) {
          const __m512 w = _mm512_set1_ps(scores[(h * G + g) * n + t + j]);
          for (int64_t c = 0; c < C; ++c) av[g * C + c] = _mm512_fmadd_ps(w, vc[c], av[g * C + c]);
        }
      }
      for (int64_t i = 0; i < G * C; ++i) _mm512_storeu_ps(ah + 16 * i, av[i]);
    }
  }
}

// ---------------------------------------------------------------- AVX-512 BF16 path
//
// Scores: q . k as bf16 pair dot products (_mm512_dpbf16_ps: exact products, fp32 sums); each
// token's 16-lane partial sum is folded with 15 others by a transposing add tree, so 16 scores
// cost ~3 shuffle/add ops per token instead of a full horizontal reduction each. Values: two
// tokens' rows interleaved into (v_t, v_t+1) pairs and weighted by (p_t, p_t+1), again dpbf16.



// Per-thread scratch, sized once per call for the longest item.
struct Workspace {
  std::vector<Run> runs;
  std::vector<uint16_t> probs;   // [Hq, 16 + 2] bf16 bits of one chunk's probabilities
  std::vector<float> pair_acc;   // [Hq, D]
};

SPLITSERVE_AVX512BF16 inline void prefetch_rows(const c10::BFloat16* x, int64_t bytes) {
  const char* c = reinterpret_cast<const char*>(x);
  for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch(c + i, _MM_HINT_T0);
}

// All KV heads of one item in ONE pass over its blocks (online softmax): a block's K and V slabs
// for a layer are adjacent in the pool, so each block is one contiguous read (the next one
// prefetched) instead of one per head with strided gaps, or one per pass. Per chunk of <= 16
// keys and query head: scores by bf16 pair dot products folded with a transposing add tree,
// running max / sum update, exp rounded to bf16 (as HF's eager attention rounds probabilities
// before P @ V), then P @ V over token pairs. C = D / 32 is a template parameter so the per-row
// loops unroll and q stays in registers.
template <int C>
SPLITSERVE_AVX512BF16 void attend_avx512_bf16(const Problem& p, const c10::BFloat16* q,
                                              const c10::BFloat16* k_cache,
                                              const c10::BFloat16* v_cache, const int32_t* table,
                                              const Item& it, Workspace& ws, float* acc,
                                              float* stats) {
  using BF = c10::BFloat16;
  const int64_t Hq = p.Hq, Hkv = p.Hkv, G = p.G, D = p.D;
  const int64_t n = it.end - it.begin, ts = p.token_stride;
  Run* runs = ws.runs.data();
  uint16_t* probs = ws.probs.data();  // [Hq, 16 + 2] bf16 bits of the chunk's exp(s - max)
  float* pacc = ws.pair_acc.data();   // [Hq, C, lo|hi, 16]
  const int64_t num_runs = build_runs(p, table, it, runs);
  const int64_t slab_bytes = ts * static_cast<int64_t>(sizeof(BF));
  const __m512 scale = _mm512_set1_ps(p.scale);
  float* run_max = stats;  // stats[2 * head] = max, stats[2 * head + 1] = sum
  for (int64_t head = 0; head < Hq; ++head) {
    run_max[2 * head] = -std::numeric_limits<float>::infinity();
    run_max[2 * head + 1] = 0.f;
  }
  std::fill(pacc, pacc + Hq * C * 32, 0.f);
  prefetch_rows(k_cache + runs[0].base, runs[0].len * slab_bytes);
  prefetch_rows(v_cache + runs[0].base, runs[0].len * slab_bytes);

  for (int64_t r = 0; r < num_runs; ++r) {
    const Run& run = runs[r];
    if (r + 1 < num_runs) {
      prefetch_rows(k_cache + runs[r + 1].base, runs[r + 1].len * slab_bytes);
      prefetch_rows(v_cache + runs[r + 1].base, runs[r + 1].len * slab_bytes);
    }
    for (int64_t j0 = 0; j0 < run.len; j0 += 16) {
      const int64_t m = std::min<int64_t>(16, run.len - j0);
      const __mmask16 mask = static_cast<__mmask16>((1u << m) - 1);
      const int64_t row0 = run.base + j0 * ts;
      // Scores and softmax update for every query head.
      for (int64_t head = 0; head < Hq; ++head) {
        const BF* qg = q + it.seq * p.q_stride + head * D;
        __m512bh qv[C];
        for (int c = 0; c < C; ++c) qv[c] = load32bh(qg + 32 * c);
        __m512 part[16];
        const BF* kr = k_cache + row0 + (head / G) * D;
        for (int64_t j = 0; j < m; ++j, kr += ts) {
          __m512 s = _mm512_dpbf16_ps(_mm512_setzero_ps(), qv[0], load32bh(kr));
          for (int c = 1; c < C; ++c) s = _mm512_dpbf16_ps(s, qv[c], load32bh(kr + 32 * c));
          part[j] = s;
        }
        for (int64_t j = m; j < 16; ++j) part[j] = _mm512_setzero_ps();
        const __m512 sc = _mm512_mul_ps(sum16x16(part), scale);
        const float old_max = run_max[2 * head];
        const float new_max = std::max(old_max, _mm512_mask_reduce_max_ps(mask, sc));
        const __m512 e = _mm512_maskz_mov_ps(mask, exp16(_mm512_sub_ps(sc, _mm512_set1_ps(new_max))));
        float sum = run_max[2 * head + 1];
        if (new_max > old_max) {  // rescale what was accumulated under the old max
          const float alpha = std::exp(old_max - new_max);
          sum *= alpha;
          const __m512 av = _mm512_set1_ps(alpha);
          float* a = pacc + head * C * 32;
          for (int i = 0; i < 2 * C; ++i)
            _mm512_storeu_ps(a + 16 * i, _mm512_mul_ps(_mm512_loadu_ps(a + 16 * i), av));
        }
        run_max[2 * head] = new_max;
        run_max[2 * head + 1] = sum + _mm512_reduce_add_ps(e);
        uint16_t* pg = probs + head * 18;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(pg), (__m256i)_mm512_cvtneps_pbh(e));
        pg[16] = pg[17] = 0;
      }
      // P @ V over token pairs (an odd chunk's last row pairs with a zero weight). Accumulator
      // lanes come out as (lo: dims 8L..8L+3, hi: 8L+4..8L+7) per 128-bit lane L of each 32-dim
      // chunk; put back in order at the end.
      for (int64_t h = 0; h < Hkv; ++h) {
        __m512 lo[kMaxGroup * C], hi[kMaxGroup * C];
        float* hacc = pacc + h * G * C * 32;
        for (int64_t i = 0; i < G * C; ++i) {
          lo[i] = _mm512_loadu_ps(hacc + 32 * i);
          hi[i] = _mm512_loadu_ps(hacc + 32 * i + 16);
        }
        const BF* vh = v_cache + row0 + h * D;
        for (int64_t j = 0; j < m; j += 2) {
          const BF* v0 = vh + j * ts;
          const BF* v1 = j + 1 < m ? v0 + ts : v0;
          __m512i plo[C], phi[C];
          for (int c = 0; c < C; ++c) {
            const __m512i a = _mm512_loadu_si512(v0 + 32 * c), b = _mm512_loadu_si512(v1 + 32 * c);
            plo[c] = _mm512_unpacklo_epi16(a, b);
            phi[c] = _mm512_unpackhi_epi16(a, b);
          }
          for (int64_t g = 0; g < G; ++g) {
            uint32_t wbits;
            std::memcpy(&wbits, probs + (h * G + g) * 18 + j, sizeof(wbits));
            const __m512bh w = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(wbits));
            for (int c = 0; c < C; ++c) {
              lo[g * C + c] = _mm512_dpbf16_ps(lo[g * C + c], (__m512bh)plo[c], w);
              hi[g * C + c] = _mm512_dpbf16_ps(hi[g * C + c], (__m512bh)phi[c], w);
            }
          }
        }
        for (int64_t i = 0; i < G * C; ++i) {
          _mm512_storeu_ps(hacc + 32 * i, lo[i]);
          _mm512_storeu_ps(hacc + 32 * i + 16, hi[i]);
        }
      }
    }
  }
  for (int64_t head = 0; head < Hq; ++head)
    for (int c = 0; c < C; ++c) {
      const float* l = pacc + (head * C + c) * 32;
      const float* h = l + 16;
      float* dst = acc + head * D + 32 * c;
      for (int L = 0; L < 4; ++L)
        for (int e = 0; e < 4; ++e) {
          dst[8 * L + e] = l[4 * L + e];
          dst[8 * L + 4 + e] = h[4 * L + e];
        }
    }
}


#endif

// ---------------------------------------------------------------- driver

template <typename T>
void run(const Problem& p, const T* q, const T* k_cache, const T* v_cache, const int32_t* tables,
         const int32_t* seq_lens, T* out, int64_t impl) {
  const int64_t Hq = p.Hq, G = p.G, D = p.D;
  const int64_t threads = at::get_num_threads();
  // Split long sequences only when the batch alone gives each thread few items.
  const bool split = p.num_seqs < 8 * threads;
  std::vector<Item> items;
  items.reserve(p.num_seqs);
  int64_t max_len = 0;
  for (int64_t b = 0; b < p.num_seqs; ++b) {
    const int64_t len = seq_lens[b];
    TORCH_CHECK(len > 0 && len <= p.max_blocks * p.block_size, "paged_decode_attention: seq_lens[",
                b, "] = ", len, " does not fit the block table");
    check_block_ids("paged_decode_attention", p, tables + b * p.max_blocks,
                    (len + p.block_size - 1) / p.block_size, b);
    max_len = std::max(max_len, len);
    const int64_t part = split ? kPartition : len;
    for (int64_t s = 0, i = 0; s < len; s += part, ++i)
      items.push_back({b, i, s, std::min(s + part, len)});
  }
  // Longest items first: dynamic hand-out then balances the tail.
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) {
    return a.end - a.begin > b.end - b.begin;
  });
  const int64_t n_items = static_cast<int64_t>(items.size());
  const int64_t max_n = split ? std::min(max_len, kPartition) : max_len;
  // Partial results per item and query head: (max, sum) and D accumulators.
  std::vector<float> stats(n_items * Hq * 2), accs(n_items * Hq * D);

#ifdef SPLITSERVE_X86
  bool vec = cpu_has_avx512() && D % 16 == 0 && D / 16 <= kMaxChunks && G <= kMaxGroup;
  bool vec_bf16 = std::is_same_v<T, c10::BFloat16> && cpu_has_avx512_bf16() &&
                  (D == 32 || D == 64 || D == 128) && G <= kMaxGroup;
  // impl (tests): -1 best available, 0 scalar, 1 AVX-512 fp32, 2 AVX-512 BF16.
  TORCH_CHECK(impl <= 0 || (impl == 1 && vec) || (impl == 2 && vec_bf16),
              "paged_decode_attention: implementation ", impl, " is not available here");
  if (impl >= 0) {
    vec = impl == 1;
    vec_bf16 = impl == 2;
  }
#else
  const bool vec = false, vec_bf16 = false;
  TORCH_CHECK(impl <= 0, "paged_decode_attention: only the scalar implementation (0) is built");
#endif
  // Items of each sequence, as a linked list: first[b], next_item[i].
  std::vector<int64_t> first(p.num_seqs, -1), next_item(n_items, -1);
  for (int64_t i = n_items - 1; i >= 0; --i) {
    next_item[i] = first[items[i].seq];
    first[items[i].seq] = i;
  }
  // out[b, head] = sum_i e^(m_i - M) acc_i / sum_i e^(m_i - M) l_i over b's partitions i.
  auto merge = [&](int64_t b) {
    std::vector<float> o(D);
    for (int64_t head = 0; head < Hq; ++head) {
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t i = first[b]; i >= 0; i = next_item[i])
        m = std::max(m, stats[(i * Hq + head) * 2]);
      float l = 0.f;
      std::fill(o.begin(), o.end(), 0.f);
      for (int64_t i = first[b]; i >= 0; i = next_item[i]) {
        const float w = std::exp(stats[(i * Hq + head) * 2] - m);
        l += w * stats[(i * Hq + head) * 2 + 1];
        const float* a = accs.data() + (i * Hq + head) * D;
        for (int64_t d = 0; d < D; ++d) o[d] += w * a[d];
      }
      T* dst = out + (b * Hq + head) * D;
      const float inv = 1.f / l;
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(o[d] * inv);
    }
  };

  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, n_items), 1, [&](int64_t, int64_t) {
    // score rows: every head's (AVX-512), one KV head's (scalar); the BF16 path needs none
    std::vector<float> scores(vec_bf16 ? 0 : (vec ? Hq : p.G) * max_n);
#ifdef SPLITSERVE_X86
    Workspace ws;
    ws.runs.resize(max_n);
    if (vec_bf16) {
      ws.probs.resize(Hq * 18);
      ws.pair_acc.resize(Hq * D);
    }
#endif
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n_items;) {
      const Item& it = items[i];
      const int32_t* table = tables + it.seq * p.max_blocks;
      bool done = false;
#ifdef SPLITSERVE_X86
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        if (vec_bf16) {
          float* acc = accs.data() + i * Hq * D;
          float* st = stats.data() + i * Hq * 2;
          if (D == 32) attend_avx512_bf16<1>(p, q, k_cache, v_cache, table, it, ws, acc, st);
          if (D == 64) attend_avx512_bf16<2>(p, q, k_cache, v_cache, table, it, ws, acc, st);
          if (D == 128) attend_avx512_bf16<4>(p, q, k_cache, v_cache, table, it, ws, acc, st);
          done = true;
        }
      }
#endif
#ifdef SPLITSERVE_X86
      if (!done && vec) {  // every KV head in one call (score rows for all Hq heads)
        const int64_t num_runs = build_runs(p, table, it, ws.runs.data());
        attend_avx512<T>(p, q, k_cache, v_cache, ws.runs.data(), num_runs, it, scores.data(),
                         accs.data() + i * Hq * D, stats.data() + i * Hq * 2);
        done = true;
      }
#endif
      for (int64_t h = 0; h < p.Hkv && !done; ++h)
        attend_scalar<T>(p, q, k_cache, v_cache, table, it, h, scores.data(),
                         accs.data() + (i * Hq + h * G) * D, stats.data() + (i * Hq + h * G) * 2);
      if (first[it.seq] == i && next_item[i] < 0) merge(it.seq);  // unsplit: finish it here
    }
  });

  // Split sequences are merged after the parallel region, serially: they only exist for small
  // batches, and a second parallel region per call would be one more barrier, which costs a
  // whole scheduler time slice when another process holds one of the cores.
  for (int64_t b = 0; b < p.num_seqs; ++b)
    if (first[b] >= 0 && next_item[first[b]] >= 0) merge(b);
}

at::Tensor paged_decode_attention(const at::Tensor& query, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& block_tables,
                                  const at::Tensor& seq_lens, double scale, int64_t impl) {
  const PagedLayout layout =
      check_paged_inputs("paged_decode_attention", query, k_cache, v_cache, block_tables, scale);
  TORCH_CHECK(seq_lens.device().is_cpu() && seq_lens.scalar_type() == at::kInt &&
                  seq_lens.dim() == 1 && seq_lens.is_contiguous(),
              "paged_decode_attention: seq_lens must be contiguous int32 [B] on the CPU");
  const int64_t B = query.size(0);
  TORCH_CHECK(block_tables.size(0) == B && seq_lens.size(0) == B,
              "paged_decode_attention: block_tables and seq_lens need one row per query");
  auto out = at::empty(query.sizes(), query.options());
  if (B == 0) return out;
  Problem p;
  static_cast<PagedLayout&>(p) = layout;
  p.num_seqs = B;
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  if (query.scalar_type() == at::kFloat) {
    run<float>(p, query.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
               tables, lens, out.data_ptr<float>(), impl);
  } else if (query.scalar_type() == at::kBFloat16) {
    using BF = c10::BFloat16;
    run<BF>(p, query.data_ptr<BF>(), k_cache.data_ptr<BF>(), v_cache.data_ptr<BF>(), tables, lens,
            out.data_ptr<BF>(), impl);
  } else {
    TORCH_CHECK(false, "paged_decode_attention: float32 or bfloat16 only, got ",
                query.scalar_type());
  }
  return out;
}

// Implementations this CPU can run (see `impl` above); the first listed is the scalar one.
std::vector<int64_t> available_impls() {
  std::vector<int64_t> impls{0};
#ifdef SPLITSERVE_X86
  if (cpu_has_avx512()) impls.push_back(1);
  if (cpu_has_avx512_bf16()) impls.push_back(2);
#endif
  return impls;
}

}  // namespace

TORCH_LIBRARY(splitserve_cpu, m) {
  m.def(
      "paged_decode_attention(Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor seq_lens, float scale, int impl=-1) -> Tensor");
  m.def("available_impls() -> int[]", &available_impls);
}

TORCH_LIBRARY_IMPL(splitserve_cpu, CPU, m) {
  m.impl("paged_decode_attention", paged_decode_attention);
}

}  // namespace splitserve
