// CPU kernel of dual_sampled_contrast (docs/math.md §1c; contract: csrc/KERNELS.md).
//
// Both CRD directions at the same columns: the student anchor z_s against bank_t rows
// (l^s_k = s <z_s, bank_t[idx_k]> + beta) and the teacher anchor z_t against bank_s rows
// (l^t_k = s <z_t, bank_s[idx_k]> + beta), plus KL(p^t || p^s), from one read of each row of
// each bank. Work split, blocking and prefetching as in sampled_contrast.cpp.
//
// KL per row, with f_k = l^t_k - l^s_k, w^t_k = exp(l^t_k - m_t), L_t = sum_k w^t_k:
//   KL = F - LSE^t + LSE^s,  F = sum_k p^t_k f_k = (sum_k w^t_k f_k) / L_t
//   dKL/dz_s = s sum_k (p^s_k - p^t_k) bank_t_k     = s (As / L_s - Bt / L_t)
//   dKL/dz_t = s sum_k p^t_k (f_k - F) bank_s_k     = s (E / L_t - F At / L_t)
//   dKL/ds   = sum_k (p^s_k - p^t_k) d^s_k + sum_k p^t_k (f_k - F) d^t_k
//            = cw_s / L_s - H / L_t + U / L_t - F cw_t / L_t
// where As = sum w^s bank_t_k, At = sum w^t bank_s_k, Bt = sum w^t bank_t_k,
// E = sum w^t f_k bank_s_k, H = sum w^t d^s_k, U = sum w^t f_k d^t_k (all rescaled with m_t,
// except As with m_s). dKL/dbeta = 0 exactly.
// Columns whose row lies outside [0, N) are absent in both directions (csrc/KERNELS.md): dropped
// from their block before any read; every sum above runs over the present columns only.
#include <torch/library.h>

#include "common/gather_args.h"
#include "cpu/contrast_common.h"

namespace dcdkernels {
namespace cpu {
namespace {

// Which D-vectors a partial accumulates; -1 = not needed. Offsets are in units of D.
struct VectorSlots {
  int64_t As = -1;  // softmax-weighted bank_t rows (student direction): InfoNCE or KL gradient
  int64_t At = -1;  // softmax-weighted bank_s rows (teacher direction): InfoNCE or KL gradient
  int64_t Gs = -1;  // NCE: sum g^s_k bank_t_k
  int64_t Gt = -1;  // NCE: sum g^t_k bank_s_k
  int64_t Bt = -1;  // KL: sum w^t_k bank_t_k
  int64_t E = -1;   // KL: sum w^t_k f_k bank_s_k
  int64_t count = 0;

