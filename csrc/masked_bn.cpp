// Masked (sparse) batch norm on the CPU: statistics and gradients over active sites only (SparK).
//
// x is read as [B, C, S] (S = H*W) through strides, so NCHW (sxs == 1) and NHWC (sxc == 1) run in place;
// m[B*S] is the uint8 activity map. With n = sum m (per call), per channel c:
//   mean = sum m x / n        var = sum m (x - mean)^2 / n                    (two passes, double accumulators)
//   y    = m ? x * a[c] + s[c] : 0                                             (a, s precomputed by the caller)
//   g_b  = sum m dy           g_w = sum m dy (x - mean) rstd
//   dx   = m ? k0 (dy - k2 - (x - k1) k3) : 0
// Fused for ResNets (y = ReLU(BN(x) + r)): apply with residual and ReLU, and the backward gated by y > 0
// (reductions, dx and the residual's gradient dr in the passes above; see act_apply_t / act_backward_t).
// Layout decides the loop order: channel-parallel with contiguous spatial runs for NCHW, row-parallel with
// per-thread channel accumulators for NHWC (contiguous channels); the backward sums g_b and g_w in one pass.
// No torch headers: raw pointers only.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "registry.h"

namespace py = pybind11;

#define SC_ACT_INLINE inline __attribute__((always_inline))

