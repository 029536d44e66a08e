// rnnjax's CPU kernels: the recurrent loops of a float32 LSTM and GRU, forward and backward, as
// XLA FFI handlers (rnnjax/_native/__init__.py registers them; rnnjax/cells/_native.py uses them).
//
// Why: XLA's CPU backend runs a scanned LSTM step as ~45 small thunks (BENCHMARKS.md), about a
// third of the time in per-op overhead, and its BPTT accumulates weight gradients step by step.
// Here one call runs a whole direction of the recurrence: per step one or two sgemm calls and
// one fused pass over the gates; the backward pass stores the gate cotangents of all steps and
// computes the weight gradients after its loop as large matmuls over the B*T rows.
//
// Layout (row-major, batch first, B rows of T steps):
//   x      (B, T, I)   inputs
//   w_i    (I, G H), w_h (H, G H), biases (G H): gates fused, in PyTorch's order
//                      (LSTM: G = 4, i, f, g, o, one bias; GRU: G = 3, r, z, n, b_i and b_h)
//   h0, c0 (B, H)      initial carry
//   mask   (B, T)      true at real steps; at other steps the carry is kept and y_t = 0
// Residuals saved by the forward pass for the backward pass:
//   h_prev (B, T, H)   h entering each step (for dW_h = sum h_prev^T dz)
//   res    LSTM (B, T, 6H): i, f, g, o (activated), c entering the step, tanh(c leaving it)
//          GRU  (B, T, 4H): r, z, n, h W_hn + b_hn
// (without the `save` attribute, for inference, h_prev and res are empty and not written;
// with `checkpoint` k > 0, res holds the carry entering every k-th step instead, and the
// backward pass recomputes the rest segment by segment: see "Checkpointed passes" below).
//
// Matrix products go to a cblas_sgemm whose address Python passes in (OpenBLAS from the
// scipy-openblas32 wheel). Built with RNNJAX_WITH_DNNL (setup.py, where oneDNN's wheel is
// installed), the library also links oneDNN: its matmul then does the own loops' products for
// steps of 4096 units or more (DnnlMatmul, StepGemm), and its RNN primitives run the "dense"
// mode: the unmasked sequences Python chooses for it (see the oneDNN section below). Compiled
// for a CPU with AVX-512, forward passes (inference, and training's from 4096 units per step)
// run loops that fuse each step's gate arithmetic into its matmul instead (FusedForward, "the
// AVX-512 loops" below).

#include <strings.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

enum { kRowMajor = 101, kNoTrans = 111, kTrans = 112 };
using SgemmFn = void (*)(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                         const float* a, int lda, const float* b, int ldb, float beta, float* c,
                         int ldc);
SgemmFn g_sgemm = nullptr;

// tanh as Eigen's (and so XLA's CPU backend's) float rational approximation: odd degree-13
// over even degree-6 polynomial on [-7.9053, 7.9053] (a few ulp), x itself near 0. Plain
// arithmetic, so the gate loops vectorize without -ffast-math (libm's tanhf/expf vectorize
// only with it; BENCHMARKS.md has the timings).
// Its constants, shared with the AVX-512 loops' TanhV: the clamp, |x| below which tanh(x) = x,
// and the coefficients of p (in y^2, highest first; p is then multiplied by y) and of q.
constexpr float kTanhClamp = 7.90531110763549805f, kTanhTiny = 0.0004f;
constexpr float kTanhP[7] = {-2.76076847742355e-16f, 2.00018790482477e-13f,
                             -8.60467152213735e-11f, 5.12229709037114e-08f,
                             1.48572235717979e-05f,  6.37261928875436e-04f,
                             4.89352455891786e-03f};
constexpr float kTanhQ[4] = {1.19825839466702e-06f, 1.18534705686654e-04f,
                             2.26843463243900e-03f, 4.89352518554385e-03f};

inline float Tanh(float x) {
  const float c = kTanhClamp;
  const float y = x < -c ? -c : (x > c ? c : x);
  const float y2 = y * y;
  float p = y2 * kTanhP[0] + kTanhP[1];
  for (int i = 2; i < 7; ++i) p = p * y2 + kTanhP[i];
  p = p * y;
  float q = y2 * kTanhQ[0] + kTanhQ[1];
  for (int i = 2; i < 4; ++i) q = q * y2 + kTanhQ[i];
  const float t = p / q;
  return (y < kTanhTiny && y > -kTanhTiny) ? y : t;
}

inline float Sigmoid(float x) { return 0.5f + 0.5f * Tanh(0.5f * x); }

// One step's gates for one row: z (4H pre-activations) and c (H, entering the step) give
// r = [i, f, g, o, c, tanh(f c + i g)].
void Cell(const float* __restrict__ z, const float* __restrict__ c, float* __restrict__ r,
          int64_t H) {
  float* __restrict__ ri = r;
  float* __restrict__ rf = r + H;
  float* __restrict__ rg = r + 2 * H;
  float* __restrict__ ro = r + 3 * H;
  float* __restrict__ rc = r + 4 * H;
  float* __restrict__ rt = r + 5 * H;
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) {
    const float i = Sigmoid(z[j]);
    const float f = Sigmoid(z[H + j]);
    const float g = Tanh(z[2 * H + j]);
    const float o = Sigmoid(z[3 * H + j]);
    ri[j] = i;
    rf[j] = f;
    rg[j] = g;
    ro[j] = o;
    rc[j] = c[j];
    rt[j] = Tanh(f * c[j] + i * g);
  }
}

// One row's LSTM step from its pre-activations z (4H) and cell state c: the gates into r (as
// Cell), and where the step is real the carry (c, h) advances; y, when given, gets the new h
// there and zeros at a padded step (whose carry is kept).
inline void LstmRow(const float* __restrict__ z, float* __restrict__ c, float* __restrict__ h,
                    float* __restrict__ r, float* __restrict__ y, bool real, int64_t H) {
  Cell(z, c, r, H);
  if (real) {
    // r holds c entering the step at 4H and tanh(c leaving it) at 5H.
    for (int64_t j = 0; j < H; ++j) {
      c[j] = r[H + j] * r[4 * H + j] + r[j] * r[2 * H + j];
      h[j] = r[3 * H + j] * r[5 * H + j];
    }
    if (y != nullptr) std::memcpy(y, h, sizeof(float) * H);
  } else if (y != nullptr) {
    std::memset(y, 0, sizeof(float) * H);
  }
}

// A kernel's working array, not initialized. Up to kKeepBytes it is a per-thread buffer kept
// between calls (a fresh large allocation is a fresh mmap, and touching it costs a page fault
// per 4 KiB: measured as ~25% of a forward pass, and oneDNN's LSTM inference scratchpad at
// 64x64x128x512 is 70 MiB); above that it is allocated for the call and freed after it, so a
// large run does not leave gigabytes behind.
class Work {
 public:
  static constexpr size_t kKeepBytes = size_t{256} << 20;
  static constexpr int kSlots = 16;

  Work(int slot, size_t n) {
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
  float* data() const { return data_; }

 private:
  static constexpr size_t kAlignFloats = 16;
  static float* Aligned(float* p) {
    const auto at = reinterpret_cast<uintptr_t>(p);
    return reinterpret_cast<float*>((at + 63) & ~uintptr_t{63});
  }
  std::unique_ptr<float[]> own_;
  float* data_ = nullptr;
};

struct Dims {
  int64_t batch, steps, hidden;
};

// Whether a switch in the environment is on: unset, or anything but 0, false, no, off (as
// rnnjax._native reads them). Read per call, without allocating.
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

// `seq` is a (B, T, width * H) array, `w_h` the (H, gates * H) recurrent weights.
ffi::Error CheckDims(ffi::Span<const int64_t> seq, int64_t width,
                     const ffi::Buffer<ffi::F32>& w_h, Dims* d, int64_t gates = 4) {
  if (g_sgemm == nullptr) {
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                      "rnnjax native kernels: no sgemm was registered (rnnjax._native)");
  }
  auto wd = w_h.dimensions();
  if (seq.size() != 3 || wd.size() != 2 || wd[1] != gates * wd[0] || seq[2] != width * wd[0]) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "rnnjax native kernels: expected (B, T, k H) sequences and w_h (H, G H)");
  }
  d->batch = seq[0];
  d->steps = seq[1];
  d->hidden = wd[0];
  return ffi::Error::Success();
}

ffi::Error NoDnnl() {
  return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                    "rnnjax native kernels: dense mode needs oneDNN, and this build has none");
}

// ---------------------------------------------------------------------------- oneDNN (dense)
// Without masks (every step of every row real), the LSTM and the GRU run oneDNN's RNN
// primitives when the library was built with them (RNNJAX_WITH_DNNL; oneDNN from the
// onednn-cpu-gomp wheel): the input projection of all steps as one matmul, the recurrent matmul
// per step on weights packed once per call, the gates fused into it, on all cores. In that mode
// ("dense") the forward pass saves oneDNN's opaque workspace in `res` instead of h_prev and the
// gates, and the backward pass is oneDNN's. x and ys are (B, T, .), oneDNN's ntc layout.
// Weights: the LSTM's (I, 4H) is oneDNN's ldigo as it is (gates i, f, g, o, as PyTorch's); the
// GRU is oneDNN's linear-before-reset GRU, whose gates run u (our z), r, o (our n), so its
// weights and biases are permuted on the way in and the gradients on the way out, and its
// four biases are b_iz + b_hz, b_ir + b_hr, b_in, b_hn.
#ifdef RNNJAX_WITH_DNNL
}  // namespace
#include <condition_variable>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <tuple>
#include <unordered_map>

#include "oneapi/dnnl/dnnl.hpp"
namespace {

// Every oneDNN call runs on this one thread. oneDNN parallelizes with OpenMP, whose runtime
// keeps a team of worker threads per thread that calls it; XLA calls the kernels from whichever
// of its threads runs the program, so calls from several threads made several teams, more
// threads than cores, and libgomp then stops spinning between parallel regions: every time
// step paid futex wake-ups (an LSTM forward+backward at 16x256x32x64 took 9-115 ms from call to
// call; oneDNN alone 8.4 ms). With one calling thread there is one team.
class DnnlThread {
 public:
  static ffi::Error Run(const std::function<ffi::Error()>& task) {
    static DnnlThread* thread = new DnnlThread();  // never destroyed: it runs until exit
    return thread->Submit(task);
  }

 private:
  DnnlThread() { std::thread([this] { Loop(); }).detach(); }

  ffi::Error Submit(const std::function<ffi::Error()>& task) {
    std::lock_guard<std::mutex> one_at_a_time(submit_);
    std::unique_lock<std::mutex> lock(mutex_);
    task_ = &task;
    done_ = false;
    wake_.notify_one();
    finished_.wait(lock, [this] { return done_; });
    return std::move(result_);
  }

  void Loop() {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [this] { return task_ != nullptr; });
      const std::function<ffi::Error()>* task = task_;
      lock.unlock();
      ffi::Error result = (*task)();
      lock.lock();
      result_ = std::move(result);
      task_ = nullptr;
      done_ = true;
      finished_.notify_all();
    }
  }

  std::mutex submit_, mutex_;
  std::condition_variable wake_, finished_;
  const std::function<ffi::Error()>* task_ = nullptr;
  bool done_ = false;
  ffi::Error result_ = ffi::Error::Success();
};

using dnnl::memory;
using Tag = memory::format_tag;
constexpr auto kF32 = memory::data_type::f32;

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// Descriptors of the arrays in oneDNN's plain layouts (G gates; both cells have four biases).
struct Layout {
  memory::desc x, y, state, w_i, w_h, bias;
  Layout(int64_t B, int64_t T, int64_t I, int64_t H, int64_t G)
      : x({T, B, I}, kF32, Tag::ntc),
        y({T, B, H}, kF32, Tag::ntc),
        state({1, 1, B, H}, kF32, Tag::ldnc),
        w_i({1, 1, I, G, H}, kF32, Tag::ldigo),
        w_h({1, 1, H, G, H}, kF32, Tag::ldigo),
        bias({1, 1, 4, H}, kF32, Tag::ldgo) {}
};

using Direction = dnnl::rnn_direction;

struct LstmCell {
  using Fwd = dnnl::lstm_forward;
  using Bwd = dnnl::lstm_backward;
  static constexpr int64_t kGates = 4;
  static constexpr const char* kName = "LSTM";
  static Fwd::primitive_desc Forward(dnnl::prop_kind prop, Direction dir, const Layout& l,
                                     const memory::desc& w_i, const memory::desc& w_h,
                                     const dnnl::primitive_attr& attr) {
    return {Engine(), prop, dir, l.x, l.state, l.state, w_i, w_h, l.bias,
            l.y, l.state, l.state, attr};
  }
  static Bwd::primitive_desc Backward(Direction dir, const Layout& l, const memory::desc& w_i,
                                      const memory::desc& w_h, const Fwd::primitive_desc& hint,
                                      const dnnl::primitive_attr& attr) {
    return {Engine(), dnnl::prop_kind::backward, dir, l.x, l.state, l.state, w_i, w_h, l.bias,
            l.y, l.state, l.state, l.x, l.state, l.state, w_i, w_h, l.bias, l.y, l.state, l.state,
            hint, attr};
  }
};

struct GruCell {
  using Fwd = dnnl::lbr_gru_forward;
  using Bwd = dnnl::lbr_gru_backward;
  static constexpr int64_t kGates = 3;
  static constexpr const char* kName = "GRU";
  static Fwd::primitive_desc Forward(dnnl::prop_kind prop, Direction dir, const Layout& l,
                                     const memory::desc& w_i, const memory::desc& w_h,
                                     const dnnl::primitive_attr& attr) {
    return {Engine(), prop, dir, l.x, l.state, w_i, w_h, l.bias, l.y, l.state, attr};
  }
  static Bwd::primitive_desc Backward(Direction dir, const Layout& l, const memory::desc& w_i,
                                      const memory::desc& w_h, const Fwd::primitive_desc& hint,
                                      const dnnl::primitive_attr& attr) {
    return {Engine(), dnnl::prop_kind::backward, dir, l.x, l.state, w_i, w_h, l.bias, l.y,
            l.state, l.x, l.state, w_i, w_h, l.bias, l.y, l.state, hint, attr};
  }
};

dnnl::reorder Reorder(const memory::desc& from, const memory::desc& to) {
  return dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), from, Engine(), to));
}