  VectorSlots(bool grad, bool nce, bool kl) {
    if (!grad) return;
    if (!nce || kl) {
      As = count++;
      At = count++;
    }
    if (nce) {
      Gs = count++;
      Gt = count++;
    }
    if (kl) {
      Bt = count++;
      E = count++;
    }
  }
};

// KL sums of one partial, all weighted by w^t (rescaled with the teacher direction's max).
template <typename A>
struct KlState {
  A wf = 0;  // sum w^t f
  A h = 0;   // sum w^t d^s   (grad only)
  A u = 0;   // sum w^t f d^t (grad only)
};

template <typename A>
struct DualProblem {
  const A* zs;  // (B, D) student anchors
  const A* zt;  // (B, D) teacher anchors
  int64_t D;
  Columns cols;
  LossParams<A> Ps, Pt;  // the directions differ only in log Z (NCE)
  bool kl;
  bool grad;
  VectorSlots slots;
  int64_t block;
};

template <typename A>
DCD_CPU_CLONES void scan_chunk(const DualProblem<A>& pr, RowReader<A>& bank_s, RowReader<A>& bank_t, int64_t b,
                               int64_t k0, int64_t k1, DirState<A>& st_s, DirState<A>& st_t, KlState<A>& kl, A* vec) {
  const int64_t D = pr.D;
  const VectorSlots& sl = pr.slots;
  const A* zs = pr.zs + b * D;
  const A* zt = pr.zt + b * D;
  const A* rows_s[kMaxBlock];
  const A* rows_t[kMaxBlock];
  A ds[kMaxBlock], dt[kMaxBlock], lgs[kMaxBlock], lgt[kMaxBlock];
  A ws[kMaxBlock], wt[kMaxBlock], gs[kMaxBlock], gt[kMaxBlock], wtf[kMaxBlock];
  st_s = DirState<A>();
  st_t = DirState<A>();
  kl = KlState<A>();
  if (pr.grad) std::fill(vec, vec + sl.count * D, A(0));
  auto slot = [&](int64_t s) { return vec + s * D; };
  for (ColumnBlocks blk(pr.cols, b, k0, k1, pr.block); blk.more(); blk.advance()) {
    if (blk.resolve_next()) {
      bank_t.prefetch(blk.next_rows(), blk.next_m());
      bank_s.prefetch(blk.next_rows(), blk.next_m());
    }
    const int64_t m = blk.m();
    if (m == 0) continue;
    bank_t.load(blk.rows(), m, rows_t);
    bank_s.load(blk.rows(), m, rows_s);
    dot_rows(zs, rows_t, m, D, ds);
    dot_rows(zt, rows_s, m, D, dt);
    const A fs = absorb_block(st_s, pr.Ps, blk.positive(), ds, m, lgs, ws, gs);
    const A ft = absorb_block(st_t, pr.Pt, blk.positive(), dt, m, lgt, wt, gt);
    if (pr.kl) {
      kl.wf *= ft;
      kl.h *= ft;
      kl.u *= ft;
      for (int64_t j = 0; j < m; ++j) {
        const A f = lgt[j] - lgs[j];
        wtf[j] = wt[j] * f;
        kl.wf += wtf[j];
        if (pr.grad) {
          kl.h += wt[j] * ds[j];
          kl.u += wtf[j] * dt[j];
        }
      }
    }
    if (pr.grad) {
      if (sl.As >= 0) {
        if (fs != A(1)) scale_vec(fs, slot(sl.As), D);
        axpy_rows(ws, rows_t, m, D, slot(sl.As));
        if (ft != A(1)) scale_vec(ft, slot(sl.At), D);
        axpy_rows(wt, rows_s, m, D, slot(sl.At));
      }
      if (sl.Gs >= 0) {
        axpy_rows(gs, rows_t, m, D, slot(sl.Gs));
        axpy_rows(gt, rows_s, m, D, slot(sl.Gt));
      }
      if (sl.Bt >= 0) {
        if (ft != A(1)) {
          scale_vec(ft, slot(sl.Bt), D);
          scale_vec(ft, slot(sl.E), D);
        }
        axpy_rows(wt, rows_t, m, D, slot(sl.Bt));
        axpy_rows(wtf, rows_s, m, D, slot(sl.E));
      }
    }
  }
}

template <typename A>
void run(const at::Tensor& zs_t, const at::Tensor& zt_t, const at::Tensor& bank_s_t, const at::Tensor& bank_t_t,
         const Columns& cols, const LossParams<A>& Ps, const LossParams<A>& Pt, bool compute_kl, bool grad,
         at::Tensor& losses_t, at::Tensor& lse_t, at::Tensor& grad_anchors_t, at::Tensor& grad_scalars_t) {
  const int64_t B = zs_t.size(0), D = zs_t.size(1);
  const int64_t chunks = column_chunks(B, cols.cols);
  const VectorSlots sl(grad, Ps.nce, compute_kl);
  const int64_t row_bytes = std::max(RowReader<A>(bank_s_t, 0).row_bytes(), RowReader<A>(bank_t_t, 0).row_bytes());
  // Two rows per column: half the block of the single-bank kernel keeps the same L1 footprint.
  const int64_t block = std::max<int64_t>(4, block_columns(row_bytes) / 2);
  DualProblem<A> pr{zs_t.data_ptr<A>(), zt_t.data_ptr<A>(), D, cols, Ps, Pt, compute_kl, grad, sl, block};

  const int64_t tasks = B * chunks;
  std::vector<DirState<A>> st_s(static_cast<size_t>(tasks)), st_t(static_cast<size_t>(tasks));
  std::vector<KlState<A>> st_kl(static_cast<size_t>(tasks));
  const int64_t vec_stride = sl.count * D;  // one partial's vectors
  std::vector<A> vecs(static_cast<size_t>(tasks * vec_stride));
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    RowReader<A> bank_s(bank_s_t, block), bank_t(bank_t_t, block);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / chunks, c = t % chunks;
      const int64_t k0 = cols.cols * c / chunks, k1 = cols.cols * (c + 1) / chunks;
      scan_chunk(pr, bank_s, bank_t, b, k0, k1, st_s[t], st_t[t], st_kl[t], vecs.data() + t * vec_stride);
    }
  });

