// dense_contrast_reduced composed from a backend's per-row dense_contrast (with gradients) and
// its dense_contrast_backward_keys (csrc/KERNELS.md): loss = sum_b c_b L_b, the per-row
// gradients times c_b, the key gradient with grad_rows = c. Shared by the CUDA kernel and the
// CPU kernel's fallback (no key gradient, or anchor strips too thin).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <tuple>

namespace dcdkernels {

using ReducedOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// forward() -> (rows, lse, grad_anchor, grad_positive, grad_scalars (2, B)), computed with
// gradients; backward_keys(lse, c) -> grad_keys. c: the row weights, in the outputs' dtype.
template <typename Forward, typename BackwardKeys>
ReducedOutputs compose_reduced(Forward forward, BackwardKeys backward_keys, const at::Tensor& c, bool keys_grad,
                               bool has_positive) {
  auto [rows, lse, grad_anchor, grad_positive, grad_scalars] = forward();
  const at::Tensor grad_keys = keys_grad ? backward_keys(lse, c) : at::empty({0}, rows.options());
  if (has_positive) grad_positive.mul_(c.unsqueeze(1));
  return {rows.mul(c).sum(),          rows, lse, grad_anchor.mul_(c.unsqueeze(1)), grad_positive, grad_keys,
          grad_scalars.mul_(c).sum(1)};
}

}  // namespace dcdkernels
