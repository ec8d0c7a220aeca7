// CUDA kernel of dual_sampled_contrast (docs/math.md §1c; contract: csrc/KERNELS.md).
//
// Both CRD directions at the same columns: the student anchor z_s against bank_t rows
// (l^s_k = s <z_s, bank_t[idx_k]> + beta) and the teacher anchor z_t against bank_s rows
// (l^t_k = s <z_t, bank_s[idx_k]> + beta), plus KL(p^t || p^s), from one read of each row of
// each bank. Organisation as in sampled_contrast.cu: split-K blocks of row groups that keep
// online states in registers (dual_partials_kernel), then one block per anchor merges the
// chunks (dual_merge_kernel).
//
// KL per row, with f_k = l^t_k - l^s_k, w^t_k = exp(l^t_k - m_t), L_t = sum_k w^t_k:
//   KL = F - LSE^t + LSE^s,  F = sum_k p^t_k f_k = Wf / L_t
//   dKL/dz_s = s sum_k (p^s_k - p^t_k) bank_t_k     = s (As / L_s - Bt / L_t)
//   dKL/dz_t = s sum_k p^t_k (f_k - F) bank_s_k     = s (E - F At) / L_t
//   dKL/ds   = sum_k (p^s_k - p^t_k) d^s_k + sum_k p^t_k (f_k - F) d^t_k
//            = C_s / L_s - H / L_t + (U - F C_t) / L_t
// where As = sum w^s bank_t_k, At = sum w^t bank_s_k, Bt = sum w^t bank_t_k,
// E = sum w^t f_k bank_s_k, C = sum w d, H = sum w^t d^s_k, Wf = sum w^t f_k,
// U = sum w^t f_k d^t_k (all rescaled with m_t, except As and C_s with m_s). dKL/dbeta = 0.
// Rows out of range are never read: their columns are absent in both directions, and every
// sum above runs over the present columns only (csrc/KERNELS.md).
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
constexpr int kMaxFloatsPerThread = kDualMaxFloatsPerThread;

// Rows (of each bank) a group gathers per step.
template <int NV>
constexpr int rows_per_step() {
  return NV >= 2 ? 1 : 2;
}

// Scalar slots of a dual partial: per direction (s: student anchor vs bank_t, t: teacher
// anchor vs bank_s) max m, sum l = sum exp(l - m), C = sum exp(l - m) d, and the NCE sums
// Gd = sum g d, Loss, Gb = sum g; then the KL sums of the teacher weights Wf, H, U.
enum DualSlot : int {
  kMs = 0,
  kLs,
  kCs,
  kGds,
  kLosss,
  kGbs,
  kMt,
  kLt,
  kCt,
  kGdt,
  kLosst,
  kGbt,
  kWf,
  kH,
  kU,
  kDualScalars
};

// Which direction's max rescales a scalar slot when states merge: 0 = none (max itself or an
// NCE sum), 1 = student, 2 = teacher.
__device__ __forceinline__ int slot_direction(int slot) {
  switch (slot) {
    case kLs:
    case kCs:
      return 1;
    case kLt:
    case kCt:
    case kWf:
    case kH:
    case kU:
      return 2;
    default:
      return 0;
  }
}

// The D-vectors a partial accumulates (only with gradients), by slot; -1 = not needed.
struct VectorSlots {
  int As = -1, At = -1;  // softmax-weighted rows (InfoNCE gradient, KL gradient): s, t
  int Gs = -1, Gt = -1;  // NCE: sum g^s bank_t rows, sum g^t bank_s rows
  int Bt = -1, E = -1;   // KL: sum w^t bank_t rows, sum w^t f bank_s rows
  int count = 0;

  VectorSlots() = default;
  VectorSlots(bool grad, bool nce, bool kl) {
    if (!grad) return;
    if (!nce || kl) As = count++, At = count++;
    if (nce) Gs = count++, Gt = count++;
    if (kl) Bt = count++, E = count++;
  }

  // Which direction's max rescales slot v when states merge (as slot_direction).
  __host__ __device__ int direction(int v) const { return v == As ? 1 : (v == Gs || v == Gt) ? 0 : 2; }
};