enum PlanKind { kInference = 0, kTraining = 1, kBackward = 2 };

// The primitives for one cell, shape, direction and kind, made once (oneDNN generates their
// code): the forward (inference or training), and for kBackward also the backward, with the
// reorders between our weights and their packed ones.
template <class Cell>
struct Plan {
  Layout layout;
  typename Cell::Fwd::primitive_desc fwd_pd;
  typename Cell::Fwd fwd;
  dnnl::reorder fwd_w_i, fwd_w_h;
  typename Cell::Bwd::primitive_desc bwd_pd;
  typename Cell::Bwd bwd;
  dnnl::reorder bwd_w_i, bwd_w_h, out_dw_i, out_dw_h;

  Plan(int64_t B, int64_t T, int64_t I, int64_t H, bool reverse, PlanKind kind)
      : layout(B, T, I, H, Cell::kGates) {
    const auto dir =
        reverse ? Direction::unidirectional_right2left : Direction::unidirectional_left2right;
    const memory::desc any_i(layout.w_i.get_dims(), kF32, Tag::any);
    const memory::desc any_h(layout.w_h.get_dims(), kF32, Tag::any);
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);  // per-thread buffers: see Run
    const auto prop = kind == kInference ? dnnl::prop_kind::forward_inference
                                         : dnnl::prop_kind::forward_training;
    fwd_pd = Cell::Forward(prop, dir, layout, any_i, any_h, attr);
    fwd = typename Cell::Fwd(fwd_pd);
    fwd_w_i = Reorder(layout.w_i, fwd_pd.weights_layer_desc());
    fwd_w_h = Reorder(layout.w_h, fwd_pd.weights_iter_desc());
    if (kind == kBackward) {
      bwd_pd = Cell::Backward(dir, layout, any_i, any_h, fwd_pd, attr);
      bwd = typename Cell::Bwd(bwd_pd);
      bwd_w_i = Reorder(layout.w_i, bwd_pd.weights_layer_desc());
      bwd_w_h = Reorder(layout.w_h, bwd_pd.weights_iter_desc());
      out_dw_i = Reorder(bwd_pd.diff_weights_layer_desc(), layout.w_i);
      out_dw_h = Reorder(bwd_pd.diff_weights_iter_desc(), layout.w_h);
    }
  }
};

template <class Cell>
Plan<Cell>& GetPlan(int64_t B, int64_t T, int64_t I, int64_t H, bool reverse, PlanKind kind) {
  static std::mutex mutex;
  static std::map<std::tuple<int64_t, int64_t, int64_t, int64_t, bool, int>,
                  std::unique_ptr<Plan<Cell>>>
      plans;
  std::lock_guard<std::mutex> lock(mutex);
  auto& plan = plans[{B, T, I, H, reverse, kind}];
  if (!plan) plan = std::make_unique<Plan<Cell>>(B, T, I, H, reverse, kind);
  return *plan;
}

memory Wrap(const memory::desc& md, const void* data) {
  return memory(md, Engine(), const_cast<void*>(data));
}

size_t Floats(const memory::desc& md) { return (md.get_size() + sizeof(float) - 1) / sizeof(float); }

// Executions on the oneDNN thread's stream. Packed weights, the scratchpad and the GRU's
// permuted copies live in its Work buffers (slots 4-12).
dnnl::stream& Stream() {
  thread_local dnnl::stream stream(Engine());
  return stream;
}

void Run(const dnnl::primitive& prim, const std::unordered_map<int, memory>& args) {
  prim.execute(Stream(), args);
  Stream().wait();
}

void Convert(const dnnl::reorder& r, memory from, memory to) {
  r.execute(Stream(), from, to);
  Stream().wait();
}

// The GRU's gate order: rnnjax's (r, z, n) columns of a (rows, 3H) matrix to oneDNN's (u = z,
// r, o = n), and back.
void GatesToDnnl(const float* ours, int64_t rows, int64_t H, float* theirs) {
  for (int64_t k = 0; k < rows; ++k) {
    const float* from = ours + k * 3 * H;
    float* to = theirs + k * 3 * H;
    std::memcpy(to, from + H, sizeof(float) * H);
    std::memcpy(to + H, from, sizeof(float) * H);
    std::memcpy(to + 2 * H, from + 2 * H, sizeof(float) * H);
  }
}

void GatesFromDnnl(const float* theirs, int64_t rows, int64_t H, float* ours) {
  GatesToDnnl(theirs, rows, H, ours);  // swapping the first two gates is its own inverse
}

// Our weights as the primitive takes them: the arrays themselves for the LSTM, permuted copies
// (Work slots 9, 10, 11) for the GRU, whose two bias vectors become oneDNN's four.
struct DnnlWeights {
  const float* w_i;
  const float* w_h;
  const float* bias;
};

DnnlWeights ToDnnl(const LstmCell&, int64_t, int64_t, const float* w_i, const float* w_h,
                   const float* b, const float*) {
  return {w_i, w_h, b};
}

DnnlWeights ToDnnl(const GruCell&, int64_t I, int64_t H, const float* w_i, const float* w_h,
                   const float* b_i, const float* b_h) {
  Work wi(9, I * 3 * H), wh(10, H * 3 * H), bias(11, 4 * H);
  GatesToDnnl(w_i, I, H, wi.data());
  GatesToDnnl(w_h, H, H, wh.data());
  float* b = bias.data();
  for (int64_t j = 0; j < H; ++j) {
    b[j] = b_i[H + j] + b_h[H + j];  // u: the update gate z
    b[H + j] = b_i[j] + b_h[j];      // r
    b[2 * H + j] = b_i[2 * H + j];   // o: n's input side
    b[3 * H + j] = b_h[2 * H + j];   // n's recurrent side, inside r * (.)
  }
  return {wi.data(), wh.data(), b};
}

ffi::Error DnnlError(const char* cell, const char* where, const std::exception& e) {
  return ffi::Error(ffi::ErrorCode::kInternal, std::string("rnnjax native ") + cell +
                                                   " (oneDNN " + where + "): " + e.what());
}

// Bytes of oneDNN's training workspace for this shape (the dense `res`), or -1 on failure.
template <class Cell>
int64_t WorkspaceBytes(int64_t B, int64_t T, int64_t I, int64_t H, bool reverse) {
  try {  // planning runs nothing, so it needs no trip to the oneDNN thread
    return static_cast<int64_t>(
        GetPlan<Cell>(B, T, I, H, reverse, kTraining).fwd_pd.workspace_desc().get_size());
  } catch (const std::exception&) {
    return -1;
  }
}

// The dense forward pass. c0 and c_last are the LSTM's cell state (null for the GRU); b_h is
// the GRU's second bias (null for the LSTM).
template <class Cell>
ffi::Error DnnlForward(int64_t B, int64_t T, int64_t I, int64_t H, bool reverse, bool save,
                       const float* x, const float* w_i, const float* b, const float* w_h,
                       const float* b_h, const float* h0, const float* c0, float* ys,
                       float* h_last, float* c_last, float* res, size_t res_bytes) {
  try {
    Plan<Cell>& p = GetPlan<Cell>(B, T, I, H, reverse, save ? kTraining : kInference);
    const auto& pd = p.fwd_pd;
    const auto& l = p.layout;
    if (save && pd.workspace_desc().get_size() > res_bytes) {
      return ffi::Error(ffi::ErrorCode::kInternal,
                        "rnnjax native kernels: oneDNN's workspace outgrew the saved array");
    }
    const DnnlWeights w = ToDnnl(Cell(), I, H, w_i, w_h, b, b_h);
    Work wi(4, Floats(pd.weights_layer_desc())), wh(5, Floats(pd.weights_iter_desc()));
    Work pad(6, Floats(pd.scratchpad_desc()));
    memory packed_i = Wrap(pd.weights_layer_desc(), wi.data());
    memory packed_h = Wrap(pd.weights_iter_desc(), wh.data());
    Convert(p.fwd_w_i, Wrap(l.w_i, w.w_i), packed_i);
    Convert(p.fwd_w_h, Wrap(l.w_h, w.w_h), packed_h);
    std::unordered_map<int, memory> args = {
        {DNNL_ARG_SRC_LAYER, Wrap(l.x, x)},
        {DNNL_ARG_SRC_ITER, Wrap(l.state, h0)},
        {DNNL_ARG_WEIGHTS_LAYER, packed_i},
        {DNNL_ARG_WEIGHTS_ITER, packed_h},
        {DNNL_ARG_BIAS, Wrap(l.bias, w.bias)},
        {DNNL_ARG_DST_LAYER, Wrap(l.y, ys)},
        {DNNL_ARG_DST_ITER, Wrap(l.state, h_last)},
        {DNNL_ARG_SCRATCHPAD, Wrap(pd.scratchpad_desc(), pad.data())},
    };
    if (c0 != nullptr) {
      args[DNNL_ARG_SRC_ITER_C] = Wrap(l.state, c0);
      args[DNNL_ARG_DST_ITER_C] = Wrap(l.state, c_last);
    }
    if (save) args[DNNL_ARG_WORKSPACE] = Wrap(pd.workspace_desc(), res);
    HugePages(ys, sizeof(float) * B * T * H);
    if (save) HugePages(res, pd.workspace_desc().get_size());
    Run(p.fwd, args);
  } catch (const std::exception& e) {
    return DnnlError(Cell::kName, "forward", e);
  }
  return ffi::Error::Success();
}

// Where the dense backward pass puts the gradients (gc0 null for the GRU, gb_h null for the
// LSTM), and the cotangents it starts from (gc_last null for the GRU).
struct DnnlGrads {
  float *gx, *gw_i, *gb, *gw_h, *gb_h, *gh0, *gc0;
};

template <class Cell>
ffi::Error DnnlBackward(int64_t B, int64_t T, int64_t I, int64_t H, bool reverse,
                        const float* gys, const float* gh_last, const float* gc_last,
                        const float* x, const float* w_i, const float* b, const float* w_h,
                        const float* b_h, const float* h0, const float* c0, const float* ys,
                        const float* h_last, const float* c_last, const float* res,
                        const DnnlGrads& g) {
  try {
    Plan<Cell>& p = GetPlan<Cell>(B, T, I, H, reverse, kBackward);
    const auto& pd = p.bwd_pd;
    const auto& l = p.layout;
    constexpr int64_t G = Cell::kGates;
    constexpr bool kGru = G == 3;
    const DnnlWeights w = ToDnnl(Cell(), I, H, w_i, w_h, b, b_h);
    Work wi(4, Floats(pd.weights_layer_desc())), wh(5, Floats(pd.weights_iter_desc()));
    Work pad(6, Floats(pd.scratchpad_desc()));
    Work dwi(7, Floats(pd.diff_weights_layer_desc())), dwh(8, Floats(pd.diff_weights_iter_desc()));
    memory packed_i = Wrap(pd.weights_layer_desc(), wi.data());
    memory packed_h = Wrap(pd.weights_iter_desc(), wh.data());
    memory packed_di = Wrap(pd.diff_weights_layer_desc(), dwi.data());
    memory packed_dh = Wrap(pd.diff_weights_iter_desc(), dwh.data());
    Convert(p.bwd_w_i, Wrap(l.w_i, w.w_i), packed_i);
    Convert(p.bwd_w_h, Wrap(l.w_h, w.w_h), packed_h);
    // oneDNN adds the weight and bias gradients into these. The GRU's come back in oneDNN's
    // gate order: the bias gradient in slot 12 (slot 11 holds the biases, which the backward
    // pass reads), the weights' through slots 9-10 (free again once the weights are packed).
    Work dbias(12, 4 * H);
    float* db = kGru ? dbias.data() : g.gb;
    std::memset(dwi.data(), 0, pd.diff_weights_layer_desc().get_size());
    std::memset(dwh.data(), 0, pd.diff_weights_iter_desc().get_size());
    std::memset(db, 0, sizeof(float) * 4 * H);
    std::unordered_map<int, memory> args = {
        {DNNL_ARG_SRC_LAYER, Wrap(l.x, x)},
        {DNNL_ARG_SRC_ITER, Wrap(l.state, h0)},
        {DNNL_ARG_WEIGHTS_LAYER, packed_i},
        {DNNL_ARG_WEIGHTS_ITER, packed_h},
        {DNNL_ARG_BIAS, Wrap(l.bias, w.bias)},
        {DNNL_ARG_DST_LAYER, Wrap(l.y, ys)},
        {DNNL_ARG_DST_ITER, Wrap(l.state, h_last)},
        {DNNL_ARG_DIFF_SRC_LAYER, Wrap(l.x, g.gx)},
        {DNNL_ARG_DIFF_SRC_ITER, Wrap(l.state, g.gh0)},
        {DNNL_ARG_DIFF_WEIGHTS_LAYER, packed_di},
        {DNNL_ARG_DIFF_WEIGHTS_ITER, packed_dh},
        {DNNL_ARG_DIFF_BIAS, Wrap(l.bias, db)},
        {DNNL_ARG_DIFF_DST_LAYER, Wrap(l.y, gys)},
        {DNNL_ARG_DIFF_DST_ITER, Wrap(l.state, gh_last)},
        {DNNL_ARG_WORKSPACE, Wrap(p.fwd_pd.workspace_desc(), res)},
        {DNNL_ARG_SCRATCHPAD, Wrap(pd.scratchpad_desc(), pad.data())},
    };
    if (c0 != nullptr) {
      args[DNNL_ARG_SRC_ITER_C] = Wrap(l.state, c0);
      args[DNNL_ARG_DST_ITER_C] = Wrap(l.state, c_last);
      args[DNNL_ARG_DIFF_SRC_ITER_C] = Wrap(l.state, g.gc0);
      args[DNNL_ARG_DIFF_DST_ITER_C] = Wrap(l.state, gc_last);
    }
    HugePages(g.gx, sizeof(float) * B * T * I);
    Run(p.bwd, args);
    if (!kGru) {
      Convert(p.out_dw_i, packed_di, Wrap(l.w_i, g.gw_i));
      Convert(p.out_dw_h, packed_dh, Wrap(l.w_h, g.gw_h));
      return ffi::Error::Success();
    }
    Work plain_i(9, I * G * H), plain_h(10, H * G * H);
    Convert(p.out_dw_i, packed_di, Wrap(l.w_i, plain_i.data()));
    Convert(p.out_dw_h, packed_dh, Wrap(l.w_h, plain_h.data()));
    GatesFromDnnl(plain_i.data(), I, H, g.gw_i);
    GatesFromDnnl(plain_h.data(), H, H, g.gw_h);
    for (int64_t j = 0; j < H; ++j) {
      g.gb[j] = g.gb_h[j] = db[H + j];          // r
      g.gb[H + j] = g.gb_h[H + j] = db[j];      // z (u)
      g.gb[2 * H + j] = db[2 * H + j];          // n, input side
      g.gb_h[2 * H + j] = db[3 * H + j];        // n, recurrent side
    }
  } catch (const std::exception& e) {
    return DnnlError(Cell::kName, "backward", e);
  }
  return ffi::Error::Success();
}
#endif  // RNNJAX_WITH_DNNL

