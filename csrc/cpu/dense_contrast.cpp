// CPU kernels of dense_contrast and dense_contrast_backward_keys (SPEC §2; contract:
// csrc/KERNELS.md): anchors q (B, D) against keys (M, D), with the positive either key
// target_b or a separate positive key (column 0 before the M keys).
//
// Flash-attention style on CPU: the keys are taken in tiles of KT rows and the anchors in tiles
// of BT rows; for each (anchor tile, key tile) one (BT, KT) block of dots comes from a BLAS
// matmul, and the per-row online softmax state (max m, sum l, weighted dot sum cw, weighted key
// sum a) absorbs it, rescaled by exp(m_old - m_new). The (B, M) logits never exist.
//   loss_b = LSE_b - l_b,pos;  grad_q_b = s (a_b / l_b - k_pos_b);  d/ds = cw_b / l_b - d_b,pos
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

struct DenseInputs {
  int64_t B, M, D;
  at::ScalarType acc;
  at::Tensor q;       // (B, D) anchors in the accumulation dtype
  at::Tensor target;  // (B,) int64, or undefined when a separate positive is given
  at::Tensor pos;     // (B, D) positive key of each row (positive, or keys[target]) in the accumulation dtype
  at::Tensor d_pos;   // (B,) <q_b, pos_b>
  double s, beta;
};

DenseInputs prepare(const at::Tensor& anchor, const at::Tensor& keys, const c10::optional<at::Tensor>& target,
                    const c10::optional<at::Tensor>& positive, const at::Tensor& logit_scale,
                    const c10::optional<at::Tensor>& bias) {
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dense_contrast_cpu(
    const at::Tensor& anchor, const at::Tensor& keys, const c10::optional<at::Tensor>& target,
    const c10::optional<at::Tensor>& positive, const at::Tensor& logit_scale, const c10::optional<at::Tensor>& bias,
    bool compute_grad) {
  const DenseInputs in = prepare(anchor, keys, target, positive, logit_scale, bias);
  const int64_t B = in.B, M = in.M, D = in.D;
  const auto opts = anchor.options().dtype(in.acc);
  const at::Tensor& q = in.q;
  const at::Tensor l_pos = in.d_pos * in.s + in.beta;

  // Online state per anchor row: max m, sum l = sum exp(l_j - m), and with grad
  // cw = sum exp(l_j - m) d_j and a = sum exp(l_j - m) key_j. A separate positive is column 0.
  at::Tensor m, l, cw, a;
  if (positive.has_value()) {
    m = l_pos.clone();
    l = at::ones({B}, opts);
    if (compute_grad) {
      cw = in.d_pos.clone();
      a = in.pos.clone();
    }
  } else {
    m = at::full({B}, -std::numeric_limits<double>::infinity(), opts);
    l = at::zeros({B}, opts);
    if (compute_grad) {
      cw = at::zeros({B}, opts);
      a = at::zeros({B, D}, opts);
    }
  }

  const int64_t KT = key_tile(D);
  for (int64_t j0 = 0; j0 < M; j0 += KT) {
    const int64_t mt = std::min(KT, M - j0);
    const at::Tensor k = keys.narrow(0, j0, mt).to(in.acc);  // a view when the keys are already acc-typed
    for (int64_t b0 = 0; b0 < B; b0 += kAnchorTile) {
      const int64_t bt = std::min(kAnchorTile, B - b0);
      at::Tensor mb = m.narrow(0, b0, bt), lb = l.narrow(0, b0, bt);
      const at::Tensor dots = at::mm(q.narrow(0, b0, bt), k.t());  // (bt, mt): the only block of logits
      const at::Tensor logits = dots * in.s + in.beta;
      const at::Tensor m_new = at::maximum(mb, std::get<0>(logits.max(1)));
      const at::Tensor f = (mb - m_new).exp_();  // rescales the sums so far (0 on the first block)
      const at::Tensor w = (logits - m_new.unsqueeze(1)).exp_();
      lb.mul_(f).add_(w.sum(1));
      if (compute_grad) {
        cw.narrow(0, b0, bt).mul_(f).add_((w * dots).sum(1));
        a.narrow(0, b0, bt).mul_(f.unsqueeze(1)).addmm_(w, k);
      }
      mb.copy_(m_new);
    }
  }

  const at::Tensor lse = m + l.log();
  const at::Tensor loss = lse - l_pos;
  const at::Tensor empty = at::empty({0}, opts);
  if (!compute_grad) return {loss, lse, empty, empty, empty};
  const at::Tensor inv_l = l.reciprocal();
  const at::Tensor grad_anchor = (a * inv_l.unsqueeze(1) - in.pos) * in.s;
  // dL/dpositive_b = s (p_b,pos - 1) q_b (only for a separate positive key).
  const at::Tensor grad_positive =
      positive.has_value() ? q * ((l_pos - lse).exp() - 1).mul_(in.s).unsqueeze(1) : empty;
  const at::Tensor grad_scalars = at::stack({cw * inv_l - in.d_pos, at::zeros({B}, opts)});  // d/dbeta = 0 exactly
  return {loss, lse, grad_anchor, grad_positive, grad_scalars};
}

at::Tensor dense_contrast_backward_keys_cpu(const at::Tensor& anchor, const at::Tensor& keys,
                                            const c10::optional<at::Tensor>& target,
                                            const c10::optional<at::Tensor>& positive, const at::Tensor& logit_scale,
                                            const c10::optional<at::Tensor>& bias, const at::Tensor& lse,
                                            const at::Tensor& grad_rows) {
  const DenseInputs in = prepare(anchor, keys, target, positive, logit_scale, bias);
  const int64_t B = in.B, M = in.M, D = in.D;
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == B && lse.device().is_cpu(), "lse must be a (B,) CPU tensor");
  TORCH_CHECK(grad_rows.dim() == 1 && grad_rows.size(0) == B && grad_rows.device().is_cpu(),
              "grad_rows must be a (B,) CPU tensor");
  const at::Tensor lse_a = lse.to(in.acc), g = grad_rows.to(in.acc);
  at::Tensor grad_keys = at::zeros({M, D}, anchor.options().dtype(in.acc));
  const int64_t KT = key_tile(D);
  for (int64_t j0 = 0; j0 < M; j0 += KT) {
    const int64_t mt = std::min(KT, M - j0);
    const at::Tensor k = keys.narrow(0, j0, mt).to(in.acc);
    at::Tensor gk = grad_keys.narrow(0, j0, mt);
    for (int64_t b0 = 0; b0 < B; b0 += kAnchorTile) {
      const int64_t bt = std::min(kAnchorTile, B - b0);
      const at::Tensor qb = in.q.narrow(0, b0, bt);
      // g_b p_bj for this block, p recomputed from the saved LSE.
      const at::Tensor gp = (at::mm(qb, k.t()) * in.s + (in.beta - lse_a.narrow(0, b0, bt)).unsqueeze(1))
                                .exp_()
                                .mul_(g.narrow(0, b0, bt).unsqueeze(1));
      gk.addmm_(gp.t(), qb, /*beta=*/1, /*alpha=*/in.s);
    }
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
