// Causal paged prefill attention for the CPU (bf16, AVX512-BF16): flash attention over tiles.
//
// Prompt b owns query rows [query_start_loc[b], query_start_loc[b+1]) of `query`; its q_len
// queries sit at positions ctx .. seq_len - 1 (ctx = seq_len - q_len: cached or earlier-chunk
// context) and attend to keys [0, position] read from the paged cache, which already holds the
// new K/V. So one kernel serves fresh prompts, chunked prefill and prefix-cache hits.
//
// Phase 1 packs each prompt's K and V, per KV head and tile of 16 keys, into the operand layouts
// of _mm512_dpbf16_ps (pairs of bf16 multiplied and summed into fp32 lanes):
//   K tile: [D/2][16 keys][2 dims]  -> one vector per dim pair holds that pair for 16 keys, so a
//           broadcast query pair times it accumulates 16 scores at once;
//   V tile: [8 key pairs][D][2 keys] -> one vector per (key pair, 16 dims), weighted by a
//           broadcast pair of probabilities.
// Keys past the prompt's end are zeros. Phase 2: work item = (prompt, KV head, tile of 16 query
// positions), i.e. 16 * G rows sharing each K/V tile; per key tile, scores, causal mask, online
// softmax (fp32), probabilities rounded to bf16 (as HF's eager attention does before P @ V),
// P @ V into fp32 accumulators. Items are handed out longest first on ATen's thread pool.

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
#include <vector>

#include "paged_layout.h"
#include "simd.h"

