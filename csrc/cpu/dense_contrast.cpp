// CPU kernels of dense_contrast, dense_contrast_backward_keys and dense_contrast_reduced (docs/math.md §2;
// contract: csrc/KERNELS.md): anchors q (B, D) against keys (M, D), with the positive either key
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
//
// dense_contrast_reduced (loss = sum_b c_b L_b) knows every row's weight in the forward. With a
// key gradient it needs no online softmax and no recomputation: per strip of anchors, S = q K^T
// (matmul 1), each row's softmax in place, dS = c_b s (P - Y) with the positive apart as above
// (its column -c_b s lo / l), grad_q = dS K (matmul 2), grad_K += dS^T q (matmul 3): three
// matmuls against four for the per-row op and its backward. Without one, or when the strips
// would be thin (see kMinStripRows), it is the per-row kernels above, their gradients times c.
#include <torch/library.h>

#include "common/reduced.h"
#include "cpu/cpu_utils.h"

namespace dcdkernels {
namespace cpu {
namespace {

// Online-softmax update of one anchor row with its block of dots w[0, mt) (overwritten with the
// weights): m_new = max(m, max_j l_j), l_j = s d_j + beta; the sums so far are rescaled by
// exp(m - m_new) (cwo and the weighted key sum ao too, when gradients are wanted), and
// w_j = exp(l_j - m_new) is left in the block for ao += W K, with w = 0 at column `skip` (the
// positive key of a target row when it is in this block, else -1): the sums hold the others.
template <typename A>
DCD_CPU_CLONES void absorb_row(A* w, int64_t mt, int64_t skip, A s, A beta, A& m, A& lo, A* cwo, A* ao, int64_t D) {
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
  check_anchors_keys(anchor, "anchor", keys);
  DenseInputs in;
  in.B = anchor.size(0);
  in.D = anchor.size(1);
  in.M = keys.size(0);
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
    TORCH_CHECK(positive->size(0) == in.B && positive->size(1) == in.D, "positive must be (B, D) = (", in.B, ", ", in.D,
                "), got shape ", positive->sizes());
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
  if (!compute_grad) return {loss, lse, empty, at::empty({0}, opts), at::empty({0}, opts)};  // outputs never alias
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
  const int64_t* target = in.target.defined() ? in.target.data_ptr<int64_t>() : nullptr;
  const A* d_pos = in.d_pos.data_ptr<A>();
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
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t b = b0 + r;
          // The target column takes the forward's own positive dot (kept apart there), so that
          // p_target and the saved LSE come from one value: a lone column gives p = 1 exactly
          // and a zero key gradient, as autograd of the oracle does, not an ulp of the logit.
          if (target != nullptr && target[b] >= j0 && target[b] < j0 + mt) w[r * mt + target[b] - j0] = d_pos[b];
          probabilities_row(w + r * mt, mt, s, beta - lse_p[b], g_p[b]);
        }
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

// Bytes of one strip of dots in dense_contrast_reduced: (B_t, M) in the accumulation dtype,
// B_t = max(1, kStripBytes / (M * sizeof)) anchors (L2-sized), so memory is O(B_t M + M D + B D)
// and the (B, M) logits never exist when B M exceeds it.
constexpr int64_t kStripBytes = int64_t(1) << 20;
// Every strip reads all the keys again. Strips are used while one holds all the anchors or at
// least this many; thinner ones made the step slower than the per-row kernels, whose 256-anchor
// tiles read the keys fewer times (2 cores, fp32, D = 128: strips of 13 and 16 anchors slower at
// B = 32, M = 20000 and B = 128, M = 16384; strips of 32 faster at B = 256, M = 8192, and one
// strip faster at B = 8, M = 20000).
constexpr int64_t kMinStripRows = 32;

template <typename A>
struct RowResult {
  A loss, lse, others;  // others = 1 - p+
  A row_scale;          // c_b s / l_b
  A grad_scale;         // c_b dL_b/ds
};

// Softmax of one anchor row over its dots d[0, M), overwritten with the unnormalised weights
// w_j = exp(l_j - m) and, at the target column t >= 0, -lo: row_scale * w_j = c s (p_j - [j == t]).
// The positive (logit l+ = s d_pos + beta; column t, or a separate key when t < 0) is kept apart
// from the other columns as in the per-row kernel.
template <typename A>
DCD_CPU_CLONES RowResult<A> softmax_row(A* d, int64_t M, int64_t t, A d_pos, A s, A beta, A c) {
  const A l_pos = s * d_pos + beta;
  A m = l_pos;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < M; ++j) m = std::max(m, s * d[j] + beta);
  A lo = 0, cwo = 0;
#pragma omp simd reduction(+ : lo, cwo)
  for (int64_t j = 0; j < M; ++j) {
    const A w = j == t ? A(0) : exp_v(s * d[j] + beta - m);
    lo += w;
    cwo += w * d[j];
    d[j] = w;
  }
  if (t >= 0) d[t] = -lo;  // p+ - 1 = -(1 - p+) = -lo / l
  // l = w+ + lo; log l = log1p((w+ - 1) + lo) is exact when the positive is the max (w+ = 1).
  const A w_pos_m1 = std::expm1(l_pos - m);
  const A l = w_pos_m1 + 1 + lo;
  const A log_l = std::log1p(w_pos_m1 + lo);
  const A others = lo / l;
  return {(m - l_pos) + log_l, m + log_l, others, c * s / l, c * (cwo / l - others * d_pos)};
}

// Strip by strip (the threads share a strip, which stays in cache): the threads split the
// strip's anchors for the dots, the softmax and grad_q = diag(f) W K, then split the keys for
// grad_K += W^T diag(f) q (f = row_scale: the strip is never rescaled). Each thread's BLAS calls
// run single-threaded: two fork-joins per strip (measured on 2 loaded cores: fewer stalls than
// threaded BLAS calls, as fast as per-thread grad_K copies without their memory).
template <typename A>
void reduced_strips(const DenseInputs& in, const at::Tensor& k, const at::Tensor& c, at::Tensor& rows, at::Tensor& lse,
                    at::Tensor& others, at::Tensor& grad_scale, at::Tensor& grad_anchor, at::Tensor& grad_keys,
                    int64_t bt_max) {
  const int64_t B = in.B, M = in.M, D = in.D;
  const A s = static_cast<A>(in.s), beta = static_cast<A>(in.beta);
  const int64_t* target = in.target.defined() ? in.target.data_ptr<int64_t>() : nullptr;
  const A* d_pos = in.d_pos.data_ptr<A>();
  const A* c_p = c.data_ptr<A>();
  A* rows_p = rows.data_ptr<A>();
  A* lse_p = lse.data_ptr<A>();
  A* others_p = others.data_ptr<A>();
  A* gs_p = grad_scale.data_ptr<A>();
  A* ga_p = grad_anchor.data_ptr<A>();
  const at::Tensor row_scale = at::empty({B}, k.options());
  A* f_p = row_scale.data_ptr<A>();
  const int64_t threads = at::get_num_threads();
  // The strip's memory is kept per calling thread (max(1 MiB, one row of dots)): a fresh
  // allocation of this size is a fresh mmap, page-faulted on every call (about 0.1 ms of the
  // 2.3 ms step at B = 64, M = 4096, D = 128 on 2 cores).
  static thread_local std::vector<A> strip;
  if (static_cast<int64_t>(strip.size()) < bt_max * M) strip.resize(static_cast<size_t>(bt_max * M));
  A* const S_p = strip.data();  // not `strip` in the workers: they have their own
  for (int64_t b0 = 0; b0 < B; b0 += bt_max) {
    const int64_t bt = std::min(bt_max, B - b0);
    const at::Tensor S = at::from_blob(S_p, {bt, M}, k.options());
    at::parallel_for(0, bt, at::divup(bt, threads), [&](int64_t r0, int64_t r1) {
      at::Tensor S_r = S.narrow(0, r0, r1 - r0);
      at::mm_out(S_r, in.q.narrow(0, b0 + r0, r1 - r0), k.t());
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = b0 + r, t = target != nullptr ? target[b] : -1;
        A* d = S_p + r * M;
        const RowResult<A> out = softmax_row<A>(d, M, t, t >= 0 ? d[t] : d_pos[b], s, beta, c_p[b]);
        rows_p[b] = out.loss;
        lse_p[b] = out.lse;
        others_p[b] = out.others;
        f_p[b] = out.row_scale;
        gs_p[b] = out.grad_scale;
      }
      at::Tensor ga = grad_anchor.narrow(0, b0 + r0, r1 - r0);
      at::mm_out(ga, S_r, k);
      for (int64_t b = b0 + r0; b < b0 + r1; ++b) scale_vec(f_p[b], ga_p + b * D, D);
    });
    const at::Tensor qf = in.q.narrow(0, b0, bt) * row_scale.narrow(0, b0, bt).unsqueeze(1);
    at::parallel_for(0, M, std::max<int64_t>(64, at::divup(M, threads)), [&](int64_t j0, int64_t j1) {
      // The first strip sets grad_K (beta = 0), the others add to it.
      grad_keys.narrow(0, j0, j1 - j0).addmm_(S.narrow(1, j0, j1 - j0).t(), qf, /*beta=*/b0 == 0 ? 0 : 1);
    });
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
dense_contrast_reduced_cpu(const at::Tensor& anchor, const at::Tensor& keys, const std::optional<at::Tensor>& target,
                           const std::optional<at::Tensor>& positive, const at::Tensor& logit_scale,
                           const std::optional<at::Tensor>& bias, const at::Tensor& row_weight, bool keys_grad) {
  check_float_matrix(anchor, "anchor");
  check_float_matrix(keys, "keys");
  const int64_t B = anchor.size(0), M = keys.size(0);
  TORCH_CHECK(row_weight.dim() == 1 && row_weight.size(0) == B && row_weight.device().is_cpu(),
              "row_weight must be a (B,) CPU tensor");
  // Detached inputs: the worker threads of at::parallel_for do not inherit the dispatcher's
  // below-autograd state, and mm_out refuses inputs that require grad.
  const at::Tensor q_in = anchor.detach(), k_in = keys.detach();
  const std::optional<at::Tensor> pos = positive.has_value() ? std::optional(positive->detach()) : std::nullopt;
  const at::ScalarType acc = accumulation_dtype({anchor, keys});
  const int64_t elem = acc == at::kDouble ? 8 : 4;
  const int64_t bt_max = std::max<int64_t>(1, std::min(B, kStripBytes / (std::max<int64_t>(M, 1) * elem)));
  if (!keys_grad || bt_max < std::min(B, kMinStripRows)) {
    // The per-row kernels, their gradients times c. Without a key gradient they do the same two
    // matmuls as the strips (dots, a += W K), with each key tile still in cache for the second.
    return compose_reduced([&] { return dense_contrast_cpu(q_in, k_in, target, pos, logit_scale, bias, true); },
                           [&](const at::Tensor& lse, const at::Tensor& c) {
                             return dense_contrast_backward_keys_cpu(q_in, k_in, target, pos, logit_scale, bias, lse,
                                                                     c);
                           },
                           row_weight.detach().to(acc).contiguous(), keys_grad, pos.has_value());
  }
  const DenseInputs in = prepare(q_in, k_in, target, pos, logit_scale, bias);
  const int64_t D = in.D;
  const auto opts = anchor.options().dtype(acc);
  const at::Tensor c = row_weight.detach().to(acc).contiguous();
  const at::Tensor k = k_in.to(acc).contiguous();  // no copy for contiguous acc-typed keys
  at::Tensor rows = at::empty({B}, opts), lse = at::empty({B}, opts), others = at::empty({B}, opts);
  at::Tensor grad_scale = at::empty({B}, opts), grad_anchor = at::empty({B, D}, opts);
  // The first strip's addmm sets grad_keys (beta = 0); without anchors it is zero.
  at::Tensor grad_keys = B > 0 ? at::empty({M, D}, opts) : at::zeros({M, D}, opts);
  if (acc == at::kDouble) {
    reduced_strips<double>(in, k, c, rows, lse, others, grad_scale, grad_anchor, grad_keys, bt_max);
  } else {
    reduced_strips<float>(in, k, c, rows, lse, others, grad_scale, grad_anchor, grad_keys, bt_max);
  }
  at::Tensor grad_positive = at::empty({0}, opts);
  if (pos.has_value()) {  // the separate positive column: -c s (1 - p+) times k+ (anchor) and q (positive)
    const at::Tensor coef = (c * others).mul_(-in.s).unsqueeze(1);
    grad_anchor.addcmul_(in.pos, coef);
    grad_positive = in.q * coef;
  }
  const at::Tensor grad_scalars = at::stack({grad_scale.sum(), at::zeros({}, opts)});  // d/dbeta = 0
  return {(rows * c).sum(), rows, lse, grad_anchor, grad_positive, grad_keys, grad_scalars};
}

}  // namespace
}  // namespace cpu
}  // namespace dcdkernels

TORCH_LIBRARY_IMPL(dcdkernels_C, CPU, m) {
  m.impl("dense_contrast", &dcdkernels::cpu::dense_contrast_cpu);
  m.impl("dense_contrast_backward_keys", &dcdkernels::cpu::dense_contrast_backward_keys_cpu);
  m.impl("dense_contrast_reduced", &dcdkernels::cpu::dense_contrast_reduced_cpu);
}
