// The dense mode. Without masks (every step of every row real), the LSTM and the GRU run oneDNN's
// RNN primitives when the library was built with them (RNNJAX_WITH_DNNL; oneDNN from the
// onednn-cpu-gomp wheel): the input projection of all steps as one matmul, the recurrent matmul per
// step on weights packed once per call, the gates fused into it, on all cores. In that mode
// ("dense") the forward pass saves oneDNN's opaque workspace in `res` instead of h_prev and the
// gates, and the backward pass is oneDNN's. x and ys are (B, T, .), oneDNN's ntc layout. Weights:
// the LSTM's (I, 4H) is oneDNN's ldigo as it is (gates i, f, g, o, as PyTorch's); the GRU is
// oneDNN's linear-before-reset GRU, whose gates run u (our z), r, o (our n), so its weights and
// biases are permuted on the way in and the gradients on the way out, and its four biases are
// b_iz + b_hz, b_ir + b_hr, b_in, b_hn.

#ifdef RNNJAX_WITH_DNNL
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>

#include "onednn.h"

namespace rnnjax {

namespace {

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

}  // namespace

struct DnnlLstm {
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

struct DnnlGru {
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

namespace {

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

DnnlWeights ToDnnl(const DnnlLstm&, int64_t, int64_t, const float* w_i, const float* w_h,
                   const float* b, const float*) {
  return {w_i, w_h, b};
}

DnnlWeights ToDnnl(const DnnlGru&, int64_t I, int64_t H, const float* w_i, const float* w_h,
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

}  // namespace

template <class Cell>
int64_t WorkspaceBytes(int64_t B, int64_t T, int64_t I, int64_t H, bool reverse) {
  try {  // planning runs nothing, so it needs no trip to the oneDNN thread
    return static_cast<int64_t>(
        GetPlan<Cell>(B, T, I, H, reverse, kTraining).fwd_pd.workspace_desc().get_size());
  } catch (const std::exception&) {
    return -1;
  }
}

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

// The instantiations ffi.cc calls.
template int64_t WorkspaceBytes<DnnlLstm>(int64_t, int64_t, int64_t, int64_t, bool);
template int64_t WorkspaceBytes<DnnlGru>(int64_t, int64_t, int64_t, int64_t, bool);
template ffi::Error DnnlForward<DnnlLstm>(
    int64_t, int64_t, int64_t, int64_t, bool, bool, const float*, const float*,
    const float*, const float*, const float*, const float*, const float*, float*, float*,
    float*, float*, size_t);
template ffi::Error DnnlForward<DnnlGru>(
    int64_t, int64_t, int64_t, int64_t, bool, bool, const float*, const float*,
    const float*, const float*, const float*, const float*, const float*, float*, float*,
    float*, float*, size_t);
template ffi::Error DnnlBackward<DnnlLstm>(
    int64_t, int64_t, int64_t, int64_t, bool, const float*, const float*, const float*,
    const float*, const float*, const float*, const float*, const float*, const float*,
    const float*, const float*, const float*, const float*, const float*,
    const DnnlGrads&);
template ffi::Error DnnlBackward<DnnlGru>(
    int64_t, int64_t, int64_t, int64_t, bool, const float*, const float*, const float*,
    const float*, const float*, const float*, const float*, const float*, const float*,
    const float*, const float*, const float*, const float*, const float*,
    const DnnlGrads&);

}  // namespace rnnjax
#endif  // RNNJAX_WITH_DNNL