namespace splitserve {
namespace {

#ifdef SPLITSERVE_X86
using namespace simd;
using BF = c10::BFloat16;

constexpr int64_t kTile = 16;      // keys per K/V tile and query positions per item

struct Prompt {
  int64_t row0, q_len, ctx, seq_len, first_tile;  // first_tile: its tiles in the packed buffers
};

struct PItem {
  int64_t prompt, kv_head, q0;  // query positions [q0, q0 + 16) relative to the prompt's first
  int64_t cost;
};

using Geometry = PagedLayout;

// Element offset of key `pos` of a sequence in a per-layer K (or V) view, for KV head h.
inline int64_t key_offset(const Geometry& g, const int32_t* table, int64_t pos, int64_t h) {
  return table[pos / g.block_size] * g.block_stride + (pos % g.block_size) * g.token_stride +
         h * g.D;
}

// Pack one 16-key tile of K and V for head h (see the layouts above).
void pack_tile(const Geometry& g, const BF* k_cache, const BF* v_cache, const int32_t* table,
               int64_t key0, int64_t seq_len, int64_t h, uint32_t* kp, uint16_t* vp) {
  const int64_t D = g.D, pairs = D / 2;
  for (int64_t t = 0; t < kTile; ++t) {
    const int64_t pos = key0 + t;
    if (pos >= seq_len) {
      for (int64_t j = 0; j < pairs; ++j) kp[j * kTile + t] = 0;
      for (int64_t d = 0; d < D; ++d) vp[((t / 2) * D + d) * 2 + (t % 2)] = 0;
      continue;
    }
    const int64_t off = key_offset(g, table, pos, h);
    uint32_t krow[128];
    std::memcpy(krow, k_cache + off, D * sizeof(BF));
    for (int64_t j = 0; j < pairs; ++j) kp[j * kTile + t] = krow[j];
    const uint16_t* vrow = reinterpret_cast<const uint16_t*>(v_cache + off);
    uint16_t* vdst = vp + (t / 2) * D * 2 + (t % 2);
    for (int64_t d = 0; d < D; ++d) vdst[2 * d] = vrow[d];
  }
}

// Per-thread scratch for one item's rows (G * 16 of them).
struct TileScratch {
  std::vector<uint32_t> qp;   // [rows][D/2] query pairs
  std::vector<float> acc;     // [rows][D] P @ V accumulators
  std::vector<uint16_t> pb;   // [rows][16] a key tile's probabilities (bf16 bits)
  std::vector<float> mrow, lrow;  // running max and sum per row
};

// One item: rows = G heads x 16 query positions of one prompt and KV head.
template <int D>
SPLITSERVE_AVX512BF16 void attend_tile(const Geometry& g, const Prompt& pr, const PItem& it,
                                       const BF* q, const uint32_t* kpack, const uint16_t* vpack,
                                       TileScratch& ws, BF* out) {
  constexpr int PAIRS = D / 2, CH = D / 16;
  const int64_t G = g.G;
  const int64_t nq = std::min(kTile, pr.q_len - it.q0);  // valid query positions
  const int64_t rows = G * kTile;                        // row r = gi * 16 + i
  uint32_t* qp = ws.qp.data();
  float* acc = ws.acc.data();
  uint16_t* pb = ws.pb.data();
  float* mrow = ws.mrow.data();
  float* lrow = ws.lrow.data();
  for (int64_t gi = 0; gi < G; ++gi)
    for (int64_t i = 0; i < kTile; ++i) {
      const int64_t r = gi * kTile + i;
      if (i < nq) {
        const BF* src = q + (pr.row0 + it.q0 + i) * g.q_stride + (it.kv_head * G + gi) * D;
        std::memcpy(qp + r * PAIRS, src, D * sizeof(BF));
      } else {
        std::memset(qp + r * PAIRS, 0, D * sizeof(BF));
      }
      mrow[r] = -std::numeric_limits<float>::infinity();
      lrow[r] = 0.f;
    }
  std::fill(acc, acc + rows * D, 0.f);
  const __m512 scale = _mm512_set1_ps(g.scale);
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const int64_t last_pos = pr.ctx + it.q0 + nq - 1;  // the furthest key any row may see
  const int64_t tiles = last_pos / kTile + 1;
  const int64_t tile_elems = PAIRS * kTile;  // uint32 per packed K tile (= bf16 pairs)
  // this prompt's packed tiles: [Hkv][ntiles] from first_tile * Hkv on
  const int64_t slot0 = pr.first_tile * g.Hkv + it.kv_head * ((pr.seq_len + kTile - 1) / kTile);
  const uint32_t* kbase = kpack + slot0 * tile_elems;
  const uint16_t* vbase = vpack + slot0 * kTile * D;

  for (int64_t kt = 0; kt < tiles; ++kt) {
    const uint32_t* kp = kbase + kt * tile_elems;
    const uint16_t* vp = vbase + kt * kTile * D;
    const int64_t key0 = kt * kTile;
    // Whether this tile needs the causal mask: some key in it lies past some row's position.
    const bool diagonal = key0 + kTile - 1 > pr.ctx + it.q0;
    for (int64_t r0 = 0; r0 < rows; r0 += 8) {
      // Scores of 8 rows: s[r] lanes = 16 keys.
      __m512 s[8];
      for (int r = 0; r < 8; ++r) s[r] = _mm512_setzero_ps();
      for (int j = 0; j < PAIRS; ++j) {
        const __m512bh kv = (__m512bh)_mm512_loadu_si512(kp + j * kTile);
        for (int r = 0; r < 8; ++r)
          s[r] = _mm512_dpbf16_ps(
              s[r], (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(qp[(r0 + r) * PAIRS + j])),
              kv);
      }
      for (int r = 0; r < 8; ++r) {
        const int64_t row = r0 + r, i = row % kTile;
        __m512 sc = _mm512_mul_ps(s[r], scale);
        __mmask16 valid = 0xFFFF;
        if (diagonal) {  // key0 + lane <= position of query i
          const __m512i limit = _mm512_set1_epi32(static_cast<int32_t>(pr.ctx + it.q0 + i - key0));
          valid = _mm512_cmple_epi32_mask(lane, limit);
        }
        sc = _mm512_mask_mov_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), valid, sc);
        const float old_max = mrow[row];
        const float tile_max = valid ? _mm512_mask_reduce_max_ps(valid, sc) : old_max;
        const float new_max = std::max(old_max, tile_max);
        uint16_t* prow = pb + row * kTile;
        if (new_max == -std::numeric_limits<float>::infinity()) {  // nothing visible yet
          std::memset(prow, 0, kTile * sizeof(uint16_t));
          continue;
        }
        const __m512 e =
            _mm512_maskz_mov_ps(valid, exp16(_mm512_sub_ps(sc, _mm512_set1_ps(new_max))));
        if (new_max > old_max && old_max != -std::numeric_limits<float>::infinity()) {
          const float alpha = std::exp(old_max - new_max);
          lrow[row] *= alpha;
          const __m512 av = _mm512_set1_ps(alpha);
          float* a = acc + row * D;
          for (int c = 0; c < CH; ++c)
            _mm512_storeu_ps(a + 16 * c, _mm512_mul_ps(_mm512_loadu_ps(a + 16 * c), av));
        }
        mrow[row] = new_max;
        lrow[row] += _mm512_reduce_add_ps(e);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(prow), (__m256i)_mm512_cvtneps_pbh(e));
      }
    }
    // acc[row] += P[row] @ V_tile, 4 rows at a time (their accumulators stay in registers).
    for (int64_t r0 = 0; r0 < rows; r0 += 4) {
      __m512 o[4][CH];
      for (int r = 0; r < 4; ++r)
        for (int c = 0; c < CH; ++c) o[r][c] = _mm512_loadu_ps(acc + (r0 + r) * D + 16 * c);
      for (int kp2 = 0; kp2 < kTile / 2; ++kp2) {
        __m512bh vv[CH];
        for (int c = 0; c < CH; ++c)
          vv[c] = (__m512bh)_mm512_loadu_si512(vp + (kp2 * D + 16 * c) * 2);
        for (int r = 0; r < 4; ++r) {
          uint32_t w;
          std::memcpy(&w, pb + (r0 + r) * kTile + 2 * kp2, sizeof(w));
          const __m512bh wv = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(w));
          for (int c = 0; c < CH; ++c) o[r][c] = _mm512_dpbf16_ps(o[r][c], wv, vv[c]);
        }
      }
      for (int r = 0; r < 4; ++r)
        for (int c = 0; c < CH; ++c) _mm512_storeu_ps(acc + (r0 + r) * D + 16 * c, o[r][c]);
    }
  }
  for (int64_t gi = 0; gi < G; ++gi)
    for (int64_t i = 0; i < nq; ++i) {
      const int64_t row = gi * kTile + i;
      const float inv = 1.f / lrow[row];
      BF* dst = out + (pr.row0 + it.q0 + i) * g.Hq * D + (it.kv_head * G + gi) * D;
      for (int c = 0; c < CH; ++c) {
        const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(acc + row * D + 16 * c), _mm512_set1_ps(inv));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16 * c), (__m256i)_mm512_cvtneps_pbh(v));
      }
    }
}
#endif  // SPLITSERVE_X86

