// CPU greedy DPP MAP: plain greedy (parallel over items with at::parallel_for) and lazy greedy.
//
// Both keep the incremental Cholesky rows C[i, 0:t] of every candidate (O(N k) memory) and the
// residual d2[i] = L_ii - |C[i, 0:t]|^2, the log-det gain of adding i. Picking item j with pivot
// dj = sqrt(d2[j]) extends every row by e_i = (L_ji - <C[j], C[i]>) / dj and d2[i] -= e_i^2.
// Items whose d2 fell below eps can never be picked again (d2 only decreases) and are dropped.
//
// Plain and lazy greedy call the same `extend`, whose arithmetic has a fixed order, so they
// produce bit-identical selections.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "dpp.h"

namespace cpd_fast {
namespace {

// Dot product with 8 independent partial sums: the compiler vectorises it without -ffast-math,
// and the summation order is fixed.
template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  T acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) acc[l] += a[i + l] * b[i + l];
  T tail = 0;
  for (; i < n; ++i) tail += a[i] * b[i];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

template <typename T>
inline T squared_distance(const T* a, const T* b, int64_t n) {
  T acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) {
      const T d = a[i + l] - b[i + l];
      acc[l] += d * d;
    }
  T tail = 0;
  for (; i < n; ++i) tail += (a[i] - b[i]) * (a[i] - b[i]);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

// Kernel entries L_ji = q_j q_i K(x_j, x_i) computed on the fly from features [N, D].
template <typename T>
struct FeatureRows {
  const T* x;
  const T* q;  // per-item quality, nullptr for all ones
  int64_t d;
  int64_t kind;
  T gamma;
  T diag(int64_t i) const {
    T base = kind == kRbf ? T(1) : dot(x + i * d, x + i * d, d);
    if (kind == kCosine) base = base > 0 ? T(1) : T(0);
    return q ? q[i] * q[i] * base : base;
  }
  T entry(int64_t j, int64_t i) const {
    const T base = kind == kRbf ? std::exp(-gamma * squared_distance(x + j * d, x + i * d, d))
                                : dot(x + j * d, x + i * d, d);
    return q ? q[j] * q[i] * base : base;
  }
};

// Kernel entries read from an explicit matrix L [N, N].
template <typename T>
struct MatrixRows {
  const T* L;
  int64_t n;
  T diag(int64_t i) const { return L[i * n + i]; }
  T entry(int64_t j, int64_t i) const { return L[j * n + i]; }
};

template <typename T>
constexpr T kDead = -std::numeric_limits<T>::infinity();

// Adds column s (pick j with pivot dj) to item i's Cholesky row; drops i once d2 < eps.
template <typename T, typename Rows>
inline void extend(const Rows& rows, T* C, int64_t k, int64_t j, T dj, int64_t s, int64_t i, T* d2, T eps) {
  T* ci = C + i * k;
  const T e = (rows.entry(j, i) - dot(C + j * k, ci, s)) / dj;
  ci[s] = e;
  const T r = d2[i] - e * e;
  d2[i] = r < eps ? kDead<T> : r;
}

// Running argmax with the lowest index winning ties (what argmax over an array does).
template <typename T>
struct Best {
  T val = kDead<T>;
  int64_t idx = -1;
  void offer(T v, int64_t i) {
    if (v > val) {
      val = v;
      idx = i;
    }
  }
};

template <typename T>
class Chunks {
 public:
  explicit Chunks(int64_t n) : n_(n) {
    const int64_t want = std::max<int64_t>(1, n / 2048);
    const int64_t count = std::min<int64_t>(want, 8 * at::get_num_threads());
    per_ = (n + count - 1) / count;
    best_.resize((n + per_ - 1) / per_);
  }

  // Runs f(lo, hi, best) over contiguous item ranges in parallel, then merges the chunk winners
  // in index order, so the result does not depend on the number of threads.
  template <typename F>
  Best<T> argmax(F&& f) {
    at::parallel_for(0, static_cast<int64_t>(best_.size()), 1, [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c) {
        Best<T> local;
        f(c * per_, std::min(n_, (c + 1) * per_), local);
        best_[c] = local;
      }
    });
    Best<T> out;
    for (const auto& b : best_) out.offer(b.val, b.idx);
    return out;
  }

 private:
  int64_t n_, per_;
  std::vector<Best<T>> best_;
};

