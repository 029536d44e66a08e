// rnnjax's CPU kernels: the recurrent loops of a float32 LSTM and GRU, forward and backward, as
// XLA FFI handlers (rnnjax/_native/__init__.py registers them; rnnjax/cells/_native uses them).
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
// mode: the unmasked sequences Python chooses for it (onednn_rnn.cc). Compiled
// for a CPU with AVX-512, forward passes (inference, and training's from 4096 units per step)
// run loops that fuse each step's gate arithmetic into its matmul instead (FusedForward, "the
// AVX-512 loops", fused.cc).
//
// The library, file by file (this header declares what they share):
//   ffi.cc          the FFI handlers: each call's checks and which loops run it
//   lstm_loops.cc   rnnjax's own loops for the LSTM: forward steps, BPTT, checkpointed segments
//   gru_loops.cc    the same for the GRU
//   checkpoints.cc  what the checkpointed passes of both share, and the replay of their ys
//   fused.cc        the AVX-512 loops (FusedForward)
//   gates.h         one row's gate arithmetic, inline: scalar, and on 16 lanes (fused.cc)
//   matmul.cc       the own loops' matrix products: OpenBLAS's sgemm or oneDNN's matmul
//   onednn_rnn.cc   the dense mode: oneDNN's LSTM and GRU primitives
//   onednn.cc/.h    oneDNN's engine and stream, and the one thread that calls oneDNN
//   memory.cc       working arrays (Work), huge pages, switches read from the environment
// Everything is in namespace rnnjax, hidden from other libraries (setup.py compiles with
// -fvisibility=hidden): ffi.cc exports the handlers and the C functions Python calls.