// ------------------------------------------------------------------ the own loops' matmuls
// Whether a pass of rnnjax's own loops over B rows of H units does its matmuls with oneDNN: a
// build with it, a step of at least kDnnlUnits (B x H), and neither RNNJAX_ONEDNN nor
// RNNJAX_ONEDNN_MATMUL is 0 (read per call). Such a pass runs on the oneDNN thread: the
// per-step matmuls on weights packed once per pass (StepGemm), the others with dnnl_sgemm, the
// per-row work spread over the same OpenMP team (Parallel), and no OpenBLAS threads spin
// beside it. Smaller steps keep OpenBLAS
// on the calling thread: a oneDNN matmul call costs ~5 us, OpenBLAS's 1.5-3 us at
// (16, 32..64) @ (32..64, 192), and per step that is most of the work (a GRU
// forward+backward at 16x256x32x64 took 9.2 ms vs 6.2 ms).
constexpr int64_t kDnnlUnits = 4096;

bool DnnlMatmul(int64_t B, int64_t H) {
#ifdef RNNJAX_WITH_DNNL
  return B * H >= kDnnlUnits && EnvOn("RNNJAX_ONEDNN") && EnvOn("RNNJAX_ONEDNN_MATMUL");
#else
  (void)B;
  (void)H;
  return false;
#endif
}

// Runs a pass of the own loops where their matmuls want it: the oneDNN thread, or right here.
// (An exception must not leave the oneDNN thread: it becomes the call's error.)
ffi::Error OnMatmulThread(bool dnnl, const std::function<ffi::Error()>& pass) {
#ifdef RNNJAX_WITH_DNNL
  if (dnnl) {
    return DnnlThread::Run([&]() -> ffi::Error {
      try {
        return pass();
      } catch (const std::exception& e) {
        return ffi::Error(ffi::ErrorCode::kInternal,
                          std::string("rnnjax native loops (oneDNN matmul): ") + e.what());
      }
    });
  }
#endif
  return pass();
}

// Row-major C (m, n) = A op(B) + beta C, as cblas_sgemm with alpha 1.
void Gemm(bool dnnl, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* a,
          int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
#ifdef RNNJAX_WITH_DNNL
  if (dnnl && dnnl_sgemm(trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', m, n, k, 1.0f, a, lda, b, ldb,
                         beta, c, ldc) == dnnl_success) {
    return;
  }  // (where oneDNN refuses, OpenBLAS does it)
#endif
  g_sgemm(kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans, m, n, k, 1.0f, a,
          lda, b, ldb, beta, c, ldc);
}

// The per-step matmul of a pass, C (M, N) = A (M, K) op(W) + beta C, with one W for the whole
// pass: op(W) = W (K, N), or W^T of a (N, K) W (`trans`). With oneDNN, W is packed once into
// its matmul kernels' blocked layout (Work `slot`) and each step runs a matmul primitive made
// once per shape. OpenBLAS's sgemm packs both operands on every call (at a GRU's (64, 512) @
// (512, 1536) its packing of W_h was 10% of a forward+backward's samples): 64 such steps took
// 20.5 ms packed vs 28.9 ms with OpenBLAS, 128 steps of (32, 1024) @ W^T, W (256, 1024), 7.1
// vs 16.8 ms (benchmarks/ab/step_matmul.cc, 2-core AVX-512 CPU; BENCHMARKS.md).
class StepGemm {
 public:
  StepGemm(bool dnnl, int slot, const float* w, int64_t K, int64_t N, bool trans, int64_t M,
           int64_t lda, int64_t ldc, float beta)
      : w_(w), K_(K), N_(N), M_(M), lda_(lda), ldc_(ldc), beta_(beta), trans_(trans) {
#ifdef RNNJAX_WITH_DNNL
    if (dnnl && M > 0 && K > 0 && N > 0) {
      try {
        Plan* plan = &GetPlan(trans, M, K, N, lda, ldc, beta);
        packed_work_ = std::make_unique<Work>(slot, Floats(plan->pd.weights_desc()));
        packed_ = memory(plan->pd.weights_desc(), Engine(), packed_work_->data());
        Convert(plan->pack, Wrap(plan->w, w), packed_);
        src_ = memory(plan->src, Engine(), nullptr);
        dst_ = memory(plan->dst, Engine(), nullptr);
        plan_ = plan;
      } catch (const std::exception&) {
        plan_ = nullptr;  // oneDNN has no matmul for this case: OpenBLAS does it
      }
    }
#endif
  }

  void operator()(const float* a, float* c) {
    if (M_ == 0 || N_ == 0) return;
#ifdef RNNJAX_WITH_DNNL
    if (plan_ != nullptr) {
      src_.set_data_handle(const_cast<float*>(a));
      dst_.set_data_handle(c);
      Run(plan_->matmul, {{DNNL_ARG_SRC, src_}, {DNNL_ARG_WEIGHTS, packed_}, {DNNL_ARG_DST, dst_}});
      return;
    }
#endif
    if (K_ == 0) {
      if (beta_ == 0.0f) {
        for (int64_t i = 0; i < M_; ++i) std::memset(c + i * ldc_, 0, sizeof(float) * N_);
      }
      return;
    }
    Gemm(false, false, trans_, M_, N_, K_, a, lda_, w_, trans_ ? K_ : N_, beta_, c, ldc_);
  }

 private:
#ifdef RNNJAX_WITH_DNNL
  struct Plan {
    memory::desc src, w, dst;
    dnnl::matmul::primitive_desc pd;
    dnnl::matmul matmul;
    dnnl::reorder pack;
  };

  static Plan& GetPlan(bool trans, int64_t M, int64_t K, int64_t N, int64_t lda, int64_t ldc,
                       float beta) {
    static std::mutex mutex;
    static std::map<std::tuple<bool, int64_t, int64_t, int64_t, int64_t, int64_t, bool>,
                    std::unique_ptr<Plan>>
        plans;
    std::lock_guard<std::mutex> lock(mutex);
    auto& kept = plans[{trans, M, K, N, lda, ldc, beta != 0.0f}];
    if (!kept) {  // made whole before it is kept: a throw leaves no half-made plan behind
      auto plan = std::make_unique<Plan>();
      plan->src = memory::desc({M, K}, kF32, memory::dims{lda, 1});
      plan->w = trans ? memory::desc({K, N}, kF32, memory::dims{1, K})
                      : memory::desc({K, N}, kF32, memory::dims{N, 1});
      plan->dst = memory::desc({M, N}, kF32, memory::dims{ldc, 1});
      dnnl::primitive_attr attr;
      if (beta != 0.0f) {
        dnnl::post_ops ops;
        ops.append_sum(beta);
        attr.set_post_ops(ops);
      }
      const memory::desc any({K, N}, kF32, Tag::any);
      plan->pd = dnnl::matmul::primitive_desc(Engine(), plan->src, any, plan->dst, attr);
      plan->matmul = dnnl::matmul(plan->pd);
      plan->pack = Reorder(plan->w, plan->pd.weights_desc());
      kept = std::move(plan);
    }
    return *kept;
  }

  Plan* plan_ = nullptr;
  std::unique_ptr<Work> packed_work_;
  memory packed_, src_, dst_;
#endif
  const float* w_;
  int64_t K_, N_, M_, lda_, ldc_;
  float beta_;
  bool trans_;
};

// After a backward loop: from the gate cotangents dz (rows, G) of all steps and the inputs
// `in` (rows, K) that met the weights W (K, G), the weight gradient in^T dz, the bias gradient
// (column sums of dz; skipped when db is null) and, if `need_dx`, the input gradient dz W^T.
// With `accumulate`, the weight and bias gradients are added to dw and db (a checkpointed
// pass's segments); dx is written either way.
void WeightGradients(bool dnnl, int64_t rows, int64_t K, int64_t G, const float* in,
                     const float* dz, const float* w, bool need_dx, float* dx, float* dw,
                     float* db, bool accumulate = false) {
  if (rows > 0 && K > 0) {
    Gemm(dnnl, true, false, K, G, rows, in, K, dz, G, accumulate ? 1.0f : 0.0f, dw, G);
  } else if (!accumulate) {
    std::memset(dw, 0, sizeof(float) * K * G);
  }
  if (db != nullptr) {
    if (!accumulate) std::memset(db, 0, sizeof(float) * G);
    constexpr int64_t kColumns = 256;  // per task: all rows of a block of columns
#pragma omp parallel for if (dnnl && rows * G >= (int64_t{1} << 16)) schedule(static)
    for (int64_t first = 0; first < G; first += kColumns) {
      const int64_t last = std::min(G, first + kColumns);
      for (int64_t row = 0; row < rows; ++row) {
        const float* __restrict__ zr = dz + row * G;
        float* __restrict__ sum = db;
#pragma omp simd
        for (int64_t j = first; j < last; ++j) sum[j] += zr[j];
      }
    }
  }
  if (need_dx && rows > 0 && K > 0) {
    Gemm(dnnl, false, true, rows, K, G, dz, G, w, G, 0.0f, dx, K);
  } else if (need_dx) {
    std::memset(dx, 0, sizeof(float) * rows * K);
  }
}

// The own loops' per-row work (gates, copies) is spread over the oneDNN thread's OpenMP team
// when their matmuls run there (DnnlMatmul); otherwise the other cores would wait for it
// between the matmuls.
inline bool Parallel(bool dnnl, int64_t B) { return dnnl && B > 1; }

// fn(b) for the rows b of a step, over the team when `par` (the serial loop stays plain code).
template <class Fn>
inline void ForEachRow(bool par, int64_t B, Fn fn) {
  if (par) {
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < B; ++b) fn(b);
  } else {
    for (int64_t b = 0; b < B; ++b) fn(b);
  }
}

// ------------------------------------------------------------------------- rnnjax's own loops
// A pass runs steps s = 0 .. T - 1 in its own order; step s is position t = s, or T - 1 - s
// for a reverse pass. Per-step arrays of a pass (h_prev, res, the gate cotangents) put
// (example b, position t) at row b * stride + t - first: stride T and first 0 for the whole
// sequence, stride n and first the segment's smallest t for one checkpointed n-step segment.
struct Rows {
  int64_t stride, first;
  int64_t operator()(int64_t b, int64_t t) const { return b * stride + t - first; }
};

inline int64_t Position(int64_t s, int64_t T, bool reverse) { return reverse ? T - 1 - s : s; }

// Checkpointed passes (the `checkpoint` attribute k > 0: rnnjax.scan's remat=): the forward
// pass saves, instead of h_prev and res, only the carry entering every k-th step, ckpt
// (B, S, width) with S = ceil(T / k); the backward pass runs the segments last to first,
// recomputing each segment's residuals from its checkpoint into arrays of k steps, running its
// BPTT steps, and adding its rows to the weight gradients.
struct Segment {
  int64_t begin, end, first;  // steps [begin, end) of the pass; positions [first, first + n)
  int64_t n() const { return end - begin; }
};

Segment SegmentOf(int64_t index, int64_t k, int64_t T, bool reverse) {
  const int64_t begin = index * k, end = std::min(T, begin + k);
  return {begin, end, reverse ? T - end : begin};
}

ffi::Error CheckCheckpoints(ffi::Span<const int64_t> ckpt, int64_t B, int64_t T, int64_t k,
                            int64_t width) {
  if (k < 1 || ckpt.size() != 3 || ckpt[0] != B || ckpt[1] != (T + k - 1) / k ||
      ckpt[2] != width) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "rnnjax native kernels: expected checkpoints (B, ceil(T / k), carry size)");
  }
  return ffi::Error::Success();
}

// A segment's share of the input-side gradients: x's rows of the segment (n per example,
// gathered into xg (B n, I)) meet the gate cotangents dz (B n, G) in one matmul each way:
// W_i's and the bias's gradients are added to gw_i and gb, and dz W_i^T goes to gx's rows.
void SegmentInputGradients(bool dnnl, int64_t B, int64_t T, int64_t I, int64_t G, Segment seg,
                           const float* x, const float* dz, const float* w_i, bool need_dx,
                           float* xg, float* gx, float* gw_i, float* gb) {
  const int64_t n = seg.n();
  for (int64_t b = 0; b < B; ++b) {
    std::memcpy(xg + b * n * I, x + (b * T + seg.first) * I, sizeof(float) * n * I);
  }
  float* gxg = xg + B * n * I;
  WeightGradients(dnnl, B * n, I, G, xg, dz, w_i, need_dx, gxg, gw_i, gb, true);
  if (!need_dx) return;
  for (int64_t b = 0; b < B; ++b) {
    std::memcpy(gx + (b * T + seg.first) * I, gxg + b * n * I, sizeof(float) * n * I);
  }
}

// A forward pass's sizes from x (B, T, I), w_i (I, G H), w_h (H, G H) and ys (B, T, H). A
// checkpointed pass (save with checkpoint k > 0) writes no ys, which is then (B, 0, H): the
// replay call computes ys from its checkpoints; such a pass is never dense.
struct ForwardDims {
  int64_t B, T, I, H;
};

