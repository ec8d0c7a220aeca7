// Counter-based negative sampler shared by the CPU and CUDA kernels (contract: csrc/KERNELS.md).
// The Python twin is dcdkernels/reference/rng.py and the Triton twin dcdkernels/triton/rng.py.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define DCD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DCD_HOST_DEVICE inline
#endif

namespace dcdkernels {

DCD_HOST_DEVICE uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// Per-launch key derived from the 64-bit seed.
DCD_HOST_DEVICE uint32_t rng_key(uint64_t seed) {
  return mix32(static_cast<uint32_t>(seed) ^ mix32(static_cast<uint32_t>(seed >> 32) ^ 0x9E3779B9u));
}

// Negative k (1..K) of anchor row b, uniform over [0, n_rows).
DCD_HOST_DEVICE int64_t sample_index(uint32_t key, uint64_t offset, int64_t b, int64_t k, int64_t K, int64_t n_rows) {
  const uint64_t ctr = offset + static_cast<uint64_t>(b) * static_cast<uint64_t>(K) + static_cast<uint64_t>(k - 1);
  const uint32_t h = mix32(static_cast<uint32_t>(ctr) ^ mix32(static_cast<uint32_t>(ctr >> 32) ^ key));
  return static_cast<int64_t>((static_cast<uint64_t>(h) * static_cast<uint64_t>(n_rows)) >> 32);
}

}  // namespace dcdkernels