  A* losses = losses_t.data_ptr<A>();
  A* lse = lse_t.data_ptr<A>();
  A* ga = grad ? grad_anchors_t.data_ptr<A>() : nullptr;
  A* gsc = grad ? grad_scalars_t.data_ptr<A>() : nullptr;
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    RowReader<A> bank_s(bank_s_t, 1), bank_t(bank_t_t, 1);
    std::vector<A> fs(static_cast<size_t>(chunks)), ft(static_cast<size_t>(chunks));
    std::vector<A> tmp(static_cast<size_t>(vec_stride));  // merged vectors of this anchor
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t t = b * chunks;
      const DirState<A> S = merge_states(st_s.data() + t, chunks, fs.data());
      const DirState<A> T = merge_states(st_t.data() + t, chunks, ft.data());
      KlState<A> K;
      for (int64_t c = 0; c < chunks; ++c) {
        K.wf += st_kl[t + c].wf * ft[c];
        K.h += st_kl[t + c].h * ft[c];
        K.u += st_kl[t + c].u * ft[c];
      }
      const int64_t pos = cols.sampled ? cols.index[b] : cols.index[b * cols.cols];
      const bool has_pos = pos >= 0 && pos < cols.n_rows;  // an absent positive adds no -l_0, -d_0, -row_0
      // No present column: l = 0, lse = -inf; every sum over the columns is 0 (inv_l = 0).
      const bool empty = S.l == A(0);
      const A inv_ls = empty ? A(0) : A(1) / S.l, inv_lt = empty ? A(0) : A(1) / T.l;
      const A lse_s = S.m + std::log(S.l), lse_t = T.m + std::log(T.l);
      const A F = K.wf * inv_lt;
      lse[b] = lse_s;
      lse[B + b] = lse_t;
      losses[b] = Ps.nce ? S.loss : lse_s - (has_pos ? Ps.s * S.d0 + Ps.beta : A(0));
      losses[B + b] = Pt.nce ? T.loss : lse_t - (has_pos ? Pt.s * T.d0 + Pt.beta : A(0));
      losses[2 * B + b] = compute_kl && !empty ? F - lse_t + lse_s : A(0);
      if (!grad) continue;