namespace {

struct Layout {
  int64_t B, C, S, sb, sc, ss;
  int64_t at(int64_t b, int64_t c, int64_t s) const { return b * sb + c * sc + s * ss; }
};

Layout make_layout(const std::vector<int64_t>& v) {
  if (v.size() != 6) throw std::invalid_argument("masked_bn: layout must be [B, C, S, stride_b, stride_c, stride_s]");
  Layout l{v[0], v[1], v[2], v[3], v[4], v[5]};
  if (l.B < 0 || l.C < 0 || l.S < 0) throw std::invalid_argument("masked_bn: negative size");
  return l;
}

// Thread-local per-channel double accumulators, summed at the end (deterministic for a fixed thread count).
struct ChannelAcc {
  int nt;
  int64_t C;
  std::vector<double> part;
  ChannelAcc(int nthreads, int64_t C_) : nt(std::max(1, nthreads)), C(C_), part(size_t(nt) * size_t(C_), 0.0) {}
  double* mine() {
#ifdef _OPENMP
    return part.data() + size_t(omp_get_thread_num()) * size_t(C);
#else
    return part.data();
#endif
  }
  std::vector<double> total() const {
    std::vector<double> out(size_t(C), 0.0);
    for (int t = 0; t < nt; ++t)
      for (int64_t c = 0; c < C; ++c) out[size_t(c)] += part[size_t(t) * size_t(C) + size_t(c)];
    return out;
  }
};

bool nhwc(const Layout& l) { return l.sc == 1 && l.C > 1; }

// Sums over active sites of  x  (pass 0),  (x - mean)^2  (pass 1),  or  dy  and  dy (x - mean)  (pass 2).
// NHWC: row-parallel, a contiguous channel loop per active row. NCHW: channel-parallel, a contiguous spatial
// loop per (b, c) with a select on the mask (inactive values may be garbage, even NaN: never multiplied in).
// g = y > 0 ? dy : 0 without a branch (an and-mask on the bits: a data-dependent branch per element was 10x
// slower, the ReLU gate being a coin flip); NaN in dy stays NaN only where y > 0, as threshold_backward.
template <typename T>
struct BitsOf;
template <>
struct BitsOf<float> {
  typedef uint32_t u;
};
template <>
struct BitsOf<double> {
  typedef uint64_t u;
};
template <typename T>
SC_ACT_INLINE T gated(T dy, T y) {
  typedef typename BitsOf<T>::u U;
  U bits;
  std::memcpy(&bits, &dy, sizeof(T));
  bits &= U(0) - U(y > T(0));
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

// Per-row bodies of the channels_last (NHWC) loops: one contiguous run of C channels of one site. Compiled
// for the baseline, AVX2 and AVX-512 and picked at run time (the OpenMP loops stay in the baseline drivers:
// an outlined parallel body would not inherit a target attribute). d* are double accumulators/statistics.
template <typename T>
SC_ACT_INLINE void sum_row_body(double* __restrict acc, const T* __restrict x, int64_t C) {
  for (int64_t c = 0; c < C; ++c) acc[c] += double(x[c]);
}
template <typename T>
SC_ACT_INLINE void sq_row_body(double* __restrict acc, const T* __restrict x, const double* __restrict mean,
                               int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    const double d = double(x[c]) - mean[c];
    acc[c] += d * d;
  }
}
// acc1 += g, acc2 += g (x - mean) with g = dy (y null) or gated(dy, y)
template <typename T>
SC_ACT_INLINE void grad_row_body(double* __restrict acc1, double* __restrict acc2, const T* __restrict dy,
                                 const T* __restrict x, const T* __restrict y, const double* __restrict mean,
                                 int64_t C) {
  if (y) {
    for (int64_t c = 0; c < C; ++c) {
      const double g = double(gated(dy[c], y[c]));
      acc1[c] += g;
      acc2[c] += g * (double(x[c]) - mean[c]);
    }
  } else {
    for (int64_t c = 0; c < C; ++c) {
      const double g = double(dy[c]);
      acc1[c] += g;
      acc2[c] += g * (double(x[c]) - mean[c]);
    }
  }
}
// out = act(x a + s (+ r)); act = ReLU when relu
template <typename T>
SC_ACT_INLINE void apply_row_body(T* __restrict out, const T* __restrict x, const T* __restrict r,
                                  const T* __restrict a, const T* __restrict s, bool relu, int64_t C) {
  if (r && relu) {
    for (int64_t c = 0; c < C; ++c) {
      const T v = x[c] * a[c] + s[c] + r[c];
      out[c] = v < T(0) ? T(0) : v;
    }
  } else if (r) {
    for (int64_t c = 0; c < C; ++c) out[c] = x[c] * a[c] + s[c] + r[c];
  } else if (relu) {
    for (int64_t c = 0; c < C; ++c) {
      const T v = x[c] * a[c] + s[c];
      out[c] = v < T(0) ? T(0) : v;
    }
  } else {
    for (int64_t c = 0; c < C; ++c) out[c] = x[c] * a[c] + s[c];
  }
}
// dx = k0 (g - k2 - (x - k1) k3), g = dy (y null) or gated(dy, y)
template <typename T>
SC_ACT_INLINE void dx_row_body(T* __restrict dx, const T* __restrict dy, const T* __restrict x, const T* __restrict y,
                               const T* __restrict k0, const T* __restrict k1, const T* __restrict k2,
                               const T* __restrict k3, int64_t C) {
  if (y)
    for (int64_t c = 0; c < C; ++c) dx[c] = k0[c] * (gated(dy[c], y[c]) - k2[c] - (x[c] - k1[c]) * k3[c]);
  else
    for (int64_t c = 0; c < C; ++c) dx[c] = k0[c] * (dy[c] - k2[c] - (x[c] - k1[c]) * k3[c]);
}

template <typename T>
struct RowOps {
  void (*sum)(double*, const T*, int64_t);
  void (*sq)(double*, const T*, const double*, int64_t);
  void (*grad)(double*, double*, const T*, const T*, const T*, const double*, int64_t);
  void (*apply)(T*, const T*, const T*, const T*, const T*, bool, int64_t);
  void (*dx)(T*, const T*, const T*, const T*, const T*, const T*, const T*, const T*, int64_t);
};

#define MBN_DEFINE_ROWS(NS, ATTR)                                                                              \
  namespace NS {                                                                                              \
  template <typename T>                                                                                       \
  ATTR void sum(double* acc, const T* x, int64_t C) {                                                         \
    sum_row_body<T>(acc, x, C);                                                                               \
  }                                                                                                           \
  template <typename T>                                                                                       \
  ATTR void sq(double* acc, const T* x, const double* mean, int64_t C) {                                      \
    sq_row_body<T>(acc, x, mean, C);                                                                          \
  }                                                                                                           \
  template <typename T>                                                                                       \
  ATTR void grad(double* a1, double* a2, const T* dy, const T* x, const T* y, const double* mean, int64_t C) { \
    grad_row_body<T>(a1, a2, dy, x, y, mean, C);                                                              \
  }                                                                                                           \
  template <typename T>                                                                                       \
  ATTR void apply(T* out, const T* x, const T* r, const T* a, const T* s, bool relu, int64_t C) {             \
    apply_row_body<T>(out, x, r, a, s, relu, C);                                                              \
  }                                                                                                           \
  template <typename T>                                                                                       \
  ATTR void dx(T* o, const T* dy, const T* x, const T* y, const T* k0, const T* k1, const T* k2, const T* k3,  \
               int64_t C) {                                                                                   \
    dx_row_body<T>(o, dy, x, y, k0, k1, k2, k3, C);                                                           \
  }                                                                                                           \
  template <typename T>                                                                                       \
  RowOps<T> ops() {                                                                                           \
    return RowOps<T>{&sum<T>, &sq<T>, &grad<T>, &apply<T>, &dx<T>};                                           \
  }                                                                                                           \
  }

MBN_DEFINE_ROWS(rows_avx512, __attribute__((target("avx512f,avx512vl,avx2,fma,prefer-vector-width=512"))))
MBN_DEFINE_ROWS(rows_avx2, __attribute__((target("avx2,fma"))))
MBN_DEFINE_ROWS(rows_base, )

int mbn_isa() {
#if defined(__x86_64__) || defined(__i386__)
  static const int level = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                                   __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
                               ? 2
                               : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0);
  return level;
#else
  return 0;
#endif
}
int mbn_isa_cap = 2;  // masked_bn_set_isa (tests of the narrower builds)

