// Bindings of batch normalization: the fused training passes, and the pieces SyncBatchNorm and the
// eval path combine (statistics, the affine pass, the gradient sums and the gradient pass).
// Activations are (N, C, *) views whose spatial dims flatten; per-channel vectors are (C,) and
// contiguous. CUDA reductions take a float64 workspace from torch's allocator (Python passes it).
#include <cmath>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#include "bindings/binding.h"
#include "common/tensor.h"
#include "cuda/cuda_api.h"

namespace nnk {

// The kernels (cpu/batch_norm.cpp; T = float or double).
namespace cpu {

// Per channel: count = N*S, mean, and m2 = sum (x - mean)^2.
template <class T>
void batch_norm_stats(View3<const T> x, T* mean, T* m2);

// y = (x - center[c]) * scale[c] + shift[c] (center null: 0).
template <class T>
void batch_norm_apply(View3<const T> x, View3<T> y, const T* center, const T* scale,
                      const T* shift);

// Training forward, fused: statistics then normalisation per channel. Writes save_mean,
// save_invstd (1 / sqrt(var + eps), biased var) and, when running_mean / running_var are given,
// running = (1 - momentum) * running + momentum * batch (unbiased variance).
template <class T>
void batch_norm_forward_train(View3<const T> x, View3<T> y, const T* w, const T* b, double eps,
                              double momentum, T* save_mean, T* save_invstd, T* running_mean,
                              T* running_var);

// Per channel: sum_dy = sum dy, sum_dy_xhat = sum dy * (x - mean) * invstd.
template <class T>
void batch_norm_backward_reduce(View3<const T> dy, View3<const T> x, const T* mean, const T* invstd,
                                T* sum_dy, T* sum_dy_xhat);

// dx = (dy - mean_dy[c] - xhat * mean_dy_xhat[c]) * invstd[c] * w[c] (w null: 1).
template <class T>
void batch_norm_backward_apply(View3<const T> dy, View3<const T> x, const T* mean, const T* invstd,
                               const T* w, const T* mean_dy, const T* mean_dy_xhat, View3<T> dx);

// Training backward, fused: the reduction then dx per channel. dx may be null (no input
// gradient); dw, db receive sum dy * xhat and sum dy (either may be null).
template <class T>
void batch_norm_backward_train(View3<const T> dy, View3<const T> x, const T* mean, const T* invstd,
                               const T* w, View3<T> dx, T* dw, T* db);

// bfloat16 activations (raw uint16) with float32 weight, bias and statistics.
void batch_norm_forward_train_bf16(View3<const uint16_t> x, View3<uint16_t> y, const float* w,
                                   const float* b, double eps, double momentum, float* save_mean,
                                   float* save_invstd, float* running_mean, float* running_var);
void batch_norm_apply_bf16(View3<const uint16_t> x, View3<uint16_t> y, const float* center,
                           const float* scale, const float* shift);
void batch_norm_backward_reduce_bf16(View3<const uint16_t> dy, View3<const uint16_t> x,
                                     const float* mean, const float* invstd, float* sum_dy,
                                     float* sum_dy_xhat);
void batch_norm_backward_train_bf16(View3<const uint16_t> dy, View3<const uint16_t> x,
                                    const float* mean, const float* invstd, const float* w,
                                    View3<uint16_t> dx, float* dw, float* db);

}  // namespace cpu

// The CUDA backend (cuda/batch_norm.cu), float32, the same operations. Every view of a call has
// unit-stride rows (ss == 1) or channels innermost (sc == 1), the same for all of them. ws: a
// workspace of C * kBatchNormParts * 2 doubles for the partial sums of the reductions.
namespace cuda {
void batch_norm_forward_train(View3<const float> x, View3<float> y, const float* w, const float* b,
                              double eps, double momentum, float* save_mean, float* save_invstd,
                              float* running_mean, float* running_var, double* ws, int device,
                              void* stream);
void batch_norm_stats(View3<const float> x, float* mean, float* m2, double* ws, int device,
                      void* stream);
void batch_norm_apply(View3<const float> x, View3<float> y, const float* center, const float* scale,
                      const float* shift, int device, void* stream);
void batch_norm_backward_reduce(View3<const float> dy, View3<const float> x, const float* mean,
                                const float* invstd, float* sum_dy, float* sum_dy_xhat, double* ws,
                                int device, void* stream);
void batch_norm_backward_apply(View3<const float> dy, View3<const float> x, const float* mean,
                               const float* invstd, const float* w, const float* mean_dy,
                               const float* mean_dy_xhat, View3<float> dx, int device,
                               void* stream);
// dx.p null: dw and db only.
void batch_norm_backward_train(View3<const float> dy, View3<const float> x, const float* mean,
                               const float* invstd, const float* w, View3<float> dx, float* dw,
                               float* db, double* ws, int device, void* stream);
}  // namespace cuda

namespace {

// An (N, C, *) activation as the (N, C, S) view of the kernels (S = the flattened spatial dims).
template <class T>
View3<T> view3(const TensorView& v) {
  View3<T> r;
  r.p = v.ptr<T>();
  r.N = v.shape[0];
  r.C = v.shape[1];
  r.S = 1;
  r.sn = v.strides[0];
  r.sc = v.strides[1];
  r.ss = 1;
  if (v.ndim >= 3) {
    r.S = v.ndim == 3 ? v.shape[2] : v.shape[2] * v.shape[3];
    r.ss = v.ndim == 3 ? v.strides[2] : flat_stride(v, 2, 3);
  }
  return r;
}

// Activation i: the input itself (like null: a float (N, C, *) tensor, or bfloat16 on the CPU
// where the entry point has bfloat16 kernels) or shaped like it.
TensorView activation(const Call& c, int i, const TensorView* like, bool output = false,
                      bool bf16 = false) {
  const char* name = c.name(i);
  TensorView v = output ? c.output(i) : c.tensor(i);
  if (like) {
    check_like(v, name, *like, "input");
    bool same = v.ndim == like->ndim;
    for (int d = 0; same && d < v.ndim; ++d) same = v.shape[d] == like->shape[d];
    NNK_CHECK_VALUE(same, name, " ", shape_str(v), " must have the shape of input ",
                    shape_str(*like));
  } else {
    check_float(v, name, bf16 ? Dtypes::gemm : Dtypes::floating);
    check_ndim(v, name, {2, 3, 4});
  }
  if (v.ndim == 4)
    NNK_CHECK_VALUE(flattens(v, 2, 3), name,
                    " must have its (H, W) dims flattenable (contiguous or channels_last)");
  return v;
}

TensorView output_activation(const Call& c, int i, const TensorView& x) {
  const TensorView v = activation(c, i, &x, true);
  check_output(v, c.name(i));
  check_no_overlap(v, c.name(i), x, "input");
  return v;
}

// The dtype of the per-channel tensors: the input's, float32 for a bfloat16 input (torch's
// mixed-dtype batch norm). check_like's reference for them.
TensorView params_of(const TensorView& x) {
  TensorView p = x;
  if (x.dtype == DType::bf16) p.dtype = DType::f32;
  return p;
}
const char* params_name(const TensorView& x) {
  return x.dtype == DType::bf16 ? "a bfloat16 input's per-channel tensors" : "input";
}

// Per-channel vector i: (C,), contiguous, like the input (float32 for a bfloat16 input); the
// empty view when optional and None.
TensorView channel(const Call& c, int i, const TensorView& x, bool output = false,
                   bool optional = false) {
  if (optional && !c.given(i)) return TensorView();
  const TensorView v = output ? c.output(i) : c.tensor(i);
  check_vector(v, c.name(i), x.shape[1], params_of(x), params_name(x));
  if (output) check_output(v, c.name(i));
  return v;
}

// The CUDA kernels take unit-stride rows (contiguous) or channels innermost (channels_last), the
// same for every operand of a call.
void check_cuda_layout(std::initializer_list<std::pair<const TensorView*, const char*>> views) {
  if (views.begin()->first->device != Device::cuda) return;
  bool rows = true, pixels = true;
  std::string names;
  for (const auto& [v, name] : views) {
    if (v->ndim == 0) continue;  // an absent optional output
    const View3<const float> w = normalised(view3<const float>(*v));
    rows = rows && (w.ss == 1 || w.S == 1);
    pixels = pixels && w.sc == 1;
    names += std::string(names.empty() ? "" : ", ") + name;
  }
  NNK_CHECK_VALUE(rows || pixels, "batch_norm on CUDA: ", names,
                  " must all be contiguous or all channels_last");
}

// The CUDA kernels' scratch for partial sums (parameter i): float64, C * kBatchNormParts * 2
// values. Null on the CPU.
double* workspace(const Call& c, int i, const TensorView& x) {
  if (x.device != Device::cuda) return nullptr;
  NNK_CHECK_VALUE(c.given(i), "workspace is required for CUDA inputs");
  const TensorView ws = c.output(i);
  NNK_CHECK_VALUE(ws.device == x.device && ws.device_id == x.device_id,
                  "workspace and input must be on the same device");
  NNK_CHECK_TYPE(ws.dtype == DType::f64, "workspace must be float64, got ", dtype_str(ws));
  NNK_CHECK_VALUE(ws.ndim == 1 && (ws.shape[0] <= 1 || ws.strides[0] == 1) &&
                      ws.shape[0] >= x.shape[1] * cuda::kBatchNormParts * 2,
                  "workspace must be a contiguous vector of at least C * ",
                  cuda::kBatchNormParts * 2, " values");
  check_output(ws, "workspace");
  return ws.ptr<double>();
}
NNK_CONSTANT(BATCH_NORM_CUDA_WORKSPACE_PER_CHANNEL, cuda::kBatchNormParts * 2);

py::object batch_norm_forward_train(Call& c) {
  const TensorView x = activation(c, 0, nullptr, false, true), y = output_activation(c, 1, x);
  const TensorView w = channel(c, 2, x, false, true), b = channel(c, 3, x, false, true);
  const double eps = c.f64(4, 1e-5), momentum = c.f64(5, 0.1);
  const TensorView mean = channel(c, 6, x, true), invstd = channel(c, 7, x, true);
  const TensorView rm = channel(c, 8, x, true, true), rv = channel(c, 9, x, true, true);
  NNK_CHECK_VALUE(x.shape[0] * view3<const float>(x).S > 1 || x.shape[1] == 0,
                  "expected more than 1 value per channel when training, got input of shape ",
                  shape_str(x));
  check_cuda_layout({{&x, "input"}, {&y, "out"}});
  double* ws = workspace(c, 10, x);
  run(
      x, double(x.numel()),
      [&] {
        cpu::batch_norm_forward_train_bf16(view3<const uint16_t>(x), view3<uint16_t>(y),
                                           w.ptr<const float>(), b.ptr<const float>(), eps,
                                           momentum, mean.ptr<float>(), invstd.ptr<float>(),
                                           rm.ptr<float>(), rv.ptr<float>());
      },
      [&](auto t) {
        using T = decltype(t);
        cpu::batch_norm_forward_train<T>(view3<const T>(x), view3<T>(y), w.ptr<const T>(),
                                         b.ptr<const T>(), eps, momentum, mean.ptr<T>(),
                                         invstd.ptr<T>(), rm.ptr<T>(), rv.ptr<T>());
      },
      [&](auto s) {
        cuda::batch_norm_forward_train(view3<const float>(x), view3<float>(y), w.ptr<const float>(),
                                       b.ptr<const float>(), eps, momentum, mean.ptr<float>(),
                                       invstd.ptr<float>(), rm.ptr<float>(), rv.ptr<float>(), ws,
                                       s.device, s.stream);
      });
  return py::none();
}
NNK_BINDING(batch_norm_forward_train,
            "input, out, weight, bias, eps, momentum, save_mean, save_invstd, running_mean, "
            "running_var, workspace=None",
            "Training forward: batch statistics (save_mean, save_invstd), out normalised with "
            "them, running statistics updated in place when given.");

py::object batch_norm_stats(Call& c) {
  const TensorView x = activation(c, 0, nullptr);
  const TensorView mean = channel(c, 1, x, true), m2 = channel(c, 2, x, true);
  NNK_CHECK_VALUE(x.shape[0] * view3<const float>(x).S > 0 || x.shape[1] == 0,
                  "batch statistics need at least one value per channel");
  check_cuda_layout({{&x, "input"}});
  double* ws = workspace(c, 3, x);
  run(
      x, double(x.numel()),
      [&](auto t) {
        using T = decltype(t);
        cpu::batch_norm_stats<T>(view3<const T>(x), mean.ptr<T>(), m2.ptr<T>());
      },
      [&](auto s) {
        cuda::batch_norm_stats(view3<const float>(x), mean.ptr<float>(), m2.ptr<float>(), ws,
                               s.device, s.stream);
      });
  return py::none();
}
NNK_BINDING(batch_norm_stats, "input, mean, m2, workspace=None",
            "Per channel: mean and m2 = sum (x - mean)^2.");

py::object batch_norm_apply(Call& c) {
  const TensorView x = activation(c, 0, nullptr, false, true), y = output_activation(c, 1, x);
  const TensorView center = channel(c, 2, x, false, true);
  const TensorView scale = channel(c, 3, x), shift = channel(c, 4, x);
  check_cuda_layout({{&x, "input"}, {&y, "out"}});
  run(
      x, double(x.numel()),
      [&] {
        cpu::batch_norm_apply_bf16(view3<const uint16_t>(x), view3<uint16_t>(y),
                                   center.ptr<const float>(), scale.ptr<const float>(),
                                   shift.ptr<const float>());
      },
      [&](auto t) {
        using T = decltype(t);
        cpu::batch_norm_apply<T>(view3<const T>(x), view3<T>(y), center.ptr<const T>(),
                                 scale.ptr<const T>(), shift.ptr<const T>());
      },
      [&](auto s) {
        cuda::batch_norm_apply(view3<const float>(x), view3<float>(y), center.ptr<const float>(),
                               scale.ptr<const float>(), shift.ptr<const float>(), s.device,
                               s.stream);
      });
  return py::none();
}
NNK_BINDING(batch_norm_apply, "input, out, center, scale, shift",
            "out = (input - center) * scale + shift per channel (center None: 0).");

// Eval forward on the CPU in one call: the per-channel coefficients from the running statistics
// (invstd = 1 / sqrt(running_var + eps), scale = weight * invstd, shift = bias, rounded in the
// input's dtype as torch's ops would), then the affine pass. The per-channel tensors may have any
// stride (they are read once into the coefficients). CUDA inputs take the coefficients from torch
// ops and batch_norm_apply (nnkernels/ops/batch_norm.py).
TensorView running_stat(const Call& c, int i, const TensorView& x) {
  const TensorView v = c.tensor_or_none(i);
  if (!c.given(i)) return v;
  check_like(v, c.name(i), params_of(x), params_name(x));
  check_shape(v, c.name(i), {x.shape[1]});
  return v;
}

py::object batch_norm_eval(Call& c) {
  const TensorView x = activation(c, 0, nullptr, false, true), y = output_activation(c, 1, x);
  NNK_CHECK_VALUE(c.given(2) && c.given(3), "running_mean and running_var must be given");
  const TensorView mean = running_stat(c, 2, x), var = running_stat(c, 3, x);
  const TensorView w = running_stat(c, 4, x), b = running_stat(c, 5, x);
  const TensorView invstd = channel(c, 6, x, true, true);
  const double eps = c.f64(7, 1e-5);
  NNK_CHECK_VALUE(x.device == Device::cpu,
                  "batch_norm_eval runs on CPU tensors (CUDA: batch_norm_apply)");
  // (center, scale, shift) in T, the per-channel tensors' dtype
  auto coefs = [&](auto t) {
    using T = decltype(t);
    const int64_t C = x.shape[1];
    std::vector<T> coef(size_t(3 * C));
    T *center = coef.data(), *scale = center + C, *shift = scale + C;
    auto at = [](const TensorView& v, int64_t i) { return v.ptr<const T>()[i * v.strides[0]]; };
    for (int64_t i = 0; i < C; ++i) {
      const T inv = T(1) / std::sqrt(at(var, i) + T(eps));
      if (invstd.data) invstd.ptr<T>()[i] = inv;
      center[i] = at(mean, i);
      scale[i] = w.data ? at(w, i) * inv : inv;
      shift[i] = b.data ? at(b, i) : T(0);
    }
    return coef;
  };
  const int64_t C = x.shape[1];
  run(
      x, double(x.numel()),
      [&] {
        const std::vector<float> k = coefs(float());
        cpu::batch_norm_apply_bf16(view3<const uint16_t>(x), view3<uint16_t>(y), k.data(),
                                   k.data() + C, k.data() + 2 * C);
      },
      [&](auto t) {
        using T = decltype(t);
        const std::vector<T> k = coefs(t);
        cpu::batch_norm_apply<T>(view3<const T>(x), view3<T>(y), k.data(), k.data() + C,
                                 k.data() + 2 * C);
      },
      no_cuda);
  return py::none();
}
NNK_BINDING(batch_norm_eval,
            "input, out, running_mean, running_var, weight, bias, invstd=None, eps=1e-5",
            "Eval forward (CPU): out = (input - running_mean) * weight / sqrt(running_var + eps) "
            "+ bias per channel; invstd, when given, receives 1 / sqrt(running_var + eps).");

py::object batch_norm_backward_reduce(Call& c) {
  const TensorView x = activation(c, 1, nullptr, false, true), dy = activation(c, 0, &x);
  const TensorView mean = channel(c, 2, x), invstd = channel(c, 3, x);
  const TensorView sdy = channel(c, 4, x, true), sdyx = channel(c, 5, x, true);
  check_cuda_layout({{&dy, "grad_output"}, {&x, "input"}});
  double* ws = workspace(c, 6, x);
  run(
      x, double(x.numel()),
      [&] {
        cpu::batch_norm_backward_reduce_bf16(view3<const uint16_t>(dy), view3<const uint16_t>(x),
                                             mean.ptr<const float>(), invstd.ptr<const float>(),
                                             sdy.ptr<float>(), sdyx.ptr<float>());
      },
      [&](auto t) {
        using T = decltype(t);
        cpu::batch_norm_backward_reduce<T>(view3<const T>(dy), view3<const T>(x),
                                           mean.ptr<const T>(), invstd.ptr<const T>(), sdy.ptr<T>(),
                                           sdyx.ptr<T>());
      },
      [&](auto s) {
        cuda::batch_norm_backward_reduce(
            view3<const float>(dy), view3<const float>(x), mean.ptr<const float>(),
            invstd.ptr<const float>(), sdy.ptr<float>(), sdyx.ptr<float>(), ws, s.device, s.stream);
      });
  return py::none();
}
NNK_BINDING(batch_norm_backward_reduce,
            "grad_output, input, mean, invstd, sum_dy, sum_dy_xhat, workspace=None",
            "Per channel: sum_dy = sum dy, sum_dy_xhat = sum dy * (x - mean) * invstd.");

py::object batch_norm_backward_apply(Call& c) {
  const TensorView x = activation(c, 1, nullptr), dy = activation(c, 0, &x);
  const TensorView mean = channel(c, 2, x), invstd = channel(c, 3, x);
  const TensorView w = channel(c, 4, x, false, true);
  const TensorView mdy = channel(c, 5, x), mdyx = channel(c, 6, x);
  const TensorView dx = output_activation(c, 7, x);
  check_no_overlap(dx, "grad_input", dy, "grad_output");
  check_cuda_layout({{&dy, "grad_output"}, {&x, "input"}, {&dx, "grad_input"}});
  run(
      x, double(x.numel()),
      [&](auto t) {
        using T = decltype(t);
        cpu::batch_norm_backward_apply<T>(
            view3<const T>(dy), view3<const T>(x), mean.ptr<const T>(), invstd.ptr<const T>(),
            w.ptr<const T>(), mdy.ptr<const T>(), mdyx.ptr<const T>(), view3<T>(dx));
      },
      [&](auto s) {
        cuda::batch_norm_backward_apply(
            view3<const float>(dy), view3<const float>(x), mean.ptr<const float>(),
            invstd.ptr<const float>(), w.ptr<const float>(), mdy.ptr<const float>(),
            mdyx.ptr<const float>(), view3<float>(dx), s.device, s.stream);
      });
  return py::none();
}
NNK_BINDING(batch_norm_backward_apply,
            "grad_output, input, mean, invstd, weight, mean_dy, mean_dy_xhat, grad_input",
            "grad_input = (dy - mean_dy - xhat * mean_dy_xhat) * invstd * weight per channel.");

py::object batch_norm_backward_train(Call& c) {
  const TensorView x = activation(c, 1, nullptr, false, true), dy = activation(c, 0, &x);
  const TensorView mean = channel(c, 2, x), invstd = channel(c, 3, x);
  const TensorView w = channel(c, 4, x, false, true);
  TensorView dx;  // ndim 0: no input gradient
  if (c.given(5)) {
    dx = output_activation(c, 5, x);
    check_no_overlap(dx, "grad_input", dy, "grad_output");
  }
  const TensorView dw = channel(c, 6, x, true, true), db = channel(c, 7, x, true, true);
  check_cuda_layout({{&dy, "grad_output"}, {&x, "input"}, {&dx, "grad_input"}});
  double* ws = workspace(c, 8, x);
  run(
      x, double(x.numel()),
      [&] {
        View3<uint16_t> dxv;
        if (dx.ndim) dxv = view3<uint16_t>(dx);
        cpu::batch_norm_backward_train_bf16(
            view3<const uint16_t>(dy), view3<const uint16_t>(x), mean.ptr<const float>(),
            invstd.ptr<const float>(), w.ptr<const float>(), dxv, dw.ptr<float>(), db.ptr<float>());
      },
      [&](auto t) {
        using T = decltype(t);
        View3<T> dxv;
        if (dx.ndim) dxv = view3<T>(dx);
        cpu::batch_norm_backward_train<T>(view3<const T>(dy), view3<const T>(x),
                                          mean.ptr<const T>(), invstd.ptr<const T>(),
                                          w.ptr<const T>(), dxv, dw.ptr<T>(), db.ptr<T>());
      },
      [&](auto s) {
        View3<float> dxv;
        if (dx.ndim) dxv = view3<float>(dx);
        cuda::batch_norm_backward_train(view3<const float>(dy), view3<const float>(x),
                                        mean.ptr<const float>(), invstd.ptr<const float>(),
                                        w.ptr<const float>(), dxv, dw.ptr<float>(), db.ptr<float>(),
                                        ws, s.device, s.stream);
      });
  return py::none();
}
NNK_BINDING(batch_norm_backward_train,
            "grad_output, input, mean, invstd, weight, grad_input, grad_weight, grad_bias, "
            "workspace=None",
            "Training backward: grad_input (or None), grad_weight = sum dy * xhat and grad_bias = "
            "sum dy (each or None).");

}  // namespace
}  // namespace nnk
