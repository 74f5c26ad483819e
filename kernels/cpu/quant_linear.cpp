// Linear layers with quantized weights for the CPU: y[M, N] = x[M, K] . W[N, K]^T, W kept in its
// quantized form in memory (docs/quantization.md). Three formats, one op each:
//
// - int8_linear: int8 weights, one fp32 scale per output row ("int8", weight-only); x stays
//   float32/bf16. Small M: weights widened to fp32 in registers and FMA'd against x. Large M:
//   the weight is dequantized a slab of rows at a time into fp32 (or bf16) scratch and the slab
//   goes through at::mm (MKL / oneDNN, AMX where the CPU has it).
// - w8a8_linear: int8 weights with per-row scales and x quantized per token to int8 here
//   ("w8a8"): integer dot products (AVX512-VNNI vpdpbusd, else vpmaddwd), exact int32 sums, so
//   a row's result does not depend on what else is in the batch.
// - block_linear: GGUF's 32-element blocks with fp16 scales d (and mins m) per block: 4-bit
//   value = d * u + m, u in [0, 16) (Q4_1; Q4_0 is m = -8 d); 8-bit value = d * s, s signed
//   (Q8_0). The quantized bytes are GGUF's own (quant.py splits the scales off); x is quantized
//   per 32-element block to int8 (as llama.cpp does), integer dots per block.
//
// Weight rows are padded with zeros to a multiple of 64 columns by the packers; x may be
// narrower (its K columns are copied or quantized into zero-padded scratch). Instruction sets
// are chosen at run time (`impl`): 0 scalar, 1 AVX2+FMA, 2 AVX-512 (F/BW/DQ/VL), 3 AVX-512 VNNI.
// Every impl computes the same integer sums; float sums differ only in order.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "ops_common.h"
#include "simd.h"

#ifdef SPLITSERVE_X86
#define SPLITSERVE_AVX2 __attribute__((target("avx2,fma,f16c")))
#define SPLITSERVE_VNNI \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")))
#endif

namespace splitserve {
namespace {

constexpr int64_t kBlock = 32;  // GGUF block size
constexpr int64_t kAlign = 64;  // packed weights' columns are a multiple of this
constexpr int64_t kTileN = 4;   // output rows per register tile
constexpr int64_t kTileM = 4;   // input rows per register tile
constexpr int64_t kSlabM = 64;  // input rows per pass over the weights (large M)
// Below this many weight bytes a call runs on the calling thread: a parallel region costs a
// scheduler time slice whenever another process holds one of the cores.
constexpr int64_t kParallelBytes = 96 << 10;

enum Isa : int64_t { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kVnni = 3 };

int64_t best_isa() {
#ifdef SPLITSERVE_X86
  static const int64_t best = [] {
    if (simd::cpu_has_avx512() && __builtin_cpu_supports("avx512vnni")) return int64_t{kVnni};
    if (simd::cpu_has_avx512()) return int64_t{kAvx512};
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c"))
      return int64_t{kAvx2};
    return int64_t{kScalar};
  }();
  return best;
#else
  return kScalar;
#endif
}

int64_t pick_isa(const char* op, int64_t impl) {
  if (impl < 0) return best_isa();
  TORCH_CHECK(impl <= best_isa(), op, ": impl ", impl, " is not available on this CPU (best ",
              best_isa(), ")");
  return impl;
}

std::vector<int64_t> quant_impls() {
  std::vector<int64_t> impls;
  for (int64_t i = 0; i <= best_isa(); ++i) impls.push_back(i);
  return impls;
}

// Runs f(begin, end) over [0, n) tiles: on this thread when the work is small.
template <typename F>
void for_tiles(int64_t n, int64_t weight_bytes, const F& f) {
  maybe_parallel(n, weight_bytes, kParallelBytes, f);
}

// ------------------------------------------------------------------ activation quantization
// One scale per `group` columns (a whole row for w8a8, 32 for the block formats):
// d = amax / 127, q = round(x * (127 / amax)) (half to even, as torch.round), 0 where amax is 0.
// Also the sum of each group's q (the block formats' min term; w8a8's VNNI correction).
struct QuantizedX {
  std::vector<int8_t> q;     // [M, Kp]
  std::vector<int16_t> q16;  // [M, Kp] the same widened (the non-VNNI integer paths)
  std::vector<float> d;      // [M, Kp / group]
  std::vector<int32_t> sum;  // [M, Kp / group]
  // The VNNI block kernel's views (`with_block_lanes`): q in 4-bit pair order, each pair of
  // blocks' d_x spread over the 16 int32 lanes of one step, and d_x * sum(q) per block.
  std::vector<int8_t> qpair;  // [M, Kp]
  std::vector<float> dlanes;  // [M, Kp / 64, 16]
  std::vector<float> sx;      // [M, Kp / 32]
};

// Fills the VNNI block kernel's views of x (see block_tile_vnni for the orders).
void with_block_lanes(QuantizedX& r, int64_t M, int64_t Kp, int bits) {
  const int64_t nb = Kp / kBlock, pairs = nb / 2;
  r.dlanes.resize(M * pairs * 16);
  r.sx.resize(M * nb);
  if (bits == 4) r.qpair.resize(M * Kp);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < nb; ++b) r.sx[m * nb + b] = r.d[m * nb + b] * r.sum[m * nb + b];
    for (int64_t p = 0; p < pairs; ++p) {
      const float d0 = r.d[m * nb + 2 * p], d1 = r.d[m * nb + 2 * p + 1];
      float* lanes = r.dlanes.data() + (m * pairs + p) * 16;
      for (int l = 0; l < 16; ++l) lanes[l] = (bits == 4 ? (l / 4) % 2 : l / 8) ? d1 : d0;
      if (bits == 4) {
        const int8_t* src = r.q.data() + m * Kp + p * 64;
        int8_t* dst = r.qpair.data() + m * Kp + p * 64;
        std::memcpy(dst, src, 16);            // b, columns 0-15
        std::memcpy(dst + 16, src + 32, 16);  // b+1, columns 0-15
        std::memcpy(dst + 32, src + 16, 16);  // b, columns 16-31
        std::memcpy(dst + 48, src + 48, 16);  // b+1, columns 16-31
      }
    }
  }
}

