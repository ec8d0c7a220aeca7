// CPU kernel of sampled_contrast (docs/math.md §1a InfoNCE, §1b NCE; contract: csrc/KERNELS.md).
//
// One pass over the gathered rows gives the loss, the LSE and every gradient. Work items are
// (anchor, chunk of columns): with a batch of 64 anchors each anchor is one item and every
// thread has plenty; for small batches the K+1 columns are split into chunks whose partials
// (max, sum, weighted row sum, weighted dot sum) are merged afterwards with the online-softmax
// rescaling (column_chunks in contrast_common.h).
// Inside a chunk, columns go in blocks: resolve the next block's rows and prefetch them, take
// the dots of this block against the anchor (which stays in L1), turn them into weights, and
// add the weighted rows to the gradient accumulator while they are still in L1. Columns whose
// row lies outside [0, N) are absent (csrc/KERNELS.md): dropped from their block before any read.
#include <torch/library.h>

#include "common/gather_args.h"
#include "cpu/contrast_common.h"

namespace dcdkernels {
namespace cpu {
namespace {

template <typename A>
struct SampledProblem {
  const A* q;  // (B, D) anchors in the accumulation type
  int64_t D;
  Columns cols;
  LossParams<A> P;
  bool grad;
  int64_t block;  // columns per block
};

// Scans the present columns of [k0, k1) of anchor b into `st` and, with grad, into `vec` (D):
// InfoNCE sum_k exp(l_k - m) row_k (rescaled as m grows), NCE sum_k g_k row_k.
template <typename A>
DCD_CPU_CLONES void scan_chunk(const SampledProblem<A>& pr, RowReader<A>& bank, int64_t b, int64_t k0, int64_t k1,
                               DirState<A>& st, A* vec) {
  const int64_t D = pr.D;
  const A* q = pr.q + b * D;
  const A* rows[kMaxBlock];
  A d[kMaxBlock], lg[kMaxBlock], w[kMaxBlock], g[kMaxBlock];
  st = DirState<A>();
  if (pr.grad) std::fill(vec, vec + D, A(0));
  for (ColumnBlocks blk(pr.cols, b, k0, k1, pr.block); blk.more(); blk.advance()) {
    if (blk.resolve_next()) bank.prefetch(blk.next_rows(), blk.next_m());
    const int64_t m = blk.m();
    if (m == 0) continue;
    bank.load(blk.rows(), m, rows);
    dot_rows(q, rows, m, D, d);
    const A f = absorb_block(st, pr.P, blk.positive(), d, m, lg, w, g);
    if (pr.grad) {
      if (pr.P.nce) {
        axpy_rows(g, rows, m, D, vec);
      } else {
        if (f != A(1)) scale_vec(f, vec, D);
        axpy_rows(w, rows, m, D, vec);
      }
    }
  }
}

template <typename A>
void run(const at::Tensor& q_t, const at::Tensor& bank_t, const Columns& cols, const LossParams<A>& P, bool grad,
         at::Tensor& loss_t, at::Tensor& lse_t, at::Tensor& grad_anchor_t, at::Tensor& grad_scalars_t) {
  const int64_t B = q_t.size(0), D = q_t.size(1), N = bank_t.size(0);
  const int64_t chunks = column_chunks(B, cols.cols);
  SampledProblem<A> pr{q_t.data_ptr<A>(), D, cols, P, grad, 0};
  pr.block = block_columns(RowReader<A>(bank_t, 0).row_bytes());

  // Partials of every (anchor, chunk): states, and with grad one D-vector each.
  std::vector<DirState<A>> states(static_cast<size_t>(B * chunks));
  std::vector<A> vecs(grad ? static_cast<size_t>(B * chunks * D) : 0);
  at::parallel_for(0, B * chunks, 1, [&](int64_t t0, int64_t t1) {
    RowReader<A> bank(bank_t, pr.block);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / chunks, c = t % chunks;
      const int64_t k0 = cols.cols * c / chunks, k1 = cols.cols * (c + 1) / chunks;
      scan_chunk(pr, bank, b, k0, k1, states[t], grad ? vecs.data() + t * D : nullptr);
    }
  });

