// Sparse (submanifold) 2-D convolution on CPU for masked convnets (SparK): only active output sites are
// computed and only active input sites contribute.
//
// Layout: every activation tensor is NHWC (channels contiguous), activity maps are uint8 [B, H, W].
// For an active output site o = (b, oh, ow) and kernel offset k = (kh, kw) the input site is
//     p(o, k) = (b, oh*sh - ph + kh*dh, ow*sw - pw + kw*dw)          (skipped if out of range or inactive)
// and
//     out[o, co] = bias[co] + sum_k sum_ci x[p(o,k), ci] * W[k, ci, co]            (groups = 1)
//     out[o, c]  = bias[c]  + sum_k x[p(o,k), c] * Wd[k, c]                        (depthwise)
// Backward (g = grad of out, read only at active output sites):
//     dx[p, ci]     = sum over (o, k) with p(o, k) = p, o active: sum_co g[o, co] * W[k, ci, co]
//     dW[k, ci, co] = sum over active o with p(o, k) valid: x[p(o,k), ci] * g[o, co]
//     dbias[co]     = sum over active o: g[o, co]
// and dx = 0 at inactive input sites, out = 0 at inactive output sites (written here, never left stale).
//
// Dense groups=1 uses gather-GEMM-scatter over tiles of MB = 4 active sites: for each kernel offset the
// tile's input rows are gathered by pointer (a shared zero row stands in for halos/inactive inputs, and an
// offset whose 4 rows are all missing is skipped) and multiplied with a packed weight slab in a 4 x 2-vector
// register block; the weights are stored strip-major, [npad / S][K][kdim][S] (S = 2 SIMD vectors, npad = out
// channels padded to S), so each strip's K * kdim * S values stream contiguously (no npad-strided reads).
// Cost per output strip: 2 * MB * S * (taps used) * kdim FLOPs per tile, one weight line per 8 FMAs.
// dx reuses the same kernel on the transposed map (rows of g, weights packed [Cin_pad / S][k][Cout][S]).
// dW is a GEMM of g's rows with the im2col rows of the active sites, written in torch's [Cout][Cin*K]
// layout (no memset, no repacking); each block of 4 output channels belongs to one thread (static schedule,
// identical over site chunks), so it is deterministic and needs no atomics (see dense_wgrad).
//
// Few input channels (the RGB stem): each site's whole K x Cin patch is gathered into one row and a single
// GEMM of depth K*Cin runs instead of K tiny ones. Depthwise, stride 1: runs of 4 consecutive active sites of
// a row use a sliding-window kernel (each loaded input vector feeds up to 4 outputs, a kernel row's weights
// stay in registers); other sites accumulate their K taps in registers per 4-vector channel block.
//
// Hot loops are compiled twice (AVX2+FMA and baseline), the two GEMM bodies (gather-GEMM and the dW slab) a
// third time in 512-bit vectors (AVX-512: one vector per packed strip, 4 rows x 4 strips = 16 accumulators;
// ~2x the AVX2 rate on CPUs with full-width AVX-512 units), chosen at run time (narrower builds can be forced
// with sparse_conv2d_set_isa("avx2") / ("base") for tests); OpenMP regions live in the baseline drivers and
// call the per-chunk workers (an OpenMP outlined body would not inherit the target attribute).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "registry.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#pragma GCC diagnostic ignored "-Wpsabi"

namespace py = pybind11;

namespace {

#define SC_INLINE inline __attribute__((always_inline))

constexpr int MB = 4;       // active sites per register tile
constexpr int CT = 8;       // tiles per scheduling chunk
constexpr int64_t CS = 256; // output sites per weight-gradient chunk

template <typename T>
struct Simd;
template <>
struct Simd<float> {
  typedef float v __attribute__((vector_size(32)));
  static constexpr int L = 8;
};
template <>
struct Simd<double> {
  typedef double v __attribute__((vector_size(32)));
  static constexpr int L = 4;
};

// 512-bit vectors (AVX-512 workers): one vector is one packed weight strip (S = 2 AVX2 vectors).
template <typename T>
struct Simd512;
template <>
struct Simd512<float> {
  typedef float v __attribute__((vector_size(64)));
  static constexpr int L = 16;
};
template <>
struct Simd512<double> {
  typedef double v __attribute__((vector_size(64)));
  static constexpr int L = 8;
};

template <typename V, typename T>
SC_INLINE V vload(const T* p) {
  V r;
  std::memcpy(&r, p, sizeof(V));
  return r;
}
template <typename V, typename T>
SC_INLINE void vstore(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}
// Load cnt (< lanes) elements, zero the rest.
template <typename V, typename T>
SC_INLINE V vload_part(const T* p, int64_t cnt) {
  V r = {};
  std::memcpy(&r, p, static_cast<size_t>(cnt) * sizeof(T));
  return r;
}

struct Geom {
  int64_t B, H, W, Cin, Ho, Wo, Cout, KH, KW, sh, sw, ph, pw, dh, dw;
  int64_t K() const { return KH * KW; }
};

Geom make_geom(const std::vector<int64_t>& v) {
  if (v.size() != 15) throw std::invalid_argument("sparse_conv2d: geometry must have 15 entries");
  return Geom{v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9], v[10], v[11], v[12], v[13], v[14]};
}

// ------------------------------------------------------------------------------------------------------
// hot-loop bodies (always inlined into the per-ISA workers below)

// out rows (MB per tile) = bias + sum_k rows[k] @ w[k]   for ntiles tiles; see file comment.
template <typename T>
SC_INLINE void gemm_chunk_body(const T* const* rows, const uint8_t* kuse, int ntiles, int64_t K, int64_t kdim,
                               const T* w, int64_t npad, const T* bias, T* const* outs, int64_t n) {
  using V = typename Simd<T>::v;
  constexpr int L = Simd<T>::L;
  for (int64_t n0 = 0; n0 < npad; n0 += 2 * L) {
    const V b0 = bias ? vload<V>(bias + n0) : V{};
    const V b1 = bias ? vload<V>(bias + n0 + L) : V{};
    const T* ws = w + (n0 / (2 * L)) * K * kdim * (2 * L);  // this strip's weights, contiguous [K][kdim][2L]
    for (int t = 0; t < ntiles; ++t) {
      V a00 = b0, a01 = b1, a10 = b0, a11 = b1, a20 = b0, a21 = b1, a30 = b0, a31 = b1;
      const T* const* tr = rows + static_cast<int64_t>(t) * K * MB;
      const uint8_t* tk = kuse + static_cast<int64_t>(t) * K;
      for (int64_t k = 0; k < K; ++k) {
        if (!tk[k]) continue;
        const T* __restrict r0 = tr[k * MB + 0];
        const T* __restrict r1 = tr[k * MB + 1];
        const T* __restrict r2 = tr[k * MB + 2];
        const T* __restrict r3 = tr[k * MB + 3];
        const T* __restrict wk = ws + k * kdim * (2 * L);
        for (int64_t c = 0; c < kdim; ++c) {
          const V w0 = vload<V>(wk + c * (2 * L));
          const V w1 = vload<V>(wk + c * (2 * L) + L);
          const T x0 = r0[c], x1 = r1[c], x2 = r2[c], x3 = r3[c];
          a00 += x0 * w0;
          a01 += x0 * w1;
          a10 += x1 * w0;
          a11 += x1 * w1;
          a20 += x2 * w0;
          a21 += x2 * w1;
          a30 += x3 * w0;
          a31 += x3 * w1;
        }
      }
      const V acc[MB][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31}};
      for (int m = 0; m < MB; ++m) {
        T* o = outs[t * MB + m];
        if (!o) continue;
        if (n0 + 2 * L <= n) {
          vstore(o + n0, acc[m][0]);
          vstore(o + n0 + L, acc[m][1]);
        } else if (n0 < n) {
          T tmp[2 * L];
          vstore(tmp, acc[m][0]);
          vstore(tmp + L, acc[m][1]);
          std::memcpy(o + n0, tmp, static_cast<size_t>(n - n0) * sizeof(T));
        }
      }
    }
  }
}