ffi::Error CheckForward(const char* cell, int64_t gates, const ffi::Buffer<ffi::F32>& x,
                        const ffi::Buffer<ffi::F32>& w_i, const ffi::Buffer<ffi::F32>& w_h,
                        ffi::Span<const int64_t> ys, bool checkpointed, bool dense,
                        ForwardDims* f) {
  Dims d;
  if (auto err = CheckDims(ys, 1, w_h, &d, gates); err.failure()) return err;
  auto xd = x.dimensions();
  const int64_t T = checkpointed && xd.size() == 3 ? xd[1] : d.steps;
  if (xd.size() != 3 || xd[0] != d.batch || xd[1] != T || w_i.dimensions()[0] != xd[2] ||
      (checkpointed && (d.steps != 0 || dense))) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      std::string("rnnjax native ") + cell + ": expected x (B, T, I), w_i (I, " +
                          std::to_string(gates) + "H) and ys (B, T, H) ((B, 0, H) for a " +
                          "checkpointed pass, which is never dense)");
  }
  *f = {d.batch, T, xd[2], d.hidden};
  return ffi::Error::Success();
}

// The arrays a forward pass of rnnjax's loops writes step by step (null: not written), each
// first advised into huge pages: ys unless checkpointed; h_prev and res when every step is
// saved; ckpt, the checkpoints (B, S, width) in res, when checkpointed.
struct StepOutputs {
  float *ys, *h_prev, *res, *ckpt;
};

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

// One direction's operands, as the LSTM's loops use them.
struct LstmPass {
  int64_t B, T, I, H;
  bool reverse;
  const float* x;     // (B, T, I)
  const bool* mask;   // (B, T)
  const float* bias;  // (4H)
  const float* w;     // [W_i; W_h], (I + H, 4H)
  const float* w_h;   // (H, 4H)
  bool dnnl;          // matmuls with oneDNN (DnnlMatmul), on the oneDNN thread
};

// Steps [begin, end) of a forward pass from the carry (h, c), which they advance. Each of the
// other outputs is written only when given: ys (B, T, H); h_prev (., H) and res (., 6H) at
// `rows`; ckpt (B, S, 2H), [h, c] entering every k-th step.
void LstmSteps(const LstmPass& p, int64_t begin, int64_t end, float* h, float* c, float* ys,
               float* h_prev, float* res, Rows rows, float* ckpt, int64_t k) {
  const int64_t B = p.B, T = p.T, I = p.I, H = p.H, G = 4 * H, K = I + H;
  const bool par = Parallel(p.dnnl, B);
  const int64_t S = ckpt != nullptr ? (T + k - 1) / k : 0;
  Work xh_work(1, B * K);
  float* xh = xh_work.data();
  Work z_work(2, B * G);
  float* z = z_work.data();
  std::vector<float> gates(res != nullptr ? 0 : B * 6 * H);  // without res: one step's gates
  StepGemm stacked(p.dnnl, 13, p.w, K, G, false, B, K, G, 1.0f);

  for (int64_t s = begin; s < end; ++s) {
    const int64_t t = Position(s, T, p.reverse);
    ForEachRow(par, B, [&](int64_t b) {
      if (ckpt != nullptr && s % k == 0) {
        float* at = ckpt + (b * S + s / k) * 2 * H;
        std::memcpy(at, h + b * H, sizeof(float) * H);
        std::memcpy(at + H, c + b * H, sizeof(float) * H);
      }
      std::memcpy(xh + b * K, p.x + (b * T + t) * I, sizeof(float) * I);
      std::memcpy(xh + b * K + I, h + b * H, sizeof(float) * H);
      std::memcpy(z + b * G, p.bias, sizeof(float) * G);
      if (h_prev != nullptr) std::memcpy(h_prev + rows(b, t) * H, h + b * H, sizeof(float) * H);
    });
    stacked(xh, z);
    ForEachRow(par, B, [&](int64_t b) {
      float* r = res != nullptr ? res + rows(b, t) * 6 * H : gates.data() + b * 6 * H;
      float* yb = ys != nullptr ? ys + (b * T + t) * H : nullptr;
      LstmRow(z + b * G, c + b * H, h + b * H, r, yb, p.mask[b * T + t], H);
    });
  }
}

// Steps end - 1 down to begin of the LSTM's BPTT, from the residuals `res` at `rows`: the
// running cotangents (gh, gc) of the carry go back through them, and the gate cotangents of
// each step go to dz (., 4H) at `rows`.
void LstmBackSteps(const LstmPass& p, int64_t begin, int64_t end, const float* gys,
                   const float* res, Rows rows, float* dz, float* gh, float* gc) {
  const int64_t B = p.B, T = p.T, H = p.H, G = 4 * H;
  const bool par = Parallel(p.dnnl, B);
  Work back_work(1, B * H);  // slot 1 as the forward steps': never live at once
  float* back = back_work.data();
  StepGemm recurrent(p.dnnl, 15, p.w_h, G, H, true, B, rows.stride * G, H, 0.0f);
  for (int64_t s = end - 1; s >= begin; --s) {
    const int64_t t = Position(s, T, p.reverse);
    ForEachRow(par, B, [&](int64_t b) {
      const float* __restrict__ r = res + rows(b, t) * 6 * H;
      const float* __restrict__ yb = gys + (b * T + t) * H;
      float* __restrict__ ghb = gh + b * H;
      float* __restrict__ gcb = gc + b * H;
      float* __restrict__ dzb = dz + rows(b, t) * G;
      if (!p.mask[b * T + t]) {
        std::memset(dzb, 0, sizeof(float) * G);
        return;
      }
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) {
        const float i = r[j], f = r[H + j], g = r[2 * H + j], o = r[3 * H + j];
        const float cp = r[4 * H + j], tc = r[5 * H + j];
        const float dh = ghb[j] + yb[j];
        const float dc = gcb[j] + dh * o * (1.0f - tc * tc);
        dzb[j] = dc * g * i * (1.0f - i);
        dzb[H + j] = dc * cp * f * (1.0f - f);
        dzb[2 * H + j] = dc * i * (1.0f - g * g);
        dzb[3 * H + j] = dh * tc * o * (1.0f - o);
        gcb[j] = dc * f;
      }
    });
    // back = dz_t @ W_h^T: the cotangent of h entering this step (dz_t rows are stride apart).
    recurrent(dz + rows(0, t) * G, back);
    ForEachRow(par, B, [&](int64_t b) {
      if (p.mask[b * T + t]) std::memcpy(gh + b * H, back + b * H, sizeof(float) * H);
    });
  }
}

// --------------------------------------------------------------- the AVX-512 loops (fused)
// A forward pass of the LSTM or the GRU in one loop nest per step, on 512-bit vectors: for 16
// hidden units and up to 6 batch rows at a time, the gates' pre-activations from x_t and h
// accumulate in 24 registers (4 per row: the LSTM's i, f, g, o; the GRU's r, z, and the input
// and recurrent parts of n), and the gates, the new carry and y_t are computed from those
// registers before the next 16 units: no gate array, no separate input projection, weights
// packed once per call into panels of 16 units. The threads of the OpenMP team (in builds with
// oneDNN, which have one) share a pass by batch rows (each runs its rows through all steps
// alone) or by panels (each keeps its panels in its cache; a spin barrier ends each step):
// FusedByRows. For inference (nothing saved) and for the forward pass of training (saving
// h_prev and the gates of every step, not checkpoints), it replaces the loops below (a matmul
// call and a gate pass per step) and oneDNN's RNN primitives (BENCHMARKS.md has the timings).
// Built where the compiler targets AVX-512 (-march=native on such a CPU); RNNJAX_AVX512=0
// (read per call) turns it off.
#if defined(__AVX512F__)
constexpr bool kFusedBuilt = true;
constexpr int64_t kUnits = 16;  // hidden units per panel
constexpr int kTileRows = 6;    // 6 rows x 4 accumulators = 24 of the 32 vector registers

// tanh as Tanh above, 16 lanes at a time; the quotient by a reciprocal refined by one Newton
// step (a few ulp more than a division, which would cost more than the rest of the gate).
inline __m512 TanhV(__m512 x) {
  const __m512 c = _mm512_set1_ps(kTanhClamp);
  // max/min return their second operand when either is NaN: x goes second, so NaN stays NaN
  // (as in Tanh and XLA's tanh) instead of becoming a clamp bound.
  const __m512 y = _mm512_min_ps(c, _mm512_max_ps(_mm512_sub_ps(_mm512_setzero_ps(), c), x));
  const __m512 y2 = _mm512_mul_ps(y, y);
  __m512 p = _mm512_fmadd_ps(y2, _mm512_set1_ps(kTanhP[0]), _mm512_set1_ps(kTanhP[1]));
  for (int i = 2; i < 7; ++i) p = _mm512_fmadd_ps(p, y2, _mm512_set1_ps(kTanhP[i]));
  p = _mm512_mul_ps(p, y);
  __m512 q = _mm512_fmadd_ps(y2, _mm512_set1_ps(kTanhQ[0]), _mm512_set1_ps(kTanhQ[1]));
  for (int i = 2; i < 4; ++i) q = _mm512_fmadd_ps(q, y2, _mm512_set1_ps(kTanhQ[i]));
  __m512 r = _mm512_rcp14_ps(q);
  r = _mm512_mul_ps(r, _mm512_fnmadd_ps(q, r, _mm512_set1_ps(2.0f)));
  const __m512 t = _mm512_mul_ps(p, r);
  const __mmask16 tiny =
      _mm512_cmp_ps_mask(_mm512_abs_ps(y), _mm512_set1_ps(kTanhTiny), _CMP_LT_OQ);
  return _mm512_mask_blend_ps(tiny, t, y);
}

inline __m512 SigmoidV(__m512 x) {
  const __m512 half = _mm512_set1_ps(0.5f);
  return _mm512_fmadd_ps(half, TanhV(_mm512_mul_ps(half, x)), half);
}

// One call's operands. Hp is H rounded up to whole panels; the carry (h, and the LSTM's c)
// lives in (B, Hp) arrays whose padding units stay zero (their weights and biases are zero:
// an LSTM's gates are 0.5 there and c stays 0; a GRU's h' = (n + h) / 2 = 0).
struct Fused {
  int64_t B, T, I, H, Hp;
  bool reverse;
  const float* x;       // (B, T, I)
  const bool* mask;     // (B, T)
  const float* panels;  // Hp / 16 panels of I + Hp rows of G x 16 floats (PackPanels)
  const float* bias;    // (Hp / 16, 4 x 16): four bias vectors per panel
  float* c;             // the LSTM's cell state (B, Hp); null for the GRU
  float* ys;            // (B, T, H)
  float* h_prev;        // (B, T, H), h entering each step; null unless saving
  float* res;           // (B, T, W H), the gates of each step (as the loops save them) or null
  bool ahead;           // prefetch panel rows (Accumulate): a panel is larger than 32 KiB
};

// Panels [first, last) of a cell with G gates: panel j's row k holds the weights from input k
// (k < I, of W_i) or from unit k - I of h (of W_h) to units 16 j .. 16 j + 15 of each gate, in
// gate order. Its four bias vectors come from bias4 (4 H: the cell's, FusedLstmCell/GruCell).
void PackPanels(int64_t G, const float* w_i, const float* w_h, const float* bias4, int64_t I,
                int64_t H, int64_t Hp, int64_t first, int64_t last, float* panels,
                float* panel_bias) {
  const int64_t K = I + Hp, GH = G * H;
  for (int64_t j = first; j < last; ++j) {
    float* p = panels + j * K * G * kUnits;
    for (int64_t k = 0; k < K; ++k) {
      const float* w = k < I ? w_i + k * GH : (k - I < H ? w_h + (k - I) * GH : nullptr);
      for (int64_t q = 0; q < G; ++q) {
        for (int64_t u = 0; u < kUnits; ++u) {
          const int64_t unit = j * kUnits + u;
          p[(k * G + q) * kUnits + u] = w != nullptr && unit < H ? w[q * H + unit] : 0.0f;
        }
      }
    }
    for (int64_t q = 0; q < 4; ++q) {
      for (int64_t u = 0; u < kUnits; ++u) {
        const int64_t unit = j * kUnits + u;
        panel_bias[(j * 4 + q) * kUnits + u] = unit < H ? bias4[q * H + unit] : 0.0f;
      }
    }
  }
}

