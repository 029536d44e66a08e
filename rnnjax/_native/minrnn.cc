// minGRU's and minLSTM's parallel forms (rnnjax.cells.mingru / minlstm, Feng et al. 2024) as
// compiled CPU kernels, and the plain matmul their projections run on, as XLA FFI handlers
// (rnnjax/_native/minrnn.py registers and calls them):
//
//   RnnjaxMatmul          a (M, K) or (K, M), b (K, N) or (N, K), attrs trans_a, trans_b
//                         ->  c = op(a) @ op(b) (M, N): oneDNN's or OpenBLAS's sgemm, as the
//                         native loops' matmuls (matmul.cc)
//   RnnjaxMin{Gru,Lstm}Forward   proj (..., T, kH), bias (..., kH), h0 (..., H),
//                         reset (..., T), keep (..., T), attr reverse  ->  h (..., T, H)
//   RnnjaxMin{Gru,Lstm}Backward  proj, bias, h, h0, g (..., T, H), reset, keep, attr reverse
//                         ->  dproj (..., T, kH), dbias (..., kH), dh0 (..., H)
//
// k = 2 (minGRU: z | h~) or 3 (minLSTM: f | i | h~). The forward pass reads each step's
// projection without its bias, adds the bias, forms the recurrence's coefficients (a, b) in
// registers (MinGru::Coef, MinLstm::Coef) and runs h_t = a h_{t-1} + b as
// rnnjax.linear_scan(a, b) does, in one pass: the gates are never written to memory. reset
// zeroes the carry before a step (h_t = b, whatever h_{t-1} holds); a step whose keep is false
// keeps the carry (a padded step: h_t = h_{t-1}, zero derivatives). The backward pass
// recomputes the gates from proj and runs the cotangents' recurrence lambda_t = g_t +
// a_{t+1} lambda_{t+1} the other way, with da = lambda h_{t-1} (zero at a reset) and
// db = lambda turned into the pre-activations' cotangents (Grad) in the order JAX's autodiff
// of the same expressions takes, so NaN and inf land where the lax.scan of the cell's step
// puts them; dbias their sums over the steps and dh0 = a_first lambda_first; nothing crosses a
// reset. Batch dimensions: strided.h. Large calls spread the batch rows over the oneDNN
// thread's OpenMP team (Parallel).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "gates.h"
#include "strided.h"

namespace rnnjax {
namespace {

constexpr int64_t kBlock = 2048;  // hidden units of a row one block runs (8 KiB per array)

ffi::Error Invalid(const std::string& what) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "rnnjax minGRU kernel: " + what);
}

// ------------------------------------------------------------------------------ the matmul
ffi::Error MatmulImpl(ffi::AnyBuffer a, ffi::AnyBuffer b, bool trans_a, bool trans_b,
                      ffi::Result<ffi::AnyBuffer> c) {
  auto da = a.dimensions(), db = b.dimensions(), dc = c->dimensions();
  if (a.element_type() != ffi::F32 || b.element_type() != ffi::F32 ||
      c->element_type() != ffi::F32 || da.size() != 2 || db.size() != 2 || dc.size() != 2) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "rnnjax matmul: expects 2-D float32");
  }
  const int64_t M = dc[0], N = dc[1], K = trans_a ? da[0] : da[1];
  if ((trans_a ? da[1] : da[0]) != M || (trans_b ? db[1] : db[0]) != K ||
      (trans_b ? db[0] : db[1]) != N) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "rnnjax matmul: shapes do not agree");
  }
  float* out = Out(c);
  if (M == 0 || N == 0) return ffi::Error::Success();
  if (K == 0) {
    std::memset(out, 0, sizeof(float) * M * N);
    return ffi::Error::Success();
  }
  const bool dnnl = DnnlMatmul(M, N);
  return OnMatmulThread(dnnl, [&]() -> ffi::Error {
    Gemm(dnnl, trans_a, trans_b, M, N, K, static_cast<const float*>(a.untyped_data()), da[1],
         static_cast<const float*>(b.untyped_data()), db[1], 0.0f, out, N);
    return ffi::Error::Success();
  });
}

