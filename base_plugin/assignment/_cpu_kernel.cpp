// Exact balanced assignment on the CPU: the same method as base_plugin/assignment/exact.py (damped
// Newton price search, then successive shortest paths on the expert graph), written as fused loops
// over a row-major scores[N, E] so each pass reads the matrix once. Built by setup.py as an optional
// extension; exact.py falls back to its pure-torch path when this module is absent.
//
// Python entry point:
//   solve(scores_ptr, n, e, cap_ptr, out_ptr, prices_ptr, is_double, threads, span)
//       -> (newton_steps, repair_phases, working_set, price_search_us, repair_us)
// scores: contiguous [n, e] float32 (is_double=0) or float64 (is_double=1), all finite;
// cap: int64[e] summing to n; out: int64[n] (written); prices: float[e] of the scores' dtype, read as
// the starting prices and overwritten with the final (certifying) prices. Raises RuntimeError when an
// iteration bound is hit (not expected). `threads` bounds the threads of the routing passes;
// span = max - min of the scores.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

constexpr int kNewtonSteps = 8;
constexpr double kNewtonProgress = 0.75;
constexpr int64_t kBoundaryPerExpert = 8;
constexpr int64_t kBoundaryPerUnit = 8;
constexpr double kDamping = 0.3;
constexpr int64_t kWorkingPerUnit = 16;
constexpr int64_t kWorkingPerExpert = 4;
constexpr int kSolveIterations = 30;
constexpr int64_t kWorkPerThread = 1 << 18;  // scores per thread below which threads do not pay
constexpr double kSolveTolerance = 1e-3;

template <typename T>
struct Problem {
  const T* s;
  int64_t n, e;
  const int64_t* cap;
  int64_t threads;
  double span;  // max - min of the scores: optimal prices never need to differ by more
};

// Route tokens [begin, end) to their best expert under prices p (first index on ties); record the
// second-best expert and the margin (0 on ties); count tokens per expert into counts.
template <typename T>
void route_range(const Problem<T>& P, const std::vector<T>& p, int64_t begin, int64_t end, int64_t* a,
                 int64_t* b, double* margin, int64_t* counts) {
  const int64_t e = P.e;
  for (int64_t t = begin; t < end; ++t) {
    const T* row = P.s + t * e;
    T best = -std::numeric_limits<T>::infinity(), second = best;
    int64_t ib = 0, is = 0;
    for (int64_t f = 0; f < e; ++f) {
      T r = row[f] - p[f];
      if (r > best) {
        second = best; is = ib; best = r; ib = f;
      } else if (r > second) {
        second = r; is = f;
      }
    }
    a[t] = ib;
    b[t] = is;
    margin[t] = double(best) - double(second);
    ++counts[ib];
  }
}

// Route every token (split over `threads` threads for large problems). Returns the number of tokens
// above capacity.
template <typename T>
int64_t route_all(const Problem<T>& P, const std::vector<double>& p, std::vector<int64_t>& a,
                  std::vector<int64_t>& b, std::vector<double>& margin, std::vector<int64_t>& counts) {
  const int64_t n = P.n, e = P.e;
  std::vector<T> pt(p.begin(), p.end());
  int64_t workers = std::max<int64_t>(1, std::min<int64_t>(P.threads, n * e / kWorkPerThread));
  std::fill(counts.begin(), counts.end(), 0);
  if (workers == 1) {
    route_range(P, pt, 0, n, a.data(), b.data(), margin.data(), counts.data());
  } else {
    std::vector<std::vector<int64_t>> part(workers, std::vector<int64_t>(e, 0));
    std::vector<std::thread> pool;
    for (int64_t w = 0; w < workers; ++w) {
      int64_t lo = n * w / workers, hi = n * (w + 1) / workers;
      pool.emplace_back([&, w, lo, hi] { route_range(P, pt, lo, hi, a.data(), b.data(), margin.data(), part[w].data()); });
    }
    for (auto& th : pool) th.join();
    for (int64_t w = 0; w < workers; ++w)
      for (int64_t f = 0; f < e; ++f) counts[f] += part[w][f];
  }
  int64_t excess = 0;
  for (int64_t f = 0; f < e; ++f) excess += std::max<int64_t>(0, counts[f] - P.cap[f]);
  return excess;
}