// dst[i, :] += sum_p xrows[p][i] * grows[p][:]  for i < cnt (<= 4); dst rows have stride npad >= cout.
// init: start from zero instead of dst (the first chunk of sites: no memset of dst needed).
template <typename T>
SC_INLINE void wgrad_slab_body(const T* const* xrows, const T* const* grows, int64_t np, int64_t cnt, int64_t cout,
                               int64_t npad, T* dst, bool init) {
  using V = typename Simd<T>::v;
  constexpr int L = Simd<T>::L;
  for (int64_t n0 = 0; n0 < cout; n0 += 2 * L) {
    V acc[4][2];
    for (int i = 0; i < 4; ++i) {
      acc[i][0] = i < cnt && !init ? vload<V>(dst + i * npad + n0) : V{};
      acc[i][1] = i < cnt && !init ? vload<V>(dst + i * npad + n0 + L) : V{};
    }
    V a00 = acc[0][0], a01 = acc[0][1], a10 = acc[1][0], a11 = acc[1][1];
    V a20 = acc[2][0], a21 = acc[2][1], a30 = acc[3][0], a31 = acc[3][1];
    const bool full = n0 + 2 * L <= cout;
    const int64_t rem = cout - n0;
    if (cnt == 4) {
      for (int64_t p = 0; p < np; ++p) {
        const T* __restrict g = grows[p] + n0;
        const T* __restrict x = xrows[p];
        V g0, g1;
        if (full) {
          g0 = vload<V>(g);
          g1 = vload<V>(g + L);
        } else {
          g0 = rem >= L ? vload<V>(g) : vload_part<V>(g, rem);
          g1 = rem > L ? vload_part<V>(g + L, rem - L) : V{};
        }
        const T x0 = x[0], x1 = x[1], x2 = x[2], x3 = x[3];
        a00 += x0 * g0;
        a01 += x0 * g1;
        a10 += x1 * g0;
        a11 += x1 * g1;
        a20 += x2 * g0;
        a21 += x2 * g1;
        a30 += x3 * g0;
        a31 += x3 * g1;
      }
    } else {
      for (int64_t p = 0; p < np; ++p) {
        const T* g = grows[p] + n0;
        const T* x = xrows[p];
        V g0, g1;
        if (full) {
          g0 = vload<V>(g);
          g1 = vload<V>(g + L);
        } else {
          g0 = rem >= L ? vload<V>(g) : vload_part<V>(g, rem);
          g1 = rem > L ? vload_part<V>(g + L, rem - L) : V{};
        }
        const T x0 = x[0], x1 = cnt > 1 ? x[1] : T(0), x2 = cnt > 2 ? x[2] : T(0);
        a00 += x0 * g0;
        a01 += x0 * g1;
        a10 += x1 * g0;
        a11 += x1 * g1;
        a20 += x2 * g0;
        a21 += x2 * g1;
      }
    }
    const V res[4][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31}};
    for (int i = 0; i < cnt; ++i) {
      vstore(dst + i * npad + n0, res[i][0]);
      vstore(dst + i * npad + n0 + L, res[i][1]);
    }
  }
}

// AVX-512 forms of the two GEMM bodies above (same layouts and results up to summation order within a
// vector lane: none; each output element is still one sequential sum over taps and channels).
// gemm: a 4-row x NS-strip register block (NS <= 4 strips of S values: up to 16 accumulators of 512 bits),
// NS strips of the packed weights streamed side by side (strip stride K * kdim * S).
template <typename T, int NS>
SC_INLINE void gemm512_block(const T* const* tr, const uint8_t* tk, int64_t K, int64_t kdim, const T* ws,
                             int64_t sstride, const T* bias, int64_t n0, T* const* outs, int64_t n) {
  using V = typename Simd512<T>::v;
  constexpr int S = Simd512<T>::L;
  V acc[MB][NS];
#pragma GCC unroll 4
  for (int j = 0; j < NS; ++j) {
    const V b = bias ? vload<V>(bias + n0 + j * S) : V{};
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) acc[m][j] = b;
  }
  for (int64_t k = 0; k < K; ++k) {
    if (!tk[k]) continue;
    const T* __restrict r0 = tr[k * MB + 0];
    const T* __restrict r1 = tr[k * MB + 1];
    const T* __restrict r2 = tr[k * MB + 2];
    const T* __restrict r3 = tr[k * MB + 3];
    const T* __restrict wk = ws + k * kdim * S;
    for (int64_t c = 0; c < kdim; ++c) {
      V w[NS];
#pragma GCC unroll 4
      for (int j = 0; j < NS; ++j) w[j] = vload<V>(wk + j * sstride + c * S);
      const T x0 = r0[c], x1 = r1[c], x2 = r2[c], x3 = r3[c];
#pragma GCC unroll 4
      for (int j = 0; j < NS; ++j) {
        acc[0][j] += x0 * w[j];
        acc[1][j] += x1 * w[j];
        acc[2][j] += x2 * w[j];
        acc[3][j] += x3 * w[j];
      }
    }
  }
#pragma GCC unroll 4
  for (int m = 0; m < MB; ++m) {
    T* o = outs[m];
    if (!o) continue;
#pragma GCC unroll 4
    for (int j = 0; j < NS; ++j) {
      const int64_t col = n0 + j * S;
      if (col + S <= n) {
        vstore(o + col, acc[m][j]);
      } else if (col < n) {
        T tmp[S];
        vstore(tmp, acc[m][j]);
        std::memcpy(o + col, tmp, static_cast<size_t>(n - col) * sizeof(T));
      }
    }
  }
}

template <typename T>
SC_INLINE void gemm512_chunk_body(const T* const* rows, const uint8_t* kuse, int ntiles, int64_t K, int64_t kdim,
                                  const T* w, int64_t npad, const T* bias, T* const* outs, int64_t n) {
  constexpr int S = Simd512<T>::L;
  const int64_t strips = npad / S, sstride = K * kdim * S;
  for (int64_t sb = 0; sb < strips;) {
    const int64_t ns = std::min<int64_t>(4, strips - sb);
    const T* ws = w + sb * sstride;
    for (int t = 0; t < ntiles; ++t) {
      const T* const* tr = rows + static_cast<int64_t>(t) * K * MB;
      const uint8_t* tk = kuse + static_cast<int64_t>(t) * K;
      T* const* to = outs + t * MB;
      if (ns == 4)
        gemm512_block<T, 4>(tr, tk, K, kdim, ws, sstride, bias, sb * S, to, n);
      else if (ns == 3)
        gemm512_block<T, 3>(tr, tk, K, kdim, ws, sstride, bias, sb * S, to, n);
      else if (ns == 2)
        gemm512_block<T, 2>(tr, tk, K, kdim, ws, sstride, bias, sb * S, to, n);
      else
        gemm512_block<T, 1>(tr, tk, K, kdim, ws, sstride, bias, sb * S, to, n);
    }
    sb += ns;
  }
}

// weight-gradient slab: dst[i, :] (+)= sum_p xrows[p][i] * grows[p][:] for i < cnt, NV vectors of columns per
// pass (NV <= 4: up to 16 accumulators); full-vector stores may run into the row padding (npad is a multiple
// of S >= cout), loads of grows stop at cout.
template <typename T, int NV>
SC_INLINE void wgrad512_cols(const T* const* xrows, const T* const* grows, int64_t np, int64_t cnt, int64_t cout,
                             int64_t npad, T* dst, bool init, int64_t n0) {
  using V = typename Simd512<T>::v;
  constexpr int S = Simd512<T>::L;
  V acc[4][NV];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[i][j] = i < cnt && !init ? vload<V>(dst + i * npad + n0 + j * S) : V{};
  const bool full = n0 + NV * S <= cout;
  for (int64_t p = 0; p < np; ++p) {
    const T* __restrict g = grows[p] + n0;
    const T* __restrict x = xrows[p];
    V gv[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      const int64_t rem = cout - n0 - j * S;
      gv[j] = full || rem >= S ? vload<V>(g + j * S) : (rem > 0 ? vload_part<V>(g + j * S, rem) : V{});
    }
    const T x0 = x[0], x1 = cnt > 1 ? x[1] : T(0), x2 = cnt > 2 ? x[2] : T(0), x3 = cnt > 3 ? x[3] : T(0);
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      acc[0][j] += x0 * gv[j];
      acc[1][j] += x1 * gv[j];
      acc[2][j] += x2 * gv[j];
      acc[3][j] += x3 * gv[j];
    }
  }
  for (int i = 0; i < cnt; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j)
      if (n0 + j * S < cout) vstore(dst + i * npad + n0 + j * S, acc[i][j]);
}

