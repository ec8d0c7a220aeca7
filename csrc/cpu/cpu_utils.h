// Helpers shared by the C++ CPU kernels (csrc/cpu/*.cpp); the contract is csrc/KERNELS.md.
//
// Vector loops are written so that g++ -O3 -fopenmp vectorises them: `#pragma omp simd` over
// contiguous rows (the reduction clause lets the compiler reassociate the fp sums), several
// rows per pass so that independent accumulators hide the add latency. Hot entry points are
// compiled twice (AVX2+FMA and baseline x86-64) and picked at load time, see DCD_CPU_CLONES.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/rng.h"

// Function multiversioning: an AVX2/FMA clone of the hot loops, chosen at load time on CPUs
// that have it, and the baseline build everywhere else. Helpers called from a cloned function
// are DCD_INLINE so that their loops are compiled for the clone's target.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(__CUDACC__)
#define DCD_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define DCD_CPU_CLONES
#endif
#if defined(__GNUC__)
#define DCD_INLINE inline __attribute__((always_inline))
#define DCD_PREFETCH(p) __builtin_prefetch((p), 0, 3)
#else
#define DCD_INLINE inline
#define DCD_PREFETCH(p) ((void)(p))
#endif

namespace dcdkernels {
namespace cpu {

// Tiles of the dense kernels (dense_contrast, supcon_contrast): anchors per tile, and keys per
// tile so that a converted key tile stays around 1 MiB of fp32 (the size of L2).
constexpr int64_t kAnchorTile = 256;
inline int64_t key_tile(int64_t D) {
  return std::max<int64_t>(16, std::min<int64_t>(1024, (int64_t(1) << 18) / std::max<int64_t>(D, 1)));
}

// Accumulation dtype of an op: fp64 when any input is fp64 (so gradcheck runs), else fp32.
inline at::ScalarType accumulation_dtype(std::initializer_list<at::Tensor> tensors) {
  for (const auto& t : tensors) {
    if (t.scalar_type() == at::kDouble) return at::kDouble;
  }
  return at::kFloat;
}

inline void check_float_matrix(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D, got shape ", t.sizes());
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, name,
              " must be float32, float64, float16 or bfloat16, got ", dt);
}

// Anchors (R, D) and keys (M, D) of the dense ops: float matrices of one D.
inline void check_anchors_keys(const at::Tensor& anchors, const char* name, const at::Tensor& keys) {
  check_float_matrix(anchors, name);
  check_float_matrix(keys, "keys");
  TORCH_CHECK(keys.size(1) == anchors.size(1), "keys have D = ", keys.size(1),
              " but the anchors have D = ", anchors.size(1));
}

// A bank is read through its row stride; its rows must be contiguous.
inline void check_bank(const at::Tensor& bank, const char* name, int64_t D) {
  check_float_matrix(bank, name);
  TORCH_CHECK(bank.size(1) == D, name, " has D = ", bank.size(1), " but the anchors have D = ", D);
  TORCH_CHECK(bank.size(1) <= 1 || bank.stride(1) == 1, name, " rows must be contiguous (stride(1) == 1), got strides ",
              bank.strides());
}

// Value of a 0-d (or one-element) scalar tensor; on CPU reading it costs nothing.
inline double scalar_value(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.numel() == 1, name, " must hold one value, got shape ", t.sizes());
  return t.item<double>();
}

// Every entry of an int64 index tensor lies in [0, n_rows): checked before any row is read.
inline void check_index_range(const at::Tensor& index, int64_t n_rows, const char* name) {
  TORCH_CHECK(index.device().is_cpu(), name, " must be a CPU tensor, got ", index.device());
  TORCH_CHECK(index.scalar_type() == at::kLong, name, " must be int64, got ", index.scalar_type());
  TORCH_CHECK(index.is_contiguous(), name, " must be contiguous");
  const int64_t* p = index.data_ptr<int64_t>();
  const int64_t n = index.numel();
  int64_t lo = 0, hi = 0;
  if (n > 0) lo = hi = p[0];
  for (int64_t i = 1; i < n; ++i) {
    lo = std::min(lo, p[i]);
    hi = std::max(hi, p[i]);
  }
  TORCH_CHECK(n == 0 || (lo >= 0 && hi < n_rows), name, " has entries out of range [0, ", n_rows, "): min ", lo,
              ", max ", hi);
}