QuantizedX quantize_x(const at::Tensor& x, int64_t Kp, int64_t group, bool widen) {
  const int64_t M = x.size(0), K = x.size(1), G = Kp / group;
  QuantizedX r;
  r.q.assign(M * Kp, 0);
  r.d.assign(M * G, 0.0f);
  r.sum.assign(M * G, 0);
  std::vector<float> row(Kp);
  for (int64_t m = 0; m < M; ++m) {
    if (x.scalar_type() == at::kFloat) {
      std::memcpy(row.data(), x.data_ptr<float>() + m * x.stride(0), K * sizeof(float));
    } else {
      const c10::BFloat16* src = x.data_ptr<c10::BFloat16>() + m * x.stride(0);
      for (int64_t k = 0; k < K; ++k) row[k] = static_cast<float>(src[k]);
    }
    std::fill(row.begin() + K, row.end(), 0.0f);
    for (int64_t g = 0; g < G; ++g) {
      const float* v = row.data() + g * group;
      float amax = 0.0f;
      for (int64_t i = 0; i < group; ++i) amax = std::max(amax, std::fabs(v[i]));
      const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
      int8_t* q = r.q.data() + m * Kp + g * group;
      int32_t s = 0;
      for (int64_t i = 0; i < group; ++i) {
        const float t = std::nearbyint(v[i] * inv);
        q[i] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, t)));
        s += q[i];
      }
      r.d[m * G + g] = amax / 127.0f;
      r.sum[m * G + g] = s;
    }
  }
  if (widen) r.q16.assign(r.q.begin(), r.q.end());
  return r;
}

// ------------------------------------------------------------------ int8 weight-only (fp x)
// acc[n][m] = sum_k x[m][k] * w[n][k] (fp32), times scale[n].

void int8_tile_scalar(const float* x, int64_t Kp, const int8_t* w, int64_t nt, int64_t mt,
                      float* acc /* [kTileN][kTileM] */) {
  for (int64_t j = 0; j < nt; ++j)
    for (int64_t i = 0; i < mt; ++i) {
      float s = 0.0f;
      for (int64_t k = 0; k < Kp; ++k) s += x[i * Kp + k] * static_cast<float>(w[j * Kp + k]);
      acc[j * kTileM + i] = s;
    }
}

#ifdef SPLITSERVE_X86
template <int NT, int MT>
SPLITSERVE_AVX512 void int8_tile_avx512(const float* x, int64_t Kp, const int8_t* w,
                                        float* acc) {
  __m512 a[NT][MT];
  for (int j = 0; j < NT; ++j)
    for (int i = 0; i < MT; ++i) a[j][i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < Kp; k += 16) {
    __m512 wv[NT];
    for (int j = 0; j < NT; ++j)
      wv[j] = _mm512_cvtepi32_ps(
          _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j * Kp + k))));
    for (int i = 0; i < MT; ++i) {
      const __m512 xv = _mm512_loadu_ps(x + i * Kp + k);
      for (int j = 0; j < NT; ++j) a[j][i] = _mm512_fmadd_ps(xv, wv[j], a[j][i]);
    }
  }
  for (int j = 0; j < NT; ++j)
    for (int i = 0; i < MT; ++i) acc[j * kTileM + i] = _mm512_reduce_add_ps(a[j][i]);
}

SPLITSERVE_AVX2 inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

