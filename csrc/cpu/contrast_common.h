// Pieces shared by the CPU gather kernels sampled_contrast and dual_sampled_contrast:
// the column -> bank row map (explicit or sampled in the kernel), the loss constants, the
// online-softmax state of one direction with its per-block update, and the partial merge.
// Math: docs/math.md §1a (InfoNCE), §1b (NCE); contract: csrc/KERNELS.md.
#pragma once

#include "cpu/cpu_utils.h"

namespace dcdkernels {
namespace cpu {

// Largest block of columns processed together (dots, then weights, then the weighted row sums).
constexpr int64_t kMaxBlock = 32;

// Columns per block: a block of rows (about 8 KiB) stays in L1 between its dot and axpy passes
// and is what one prefetch step fetches ahead.
inline int64_t block_columns(int64_t row_bytes) {
  return std::max<int64_t>(4, std::min<int64_t>(kMaxBlock, 8192 / std::max<int64_t>(row_bytes, 1)));
}

// How many column chunks each anchor's K+1 columns are split into so that every thread has
// work when B is small (the chunk partials are merged with the online-softmax rescaling).
// Chunks are never shorter than kMinChunk columns: each costs a D-vector merge.
inline int64_t column_chunks(int64_t B, int64_t cols) {
  constexpr int64_t kMinChunk = 256;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t wanted = (4 * threads + B - 1) / std::max<int64_t>(B, 1);  // ~4 tasks per thread
  return std::max<int64_t>(1, std::min(wanted, cols / kMinChunk));
}

// Bank rows of the K+1 columns of each anchor: an explicit (B, K+1) index, or (B,) positives
// with negatives drawn in the kernel from the counter-based stream (csrc/common/rng.h).
struct Columns {
  const int64_t* index;  // (B, cols) row-major, or (B,) positives when sampled
  int64_t cols;          // K + 1
  bool sampled;
  uint32_t key;  // rng_key(seed)
  uint64_t offset;
  int64_t n_rows;  // N, the sampling range

  // out[j] = bank row of column k0 + j of anchor b, j < n.
  DCD_INLINE void get(int64_t b, int64_t k0, int64_t n, int64_t* out) const {
    if (!sampled) {
      const int64_t* src = index + b * cols + k0;
      for (int64_t j = 0; j < n; ++j) out[j] = src[j];
      return;
    }
    for (int64_t j = 0; j < n; ++j) {
      const int64_t k = k0 + j;
      out[j] = k == 0 ? index[b] : sample_index(key, offset, b, k, cols - 1, n_rows);
    }
  }

  // The present columns among k0 .. k0+n-1 of anchor b (csrc/KERNELS.md: a column whose row lies
  // outside [0, n_rows) is absent and never read): out[0..m) = their rows in column order, m
  // returned. `positive` tells whether out[0] is column 0.
  DCD_INLINE int64_t present(int64_t b, int64_t k0, int64_t n, int64_t* out, bool& positive) const {
    get(b, k0, n, out);
    positive = false;
    int64_t m = 0;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t r = out[j];
      const bool keep = r >= 0 && r < n_rows;
      positive |= keep && k0 + j == 0;
      out[m] = r;
      m += keep;
    }
    return m;
  }
};

// The columns [k0, k1) of anchor b in blocks of up to `block` (<= kMaxBlock) columns, double-
// buffered: while the present rows of the current block are used (m() of them at rows();
// positive(): whether column 0 is the first), those of the next block are already resolved, for
// prefetching (resolve_next(), then next_m() rows at next_rows()):
//   for (ColumnBlocks blk(cols, b, k0, k1, block); blk.more(); blk.advance()) {
//     if (blk.resolve_next()) bank.prefetch(blk.next_rows(), blk.next_m());
//     ... use blk.rows()[0 .. blk.m()) ...
//   }
class ColumnBlocks {
 public:
  DCD_INLINE ColumnBlocks(const Columns& cols, int64_t b, int64_t k0, int64_t k1, int64_t block)
      : cols_(cols), b_(b), k_(k0), k1_(k1), block_(block), n_(std::min(block, k1 - k0)) {
    m_ = cols_.present(b_, k_, n_, idx_[cur_], positive_[cur_]);
  }

  DCD_INLINE bool more() const { return k_ < k1_; }

