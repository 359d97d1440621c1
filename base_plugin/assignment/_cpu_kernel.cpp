// Exact balanced (top-k) assignment on the CPU: the same method as base_plugin/assignment/exact.py
// (damped Newton price search, then successive shortest paths on the expert graph), written as fused
// loops over a row-major scores[N, E] so each pass reads the matrix once. Built by setup.py as an
// optional extension; exact.py falls back to its pure-torch path when this module is absent.
//
// Every token holds k distinct experts ("slots" t*k + j); an assignment is optimal when every token's
// experts are a top-k set of scores[t] - p and every expert holds exactly its capacity.
//
// Python entry points:
//   solve(scores_ptr, n, e, k, cap_ptr, out_ptr, prices_ptr, is_double, threads, span)
//       -> (newton_steps, repair_phases, working_set, price_search_us, repair_us)
//   repair(scores_ptr, m, e, k, cap_ptr, held_ptr, prices_ptr, is_double) -> repair_phases
// scores: contiguous [n, e] float32 (is_double=0) or float64 (is_double=1), all finite; 1 <= k < e;
// cap: int64[e] summing to n*k, each <= n; out: int64[n*k] (written, each row's experts in no
// particular order); prices: float[e] of the scores' dtype, read as the starting prices and
// overwritten with the final (certifying) prices. `repair` solves the problem on its m rows exactly
// from held (int64[m*k], every row a top-k set under the given prices), overwriting held and prices;
// it returns -1 when the rows cannot meet the capacities. RuntimeError when an iteration bound is hit
// (not expected). `threads` bounds the threads of the routing passes; span = max - min of the scores.
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
  int64_t n, e, k;
  const int64_t* cap;
  int64_t threads;
  double span;  // max - min of the scores: optimal prices never need to differ by more
};

// The routing of every token under prices p: its k best experts (held, slots t*k + j, first index
// on ties), the best expert it does not hold (next), the margin between its k-th and (k+1)-th best
// (0 on ties) and the weakest expert it holds (kth, one end of its boundary edge).
struct Routing {
  std::vector<int64_t> held, next, kth, counts;
  std::vector<double> margin;
  void resize(int64_t n, int64_t e, int64_t k) {
    held.resize(n * k); next.resize(n); kth.resize(n); margin.resize(n); counts.assign(e, 0);
  }
  void swap(Routing& o) {
    held.swap(o.held); next.swap(o.next); kth.swap(o.kth); counts.swap(o.counts); margin.swap(o.margin);
  }
};

// Top-(k+1) of row - p, descending, ties to the lower index: vals/idx have k+1 entries.
template <typename T, typename P>
inline void top_k1(const T* row, const P* p, int64_t e, int64_t k, T* vals, int64_t* idx) {
  const T lowest = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j <= k; ++j) { vals[j] = lowest; idx[j] = 0; }
  for (int64_t f = 0; f < e; ++f) {
    T r = row[f] - T(p[f]);
    if (!(r > vals[k])) continue;
    int64_t j = k;
    while (j > 0 && r > vals[j - 1]) { vals[j] = vals[j - 1]; idx[j] = idx[j - 1]; --j; }
    vals[j] = r; idx[j] = f;
  }
}

template <typename T>
void route_range(const Problem<T>& P, const std::vector<T>& p, int64_t begin, int64_t end, Routing& R,
                 int64_t* counts) {
  const int64_t e = P.e, k = P.k;
  if (k == 1) {  // the common case, without the insertion loop
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
      R.held[t] = ib; R.kth[t] = ib; R.next[t] = is;
      R.margin[t] = double(best) - double(second);
      ++counts[ib];
    }
    return;
  }
  std::vector<T> vals(k + 1);
  std::vector<int64_t> idx(k + 1);
  for (int64_t t = begin; t < end; ++t) {
    top_k1(P.s + t * e, p.data(), e, k, vals.data(), idx.data());
    for (int64_t j = 0; j < k; ++j) { R.held[t * k + j] = idx[j]; ++counts[idx[j]]; }
    R.kth[t] = idx[k - 1];
    R.next[t] = idx[k];
    R.margin[t] = double(vals[k - 1]) - double(vals[k]);
  }
}

