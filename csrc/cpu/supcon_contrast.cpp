// CPU kernels of supcon_contrast and supcon_contrast_backward (contract: csrc/KERNELS.md): the
// supervised-contrastive loss of anchors a (R, D) with labels against keys k (N, D) with labels
// (the anchors themselves for self-contrast), l_ij = s <a_i, k_j>.
//
// Tiled as dense_contrast: anchors in tiles of kAnchorTile rows, keys in tiles of KT rows; each
// (anchor tile, key tile) block of dots is one BLAS matmul, absorbed by a per-row online state,
// so the (R, N) logits never exist. Forward state per row: the running max m over every column
// (the self column included, as the official code's row max), S = sum over the columns j != i of
// exp(l_ij - m) (rescaled by exp(m_old - m_new)), the positives' raw logit sum and count:
//   L_i = m + log(S + eps) - pos_sum / npos        (0 when npos = 0)
// stats = [m, S + eps, npos] (3, R) for the backward, which recomputes each block of dots and
//   G_ij = g_i ([j != i] exp(l_ij - m_i) / (S_i + eps) - [j in P_i] / npos_i)
//   grad_a = s G K (matmul), grad_k = s G^T A (matmul), d/ds = sum_ij G_ij <a_i, k_j>.
#include <torch/library.h>

#include "cpu/cpu_utils.h"

namespace dcdkernels {
namespace cpu {
namespace {

// max_j s d_j over a block of dots (the self column included, as the official row max).
template <typename A>
DCD_CPU_CLONES A block_max(const A* d, int64_t n, A s) {
  A mx = -std::numeric_limits<A>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < n; ++j) mx = std::max(mx, s * d[j]);
  return mx;
}

// One row's block in the forward, branch-free so that it vectorises: sum of exp(l_j - m) over
// the columns j != self, and the positives' raw logit sum and count.
template <typename A>
DCD_CPU_CLONES void absorb_supcon_row(const A* d, const int64_t* lk, int64_t yi, int64_t n, int64_t self, A s, A m,
                                      A& sum_out, A& psum_out, int64_t& np_out) {
  A sum = 0, psum = 0, np = 0;  // the count in A: one reduction type, so the loop vectorises
#pragma omp simd reduction(+ : sum, psum, np)
  for (int64_t j = 0; j < n; ++j) {
    const A l = s * d[j];
    const bool other = j != self;
    const bool pos = other && lk[j] == yi;
    sum += other ? exp_v(l - m) : A(0);
    psum += pos ? l : A(0);
    np += pos ? A(1) : A(0);
  }
  sum_out = sum;
  psum_out = psum;
  np_out = static_cast<int64_t>(np);
}

// One row's block in the backward, in place over its dots: G_j = g (p_j - [pos_j] / npos), 0 at
// the self column; returns sum_j G_j d_j (the row's share of d/ds).
template <typename A>
DCD_CPU_CLONES A coefficients_row(A* row, const int64_t* lk, int64_t yi, int64_t n, int64_t self, A s, A m, A inv_den,
                                  A inv_np, A g) {
  A acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) {
    const A d = row[j];
    const A p = exp_v(s * d - m) * inv_den - (lk[j] == yi ? inv_np : A(0));
    const A G = j == self ? A(0) : p * g;
    acc += G * d;
    row[j] = G;
  }
  return acc;
}

struct SupconInputs {
  int64_t R, N, D;
  at::ScalarType acc;
  at::Tensor a, k;    // acc-typed, contiguous
  at::Tensor la, lk;  // int64 labels
  double s;
};

SupconInputs prepare(const at::Tensor& anchors, const at::Tensor& labels, const at::Tensor& keys,
                     const at::Tensor& key_labels, const at::Tensor& logit_scale) {
  check_anchors_keys(anchors, "anchors", keys);
  SupconInputs in;
  in.R = anchors.size(0);
  in.D = anchors.size(1);
  in.N = keys.size(0);
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == in.R, "labels must be (R,) = (", in.R, ",), got shape ",
              labels.sizes());
  TORCH_CHECK(key_labels.dim() == 1 && key_labels.size(0) == in.N, "key_labels must be (N,) = (", in.N,
              ",), got shape ", key_labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong && key_labels.scalar_type() == at::kLong,
              "labels and key_labels must be int64");
  in.acc = accumulation_dtype({anchors, keys});
  in.a = anchors.to(in.acc).contiguous();
  in.k = keys.is_same(anchors) ? in.a : keys.to(in.acc).contiguous();
  in.la = labels.contiguous();
  in.lk = key_labels.contiguous();
  in.s = scalar_value(logit_scale, "logit_scale");
  return in;
}

