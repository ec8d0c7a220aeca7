// Layout checks of the bank update, shared by the CPU and CUDA kernels (host code). The Python
// twin is dcdkernels/ops/_validate.py (`bank_layout`), the Triton launcher calls that one.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace dcdkernels {

// [first, last] byte addresses touched by a strided tensor (numel > 0).
inline std::pair<uintptr_t, uintptr_t> byte_span(const at::Tensor& t) {
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  uintptr_t extent = 0;
  for (int64_t d = 0; d < t.dim(); ++d) extent += static_cast<uintptr_t>((t.size(d) - 1) * t.stride(d));
  return {begin, begin + (extent + 1) * t.element_size() - 1};
}

// The bank's rows are written in parallel: they must not overlap one another (expand, stride 0,
// as_strided), and the values read meanwhile must not share the bank's bytes.
inline void check_bank_layout(const at::Tensor& bank, const at::Tensor& value) {
  const int64_t D = bank.size(1);
  TORCH_CHECK_VALUE(bank.size(0) <= 1 || bank.stride(0) >= D, "bank rows overlap in memory (strides ", bank.strides(),
                    " for shape ", bank.sizes(), "): a bank must be a dense (N, D) layout");
  if (bank.numel() == 0 || value.numel() == 0 || !bank.storage().is_alias_of(value.storage())) return;
  const auto b = byte_span(bank), v = byte_span(value);
  TORCH_CHECK_VALUE(b.second < v.first || v.second < b.first,
                    "value overlaps the bank in memory: pass a copy (value.clone())");
}

}  // namespace dcdkernels
