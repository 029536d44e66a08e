// The XLA FFI handlers (rnnjax/_native/__init__.py registers them) and the C functions Python
// calls. Per call, a handler checks its operands and picks the loops that run it: the AVX-512
// loops (fused.cc) where FusedOn says so, oneDNN's RNN primitives in the dense mode
// (onednn_rnn.cc; rnnjax.cells chooses it), else rnnjax's own loops (lstm_loops.cc,
// gru_loops.cc).

#include <cstring>
#include <string>
#include <vector>

#include "rnn_cpu.h"

namespace rnnjax {

ffi::Error CheckDims(ffi::Span<const int64_t> seq, int64_t width,
                     const ffi::Buffer<ffi::F32>& w_h, Dims* d, int64_t gates) {
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

namespace {

ffi::Error NoDnnl() {
  return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                    "rnnjax native kernels: dense mode needs oneDNN, and this build has none");
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

// The LSTM's forward pass: the AVX-512 loops, oneDNN's primitive (dense) or lstm_loops.cc's.
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
  const int64_t B = f.B, T = f.T, I = f.I, H = f.H;
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
    CountPass(kOnednnForward);
    return OnDnnlThread([&] {
      return DnnlForward<DnnlLstm>(B, T, I, H, reverse, save, x.typed_data(), w_i.typed_data(),
                                   bias.typed_data(), w_h.typed_data(), nullptr, h0.typed_data(),
                                   c0.typed_data(), ys->typed_data(), h_last->typed_data(),
                                   c_last->typed_data(), res->typed_data(), res->size_bytes());
    });
#else
    return NoDnnl();
#endif
  }
  CountPass(save && checkpoint > 0 ? kCheckpointForward : kLoopsForward);
  return LstmLoopsForward(B, T, I, H, reverse, save, checkpoint, x, w_i, bias, w_h, h0, c0, mask,
                          ys, h_last, c_last, h_prev, res);
}

// The LSTM's backward pass: oneDNN's in the dense mode, else lstm_loops.cc's BPTT.
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
  const int64_t B = d.batch, T = d.steps, H = d.hidden;
  const int64_t I = x.dimensions()[2];
  if (dense) {
#ifdef RNNJAX_WITH_DNNL
    const DnnlGrads g{gx->typed_data(),  gw_i->typed_data(), gb->typed_data(),
                      gw_h->typed_data(), nullptr,            gh0->typed_data(),
                      gc0->typed_data()};
    CountPass(kOnednnBackward);
    return OnDnnlThread([&] {
      return DnnlBackward<DnnlLstm>(B, T, I, H, reverse, gys.typed_data(), gh_last.typed_data(),
                                    gc_last.typed_data(), x.typed_data(), w_i.typed_data(),
                                    bias.typed_data(), w_h.typed_data(), nullptr,
                                    h0.typed_data(), c0.typed_data(), ys.typed_data(),
                                    h_last.typed_data(), c_last.typed_data(), res.typed_data(), g);
    });
#else
    return NoDnnl();
#endif
  }
  CountPass(checkpoint > 0 ? kCheckpointBackward : kLoopsBackward);
  return LstmLoopsBackward(B, T, I, H, reverse, need_dx, checkpoint, gys, gh_last, gc_last, x,
                           w_i, bias, w_h, mask, h_prev, res, gx, gw_i, gb, gw_h, gh0, gc0);
}

// The GRU's forward pass: the AVX-512 loops, oneDNN's primitive (dense) or gru_loops.cc's.
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
    CountPass(kOnednnForward);
    return OnDnnlThread([&] {
      return DnnlForward<DnnlGru>(B, T, I, H, reverse, save, x.typed_data(), w_i.typed_data(),
                                  b_i.typed_data(), w_h.typed_data(), b_h.typed_data(),
                                  h0.typed_data(), nullptr, ys->typed_data(),
                                  h_last->typed_data(), nullptr, res->typed_data(),
                                  res->size_bytes());
    });
#else
    return NoDnnl();
#endif
  }
  CountPass(save && checkpoint > 0 ? kCheckpointForward : kLoopsForward);
  return GruLoopsForward(B, T, I, H, reverse, save, checkpoint, x, w_i, b_i, w_h, b_h, h0, mask,
                         ys, h_last, h_prev, res);
}

