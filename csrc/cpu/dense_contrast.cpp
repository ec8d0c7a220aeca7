// CPU kernels of dense_contrast and dense_contrast_backward_keys (SPEC §2; contract:
// csrc/KERNELS.md): anchors q (B, D) against keys (M, D), with the positive either key
// target_b or a separate positive key (column 0 before the M keys).
//
// Flash-attention style on CPU: the keys are taken in tiles of KT rows and the anchors in tiles
// of kAnchorTile rows; for each (anchor tile, key tile) one block of dots comes from a BLAS
// matmul, the per-row online softmax state absorbs it, rescaled by exp(m_old - m_new), and
// a += W K is a second matmul. The (B, M) logits never exist.
// The state holds the positive apart: m starts at the positive logit l+ and the sums run over
// the OTHER columns only: lo = sum exp(l_j - m), cwo = sum exp(l_j - m) d_j, ao = sum
// exp(l_j - m) k_j. With w+ = exp(l+ - m), l = w+ + lo and 1 - p+ = lo / l:
//   loss = (m - l+) + log l;  grad_q = s (ao / l - (lo / l) k+);  d/ds = cwo / l - (lo / l) d+;
//   grad_k+ = -s (lo / l) q.
// Written this way nothing cancels when the positive dominates (p+ -> 1), where the textbook
// LSE - l+ and a / l - k+ lose digits (their error is about ulp(LSE), whatever 1 - p+ is).
// The key gradient recomputes p_bj = exp(l_bj - LSE_b) block by block from the saved LSE:
//   grad_keys_j = s sum_b g_b (p_bj - [target_b == j]) q_b.
#include <torch/library.h>

#include "cpu/cpu_utils.h"

