// CUDA kernel of bank_momentum_update_ (docs/math.md §4; contract: csrc/KERNELS.md), in place:
//   bank[i] = normalize(m * bank[i] + (1 - m) * value[p]),  normalize(x) = x / max(||x||, 1e-12)
// for every distinct i of index, p the LAST position holding i.
//
// One block per position p. The block first looks for a later position holding the same row
// (an O(B) scan of the index per block; B is a batch, at most a few thousand) and, if there is
// one, does nothing. So each row is written by exactly one block, the one of its last
// occurrence, from its pre-update value (no other block reads or writes that row): the result
// is deterministic. fp32 math, one rounding to the bank dtype. Rows out of range are skipped.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/layout.h"
#include "cuda/cuda_utils.cuh"

namespace dcdkernels {
namespace gpu {
namespace {

constexpr int kThreads = 128;

// 2^-e for amax = f * 2^e (f in [0.5, 1)), e clamped to [-126, 126] so that 2^-e and
// 1e-12 * 2^-e are normal floats. Read from the exponent bits: exact, no libm.
__device__ __forceinline__ float pow2_scale_for(float amax) {
  int e = static_cast<int>((__float_as_uint(amax) >> 23) & 0xFFu) - 126;  // frexp's exponent (normal amax)
  e = max(-126, min(126, e));
  return __uint_as_float(static_cast<unsigned>(127 - e) << 23);
}

struct BankUpdateParams {
  void* bank;
  ElemType bank_type;
  int64_t rows;
  int64_t stride;  // elements between bank rows
  int dim;
  Matrix value;
  const int64_t* index;
  int64_t index_stride;
  int64_t B;
  float m, one_minus_m;
};

__global__ void __launch_bounds__(kThreads) bank_update_kernel(const BankUpdateParams p) {
  __shared__ float scratch[kWarp];
  const int64_t pos = blockIdx.x;
  const int64_t row = p.index[pos * p.index_stride];
  if (row < 0 || row >= p.rows) return;
  // Last occurrence wins: leave the row to a later position that holds it too.
  int later = 0;
  for (int64_t q = pos + 1 + threadIdx.x; q < p.B && !later; q += kThreads) later = p.index[q * p.index_stride] == row;
  if (__syncthreads_or(later)) return;

  const int64_t base = row * p.stride;
  // IEEE round-to-nearest intrinsics throughout: the build may use --use_fast_math, and these
  // are never approximated or contracted, so each element gets the same roundings as on the CPU
  // and in Triton (csrc/KERNELS.md): x = fl(fl(m * old) + fl((1 - m) * v)).
  auto mixed = [&](int e) {
    return __fadd_rn(__fmul_rn(p.m, load_as_float(p.bank, base + e, p.bank_type)),
                     __fmul_rn(p.one_minus_m, p.value.at(pos, e)));
  };
  // Scaled norm: y = x * 2^-e (exact), 2^e near max|x|, so ||y|| neither overflows nor underflows.
  float amax = 0.f;
  for (int e = threadIdx.x; e < p.dim; e += kThreads) amax = fmaxf(amax, fabsf(mixed(e)));
  const float scale = pow2_scale_for(block_max(amax, scratch));
  float sq = 0.f;
  for (int e = threadIdx.x; e < p.dim; e += kThreads) {
    const float y = __fmul_rn(mixed(e), scale);
    sq = __fmaf_rn(y, y, sq);
  }
  const float denom = fmaxf(__fsqrt_rn(block_sum(sq, scratch)), __fmul_rn(1e-12f, scale));
  // Each thread rewrites the elements it read: element e is read again before it is written.
  for (int e = threadIdx.x; e < p.dim; e += kThreads) {
    store_from_float(p.bank, base + e, p.bank_type, __fdiv_rn(__fmul_rn(mixed(e), scale), denom));
  }
}

void bank_momentum_update_cuda(const at::Tensor& bank, const at::Tensor& index, const at::Tensor& value,
                               double momentum) {
  TORCH_CHECK(bank.is_cuda(), "bank must be a CUDA tensor, got ", bank.device());
  const c10::cuda::CUDAGuard guard(bank.device());
  TORCH_CHECK(bank.dim() == 2, "bank must be 2-D, got shape ", bank.sizes());
  const Matrix value_m = matrix_of(value, "value");
  const int64_t D = bank.size(1), B = value.size(0);
  TORCH_CHECK(value.size(1) == D, "value has D = ", value.size(1), " but the bank has D = ", D);
  TORCH_CHECK(D <= 1 || bank.stride(1) == 1, "bank rows must be contiguous (stride(1) == 1), got strides ",
              bank.strides());
  TORCH_CHECK(index.scalar_type() == at::kLong && index.dim() == 1 && index.size(0) == B,
              "index must be a (B,) int64 tensor with B = value.size(0) = ", B, ", got ", index.scalar_type(),
              " of shape ", index.sizes());
  TORCH_CHECK(value.device() == bank.device() && index.device() == bank.device(),
              "bank, index and value must be on one device");
  TORCH_CHECK(std::isfinite(momentum), "momentum must be finite, got ", momentum);
  check_bank_layout(bank, value);  // rows are written while other rows' values are read
  if (B == 0 || D == 0) return;

  BankUpdateParams p{};
  p.bank = bank.data_ptr();
  p.bank_type = elem_type(bank, "bank");
  p.rows = bank.size(0);
  p.stride = bank.stride(0);
  p.dim = static_cast<int>(D);
  p.value = value_m;
  p.index = index.data_ptr<int64_t>();
  p.index_stride = index.stride(0);
  p.B = B;
  // As torch does for `x * m + v * (1 - m)`: both scalars rounded to fp32.
  p.m = static_cast<float>(momentum);
  p.one_minus_m = static_cast<float>(1.0 - momentum);
  bank_update_kernel<<<static_cast<unsigned>(B), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace gpu
}  // namespace dcdkernels

TORCH_LIBRARY_IMPL(dcdkernels_C, CUDA, m) {
  m.impl("bank_momentum_update_", &dcdkernels::gpu::bank_momentum_update_cuda);
}
