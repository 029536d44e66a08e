// rnnjax's CPU kernels: the recurrent loop of a float32 LSTM, forward and backward, as XLA FFI
// handlers (see rnnjax/_native/__init__.py for how they are registered and used).
//
// Why: XLA's CPU backend runs a scanned LSTM step as ~45 small thunks (BENCHMARKS.md), and a
// third of the time goes to per-op overhead. Here one call runs the whole loop: one sgemm per
// step for the recurrent projection and one fused pass over the gates, as PyTorch/oneDNN do.
// Only the recurrence is native; the input projection x @ W_i + b and every weight gradient are
// single large matmuls that XLA does before and after the loop.
//
// Layout (row-major, batch first, B rows of T steps):
//   a      (B, T, 4H)  input projection x_t W_i + b, gates in the order i, f, g, o
//   w_h    (H, 4H)     recurrent weights
//   h0, c0 (B, H)      initial carry
//   mask   (B, T)      true at real steps; at other steps the carry is kept and y_t = 0
// Residuals saved by the forward pass for the backward pass:
//   h_prev (B, T, H)   h entering each step (for dW_h = sum h_prev^T dz, done by XLA)
//   res    (B, T, 6H)  i, f, g, o (activated), c entering the step, tanh(c leaving the step)
// (without the `save` attribute, for inference, h_prev and res are empty and not written).
//
// Matrix products go to a cblas_sgemm whose address Python passes in (OpenBLAS from the
// scipy-openblas32 wheel), so this library links against nothing but libc/libm.

#include <cstdint>
#include <cstring>
#include <vector>

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
// arithmetic, so the gate loops vectorize; libm's tanhf/expf made them 3-4x slower.
inline float Tanh(float x) {
  const float c = 7.90531110763549805f;
  const float y = x < -c ? -c : (x > c ? c : x);
  const float y2 = y * y;
  float p = y2 * -2.76076847742355e-16f + 2.00018790482477e-13f;
  p = p * y2 + -8.60467152213735e-11f;
  p = p * y2 + 5.12229709037114e-08f;
  p = p * y2 + 1.48572235717979e-05f;
  p = p * y2 + 6.37261928875436e-04f;
  p = p * y2 + 4.89352455891786e-03f;
  p = p * y;
  float q = y2 * 1.19825839466702e-06f + 1.18534705686654e-04f;
  q = q * y2 + 2.26843463243900e-03f;
  q = q * y2 + 4.89352518554385e-03f;
  const float t = p / q;
  return (y < 0.0004f && y > -0.0004f) ? y : t;
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

struct Dims {
  int64_t batch, steps, hidden;
};

// `seq` is a (B, T, width * H) array, `w_h` the (H, 4H) recurrent weights.
ffi::Error CheckDims(ffi::Span<const int64_t> seq, int64_t width,
                     const ffi::Buffer<ffi::F32>& w_h, Dims* d) {
  if (g_sgemm == nullptr) {
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                      "rnnjax native LSTM: no sgemm was registered (rnnjax._native.load)");
  }
  auto ad = seq;
  auto wd = w_h.dimensions();
  if (ad.size() != 3 || wd.size() != 2 || wd[1] != 4 * wd[0] || ad[2] != width * wd[0]) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "rnnjax native LSTM: expected (B, T, k H) sequences and w_h (H, 4H)");
  }
  d->batch = ad[0];
  d->steps = ad[1];
  d->hidden = wd[0];
  return ffi::Error::Success();
}