struct DualParams : GatherParams {  // log_z under NCE: (log Z_s, log Z_t)
  Matrix zs, zt;
  const void* bank_s;
  const void* bank_t;
  int64_t stride_s, stride_t;  // elements between bank rows
  bool kl;
  VectorSlots vs;  // the partial: kDualScalars scalars, then vs.count D-vectors
};

// Min 1 block per SM: ptxas takes the registers the unrolled state needs (no spills; 64-160).
template <typename TS, typename TT, int NV>
__global__ void __launch_bounds__(kMaxGroup, 1) dual_partials_kernel(const DualParams p) {
  constexpr int V = 16 / static_cast<int>(sizeof(TS) > sizeof(TT) ? sizeof(TS) : sizeof(TT));
  constexpr int R = rows_per_step<NV>();
  extern __shared__ float smem[];
  const GatherPos g = gather_pos(p);
  const int tpr = g.tpr, groups = g.groups, t = g.t, D = p.dim;
  const TS* bank_s = static_cast<const TS*>(p.bank_s);
  const TT* bank_t = static_cast<const TT*>(p.bank_t);
  const VectorSlots& vs = p.vs;
  const bool soft_vecs = vs.As >= 0, nce_vecs = vs.Gs >= 0, kl_vecs = vs.Bt >= 0;

  float zs[NV][V], zt[NV][V];
  load_slice(zs, p.zs, g.b, t, tpr, D);
  load_slice(zt, p.zt, g.b, t, tpr, D);
  const float s = *p.logit_scale, beta = p.bias ? *p.bias : 0.f;
  const float log_z_s = p.nce ? p.log_z[0] : 0.f, log_z_t = p.nce ? p.log_z[1] : 0.f;

  float st[kDualScalars];
#pragma unroll
  for (int i = 0; i < kDualScalars; ++i) st[i] = 0.f;
  st[kMs] = st[kMt] = -INFINITY;
  float as[NV][V], at[NV][V], gs[NV][V], gt[NV][V], bt[NV][V], ev[NV][V];
  zero(as), zero(at), zero(gs), zero(gt), zero(bt), zero(ev);

  int parity = 0;
  for (int64_t base = g.c0; base < g.c1; base += groups * R, parity ^= 1) {
    const int64_t col0 = base + g.group * R;
    int64_t row[R];
    step_rows(row, p.columns, g.b, col0, g.c1);
    RowFrag<TS, V> xs[R][NV];  // bank_s rows: teacher direction
    RowFrag<TT, V> xt[R][NV];  // bank_t rows: student direction
    load_frags(xs, bank_s, p.stride_s, row, t, tpr, D, p.vector_loads);
    load_frags(xt, bank_t, p.stride_t, row, t, tpr, D, p.vector_loads);

    // d[r] = d^s (z_s . bank_t row), d[R + r] = d^t (z_t . bank_s row)
    float d[2 * R];
#pragma unroll
    for (int r = 0; r < R; ++r) d[r] = slice_dot(zs, xt[r]), d[R + r] = slice_dot(zt, xs[r]);
    group_sum<2 * R>(d, tpr, smem, parity);

    float ls[R], lt[R], ws[R], wt[R];
#pragma unroll
    for (int r = 0; r < R; ++r) ls[r] = logit_of(row[r], d[r], s, beta), lt[r] = logit_of(row[r], d[R + r], s, beta);
    const float fs = online_absorb<R>(st[kMs], st[kLs], ls, ws);
    const float ft = online_absorb<R>(st[kMt], st[kLt], lt, wt);
    float gsw[R], gtw[R], wtf[R];  // NCE dL/dl per direction; KL w^t f
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const bool present = row[r] >= 0;
      gsw[r] = gtw[r] = 0.f;
      if (p.nce && present) {
        gsw[r] = nce_term(ls[r], col0 + r == 0, log_z_s, p.nc, st[kLosss]);
        gtw[r] = nce_term(lt[r], col0 + r == 0, log_z_t, p.nc, st[kLosst]);
      }
      wtf[r] = present ? wt[r] * (lt[r] - ls[r]) : 0.f;
    }
    if (p.kl) {
      st[kWf] *= ft;
#pragma unroll
      for (int r = 0; r < R; ++r) st[kWf] += wtf[r];
    }
    if (!p.compute_grad) continue;
    st[kCs] *= fs, st[kCt] *= ft;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      st[kCs] = fmaf(ws[r], d[r], st[kCs]);
      st[kCt] = fmaf(wt[r], d[R + r], st[kCt]);
    }
    if (p.nce) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        st[kGds] = fmaf(gsw[r], d[r], st[kGds]);
        st[kGdt] = fmaf(gtw[r], d[R + r], st[kGdt]);
        st[kGbs] += gsw[r];
        st[kGbt] += gtw[r];
      }
    }
    if (p.kl) {
      st[kH] *= ft, st[kU] *= ft;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        st[kH] = fmaf(wt[r], d[r], st[kH]);
        st[kU] = fmaf(wtf[r], d[R + r], st[kU]);
      }
    }
    if (soft_vecs) axpy(as, fs, ws, xt), axpy(at, ft, wt, xs);
    if (nce_vecs) axpy(gs, 1.f, gsw, xt), axpy(gt, 1.f, gtw, xs);
    if (kl_vecs) axpy(bt, ft, wt, xt), axpy(ev, ft, wtf, xs);
  }

  // One partial per block. `each_vector` calls f(slot, slice) for the D-vectors this call keeps.
  float* out = p.partials + static_cast<int64_t>(blockIdx.x) * p.stride;
  auto each_vector = [&](auto&& f) {
    if (vs.As >= 0) f(vs.As, as);
    if (vs.At >= 0) f(vs.At, at);
    if (vs.Gs >= 0) f(vs.Gs, gs);
    if (vs.Gt >= 0) f(vs.Gt, gt);
    if (vs.Bt >= 0) f(vs.Bt, bt);
    if (vs.E >= 0) f(vs.E, ev);
  };
  if (groups == 1) {
    if (threadIdx.x == 0) {
#pragma unroll
      for (int i = 0; i < kDualScalars; ++i) out[i] = st[i];
    }
    each_vector([&](int v, const float (&slice)[NV][V]) { store_slice(out + kDualScalars + v * D, slice, t, tpr, D); });
    return;
  }
  // Several groups: stage their states in shared memory and merge them in group order.
  __shared__ float scratch[kWarp];
  const int span = tpr * NV * V;                    // elements covered by a group (>= D)
  float* gst = smem;                                // [groups][kDualScalars]
  float* gvec = gst + groups * kDualScalars;        // [groups][vs.count][span]
  float* factor = gvec + groups * vs.count * span;  // [3][groups]: none, student, teacher
  if (t == 0) {
#pragma unroll
    for (int i = 0; i < kDualScalars; ++i) gst[g.group * kDualScalars + i] = st[i];
  }
  each_vector(
      [&](int v, const float (&slice)[NV][V]) { stage_slice(gvec + (g.group * vs.count + v) * span, slice, t, tpr); });
  __syncthreads();
  const bool owner = threadIdx.x < groups;
  const float* own = gst + threadIdx.x * kDualScalars;
  const float ms = block_max(owner ? own[kMs] : -INFINITY, scratch);
  const float mt = block_max(owner ? own[kMt] : -INFINITY, scratch);
  if (owner) {
    factor[threadIdx.x] = 1.f;
    factor[groups + threadIdx.x] = rescale(own[kMs], ms);
    factor[2 * groups + threadIdx.x] = rescale(own[kMt], mt);
  }
  __syncthreads();
  float* tot = scratch;  // kDualScalars <= 32 floats, free again after block_max
  sum_slots(
      gst, groups, kDualScalars, kDualScalars, [&](int i, int k) { return factor[slot_direction(i) * groups + k]; },
      tot);
  if (threadIdx.x < kDualScalars) {
    const int i = threadIdx.x;
    out[i] = i == kMs ? ms : i == kMt ? mt : tot[i];
  }
  for (int v = 0; v < vs.count; ++v) {
    const float* f = factor + vs.direction(v) * groups;
    merge_staged(out + kDualScalars + v * D, gvec + v * span, vs.count * span, groups, D, [&](int k) { return f[k]; });
  }
}

