// CUDA kernels of supcon_contrast and supcon_contrast_backward (contract: csrc/KERNELS.md; the
// math as csrc/cpu/supcon_contrast.cpp): anchors a (R, D) with labels against keys k (N, D) with
// labels, l_ij = s <a_i, k_j>. One block per anchor row (forward, anchor gradient) or per key row
// (key gradient); the row sits in shared memory and the block's threads walk the other side, so
// the (R, N) logits are never written.
//
// Forward: each thread keeps an online state over its columns (max m over every column, the self
// column included; S = sum_{j != i} e^(l - m); the positives' raw logit sum and count), merged
// by block reductions: L_i = m + log(S + eps) - pos_sum / npos (0 without positives), stats =
// [m, S + eps, npos]. Backward: G_ij = g_i ([j != i] e^(l_ij - m_i) / (S_i + eps) - [j in P_i] /
// npos_i), taken kThreads columns at a time into shared memory, then grad_a_i += sum_j G_ij k_j
// (threads over D); grad_k likewise over the anchors; d/ds = sum_ij G_ij <a_i, k_j>.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/cuda_utils.cuh"

namespace dcdkernels {
namespace gpu {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxDim = 4096;  // two D-long rows of shared memory per block

struct SupconParams {
  Matrix a, k;
  const int64_t* la;
  const int64_t* lk;
  const float* logit_scale;
  const float* stats;  // (3, R)
  const float* g;      // (R,)
  int64_t R, N;
  int dim;
  float eps;
  bool exclude_self;
};

__device__ __forceinline__ float row_dot(const float* row, const Matrix& m, int64_t r, int D) {
  float acc = 0.f;
  for (int d = 0; d < D; ++d) acc += row[d] * m.at(r, d);
  return acc;
}

__global__ void supcon_forward_kernel(SupconParams p, float* loss, float* stats) {
  extern __shared__ float smem[];
  __shared__ float scratch[kWarp];
  float* row = smem;
  const int64_t i = blockIdx.x;
  const int D = p.dim;
  for (int d = threadIdx.x; d < D; d += blockDim.x) row[d] = p.a.at(i, d);
  __syncthreads();
  const float s = *p.logit_scale;
  const int64_t yi = p.la[i];
  float m = -INFINITY, S = 0.f, psum = 0.f, np = 0.f;
  for (int64_t j = threadIdx.x; j < p.N; j += blockDim.x) {
    const float l = s * row_dot(row, p.k, j, D);
    if (l > m) {
      S *= rescale(m, l);
      m = l;
    }
    if (p.exclude_self && j == i) continue;
    S += __expf(l - m);
    if (p.lk[j] == yi) {
      psum += l;
      np += 1.f;
    }
  }
  const float M = block_max(m, scratch);
  const float Sm = block_sum(m == -INFINITY ? 0.f : S * __expf(m - M), scratch);
  const float P = block_sum(psum, scratch);
  const float NP = block_sum(np, scratch);
  if (threadIdx.x == 0) {
    const float den = Sm + p.eps;
    loss[i] = NP > 0.f ? M + logf(den) - P / NP : 0.f;
    stats[i] = M;
    stats[p.R + i] = den;
    stats[2 * p.R + i] = NP;
  }
}

// G of anchor row i with key j (its dot d): 0 for the self column and rows without positives.
__device__ __forceinline__ float coefficient(const SupconParams& p, int64_t i, int64_t j, float d, float s) {
  const float np = p.stats[2 * p.R + i];
  if (np == 0.f || (p.exclude_self && i == j)) return 0.f;
  float G = __expf(s * d - p.stats[i]) / p.stats[p.R + i];
  if (p.lk[j] == p.la[i]) G -= 1.f / np;
  return G * p.g[i];
}

// One block per row of `own` (anchor i when by_key is false, key j otherwise); walks the rows of
// `other`, kThreads at a time: grad_own = s sum G other_row; with grad_s, the row's sum G d.
__global__ void supcon_backward_kernel(SupconParams p, bool by_key, float* grad, float* grad_s_rows) {
  extern __shared__ float smem[];
  __shared__ float scratch[kWarp];
  const int D = p.dim;
  float* row = smem;
  float* acc = smem + D;
  float* coef = smem + 2 * D;
  const int64_t r = blockIdx.x;
  const Matrix& own = by_key ? p.k : p.a;
  const Matrix& other = by_key ? p.a : p.k;
  const int64_t n_other = by_key ? p.R : p.N;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    row[d] = own.at(r, d);
    acc[d] = 0.f;
  }
  __syncthreads();
  const float s = *p.logit_scale;
  float gs = 0.f;
  for (int64_t c0 = 0; c0 < n_other; c0 += blockDim.x) {
    const int64_t c = c0 + threadIdx.x;
    float G = 0.f;
    if (c < n_other) {
      const float d = row_dot(row, other, c, D);
      G = by_key ? coefficient(p, c, r, d, s) : coefficient(p, r, c, d, s);
      gs += G * d;
    }
    coef[threadIdx.x] = G;
    __syncthreads();
    const int64_t n = min(static_cast<int64_t>(blockDim.x), n_other - c0);
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
      float t = 0.f;
      for (int64_t q = 0; q < n; ++q) t += coef[q] * other.at(c0 + q, d);
      acc[d] += t;
    }
    __syncthreads();
  }
  for (int d = threadIdx.x; d < D; d += blockDim.x) grad[r * D + d] = s * acc[d];
  if (grad_s_rows != nullptr) {
    const float total = block_sum(gs, scratch);
    if (threadIdx.x == 0) grad_s_rows[r] = total;
  }
}

