// Device helpers shared by the CUDA kernels (csrc/cuda/*.cu); the contract is csrc/KERNELS.md.
//
//  * element access: small tensors (anchors, keys, values) are read element by element through
//    a runtime dtype tag (Matrix); bank rows, the hot path, go through RowFrag, a fragment of V
//    consecutive elements filled by one 4/8/16-byte load when the row is aligned, element by
//    element otherwise (D not a multiple of V, misaligned base or row stride).
//  * warp, row-group and block reductions;
//  * online softmax: the rescale factor exp(m_old - m_new), NCE's softplus/sigmoid;
//  * the split-K partials of one direction (sampled_contrast, dense_contrast) and the kernel
//    that merges them per anchor into the outputs of the contract.
#pragma once

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common/rng.h"

namespace dcdkernels {
namespace gpu {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;
// Largest number of (anchor, chunk) partials merged per anchor (bounds shared memory of the merge).
constexpr int kMaxChunks = 1024;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Under torch.use_deterministic_algorithms(True) grids are sized for this many SMs whatever the
// GPU, so the split of every reduction (and so every rounding) does not depend on the device.
// Same constant as DETERMINISTIC_SMS in dcdkernels/triton/_common.py.
constexpr int kDeterministicSms = 132;

// Number of SMs that grids are sized for: the current device's (to fill them), or
// kDeterministicSms in deterministic mode.
inline int sm_count() {
  if (at::globalContext().deterministicAlgorithms()) return kDeterministicSms;
  int device = 0, count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

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
__device__ __forceinline__ float bf16_bits_to_float(uint32_t bits) { return __uint_as_float(bits << 16); }
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

// ---------------------------------------------------------------------------------------------
// Reductions.

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// Sums each of the N values over the `tpr` threads (a power of two) of a row group. A group of
// up to 32 threads lies inside one warp (xor shuffles within the group); a larger group is the
// whole block and also adds across warps through `scratch` (2 * N * 32 floats of shared memory,
// double-buffered by `parity`: between two uses of one half, every thread passes the barrier of
// the call in between, after its reads, so one barrier per call suffices). Every thread of the
// block must call it when tpr > 32.
template <int N>
__device__ __forceinline__ void group_sum(float (&v)[N], int tpr, float* scratch, int parity) {
  const int width = tpr < kWarp ? tpr : kWarp;
  for (int o = width >> 1; o > 0; o >>= 1) {
#pragma unroll
    for (int n = 0; n < N; ++n) v[n] += __shfl_xor_sync(kFullMask, v[n], o);
  }
  if (tpr > kWarp) {
    float* buf = scratch + parity * N * kWarp;
    const int warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
    if (threadIdx.x % kWarp == 0) {
#pragma unroll
      for (int n = 0; n < N; ++n) buf[n * kWarp + warp] = v[n];
    }
    __syncthreads();
#pragma unroll
    for (int n = 0; n < N; ++n) {
      float t = 0.f;
      for (int w = 0; w < warps; ++w) t += buf[n * kWarp + w];
      v[n] = t;
    }
  }
}

// Block-wide sum and max; every thread gets the result. `scratch` holds 32 floats. The partial
// sums are added in warp order by every thread, so the result is deterministic.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  v = warp_sum(v);
  if (threadIdx.x % kWarp == 0) scratch[threadIdx.x / kWarp] = v;
  __syncthreads();
  float t = 0.f;
  for (int w = 0; w < static_cast<int>(blockDim.x / kWarp); ++w) t += scratch[w];
  __syncthreads();
  return t;
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
  v = warp_max(v);
  if (threadIdx.x % kWarp == 0) scratch[threadIdx.x / kWarp] = v;
  __syncthreads();
  float t = -INFINITY;
  for (int w = 0; w < static_cast<int>(blockDim.x / kWarp); ++w) t = fmaxf(t, scratch[w]);
  __syncthreads();
  return t;
}

// Merges the scalar slots of `count` states (state k at states + k * stride, in global or shared
// memory): out[i] = sum_k factor(i, k) * states[k * stride + i] for i < n_slots. One warp per
// slot, states added in a fixed order (deterministic). Ends with a barrier: `out` (shared) is
// then visible to the block. Every thread of the block must call it.
template <typename Factor>
__device__ __forceinline__ void sum_slots(const float* states, int count, int64_t stride, int n_slots,
                                          const Factor& factor, float* out) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, warps = blockDim.x / kWarp;
  for (int i = warp; i < n_slots; i += warps) {
    float v = 0.f;
    for (int k = lane; k < count; k += kWarp) v = fmaf(factor(i, k), states[k * stride + i], v);
    v = warp_sum(v);
    if (lane == 0) out[i] = v;
  }
  __syncthreads();
}

// ---------------------------------------------------------------------------------------------
// Online softmax and NCE arithmetic.

// Factor exp(m_old - m_new) that rescales a sum of exp(l - m_old) terms to the reference max
// m_new >= m_old. An empty sum (m_old = -inf) gets 0, also when m_new is still -inf.
__device__ __forceinline__ float rescale(float m_old, float m_new) {
  return m_old == -INFINITY ? 0.f : __expf(m_old - m_new);
}

// Folds R logits (-inf for absent rows) into the running max m and sum l = sum exp(l_k - m).
// Writes w[r] = exp(logit[r] - m_new) and returns the factor by which the other sums weighted
// with exp(l - m) must be rescaled.
template <int R>
__device__ __forceinline__ float online_absorb(float& m, float& l, const float (&logit)[R], float (&w)[R]) {
  float m_new = m;
#pragma unroll
  for (int r = 0; r < R; ++r) m_new = fmaxf(m_new, logit[r]);
  if (m_new == -INFINITY) {  // nothing present yet
#pragma unroll
    for (int r = 0; r < R; ++r) w[r] = 0.f;
    return 1.f;
  }
  const float f = rescale(m, m_new);
  float sum = 0.f;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    w[r] = __expf(logit[r] - m_new);  // exp(-inf) = 0 for absent rows
    sum += w[r];
  }
  l = l * f + sum;
  m = m_new;
  return f;
}

