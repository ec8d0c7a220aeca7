// Pieces of the split-K gather kernels (sampled_partials_kernel, dual_partials_kernel; layout
// in layout.cuh). Host: the parameters both kernels share and the launch of their partials.
// Device: where a thread works, its anchor slice, the bank rows of one step and their
// fragments, the dots, the weighted row sums held in registers, and the write-out or
// shared-memory staging of those sums for the merge of a block's row groups.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "cuda/elements.cuh"
#include "cuda/launch.cuh"
#include "cuda/layout.cuh"
#include "cuda/softmax.cuh"

namespace dcdkernels {
namespace gpu {

// ---------------------------------------------------------------------------------------------
// Host side.

// The parameters of every gather kernel (each kernel's own parameters derive from it): the
// columns of each anchor and their split into chunks, the row layout, the loss scalars and
// where the partials go. The field order is the kernels' from before this struct: ptxas gave
// sampled_partials_kernel<float, 4> 121 registers instead of 96 with compute_grad next to nce.
struct GatherParams {
  ColumnRows columns;
  int64_t cols;  // K + 1
  int dim;
  bool vector_loads;  // D % V == 0 and the rows of every bank 16-byte aligned
  int tpr;            // threads per row group
  int64_t chunk_cols;
  int nchunks;
  const float* logit_scale;
  const float* bias;   // null: 0
  const float* log_z;  // NCE only: log_z_count values (one per direction)
  bool nce;
  NceConsts nc;
  bool compute_grad;
  float* partials;  // (B, nchunks, stride)
  int64_t stride;   // floats per partial
};

// The fields of GatherParams but the launch geometry (set by gather_partials) and the stride:
// the scalars on the device of `like`, the NCE constants of K = cols - 1 negatives drawn from
// `noise` rows.
inline GatherParams gather_params(const at::Tensor& like, const ColumnRows& columns, int64_t cols, int64_t D,
                                  const at::Tensor& logit_scale, const c10::optional<at::Tensor>& bias,
                                  const c10::optional<at::Tensor>& log_z, int64_t log_z_count, bool nce,
                                  bool compute_grad, int64_t noise) {
  GatherParams p{};
  p.columns = columns;
  p.cols = cols;
  p.dim = static_cast<int>(D);
  p.logit_scale = device_scalar(logit_scale, like, "logit_scale");
  p.bias = bias.has_value() ? device_scalar(*bias, like, "bias") : nullptr;
  p.log_z = nce ? device_scalar(*log_z, like, "log_z", log_z_count) : nullptr;
  p.nce = nce;
  p.nc = nce_consts(cols - 1, noise);
  p.compute_grad = compute_grad;
  return p;
}

// Launches a gather's partials kernel over the B anchors: picks the row layout and the column
// split over `bank` (dispatch_gather), sets p's geometry (`rows_aligned`: the rows of every bank
// start on 16 bytes), allocates the B * nchunks partials of p.stride floats and calls
// launch(T{}, nv_tag, layout). Returns the partials (p.partials points into them).
template <int MaxFloatsPerThread, typename RowsPerStep, typename F>
at::Tensor gather_partials(GatherParams& p, const at::Tensor& bank, const char* name, int64_t B, bool rows_aligned,
                           const at::TensorOptions& opts, const RowsPerStep& rows_per_step, F&& launch) {
  at::Tensor partials;
  const auto geometry = [&](auto tag, auto nv_tag, const RowLayout& lay, const ColumnSplit& split) {
    constexpr int V = 16 / static_cast<int>(sizeof(decltype(tag)));
    p.tpr = lay.tpr;
    p.chunk_cols = split.chunk_cols;
    p.nchunks = split.nchunks;
    p.vector_loads = p.dim % V == 0 && rows_aligned;
    partials = at::empty({B * split.nchunks * p.stride}, opts);
    p.partials = partials.data_ptr<float>();
    launch(tag, nv_tag, lay);
  };
  dispatch_gather<MaxFloatsPerThread>(bank, name, B, p.dim, p.cols, rows_per_step, geometry);
  return partials;
}

// ---------------------------------------------------------------------------------------------
// Device side.

// Where a thread of a gather block works: thread t of the `tpr` of row group `group` (of
// `groups` in the block), on columns [c0, c1) of anchor b. Block = (anchor, chunk).
struct GatherPos {
  int tpr, groups, group, t;
  int64_t b, c0, c1;
};

__device__ __forceinline__ GatherPos gather_pos(const GatherParams& p) {
  GatherPos g;
  g.tpr = p.tpr;
  g.groups = blockDim.x / p.tpr;
  g.group = threadIdx.x / p.tpr;
  g.t = threadIdx.x % p.tpr;
  g.b = blockIdx.x / p.nchunks;
  g.c0 = (blockIdx.x % p.nchunks) * p.chunk_cols;
  g.c1 = min(g.c0 + p.chunk_cols, p.cols);
  return g;
}

// This thread's elements of row b of `a`: (t + j tpr) V + i for fragment j; zeros past D.
template <int NV, int V>
__device__ __forceinline__ void load_slice(float (&q)[NV][V], const Matrix& a, int64_t b, int t, int tpr, int D) {
#pragma unroll
  for (int j = 0; j < NV; ++j) {
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const int e = (t + j * tpr) * V + i;
      q[j][i] = e < D ? a.at(b, e) : 0.f;
    }
  }
}

// Bank rows of the R columns col0, col0 + 1, .. of anchor b: -1 for an absent row and past the
// chunk's end c1.
template <int R>
__device__ __forceinline__ void step_rows(int64_t (&row)[R], const ColumnRows& columns, int64_t b, int64_t col0,
                                          int64_t c1) {
#pragma unroll
  for (int r = 0; r < R; ++r) row[r] = col0 + r < c1 ? columns.row(b, col0 + r) : -1;
}

// This thread's fragments of the R rows of `bank` (rows `stride` elements apart), cleared for
// absent rows and past D: one vector load each when `vector_loads`, else element by element.
// Every load is issued before any is used.
template <int R, int NV, typename T, int V>
__device__ __forceinline__ void load_frags(RowFrag<T, V> (&x)[R][NV], const T* bank, int64_t stride,
                                           const int64_t (&row)[R], int t, int tpr, int D, bool vector_loads) {
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int e0 = (t + j * tpr) * V;
      if (row[r] >= 0 && e0 < D) {
        const T* src = bank + row[r] * stride + e0;
        if (vector_loads) {
          x[r][j].load_vector(src);
        } else {
          x[r][j].load_scalars(src, min(V, D - e0));
        }
      } else {
        x[r][j].clear();
      }
    }
  }
}

