// CPU kernel of bank_momentum_update_ (docs/math.md §4; contract: csrc/KERNELS.md), in place:
//   bank[i] = normalize(m * bank[i] + (1 - m) * value[p]),  normalize(x) = x / max(||x||, 1e-12)
// for every distinct i of index, p the LAST position holding i. Deterministic: positions are
// stable-sorted by row, the last of each run is kept, and the distinct rows (each written once,
// from its pre-update value) are then updated in parallel. fp32 math (fp64 for fp64 banks),
// rounded once to the bank dtype. Every check (shapes, index range, finite values) runs before
// the bank is touched, so on CPU the Python layer needs no data-dependent check of its own.
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "common/layout.h"
#include "cpu/cpu_utils.h"

namespace dcdkernels {
namespace cpu {
namespace {

// (row, position) of the last occurrence of each distinct row of index, by ascending row.
std::vector<std::pair<int64_t, int64_t>> last_occurrences(const int64_t* index, int64_t B) {
  std::vector<int64_t> order(static_cast<size_t>(B));
  std::iota(order.begin(), order.end(), int64_t(0));
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return index[x] < index[y]; });
  std::vector<std::pair<int64_t, int64_t>> keep;
  for (int64_t i = 0; i < B; ++i) {
    const int64_t p = order[static_cast<size_t>(i)];
    const bool last_of_run = i + 1 == B || index[order[static_cast<size_t>(i + 1)]] != index[p];
    if (last_of_run) keep.emplace_back(index[p], p);
  }
  return keep;
}

// Every value is finite (ValueError naming `value` otherwise): a nan row would be normalised
// into the bank for good.
// x * 0 is 0 for finite x and nan for inf/nan, so one vectorised sum tells.
// (The throw stays outside the target_clones function: an exception leaving one terminates.)
template <typename T>
DCD_CPU_CLONES bool all_finite(const T* p, int64_t n) {
  using A = std::conditional_t<std::is_same_v<T, double>, double, float>;
  A acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += static_cast<A>(p[i]) * A(0);
  return acc == A(0);
}

// x rounded to the bank dtype. bfloat16: round to nearest even by integer arithmetic (what c10
// does, written so that the store loop vectorises); nan stays nan.
template <typename T, typename A>
DCD_INLINE T to_bank(A x) {
  if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<A, float>) {
    const uint32_t u = std::bit_cast<uint32_t>(x);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return c10::BFloat16(static_cast<uint16_t>(x != x ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
  } else {
    return static_cast<T>(x);
  }
}

// One row, in place: x = m * row + (1 - m) * v, row = x / max(||x||, 1e-12), with a scaled norm
// (contract: csrc/KERNELS.md): y = x * 2^-e for a power of two near max|x| (exact), then
// row = y / max(||y||, 1e-12 * 2^-e). The same quotient as unscaled, to the bit, wherever ||x||
// does not overflow or underflow, and a unit row where it would (finite values near 1e30 in
// fp32). The norm's sum is vectorised (reassociated): a serial sum is bound by the add latency.
template <typename A>
DCD_INLINE A pow2_scale_for(A amax) {
  int e = 0;
  std::frexp(amax, &e);  // amax = f * 2^e, f in [0.5, 1) (e = 0 for 0)
  // Keep 2^-e and 1e-12 * 2^-e normal numbers (the scale itself is then exact).
  e = std::clamp(e, std::numeric_limits<A>::min_exponent - 1, std::numeric_limits<A>::max_exponent - 2);
  return std::ldexp(A(1), -e);
}

template <typename T, typename A>
DCD_CPU_CLONES void update_row(T* row, const A* v, A* x, int64_t D, A m, A one_minus_m) {
  A sq = 0;
#pragma omp simd reduction(+ : sq)
  for (int64_t e = 0; e < D; ++e) {
    x[e] = m * to_acc<A>(row[e]) + one_minus_m * v[e];
    sq += x[e] * x[e];
  }
  // The common case, 2^-80 <= ||x||^2 <= 2^80: no square overflowed, and any that underflowed
  // is negligible, so the unscaled quotient is the scaled one (scaling by 2^-e is exact).
  A scale = 1;
  if (!(sq >= A(0x1p-80) && sq <= A(0x1p80))) {
    A amax = 0;
    for (int64_t e = 0; e < D; ++e) amax = std::max(amax, std::abs(x[e]));
    scale = pow2_scale_for(amax);
    sq = 0;
#pragma omp simd reduction(+ : sq)
    for (int64_t e = 0; e < D; ++e) {
      x[e] *= scale;
      sq += x[e] * x[e];
    }
  }
  const A denom = std::max(std::sqrt(sq), A(1e-12) * scale);
#pragma omp simd
  for (int64_t e = 0; e < D; ++e) row[e] = to_bank<T>(x[e] / denom);
}

#ifndef DCD_BANK_PREFETCH_ROWS
#define DCD_BANK_PREFETCH_ROWS 2
#endif
constexpr int64_t kPrefetchRows = DCD_BANK_PREFETCH_ROWS;  // rows in flight ahead of the one updated

template <typename T, typename A>
void update_rows(at::Tensor& bank, const at::Tensor& value, const std::vector<std::pair<int64_t, int64_t>>& keep,
                 double momentum) {
  const int64_t D = bank.size(1);
  const int64_t stride = bank.stride(0);
  T* base = bank.data_ptr<T>();
  // As torch does for `x * m + v * (1 - m)`: both scalars rounded to the math type.
  const A m = static_cast<A>(momentum), one_minus_m = static_cast<A>(1.0 - momentum);
  at::parallel_for(0, static_cast<int64_t>(keep.size()), 16, [&](int64_t i0, int64_t i1) {
    RowReader<A> values(value, 1);
    std::vector<A> x(static_cast<size_t>(D));
    const auto prefetch_row = [&](int64_t i) {
      const char* r = reinterpret_cast<const char*>(base + keep[static_cast<size_t>(i)].first * stride);
      for (int64_t b = 0; b < D * static_cast<int64_t>(sizeof(T)); b += 64) DCD_PREFETCH(r + b);
    };
    for (int64_t i = i0; i < std::min(i1, i0 + kPrefetchRows); ++i) prefetch_row(i);
    for (int64_t i = i0; i < i1; ++i) {
      if (i + kPrefetchRows < i1) prefetch_row(i + kPrefetchRows);  // rows are scattered: fetch ahead
      T* row = base + keep[static_cast<size_t>(i)].first * stride;
      const A* v;
      values.load(&keep[static_cast<size_t>(i)].second, 1, &v);
      update_row(row, v, x.data(), D, m, one_minus_m);
    }
  });
}

void bank_momentum_update_cpu(const at::Tensor& bank_in, const at::Tensor& index, const at::Tensor& value,
                              double momentum) {
  at::Tensor bank = bank_in;
  check_float_matrix(bank, "bank");
  check_float_matrix(value, "value");
  const int64_t D = bank.size(1);
  TORCH_CHECK(value.size(1) == D, "value has D = ", value.size(1), " but the bank has D = ", D);
  TORCH_CHECK(D <= 1 || bank.stride(1) == 1, "bank rows must be contiguous (stride(1) == 1), got strides ",
              bank.strides());
  TORCH_CHECK(index.dim() == 1 && index.size(0) == value.size(0),
              "index must be (B,) with B = value.size(0) = ", value.size(0), ", got shape ", index.sizes());
  TORCH_CHECK_VALUE(momentum >= 0.0 && momentum <= 1.0, "momentum must be a float in [0, 1], got ", momentum);
  const at::Tensor index_c = index.contiguous();
  TORCH_CHECK(index_c.device().is_cpu(), "index must be a CPU tensor, got ", index_c.device());
  TORCH_CHECK(index_c.scalar_type() == at::kLong, "index must be int64, got ", index_c.scalar_type());
  const int64_t* idx = index_c.data_ptr<int64_t>();
  const int64_t n_rows = bank.size(0);
  bool in_range = true;
  for (int64_t i = 0; i < index_c.numel(); ++i) in_range &= idx[i] >= 0 && idx[i] < n_rows;
  TORCH_CHECK_VALUE(in_range, "index has entries out of range [0, ", n_rows, ")");
  check_bank_layout(bank, value);  // before the first write
  const at::Tensor value_c = value.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value_c.scalar_type(), "bank_momentum_update_check", [&] {
    TORCH_CHECK_VALUE(all_finite(value_c.data_ptr<scalar_t>(), value_c.numel()),
                      "value has non-finite values (nan or inf)");
  });
  const auto keep = last_occurrences(index_c.data_ptr<int64_t>(), index_c.numel());
  if (keep.empty()) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, bank.scalar_type(), "bank_momentum_update_", [&] {
    if (bank.scalar_type() == at::kDouble) {
      update_rows<scalar_t, double>(bank, value_c, keep, momentum);
    } else {
      update_rows<scalar_t, float>(bank, value_c, keep, momentum);
    }
  });
}

}  // namespace
}  // namespace cpu
}  // namespace dcdkernels

TORCH_LIBRARY_IMPL(dcdkernels_C, CPU, m) {
  m.impl("bank_momentum_update_", &dcdkernels::cpu::bank_momentum_update_cpu);
}
