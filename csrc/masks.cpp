// Batched, seeded, multi-threaded mask generators for masked image modeling.
//
// All generators write uint8 0/1 (1 = masked) into caller-allocated row-major buffers through raw
// pointers; the Python wrappers in kernels/masking/ validate arguments and own the tensors.
// Sample b uses its own RNG stream Rng(seed, b), so output is independent of the thread count.
//
// No exception may leave an OpenMP region (that calls std::terminate and aborts the interpreter): every
// per-thread buffer is allocated before the region, the loop bodies are wrapped in a catch that records
// the first exception, and it is rethrown after the region, where pybind11 turns it into a Python error.
// The entry points also check their own arguments (std::invalid_argument -> ValueError).
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <exception>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

#include "registry.h"
#include "rng.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;
using kernels::Rng;

namespace {

int thread_index() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Remembers the first exception thrown inside an OpenMP region so it can be rethrown outside it.
class RegionErrors {
 public:
  template <typename F>
  void run(F&& body) noexcept {
    if (failed_.load(std::memory_order_relaxed)) return;  // skip the remaining samples after a failure
    try {
      body();
    } catch (...) {
#pragma omp critical(kernels_masks_error)
      {
        if (!error_) error_ = std::current_exception();
      }
      failed_.store(true, std::memory_order_relaxed);
    }
  }
  void rethrow() const {
    if (error_) std::rethrow_exception(error_);
  }

 private:
  std::exception_ptr error_;
  std::atomic<bool> failed_{false};
};

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(what);
}

// batch * n cells, checked for int64 overflow.
int64_t checked_cells(int64_t batch, int64_t n, const char* what) {
  require(batch >= 0 && n >= 0, std::string(what) + ": batch and the number of cells must be >= 0");
  require(n == 0 || batch <= std::numeric_limits<int64_t>::max() / n,
          std::string(what) + ": batch * cells overflows int64");
  return batch * n;
}

int clamp_threads(int num_threads, int64_t batch) {
  const int64_t t = std::max<int64_t>(1, std::min<int64_t>(num_threads, std::max<int64_t>(batch, 1)));
  return static_cast<int>(t);
}

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
  require(h >= 1 && w >= 1, "blockwise_masks: h and w must be >= 1");
  require(w <= std::numeric_limits<int64_t>::max() / h, "blockwise_masks: h * w overflows int64");
  const int64_t n = h * w;
  checked_cells(batch, n, "blockwise_masks");
  require(num_masked >= 0 && num_masked <= n, "blockwise_masks: num_masked must be in [0, h * w]");
  require(min_block >= 1 && max_block >= 0, "blockwise_masks: min_block must be >= 1 and max_block >= 0");
  require(min_aspect > 0.0 && min_aspect <= 1.0, "blockwise_masks: min_aspect must be in (0, 1]");
  auto* out = reinterpret_cast<uint8_t*>(out_ptr);
  const double lo = std::log(min_aspect), hi = std::log(1.0 / min_aspect);
  num_threads = clamp_threads(num_threads, batch);
  // Scratch of the top-up, one per thread, allocated here: a bad_alloc inside the region would abort.
  std::vector<std::vector<int64_t>> scratch(num_threads);
  for (auto& v : scratch) v.reserve(static_cast<size_t>(n));
  RegionErrors errors;
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<int64_t>& free_cells = scratch[thread_index()];
#pragma omp for schedule(static)
    for (int64_t b = 0; b < batch; ++b) {
      errors.run([&] {
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
        if (count < num_masked) top_up(mask, n, num_masked - count, rng, free_cells);
      });
    }
  }
  errors.rethrow();
}

// Exactly k of n cells masked per sample, uniformly at random.
void choose_k(uintptr_t out_ptr, int64_t batch, int64_t n, int64_t k, uint64_t seed, int num_threads) {
  checked_cells(batch, n, "choose_k_masks");
  require(k >= 0 && k <= n, "choose_k_masks: k must be in [0, n]");
  auto* out = reinterpret_cast<uint8_t*>(out_ptr);
  num_threads = clamp_threads(num_threads, batch);
  std::vector<std::vector<int64_t>> scratch(num_threads);  // allocated outside the region (see top of file)
  for (auto& v : scratch) v.reserve(static_cast<size_t>(n));
  RegionErrors errors;
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<int64_t>& free_cells = scratch[thread_index()];
#pragma omp for schedule(static)
    for (int64_t b = 0; b < batch; ++b) {
      errors.run([&] {
        Rng rng(seed, static_cast<uint64_t>(b));
        uint8_t* mask = out + b * n;
        std::fill(mask, mask + n, 0);
        top_up(mask, n, k, rng, free_cells);
      });
    }
  }
  errors.rethrow();
}

// MAE-style per-row shuffle: ids_shuffle is a uniform permutation of [0, n); the first `keep` entries
// are kept. Writes ids_keep [batch, keep], ids_restore [batch, n] (inverse permutation) and the mask
// [batch, n] (1 = dropped), all in the original token order for the mask.
void shuffle_rows(uintptr_t keep_ptr, uintptr_t restore_ptr, uintptr_t mask_ptr, int64_t batch, int64_t n, int64_t keep,
                  uint64_t seed, int num_threads) {
  auto* ids_keep = reinterpret_cast<int64_t*>(keep_ptr);
  auto* ids_restore = reinterpret_cast<int64_t*>(restore_ptr);
  auto* mask = reinterpret_cast<uint8_t*>(mask_ptr);
  checked_cells(batch, n, "shuffle_masks");
  require(keep >= 0 && keep <= n, "shuffle_masks: n_keep must be in [0, n]");
  num_threads = clamp_threads(num_threads, batch);
  std::vector<std::vector<int64_t>> perms(num_threads);  // allocated outside the region (see top of file)
  for (auto& v : perms) v.resize(static_cast<size_t>(n));
  RegionErrors errors;
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<int64_t>& perm = perms[thread_index()];
#pragma omp for schedule(static)
    for (int64_t b = 0; b < batch; ++b) {
      errors.run([&] {
        Rng rng(seed, static_cast<uint64_t>(b));
        std::iota(perm.begin(), perm.end(), 0);
        for (int64_t j = n - 1; j > 0; --j) std::swap(perm[j], perm[rng.below(static_cast<uint64_t>(j + 1))]);
        for (int64_t j = 0; j < n; ++j) {
          ids_restore[b * n + perm[j]] = j;
          mask[b * n + perm[j]] = j >= keep ? 1 : 0;
        }
        std::copy(perm.begin(), perm.begin() + keep, ids_keep + b * keep);
      });
    }
  }
  errors.rethrow();
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