  // Resolves the present rows of the next block; false when there is none.
  DCD_INLINE bool resolve_next() {
    n_next_ = std::min(block_, k1_ - (k_ + n_));
    m_next_ = 0;
    if (n_next_ <= 0) return false;
    m_next_ = cols_.present(b_, k_ + n_, n_next_, idx_[cur_ ^ 1], positive_[cur_ ^ 1]);
    return true;
  }

  // Moves on to the next block (resolve_next() first).
  DCD_INLINE void advance() {
    k_ += n_;
    n_ = n_next_;
    m_ = m_next_;
    cur_ ^= 1;
  }

  DCD_INLINE const int64_t* rows() const { return idx_[cur_]; }
  DCD_INLINE int64_t m() const { return m_; }
  DCD_INLINE bool positive() const { return positive_[cur_]; }
  DCD_INLINE const int64_t* next_rows() const { return idx_[cur_ ^ 1]; }
  DCD_INLINE int64_t next_m() const { return m_next_; }

 private:
  const Columns& cols_;
  int64_t b_, k_, k1_, block_;
  int64_t n_, m_ = 0, n_next_ = 0, m_next_ = 0;  // columns in the current / next block, present rows
  int cur_ = 0;
  bool positive_[2] = {false, false};
  int64_t idx_[2][kMaxBlock];
};

// Builds the column map. Rows are not checked here: both gather kernels skip absent columns
// (Columns::present).
inline Columns make_columns(const at::Tensor& index, int64_t B, int64_t num_negatives, int64_t seed, int64_t offset,
                            int64_t n_rows) {
  TORCH_CHECK(num_negatives >= 0, "num_negatives must be >= 0, got ", num_negatives);
  Columns c{};
  if (num_negatives == 0) {
    TORCH_CHECK(index.dim() == 2 && index.size(0) == B && index.size(1) >= 1, "index must be (B, K+1) = (", B,
                ", K+1) when num_negatives == 0, got shape ", index.sizes());
    c.cols = index.size(1);
    c.sampled = false;
  } else {
    TORCH_CHECK(index.dim() == 1 && index.size(0) == B, "with num_negatives > 0 the index must be the (B,) = (", B,
                ",) positives, got shape ", index.sizes());
    TORCH_CHECK(n_rows < (int64_t(1) << 32), "in-kernel sampling needs a bank of fewer than 2^32 rows, got ", n_rows);
    c.cols = num_negatives + 1;
    c.sampled = true;
    c.key = rng_key(static_cast<uint64_t>(seed));
    c.offset = static_cast<uint64_t>(offset);
  }
  c.index = index.data_ptr<int64_t>();
  c.n_rows = n_rows;
  return c;
}

// Scalars of one direction's loss: l_k = s d_k + beta, and the NCE constants of docs/math.md §1b.
template <typename A>
struct LossParams {
  A s;
  A beta;
  bool nce;
  A log_z;       // NCE: v_k = l_k - log_z
  A log_c_eps;   // NCE: log(c + eps), c = K / N (N: the noise rows)
  A log_c_diff;  // NCE: log(c + eps) - log(c), the constant part of each negative's term
};

template <typename A>
LossParams<A> make_loss_params(double s, double beta, bool nce, double log_z, int64_t K, int64_t N) {
  constexpr double kEps = 1e-7;  // RepDistiller's eps
  const double c = static_cast<double>(K) / static_cast<double>(N);
  LossParams<A> p{};
  p.s = static_cast<A>(s);
  p.beta = static_cast<A>(beta);
  p.nce = nce;
  p.log_z = static_cast<A>(log_z);
  p.log_c_eps = static_cast<A>(std::log(c + kEps));
  // With K = 0 there are no negatives and this constant is never used (log(0) = -inf).
  p.log_c_diff = K > 0 ? static_cast<A>(std::log(c + kEps) - std::log(c)) : A(0);
  return p;
}

// Online state of one direction over a run of columns (one anchor, one chunk or all chunks).
template <typename A>
struct DirState {
  A m = -std::numeric_limits<A>::infinity();  // running max of the logits
  A l = 0;                                    // sum_k exp(l_k - m)
  A cw = 0;                                   // sum_k exp(l_k - m) d_k
  A loss = 0;                                 // NCE: sum of the per-column losses
  A gd = 0;                                   // NCE: sum_k g_k d_k, g_k = dL/dl_k
  A gb = 0;                                   // NCE: sum_k g_k
  A d0 = 0;  // dot with the positive row; set by the chunk that holds column 0 if it is present
};

// Absorbs a block of n columns with dots d[j]; `positive`: the first of them is column 0. Writes
// the logits lg[j], the softmax weights w[j] = exp(lg[j] - m_new) and, for NCE, g[j] = dL/dl.
// Returns exp(m_old - m_new): the factor by which softmax-weighted sums accumulated so far (st.l,
// st.cw and the caller's vectors) must be rescaled; st.l and st.cw are rescaled here. Each loop
// vectorises over the block.
template <typename A>
DCD_INLINE A absorb_block(DirState<A>& st, const LossParams<A>& P, bool positive, const A* d, int64_t n, A* lg, A* w,
                          A* g) {
  A block_max = -std::numeric_limits<A>::infinity();
#pragma omp simd reduction(max : block_max)
  for (int64_t j = 0; j < n; ++j) {
    lg[j] = P.s * d[j] + P.beta;
    block_max = std::max(block_max, lg[j]);
  }
  if (positive) st.d0 = d[0];
  const A m_new = std::max(st.m, block_max);
  // Equal maxima (including the first block's -inf == -inf when every logit is -inf) need no rescale.
  const A f = st.m == m_new ? A(1) : std::exp(st.m - m_new);
  A sum_w = 0, sum_wd = 0;
#pragma omp simd reduction(+ : sum_w, sum_wd)
  for (int64_t j = 0; j < n; ++j) {
    w[j] = exp_v(lg[j] - m_new);
    sum_w += w[j];
    sum_wd += w[j] * d[j];
  }
  st.m = m_new;
  st.l = st.l * f + sum_w;
  st.cw = st.cw * f + sum_wd;
  if (P.nce) {
    // With x = v - log(c+eps): column 0 adds softplus(-x) and has dL/dl = -sigmoid(-x);
    // column k >= 1 adds log(c+eps) - log(c) + softplus(x) and has dL/dl = sigmoid(x).
    // softplus(y) = max(y, 0) + log1p(e) and sigmoid(y) = (y >= 0 ? 1 : e) / (1 + e), e = exp(-|y|).
    A loss = 0, gd = 0, gb = 0;
#pragma omp simd reduction(+ : loss, gd, gb)
    for (int64_t j = 0; j < n; ++j) {
      const bool pos = positive && j == 0;
      const A x = lg[j] - P.log_z - P.log_c_eps;
      const A y = pos ? -x : x;
      const A e = exp_v(-std::abs(y));
      const A sigmoid = (y >= A(0) ? A(1) : e) / (A(1) + e);
      g[j] = pos ? -sigmoid : sigmoid;
      loss += std::max(y, A(0)) + log1p_unit(e) + (pos ? A(0) : P.log_c_diff);
      gd += g[j] * d[j];
      gb += g[j];
    }
    st.loss += loss;
    st.gd += gd;
    st.gb += gb;
  }
  return f;
}

// Merges the partial states of one anchor's chunks: factor[i] = exp(m_i - m) rescales chunk i's
// softmax-weighted sums (l, cw and its vectors); NCE sums add up; d0 comes from chunk 0.
template <typename A>
DirState<A> merge_states(const DirState<A>* parts, int64_t n, A* factor) {
  DirState<A> tot;
  for (int64_t i = 0; i < n; ++i) tot.m = std::max(tot.m, parts[i].m);
  tot.d0 = parts[0].d0;
  for (int64_t i = 0; i < n; ++i) {
    const DirState<A>& p = parts[i];
    factor[i] = p.m == tot.m ? A(1) : std::exp(p.m - tot.m);
    tot.l += p.l * factor[i];
    tot.cw += p.cw * factor[i];
    tot.loss += p.loss;
    tot.gd += p.gd;
    tot.gb += p.gb;
  }
  return tot;
}

// dst = sum_i factor[i] * src[i * stride .. + D)  (factor == nullptr: plain sum)
template <typename A>
void sum_partial_vectors(const A* src, int64_t stride, int64_t n, const A* factor, int64_t D, A* dst) {
  std::fill(dst, dst + D, A(0));
  for (int64_t i = 0; i < n; ++i) {
    const A f = factor ? factor[i] : A(1);
    const A* v = src + i * stride;
    for (int64_t e = 0; e < D; ++e) dst[e] += f * v[e];
  }
}

}  // namespace cpu
}  // namespace dcdkernels
