// CPU greedy DPP MAP: plain greedy (parallel over items with at::parallel_for) and lazy greedy.
//
// Both keep the incremental Cholesky factor of every candidate (O(N k) memory) and the residual
// d2[i] = L_ii - |C[i, 0:t]|^2, the log-det gain of adding i. Picking item j with pivot
// dj = sqrt(d2[j]) extends every candidate by e_i = (L_ji - <C[j], C[i]>) / dj and d2[i] -= e_i^2.
// Items whose d2 fell below eps can never be picked again (d2 only decreases) and are dropped.
//
// Plain greedy touches every candidate at every pick, so it streams: Cholesky columns are
// item-contiguous rows of C [k, N] and the loops vectorise across items. Lazy greedy touches few
// candidates per pick, so it keeps each candidate's factor row contiguous (C [N, k]). Their
// arithmetic differs only in summation order: they pick the same items except where two gains
// tie to within rounding.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
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

// exp(x) for x <= 0 (the rbf argument) as branch-free arithmetic the compiler vectorises, unlike
// std::exp (setup.py passes -fno-trapping-math so that the selects if-convert): x = n ln2 + r with |r| <= ln2/2 (Cody-Waite split of ln2), exp(r) by its Taylor
// polynomial (degree 7 for float, 13 for double: truncation error below half an ulp), and 2^n
// written into the exponent bits. Arguments below the smallest normal's log return 0.
template <typename T>
struct ExpTraits;
template <>
struct ExpTraits<float> {
  using Bits = int32_t;
  static constexpr int kDegree = 7, kMantissa = 23, kBias = 127;
  static constexpr float kMin = -87.0f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  static constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
};
template <>
struct ExpTraits<double> {
  using Bits = int64_t;
  static constexpr int kDegree = 13, kMantissa = 52, kBias = 1023;
  static constexpr double kMin = -708.0, kLn2Hi = 0.693145751953125, kLn2Lo = 1.42860682030941723212e-6;
  static constexpr double kRound = 6755399441055744.0;  // 1.5 * 2^52
};

template <typename T>
inline T exp_nonpositive(T x) {
  using E = ExpTraits<T>;
  using B = typename E::Bits;
  const T xc = std::max(x, E::kMin);
  const T shifted = xc * T(1.4426950408889634) + E::kRound;  // round(x / ln2) in the low bits
  const T n = shifted - E::kRound;
  const T r = (xc - n * E::kLn2Hi) - n * E::kLn2Lo;
  T poly = T(1);
#pragma GCC unroll 16
  for (int m = E::kDegree; m >= 1; --m) poly = T(1) + poly * (r * (T(1) / T(m)));  // sum r^m / m!
  // 2^n from the bits of `shifted` (integer ops only: AVX2 has no double -> int64 conversion).
  const B bits = (std::bit_cast<B>(shifted) - std::bit_cast<B>(E::kRound) + E::kBias) << E::kMantissa;
  const T v = poly * std::bit_cast<T>(bits);
  return x < E::kMin ? T(0) : v;
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
    const T base = kind == kRbf ? exp_nonpositive(-gamma * squared_distance(x + j * d, x + i * d, d))
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

// Per-ISA copies of the streaming loops: the same source compiled for AVX2 and for the baseline
// x86-64 ISA, picked at run time (wheels must not assume AVX2).
#if defined(__GNUC__) && defined(__x86_64__)
#define CPD_ALWAYS_INLINE __attribute__((always_inline)) inline
#define CPD_TARGET_AVX2 __attribute__((target("avx2")))
inline bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}
#else
#define CPD_ALWAYS_INLINE inline
#define CPD_TARGET_AVX2
inline bool cpu_has_avx2() { return false; }
#endif

// The plain greedy's view of the problem. It streams, so its layouts are item-contiguous:
// features transposed to xt [D, N] and Cholesky columns C [k, N] (column t = a contiguous row).
template <typename T>
struct Streams {
  const T* xt;  // [D, N] features (feature mode) or nullptr
  const T* L;   // [N, N] kernel matrix (matrix mode) or nullptr
  const T* q;   // [N] quality or nullptr
  int64_t n, d, kind;
  T gamma;
  T* C;
};

