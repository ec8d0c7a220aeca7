// CUDA kernels of dense_contrast, dense_contrast_backward_keys and dense_contrast_reduced (docs/math.md §2;
// contract: csrc/KERNELS.md): anchors q (B, D) against keys (M, D), with the positive either key
// target_b or a separate positive key (an extra softmax column).
//
// Flash-attention style on CUDA cores (fp32 FMA); the (B, M) logits are never written.
//   dense_partials_kernel: block (key split, anchor tile, dim slice) owns kOwn = 8 anchors and
//     loops over tiles of kTile = 64 keys of its split. The 8 x 64 dots of a tile accumulate
//     over D through shared-memory chunks of kChunk dims (warp w: anchor w; lane: keys lane
//     and lane + 32); each anchor's online softmax (max m, sum l, weighted dot sum c) absorbs
//     them with warp reductions; the weighted key sum a (8 anchors x the slice's dims) lives in
//     registers, thread t owning dims t + 256 i. Keys are split over blocks (split-K) so that a
//     few anchor tiles still fill the GPU; merge_partials_kernel (partials.cuh) merges the
//     splits and adds the separate positive column:
//       loss = LSE - l_pos, grad_q = s (a / l - k_pos), d/ds = c / l - d_pos, d/dbeta = 0,
//       d/dpositive = s (p_pos - 1) q.
//   dense_keys_grad_kernel: block (tile of 8 keys, dim slice) loops over tiles of 64 anchors,
//     recomputes p_bj = exp(l_bj - lse_b) from the same tiled dots and accumulates
//       grad_key_j = s sum_b g_b (p_bj - [target_b == j]) q_b   in registers.
// Dimensions beyond kThreads * kMaxDpt = 2048 go to further slices (grid.z / grid.y), which
// recompute the dots: only the accumulators are sliced.
// dense_contrast_reduced (loss = sum_b c_b L_b) runs both kernels in its forward, the second one
// with grad_rows = c, and scales the per-row gradients by c.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <ATen/ops/empty.h>

#include "common/reduced.h"
#include "cuda/elements.cuh"
#include "cuda/launch.cuh"
#include "cuda/layout.cuh"
#include "cuda/partials.cuh"
#include "cuda/reduce.cuh"
#include "cuda/softmax.cuh"

