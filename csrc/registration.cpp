// Op schemas of the dcdkernels._C extension. Implementations register per device in
// csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA). The contract is csrc/KERNELS.md.
#include <torch/library.h>

TORCH_LIBRARY(dcdkernels_C, m) {
  m.def(
      "sampled_contrast(Tensor anchor, Tensor bank, Tensor index, Tensor logit_scale, Tensor? bias, "
      "Tensor? log_z, int loss_type, int num_negatives, int seed, int offset, bool compute_grad, "
      "int noise_rows=0) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "dual_sampled_contrast(Tensor anchor_s, Tensor anchor_t, Tensor bank_s, Tensor bank_t, Tensor index, "
      "Tensor logit_scale, Tensor? bias, Tensor? log_z, int loss_type, bool compute_kl, int num_negatives, "
      "int seed, int offset, bool compute_grad, int noise_rows=0) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "dense_contrast(Tensor anchor, Tensor keys, Tensor? target, Tensor? positive, Tensor logit_scale, "
      "Tensor? bias, bool compute_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "dense_contrast_backward_keys(Tensor anchor, Tensor keys, Tensor? target, Tensor? positive, "
      "Tensor logit_scale, Tensor? bias, Tensor lse, Tensor grad_rows) -> Tensor");
  m.def(
      "dense_contrast_reduced(Tensor anchor, Tensor keys, Tensor? target, Tensor? positive, Tensor logit_scale, "
      "Tensor? bias, Tensor row_weight, bool keys_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "supcon_contrast(Tensor anchors, Tensor labels, Tensor keys, Tensor key_labels, Tensor logit_scale, "
      "float eps, bool exclude_self) -> (Tensor, Tensor)");
  m.def(
      "supcon_contrast_backward(Tensor anchors, Tensor labels, Tensor keys, Tensor key_labels, Tensor logit_scale, "
      "Tensor stats, Tensor grad_rows, bool exclude_self, bool keys_grad) -> (Tensor, Tensor, Tensor)");
  m.def("bank_momentum_update_(Tensor(a!) bank, Tensor index, Tensor value, float momentum) -> ()");
}