template <typename T>
RowOps<T> row_ops() {
  const int level = std::min(mbn_isa(), mbn_isa_cap);
  return level == 2 ? rows_avx512::ops<T>() : (level == 1 ? rows_avx2::ops<T>() : rows_base::ops<T>());
}

// gate (pass 2 only, may be null): the fused ReLU's output y; dy counts only where y > 0.
template <typename T>
void reduce_t(int pass, const T* x, const T* dy, const uint8_t* m, const Layout& l, const Layout& ld,
              const double* mean, int nthreads, std::vector<double>& s1, std::vector<double>& s2,
              const T* gate = nullptr, const Layout* lg = nullptr) {
  const int64_t C = l.C, S = l.S, rows = l.B * l.S;
  if (nhwc(l) && (dy == nullptr || ld.sc == 1) && (gate == nullptr || lg->sc == 1)) {
    ChannelAcc a1(nthreads, C), a2(nthreads, C);
    const RowOps<T> ops = row_ops<T>();
#pragma omp parallel num_threads(a1.nt)
    {
      double* acc1 = a1.mine();
      double* acc2 = a2.mine();
#pragma omp for schedule(static)
      for (int64_t r = 0; r < rows; ++r) {
        if (!m[r]) continue;
        const int64_t b = r / S, s = r % S;
        const T* px = x + b * l.sb + s * l.ss;
        if (pass == 0) {
          ops.sum(acc1, px, C);
        } else if (pass == 1) {
          ops.sq(acc1, px, mean, C);
        } else {
          ops.grad(acc1, acc2, dy + b * ld.sb + s * ld.ss, px, gate ? gate + b * lg->sb + s * lg->ss : nullptr,
                   mean, C);
        }
      }
    }
    s1 = a1.total();
    s2 = a2.total();
    return;
  }
  s1.assign(size_t(C), 0.0);
  s2.assign(size_t(C), 0.0);
#pragma omp parallel for num_threads(std::max(1, nthreads)) schedule(static)
  for (int64_t c = 0; c < C; ++c) {
    double t1 = 0.0, t2 = 0.0;
    const double mu = mean != nullptr ? mean[c] : 0.0;
    for (int64_t b = 0; b < l.B; ++b) {
      const uint8_t* mb = m + b * S;
      const T* px = x + b * l.sb + c * l.sc;
      if (pass == 0) {
        for (int64_t s = 0; s < S; ++s) t1 += mb[s] ? double(px[s * l.ss]) : 0.0;
      } else if (pass == 1) {
        for (int64_t s = 0; s < S; ++s) {
          const double d = mb[s] ? double(px[s * l.ss]) - mu : 0.0;
          t1 += d * d;
        }
      } else {
        const T* pd = dy + b * ld.sb + c * ld.sc;
        const T* py = gate ? gate + b * lg->sb + c * lg->sc : nullptr;
        for (int64_t s = 0; s < S; ++s) {
          const bool on = mb[s] && (py == nullptr || py[s * lg->ss] > T(0));
          const double g = on ? double(pd[s * ld.ss]) : 0.0;
          t1 += g;
          t2 += on ? g * (double(px[s * l.ss]) - mu) : 0.0;
        }
      }
    }
    s1[size_t(c)] = t1;
    s2[size_t(c)] = t2;
  }
}