template <typename T>
SC_INLINE void wgrad512_slab_body(const T* const* xrows, const T* const* grows, int64_t np, int64_t cnt, int64_t cout,
                                  int64_t npad, T* dst, bool init) {
  constexpr int S = Simd512<T>::L;
  int64_t n0 = 0;
  for (; n0 + 4 * S <= cout; n0 += 4 * S) wgrad512_cols<T, 4>(xrows, grows, np, cnt, cout, npad, dst, init, n0);
  for (; n0 < cout; n0 += S) wgrad512_cols<T, 1>(xrows, grows, np, cnt, cout, npad, dst, init, n0);
}

// acc[c] += a[c]  (contiguous, vectorised by the compiler)
template <typename T>
SC_INLINE void add_row(T* __restrict acc, const T* __restrict a, int64_t n) {
  for (int64_t c = 0; c < n; ++c) acc[c] += a[c];
}

// Depthwise: for each listed output (or input) site, out row = (bias) + sum over its valid neighbours of
// nbr_row * wd[k]. nbr[j * K + k] is the neighbour row (x for forward, g for dx) or nullptr. Channels are
// register-blocked by 4 vectors, kernel taps innermost, so each tap costs 2 loads per FMA and no stores.
template <typename T>
SC_INLINE void dw_rows_body(const T* const* nbr, T* const* outs, int64_t count, int64_t K, const T* wd, const T* bias,
                            int64_t C) {
  using V = typename Simd<T>::v;
  constexpr int L = Simd<T>::L;
  for (int64_t j = 0; j < count; ++j) {
    T* o = outs[j];
    const T* const* nj = nbr + j * K;
    int64_t c0 = 0;
    for (; c0 + 4 * L <= C; c0 += 4 * L) {
      V a0 = bias ? vload<V>(bias + c0) : V{}, a1 = bias ? vload<V>(bias + c0 + L) : V{};
      V a2 = bias ? vload<V>(bias + c0 + 2 * L) : V{}, a3 = bias ? vload<V>(bias + c0 + 3 * L) : V{};
      for (int64_t k = 0; k < K; ++k) {
        const T* r = nj[k];
        if (!r) continue;
        const T* wk = wd + k * C + c0;
        a0 += vload<V>(r + c0) * vload<V>(wk);
        a1 += vload<V>(r + c0 + L) * vload<V>(wk + L);
        a2 += vload<V>(r + c0 + 2 * L) * vload<V>(wk + 2 * L);
        a3 += vload<V>(r + c0 + 3 * L) * vload<V>(wk + 3 * L);
      }
      vstore(o + c0, a0);
      vstore(o + c0 + L, a1);
      vstore(o + c0 + 2 * L, a2);
      vstore(o + c0 + 3 * L, a3);
    }
    for (; c0 < C; c0 += L) {
      const int64_t n = std::min<int64_t>(L, C - c0);
      V a = bias ? vload_part<V>(bias + c0, n) : V{};
      for (int64_t k = 0; k < K; ++k) {
        const T* r = nj[k];
        if (r) a += vload_part<V>(r + c0, n) * vload_part<V>(wd + k * C + c0, n);
      }
      T tmp[L];
      vstore(tmp, a);
      std::memcpy(o + c0, tmp, static_cast<size_t>(n) * sizeof(T));
    }
  }
}

// Depthwise, stride 1 and dilation 1, for G = 4 consecutive sites of one row: the sliding-window kernel.
// cols[kh * NC + j] (NC = G + KW - 1) is the source row at relative column j of kernel row kh (or nullptr);
// site m reads column j = m + kw' at tap kw' (forward: kw = kw', transposed/dx: kw = KW - 1 - kw'). Each
// loaded source vector feeds up to G accumulators and the kernel row's weights stay in registers.
template <typename T, int KW>
SC_INLINE void dw_group_body(const T* const* cols, int64_t KH, const T* wd, const T* bias, T* const* outs, int64_t C,
                             bool flip) {
  using V = typename Simd<T>::v;
  constexpr int L = Simd<T>::L;
  constexpr int G = 4, NC = G + KW - 1;
  int64_t c0 = 0;
  for (; c0 + L <= C; c0 += L) {
    const V b = bias ? vload<V>(bias + c0) : V{};
    V a0 = b, a1 = b, a2 = b, a3 = b;
    for (int64_t kh = 0; kh < KH; ++kh) {
      const T* const* ck = cols + kh * NC;
      V wv[KW];
#pragma GCC unroll 8
      for (int q = 0; q < KW; ++q) wv[q] = vload<V>(wd + (kh * KW + (flip ? KW - 1 - q : q)) * C + c0);
#pragma GCC unroll 16
      for (int j = 0; j < NC; ++j) {
        const T* r = ck[j];
        if (!r) continue;
        const V xv = vload<V>(r + c0);
        if (j < KW) a0 += xv * wv[j < KW ? j : 0];
        if (j >= 1 && j - 1 < KW) a1 += xv * wv[j >= 1 && j - 1 < KW ? j - 1 : 0];
        if (j >= 2 && j - 2 < KW) a2 += xv * wv[j >= 2 && j - 2 < KW ? j - 2 : 0];
        if (j >= 3 && j - 3 < KW) a3 += xv * wv[j >= 3 && j - 3 < KW ? j - 3 : 0];
      }
    }
    vstore(outs[0] + c0, a0);
    vstore(outs[1] + c0, a1);
    vstore(outs[2] + c0, a2);
    vstore(outs[3] + c0, a3);
  }
  for (; c0 < C; ++c0) {  // channel tail (C not a multiple of the vector width)
    for (int m = 0; m < G; ++m) {
      T acc = bias ? bias[c0] : T(0);
      for (int64_t kh = 0; kh < KH; ++kh)
        for (int q = 0; q < KW; ++q) {
          const T* r = cols[kh * NC + m + q];
          if (r) acc += r[c0] * wd[(kh * KW + (flip ? KW - 1 - q : q)) * C + c0];
        }
      outs[m][c0] = acc;
    }
  }
}

// Depthwise weight-gradient partial over `count` output sites: part[k, c] += sum_j g[j, c] * x[p(j,k), c] and
// pbias[c] += sum_j g[j, c]; channels register-blocked, sites innermost (one read-modify-write per chunk).
template <typename T>
SC_INLINE void dw_wgrad_body(const T* const* xn, const T* const* grows, int64_t count, int64_t K, int64_t C, T* part,
                             T* pbias) {
  using V = typename Simd<T>::v;
  constexpr int L = Simd<T>::L;
  for (int64_t c0 = 0; c0 < C; c0 += 2 * L) {
    const int64_t n0 = std::min<int64_t>(L, C - c0);
    const int64_t n1 = std::max<int64_t>(0, std::min<int64_t>(L, C - c0 - L));
    const bool full = n0 == L && n1 == L;
    if (pbias) {
      V b0 = {}, b1 = {};
      for (int64_t j = 0; j < count; ++j) {
        const T* g = grows[j] + c0;
        b0 += full ? vload<V>(g) : vload_part<V>(g, n0);
        b1 += full ? vload<V>(g + L) : (n1 ? vload_part<V>(g + L, n1) : V{});
      }
      T tmp[2 * L];
      vstore(tmp, b0);
      vstore(tmp + L, b1);
      for (int64_t i = 0; i < n0 + n1; ++i) pbias[c0 + i] += tmp[i];
    }
    for (int64_t k = 0; k < K; ++k) {
      V a0 = {}, a1 = {};
      for (int64_t j = 0; j < count; ++j) {
        const T* r = xn[j * K + k];
        if (!r) continue;
        const T* g = grows[j] + c0;
        r += c0;
        if (full) {
          a0 += vload<V>(g) * vload<V>(r);
          a1 += vload<V>(g + L) * vload<V>(r + L);
        } else {
          a0 += vload_part<V>(g, n0) * vload_part<V>(r, n0);
          if (n1) a1 += vload_part<V>(g + L, n1) * vload_part<V>(r + L, n1);
        }
      }
      T tmp[2 * L];
      vstore(tmp, a0);
      vstore(tmp + L, a1);
      T* dst = part + k * C + c0;
      for (int64_t i = 0; i < n0 + n1; ++i) dst[i] += tmp[i];
    }
  }
}

