// Linear layers with float32 or bf16 weights at small row counts (decode batches), for the CPU:
// y[M, N] = x[M, K] . W[N, K]^T (+ bias), W read in place from the nn.Linear weight.
//
// Why: at 2-32 rows a decode step's matmuls are bound by reading the weights once, but MKL's
// sgemm at 8 rows ran at 4-6 GB/s on the 2-core Xeon where one row streams at 11 GB/s
// (bench/quant_linear.py --dense), and torch's bf16 matmul on a CPU without AVX512-BF16 is
// slower still. Here each weight row is loaded once per 4 input rows, widened to fp32 in registers
// (bf16: a 16-bit shift) and FMA'd against x: fp32 products and sums, as oneDNN's bf16 GEMM and
// MKL's sgemm compute them, in another order. The result is fp32, rounded to x's dtype once.
//
// Tiles: 4 weight rows x 4 input rows of 16-lane accumulators, the next tile's weight rows
// prefetched, the 16 sums folded by one transposing add tree; threads split the weight rows. A
// row's result is the same whatever else is in the batch.
// Instruction set at run time (`impl`): 0 scalar, 1 AVX-512F (F/BW/DQ/VL).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "ops_common.h"
#include "simd.h"

namespace splitserve {
namespace {

constexpr int64_t kTileN = 4;  // weight rows per register tile
constexpr int64_t kTileM = 4;  // input rows per register tile
// Below this many weight bytes a call runs on the calling thread (see quant_linear.cpp).
constexpr int64_t kParallelBytes = 96 << 10;

inline float widen(float v) { return v; }
inline float widen(c10::BFloat16 v) { return static_cast<float>(v); }

template <typename W>
void tile_scalar(const float* x, int64_t K, const W* w, int64_t ldw, int64_t nt, int64_t mt,
                 float* acc /* [kTileN][kTileM] */) {
  for (int64_t j = 0; j < nt; ++j)
    for (int64_t i = 0; i < mt; ++i) {
      float s = 0.0f;
      for (int64_t k = 0; k < K; ++k) s += x[i * K + k] * widen(w[j * ldw + k]);
      acc[j * kTileM + i] = s;
    }
}

#ifdef SPLITSERVE_X86
SPLITSERVE_AVX512 inline __m512 load_w(const float* w, __mmask16 m) {
  return _mm512_maskz_loadu_ps(m, w);
}
SPLITSERVE_AVX512 inline __m512 load_w(const c10::BFloat16* w, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, w);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
SPLITSERVE_AVX512 inline __m512 load_w(const float* w) { return _mm512_loadu_ps(w); }
SPLITSERVE_AVX512 inline __m512 load_w(const c10::BFloat16* w) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// NT weight rows (stride ldw) times MT rows of x ([MT, K], contiguous), K any. `next`: the
// next tile's first weight row, prefetched as this one streams (nullptr: none).
template <typename W, int NT, int MT>
SPLITSERVE_AVX512 void tile_avx512(const float* x, int64_t K, const W* w, int64_t ldw,
                                   const W* next, float* acc) {
  __m512 a[NT][MT];
  for (int j = 0; j < NT; ++j)
    for (int i = 0; i < MT; ++i) a[j][i] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    if (next != nullptr && (k * sizeof(W)) % 64 == 0)
      for (int j = 0; j < NT; ++j)
        _mm_prefetch(reinterpret_cast<const char*>(next + j * ldw + k), _MM_HINT_T0);
    __m512 wv[NT];
    for (int j = 0; j < NT; ++j) wv[j] = load_w(w + j * ldw + k);
    for (int i = 0; i < MT; ++i) {
      const __m512 xv = _mm512_loadu_ps(x + i * K + k);
      for (int j = 0; j < NT; ++j) a[j][i] = _mm512_fmadd_ps(xv, wv[j], a[j][i]);
    }
  }
  if (k < K) {
    const __mmask16 m = static_cast<__mmask16>((1u << (K - k)) - 1);
    __m512 wv[NT];
    for (int j = 0; j < NT; ++j) wv[j] = load_w(w + j * ldw + k, m);
    for (int i = 0; i < MT; ++i) {
      const __m512 xv = _mm512_maskz_loadu_ps(m, x + i * K + k);
      for (int j = 0; j < NT; ++j) a[j][i] = _mm512_fmadd_ps(xv, wv[j], a[j][i]);
    }
  }
  // One transposing add tree for the tile's sums (unused slots zero). Each vector's lanes are
  // summed in the same order wherever it sits, so a row's result does not depend on the tile
  // (batch) it was computed in.
  __m512 all[kTileN * kTileM];
  for (int idx = 0; idx < kTileN * kTileM; ++idx) all[idx] = _mm512_setzero_ps();
  for (int j = 0; j < NT; ++j)
    for (int i = 0; i < MT; ++i) all[j * kTileM + i] = a[j][i];
  float sums[kTileN * kTileM];
  _mm512_storeu_ps(sums, simd::sum16x16(all));
  for (int j = 0; j < NT; ++j)
    for (int i = 0; i < MT; ++i) acc[j * kTileM + i] = sums[j * kTileM + i];
}

template <typename W, int NT>
SPLITSERVE_AVX512 void tile_avx512_rows(const float* x, int64_t K, const W* w, int64_t ldw,
                                        int64_t mt, const W* next, float* acc) {
  switch (mt) {
    case 1: tile_avx512<W, NT, 1>(x, K, w, ldw, next, acc); break;
    case 2: tile_avx512<W, NT, 2>(x, K, w, ldw, next, acc); break;
    case 3: tile_avx512<W, NT, 3>(x, K, w, ldw, next, acc); break;
    default: tile_avx512<W, NT, 4>(x, K, w, ldw, next, acc); break;
  }
}
#endif

bool cpu_has_vector() {
#ifdef SPLITSERVE_X86
  return simd::cpu_has_avx512();
#else
  return false;
#endif
}

std::vector<int64_t> dense_impls() {
  std::vector<int64_t> impls{0};
  if (cpu_has_vector()) impls.push_back(1);
  return impls;
}

template <typename W>
at::Tensor run(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
               bool vec) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), ldw = weight.stride(0);
  const at::Tensor xf = to_padded_float(x, K);
  auto out = at::empty({M, N}, x.options().dtype(at::kFloat));
  const float* xp = xf.data_ptr<float>();
  const W* wp = weight.data_ptr<W>();
  at::Tensor bf;
  if (bias.has_value() && bias->defined()) bf = bias->to(at::kFloat).contiguous();
  const float* bp = bf.defined() ? bf.data_ptr<float>() : nullptr;
  float* yp = out.data_ptr<float>();
  const int64_t tiles = (N + kTileN - 1) / kTileN;
  auto body = [&](int64_t t0, int64_t t1) {
    float acc[kTileN * kTileM];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * kTileN, nt = std::min(kTileN, N - n0);
      const W* ws = wp + n0 * ldw;
      for (int64_t m0 = 0; m0 < M; m0 += kTileM) {
        const int64_t mt = std::min(kTileM, M - m0);
        const float* xs = xp + m0 * K;
#ifdef SPLITSERVE_X86
        if (vec) {
          // The first pass over this tile's rows reads them from memory: fetch the next tile's.
          const W* next = m0 == 0 && n0 + 2 * kTileN <= N ? ws + kTileN * ldw : nullptr;
          if (nt == kTileN) {
            tile_avx512_rows<W, kTileN>(xs, K, ws, ldw, mt, next, acc);
          } else {
            for (int64_t j = 0; j < nt; ++j)
              tile_avx512_rows<W, 1>(xs, K, ws + j * ldw, ldw, mt, nullptr, acc + j * kTileM);
          }
        } else
#endif
        {
          tile_scalar(xs, K, ws, ldw, nt, mt, acc);
        }
        for (int64_t j = 0; j < nt; ++j) {
          const float b = bp ? bp[n0 + j] : 0.0f;
          for (int64_t i = 0; i < mt; ++i) yp[(m0 + i) * N + n0 + j] = acc[j * kTileM + i] + b;
        }
      }
    }
  };
  maybe_parallel(tiles, N * K * static_cast<int64_t>(sizeof(W)), kParallelBytes, body);
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