// ---------------------------------------------------------------------------------------------
// Vector kernels on rows of the accumulation type A (float or double).

// <x, y>
template <typename A>
DCD_INLINE A dot(const A* __restrict x, const A* __restrict y, int64_t n) {
  A s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += x[i] * y[i];
  return s;
}

// out[j] = <q, rows[j]> for j < n. Four rows per pass: q is loaded once for four independent sums.
template <typename A>
DCD_INLINE void dot_rows(const A* __restrict q, const A* const* rows, int64_t n, int64_t D, A* out) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const A* __restrict r0 = rows[j];
    const A* __restrict r1 = rows[j + 1];
    const A* __restrict r2 = rows[j + 2];
    const A* __restrict r3 = rows[j + 3];
    A s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t i = 0; i < D; ++i) {
      const A x = q[i];
      s0 += x * r0[i];
      s1 += x * r1[i];
      s2 += x * r2[i];
      s3 += x * r3[i];
    }
    out[j] = s0;
    out[j + 1] = s1;
    out[j + 2] = s2;
    out[j + 3] = s3;
  }
  for (; j < n; ++j) out[j] = dot(q, rows[j], D);
}

// acc += sum_j w[j] * rows[j] (j < n), four rows per pass so acc is loaded and stored once per four.
template <typename A>
DCD_INLINE void axpy_rows(const A* w, const A* const* rows, int64_t n, int64_t D, A* __restrict acc) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const A* __restrict r0 = rows[j];
    const A* __restrict r1 = rows[j + 1];
    const A* __restrict r2 = rows[j + 2];
    const A* __restrict r3 = rows[j + 3];
    const A w0 = w[j], w1 = w[j + 1], w2 = w[j + 2], w3 = w[j + 3];
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) acc[i] += w0 * r0[i] + w1 * r1[i] + w2 * r2[i] + w3 * r3[i];
  }
  for (; j < n; ++j) {
    const A* __restrict r = rows[j];
    const A wj = w[j];
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) acc[i] += wj * r[i];
  }
}

// acc *= f
template <typename A>
DCD_INLINE void scale_vec(A f, A* __restrict acc, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) acc[i] *= f;
}

// ---------------------------------------------------------------------------------------------
// Transcendentals that vectorise. In fp32, exp and log1p are branch-free polynomial versions
// (Cephes), so loops over a block of logits compile to SIMD code; fp64 uses libm (gradcheck).

// exp(x), relative error below 1e-7 (1.3 ulp measured): 2^n * P(r) with n = round(x / ln 2), |r| <= ln(2) / 2.
// x is clamped to [-87.3, 88]: below, the result is ~1e-38 instead of smaller, which does not
// matter where it is used (added to 1, or to a softmax sum that holds exp(0) = 1); NaN propagates.
DCD_INLINE float exp_v(float x) {
  x = x < -87.33654f ? -87.33654f : x;
  x = x > 88.0f ? 88.0f : x;
  // n = round(x / ln 2) by the 1.5 * 2^23 trick (exact for |x / ln 2| < 2^22; no libm call, so
  // the loop vectorises).
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // x - n ln2, ln2 split hi + lo
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  return y * std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
}
DCD_INLINE double exp_v(double x) {
  return std::exp(x);
}