template <int NT, int MT>
SPLITSERVE_AVX2 void int8_tile_avx2(const float* x, int64_t Kp, const int8_t* w, float* acc) {
  __m256 a[NT][MT];
  for (int j = 0; j < NT; ++j)
    for (int i = 0; i < MT; ++i) a[j][i] = _mm256_setzero_ps();
  for (int64_t k = 0; k < Kp; k += 8) {
    __m256 wv[NT];
    for (int j = 0; j < NT; ++j)
      wv[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + j * Kp + k))));
    for (int i = 0; i < MT; ++i) {
      const __m256 xv = _mm256_loadu_ps(x + i * Kp + k);
      for (int j = 0; j < NT; ++j) a[j][i] = _mm256_fmadd_ps(xv, wv[j], a[j][i]);
    }
  }
  for (int j = 0; j < NT; ++j)
    for (int i = 0; i < MT; ++i) acc[j * kTileM + i] = hsum256(a[j][i]);
}
#endif

// Calls tile<NT, MT>(args..., acc) with compile-time tile sizes (NT in {1, 4}, MT in 1..4).
#define SPLITSERVE_TILE_DISPATCH(fn, nt, mt, ...)                       \
  do {                                                                  \
    if ((nt) == kTileN) {                                               \
      switch (mt) {                                                     \
        case 1: fn<kTileN, 1>(__VA_ARGS__); break;                      \
        case 2: fn<kTileN, 2>(__VA_ARGS__); break;                      \
        case 3: fn<kTileN, 3>(__VA_ARGS__); break;                      \
        default: fn<kTileN, 4>(__VA_ARGS__); break;                     \
      }                                                                 \
    } else {                                                            \
      for (int64_t jj = 0; jj < (nt); ++jj) {                           \
        switch (mt) {                                                   \
          case 1: fn<1, 1>(SPLITSERVE_ROW_ARGS(jj, __VA_ARGS__)); break; \
          case 2: fn<1, 2>(SPLITSERVE_ROW_ARGS(jj, __VA_ARGS__)); break; \
          case 3: fn<1, 3>(SPLITSERVE_ROW_ARGS(jj, __VA_ARGS__)); break; \
          default: fn<1, 4>(SPLITSERVE_ROW_ARGS(jj, __VA_ARGS__)); break; \
        }                                                               \
      }                                                                 \
    }                                                                   \
  } while (0)

at::Tensor int8_linear_small(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                             int64_t isa) {
  const int64_t M = x.size(0), N = weight.size(0), Kp = weight.size(1);
  const at::Tensor xf = to_padded_float(x, Kp);
  auto out = at::empty({M, N}, x.options().dtype(at::kFloat));
  const float* xp = xf.data_ptr<float>();
  const int8_t* wp = weight.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = out.data_ptr<float>();
  const int64_t tiles = (N + kTileN - 1) / kTileN;
  for_tiles(tiles, N * Kp, [&](int64_t t0, int64_t t1) {
    float acc[kTileN * kTileM];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * kTileN, nt = std::min(kTileN, N - n0);
      for (int64_t m0 = 0; m0 < M; m0 += kTileM) {
        const int64_t mt = std::min(kTileM, M - m0);
        const float* xs = xp + m0 * Kp;
        const int8_t* ws = wp + n0 * Kp;
#ifdef SPLITSERVE_X86
        if (isa >= kAvx512) {
#define SPLITSERVE_ROW_ARGS(jj, x_, k_, w_, acc_) x_, k_, (w_) + (jj) * Kp, (acc_) + (jj) * kTileM
          SPLITSERVE_TILE_DISPATCH(int8_tile_avx512, nt, mt, xs, Kp, ws, acc);
        } else if (isa == kAvx2) {
          SPLITSERVE_TILE_DISPATCH(int8_tile_avx2, nt, mt, xs, Kp, ws, acc);
#undef SPLITSERVE_ROW_ARGS
        } else
#endif
        {
          int8_tile_scalar(xs, Kp, ws, nt, mt, acc);
        }
        for (int64_t j = 0; j < nt; ++j)
          for (int64_t i = 0; i < mt; ++i)
            yp[(m0 + i) * N + n0 + j] = acc[j * kTileM + i] * sp[n0 + j];
      }
    }
  });
  return out;
}

// Large M: dequantize kSlabN rows at a time into the activation dtype, one at::mm each.
constexpr int64_t kSlabN = 256;

at::Tensor int8_linear_large(const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& scale) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), Kp = weight.size(1);
  auto out = at::empty({M, N}, x.options());
  auto slab = at::empty({std::min(kSlabN, N), K}, x.options().dtype(at::kFloat));
  at::Tensor slab_x = x.scalar_type() == at::kFloat ? slab : at::empty(slab.sizes(), x.options());
  const int8_t* wp = weight.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  for (int64_t n0 = 0; n0 < N; n0 += kSlabN) {
    const int64_t rows = std::min(kSlabN, N - n0);
    float* s = slab.data_ptr<float>();
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int8_t* w = wp + (n0 + r) * Kp;
        const float sc = sp[n0 + r];
        for (int64_t k = 0; k < K; ++k) s[r * K + k] = static_cast<float>(w[k]) * sc;
      }
    });
    at::Tensor tile = slab.narrow(0, 0, rows);
    if (x.scalar_type() != at::kFloat) {
      slab_x.narrow(0, 0, rows).copy_(tile);
      tile = slab_x.narrow(0, 0, rows);
    }
    out.narrow(1, n0, rows).copy_(at::mm(x, tile.t()));
  }
  return out;
}

