// CUDA kernel of sampled_contrast (docs/math.md §1a InfoNCE, §1b NCE; contract: csrc/KERNELS.md).
//
// One read of each gathered row gives the loss, the LSE and every gradient (split-K, flash-
// decoding style):
//   1. sampled_partials_kernel: block (b, chunk) scans columns [chunk * chunk_cols, ..) of
//      anchor b. Its row groups (layout.cuh, gather.cuh) each take R rows per step: resolve
//      the bank rows (explicit index or in-kernel sampling), load them as 16-byte fragments,
//      reduce the dots <q, row>, and fold the logits into the group's online state (max m,
//      sum l, weighted dot sum c, and the weighted row sum in registers: InfoNCE weights
//      exp(l - m), rescaled as m grows; NCE weights g = dL/dl, plain sums). The groups of a
//      block merge in shared memory and the block writes one partial.
//   2. merge_partials_kernel (partials.cuh): one block per anchor merges its chunks and
//      writes loss, lse, grad_anchor and grad_scalars.
// Rows out of range are never read: their columns are absent (csrc/KERNELS.md), and an absent
// positive adds no -l_0 / -row_0 term in the merge.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <ATen/ops/empty.h>

#include "common/gather_args.h"
#include "cuda/elements.cuh"
#include "cuda/gather.cuh"
#include "cuda/launch.cuh"
#include "cuda/layout.cuh"
#include "cuda/partials.cuh"
#include "cuda/reduce.cuh"
#include "cuda/softmax.cuh"

namespace dcdkernels {
namespace gpu {
namespace {

// Per-thread register budget (common/constants.h, which also gives the D limit to Python).
constexpr int kMaxFloatsPerThread = kSampledMaxFloatsPerThread;

// Rows a group gathers per step: more rows in flight when each thread holds fewer fragments.
template <int NV>
constexpr int rows_per_step() {
  return NV >= 4 ? 1 : 4 / NV;
}

struct SampledParams : GatherParams {
  Matrix anchor;
  const void* bank;
  int64_t bank_stride;  // elements between bank rows
};

// Min 1 block per SM: ptxas takes the registers the unrolled state needs (no spills; 64-160).
template <typename T, int NV>
__global__ void __launch_bounds__(kMaxGroup, 1) sampled_partials_kernel(const SampledParams p) {
  constexpr int V = 16 / static_cast<int>(sizeof(T));
  constexpr int R = rows_per_step<NV>();
  extern __shared__ float smem[];
  const GatherPos g = gather_pos(p);
  const int tpr = g.tpr, groups = g.groups, t = g.t, D = p.dim;
  const T* bank = static_cast<const T*>(p.bank);

  float q[NV][V];  // this thread's elements of the anchor
  load_slice(q, p.anchor, g.b, t, tpr, D);
  const float s = *p.logit_scale, beta = p.bias ? *p.bias : 0.f, log_z = p.nce ? *p.log_z : 0.f;

  // The group's online state (identical in all its threads) and this thread's row-sum slice.
  float m = -INFINITY, l = 0.f, c = 0.f, loss = 0.f, gb = 0.f;
  float acc[NV][V];
  zero(acc);

  // Uniform trip count over the block (the block-wide group reduces with barriers).
  int parity = 0;
  for (int64_t base = g.c0; base < g.c1; base += groups * R, parity ^= 1) {
    const int64_t col0 = base + g.group * R;
    int64_t row[R];
    step_rows(row, p.columns, g.b, col0, g.c1);
    RowFrag<T, V> x[R][NV];
    load_frags(x, bank, p.bank_stride, row, t, tpr, D, p.vector_loads);

    float d[R];
#pragma unroll
    for (int r = 0; r < R; ++r) d[r] = slice_dot(q, x[r]);
    group_sum<R>(d, tpr, smem, parity);

    float logit[R], w[R];
#pragma unroll
    for (int r = 0; r < R; ++r) logit[r] = logit_of(row[r], d[r], s, beta);
    // InfoNCE: w = exp(l - m), earlier sums rescale by `keep`; NCE: w = g = dL/dl, plain sums.
    float keep = online_absorb<R>(m, l, logit, w);
    if (p.nce) {
      keep = 1.f;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        w[r] = row[r] >= 0 ? nce_term(logit[r], col0 + r == 0, log_z, p.nc, loss) : 0.f;
        gb += w[r];
      }
    }
    if (p.compute_grad) {
      c *= keep;
#pragma unroll
      for (int r = 0; r < R; ++r) c = fmaf(w[r], d[r], c);
      axpy(acc, keep, w, x);
    }
  }