SupconParams check_inputs(const at::Tensor& anchors, const at::Tensor& labels, const at::Tensor& keys,
                          const at::Tensor& key_labels, const at::Tensor& logit_scale) {
  TORCH_CHECK(anchors.is_cuda() && keys.is_cuda() && labels.is_cuda() && key_labels.is_cuda(),
              "supcon_contrast: every tensor must be on the GPU");
  TORCH_CHECK(anchors.dim() == 2 && keys.dim() == 2 && keys.size(1) == anchors.size(1),
              "anchors (R, D) and keys (N, D) must share D, got ", anchors.sizes(), " and ", keys.sizes());
  TORCH_CHECK(anchors.size(1) <= kMaxDim, "supcon_contrast (CUDA): D must be <= ", kMaxDim, ", got ", anchors.size(1));
  TORCH_CHECK(labels.scalar_type() == at::kLong && key_labels.scalar_type() == at::kLong && labels.dim() == 1 &&
                  key_labels.dim() == 1 && labels.size(0) == anchors.size(0) && key_labels.size(0) == keys.size(0),
              "labels (R,) and key_labels (N,) must be int64");
  TORCH_CHECK(labels.is_contiguous() && key_labels.is_contiguous(), "labels must be contiguous");
  TORCH_CHECK(anchors.size(0) <= 2147483647 && keys.size(0) <= 2147483647, "too many rows for one grid");
  SupconParams p{};
  p.a = matrix_of(anchors, "anchors");
  p.k = matrix_of(keys, "keys");
  p.la = labels.data_ptr<int64_t>();
  p.lk = key_labels.data_ptr<int64_t>();
  p.logit_scale = device_scalar(logit_scale, anchors, "logit_scale");
  p.R = anchors.size(0);
  p.N = keys.size(0);
  p.dim = static_cast<int>(anchors.size(1));
  return p;
}

std::tuple<at::Tensor, at::Tensor> supcon_contrast_cuda(const at::Tensor& anchors, const at::Tensor& labels,
                                                        const at::Tensor& keys, const at::Tensor& key_labels,
                                                        const at::Tensor& logit_scale, double eps, bool exclude_self) {
  const c10::cuda::CUDAGuard guard(anchors.device());
  SupconParams p = check_inputs(anchors, labels, keys, key_labels, logit_scale);
  p.eps = static_cast<float>(eps);
  p.exclude_self = exclude_self;
  const auto opts = anchors.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({p.R}, opts), stats = at::empty({3, p.R}, opts);
  if (p.R == 0) return {loss, stats};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  supcon_forward_kernel<<<static_cast<unsigned>(p.R), kThreads, p.dim * sizeof(float), stream>>>(
      p, loss.data_ptr<float>(), stats.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> supcon_contrast_backward_cuda(
    const at::Tensor& anchors, const at::Tensor& labels, const at::Tensor& keys, const at::Tensor& key_labels,
    const at::Tensor& logit_scale, const at::Tensor& stats, const at::Tensor& grad_rows, bool exclude_self,
    bool keys_grad) {
  const c10::cuda::CUDAGuard guard(anchors.device());
  SupconParams p = check_inputs(anchors, labels, keys, key_labels, logit_scale);
  p.exclude_self = exclude_self;
  const at::Tensor st = stats.to(at::kFloat).contiguous();
  const at::Tensor g = grad_rows.to(at::kFloat).contiguous();
  TORCH_CHECK(st.dim() == 2 && st.size(0) == 3 && st.size(1) == p.R && g.numel() == p.R,
              "stats must be (3, R) and grad_rows (R,)");
  p.stats = st.data_ptr<float>();
  p.g = g.data_ptr<float>();
  const auto opts = anchors.options().dtype(at::kFloat);
  at::Tensor grad_a = at::empty({p.R, p.dim}, opts);
  at::Tensor grad_k = keys_grad ? at::empty({p.N, p.dim}, opts) : at::empty({0}, opts);
  at::Tensor gs = at::zeros({p.R}, opts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const size_t shared = (2 * p.dim + kThreads) * sizeof(float);
  if (p.R > 0) {
    supcon_backward_kernel<<<static_cast<unsigned>(p.R), kThreads, shared, stream>>>(p, false, grad_a.data_ptr<float>(),
                                                                                     gs.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (keys_grad && p.N > 0) {
    supcon_backward_kernel<<<static_cast<unsigned>(p.N), kThreads, shared, stream>>>(p, true, grad_k.data_ptr<float>(),
                                                                                     nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {grad_a, grad_k, gs.sum()};
}

}  // namespace
}  // namespace gpu
}  // namespace dcdkernels

TORCH_LIBRARY_IMPL(dcdkernels_C, CUDA, m) {
  m.impl("supcon_contrast", &dcdkernels::gpu::supcon_contrast_cuda);
  m.impl("supcon_contrast_backward", &dcdkernels::gpu::supcon_contrast_backward_cuda);
}