// This thread's share of the dot <q, row> (group_sum adds the shares of a row group).
template <int NV, int V, typename Frag>
__device__ __forceinline__ float slice_dot(const float (&q)[NV][V], const Frag (&x)[NV]) {
  float d = 0.f;
#pragma unroll
  for (int j = 0; j < NV; ++j) {
#pragma unroll
    for (int i = 0; i < V; ++i) d = fmaf(q[j][i], x[j][i], d);
  }
  return d;
}

// Logit s d + beta of a column, -inf when its row is absent.
__device__ __forceinline__ float logit_of(int64_t row, float d, float s, float beta) {
  return row >= 0 ? fmaf(s, d, beta) : -INFINITY;
}

// v = v * keep + sum_r w[r] x[r]  (this thread's slice of a weighted row sum)
template <int R, int NV, int V, typename Frag>
__device__ __forceinline__ void axpy(float (&v)[NV][V], float keep, const float (&w)[R], const Frag (&x)[R][NV]) {
#pragma unroll
  for (int j = 0; j < NV; ++j) {
#pragma unroll
    for (int i = 0; i < V; ++i) {
      float a = v[j][i] * keep;
#pragma unroll
      for (int r = 0; r < R; ++r) a = fmaf(w[r], x[r][j][i], a);
      v[j][i] = a;
    }
  }
}

// Writes this thread's slice of a D-vector: out[e] for its elements e < D.
template <int NV, int V>
__device__ __forceinline__ void store_slice(float* out, const float (&v)[NV][V], int t, int tpr, int D) {
#pragma unroll
  for (int j = 0; j < NV; ++j) {
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const int e = (t + j * tpr) * V + i;
      if (e < D) out[e] = v[j][i];
    }
  }
}

// Stages this thread's slice into its group's span (tpr * NV * V >= D floats) of shared memory.
template <int NV, int V>
__device__ __forceinline__ void stage_slice(float* span, const float (&v)[NV][V], int t, int tpr) {
#pragma unroll
  for (int j = 0; j < NV; ++j) {
#pragma unroll
    for (int i = 0; i < V; ++i) span[(t + j * tpr) * V + i] = v[j][i];
  }
}

// Merges one staged D-vector over the row groups of the block, in group order (deterministic):
// out[e] = sum_g factor(g) staged[g * group_stride + e]. Every thread of the block takes part.
template <typename Factor>
__device__ __forceinline__ void merge_staged(float* out, const float* staged, int group_stride, int groups, int D,
                                             const Factor& factor) {
  for (int e = threadIdx.x; e < D; e += blockDim.x) {
    float a = 0.f;
    for (int g = 0; g < groups; ++g) a = fmaf(factor(g), staged[g * group_stride + e], a);
    out[e] = a;
  }
}

}  // namespace gpu
}  // namespace dcdkernels