// ------------------------------------------------------------------- the gates, n units
// One vector of lanes (16 floats with AVX-512, else one), so that each cell's arithmetic is
// written once: Load/Store take the lanes of [i, n) (the last vector of a row masked).
#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
struct V {
  __m512 v;
};
using Lanes = __mmask16;
inline Lanes Tail(int64_t left) {
  return left >= 16 ? Lanes(0xFFFF) : Lanes((1u << left) - 1);
}
inline V Load(const float* p, Lanes m) { return {_mm512_maskz_loadu_ps(m, p)}; }
inline void Store(float* p, Lanes m, V x) { _mm512_mask_storeu_ps(p, m, x.v); }
inline V Set(float x) { return {_mm512_set1_ps(x)}; }
inline V operator+(V a, V b) { return {_mm512_add_ps(a.v, b.v)}; }
inline V operator-(V a, V b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline V operator*(V a, V b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline V operator/(V a, V b) { return {_mm512_div_ps(a.v, b.v)}; }
inline V Fma(V a, V b, V c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline V Sig(V x) { return {SigmoidV(x.v)}; }
#else
constexpr int64_t kLanes = 1;
struct V {
  float v;
};
using Lanes = bool;
inline Lanes Tail(int64_t) { return true; }
inline V Load(const float* p, Lanes) { return {*p}; }
inline void Store(float* p, Lanes, V x) { *p = x.v; }
inline V Set(float x) { return {x}; }
inline V operator+(V a, V b) { return {a.v + b.v}; }
inline V operator-(V a, V b) { return {a.v - b.v}; }
inline V operator*(V a, V b) { return {a.v * b.v}; }
inline V operator/(V a, V b) { return {a.v / b.v}; }
inline V Fma(V a, V b, V c) { return {a.v * b.v + c.v}; }
inline V Sig(V x) { return {Sigmoid(x.v)}; }
#endif

// The cells: kGates blocks of H pre-activations per step, the last the candidate's. Coef gives
// the recurrence's coefficients (a, b) from the pre-activations g (bias added); Grad the
// pre-activations' cotangents dg from those of (a, b), in the order JAX's autodiff of the same
// expressions computes them (so that NaN and inf land as in the lax.scan of the step), and
// returns a (the gates computed once for both).
struct MinGru {
  // z = sigmoid(k), a = 1 - z, b = z h~
  static constexpr int kGates = 2;
  static void Coef(const V* g, V* a, V* b) {
    const V z = Sig(g[0]);
    *a = Set(1.0f) - z;
    *b = z * g[1];
  }
  static V Grad(const V* g, V da, V db, V* dg) {
    const V z = Sig(g[0]), one = Set(1.0f);
    dg[0] = (db * g[1] - da) * (z * (one - z));  // dz = db h~ - da
    dg[1] = db * z;
    return one - z;
  }
};

struct MinLstm {
  // f, i = sigmoid(k_f), sigmoid(k_i), s = f + i, a = f / s, b = (i / s) h~
  static constexpr int kGates = 3;
  static void Coef(const V* g, V* a, V* b) {
    const V f = Sig(g[0]), i = Sig(g[1]), s = f + i;
    *a = f / s;
    *b = (i / s) * g[2];
  }
  static V Grad(const V* g, V da, V db, V* dg) {
    const V f = Sig(g[0]), i = Sig(g[1]), s = f + i;
    const V dc = db * g[2];  // c = i / s
    const V inv = Set(1.0f) / (s * s);
    const V ds = (Set(0.0f) - da) * f * inv + (Set(0.0f) - dc) * i * inv;
    const V one = Set(1.0f);
    dg[0] = (da / s + ds) * (f * (one - f));
    dg[1] = (dc / s + ds) * (i * (one - i));
    dg[2] = db * (i / s);
    return f / s;
  }
};

// One step's pre-activations at lanes [j, ...): the step's projection plus the bias.
template <class Cell>
inline void Gates(const float* p, const float* bias, int64_t H, int64_t j, Lanes m, V* g) {
  for (int k = 0; k < Cell::kGates; ++k) g[k] = Load(p + k * H + j, m) + Load(bias + k * H + j, m);
}

// One forward step over n units: out = a prev + b (prev null: a reset, out = b).
template <class Cell>
inline void StepRow(const float* p, const float* bias, int64_t H, const float* prev, float* out,
                    int64_t n) {
  for (int64_t j = 0; j < n; j += kLanes) {
    const Lanes m = Tail(n - j);
    V g[Cell::kGates], a, b;
    Gates<Cell>(p, bias, H, j, m, g);
    Cell::Coef(g, &a, &b);
    Store(out + j, m, prev == nullptr ? b : Fma(a, Load(prev + j, m), b));
  }
}

// One backward step at a real step over n units: lam holds lambda_t; writes the
// pre-activations' cotangents into dp (the step's row of dproj), adds them to sum (dbias) and
// leaves in `a` this step's a (what lambda_{t-1} needs). prev null: a reset (da = 0).
template <class Cell>
inline void GradRow(const float* p, const float* bias, int64_t H, const float* prev,
                    const float* lam, float* dp, float* sum, float* a, int64_t n) {
  for (int64_t j = 0; j < n; j += kLanes) {
    const Lanes m = Tail(n - j);
    V g[Cell::kGates], dg[Cell::kGates];
    Gates<Cell>(p, bias, H, j, m, g);
    const V l = Load(lam + j, m);
    const V da = prev == nullptr ? Set(0.0f) : l * Load(prev + j, m);
    const V coef_a = Cell::Grad(g, da, l, dg);
    for (int k = 0; k < Cell::kGates; ++k) {
      Store(dp + k * H + j, m, dg[k]);
      Store(sum + k * H + j, m, Load(sum + k * H + j, m) + dg[k]);
    }
    Store(a + j, m, coef_a);
  }
}

// lam = g + a * lam (next: the step after this one passes its cotangent back), else lam = g.
inline void Lambda(const float* g, const float* a, bool next, float* lam, int64_t n) {
  if (!next) {
    std::memcpy(lam, g, sizeof(float) * n);
    return;
  }
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) lam[i] = a[i] * lam[i] + g[i];
}

// ------------------------------------------------------------------------ the passes
struct Call {
  Shape s;  // N = H
  Operand proj, bias, h0;
  Flags reset, keep;
  int64_t H() const { return s.N; }
};

ffi::Error BindCall(int64_t G, const ffi::AnyBuffer& h_like, const ffi::AnyBuffer& proj,
                    const ffi::AnyBuffer& bias, const ffi::AnyBuffer& h0,
                    const ffi::AnyBuffer& reset, const ffi::AnyBuffer& keep, Call* c) {
  auto d = h_like.dimensions();
  if (d.size() < 2) return Invalid("expects h of shape (..., T, H)");
  c->s.batch.assign(d.begin(), d.end() - 2);
  for (int64_t n : c->s.batch) c->s.B *= n;
  c->s.T = d[d.size() - 2];
  c->s.N = d[d.size() - 1];
  const int64_t T = c->s.T, H = c->s.N;
  for (const ffi::AnyBuffer* x : {&h_like, &proj, &bias, &h0}) {
    if (x->element_type() != ffi::F32) return Invalid("expects float32 arrays");
  }
  if (reset.element_type() != ffi::PRED || keep.element_type() != ffi::PRED) {
    return Invalid("reset and keep must be bool");
  }
  const auto& b = c->s.batch;
  for (const std::string& why :
       {BindStrided(proj, b, {T, G * H}, 1, "proj (..., T, kH)", &c->proj),
        BindStrided(bias, b, {G * H}, 1, "bias (..., kH)", &c->bias),
        BindStrided(h0, b, {H}, 1, "h0 (..., H)", &c->h0),
        BindStrided(reset, b, {T}, 1, "reset (..., T)", &c->reset),
        BindStrided(keep, b, {T}, 1, "keep (..., T)", &c->keep)}) {
    if (!why.empty()) return Invalid(why);
  }
  return ffi::Error::Success();
}

// Whether a pass spreads its batch rows over the oneDNN thread's OpenMP team (the team its
// matmuls run on, so no second team competes with it): large calls of several rows in builds
// with oneDNN (DnnlMatmul), from kParallelElements elements. Smaller ones run on the calling
// thread, as linear.cc's passes.
constexpr int64_t kParallelElements = int64_t{1} << 18;

bool Parallel(const Call& c) {
  return c.s.B > 1 && c.s.B * c.s.T * c.H() >= kParallelElements && DnnlMatmul(c.s.B, c.H());
}

// fn(row, begin, end) for every batch row and block of its H units: rows spread over the
// OpenMP team when `parallel` (the caller runs on the oneDNN thread then, OnMatmulThread).
template <class Fn>
void ForEachBlock(const Call& c, bool parallel, Fn fn) {
#pragma omp parallel for if (parallel) schedule(static)
  for (int64_t row = 0; row < c.s.B; ++row) {
    for (int64_t begin = 0; begin < c.H(); begin += kBlock) {
      fn(row, begin, std::min(c.H(), begin + kBlock));
    }
  }
  (void)parallel;
}

template <class Cell>
ffi::Error ForwardImpl(ffi::AnyBuffer proj, ffi::AnyBuffer bias, ffi::AnyBuffer h0,
                       ffi::AnyBuffer reset, ffi::AnyBuffer keep, bool reverse,
                       ffi::Result<ffi::AnyBuffer> h) {
  Call c;
  constexpr int64_t G = Cell::kGates;
  if (auto e = BindCall(G, *h, proj, bias, h0, reset, keep, &c); e.failure()) return e;
  float* out = Out(h);
  const int64_t T = c.s.T, H = c.H();
  const bool parallel = Parallel(c);
  return OnMatmulThread(parallel, [&]() -> ffi::Error {
    ForEachBlock(c, parallel, [&](int64_t row, int64_t begin, int64_t end) {
      const int64_t n = end - begin;
      const float* p = c.proj.row(c.s.batch, row) + begin;
      const float* bk = c.bias.row(c.s.batch, row) + begin;
      const float* prev = c.h0.row(c.s.batch, row) + begin;
      const uint8_t* rr = c.reset.row(c.s.batch, row);
      const uint8_t* kr = c.keep.row(c.s.batch, row);
      float* hr = out + row * T * H + begin;
      for (int64_t step = 0; step < T; ++step) {
        const int64_t t = reverse ? T - 1 - step : step;
        float* o = hr + t * H;
        if (kr[t]) {
          StepRow<Cell>(p + t * G * H, bk, H, rr[t] ? nullptr : prev, o, n);
        } else if (rr[t]) {
          std::memset(o, 0, sizeof(float) * n);  // a padded step after a reset: carry zero
        } else {
          std::memcpy(o, prev, sizeof(float) * n);
        }
        prev = o;
      }
    });
    return ffi::Error::Success();
  });
}

template <class Cell>
ffi::Error BackwardImpl(ffi::AnyBuffer proj, ffi::AnyBuffer bias, ffi::AnyBuffer h,
                        ffi::AnyBuffer h0, ffi::AnyBuffer g, ffi::AnyBuffer reset,
                        ffi::AnyBuffer keep, bool reverse, ffi::Result<ffi::AnyBuffer> dproj,
                        ffi::Result<ffi::AnyBuffer> dbias, ffi::Result<ffi::AnyBuffer> dh0) {
  Call c;
  constexpr int64_t G = Cell::kGates;
  if (auto e = BindCall(G, g, proj, bias, h0, reset, keep, &c); e.failure()) return e;
  const int64_t T = c.s.T, H = c.H();
  Operand oh;
  if (h.element_type() != ffi::F32) return Invalid("expects float32 arrays");
  if (auto why = BindStrided(h, c.s.batch, {T, H}, 1, "h (..., T, H)", &oh); !why.empty()) {
    return Invalid(why);
  }
  const size_t floats = sizeof(float) * c.s.B;
  if (dproj->element_type() != ffi::F32 || dproj->size_bytes() != floats * T * G * H ||
      dbias->size_bytes() != floats * G * H || dh0->size_bytes() != floats * H) {
    return Invalid("expects outputs dproj (..., T, kH), dbias (..., kH), dh0 (..., H)");
  }
  float *gp = Out(dproj), *gb = Out(dbias), *g0 = Out(dh0);
  std::memset(gb, 0, floats * G * H);
  const bool parallel = Parallel(c);
  return OnMatmulThread(parallel, [&]() -> ffi::Error {
    ForEachBlock(c, parallel, [&](int64_t row, int64_t begin, int64_t end) {
      const int64_t n = end - begin;
      std::vector<float> lam(n), a(n, 1.0f);
      const float* p = c.proj.row(c.s.batch, row) + begin;
      const float* bk = c.bias.row(c.s.batch, row) + begin;
      const float* hr = oh.row(c.s.batch, row) + begin;
      const float* gr = static_cast<const float*>(g.untyped_data()) + row * T * H + begin;
      const float* first = c.h0.row(c.s.batch, row) + begin;
      const uint8_t* rr = c.reset.row(c.s.batch, row);
      const uint8_t* kr = c.keep.row(c.s.batch, row);
      float* dp = gp + row * T * G * H + begin;
      float* sum = gb + row * G * H + begin;
      float* d0 = g0 + row * H + begin;
      auto time = [&](int64_t step) { return reverse ? T - 1 - step : step; };
      for (int64_t step = T - 1; step >= 0; --step) {
        const int64_t t = time(step);
        // The step after this one passed lambda back unless it was a reset (it did not read h_t).
        Lambda(gr + t * H, a.data(), step < T - 1 && !rr[time(step + 1)], lam.data(), n);
        float* dpt = dp + t * G * H;
        if (kr[t]) {
          const float* prev = rr[t] ? nullptr : (step > 0 ? hr + time(step - 1) * H : first);
          GradRow<Cell>(p + t * G * H, bk, H, prev, lam.data(), dpt, sum, a.data(), n);
        } else {  // a padded step: zero cotangents, and lambda passes through (a = 1)
          for (int64_t k = 0; k < G; ++k) std::memset(dpt + k * H, 0, sizeof(float) * n);
          std::fill(a.begin(), a.end(), 1.0f);
        }
      }
      if (T == 0 || rr[time(0)]) {
        std::memset(d0, 0, sizeof(float) * n);
      } else {
        for (int64_t i = 0; i < n; ++i) d0[i] = a[i] * lam[i];
      }
    });
    return ffi::Error::Success();
  });
}

}  // namespace
}  // namespace rnnjax