// log1p(e) for e in [0, 1], relative error below 2e-7 (2.7 ulp measured). With u = 1 + e rounded,
// log1p(e) = log(u) * e / (u - 1) cancels the rounding of u; log(u), u in [1, 2], is
// k ln2 + log(m) with u = 2^k m, m in [sqrt(1/2), sqrt(2)), log(1 + f) by the Cephes polynomial.
DCD_INLINE float log1p_unit(float e) {
  const float u = 1.0f + e;
  const bool halve = u > 1.41421356f;
  const float k = halve ? 1.0f : 0.0f;
  const float f = (halve ? 0.5f * u : u) - 1.0f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  const float log_u = (f + (y * f * z - 0.5f * z - 2.12194440e-4f * k)) + 0.693359375f * k;
  // u - 1 is exact; it is 0 only when e < 2^-24 (then log1p(e) = e). The division is done either
  // way (by 1 then), so the compiler can turn the selection into a blend.
  const float t = u - 1.0f;
  const float ratio = e / (t == 0.0f ? 1.0f : t);
  return t == 0.0f ? e : log_u * ratio;
}
DCD_INLINE double log1p_unit(double e) {
  return std::log1p(e);
}

// ---------------------------------------------------------------------------------------------
// Element conversion to the accumulation type.

template <typename A>
DCD_INLINE A to_acc(float x) {
  return static_cast<A>(x);
}
template <typename A>
DCD_INLINE A to_acc(double x) {
  return static_cast<A>(x);
}
// bfloat16 and float16 widen to float exactly (bit operations that c10 inlines).
template <typename A>
DCD_INLINE A to_acc(c10::BFloat16 x) {
  return static_cast<A>(static_cast<float>(x));
}
template <typename A>
DCD_INLINE A to_acc(c10::Half x) {
  return static_cast<A>(static_cast<float>(x));
}

// dst[0..n) = src[0..n) converted to A.
template <typename T, typename A>
DCD_CPU_CLONES void convert_row(const void* src, A* dst, int64_t n) {
  const T* s = static_cast<const T*>(src);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = to_acc<A>(s[i]);
}

// Rows of one matrix (a bank, or keys) seen as A-typed vectors. Rows already stored as A are
// used in place; other dtypes are converted into a scratch block, one row at a time.
template <typename A>
class RowReader {
 public:
  RowReader(const at::Tensor& m, int64_t max_rows)
      : base_(static_cast<const char*>(m.data_ptr())),
        stride_bytes_(m.stride(0) * static_cast<int64_t>(m.element_size())),
        D_(m.size(1)),
        row_bytes_(m.size(1) * static_cast<int64_t>(m.element_size())) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "RowReader", [&] {
      direct_ = std::is_same<scalar_t, A>::value;
      convert_ = &convert_row<scalar_t, A>;
    });
    if (!direct_) scratch_.resize(static_cast<size_t>(max_rows * D_));
  }

  // Bytes of one row in storage (what a prefetch must cover).
  int64_t row_bytes() const { return row_bytes_; }

  // ptrs[j] = row rows[j] as A (j < n <= max_rows); valid until the next call.
  DCD_INLINE void load(const int64_t* rows, int64_t n, const A** ptrs) {
    for (int64_t j = 0; j < n; ++j) {
      const char* src = base_ + rows[j] * stride_bytes_;
      if (direct_) {
        ptrs[j] = reinterpret_cast<const A*>(src);
      } else {
        A* dst = scratch_.data() + j * D_;
        convert_(src, dst, D_);
        ptrs[j] = dst;
      }
    }
  }

  // Asks the memory system for rows[0..n) ahead of their use.
  DCD_INLINE void prefetch(const int64_t* rows, int64_t n) const {
    for (int64_t j = 0; j < n; ++j) {
      const char* src = base_ + rows[j] * stride_bytes_;
      for (int64_t off = 0; off < row_bytes_; off += 64) DCD_PREFETCH(src + off);
    }
  }

 private:
  const char* base_;
  int64_t stride_bytes_;  // row stride in bytes (int64: offsets never overflow)
  int64_t D_;
  int64_t row_bytes_;  // bytes of one row's D elements
  bool direct_ = false;
  void (*convert_)(const void*, A*, int64_t) = nullptr;
  std::vector<A> scratch_;
};

}  // namespace cpu
}  // namespace dcdkernels