  // One partial per block.
  float* out = p.partials + static_cast<int64_t>(blockIdx.x) * p.stride;
  if (groups == 1) {
    if (threadIdx.x == 0) {
      out[kM] = m, out[kL] = l, out[kC] = c, out[kLoss] = loss, out[kGb] = gb;
    }
    if (p.compute_grad) store_slice(out + kScalars, acc, t, tpr, D);
    return;
  }
  // Several groups: stage their states in shared memory and merge them in group order.
  __shared__ float scratch[kWarp];
  const int span = tpr * NV * V;       // elements covered by a group (>= D)
  float* gs = smem;                    // [groups][kScalars]
  float* gv = gs + groups * kScalars;  // [groups][span]
  float* factor = gv + groups * span;  // [groups]: exp(m_group - m_block)
  if (t == 0) {
    float* st = gs + g.group * kScalars;
    st[kM] = m, st[kL] = l, st[kC] = c, st[kLoss] = loss, st[kGb] = gb;
  }
  if (p.compute_grad) stage_slice(gv + g.group * span, acc, t, tpr);
  __syncthreads();
  const float m_block = block_max(threadIdx.x < groups ? gs[threadIdx.x * kScalars + kM] : -INFINITY, scratch);
  if (threadIdx.x < groups) factor[threadIdx.x] = rescale(gs[threadIdx.x * kScalars + kM], m_block);
  __syncthreads();
  float* tot = scratch;  // free again after block_max
  sum_slots(gs, groups, kScalars, kScalars, [&](int i, int k) { return slot_factor(i, p.nce, factor[k]); }, tot);
  if (threadIdx.x == 0) {
    out[kM] = m_block, out[kL] = tot[kL], out[kC] = tot[kC], out[kLoss] = tot[kLoss], out[kGb] = tot[kGb];
  }
  if (p.compute_grad) {
    merge_staged(out + kScalars, gv, span, groups, D, [&](int k) { return slot_factor(kScalars, p.nce, factor[k]); });
  }
}

template <typename T, int NV>
void launch_partials(const SampledParams& p, const RowLayout& lay, int64_t B, cudaStream_t stream) {
  constexpr int V = 16 / static_cast<int>(sizeof(T));
  constexpr int R = rows_per_step<NV>();
  const int groups = lay.block / lay.tpr;
  // Shared memory: the groups' states for the block merge, or the cross-warp dot scratch.
  const size_t smem =
      groups > 1 ? sizeof(float) * groups * (kScalars + lay.tpr * NV * V + 1) : sizeof(float) * 2 * R * kWarp;
  sampled_partials_kernel<T, NV><<<static_cast<unsigned>(B * p.nchunks), lay.block, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sampled_contrast_cuda(
    const at::Tensor& anchor, const at::Tensor& bank, const at::Tensor& index, const at::Tensor& logit_scale,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& log_z, int64_t loss_type,
    int64_t num_negatives, int64_t seed, int64_t offset, bool compute_grad, int64_t noise_rows) {
  TORCH_CHECK(anchor.is_cuda(), "anchor must be a CUDA tensor, got ", anchor.device());
  const c10::cuda::CUDAGuard guard(anchor.device());
  const Matrix q = matrix_of(anchor, "anchor");
  const int64_t B = anchor.size(0), D = anchor.size(1);
  TORCH_CHECK(bank.device() == anchor.device() && index.device() == anchor.device(),
              "anchor, bank and index must be on one device");
  TORCH_CHECK(bank.dim() == 2 && bank.size(1) == D, "bank must be (N, D) with D = ", D, ", got shape ", bank.sizes());
  TORCH_CHECK(D <= 1 || bank.stride(1) == 1, "bank rows must be contiguous (stride(1) == 1), got strides ",
              bank.strides());
  const bool nce = nce_loss(loss_type, log_z.has_value(), "log_z");
  const int64_t N = bank.size(0), noise = noise_rows_or(noise_rows, N, "the bank's");
  int64_t cols = 0;
  const ColumnRows columns = column_rows(index, B, num_negatives, seed, offset, N, cols);

  const auto opts = anchor.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({B}, opts), lse = at::empty({B}, opts);
  at::Tensor grad_anchor = compute_grad ? at::empty({B, D}, opts) : at::empty({0}, opts);
  at::Tensor grad_scalars = compute_grad ? at::empty({2, B}, opts) : at::empty({0}, opts);
  if (B == 0) return {loss, lse, grad_anchor, grad_scalars};
  TORCH_CHECK(D > 0, "anchor has D = 0");

  SampledParams p{gather_params(anchor, columns, cols, D, logit_scale, bias, log_z, 1, nce, compute_grad, noise), q,
                  bank.data_ptr(), bank.stride(0)};
  p.stride = kScalars + (compute_grad ? D : 0);

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto step = [](auto nv_tag) { return rows_per_step<decltype(nv_tag)::value>(); };
  const at::Tensor partials = gather_partials<kMaxFloatsPerThread>(
      p, bank, "bank", B, rows_aligned(bank, 16), opts, step, [&](auto tag, auto nv_tag, const RowLayout& lay) {
        launch_partials<decltype(tag), decltype(nv_tag)::value>(p, lay, B, stream);
      });

  MergeParams mp{{p.partials, p.nchunks, p.stride, B, p.dim, p.logit_scale, p.bias, compute_grad}};
  mp.anchor = q;
  mp.pos = PositiveRows{matrix_of(bank, "bank"), columns.index, columns.stride_b, false};  // column 0
  mp.loss = loss.data_ptr<float>();
  mp.lse = lse.data_ptr<float>();
  mp.grad_anchor = compute_grad ? grad_anchor.data_ptr<float>() : nullptr;
  mp.grad_scalars = compute_grad ? grad_scalars.data_ptr<float>() : nullptr;
  mp.grad_positive = nullptr;
  if (nce) {
    merge_partials_kernel<true><<<static_cast<unsigned>(B), 256, 0, stream>>>(mp);
  } else {
    merge_partials_kernel<false><<<static_cast<unsigned>(B), 256, 0, stream>>>(mp);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, lse, grad_anchor, grad_scalars};
}

}  // namespace
}  // namespace gpu
}  // namespace dcdkernels

TORCH_LIBRARY_IMPL(dcdkernels_C, CUDA, m) {
  m.impl("sampled_contrast", &dcdkernels::gpu::sampled_contrast_cuda);
}