void check_weight(const char* op, const at::Tensor& x, const at::Tensor& weight,
                  at::ScalarType wtype, int64_t k_per_byte) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, op, ": x must be [M, K] with contiguous rows");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              ": x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.scalar_type() == wtype, op,
              ": weight must be a contiguous 2-d ", wtype, " tensor");
  const int64_t Kp = weight.size(1) * k_per_byte;
  TORCH_CHECK(Kp % kAlign == 0, op, ": packed weight rows must hold a multiple of ", kAlign,
              " columns, got ", Kp);
  TORCH_CHECK(x.size(1) <= Kp && x.size(1) > Kp - kAlign, op, ": x has ", x.size(1),
              " columns, the weight ", Kp, " (padded)");
}

void check_rows(const char* op, const at::Tensor& t, int64_t n, at::ScalarType type,
                const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == type &&
                  t.numel() == n,
              op, ": ", name, " must be a contiguous ", type, " tensor of ", n, " elements");
}

at::Tensor finish(const at::Tensor& y, const at::Tensor& x) {
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

// Rows at or above which int8_linear dequantizes slabs for at::mm instead of its own tiles.
constexpr int64_t kLargeM = 16;

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                       int64_t impl) {
  check_weight("int8_linear", x, weight, at::kChar, 1);
  check_rows("int8_linear", scale, weight.size(0), at::kFloat, "scale");
  const int64_t isa = pick_isa("int8_linear", impl);
  if (x.size(0) >= kLargeM) return int8_linear_large(x, weight, scale);
  return finish(int8_linear_small(x, weight, scale, isa), x);
}

// ------------------------------------------------------------------ integer dot tiles
// isum[n][m] = sum_k q[m][k] * w[n][k] over int8 q and int8 w (w8a8).

void w8a8_tile_scalar(const int8_t* q, int64_t Kp, const int8_t* w, int64_t nt, int64_t mt,
                      int32_t* acc) {
  for (int64_t j = 0; j < nt; ++j)
    for (int64_t i = 0; i < mt; ++i) {
      int32_t s = 0;
      for (int64_t k = 0; k < Kp; ++k) s += int32_t{q[i * Kp + k]} * int32_t{w[j * Kp + k]};
      acc[j * kTileM + i] = s;
    }
}

#ifdef SPLITSERVE_X86
// VNNI: vpdpbusd takes unsigned x signed bytes: q ^ 0x80 = q + 128 as unsigned, and the
// caller subtracts 128 * sum_k w[n][k] (precomputed per row: `wsum`).
template <int NT, int MT>
SPLITSERVE_VNNI void w8a8_tile_vnni(const int8_t* q, int64_t Kp, const int8_t* w, int32_t* acc) {
  __m512i a[NT][MT];
  for (int j = 0; j < NT; ++j)
    for (int i = 0; i < MT; ++i) a[j][i] = _mm512_setzero_si512();
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t k = 0; k < Kp; k += 64) {
    __m512i wv[NT];
    for (int j = 0; j < NT; ++j) wv[j] = _mm512_loadu_si512(w + j * Kp + k);
    for (int i = 0; i < MT; ++i) {
      const __m512i xv = _mm512_xor_si512(_mm512_loadu_si512(q + i * Kp + k), flip);
      for (int j = 0; j < NT; ++j) a[j][i] = _mm512_dpbusd_epi32(a[j][i], xv, wv[j]);
    }
  }
  for (int j = 0; j < NT; ++j)
    for (int i = 0; i < MT; ++i) acc[j * kTileM + i] = _mm512_reduce_add_epi32(a[j][i]);
}

// AVX-512BW without VNNI: both sides widened to int16, vpmaddwd (no saturation).
template <int NT, int MT>
SPLITSERVE_AVX512 void w8a8_tile_avx512(const int16_t* q, int64_t Kp, const int8_t* w,
                                        int32_t* acc) {
  __m512i a[NT][MT];
  for (int j = 0; j < NT; ++j)
    for (int i = 0; i < MT; ++i) a[j][i] = _mm512_setzero_si512();
  for (int64_t k = 0; k < Kp; k += 32) {
    __m512i wv[NT];
    for (int j = 0; j < NT; ++j)
      wv[j] = _mm512_cvtepi8_epi16(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * Kp + k)));
    for (int i = 0; i < MT; ++i) {
      const __m512i xv = _mm512_loadu_si512(q + i * Kp + k);
      for (int j = 0; j < NT; ++j)
        a[j][i] = _mm512_add_epi32(a[j][i], _mm512_madd_epi16(xv, wv[j]));
    }
  }
  for (int j = 0; j < NT; ++j)
    for (int i = 0; i < MT; ++i) acc[j * kTileM + i] = _mm512_reduce_add_epi32(a[j][i]);
}

