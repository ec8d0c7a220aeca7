// Warp, row-group and block reductions of the CUDA kernels, and the deterministic merge of the
// scalar slots of several states.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "cuda/launch.cuh"

namespace dcdkernels {
namespace gpu {

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// Sums each of the N values over the `tpr` threads (a power of two) of a row group. A group of
// up to 32 threads lies inside one warp (xor shuffles within the group); a larger group is the
// whole block and also adds across warps through `scratch` (2 * N * 32 floats of shared memory,
// double-buffered by `parity`: between two uses of one half, every thread passes the barrier of
// the call in between, after its reads, so one barrier per call suffices). Every thread of the
// block must call it when tpr > 32.
template <int N>
__device__ __forceinline__ void group_sum(float (&v)[N], int tpr, float* scratch, int parity) {
  const int width = tpr < kWarp ? tpr : kWarp;
  for (int o = width >> 1; o > 0; o >>= 1) {
#pragma unroll
    for (int n = 0; n < N; ++n) v[n] += __shfl_xor_sync(kFullMask, v[n], o);
  }
  if (tpr > kWarp) {
    float* buf = scratch + parity * N * kWarp;
    const int warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
    if (threadIdx.x % kWarp == 0) {
#pragma unroll
      for (int n = 0; n < N; ++n) buf[n * kWarp + warp] = v[n];
    }
    __syncthreads();
#pragma unroll
    for (int n = 0; n < N; ++n) {
      float t = 0.f;
      for (int w = 0; w < warps; ++w) t += buf[n * kWarp + w];
      v[n] = t;
    }
  }
}

// Block-wide sum and max; every thread gets the result. `scratch` holds 32 floats. The partial
// sums are added in warp order by every thread, so the result is deterministic.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  v = warp_sum(v);
  if (threadIdx.x % kWarp == 0) scratch[threadIdx.x / kWarp] = v;
  __syncthreads();
  float t = 0.f;
  for (int w = 0; w < static_cast<int>(blockDim.x / kWarp); ++w) t += scratch[w];
  __syncthreads();
  return t;
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
  v = warp_max(v);
  if (threadIdx.x % kWarp == 0) scratch[threadIdx.x / kWarp] = v;
  __syncthreads();
  float t = -INFINITY;
  for (int w = 0; w < static_cast<int>(blockDim.x / kWarp); ++w) t = fmaxf(t, scratch[w]);
  __syncthreads();
  return t;
}

// Merges the scalar slots of `count` states (state k at states + k * stride, in global or shared
// memory): out[i] = sum_k factor(i, k) * states[k * stride + i] for i < n_slots. One warp per
// slot, states added in a fixed order (deterministic). Ends with a barrier: `out` (shared) is
// then visible to the block. Every thread of the block must call it.
template <typename Factor>
__device__ __forceinline__ void sum_slots(const float* states, int count, int64_t stride, int n_slots,
                                          const Factor& factor, float* out) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, warps = blockDim.x / kWarp;
  for (int i = warp; i < n_slots; i += warps) {
    float v = 0.f;
    for (int k = lane; k < count; k += kWarp) v = fmaf(factor(i, k), states[k * stride + i], v);
    v = warp_sum(v);
    if (lane == 0) out[i] = v;
  }
  __syncthreads();
}

}  // namespace gpu
}  // namespace dcdkernels