at::Tensor dense_linear(const at::Tensor& x, const at::Tensor& weight,
                        const c10::optional<at::Tensor>& bias, int64_t impl) {
  const char* op = "dense_linear";
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, op, ": x must be [M, K] with contiguous rows");
  TORCH_CHECK(weight.dim() == 2 && weight.stride(1) == 1, op,
              ": weight must be [N, K] with contiguous rows");
  TORCH_CHECK(x.size(1) == weight.size(1), op, ": x has ", x.size(1), " columns, the weight ",
              weight.size(1));
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              ": x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16, op,
              ": weight must be float32 or bfloat16, got ", weight.scalar_type());
  if (bias.has_value() && bias->defined())
    TORCH_CHECK(bias->dim() == 1 && bias->numel() == weight.size(0), op, ": bias must be [N]");
  TORCH_CHECK(impl <= 0 || (impl == 1 && cpu_has_vector()), op, ": impl ", impl,
              " is not available on this CPU");
  const bool vec = impl < 0 ? cpu_has_vector() : impl == 1;
  if (weight.scalar_type() == at::kFloat) return run<float>(x, weight, bias, vec);
  return run<c10::BFloat16>(x, weight, bias, vec);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(splitserve_cpu, m) {
  m.def("dense_impls() -> int[]", &dense_impls);
  m.def("dense_linear(Tensor x, Tensor weight, Tensor? bias=None, int impl=-1) -> Tensor");
}

TORCH_LIBRARY_IMPL(splitserve_cpu, CPU, m) { m.impl("dense_linear", dense_linear); }

}  // namespace splitserve