ffi::Error LstmForwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w_i,
                           ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> w_h,
                           ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> c0,
                           ffi::Buffer<ffi::PRED> mask, bool reverse, bool save,
                           ffi::ResultBuffer<ffi::F32> ys, ffi::ResultBuffer<ffi::F32> h_last,
                           ffi::ResultBuffer<ffi::F32> c_last,
                           ffi::ResultBuffer<ffi::F32> h_prev,
                           ffi::ResultBuffer<ffi::F32> res) {
  Dims d;
  if (auto err = CheckDims(ys->dimensions(), 1, w_h, &d); err.failure()) return err;
  const int64_t B = d.batch, T = d.steps, H = d.hidden, G = 4 * H;
  auto xd = x.dimensions();
  if (xd.size() != 3 || xd[0] != B || xd[1] != T || w_i.dimensions()[0] != xd[2]) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "rnnjax native LSTM: expected x (B, T, I) and w_i (I, 4H)");
  }
  const int64_t I = xd[2], K = I + H;
  const float* px = x.typed_data();
  const bool* pm = mask.typed_data();
  float* py = ys->typed_data();
  float* ph_prev = h_prev->typed_data();
  float* pres = res->typed_data();
  float* h = h_last->typed_data();  // the running carry lives in the outputs
  float* c = c_last->typed_data();
  std::memcpy(h, h0.typed_data(), sizeof(float) * B * H);
  std::memcpy(c, c0.typed_data(), sizeof(float) * B * H);
  // One matmul per step: [x_t, h] (B, I + H) @ [W_i; W_h] (I + H, 4H), onto the bias.
  std::vector<float> w(K * G);
  std::memcpy(w.data(), w_i.typed_data(), sizeof(float) * I * G);
  std::memcpy(w.data() + I * G, w_h.typed_data(), sizeof(float) * H * G);
  std::vector<float> xh(B * K);
  std::vector<float> z(B * G);
  std::vector<float> row(save ? 0 : 6 * H);  // without `save`, one row's gates at a time
  const float* pb = bias.typed_data();

  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = reverse ? T - 1 - s : s;
    for (int64_t b = 0; b < B; ++b) {
      std::memcpy(&xh[b * K], px + (b * T + t) * I, sizeof(float) * I);
      std::memcpy(&xh[b * K + I], h + b * H, sizeof(float) * H);
      std::memcpy(&z[b * G], pb, sizeof(float) * G);
      if (save) std::memcpy(ph_prev + (b * T + t) * H, h + b * H, sizeof(float) * H);
    }
    if (K > 0) {
      g_sgemm(kRowMajor, kNoTrans, kNoTrans, B, G, K, 1.0f, xh.data(), K, w.data(), G, 1.0f,
              z.data(), G);
    }
    for (int64_t b = 0; b < B; ++b) {
      const float* __restrict__ zb = &z[b * G];
      float* __restrict__ r = save ? pres + (b * T + t) * 6 * H : row.data();
      float* __restrict__ cb = c + b * H;
      float* __restrict__ hb = h + b * H;
      float* __restrict__ yb = py + (b * T + t) * H;
      Cell(zb, cb, r, H);
      if (pm[b * T + t]) {
        // r holds c entering the step at 4H and tanh(c leaving it) at 5H.
        for (int64_t j = 0; j < H; ++j) {
          cb[j] = r[H + j] * r[4 * H + j] + r[j] * r[2 * H + j];
          hb[j] = r[3 * H + j] * r[5 * H + j];
          yb[j] = hb[j];
        }
      } else {
        std::memset(yb, 0, sizeof(float) * H);
      }
    }
  }
  return ffi::Error::Success();
}

