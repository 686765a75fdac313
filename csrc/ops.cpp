// The one place where cpd_fast's operator schemas are declared. Device implementations register
// themselves with TORCH_LIBRARY_IMPL in their own files (dpp_cpu.cpp, dpp_cuda.cu).
#include <Python.h>
#include <torch/library.h>

#include "dpp.h"

TORCH_LIBRARY(cpd_fast, m) {
  // Greedy DPP MAP over L computed on the fly from features [N, D], optionally weighted by a
  // per-item quality q [N] (L_ij = q_i q_j K_ij). kernel: 0 linear, 1 rbf.
  // Returns (indices [k] int64, -1 padded; log gains [k], -inf padded).
  m.def("dpp_greedy(Tensor features, Tensor? quality, int k, int kernel, float gamma, float eps, bool lazy) -> (Tensor, Tensor)");
  // The same over an explicit PSD kernel matrix L [N, N].
  m.def("dpp_greedy_from_kernel(Tensor L, int k, float eps, bool lazy) -> (Tensor, Tensor)");
}

namespace {

// Shape functions for tracing (torch.compile / FakeTensor): outputs are fixed-size [k].
std::tuple<at::Tensor, at::Tensor> dpp_greedy_meta(const at::Tensor& x, const std::optional<at::Tensor>& q,
                                                   int64_t k, int64_t kind, double gamma, double eps, bool) {
  cpd_fast::check_features(x, q, k, kind, gamma, eps);
  return cpd_fast::empty_outputs(x, k);
}

std::tuple<at::Tensor, at::Tensor> dpp_greedy_from_kernel_meta(const at::Tensor& L, int64_t k,
                                                               double eps, bool) {
  cpd_fast::check_kernel_matrix(L, k, eps);
  return cpd_fast::empty_outputs(L, k);
}

}  // namespace

TORCH_LIBRARY_IMPL(cpd_fast, Meta, m) {
  m.impl("dpp_greedy", &dpp_greedy_meta);
  m.impl("dpp_greedy_from_kernel", &dpp_greedy_from_kernel_meta);
}

// An importable module whose only job is to run the registrations above when loaded.
static struct PyModuleDef cpd_fast_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&cpd_fast_module);
  if (module == nullptr) return nullptr;
#ifdef CPD_WITH_CUDA
  PyModule_AddIntConstant(module, "with_cuda", 1);
#else
  PyModule_AddIntConstant(module, "with_cuda", 0);
#endif
  return module;
}
