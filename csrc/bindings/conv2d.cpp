// Bindings of conv2d: the three passes and sum_channels (the bias gradient without a weight
// gradient). padding is (top, bottom, left, right), zeros.
#include "bindings/binding.h"
#include "common/conv2d_args.h"
#include "cpu/reduce.h"
#include "cuda/cuda_api.h"

namespace nnk {

// The kernels (cpu/conv2d.cpp; T = float or double).
namespace cpu {

// a: the geometry and the strides of the pass's tensors (x or dx in xs, w or dw in ws, y or dy
// in ys).
template <class T>
void conv2d_forward(const Conv2dArgs& a, const T* x, const T* w, const T* bias, T* y);

// dx = the adjoint of the forward in x (every element of dx is written).
template <class T>
void conv2d_backward_data(const Conv2dArgs& a, const T* dy, const T* w, T* dx);

// dw = the adjoint of the forward in w (written, not accumulated); dbias (K,) = sum of dy over
// n, p, q when not null.
template <class T>
void conv2d_backward_weight(const Conv2dArgs& a, const T* x, const T* dy, T* dw, T* dbias);

// The same on bfloat16 words (raw uint16) with float32 accumulation.
void conv2d_forward_bf16(const Conv2dArgs& a, const uint16_t* x, const uint16_t* w,
                         const uint16_t* bias, uint16_t* y);
void conv2d_backward_data_bf16(const Conv2dArgs& a, const uint16_t* dy, const uint16_t* w,
                               uint16_t* dx);
void conv2d_backward_weight_bf16(const Conv2dArgs& a, const uint16_t* x, const uint16_t* dy,
                                 uint16_t* dw, uint16_t* dbias);

}  // namespace cpu

// The CUDA backend (cuda/conv2d.cu): implicit-GEMM passes with the same arguments, float32, on
// `stream` of `device`. The weight's (C/groups, R, S) dims, and the pixels of y / dx / dy, must
// flatten.
namespace cuda {
void conv2d_forward(const Conv2dArgs& a, const float* x, const float* w, const float* bias,
                    float* y, int device, void* stream);
void conv2d_backward_data(const Conv2dArgs& a, const float* dy, const float* w, float* dx,
                          int device, void* stream);
void conv2d_backward_weight(const Conv2dArgs& a, const float* x, const float* dy, float* dw,
                            float* dbias, int device, void* stream);
}  // namespace cuda

namespace {

// The pass over input `xv` (N, C, H, W) (or its gradient), weight `wv` (K, C/groups, R, S) (or
// its gradient) and output `yv` (N, K, P, Q) (or its gradient), read from the call's stride,
// padding, dilation and groups at parameters first .. first+3. Validates the geometry and the
// output's shape.
Conv2dArgs conv_args(const Call& c, int first, const TensorView& xv, const char* xname,
                     const TensorView& wv, const char* wname, const TensorView& yv,
                     const char* yname) {
  check_ndim(xv, xname, {4});
  check_ndim(wv, wname, {4});
  const auto stride = c.ints<2>(first), dilation = c.ints<2>(first + 2);
  const auto padding = c.ints<4>(first + 1);
  const int64_t groups = c.i64(first + 3, 1);
  NNK_CHECK_VALUE(stride[0] >= 1 && stride[1] >= 1, "stride must be positive, got (", stride[0],
                  ", ", stride[1], ")");
  NNK_CHECK_VALUE(dilation[0] >= 1 && dilation[1] >= 1, "dilation must be positive, got (",
                  dilation[0], ", ", dilation[1], ")");
  for (int64_t p : padding) NNK_CHECK_VALUE(p >= 0, "padding must be non-negative, got ", p);
  NNK_CHECK_VALUE(groups >= 1, "groups must be positive, got ", groups);
  Conv2dArgs a{};
  a.N = xv.shape[0], a.C = xv.shape[1], a.H = xv.shape[2], a.W = xv.shape[3];
  a.K = wv.shape[0], a.R = wv.shape[2], a.S = wv.shape[3];
  a.sh = stride[0], a.sw = stride[1], a.ph = padding[0], a.pw = padding[2];
  a.dh = dilation[0], a.dw = dilation[1], a.groups = groups;
  NNK_CHECK_VALUE(a.C % groups == 0, "groups=", groups, " must divide the input channels (", a.C,
                  ")");
  NNK_CHECK_VALUE(a.K % groups == 0, "groups=", groups, " must divide the output channels (", a.K,
                  ")");
  NNK_CHECK_VALUE(wv.shape[1] * groups == a.C, wname, " ", shape_str(wv), " expects ",
                  wv.shape[1] * groups, " input channels (", wv.shape[1], " x groups=", groups,
                  ") but ", xname, " ", shape_str(xv), " has ", a.C);
  a.Cg = a.C / groups, a.Kg = a.K / groups;
  const int64_t eh = a.dh * (a.R - 1) + 1, ew = a.dw * (a.S - 1) + 1;  // dilated kernel extent
  const int64_t hp = a.H + padding[0] + padding[1], wp = a.W + padding[2] + padding[3];
  NNK_CHECK_VALUE(eh <= hp && ew <= wp, "the kernel (", eh, " x ", ew,
                  " with dilation) is larger than the padded input (", hp, " x ", wp, ")");
  a.P = (hp - eh) / a.sh + 1;
  a.Q = (wp - ew) / a.sw + 1;
  check_shape(yv, yname, {a.N, a.K, a.P, a.Q});
  // The weight's (C/groups, R, S) and the activations' (H, W) must flatten (contiguous or
  // channels_last).
  NNK_CHECK_VALUE(
      flattens(wv, 2, 3) && (wv.shape[1] <= 1 || wv.shape[2] * wv.shape[3] <= 1 ||
                             wv.strides[1] == wv.shape[2] * wv.shape[3] * flat_stride(wv, 2, 3)),
      wname, " must have its (C/groups, R, S) dims contiguous (e.g. .contiguous())");
  for (const auto& [v, name] : {std::pair{&xv, xname}, std::pair{&yv, yname}})
    NNK_CHECK_VALUE(flattens(*v, 2, 3), name,
                    " must have its (H, W) dims flattenable (contiguous or channels_last)");
  for (int d = 0; d < 4; ++d)
    a.xs[d] = xv.strides[d], a.ws[d] = wv.strides[d], a.ys[d] = yv.strides[d];
  return a;
}

// Multiply-adds of one pass.
double conv_work(const Conv2dArgs& a) {
  return double(a.N) * double(a.K) * double(a.P) * double(a.Q) * double(a.Cg * a.R * a.S);
}

// out = conv2d(input, weight) + bias.
py::object conv2d_forward(Call& c) {
  const TensorView x = c.tensor(0), w = c.tensor(1), bias = c.tensor_or_none(2), y = c.output(3);
  check_float(x, "input", Dtypes::gemm);
  check_like(w, "weight", x, "input");
  check_like(y, "out", x, "input");
  const Conv2dArgs a = conv_args(c, 4, x, "input", w, "weight", y, "out");
  check_output(y, "out");
  check_no_overlap(y, "out", x, "input");
  check_no_overlap(y, "out", w, "weight");
  if (c.given(2)) {
    check_vector(bias, "bias", a.K, x, "input");
    check_no_overlap(y, "out", bias, "bias");
  }
  run(
      x, conv_work(a),
      [&] {
        cpu::conv2d_forward_bf16(a, x.ptr<const uint16_t>(), w.ptr<const uint16_t>(),
                                 bias.ptr<const uint16_t>(), y.ptr<uint16_t>());
      },
      [&](auto t) {
        using T = decltype(t);
        cpu::conv2d_forward<T>(a, x.ptr<const T>(), w.ptr<const T>(), bias.ptr<const T>(),
                               y.ptr<T>());
      },
      [&](auto s) {
        cuda::conv2d_forward(a, x.ptr<const float>(), w.ptr<const float>(), bias.ptr<const float>(),
                             y.ptr<float>(), s.device, s.stream);
      });
  return py::none();
}
NNK_BINDING(conv2d_forward, "input, weight, bias, out, stride, padding, dilation, groups=1",
            "out = conv2d(input, weight) + bias; padding = (top, bottom, left, right), zeros.");

// grad_input = the adjoint of the forward in the input.
py::object conv2d_backward_data(Call& c) {
  const TensorView dy = c.tensor(0), w = c.tensor(1), dx = c.output(2);
  check_float(dy, "grad_output", Dtypes::gemm);
  check_like(w, "weight", dy, "grad_output");
  check_like(dx, "grad_input", dy, "grad_output");
  const Conv2dArgs a = conv_args(c, 3, dx, "grad_input", w, "weight", dy, "grad_output");
  check_output(dx, "grad_input");
  check_no_overlap(dx, "grad_input", dy, "grad_output");
  check_no_overlap(dx, "grad_input", w, "weight");
  run(
      dy, conv_work(a),
      [&] {
        cpu::conv2d_backward_data_bf16(a, dy.ptr<const uint16_t>(), w.ptr<const uint16_t>(),
                                       dx.ptr<uint16_t>());
      },
      [&](auto t) {
        using T = decltype(t);
        cpu::conv2d_backward_data<T>(a, dy.ptr<const T>(), w.ptr<const T>(), dx.ptr<T>());
      },
      [&](auto s) {
        cuda::conv2d_backward_data(a, dy.ptr<const float>(), w.ptr<const float>(), dx.ptr<float>(),
                                   s.device, s.stream);
      });
  return py::none();
}
NNK_BINDING(conv2d_backward_data,
            "grad_output, weight, grad_input, stride, padding, dilation, groups=1",
            "grad_input = the data gradient of conv2d.");

// grad_weight (and grad_bias, or None) = the adjoint of the forward in the weight (and bias).
py::object conv2d_backward_weight(Call& c) {
  const TensorView x = c.tensor(0), dy = c.tensor(1), dw = c.output(2);
  const TensorView db = c.given(3) ? c.output(3) : TensorView();
  check_float(x, "input", Dtypes::gemm);
  check_like(dy, "grad_output", x, "input");
  check_like(dw, "grad_weight", x, "input");
  const Conv2dArgs a = conv_args(c, 4, x, "input", dw, "grad_weight", dy, "grad_output");
  check_output(dw, "grad_weight");
  check_no_overlap(dw, "grad_weight", x, "input");
  check_no_overlap(dw, "grad_weight", dy, "grad_output");
  if (c.given(3)) {
    check_vector(db, "grad_bias", a.K, x, "input");
    check_output(db, "grad_bias");
    check_no_overlap(db, "grad_bias", dw, "grad_weight");
    check_no_overlap(db, "grad_bias", dy, "grad_output");
  }
  run(
      x, conv_work(a),
      [&] {
        cpu::conv2d_backward_weight_bf16(a, x.ptr<const uint16_t>(), dy.ptr<const uint16_t>(),
                                         dw.ptr<uint16_t>(), db.ptr<uint16_t>());
      },
      [&](auto t) {
        using T = decltype(t);
        cpu::conv2d_backward_weight<T>(a, x.ptr<const T>(), dy.ptr<const T>(), dw.ptr<T>(),
                                       db.ptr<T>());
      },
      [&](auto s) {
        cuda::conv2d_backward_weight(a, x.ptr<const float>(), dy.ptr<const float>(),
                                     dw.ptr<float>(), db.ptr<float>(), s.device, s.stream);
      });
  return py::none();
}
NNK_BINDING(conv2d_backward_weight,
            "input, grad_output, grad_weight, grad_bias, stride, padding, dilation, groups=1",
            "grad_weight (and grad_bias when given) = the weight (and bias) gradient of conv2d.");

// out[c] = sum_{n,h,w} x[n, c, h, w] for a 4-D x whose (H, W) dims flatten.
py::object sum_channels(Call& c) {
  const TensorView x = c.tensor(0), out = c.output(1);
  check_float(x, "x", Dtypes::gemm);
  check_like(out, "out", x, "x");
  check_ndim(x, "x", {4});
  check_vector(out, "out", x.shape[1], x, "x");
  NNK_CHECK_VALUE(flattens(x, 2, 3),
                  "x must have its (H, W) dims flattenable "
                  "(contiguous or channels_last)");
  check_output(out, "out");
  check_no_overlap(out, "out", x, "x");
  const int64_t N = x.shape[0], C = x.shape[1], HW = x.shape[2] * x.shape[3];
  const int64_t si = flat_stride(x, 2, 3);
  run(
      x, double(x.numel()),
      [&] {
        cpu::sum_channels_bf16(N, C, HW, x.ptr<const uint16_t>(), x.strides[0], x.strides[1], si,
                               out.ptr<uint16_t>());
      },
      [&](auto t) {
        using T = decltype(t);
        cpu::sum_channels(N, C, HW, x.ptr<const T>(), x.strides[0], x.strides[1], si, out.ptr<T>());
      },
      [&](auto s) {
        cuda::sum_channels(N, C, HW, x.ptr<const float>(), x.strides[0], x.strides[1], si,
                           out.ptr<float>(), s.device, s.stream);
      });
  return py::none();
}
NNK_BINDING(sum_channels, "x, out", "out[c] = sum over n, h, w of x[n, c, h, w].");

}  // namespace
}  // namespace nnk