#ifndef RNNJAX_NATIVE_RNN_CPU_H_
#define RNNJAX_NATIVE_RNN_CPU_H_

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace rnnjax {

namespace ffi = xla::ffi;

// ------------------------------------------------------------ working memory (memory.cc)
// A kernel's working array, not initialized. Up to kKeepBytes it is a per-thread buffer kept
// between calls (a fresh large allocation is a fresh mmap, and touching it costs a page fault
// per 4 KiB: measured as ~25% of a forward pass, and oneDNN's LSTM inference scratchpad at
// 64x64x128x512 is 70 MiB); above that it is allocated for the call and freed after it, so a
// large run does not leave gigabytes behind.
class Work {
 public:
  static constexpr size_t kKeepBytes = size_t{256} << 20;
  static constexpr int kSlots = 16;

  Work(int slot, size_t n);  // n floats in `slot` (memory.cc)
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

// Whether a switch in the environment is on: unset, or anything but 0, false, no, off (as
// rnnjax._native reads them). Read per call, without allocating.
bool EnvOn(const char* name);

// Asks the kernel for huge pages behind an output array before anything touches it (only for
// arrays of 32 MiB or more; memory.cc says why). RNNJAX_HUGEPAGES=0 (read per call) turns it off.
void HugePages(void* data, size_t bytes);

// ------------------------------------------------------------------------ per-call checks
struct Dims {
  int64_t batch, steps, hidden;
};

// `seq` is a (B, T, width * H) array, `w_h` the (H, gates * H) recurrent weights. (ffi.cc)
ffi::Error CheckDims(ffi::Span<const int64_t> seq, int64_t width,
                     const ffi::Buffer<ffi::F32>& w_h, Dims* d, int64_t gates = 4);

// ckpt is (B, S, width): the checkpoints of a pass of T steps, one every k (S = ceil(T / k))
// (checkpoints.cc).
ffi::Error CheckCheckpoints(ffi::Span<const int64_t> ckpt, int64_t B, int64_t T, int64_t k,
                            int64_t width);

// The arrays a forward pass of rnnjax's loops writes step by step (null: not written), each
// first advised into huge pages: ys unless checkpointed; h_prev and res when every step is
// saved; ckpt, the checkpoints (B, S, width) in res, when checkpointed.
struct StepOutputs {
  float *ys, *h_prev, *res, *ckpt;
};

// StepOutputs of a forward pass from its outputs; `width`: a checkpoint's floats (memory.cc).
ffi::Error OwnOutputs(bool save, int64_t checkpoint, int64_t B, int64_t T, int64_t width,
                      ffi::ResultBuffer<ffi::F32>& ys, ffi::ResultBuffer<ffi::F32>& h_prev,
                      ffi::ResultBuffer<ffi::F32>& res, StepOutputs* o);

// ---------------------------------------------------------------- matrix products (matmul.cc)
using SgemmFn = void (*)(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                         const float* a, int lda, const float* b, int ldb, float beta, float* c,
                         int ldc);
extern SgemmFn g_sgemm;  // cblas_sgemm, whose address Python passes in (rnnjax_set_sgemm)

// Whether a pass of rnnjax's own loops over B rows of H units does its matmuls with oneDNN, on
// the oneDNN thread (from 4096 units per step; matmul.cc says why), read per call.
bool DnnlMatmul(int64_t B, int64_t H);

// Runs a pass of the own loops where their matmuls want it: the oneDNN thread, or right here.
// (An exception must not leave the oneDNN thread: it becomes the call's error.)
ffi::Error OnMatmulThread(bool dnnl, const std::function<ffi::Error()>& pass);

// Row-major C (m, n) = A op(B) + beta C, as cblas_sgemm with alpha 1.
void Gemm(bool dnnl, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* a,
          int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

// The per-step matmul of a pass, C (M, N) = A (M, K) op(W) + beta C, with one W for the whole
// pass: op(W) = W (K, N), or W^T of a (N, K) W (`trans`). With oneDNN, W is packed once into
// its matmul kernels' blocked layout (Work `slot`); matmul.cc says why.
class StepGemm {
 public:
  StepGemm(bool dnnl, int slot, const float* w, int64_t K, int64_t N, bool trans, int64_t M,
           int64_t lda, int64_t ldc, float beta);
  ~StepGemm();
  void operator()(const float* a, float* c);

 private:
  struct Packed;  // oneDNN's matmul and W packed for it (matmul.cc); null: OpenBLAS does it
  const float* w_;
  int64_t K_, N_, M_, lda_, ldc_;
  float beta_;
  bool trans_;
  std::unique_ptr<Packed> packed_;
};

// After a backward loop: from the gate cotangents dz (rows, G) of all steps and the inputs
// `in` (rows, K) that met the weights W (K, G), the weight gradient in^T dz, the bias gradient
// (column sums of dz; skipped when db is null) and, if `need_dx`, the input gradient dz W^T.
// With `accumulate`, the weight and bias gradients are added to dw and db (a checkpointed
// pass's segments); dx is written either way.
void WeightGradients(bool dnnl, int64_t rows, int64_t K, int64_t G, const float* in,
                     const float* dz, const float* w, bool need_dx, float* dx, float* dw,
                     float* db, bool accumulate = false);

// [W_i; W_h] as one (I + H, 4H) matrix, in Work slot 0.
float* Stacked(const Work& work, const float* w_i, const float* w_h, int64_t I, int64_t H,
               int64_t G);

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

inline Segment SegmentOf(int64_t index, int64_t k, int64_t T, bool reverse) {
  const int64_t begin = index * k, end = std::min(T, begin + k);
  return {begin, end, reverse ? T - end : begin};
}

// A segment's share of the input-side gradients: x's rows of the segment (n per example,
// gathered into xg (B n, I)) meet the gate cotangents dz (B n, G) in one matmul each way:
// W_i's and the bias's gradients are added to gw_i and gb, and dz W_i^T goes to gx's rows.
// (checkpoints.cc)
void SegmentInputGradients(bool dnnl, int64_t B, int64_t T, int64_t I, int64_t G, Segment seg,
                           const float* x, const float* dz, const float* w_i, bool need_dx,
                           float* xg, float* gx, float* gw_i, float* gb);

// The passes of the own loops (lstm_loops.cc, gru_loops.cc), from a handler's checked operands
// (B rows of T steps, I inputs, H units), each run where its matmuls want it (OnMatmulThread).
ffi::Error LstmLoopsForward(int64_t B, int64_t T, int64_t I, int64_t H, bool reverse, bool save,
                            int64_t checkpoint, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> w_i, ffi::Buffer<ffi::F32> bias,
                            ffi::Buffer<ffi::F32> w_h, ffi::Buffer<ffi::F32> h0,
                            ffi::Buffer<ffi::F32> c0, ffi::Buffer<ffi::PRED> mask,
                            ffi::ResultBuffer<ffi::F32> ys, ffi::ResultBuffer<ffi::F32> h_last,
                            ffi::ResultBuffer<ffi::F32> c_last,
                            ffi::ResultBuffer<ffi::F32> h_prev, ffi::ResultBuffer<ffi::F32> res);

ffi::Error LstmLoopsBackward(int64_t B, int64_t T, int64_t I, int64_t H, bool reverse,
                             bool need_dx, int64_t checkpoint, ffi::Buffer<ffi::F32> gys,
                             ffi::Buffer<ffi::F32> gh_last, ffi::Buffer<ffi::F32> gc_last,
                             ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w_i,
                             ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> w_h,
                             ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F32> h_prev,
                             ffi::Buffer<ffi::F32> res, ffi::ResultBuffer<ffi::F32> gx,
                             ffi::ResultBuffer<ffi::F32> gw_i, ffi::ResultBuffer<ffi::F32> gb,
                             ffi::ResultBuffer<ffi::F32> gw_h, ffi::ResultBuffer<ffi::F32> gh0,
                             ffi::ResultBuffer<ffi::F32> gc0);

ffi::Error GruLoopsForward(int64_t B, int64_t T, int64_t I, int64_t H, bool reverse, bool save,
                           int64_t checkpoint, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w_i,
                           ffi::Buffer<ffi::F32> b_i, ffi::Buffer<ffi::F32> w_h,
                           ffi::Buffer<ffi::F32> b_h, ffi::Buffer<ffi::F32> h0,
                           ffi::Buffer<ffi::PRED> mask, ffi::ResultBuffer<ffi::F32> ys,
                           ffi::ResultBuffer<ffi::F32> h_last, ffi::ResultBuffer<ffi::F32> h_prev,
                           ffi::ResultBuffer<ffi::F32> res);

ffi::Error GruLoopsBackward(int64_t B, int64_t T, int64_t I, int64_t H, bool reverse,
                            bool need_dx, int64_t checkpoint, ffi::Buffer<ffi::F32> gys,
                            ffi::Buffer<ffi::F32> gh_last, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> w_i, ffi::Buffer<ffi::F32> b_i,
                            ffi::Buffer<ffi::F32> w_h, ffi::Buffer<ffi::F32> b_h,
                            ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F32> h_prev,
                            ffi::Buffer<ffi::F32> res, ffi::ResultBuffer<ffi::F32> gx,
                            ffi::ResultBuffer<ffi::F32> gw_i, ffi::ResultBuffer<ffi::F32> gb_i,
                            ffi::ResultBuffer<ffi::F32> gw_h, ffi::ResultBuffer<ffi::F32> gb_h,
                            ffi::ResultBuffer<ffi::F32> gh0);

// The replay calls (checkpoints.cc): ys of a checkpointed forward pass, from its checkpoints.
ffi::Error LstmReplayImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w_i,
                          ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> w_h,
                          ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F32> ckpt, bool reverse,
                          int64_t checkpoint, ffi::ResultBuffer<ffi::F32> ys);

ffi::Error GruReplayImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w_i,
                         ffi::Buffer<ffi::F32> b_i, ffi::Buffer<ffi::F32> w_h,
                         ffi::Buffer<ffi::F32> b_h, ffi::Buffer<ffi::PRED> mask,
                         ffi::Buffer<ffi::F32> ckpt, bool reverse, int64_t checkpoint,
                         ffi::ResultBuffer<ffi::F32> ys);

// ------------------------------------------------------------ the AVX-512 loops (fused.cc)
#if defined(__AVX512F__)
constexpr bool kFusedBuilt = true;
struct FusedLstmCell;  // the two cells on 16 lanes (gates.h)
struct FusedGruCell;

// A whole forward pass: ys, h_prev and res when given (saving), and the final carry into
// h_last (and the LSTM's c_last; c0 and c_last are null for the GRU). bias4 as in PackPanels.
template <class Cell>
ffi::Error FusedForward(int64_t B, int64_t T, int64_t I, int64_t H, bool reverse,
                        const float* x, const float* w_i, const float* w_h, const float* bias4,
                        const float* h0, const float* c0, const bool* mask, float* ys,
                        float* h_prev, float* res, float* h_last, float* c_last);

#else
constexpr bool kFusedBuilt = false;
#endif

// ------------------------------------------------------------------------ pass counters
// How many passes of each kind the kernels ran in this process: which code ran, for the tests
// (every branch of the dispatch must be reached) and benchmarks. rnnjax._native.PASSES names
// them in this order (rnnjax_pass_count(kind) reads one).
enum Pass : int {
  kLoopsForward,         // rnnjax's loops: a forward pass saving nothing or every step
  kLoopsBackward,        // rnnjax's loops: BPTT over every saved step
  kCheckpointForward,    // rnnjax's loops: a forward pass keeping the carry every k steps
  kCheckpointBackward,   // rnnjax's loops: BPTT recomputing each k-step segment
  kReplay,               // the ys of a checkpointed pass, recomputed from its checkpoints
  kLoopsOnednnMatmul,    // of the five above, passes whose matmuls ran on oneDNN (DnnlMatmul)
  kFused,                // the AVX-512 loops (FusedForward), any thread count
  kFusedByPanels,        // of which on several threads, each with some of the panels
  kFusedByRows,          // of which on several threads, each with some of the rows
  kOnednnForward,        // oneDNN's RNN primitive, forward (the dense mode)
  kOnednnBackward,       // oneDNN's RNN primitive, backward
  kPassKinds
};
void CountPass(Pass kind);
int64_t PassCount(int kind);  // 0 for a kind out of range

// Whether a forward pass over B rows of H units runs FusedForward (read per call; fused.cc says
// when and why).
bool FusedOn(bool save, bool dense, int64_t checkpoint, int64_t B, int64_t H);

// ------------------------------------------------------ the dense mode (onednn_rnn.cc)
#ifdef RNNJAX_WITH_DNNL
struct DnnlLstm;  // oneDNN's LSTM and (linear-before-reset) GRU primitives (onednn_rnn.cc)
struct DnnlGru;

// Runs task on the one thread that calls oneDNN (onednn.cc says why) and returns its result.
ffi::Error OnDnnlThread(const std::function<ffi::Error()>& task);

// Bytes of oneDNN's training workspace for this shape (the dense `res`), or -1 on failure.
template <class Cell>
int64_t WorkspaceBytes(int64_t B, int64_t T, int64_t I, int64_t H, bool reverse);

// The dense forward pass. c0 and c_last are the LSTM's cell state (null for the GRU); b_h is
// the GRU's second bias (null for the LSTM).
template <class Cell>
ffi::Error DnnlForward(int64_t B, int64_t T, int64_t I, int64_t H, bool reverse, bool save,
                       const float* x, const float* w_i, const float* b, const float* w_h,
                       const float* b_h, const float* h0, const float* c0, float* ys,
                       float* h_last, float* c_last, float* res, size_t res_bytes);

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
                        const DnnlGrads& g);
#endif  // RNNJAX_WITH_DNNL

}  // namespace rnnjax

#endif  // RNNJAX_NATIVE_RNN_CPU_H_
