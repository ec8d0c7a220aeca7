// Argument checks of the gather ops (sampled_contrast, dual_sampled_contrast), shared by the CPU
// and CUDA launchers (host code): the loss type and the noise rows of the NCE constant.
#pragma once
#include <c10/util/Exception.h>

#include <cstdint>

namespace dcdkernels {

// Whether loss_type (0 InfoNCE, 1 NCE) is NCE; NCE needs log_z (`log_z_what` names its form).
inline bool nce_loss(int64_t loss_type, bool has_log_z, const char* log_z_what) {
  TORCH_CHECK(loss_type == 0 || loss_type == 1, "loss_type must be 0 (InfoNCE) or 1 (NCE), got ", loss_type);
  TORCH_CHECK(loss_type == 0 || has_log_z, "NCE (loss_type 1) needs ", log_z_what);
  return loss_type == 1;
}

// The N of the NCE constant c = K / N: noise_rows, or with 0 the n_rows of the bank(s) (`banks`
// names them in the error).
inline int64_t noise_rows_or(int64_t noise_rows, int64_t n_rows, const char* banks) {
  TORCH_CHECK(noise_rows >= 0, "noise_rows must be >= 0 (0: ", banks, " rows), got ", noise_rows);
  return noise_rows > 0 ? noise_rows : n_rows;
}

}  // namespace dcdkernels