namespace ffi = xla::ffi;

#pragma GCC visibility push(default)

XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnjaxMatmul, rnnjax::MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // a
                                  .Arg<ffi::AnyBuffer>()  // b
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b")
                                  .Ret<ffi::AnyBuffer>()  // c
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnjaxMinGruForward, rnnjax::ForwardImpl<rnnjax::MinGru>,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // proj
                                  .Arg<ffi::AnyBuffer>()  // bias
                                  .Arg<ffi::AnyBuffer>()  // h0
                                  .Arg<ffi::AnyBuffer>()  // reset
                                  .Arg<ffi::AnyBuffer>()  // keep
                                  .Attr<bool>("reverse")
                                  .Ret<ffi::AnyBuffer>()  // h
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnjaxMinGruBackward, rnnjax::BackwardImpl<rnnjax::MinGru>,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // proj
                                  .Arg<ffi::AnyBuffer>()  // bias
                                  .Arg<ffi::AnyBuffer>()  // h
                                  .Arg<ffi::AnyBuffer>()  // h0
                                  .Arg<ffi::AnyBuffer>()  // g
                                  .Arg<ffi::AnyBuffer>()  // reset
                                  .Arg<ffi::AnyBuffer>()  // keep
                                  .Attr<bool>("reverse")
                                  .Ret<ffi::AnyBuffer>()  // dproj
                                  .Ret<ffi::AnyBuffer>()  // dbias
                                  .Ret<ffi::AnyBuffer>()  // dh0
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnjaxMinLstmForward, rnnjax::ForwardImpl<rnnjax::MinLstm>,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // proj
                                  .Arg<ffi::AnyBuffer>()  // bias
                                  .Arg<ffi::AnyBuffer>()  // h0
                                  .Arg<ffi::AnyBuffer>()  // reset
                                  .Arg<ffi::AnyBuffer>()  // keep
                                  .Attr<bool>("reverse")
                                  .Ret<ffi::AnyBuffer>()  // h
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnjaxMinLstmBackward, rnnjax::BackwardImpl<rnnjax::MinLstm>,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // proj
                                  .Arg<ffi::AnyBuffer>()  // bias
                                  .Arg<ffi::AnyBuffer>()  // h
                                  .Arg<ffi::AnyBuffer>()  // h0
                                  .Arg<ffi::AnyBuffer>()  // g
                                  .Arg<ffi::AnyBuffer>()  // reset
                                  .Arg<ffi::AnyBuffer>()  // keep
                                  .Attr<bool>("reverse")
                                  .Ret<ffi::AnyBuffer>()  // dproj
                                  .Ret<ffi::AnyBuffer>()  // dbias
                                  .Ret<ffi::AnyBuffer>()  // dh0
);

#pragma GCC visibility pop