// Kernel row L[j, lo:lo+len] (without the quality weights), streamed from the transposed
// features so that every loop runs across items (contiguous, vectorisable).
template <typename T>
CPD_ALWAYS_INLINE void row_chunk(const Streams<T>& p, int64_t j, int64_t lo, int64_t len, T* out) {
  if (p.L != nullptr) {
    const T* src = p.L + j * p.n + lo;
    for (int64_t i = 0; i < len; ++i) out[i] = src[i];
    return;
  }
  for (int64_t i = 0; i < len; ++i) out[i] = 0;
  const bool rbf = p.kind == kRbf;
  int64_t c = 0;
  for (; c + 4 <= p.d; c += 4) {  // four feature rows per pass: a quarter of the stores to out
    const T* x0 = p.xt + c * p.n;
    const T *x1 = x0 + p.n, *x2 = x1 + p.n, *x3 = x2 + p.n;
    const T a = x0[j], b = x1[j], e = x2[j], f = x3[j];
    x0 += lo, x1 += lo, x2 += lo, x3 += lo;
    if (rbf) {
      for (int64_t i = 0; i < len; ++i)
        out[i] = out[i] + (x0[i] - a) * (x0[i] - a) + (x1[i] - b) * (x1[i] - b) + (x2[i] - e) * (x2[i] - e) +
                 (x3[i] - f) * (x3[i] - f);
    } else {
      for (int64_t i = 0; i < len; ++i) out[i] = out[i] + a * x0[i] + b * x1[i] + e * x2[i] + f * x3[i];
    }
  }
  for (; c < p.d; ++c) {
    const T xj = p.xt[c * p.n + j];
    const T* xc = p.xt + c * p.n + lo;
    if (rbf) {
      for (int64_t i = 0; i < len; ++i) out[i] += (xc[i] - xj) * (xc[i] - xj);
    } else {
      for (int64_t i = 0; i < len; ++i) out[i] += xj * xc[i];
    }
  }
  if (p.kind == kRbf)
    for (int64_t i = 0; i < len; ++i) out[i] = exp_nonpositive(-p.gamma * out[i]);
}

// Appends Cholesky column s (pick j, pivot dj) for items lo..lo+len and updates their d2:
// acc = <C[0:s, j], C[0:s, i]> by s streaming axpys over contiguous column segments, then a
// branch-free update (dead items stay dead), so both loops vectorise across items.
template <typename T>
CPD_ALWAYS_INLINE void extend_chunk(const Streams<T>& p, int64_t j, int64_t s, T dj, T eps, int64_t lo, int64_t len,
                                    const T* row, T* acc, T* d2) {
  for (int64_t i = 0; i < len; ++i) acc[i] = 0;
  int64_t t = 0;
  for (; t + 4 <= s; t += 4) {  // four columns per pass: 4 prefetch streams, 1/4 of the acc traffic
    const T* c = p.C + t * p.n;
    const T c0 = c[j], c1 = c[p.n + j], c2 = c[2 * p.n + j], c3 = c[3 * p.n + j];
    const T *r0 = c + lo, *r1 = r0 + p.n, *r2 = r1 + p.n, *r3 = r2 + p.n;
    for (int64_t i = 0; i < len; ++i) acc[i] = acc[i] + c0 * r0[i] + c1 * r1[i] + c2 * r2[i] + c3 * r3[i];
  }
  for (; t < s; ++t) {
    const T cj = p.C[t * p.n + j];
    const T* ct = p.C + t * p.n + lo;
    for (int64_t i = 0; i < len; ++i) acc[i] += cj * ct[i];
  }
  if (p.q != nullptr) {  // fold the quality weights into the row first: L_ji = q_j q_i K_ji
    for (int64_t i = 0; i < len; ++i) acc[i] -= p.q[j] * p.q[lo + i] * row[i];
  } else {
    for (int64_t i = 0; i < len; ++i) acc[i] -= row[i];
  }
  T* column = p.C + s * p.n + lo;
  for (int64_t i = 0; i < len; ++i) {
    const T e = -acc[i] / dj;  // (L_ji - <C[j], C[i]>) / dj
    column[i] = e;
    const T r = d2[i] - e * e;
    d2[i] = (d2[i] == kDead<T>) | (r < eps) ? kDead<T> : r;
  }
}

template <typename T>
CPD_TARGET_AVX2 void row_chunk_avx2(const Streams<T>& p, int64_t j, int64_t lo, int64_t len, T* out) {
  row_chunk(p, j, lo, len, out);
}
template <typename T>
CPD_TARGET_AVX2 void extend_chunk_avx2(const Streams<T>& p, int64_t j, int64_t s, T dj, T eps, int64_t lo,
                                       int64_t len, const T* row, T* acc, T* d2) {
  extend_chunk(p, j, s, dj, eps, lo, len, row, acc, d2);
}

// Items are processed in chunks: long enough that each Cholesky column segment streams from
// memory at full speed, short enough that a chunk's accumulators stay in L2, and at least two
// per thread. Per-item arithmetic does not depend on the chunking and chunk winners merge in
// index order, so the picks do not depend on the number of threads.
inline int64_t chunk_size(int64_t n) {
  const int64_t per_thread = (n + 2 * at::get_num_threads() - 1) / (2 * at::get_num_threads());
  return std::clamp<int64_t>(per_thread, 2048, 16384);
}