SPLITSERVE_AVX2 inline int32_t hsum256_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

template <int NT, int MT>
SPLITSERVE_AVX2 void w8a8_tile_avx2(const int16_t* q, int64_t Kp, const int8_t* w, int32_t* acc) {
  __m256i a[NT][MT];
  for (int j = 0; j < NT; ++j)
    for (int i = 0; i < MT; ++i) a[j][i] = _mm256_setzero_si256();
  for (int64_t k = 0; k < Kp; k += 16) {
    __m256i wv[NT];
    for (int j = 0; j < NT; ++j)
      wv[j] = _mm256_cvtepi8_epi16(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j * Kp + k)));
    for (int i = 0; i < MT; ++i) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i * Kp + k));
      for (int j = 0; j < NT; ++j)
        a[j][i] = _mm256_add_epi32(a[j][i], _mm256_madd_epi16(xv, wv[j]));
    }
  }
  for (int j = 0; j < NT; ++j)
    for (int i = 0; i < MT; ++i) acc[j * kTileM + i] = hsum256_epi32(a[j][i]);
}
#endif

at::Tensor w8a8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                       const at::Tensor& wsum, int64_t impl) {
  check_weight("w8a8_linear", x, weight, at::kChar, 1);
  const int64_t M = x.size(0), N = weight.size(0), Kp = weight.size(1);
  check_rows("w8a8_linear", scale, N, at::kFloat, "scale");
  check_rows("w8a8_linear", wsum, N, at::kInt, "wsum");
  const int64_t isa = pick_isa("w8a8_linear", impl);
  const QuantizedX qx = quantize_x(x, Kp, Kp, isa == kAvx2 || isa == kAvx512);
  auto out = at::empty({M, N}, x.options().dtype(at::kFloat));
  const int8_t* wp = weight.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  const int32_t* cp = wsum.data_ptr<int32_t>();
  float* yp = out.data_ptr<float>();
  const int64_t tiles = (N + kTileN - 1) / kTileN;
  for (int64_t s0 = 0; s0 < M; s0 += kSlabM) {
    const int64_t s1 = std::min(M, s0 + kSlabM);
    for_tiles(tiles, N * Kp * std::max<int64_t>(1, (s1 - s0) / kTileM), [&](int64_t t0, int64_t t1) {
      int32_t acc[kTileN * kTileM];
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = t * kTileN, nt = std::min(kTileN, N - n0);
        const int8_t* ws = wp + n0 * Kp;
        for (int64_t m0 = s0; m0 < s1; m0 += kTileM) {
          const int64_t mt = std::min(kTileM, s1 - m0);
          bool vnni = false;
#ifdef SPLITSERVE_X86
          if (isa == kVnni) {
            const int8_t* qs = qx.q.data() + m0 * Kp;
#define SPLITSERVE_ROW_ARGS(jj, q_, k_, w_, acc_) q_, k_, (w_) + (jj) * Kp, (acc_) + (jj) * kTileM
            SPLITSERVE_TILE_DISPATCH(w8a8_tile_vnni, nt, mt, qs, Kp, ws, acc);
            vnni = true;
          } else if (isa == kAvx512) {
            const int16_t* qs = qx.q16.data() + m0 * Kp;
            SPLITSERVE_TILE_DISPATCH(w8a8_tile_avx512, nt, mt, qs, Kp, ws, acc);
          } else if (isa == kAvx2) {
            const int16_t* qs = qx.q16.data() + m0 * Kp;
            SPLITSERVE_TILE_DISPATCH(w8a8_tile_avx2, nt, mt, qs, Kp, ws, acc);
#undef SPLITSERVE_ROW_ARGS
          } else
#endif
          {
            w8a8_tile_scalar(qx.q.data() + m0 * Kp, Kp, ws, nt, mt, acc);
          }
          for (int64_t j = 0; j < nt; ++j)
            for (int64_t i = 0; i < mt; ++i) {
              int32_t s = acc[j * kTileM + i];
              if (vnni) s -= 128 * cp[n0 + j];
              yp[(m0 + i) * N + n0 + j] = static_cast<float>(s) * qx.d[m0 + i] * sp[n0 + j];
            }
        }
      }
    });
  }
  return finish(out, x);
}

// ------------------------------------------------------------------ GGUF-style blocks
// Weight row n, block b (32 columns): 4-bit value = d[n][b] * u + m[n][b], u unsigned; byte i
// of a block's 16 holds column i in its low nibble and column i + 16 in its high nibble (GGUF's
// order). 8-bit value = d[n][b] * s (+ m[n][b] where m is given), s signed, one byte a column.
// y[m][n] = sum_b d_w * d_x * sum_i w_i q_i + m_w * d_x * sum_i q_i.