// Approximately solve A x = y for a symmetric positive definite A (dense e x e, row-major) by
// Jacobi-preconditioned conjugate gradients; a Newton step needs a direction, not digits. y <- x.
bool spd_solve(const std::vector<double>& A, std::vector<double>& y, int64_t e) {
  std::vector<double> x(e, 0.0), r(y), z(e), d(e), Ad(e);
  double ynorm = 0;
  for (double v : y) ynorm += v * v;
  if (ynorm == 0) return true;
  for (int64_t i = 0; i < e; ++i) z[i] = r[i] / A[i * e + i];
  d = z;
  double rz = 0;
  for (int64_t i = 0; i < e; ++i) rz += r[i] * z[i];
  for (int it = 0; it < kSolveIterations; ++it) {
    double dAd = 0;
    for (int64_t i = 0; i < e; ++i) {
      const double* row = &A[i * e];
      double v = 0;
      for (int64_t j = 0; j < e; ++j) v += row[j] * d[j];
      Ad[i] = v;
      dAd += d[i] * v;
    }
    if (!(dAd > 0)) break;
    double alpha = rz / dAd, rr = 0;
    for (int64_t i = 0; i < e; ++i) {
      x[i] += alpha * d[i];
      r[i] -= alpha * Ad[i];
      rr += r[i] * r[i];
    }
    if (rr <= kSolveTolerance * kSolveTolerance * ynorm) break;
    double rz_new = 0;
    for (int64_t i = 0; i < e; ++i) {
      z[i] = r[i] / A[i * e + i];
      rz_new += r[i] * z[i];
    }
    for (int64_t i = 0; i < e; ++i) d[i] = z[i] + (rz_new / rz) * d[i];
    rz = rz_new;
  }
  for (int64_t i = 0; i < e; ++i) {
    if (!std::isfinite(x[i])) return false;
    y[i] = x[i];
  }
  return true;
}

// One damped Newton step on the counts (see exact.py): q = p + dp with L dp = counts - cap.
template <typename T>
bool newton_step(const Problem<T>& P, const std::vector<double>& p, const std::vector<int64_t>& a,
                 const std::vector<int64_t>& b, const std::vector<double>& margin,
                 const std::vector<int64_t>& counts, int64_t excess, std::vector<double>& q) {
  const int64_t n = P.n, e = P.e;
  int64_t k = std::min(n / 2, std::max(kBoundaryPerExpert * e, kBoundaryPerUnit * excess));
  if (k < 2) return false;
  std::vector<int64_t> idx(n);
  std::iota(idx.begin(), idx.end(), 0);
  auto by_margin = [&](int64_t x, int64_t y) { return margin[x] < margin[y] || (margin[x] == margin[y] && x < y); };
  std::nth_element(idx.begin(), idx.begin() + (k - 1), idx.end(), by_margin);
  double tau = margin[idx[k - 1]];
  if (!(tau > 0)) return false;
  std::vector<double> H(e * e, 0.0);
  for (int64_t i = 0; i < k; ++i) {
    int64_t t = idx[i];
    double w = std::exp(-margin[t] / tau) / tau;
    H[a[t] * e + b[t]] += w;
    H[b[t] * e + a[t]] += w;
  }
  std::vector<double> L(e * e), y(e);
  double mean_deg = 0;
  for (int64_t r = 0; r < e; ++r) {
    double deg = 0;
    for (int64_t c = 0; c < e; ++c) deg += H[r * e + c];
    for (int64_t c = 0; c < e; ++c) L[r * e + c] = -H[r * e + c];
    L[r * e + r] = deg * (1 + kDamping) - H[r * e + r];
    mean_deg += deg / e;
    y[r] = double(counts[r] - P.cap[r]);
  }
  for (int64_t r = 0; r < e; ++r) L[r * e + r] += 1e-6 * mean_deg + 1e-30;
  if (!spd_solve(L, y, e)) return false;
  double mean = std::accumulate(y.begin(), y.end(), 0.0) / e, big = 1e-300;
  for (int64_t f = 0; f < e; ++f) big = std::max(big, std::fabs(y[f] - mean));
  double shrink = std::min(1.0, P.span / big);  // a near-disconnected boundary graph gives huge steps
  for (int64_t f = 0; f < e; ++f) q[f] = p[f] + (y[f] - mean) * shrink;
  return true;
}