// Route every token (split over `threads` threads for large problems). Returns the number of slots
// above capacity.
template <typename T>
int64_t route_all(const Problem<T>& P, const std::vector<double>& p, Routing& R) {
  const int64_t n = P.n, e = P.e;
  std::vector<T> pt(p.begin(), p.end());
  int64_t workers = std::max<int64_t>(1, std::min<int64_t>(P.threads, n * e / kWorkPerThread));
  std::fill(R.counts.begin(), R.counts.end(), 0);
  if (workers == 1) {
    route_range(P, pt, 0, n, R, R.counts.data());
  } else {
    std::vector<std::vector<int64_t>> part(workers, std::vector<int64_t>(e, 0));
    std::vector<std::thread> pool;
    for (int64_t w = 0; w < workers; ++w) {
      int64_t lo = n * w / workers, hi = n * (w + 1) / workers;
      pool.emplace_back([&, w, lo, hi] { route_range(P, pt, lo, hi, R, part[w].data()); });
    }
    for (auto& th : pool) th.join();
    for (int64_t w = 0; w < workers; ++w)
      for (int64_t f = 0; f < e; ++f) R.counts[f] += part[w][f];
  }
  int64_t excess = 0;
  for (int64_t f = 0; f < e; ++f) excess += std::max<int64_t>(0, R.counts[f] - P.cap[f]);
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

// One damped Newton step on the counts (see exact.py): q = p + dp with L dp = counts - cap, L the
// Laplacian of the boundary graph (an edge kth[t] - next[t] per token of small margin).
template <typename T>
bool newton_step(const Problem<T>& P, const std::vector<double>& p, const Routing& R, int64_t excess,
                 std::vector<double>& q) {
  const int64_t n = P.n, e = P.e;
  int64_t k = std::min(n / 2, std::max(kBoundaryPerExpert * e, kBoundaryPerUnit * excess));
  if (k < 2) return false;
  const std::vector<double>& margin = R.margin;
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
    H[R.kth[t] * e + R.next[t]] += w;
    H[R.next[t] * e + R.kth[t]] += w;
  }
  std::vector<double> L(e * e), y(e);
  double mean_deg = 0;
  for (int64_t r = 0; r < e; ++r) {
    double deg = 0;
    for (int64_t c = 0; c < e; ++c) deg += H[r * e + c];
    for (int64_t c = 0; c < e; ++c) L[r * e + c] = -H[r * e + c];
    L[r * e + r] = deg * (1 + kDamping) - H[r * e + r];
    mean_deg += deg / e;
    y[r] = double(R.counts[r] - P.cap[r]);
  }
  for (int64_t r = 0; r < e; ++r) L[r * e + r] += 1e-6 * mean_deg + 1e-30;
  if (!spd_solve(L, y, e)) return false;
  double mean = std::accumulate(y.begin(), y.end(), 0.0) / e, big = 1e-300;
  for (int64_t f = 0; f < e; ++f) big = std::max(big, std::fabs(y[f] - mean));
  double shrink = std::min(1.0, P.span / big);  // a near-disconnected boundary graph gives huge steps
  for (int64_t f = 0; f < e; ++f) q[f] = p[f] + (y[f] - mean) * shrink;
  return true;
}