struct BlockArgs {
  int64_t Kp, nb, row_bytes;  // columns, blocks and bytes of one packed weight row
  int bits;
  bool has_min;
};

inline void unpack_block(const uint8_t* qs, int bits, int64_t b, int32_t* u /* [32] */) {
  if (bits == 8) {
    const int8_t* p = reinterpret_cast<const int8_t*>(qs) + b * kBlock;
    for (int i = 0; i < kBlock; ++i) u[i] = p[i];
    return;
  }
  const uint8_t* p = qs + b * (kBlock / 2);
  for (int i = 0; i < 16; ++i) {
    u[i] = p[i] & 0x0F;
    u[i + 16] = p[i] >> 4;
  }
}

void block_tile_scalar(const QuantizedX& qx, int64_t m0, const uint8_t* qs, const c10::Half* d,
                       const c10::Half* mn, const BlockArgs& a, int64_t nt, int64_t mt,
                       float* acc) {
  int32_t u[kBlock];
  for (int64_t j = 0; j < nt; ++j)
    for (int64_t i = 0; i < mt; ++i) {
      float s = 0.0f;
      const int64_t m = m0 + i;
      for (int64_t b = 0; b < a.nb; ++b) {
        unpack_block(qs + j * a.row_bytes, a.bits, b, u);
        const int8_t* q = qx.q.data() + m * a.Kp + b * kBlock;
        int32_t dot = 0;
        for (int k = 0; k < kBlock; ++k) dot += u[k] * int32_t{q[k]};
        const float dx = qx.d[m * a.nb + b];
        s += static_cast<float>(d[j * a.nb + b]) * dx * static_cast<float>(dot);
        if (a.has_min)
          s += static_cast<float>(mn[j * a.nb + b]) * dx * static_cast<float>(qx.sum[m * a.nb + b]);
      }
      acc[j * kTileM + i] = s;
    }
}

#ifdef SPLITSERVE_X86
// The 32 unsigned weights of block b of a row, in column order, as bytes.
template <int BITS>
SPLITSERVE_AVX2 inline __m256i load_block_u8(const uint8_t* row, int64_t b) {
  if constexpr (BITS == 8) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b * kBlock));
  } else {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b * 16));
    const __m128i low = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), low), _mm_and_si128(raw, low));
  }
}


// VNNI: two blocks per 512-bit step. vpdpbusd multiplies unsigned by signed bytes and sums
// each 4 into an int32 lane: 4-bit weights are unsigned already; signed 8-bit ones go in as
// s ^ 0x80 = s + 128, and 128 * sum(q) (one more vpdpbusd per input, shared by the rows of the
// tile) comes off again, exactly. The 4-bit bytes of blocks b, b+1 (32) split into low nibbles
// (columns 0-15 of b, then of b+1) and high nibbles (columns 16-31 of each): x is quantized in
// that same order (`pair_order`), so lanes 0-3 and 8-11 belong to b, 4-7 and 12-15 to b+1. The
// int32 lanes are converted and scaled by d_w * d_x per lane, then summed across blocks in fp32;
// the min term is one dot product over the blocks at the end.
SPLITSERVE_VNNI inline __m512 pair_scales(const uint16_t* d, int bits) {
  // [d0 x4, d1 x4, d0 x4, d1 x4] (4-bit lane order) or [d0 x8, d1 x8] (8-bit)
  const __m512 two = _mm512_castps128_ps512(
      _mm_cvtph_ps(_mm_cvtsi32_si128(*reinterpret_cast<const int32_t*>(d))));
  const __m512i idx = bits == 4 ? _mm512_set_epi32(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0)
                                : _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  return _mm512_permutexvar_ps(idx, two);
}

template <int BITS>
SPLITSERVE_VNNI inline __m512i load_pair_vnni(const uint8_t* row, int64_t pair) {
  if constexpr (BITS == 8) {
    return _mm512_xor_si512(_mm512_loadu_si512(row + pair * 64),
                            _mm512_set1_epi8(static_cast<char>(0x80)));
  } else {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + pair * 32));
    const __m256i low = _mm256_set1_epi8(0x0F);
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(raw, low)),
                              _mm256_and_si256(_mm256_srli_epi16(raw, 4), low), 1);
  }
}