// Successive shortest paths on the expert graph from the argmax assignment `a` under prices p.
// w0[g][f] = min over tokens t of g of (s[t,g] - s[t,f]) (raw scores; reduced by the prices when used),
// realised by token arg[g][f]. Each augmentation moves one token along each edge of a shortest path
// from an over-full expert to the nearest under-full one, then lowers prices by the capped distances.
template <typename T>
int64_t repair(const Problem<T>& P, std::vector<double>& p, std::vector<int64_t>& a,
               const std::vector<int64_t>& work) {
  const int64_t n = P.n, e = P.e;
  const double inf = std::numeric_limits<double>::infinity();
  // members: the movable tokens of each expert; the others only count towards diff
  std::vector<std::vector<int64_t>> members(e);
  std::vector<int64_t> pos(n), diff(e);
  for (int64_t t = 0; t < n; ++t) ++diff[a[t]];
  for (int64_t t : work) {
    pos[t] = int64_t(members[a[t]].size());
    members[a[t]].push_back(t);
  }
  int64_t excess = 0;
  for (int64_t f = 0; f < e; ++f) {
    diff[f] -= P.cap[f];
    excess += std::max<int64_t>(0, diff[f]);
  }
  if (excess == 0) return 0;
  std::vector<double> w0(e * e);
  std::vector<int64_t> arg(e * e);
  auto rebuild_row = [&](int64_t g) {
    double* w = &w0[g * e];
    int64_t* ar = &arg[g * e];
    std::fill(w, w + e, inf);
    std::fill(ar, ar + e, -1);
    for (int64_t t : members[g]) {
      const T* row = P.s + t * e;
      double own = double(row[g]);
      for (int64_t f = 0; f < e; ++f) {
        double c = own - double(row[f]);
        if (c < w[f] || (c == w[f] && t < ar[f])) { w[f] = c; ar[f] = t; }
      }
    }
  };
  for (int64_t g = 0; g < e; ++g) rebuild_row(g);
  std::vector<double> dist(e);
  std::vector<int64_t> pred(e), order(e), touched;
  std::vector<char> done(e), node_used(e), token_used;
  std::vector<std::pair<int64_t, int64_t>> path, moves;
  int64_t moved = 0;
  for (int64_t phase = 0; phase < excess; ++phase) {  // every phase moves >= 1 unit of excess
    // shortest distances from all over-full experts (dense Dijkstra; reduced costs clamped at 0
    // because price round-off must not create negative edges)
    std::fill(dist.begin(), dist.end(), inf);
    std::fill(pred.begin(), pred.end(), -1);
    std::fill(done.begin(), done.end(), 0);
    bool any_source = false;
    for (int64_t f = 0; f < e; ++f)
      if (diff[f] > 0) { dist[f] = 0; any_source = true; }
    if (!any_source) break;
    double reached = 0;
    for (int64_t it = 0; it < e; ++it) {
      int64_t u = -1;
      for (int64_t f = 0; f < e; ++f)
        if (!done[f] && (u < 0 || dist[f] < dist[u])) u = f;
      if (u < 0 || dist[u] == inf) break;
      done[u] = 1;
      reached = dist[u];
      if (members[u].empty()) continue;
      const double* w = &w0[u * e];
      const int64_t* ar = &arg[u * e];
      for (int64_t f = 0; f < e; ++f) {
        if (done[f] || ar[f] < 0) continue;
        double nd = dist[u] + std::max(0.0, w[f] - p[u] + p[f]);
        if (nd < dist[f]) { dist[f] = nd; pred[f] = u; }
      }
    }
    // new prices: every shortest-path-tree edge becomes tight, no reduced cost turns negative
    for (int64_t f = 0; f < e; ++f) p[f] -= std::min(dist[f], reached);
    // move one token along every tree path it can, from an over-full to an under-full expert,
    // nearest first; paths share no expert but their root and no token
    order.clear();
    for (int64_t f = 0; f < e; ++f)
      if (diff[f] < 0 && dist[f] < inf) order.push_back(f);
    std::sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return dist[x] < dist[y] || (dist[x] == dist[y] && x < y); });
    std::fill(node_used.begin(), node_used.end(), 0);
    moves.clear();
    token_used.assign(0, 0);
    std::vector<int64_t> used_tokens;
    for (int64_t f : order) {
      path.clear();
      int64_t x = f;
      bool ok = true;
      while (pred[x] >= 0) {
        int64_t t = arg[pred[x] * e + x];
        if (node_used[x] || std::find(used_tokens.begin(), used_tokens.end(), t) != used_tokens.end()) { ok = false; break; }
        path.emplace_back(t, x);
        x = pred[x];
      }
      if (!ok || diff[x] <= 0) continue;
      for (auto& [t, to] : path) { node_used[to] = 1; used_tokens.push_back(t); moves.emplace_back(t, to); }
      --diff[x];
      ++diff[f];
    }
    if (moves.empty()) return -1;  // the movable tokens cannot balance: the caller widens the set
    touched.clear();
    for (auto& [t, to] : moves) {
      int64_t g = a[t];
      int64_t last = members[g].back();
      members[g][pos[t]] = last; pos[last] = pos[t]; members[g].pop_back();
      pos[t] = int64_t(members[to].size()); members[to].push_back(t);
      a[t] = to;
      touched.push_back(g);
      touched.push_back(to);
    }
    std::sort(touched.begin(), touched.end());
    touched.erase(std::unique(touched.begin(), touched.end()), touched.end());
    for (int64_t g : touched) rebuild_row(g);
    ++moved;
  }
  for (int64_t f = 0; f < e; ++f)
    if (diff[f] != 0) return -1;
  return moved;
}