template <typename T>
SC_INLINE void rows_sum_body(const T* const* grows, int64_t count, int64_t C, T* acc) {
  for (int64_t j = 0; j < count; ++j) add_row(acc, grows[j], C);
}

// ------------------------------------------------------------------------------------------------------
// per-ISA workers and run-time selection

template <typename T>
struct Workers {
  void (*gemm_chunk)(const T* const*, const uint8_t*, int, int64_t, int64_t, const T*, int64_t, const T*, T* const*,
                     int64_t);
  void (*wgrad_slab)(const T* const*, const T* const*, int64_t, int64_t, int64_t, int64_t, T*, bool);
  void (*dw_rows)(const T* const*, T* const*, int64_t, int64_t, const T*, const T*, int64_t);
  void (*dw_wgrad)(const T* const*, const T* const*, int64_t, int64_t, int64_t, T*, T*);
  void (*rows_sum)(const T* const*, int64_t, int64_t, T*);
  void (*dw_group[3])(const T* const*, int64_t, const T*, const T*, T* const*, int64_t, bool);  // KW = 3, 5, 7
};

#define SC_DEFINE_WORKERS(NS, ATTR)                                                                             \
  namespace NS {                                                                                               \
  template <typename T>                                                                                        \
  ATTR void gemm_chunk(const T* const* rows, const uint8_t* kuse, int ntiles, int64_t K, int64_t kdim,         \
                       const T* w, int64_t npad, const T* bias, T* const* outs, int64_t n) {                    \
    gemm_chunk_body<T>(rows, kuse, ntiles, K, kdim, w, npad, bias, outs, n);                                   \
  }                                                                                                            \
  template <typename T>                                                                                        \
  ATTR void wgrad_slab(const T* const* xr, const T* const* gr, int64_t np, int64_t cnt, int64_t cout,          \
                       int64_t npad, T* dst, bool init) {                                                      \
    wgrad_slab_body<T>(xr, gr, np, cnt, cout, npad, dst, init);                                                \
  }                                                                                                            \
  template <typename T>                                                                                        \
  ATTR void dw_rows(const T* const* nbr, T* const* outs, int64_t count, int64_t K, const T* wd, const T* bias,  \
                    int64_t C) {                                                                               \
    dw_rows_body<T>(nbr, outs, count, K, wd, bias, C);                                                         \
  }                                                                                                            \
  template <typename T>                                                                                        \
  ATTR void dw_wgrad(const T* const* xn, const T* const* gr, int64_t count, int64_t K, int64_t C, T* part,     \
                     T* pbias) {                                                                               \
    dw_wgrad_body<T>(xn, gr, count, K, C, part, pbias);                                                        \
  }                                                                                                            \
  template <typename T>                                                                                        \
  ATTR void rows_sum(const T* const* gr, int64_t count, int64_t C, T* acc) {                                   \
    rows_sum_body<T>(gr, count, C, acc);                                                                       \
  }                                                                                                            \
  template <typename T, int KW>                                                                                \
  ATTR void dw_group(const T* const* cols, int64_t KH, const T* wd, const T* bias, T* const* outs, int64_t C,    \
                     bool flip) {                                                                              \
    dw_group_body<T, KW>(cols, KH, wd, bias, outs, C, flip);                                                   \
  }                                                                                                            \
  template <typename T>                                                                                        \
  Workers<T> workers() {                                                                                       \
    return Workers<T>{&gemm_chunk<T>, &wgrad_slab<T>, &dw_rows<T>, &dw_wgrad<T>, &rows_sum<T>,                 \
                      {&dw_group<T, 3>, &dw_group<T, 5>, &dw_group<T, 7>}};                                    \
  }                                                                                                            \
  }

SC_DEFINE_WORKERS(isa_avx2, __attribute__((target("avx2,fma"), optimize("fp-contract=fast"))))
SC_DEFINE_WORKERS(isa_base, )

// AVX-512: the two GEMM bodies in 512-bit vectors, the other workers from the AVX2 build.
#define SC_AVX512 __attribute__((target("avx512f,avx512vl,avx2,fma"), optimize("fp-contract=fast")))
namespace isa_avx512 {
template <typename T>
SC_AVX512 void gemm_chunk(const T* const* rows, const uint8_t* kuse, int ntiles, int64_t K, int64_t kdim, const T* w,
                          int64_t npad, const T* bias, T* const* outs, int64_t n) {
  gemm512_chunk_body<T>(rows, kuse, ntiles, K, kdim, w, npad, bias, outs, n);
}
template <typename T>
SC_AVX512 void wgrad_slab(const T* const* xr, const T* const* gr, int64_t np, int64_t cnt, int64_t cout, int64_t npad,
                          T* dst, bool init) {
  wgrad512_slab_body<T>(xr, gr, np, cnt, cout, npad, dst, init);
}
template <typename T>
Workers<T> workers() {
  Workers<T> w = isa_avx2::workers<T>();
  w.gemm_chunk = &gemm_chunk<T>;
  w.wgrad_slab = &wgrad_slab<T>;
  return w;
}
}  // namespace isa_avx512

bool have_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

bool have_avx512() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool ok = have_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
  return ok;
#else
  return false;
#endif
}

// the widest ISA allowed (sparse_conv2d_set_isa: tests of the narrower builds): 2 = AVX-512, 1 = AVX2, 0 = base
int isa_cap = 2;

int isa_level() { return have_avx512() && isa_cap >= 2 ? 2 : (have_avx2() && isa_cap >= 1 ? 1 : 0); }

template <typename T>
Workers<T> pick_workers() {
  const int level = isa_level();
  return level == 2 ? isa_avx512::workers<T>() : (level == 1 ? isa_avx2::workers<T>() : isa_base::workers<T>());
}

// ------------------------------------------------------------------------------------------------------
// site lists and neighbour maps

std::vector<int64_t> active_sites(const uint8_t* act, int64_t n) {
  std::vector<int64_t> s;
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) count += act[i] != 0;
  s.reserve(count);
  for (int64_t i = 0; i < n; ++i)
    if (act[i]) s.push_back(i);
  return s;
}

// Input site feeding output site s at offset (kh, kw), or -1 (out of range or inactive).
SC_INLINE int64_t input_of(const Geom& g, const uint8_t* ain, int64_t s, int64_t kh, int64_t kw) {
  const int64_t hw = g.Ho * g.Wo;
  const int64_t b = s / hw, r = s % hw, oh = r / g.Wo, ow = r % g.Wo;
  const int64_t ih = oh * g.sh - g.ph + kh * g.dh;
  const int64_t iw = ow * g.sw - g.pw + kw * g.dw;
  if (ih < 0 || ih >= g.H || iw < 0 || iw >= g.W) return -1;
  const int64_t p = (b * g.H + ih) * g.W + iw;
  return ain[p] ? p : -1;
}

