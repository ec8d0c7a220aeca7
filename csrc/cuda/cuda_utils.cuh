// Umbrella of the device helpers shared by the CUDA kernels (csrc/cuda/*.cu; contract:
// csrc/KERNELS.md). A kernel may include just the focused headers it uses:
//   launch.cuh    warp constants, grid sizing for the SMs, device-resident scalar arguments
//   elements.cuh  element access (Matrix, dtype tags) and bank row fragments (RowFrag)
//   reduce.cuh    warp, row-group and block reductions, merge of scalar slots
//   softmax.cuh   online softmax and the NCE terms
//   layout.cuh    column -> bank row, row groups and fragments, split-K of the columns
//   gather.cuh    device pieces of the split-K gather kernels (sampled and dual)
//   partials.cuh  split-K partials of one direction and their merge kernel
#pragma once

#include "cuda/elements.cuh"
#include "cuda/gather.cuh"
#include "cuda/launch.cuh"
#include "cuda/layout.cuh"
#include "cuda/partials.cuh"
#include "cuda/reduce.cuh"
#include "cuda/softmax.cuh"