// Successive shortest paths on the expert graph from `held` (every token at a top-k set under p).
// w0[g][f] = min over movable slots s holding g, of tokens t not holding f, of (s[t,g] - s[t,f]) (raw
// scores; reduced by the prices when used), realised by slot arg[g][f]. Each phase moves one slot
// along each edge of shortest paths from over-full experts to under-full ones (paths share no expert
// but their root and no token), then lowers prices by the capped distances, so every tree edge is
// tight and every token keeps a top-k set. `work` lists the movable tokens; the others only count.
// Returns the number of phases, or -1 if the movable tokens cannot meet the capacities.
template <typename T>
int64_t repair(const Problem<T>& P, std::vector<double>& p, std::vector<int64_t>& held,
               const std::vector<int64_t>& work) {
  const int64_t n = P.n, e = P.e, k = P.k;
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<std::vector<int64_t>> members(e);  // movable slots per expert
  std::vector<int64_t> pos(n * k), diff(e, 0);
  for (int64_t s = 0; s < n * k; ++s) ++diff[held[s]];
  for (int64_t t : work)
    for (int64_t s = t * k; s < t * k + k; ++s) {
      pos[s] = int64_t(members[held[s]].size());
      members[held[s]].push_back(s);
    }
  int64_t excess = 0;
  for (int64_t f = 0; f < e; ++f) {
    diff[f] -= P.cap[f];
    excess += std::max<int64_t>(0, diff[f]);
  }
  if (excess == 0) return 0;
  std::vector<double> w0(e * e);
  std::vector<int64_t> arg(e * e), stamp(e, -1);
  int64_t stamp_id = 0;  // a fresh id per (row rebuild, member): marks what that member holds now
  auto rebuild_row = [&](int64_t g) {
    double* w = &w0[g * e];
    int64_t* ar = &arg[g * e];
    std::fill(w, w + e, inf);
    std::fill(ar, ar + e, -1);
    for (int64_t s : members[g]) {
      const int64_t t = s / k;
      const T* row = P.s + t * e;
      const int64_t id = stamp_id++;
      for (int64_t j = 0; j < k; ++j) stamp[held[t * k + j]] = id;
      double own = double(row[g]);
      for (int64_t f = 0; f < e; ++f) {
        if (stamp[f] == id) continue;  // t holds f already
        double c = own - double(row[f]);
        if (c < w[f] || (c == w[f] && s < ar[f])) { w[f] = c; ar[f] = s; }
      }
    }
  };
  for (int64_t g = 0; g < e; ++g) rebuild_row(g);
  std::vector<double> dist(e);
  std::vector<int64_t> pred(e), order(e), touched, token_phase(n, -1);
  std::vector<char> done(e), node_used(e);
  struct Move { int64_t slot, to; };
  std::vector<Move> path, moves;
  int64_t phases = 0;
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
    // move one slot along every tree path it can, from an over-full to an under-full expert, nearest
    // first. A token may move twice on one path (two of its slots, distinct experts), never on two.
    order.clear();
    for (int64_t f = 0; f < e; ++f)
      if (diff[f] < 0 && dist[f] < inf) order.push_back(f);
    std::sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return dist[x] < dist[y] || (dist[x] == dist[y] && x < y); });
    std::fill(node_used.begin(), node_used.end(), 0);
    moves.clear();
    for (int64_t f : order) {
      path.clear();
      int64_t x = f;
      bool ok = true;
      while (pred[x] >= 0) {
        int64_t s = arg[pred[x] * e + x];
        if (node_used[x] || token_phase[s / k] == phase) { ok = false; break; }
        path.push_back({s, x});
        x = pred[x];
      }
      if (!ok || diff[x] <= 0) continue;
      for (auto& mv : path) { node_used[mv.to] = 1; token_phase[mv.slot / k] = phase; moves.push_back(mv); }
      --diff[x];
      ++diff[f];
    }
    if (moves.empty()) return -1;  // the movable tokens cannot balance: the caller widens the set
    touched.clear();
    for (auto& mv : moves) {
      int64_t s = mv.slot, g = held[s];
      int64_t last = members[g].back();
      members[g][pos[s]] = last; pos[last] = pos[s]; members[g].pop_back();
      pos[s] = int64_t(members[mv.to].size()); members[mv.to].push_back(s);
      held[s] = mv.to;
      touched.push_back(g);
      touched.push_back(mv.to);
    }
    // a row of w0 depends on its members and on what they hold: rebuild the experts touched and,
    // for k > 1, every expert the moved tokens hold
    if (k > 1)
      for (auto& mv : moves)
        for (int64_t j = 0; j < k; ++j) touched.push_back(held[(mv.slot / k) * k + j]);
    std::sort(touched.begin(), touched.end());
    touched.erase(std::unique(touched.begin(), touched.end()), touched.end());
    for (int64_t g : touched) rebuild_row(g);
    ++phases;
  }
  for (int64_t f = 0; f < e; ++f)
    if (diff[f] != 0) return -1;
  return phases;
}

struct Stats {
  int64_t newton_steps = 0, repair_phases = 0, working_set = 0;
  double price_search_us = 0, repair_us = 0;
};
using Clock = std::chrono::steady_clock;