  A* loss = loss_t.data_ptr<A>();
  A* lse = lse_t.data_ptr<A>();
  A* ga = grad ? grad_anchor_t.data_ptr<A>() : nullptr;
  A* gs = grad ? grad_scalars_t.data_ptr<A>() : nullptr;
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    RowReader<A> bank(bank_t, 1);
    std::vector<A> factor(static_cast<size_t>(chunks));
    for (int64_t b = b0; b < b1; ++b) {
      const DirState<A> st = merge_states(states.data() + b * chunks, chunks, factor.data());
      const int64_t pos = cols.sampled ? cols.index[b] : cols.index[b * cols.cols];
      const bool has_pos = pos >= 0 && pos < N;  // an absent positive adds no -l_0, -d_0, -row_0
      lse[b] = st.m + std::log(st.l);            // -inf when no column is present
      loss[b] = P.nce ? st.loss : lse[b] - (has_pos ? P.s * st.d0 + P.beta : A(0));
      if (!grad) continue;
      A* g = ga + b * D;
      sum_partial_vectors(vecs.data() + b * chunks * D, D, chunks, P.nce ? nullptr : factor.data(), D, g);
      if (P.nce) {
        // grad = s sum_k g_k row_k; d/ds = sum_k g_k d_k; d/dbeta = sum_k g_k.
        scale_vec(P.s, g, D);
        gs[b] = st.gd;
        gs[B + b] = st.gb;
      } else {
        // grad = s (sum_k p_k row_k - row_0); d/ds = sum_k p_k d_k - d_0; d/dbeta = 0 exactly.
        // Sums over no present column are 0 (then g holds zeros and l = 0).
        const A inv_l = st.l > A(0) ? A(1) / st.l : A(0);
        if (has_pos) {
          const A* row0;
          bank.load(&pos, 1, &row0);
          for (int64_t e = 0; e < D; ++e) g[e] = P.s * (g[e] * inv_l - row0[e]);
        } else {
          for (int64_t e = 0; e < D; ++e) g[e] = P.s * (g[e] * inv_l);
        }
        gs[b] = st.cw * inv_l - (has_pos ? st.d0 : A(0));
        gs[B + b] = 0;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sampled_contrast_cpu(
    const at::Tensor& anchor, const at::Tensor& bank, const at::Tensor& index, const at::Tensor& logit_scale,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& log_z, int64_t loss_type,
    int64_t num_negatives, int64_t seed, int64_t offset, bool compute_grad, int64_t noise_rows) {
  check_float_matrix(anchor, "anchor");
  const int64_t B = anchor.size(0), D = anchor.size(1);
  check_bank(bank, "bank", D);
  const bool nce = nce_loss(loss_type, log_z.has_value(), "log_z");
  const int64_t N = bank.size(0), noise = noise_rows_or(noise_rows, N, "the bank's");
  const at::Tensor index_c = index.contiguous();
  const Columns cols = make_columns(index_c, B, num_negatives, seed, offset, N);

  const double s = scalar_value(logit_scale, "logit_scale");
  const double beta = bias.has_value() ? scalar_value(*bias, "bias") : 0.0;
  const double lz = nce ? scalar_value(*log_z, "log_z") : 0.0;

  const auto acc = accumulation_dtype({anchor, bank});
  const auto opts = anchor.options().dtype(acc);
  const at::Tensor q = anchor.to(acc).contiguous();
  at::Tensor loss = at::empty({B}, opts), lse = at::empty({B}, opts);
  at::Tensor grad_anchor = compute_grad ? at::empty({B, D}, opts) : at::empty({0}, opts);
  at::Tensor grad_scalars = compute_grad ? at::empty({2, B}, opts) : at::empty({0}, opts);
  if (B == 0) return {loss, lse, grad_anchor, grad_scalars};
  TORCH_CHECK(N > 0, "bank has no rows");

  if (acc == at::kDouble) {
    run<double>(q, bank, cols, make_loss_params<double>(s, beta, nce, lz, cols.cols - 1, noise), compute_grad, loss,
                lse, grad_anchor, grad_scalars);
  } else {
    run<float>(q, bank, cols, make_loss_params<float>(s, beta, nce, lz, cols.cols - 1, noise), compute_grad, loss, lse,
               grad_anchor, grad_scalars);
  }
  return {loss, lse, grad_anchor, grad_scalars};
}

}  // namespace
}  // namespace cpu
}  // namespace dcdkernels

TORCH_LIBRARY_IMPL(dcdkernels_C, CPU, m) {
  m.impl("sampled_contrast", &dcdkernels::cpu::sampled_contrast_cpu);
}
