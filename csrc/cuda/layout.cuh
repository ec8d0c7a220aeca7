// Column and row layout of the gather kernels (sampled_contrast, dual_sampled_contrast): which
// bank row each column reads, how a row is cut into per-thread fragments and row groups, and the
// split of each anchor's columns into chunks (split-K).
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/constants.h"
#include "common/rng.h"
#include "cuda/elements.cuh"
#include "cuda/launch.cuh"

namespace dcdkernels {
namespace gpu {

// ---------------------------------------------------------------------------------------------
// Column -> bank row of the gather ops: an explicit (B, K+1) index, or (B,) positives with the
// negatives drawn in the kernel (csrc/common/rng.h). Rows out of [0, n_rows) come back as -1:
// such a row is never read and counts as absent.

struct ColumnRows {
  const int64_t* index;
  int64_t stride_b, stride_k;  // elements; stride_k unused when sampled
  int64_t num_negatives;       // K > 0: columns 1..K are sampled
  uint32_t key;                // rng_key(seed)
  uint64_t offset;
  int64_t n_rows;

  __device__ __forceinline__ int64_t row(int64_t b, int64_t col) const {
    const int64_t r = (num_negatives > 0 && col > 0) ? sample_index(key, offset, b, col, num_negatives, n_rows)
                                                     : index[b * stride_b + col * stride_k];
    return (r >= 0 && r < n_rows) ? r : -1;
  }
};

// Builds the column map; returns it and sets `cols` = K + 1.
inline ColumnRows column_rows(const at::Tensor& index, int64_t B, int64_t num_negatives, int64_t seed, int64_t offset,
                              int64_t n_rows, int64_t& cols) {
  TORCH_CHECK(index.scalar_type() == at::kLong, "index must be int64, got ", index.scalar_type());
  TORCH_CHECK(num_negatives >= 0, "num_negatives must be >= 0, got ", num_negatives);
  ColumnRows c{};
  c.index = index.data_ptr<int64_t>();
  c.stride_b = index.stride(0);
  c.num_negatives = num_negatives;
  c.n_rows = n_rows;
  if (num_negatives == 0) {
    TORCH_CHECK(index.dim() == 2 && index.size(0) == B && index.size(1) >= 1, "index must be (B, K+1) = (", B,
                ", K+1) when num_negatives == 0, got shape ", index.sizes());
    c.stride_k = index.stride(1);
    cols = index.size(1);
  } else {
    TORCH_CHECK(index.dim() == 1 && index.size(0) == B, "with num_negatives > 0 the index must be the (B,) = (", B,
                ",) positives, got shape ", index.sizes());
    TORCH_CHECK(n_rows < (int64_t(1) << 32), "in-kernel sampling needs a bank of fewer than 2^32 rows, got ", n_rows);
    c.stride_k = 0;
    c.key = rng_key(static_cast<uint64_t>(seed));
    c.offset = static_cast<uint64_t>(offset);
    cols = num_negatives + 1;
  }
  return c;
}

// ---------------------------------------------------------------------------------------------
// Work layout of the gather kernels (sampled_contrast, dual_sampled_contrast).
//
// A row of D elements is cut into fragments of V elements (one 16-byte load for the widest
// bank dtype). A row group of `tpr` threads (a power of two) handles one row at a time; its
// thread t owns fragments t, t + tpr, ..., t + (NV-1) tpr, i.e. elements (t + j tpr) V + [0, V).
// Groups of up to 32 threads live inside a warp, kGatherBlock threads per block; a larger group
// is a whole block (tpr threads), for D > 32 * NV * V.

constexpr int kGatherBlock = 128;  // threads per block when a row group fits in a warp
// kMaxGroup (common/constants.h): the largest row group (= block).
constexpr int kCtasPerSm =
    64;  // grid target of the split-K gather: ~8 waves (small tail), partials < 0.5% of the reads

struct RowLayout {
  int nv;     // fragments per thread
  int tpr;    // threads per row group
  int block;  // threads per block
};

// Fewest fragments per thread (1, 2, 4, .. max_nv) that let a warp hold a row; else max_nv
// fragments and a block-wide group. Fails beyond kMaxGroup * max_nv * V elements.
inline RowLayout row_layout(int64_t D, int V, int max_nv) {
  const int64_t frags = ceil_div(D, V);
  auto pow2_at_least = [](int64_t n) {
    int p = 1;
    while (p < n) p *= 2;
    return p;
  };
  for (int nv = 1; nv <= max_nv; nv *= 2) {
    if (frags <= int64_t(kWarp) * nv) return RowLayout{nv, pow2_at_least(ceil_div(frags, nv)), kGatherBlock};
  }
  TORCH_CHECK(frags <= int64_t(kMaxGroup) * max_nv, "D = ", D, " is larger than the CUDA gather kernels support (",
              int64_t(kMaxGroup) * max_nv * V, " for these dtypes)");
  const int tpr = pow2_at_least(ceil_div(frags, max_nv));
  return RowLayout{max_nv, tpr, tpr};
}

// Calls f(std::integral_constant<int, nv>) for nv in {1, 2, 4, ..., MaxNV}.
template <int MaxNV, int NV = 1, typename F>
void dispatch_nv(int nv, F&& f) {
  if (nv == NV) {
    f(std::integral_constant<int, NV>{});
  } else if constexpr (NV * 2 <= MaxNV) {
    dispatch_nv<MaxNV, NV * 2>(nv, f);
  } else {
    TORCH_CHECK(false, "dcdkernels: no CUDA kernel instance for ", nv, " fragments per thread");
  }
}

// Split of each anchor's `cols` columns into chunks (split-K): about kCtasPerSm blocks per SM
// over the B anchors, at least 4 steps of `per_step` columns per block, at most kMaxChunks.
struct ColumnSplit {
  int64_t chunk_cols;
  int nchunks;
};

inline ColumnSplit split_columns(int64_t B, int64_t cols, int64_t per_step) {
  const int64_t want = ceil_div(int64_t(kCtasPerSm) * sm_count(), B);
  const int64_t most = std::min<int64_t>(kMaxChunks, std::max<int64_t>(1, cols / (4 * per_step)));
  const int64_t n = std::max<int64_t>(1, std::min(want, most));
  const int64_t chunk = ceil_div(ceil_div(cols, n), per_step) * per_step;
  const int64_t nchunks = ceil_div(cols, chunk);
  TORCH_CHECK(B * nchunks < (int64_t(1) << 31), "too many anchors for one launch: B = ", B);
  return ColumnSplit{chunk, static_cast<int>(nchunks)};
}

// Launch geometry of a gather kernel over `bank` (at most MaxFloatsPerThread floats of a row
// slice per thread): calls f(T{}, std::integral_constant<int, NV>{}, layout, split) with T the
// bank's storage type, the layout of its rows and the split of the `cols` columns of each of the
// B anchors; a row group takes rows_per_step(NV tag) rows per step.
template <int MaxFloatsPerThread, typename RowsPerStep, typename F>
void dispatch_gather(const at::Tensor& bank, const char* name, int64_t B, int64_t D, int64_t cols,
                     const RowsPerStep& rows_per_step, F&& f) {
  dispatch_bank_type(bank, name, [&](auto tag) {
    constexpr int V = 16 / static_cast<int>(sizeof(decltype(tag)));
    const RowLayout lay = row_layout(D, V, MaxFloatsPerThread / V);
    dispatch_nv<MaxFloatsPerThread / V>(lay.nv, [&](auto nv_tag) {
      f(tag, nv_tag, lay, split_columns(B, cols, (lay.block / lay.tpr) * rows_per_step(nv_tag)));
    });
  });
}

}  // namespace gpu
}  // namespace dcdkernels
