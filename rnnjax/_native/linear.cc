// The linear recurrence h_t = a_t * h_{t-1} + b_t (rnnjax.linear_scan's "native" mode), float32
// or complex64, forward and its backward pass, as two XLA FFI handlers
// (rnnjax/_native/linear.py registers and calls them):
//
//   RnnjaxLinearForward   a, b (..., T, N), h0 (..., N), reset (..., T), attr reverse
//                         ->  h (..., T, N)
//   RnnjaxLinearBackward  a, h (..., T, N), h0 (..., N), g (..., T, N), reset (..., T),
//                         attr reverse  ->  da, db (..., T, N), dh0 (..., N)
//
// reset (bool) marks the steps whose carry is replaced by zero before they run: there h_t = b_t
// whatever h_{t-1} holds (NaN and inf included, which a zero a_t would not stop: 0 * NaN is
// NaN), and in the backward pass no cotangent crosses the step.
//
// The backward pass is the recurrence of the cotangents run the other way, lambda_t = g_t +
// a_{t+1} lambda_{t+1} (a_{t-1} in reverse), with db = lambda, da_t = lambda_t h_{t-1} and dh0 =
// a_first lambda_first, all in one pass (no conjugates: JAX's transposes of a complex product).
//
// The leading "..." are batch dimensions (what jax.vmap adds; batch-first, as ffi_call's
// "expand_dims" rule gives them): an operand's batch dimension is either the output's or 1, and
// a dimension of 1 is read again for every batch row (stride 0), so an unbatched a or h0 under
// vmap is never broadcast in memory. Complex numbers are interleaved (re, im) float pairs.
//
// The work is a few flops per element, so the pass runs at memory bandwidth: the forward pass
// reads a and b and writes h, 12 bytes per float32 element; the backward pass reads a, h and g
// and writes da and db, 20 bytes. Each batch row is cut into column blocks of at most kBlock
// floats; a block runs all T steps with its previous row still in L1/L2, 16 lanes at a time
// (AVX-512, tails masked) or in a plain loop where the compiler does not target AVX-512. Blocks
// are independent; they run on the calling thread (ForEachBlock says why).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "strided.h"

namespace rnnjax {
namespace {

constexpr int64_t kBlock = 2048;  // floats of a row one block runs (8 KiB)

// One step over n floats: out = a * prev + b (complex: interleaved pairs, n even).
template <bool kComplex>
inline void Step(const float* a, const float* prev, const float* b, float* out, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
    const __m512 av = _mm512_maskz_loadu_ps(m, a + i);
    const __m512 hv = _mm512_maskz_loadu_ps(m, prev + i);
    const __m512 bv = _mm512_maskz_loadu_ps(m, b + i);
    __m512 r;
    if constexpr (kComplex) {
      // (ar hr - ai hi, ar hi + ai hr): ar * h -+ ai * swap(h), then + b.
      const __m512 cross = _mm512_mul_ps(_mm512_movehdup_ps(av), _mm512_permute_ps(hv, 0xB1));
      r = _mm512_add_ps(_mm512_fmaddsub_ps(_mm512_moveldup_ps(av), hv, cross), bv);
    } else {
      r = _mm512_fmadd_ps(av, hv, bv);
    }
    _mm512_mask_storeu_ps(out + i, m, r);
  }
#else
  if constexpr (kComplex) {
    for (; i < n; i += 2) {
      const float re = a[i] * prev[i] - a[i + 1] * prev[i + 1];
      const float im = a[i] * prev[i + 1] + a[i + 1] * prev[i];
      out[i] = re + b[i];
      out[i + 1] = im + b[i + 1];
    }
  } else {
#pragma omp simd
    for (; i < n; ++i) out[i] = a[i] * prev[i] + b[i];
  }
#endif
}

// out = x * y over n floats (complex: interleaved pairs).
template <bool kComplex>
inline void Product(const float* x, const float* y, float* out, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
    const __m512 xv = _mm512_maskz_loadu_ps(m, x + i);
    const __m512 yv = _mm512_maskz_loadu_ps(m, y + i);
    __m512 r;
    if constexpr (kComplex) {
      const __m512 cross = _mm512_mul_ps(_mm512_movehdup_ps(xv), _mm512_permute_ps(yv, 0xB1));
      r = _mm512_fmaddsub_ps(_mm512_moveldup_ps(xv), yv, cross);
    } else {
      r = _mm512_mul_ps(xv, yv);
    }
    _mm512_mask_storeu_ps(out + i, m, r);
  }
#else
  if constexpr (kComplex) {
    for (; i < n; i += 2) {
      const float re = x[i] * y[i] - x[i + 1] * y[i + 1];
      out[i + 1] = x[i] * y[i + 1] + x[i + 1] * y[i];
      out[i] = re;
    }
  } else {
#pragma omp simd
    for (; i < n; ++i) out[i] = x[i] * y[i];
  }
#endif
}