template <typename T>
void solve(const Problem<T>& P, int64_t* out, T* prices, Stats& stats) {
  const int64_t n = P.n, e = P.e, k = P.k;
  auto t0 = Clock::now();
  std::vector<double> p(prices, prices + e), q(e);
  Routing R, Q;
  R.resize(n, e, k);
  Q.resize(n, e, k);
  int64_t excess = route_all(P, p, R);
  for (int step = 0; step < kNewtonSteps && excess > 0; ++step) {
    if (!newton_step(P, p, R, excess, q)) break;
    int64_t qx = route_all(P, q, Q);
    if (qx >= excess) {  // retry once at half length
      for (int64_t f = 0; f < e; ++f) q[f] = 0.5 * (p[f] + q[f]);
      qx = route_all(P, q, Q);
      if (qx >= excess) break;
    }
    double progress = double(qx) / double(excess);
    std::swap(p, q);
    R.swap(Q);
    excess = qx;
    ++stats.newton_steps;
    if (progress > kNewtonProgress) break;
  }
  auto t1 = Clock::now();
  const std::vector<double>& margin = R.margin;
  std::vector<int64_t>& held = R.held;
  // Exact repair on a working set: the tokens of smallest margin, plus enough of every over-full
  // expert's tokens that it can shed its excess. A token t outside the set keeps its experts, which
  // stay a top-k set while the prices moved (since routing) by dp with
  // max over its experts of dp - min(dp) < margin[t]. Tokens for which that fails are re-routed,
  // join the set, and the repair goes on from there.
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
      else
        for (int64_t j = 0; j < k; ++j) fixed[held[t * k + j]].push_back(t);
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
  std::vector<T> vals(k + 1);
  std::vector<int64_t> idx(k + 1);
  for (int64_t round = 0;; ++round) {
    int64_t phases = repair(P, p, held, work);
    if (phases < 0) throw std::runtime_error("exact balanced assignment (CPU kernel): repair found no path");
    stats.repair_phases += phases;
    stats.working_set = int64_t(work.size());
    double least = std::numeric_limits<double>::infinity();
    for (int64_t f = 0; f < e; ++f) least = std::min(least, p[f] - p_routed[f]);
    int64_t added = 0;
    for (int64_t t = 0; t < n; ++t) {
      if (in_work[t]) continue;
      double most = -std::numeric_limits<double>::infinity();
      for (int64_t j = 0; j < k; ++j) most = std::max(most, p[held[t * k + j]] - p_routed[held[t * k + j]]);
      if (most - least < margin[t]) continue;
      top_k1(P.s + t * e, p.data(), e, k, vals.data(), idx.data());  // re-route t at the current prices
      for (int64_t j = 0; j < k; ++j) held[t * k + j] = idx[j];
      in_work[t] = 1;
      work.push_back(t);
      ++added;
    }
    if (added == 0) break;
    if (round > n) throw std::runtime_error("exact balanced assignment (CPU kernel): working set did not settle");
  }
  stats.price_search_us = std::chrono::duration<double, std::micro>(t1 - t0).count();
  stats.repair_us = std::chrono::duration<double, std::micro>(Clock::now() - t1).count();
  std::copy(held.begin(), held.end(), out);
  for (int64_t f = 0; f < e; ++f) prices[f] = T(p[f]);
}

template <typename T>
int64_t repair_rows(const Problem<T>& P, int64_t* held_out, T* prices) {
  std::vector<double> p(prices, prices + P.e);
  std::vector<int64_t> held(held_out, held_out + P.n * P.k), work(P.n);
  std::iota(work.begin(), work.end(), 0);
  int64_t phases = repair(P, p, held, work);
  if (phases < 0) return -1;
  std::copy(held.begin(), held.end(), held_out);
  for (int64_t f = 0; f < P.e; ++f) prices[f] = T(p[f]);
  return phases;
}

PyObject* py_solve(PyObject*, PyObject* args) {
  unsigned long long sp, cp, op, pp;
  long long n, e, k, threads;
  int is_double;
  double span;
  if (!PyArg_ParseTuple(args, "KLLLKKKpLd", &sp, &n, &e, &k, &cp, &op, &pp, &is_double, &threads, &span)) return nullptr;
  Stats stats;
  std::string error;
  Py_BEGIN_ALLOW_THREADS
  try {
    if (is_double) {
      Problem<double> P{reinterpret_cast<const double*>(sp), n, e, k, reinterpret_cast<const int64_t*>(cp), threads, span};
      solve(P, reinterpret_cast<int64_t*>(op), reinterpret_cast<double*>(pp), stats);
    } else {
      Problem<float> P{reinterpret_cast<const float*>(sp), n, e, k, reinterpret_cast<const int64_t*>(cp), threads, span};
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

PyObject* py_repair(PyObject*, PyObject* args) {
  unsigned long long sp, cp, hp, pp;
  long long m, e, k;
  int is_double;
  if (!PyArg_ParseTuple(args, "KLLLKKKp", &sp, &m, &e, &k, &cp, &hp, &pp, &is_double)) return nullptr;
  int64_t phases = 0;
  Py_BEGIN_ALLOW_THREADS
  if (is_double) {
    Problem<double> P{reinterpret_cast<const double*>(sp), m, e, k, reinterpret_cast<const int64_t*>(cp), 1, 0.0};
    phases = repair_rows(P, reinterpret_cast<int64_t*>(hp), reinterpret_cast<double*>(pp));
  } else {
    Problem<float> P{reinterpret_cast<const float*>(sp), m, e, k, reinterpret_cast<const int64_t*>(cp), 1, 0.0};
    phases = repair_rows(P, reinterpret_cast<int64_t*>(hp), reinterpret_cast<float*>(pp));
  }
  Py_END_ALLOW_THREADS
  return PyLong_FromLongLong(phases);
}

PyMethodDef methods[] = {
    {"solve", py_solve, METH_VARARGS, "Exact balanced top-k assignment on CPU buffers (see the file header)."},
    {"repair", py_repair, METH_VARARGS, "Exact repair of a small problem from a top-k start (see the file header)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_kernel", "Exact balanced assignment, CPU kernel.", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__cpu_kernel(void) { return PyModule_Create(&module); }