// out = m ? (dy == null ? x * k0 + k1 : k0 (dy - k2 - (x - k1) k3)) : 0 over every site.
template <typename T>
void elementwise_t(const T* x, const T* dy, const uint8_t* m, const Layout& l, const Layout& ld, const Layout& lo,
                   const T* k0, const T* k1, const T* k2, const T* k3, T* out, int nthreads) {
  const int64_t C = l.C, S = l.S, rows = l.B * l.S;
  if (nhwc(l) && lo.sc == 1 && (dy == nullptr || ld.sc == 1)) {
    const RowOps<T> ops = row_ops<T>();
#pragma omp parallel for num_threads(std::max(1, nthreads)) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t b = r / S, s = r % S;
      T* po = out + b * lo.sb + s * lo.ss;
      if (!m[r]) {
        std::memset(po, 0, static_cast<size_t>(C) * sizeof(T));
        continue;
      }
      const T* px = x + b * l.sb + s * l.ss;
      if (dy == nullptr)
        ops.apply(po, px, nullptr, k0, k1, false, C);
      else
        ops.dx(po, dy + b * ld.sb + s * ld.ss, px, nullptr, k0, k1, k2, k3, C);
    }
    return;
  }
#pragma omp parallel for collapse(2) num_threads(std::max(1, nthreads)) schedule(static)
  for (int64_t b = 0; b < l.B; ++b)
    for (int64_t c = 0; c < C; ++c) {
      const uint8_t* mb = m + b * S;
      const T* px = x + b * l.sb + c * l.sc;
      T* po = out + b * lo.sb + c * lo.sc;
      if (dy == nullptr) {
        const T a = k0[c], sh = k1[c];
        for (int64_t s = 0; s < S; ++s) po[s * lo.ss] = mb[s] ? px[s * l.ss] * a + sh : T(0);
      } else {
        const T* pd = dy + b * ld.sb + c * ld.sc;
        const T a = k0[c], mu = k1[c], g = k2[c], w = k3[c];
        for (int64_t s = 0; s < S; ++s) po[s * lo.ss] = mb[s] ? a * (pd[s * ld.ss] - g - (px[s * l.ss] - mu) * w) : T(0);
      }
    }
}

// Fused apply + residual + ReLU (SparK ResNets: y = ReLU(BN(x) + r), BN exactly zero at inactive sites):
//   y  = act(m ? x a + s + r : r)          act = ReLU or identity; r = 0 when absent
// and its backward with the ReLU gate read from y (g = y > 0 ? dy : 0 when act is ReLU, else dy):
//   dx = m ? k0 (g - k2 - (x - k1) k3) : 0         dr = g   (both over every site; dr optional)
// (the reductions g_b, g_w over the gated g are reduce_t's pass 2 with the gate). One pass each, no
// separate ReLU / add / threshold_backward passes over the whole tensor.
template <typename T, bool RELU>
SC_ACT_INLINE T act(T v) {
  return RELU && v < T(0) ? T(0) : v;  // NaN stays NaN (as torch.relu)
}

