// Element access of the CUDA kernels: small tensors (anchors, keys, values) are read element by
// element through a runtime dtype tag (Matrix); bank rows, the hot path, go through RowFrag, a
// fragment of V consecutive elements filled by one 4/8/16-byte load when the row is aligned,
// element by element otherwise (D not a multiple of V, misaligned base or row stride).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace dcdkernels {
namespace gpu {

// ---------------------------------------------------------------------------------------------
// Element types and element-wise access.

enum class ElemType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

inline ElemType elem_type(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return ElemType::kFloat32;
    case at::kBFloat16:
      return ElemType::kBFloat16;
    case at::kHalf:
      return ElemType::kFloat16;
    default:
      TORCH_CHECK(false, name, ": the CUDA kernels take float32, bfloat16 or float16, got ", t.scalar_type(),
                  " (float64 runs on the CPU and eager backends)");
  }
}

// bfloat16 is the top half of a float32; float16 converts with the hardware instruction.
__device__ __forceinline__ float bf16_bits_to_float(uint32_t bits) {
  return __uint_as_float(bits << 16);
}
__device__ __forceinline__ float fp16_bits_to_float(uint32_t bits) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
}

__device__ __forceinline__ float load_as_float(const void* base, int64_t offset, ElemType type) {
  switch (type) {
    case ElemType::kBFloat16:
      return bf16_bits_to_float(static_cast<const uint16_t*>(base)[offset]);
    case ElemType::kFloat16:
      return fp16_bits_to_float(static_cast<const uint16_t*>(base)[offset]);
    default:
      return static_cast<const float*>(base)[offset];
  }
}

// One rounding (to nearest even) from fp32 to the storage dtype.
__device__ __forceinline__ void store_from_float(void* base, int64_t offset, ElemType type, float v) {
  switch (type) {
    case ElemType::kBFloat16:
      static_cast<c10::BFloat16*>(base)[offset] = c10::BFloat16(v);
      break;
    case ElemType::kFloat16:
      static_cast<__half*>(base)[offset] = __float2half_rn(v);
      break;
    default:
      static_cast<float*>(base)[offset] = v;
  }
}

// A 2-D tensor read element by element as float, through its strides (non-contiguous is fine).
struct Matrix {
  const void* data;
  ElemType type;
  int64_t rows, cols;
  int64_t stride_row, stride_col;

  __device__ __forceinline__ float at(int64_t r, int64_t c) const {
    return load_as_float(data, r * stride_row + c * stride_col, type);
  }
};

inline Matrix matrix_of(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D, got shape ", t.sizes());
  return Matrix{t.data_ptr(), elem_type(t, name), t.size(0), t.size(1), t.stride(0), t.stride(1)};
}

// ---------------------------------------------------------------------------------------------
// Bank row fragments: V consecutive elements of type T (float, c10::BFloat16, c10::Half) kept as
// raw bits, so that 16-bit rows take half the registers until they are used.

template <typename T>
__device__ __forceinline__ float bits_to_float(uint32_t bits);
template <>
__device__ __forceinline__ float bits_to_float<float>(uint32_t bits) {
  return __uint_as_float(bits);
}
template <>
__device__ __forceinline__ float bits_to_float<c10::BFloat16>(uint32_t bits) {
  return bf16_bits_to_float(bits & 0xffffu);
}
template <>
__device__ __forceinline__ float bits_to_float<c10::Half>(uint32_t bits) {
  return fp16_bits_to_float(bits & 0xffffu);
}

template <typename T, int V>
struct RowFrag {
  static constexpr int kBytes = V * static_cast<int>(sizeof(T));
  static_assert(kBytes == 4 || kBytes == 8 || kBytes == 16, "a fragment is one 4, 8 or 16-byte load");
  static constexpr int kWords = kBytes / 4;
  static constexpr int kPerWord = 4 / static_cast<int>(sizeof(T));
  uint32_t w[kWords];

  __device__ __forceinline__ void clear() {
#pragma unroll
    for (int i = 0; i < kWords; ++i) w[i] = 0;
  }

  // One load of kBytes through the read-only path; p must be kBytes-aligned.
  __device__ __forceinline__ void load_vector(const T* p) {
    if constexpr (kWords == 4) {
      const uint4 r = __ldg(reinterpret_cast<const uint4*>(p));
      w[0] = r.x, w[1] = r.y, w[2] = r.z, w[3] = r.w;
    } else if constexpr (kWords == 2) {
      const uint2 r = __ldg(reinterpret_cast<const uint2*>(p));
      w[0] = r.x, w[1] = r.y;
    } else {
      w[0] = __ldg(reinterpret_cast<const unsigned int*>(p));
    }
  }

  // Elements 0..n-1 (n <= V) one at a time, zeros after: any alignment, and the row tail.
  __device__ __forceinline__ void load_scalars(const T* p, int n) {
    clear();
#pragma unroll
    for (int i = 0; i < V; ++i) {
      if (i < n) {
        uint32_t bits;
        if constexpr (sizeof(T) == 4) {
          bits = __ldg(reinterpret_cast<const unsigned int*>(p) + i);
        } else {
          bits = __ldg(reinterpret_cast<const unsigned short*>(p) + i);
        }
        w[i / kPerWord] |= bits << (32 / kPerWord * (i % kPerWord));
      }
    }
  }

  __device__ __forceinline__ float operator[](int i) const {
    return bits_to_float<T>(w[i / kPerWord] >> (32 / kPerWord * (i % kPerWord)));
  }
};

// Clears a per-thread register array (fragment slices, accumulators).
template <int NV, int V>
__device__ __forceinline__ void zero(float (&v)[NV][V]) {
#pragma unroll
  for (int j = 0; j < NV; ++j) {
#pragma unroll
    for (int i = 0; i < V; ++i) v[j][i] = 0.f;
  }
}

// Calls f(T{}) with T the storage type of a bank: float, c10::BFloat16 or c10::Half.
template <typename F>
void dispatch_bank_type(const at::Tensor& bank, const char* name, F&& f) {
  switch (elem_type(bank, name)) {
    case ElemType::kBFloat16:
      f(c10::BFloat16{});
      break;
    case ElemType::kFloat16:
      f(c10::Half{});
      break;
    default:
      f(float{});
  }
}

// Whether every row of `bank` starts on a `bytes` boundary (the fragments' vector loads).
inline bool rows_aligned(const at::Tensor& bank, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(bank.data_ptr()) % bytes == 0 &&
         (bank.stride(0) * static_cast<int64_t>(bank.element_size())) % bytes == 0;
}

}  // namespace gpu
}  // namespace dcdkernels
