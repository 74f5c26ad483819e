// The decoder's small elementwise steps, one op each instead of a handful of torch ops: at
// batch 1 each torch op costs more in dispatch and allocation than in arithmetic (bench/
// profile_step.py --breakdown). Each computes what HF's eager Llama computes, rounding to the
// model dtype where HF does (bf16: after each multiply and add; float32: no rounding at all), so
// the engine's float32 output stays token-identical to transformers'.
//
// - rms_norm / add_rms_norm: HF's LlamaRMSNorm (mean of squares in fp32, times rsqrt, cast,
//   times the weight); add_rms_norm first adds the sublayer output to the residual stream in
//   place (HF: `hidden = residual + hidden`, rounded to the dtype) and normalises that.
// - silu_mul: `silu(gate) * up` of a fused [rows, 2 * I] gate/up projection.
// - rotary_: `x * cos + rotate_half(x) * sin` in place on [T, H, D] heads (q and k together).
// - write_kv: the step's new K and V rows into their cache slots (slot = block * bs + offset).
//
// The loops are plain C++ compiled in several clones (AVX-512, AVX2, baseline) that the loader
// picks by CPU at run time (GCC's target_clones), so each vectorises for what the CPU has.
// Prompt-sized norm and SiLU calls split their rows across ATen's threads (`maybe_parallel`).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "ops_common.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPLITSERVE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SPLITSERVE_CLONES
#endif

namespace splitserve {
namespace {

template <typename T>
inline float f32(T x) {
  return static_cast<float>(x);
}

// Round a float to T and back (identity for float).
template <typename T>
inline float rnd(float x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    return static_cast<float>(static_cast<T>(x));
  }
}

template <typename T>
SPLITSERVE_CLONES void norm_rows(const T* x, int64_t x_stride, T* residual, int64_t r_stride,
                                 const T* w, T* out, int64_t rows, int64_t H, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * x_stride;
    T* o = out + r * H;
    const T* src = xr;
    if (residual != nullptr) {  // residual += x, rounded as HF's add in the dtype
      T* res = residual + r * r_stride;
      for (int64_t i = 0; i < H; ++i) res[i] = static_cast<T>(f32(res[i]) + f32(xr[i]));
      src = res;
    }
    float ss = 0.0f;
    for (int64_t i = 0; i < H; ++i) ss += f32(src[i]) * f32(src[i]);
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(H) + eps);
    for (int64_t i = 0; i < H; ++i) o[i] = static_cast<T>(f32(w[i]) * rnd<T>(f32(src[i]) * inv));
  }
}

template <typename T>
SPLITSERVE_CLONES void silu_mul_rows(const T* gu, int64_t stride, T* out, int64_t rows,
                                     int64_t I) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* g = gu + r * stride;
    const T* u = g + I;
    T* o = out + r * I;
    for (int64_t i = 0; i < I; ++i) {
      const float a = f32(g[i]);
      o[i] = static_cast<T>(rnd<T>(a / (1.0f + std::exp(-a))) * f32(u[i]));
    }
  }
}

template <typename T>
SPLITSERVE_CLONES void rotary_rows(T* x, int64_t t_stride, int64_t h_stride, const T* cos,
                                   const T* sin, int64_t T_, int64_t H, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t t = 0; t < T_; ++t) {
    const T* c = cos + t * D;
    const T* s = sin + t * D;
    for (int64_t h = 0; h < H; ++h) {
      T* v = x + t * t_stride + h * h_stride;
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = f32(v[i]), x2 = f32(v[i + half]);
        const float lo = rnd<T>(rnd<T>(x1 * f32(c[i])) + rnd<T>(-x2 * f32(s[i])));
        const float hi = rnd<T>(rnd<T>(x2 * f32(c[i + half])) + rnd<T>(x1 * f32(s[i + half])));
        v[i] = static_cast<T>(lo);
        v[i + half] = static_cast<T>(hi);
      }
    }
  }
}

// Rows split across ATen's threads from this many elements a call (prompt chunks; see
// maybe_parallel). Each row is computed the same either way.
constexpr int64_t kParallelElements = 1 << 16;

void check_cpu(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, op, ": ", name,
              " must be float32 or bfloat16, got ", t.scalar_type());
}

// norm_rows over x's rows (split across threads for prompt-sized calls).
template <typename T>
void norm_call(const at::Tensor& x, const at::Tensor* residual, const at::Tensor& weight,
               at::Tensor& out, double eps) {
  const int64_t rows = x.size(0), H = x.size(1), xs = x.stride(0);
  const int64_t rs = residual ? residual->stride(0) : 0;
  const T* xp = x.data_ptr<T>();
  T* res = residual ? residual->data_ptr<T>() : nullptr;
  T* op = out.data_ptr<T>();
  maybe_parallel(rows, rows * H, kParallelElements, [&](int64_t r0, int64_t r1) {
    norm_rows<T>(xp + r0 * xs, xs, res ? res + r0 * rs : nullptr, rs, weight.data_ptr<T>(),
                 op + r0 * H, r1 - r0, H, static_cast<float>(eps));
  });
}

at::Tensor norm_impl(const char* op, const at::Tensor& x, const at::Tensor* residual,
                     const at::Tensor& weight, double eps) {
  check_cpu(op, x, "x");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, op, ": x must be [rows, H] with contiguous rows");
  const int64_t rows = x.size(0), H = x.size(1);
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == H &&
                  weight.scalar_type() == x.scalar_type(),
              op, ": weight must be a contiguous [H] tensor of x's dtype");
  if (residual != nullptr) {
    TORCH_CHECK(residual->dim() == 2 && residual->size(0) == rows && residual->size(1) == H &&
                    residual->stride(1) == 1 && residual->scalar_type() == x.scalar_type(),
                op, ": residual must be [rows, H] like x");
  }
  auto out = at::empty({rows, H}, x.options());
  if (x.scalar_type() == at::kFloat) {
    norm_call<float>(x, residual, weight, out, eps);
  } else {
    norm_call<c10::BFloat16>(x, residual, weight, out, eps);
  }
  return out;
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return norm_impl("rms_norm", x, nullptr, weight, eps);
}

