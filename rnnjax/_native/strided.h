// The operands of the elementwise recurrences (linear.cc, minrnn.cc) as ffi_call's
// "expand_dims" vmap rule passes them: batch-first (batch..., [T,] width) arrays whose batch
// dimensions are each the output's or 1, a dimension of 1 read again for every batch row
// (stride 0), so an unbatched operand under vmap is never broadcast in memory.

#ifndef RNNJAX_NATIVE_STRIDED_H_
#define RNNJAX_NATIVE_STRIDED_H_

#include <cstdint>
#include <string>
#include <vector>

#include "rnn_cpu.h"

namespace rnnjax {

// The shape of a call: batch dimensions, B rows in all, T steps of N floats (2 per complex).
struct Shape {
  std::vector<int64_t> batch;
  int64_t B = 1, T = 0, N = 0;
};

// Where each batch row of an operand starts, in elements (floats, or bytes for flags).
struct Strided {
  const void* data = nullptr;
  std::vector<int64_t> stride;  // elements per batch index, per output batch dimension (0: bcast)
  int64_t offset(const std::vector<int64_t>& batch, int64_t flat) const {
    int64_t at = 0;
    for (int64_t d = static_cast<int64_t>(batch.size()) - 1; d >= 0; --d) {
      at += (flat % batch[d]) * stride[d];
      flat /= batch[d];
    }
    return at;
  }
};

// A float operand (batch..., [T,] width).
struct Operand : Strided {
  const float* row(const std::vector<int64_t>& batch, int64_t flat) const {
    return static_cast<const float*>(data) + offset(batch, flat);
  }
};

// Per-step flags (batch..., T) of bool.
struct Flags : Strided {
  const uint8_t* row(const std::vector<int64_t>& batch, int64_t flat) const {
    return static_cast<const uint8_t*>(data) + offset(batch, flat);
  }
};

// Binds x, which must be (batch..., tail...) with each batch dimension the shape's or 1, to op;
// an empty string, else what is wrong (naming `name`). `scale` multiplies the last dimension
// into floats (2 for complex64); tail's last entry is in floats.
inline std::string BindStrided(const ffi::AnyBuffer& x, const std::vector<int64_t>& batch,
                               const std::vector<int64_t>& tail, int64_t scale,
                               const std::string& name, Strided* op) {
  auto d = x.dimensions();
  if (d.size() != batch.size() + tail.size()) return name + " has the wrong number of dimensions";
  int64_t row = 1;
  for (size_t i = 0; i < tail.size(); ++i) {
    const int64_t got = d[batch.size() + i] * (i + 1 == tail.size() ? scale : 1);
    if (got != tail[i]) return name + " does not match the output's shape";
    row *= tail[i];
  }
  op->data = x.untyped_data();
  op->stride.assign(batch.size(), 0);
  int64_t step = row;
  for (int64_t k = static_cast<int64_t>(batch.size()) - 1; k >= 0; --k) {
    if (d[k] != batch[k] && d[k] != 1) {
      return name + "'s batch dimensions are neither the output's nor 1";
    }
    op->stride[k] = d[k] == 1 ? 0 : step;
    step *= d[k];
  }
  return "";
}

// An output array, first advised into huge pages (memory.cc).
inline float* Out(ffi::Result<ffi::AnyBuffer>& x) {
  HugePages(x->untyped_data(), x->size_bytes());
  return static_cast<float*>(x->untyped_data());
}

}  // namespace rnnjax

#endif  // RNNJAX_NATIVE_STRIDED_H_