SPLITSERVE_VNNI inline float min_term(const uint16_t* m, const float* sx, int64_t nb) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; b += 16) {
    const __mmask16 k = nb - b >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (nb - b)) - 1);
    const __m512 mv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, m + b));
    acc = _mm512_fmadd_ps(mv, _mm512_maskz_loadu_ps(k, sx + b), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

template <int BITS, int NT, int MT>
SPLITSERVE_VNNI void block_tile_vnni(const QuantizedX& qx, int64_t m0, const uint8_t* qs,
                                     const c10::Half* d, const c10::Half* mn, const BlockArgs& a,
                                     float* acc) {
  __m512 fa[NT][MT];
  for (int j = 0; j < NT; ++j)
    for (int i = 0; i < MT; ++i) fa[j][i] = _mm512_setzero_ps();
  const uint16_t* dh = reinterpret_cast<const uint16_t*>(d);
  const uint16_t* mh = reinterpret_cast<const uint16_t*>(mn);
  const int8_t* xq = BITS == 4 ? qx.qpair.data() : qx.q.data();
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const int64_t pairs = a.nb / 2;
  for (int64_t p = 0; p < pairs; ++p) {
    __m512i wv[NT];
    __m512 dw[NT];
    for (int j = 0; j < NT; ++j) {
      wv[j] = load_pair_vnni<BITS>(qs + j * a.row_bytes, p);
      dw[j] = pair_scales(dh + j * a.nb + 2 * p, BITS);
    }
    for (int i = 0; i < MT; ++i) {
      const int64_t m = m0 + i;
      const __m512i xv = _mm512_loadu_si512(xq + m * a.Kp + p * 64);
      const __m512 dx = _mm512_loadu_ps(qx.dlanes.data() + (m * pairs + p) * 16);
      __m512i corr = _mm512_setzero_si512();
      if constexpr (BITS == 8) corr = _mm512_dpbusd_epi32(corr, flip, xv);
      for (int j = 0; j < NT; ++j) {
        __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv[j], xv);
        if constexpr (BITS == 8) dot = _mm512_sub_epi32(dot, corr);
        fa[j][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dw[j], dx), fa[j][i]);
      }
    }
  }
  for (int j = 0; j < NT; ++j)
    for (int i = 0; i < MT; ++i) {
      float s = _mm512_reduce_add_ps(fa[j][i]);
      if (a.has_min) s += min_term(mh + j * a.nb, qx.sx.data() + (m0 + i) * a.nb, a.nb);
      acc[j * kTileM + i] = s;
    }
}

// Without VNNI (AVX2, and AVX-512 CPUs without it): the weights widened to int16 and
// vpmaddwd against the activations' int16 copy; 256-bit either way (the block is 32 wide).
template <int BITS, int NT, int MT>
SPLITSERVE_AVX2 void block_tile_avx2(const QuantizedX& qx, int64_t m0, const uint8_t* qs,
                                     const c10::Half* d, const c10::Half* mn, const BlockArgs& a,
                                     float* acc) {
  __m256 fa[NT][MT];
  float ma[NT][MT];
  for (int j = 0; j < NT; ++j)
    for (int i = 0; i < MT; ++i) fa[j][i] = _mm256_setzero_ps(), ma[j][i] = 0.0f;
  const uint16_t* dh = reinterpret_cast<const uint16_t*>(d);
  const uint16_t* mh = reinterpret_cast<const uint16_t*>(mn);
  for (int64_t b = 0; b < a.nb; ++b) {
    __m256i wlo[NT], whi[NT];
    float dw[NT], mw[NT];
    for (int j = 0; j < NT; ++j) {
      const __m256i u = load_block_u8<BITS>(qs + j * a.row_bytes, b);
      if constexpr (BITS == 8) {  // signed bytes
        wlo[j] = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(u));
        whi[j] = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(u, 1));
      } else {
        wlo[j] = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(u));
        whi[j] = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(u, 1));
      }
      dw[j] = _cvtsh_ss(dh[j * a.nb + b]);
      mw[j] = a.has_min ? _cvtsh_ss(mh[j * a.nb + b]) : 0.0f;
    }
    for (int i = 0; i < MT; ++i) {
      const int64_t m = m0 + i;
      const int16_t* q = qx.q16.data() + m * a.Kp + b * kBlock;
      const __m256i xlo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
      const __m256i xhi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 16));
      const float dx = qx.d[m * a.nb + b];
      const float sx = dx * static_cast<float>(qx.sum[m * a.nb + b]);
      for (int j = 0; j < NT; ++j) {
        const __m256i dot =
            _mm256_add_epi32(_mm256_madd_epi16(wlo[j], xlo), _mm256_madd_epi16(whi[j], xhi));
        fa[j][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(dw[j] * dx), fa[j][i]);
        ma[j][i] += mw[j] * sx;
      }
    }
  }
  for (int j = 0; j < NT; ++j)
    for (int i = 0; i < MT; ++i) acc[j * kTileM + i] = hsum256(fa[j][i]) + ma[j][i];
}

template <int NT, int MT>
void block_tile_vnni4(const QuantizedX& qx, int64_t m0, const uint8_t* qs, const c10::Half* d,
                      const c10::Half* mn, const BlockArgs& a, float* acc) {
  if (a.bits == 4)
    block_tile_vnni<4, NT, MT>(qx, m0, qs, d, mn, a, acc);
  else
    block_tile_vnni<8, NT, MT>(qx, m0, qs, d, mn, a, acc);
}