template <typename T, typename Rows>
void greedy(const Rows& rows, int64_t n, int64_t k, T eps, int64_t* idx, T* gain) {
  at::Tensor C_storage = at::empty({n, k}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  T* C = C_storage.data_ptr<T>();
  std::vector<T> d2(n);
  Chunks<T> chunks(n);
  Best<T> best = chunks.argmax([&](int64_t lo, int64_t hi, Best<T>& b) {
    for (int64_t i = lo; i < hi; ++i) {
      const T v = rows.diag(i);
      d2[i] = v < eps ? kDead<T> : v;
      b.offer(d2[i], i);
    }
  });
  for (int64_t t = 0; t < k && best.idx >= 0; ++t) {
    const int64_t j = best.idx;
    idx[t] = j;
    gain[t] = std::log(best.val);
    const T dj = std::sqrt(best.val);
    d2[j] = kDead<T>;
    if (t + 1 == k) break;
    best = chunks.argmax([&](int64_t lo, int64_t hi, Best<T>& b) {
      for (int64_t i = lo; i < hi; ++i) {
        if (d2[i] == kDead<T>) continue;
        extend(rows, C, k, j, dj, t, i, d2.data(), eps);
        b.offer(d2[i], i);
      }
    });
  }
}

// Lazy greedy: d2 only decreases, so a stale d2 is an upper bound. Pop the largest bound; if it
// is current it is the greedy pick, otherwise bring that item up to date and push it back.
template <typename T, typename Rows>
void lazy_greedy(const Rows& rows, int64_t n, int64_t k, T eps, int64_t* idx, T* gain) {
  at::Tensor C_storage = at::empty({n, k}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  T* C = C_storage.data_ptr<T>();
  std::vector<T> d2(n), pivot(k);
  std::vector<int64_t> columns(n, 0);  // how many picks item i's row already accounts for
  using Entry = std::pair<T, int64_t>;
  // Max-heap on the bound; among equal bounds the lowest index comes first.
  auto lower = [](const Entry& a, const Entry& b) {
    return a.first < b.first || (a.first == b.first && a.second > b.second);
  };
  std::vector<Entry> heap;
  heap.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    d2[i] = rows.diag(i);
    if (d2[i] >= eps) heap.emplace_back(d2[i], i);
  }
  std::make_heap(heap.begin(), heap.end(), lower);
  int64_t t = 0;
  while (t < k && !heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), lower);
    const int64_t i = heap.back().second;
    heap.pop_back();
    if (columns[i] == t) {
      idx[t] = i;
      gain[t] = std::log(d2[i]);
      pivot[t] = std::sqrt(d2[i]);
      ++t;
      continue;
    }
    for (int64_t s = columns[i]; s < t && d2[i] != kDead<T>; ++s)
      extend(rows, C, k, idx[s], pivot[s], s, i, d2.data(), eps);
    columns[i] = t;
    if (d2[i] != kDead<T>) {
      heap.emplace_back(d2[i], i);
      std::push_heap(heap.begin(), heap.end(), lower);
    }
  }
}

template <typename T, typename Rows>
void run(const Rows& rows, int64_t n, int64_t k, double eps, bool lazy, at::Tensor& idx, at::Tensor& gain) {
  if (lazy)
    lazy_greedy<T>(rows, n, k, static_cast<T>(eps), idx.data_ptr<int64_t>(), gain.data_ptr<T>());
  else
    greedy<T>(rows, n, k, static_cast<T>(eps), idx.data_ptr<int64_t>(), gain.data_ptr<T>());
}

std::tuple<at::Tensor, at::Tensor> dpp_greedy_cpu(const at::Tensor& features, const std::optional<at::Tensor>& quality,
                                                  int64_t k, int64_t kind, double gamma, double eps, bool lazy) {
  check_features(features, quality, k, kind, gamma, eps);
  const at::Tensor x = features.contiguous();
  const at::Tensor q = quality.has_value() ? quality->contiguous() : at::Tensor();
  at::Tensor idx, gain;
  std::tie(idx, gain) = empty_outputs(x, k);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dpp_greedy_cpu", [&] {
    FeatureRows<scalar_t> rows{x.data_ptr<scalar_t>(), q.defined() ? q.data_ptr<scalar_t>() : nullptr, x.size(1),
                               kind, static_cast<scalar_t>(gamma)};
    run<scalar_t>(rows, x.size(0), k, eps, lazy, idx, gain);
  });
  return {idx, gain};
}

std::tuple<at::Tensor, at::Tensor> dpp_greedy_from_kernel_cpu(const at::Tensor& L, int64_t k, double eps,
                                                              bool lazy) {
  check_kernel_matrix(L, k, eps);
  const at::Tensor m = L.contiguous();
  at::Tensor idx, gain;
  std::tie(idx, gain) = empty_outputs(m, k);
  AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "dpp_greedy_from_kernel_cpu", [&] {
    MatrixRows<scalar_t> rows{m.data_ptr<scalar_t>(), m.size(0)};
    run<scalar_t>(rows, m.size(0), k, eps, lazy, idx, gain);
  });
  return {idx, gain};
}

}  // namespace
}  // namespace cpd_fast

TORCH_LIBRARY_IMPL(cpd_fast, CPU, m) {
  m.impl("dpp_greedy", &cpd_fast::dpp_greedy_cpu);
  m.impl("dpp_greedy_from_kernel", &cpd_fast::dpp_greedy_from_kernel_cpu);
}