namespace dcdkernels {
namespace gpu {
namespace {

constexpr int kThreads = 256;
constexpr int kOwn = kThreads / kWarp;  // rows a block owns: one per warp
constexpr int kTile = 2 * kWarp;        // streamed rows per tile: two per lane
constexpr int kChunk = 32;              // dims per shared-memory chunk of the dots
constexpr int kMaxDpt = 8;              // accumulator dims per thread and row
constexpr int kDenseCtasPerSm = 4;      // grid target of the forward's key split
static_assert(kOwn * kChunk == kThreads, "one own-row element per thread and chunk");

struct TileSmem {
  float own[kOwn][kChunk + 1];  // +1: conflict-free column reads
  float oth[kTile][kChunk + 1];
  float w[kOwn][kTile];  // per own row, the weight of each streamed row of the tile
  float scale[kOwn];     // per own row, the rescale factor of its accumulator
};

// Where a thread of a dense kernel block works: own row `warp` of the block's tile of kOwn rows
// [first, first + n_own) (of `rows` rows: anchors or keys; tile `tile`), streamed rows by `lane`,
// and the dims from dim0 of its slice `slice` of the accumulators.
struct OwnTile {
  int warp, lane;
  int64_t first;
  int n_own;
  int dim0;
};

template <int DPT>
__device__ __forceinline__ OwnTile own_tile(unsigned tile, int64_t rows, unsigned slice) {
  OwnTile o;
  o.warp = threadIdx.x / kWarp;
  o.lane = threadIdx.x % kWarp;
  o.first = static_cast<int64_t>(tile) * kOwn;
  o.n_own = static_cast<int>(min(static_cast<int64_t>(kOwn), rows - o.first));
  o.dim0 = slice * kThreads * DPT;
  return o;
}

// dots[h] = <own row own0 + warp, streamed row oth0 + lane + 32 h> over all D. Rows past n_own /
// n_oth read as zeros. Starts with a barrier: the previous tile's shared data is consumed.
__device__ __forceinline__ void tile_dots(const Matrix& own, int64_t own0, int n_own, const Matrix& oth, int64_t oth0,
                                          int n_oth, int D, TileSmem& sm, float (&dots)[2]) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  dots[0] = dots[1] = 0.f;
  for (int d0 = 0; d0 < D; d0 += kChunk) {
    __syncthreads();
    {
      const int r = threadIdx.x / kChunk, e = threadIdx.x % kChunk;
      sm.own[r][e] = (r < n_own && d0 + e < D) ? own.at(own0 + r, d0 + e) : 0.f;
    }
    for (int k = threadIdx.x; k < kTile * kChunk; k += kThreads) {
      const int r = k / kChunk, e = k % kChunk;
      sm.oth[r][e] = (r < n_oth && d0 + e < D) ? oth.at(oth0 + r, d0 + e) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int e = 0; e < kChunk; ++e) {
      const float a = sm.own[warp][e];
      dots[0] = fmaf(a, sm.oth[lane][e], dots[0]);
      dots[1] = fmaf(a, sm.oth[lane + kWarp][e], dots[1]);
    }
  }
}

// acc[r][i] += sum_j sm.w[r][j] * rows[row0 + j][dim0 + threadIdx.x + i * kThreads], j < n:
// this thread's dims of the weighted sum of a tile's streamed rows, for every own row.
template <int DPT>
__device__ __forceinline__ void accumulate_tile(float (&acc)[kOwn][DPT], const TileSmem& sm, const Matrix& rows,
                                                int64_t row0, int n, int dim0, int D) {
  if (dim0 + static_cast<int>(threadIdx.x) >= D) return;  // no dims for this thread
  for (int j = 0; j < n; ++j) {
    float v[DPT];
#pragma unroll
    for (int i = 0; i < DPT; ++i) {
      const int d = dim0 + threadIdx.x + i * kThreads;
      v[i] = d < D ? rows.at(row0 + j, d) : 0.f;
    }
#pragma unroll
    for (int r = 0; r < kOwn; ++r) {
      const float w = sm.w[r][j];
#pragma unroll
      for (int i = 0; i < DPT; ++i) acc[r][i] = fmaf(w, v[i], acc[r][i]);
    }
  }
}

struct DenseParams {
  Matrix anchor, keys;
  int dim;
  int64_t split_keys;  // keys per split (a multiple of kTile)
  int nsplit;
  const float* logit_scale;
  const float* bias;  // null: 0
  bool compute_grad;
  float* partials;  // (B, nsplit, stride), layout of PartialSlot
  int64_t stride;
};

// Min 1 block per SM: ptxas takes the registers acc[kOwn][DPT] needs (no spills).
template <int DPT>
__global__ void __launch_bounds__(kThreads, 1) dense_partials_kernel(const DenseParams p) {
  __shared__ TileSmem sm;
  // (k0, k1 before own_tile: in the other order ptxas takes 127 registers instead of 123 at DPT = 8)
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * p.split_keys, k1 = min(k0 + p.split_keys, p.keys.rows);
  const auto [warp, lane, a0, n_own, dim0] = own_tile<DPT>(blockIdx.y, p.anchor.rows, blockIdx.z);
  const int D = p.dim;
  const float s = *p.logit_scale, beta = p.bias ? *p.bias : 0.f;

  float m = -INFINITY, l = 0.f, c = 0.f;  // online state of anchor a0 + warp (the same in its lanes)
  float acc[kOwn][DPT];
  zero(acc);

  for (int64_t kt = k0; kt < k1; kt += kTile) {
    const int n = static_cast<int>(min(static_cast<int64_t>(kTile), k1 - kt));
    float dots[2];
    tile_dots(p.anchor, a0, n_own, p.keys, kt, n, D, sm, dots);
    const float l0 = lane < n ? fmaf(s, dots[0], beta) : -INFINITY;
    const float l1 = lane + kWarp < n ? fmaf(s, dots[1], beta) : -INFINITY;
    const float m_new = fmaxf(m, warp_max(fmaxf(l0, l1)));  // finite: the tile has a key
    const float f = rescale(m, m_new);
    const float w0 = __expf(l0 - m_new), w1 = __expf(l1 - m_new);
    l = l * f + warp_sum(w0 + w1);
    m = m_new;
    if (!p.compute_grad) continue;
    c = c * f + warp_sum(w0 * dots[0] + w1 * dots[1]);
    sm.w[warp][lane] = w0;
    sm.w[warp][lane + kWarp] = w1;
    if (lane == 0) sm.scale[warp] = f;
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kOwn; ++r) {
#pragma unroll
      for (int i = 0; i < DPT; ++i) acc[r][i] *= sm.scale[r];
    }
    accumulate_tile<DPT>(acc, sm, p.keys, kt, n, dim0, D);
  }