template <int NT, int MT>
void block_tile_avx2_any(const QuantizedX& qx, int64_t m0, const uint8_t* qs, const c10::Half* d,
                         const c10::Half* mn, const BlockArgs& a, float* acc) {
  if (a.bits == 4)
    block_tile_avx2<4, NT, MT>(qx, m0, qs, d, mn, a, acc);
  else
    block_tile_avx2<8, NT, MT>(qx, m0, qs, d, mn, a, acc);
}
#endif

at::Tensor block_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d,
                        const at::Tensor& mn, int64_t bits, int64_t impl) {
  TORCH_CHECK(bits == 4 || bits == 8, "block_linear: bits must be 4 or 8, got ", bits);
  check_weight("block_linear", x, qs, at::kByte, 8 / bits);
  const int64_t M = x.size(0), N = qs.size(0);
  BlockArgs a{qs.size(1) * 8 / bits, 0, qs.size(1), static_cast<int>(bits), mn.numel() > 0};
  a.nb = a.Kp / kBlock;
  check_rows("block_linear", d, N * a.nb, at::kHalf, "d");
  TORCH_CHECK(bits == 8 || a.has_min, "block_linear: 4-bit blocks need their mins m");
  if (a.has_min) check_rows("block_linear", mn, N * a.nb, at::kHalf, "m");
  const int64_t isa = pick_isa("block_linear", impl);
  QuantizedX qx = quantize_x(x, a.Kp, kBlock, isa == kAvx2 || isa == kAvx512);
  if (isa == kVnni) with_block_lanes(qx, M, a.Kp, a.bits);
  auto out = at::empty({M, N}, x.options().dtype(at::kFloat));
  const uint8_t* wp = qs.data_ptr<uint8_t>();
  const c10::Half* dp = d.data_ptr<c10::Half>();
  const c10::Half* mp = a.has_min ? mn.data_ptr<c10::Half>() : dp;  // dp: never read
  float* yp = out.data_ptr<float>();
  const int64_t tiles = (N + kTileN - 1) / kTileN;
  for (int64_t s0 = 0; s0 < M; s0 += kSlabM) {
    const int64_t s1 = std::min(M, s0 + kSlabM);
    const int64_t work = N * a.row_bytes * std::max<int64_t>(1, (s1 - s0) / kTileM);
    for_tiles(tiles, work, [&](int64_t t0, int64_t t1) {
      float acc[kTileN * kTileM];
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = t * kTileN, nt = std::min(kTileN, N - n0);
        const uint8_t* ws = wp + n0 * a.row_bytes;
        const c10::Half* ds = dp + n0 * a.nb;
        const c10::Half* ms = mp + n0 * a.nb;
        for (int64_t m0 = s0; m0 < s1; m0 += kTileM) {
          const int64_t mt = std::min(kTileM, s1 - m0);
#ifdef SPLITSERVE_X86
#define SPLITSERVE_ROW_ARGS(jj, qx_, m_, w_, d_, mn_, a_, acc_)                        \
  qx_, m_, (w_) + (jj) * (a_).row_bytes, (d_) + (jj) * (a_).nb, (mn_) + (jj) * (a_).nb, a_, \
      (acc_) + (jj) * kTileM
          if (isa == kVnni) {
            SPLITSERVE_TILE_DISPATCH(block_tile_vnni4, nt, mt, qx, m0, ws, ds, ms, a, acc);
          } else if (isa >= kAvx2) {
            SPLITSERVE_TILE_DISPATCH(block_tile_avx2_any, nt, mt, qx, m0, ws, ds, ms, a, acc);
#undef SPLITSERVE_ROW_ARGS
          } else
#endif
          {
            block_tile_scalar(qx, m0, ws, ds, ms, a, nt, mt, acc);
          }
          for (int64_t j = 0; j < nt; ++j)
            for (int64_t i = 0; i < mt; ++i) yp[(m0 + i) * N + n0 + j] = acc[j * kTileM + i];
        }
      }
    });
  }
  return finish(out, x);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(splitserve_cpu, m) {
  m.def("quant_impls() -> int[]", &quant_impls);
  m.def("int8_linear(Tensor x, Tensor weight, Tensor scale, int impl=-1) -> Tensor");
  m.def("w8a8_linear(Tensor x, Tensor weight, Tensor scale, Tensor wsum, int impl=-1) -> Tensor");
  m.def(
      "block_linear(Tensor x, Tensor qs, Tensor d, Tensor m, int bits, int impl=-1) -> Tensor");
}

TORCH_LIBRARY_IMPL(splitserve_cpu, CPU, m) {
  m.impl("int8_linear", int8_linear);
  m.impl("w8a8_linear", w8a8_linear);
  m.impl("block_linear", block_linear);
}

}  // namespace splitserve
