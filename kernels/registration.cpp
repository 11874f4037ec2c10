// The library's one definition. Each op is registered beside its host entry point, schema and
// implementation side by side (TORCH_LIBRARY_FRAGMENT blocks in kernels/<family>/ops.cpp,
// kernels/common/ops.cpp, kernels/common/linear_ops.cpp, kernels/gdn/prefill_schedule.cpp; see
// kernels/common/op_registration.h).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(vllm_gdn_cpu, m) {}

// Importing vllm_gdn_cpu._C registers the ops; the module itself has no attributes.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