  // Partial of (anchor, split): the scalars once (slice 0), each slice its dims of a.
  if (warp < n_own && blockIdx.z == 0 && lane == 0) {
    float* out = p.partials + ((a0 + warp) * p.nsplit + blockIdx.x) * p.stride;
    out[kM] = m, out[kL] = l, out[kC] = c, out[kLoss] = 0.f, out[kGb] = 0.f;
  }
  if (!p.compute_grad) return;
#pragma unroll
  for (int r = 0; r < kOwn; ++r) {  // unrolled: acc stays in registers
    if (r >= n_own) break;
    float* out = p.partials + ((a0 + r) * p.nsplit + blockIdx.x) * p.stride + kScalars;
#pragma unroll
    for (int i = 0; i < DPT; ++i) {
      const int d = dim0 + threadIdx.x + i * kThreads;
      if (d < D) out[d] = acc[r][i];
    }
  }
}

struct KeysGradParams {
  Matrix anchor, keys;
  int dim;
  const int64_t* target;  // null with a separate positive
  int64_t target_stride;
  const float* lse;        // (B,)
  const float* grad_rows;  // (B,)
  const float* logit_scale;
  const float* bias;
  float* grad_keys;  // (M, D)
};

template <int DPT>
__global__ void __launch_bounds__(kThreads, 1) dense_keys_grad_kernel(const KeysGradParams p) {
  __shared__ TileSmem sm;
  const auto [warp, lane, j0, n_own, dim0] = own_tile<DPT>(blockIdx.x, p.keys.rows, blockIdx.y);
  const int D = p.dim;
  const int64_t B = p.anchor.rows;
  const float s = *p.logit_scale, beta = p.bias ? *p.bias : 0.f;

  float acc[kOwn][DPT];
  zero(acc);
  for (int64_t bt = 0; bt < B; bt += kTile) {
    const int n = static_cast<int>(min(static_cast<int64_t>(kTile), B - bt));
    float dots[2];  // <key j0 + warp, anchor bt + lane + 32 h>
    tile_dots(p.keys, j0, n_own, p.anchor, bt, n, D, sm, dots);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int jj = lane + h * kWarp;
      float w = 0.f;
      if (jj < n) {
        const int64_t b = bt + jj;
        const float g = p.grad_rows[b];
        w = g * __expf(fmaf(s, dots[h], beta) - p.lse[b]);
        if (p.target && p.target[b * p.target_stride] == j0 + warp) w -= g;
      }
      sm.w[warp][jj] = w;
    }
    __syncthreads();
    accumulate_tile<DPT>(acc, sm, p.anchor, bt, n, dim0, D);
  }
#pragma unroll
  for (int r = 0; r < kOwn; ++r) {  // unrolled: acc stays in registers
    if (r >= n_own) break;
#pragma unroll
    for (int i = 0; i < DPT; ++i) {
      const int d = dim0 + threadIdx.x + i * kThreads;
      if (d < D) p.grad_keys[(j0 + r) * D + d] = s * acc[r][i];
    }
  }
}

// Accumulator dims per thread for D, and the number of dim slices.
struct DimSlices {
  int dpt;
  int slices;
};

DimSlices dim_slices(int64_t D) {
  int dpt = 1;
  while (dpt < kMaxDpt && int64_t(kThreads) * dpt < D) dpt *= 2;
  return DimSlices{dpt, static_cast<int>(ceil_div(D, int64_t(kThreads) * dpt))};
}

// Calls f(std::integral_constant<int, dpt>) for dpt in {1, 2, 4, 8}.
template <typename F>
void dispatch_dpt(int dpt, F&& f) {
  dispatch_nv<kMaxDpt>(dpt, f);
}

struct DenseInputs {
  int64_t B, M, D;
  Matrix anchor, keys;
  const float* logit_scale;
  const float* bias;
};

