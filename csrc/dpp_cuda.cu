// CUDA greedy DPP MAP with the whole selection loop on the device.
//
// One fused kernel launch per pick: every thread extends one candidate's Cholesky column
// (C is stored [k, N], so column t is a contiguous row and all accesses coalesce), updates its
// residual d2, and the block reduces an argmax. The last block to finish (threadfence-reduction
// pattern) reduces the block winners and writes the next pick, its pivot and its gain to device
// memory, or raises the stop flag when the best gain fell below eps. The host only enqueues k
// launches; nothing synchronises until the caller reads the result.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include "dpp.h"

namespace cpd_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kTile = 1024;  // entries of the pick's Cholesky row staged in shared memory at once

// Status words in device memory: [0] stop flag, [1] arrival counter of the last-block reduction.
enum : int { kStop = 0, kArrived = 1 };

template <typename T>
__device__ __forceinline__ T dead() {
  return -INFINITY;
}

// Larger value wins; equal values go to the lower index (argmax semantics); idx < 0 is "none".
template <typename T>
__device__ __forceinline__ void merge(T& v, int64_t& i, T ov, int64_t oi) {
  if (oi < 0) return;
  if (i < 0 || ov > v || (ov == v && oi < i)) {
    v = ov;
    i = oi;
  }
}

template <typename T>
__device__ void block_argmax(T& v, int64_t& i) {
  __shared__ T sv[kThreads / 32];
  __shared__ int64_t si[kThreads / 32];
  for (int off = 16; off > 0; off >>= 1) {
    const T ov = __shfl_down_sync(0xffffffffu, v, off);
    const int64_t oi = __shfl_down_sync(0xffffffffu, i, off);
    merge(v, i, ov, oi);
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();  // sv/si may still be read by a previous call
  if (lane == 0) {
    sv[warp] = v;
    si[warp] = i;
  }
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / 32 ? sv[lane] : dead<T>();
    i = lane < kThreads / 32 ? si[lane] : -1;
    for (int off = 16; off > 0; off >>= 1) {
      const T ov = __shfl_down_sync(0xffffffffu, v, off);
      const int64_t oi = __shfl_down_sync(0xffffffffu, i, off);
      merge(v, i, ov, oi);
    }
  }
}

template <typename T>
struct Problem {
  const T* xt;    // features transposed [D, N] (feature mode), else nullptr
  const T* q;     // per-item quality [N] (feature mode), nullptr for all ones
  const T* L;     // kernel matrix [N, N] (matrix mode), else nullptr
  int64_t n, d, kind;
  T gamma, eps;
  T* C;           // Cholesky columns [k, N]
  T* d2;          // residual gains [N]; -inf marks picked or dropped items
  int64_t* sel;   // picks [k] (-1 padded)
  T* gain;        // log gains [k]
  T* pivot;       // sqrt(d2) of each pick [k]
  T* part_val;    // per-block winners [grid]
  int64_t* part_idx;
  int* status;
};

// L_ji for the pick j and this thread's item i.
template <typename T>
__device__ __forceinline__ T entry(const Problem<T>& p, int64_t j, int64_t i) {
  if (p.L != nullptr) return p.L[j * p.n + i];
  T acc = 0;
  if (p.kind == kRbf) {
    for (int64_t c = 0; c < p.d; ++c) {
      const T diff = __ldg(p.xt + c * p.n + j) - p.xt[c * p.n + i];
      acc += diff * diff;
    }
    acc = exp(-p.gamma * acc);
  } else {
    for (int64_t c = 0; c < p.d; ++c) acc += __ldg(p.xt + c * p.n + j) * p.xt[c * p.n + i];
  }
  return p.q != nullptr ? p.q[j] * p.q[i] * acc : acc;
}

template <typename T>
__global__ void init_kernel(Problem<T> p) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= p.n) return;
  T v;
  if (p.L != nullptr) {
    v = p.L[i * p.n + i];
  } else if (p.kind == kRbf) {
    v = T(1);
  } else {
    v = 0;
    for (int64_t c = 0; c < p.d; ++c) v += p.xt[c * p.n + i] * p.xt[c * p.n + i];
    if (p.kind == kCosine) v = v > 0 ? T(1) : T(0);
  }
  if (p.q != nullptr) v *= p.q[i] * p.q[i];
  p.d2[i] = v < p.eps ? dead<T>() : v;
}

