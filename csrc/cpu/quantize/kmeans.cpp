// One Lloyd iteration of 1-D k-means over block-normalised values, for fit_codebook:
// per-thread partial sums, merged at the end.
#include <algorithm>
#include <cmath>
#include <mutex>
#include <vector>

#include "cpu/quantize/kernels.h"
#include "cpu/common/thread_pool.h"
#include "qengine/ops.h"
#include "qengine/status.h"

namespace qengine {

int kmeans_accumulate_cpu(const void* x, int dtype, int64_t n, int64_t blocksize, const Codebook& cb, int rule,
                          double* sums, double* weights, double* sse) {
  if (n < 0 || blocksize < 1 || (cb.bits != 4 && cb.bits != 8) || !cb.identity_order) return kInvalidArgument;
  const cpu::QuantizeKernels& k = cpu::quantize_kernels();
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  const int esz = dtype_size(dtype);
  const int ncodes = 1 << cb.bits;
  std::mutex merge;
  int status = kOk;
  cpu::parallel_for(0, nblocks, (16384 + blocksize - 1) / blocksize, 1, [&](int64_t b0, int64_t b1) {
    std::vector<double> s(ncodes, 0.0);
    std::vector<double> c(ncodes, 0.0);
    double err = 0.0;
    uint8_t codes[1024];
    bool bad = false;
    for (int64_t b = b0; b < b1 && !bad; ++b) {
      const int64_t start = b * blocksize;
      const int64_t len = std::min(blocksize, n - start);
      const char* src = static_cast<const char*>(x) + start * esz;
      BlockStats st;
      k.block_stats(src, dtype, len, &st);
      BlockNorm norm = make_block_norm(st, rule, len < blocksize);
      if (st.nonfinite || !std::isfinite(norm.scale)) {
        bad = true;
        break;
      }
      for (int64_t off = 0; off < len; off += 1024) {
        const int64_t m = std::min<int64_t>(1024, len - off);
        k.encode(src + off * esz, dtype, m, norm, rule, cb, codes);
        // The error of a weight is scale^2 times the error of its normalised value.
        const double w = static_cast<double>(norm.scale) * norm.scale;
        for (int64_t i = 0; i < m; ++i) {
          float v = normalise(load_as_float(src, dtype, off + i), norm, rule);
          double d = static_cast<double>(v) - cb.table[codes[i]];
          s[codes[i]] += w * v;
          c[codes[i]] += w;
          err += w * d * d;
        }
      }
    }
    std::lock_guard<std::mutex> lock(merge);
    if (bad) status = kNonFiniteInput;
    for (int q = 0; q < ncodes; ++q) {
      sums[q] += s[q];
      weights[q] += c[q];
    }
    *sse += err;
  });
  return status;
}

}  // namespace qengine
