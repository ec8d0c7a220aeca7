// Launch-side basics of the CUDA kernels (csrc/cuda/*.cu): warp constants, grid sizing for the
// SMs (fixed under deterministic mode) and the device-resident scalar arguments.
#pragma once

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/constants.h"

namespace dcdkernels {
namespace gpu {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;
// Largest number of (anchor, chunk) partials merged per anchor (bounds shared memory of the merge).
constexpr int kMaxChunks = 1024;

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Number of SMs that grids are sized for: the current device's (to fill them), or
// kDeterministicSms (common/constants.h) in deterministic mode.
inline int sm_count() {
  if (at::globalContext().deterministicAlgorithms()) return kDeterministicSms;
  int device = 0, count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

// A 0-d fp32 scalar tensor on the kernels' device: read on device, no host sync.
inline const float* device_scalar(const at::Tensor& t, const at::Tensor& like, const char* name, int64_t numel = 1) {
  TORCH_CHECK(t.device() == like.device(), name, " must be on ", like.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.numel() == numel && t.is_contiguous(), name, " must hold ", numel, " contiguous value(s), got shape ",
              t.sizes());
  return t.data_ptr<float>();
}

}  // namespace gpu
}  // namespace dcdkernels