// acc[r] += a[r][0 .. n) @ the panel rows p (n rows of V vectors): vectors 0, 1 into
// accumulators 0, 1, vector 2 into accumulator kThird, vector 3 (V = 4) into 3. With kAhead,
// each row is asked for 8 rows before it is used: a panel larger than L1 streams from L2 or
// beyond, and the hardware's prefetch alone left it waiting (LSTM inference 8x64x32x512: 6.1
// vs 5.6 ms; 64x64x128x512: 34.3 vs 32.8 ms; no gain where a panel stays in L1).
template <int R, int V, int kThird, bool kAhead>
inline void Accumulate(__m512 (&acc)[R][4], const float* const (&a)[R], const float* p,
                       int64_t n) {
  for (int64_t k = 0; k < n; ++k, p += V * kUnits) {
    if (kAhead) {
      for (int q = 0; q < V; ++q) {
        _mm_prefetch(reinterpret_cast<const char*>(p + (8 * V + q) * kUnits), _MM_HINT_T0);
      }
    }
    __m512 w[V];
    for (int q = 0; q < V; ++q) w[q] = _mm512_load_ps(p + q * kUnits);
    for (int r = 0; r < R; ++r) {
      const __m512 v = _mm512_set1_ps(a[r][k]);
      acc[r][0] = _mm512_fmadd_ps(v, w[0], acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(v, w[1], acc[r][1]);
      acc[r][kThird] = _mm512_fmadd_ps(v, w[2], acc[r][kThird]);
      if (V == 4) acc[r][3] = _mm512_fmadd_ps(v, w[V - 1], acc[r][3]);
    }
  }
}

// Where one row's step puts things: its 16 units of h entering and leaving the step, of y_t,
// of h_prev and res (or null), which of them are units (the last panel's may be partial), and
// whether the step is real (else the carry is kept and y_t = 0).
struct RowStep {
  const float* h_in;
  float* h_out;
  float* y;
  float* h_prev;
  float* res;
  __mmask16 units;
  bool real;
};

// A row's step ends here: h_out gets the new h where the step is real and h entering where
// not, y_t the new h or zeros, h_prev (when saving) h entering.
inline void Advance(const RowStep& s, __m512 h_new) {
  const __m512 h = _mm512_load_ps(s.h_in);
  if (s.h_prev != nullptr) _mm512_mask_storeu_ps(s.h_prev, s.units, h);
  _mm512_store_ps(s.h_out, s.real ? h_new : h);
  _mm512_mask_storeu_ps(s.y, s.units, s.real ? h_new : _mm512_setzero_ps());
}

// The LSTM: accumulators i, f, g, o; bias4 = b; res = [i, f, g, o, c entering, tanh(c leaving)].
struct FusedLstmCell {
  static constexpr int kGates = 4, kThirdFromH = 2, kResWidth = 6;
  static void Row(const __m512 (&z)[4], const float* bias, float* c, int64_t H, const RowStep& s) {
    const __m512 i = SigmoidV(_mm512_add_ps(z[0], _mm512_load_ps(bias)));
    const __m512 f = SigmoidV(_mm512_add_ps(z[1], _mm512_load_ps(bias + kUnits)));
    const __m512 g = TanhV(_mm512_add_ps(z[2], _mm512_load_ps(bias + 2 * kUnits)));
    const __m512 o = SigmoidV(_mm512_add_ps(z[3], _mm512_load_ps(bias + 3 * kUnits)));
    const __m512 c_in = _mm512_load_ps(c);
    const __m512 c_out = _mm512_fmadd_ps(f, c_in, _mm512_mul_ps(i, g));
    const __m512 tc = TanhV(c_out);
    const __m512 h_out = _mm512_mul_ps(o, tc);
    if (s.res != nullptr) {
      const __m512 parts[6] = {i, f, g, o, c_in, tc};
      for (int q = 0; q < 6; ++q) _mm512_mask_storeu_ps(s.res + q * H, s.units, parts[q]);
    }
    Advance(s, h_out);
    if (s.real) _mm512_store_ps(c, c_out);
  }
};

// The GRU (reset after): accumulators r, z and n's input part (x W_in) and recurrent part
// (h W_hn); bias4 = [b_ir + b_hr, b_iz + b_hz, b_in, b_hn]; res = [r, z, n, h W_hn + b_hn].
struct FusedGruCell {
  static constexpr int kGates = 3, kThirdFromH = 3, kResWidth = 4;
  static void Row(const __m512 (&z)[4], const float* bias, float*, int64_t H, const RowStep& s) {
    const __m512 r = SigmoidV(_mm512_add_ps(z[0], _mm512_load_ps(bias)));
    const __m512 u = SigmoidV(_mm512_add_ps(z[1], _mm512_load_ps(bias + kUnits)));
    const __m512 gh_n = _mm512_add_ps(z[3], _mm512_load_ps(bias + 3 * kUnits));
    const __m512 n = TanhV(_mm512_fmadd_ps(
        r, gh_n, _mm512_add_ps(z[2], _mm512_load_ps(bias + 2 * kUnits))));
    const __m512 h = _mm512_load_ps(s.h_in);
    const __m512 h_out = _mm512_fmadd_ps(u, _mm512_sub_ps(h, n), n);  // (1 - z) n + z h
    if (s.res != nullptr) {
      const __m512 parts[4] = {r, u, n, gh_n};
      for (int q = 0; q < 4; ++q) _mm512_mask_storeu_ps(s.res + q * H, s.units, parts[q]);
    }
    Advance(s, h_out);
  }
};

// Rows b0 .. b0 + R - 1 of panel j at position t: h_in is the carry entering the step, h_out
// gets the carry leaving it ((B, Hp) each); c, y_t and, when saving, h_prev and res are written.
template <class Cell, int R>
inline void FusedTile(const Fused& f, int64_t t, int64_t b0, int64_t j, const float* h_in,
                      float* h_out) {
  constexpr int G = Cell::kGates;
  const int64_t I = f.I, Hp = f.Hp;
  const float* p = f.panels + j * (I + Hp) * G * kUnits;
  __m512 acc[R][4];  // not from the bias: GCC made that a store and a stalling reload
  for (int r = 0; r < R; ++r) {
    for (int q = 0; q < 4; ++q) acc[r][q] = _mm512_setzero_ps();
  }
  const float* a[R];
  for (int r = 0; r < R; ++r) a[r] = f.x + ((b0 + r) * f.T + t) * I;
  if (f.ahead) {
    Accumulate<R, G, 2, true>(acc, a, p, I);
  } else {
    Accumulate<R, G, 2, false>(acc, a, p, I);
  }
  for (int r = 0; r < R; ++r) a[r] = h_in + (b0 + r) * Hp;
  p += I * G * kUnits;
  if (f.ahead) {
    Accumulate<R, G, Cell::kThirdFromH, true>(acc, a, p, Hp);
  } else {
    Accumulate<R, G, Cell::kThirdFromH, false>(acc, a, p, Hp);
  }
  const int64_t u0 = j * kUnits, H = f.H;
  const int64_t left = H - u0;
  const __mmask16 units = left >= kUnits ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
  for (int r = 0; r < R; ++r) {
    const int64_t b = b0 + r, at = b * f.T + t;
    const RowStep s{h_in + b * Hp + u0,
                    h_out + b * Hp + u0,
                    f.ys + at * H + u0,
                    f.h_prev != nullptr ? f.h_prev + at * H + u0 : nullptr,
                    f.res != nullptr ? f.res + at * Cell::kResWidth * H + u0 : nullptr,
                    units,
                    f.mask[at]};
    Cell::Row(acc[r], f.bias + j * 4 * kUnits, f.c != nullptr ? f.c + b * Hp + u0 : nullptr,
              H, s);
  }
}

// FusedTile for R = 1 .. kTileRows rows.
template <class Cell>
inline void FusedRows(const Fused& f, int64_t t, int64_t b0, int64_t R, int64_t j,
                      const float* h_in, float* h_out) {
  switch (R) {
    case 1: return FusedTile<Cell, 1>(f, t, b0, j, h_in, h_out);
    case 2: return FusedTile<Cell, 2>(f, t, b0, j, h_in, h_out);
    case 3: return FusedTile<Cell, 3>(f, t, b0, j, h_in, h_out);
    case 4: return FusedTile<Cell, 4>(f, t, b0, j, h_in, h_out);
    case 5: return FusedTile<Cell, 5>(f, t, b0, j, h_in, h_out);
    default: return FusedTile<Cell, kTileRows>(f, t, b0, j, h_in, h_out);
  }
}

// A barrier for the threads of one pass that spins (a step lasts microseconds; a futex wake-up
// would cost more), yielding the core now and then in case it is oversubscribed.
class SpinBarrier {
 public:
  explicit SpinBarrier(int n) : n_(n) {}
  void Reset(int n) { n_ = n; }  // before anyone waits
  void Wait() {
    const int gen = gen_.load(std::memory_order_acquire);
    if (count_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
      count_.store(0, std::memory_order_relaxed);
      gen_.store(gen + 1, std::memory_order_release);
      return;
    }
    for (int spins = 1; gen_.load(std::memory_order_acquire) == gen; ++spins) {
      if (spins % 4096 == 0) {
        std::this_thread::yield();
      } else {
        _mm_pause();
      }
    }
  }

 private:
  int n_;
  alignas(64) std::atomic<int> count_{0};
  alignas(64) std::atomic<int> gen_{0};
};

// Thread `id` of `n`: packs its share of the panels, then runs every step on its share of the
// work, which is either some of the rows with all panels (`by_rows`: the threads never wait
// for each other) or all rows with some of the panels (every step ends at the barrier, as
// each thread's carry feeds the others'). h holds two (B, Hp) carries, the one entering step
// s at s % 2.
template <class Cell>
void FusedThread(const Fused& f, const float* w_i, const float* w_h, const float* bias4,
                 float* panels, float* panel_bias, float* h, int id, int n, bool by_rows,
                 SpinBarrier& barrier) {
  const int64_t panels_n = f.Hp / kUnits;
  PackPanels(Cell::kGates, w_i, w_h, bias4, f.I, f.H, f.Hp, panels_n * id / n,
             panels_n * (id + 1) / n, panels, panel_bias);
  const int64_t first = by_rows ? 0 : panels_n * id / n;
  const int64_t last = by_rows ? panels_n : panels_n * (id + 1) / n;
  const int64_t row0 = by_rows ? f.B * id / n : 0;
  const int64_t rows = by_rows ? f.B * (id + 1) / n - row0 : f.B;
  // Row tiles of near-equal height (e.g. 32 rows: 5, 5, 5, 5, 6, 6 rather than 6 x 5 and 2).
  const int64_t tiles = (rows + kTileRows - 1) / kTileRows;
  barrier.Wait();  // every panel packed
  for (int64_t s = 0; s < f.T; ++s) {
    const int64_t t = Position(s, f.T, f.reverse);
    const float* h_in = h + (s % 2) * f.B * f.Hp;
    float* h_out = h + ((s + 1) % 2) * f.B * f.Hp;
    if (!by_rows) {
      // The carry entering the step was written by every thread: ask for all of its lines at
      // once (each tile would otherwise wait for the other cores' lines one by one).
      for (const float* at = h_in; at < h_in + f.B * f.Hp; at += 16) {
        _mm_prefetch(reinterpret_cast<const char*>(at), _MM_HINT_T0);
      }
    }
    if (s + 1 < f.T) {  // and the next step's inputs
      const int64_t next = Position(s + 1, f.T, f.reverse);
      for (int64_t b = row0; b < row0 + rows; ++b) {
        const float* row = f.x + (b * f.T + next) * f.I;
        for (int64_t i = 0; i < f.I; i += 16) {
          _mm_prefetch(reinterpret_cast<const char*>(row + i), _MM_HINT_T0);
        }
      }
    }
    for (int64_t j = first; j < last; ++j) {
      for (int64_t tile = 0; tile < tiles; ++tile) {
        const int64_t b0 = row0 + rows * tile / tiles, b1 = row0 + rows * (tile + 1) / tiles;
        FusedRows<Cell>(f, t, b0, b1 - b0, j, h_in, h_out);
      }
    }
    if (!by_rows) barrier.Wait();
  }
}

// Threads for a pass of B rows and H units: at most one per panel or per row (the larger), and
// one alone when a step is too small to share (below kFusedShareUnits batch x hidden units) or
// when RNNJAX_ONEDNN is 0 (which keeps the kernels off OpenMP's threads, e.g. beside PyTorch's
// own OpenMP runtime).
constexpr int64_t kFusedShareUnits = 256;

int FusedThreads(int64_t B, int64_t Hp) {
#ifdef _OPENMP
  if (B * Hp < kFusedShareUnits || !EnvOn("RNNJAX_ONEDNN")) return 1;
  return static_cast<int>(std::min<int64_t>(omp_get_max_threads(), std::max(Hp / kUnits, B)));
#else
  (void)B;
  (void)Hp;
  return 1;
#endif
}

// How `threads` share a pass (FusedThread): by rows where every thread can keep all the
// panels in its L2 cache (at most 3/4 of it) and either the panels are few (H <= 128: per
// step, the barrier would cost about as much as the arithmetic) or each thread has two full
// row tiles; otherwise by panels. Measured on a 2-core AVX-512 CPU (2 MiB L2 per core), LSTM
// inference ms by panels / by rows: 16x256x32x64 0.98 / 0.85, 32x128x64x256 8.6 / 8.1,
// 64x64x128x512 32.8 / 36.7 (5.2 MiB of panels), 16x42x32x256 1.44 / 1.59, 2x339x32x256
// 2.03 / 2.87.
bool FusedByRows(int64_t G, int64_t B, int64_t I, int64_t Hp, int threads) {
  static const int64_t l2 = [] {
    const long bytes = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return bytes > 0 ? int64_t{bytes} : int64_t{1} << 20;
  }();
  const int64_t panel_bytes = (I + Hp) * Hp * G * int64_t{sizeof(float)};
  return threads > 1 && 4 * panel_bytes <= 3 * l2 &&
         (Hp <= 128 || B >= 2 * kTileRows * threads);
}

// Passes FusedForward has run in this process (tests read it: rnnjax_avx512_passes).
std::atomic<int64_t> g_fused_passes{0};

// A whole forward pass: ys, h_prev and res when given (saving), and the final carry into
// h_last (and the LSTM's c_last; c0 and c_last are null for the GRU). bias4 as in PackPanels.
template <class Cell>
ffi::Error FusedForward(int64_t B, int64_t T, int64_t I, int64_t H, bool reverse,
                        const float* x, const float* w_i, const float* w_h, const float* bias4,
                        const float* h0, const float* c0, const bool* mask, float* ys,
                        float* h_prev, float* res, float* h_last, float* c_last) {
  g_fused_passes.fetch_add(1, std::memory_order_relaxed);
  const int64_t Hp = (H + kUnits - 1) / kUnits * kUnits;
  const int threads = FusedThreads(B, Hp);
  return OnMatmulThread(threads > 1, [&]() -> ffi::Error {
    Work panels(0, (I + Hp) * Hp * Cell::kGates), panel_bias(1, Hp * 4), carry(2, 3 * B * Hp);
    float* h = carry.data();  // two h arrays, then the LSTM's c
    float* c = c0 != nullptr ? h + 2 * B * Hp : nullptr;
    std::fill(h, h + 3 * B * Hp, 0.0f);
    for (int64_t b = 0; b < B; ++b) {
      std::memcpy(h + b * Hp, h0 + b * H, sizeof(float) * H);
      if (c != nullptr) std::memcpy(c + b * Hp, c0 + b * H, sizeof(float) * H);
    }
    const bool ahead = (I + Hp) * Cell::kGates * kUnits * sizeof(float) > (size_t{32} << 10);
    const Fused f{B,  T,  I,      H,   Hp, reverse, x, mask, panels.data(), panel_bias.data(),
                  c,  ys, h_prev, res, ahead};
    SpinBarrier barrier(threads);
    if (threads > 1) {
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
      {
        // OpenMP may start fewer threads than asked for: the work and the barrier are the
        // team's.
        const int n = omp_get_num_threads();
#pragma omp single
        barrier.Reset(n);  // (single ends in OpenMP's barrier: no one waits before this)
        FusedThread<Cell>(f, w_i, w_h, bias4, panels.data(), panel_bias.data(), h,
                          omp_get_thread_num(), n, FusedByRows(Cell::kGates, B, I, Hp, n),
                          barrier);
      }
#endif
    } else {
      FusedThread<Cell>(f, w_i, w_h, bias4, panels.data(), panel_bias.data(), h, 0, 1, false,
                        barrier);
    }
    const float* h_end = h + (T % 2) * B * Hp;
    for (int64_t b = 0; b < B; ++b) {
      std::memcpy(h_last + b * H, h_end + b * Hp, sizeof(float) * H);
      if (c != nullptr) std::memcpy(c_last + b * H, c + b * Hp, sizeof(float) * H);
    }
    return ffi::Error::Success();
  });
}
#else
constexpr bool kFusedBuilt = false;
#endif

// Whether a forward pass over B rows of H units runs FusedForward: built with it,
// RNNJAX_AVX512 is not 0, and the pass saves nothing (inference) or saves every step in
// rnnjax's layout (neither checkpoints nor oneDNN's workspace) for a backward pass that will
// run on the oneDNN thread (DnnlMatmul). Below that the backward pass runs OpenBLAS on the
// calling thread, whose threads and the OpenMP team then spin against each other on the cores:
// forward+backward at 16x256x32x64 took 12.5-13.2 ms instead of 4.7-4.9 (with one thread, the
// fused forward pass measured no faster than the loops').
bool FusedOn(bool save, bool dense, int64_t checkpoint, int64_t B, int64_t H) {
  const bool saving_all = save && !dense && checkpoint == 0 && DnnlMatmul(B, H);
  return kFusedBuilt && (!save || saving_all) && EnvOn("RNNJAX_AVX512");
}

// [W_i; W_h] as one (I + H, 4H) matrix, in Work slot 0.
float* Stacked(const Work& work, const float* w_i, const float* w_h, int64_t I, int64_t H,
               int64_t G) {
  float* w = work.data();
  std::memcpy(w, w_i, sizeof(float) * I * G);
  std::memcpy(w + I * G, w_h, sizeof(float) * H * G);
  return w;
}

ffi::Error LstmForwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w_i,
                           ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> w_h,
                           ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> c0,
                           ffi::Buffer<ffi::PRED> mask, bool reverse, bool save, bool dense,
                           int64_t checkpoint, ffi::ResultBuffer<ffi::F32> ys,
                           ffi::ResultBuffer<ffi::F32> h_last, ffi::ResultBuffer<ffi::F32> c_last,
                           ffi::ResultBuffer<ffi::F32> h_prev,
                           ffi::ResultBuffer<ffi::F32> res) {
  ForwardDims f;
  if (auto err = CheckForward("LSTM", 4, x, w_i, w_h, ys->dimensions(), save && checkpoint > 0,
                              dense, &f);
      err.failure()) {
    return err;
  }
  const int64_t B = f.B, T = f.T, I = f.I, H = f.H, G = 4 * H;
#if defined(__AVX512F__)
  if (FusedOn(save, dense, checkpoint, B, H)) {
    StepOutputs o;
    if (auto err = OwnOutputs(save, 0, B, T, 2 * H, ys, h_prev, res, &o); err.failure()) {
      return err;
    }
    return FusedForward<FusedLstmCell>(B, T, I, H, reverse, x.typed_data(), w_i.typed_data(),
                                       w_h.typed_data(), bias.typed_data(), h0.typed_data(),
                                       c0.typed_data(), mask.typed_data(), o.ys, o.h_prev, o.res,
                                       h_last->typed_data(), c_last->typed_data());
  }
#endif
  if (dense) {
#ifdef RNNJAX_WITH_DNNL
    return DnnlThread::Run([&] {
      return DnnlForward<LstmCell>(B, T, I, H, reverse, save, x.typed_data(), w_i.typed_data(),
                                   bias.typed_data(), w_h.typed_data(), nullptr, h0.typed_data(),
                                   c0.typed_data(), ys->typed_data(), h_last->typed_data(),
                                   c_last->typed_data(), res->typed_data(), res->size_bytes());
    });
#else
    return NoDnnl();
#endif
  }
  const bool dnnl = DnnlMatmul(B, H);
  return OnMatmulThread(dnnl, [&]() -> ffi::Error {
    StepOutputs o;
    if (auto err = OwnOutputs(save, checkpoint, B, T, 2 * H, ys, h_prev, res, &o); err.failure()) {
      return err;
    }
    float* h = h_last->typed_data();  // the running carry lives in the outputs
    float* c = c_last->typed_data();
    std::memcpy(h, h0.typed_data(), sizeof(float) * B * H);
    std::memcpy(c, c0.typed_data(), sizeof(float) * B * H);
    // One matmul per step: [x_t, h] (B, I + H) @ [W_i; W_h] (I + H, 4H), onto the bias. (The
    // input projections of all steps as one matmul before the loop, into a (B*T, 4H) buffer,
    // measured no faster and slower at 16x256x32x64 in the bench harness.)
    Work w_work(0, (I + H) * G);
    const LstmPass p{B, T, I, H, reverse, x.typed_data(), mask.typed_data(), bias.typed_data(),
                     Stacked(w_work, w_i.typed_data(), w_h.typed_data(), I, H, G),
                     w_h.typed_data(), dnnl};
    LstmSteps(p, 0, T, h, c, o.ys, o.h_prev, o.res, Rows{T, 0}, o.ckpt, checkpoint);
    return ffi::Error::Success();
  });
}