struct DualMergeParams : MergeInputs {
  Matrix zs, zt, bank_s, bank_t;
  const int64_t* index;  // positive row of anchor b: index[b * index_stride]
  int64_t index_stride;
  bool nce, kl;
  VectorSlots vs;
  float* losses;        // (3, B)
  float* lse;           // (2, B)
  float* grad_anchors;  // (4, B, D)
  float* grad_scalars;  // (2, 3, B)
};

// One block per anchor: merges the chunks of both directions and the KL sums, and writes the
// outputs of the contract (formulas at the top of this file; InfoNCE and NCE as in
// merge_partials_kernel). Rows out of range are absent columns (csrc/KERNELS.md): the partials
// skipped them; an absent positive adds no -l_0 / -d_0 / -row_0 here, and without a present
// column (L = 0) every sum over the columns is 0: lse -inf, InfoNCE loss -inf, NCE loss 0, KL 0.
__global__ void __launch_bounds__(256) dual_merge_kernel(const DualMergeParams p) {
  __shared__ float scratch[kWarp];
  __shared__ float factor[3][kMaxChunks];  // none, student, teacher: exp(m_chunk - m)
  __shared__ float tot[kDualScalars];
  const int64_t b = blockIdx.x, B = p.B;
  const int D = p.dim;
  const float* part = p.partials + b * p.nchunks * p.stride;
  const float s = *p.logit_scale, beta = p.bias ? *p.bias : 0.f;
  const VectorSlots& vs = p.vs;

  int64_t prow = p.index[b * p.index_stride];
  prow = (prow >= 0 && prow < p.bank_s.rows) ? prow : -1;
  // InfoNCE: dots with the positive rows (student: bank_t row, teacher: bank_s row).
  float d0s = 0.f, d0t = 0.f;
  if (!p.nce && prow >= 0) {
    float as = 0.f, at = 0.f;
    for (int e = threadIdx.x; e < D; e += blockDim.x) {
      as = fmaf(p.zs.at(b, e), p.bank_t.at(prow, e), as);
      at = fmaf(p.zt.at(b, e), p.bank_s.at(prow, e), at);
    }
    d0s = block_sum(as, scratch);
    d0t = block_sum(at, scratch);
  }

  float ms = -INFINITY, mt = -INFINITY;
  for (int c = threadIdx.x; c < p.nchunks; c += blockDim.x) {
    ms = fmaxf(ms, part[c * p.stride + kMs]);
    mt = fmaxf(mt, part[c * p.stride + kMt]);
  }
  ms = block_max(ms, scratch);
  mt = block_max(mt, scratch);
  for (int c = threadIdx.x; c < p.nchunks; c += blockDim.x) {
    factor[0][c] = 1.f;
    factor[1][c] = rescale(part[c * p.stride + kMs], ms);
    factor[2][c] = rescale(part[c * p.stride + kMt], mt);
  }
  __syncthreads();
  sum_slots(part, p.nchunks, p.stride, kDualScalars, [&](int i, int c) { return factor[slot_direction(i)][c]; }, tot);

  const float Ls = tot[kLs], Lt = tot[kLt];
  const bool empty = !(Ls > 0.f);  // the directions share their present columns
  const float lse_s = ms + __logf(Ls), lse_t = mt + __logf(Lt);
  const float inv_ls = empty ? 0.f : 1.f / Ls, inv_lt = empty ? 0.f : 1.f / Lt;
  const float F = tot[kWf] * inv_lt;
  if (threadIdx.x == 0) {
    p.lse[b] = lse_s;
    p.lse[B + b] = lse_t;
    if (p.nce) {
      p.losses[b] = tot[kLosss];
      p.losses[B + b] = tot[kLosst];
    } else {
      p.losses[b] = prow >= 0 ? lse_s - fmaf(s, d0s, beta) : lse_s;
      p.losses[B + b] = prow >= 0 ? lse_t - fmaf(s, d0t, beta) : lse_t;
    }
    p.losses[2 * B + b] = p.kl && !empty ? F - lse_t + lse_s : 0.f;
    if (p.compute_grad) {
      // grad_scalars[(which * 3 + term) * B + b]: which 0 = d/ds, 1 = d/dbeta; term L^s, L^t, KL.
      float* g = p.grad_scalars;
      if (p.nce) {
        g[0 * B + b] = tot[kGds], g[3 * B + b] = tot[kGbs];
        g[1 * B + b] = tot[kGdt], g[4 * B + b] = tot[kGbt];
      } else {
        // d/dbeta = sum_P p_k - [0 in P]: 1 only when the positive alone is absent.
        const float gbias = !empty && prow < 0 ? 1.f : 0.f;
        g[0 * B + b] = tot[kCs] * inv_ls - d0s, g[3 * B + b] = gbias;
        g[1 * B + b] = tot[kCt] * inv_lt - d0t, g[4 * B + b] = gbias;
      }
      g[2 * B + b] = p.kl ? tot[kCs] * inv_ls - tot[kH] * inv_lt + (tot[kU] - F * tot[kCt]) * inv_lt : 0.f;
      g[5 * B + b] = 0.f;
    }
  }
  if (!p.compute_grad) return;

  float* g_ls = p.grad_anchors + b * D;             // dL^s/dz_s
  float* g_lt = p.grad_anchors + (B + b) * D;       // dL^t/dz_t
  float* g_kls = p.grad_anchors + (2 * B + b) * D;  // dKL/dz_s
  float* g_klt = p.grad_anchors + (3 * B + b) * D;  // dKL/dz_t
  for (int e = threadIdx.x; e < D; e += blockDim.x) {
    // Element e of vector slot v merged over the chunks.
    auto merged = [&](int v) {
      const float* f = factor[vs.direction(v)];
      float a = 0.f;
      for (int c = 0; c < p.nchunks; ++c) a = fmaf(f[c], part[c * p.stride + kDualScalars + v * D + e], a);
      return a;
    };
    const float As = vs.As >= 0 ? merged(vs.As) : 0.f;
    const float At = vs.At >= 0 ? merged(vs.At) : 0.f;
    if (p.nce) {
      g_ls[e] = s * merged(vs.Gs);
      g_lt[e] = s * merged(vs.Gt);
    } else {
      const float rt0 = prow >= 0 ? p.bank_t.at(prow, e) : 0.f;
      const float rs0 = prow >= 0 ? p.bank_s.at(prow, e) : 0.f;
      g_ls[e] = s * (As * inv_ls - rt0);
      g_lt[e] = s * (At * inv_lt - rs0);
    }
    if (p.kl) {
      g_kls[e] = s * (As * inv_ls - merged(vs.Bt) * inv_lt);
      g_klt[e] = s * (merged(vs.E) - F * At) * inv_lt;
    } else {
      g_kls[e] = 0.f;
      g_klt[e] = 0.f;
    }
  }
}