// Launch t: extend every live candidate with the column of pick t-1 (t > 0), then choose pick t.
template <typename T>
__global__ void __launch_bounds__(kThreads) step_kernel(Problem<T> p, int64_t t) {
  __shared__ T cj[kTile];
  __shared__ bool last_block;
  if (*reinterpret_cast<volatile int*>(p.status + kStop)) return;  // uniform across the grid

  const int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  bool live = i < p.n && p.d2[i] != dead<T>();
  T best_v = dead<T>();
  int64_t best_i = -1;

  if (t > 0) {
    const int64_t s = t - 1, j = p.sel[s];
    T acc = 0;
    for (int64_t t0 = 0; t0 < s; t0 += kTile) {
      const int64_t len = min(static_cast<int64_t>(kTile), s - t0);
      __syncthreads();
      for (int64_t q = threadIdx.x; q < len; q += kThreads) cj[q] = p.C[(t0 + q) * p.n + j];
      __syncthreads();
      if (live)
        for (int64_t q = 0; q < len; ++q) acc += cj[q] * p.C[(t0 + q) * p.n + i];
    }
    if (live) {
      const T e = (entry(p, j, i) - acc) / p.pivot[s];
      p.C[s * p.n + i] = e;
      const T r = p.d2[i] - e * e;
      p.d2[i] = r < p.eps ? dead<T>() : r;
      live = r >= p.eps;
    }
  }
  if (live) {
    best_v = p.d2[i];
    best_i = i;
  }
  block_argmax(best_v, best_i);
  if (threadIdx.x == 0) {
    p.part_val[blockIdx.x] = best_v;
    p.part_idx[blockIdx.x] = best_i;
    __threadfence();
    last_block = atomicAdd(p.status + kArrived, 1) == static_cast<int>(gridDim.x) - 1;
  }
  __syncthreads();
  if (!last_block) return;

  // The last block reduces the block winners (in any order: merge() is order independent).
  __threadfence();
  best_v = dead<T>();
  best_i = -1;
  for (int64_t b = threadIdx.x; b < gridDim.x; b += kThreads)
    merge(best_v, best_i, __ldcg(p.part_val + b), __ldcg(p.part_idx + b));
  block_argmax(best_v, best_i);
  if (threadIdx.x == 0) {
    if (best_i >= 0) {
      p.sel[t] = best_i;
      p.gain[t] = log(best_v);
      p.pivot[t] = sqrt(best_v);
      p.d2[best_i] = dead<T>();
    } else {
      p.status[kStop] = 1;
    }
    p.status[kArrived] = 0;
  }
}

template <typename T>
void select(Problem<T> p, int64_t k, const at::Tensor& like, at::Tensor& idx, at::Tensor& gain) {
  const auto opts = like.options();
  const int64_t grid = (p.n + kThreads - 1) / kThreads;
  TORCH_CHECK(grid < (int64_t(1) << 31), "N=", p.n, " is too large for the CUDA DPP");
  at::Tensor C = at::empty({k, p.n}, opts);
  at::Tensor d2 = at::empty({p.n}, opts);
  at::Tensor pivot = at::empty({k}, opts);
  at::Tensor part_val = at::empty({grid}, opts);
  at::Tensor part_idx = at::empty({grid}, opts.dtype(at::kLong));
  at::Tensor status = at::zeros({2}, opts.dtype(at::kInt));
  p.C = C.data_ptr<T>();
  p.d2 = d2.data_ptr<T>();
  p.sel = idx.data_ptr<int64_t>();
  p.gain = gain.data_ptr<T>();
  p.pivot = pivot.data_ptr<T>();
  p.part_val = part_val.data_ptr<T>();
  p.part_idx = part_idx.data_ptr<int64_t>();
  p.status = status.data_ptr<int>();

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  init_kernel<T><<<grid, kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  for (int64_t t = 0; t < k; ++t) {
    step_kernel<T><<<grid, kThreads, 0, stream>>>(p, t);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::tuple<at::Tensor, at::Tensor> dpp_greedy_cuda(const at::Tensor& features,
                                                   const std::optional<at::Tensor>& quality, int64_t k,
                                                   int64_t kind, double gamma, double eps,
                                                   bool /*lazy: CPU only*/) {
  check_features(features, quality, k, kind, gamma, eps);
  const c10::cuda::CUDAGuard guard(features.device());
  const at::Tensor xt = features.t().contiguous();  // [D, N]: coalesced reads of x_i
  const at::Tensor q = quality.has_value() ? quality->contiguous() : at::Tensor();
  at::Tensor idx, gain;
  std::tie(idx, gain) = empty_outputs(features, k);
  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "dpp_greedy_cuda", [&] {
    Problem<scalar_t> p{};
    p.xt = xt.data_ptr<scalar_t>();
    p.q = q.defined() ? q.data_ptr<scalar_t>() : nullptr;
    p.n = features.size(0);
    p.d = features.size(1);
    p.kind = kind;
    p.gamma = static_cast<scalar_t>(gamma);
    p.eps = static_cast<scalar_t>(eps);
    select<scalar_t>(p, k, features, idx, gain);
  });
  return {idx, gain};
}

std::tuple<at::Tensor, at::Tensor> dpp_greedy_from_kernel_cuda(const at::Tensor& L, int64_t k, double eps,
                                                               bool /*lazy: CPU only*/) {
  check_kernel_matrix(L, k, eps);
  const c10::cuda::CUDAGuard guard(L.device());
  const at::Tensor m = L.contiguous();
  at::Tensor idx, gain;
  std::tie(idx, gain) = empty_outputs(m, k);
  AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "dpp_greedy_from_kernel_cuda", [&] {
    Problem<scalar_t> p{};
    p.L = m.data_ptr<scalar_t>();
    p.n = m.size(0);
    p.eps = static_cast<scalar_t>(eps);
    select<scalar_t>(p, k, m, idx, gain);
  });
  return {idx, gain};
}

}  // namespace
}  // namespace cpd_fast

TORCH_LIBRARY_IMPL(cpd_fast, CUDA, m) {
  m.impl("dpp_greedy", &cpd_fast::dpp_greedy_cuda);
  m.impl("dpp_greedy_from_kernel", &cpd_fast::dpp_greedy_from_kernel_cuda);
}