// The transpose of the LSTM's tangent (backpropagation through time): from the cotangents of
// the outputs ys and of the final carry, the cotangents of x, W_i, b, W_h and the initial carry.
// The loop carries dh and dc; the gate cotangents dz of all steps go to a scratch array, and the
// weight gradients are three large matmuls over its B*T rows after the loop (checkpointed:
// over each segment's B*n rows, added up).
ffi::Error LstmBackwardImpl(ffi::Buffer<ffi::F32> gys, ffi::Buffer<ffi::F32> gh_last,
                            ffi::Buffer<ffi::F32> gc_last, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> w_i, ffi::Buffer<ffi::F32> bias,
                            ffi::Buffer<ffi::F32> w_h, ffi::Buffer<ffi::F32> h0,
                            ffi::Buffer<ffi::F32> c0, ffi::Buffer<ffi::PRED> mask,
                            ffi::Buffer<ffi::F32> ys, ffi::Buffer<ffi::F32> h_last,
                            ffi::Buffer<ffi::F32> c_last, ffi::Buffer<ffi::F32> h_prev,
                            ffi::Buffer<ffi::F32> res, bool reverse, bool need_dx, bool dense,
                            int64_t checkpoint, ffi::ResultBuffer<ffi::F32> gx,
                            ffi::ResultBuffer<ffi::F32> gw_i, ffi::ResultBuffer<ffi::F32> gb,
                            ffi::ResultBuffer<ffi::F32> gw_h, ffi::ResultBuffer<ffi::F32> gh0,
                            ffi::ResultBuffer<ffi::F32> gc0) {
  Dims d;
  if (auto err = CheckDims(gys.dimensions(), 1, w_h, &d); err.failure()) return err;
  const int64_t B = d.batch, T = d.steps, H = d.hidden, G = 4 * H;
  const int64_t I = x.dimensions()[2], BT = B * T;
  if (dense) {
#ifdef RNNJAX_WITH_DNNL
    const DnnlGrads g{gx->typed_data(),  gw_i->typed_data(), gb->typed_data(),
                      gw_h->typed_data(), nullptr,            gh0->typed_data(),
                      gc0->typed_data()};
    return DnnlThread::Run([&] {
      return DnnlBackward<LstmCell>(B, T, I, H, reverse, gys.typed_data(), gh_last.typed_data(),
                                    gc_last.typed_data(), x.typed_data(), w_i.typed_data(),
                                    bias.typed_data(), w_h.typed_data(), nullptr,
                                    h0.typed_data(), c0.typed_data(), ys.typed_data(),
                                    h_last.typed_data(), c_last.typed_data(), res.typed_data(), g);
    });
#else
    return NoDnnl();
#endif
  }
  const bool dnnl = DnnlMatmul(B, H);
  return OnMatmulThread(dnnl, [&]() -> ffi::Error {
    HugePages(gx->typed_data(), gx->size_bytes());
    float* gh = gh0->typed_data();  // the running cotangent of the carry lives in the outputs
    float* gc = gc0->typed_data();
    std::memcpy(gh, gh_last.typed_data(), sizeof(float) * B * H);
    std::memcpy(gc, gc_last.typed_data(), sizeof(float) * B * H);
    LstmPass p{B, T, I, H, reverse, x.typed_data(), mask.typed_data(), bias.typed_data(), nullptr,
               w_h.typed_data(), dnnl};
    if (checkpoint <= 0) {
      if (auto err = CheckDims(res.dimensions(), 6, w_h, &d); err.failure()) return err;
      Work dz_work(3, BT * G);  // the gate cotangents of all steps
      float* dz = dz_work.data();
      LstmBackSteps(p, 0, T, gys.typed_data(), res.typed_data(), Rows{T, 0}, dz, gh, gc);
      // Weight gradients over all B*T rows at once (the bias gradient is b's, as b enters dz).
      WeightGradients(p.dnnl, BT, H, G, h_prev.typed_data(), dz, nullptr, false, nullptr,
                      gw_h->typed_data(), nullptr);
      WeightGradients(p.dnnl, BT, I, G, x.typed_data(), dz, w_i.typed_data(), need_dx,
                      gx->typed_data(), gw_i->typed_data(), gb->typed_data());
      return ffi::Error::Success();
    }
    const int64_t k = checkpoint, S = (T + k - 1) / k;
    if (auto err = CheckCheckpoints(res.dimensions(), B, T, k, 2 * H); err.failure()) return err;
    Work w_work(0, (I + H) * G);
    p.w = Stacked(w_work, w_i.typed_data(), w_h.typed_data(), I, H, G);
    Work seg_work(3, B * k * (G + H + 6 * H) + 2 * B * H);  // dz, h_prev, res; the carry
    float* dz = seg_work.data();
    float* hp = dz + B * k * G;
    float* rs = hp + B * k * H;
    float* h = rs + B * k * 6 * H;
    float* c = h + B * H;
    Work xg_work(4, 2 * B * k * I);  // the segment's x rows and their gradient
    float* xg = xg_work.data();
    std::memset(gw_i->typed_data(), 0, sizeof(float) * I * G);
    std::memset(gw_h->typed_data(), 0, sizeof(float) * H * G);
    std::memset(gb->typed_data(), 0, sizeof(float) * G);
    for (int64_t index = S - 1; index >= 0; --index) {
      const Segment seg = SegmentOf(index, k, T, reverse);
      const int64_t n = seg.n();
      const Rows rows{n, seg.first};
      for (int64_t b = 0; b < B; ++b) {
        const float* at = res.typed_data() + (b * S + index) * 2 * H;
        std::memcpy(h + b * H, at, sizeof(float) * H);
        std::memcpy(c + b * H, at + H, sizeof(float) * H);
      }
      LstmSteps(p, seg.begin, seg.end, h, c, nullptr, hp, rs, rows, nullptr, k);
      LstmBackSteps(p, seg.begin, seg.end, gys.typed_data(), rs, rows, dz, gh, gc);
      WeightGradients(p.dnnl, B * n, H, G, hp, dz, nullptr, false, nullptr, gw_h->typed_data(),
                      nullptr, true);
      SegmentInputGradients(p.dnnl, B, T, I, G, seg, x.typed_data(), dz, w_i.typed_data(),
                            need_dx, xg, gx->typed_data(), gw_i->typed_data(), gb->typed_data());
    }
    return ffi::Error::Success();
  });
}


// ---------------------------------------------------------------------------------------- GRU
// PyTorch's (reset-after) GRU, gates r, z, n:
//   gi = x_t W_i + b_i, gh = h W_h + b_h (each (B, 3H)),
//   r = sigmoid(gi_r + gh_r), z = sigmoid(gi_z + gh_z), n = tanh(gi_n + r gh_n),
//   h' = (1 - z) n + z h.
// Residuals: h_prev (B, T, H) and res (B, T, 4H) = [r, z, n, gh_n].

struct GruPass {
  int64_t B, T, I, H;
  bool reverse;
  const float* x;     // (B, T, I)
  const bool* mask;   // (B, T)
  const float* w_i;   // (I, 3H)
  const float* b_i;   // (3H)
  const float* w_h;   // (H, 3H)
  const float* b_h;   // (3H)
  bool dnnl;          // matmuls with oneDNN (DnnlMatmul), on the oneDNN thread
};

// One row's gates from gi = x W_i + b_i and gh = h W_h + b_h (each 3H): r = [r, z, n, gh_n].
inline void GruGates(const float* __restrict__ a, const float* __restrict__ q,
                     float* __restrict__ r, int64_t H) {
  float* __restrict__ rr = r;
  float* __restrict__ rz = r + H;
  float* __restrict__ rn = r + 2 * H;
  float* __restrict__ rq = r + 3 * H;
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) {
    const float reset = Sigmoid(a[j] + q[j]);
    rr[j] = reset;
    rz[j] = Sigmoid(a[H + j] + q[H + j]);
    rq[j] = q[2 * H + j];
    rn[j] = Tanh(a[2 * H + j] + reset * q[2 * H + j]);
  }
}

// One row's GRU step from gi = x_t W_i + b_i and gh = h W_h + b_h: the gates into r (as
// GruGates), and where the step is real h advances; y, when given, gets the new h there and
// zeros at a padded step (whose carry is kept).
inline void GruRow(const float* __restrict__ gi, const float* __restrict__ gh,
                   float* __restrict__ h, float* __restrict__ r, float* __restrict__ y, bool real,
                   int64_t H) {
  GruGates(gi, gh, r, H);
  if (real) {
    const float* __restrict__ rz = r + H;
    const float* __restrict__ rn = r + 2 * H;
    for (int64_t j = 0; j < H; ++j) h[j] = (1.0f - rz[j]) * rn[j] + rz[j] * h[j];
    if (y != nullptr) std::memcpy(y, h, sizeof(float) * H);
  } else if (y != nullptr) {
    std::memset(y, 0, sizeof(float) * H);
  }
}