bool prefill_supported(const at::Tensor& query, const at::Tensor& k_cache) {
#ifdef SPLITSERVE_X86
  const int64_t D = query.size(-1), Hq = query.size(-2), Hkv = k_cache.size(2);
  return cpu_has_avx512_bf16() && query.scalar_type() == at::kBFloat16 &&
         (D == 32 || D == 64 || D == 128) && Hkv > 0 && Hq % Hkv == 0 && Hq / Hkv <= 8;
#else
  return false;
#endif
}

at::Tensor paged_prefill_attention(const at::Tensor& query, const at::Tensor& k_cache,
                                   const at::Tensor& v_cache, const at::Tensor& block_tables,
                                   const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                                   double scale) {
  [[maybe_unused]] const Geometry g = check_paged_inputs("paged_prefill_attention", query, k_cache, v_cache,
                                        block_tables, scale);
  TORCH_CHECK(prefill_supported(query, k_cache),
              "paged_prefill_attention: needs bf16, head_dim 32/64/128, at most 8 query heads per "
              "KV head and a CPU with AVX512-BF16 (see prefill_supported)");
  TORCH_CHECK(seq_lens.device().is_cpu() && query_start_loc.device().is_cpu() &&
                  seq_lens.scalar_type() == at::kInt && seq_lens.dim() == 1 &&
                  seq_lens.is_contiguous() && query_start_loc.scalar_type() == at::kInt &&
                  query_start_loc.dim() == 1 && query_start_loc.is_contiguous(),
              "seq_lens [B] and query_start_loc [B + 1] must be contiguous int32");
  const int64_t B = seq_lens.size(0);
  TORCH_CHECK(query_start_loc.size(0) == B + 1 && block_tables.size(0) == B,
              "query_start_loc needs B + 1 entries and block_tables B rows");
  auto out = at::empty({query.size(0), query.size(1), query.size(2)}, query.options());
#ifdef SPLITSERVE_X86
  const int64_t Hkv = g.Hkv, D = g.D;
  const int32_t* qsl = query_start_loc.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  TORCH_CHECK(qsl[0] == 0 && qsl[B] == query.size(0),
              "query_start_loc must run from 0 to the number of query rows");
  std::vector<Prompt> prompts(B);
  std::vector<PItem> items;
  int64_t total_tiles = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t q_len = qsl[b + 1] - qsl[b], seq_len = lens[b];
    TORCH_CHECK(q_len >= 1 && q_len <= seq_len && seq_len <= g.max_blocks * g.block_size,
                "paged_prefill_attention: prompt ", b, " has ", q_len, " queries and seq_len ",
                seq_len, " (block table holds ", g.max_blocks * g.block_size, ")");
    check_block_ids("paged_prefill_attention", g, tables + b * g.max_blocks,
                    (seq_len + g.block_size - 1) / g.block_size, b);
    const int64_t ntiles = (seq_len + kTile - 1) / kTile;
    prompts[b] = {qsl[b], q_len, seq_len - q_len, seq_len, total_tiles};
    total_tiles += ntiles;
    for (int64_t h = 0; h < Hkv; ++h)
      for (int64_t q0 = 0; q0 < q_len; q0 += kTile)
        items.push_back({b, h, q0, (seq_len - q_len + q0) / kTile + 1});
  }
  // Packed K/V of every prompt: [tile index over prompts][Hkv][...], prompt-major.
  const int64_t tile_elems = (D / 2) * kTile;
  auto kpack = at::empty({total_tiles * Hkv * tile_elems}, query.options().dtype(at::kInt));
  auto vpack = at::empty({total_tiles * Hkv * kTile * D}, query.options().dtype(at::kShort));
  uint32_t* kp = reinterpret_cast<uint32_t*>(kpack.data_ptr<int32_t>());
  uint16_t* vp = reinterpret_cast<uint16_t*>(vpack.data_ptr<int16_t>());
  const BF* kc = k_cache.data_ptr<BF>();
  const BF* vc = v_cache.data_ptr<BF>();
  // Phase 1: pack (prompt, head, tile) in parallel.
  std::vector<int64_t> tile_prompt(total_tiles);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < (prompts[b].seq_len + kTile - 1) / kTile; ++t)
      tile_prompt[prompts[b].first_tile + t] = b;
  // Both phases hand out work from an atomic counter rather than static ranges: a thread that
  // another process keeps off its core then delays the barrier by one chunk, not by its share.
  const int64_t n_pack = total_tiles * Hkv, threads = at::get_num_threads();
  std::atomic<int64_t> next_pack{0};
  at::parallel_for(0, std::min<int64_t>(threads, (n_pack + 7) / 8), 1, [&](int64_t, int64_t) {
    for (int64_t x0; (x0 = next_pack.fetch_add(8, std::memory_order_relaxed)) < n_pack;) {
      for (int64_t x = x0; x < std::min(x0 + 8, n_pack); ++x) {
        const int64_t tile = x / Hkv, h = x % Hkv;
        const Prompt& pr = prompts[tile_prompt[tile]];
        const int64_t ntiles = (pr.seq_len + kTile - 1) / kTile, t = tile - pr.first_tile;
        // layout within a prompt: [Hkv][ntiles]
        const int64_t slot = pr.first_tile * Hkv + h * ntiles + t;
        pack_tile(g, kc, vc, tables + tile_prompt[tile] * g.max_blocks, t * kTile, pr.seq_len,
                  h, kp + slot * tile_elems, vp + slot * kTile * D);
      }
    }
  });
  // Phase 2: attention, costliest items first, handed out dynamically.
  std::stable_sort(items.begin(), items.end(),
                   [](const PItem& a, const PItem& b) { return a.cost > b.cost; });
  const int64_t n_items = static_cast<int64_t>(items.size());
  const BF* q = query.data_ptr<BF>();
  BF* o = out.data_ptr<BF>();
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(threads, n_items), 1, [&](int64_t, int64_t) {
    const int64_t rows = g.G * kTile;
    TileScratch ws{std::vector<uint32_t>(rows * D / 2), std::vector<float>(rows * D),
                   std::vector<uint16_t>(rows * kTile), std::vector<float>(rows),
                   std::vector<float>(rows)};
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n_items;) {
      const PItem& it = items[i];
      const Prompt& pr = prompts[it.prompt];
      if (D == 32) attend_tile<32>(g, pr, it, q, kp, vp, ws, o);
      if (D == 64) attend_tile<64>(g, pr, it, q, kp, vp, ws, o);
      if (D == 128) attend_tile<128>(g, pr, it, q, kp, vp, ws, o);
    }
  });
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(splitserve_cpu, m) {
  m.def(
      "paged_prefill_attention(Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor query_start_loc, Tensor seq_lens, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(splitserve_cpu, CPU, m) {
  m.impl("paged_prefill_attention", paged_prefill_attention);
}

}  // namespace splitserve