at::Tensor add_rms_norm(const at::Tensor& x, at::Tensor& residual, const at::Tensor& weight,
                        double eps) {
  return norm_impl("add_rms_norm", x, &residual, weight, eps);
}

// silu_mul_rows over gate_up's rows (split across threads for prompt-sized calls).
template <typename T>
void silu_mul_call(const at::Tensor& gate_up, at::Tensor& out) {
  const int64_t rows = gate_up.size(0), I = out.size(1), gs = gate_up.stride(0);
  const T* gp = gate_up.data_ptr<T>();
  T* op = out.data_ptr<T>();
  maybe_parallel(rows, rows * I, kParallelElements, [&](int64_t r0, int64_t r1) {
    silu_mul_rows<T>(gp + r0 * gs, gs, op + r0 * I, r1 - r0, I);
  });
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_cpu("silu_mul", gate_up, "gate_up");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.stride(1) == 1 && gate_up.size(1) % 2 == 0,
              "silu_mul: gate_up must be [rows, 2 * I] with contiguous rows");
  const int64_t rows = gate_up.size(0), I = gate_up.size(1) / 2;
  auto out = at::empty({rows, I}, gate_up.options());
  if (gate_up.scalar_type() == at::kFloat) {
    silu_mul_call<float>(gate_up, out);
  } else {
    silu_mul_call<c10::BFloat16>(gate_up, out);
  }
  return out;
}

void rotary_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  check_cpu("rotary_", x, "x");
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.size(2) % 2 == 0,
              "rotary_: x must be [T, H, D] with contiguous heads and even D");
  const int64_t T_ = x.size(0), H = x.size(1), D = x.size(2);
  for (const at::Tensor* t : {&cos, &sin}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) >= T_ && t->size(1) == D && t->is_contiguous() &&
                    t->scalar_type() == x.scalar_type(),
                "rotary_: cos and sin must be contiguous [>= T, D] tensors of x's dtype");
  }
  if (x.scalar_type() == at::kFloat) {
    rotary_rows<float>(x.data_ptr<float>(), x.stride(0), x.stride(1), cos.data_ptr<float>(),
                       sin.data_ptr<float>(), T_, H, D);
  } else {
    using BF = c10::BFloat16;
    rotary_rows<BF>(x.data_ptr<BF>(), x.stride(0), x.stride(1), cos.data_ptr<BF>(),
                    sin.data_ptr<BF>(), T_, H, D);
  }
}

void write_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
              const at::Tensor& slot_mapping) {
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && k.stride(2) == 1 && v.stride(2) == 1 &&
                  k.stride(1) == k.size(2) && v.stride(1) == v.size(2),
              "write_kv: k and v must be [T, Hkv, D] with each token's heads contiguous");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() &&
                  k_cache.size(2) == k.size(1) && k_cache.size(3) == k.size(2) &&
                  k_cache.stride(1) == k.size(1) * k.size(2) && k_cache.stride(2) == k.size(2) &&
                  k_cache.stride(3) == 1 && v_cache.strides() == k_cache.strides(),
              "write_kv: caches must be [blocks, block_size, Hkv, D] views, contiguous per block");
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == k.scalar_type() &&
                  v_cache.scalar_type() == k.scalar_type(),
              "write_kv: k, v and the caches must share one dtype");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous() &&
                  slot_mapping.numel() == k.size(0),
              "write_kv: slot_mapping must be contiguous int64 [T]");
  const int64_t T_ = k.size(0), bs = k_cache.size(1), nblocks = k_cache.size(0);
  const int64_t row_bytes = k.size(1) * k.size(2) * k.element_size();
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  auto* kc = static_cast<char*>(k_cache.data_ptr());
  auto* vc = static_cast<char*>(v_cache.data_ptr());
  const auto* kp = static_cast<const char*>(k.data_ptr());
  const auto* vp = static_cast<const char*>(v.data_ptr());
  const int64_t es = k.element_size();
  for (int64_t t = 0; t < T_; ++t)  // all checked before any is written
    TORCH_CHECK(slots[t] / bs < nblocks, "write_kv: slot ", slots[t], " is past the cache");
  for (int64_t t = 0; t < T_; ++t) {
    const int64_t slot = slots[t];
    if (slot < 0) continue;  // padding
    const int64_t block = slot / bs, off = slot % bs;
    const int64_t dst = (block * k_cache.stride(0) + off * k_cache.stride(1)) * es;
    std::memcpy(kc + dst, kp + t * k.stride(0) * es, row_bytes);
    std::memcpy(vc + dst, vp + t * v.stride(0) * es, row_bytes);
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(splitserve_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor(a!) residual, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("rotary_(Tensor(a!) x, Tensor cos, Tensor sin) -> ()");
  m.def(
      "write_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) "
      "-> ()");
}

TORCH_LIBRARY_IMPL(splitserve_cpu, CPU, m) {
  m.impl("rms_norm", rms_norm);
  m.impl("add_rms_norm", add_rms_norm);
  m.impl("silu_mul", silu_mul);
  m.impl("rotary_", rotary_);
  m.impl("write_kv", write_kv);
}

}  // namespace splitserve