// Steps [begin, end) of a forward pass from the carry h, which they advance; ys, h_prev, res
// (at `rows`) and ckpt (B, S, H) are written when given, as in LstmSteps.
void GruSteps(const GruPass& p, int64_t begin, int64_t end, float* h, float* ys, float* h_prev,
              float* res, Rows rows, float* ckpt, int64_t k) {
  const int64_t B = p.B, T = p.T, I = p.I, H = p.H, G = 3 * H;
  const bool par = Parallel(p.dnnl, B);
  const int64_t S = ckpt != nullptr ? (T + k - 1) / k : 0;
  // Per step: gi = x_t W_i + b_i and gh = h W_h + b_h. (The input side of all steps as one
  // matmul before the loop measured 18% slower forward+backward at 32x128x64x256.)
  Work gi_work(1, B * G);
  float* gi = gi_work.data();
  Work gh_work(2, B * G);
  float* gh = gh_work.data();
  std::vector<float> gates(res != nullptr ? 0 : B * 4 * H);  // without res: one step's gates
  StepGemm input(p.dnnl, 13, p.w_i, I, G, false, B, T * I, G, 1.0f);
  StepGemm recurrent(p.dnnl, 14, p.w_h, H, G, false, B, H, G, 1.0f);

  for (int64_t s = begin; s < end; ++s) {
    const int64_t t = Position(s, T, p.reverse);
    ForEachRow(par, B, [&](int64_t b) {
      if (ckpt != nullptr && s % k == 0) {
        std::memcpy(ckpt + (b * S + s / k) * H, h + b * H, sizeof(float) * H);
      }
      std::memcpy(gi + b * G, p.b_i, sizeof(float) * G);
      std::memcpy(gh + b * G, p.b_h, sizeof(float) * G);
      if (h_prev != nullptr) std::memcpy(h_prev + rows(b, t) * H, h + b * H, sizeof(float) * H);
    });
    input(p.x + t * I, gi);
    recurrent(h, gh);
    ForEachRow(par, B, [&](int64_t b) {
      float* r = res != nullptr ? res + rows(b, t) * 4 * H : gates.data() + b * 4 * H;
      float* yb = ys != nullptr ? ys + (b * T + t) * H : nullptr;
      GruRow(gi + b * G, gh + b * G, h + b * H, r, yb, p.mask[b * T + t], H);
    });
  }
}

// Steps end - 1 down to begin of the GRU's BPTT from h_prev and res at `rows`: the running
// cotangent gh of the carry goes back through them; the cotangents of gi (input side) and gh
// (recurrent side) of each step go to dzi and dzh (., 3H) at `rows`.
void GruBackSteps(const GruPass& p, int64_t begin, int64_t end, const float* gys,
                  const float* h_prev, const float* res, Rows rows, float* dzi, float* dzh,
                  float* gh) {
  const int64_t B = p.B, T = p.T, H = p.H, G = 3 * H;
  const bool par = Parallel(p.dnnl, B);
  Work back_work(1, B * H);  // slot 1 as the forward steps': never live at once
  float* back = back_work.data();
  StepGemm recurrent(p.dnnl, 15, p.w_h, G, H, true, B, rows.stride * G, H, 0.0f);
  for (int64_t s = end - 1; s >= begin; --s) {
    const int64_t t = Position(s, T, p.reverse);
    ForEachRow(par, B, [&](int64_t b) {
      const int64_t at = rows(b, t);
      float* __restrict__ zi = dzi + at * G;
      float* __restrict__ zh = dzh + at * G;
      if (!p.mask[b * T + t]) {
        std::memset(zi, 0, sizeof(float) * G);
        std::memset(zh, 0, sizeof(float) * G);
        return;
      }
      const float* __restrict__ r = res + at * 4 * H;
      const float* __restrict__ yb = gys + (b * T + t) * H;
      const float* __restrict__ hp = h_prev + at * H;
      float* __restrict__ ghb = gh + b * H;
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) {
        const float reset = r[j], z = r[H + j], n = r[2 * H + j], q = r[3 * H + j];
        const float dh = ghb[j] + yb[j];
        const float dan = dh * (1.0f - z) * (1.0f - n * n);
        const float dar = dan * q * reset * (1.0f - reset);
        const float daz = dh * (hp[j] - n) * z * (1.0f - z);
        zi[j] = dar;
        zi[H + j] = daz;
        zi[2 * H + j] = dan;
        zh[j] = dar;
        zh[H + j] = daz;
        zh[2 * H + j] = dan * reset;
        ghb[j] = dh * z;  // the direct path; the recurrent matmul's part is added below
      }
    });
    recurrent(dzh + rows(0, t) * G, back);
    ForEachRow(par, B, [&](int64_t b) {
      if (!p.mask[b * T + t]) return;
      float* __restrict__ ghb = gh + b * H;
      const float* __restrict__ bk = back + b * H;
      for (int64_t j = 0; j < H; ++j) ghb[j] += bk[j];
    });
  }
}

ffi::Error GruForwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w_i,
                          ffi::Buffer<ffi::F32> b_i, ffi::Buffer<ffi::F32> w_h,
                          ffi::Buffer<ffi::F32> b_h, ffi::Buffer<ffi::F32> h0,
                          ffi::Buffer<ffi::PRED> mask, bool reverse, bool save, bool dense,
                          int64_t checkpoint, ffi::ResultBuffer<ffi::F32> ys,
                          ffi::ResultBuffer<ffi::F32> h_last, ffi::ResultBuffer<ffi::F32> h_prev,
                          ffi::ResultBuffer<ffi::F32> res) {
  ForwardDims f;
  if (auto err = CheckForward("GRU", 3, x, w_i, w_h, ys->dimensions(), save && checkpoint > 0,
                              dense, &f);
      err.failure()) {
    return err;
  }
  const int64_t B = f.B, T = f.T, I = f.I, H = f.H;
#if defined(__AVX512F__)
  if (FusedOn(save, dense, checkpoint, B, H)) {
    StepOutputs o;
    if (auto err = OwnOutputs(save, 0, B, T, H, ys, h_prev, res, &o); err.failure()) return err;
    const float* bi = b_i.typed_data();
    const float* bh = b_h.typed_data();
    std::vector<float> bias4(4 * H);  // [b_ir + b_hr, b_iz + b_hz, b_in, b_hn]
    for (int64_t j = 0; j < 2 * H; ++j) bias4[j] = bi[j] + bh[j];
    std::memcpy(bias4.data() + 2 * H, bi + 2 * H, sizeof(float) * H);
    std::memcpy(bias4.data() + 3 * H, bh + 2 * H, sizeof(float) * H);
    return FusedForward<FusedGruCell>(B, T, I, H, reverse, x.typed_data(), w_i.typed_data(),
                                      w_h.typed_data(), bias4.data(), h0.typed_data(), nullptr,
                                      mask.typed_data(), o.ys, o.h_prev, o.res,
                                      h_last->typed_data(), nullptr);
  }
#endif
  if (dense) {
#ifdef RNNJAX_WITH_DNNL
    return DnnlThread::Run([&] {
      return DnnlForward<GruCell>(B, T, I, H, reverse, save, x.typed_data(), w_i.typed_data(),
                                  b_i.typed_data(), w_h.typed_data(), b_h.typed_data(),
                                  h0.typed_data(), nullptr, ys->typed_data(),
                                  h_last->typed_data(), nullptr, res->typed_data(),
                                  res->size_bytes());
    });
#else
    return NoDnnl();
#endif
  }
  const bool dnnl = DnnlMatmul(B, H);
  return OnMatmulThread(dnnl, [&]() -> ffi::Error {
    StepOutputs o;
    if (auto err = OwnOutputs(save, checkpoint, B, T, H, ys, h_prev, res, &o); err.failure()) {
      return err;
    }
    float* h = h_last->typed_data();
    std::memcpy(h, h0.typed_data(), sizeof(float) * B * H);
    const GruPass p{B, T, I, H, reverse, x.typed_data(), mask.typed_data(), w_i.typed_data(),
                    b_i.typed_data(), w_h.typed_data(), b_h.typed_data(), dnnl};
    GruSteps(p, 0, T, h, o.ys, o.h_prev, o.res, Rows{T, 0}, o.ckpt, checkpoint);
    return ffi::Error::Success();
  });
}

// BPTT of the GRU: cotangents of x, W_i, b_i, W_h, b_h and h0 from those of ys and h_last.
ffi::Error GruBackwardImpl(ffi::Buffer<ffi::F32> gys, ffi::Buffer<ffi::F32> gh_last,
                           ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w_i,
                           ffi::Buffer<ffi::F32> b_i, ffi::Buffer<ffi::F32> w_h,
                           ffi::Buffer<ffi::F32> b_h, ffi::Buffer<ffi::F32> h0,
                           ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F32> ys,
                           ffi::Buffer<ffi::F32> h_last, ffi::Buffer<ffi::F32> h_prev,
                           ffi::Buffer<ffi::F32> res, bool reverse, bool need_dx, bool dense,
                           int64_t checkpoint, ffi::ResultBuffer<ffi::F32> gx,
                           ffi::ResultBuffer<ffi::F32> gw_i, ffi::ResultBuffer<ffi::F32> gb_i,
                           ffi::ResultBuffer<ffi::F32> gw_h, ffi::ResultBuffer<ffi::F32> gb_h,
                           ffi::ResultBuffer<ffi::F32> gh0) {
  Dims d;
  if (auto err = CheckDims(gys.dimensions(), 1, w_h, &d, 3); err.failure()) return err;
  const int64_t B = d.batch, T = d.steps, H = d.hidden, G = 3 * H;
  const int64_t I = x.dimensions()[2], BT = B * T;
  if (dense) {
#ifdef RNNJAX_WITH_DNNL
    const DnnlGrads g{gx->typed_data(),   gw_i->typed_data(), gb_i->typed_data(),
                      gw_h->typed_data(), gb_h->typed_data(), gh0->typed_data(),
                      nullptr};
    return DnnlThread::Run([&] {
      return DnnlBackward<GruCell>(B, T, I, H, reverse, gys.typed_data(), gh_last.typed_data(),
                                   nullptr, x.typed_data(), w_i.typed_data(), b_i.typed_data(),
                                   w_h.typed_data(), b_h.typed_data(), h0.typed_data(), nullptr,
                                   ys.typed_data(), h_last.typed_data(), nullptr,
                                   res.typed_data(), g);
    });
#else
    return NoDnnl();
#endif
  }
  const bool dnnl = DnnlMatmul(B, H);
  return OnMatmulThread(dnnl, [&]() -> ffi::Error {
    HugePages(gx->typed_data(), gx->size_bytes());
    float* gh = gh0->typed_data();
    std::memcpy(gh, gh_last.typed_data(), sizeof(float) * B * H);
    const GruPass p{B, T, I, H, reverse, x.typed_data(), mask.typed_data(), w_i.typed_data(),
                    b_i.typed_data(), w_h.typed_data(), b_h.typed_data(), dnnl};
    if (checkpoint <= 0) {
      if (auto err = CheckDims(res.dimensions(), 4, w_h, &d, 3); err.failure()) return err;
      // Cotangents of gi (input side) and gh (recurrent side) for all steps.
      Work dz_work(3, 2 * BT * G);
      float* dzi = dz_work.data();
      float* dzh = dzi + BT * G;
      GruBackSteps(p, 0, T, gys.typed_data(), h_prev.typed_data(), res.typed_data(), Rows{T, 0},
                   dzi, dzh, gh);
      WeightGradients(p.dnnl, BT, I, G, x.typed_data(), dzi, w_i.typed_data(), need_dx,
                      gx->typed_data(), gw_i->typed_data(), gb_i->typed_data());
      WeightGradients(p.dnnl, BT, H, G, h_prev.typed_data(), dzh, nullptr, false, nullptr,
                      gw_h->typed_data(), gb_h->typed_data());
      return ffi::Error::Success();
    }
    const int64_t k = checkpoint, S = (T + k - 1) / k;
    if (auto err = CheckCheckpoints(res.dimensions(), B, T, k, H); err.failure()) return err;
    Work seg_work(3, B * k * (2 * G + H + 4 * H) + B * H);  // dzi, dzh, h_prev, res; the carry
    float* dzi = seg_work.data();
    float* dzh = dzi + B * k * G;
    float* hp = dzh + B * k * G;
    float* rs = hp + B * k * H;
    float* h = rs + B * k * 4 * H;
    Work xg_work(4, 2 * B * k * I);  // the segment's x rows and their gradient
    float* xg = xg_work.data();
    std::memset(gw_i->typed_data(), 0, sizeof(float) * I * G);
    std::memset(gw_h->typed_data(), 0, sizeof(float) * H * G);
    std::memset(gb_i->typed_data(), 0, sizeof(float) * G);
    std::memset(gb_h->typed_data(), 0, sizeof(float) * G);
    for (int64_t index = S - 1; index >= 0; --index) {
      const Segment seg = SegmentOf(index, k, T, reverse);
      const int64_t n = seg.n();
      const Rows rows{n, seg.first};
      for (int64_t b = 0; b < B; ++b) {
        std::memcpy(h + b * H, res.typed_data() + (b * S + index) * H, sizeof(float) * H);
      }
      GruSteps(p, seg.begin, seg.end, h, nullptr, hp, rs, rows, nullptr, k);
      GruBackSteps(p, seg.begin, seg.end, gys.typed_data(), hp, rs, rows, dzi, dzh, gh);
      WeightGradients(p.dnnl, B * n, H, G, hp, dzh, nullptr, false, nullptr, gw_h->typed_data(),
                      gb_h->typed_data(), true);
      SegmentInputGradients(p.dnnl, B, T, I, G, seg, x.typed_data(), dzi, w_i.typed_data(),
                            need_dx, xg, gx->typed_data(), gw_i->typed_data(),
                            gb_i->typed_data());
    }
    return ffi::Error::Success();
  });
}


// ------------------------------------------------------------------------------ replay
// The outputs ys of a checkpointed forward pass, recomputed from its checkpoints ckpt
// (B, S, width). Each segment starts from its own carry, so all segments advance together:
// step j of every segment is one matmul over (segments x B) rows, in chunks of segments that
// keep the working arrays near kReplayFloats. It is a call of its own, apart from the pass that
// makes the checkpoints, so that ys is a custom call's only output: XLA computes a cotangent
// that is elementwise in ys (sum(ys ** 2), a squared error) in place over such an output, and
// beside it when ys is one element of a tuple (measured: 256 MiB more at T = 65,536, B = 4,
// H = 256).
constexpr int64_t kReplayFloats = int64_t{8} << 20;

// The rows of one chunk: segment `first + i` of example b is row i * B + b.
struct Chunk {
  int64_t first, count;
};

// A replay call's sizes, checked: ys (B, T, H), w_h (H, G H), x (B, T, I) and the
// checkpoints (B, S, width H) of k = checkpoint steps each.
struct ReplayDims {
  int64_t B, T, H, I, k, S;
};