template <typename A>
void forward_impl(const SupconInputs& in, double eps, bool exclude_self, at::Tensor& loss, at::Tensor& stats) {
  const int64_t R = in.R, N = in.N, KT = key_tile(in.D);
  const A s = static_cast<A>(in.s);
  const int64_t* la = in.la.data_ptr<int64_t>();
  const int64_t* lk = in.lk.data_ptr<int64_t>();
  std::vector<A> m(R, -std::numeric_limits<A>::infinity()), S(R, A(0)), pos_sum(R, A(0));
  std::vector<int64_t> npos(R, 0);
  for (int64_t j0 = 0; j0 < N; j0 += KT) {
    const int64_t kt = std::min(KT, N - j0);
    const at::Tensor kb = in.k.narrow(0, j0, kt);
    for (int64_t b0 = 0; b0 < R; b0 += kAnchorTile) {
      const int64_t bt = std::min(kAnchorTile, R - b0);
      const at::Tensor block = at::mm(in.a.narrow(0, b0, bt), kb.t());  // (bt, kt): the only logits
      const A* w = block.data_ptr<A>();
      at::parallel_for(0, bt, 8, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t i = b0 + r;
          const A* d = w + r * kt;
          const int64_t self = exclude_self ? i - j0 : -1;  // column of the self pair in this tile
          const A m_new = std::max(m[i], block_max(d, kt, s));
          A sum, psum;
          int64_t np;
          absorb_supcon_row(d, lk + j0, la[i], kt, self, s, m_new, sum, psum, np);
          S[i] = (m[i] == m_new ? S[i] : S[i] * std::exp(m[i] - m_new)) + sum;
          m[i] = m_new;
          pos_sum[i] += psum;
          npos[i] += np;
        }
      });
    }
  }
  A* lp = loss.data_ptr<A>();
  A* st = stats.data_ptr<A>();
  for (int64_t i = 0; i < R; ++i) {
    const A den = S[i] + static_cast<A>(eps);
    lp[i] = npos[i] > 0 ? m[i] + std::log(den) - pos_sum[i] / static_cast<A>(npos[i]) : A(0);
    st[i] = m[i];
    st[R + i] = den;
    st[2 * R + i] = static_cast<A>(npos[i]);
  }
}

std::tuple<at::Tensor, at::Tensor> supcon_contrast_cpu(const at::Tensor& anchors, const at::Tensor& labels,
                                                       const at::Tensor& keys, const at::Tensor& key_labels,
                                                       const at::Tensor& logit_scale, double eps, bool exclude_self) {
  const SupconInputs in = prepare(anchors, labels, keys, key_labels, logit_scale);
  const auto opts = anchors.options().dtype(in.acc);
  at::Tensor loss = at::empty({in.R}, opts), stats = at::empty({3, in.R}, opts);
  AT_DISPATCH_FLOATING_TYPES(in.acc, "supcon_contrast_cpu",
                             [&] { forward_impl<scalar_t>(in, eps, exclude_self, loss, stats); });
  return {loss, stats};
}

template <typename A>
void backward_impl(const SupconInputs& in, const at::Tensor& stats, const at::Tensor& g, bool exclude_self,
                   bool keys_grad, at::Tensor& grad_a, at::Tensor& grad_k, at::Tensor& grad_s_rows) {
  const int64_t R = in.R, N = in.N, KT = key_tile(in.D);
  const A s = static_cast<A>(in.s);
  const int64_t* la = in.la.data_ptr<int64_t>();
  const int64_t* lk = in.lk.data_ptr<int64_t>();
  const A* st = stats.data_ptr<A>();
  const A* gp = g.data_ptr<A>();
  A* gs = grad_s_rows.data_ptr<A>();
  for (int64_t j0 = 0; j0 < N; j0 += KT) {
    const int64_t kt = std::min(KT, N - j0);
    const at::Tensor kb = in.k.narrow(0, j0, kt);
    for (int64_t b0 = 0; b0 < R; b0 += kAnchorTile) {
      const int64_t bt = std::min(kAnchorTile, R - b0);
      const at::Tensor ab = in.a.narrow(0, b0, bt);
      at::Tensor block = at::mm(ab, kb.t());  // dots, overwritten with G
      A* w = block.data_ptr<A>();
      at::parallel_for(0, bt, 8, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t i = b0 + r;
          A* row = w + r * kt;
          const A np = st[2 * R + i];
          if (np == A(0) || gp[i] == A(0)) {
            for (int64_t j = 0; j < kt; ++j) row[j] = A(0);
            continue;
          }
          const A m = st[i], inv_den = A(1) / st[R + i], inv_np = A(1) / np, gi = gp[i];
          const int64_t self = exclude_self ? i - j0 : -1;
          const A acc_s = coefficients_row(row, lk + j0, la[i], kt, self, s, m, inv_den, inv_np, gi);
          gs[i] += acc_s;
        }
      });
      grad_a.narrow(0, b0, bt).addmm_(block, kb);
      if (keys_grad) grad_k.narrow(0, j0, kt).addmm_(block.t(), ab);
    }
  }
  grad_a.mul_(in.s);
  if (keys_grad) grad_k.mul_(in.s);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> supcon_contrast_backward_cpu(
    const at::Tensor& anchors, const at::Tensor& labels, const at::Tensor& keys, const at::Tensor& key_labels,
    const at::Tensor& logit_scale, const at::Tensor& stats, const at::Tensor& grad_rows, bool exclude_self,
    bool keys_grad) {
  const SupconInputs in = prepare(anchors, labels, keys, key_labels, logit_scale);
  const auto opts = anchors.options().dtype(in.acc);
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == 3 && stats.size(1) == in.R, "stats must be (3, R)");
  const at::Tensor st = stats.to(in.acc).contiguous();
  const at::Tensor g = grad_rows.to(in.acc).contiguous();
  TORCH_CHECK(g.numel() == in.R, "grad_rows must be (R,)");
  at::Tensor grad_a = at::zeros({in.R, in.D}, opts);
  at::Tensor grad_k = keys_grad ? at::zeros({in.N, in.D}, opts) : at::empty({0}, opts);
  at::Tensor gs = at::zeros({in.R}, opts);
  AT_DISPATCH_FLOATING_TYPES(in.acc, "supcon_contrast_backward_cpu",
                             [&] { backward_impl<scalar_t>(in, st, g, exclude_self, keys_grad, grad_a, grad_k, gs); });
  return {grad_a, grad_k, gs.sum()};
}

}  // namespace
}  // namespace cpu
}  // namespace dcdkernels

TORCH_LIBRARY_IMPL(dcdkernels_C, CPU, m) {
  m.impl("supcon_contrast", &dcdkernels::cpu::supcon_contrast_cpu);
  m.impl("supcon_contrast_backward", &dcdkernels::cpu::supcon_contrast_backward_cpu);
}
