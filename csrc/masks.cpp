// Batched, seeded, multi-threaded mask generators for masked image modeling.
//
// All generators write uint8 0/1 (1 = masked) into caller-allocated row-major buffers through raw
// pointers; the Python wrappers in kernels/masking/ validate arguments and own the tensors.
// Sample b uses its own RNG stream Rng(seed, b), so output is independent of the thread count.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "registry.h"
#include "rng.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;
using kernels::Rng;

namespace {

// One block placement round of BEiT's generator: up to 10 tries of a block with area uniform in
// [min_block, max_patches] and log-uniform aspect ratio; a try is accepted only if it adds between 1 and
// max_patches new patches. Returns the number of patches added (0 if every try failed).
int64_t place_block(uint8_t* mask, int64_t h, int64_t w, int64_t min_block, int64_t max_patches, double log_ar_lo,
                    double log_ar_hi, Rng& rng) {
  for (int attempt = 0; attempt < 10; ++attempt) {
    const double area = rng.uniform(static_cast<double>(min_block), static_cast<double>(max_patches));
    const double ar = std::exp(rng.uniform(log_ar_lo, log_ar_hi));
    const int64_t bh = static_cast<int64_t>(std::llround(std::sqrt(area * ar)));
    const int64_t bw = static_cast<int64_t>(std::llround(std::sqrt(area / ar)));
    if (bh < 1 || bw < 1 || bh >= h || bw >= w) continue;
    const int64_t top = static_cast<int64_t>(rng.below(static_cast<uint64_t>(h - bh + 1)));
    const int64_t left = static_cast<int64_t>(rng.below(static_cast<uint64_t>(w - bw + 1)));
    int64_t already = 0;
    for (int64_t i = top; i < top + bh; ++i)
      for (int64_t j = left; j < left + bw; ++j) already += mask[i * w + j];
    const int64_t fresh = bh * bw - already;
    if (fresh > 0 && fresh <= max_patches) {
      for (int64_t i = top; i < top + bh; ++i)
        for (int64_t j = left; j < left + bw; ++j) mask[i * w + j] = 1;
      return fresh;
    }
  }
  return 0;
}

// Mark exactly k of the n cells as masked, chosen uniformly among the unmasked ones (partial Fisher-Yates).
void top_up(uint8_t* mask, int64_t n, int64_t k, Rng& rng, std::vector<int64_t>& free_cells) {
  free_cells.clear();
  for (int64_t i = 0; i < n; ++i)
    if (!mask[i]) free_cells.push_back(i);
  const int64_t m = static_cast<int64_t>(free_cells.size());
  for (int64_t j = 0; j < k && j < m; ++j) {
    const int64_t r = j + static_cast<int64_t>(rng.below(static_cast<uint64_t>(m - j)));
    std::swap(free_cells[j], free_cells[r]);
    mask[free_cells[j]] = 1;
  }
}

void blockwise(uintptr_t out_ptr, int64_t batch, int64_t h, int64_t w, int64_t num_masked, int64_t min_block,
               int64_t max_block, double min_aspect, uint64_t seed, int num_threads) {
  auto* out = reinterpret_cast<uint8_t*>(out_ptr);
  const double lo = std::log(min_aspect), hi = std::log(1.0 / min_aspect);
  const int64_t n = h * w;
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<int64_t> scratch;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < batch; ++b) {
      Rng rng(seed, static_cast<uint64_t>(b));
      uint8_t* mask = out + b * n;
      std::fill(mask, mask + n, 0);
      int64_t count = 0;
      while (count < num_masked) {
        const int64_t budget = std::min(num_masked - count, max_block);
        const int64_t delta = place_block(mask, h, w, min_block, budget, lo, hi, rng);
        if (delta == 0) break;
        count += delta;
      }
      if (count < num_masked) top_up(mask, n, num_masked - count, rng, scratch);
    }
  }
}

// Exactly k of n cells masked per sample, uniformly at random.
void choose_k(uintptr_t out_ptr, int64_t batch, int64_t n, int64_t k, uint64_t seed, int num_threads) {
  auto* out = reinterpret_cast<uint8_t*>(out_ptr);
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<int64_t> scratch;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < batch; ++b) {
      Rng rng(seed, static_cast<uint64_t>(b));
      uint8_t* mask = out + b * n;
      std::fill(mask, mask + n, 0);
      top_up(mask, n, k, rng, scratch);
    }
  }
}

// MAE-style per-row shuffle: ids_shuffle is a uniform permutation of [0, n); the first `keep` entries
// are kept. Writes ids_keep [batch, keep], ids_restore [batch, n] (inverse permutation) and the mask
// [batch, n] (1 = dropped), all in the original token order for the mask.
void shuffle_rows(uintptr_t keep_ptr, uintptr_t restore_ptr, uintptr_t mask_ptr, int64_t batch, int64_t n, int64_t keep,
                  uint64_t seed, int num_threads) {
  auto* ids_keep = reinterpret_cast<int64_t*>(keep_ptr);
  auto* ids_restore = reinterpret_cast<int64_t*>(restore_ptr);
  auto* mask = reinterpret_cast<uint8_t*>(mask_ptr);
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<int64_t> perm(n);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < batch; ++b) {
      Rng rng(seed, static_cast<uint64_t>(b));
      std::iota(perm.begin(), perm.end(), 0);
      for (int64_t j = n - 1; j > 0; --j) std::swap(perm[j], perm[rng.below(static_cast<uint64_t>(j + 1))]);
      for (int64_t j = 0; j < n; ++j) {
        ids_restore[b * n + perm[j]] = j;
        mask[b * n + perm[j]] = j >= keep ? 1 : 0;
      }
      std::copy(perm.begin(), perm.begin() + keep, ids_keep + b * keep);
    }
  }
}

}  // namespace

void register_masks(py::module_& m) {
  m.def(
      "blockwise_masks",
      [](uintptr_t out, int64_t batch, int64_t h, int64_t w, int64_t num_masked, int64_t min_block, int64_t max_block,
         double min_aspect, uint64_t seed, int num_threads) {
        py::gil_scoped_release release;
        blockwise(out, batch, h, w, num_masked, min_block, max_block, min_aspect, seed, num_threads);
      },
      "BEiT blockwise masks into a uint8 [batch, h, w] buffer (1 = masked), exactly num_masked per sample.");
  m.def(
      "choose_k_masks",
      [](uintptr_t out, int64_t batch, int64_t n, int64_t k, uint64_t seed, int num_threads) {
        py::gil_scoped_release release;
        choose_k(out, batch, n, k, seed, num_threads);
      },
      "Exactly k of n cells set to 1 per sample, uniformly at random, into a uint8 [batch, n] buffer.");
  m.def(
      "shuffle_masks",
      [](uintptr_t keep, uintptr_t restore, uintptr_t mask, int64_t batch, int64_t n, int64_t n_keep, uint64_t seed,
         int num_threads) {
        py::gil_scoped_release release;
        shuffle_rows(keep, restore, mask, batch, n, n_keep, seed, num_threads);
      },
      "MAE random masking: ids_keep int64 [batch, n_keep], ids_restore int64 [batch, n], mask uint8 [batch, n].");
}