// All K neighbours of one site at once (site decoded once): nb[k] = neighbour index or -1.
// transposed = false: input sites p(s, k) read by output site s; true: output sites o with p(o, k) = s.
SC_INLINE void neighbours(const Geom& g, const uint8_t* act_src, int64_t s, bool transposed, int64_t* nb) {
  if (!transposed) {
    const int64_t hw = g.Ho * g.Wo;
    const int64_t b = s / hw, r = s % hw, oh = r / g.Wo, ow = r % g.Wo;
    const int64_t h0 = oh * g.sh - g.ph, w0 = ow * g.sw - g.pw;
    for (int64_t kh = 0; kh < g.KH; ++kh) {
      const int64_t ih = h0 + kh * g.dh;
      const bool row_ok = ih >= 0 && ih < g.H;
      const int64_t base = (b * g.H + ih) * g.W;
      for (int64_t kw = 0; kw < g.KW; ++kw) {
        const int64_t iw = w0 + kw * g.dw;
        const bool ok = row_ok && iw >= 0 && iw < g.W && act_src[base + iw];
        nb[kh * g.KW + kw] = ok ? base + iw : -1;
      }
    }
  } else {
    const int64_t hw = g.H * g.W;
    const int64_t b = s / hw, r = s % hw, ih = r / g.W, iw = r % g.W;
    for (int64_t kh = 0; kh < g.KH; ++kh) {
      const int64_t th = ih + g.ph - kh * g.dh;
      const bool row_ok = th >= 0 && th % g.sh == 0 && th / g.sh < g.Ho;
      const int64_t base = (b * g.Ho + (row_ok ? th / g.sh : 0)) * g.Wo;
      for (int64_t kw = 0; kw < g.KW; ++kw) {
        const int64_t tw = iw + g.pw - kw * g.dw;
        const bool ok = row_ok && tw >= 0 && tw % g.sw == 0 && tw / g.sw < g.Wo && act_src[base + tw / g.sw];
        nb[kh * g.KW + kw] = ok ? base + tw / g.sw : -1;
      }
    }
  }
}

template <typename T>
void zero_inactive_rows(T* data, const uint8_t* act, int64_t n, int64_t C, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t i = 0; i < n; ++i)
    if (!act[i]) std::memset(data + i * C, 0, static_cast<size_t>(C) * sizeof(T));
}

// ------------------------------------------------------------------------------------------------------
// dense groups = 1

// transposed = false: out[o] from x (forward); true: dx[p] from g (input gradient).
template <typename T>
void dense_gather_gemm(const T* src, const uint8_t* ain, const uint8_t* aout, const T* wpack, const T* bias_pad,
                       T* dst, const Geom& g, int64_t npad, bool transposed, int nthreads) {
  const Workers<T> wk = pick_workers<T>();
  const int64_t K = g.K();
  const int64_t n_dst = transposed ? g.B * g.H * g.W : g.B * g.Ho * g.Wo;
  const int64_t kdim = transposed ? g.Cout : g.Cin;   // length of a gathered row
  const int64_t ndim = transposed ? g.Cin : g.Cout;   // length of a written row
  const uint8_t* adst = transposed ? ain : aout;
  zero_inactive_rows(dst, adst, n_dst, ndim, nthreads);
  std::vector<int64_t> sites = active_sites(adst, n_dst);
  const int64_t n = static_cast<int64_t>(sites.size());
  if (n == 0) return;
  if (transposed && (g.sh > 1 || g.sw > 1)) {
    // strided dx: input sites of one parity class (ih mod sh, iw mod sw) are hit by the same taps, so tiles
    // of one class skip the others' taps (mixed tiles would run every tap on mostly-zero rows, ~sh*sw x work)
    std::stable_sort(sites.begin(), sites.end(), [&](int64_t a, int64_t b) {
      const int64_t ra = a % (g.H * g.W), rb = b % (g.H * g.W);
      const int64_t ka = ((ra / g.W) % g.sh) * g.sw + (ra % g.W) % g.sw;
      const int64_t kb = ((rb / g.W) % g.sh) * g.sw + (rb % g.W) % g.sw;
      return ka < kb;
    });
  }
  const std::vector<T> zeros(static_cast<size_t>(kdim), T(0));
  const int64_t tiles = (n + MB - 1) / MB;
  const int64_t chunks = (tiles + CT - 1) / CT;
  // Few input channels (the RGB stem): gather each site's whole K x kdim patch into one contiguous row and
  // run a single GEMM of depth K * kdim (the packed weights [K][kdim][npad] are already [K * kdim][npad]).
  const bool patches = !transposed && kdim < 16 && K > 1;
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<T> patch(patches ? static_cast<size_t>(CT * MB * K * kdim) : 0);
    std::vector<const T*> prow(patches ? static_cast<size_t>(CT * MB) : 0);
    std::vector<uint8_t> puse(patches ? static_cast<size_t>(CT) : 0, uint8_t(1));
    std::vector<const T*> rows(static_cast<size_t>(CT * K * MB));
    std::vector<uint8_t> kuse(static_cast<size_t>(CT * K));
    std::vector<T*> outs(static_cast<size_t>(CT * MB));
    std::vector<int64_t> nb(static_cast<size_t>(K));
#pragma omp for schedule(dynamic, 1)
    for (int64_t ch = 0; ch < chunks; ++ch) {
      const int64_t t0 = ch * CT;
      const int nt = static_cast<int>(std::min<int64_t>(CT, tiles - t0));
      std::fill(kuse.begin(), kuse.end(), uint8_t(0));
      for (int t = 0; t < nt; ++t) {
        for (int m = 0; m < MB; ++m) {
          const int64_t idx = (t0 + t) * MB + m;
          const int64_t s = idx < n ? sites[idx] : -1;
          outs[t * MB + m] = s >= 0 ? dst + s * ndim : nullptr;
          if (s >= 0)
            neighbours(g, transposed ? aout : ain, s, transposed, nb.data());
          else
            std::fill(nb.begin(), nb.end(), int64_t(-1));
          if (patches) {
            T* pr = patch.data() + static_cast<int64_t>(t * MB + m) * K * kdim;
            prow[t * MB + m] = pr;
            for (int64_t k = 0; k < K; ++k) {
              const T* r = nb[k] >= 0 ? src + nb[k] * kdim : zeros.data();
              for (int64_t c = 0; c < kdim; ++c) pr[k * kdim + c] = r[c];
            }
            continue;
          }
          for (int64_t k = 0; k < K; ++k) {
            const int64_t q = nb[k];
            rows[(t * K + k) * MB + m] = q >= 0 ? src + q * kdim : zeros.data();
            if (q >= 0) kuse[t * K + k] = 1;
          }
        }
      }
      if (patches) {
        wk.gemm_chunk(prow.data(), puse.data(), nt, 1, K * kdim, wpack, npad, bias_pad, outs.data(), ndim);
      } else {
        wk.gemm_chunk(rows.data(), kuse.data(), nt, K, kdim, wpack, npad, transposed ? nullptr : bias_pad,
                      outs.data(), ndim);
      }
    }
  }
}