// The GRU's backward pass: oneDNN's in the dense mode, else gru_loops.cc's BPTT.
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
  const int64_t B = d.batch, T = d.steps, H = d.hidden;
  const int64_t I = x.dimensions()[2];
  if (dense) {
#ifdef RNNJAX_WITH_DNNL
    const DnnlGrads g{gx->typed_data(),   gw_i->typed_data(), gb_i->typed_data(),
                      gw_h->typed_data(), gb_h->typed_data(), gh0->typed_data(),
                      nullptr};
    CountPass(kOnednnBackward);
    return OnDnnlThread([&] {
      return DnnlBackward<DnnlGru>(B, T, I, H, reverse, gys.typed_data(), gh_last.typed_data(),
                                   nullptr, x.typed_data(), w_i.typed_data(), b_i.typed_data(),
                                   w_h.typed_data(), b_h.typed_data(), h0.typed_data(), nullptr,
                                   ys.typed_data(), h_last.typed_data(), nullptr,
                                   res.typed_data(), g);
    });
#else
    return NoDnnl();
#endif
  }
  CountPass(checkpoint > 0 ? kCheckpointBackward : kLoopsBackward);
  return GruLoopsBackward(B, T, I, H, reverse, need_dx, checkpoint, gys, gh_last, x, w_i, b_i,
                          w_h, b_h, mask, h_prev, res, gx, gw_i, gb_i, gw_h, gb_h, gh0);
}

}  // namespace
}  // namespace rnnjax

namespace ffi = xla::ffi;

// The handlers and the C functions are the library's exported symbols; the rest is hidden.
#pragma GCC visibility push(default)

XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnjaxLstmForward, rnnjax::LstmForwardImpl,
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnjaxLstmBackward, rnnjax::LstmBackwardImpl,
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnjaxGruForward, rnnjax::GruForwardImpl,
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnjaxGruBackward, rnnjax::GruBackwardImpl,
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnjaxLstmReplay, rnnjax::LstmReplayImpl,
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnjaxGruReplay, rnnjax::GruReplayImpl,
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

namespace rnnjax {

namespace {
std::atomic<int64_t> g_passes[kPassKinds];
}  // namespace

void CountPass(Pass kind) { g_passes[kind].fetch_add(1, std::memory_order_relaxed); }

int64_t PassCount(int kind) {
  return kind >= 0 && kind < kPassKinds ? g_passes[kind].load(std::memory_order_relaxed) : 0;
}

}  // namespace rnnjax

extern "C" {
// Called once from Python with the address of cblas_sgemm.
__attribute__((visibility("default"))) void rnnjax_set_sgemm(void* fn) {
  rnnjax::g_sgemm = reinterpret_cast<rnnjax::SgemmFn>(fn);
}

// Whether this build runs unmasked LSTMs on oneDNN (the dense mode).
__attribute__((visibility("default"))) int rnnjax_has_onednn() {
#ifdef RNNJAX_WITH_DNNL
  return 1;
#else
  return 0;
#endif
}

// Whether this build has the AVX-512 loops (FusedForward).
__attribute__((visibility("default"))) int rnnjax_has_avx512() { return rnnjax::kFusedBuilt; }

// The pass counters (rnn_cpu.h's Pass): how many kinds there are, and one kind's count.
__attribute__((visibility("default"))) int rnnjax_pass_kinds() { return rnnjax::kPassKinds; }
__attribute__((visibility("default"))) int64_t rnnjax_pass_count(int kind) {
  return rnnjax::PassCount(kind);
}

// Bytes of a dense LSTM's (gru = 0) or GRU's (gru = 1) saved workspace for a (B, T, I) input
// and H units; -1 without oneDNN or on failure.
__attribute__((visibility("default"))) int64_t rnnjax_workspace_bytes(
    int gru, int64_t B, int64_t T, int64_t I, int64_t H, int reverse) {
#ifdef RNNJAX_WITH_DNNL
  return gru ? rnnjax::WorkspaceBytes<rnnjax::DnnlGru>(B, T, I, H, reverse != 0)
             : rnnjax::WorkspaceBytes<rnnjax::DnnlLstm>(B, T, I, H, reverse != 0);
#else
  return -1;
#endif
}
}
#pragma GCC visibility pop