// softplus(x) = log(1 + e^x) and sigmoid(x), both from e = exp(-|x|): no overflow.
__device__ __forceinline__ void softplus_sigmoid(float x, float& softplus, float& sigmoid) {
  const float e = __expf(-fabsf(x));
  softplus = fmaxf(x, 0.f) + log1pf(e);
  sigmoid = (x >= 0.f ? 1.f : e) / (1.f + e);
}

// Constants of the NCE loss (SPEC §1b, contract: v_k = l_k - log_z, c = K / N, eps = 1e-7).
struct NceConsts {
  float log_c_eps;   // log(c + eps)
  float log_c_diff;  // log(c + eps) - log(c): the constant part of a negative's term (0 when K = 0)
};

inline NceConsts nce_consts(int64_t K, int64_t N) {
  const double c = static_cast<double>(K) / static_cast<double>(N);
  const double log_c_eps = std::log(c + 1e-7);
  return NceConsts{static_cast<float>(log_c_eps), K > 0 ? static_cast<float>(log_c_eps - std::log(c)) : 0.f};
}

// NCE term of column `col` with logit l: adds its loss, returns g = dL/dl.
//   column 0: softplus(log(c+eps) - v),                dL/dl = -sigmoid(log(c+eps) - v)
//   k >= 1:   log(c+eps) - log(c) + softplus(x),       dL/dl = sigmoid(x),  x = v - log(c+eps)
__device__ __forceinline__ float nce_term(float l, bool positive, float log_z, const NceConsts& nc, float& loss) {
  const float x = l - log_z - nc.log_c_eps;
  float sp, sg;
  if (positive) {
    softplus_sigmoid(-x, sp, sg);
    loss += sp;
    return -sg;
  }
  softplus_sigmoid(x, sp, sg);
  loss += nc.log_c_diff + sp;
  return sg;
}

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
    const int64_t r = (num_negatives > 0 && col > 0)
                          ? sample_index(key, offset, b, col, num_negatives, n_rows)
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
    TORCH_CHECK(index.dim() == 2 && index.size(0) == B && index.size(1) >= 1,
                "index must be (B, K+1) = (", B, ", K+1) when num_negatives == 0, got shape ", index.sizes());
    c.stride_k = index.stride(1);
    cols = index.size(1);
  } else {
    TORCH_CHECK(index.dim() == 1 && index.size(0) == B,
                "with num_negatives > 0 the index must be the (B,) = (", B, ",) positives, got shape ", index.sizes());
    TORCH_CHECK(n_rows < (int64_t(1) << 32), "in-kernel sampling needs a bank of fewer than 2^32 rows, got ", n_rows);
    c.stride_k = 0;
    c.key = rng_key(static_cast<uint64_t>(seed));
    c.offset = static_cast<uint64_t>(offset);
    cols = num_negatives + 1;
  }
  return c;
}

// A 0-d fp32 scalar tensor on the kernels' device: read on device, no host sync.
inline const float* device_scalar(const at::Tensor& t, const at::Tensor& like, const char* name, int64_t numel = 1) {
  TORCH_CHECK(t.device() == like.device(), name, " must be on ", like.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.numel() == numel && t.is_contiguous(), name, " must hold ", numel, " contiguous value(s), got shape ",
              t.sizes());
  return t.data_ptr<float>();
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
constexpr int kMaxGroup = 256;     // largest row group (= block)
constexpr int kCtasPerSm = 64;     // grid target of the split-K gather: ~8 waves (small tail), partials < 0.5% of the reads

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

// ---------------------------------------------------------------------------------------------
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
  bool extra_column;     // dense `positive`: a softmax column that the partials did not see

  __device__ __forceinline__ int64_t row(int64_t b) const {
    const int64_t r = index ? index[b * index_stride] : b;
    return (r >= 0 && r < rows.rows) ? r : -1;
  }
};

struct MergeParams {
  const float* partials;
  int nchunks;
  int64_t stride;  // floats per partial
  int64_t B;
  int dim;
  Matrix anchor;
  PositiveRows pos;
  const float* logit_scale;
  const float* bias;  // null: 0
  bool compute_grad;
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
    for (int c = 0; c < p.nchunks; ++c) a = fmaf(slot_factor(kScalars, kNce, factor[c]), part[c * p.stride + kScalars + e], a);
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