// dW in torch's layout, dw[co][j] (row stride jpad >= J = Cin * K, j = ci * K + k), as a GEMM over active
// output sites o: dw[co][j] = sum_o g[o, co] * P[o, j] with P[o, ci*K + k] = x[p(o,k), ci] (0 for a missing
// input), o's im2col row; for 1x1 kernels P[o] is x's row p(o, 0) itself (no copy). Sites are taken in
// chunks of cs (the chunk's P, cs x J, stays in L2); per chunk, tasks are blocks of 4 output channels
// (4 x 2-vector register block, sites innermost), the first chunk writing (no memset, no repacking after).
// A block of dw belongs to one thread for the whole call (static schedule, same trip count per chunk), so
// the result is deterministic and needs no atomics. dbias[co] = sum_o g[o, co].
// Cost: 2 n J Cout FLOPs (n active output sites); reads P once per 4-channel block from L2 and g once;
// writes dw once per chunk (Cout x J x ceil(n / cs)), plus building P (n x J) for K > 1.
template <typename T>
void dense_wgrad(const T* x, const T* gr, const uint8_t* ain, const uint8_t* aout, T* dw, T* dbias, const Geom& g,
                 int64_t jpad, int nthreads) {
  const Workers<T> wk = pick_workers<T>();
  const int64_t K = g.K(), Cin = g.Cin, Cout = g.Cout, J = K * Cin;
  const std::vector<int64_t> sites = active_sites(aout, g.B * g.Ho * g.Wo);
  const int64_t n = static_cast<int64_t>(sites.size());
  const int64_t cs = std::max<int64_t>(16, std::min<int64_t>(256, (int64_t(1) << 16) / jpad));
  const int64_t chunks = (n + cs - 1) / cs;
  const int64_t nblk = (Cout + 3) / 4;
  const std::vector<T> zeros(static_cast<size_t>(Cin), T(0));
  const bool direct = K == 1;
  std::vector<T> patch(direct ? 0 : static_cast<size_t>(cs * jpad));
  std::vector<const T*> prow(static_cast<size_t>(cs)), grow(static_cast<size_t>(cs));
  if (n == 0) {
    for (int64_t co = 0; co < Cout; ++co) std::fill(dw + co * jpad, dw + (co + 1) * jpad, T(0));
  }
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<int64_t> nb(static_cast<size_t>(K));
    std::vector<const T*> gs(static_cast<size_t>(cs));
    for (int64_t ch = 0; ch < chunks; ++ch) {
      const int64_t s0 = ch * cs, cnt = std::min(cs, n - s0);
#pragma omp for schedule(static)
      for (int64_t j = 0; j < cnt; ++j) {
        const int64_t o = sites[s0 + j];
        grow[j] = gr + o * Cout;
        if (direct) {
          const int64_t p = input_of(g, ain, o, 0, 0);
          prow[j] = p >= 0 ? x + p * Cin : zeros.data();
          continue;
        }
        T* pr = patch.data() + j * jpad;
        prow[j] = pr;
        neighbours(g, ain, o, false, nb.data());
        for (int64_t k = 0; k < K; ++k) {
          const T* r = nb[k] >= 0 ? x + nb[k] * Cin : zeros.data();
          for (int64_t ci = 0; ci < Cin; ++ci) pr[ci * K + k] = r[ci];
        }
        std::fill(pr + J, pr + jpad, T(0));
      }
      // (implicit barrier: the chunk's rows are built before any block reads them)
#pragma omp for schedule(static)
      for (int64_t bi = 0; bi < nblk; ++bi) {
        const int64_t c0 = bi * 4, nc = std::min<int64_t>(4, Cout - c0);
        for (int64_t j = 0; j < cnt; ++j) gs[j] = grow[j] + c0;
        wk.wgrad_slab(gs.data(), prow.data(), cnt, nc, J, jpad, dw + c0 * jpad, ch == 0);
      }
      // (implicit barrier: every block is done before the next chunk overwrites the rows)
    }
  }
  if (dbias) {
    std::memset(dbias, 0, static_cast<size_t>(g.Cout) * sizeof(T));
    std::vector<const T*> grs(static_cast<size_t>(n));
    for (int64_t j = 0; j < n; ++j) grs[j] = gr + sites[j] * g.Cout;
    const int64_t cblk = 64;
    const int64_t nblk = (g.Cout + cblk - 1) / cblk;
#pragma omp parallel num_threads(nthreads)
    {
      std::vector<const T*> shifted(static_cast<size_t>(n));
#pragma omp for schedule(static)
      for (int64_t bi = 0; bi < nblk; ++bi) {
        const int64_t c0 = bi * cblk, cnt = std::min(cblk, g.Cout - c0);
        for (int64_t j = 0; j < n; ++j) shifted[j] = grs[j] + c0;
        wk.rows_sum(shifted.data(), n, cnt, dbias + c0);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------------
// depthwise (groups = C_in = C_out), weights packed wd[k][c]

constexpr int64_t DW_CHUNK = 32;

template <typename T>
void depthwise_rows(const T* src, const uint8_t* ain, const uint8_t* aout, const T* wd, const T* bias, T* dst,
                    const Geom& g, bool transposed, int nthreads) {
  const Workers<T> wk = pick_workers<T>();
  const int64_t K = g.K(), C = g.Cin;
  const int64_t n_dst = transposed ? g.B * g.H * g.W : g.B * g.Ho * g.Wo;
  const uint8_t* adst = transposed ? ain : aout;
  zero_inactive_rows(dst, adst, n_dst, C, nthreads);
  const std::vector<int64_t> all_sites = active_sites(adst, n_dst);
  // Sliding-window fast path (stride 1, dilation 1, KW in {3, 5, 7}): runs of 4 consecutive active sites
  // of one row go to dw_group; the rest (and every site otherwise) to the per-site kernel.
  const bool fast = g.sh == 1 && g.sw == 1 && g.dh == 1 && g.dw == 1 && (g.KW == 3 || g.KW == 5 || g.KW == 7);
  const int64_t Wd = transposed ? g.W : g.Wo;
  std::vector<int64_t> groups, sites;
  if (fast) {
    const int64_t na = static_cast<int64_t>(all_sites.size());
    for (int64_t i = 0; i < na;) {
      const int64_t s0 = all_sites[i];
      if (i + 3 < na && all_sites[i + 3] == s0 + 3 && s0 % Wd + 3 < Wd) {
        groups.push_back(s0);
        i += 4;
      } else {
        sites.push_back(s0);
        ++i;
      }
    }
  } else {
    sites = all_sites;
  }
  if (!groups.empty()) {
    const int64_t NC = 4 + g.KW - 1;
    const int64_t Hs = transposed ? g.Ho : g.H, Ws = transposed ? g.Wo : g.W;
    const int64_t Hd = transposed ? g.H : g.Ho;
    const uint8_t* asrc = transposed ? aout : ain;
    const auto fn = wk.dw_group[g.KW == 3 ? 0 : (g.KW == 5 ? 1 : 2)];
    const int64_t ng = static_cast<int64_t>(groups.size());
#pragma omp parallel num_threads(nthreads)
    {
      std::vector<const T*> cols(static_cast<size_t>(g.KH * NC));
      T* outs[4];
#pragma omp for schedule(dynamic, 8)
      for (int64_t gi = 0; gi < ng; ++gi) {
        const int64_t s0 = groups[gi];
        const int64_t b = s0 / (Hd * Wd), r = s0 % (Hd * Wd), y = r / Wd, x0 = r % Wd;
        for (int m = 0; m < 4; ++m) outs[m] = dst + (s0 + m) * C;
        const int64_t col0 = transposed ? x0 + g.pw - (g.KW - 1) : x0 - g.pw;
        for (int64_t kh = 0; kh < g.KH; ++kh) {
          const int64_t row = transposed ? y + g.ph - kh : y - g.ph + kh;
          for (int64_t j = 0; j < NC; ++j) {
            const int64_t col = col0 + j;
            const T* p = nullptr;
            if (row >= 0 && row < Hs && col >= 0 && col < Ws) {
              const int64_t q = (b * Hs + row) * Ws + col;
              if (asrc[q]) p = src + q * C;
            }
            cols[kh * NC + j] = p;
          }
        }
        fn(cols.data(), g.KH, wd, transposed ? nullptr : bias, outs, C, transposed);
      }
    }
  }
  const int64_t n = static_cast<int64_t>(sites.size());
  const int64_t chunks = (n + DW_CHUNK - 1) / DW_CHUNK;
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<const T*> nbr(static_cast<size_t>(DW_CHUNK * K));
    std::vector<T*> outs(static_cast<size_t>(DW_CHUNK));
    std::vector<int64_t> nb(static_cast<size_t>(K));
#pragma omp for schedule(dynamic, 4)
    for (int64_t ch = 0; ch < chunks; ++ch) {
      const int64_t j0 = ch * DW_CHUNK, cnt = std::min(DW_CHUNK, n - j0);
      for (int64_t j = 0; j < cnt; ++j) {
        const int64_t s = sites[j0 + j];
        outs[j] = dst + s * C;
        neighbours(g, transposed ? aout : ain, s, transposed, nb.data());
        for (int64_t k = 0; k < K; ++k) nbr[j * K + k] = nb[k] >= 0 ? src + nb[k] * C : nullptr;
      }
      wk.dw_rows(nbr.data(), outs.data(), cnt, K, wd, transposed ? nullptr : bias, C);
    }
  }
}

// In the transposed direction the weight index must be the same k: dx[p] += g[o] * wd[k] with p = p(o, k).
// depthwise_rows(transposed) asks neighbours() for the o with p(o, k) = p, so wd[k] is correct as is.

template <typename T>
void depthwise_wgrad(const T* x, const T* gr, const uint8_t* ain, const uint8_t* aout, T* dw, T* dbias, const Geom& g,
                     int nthreads) {
  const Workers<T> wk = pick_workers<T>();
  const int64_t K = g.K(), C = g.Cin;
  const std::vector<int64_t> sites = active_sites(aout, g.B * g.Ho * g.Wo);
  const int64_t n = static_cast<int64_t>(sites.size());
  int nt = nthreads;
#ifdef _OPENMP
  nt = std::max(1, std::min<int>(nthreads, static_cast<int>((n + DW_CHUNK - 1) / DW_CHUNK)));
#else
  nt = 1;
#endif
  std::vector<T> parts(static_cast<size_t>(nt) * K * C, T(0));
  std::vector<T> pbias(dbias ? static_cast<size_t>(nt) * C : 0, T(0));
  const int64_t chunks = (n + DW_CHUNK - 1) / DW_CHUNK;
#pragma omp parallel num_threads(nt)
  {
    int tid = 0;
#ifdef _OPENMP
    tid = omp_get_thread_num();
#endif
    std::vector<const T*> xn(static_cast<size_t>(DW_CHUNK * K));
    std::vector<const T*> grs(static_cast<size_t>(DW_CHUNK));
    std::vector<int64_t> nb(static_cast<size_t>(K));
    T* part = parts.data() + static_cast<int64_t>(tid) * K * C;
    T* pb = dbias ? pbias.data() + static_cast<int64_t>(tid) * C : nullptr;
#pragma omp for schedule(static)
    for (int64_t ch = 0; ch < chunks; ++ch) {
      const int64_t j0 = ch * DW_CHUNK, cnt = std::min(DW_CHUNK, n - j0);
      for (int64_t j = 0; j < cnt; ++j) {
        const int64_t s = sites[j0 + j];
        grs[j] = gr + s * C;
        neighbours(g, ain, s, false, nb.data());
        for (int64_t k = 0; k < K; ++k) xn[j * K + k] = nb[k] >= 0 ? x + nb[k] * C : nullptr;
      }
      wk.dw_wgrad(xn.data(), grs.data(), cnt, K, C, part, pb);
    }
  }
  // fixed-order reduction of the per-thread partials (deterministic for a given thread count)
  std::memset(dw, 0, static_cast<size_t>(K * C) * sizeof(T));
  for (int t = 0; t < nt; ++t)
    for (int64_t i = 0; i < K * C; ++i) dw[i] += parts[static_cast<size_t>(t) * K * C + i];
  if (dbias) {
    std::memset(dbias, 0, static_cast<size_t>(C) * sizeof(T));
    for (int t = 0; t < nt; ++t)
      for (int64_t c = 0; c < C; ++c) dbias[c] += pbias[static_cast<size_t>(t) * C + c];
  }
}

// ------------------------------------------------------------------------------------------------------
// weight (re)packing: blocked transposes (torch's strided permute-copy is slow for these layouts)

// dst[r * d_r + c * d_c] = src[r * s_r + c * s_c] for rows r0 <= r < r1 and all c < C, in 16 x 16 blocks.
// mode 0: dst[co / S][k][ci][co % S] = w[co][ci][k]   (forward; S = 2 SIMD vectors, co < npad, zero padded)
// mode 1: dst[ci / S][k][co][ci % S] = w[co][ci][k]   (input gradient)
// mode 2: dst[co][ci][k] = src[k][ci][co (npad)] (weight gradient back to torch's layout)
// Tiled 16 x 16 over (ci, co), all K taps of a tile before the next: the tile's source lines (16 x 16 x K
// values) stay in L1 across the taps, where a per-tap transpose over whole rows re-reads each source line K
// times from memory; parallel over row tiles; padding columns are zero-filled.
template <typename T>
void pack_t(const T* src, T* dst, int64_t Cout, int64_t Cin, int64_t K, int64_t npad, int mode, int nthreads) {
  constexpr int64_t TB = 16;
  if (mode == 2) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t cib = 0; cib < Cin; cib += TB) {
      const int64_t cie = std::min(Cin, cib + TB);
      for (int64_t cob = 0; cob < Cout; cob += TB) {
        const int64_t coe = std::min(Cout, cob + TB);
        for (int64_t k = 0; k < K; ++k)
          for (int64_t ci = cib; ci < cie; ++ci) {
            const T* sr = src + (k * Cin + ci) * npad;
            for (int64_t co = cob; co < coe; ++co) dst[(co * Cin + ci) * K + k] = sr[co];
          }
      }
    }
    return;
  }
  const int64_t R = mode == 1 ? Cout : Cin;  // destination rows: ci (mode 0) or co (mode 1)
  const int64_t C = mode == 1 ? Cin : Cout;  // destination columns (padded to npad)
  // strip-major: column c of row (k, r) lives at dst[((c / S) * K + k) * R * S + r * S + c % S], so the GEMM
  // reads each strip's weights [K][R][S] contiguously (sequential streaming, no 4*npad-byte stride).
  // Blocked per (strip, 16 rows): the source is read along its contiguous (ci, k) runs and the K x 16 x S
  // destination block stays in L1 (a column walk of torch's layout would stride Cin*K*4 bytes per element,
  // 4 KiB-aliasing the L1 sets).
  constexpr int64_t S = 2 * Simd<T>::L;
  const int64_t strips = npad / S;
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t sb = 0; sb < strips; ++sb) {
    T* ds = dst + sb * K * R * S;
    const int64_t c0 = sb * S, c1 = std::min(C, c0 + S);
    for (int64_t rb = 0; rb < R; rb += TB) {
      const int64_t re = std::min(R, rb + TB);
      if (c1 - c0 < S)  // padding columns of the last strip
        for (int64_t k = 0; k < K; ++k)
          for (int64_t r = rb; r < re; ++r)
            for (int64_t c = std::max(c0, c1); c < c0 + S; ++c) ds[(k * R + r) * S + c - c0] = T(0);
      if (mode == 0) {  // c = co, r = ci: source row co holds (ci, k) contiguously
        for (int64_t c = c0; c < c1; ++c) {
          const T* sr = src + (c * Cin + rb) * K;
          for (int64_t r = rb; r < re; ++r)
            for (int64_t k = 0; k < K; ++k) ds[(k * R + r) * S + c - c0] = sr[(r - rb) * K + k];
        }
      } else {  // c = ci, r = co: source row co holds this strip's (ci, k) contiguously
        for (int64_t r = rb; r < re; ++r) {
          const T* sr = src + (r * Cin + c0) * K;
          for (int64_t c = c0; c < c1; ++c)
            for (int64_t k = 0; k < K; ++k) ds[(k * R + r) * S + c - c0] = sr[(c - c0) * K + k];
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------------
// typed entry points

template <typename T>
void forward_t(uintptr_t x, uintptr_t ain, uintptr_t aout, uintptr_t w, uintptr_t bias, uintptr_t out, const Geom& g,
               bool depthwise, int64_t npad, int nt) {
  const auto* a_in = reinterpret_cast<const uint8_t*>(ain);
  const auto* a_out = reinterpret_cast<const uint8_t*>(aout);
  if (depthwise)
    depthwise_rows<T>(reinterpret_cast<const T*>(x), a_in, a_out, reinterpret_cast<const T*>(w),
                      reinterpret_cast<const T*>(bias), reinterpret_cast<T*>(out), g, false, nt);
  else
    dense_gather_gemm<T>(reinterpret_cast<const T*>(x), a_in, a_out, reinterpret_cast<const T*>(w),
                         reinterpret_cast<const T*>(bias), reinterpret_cast<T*>(out), g, npad, false, nt);
}

template <typename T>
void backward_input_t(uintptr_t gr, uintptr_t ain, uintptr_t aout, uintptr_t w, uintptr_t dx, const Geom& g,
                      bool depthwise, int64_t npad, int nt) {
  const auto* a_in = reinterpret_cast<const uint8_t*>(ain);
  const auto* a_out = reinterpret_cast<const uint8_t*>(aout);
  if (depthwise)
    depthwise_rows<T>(reinterpret_cast<const T*>(gr), a_in, a_out, reinterpret_cast<const T*>(w), nullptr,
                      reinterpret_cast<T*>(dx), g, true, nt);
  else
    dense_gather_gemm<T>(reinterpret_cast<const T*>(gr), a_in, a_out, reinterpret_cast<const T*>(w), nullptr,
                         reinterpret_cast<T*>(dx), g, npad, true, nt);
}

template <typename T>
void backward_weight_t(uintptr_t x, uintptr_t gr, uintptr_t ain, uintptr_t aout, uintptr_t dw, uintptr_t dbias,
                       const Geom& g, bool depthwise, int64_t npad, int nt) {
  const auto* a_in = reinterpret_cast<const uint8_t*>(ain);
  const auto* a_out = reinterpret_cast<const uint8_t*>(aout);
  if (depthwise)
    depthwise_wgrad<T>(reinterpret_cast<const T*>(x), reinterpret_cast<const T*>(gr), a_in, a_out,
                       reinterpret_cast<T*>(dw), reinterpret_cast<T*>(dbias), g, nt);
  else
    dense_wgrad<T>(reinterpret_cast<const T*>(x), reinterpret_cast<const T*>(gr), a_in, a_out,
                   reinterpret_cast<T*>(dw), reinterpret_cast<T*>(dbias), g, npad, nt);
}

void check_npad(const Geom& g, bool depthwise, int64_t npad, int64_t need, bool is_double) {
  if (depthwise) return;
  const int64_t step = is_double ? 8 : 16;
  if (npad < need || npad % step)
    throw std::invalid_argument("sparse_conv2d: packed weight row length must be >= channels and a multiple of " +
                                std::to_string(step));
  (void)g;
}

// dst[r] = act[r] ? src[rank(r)] : 0 for every row r < nrows (rank(r) = active rows before r): the rows of the
// active sites, in ascending site order, scattered into a full buffer in one pass (each dst byte written once;
// a zero fill followed by an index copy writes the active rows twice).
template <typename T>
void scatter_rows_t(const T* src, const uint8_t* act, int64_t nrows, int64_t C, T* dst, int nthreads) {
  std::vector<int64_t> rank(static_cast<size_t>(nrows));
  int64_t r = 0;
  for (int64_t i = 0; i < nrows; ++i) {
    rank[static_cast<size_t>(i)] = r;
    r += act[i] != 0;
  }
  const size_t bytes = static_cast<size_t>(C) * sizeof(T);
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t i = 0; i < nrows; ++i) {
    if (act[i])
      std::memcpy(dst + i * C, src + rank[static_cast<size_t>(i)] * C, bytes);
    else
      std::memset(dst + i * C, 0, bytes);
  }
}

}  // namespace

void register_sparse_conv(py::module_& m) {
  m.def(
      "sparse_conv2d_scatter_rows",
      [](uintptr_t src, uintptr_t act, int64_t nrows, int64_t C, uintptr_t dst, bool is_double, int nthreads) {
        if (nrows < 0 || C < 0) throw std::invalid_argument("sparse_conv2d_scatter_rows: negative size");
        py::gil_scoped_release release;
        const auto* a = reinterpret_cast<const uint8_t*>(act);
        if (is_double)
          scatter_rows_t<double>(reinterpret_cast<const double*>(src), a, nrows, C, reinterpret_cast<double*>(dst),
                                 nthreads);
        else
          scatter_rows_t<float>(reinterpret_cast<const float*>(src), a, nrows, C, reinterpret_cast<float*>(dst),
                                nthreads);
      },
      "dst [nrows, C] = the active rows' src rows (src [count(act), C], ascending order), zeros elsewhere.");
  m.def(
      "sparse_conv2d_pack",
      [](uintptr_t src, uintptr_t dst, int64_t cout, int64_t cin, int64_t k, int64_t npad, int mode, bool is_double,
         int nthreads) {
        if (mode < 0 || mode > 2) throw std::invalid_argument("sparse_conv2d_pack: mode must be 0, 1 or 2");
        if ((mode == 0 && npad < cout) || (mode == 1 && npad < cin) || (mode == 2 && npad < cout))
          throw std::invalid_argument("sparse_conv2d_pack: npad is smaller than the packed channel count");
        py::gil_scoped_release release;
        if (is_double)
          pack_t<double>(reinterpret_cast<const double*>(src), reinterpret_cast<double*>(dst), cout, cin, k, npad,
                         mode, nthreads);
        else
          pack_t<float>(reinterpret_cast<const float*>(src), reinterpret_cast<float*>(dst), cout, cin, k, npad, mode,
                        nthreads);
      },
      "Weight layout changes for the sparse conv: 0: [Cout,Cin,K] -> [npad/S,K,Cin,S]; 1: -> [npad/S,K,Cout,S] "
      "(S = 16 floats / 8 doubles); "
      "2: [K,Cin,npad] -> [Cout,Cin,K] (contiguous buffers).");
  m.def(
      "sparse_conv2d_set_isa",
      [](const std::string& isa) {
        if (isa != "auto" && isa != "avx2" && isa != "base")
          throw std::invalid_argument("sparse_conv2d_set_isa: expected 'auto', 'avx2' or 'base', got '" + isa + "'");
        isa_cap = isa == "auto" ? 2 : (isa == "avx2" ? 1 : 0);
        const int level = isa_level();
        return std::string(level == 2 ? "avx512" : (level == 1 ? "avx2" : "base"));
      },
      "Select the sparse-conv CPU kernels: 'auto' (the widest the CPU has: AVX-512, else AVX2+FMA), 'avx2' (at "
      "most AVX2) or 'base'; returns the ISA used.");
  m.def(
      "sparse_conv2d_forward",
      [](uintptr_t x, uintptr_t ain, uintptr_t aout, uintptr_t w, uintptr_t bias, uintptr_t out,
         const std::vector<int64_t>& geom, bool depthwise, int64_t npad, bool is_double, int nthreads) {
        const Geom g = make_geom(geom);
        check_npad(g, depthwise, npad, g.Cout, is_double);
        py::gil_scoped_release release;
        if (is_double)
          forward_t<double>(x, ain, aout, w, bias, out, g, depthwise, npad, nthreads);
        else
          forward_t<float>(x, ain, aout, w, bias, out, g, depthwise, npad, nthreads);
      },
      "Sparse conv forward, NHWC. x [B,H,W,Cin], ain uint8 [B,H,W], aout uint8 [B,Ho,Wo], out [B,Ho,Wo,Cout]; "
      "w packed [KH*KW, Cin, npad] (groups=1, bias padded to npad or 0) or [KH*KW, C] (depthwise). "
      "geom = [B,H,W,Cin,Ho,Wo,Cout,KH,KW,sh,sw,ph,pw,dh,dw].");
  m.def(
      "sparse_conv2d_backward_input",
      [](uintptr_t g_out, uintptr_t ain, uintptr_t aout, uintptr_t w, uintptr_t dx, const std::vector<int64_t>& geom,
         bool depthwise, int64_t npad, bool is_double, int nthreads) {
        const Geom g = make_geom(geom);
        check_npad(g, depthwise, npad, g.Cin, is_double);
        py::gil_scoped_release release;
        if (is_double)
          backward_input_t<double>(g_out, ain, aout, w, dx, g, depthwise, npad, nthreads);
        else
          backward_input_t<float>(g_out, ain, aout, w, dx, g, depthwise, npad, nthreads);
      },
      "dx [B,H,W,Cin] from grad_out [B,Ho,Wo,Cout]; w packed [KH*KW, Cout, npad] (groups=1) or [KH*KW, C].");
  m.def(
      "sparse_conv2d_backward_weight",
      [](uintptr_t x, uintptr_t g_out, uintptr_t ain, uintptr_t aout, uintptr_t dw, uintptr_t dbias,
         const std::vector<int64_t>& geom, bool depthwise, int64_t npad, bool is_double, int nthreads) {
        const Geom g = make_geom(geom);
        check_npad(g, depthwise, npad, g.Cin * g.K(), is_double);
        py::gil_scoped_release release;
        if (is_double)
          backward_weight_t<double>(x, g_out, ain, aout, dw, dbias, g, depthwise, npad, nthreads);
        else
          backward_weight_t<float>(x, g_out, ain, aout, dw, dbias, g, depthwise, npad, nthreads);
      },
      "dW [Cout, npad] (groups=1: row co = torch's dW[co] flattened over (ci, kh, kw), npad >= Cin*KH*KW) or "
      "[KH*KW, C] (depthwise), and dbias [Cout] (0 = skip).");
}