namespace dcdkernels {
namespace cpu {
namespace {

constexpr int64_t kAnchorTile = 256;

// Keys per tile: a converted key tile stays around 1 MiB of fp32 (the size of L2).
int64_t key_tile(int64_t D) {
  return std::max<int64_t>(16, std::min<int64_t>(1024, (int64_t(1) << 18) / std::max<int64_t>(D, 1)));
}

// Online-softmax update of one anchor row with its block of dots w[0, mt) (overwritten with the
// weights): m_new = max(m, max_j l_j), l_j = s d_j + beta; the sums so far are rescaled by
// exp(m - m_new) (cwo and the weighted key sum ao too, when gradients are wanted), and
// w_j = exp(l_j - m_new) is left in the block for ao += W K, with w = 0 at column `skip` (the
// positive key of a target row when it is in this block, else -1): the sums hold the others.
template <typename A>
DCD_CPU_CLONES void absorb_row(A* w, int64_t mt, int64_t skip, A s, A beta, A& m, A& lo, A* cwo, A* ao,
                               int64_t D) {
  A block_max = -std::numeric_limits<A>::infinity();
#pragma omp simd reduction(max : block_max)
  for (int64_t j = 0; j < mt; ++j) block_max = std::max(block_max, s * w[j] + beta);
  const A m_new = std::max(m, block_max);
  const A f = m == m_new ? A(1) : std::exp(m - m_new);
  A sum_w = 0, sum_wd = 0;
#pragma omp simd reduction(+ : sum_w, sum_wd)
  for (int64_t j = 0; j < mt; ++j) {
    const A d = w[j];
    w[j] = j == skip ? A(0) : exp_v(s * d + beta - m_new);
    sum_w += w[j];
    sum_wd += w[j] * d;
  }
  m = m_new;
  lo = lo * f + sum_w;
  if (cwo != nullptr) {
    *cwo = *cwo * f + sum_wd;
    if (f != A(1)) scale_vec(f, ao, D);
  }
}

// Key-gradient weights of one anchor row, in place over its block of dots:
// w_j = g exp(s d_j + beta - LSE) = g p_j.
template <typename A>
DCD_CPU_CLONES void probabilities_row(A* w, int64_t mt, A s, A beta_minus_lse, A g) {
#pragma omp simd
  for (int64_t j = 0; j < mt; ++j) w[j] = g * exp_v(s * w[j] + beta_minus_lse);
}

struct DenseInputs {
  int64_t B, M, D;
  at::ScalarType acc;
  at::Tensor q;       // (B, D) anchors in the accumulation dtype
  at::Tensor target;  // (B,) int64, or undefined when a separate positive is given
  at::Tensor pos;     // (B, D) positive key of each row (positive, or keys[target]) in the accumulation dtype
  at::Tensor d_pos;   // (B,) <q_b, pos_b>
  double s, beta;
};

DenseInputs prepare(const at::Tensor& anchor, const at::Tensor& keys, const std::optional<at::Tensor>& target,
                    const std::optional<at::Tensor>& positive, const at::Tensor& logit_scale,
                    const std::optional<at::Tensor>& bias) {
  check_float_matrix(anchor, "anchor");
  check_float_matrix(keys, "keys");
  DenseInputs in;
  in.B = anchor.size(0);
  in.D = anchor.size(1);
  in.M = keys.size(0);
  TORCH_CHECK(keys.size(1) == in.D, "keys have D = ", keys.size(1), " but the anchors have D = ", in.D);
  TORCH_CHECK(target.has_value() != positive.has_value(), "give exactly one of target and positive");
  in.acc = accumulation_dtype({anchor, keys});
  in.q = anchor.to(in.acc).contiguous();
  if (target.has_value()) {
    TORCH_CHECK(target->dim() == 1 && target->size(0) == in.B, "target must be (B,) = (", in.B, ",), got shape ",
                target->sizes());
    in.target = target->contiguous();
    check_index_range(in.target, in.M, "target");
    in.pos = keys.index_select(0, in.target).to(in.acc);
  } else {
    check_float_matrix(*positive, "positive");
    TORCH_CHECK(positive->size(0) == in.B && positive->size(1) == in.D, "positive must be (B, D) = (", in.B, ", ",
                in.D, "), got shape ", positive->sizes());
    in.pos = positive->to(in.acc).contiguous();
  }
  in.d_pos = (in.q * in.pos).sum(1);
  in.s = scalar_value(logit_scale, "logit_scale");
  in.beta = bias.has_value() ? scalar_value(*bias, "bias") : 0.0;
  return in;
}

// Runs the key tiles through every anchor's online state (m, lo, and with grad cwo, ao).
template <typename A>
void scan_key_tiles(const DenseInputs& in, const at::Tensor& keys, at::Tensor& m, at::Tensor& lo, at::Tensor& cwo,
                    at::Tensor& ao, bool grad) {
  const int64_t B = in.B, M = in.M, D = in.D;
  const A s = static_cast<A>(in.s), beta = static_cast<A>(in.beta);
  const int64_t* target = in.target.defined() ? in.target.data_ptr<int64_t>() : nullptr;
  A* m_p = m.data_ptr<A>();
  A* lo_p = lo.data_ptr<A>();
  A* cwo_p = grad ? cwo.data_ptr<A>() : nullptr;
  A* ao_p = grad ? ao.data_ptr<A>() : nullptr;
  const int64_t KT = key_tile(D);
  for (int64_t j0 = 0; j0 < M; j0 += KT) {
    const int64_t mt = std::min(KT, M - j0);
    const at::Tensor k = keys.narrow(0, j0, mt).to(in.acc);  // a view when the keys are already acc-typed
    for (int64_t b0 = 0; b0 < B; b0 += kAnchorTile) {
      const int64_t bt = std::min(kAnchorTile, B - b0);
      at::Tensor block = at::mm(in.q.narrow(0, b0, bt), k.t());  // (bt, mt) dots: the only block of logits
      A* w = block.data_ptr<A>();
      at::parallel_for(0, bt, 8, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t b = b0 + r;
          const int64_t skip = target != nullptr && target[b] >= j0 && target[b] < j0 + mt ? target[b] - j0 : -1;
          absorb_row(w + r * mt, mt, skip, s, beta, m_p[b], lo_p[b], grad ? cwo_p + b : nullptr,
                     grad ? ao_p + b * D : nullptr, D);
        }
      });
      if (grad) ao.narrow(0, b0, bt).addmm_(block, k);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dense_contrast_cpu(
    const at::Tensor& anchor, const at::Tensor& keys, const std::optional<at::Tensor>& target,
    const std::optional<at::Tensor>& positive, const at::Tensor& logit_scale, const std::optional<at::Tensor>& bias,
    bool compute_grad) {
  const DenseInputs in = prepare(anchor, keys, target, positive, logit_scale, bias);
  const int64_t B = in.B, D = in.D;
  const auto opts = anchor.options().dtype(in.acc);
  const at::Tensor l_pos = in.d_pos * in.s + in.beta;

  // The state starts from the positive alone (m = l+, no others yet).
  at::Tensor m = l_pos.clone(), lo = at::zeros({B}, opts), cwo, ao;
  if (compute_grad) {
    cwo = at::zeros({B}, opts);
    ao = at::zeros({B, D}, opts);
  }
  if (in.acc == at::kDouble) {
    scan_key_tiles<double>(in, keys, m, lo, cwo, ao, compute_grad);
  } else {
    scan_key_tiles<float>(in, keys, m, lo, cwo, ao, compute_grad);
  }

  // l = w+ + lo and loss = (m - l+) + log l, with log l = log1p((w+ - 1) + lo): when the positive
  // is the max (w+ = 1) this is log1p(lo), exact to the last digit however small.
  const at::Tensor w_pos_m1 = (l_pos - m).expm1_();  // w+ - 1
  const at::Tensor l = w_pos_m1 + 1 + lo;
  const at::Tensor log_l = (w_pos_m1 + lo).log1p_();
  const at::Tensor lse = m + log_l;
  const at::Tensor loss = (m - l_pos).add_(log_l);
  const at::Tensor empty = at::empty({0}, opts);
  if (!compute_grad) return {loss, lse, empty, empty, empty};
  const at::Tensor inv_l = l.reciprocal();
  const at::Tensor others = lo * inv_l;  // 1 - p+
  const at::Tensor grad_anchor = (ao * inv_l.unsqueeze(1) - in.pos * others.unsqueeze(1)).mul_(in.s);
  const at::Tensor grad_positive = positive.has_value() ? in.q * (others * -in.s).unsqueeze(1) : empty;
  const at::Tensor grad_scalars = at::stack({cwo * inv_l - others * in.d_pos, at::zeros({B}, opts)});  // d/dbeta = 0
  return {loss, lse, grad_anchor, grad_positive, grad_scalars};
}

// grad_keys (M, D) += s P_g^T q tile by tile, P_g[b, j] = g_b p_bj recomputed from the saved LSE.
template <typename A>
void key_gradient_tiles(const DenseInputs& in, const at::Tensor& keys, const at::Tensor& lse, const at::Tensor& g,
                        at::Tensor& grad_keys) {
  const int64_t B = in.B, M = in.M, D = in.D;
  const A s = static_cast<A>(in.s), beta = static_cast<A>(in.beta);
  const A* lse_p = lse.data_ptr<A>();
  const A* g_p = g.data_ptr<A>();
  const int64_t KT = key_tile(D);
  for (int64_t j0 = 0; j0 < M; j0 += KT) {
    const int64_t mt = std::min(KT, M - j0);
    const at::Tensor k = keys.narrow(0, j0, mt).to(in.acc);
    at::Tensor gk = grad_keys.narrow(0, j0, mt);
    for (int64_t b0 = 0; b0 < B; b0 += kAnchorTile) {
      const int64_t bt = std::min(kAnchorTile, B - b0);
      const at::Tensor qb = in.q.narrow(0, b0, bt);
      at::Tensor block = at::mm(qb, k.t());
      A* w = block.data_ptr<A>();
      at::parallel_for(0, bt, 8, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) probabilities_row(w + r * mt, mt, s, beta - lse_p[b0 + r], g_p[b0 + r]);
      });
      gk.addmm_(block.t(), qb, /*beta=*/1, /*alpha=*/in.s);
    }
  }
}

at::Tensor dense_contrast_backward_keys_cpu(const at::Tensor& anchor, const at::Tensor& keys,
                                            const std::optional<at::Tensor>& target,
                                            const std::optional<at::Tensor>& positive, const at::Tensor& logit_scale,
                                            const std::optional<at::Tensor>& bias, const at::Tensor& lse,
                                            const at::Tensor& grad_rows) {
  const DenseInputs in = prepare(anchor, keys, target, positive, logit_scale, bias);
  const int64_t B = in.B;
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == B && lse.device().is_cpu(), "lse must be a (B,) CPU tensor");
  TORCH_CHECK(grad_rows.dim() == 1 && grad_rows.size(0) == B && grad_rows.device().is_cpu(),
              "grad_rows must be a (B,) CPU tensor");
  const at::Tensor lse_a = lse.to(in.acc).contiguous(), g = grad_rows.to(in.acc).contiguous();
  at::Tensor grad_keys = at::zeros({in.M, in.D}, anchor.options().dtype(in.acc));
  if (in.acc == at::kDouble) {
    key_gradient_tiles<double>(in, keys, lse_a, g, grad_keys);
  } else {
    key_gradient_tiles<float>(in, keys, lse_a, g, grad_keys);
  }
  // Target term -s g_b q_b on key target_b (accumulates over duplicate targets). A separate
  // positive key is not among the keys, so then there is none.
  if (in.target.defined()) grad_keys.index_add_(0, in.target, in.q * g.unsqueeze(1), -in.s);
  return grad_keys;
}

}  // namespace
}  // namespace cpu
}  // namespace dcdkernels

TORCH_LIBRARY_IMPL(dcdkernels_C, CPU, m) {
  m.impl("dense_contrast", &dcdkernels::cpu::dense_contrast_cpu);
  m.impl("dense_contrast_backward_keys", &dcdkernels::cpu::dense_contrast_backward_keys_cpu);
}