ffi::Error Invalid(const std::string& what) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "rnnjax linear recurrence: " + what);
}

// `x` must be (..., T, N) (`per_step`) or (..., N) of the output's shape and dtype.
ffi::Error Bind(const ffi::AnyBuffer& x, bool per_step, const Shape& s, ffi::DataType dtype,
                const char* name, Operand* op) {
  if (x.element_type() != dtype) return Invalid(std::string(name) + " has another dtype");
  const std::vector<int64_t> tail = per_step ? std::vector<int64_t>{s.T, s.N}
                                             : std::vector<int64_t>{s.N};
  const std::string why = BindStrided(x, s.batch, tail, dtype == ffi::C64 ? 2 : 1, name, op);
  return why.empty() ? ffi::Error::Success() : Invalid(why + " (..., T, N)");
}

ffi::Error BindFlags(const ffi::AnyBuffer& x, const Shape& s, Flags* op) {
  if (x.element_type() != ffi::PRED) return Invalid("reset must be bool");
  const std::string why = BindStrided(x, s.batch, {s.T}, 1, "reset", op);
  return why.empty() ? ffi::Error::Success() : Invalid(why + " (..., T)");
}

ffi::Error ShapeOf(const ffi::AnyBuffer& h_like, ffi::DataType dtype, Shape* s) {
  auto d = h_like.dimensions();
  if (dtype != ffi::F32 && dtype != ffi::C64) return Invalid("expects float32 or complex64");
  if (d.size() < 2) return Invalid("expects arrays of shape (..., T, N)");
  s->batch.assign(d.begin(), d.end() - 2);
  for (int64_t n : s->batch) s->B *= n;
  s->T = d[d.size() - 2];
  s->N = d[d.size() - 1] * (dtype == ffi::C64 ? 2 : 1);
  return ffi::Error::Success();
}

// Runs fn(row, begin, end) for every (batch row, column block of at most kBlock floats, a
// multiple of 16, so complex pairs never straddle two), on the calling thread: one core moved
// about as many bytes per second as a numpy copy does, and an OpenMP team on a busy 2-core
// machine stalled some calls by 10x waiting for its second thread (PERF-NOTES.md).
template <class Fn>
void ForEachBlock(const Shape& s, Fn fn) {
  for (int64_t row = 0; row < s.B; ++row) {
    for (int64_t begin = 0; begin < s.N; begin += kBlock) fn(row, begin, std::min(s.N, begin + kBlock));
  }
}

template <bool kComplex>
void Forward(const Shape& s, bool reverse, const Operand& a, const Operand& b,
             const Operand& h0, const Flags& reset, float* h) {
  ForEachBlock(s, [&](int64_t row, int64_t begin, int64_t end) {
    const float* ar = a.row(s.batch, row) + begin;
    const float* br = b.row(s.batch, row) + begin;
    const float* prev = h0.row(s.batch, row) + begin;
    const uint8_t* rr = reset.row(s.batch, row);
    float* hr = h + row * s.T * s.N + begin;
    for (int64_t step = 0; step < s.T; ++step) {
      const int64_t t = reverse ? s.T - 1 - step : step;
      const int64_t at = t * s.N;
      if (rr[t]) {
        std::memcpy(hr + at, br + at, (end - begin) * sizeof(float));
      } else {
        Step<kComplex>(ar + at, prev, br + at, hr + at, end - begin);
      }
      prev = hr + at;
    }
  });
}

template <bool kComplex>
void Backward(const Shape& s, bool reverse, const Operand& a, const Operand& h,
              const Operand& h0, const Operand& g, const Flags& reset, float* da, float* db,
              float* dh0) {
  ForEachBlock(s, [&](int64_t row, int64_t begin, int64_t end) {
    const int64_t n = end - begin;
    const float* ar = a.row(s.batch, row) + begin;
    const float* hr = h.row(s.batch, row) + begin;
    const float* gr = g.row(s.batch, row) + begin;
    const float* h_first = h0.row(s.batch, row) + begin;
    float* dar = da + row * s.T * s.N + begin;
    float* dbr = db + row * s.T * s.N + begin;
    float* dh0r = dh0 + row * s.N + begin;
    if (s.T == 0) {
      std::memset(dh0r, 0, n * sizeof(float));
      return;
    }
    // The forward pass ran step 0 .. T - 1 at positions pos(step); undo it from the last step.
    auto time = [&](int64_t step) { return reverse ? s.T - 1 - step : step; };
    auto pos = [&](int64_t step) { return time(step) * s.N; };
    const uint8_t* rr = reset.row(s.batch, row);
    const float* lam_next = nullptr;
    for (int64_t step = s.T - 1; step >= 0; --step) {
      const int64_t at = pos(step);
      // No cotangent crosses a reset: the next step did not read h_t.
      if (lam_next == nullptr || rr[time(step + 1)]) {
        std::memcpy(dbr + at, gr + at, n * sizeof(float));
      } else {
        Step<kComplex>(ar + pos(step + 1), lam_next, gr + at, dbr + at, n);
      }
      if (rr[time(step)]) {
        std::memset(dar + at, 0, n * sizeof(float));
      } else {
        Product<kComplex>(dbr + at, step > 0 ? hr + pos(step - 1) : h_first, dar + at, n);
      }
      lam_next = dbr + at;
    }
    if (rr[time(0)]) {
      std::memset(dh0r, 0, n * sizeof(float));
    } else {
      Product<kComplex>(ar + pos(0), lam_next, dh0r, n);
    }
  });
}

