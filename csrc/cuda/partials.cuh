// Split-K partials of one direction (sampled_contrast, dense_contrast) and the kernel that
// merges them per anchor into the outputs of the contract (csrc/KERNELS.md).
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "cuda/elements.cuh"
#include "cuda/launch.cuh"
#include "cuda/reduce.cuh"
#include "cuda/softmax.cuh"

namespace dcdkernels {
namespace gpu {

// Split-K partials of one direction (sampled_contrast, dense_contrast): the columns of each
// anchor are split into chunks, and each (anchor, chunk) leaves, at partials + (b * nchunks +
// chunk) * stride:
//   [kM] max m   [kL] sum exp(l - m)   [kC] InfoNCE: sum exp(l - m) d, NCE: sum g d
//   [kLoss] NCE: sum of the column losses   [kGb] NCE: sum g     (g = dL/dl)
//   [kScalars ..] with gradients, the D-vector: InfoNCE sum exp(l - m) row, NCE sum g row.
// The positive column's own terms (-l_0, -row_0 for InfoNCE) are added by the merge.

enum PartialSlot : int { kM = 0, kL = 1, kC = 2, kLoss = 3, kGb = 4, kScalars = 5 };

// Weight of slot `slot` (kScalars and up: the vector) of a partial whose softmax sums must be
// rescaled by f = exp(m_partial - m_merged) when partials merge: softmax-weighted sums rescale,
// NCE sums add up.
__device__ __forceinline__ float slot_factor(int slot, bool nce, float f) {
  return (slot == kL || (!nce && (slot == kC || slot >= kScalars))) ? f : 1.f;
}

// The positive row of each anchor, as the merge reads it.
struct PositiveRows {
  Matrix rows;           // bank, keys or the `positive` tensor
  const int64_t* index;  // row of anchor b = index[b * index_stride]; null: row b
  int64_t index_stride;
  bool extra_column;  // dense `positive`: a softmax column that the partials did not see

  __device__ __forceinline__ int64_t row(int64_t b) const {
    const int64_t r = index ? index[b * index_stride] : b;
    return (r >= 0 && r < rows.rows) ? r : -1;
  }
};

// What every merge kernel reads besides its own inputs (MergeParams, and dual_merge_kernel's):
// B anchors of `nchunks` partials of `stride` floats each, D = dim, and the loss scalars.
struct MergeInputs {
  const float* partials;
  int nchunks;
  int64_t stride;  // floats per partial
  int64_t B;
  int dim;
  const float* logit_scale;
  const float* bias;  // null: 0
  bool compute_grad;
};

struct MergeParams : MergeInputs {
  Matrix anchor;
  PositiveRows pos;
  // outputs; the gradients only with compute_grad, grad_positive only with pos.extra_column
  float* loss;
  float* lse;
  float* grad_anchor;    // (B, D)
  float* grad_scalars;   // (2, B): [d/ds, d/dbeta]
  float* grad_positive;  // (B, D)
};

// One block per anchor: merges its chunks' partials with the online-softmax rescaling and
// writes loss, lse and the gradients of the contract:
//   InfoNCE: loss = LSE - l_0, grad = s (sum_k p_k row_k - row_0), d/ds = sum_k p_k d_k - d_0,
//            d/dbeta = 0; with an extra positive column, d/dpositive = s (p_0 - 1) q.
//   NCE:     the chunk sums add up; grad = s sum_k g_k row_k, d/ds = sum g d, d/dbeta = sum g.
// A positive row out of range is absent (csrc/KERNELS.md): no -l_0, -d_0, -row_0 term (the
// partials hold only present columns); sums over no present column are 0.
template <bool kNce>
__global__ void __launch_bounds__(256) merge_partials_kernel(const MergeParams p) {
  __shared__ float scratch[kWarp];
  __shared__ float factor[kMaxChunks];  // exp(m_chunk - m) of each chunk
  __shared__ float tot[kScalars];       // merged scalar slots
  const int64_t b = blockIdx.x;
  const int D = p.dim;
  const float* part = p.partials + b * p.nchunks * p.stride;
  const float s = *p.logit_scale, beta = p.bias ? *p.bias : 0.f;

  // The positive: its dot (InfoNCE needs l_0 and row_0; NCE nothing: the partials hold its term).
  const int64_t prow = p.pos.row(b);
  float d0 = 0.f;
  if (!kNce && prow >= 0) {
    float acc = 0.f;
    for (int e = threadIdx.x; e < D; e += blockDim.x) acc = fmaf(p.anchor.at(b, e), p.pos.rows.at(prow, e), acc);
    d0 = block_sum(acc, scratch);
  }
  const float l0 = fmaf(s, d0, beta);

  float m = -INFINITY;
  for (int c = threadIdx.x; c < p.nchunks; c += blockDim.x) m = fmaxf(m, part[c * p.stride + kM]);
  m = block_max(m, scratch);
  if (p.pos.extra_column) m = fmaxf(m, l0);
  for (int c = threadIdx.x; c < p.nchunks; c += blockDim.x) factor[c] = rescale(part[c * p.stride + kM], m);
  __syncthreads();
  sum_slots(part, p.nchunks, p.stride, kScalars, [&](int i, int c) { return slot_factor(i, kNce, factor[c]); }, tot);

  const float p0_raw = p.pos.extra_column ? rescale(l0, m) : 0.f;  // exp(l_0 - m) of the extra column
  const float l = tot[kL] + p0_raw;
  const float lse = m + __logf(l);  // -inf when no column is present
  const float inv_l = l > 0.f ? 1.f / l : 0.f;
  if (threadIdx.x == 0) {
    p.lse[b] = lse;
    if (!kNce) {
      p.loss[b] = prow >= 0 ? lse - l0 : lse;
      if (p.compute_grad) {
        p.grad_scalars[b] = (tot[kC] + p0_raw * d0) * inv_l - d0;
        p.grad_scalars[p.B + b] = 0.f;  // exactly: a shared shift cancels in the softmax
      }
    } else {
      p.loss[b] = tot[kLoss];
      if (p.compute_grad) {
        p.grad_scalars[b] = tot[kC];
        p.grad_scalars[p.B + b] = tot[kGb];
      }
    }
  }
  if (!p.compute_grad) return;

  const float p0 = p0_raw * inv_l;  // probability of the extra positive column
  for (int e = threadIdx.x; e < D; e += blockDim.x) {
    float a = 0.f;
    for (int c = 0; c < p.nchunks; ++c)
      a = fmaf(slot_factor(kScalars, kNce, factor[c]), part[c * p.stride + kScalars + e], a);
    if (!kNce) {
      const float r0 = prow >= 0 ? p.pos.rows.at(prow, e) : 0.f;
      a = a * inv_l + (p0 - 1.f) * r0;
    }
    p.grad_anchor[b * D + e] = s * a;
    if (p.pos.extra_column) p.grad_positive[b * D + e] = s * (p0 - 1.f) * p.anchor.at(b, e);
  }
}

}  // namespace gpu
}  // namespace dcdkernels