template <typename TS, typename TT, int NV>
void launch_partials(const DualParams& p, const RowLayout& lay, int64_t B, cudaStream_t stream) {
  constexpr int V = 16 / static_cast<int>(sizeof(TS) > sizeof(TT) ? sizeof(TS) : sizeof(TT));
  constexpr int R = rows_per_step<NV>();
  const int groups = lay.block / lay.tpr;
  // Shared memory: the groups' states and factors for the block merge, or the cross-warp dot scratch.
  const size_t smem = groups > 1 ? sizeof(float) * groups * (kDualScalars + p.vs.count * lay.tpr * NV * V + 3)
                                 : sizeof(float) * 2 * (2 * R) * kWarp;
  dual_partials_kernel<TS, TT, NV><<<static_cast<unsigned>(B * p.nchunks), lay.block, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dual_sampled_contrast_cuda(
    const at::Tensor& anchor_s, const at::Tensor& anchor_t, const at::Tensor& bank_s, const at::Tensor& bank_t,
    const at::Tensor& index, const at::Tensor& logit_scale, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& log_z, int64_t loss_type, bool compute_kl, int64_t num_negatives, int64_t seed,
    int64_t offset, bool compute_grad, int64_t noise_rows) {
  TORCH_CHECK(anchor_s.is_cuda(), "anchor_s must be a CUDA tensor, got ", anchor_s.device());
  const c10::cuda::CUDAGuard guard(anchor_s.device());
  const Matrix zs = matrix_of(anchor_s, "anchor_s"), zt = matrix_of(anchor_t, "anchor_t");
  const int64_t B = anchor_s.size(0), D = anchor_s.size(1);
  TORCH_CHECK(anchor_t.sizes() == anchor_s.sizes(), "anchor_t has shape ", anchor_t.sizes(), " but anchor_s has ",
              anchor_s.sizes());
  for (const at::Tensor* t : {&anchor_t, &bank_s, &bank_t, &index}) {
    TORCH_CHECK(t->device() == anchor_s.device(), "every tensor must be on ", anchor_s.device(), ", got ", t->device());
  }
  const Matrix ms = matrix_of(bank_s, "bank_s"), mt = matrix_of(bank_t, "bank_t");
  TORCH_CHECK(bank_s.size(1) == D && bank_t.size(1) == D, "the banks must be (N, D) with D = ", D);
  TORCH_CHECK(D <= 1 || (bank_s.stride(1) == 1 && bank_t.stride(1) == 1), "bank rows must be contiguous");
  const int64_t N = bank_t.size(0), noise = noise_rows_or(noise_rows, N, "the banks'");
  TORCH_CHECK(bank_s.size(0) == N, "bank_s has ", bank_s.size(0), " rows but bank_t has ", N);
  TORCH_CHECK(bank_s.scalar_type() == bank_t.scalar_type(), "bank_s (", bank_s.scalar_type(), ") and bank_t (",
              bank_t.scalar_type(), ") must share one dtype");
  const bool nce = nce_loss(loss_type, log_z.has_value(), "log_z = (log Z_s, log Z_t)");
  int64_t cols = 0;
  const ColumnRows columns = column_rows(index, B, num_negatives, seed, offset, N, cols);

  const auto opts = anchor_s.options().dtype(at::kFloat);
  at::Tensor losses = at::empty({3, B}, opts), lse = at::empty({2, B}, opts);
  at::Tensor grad_anchors = compute_grad ? at::empty({4, B, D}, opts) : at::empty({0}, opts);
  at::Tensor grad_scalars = compute_grad ? at::empty({2, 3, B}, opts) : at::empty({0}, opts);
  if (B == 0) return {losses, lse, grad_anchors, grad_scalars};
  TORCH_CHECK(D > 0, "anchor_s has D = 0");

  DualParams p{gather_params(anchor_s, columns, cols, D, logit_scale, bias, log_z, 2, nce, compute_grad, noise),
               zs,
               zt,
               bank_s.data_ptr(),
               bank_t.data_ptr(),
               bank_s.stride(0),
               bank_t.stride(0),
               compute_kl,
               VectorSlots(compute_grad, nce, compute_kl)};
  p.stride = kDualScalars + static_cast<int64_t>(p.vs.count) * D;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // Both banks share one storage dtype (checked above): 3 instantiations instead of 9 keeps the
  // build of this file within a few minutes on a 2-core CI machine.
  const auto step = [](auto nv_tag) { return rows_per_step<decltype(nv_tag)::value>(); };
  const bool aligned = rows_aligned(bank_s, 16) && rows_aligned(bank_t, 16);
  const at::Tensor partials = gather_partials<kMaxFloatsPerThread>(
      p, bank_s, "bank_s", B, aligned, opts, step, [&](auto tag, auto nv_tag, const RowLayout& lay) {
        launch_partials<decltype(tag), decltype(tag), decltype(nv_tag)::value>(p, lay, B, stream);
      });

  DualMergeParams mp{{p.partials, p.nchunks, p.stride, B, p.dim, p.logit_scale, p.bias, compute_grad}};
  mp.zs = zs;
  mp.zt = zt;
  mp.bank_s = ms;
  mp.bank_t = mt;
  mp.index = columns.index;  // column 0 (explicit) or the (B,) positives
  mp.index_stride = columns.stride_b;
  mp.nce = nce;
  mp.kl = compute_kl;
  mp.vs = p.vs;
  mp.losses = losses.data_ptr<float>();
  mp.lse = lse.data_ptr<float>();
  mp.grad_anchors = compute_grad ? grad_anchors.data_ptr<float>() : nullptr;
  mp.grad_scalars = compute_grad ? grad_scalars.data_ptr<float>() : nullptr;
  dual_merge_kernel<<<static_cast<unsigned>(B), 256, 0, stream>>>(mp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {losses, lse, grad_anchors, grad_scalars};
}

}  // namespace
}  // namespace gpu
}  // namespace dcdkernels

TORCH_LIBRARY_IMPL(dcdkernels_C, CUDA, m) {
  m.impl("dual_sampled_contrast", &dcdkernels::gpu::dual_sampled_contrast_cuda);
}