ffi::Error LinearForwardImpl(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::AnyBuffer h0,
                             ffi::AnyBuffer reset, bool reverse, ffi::Result<ffi::AnyBuffer> h) {
  const ffi::DataType dtype = h->element_type();
  Shape s;
  Operand oa, ob, oh0;
  if (auto e = ShapeOf(*h, dtype, &s); e.failure()) return e;
  if (auto e = Bind(a, true, s, dtype, "a", &oa); e.failure()) return e;
  if (auto e = Bind(b, true, s, dtype, "b", &ob); e.failure()) return e;
  if (auto e = Bind(h0, false, s, dtype, "h0", &oh0); e.failure()) return e;
  Flags flags;
  if (auto e = BindFlags(reset, s, &flags); e.failure()) return e;
  float* out = Out(h);
  if (dtype == ffi::C64) {
    Forward<true>(s, reverse, oa, ob, oh0, flags, out);
  } else {
    Forward<false>(s, reverse, oa, ob, oh0, flags, out);
  }
  return ffi::Error::Success();
}

ffi::Error LinearBackwardImpl(ffi::AnyBuffer a, ffi::AnyBuffer h, ffi::AnyBuffer h0,
                              ffi::AnyBuffer g, ffi::AnyBuffer reset, bool reverse,
                              ffi::Result<ffi::AnyBuffer> da,
                              ffi::Result<ffi::AnyBuffer> db, ffi::Result<ffi::AnyBuffer> dh0) {
  const ffi::DataType dtype = da->element_type();
  Shape s;
  Operand oa, oh, oh0, og;
  if (auto e = ShapeOf(*da, dtype, &s); e.failure()) return e;
  if (db->element_type() != dtype || db->size_bytes() != da->size_bytes() ||
      dh0->element_type() != dtype || dh0->size_bytes() * s.T != da->size_bytes()) {
    return Invalid("expects outputs da, db (..., T, N) and dh0 (..., N) of one dtype");
  }
  if (auto e = Bind(a, true, s, dtype, "a", &oa); e.failure()) return e;
  if (auto e = Bind(h, true, s, dtype, "h", &oh); e.failure()) return e;
  if (auto e = Bind(h0, false, s, dtype, "h0", &oh0); e.failure()) return e;
  if (auto e = Bind(g, true, s, dtype, "g", &og); e.failure()) return e;
  Flags flags;
  if (auto e = BindFlags(reset, s, &flags); e.failure()) return e;
  float *pa = Out(da), *pb = Out(db), *p0 = Out(dh0);
  if (dtype == ffi::C64) {
    Backward<true>(s, reverse, oa, oh, oh0, og, flags, pa, pb, p0);
  } else {
    Backward<false>(s, reverse, oa, oh, oh0, og, flags, pa, pb, p0);
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace rnnjax

namespace ffi = xla::ffi;

#pragma GCC visibility push(default)

XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnjaxLinearForward, rnnjax::LinearForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // a
                                  .Arg<ffi::AnyBuffer>()  // b
                                  .Arg<ffi::AnyBuffer>()  // h0
                                  .Arg<ffi::AnyBuffer>()  // reset
                                  .Attr<bool>("reverse")
                                  .Ret<ffi::AnyBuffer>()  // h
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(RnnjaxLinearBackward, rnnjax::LinearBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // a
                                  .Arg<ffi::AnyBuffer>()  // h
                                  .Arg<ffi::AnyBuffer>()  // h0
                                  .Arg<ffi::AnyBuffer>()  // g
                                  .Arg<ffi::AnyBuffer>()  // reset
                                  .Attr<bool>("reverse")
                                  .Ret<ffi::AnyBuffer>()  // da
                                  .Ret<ffi::AnyBuffer>()  // db
                                  .Ret<ffi::AnyBuffer>()  // dh0
);

#pragma GCC visibility pop
