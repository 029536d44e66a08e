// rnnjax's own loops for the LSTM: per step one matmul ([x_t, h] @ [W_i; W_h], StepGemm) and one
// pass over the gates (LstmRow); the backward pass (BPTT) stores the gate cotangents of all steps
// and computes the weight gradients after its loop as large matmuls; a checkpointed pass
// (checkpoint k > 0) saves only every k-th carry, and its backward pass recomputes each segment's
// residuals before running its BPTT steps (rnn_cpu.h: Segment).

#include <cstring>
#include <vector>

#include "gates.h"
#include "rnn_cpu.h"

namespace rnnjax {

void LstmGates(const float* __restrict__ z, const float* __restrict__ c,
               float* __restrict__ r, int64_t H) {
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

namespace {

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
      if (h_prev != nullptr) {  // zeros at a padded step: dW_h = h_prev^T dz, and dz is 0 there
        float* at = h_prev + rows(b, t) * H;
        if (p.mask[b * T + t]) {
          std::memcpy(at, h + b * H, sizeof(float) * H);
        } else {
          std::memset(at, 0, sizeof(float) * H);
        }
      }
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

}  // namespace

ffi::Error LstmLoopsForward(int64_t B, int64_t T, int64_t I, int64_t H, bool reverse, bool save,
                            int64_t checkpoint, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> w_i, ffi::Buffer<ffi::F32> bias,
                            ffi::Buffer<ffi::F32> w_h, ffi::Buffer<ffi::F32> h0,
                            ffi::Buffer<ffi::F32> c0, ffi::Buffer<ffi::PRED> mask,
                            ffi::ResultBuffer<ffi::F32> ys, ffi::ResultBuffer<ffi::F32> h_last,
                            ffi::ResultBuffer<ffi::F32> c_last,
                            ffi::ResultBuffer<ffi::F32> h_prev, ffi::ResultBuffer<ffi::F32> res) {
  const int64_t G = 4 * H;
  const bool dnnl = DnnlMatmul(B, H);
  if (dnnl) CountPass(kLoopsOnednnMatmul);
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
ffi::Error LstmLoopsBackward(int64_t B, int64_t T, int64_t I, int64_t H, bool reverse,
                             bool need_dx, int64_t checkpoint, ffi::Buffer<ffi::F32> gys,
                             ffi::Buffer<ffi::F32> gh_last, ffi::Buffer<ffi::F32> gc_last,
                             ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w_i,
                             ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> w_h,
                             ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F32> h_prev,
                             ffi::Buffer<ffi::F32> res, ffi::ResultBuffer<ffi::F32> gx,
                             ffi::ResultBuffer<ffi::F32> gw_i, ffi::ResultBuffer<ffi::F32> gb,
                             ffi::ResultBuffer<ffi::F32> gw_h, ffi::ResultBuffer<ffi::F32> gh0,
                             ffi::ResultBuffer<ffi::F32> gc0) {
  Dims d;
  const int64_t G = 4 * H, BT = B * T;
  const bool dnnl = DnnlMatmul(B, H);
  if (dnnl) CountPass(kLoopsOnednnMatmul);
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

}  // namespace rnnjax