template <typename T, typename F>
Best<T> parallel_argmax(int64_t n, int64_t chunk, std::vector<Best<T>>& best, F&& f) {
  at::parallel_for(0, static_cast<int64_t>(best.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      Best<T> local;
      f(c * chunk, std::min(n, (c + 1) * chunk), local);
      best[c] = local;
    }
  });
  Best<T> out;
  for (const auto& b : best) out.offer(b.val, b.idx);
  return out;
}

template <typename T>
void greedy(Streams<T> p, const std::vector<T>& diag, int64_t k, T eps, int64_t* idx, T* gain) {
  const int64_t n = p.n;
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor C_storage = at::empty({k, n}, opts), row_storage = at::empty({n}, opts);
  p.C = C_storage.data_ptr<T>();
  T* row = row_storage.data_ptr<T>();
  std::vector<T> d2(n), acc(n);
  const int64_t chunk = chunk_size(n);
  std::vector<Best<T>> chunk_best((n + chunk - 1) / chunk);
  const bool avx2 = cpu_has_avx2();
  for (int64_t i = 0; i < n; ++i) d2[i] = diag[i] < eps ? kDead<T> : diag[i];
  Best<T> best;
  for (int64_t i = 0; i < n; ++i) best.offer(d2[i], i);

  for (int64_t t = 0; t < k && best.idx >= 0; ++t) {
    const int64_t j = best.idx;
    idx[t] = j;
    gain[t] = std::log(best.val);
    const T dj = std::sqrt(best.val);
    d2[j] = kDead<T>;
    if (t + 1 == k) break;
    best = parallel_argmax<T>(n, chunk, chunk_best, [&](int64_t lo, int64_t hi, Best<T>& b) {
      const int64_t len = hi - lo;
      avx2 ? row_chunk_avx2(p, j, lo, len, row + lo) : row_chunk(p, j, lo, len, row + lo);
      if (avx2)
        extend_chunk_avx2(p, j, t, dj, eps, lo, len, row + lo, acc.data() + lo, d2.data() + lo);
      else
        extend_chunk(p, j, t, dj, eps, lo, len, row + lo, acc.data() + lo, d2.data() + lo);
      for (int64_t i = lo; i < hi; ++i) b.offer(d2[i], i);
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

// Lazy greedy reads kernel entries through `rows`; plain greedy streams through `p`.
template <typename T, typename Rows>
void run(const Rows& rows, const Streams<T>& p, int64_t k, double eps, bool lazy, at::Tensor& idx,
         at::Tensor& gain) {
  const T e = static_cast<T>(eps);
  if (lazy) {
    lazy_greedy<T>(rows, p.n, k, e, idx.data_ptr<int64_t>(), gain.data_ptr<T>());
    return;
  }
  std::vector<T> diag(p.n);
  for (int64_t i = 0; i < p.n; ++i) diag[i] = rows.diag(i);
  greedy<T>(p, diag, k, e, idx.data_ptr<int64_t>(), gain.data_ptr<T>());
}

std::tuple<at::Tensor, at::Tensor> dpp_greedy_cpu(const at::Tensor& features, const std::optional<at::Tensor>& quality,
                                                  int64_t k, int64_t kind, double gamma, double eps, bool lazy) {
  check_features(features, quality, k, kind, gamma, eps);
  const at::Tensor x = features.contiguous();
  const at::Tensor q = quality.has_value() ? quality->contiguous() : at::Tensor();
  at::Tensor idx, gain;
  std::tie(idx, gain) = empty_outputs(x, k);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dpp_greedy_cpu", [&] {
    using T = scalar_t;
    const T* qp = q.defined() ? q.data_ptr<T>() : nullptr;
    FeatureRows<T> rows{x.data_ptr<T>(), qp, x.size(1), kind, static_cast<T>(gamma)};
    const int64_t n = x.size(0);
    const at::Tensor xt = lazy ? at::Tensor() : x.t().contiguous();  // only the streaming greedy reads it
    const T* xtp = lazy ? nullptr : xt.data_ptr<T>();
    Streams<T> p{xtp, nullptr, qp, n, x.size(1), kind, static_cast<T>(gamma), nullptr};
    run<T>(rows, p, k, eps, lazy, idx, gain);
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
    using T = scalar_t;
    const int64_t n = m.size(0);
    MatrixRows<T> rows{m.data_ptr<T>(), n};
    Streams<T> p{nullptr, m.data_ptr<T>(), nullptr, n, 0, kLinear, T(0), nullptr};
    run<T>(rows, p, k, eps, lazy, idx, gain);
  });
  return {idx, gain};
}

}  // namespace
}  // namespace cpd_fast

TORCH_LIBRARY_IMPL(cpd_fast, CPU, m) {
  m.impl("dpp_greedy", &cpd_fast::dpp_greedy_cpu);
  m.impl("dpp_greedy_from_kernel", &cpd_fast::dpp_greedy_from_kernel_cpu);
}
