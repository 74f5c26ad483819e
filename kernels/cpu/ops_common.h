// What several CPU ops share: when a call opens a parallel region, and x's rows copied to fp32.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace splitserve {

// Runs f(begin, end) over [0, n), split across ATen's threads only when `work` (bytes or
// elements, the caller's measure) reaches `threshold`: a parallel region costs a scheduler time
// slice whenever another process holds one of the cores, so small (decode-sized) calls stay on
// the calling thread. How the range is split never changes what each index computes.
template <typename F>
inline void maybe_parallel(int64_t n, int64_t work, int64_t threshold, const F& f) {
  if (work < threshold || at::get_num_threads() == 1) {
    f(0, n);
    return;
  }
  at::parallel_for(0, n, 1, f);
}

// x[M, K] (float or bf16, rows strided, columns contiguous) -> fp32 [M, Kp], columns K..Kp zero.
// A contiguous float32 x with Kp == K is returned as it is.
inline at::Tensor to_padded_float(const at::Tensor& x, int64_t Kp) {
  const int64_t M = x.size(0), K = x.size(1);
  if (x.scalar_type() == at::kFloat && Kp == K && x.is_contiguous()) return x;
  auto out = at::empty({M, Kp}, x.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    float* row = o + m * Kp;
    if (x.scalar_type() == at::kFloat) {
      std::memcpy(row, x.data_ptr<float>() + m * x.stride(0), K * sizeof(float));
    } else {
      const c10::BFloat16* src = x.data_ptr<c10::BFloat16>() + m * x.stride(0);
      for (int64_t k = 0; k < K; ++k) row[k] = static_cast<float>(src[k]);
    }
    std::fill(row + K, row + Kp, 0.0f);
  }
  return out;
}

}  // namespace splitserve