// The transpose of the LSTM's tangent (backpropagation through time): from the cotangents of
// the outputs ys and of the final carry, the cotangents of x, W_i, b, W_h and the initial carry.
// The loop carries dh and dc; the gate cotangents dz of all steps go to a scratch array, and the
// weight gradients are three large matmuls over its B*T rows after the loop.
ffi::Error LstmBackwardImpl(ffi::Buffer<ffi::F32> gys, ffi::Buffer<ffi::F32> gh_last,
                            ffi::Buffer<ffi::F32> gc_last, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> w_i, ffi::Buffer<ffi::F32> w_h,
                            ffi::Buffer<ffi::F32> h_prev, ffi::Buffer<ffi::F32> res,
                            ffi::Buffer<ffi::PRED> mask, bool reverse, bool need_dx,
                            ffi::ResultBuffer<ffi::F32> gx, ffi::ResultBuffer<ffi::F32> gw_i,
                            ffi::ResultBuffer<ffi::F32> gb, ffi::ResultBuffer<ffi::F32> gw_h,
                            ffi::ResultBuffer<ffi::F32> gh0, ffi::ResultBuffer<ffi::F32> gc0) {
  Dims d;
  if (auto err = CheckDims(res.dimensions(), 6, w_h, &d); err.failure()) return err;
  const int64_t B = d.batch, T = d.steps, H = d.hidden, G = 4 * H;
  const int64_t I = x.dimensions()[2], BT = B * T;
  const float* py = gys.typed_data();
  const float* pres = res.typed_data();
  const float* pw = w_h.typed_data();
  const bool* pm = mask.typed_data();
  float* gh = gh0->typed_data();  // the running cotangent of the carry lives in the outputs
  float* gc = gc0->typed_data();
  std::memcpy(gh, gh_last.typed_data(), sizeof(float) * B * H);
  std::memcpy(gc, gc_last.typed_data(), sizeof(float) * B * H);
  // Kept between calls: a fresh (B*T, 4H) array per call costs a page fault per 4 KiB.
  thread_local std::vector<float> scratch;
  if (scratch.size() < static_cast<size_t>(BT * G)) scratch.resize(BT * G);
  float* pz = scratch.data();
  std::vector<float> back(B * H);

  for (int64_t s = T - 1; s >= 0; --s) {
    const int64_t t = reverse ? T - 1 - s : s;
    for (int64_t b = 0; b < B; ++b) {
      const float* __restrict__ r = pres + (b * T + t) * 6 * H;
      const float* __restrict__ yb = py + (b * T + t) * H;
      float* __restrict__ ghb = gh + b * H;
      float* __restrict__ gcb = gc + b * H;
      float* __restrict__ dzb = pz + (b * T + t) * G;
      if (!pm[b * T + t]) {
        std::memset(dzb, 0, sizeof(float) * G);
        continue;
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
    }
    if (H > 0) {
      // back = dz_t @ W_h^T: the cotangent of h entering this step (dz_t rows are T * 4H apart).
      g_sgemm(kRowMajor, kNoTrans, kTrans, B, H, G, 1.0f, pz + t * G, T * G, pw, G, 0.0f,
              back.data(), H);
    }
    for (int64_t b = 0; b < B; ++b) {
      if (pm[b * T + t]) std::memcpy(gh + b * H, &back[b * H], sizeof(float) * H);
    }
  }
  // Weight gradients over all B*T rows at once.
  if (BT > 0 && H > 0) {
    g_sgemm(kRowMajor, kTrans, kNoTrans, H, G, BT, 1.0f, h_prev.typed_data(), H, pz, G, 0.0f,
            gw_h->typed_data(), G);
  } else {
    std::memset(gw_h->typed_data(), 0, sizeof(float) * H * G);
  }
  if (BT > 0 && I > 0) {
    g_sgemm(kRowMajor, kTrans, kNoTrans, I, G, BT, 1.0f, x.typed_data(), I, pz, G, 0.0f,
            gw_i->typed_data(), G);
  } else {
    std::memset(gw_i->typed_data(), 0, sizeof(float) * I * G);
  }
  float* pgb = gb->typed_data();
  std::memset(pgb, 0, sizeof(float) * G);
  for (int64_t row = 0; row < BT; ++row) {
    const float* __restrict__ zr = pz + row * G;
#pragma omp simd
    for (int64_t j = 0; j < G; ++j) pgb[j] += zr[j];
  }
  if (need_dx && BT > 0 && I > 0) {
    g_sgemm(kRowMajor, kNoTrans, kTrans, BT, I, G, 1.0f, pz, G, w_i.typed_data(), G, 0.0f,
            gx->typed_data(), I);
  } else if (need_dx) {
    std::memset(gx->typed_data(), 0, sizeof(float) * BT * I);
  }
  return ffi::Error::Success();
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
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_h
                                  .Arg<ffi::Buffer<ffi::F32>>()   // h_prev
                                  .Arg<ffi::Buffer<ffi::F32>>()   // res
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask
                                  .Attr<bool>("reverse")
                                  .Attr<bool>("need_dx")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // gx
                                  .Ret<ffi::Buffer<ffi::F32>>()   // gw_i
                                  .Ret<ffi::Buffer<ffi::F32>>()   // gb
                                  .Ret<ffi::Buffer<ffi::F32>>()   // gw_h
                                  .Ret<ffi::Buffer<ffi::F32>>()   // gh0
                                  .Ret<ffi::Buffer<ffi::F32>>()   // gc0
);

extern "C" {
// Called once from Python with the address of cblas_sgemm.
__attribute__((visibility("default"))) void rnnjax_set_sgemm(void* fn) {
  g_sgemm = reinterpret_cast<SgemmFn>(fn);
}
}
