// One batch row's gate arithmetic, inline, so that the loops that call it for every row of every
// step compile it in place and vectorize it: scalar (Tanh, Sigmoid, LstmRow, GruRow: rnnjax's own
// loops and the replay) and, in builds for AVX-512, on 16 units at a time in vector registers
// (TanhV, SigmoidV and the two cells' Row: the AVX-512 loops, fused.cc).

#ifndef RNNJAX_NATIVE_GATES_H_
#define RNNJAX_NATIVE_GATES_H_

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace rnnjax {

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
// r = [i, f, g, o, c, tanh(f c + i g)]. (In lstm_loops.cc: not inline, as it always compiled.)
void LstmGates(const float* __restrict__ z, const float* __restrict__ c, float* __restrict__ r,
               int64_t H);

// One row's LSTM step from its pre-activations z (4H) and cell state c: the gates into r (as
// LstmGates), and where the step is real the carry (c, h) advances; y, when given, gets the new h
// there and zeros at a padded step (whose carry is kept).
inline void LstmRow(const float* __restrict__ z, float* __restrict__ c, float* __restrict__ h,
                    float* __restrict__ r, float* __restrict__ y, bool real, int64_t H) {
  LstmGates(z, c, r, H);
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

// The GRU's (gru_loops.cc has its equations).
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

#if defined(__AVX512F__)
constexpr int64_t kUnits = 16;  // hidden units per panel (fused.cc)

// tanh as Tanh above, 16 lanes at a time; the quotient by a reciprocal refined by one Newton
// step (a few ulp more than a division, which would cost more than the rest of the gate).
// At and beyond the clamp it is exactly +-1, as Tanh's quotient is there and XLA's tanh is:
// the reciprocal's ulps would leave sigmoid(-inf) = 1.5e-7 instead of 0, and a GRU's
// h' = n + z (h - n) would then carry 1.5e-7 of an h of 1e30 through a closed gate.
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
  const __m512 size = _mm512_abs_ps(y);
  const __mmask16 tiny = _mm512_cmp_ps_mask(size, _mm512_set1_ps(kTanhTiny), _CMP_LT_OQ);
  const __mmask16 saturated = _mm512_cmp_ps_mask(size, c, _CMP_GE_OQ);  // false for NaN
  const __mmask16 negative = _mm512_cmp_ps_mask(y, _mm512_setzero_ps(), _CMP_LT_OQ);
  const __m512 one = _mm512_mask_blend_ps(negative, _mm512_set1_ps(1.0f), _mm512_set1_ps(-1.0f));
  return _mm512_mask_blend_ps(saturated, _mm512_mask_blend_ps(tiny, t, y), one);
}

inline __m512 SigmoidV(__m512 x) {
  const __m512 half = _mm512_set1_ps(0.5f);
  return _mm512_fmadd_ps(half, TanhV(_mm512_mul_ps(half, x)), half);
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
// not, y_t the new h or zeros, h_prev (when saving) h entering, or zeros at a padded step (as
// the loops': dW_h = h_prev^T dz must not see a NaN there times dz = 0). The padding units of
// a partial panel stay exactly zero: their weights are zero, but an infinite input makes their
// gates inf * 0 = NaN, which the next step's h W_h would spread to every unit.
inline void Advance(const RowStep& s, __m512 h_new) {
  const __m512 h = _mm512_load_ps(s.h_in);
  if (s.h_prev != nullptr) {
    _mm512_mask_storeu_ps(s.h_prev, s.units, s.real ? h : _mm512_setzero_ps());
  }
  _mm512_store_ps(s.h_out, s.real ? _mm512_maskz_mov_ps(s.units, h_new) : h);
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
    if (s.real) _mm512_store_ps(c, _mm512_maskz_mov_ps(s.units, c_out));  // as h in Advance
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

#endif  // __AVX512F__

}  // namespace rnnjax

#endif  // RNNJAX_NATIVE_GATES_H_
