// Online softmax (the rescale factor exp(m_old - m_new), folding logits into a running state)
// and the NCE terms (softplus/sigmoid, the constants of docs/math.md §1b).
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

namespace dcdkernels {
namespace gpu {

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

// Constants of the NCE loss (docs/math.md §1b, contract: v_k = l_k - log_z, c = K / N, eps = 1e-7).
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

}  // namespace gpu
}  // namespace dcdkernels
