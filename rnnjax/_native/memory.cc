// Working memory: the kernels' working arrays (Work, rnn_cpu.h says how they are kept), the
// switches they read from the environment at every call (EnvOn), and the output arrays they are
// the first to write: advised into huge pages (HugePages), picked by what a pass saves
// (OwnOutputs).

#include <strings.h>
#include <sys/mman.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "rnn_cpu.h"

namespace rnnjax {

Work::Work(int slot, size_t n) {
  n += kAlignFloats;  // room to start on a 64-byte boundary
  if (n * sizeof(float) <= kKeepBytes) {
    thread_local std::unique_ptr<float[]> kept[kSlots];
    thread_local size_t kept_size[kSlots] = {};
    if (kept_size[slot] < n) {
      kept[slot].reset(new float[n]);
      kept_size[slot] = n;
    }
    data_ = Aligned(kept[slot].get());
  } else {
    own_.reset(new float[n]);
    data_ = Aligned(own_.get());
  }
}

bool EnvOn(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr) return true;
  while (*v == ' ') ++v;
  for (const char* off : {"0", "false", "no", "off"}) {
    const size_t n = std::strlen(off);
    if (strncasecmp(v, off, n) == 0 && (v[n] == '\0' || v[n] == ' ')) return false;
  }
  return true;
}

// Asks the kernel to back the 2 MiB-aligned interior of an output array with huge pages, before
// anything touches it. XLA maps a program's temporaries afresh for every run, so each call
// faults in its outputs and oneDNN's workspace page by page (4 KiB each).
//
// Only for arrays of 32 MiB or more: with every output advised, an LSTM forward+backward at
// 32x128x64x256 (arrays of 4-25 MiB) ran 5-17 of 60 calls at twice the time, the slow ones with
// 20-41 ms of system time against 0-8 ms at the same fault count (this VM, `/tmp` loops of 60
// calls); advising only arrays of 32 MiB or more left 0-2 slow calls and kept most of the gain
// at 64x64x128x512 (in-process A/B, median of 15: LSTM 126.6 ms all advised, 133.5 from
// 32 MiB, 147.6 none; GRU 106.3, 109.1, 119.0).
constexpr size_t kHugePagesMinBytes = size_t{32} << 20;

void HugePages(void* data, size_t bytes) {
  const bool on = bytes >= kHugePagesMinBytes && EnvOn("RNNJAX_HUGEPAGES");
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const auto begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const auto end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (on && end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
}

ffi::Error OwnOutputs(bool save, int64_t checkpoint, int64_t B, int64_t T, int64_t width,
                      ffi::ResultBuffer<ffi::F32>& ys, ffi::ResultBuffer<ffi::F32>& h_prev,
                      ffi::ResultBuffer<ffi::F32>& res, StepOutputs* o) {
  const bool checkpointed = save && checkpoint > 0;
  if (checkpointed) {
    if (auto err = CheckCheckpoints(res->dimensions(), B, T, checkpoint, width); err.failure()) {
      return err;
    }
  }
  HugePages(ys->typed_data(), ys->size_bytes());
  HugePages(h_prev->typed_data(), h_prev->size_bytes());
  HugePages(res->typed_data(), res->size_bytes());
  const bool every_step = save && !checkpointed;
  *o = {checkpointed ? nullptr : ys->typed_data(), every_step ? h_prev->typed_data() : nullptr,
        every_step ? res->typed_data() : nullptr, checkpointed ? res->typed_data() : nullptr};
  return ffi::Error::Success();
}

}  // namespace rnnjax