template <typename T, bool RELU>
void act_apply_t(const T* x, const T* r, const uint8_t* m, const Layout& l, const Layout& lr, const Layout& lo,
                 const T* a, const T* sh, T* out, int nthreads) {
  const int64_t C = l.C, S = l.S, rows = l.B * l.S;
  if (nhwc(l) && lo.sc == 1 && (r == nullptr || lr.sc == 1)) {
    const RowOps<T> ops = row_ops<T>();
#pragma omp parallel for num_threads(std::max(1, nthreads)) schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
      const int64_t b = row / S, s = row % S;
      T* po = out + b * lo.sb + s * lo.ss;
      const T* pr = r ? r + b * lr.sb + s * lr.ss : nullptr;
      if (!m[row]) {
        if (pr)
          for (int64_t c = 0; c < C; ++c) po[c] = act<T, RELU>(pr[c]);
        else
          std::memset(po, 0, static_cast<size_t>(C) * sizeof(T));
        continue;
      }
      ops.apply(po, x + b * l.sb + s * l.ss, pr, a, sh, RELU, C);
    }
    return;
  }
#pragma omp parallel for collapse(2) num_threads(std::max(1, nthreads)) schedule(static)
  for (int64_t b = 0; b < l.B; ++b)
    for (int64_t c = 0; c < C; ++c) {
      const uint8_t* mb = m + b * S;
      const T* px = x + b * l.sb + c * l.sc;
      const T* pr = r ? r + b * lr.sb + c * lr.sc : nullptr;
      T* po = out + b * lo.sb + c * lo.sc;
      for (int64_t s = 0; s < S; ++s) {
        const T rv = pr ? pr[s * lr.ss] : T(0);
        po[s * lo.ss] = act<T, RELU>(mb[s] ? px[s * l.ss] * a[c] + sh[c] + rv : rv);
      }
    }
}

template <typename T>
void act_backward_t(const T* dy, const T* x, const T* y, const uint8_t* m, const Layout& ld, const Layout& l,
                    const Layout& ly, const Layout& lo, const Layout& lr, const T* k0, const T* k1, const T* k2,
                    const T* k3, T* dx, T* dr, int nthreads) {
  const int64_t C = l.C, S = l.S, rows = l.B * l.S;
  if (nhwc(l) && ld.sc == 1 && (y == nullptr || ly.sc == 1) && (dx == nullptr || lo.sc == 1) &&
      (dr == nullptr || lr.sc == 1)) {
    const RowOps<T> ops = row_ops<T>();
#pragma omp parallel for num_threads(std::max(1, nthreads)) schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
      const int64_t b = row / S, s = row % S;
      const T* pd = dy + b * ld.sb + s * ld.ss;
      const T* py = y ? y + b * ly.sb + s * ly.ss : nullptr;
      T* pdr = dr ? dr + b * lr.sb + s * lr.ss : nullptr;
      T* po = dx ? dx + b * lo.sb + s * lo.ss : nullptr;
      if (pdr) {
        if (py)
          for (int64_t c = 0; c < C; ++c) pdr[c] = gated(pd[c], py[c]);
        else
          std::memcpy(pdr, pd, static_cast<size_t>(C) * sizeof(T));
      }
      if (!po) continue;
      if (!m[row]) {
        std::memset(po, 0, static_cast<size_t>(C) * sizeof(T));
        continue;
      }
      ops.dx(po, pd, x + b * l.sb + s * l.ss, py, k0, k1, k2, k3, C);
    }
    return;
  }
#pragma omp parallel for collapse(2) num_threads(std::max(1, nthreads)) schedule(static)
  for (int64_t b = 0; b < l.B; ++b)
    for (int64_t c = 0; c < C; ++c) {
      const uint8_t* mb = m + b * S;
      const T* pd = dy + b * ld.sb + c * ld.sc;
      const T* px = x + b * l.sb + c * l.sc;
      const T* py = y ? y + b * ly.sb + c * ly.sc : nullptr;
      T* po = dx ? dx + b * lo.sb + c * lo.sc : nullptr;
      T* pdr = dr ? dr + b * lr.sb + c * lr.sc : nullptr;
      for (int64_t s = 0; s < S; ++s) {
        const T g = py ? gated(pd[s * ld.ss], py[s * ly.ss]) : pd[s * ld.ss];
        if (pdr) pdr[s * lr.ss] = g;
        if (po) po[s * lo.ss] = mb[s] ? k0[c] * (g - k2[c] - (px[s * l.ss] - k1[c]) * k3[c]) : T(0);
      }
    }
}