struct Stats {
  int64_t newton_steps = 0, repair_phases = 0, working_set = 0;
  double price_search_us = 0, repair_us = 0;
};
using Clock = std::chrono::steady_clock;

template <typename T>
void solve(const Problem<T>& P, int64_t* out, T* prices, Stats& stats) {
  const int64_t n = P.n, e = P.e;
  auto t0 = Clock::now();
  std::vector<double> p(prices, prices + e), q(e);
  std::vector<int64_t> a(n), b(n), counts(e), qa(n), qb(n), qcounts(e);
  std::vector<double> margin(n), qmargin(n);
  int64_t excess = route_all(P, p, a, b, margin, counts);
  for (int step = 0; step < kNewtonSteps && excess > 0; ++step) {
    if (!newton_step(P, p, a, b, margin, counts, excess, q)) break;
    int64_t qx = route_all(P, q, qa, qb, qmargin, qcounts);
    if (qx >= excess) {  // retry once at half length
      for (int64_t f = 0; f < e; ++f) q[f] = 0.5 * (p[f] + q[f]);
      qx = route_all(P, q, qa, qb, qmargin, qcounts);
      if (qx >= excess) break;
    }
    double progress = double(qx) / double(excess);
    std::swap(p, q); std::swap(a, qa); std::swap(b, qb); std::swap(margin, qmargin); std::swap(counts, qcounts);
    excess = qx;
    ++stats.newton_steps;
    if (progress > kNewtonProgress) break;
  }
  auto t1 = Clock::now();
  // Exact repair on a working set: the tokens of smallest margin, plus enough of every over-full
  // expert's tokens that it can shed its excess. A token t outside the set keeps expert a[t], which
  // stays a best one while the prices moved (since routing) by dp with dp[a[t]] - min(dp) < margin[t].
  // Tokens for which that fails are re-routed, join the set, and the repair goes on from there.
  std::vector<char> in_work(n, 0);
  std::vector<int64_t> work;
  {
    std::vector<int64_t> idx(n);
    std::iota(idx.begin(), idx.end(), 0);
    auto by_margin = [&](int64_t x, int64_t y) { return margin[x] < margin[y] || (margin[x] == margin[y] && x < y); };
    int64_t size = std::min(n, std::max(kWorkingPerUnit * excess, kWorkingPerExpert * e));
    if (size < n) std::nth_element(idx.begin(), idx.begin() + size, idx.end(), by_margin);
    double cut = size < n ? margin[idx[size]] : std::numeric_limits<double>::infinity();
    std::vector<std::vector<int64_t>> fixed(e);
    for (int64_t t = 0; t < n; ++t) {
      if (margin[t] < cut) in_work[t] = 1;
      else fixed[a[t]].push_back(t);
    }
    for (int64_t f = 0; f < e; ++f) {
      int64_t over = int64_t(fixed[f].size()) - P.cap[f];
      if (over <= 0) continue;
      int64_t take = std::min<int64_t>(int64_t(fixed[f].size()), over + kWorkingPerExpert);
      std::nth_element(fixed[f].begin(), fixed[f].begin() + (take - 1), fixed[f].end(), by_margin);
      for (int64_t i = 0; i < take; ++i) in_work[fixed[f][i]] = 1;
    }
    for (int64_t t = 0; t < n; ++t)
      if (in_work[t]) work.push_back(t);
  }
  const std::vector<double> p_routed(p);
  for (int64_t round = 0;; ++round) {
    int64_t phases = repair(P, p, a, work);
    if (phases < 0) throw std::runtime_error("exact balanced assignment (CPU kernel): repair found no path");
    stats.repair_phases += phases;
    stats.working_set = int64_t(work.size());
    double least = std::numeric_limits<double>::infinity();
    for (int64_t f = 0; f < e; ++f) least = std::min(least, p[f] - p_routed[f]);
    int64_t added = 0;
    for (int64_t t = 0; t < n; ++t) {
      if (in_work[t] || p[a[t]] - p_routed[a[t]] - least < margin[t]) continue;
      const T* row = P.s + t * e;  // re-route t at the current prices
      double best = -std::numeric_limits<double>::infinity();
      for (int64_t f = 0; f < e; ++f)
        if (double(row[f]) - p[f] > best) { best = double(row[f]) - p[f]; a[t] = f; }
      in_work[t] = 1;
      work.push_back(t);
      ++added;
    }
    if (added == 0) break;
    if (round > n) throw std::runtime_error("exact balanced assignment (CPU kernel): working set did not settle");
  }
  stats.price_search_us = std::chrono::duration<double, std::micro>(t1 - t0).count();
  stats.repair_us = std::chrono::duration<double, std::micro>(Clock::now() - t1).count();
  std::copy(a.begin(), a.end(), out);
  for (int64_t f = 0; f < e; ++f) prices[f] = T(p[f]);
}