ffi::Error CheckReplay(ffi::Span<const int64_t> ys, const ffi::Buffer<ffi::F32>& w_h,
                       int64_t gates, ffi::Span<const int64_t> x, ffi::Span<const int64_t> ckpt,
                       int64_t checkpoint, int64_t width, ReplayDims* r) {
  Dims d;
  if (auto err = CheckDims(ys, 1, w_h, &d, gates); err.failure()) return err;
  if (x.size() != 3 || x[0] != d.batch || x[1] != d.steps) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "rnnjax native replay: expected x (B, T, I) for ys (B, T, H)");
  }
  const int64_t k = checkpoint, S = k > 0 ? (d.steps + k - 1) / k : 0;
  *r = {d.batch, d.steps, d.hidden, x[2], k, S};
  return CheckCheckpoints(ckpt, d.batch, d.steps, k, width * d.hidden);
}

// Segments per chunk for rows of `row_floats` working floats each.
int64_t ChunkSegments(int64_t B, int64_t S, int64_t row_floats) {
  return std::max<int64_t>(1, std::min(S, kReplayFloats / std::max<int64_t>(1, B * row_floats)));
}

// Calls fn(row, i, b, t, live) for each row of `chunk` at step j of its segments: segment
// first + i, example b, position t; `live` is false where the segment has ended (the last one
// may be short), and t is then clamped to a valid position for the row to compute on.
template <class Fn>
void ForRows(Chunk chunk, int64_t j, int64_t k, int64_t B, int64_t T, bool reverse, Fn fn) {
  for (int64_t i = 0; i < chunk.count; ++i) {
    const int64_t s = (chunk.first + i) * k + j;
    const int64_t t = Position(std::min(s, T - 1), T, reverse);
    for (int64_t b = 0; b < B; ++b) fn(i * B + b, i, b, t, s < T);
  }
}

// Calls step(chunk, j) for every chunk of segments and every step j the chunk has.
template <class Step>
void Replay(int64_t B, int64_t T, int64_t k, int64_t row_floats, Step step) {
  const int64_t S = (T + k - 1) / k, per_chunk = ChunkSegments(B, S, row_floats);
  for (int64_t first = 0; first < S; first += per_chunk) {
    const Chunk chunk{first, std::min(per_chunk, S - first)};
    for (int64_t j = 0; j < k && chunk.first * k + j < T; ++j) step(chunk, j);
  }
}

// The LSTM's ys from checkpoints [h, c] (B, S, 2H).
ffi::Error LstmReplayImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w_i,
                          ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> w_h,
                          ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F32> ckpt, bool reverse,
                          int64_t checkpoint, ffi::ResultBuffer<ffi::F32> ys) {
  ReplayDims d;
  if (auto err = CheckReplay(ys->dimensions(), w_h, 4, x.dimensions(), ckpt.dimensions(),
                             checkpoint, 2, &d);
      err.failure()) {
    return err;
  }
  const int64_t B = d.B, T = d.T, H = d.H, G = 4 * H, I = d.I, K = I + H, k = d.k, S = d.S;
  const bool dnnl = DnnlMatmul(B, H);
  return OnMatmulThread(dnnl, [&]() -> ffi::Error {
    Work w_work(0, K * G);
    const float* w = Stacked(w_work, w_i.typed_data(), w_h.typed_data(), I, H, G);
    const int64_t row_floats = K + G + 2 * H;
    const int64_t rows_max = B * ChunkSegments(B, S, row_floats);
    Work work(1, rows_max * row_floats);
    float* xh = work.data();
    float* z = xh + rows_max * K;
    float* h = z + rows_max * G;
    float* c = h + rows_max * H;
    std::vector<float> r(6 * H);
    const float* px = x.typed_data();
    const float* pc = ckpt.typed_data();
    const bool* pm = mask.typed_data();
    float* py = ys->typed_data();
    HugePages(py, ys->size_bytes());
    Replay(B, T, k, row_floats, [&](Chunk chunk, int64_t j) {
      ForRows(chunk, j, k, B, T, reverse, [&](int64_t row, int64_t i, int64_t b, int64_t t, bool) {
        if (j == 0) {
          const float* at = pc + (b * S + chunk.first + i) * 2 * H;
          std::memcpy(h + row * H, at, sizeof(float) * H);
          std::memcpy(c + row * H, at + H, sizeof(float) * H);
        }
        std::memcpy(xh + row * K, px + (b * T + t) * I, sizeof(float) * I);
        std::memcpy(xh + row * K + I, h + row * H, sizeof(float) * H);
        std::memcpy(z + row * G, bias.typed_data(), sizeof(float) * G);
      });
      const int64_t R = chunk.count * B;
      if (K > 0) Gemm(dnnl, false, false, R, G, K, xh, K, w, G, 1.0f, z, G);
      ForRows(chunk, j, k, B, T, reverse, [&](int64_t row, int64_t, int64_t b, int64_t t,
                                              bool live) {
        if (!live) return;
        LstmRow(z + row * G, c + row * H, h + row * H, r.data(), py + (b * T + t) * H,
                pm[b * T + t], H);
      });
    });
    return ffi::Error::Success();
  });
}

// The GRU's ys from checkpoints h (B, S, H).
ffi::Error GruReplayImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w_i,
                         ffi::Buffer<ffi::F32> b_i, ffi::Buffer<ffi::F32> w_h,
                         ffi::Buffer<ffi::F32> b_h, ffi::Buffer<ffi::PRED> mask,
                         ffi::Buffer<ffi::F32> ckpt, bool reverse, int64_t checkpoint,
                         ffi::ResultBuffer<ffi::F32> ys) {
  ReplayDims d;
  if (auto err = CheckReplay(ys->dimensions(), w_h, 3, x.dimensions(), ckpt.dimensions(),
                             checkpoint, 1, &d);
      err.failure()) {
    return err;
  }
  const int64_t B = d.B, T = d.T, H = d.H, G = 3 * H, I = d.I, k = d.k, S = d.S;
  const bool dnnl = DnnlMatmul(B, H);
  return OnMatmulThread(dnnl, [&]() -> ffi::Error {
    const int64_t row_floats = I + 2 * G + H;
    const int64_t rows_max = B * ChunkSegments(B, S, row_floats);
    Work work(1, rows_max * row_floats);
    float* xr = work.data();
    float* gi = xr + rows_max * I;
    float* gh = gi + rows_max * G;
    float* h = gh + rows_max * G;
    std::vector<float> r(4 * H);
    const float* px = x.typed_data();
    const float* pc = ckpt.typed_data();
    const bool* pm = mask.typed_data();
    float* py = ys->typed_data();
    HugePages(py, ys->size_bytes());
    Replay(B, T, k, row_floats, [&](Chunk chunk, int64_t j) {
      ForRows(chunk, j, k, B, T, reverse, [&](int64_t row, int64_t i, int64_t b, int64_t t, bool) {
        if (j == 0) {
          std::memcpy(h + row * H, pc + (b * S + chunk.first + i) * H, sizeof(float) * H);
        }
        std::memcpy(xr + row * I, px + (b * T + t) * I, sizeof(float) * I);
        std::memcpy(gi + row * G, b_i.typed_data(), sizeof(float) * G);
        std::memcpy(gh + row * G, b_h.typed_data(), sizeof(float) * G);
      });
      const int64_t R = chunk.count * B;
      if (I > 0) Gemm(dnnl, false, false, R, G, I, xr, I, w_i.typed_data(), G, 1.0f, gi, G);
      if (H > 0) Gemm(dnnl, false, false, R, G, H, h, H, w_h.typed_data(), G, 1.0f, gh, G);
      ForRows(chunk, j, k, B, T, reverse, [&](int64_t row, int64_t, int64_t b, int64_t t,
                                              bool live) {
        if (!live) return;
        GruRow(gi + row * G, gh + row * G, h + row * H, r.data(), py + (b * T + t) * H,
               pm[b * T + t], H);
      });
    });
    return ffi::Error::Success();
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnjaxLstmForward, LstmForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_i
                                  .Arg<ffi::Buffer<ffi::F32>>()   // b
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_h
                                  .Arg<ffi::Buffer<ffi::F32>>()   // h0
                                  .Arg<ffi::Buffer<ffi::F32>>()   // c0
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask
                                  .Attr<bool>("reverse")
                                  .Attr<bool>("save")
                                  .Attr<bool>("dense")
                                  .Attr<int64_t>("checkpoint")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // ys
                                  .Ret<ffi::Buffer<ffi::F32>>()   // h_last
                                  .Ret<ffi::Buffer<ffi::F32>>()   // c_last
                                  .Ret<ffi::Buffer<ffi::F32>>()   // h_prev
                                  .Ret<ffi::Buffer<ffi::F32>>()   // res
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnjaxLstmBackward, LstmBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // gys
                                  .Arg<ffi::Buffer<ffi::F32>>()   // gh_last
                                  .Arg<ffi::Buffer<ffi::F32>>()   // gc_last
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_i
                                  .Arg<ffi::Buffer<ffi::F32>>()   // b
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_h
                                  .Arg<ffi::Buffer<ffi::F32>>()   // h0
                                  .Arg<ffi::Buffer<ffi::F32>>()   // c0
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask
                                  .Arg<ffi::Buffer<ffi::F32>>()   // ys
                                  .Arg<ffi::Buffer<ffi::F32>>()   // h_last
                                  .Arg<ffi::Buffer<ffi::F32>>()   // c_last
                                  .Arg<ffi::Buffer<ffi::F32>>()   // h_prev
                                  .Arg<ffi::Buffer<ffi::F32>>()   // res
                                  .Attr<bool>("reverse")
                                  .Attr<bool>("need_dx")
                                  .Attr<bool>("dense")
                                  .Attr<int64_t>("checkpoint")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // gx
                                  .Ret<ffi::Buffer<ffi::F32>>()   // gw_i
                                  .Ret<ffi::Buffer<ffi::F32>>()   // gb
                                  .Ret<ffi::Buffer<ffi::F32>>()   // gw_h
                                  .Ret<ffi::Buffer<ffi::F32>>()   // gh0
                                  .Ret<ffi::Buffer<ffi::F32>>()   // gc0
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnjaxGruForward, GruForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_i
                                  .Arg<ffi::Buffer<ffi::F32>>()   // b_i
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_h
                                  .Arg<ffi::Buffer<ffi::F32>>()   // b_h
                                  .Arg<ffi::Buffer<ffi::F32>>()   // h0
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask
                                  .Attr<bool>("reverse")
                                  .Attr<bool>("save")
                                  .Attr<bool>("dense")
                                  .Attr<int64_t>("checkpoint")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // ys
                                  .Ret<ffi::Buffer<ffi::F32>>()   // h_last
                                  .Ret<ffi::Buffer<ffi::F32>>()   // h_prev
                                  .Ret<ffi::Buffer<ffi::F32>>()   // res
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnjaxGruBackward, GruBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // gys
                                  .Arg<ffi::Buffer<ffi::F32>>()   // gh_last
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_i
                                  .Arg<ffi::Buffer<ffi::F32>>()   // b_i
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_h
                                  .Arg<ffi::Buffer<ffi::F32>>()   // b_h
                                  .Arg<ffi::Buffer<ffi::F32>>()   // h0
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask
                                  .Arg<ffi::Buffer<ffi::F32>>()   // ys
                                  .Arg<ffi::Buffer<ffi::F32>>()   // h_last
                                  .Arg<ffi::Buffer<ffi::F32>>()   // h_prev
                                  .Arg<ffi::Buffer<ffi::F32>>()   // res
                                  .Attr<bool>("reverse")
                                  .Attr<bool>("need_dx")
                                  .Attr<bool>("dense")
                                  .Attr<int64_t>("checkpoint")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // gx
                                  .Ret<ffi::Buffer<ffi::F32>>()   // gw_i
                                  .Ret<ffi::Buffer<ffi::F32>>()   // gb_i
                                  .Ret<ffi::Buffer<ffi::F32>>()   // gw_h
                                  .Ret<ffi::Buffer<ffi::F32>>()   // gb_h
                                  .Ret<ffi::Buffer<ffi::F32>>()   // gh0
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnjaxLstmReplay, LstmReplayImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_i
                                  .Arg<ffi::Buffer<ffi::F32>>()   // b
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_h
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask
                                  .Arg<ffi::Buffer<ffi::F32>>()   // ckpt
                                  .Attr<bool>("reverse")
                                  .Attr<int64_t>("checkpoint")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // ys
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnjaxGruReplay, GruReplayImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_i
                                  .Arg<ffi::Buffer<ffi::F32>>()   // b_i
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_h
                                  .Arg<ffi::Buffer<ffi::F32>>()   // b_h
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask
                                  .Arg<ffi::Buffer<ffi::F32>>()   // ckpt
                                  .Attr<bool>("reverse")
                                  .Attr<int64_t>("checkpoint")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // ys
);

extern "C" {
// Called once from Python with the address of cblas_sgemm.
__attribute__((visibility("default"))) void rnnjax_set_sgemm(void* fn) {
  g_sgemm = reinterpret_cast<SgemmFn>(fn);
}

// Whether this build runs unmasked LSTMs on oneDNN (the dense mode).
__attribute__((visibility("default"))) int rnnjax_has_onednn() {
#ifdef RNNJAX_WITH_DNNL
  return 1;
#else
  return 0;
#endif
}

// Whether this build has the AVX-512 loops (FusedForward), and how many passes they have run.
__attribute__((visibility("default"))) int rnnjax_has_avx512() { return kFusedBuilt; }
__attribute__((visibility("default"))) int64_t rnnjax_avx512_passes() {
#if defined(__AVX512F__)
  return g_fused_passes.load();
#else
  return 0;
#endif
}

// Bytes of a dense LSTM's (gru = 0) or GRU's (gru = 1) saved workspace for a (B, T, I) input
// and H units; -1 without oneDNN or on failure.
__attribute__((visibility("default"))) int64_t rnnjax_workspace_bytes(
    int gru, int64_t B, int64_t T, int64_t I, int64_t H, int reverse) {
#ifdef RNNJAX_WITH_DNNL
  return gru ? WorkspaceBytes<GruCell>(B, T, I, H, reverse != 0)
             : WorkspaceBytes<LstmCell>(B, T, I, H, reverse != 0);
#else
  return -1;
#endif
}
}
