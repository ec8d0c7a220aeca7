// Python module entry point: `import dcdkernels._C` loads the library and its op registrations,
// and publishes the constants of common/constants.h as module attributes.
#include <Python.h>

#include "common/constants.h"

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  // The constants that Python shares with the kernels (common/constants.h).
  if (module == nullptr) return nullptr;
  if (PyModule_AddIntConstant(module, "DETERMINISTIC_SMS", dcdkernels::kDeterministicSms) < 0 ||
      PyModule_AddIntConstant(module, "CUDA_MAX_DIM_SAMPLED_CONTRAST", dcdkernels::kSampledCudaMaxDim) < 0 ||
      PyModule_AddIntConstant(module, "CUDA_MAX_DIM_DUAL_SAMPLED_CONTRAST", dcdkernels::kDualCudaMaxDim) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}