PyObject* py_solve(PyObject*, PyObject* args) {
  unsigned long long sp, cp, op, pp;
  long long n, e, threads;
  int is_double;
  double span;
  if (!PyArg_ParseTuple(args, "KLLKKKpLd", &sp, &n, &e, &cp, &op, &pp, &is_double, &threads, &span)) return nullptr;
  Stats stats;
  std::string error;
  Py_BEGIN_ALLOW_THREADS
  try {
    if (is_double) {
      Problem<double> P{reinterpret_cast<const double*>(sp), n, e, reinterpret_cast<const int64_t*>(cp), threads, span};
      solve(P, reinterpret_cast<int64_t*>(op), reinterpret_cast<double*>(pp), stats);
    } else {
      Problem<float> P{reinterpret_cast<const float*>(sp), n, e, reinterpret_cast<const int64_t*>(cp), threads, span};
      solve(P, reinterpret_cast<int64_t*>(op), reinterpret_cast<float*>(pp), stats);
    }
  } catch (const std::exception& ex) {
    error = ex.what();
    if (error.empty()) error = "exact balanced assignment (CPU kernel) failed";
  }
  Py_END_ALLOW_THREADS
  if (!error.empty()) {
    PyErr_SetString(PyExc_RuntimeError, error.c_str());
    return nullptr;
  }
  return Py_BuildValue("(LLLdd)", (long long)stats.newton_steps, (long long)stats.repair_phases,
                       (long long)stats.working_set,
                       stats.price_search_us, stats.repair_us);
}

PyMethodDef methods[] = {
    {"solve", py_solve, METH_VARARGS, "Exact balanced assignment on CPU buffers (see the file header)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_kernel", "Exact balanced assignment, CPU kernel.", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__cpu_kernel(void) { return PyModule_Create(&module); }