template <typename T>
void stats_t(uintptr_t xp, uintptr_t mp, const Layout& l, double n, uintptr_t meanp, uintptr_t varp, int nthreads) {
  const T* x = reinterpret_cast<const T*>(xp);
  const uint8_t* m = reinterpret_cast<const uint8_t*>(mp);
  const double inv = 1.0 / std::max(n, 1.0);
  std::vector<double> s1, s2, unused;
  reduce_t<T>(0, x, nullptr, m, l, l, nullptr, nthreads, s1, unused);
  for (auto& v : s1) v *= inv;
  reduce_t<T>(1, x, nullptr, m, l, l, s1.data(), nthreads, s2, unused);
  T* mean = reinterpret_cast<T*>(meanp);
  T* var = reinterpret_cast<T*>(varp);
  for (int64_t c = 0; c < l.C; ++c) {
    mean[c] = T(s1[size_t(c)]);
    var[c] = T(s2[size_t(c)] * inv);
  }
}

template <typename T>
void backward_reduce_t(uintptr_t dyp, uintptr_t xp, uintptr_t mp, const Layout& ld, const Layout& l, uintptr_t meanp,
                       uintptr_t rstdp, uintptr_t gbp, uintptr_t gwp, int nthreads, uintptr_t yp = 0,
                       const Layout* ly = nullptr) {
  const T* mean = reinterpret_cast<const T*>(meanp);
  const T* rstd = reinterpret_cast<const T*>(rstdp);
  std::vector<double> mu(size_t(l.C)), gb, gw;
  for (int64_t c = 0; c < l.C; ++c) mu[size_t(c)] = double(mean[c]);
  reduce_t<T>(2, reinterpret_cast<const T*>(xp), reinterpret_cast<const T*>(dyp),
              reinterpret_cast<const uint8_t*>(mp), l, ld, mu.data(), nthreads, gb, gw,
              reinterpret_cast<const T*>(yp), ly);
  T* gbo = reinterpret_cast<T*>(gbp);
  T* gwo = reinterpret_cast<T*>(gwp);
  for (int64_t c = 0; c < l.C; ++c) {
    gbo[c] = T(gb[size_t(c)]);
    gwo[c] = T(gw[size_t(c)] * double(rstd[c]));
  }
}

template <typename T>
void apply_t(uintptr_t xp, uintptr_t mp, const Layout& l, const Layout& lo, uintptr_t ap, uintptr_t sp, uintptr_t outp,
             int nthreads) {
  elementwise_t<T>(reinterpret_cast<const T*>(xp), nullptr, reinterpret_cast<const uint8_t*>(mp), l, l, lo,
                   reinterpret_cast<const T*>(ap), reinterpret_cast<const T*>(sp), nullptr, nullptr,
                   reinterpret_cast<T*>(outp), nthreads);
}

template <typename T>
void backward_dx_t(uintptr_t dyp, uintptr_t xp, uintptr_t mp, const Layout& ld, const Layout& l, const Layout& lo,
                   uintptr_t k0p, uintptr_t k1p, uintptr_t k2p, uintptr_t k3p, uintptr_t dxp, int nthreads) {
  elementwise_t<T>(reinterpret_cast<const T*>(xp), reinterpret_cast<const T*>(dyp),
                   reinterpret_cast<const uint8_t*>(mp), l, ld, lo, reinterpret_cast<const T*>(k0p),
                   reinterpret_cast<const T*>(k1p), reinterpret_cast<const T*>(k2p), reinterpret_cast<const T*>(k3p),
                   reinterpret_cast<T*>(dxp), nthreads);
}

}  // namespace

