// Constants shared by the C++/CUDA kernels and the Python side, defined here only.
// csrc/extension.cpp publishes them as attributes of the module dcdkernels._C
// (e.g. dcdkernels._C.DETERMINISTIC_SMS); dcdkernels/_ext.py reads them from there.
#pragma once

namespace dcdkernels {

// Under torch.use_deterministic_algorithms(True) the CUDA and Triton grids are sized for this
// many SMs whatever the GPU, so the split of every reduction (and so every rounding) does not
// depend on the device.
constexpr int kDeterministicSms = 132;

// The CUDA gather kernels (sampled_contrast, dual_sampled_contrast, cuda/layout.cuh): a row group
// of at most kMaxGroup threads (= one block) holds a bank row, each thread at most
// k*MaxFloatsPerThread floats of it (register budget), so D <= kMaxGroup * k*MaxFloatsPerThread.
constexpr int kMaxGroup = 256;
// sampled_contrast: the anchor slice and the row-sum slice, NV * V floats each.
constexpr int kSampledMaxFloatsPerThread = 32;
// dual_sampled_contrast: two anchor slices and up to six row-sum slices of NV * V floats.
constexpr int kDualMaxFloatsPerThread = 8;
constexpr int kSampledCudaMaxDim = kMaxGroup * kSampledMaxFloatsPerThread;
constexpr int kDualCudaMaxDim = kMaxGroup * kDualMaxFloatsPerThread;

}  // namespace dcdkernels