      // Merge the chunk vectors: softmax sums rescale with their direction's max, NCE sums add.
      const A* part = vecs.data() + t * vec_stride;
      auto merged = [&](int64_t slot, const A* factor) {
        A* dst = tmp.data() + slot * D;
        sum_partial_vectors(part + slot * D, vec_stride, chunks, factor, D, dst);
        return dst;
      };
      const A s = Ps.s;
      A* g_ls = ga + b * D;             // dL^s/dz_s
      A* g_lt = ga + (B + b) * D;       // dL^t/dz_t
      A* g_kls = ga + (2 * B + b) * D;  // dKL/dz_s
      A* g_klt = ga + (3 * B + b) * D;  // dKL/dz_t
      auto scal = [&](int64_t which, int64_t term) -> A& { return gsc[(which * 3 + term) * B + b]; };
      const A* As = sl.As >= 0 ? merged(sl.As, fs.data()) : nullptr;
      const A* At = sl.At >= 0 ? merged(sl.At, ft.data()) : nullptr;
      if (Ps.nce) {
        // grad = s sum_k g_k row_k; d/ds = sum_k g_k d_k; d/dbeta = sum_k g_k.
        const A* Gs = merged(sl.Gs, nullptr);
        const A* Gt = merged(sl.Gt, nullptr);
        for (int64_t e = 0; e < D; ++e) {
          g_ls[e] = s * Gs[e];
          g_lt[e] = s * Gt[e];
        }
        scal(0, 0) = S.gd;
        scal(1, 0) = S.gb;
        scal(0, 1) = T.gd;
        scal(1, 1) = T.gb;
      } else {
        // grad = s (sum_k p_k row_k - row_0); d/ds = sum_k p_k d_k - d_0 (no row_0, d_0 if absent).
        for (int64_t e = 0; e < D; ++e) {
          g_ls[e] = s * As[e] * inv_ls;
          g_lt[e] = s * At[e] * inv_lt;
        }
        if (has_pos) {
          const A *row_t0, *row_s0;
          bank_t.load(&pos, 1, &row_t0);
          bank_s.load(&pos, 1, &row_s0);
          for (int64_t e = 0; e < D; ++e) {
            g_ls[e] -= s * row_t0[e];
            g_lt[e] -= s * row_s0[e];
          }
        }
        // d/dbeta = sum_P p_k - [0 in P]: 0, or 1 when the positive alone is absent.
        const A gbias = !empty && !has_pos ? A(1) : A(0);
        scal(0, 0) = S.cw * inv_ls - (has_pos ? S.d0 : A(0));
        scal(1, 0) = gbias;
        scal(0, 1) = T.cw * inv_lt - (has_pos ? T.d0 : A(0));
        scal(1, 1) = gbias;
      }
      if (compute_kl) {
        const A* Bt = merged(sl.Bt, ft.data());
        const A* E = merged(sl.E, ft.data());
        for (int64_t e = 0; e < D; ++e) {
          g_kls[e] = s * (As[e] * inv_ls - Bt[e] * inv_lt);
          g_klt[e] = s * (E[e] - F * At[e]) * inv_lt;
        }
        scal(0, 2) = S.cw * inv_ls - K.h * inv_lt + (K.u - F * T.cw) * inv_lt;
      } else {
        std::fill(g_kls, g_kls + D, A(0));
        std::fill(g_klt, g_klt + D, A(0));
        scal(0, 2) = 0;
      }
      scal(1, 2) = 0;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dual_sampled_contrast_cpu(
    const at::Tensor& anchor_s, const at::Tensor& anchor_t, const at::Tensor& bank_s, const at::Tensor& bank_t,
    const at::Tensor& index, const at::Tensor& logit_scale, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& log_z, int64_t loss_type, bool compute_kl, int64_t num_negatives, int64_t seed,
    int64_t offset, bool compute_grad, int64_t noise_rows) {
  check_float_matrix(anchor_s, "anchor_s");
  check_float_matrix(anchor_t, "anchor_t");
  const int64_t B = anchor_s.size(0), D = anchor_s.size(1);
  TORCH_CHECK(anchor_t.sizes() == anchor_s.sizes(), "anchor_t has shape ", anchor_t.sizes(), " but anchor_s has ",
              anchor_s.sizes());
  check_bank(bank_s, "bank_s", D);
  check_bank(bank_t, "bank_t", D);
  const int64_t N = bank_t.size(0);
  TORCH_CHECK(bank_s.size(0) == N, "bank_s has ", bank_s.size(0), " rows but bank_t has ", N);
  TORCH_CHECK(bank_s.scalar_type() == bank_t.scalar_type(), "bank_s (", bank_s.scalar_type(), ") and bank_t (",
              bank_t.scalar_type(), ") must share one dtype");
  const char* log_z_what = "log_z = (log Z_s, log Z_t) as a (2,) CPU tensor";
  const bool nce = nce_loss(loss_type, log_z.has_value(), log_z_what);
  double lz_s = 0, lz_t = 0;
  if (nce) {
    TORCH_CHECK(log_z->numel() == 2 && log_z->device().is_cpu(), "NCE (loss_type 1) needs ", log_z_what);
    const at::Tensor lz = log_z->to(at::kDouble).contiguous();
    lz_s = lz.data_ptr<double>()[0];
    lz_t = lz.data_ptr<double>()[1];
  }
  const int64_t noise = noise_rows_or(noise_rows, N, "the banks'");
  const at::Tensor index_c = index.contiguous();
  const Columns cols = make_columns(index_c, B, num_negatives, seed, offset, N);
  const double s = scalar_value(logit_scale, "logit_scale");
  const double beta = bias.has_value() ? scalar_value(*bias, "bias") : 0.0;

  const auto acc = accumulation_dtype({anchor_s, anchor_t, bank_s, bank_t});
  const auto opts = anchor_s.options().dtype(acc);
  const at::Tensor zs = anchor_s.to(acc).contiguous(), zt = anchor_t.to(acc).contiguous();
  at::Tensor losses = at::empty({3, B}, opts), lse = at::empty({2, B}, opts);
  at::Tensor grad_anchors = compute_grad ? at::empty({4, B, D}, opts) : at::empty({0}, opts);
  at::Tensor grad_scalars = compute_grad ? at::empty({2, 3, B}, opts) : at::empty({0}, opts);
  if (B == 0) return {losses, lse, grad_anchors, grad_scalars};
  TORCH_CHECK(N > 0, "the banks have no rows");

  const int64_t K = cols.cols - 1;
  if (acc == at::kDouble) {
    run<double>(zs, zt, bank_s, bank_t, cols, make_loss_params<double>(s, beta, nce, lz_s, K, noise),
                make_loss_params<double>(s, beta, nce, lz_t, K, noise), compute_kl, compute_grad, losses, lse,
                grad_anchors, grad_scalars);
  } else {
    run<float>(zs, zt, bank_s, bank_t, cols, make_loss_params<float>(s, beta, nce, lz_s, K, noise),
               make_loss_params<float>(s, beta, nce, lz_t, K, noise), compute_kl, compute_grad, losses, lse,
               grad_anchors, grad_scalars);
  }
  return {losses, lse, grad_anchors, grad_scalars};
}

}  // namespace
}  // namespace cpu
}  // namespace dcdkernels

TORCH_LIBRARY_IMPL(dcdkernels_C, CPU, m) {
  m.impl("dual_sampled_contrast", &dcdkernels::cpu::dual_sampled_contrast_cpu);
}