void register_masked_bn(py::module_& m) {
  m.def(
      "masked_bn_set_isa",
      [](const std::string& isa) {
        if (isa != "auto" && isa != "avx2" && isa != "base")
          throw std::invalid_argument("masked_bn_set_isa: expected 'auto', 'avx2' or 'base', got '" + isa + "'");
        mbn_isa_cap = isa == "auto" ? 2 : (isa == "avx2" ? 1 : 0);
        const int level = std::min(mbn_isa(), mbn_isa_cap);
        return std::string(level == 2 ? "avx512" : (level == 1 ? "avx2" : "base"));
      },
      "Select the masked batch norm's row kernels: 'auto' (the widest the CPU has), 'avx2' or 'base'; returns "
      "the ISA used.");
  m.def(
      "masked_bn_stats",
      [](uintptr_t x, uintptr_t mask, const std::vector<int64_t>& layout, double n, uintptr_t mean, uintptr_t var,
         bool is_double, int nthreads) {
        const Layout l = make_layout(layout);
        py::gil_scoped_release release;
        if (is_double)
          stats_t<double>(x, mask, l, n, mean, var, nthreads);
        else
          stats_t<float>(x, mask, l, n, mean, var, nthreads);
      },
      "Per-channel mean and biased variance of x over active sites (two passes, double accumulators). "
      "layout = [B, C, S, stride_b, stride_c, stride_s] of x read as [B, C, H*W]; mask uint8 [B*S].");
  m.def(
      "masked_bn_apply",
      [](uintptr_t x, uintptr_t mask, const std::vector<int64_t>& layout, const std::vector<int64_t>& out_layout,
         uintptr_t scale, uintptr_t shift, uintptr_t out, bool is_double, int nthreads) {
        const Layout l = make_layout(layout), lo = make_layout(out_layout);
        py::gil_scoped_release release;
        if (is_double)
          apply_t<double>(x, mask, l, lo, scale, shift, out, nthreads);
        else
          apply_t<float>(x, mask, l, lo, scale, shift, out, nthreads);
      },
      "out = mask ? x * scale[c] + shift[c] : 0 over every site.");
  m.def(
      "masked_bn_apply_act",
      [](uintptr_t x, uintptr_t mask, const std::vector<int64_t>& layout, const std::vector<int64_t>& out_layout,
         uintptr_t scale, uintptr_t shift, uintptr_t res, const std::vector<int64_t>& res_layout, bool relu,
         uintptr_t out, bool is_double, int nthreads) {
        const Layout l = make_layout(layout), lo = make_layout(out_layout);
        const Layout lr = res ? make_layout(res_layout) : l;
        py::gil_scoped_release release;
        if (is_double) {
          const auto* r = reinterpret_cast<const double*>(res);
          auto f = relu ? act_apply_t<double, true> : act_apply_t<double, false>;
          f(reinterpret_cast<const double*>(x), r, reinterpret_cast<const uint8_t*>(mask), l, lr, lo,
            reinterpret_cast<const double*>(scale), reinterpret_cast<const double*>(shift),
            reinterpret_cast<double*>(out), nthreads);
        } else {
          const auto* r = reinterpret_cast<const float*>(res);
          auto f = relu ? act_apply_t<float, true> : act_apply_t<float, false>;
          f(reinterpret_cast<const float*>(x), r, reinterpret_cast<const uint8_t*>(mask), l, lr, lo,
            reinterpret_cast<const float*>(scale), reinterpret_cast<const float*>(shift),
            reinterpret_cast<float*>(out), nthreads);
        }
      },
      "out = act(mask ? x * scale[c] + shift[c] + res : res) over every site (res = 0 when 0; act = ReLU if "
      "relu, else identity).");
  m.def(
      "masked_bn_backward_reduce_gated",
      [](uintptr_t dy, uintptr_t x, uintptr_t y, uintptr_t mask, const std::vector<int64_t>& dy_layout,
         const std::vector<int64_t>& layout, const std::vector<int64_t>& y_layout, uintptr_t mean, uintptr_t rstd,
         uintptr_t g_b, uintptr_t g_w, bool is_double, int nthreads) {
        const Layout ld = make_layout(dy_layout), l = make_layout(layout), ly = make_layout(y_layout);
        py::gil_scoped_release release;
        if (is_double)
          backward_reduce_t<double>(dy, x, mask, ld, l, mean, rstd, g_b, g_w, nthreads, y, &ly);
        else
          backward_reduce_t<float>(dy, x, mask, ld, l, mean, rstd, g_b, g_w, nthreads, y, &ly);
      },
      "g = y > 0 ? dy : 0 (the fused ReLU's gate); g_b = sum_active g, g_w = sum_active g (x - mean) rstd.");
  m.def(
      "masked_bn_backward_act",
      [](uintptr_t dy, uintptr_t x, uintptr_t y, uintptr_t mask, const std::vector<int64_t>& dy_layout,
         const std::vector<int64_t>& layout, const std::vector<int64_t>& y_layout,
         const std::vector<int64_t>& dx_layout, const std::vector<int64_t>& dr_layout, uintptr_t k0, uintptr_t k1,
         uintptr_t k2, uintptr_t k3, uintptr_t dx, uintptr_t dr, bool is_double, int nthreads) {
        const Layout ld = make_layout(dy_layout), l = make_layout(layout);
        const Layout ly = y ? make_layout(y_layout) : l, lo = dx ? make_layout(dx_layout) : l;
        const Layout lr = dr ? make_layout(dr_layout) : l;
        py::gil_scoped_release release;
        if (is_double)
          act_backward_t<double>(reinterpret_cast<const double*>(dy), reinterpret_cast<const double*>(x),
                                 reinterpret_cast<const double*>(y), reinterpret_cast<const uint8_t*>(mask), ld, l,
                                 ly, lo, lr, reinterpret_cast<const double*>(k0), reinterpret_cast<const double*>(k1),
                                 reinterpret_cast<const double*>(k2), reinterpret_cast<const double*>(k3),
                                 reinterpret_cast<double*>(dx), reinterpret_cast<double*>(dr), nthreads);
        else
          act_backward_t<float>(reinterpret_cast<const float*>(dy), reinterpret_cast<const float*>(x),
                                reinterpret_cast<const float*>(y), reinterpret_cast<const uint8_t*>(mask), ld, l, ly,
                                lo, lr, reinterpret_cast<const float*>(k0), reinterpret_cast<const float*>(k1),
                                reinterpret_cast<const float*>(k2), reinterpret_cast<const float*>(k3),
                                reinterpret_cast<float*>(dx), reinterpret_cast<float*>(dr), nthreads);
      },
      "g = y ? (y > 0 ? dy : 0) : dy; dx = mask ? k0 (g - k2 - (x - k1) k3) : 0 and dr = g over every site "
      "(dx / dr skipped when 0).");
  m.def(
      "masked_bn_backward_reduce",
      [](uintptr_t dy, uintptr_t x, uintptr_t mask, const std::vector<int64_t>& dy_layout,
         const std::vector<int64_t>& layout, uintptr_t mean, uintptr_t rstd, uintptr_t g_b, uintptr_t g_w,
         bool is_double, int nthreads) {
        const Layout ld = make_layout(dy_layout), l = make_layout(layout);
        py::gil_scoped_release release;
        if (is_double)
          backward_reduce_t<double>(dy, x, mask, ld, l, mean, rstd, g_b, g_w, nthreads);
        else
          backward_reduce_t<float>(dy, x, mask, ld, l, mean, rstd, g_b, g_w, nthreads);
      },
      "g_b = sum_active dy, g_w = sum_active dy (x - mean) rstd, per channel.");
  m.def(
      "masked_bn_backward_dx",
      [](uintptr_t dy, uintptr_t x, uintptr_t mask, const std::vector<int64_t>& dy_layout,
         const std::vector<int64_t>& layout, const std::vector<int64_t>& out_layout, uintptr_t k0, uintptr_t k1,
         uintptr_t k2, uintptr_t k3, uintptr_t dx, bool is_double, int nthreads) {
        const Layout ld = make_layout(dy_layout), l = make_layout(layout), lo = make_layout(out_layout);
        py::gil_scoped_release release;
        if (is_double)
          backward_dx_t<double>(dy, x, mask, ld, l, lo, k0, k1, k2, k3, dx, nthreads);
        else
          backward_dx_t<float>(dy, x, mask, ld, l, lo, k0, k1, k2, k3, dx, nthreads);
      },
      "dx = mask ? k0[c] (dy - k2[c] - (x - k1[c]) k3[c]) : 0 over every site.");
}