DenseInputs check_inputs(const at::Tensor& anchor, const at::Tensor& keys, const c10::optional<at::Tensor>& target,
                         const c10::optional<at::Tensor>& positive, const at::Tensor& logit_scale,
                         const c10::optional<at::Tensor>& bias) {
  DenseInputs in{};
  in.anchor = matrix_of(anchor, "anchor");
  in.keys = matrix_of(keys, "keys");
  in.B = anchor.size(0);
  in.D = anchor.size(1);
  in.M = keys.size(0);
  TORCH_CHECK(keys.device() == anchor.device(), "keys must be on ", anchor.device(), ", got ", keys.device());
  TORCH_CHECK(keys.size(1) == in.D, "keys have D = ", keys.size(1), " but the anchors have D = ", in.D);
  TORCH_CHECK(target.has_value() != positive.has_value(), "give exactly one of target and positive");
  if (target.has_value()) {
    TORCH_CHECK(target->device() == anchor.device() && target->scalar_type() == at::kLong && target->dim() == 1 &&
                    target->size(0) == in.B,
                "target must be a (B,) = (", in.B, ",) int64 tensor on ", anchor.device());
  } else {
    TORCH_CHECK(positive->device() == anchor.device() && positive->dim() == 2 && positive->size(0) == in.B &&
                    positive->size(1) == in.D,
                "positive must be (B, D) = (", in.B, ", ", in.D, ") on ", anchor.device(), ", got shape ",
                positive->sizes());
  }
  TORCH_CHECK(in.D > 0 || in.B == 0, "anchor has D = 0");
  TORCH_CHECK(ceil_div(in.B, kOwn) <= 65535, "dense_contrast: at most ", int64_t(65535) * kOwn,
              " anchors per launch (grid.y), got ", in.B);
  in.logit_scale = device_scalar(logit_scale, anchor, "logit_scale");
  in.bias = bias.has_value() ? device_scalar(*bias, anchor, "bias") : nullptr;
  return in;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dense_contrast_cuda(
    const at::Tensor& anchor, const at::Tensor& keys, const c10::optional<at::Tensor>& target,
    const c10::optional<at::Tensor>& positive, const at::Tensor& logit_scale, const c10::optional<at::Tensor>& bias,
    bool compute_grad) {
  TORCH_CHECK(anchor.is_cuda(), "anchor must be a CUDA tensor, got ", anchor.device());
  const c10::cuda::CUDAGuard guard(anchor.device());
  const DenseInputs in = check_inputs(anchor, keys, target, positive, logit_scale, bias);
  const int64_t B = in.B, M = in.M, D = in.D;
  const auto opts = anchor.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({B}, opts), lse = at::empty({B}, opts);
  // Outputs never alias (a custom op's outputs must not): a distinct empty tensor each.
  at::Tensor grad_anchor = compute_grad ? at::empty({B, D}, opts) : at::empty({0}, opts);
  at::Tensor grad_positive = compute_grad && positive.has_value() ? at::empty({B, D}, opts) : at::empty({0}, opts);
  at::Tensor grad_scalars = compute_grad ? at::empty({2, B}, opts) : at::empty({0}, opts);
  if (B == 0) return {loss, lse, grad_anchor, grad_positive, grad_scalars};

  // Key split: about kDenseCtasPerSm blocks per SM over the anchor tiles, whole key tiles each.
  const int64_t anchor_tiles = ceil_div(B, kOwn);
  const int64_t key_tiles = std::max<int64_t>(1, ceil_div(M, kTile));
  const int64_t want = ceil_div(int64_t(kDenseCtasPerSm) * sm_count(), anchor_tiles);
  const int64_t splits = std::max<int64_t>(1, std::min({want, key_tiles, int64_t(kMaxChunks)}));
  const int64_t split_keys = ceil_div(key_tiles, splits) * kTile;

  DenseParams p{};
  p.anchor = in.anchor;
  p.keys = in.keys;
  p.dim = static_cast<int>(D);
  p.split_keys = split_keys;
  p.nsplit = static_cast<int>(std::max<int64_t>(1, ceil_div(M, split_keys)));
  p.logit_scale = in.logit_scale;
  p.bias = in.bias;
  p.compute_grad = compute_grad;
  p.stride = kScalars + (compute_grad ? D : 0);
  const at::Tensor partials = at::empty({B * p.nsplit * p.stride}, opts);
  p.partials = partials.data_ptr<float>();

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const DimSlices ds = dim_slices(D);
  // Without gradients there is no accumulator to slice: one slice computes the statistics.
  const dim3 grid(p.nsplit, static_cast<unsigned>(anchor_tiles), compute_grad ? ds.slices : 1);
  dispatch_dpt(ds.dpt, [&](auto dpt_tag) {
    dense_partials_kernel<decltype(dpt_tag)::value><<<grid, kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  MergeParams mp{{p.partials, p.nsplit, p.stride, B, p.dim, p.logit_scale, p.bias, compute_grad}};
  mp.anchor = in.anchor;
  if (target.has_value()) {
    mp.pos = PositiveRows{in.keys, target->data_ptr<int64_t>(), target->stride(0), false};
  } else {
    mp.pos = PositiveRows{matrix_of(*positive, "positive"), nullptr, 0, true};
  }
  mp.loss = loss.data_ptr<float>();
  mp.lse = lse.data_ptr<float>();
  mp.grad_anchor = compute_grad ? grad_anchor.data_ptr<float>() : nullptr;
  mp.grad_scalars = compute_grad ? grad_scalars.data_ptr<float>() : nullptr;
  mp.grad_positive = compute_grad && positive.has_value() ? grad_positive.data_ptr<float>() : nullptr;
  merge_partials_kernel<false><<<static_cast<unsigned>(B), 256, 0, stream>>>(mp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, lse, grad_anchor, grad_positive, grad_scalars};
}

at::Tensor dense_contrast_backward_keys_cuda(const at::Tensor& anchor, const at::Tensor& keys,
                                             const c10::optional<at::Tensor>& target,
                                             const c10::optional<at::Tensor>& positive, const at::Tensor& logit_scale,
                                             const c10::optional<at::Tensor>& bias, const at::Tensor& lse,
                                             const at::Tensor& grad_rows) {
  TORCH_CHECK(anchor.is_cuda(), "anchor must be a CUDA tensor, got ", anchor.device());
  const c10::cuda::CUDAGuard guard(anchor.device());
  const DenseInputs in = check_inputs(anchor, keys, target, positive, logit_scale, bias);
  const int64_t B = in.B, M = in.M, D = in.D;
  for (const at::Tensor* t : {&lse, &grad_rows}) {
    TORCH_CHECK(t->device() == anchor.device() && t->scalar_type() == at::kFloat && t->dim() == 1 && t->size(0) == B,
                "lse and grad_rows must be (B,) = (", B, ",) float32 tensors on ", anchor.device());
  }
  const at::Tensor lse_c = lse.contiguous(), g_c = grad_rows.contiguous();
  at::Tensor grad_keys = at::empty({M, D}, anchor.options().dtype(at::kFloat));
  if (M == 0 || D == 0) return grad_keys;

  KeysGradParams p{};
  p.anchor = in.anchor;
  p.keys = in.keys;
  p.dim = static_cast<int>(D);
  p.target = target.has_value() ? target->data_ptr<int64_t>() : nullptr;
  p.target_stride = target.has_value() ? target->stride(0) : 0;
  p.lse = lse_c.data_ptr<float>();
  p.grad_rows = g_c.data_ptr<float>();
  p.logit_scale = in.logit_scale;
  p.bias = in.bias;
  p.grad_keys = grad_keys.data_ptr<float>();

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const DimSlices ds = dim_slices(D);
  const dim3 grid(static_cast<unsigned>(ceil_div(M, kOwn)), ds.slices);
  dispatch_dpt(ds.dpt, [&](auto dpt_tag) {
    dense_keys_grad_kernel<decltype(dpt_tag)::value><<<grid, kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_keys;
}

// loss = sum_b c_b L_b and its gradients, all in the forward: the two kernels above composed,
// the key gradient with grad_rows = c.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
dense_contrast_reduced_cuda(const at::Tensor& anchor, const at::Tensor& keys, const c10::optional<at::Tensor>& target,
                            const c10::optional<at::Tensor>& positive, const at::Tensor& logit_scale,
                            const c10::optional<at::Tensor>& bias, const at::Tensor& row_weight, bool keys_grad) {
  TORCH_CHECK(row_weight.device() == anchor.device() && row_weight.dim() == 1 && row_weight.size(0) == anchor.size(0),
              "row_weight must be a (B,) tensor on ", anchor.device());
  return compose_reduced([&] { return dense_contrast_cuda(anchor, keys, target, positive, logit_scale, bias, true); },
                         [&](const at::Tensor& lse, const at::Tensor& c) {
                           return dense_contrast_backward_keys_cuda(anchor, keys, target, positive, logit_scale, bias,
                                                                    lse, c);
                         },
                         row_weight.to(at::kFloat), keys_grad, positive.has_value());
}

}  // namespace
}  // namespace gpu
}  // namespace dcdkernels

TORCH_LIBRARY_IMPL(dcdkernels_C, CUDA, m) {
  m.impl("dense_contrast", &dcdkernels::gpu::dense_contrast_cuda);
  m.impl("dense_contrast_backward_keys", &dcdkernels::gpu::dense_contrast_backward_keys_cuda);
  m.impl("dense_contrast_reduced", &dcdkernels::gpu::dense_contrast_reduced_cuda);
}
