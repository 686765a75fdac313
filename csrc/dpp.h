// Greedy MAP inference for determinantal point processes (Chen, Zhang & Zhou, 2018).
//
// Shared by the CPU (dpp_cpu.cpp) and CUDA (dpp_cuda.cu) implementations: the kernel kinds,
// argument checks and output allocation. The Python wrapper (cpd_fast/dpp.py) validates user
// input with friendly messages; these TORCH_CHECKs are the last line that keeps a direct
// torch.ops.cpd_fast call from reading out of bounds.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace cpd_fast {

// L_ij computed on the fly from features x: linear x_i.x_j, rbf exp(-gamma |x_i - x_j|^2),
// cosine x_i.x_j on rows the Python side already L2-normalised, with the diagonal exactly 1
// (0 for an all-zero row) so that the first pick is a true tie, broken by the lowest index.
enum KernelKind : int64_t { kLinear = 0, kRbf = 1, kCosine = 2 };

inline void check_common(const at::Tensor& t, const char* name, int64_t k, double eps) {
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D, got ", t.dim(), "-D");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
              " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.size(0) > 0, name, " has no rows");
  TORCH_CHECK(k > 0 && k <= t.size(0), "k must be in [1, N=", t.size(0), "], got ", k);
  TORCH_CHECK(eps >= 0, "eps must be >= 0, got ", eps);
}

inline void check_features(const at::Tensor& x, const std::optional<at::Tensor>& q, int64_t k, int64_t kind,
                           double gamma, double eps) {
  check_common(x, "features", k, eps);
  if (q.has_value()) {
    TORCH_CHECK(q->dim() == 1 && q->size(0) == x.size(0), "quality must have shape [N=", x.size(0), "], got ",
                q->sizes());
    TORCH_CHECK(q->scalar_type() == x.scalar_type(), "quality must have the dtype of features");
    TORCH_CHECK(q->device() == x.device(), "quality must be on the device of features");
  }
  TORCH_CHECK(x.size(1) > 0, "features has no columns");
  TORCH_CHECK(kind == kLinear || kind == kRbf || kind == kCosine, "unknown kernel kind ", kind);
  TORCH_CHECK(kind != kRbf || gamma > 0, "gamma must be > 0 for the rbf kernel, got ", gamma);
}

inline void check_kernel_matrix(const at::Tensor& L, int64_t k, double eps) {
  check_common(L, "L", k, eps);
  TORCH_CHECK(L.size(0) == L.size(1), "L must be square, got ", L.sizes());
}

// Outputs: indices [k] int64 padded with -1 after an early stop, log-det gains [k] padded with -inf.
inline std::tuple<at::Tensor, at::Tensor> empty_outputs(const at::Tensor& like, int64_t k) {
  return {at::full({k}, -1, like.options().dtype(at::kLong)),
          at::full({k}, -std::numeric_limits<double>::infinity(), like.options())};
}

}  // namespace cpd_fast
