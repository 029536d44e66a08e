// oneDNN's engine, stream and executions, for the files that call oneDNN (matmul.cc,
// onednn_rnn.cc) in builds with it (RNNJAX_WITH_DNNL). Every oneDNN call runs on one thread
// (OnDnnlThread, rnn_cpu.h; onednn.cc says why).

#ifndef RNNJAX_NATIVE_ONEDNN_H_
#define RNNJAX_NATIVE_ONEDNN_H_

#include <cstddef>
#include <unordered_map>

#include "oneapi/dnnl/dnnl.hpp"
#include "rnn_cpu.h"

namespace rnnjax {

using dnnl::memory;
using Tag = memory::format_tag;
constexpr auto kF32 = memory::data_type::f32;

dnnl::engine& Engine();

// A reorder (layout conversion) between two descriptors.
dnnl::reorder Reorder(const memory::desc& from, const memory::desc& to);

// One of our arrays as oneDNN memory of descriptor md, and the floats md takes.
inline memory Wrap(const memory::desc& md, const void* data) {
  return memory(md, Engine(), const_cast<void*>(data));
}

inline size_t Floats(const memory::desc& md) {
  return (md.get_size() + sizeof(float) - 1) / sizeof(float);
}

// Executions on the oneDNN thread's stream. Packed weights, the scratchpad and the GRU's
// permuted copies live in its Work buffers (slots 4-12).
dnnl::stream& Stream();
void Run(const dnnl::primitive& prim, const std::unordered_map<int, memory>& args);
void Convert(const dnnl::reorder& r, memory from, memory to);

}  // namespace rnnjax

#endif  // RNNJAX_NATIVE_ONEDNN_H_
