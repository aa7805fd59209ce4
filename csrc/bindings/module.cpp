// nnkernels._C: argument checks and dispatch by device and dtype, nothing else.
// Tensors arrive as DLPack capsules (torch.utils.dlpack.to_dlpack, numpy's __dlpack__) in
// destination-passing style: the caller allocates every output. The GIL is released while kernels
// run. CUDA launches go on the stream the caller passes (torch's current stream).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/checks.h"
#include "common/dlpack.h"
#include "common/isa.h"
#include "common/threading.h"
#include "cpu/batch_norm.h"
#include "cpu/conv2d.h"
#include "cpu/cross_entropy.h"
#include "cpu/gemm.h"
#include "cpu/lstm.h"
#include "cpu/peak.h"
#include "cpu/reduce.h"
#if defined(NNK_WITH_CUDA)
#include "cuda/cuda_api.h"
#endif

namespace py = pybind11;
using namespace pybind11::literals;

namespace nnk {
namespace {

void require_cuda_build(const TensorView& v, const char* name) {
#if !defined(NNK_WITH_CUDA)
  NNK_CHECK_IMPLEMENTED(v.device != Device::cuda, name,
                        " is a CUDA tensor but this nnkernels build has no CUDA kernels "
                        "(rebuild with nvcc on the PATH, or NNKERNELS_CUDA=ON)");
#endif
}

void transpose_last2(TensorView* v) {
  if (v->ndim < 2) return;  // rejected by the rank checks that follow
  std::swap(v->shape[v->ndim - 1], v->shape[v->ndim - 2]);
  std::swap(v->strides[v->ndim - 1], v->strides[v->ndim - 2]);
}

// A (n,) vector with ref's dtype and device and unit stride: a bias, per-channel coefficients,
// per-row losses.
TensorView vector_of(py::handle h, const char* name, int64_t n, const TensorView& ref,
                     const char* ref_name) {
  const TensorView v = view_of(h, name);
  check_like(v, name, ref, ref_name);
  check_shape(v, name, {n});
  NNK_CHECK_VALUE(n <= 1 || v.strides[0] == 1, name, " must be contiguous");
  return v;
}

// out = alpha * a @ b + beta * out (+ bias broadcast over rows).
// a (M, K) or (B, M, K); b (K, N) or (B, K, N); out (M, N) or (B, M, N); bias (N,) or None.
// A 2-D a or b next to a 3-D out is shared by every batch item.
void gemm(py::handle a_, py::handle b_, py::handle out_, double alpha, double beta,
          py::handle bias_, uintptr_t stream, bool trans_a, bool trans_b) {
  TensorView a = view_of(a_, "a"), b = view_of(b_, "b");
  const TensorView out = view_of(out_, "out");
  // trans_a / trans_b: use the operand's last two dims swapped (a strided view, no copy).
  if (trans_a) transpose_last2(&a);
  if (trans_b) transpose_last2(&b);
  check_float(a, "a");
  check_like(b, "b", a, "a");
  check_like(out, "out", a, "a");
  check_ndim(a, "a", {2, 3});
  check_ndim(b, "b", {2, 3});
  check_ndim(out, "out", {2, 3});
  NNK_CHECK_VALUE(out.ndim == 3 || (a.ndim == 2 && b.ndim == 2),
                  "out must be 3-D (batched) when a or b is 3-D, got out of shape ",
                  shape_str(out));
  const int64_t batch = out.ndim == 3 ? out.shape[0] : 1;
  NNK_CHECK_VALUE(a.ndim == 2 || a.shape[0] == batch, "a has batch size ", a.shape[0],
                  " but out has ", batch);
  NNK_CHECK_VALUE(b.ndim == 2 || b.shape[0] == batch, "b has batch size ", b.shape[0],
                  " but out has ", batch);
  const int64_t M = a.size(-2), K = a.size(-1), N = b.size(-1);
  NNK_CHECK_VALUE(b.size(-2) == K, "a and b cannot be multiplied: a is ", shape_str(a),
                  " and b is ", shape_str(b), " (inner dimensions ", K, " and ", b.size(-2),
                  " differ)");
  if (out.ndim == 3)
    check_shape(out, "out", {batch, M, N});
  else
    check_shape(out, "out", {M, N});
  check_output(out, "out");
  check_no_overlap(out, "out", a, "a");
  check_no_overlap(out, "out", b, "b");

  TensorView bias;
  const bool has_bias = !bias_.is_none();
  if (has_bias) {
    bias = vector_of(bias_, "bias", N, a, "a");
    check_no_overlap(out, "out", bias, "bias");
  }
  require_cuda_build(a, "a");

  auto args = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    Gemm<T> g;
    g.M = M;
    g.N = N;
    g.K = K;
    g.A = a.ptr<const T>();
    g.rsa = a.stride(-2);
    g.csa = a.stride(-1);
    g.B = b.ptr<const T>();
    g.rsb = b.stride(-2);
    g.csb = b.stride(-1);
    g.C = out.ptr<T>();
    g.rsc = out.stride(-2);
    g.csc = out.stride(-1);
    g.alpha = T(alpha);
    g.beta = T(beta);
    g.bias_n = has_bias ? bias.ptr<const T>() : nullptr;
    return g;
  };
  const int64_t sa = a.ndim == 3 ? a.strides[0] : 0, sb = b.ndim == 3 ? b.strides[0] : 0;
  const int64_t sc = out.ndim == 3 ? out.strides[0] : 0;

  py::gil_scoped_release nogil;
  if (a.device == Device::cuda) {
#if defined(NNK_WITH_CUDA)
    cuda::sgemm(args(static_cast<float*>(nullptr)), batch, sa, sb, sc, a.device_id,
                reinterpret_cast<void*>(stream));
#endif
  } else if (a.dtype == DType::f32) {
    cpu::gemm_batched(args(static_cast<float*>(nullptr)), batch, sa, sb, sc);
  } else {
    cpu::gemm_batched(args(static_cast<double*>(nullptr)), batch, sa, sb, sc);
  }
}

// out[j] = sum_i x[i, j] for a 2-D x (R, N) and out (N,).
void sum_rows(py::handle x_, py::handle out_, uintptr_t stream) {
  const TensorView x = view_of(x_, "x"), out = view_of(out_, "out");
  check_float(x, "x");
  check_like(out, "out", x, "x");
  check_ndim(x, "x", {2});
  check_shape(out, "out", {x.shape[1]});
  check_output(out, "out");
  check_no_overlap(out, "out", x, "x");
  require_cuda_build(x, "x");
  const int64_t R = x.shape[0], N = x.shape[1];
  py::gil_scoped_release nogil;
  if (x.device == Device::cuda) {
#if defined(NNK_WITH_CUDA)
    cuda::sum_rows(R, N, x.ptr<const float>(), x.strides[0], x.strides[1], out.ptr<float>(),
                   out.strides[0], x.device_id, reinterpret_cast<void*>(stream));
#endif
  } else if (x.dtype == DType::f32) {
    cpu::sum_rows(R, N, x.ptr<const float>(), x.strides[0], x.strides[1], out.ptr<float>(),
                  out.strides[0]);
  } else {
    cpu::sum_rows(R, N, x.ptr<const double>(), x.strides[0], x.strides[1], out.ptr<double>(),
                  out.strides[0]);
  }
}

// ------------------------------------------------------------------------------------- conv2d

using Pair = std::array<int64_t, 2>;
using Quad = std::array<int64_t, 4>;

// The convolution of input `xv` (N, C, H, W) with weight `wv` (K, C/groups, R, S); padding is
// (top, bottom, left, right). Validates the parameters and returns the geometry with the output
// size (P, Q).
cpu::Conv2dShape conv_shape(const TensorView& xv, const char* xname, const TensorView& wv,
                            const char* wname, Pair stride, Quad padding, Pair dilation,
                            int64_t groups) {
  check_ndim(xv, xname, {4});
  check_ndim(wv, wname, {4});
  NNK_CHECK_VALUE(stride[0] >= 1 && stride[1] >= 1, "stride must be positive, got (", stride[0],
                  ", ", stride[1], ")");
  NNK_CHECK_VALUE(dilation[0] >= 1 && dilation[1] >= 1, "dilation must be positive, got (",
                  dilation[0], ", ", dilation[1], ")");
  for (int64_t p : padding) NNK_CHECK_VALUE(p >= 0, "padding must be non-negative, got ", p);
  NNK_CHECK_VALUE(groups >= 1, "groups must be positive, got ", groups);
  cpu::Conv2dShape s;
  s.N = xv.shape[0];
  s.C = xv.shape[1];
  s.H = xv.shape[2];
  s.W = xv.shape[3];
  s.K = wv.shape[0];
  s.R = wv.shape[2];
  s.S = wv.shape[3];
  s.sh = stride[0];
  s.sw = stride[1];
  s.ph = padding[0];
  s.pw = padding[2];
  s.dh = dilation[0];
  s.dw = dilation[1];
  s.groups = groups;
  NNK_CHECK_VALUE(s.C % groups == 0, "groups=", groups, " must divide the input channels (", s.C,
                  ")");
  NNK_CHECK_VALUE(s.K % groups == 0, "groups=", groups, " must divide the output channels (", s.K,
                  ")");
  NNK_CHECK_VALUE(wv.shape[1] * groups == s.C, wname, " ", shape_str(wv), " expects ",
                  wv.shape[1] * groups, " input channels (", wv.shape[1], " x groups=", groups,
                  ") but ", xname, " ", shape_str(xv), " has ", s.C);
  const int64_t eh = s.dh * (s.R - 1) + 1, ew = s.dw * (s.S - 1) + 1;  // dilated kernel extent
  const int64_t hp = s.H + padding[0] + padding[1], wp = s.W + padding[2] + padding[3];
  NNK_CHECK_VALUE(eh <= hp && ew <= wp, "the kernel (", eh, " x ", ew,
                  " with dilation) is larger than the padded input (", hp, " x ", wp, ")");
  s.P = (hp - eh) / s.sh + 1;
  s.Q = (wp - ew) / s.sw + 1;
  return s;
}

template <class T>
cpu::View4<T> view4(const TensorView& v) {
  return cpu::View4<T>{v.ptr<T>(), {v.strides[0], v.strides[1], v.strides[2], v.strides[3]}};
}

// (dim a, dim b) of v flatten into one index with the stride of b (size-1 dims never matter).
bool flattens(const TensorView& v, int a, int b) {
  return v.shape[a] <= 1 || v.shape[b] <= 1 || v.strides[a] == v.shape[b] * v.strides[b];
}

// The element stride of dims (a, b) flattened into one (flattens(v, a, b) holds). A size-1 dim b
// may carry any stride (torch's contiguity checks ignore it): step by a's then.
int64_t flat_stride(const TensorView& v, int a, int b) {
  return v.shape[b] == 1 ? v.strides[a] : v.strides[b];
}

void check_weight_layout(const TensorView& w, const char* name) {
  NNK_CHECK_VALUE(
      flattens(w, 2, 3) && (w.shape[1] <= 1 || w.shape[2] * w.shape[3] <= 1 ||
                            w.strides[1] == w.shape[2] * w.shape[3] * flat_stride(w, 2, 3)),
      name, " must have its (C/groups, R, S) dims contiguous (e.g. .contiguous())");
}

void check_pixels_layout(const TensorView& v, const char* name) {
  NNK_CHECK_VALUE(flattens(v, 2, 3), name,
                  " must have its (H, W) dims flattenable "
                  "(contiguous or channels_last)");
}

#if defined(NNK_WITH_CUDA)
// The CUDA kernels' view of a convolution: geometry plus the strides of (x or dx), (w or dw),
// (y or dy).
cuda::ConvIndex conv_index(const cpu::Conv2dShape& s, const TensorView& x, const TensorView& w,
                           const TensorView& y) {
  cuda::ConvIndex ix;
  ix.N = s.N;
  ix.C = s.C;
  ix.H = s.H;
  ix.W = s.W;
  ix.K = s.K;
  ix.R = s.R;
  ix.S = s.S;
  ix.P = s.P;
  ix.Q = s.Q;
  ix.sh = s.sh;
  ix.sw = s.sw;
  ix.ph = s.ph;
  ix.pw = s.pw;
  ix.dh = s.dh;
  ix.dw = s.dw;
  ix.groups = s.groups;
  ix.Cg = s.C / s.groups;
  ix.Kg = s.K / s.groups;
  for (int d = 0; d < 4; ++d) {
    ix.xs[d] = x.strides[d];
    ix.ws[d] = w.strides[d];
    ix.ys[d] = y.strides[d];
  }
  return ix;
}
#endif

template <class F>
void dispatch_float(const TensorView& ref, F&& f) {
  if (ref.dtype == DType::f32)
    f(static_cast<float*>(nullptr));
  else
    f(static_cast<double*>(nullptr));
}

void conv2d_forward(py::handle x_, py::handle w_, py::handle bias_, py::handle y_, Pair stride,
                    Quad padding, Pair dilation, int64_t groups, uintptr_t stream) {
  const TensorView x = view_of(x_, "input"), w = view_of(w_, "weight"), y = view_of(y_, "out");
  check_float(x, "input");
  check_like(w, "weight", x, "input");
  check_like(y, "out", x, "input");
  const cpu::Conv2dShape s = conv_shape(x, "input", w, "weight", stride, padding, dilation, groups);
  check_shape(y, "out", {s.N, s.K, s.P, s.Q});
  check_weight_layout(w, "weight");
  check_pixels_layout(y, "out");
  check_output(y, "out");
  check_no_overlap(y, "out", x, "input");
  check_no_overlap(y, "out", w, "weight");
  TensorView bias;
  if (!bias_.is_none()) {
    bias = vector_of(bias_, "bias", s.K, x, "input");
    check_no_overlap(y, "out", bias, "bias");
  }
  require_cuda_build(x, "input");
  py::gil_scoped_release nogil;
  if (x.device == Device::cuda) {
#if defined(NNK_WITH_CUDA)
    cuda::conv2d_forward(conv_index(s, x, w, y), x.ptr<const float>(), w.ptr<const float>(),
                         bias.ptr<const float>(), y.ptr<float>(), x.device_id,
                         reinterpret_cast<void*>(stream));
#endif
    return;
  }
  dispatch_float(x, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    cpu::conv2d_forward<T>(s, view4<const T>(x), view4<const T>(w), bias.ptr<const T>(),
                           view4<T>(y));
  });
}

void conv2d_backward_data(py::handle dy_, py::handle w_, py::handle dx_, Pair stride, Quad padding,
                          Pair dilation, int64_t groups, uintptr_t stream) {
  const TensorView dy = view_of(dy_, "grad_output"), w = view_of(w_, "weight"),
                   dx = view_of(dx_, "grad_input");
  check_float(dy, "grad_output");
  check_like(w, "weight", dy, "grad_output");
  check_like(dx, "grad_input", dy, "grad_output");
  const cpu::Conv2dShape s =
      conv_shape(dx, "grad_input", w, "weight", stride, padding, dilation, groups);
  check_shape(dy, "grad_output", {s.N, s.K, s.P, s.Q});
  check_weight_layout(w, "weight");
  check_pixels_layout(dy, "grad_output");
  check_pixels_layout(dx, "grad_input");
  check_output(dx, "grad_input");
  check_no_overlap(dx, "grad_input", dy, "grad_output");
  check_no_overlap(dx, "grad_input", w, "weight");
  require_cuda_build(dy, "grad_output");
  py::gil_scoped_release nogil;
  if (dy.device == Device::cuda) {
#if defined(NNK_WITH_CUDA)
    cuda::conv2d_backward_data(conv_index(s, dx, w, dy), dy.ptr<const float>(),
                               w.ptr<const float>(), dx.ptr<float>(), dy.device_id,
                               reinterpret_cast<void*>(stream));
#endif
    return;
  }
  dispatch_float(dy, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    cpu::conv2d_backward_data<T>(s, view4<const T>(dy), view4<const T>(w), view4<T>(dx));
  });
}

void conv2d_backward_weight(py::handle x_, py::handle dy_, py::handle dw_, py::handle db_,
                            Pair stride, Quad padding, Pair dilation, int64_t groups,
                            uintptr_t stream) {
  const TensorView x = view_of(x_, "input"), dy = view_of(dy_, "grad_output"),
                   dw = view_of(dw_, "grad_weight");
  check_float(x, "input");
  check_like(dy, "grad_output", x, "input");
  check_like(dw, "grad_weight", x, "input");
  const cpu::Conv2dShape s =
      conv_shape(x, "input", dw, "grad_weight", stride, padding, dilation, groups);
  check_shape(dy, "grad_output", {s.N, s.K, s.P, s.Q});
  check_weight_layout(dw, "grad_weight");
  check_pixels_layout(dy, "grad_output");
  check_output(dw, "grad_weight");
  check_no_overlap(dw, "grad_weight", x, "input");
  check_no_overlap(dw, "grad_weight", dy, "grad_output");
  TensorView db;
  if (!db_.is_none()) {
    db = vector_of(db_, "grad_bias", s.K, x, "input");
    check_output(db, "grad_bias");
    check_no_overlap(db, "grad_bias", dw, "grad_weight");
    check_no_overlap(db, "grad_bias", dy, "grad_output");
  }
  require_cuda_build(x, "input");
  py::gil_scoped_release nogil;
  if (x.device == Device::cuda) {
#if defined(NNK_WITH_CUDA)
    cuda::conv2d_backward_weight(conv_index(s, x, dw, dy), x.ptr<const float>(),
                                 dy.ptr<const float>(), dw.ptr<float>(), db.ptr<float>(),
                                 x.device_id, reinterpret_cast<void*>(stream));
#endif
    return;
  }
  dispatch_float(x, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    cpu::conv2d_backward_weight<T>(s, view4<const T>(x), view4<const T>(dy), view4<T>(dw),
                                   db.ptr<T>());
  });
}

// out[c] = sum_{n,h,w} x[n, c, h, w] for a 4-D x whose (H, W) dims flatten.
void sum_channels(py::handle x_, py::handle out_, uintptr_t stream) {
  const TensorView x = view_of(x_, "x"), out = view_of(out_, "out");
  check_float(x, "x");
  check_like(out, "out", x, "x");
  check_ndim(x, "x", {4});
  check_shape(out, "out", {x.shape[1]});
  check_pixels_layout(x, "x");
  check_output(out, "out");
  check_no_overlap(out, "out", x, "x");
  require_cuda_build(x, "x");
  py::gil_scoped_release nogil;
  if (x.device == Device::cuda) {
#if defined(NNK_WITH_CUDA)
    cuda::sum_channels(x.shape[0], x.shape[1], x.shape[2] * x.shape[3], x.ptr<const float>(),
                       x.strides[0], x.strides[1], flat_stride(x, 2, 3), out.ptr<float>(),
                       x.device_id, reinterpret_cast<void*>(stream));
#endif
    return;
  }
  dispatch_float(x, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    cpu::sum_channels(x.shape[0], x.shape[1], x.shape[2] * x.shape[3], x.ptr<const T>(),
                      x.strides[0], x.strides[1], flat_stride(x, 2, 3), out.ptr<T>());
  });
}

// -------------------------------------------------------------------------------- batch norm

// An (N, C, *) activation as the (N, C, S) view of the batch-norm kernels; the spatial dims must
// flatten into one (contiguous and channels_last do).
template <class T>
cpu::View3<T> view3(const TensorView& v, const char* name) {
  cpu::View3<T> r;
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

TensorView bn_activation(py::handle h, const char* name, const TensorView* like,
                         const char* like_name) {
  TensorView v = view_of(h, name);
  if (like) {
    check_like(v, name, *like, like_name);
    NNK_CHECK_VALUE(v.ndim == like->ndim, name, " must have the shape of ", like_name);
    for (int d = 0; d < v.ndim; ++d)
      NNK_CHECK_VALUE(v.shape[d] == like->shape[d], name, " ", shape_str(v),
                      " must have the shape of ", like_name, " ", shape_str(*like));
  } else {
    check_float(v, name);
    check_ndim(v, name, {2, 3, 4});
  }
  if (v.ndim == 4) check_pixels_layout(v, name);
  return v;
}

// A per-channel vector: (C,), contiguous, like `ref`.
TensorView bn_channel(py::handle h, const char* name, const TensorView& ref, bool output) {
  const TensorView v = vector_of(h, name, ref.shape[1], ref, "input");
  if (output) check_output(v, name);
  return v;
}

#if defined(NNK_WITH_CUDA)
// The CUDA kernels' scratch for partial sums: float64, C * kBatchNormParts * 2 values, from
// torch's allocator (Python passes it for CUDA inputs).
double* bn_workspace(py::handle h, const TensorView& x) {
  NNK_CHECK_VALUE(!h.is_none(), "workspace is required for CUDA inputs");
  const TensorView ws = view_of(h, "workspace");
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

// The CUDA kernels take unit-stride rows (contiguous) or channels innermost (channels_last), the
// same for every operand of a call.
void bn_cuda_layout(std::initializer_list<std::pair<const TensorView*, const char*>> views) {
  bool rows = true, pixels = true;
  for (const auto& [v, name] : views) {
    const cpu::View3<const float> w = cpu::normalised(view3<const float>(*v, name));
    rows = rows && (w.ss == 1 || w.S == 1);
    pixels = pixels && w.sc == 1;
  }
  std::string names;
  for (const auto& [v, name] : views) names += std::string(names.empty() ? "" : ", ") + name;
  NNK_CHECK_VALUE(rows || pixels, "batch_norm on CUDA: ", names,
                  " must all be contiguous or all channels_last");
}
#endif

void bn_forward_train(py::handle x_, py::handle y_, py::handle w_, py::handle b_, double eps,
                      double momentum, py::handle mean_, py::handle invstd_, py::handle rm_,
                      py::handle rv_, py::handle ws_, uintptr_t stream) {
  const TensorView x = bn_activation(x_, "input", nullptr, nullptr);
  const TensorView y = bn_activation(y_, "out", &x, "input");
  check_output(y, "out");
  check_no_overlap(y, "out", x, "input");
  TensorView w, b, rm, rv;
  if (!w_.is_none()) w = bn_channel(w_, "weight", x, false);
  if (!b_.is_none()) b = bn_channel(b_, "bias", x, false);
  if (!rm_.is_none()) rm = bn_channel(rm_, "running_mean", x, true);
  if (!rv_.is_none()) rv = bn_channel(rv_, "running_var", x, true);
  const TensorView mean = bn_channel(mean_, "save_mean", x, true);
  const TensorView invstd = bn_channel(invstd_, "save_invstd", x, true);
  NNK_CHECK_VALUE(x.shape[0] * view3<const float>(x, "input").S > 1 || x.shape[1] == 0,
                  "expected more than 1 value per channel when training, got input of shape ",
                  shape_str(x));
  require_cuda_build(x, "input");
  if (x.device == Device::cuda) {
#if defined(NNK_WITH_CUDA)
    bn_cuda_layout({{&x, "input"}, {&y, "out"}});
    double* ws = bn_workspace(ws_, x);
    py::gil_scoped_release nogil;
    cuda::batch_norm_forward_train(
        view3<const float>(x, "input"), view3<float>(y, "out"), w.ptr<const float>(),
        b.ptr<const float>(), eps, momentum, mean.ptr<float>(), invstd.ptr<float>(),
        rm.ptr<float>(), rv.ptr<float>(), ws, x.device_id, reinterpret_cast<void*>(stream));
#endif
    return;
  }
  py::gil_scoped_release nogil;
  dispatch_float(x, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    cpu::batch_norm_forward_train<T>(view3<const T>(x, "input"), view3<T>(y, "out"),
                                     w.ptr<const T>(), b.ptr<const T>(), eps, momentum,
                                     mean.ptr<T>(), invstd.ptr<T>(), rm.ptr<T>(), rv.ptr<T>());
  });
}

void bn_stats(py::handle x_, py::handle mean_, py::handle m2_, py::handle ws_, uintptr_t stream) {
  const TensorView x = bn_activation(x_, "input", nullptr, nullptr);
  const TensorView mean = bn_channel(mean_, "mean", x, true), m2 = bn_channel(m2_, "m2", x, true);
  NNK_CHECK_VALUE(x.shape[0] * view3<const float>(x, "input").S > 0 || x.shape[1] == 0,
                  "batch statistics need at least one value per channel");
  require_cuda_build(x, "input");
  if (x.device == Device::cuda) {
#if defined(NNK_WITH_CUDA)
    bn_cuda_layout({{&x, "input"}});
    double* ws = bn_workspace(ws_, x);
    py::gil_scoped_release nogil;
    cuda::batch_norm_stats(view3<const float>(x, "input"), mean.ptr<float>(), m2.ptr<float>(), ws,
                           x.device_id, reinterpret_cast<void*>(stream));
#endif
    return;
  }
  py::gil_scoped_release nogil;
  dispatch_float(x, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    cpu::batch_norm_stats<T>(view3<const T>(x, "input"), mean.ptr<T>(), m2.ptr<T>());
  });
}

void bn_apply(py::handle x_, py::handle y_, py::handle center_, py::handle scale_,
              py::handle shift_, uintptr_t stream) {
  const TensorView x = bn_activation(x_, "input", nullptr, nullptr);
  const TensorView y = bn_activation(y_, "out", &x, "input");
  check_output(y, "out");
  check_no_overlap(y, "out", x, "input");
  TensorView center;
  if (!center_.is_none()) center = bn_channel(center_, "center", x, false);
  const TensorView scale = bn_channel(scale_, "scale", x, false);
  const TensorView shift = bn_channel(shift_, "shift", x, false);
  require_cuda_build(x, "input");
  if (x.device == Device::cuda) {
#if defined(NNK_WITH_CUDA)
    bn_cuda_layout({{&x, "input"}, {&y, "out"}});
    py::gil_scoped_release nogil;
    cuda::batch_norm_apply(view3<const float>(x, "input"), view3<float>(y, "out"),
                           center.ptr<const float>(), scale.ptr<const float>(),
                           shift.ptr<const float>(), x.device_id, reinterpret_cast<void*>(stream));
#endif
    return;
  }
  py::gil_scoped_release nogil;
  dispatch_float(x, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    cpu::batch_norm_apply<T>(view3<const T>(x, "input"), view3<T>(y, "out"), center.ptr<const T>(),
                             scale.ptr<const T>(), shift.ptr<const T>());
  });
}

void bn_backward_reduce(py::handle dy_, py::handle x_, py::handle mean_, py::handle invstd_,
                        py::handle sdy_, py::handle sdyx_, py::handle ws_, uintptr_t stream) {
  const TensorView x = bn_activation(x_, "input", nullptr, nullptr);
  const TensorView dy = bn_activation(dy_, "grad_output", &x, "input");
  const TensorView mean = bn_channel(mean_, "mean", x, false);
  const TensorView invstd = bn_channel(invstd_, "invstd", x, false);
  const TensorView sdy = bn_channel(sdy_, "sum_dy", x, true);
  const TensorView sdyx = bn_channel(sdyx_, "sum_dy_xhat", x, true);
  require_cuda_build(x, "input");
  if (x.device == Device::cuda) {
#if defined(NNK_WITH_CUDA)
    bn_cuda_layout({{&dy, "grad_output"}, {&x, "input"}});
    double* ws = bn_workspace(ws_, x);
    py::gil_scoped_release nogil;
    cuda::batch_norm_backward_reduce(view3<const float>(dy, "grad_output"),
                                     view3<const float>(x, "input"), mean.ptr<const float>(),
                                     invstd.ptr<const float>(), sdy.ptr<float>(), sdyx.ptr<float>(),
                                     ws, x.device_id, reinterpret_cast<void*>(stream));
#endif
    return;
  }
  py::gil_scoped_release nogil;
  dispatch_float(x, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    cpu::batch_norm_backward_reduce<T>(view3<const T>(dy, "grad_output"),
                                       view3<const T>(x, "input"), mean.ptr<const T>(),
                                       invstd.ptr<const T>(), sdy.ptr<T>(), sdyx.ptr<T>());
  });
}

void bn_backward_apply(py::handle dy_, py::handle x_, py::handle mean_, py::handle invstd_,
                       py::handle w_, py::handle mdy_, py::handle mdyx_, py::handle dx_,
                       uintptr_t stream) {
  const TensorView x = bn_activation(x_, "input", nullptr, nullptr);
  const TensorView dy = bn_activation(dy_, "grad_output", &x, "input");
  const TensorView dx = bn_activation(dx_, "grad_input", &x, "input");
  check_output(dx, "grad_input");
  check_no_overlap(dx, "grad_input", x, "input");
  check_no_overlap(dx, "grad_input", dy, "grad_output");
  const TensorView mean = bn_channel(mean_, "mean", x, false);
  const TensorView invstd = bn_channel(invstd_, "invstd", x, false);
  TensorView w;
  if (!w_.is_none()) w = bn_channel(w_, "weight", x, false);
  const TensorView mdy = bn_channel(mdy_, "mean_dy", x, false);
  const TensorView mdyx = bn_channel(mdyx_, "mean_dy_xhat", x, false);
  require_cuda_build(x, "input");
  if (x.device == Device::cuda) {
#if defined(NNK_WITH_CUDA)
    bn_cuda_layout({{&dy, "grad_output"}, {&x, "input"}, {&dx, "grad_input"}});
    py::gil_scoped_release nogil;
    cuda::batch_norm_backward_apply(
        view3<const float>(dy, "grad_output"), view3<const float>(x, "input"),
        mean.ptr<const float>(), invstd.ptr<const float>(), w.ptr<const float>(),
        mdy.ptr<const float>(), mdyx.ptr<const float>(), view3<float>(dx, "grad_input"),
        x.device_id, reinterpret_cast<void*>(stream));
#endif
    return;
  }
  py::gil_scoped_release nogil;
  dispatch_float(x, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    cpu::batch_norm_backward_apply<T>(view3<const T>(dy, "grad_output"), view3<const T>(x, "input"),
                                      mean.ptr<const T>(), invstd.ptr<const T>(), w.ptr<const T>(),
                                      mdy.ptr<const T>(), mdyx.ptr<const T>(),
                                      view3<T>(dx, "grad_input"));
  });
}

void bn_backward_train(py::handle dy_, py::handle x_, py::handle mean_, py::handle invstd_,
                       py::handle w_, py::handle dx_, py::handle dw_, py::handle db_,
                       py::handle ws_, uintptr_t stream) {
  const TensorView x = bn_activation(x_, "input", nullptr, nullptr);
  const TensorView dy = bn_activation(dy_, "grad_output", &x, "input");
  const TensorView mean = bn_channel(mean_, "mean", x, false);
  const TensorView invstd = bn_channel(invstd_, "invstd", x, false);
  TensorView w, dx, dw, db;
  if (!w_.is_none()) w = bn_channel(w_, "weight", x, false);
  if (!dx_.is_none()) {
    dx = bn_activation(dx_, "grad_input", &x, "input");
    check_output(dx, "grad_input");
    check_no_overlap(dx, "grad_input", x, "input");
    check_no_overlap(dx, "grad_input", dy, "grad_output");
  }
  if (!dw_.is_none()) dw = bn_channel(dw_, "grad_weight", x, true);
  if (!db_.is_none()) db = bn_channel(db_, "grad_bias", x, true);
  require_cuda_build(x, "input");
  if (x.device == Device::cuda) {
#if defined(NNK_WITH_CUDA)
    if (dx_.is_none())
      bn_cuda_layout({{&dy, "grad_output"}, {&x, "input"}});
    else
      bn_cuda_layout({{&dy, "grad_output"}, {&x, "input"}, {&dx, "grad_input"}});
    double* ws = bn_workspace(ws_, x);
    cpu::View3<float> dxv;
    if (!dx_.is_none()) dxv = view3<float>(dx, "grad_input");
    py::gil_scoped_release nogil;
    cuda::batch_norm_backward_train(
        view3<const float>(dy, "grad_output"), view3<const float>(x, "input"),
        mean.ptr<const float>(), invstd.ptr<const float>(), w.ptr<const float>(), dxv,
        dw.ptr<float>(), db.ptr<float>(), ws, x.device_id, reinterpret_cast<void*>(stream));
#endif
    return;
  }
  py::gil_scoped_release nogil;
  dispatch_float(x, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    cpu::View3<T> dxv;
    if (!dx_.is_none()) dxv = view3<T>(dx, "grad_input");
    cpu::batch_norm_backward_train<T>(view3<const T>(dy, "grad_output"), view3<const T>(x, "input"),
                                      mean.ptr<const T>(), invstd.ptr<const T>(), w.ptr<const T>(),
                                      dxv, dw.ptr<T>(), db.ptr<T>());
  });
}

Isa isa_arg(const std::string& name) {
  Isa isa;
  NNK_CHECK_VALUE(isa_from_name(name.c_str(), &isa), "unknown ISA '", name,
                  "'; expected one of avx512, avx2, baseline");
  return isa;
}

// ------------------------------------------------------------------------------ cross_entropy

// Logits and everything shaped like them: CPU float32/float64; CUDA float32/float16/bfloat16.
void ce_check_float(const TensorView& v, const char* name) {
  if (v.device == Device::cuda && (v.dtype == DType::f16 || v.dtype == DType::bf16)) return;
  check_float(v, name);
}

// (rows, C) with unit stride along C (rows at any stride).
void ce_check_rows(const TensorView& v, const char* name, int64_t rows, int64_t C) {
  check_shape(v, name, {rows, C});
  NNK_CHECK_VALUE(C <= 1 || rows == 0 || v.strides[1] == 1, name,
                  " must have unit stride along the classes, got strides (", v.strides[0], ", ",
                  v.strides[1], ")");
}

TensorView ce_target(py::handle h, int64_t rows, const TensorView& x) {
  const TensorView t = view_of(h, "target");
  NNK_CHECK_TYPE(t.dl_code == kDLInt && t.dl_bits == 64 && t.dl_lanes == 1,
                 "target must hold class indices as int64 (torch.long), got ", dtype_str(t));
  NNK_CHECK_VALUE(t.device == x.device && t.device_id == x.device_id,
                  "target and input must be on the same device");
  check_shape(t, "target", {rows});
  NNK_CHECK_VALUE(rows <= 1 || t.strides[0] == 1, "target must be contiguous");
  return t;
}

// Validates class targets (CPU) and returns the 'mean' denominator: the sum of weight[target]
// over the rows whose target is not ignore_index.
double ce_check_targets(py::handle target_, int64_t C, int64_t ignore_index, py::handle weight_) {
  const TensorView probe = view_of(target_, "target");
  NNK_CHECK_VALUE(probe.ndim == 1, "target must be 1-D here, got shape ", shape_str(probe));
  const TensorView t = ce_target(target_, probe.shape[0], probe);
  NNK_CHECK_VALUE(t.device == Device::cpu, "cross_entropy_check_targets runs on CPU tensors");
  TensorView w;
  if (!weight_.is_none()) {
    w = view_of(weight_, "weight");
    check_float(w, "weight");
    check_shape(w, "weight", {C});
    NNK_CHECK_VALUE(C <= 1 || w.strides[0] == 1, "weight must be contiguous");
    NNK_CHECK_VALUE(w.device == t.device, "weight and target must be on the same device");
  }
  double total = 0;
  int64_t bad = -1;
  {
    py::gil_scoped_release nogil;
    if (w.ndim == 0 || w.dtype == DType::f32)
      bad = cpu::cross_entropy_check_targets<float>(t.ptr<const int64_t>(), t.shape[0], C,
                                                    ignore_index, w.ptr<const float>(), &total);
    else
      bad = cpu::cross_entropy_check_targets<double>(t.ptr<const int64_t>(), t.shape[0], C,
                                                     ignore_index, w.ptr<const double>(), &total);
  }
  NNK_CHECK_VALUE(bad < 0, "target[", bad, "] = ", bad >= 0 ? t.ptr<const int64_t>()[bad] : 0,
                  " is not a class index in [0, ", C, ") nor ignore_index (", ignore_index, ")");
  return total;
}

// loss[i] = the loss of row i (weighted, unreduced); grad (nullable) = grad_scale * d(sum loss)/dx
// (CUDA: divided by *grad_scale_divisor when given), possibly in place of input. Class targets must
// have been validated (ce_check_targets on CPU; on CUDA the Python layer checks them, and the
// kernel never indexes with a bad one).
void ce_forward(py::handle x_, py::handle target_, py::handle soft_, py::handle weight_,
                py::handle loss_, py::handle grad_, int64_t ignore_index, double smoothing,
                double grad_scale, py::handle grad_scale_divisor_, uintptr_t stream) {
  const TensorView x = view_of(x_, "input");
  ce_check_float(x, "input");
  check_ndim(x, "input", {2});
  const int64_t rows = x.shape[0], C = x.shape[1];
  ce_check_rows(x, "input", rows, C);
  NNK_CHECK_VALUE(target_.is_none() != soft_.is_none(),
                  "give exactly one of target (class indices) and soft_target (probabilities)");
  NNK_CHECK_VALUE(smoothing >= 0 && smoothing <= 1, "label_smoothing must be in [0, 1], got ",
                  smoothing);
  TensorView target, soft, weight, grad;
  if (!target_.is_none()) target = ce_target(target_, rows, x);
  if (!soft_.is_none()) {
    soft = view_of(soft_, "soft_target");
    check_like(soft, "soft_target", x, "input");
    ce_check_rows(soft, "soft_target", rows, C);
  }
  if (!weight_.is_none()) {
    weight = vector_of(weight_, "weight", C, x, "input");
  }
  const TensorView loss = vector_of(loss_, "loss", rows, x, "input");
  check_output(loss, "loss");
  check_no_overlap(loss, "loss", x, "input");
  if (!grad_.is_none()) {
    grad = view_of(grad_, "grad_input");
    check_like(grad, "grad_input", x, "input");
    ce_check_rows(grad, "grad_input", rows, C);
    check_output(grad, "grad_input");
    // grad_input may be input itself (linear_cross_entropy's chunk buffer): each element is read
    // before it is overwritten. Any other overlap is an error.
    const bool in_place = grad.data == x.data && grad.strides[0] == x.strides[0];
    if (!in_place) check_no_overlap(grad, "grad_input", x, "input");
    check_no_overlap(grad, "grad_input", loss, "loss");
    if (soft.ndim) check_no_overlap(grad, "grad_input", soft, "soft_target");
  }
  require_cuda_build(x, "input");
  if (x.device == Device::cuda) {
#if defined(NNK_WITH_CUDA)
    const float* divisor = nullptr;
    if (!grad_scale_divisor_.is_none()) {
      const TensorView d = view_of(grad_scale_divisor_, "grad_scale_divisor");
      NNK_CHECK_TYPE(d.dtype == DType::f32 && d.device == x.device && d.numel() == 1,
                     "grad_scale_divisor must be one float32 value on the input's device");
      divisor = d.ptr<const float>();
    }
    cuda::CrossEntropyArgs a;
    a.x = x.data;
    a.dtype = x.dtype;
    a.rows = rows, a.C = C, a.ldx = x.strides[0];
    a.target = target.ptr<const int64_t>();
    a.ignore_index = ignore_index;
    a.soft = soft.data;
    a.ldt = soft.strides[0];
    a.weight = weight.data;
    a.smoothing = float(smoothing);
    a.loss = loss.data;
    a.grad = grad.data;
    a.ldg = grad.strides[0];
    a.grad_scale = float(grad_scale);
    a.grad_scale_divisor = divisor;
    py::gil_scoped_release nogil;
    cuda::cross_entropy_forward(a, x.device_id, reinterpret_cast<void*>(stream));
#endif
    return;
  }
  NNK_CHECK_VALUE(grad_scale_divisor_.is_none(), "grad_scale_divisor is for CUDA inputs only");
  py::gil_scoped_release nogil;
  dispatch_float(x, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    cpu::CrossEntropyArgs<T> a;
    a.x = x.ptr<const T>();
    a.rows = rows, a.C = C, a.ldx = x.strides[0];
    a.target = target.ptr<const int64_t>();
    a.ignore_index = ignore_index;
    a.soft = soft.ptr<const T>();
    a.ldt = soft.strides[0];
    a.weight = weight.ptr<const T>();
    a.smoothing = smoothing;
    a.loss = loss.ptr<T>();
    a.grad = grad.ptr<T>();
    a.ldg = grad.strides[0];
    a.grad_scale = grad_scale;
    cpu::cross_entropy_forward<T>(a);
  });
}

// --------------------------------------------------------------------------------------- lstm

// A (T, B, n) sequence view whose rows (t, b) are evenly spaced (row t*B + b at t*B*ld + b*ld) and
// unit-stride along n, as the whole-sequence GEMMs need. Returns the row stride.
int64_t seq_rows(const TensorView& v, const char* name, int64_t T, int64_t B, int64_t n) {
  check_shape(v, name, {T, B, n});
  const int64_t ld = B > 1 ? v.strides[1] : T > 1 ? v.strides[0] : n;
  NNK_CHECK_VALUE(
      v.numel() == 0 || ((n <= 1 || v.strides[2] == 1) && (T <= 1 || v.strides[0] == B * ld)), name,
      " must have unit stride along its last dim and evenly spaced (t, b) rows "
      "(a contiguous (T, B, n) tensor or a slice of one along the last dim), got "
      "strides (",
      v.strides[0], ", ", v.strides[1], ", ", v.strides[2], ")");
  return ld;
}

// A (B, H) state with unit stride along H. Returns the row stride.
int64_t state_rows(const TensorView& v, const char* name, int64_t B, int64_t H) {
  check_shape(v, name, {B, H});
  NNK_CHECK_VALUE(H <= 1 || B * H == 0 || v.strides[1] == 1, name,
                  " must have unit stride along its last dim, got strides (", v.strides[0], ", ",
                  v.strides[1], ")");
  return B > 1 ? v.strides[0] : H;
}

// A contiguous output of `shape`, writable, not overlapping any input.
void check_contiguous_out(const TensorView& v, const char* name,
                          std::initializer_list<int64_t> shape) {
  check_shape(v, name, shape);
  int64_t expect = 1;
  for (int d = v.ndim - 1; d >= 0 && v.numel() > 0; --d) {
    NNK_CHECK_VALUE(v.shape[d] <= 1 || v.strides[d] == expect, name, " must be contiguous");
    expect *= v.shape[d];
  }
  check_output(v, name);
}

// The views of one LSTM layer-direction call, checked. x (T, B, I); w_ih (4H, I); w_hh (4H, H);
// h0, c0 (B, H); y (T, B, H) out (may be a slice of a (T, B, 2H) output); gates (T, B, 4H) and
// c (T, B, H) contiguous.
struct LstmViews {
  TensorView x, w_ih, w_hh, bias, h0, c0, y, gates, c;
  int64_t T, B, I, H, ldx, ldy, ldh0, ldc0;

  LstmViews(py::handle x_, py::handle w_ih_, py::handle w_hh_, py::handle bias_, py::handle h0_,
            py::handle c0_, py::handle y_, py::handle gates_, py::handle c_) {
    x = view_of(x_, "input");
    check_float(x, "input");
    check_ndim(x, "input", {3});
    w_ih = view_of(w_ih_, "w_ih");
    w_hh = view_of(w_hh_, "w_hh");
    check_like(w_ih, "w_ih", x, "input");
    check_like(w_hh, "w_hh", x, "input");
    check_ndim(w_ih, "w_ih", {2});
    check_ndim(w_hh, "w_hh", {2});
    T = x.shape[0], B = x.shape[1], I = x.shape[2], H = w_hh.shape[1];
    check_shape(w_hh, "w_hh", {4 * H, H});
    check_shape(w_ih, "w_ih", {4 * H, I});
    if (!bias_.is_none()) bias = vector_of(bias_, "bias", 4 * H, x, "input");
    ldx = seq_rows(x, "input", T, B, I);
    h0 = view_of(h0_, "h0");
    c0 = view_of(c0_, "c0");
    check_like(h0, "h0", x, "input");
    check_like(c0, "c0", x, "input");
    ldh0 = state_rows(h0, "h0", B, H);
    ldc0 = state_rows(c0, "c0", B, H);
    y = view_of(y_, "output");
    gates = view_of(gates_, "gates");
    c = view_of(c_, "cell_states");
    check_like(y, "output", x, "input");
    check_like(gates, "gates", x, "input");
    check_like(c, "cell_states", x, "input");
    ldy = seq_rows(y, "output", T, B, H);
    check_contiguous_out(gates, "gates", {T, B, 4 * H});
    check_contiguous_out(c, "cell_states", {T, B, H});
    require_cuda_build(x, "input");
  }

  template <class T_>
  LstmLayer<T_> layer(bool reverse) const {
    LstmLayer<T_> a;
    a.steps = T, a.B = B, a.I = I, a.H = H;
    a.reverse = reverse;
    a.x = x.ptr<const T_>(), a.rsx = ldx, a.csx = 1;
    a.w_ih = w_ih.ptr<const T_>(), a.rsw_ih = w_ih.strides[0], a.csw_ih = w_ih.strides[1];
    a.w_hh = w_hh.ptr<const T_>(), a.rsw_hh = w_hh.strides[0], a.csw_hh = w_hh.strides[1];
    a.bias = bias.ptr<const T_>();
    a.h0 = h0.ptr<const T_>(), a.ldh0 = ldh0;
    a.c0 = c0.ptr<const T_>(), a.ldc0 = ldc0;
    a.y = y.ptr<T_>(), a.ldy = ldy;
    a.gates = gates.ptr<T_>();
    a.c = c.ptr<T_>();
    return a;
  }
};

template <class F>
void lstm_dispatch(const LstmViews& v, uintptr_t stream, F&& run) {
  if (v.x.device == Device::cuda) {
#if defined(NNK_WITH_CUDA)
    NNK_CHECK_IMPLEMENTED(v.x.dtype == DType::f32,
                          "lstm on CUDA computes in float32, got input of ", dtype_str(v.x));
    run(static_cast<float*>(nullptr), true, v.x.device_id, reinterpret_cast<void*>(stream));
#endif
    return;
  }
  dispatch_float(v.x, [&](auto* tag) { run(tag, false, 0, nullptr); });
}

// One layer in one direction over the whole sequence: fills output (h_t), gates (activations,
// saved for lstm_backward) and cell_states (c_t).
void lstm_forward(py::handle x_, py::handle w_ih_, py::handle w_hh_, py::handle bias_,
                  py::handle h0_, py::handle c0_, py::handle y_, py::handle gates_, py::handle c_,
                  bool reverse, uintptr_t stream) {
  const LstmViews v(x_, w_ih_, w_hh_, bias_, h0_, c0_, y_, gates_, c_);
  const TensorView* outs[] = {&v.y, &v.gates, &v.c};
  const char* out_names[] = {"output", "gates", "cell_states"};
  const TensorView* ins[] = {&v.x, &v.w_ih, &v.w_hh, &v.bias, &v.h0, &v.c0};
  const char* in_names[] = {"input", "w_ih", "w_hh", "bias", "h0", "c0"};
  for (int o = 0; o < 3; ++o) {
    for (int i = 0; i < 6; ++i)
      if (ins[i]->ndim) check_no_overlap(*outs[o], out_names[o], *ins[i], in_names[i]);
    for (int p = 0; p < o; ++p) check_no_overlap(*outs[o], out_names[o], *outs[p], out_names[p]);
  }
  lstm_dispatch(v, stream, [&](auto* tag, bool cuda, int device, void* st) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const LstmLayer<T> a = v.layer<T>(reverse);
    py::gil_scoped_release nogil;
    if (cuda) {
#if defined(NNK_WITH_CUDA)
      if constexpr (std::is_same_v<T, float>) cuda::lstm_layer_forward(a, device, st);
#endif
    } else {
      cpu::lstm_layer_forward(a);
    }
  });
}

// The backward of lstm_forward's call (same views; gates are overwritten with d loss / d
// pre-activations). grad_output (T, B, H) or None; grad_h, grad_c (B, H) contiguous: d loss /
// d h_n, d c_n in, d loss / d h0, d c0 out. grad_input (T, B, I) (or None) is written, or added to
// when accumulate; grad_w_ih, grad_w_hh (contiguous) and grad_bias are written (each may be None).
void lstm_backward(py::handle x_, py::handle w_ih_, py::handle w_hh_, py::handle h0_,
                   py::handle c0_, py::handle y_, py::handle gates_, py::handle c_, py::handle dy_,
                   py::handle dh_, py::handle dc_, py::handle dx_, py::handle dw_ih_,
                   py::handle dw_hh_, py::handle dbias_, bool reverse, bool accumulate,
                   uintptr_t stream) {
  const LstmViews v(x_, w_ih_, w_hh_, py::none(), h0_, c0_, y_, gates_, c_);
  const int64_t T = v.T, B = v.B, I = v.I, H = v.H;
  TensorView dy, dh = view_of(dh_, "grad_h"), dc = view_of(dc_, "grad_c"), dx, dw_ih, dw_hh, dbias;
  int64_t sdyt = 0, sdyb = 0, lddx = 0;
  if (!dy_.is_none()) {
    dy = view_of(dy_, "grad_output");
    check_like(dy, "grad_output", v.x, "input");
    check_shape(dy, "grad_output", {T, B, H});
    NNK_CHECK_VALUE(H <= 1 || dy.numel() == 0 || dy.strides[2] == 1,
                    "grad_output must have unit stride along its last dim");
    sdyt = dy.strides[0], sdyb = dy.strides[1];
  }
  std::vector<std::pair<const TensorView*, const char*>> outs;
  for (auto [view, name] : {std::pair{&dh, "grad_h"}, std::pair{&dc, "grad_c"}}) {
    check_like(*view, name, v.x, "input");
    check_contiguous_out(*view, name, {B, H});
    outs.emplace_back(view, name);
  }
  if (!dx_.is_none()) {
    dx = view_of(dx_, "grad_input");
    check_like(dx, "grad_input", v.x, "input");
    lddx = seq_rows(dx, "grad_input", T, B, I);
    check_output(dx, "grad_input");
    outs.emplace_back(&dx, "grad_input");
  }
  if (!dw_ih_.is_none()) {
    dw_ih = view_of(dw_ih_, "grad_w_ih");
    check_like(dw_ih, "grad_w_ih", v.x, "input");
    check_contiguous_out(dw_ih, "grad_w_ih", {4 * H, I});
    outs.emplace_back(&dw_ih, "grad_w_ih");
  }
  if (!dw_hh_.is_none()) {
    dw_hh = view_of(dw_hh_, "grad_w_hh");
    check_like(dw_hh, "grad_w_hh", v.x, "input");
    check_contiguous_out(dw_hh, "grad_w_hh", {4 * H, H});
    outs.emplace_back(&dw_hh, "grad_w_hh");
  }
  if (!dbias_.is_none()) {
    dbias = vector_of(dbias_, "grad_bias", 4 * H, v.x, "input");
    check_output(dbias, "grad_bias");
    outs.emplace_back(&dbias, "grad_bias");
  }
  const std::pair<const TensorView*, const char*> ins[] = {
      {&v.x, "input"}, {&v.w_ih, "w_ih"}, {&v.w_hh, "w_hh"},     {&v.h0, "h0"},
      {&v.c0, "c0"},   {&v.y, "output"},  {&v.c, "cell_states"}, {&v.gates, "gates"}};
  for (size_t o = 0; o < outs.size(); ++o) {
    for (const auto& [in, name] : ins) check_no_overlap(*outs[o].first, outs[o].second, *in, name);
    if (dy.ndim) check_no_overlap(*outs[o].first, outs[o].second, dy, "grad_output");
    for (size_t p = 0; p < o; ++p)
      check_no_overlap(*outs[o].first, outs[o].second, *outs[p].first, outs[p].second);
  }
  lstm_dispatch(v, stream, [&](auto* tag, bool cuda, int device, void* st) {
    using T_ = std::remove_pointer_t<decltype(tag)>;
    LstmLayer<T_> a = v.layer<T_>(reverse);
    a.dy = dy.ptr<const T_>(), a.sdyt = sdyt, a.sdyb = sdyb;
    a.dh = dh.ptr<T_>(), a.dc = dc.ptr<T_>();
    a.dx = dx.ptr<T_>(), a.lddx = lddx, a.dx_accumulate = accumulate;
    a.dw_ih = dw_ih.ptr<T_>();
    a.dw_hh = dw_hh.ptr<T_>();
    a.dbias = dbias.ptr<T_>();
    py::gil_scoped_release nogil;
    if (cuda) {
#if defined(NNK_WITH_CUDA)
      if constexpr (std::is_same_v<T_, float>) cuda::lstm_layer_backward(a, device, st);
#endif
    } else {
      cpu::lstm_layer_backward(a);
    }
  });
}

}  // namespace
}  // namespace nnk

PYBIND11_MODULE(_C, m) {
  using namespace nnk;
  m.doc() = "nnkernels native kernels (CPU: AVX-512/AVX2/portable + OpenMP; CUDA when built)";

  // ISA dispatch
  m.def("isa", [] { return std::string(isa_name(active_isa())); }, "The CPU path in use.");
  m.def(
      "best_isa", [] { return std::string(isa_name(best_isa())); },
      "The best CPU path this CPU supports.");
  m.def("available_isas", [] {
    std::vector<std::string> out;
    for (int i = 0; i <= static_cast<int>(best_isa()); ++i) out.push_back(isa_name(Isa(i)));
    return out;
  });
  m.def(
      "set_isa",
      [](const std::string& name) {
        const Isa isa = isa_arg(name);
        NNK_CHECK_VALUE(set_isa(isa), "ISA '", name,
                        "' is not supported by this CPU (best: ", isa_name(best_isa()), ")");
      },
      "name"_a, "Force a CPU path no higher than best_isa() ('scalar' names the baseline path too).");

  m.def(
      "_emulate_avx512_tiles",
      [](bool on) {
#if defined(NNK_X86)
        cpu::set_emulated_avx512_tiles(on);
#endif
      },
      "on"_a, "Test hook: on an AVX2 CPU, run the GEMM at the AVX-512 kernels' tiles and blocks.");

  // Threads
  m.def(
      "set_num_threads",
      [](int n) {
        NNK_CHECK_VALUE(n >= 1, "num_threads must be >= 1, got ", n);
        set_num_threads(n);
      },
      "n"_a);
  m.def("get_num_threads", &num_threads);
  m.def(
      "openmp",
      [] {
#if defined(_OPENMP)
        return true;
#else
        return false;
#endif
      },
      "Whether this build uses OpenMP.");

  // CUDA
  m.def("cuda_compiled", [] {
#if defined(NNK_WITH_CUDA)
    return true;
#else
    return false;
#endif
  });
  m.def("cuda_device_count", [] {
#if defined(NNK_WITH_CUDA)
    return cuda::device_count();
#else
    return 0;
#endif
  });
  m.def("cuda_archs", [] {
#if defined(NNK_WITH_CUDA)
    return cuda::compiled_archs();
#else
    return std::string();
#endif
  });

  // Kernels
  m.def("gemm", &gemm, "a"_a, "b"_a, "out"_a, "alpha"_a = 1.0, "beta"_a = 0.0,
        "bias"_a = py::none(), "stream"_a = 0, "trans_a"_a = false, "trans_b"_a = false,
        "out = alpha * op(a) @ op(b) + beta * out (+ bias), 2-D or batched 3-D, any strides; "
        "op(x) swaps x's last two dims when trans_x.");
  m.def("conv2d_forward", &conv2d_forward, "input"_a, "weight"_a, "bias"_a, "out"_a, "stride"_a,
        "padding"_a, "dilation"_a, "groups"_a, "stream"_a = 0,
        "out = conv2d(input, weight) + bias; padding = (top, bottom, left, right), zeros.");
  m.def("conv2d_backward_data", &conv2d_backward_data, "grad_output"_a, "weight"_a, "grad_input"_a,
        "stride"_a, "padding"_a, "dilation"_a, "groups"_a, "stream"_a = 0);
  m.def("conv2d_backward_weight", &conv2d_backward_weight, "input"_a, "grad_output"_a,
        "grad_weight"_a, "grad_bias"_a, "stride"_a, "padding"_a, "dilation"_a, "groups"_a,
        "stream"_a = 0);
#if defined(NNK_WITH_CUDA)
  m.attr("batch_norm_cuda_workspace_per_channel") = cuda::kBatchNormParts * 2;
#else
  m.attr("batch_norm_cuda_workspace_per_channel") = 0;
#endif
  m.def("batch_norm_forward_train", &bn_forward_train, "input"_a, "out"_a, "weight"_a, "bias"_a,
        "eps"_a, "momentum"_a, "save_mean"_a, "save_invstd"_a, "running_mean"_a, "running_var"_a,
        "workspace"_a = py::none(), "stream"_a = 0);
  m.def("batch_norm_stats", &bn_stats, "input"_a, "mean"_a, "m2"_a, "workspace"_a = py::none(),
        "stream"_a = 0);
  m.def("batch_norm_apply", &bn_apply, "input"_a, "out"_a, "center"_a, "scale"_a, "shift"_a,
        "stream"_a = 0, "out = (input - center) * scale + shift per channel (center None: 0).");
  m.def("batch_norm_backward_reduce", &bn_backward_reduce, "grad_output"_a, "input"_a, "mean"_a,
        "invstd"_a, "sum_dy"_a, "sum_dy_xhat"_a, "workspace"_a = py::none(), "stream"_a = 0);
  m.def("batch_norm_backward_apply", &bn_backward_apply, "grad_output"_a, "input"_a, "mean"_a,
        "invstd"_a, "weight"_a, "mean_dy"_a, "mean_dy_xhat"_a, "grad_input"_a, "stream"_a = 0);
  m.def("batch_norm_backward_train", &bn_backward_train, "grad_output"_a, "input"_a, "mean"_a,
        "invstd"_a, "weight"_a, "grad_input"_a, "grad_weight"_a, "grad_bias"_a,
        "workspace"_a = py::none(), "stream"_a = 0);
  m.def("cross_entropy_check_targets", &ce_check_targets, "target"_a, "num_classes"_a,
        "ignore_index"_a, "weight"_a = py::none(),
        "Raises ValueError for a class index outside [0, C) that is not ignore_index; returns "
        "the sum of weight[target] over the other rows (the 'mean' denominator). CPU.");
  m.def("cross_entropy_forward", &ce_forward, "input"_a, "target"_a, "soft_target"_a, "weight"_a,
        "loss"_a, "grad_input"_a, "ignore_index"_a = -100, "label_smoothing"_a = 0.0,
        "grad_scale"_a = 1.0, "grad_scale_divisor"_a = py::none(), "stream"_a = 0,
        "Per-row softmax cross-entropy of input (rows, C) and, when grad_input is given, "
        "grad_scale / grad_scale_divisor * d(sum of the row losses)/d input, in one pass.");
  m.def("lstm_forward", &lstm_forward, "input"_a, "w_ih"_a, "w_hh"_a, "bias"_a, "h0"_a, "c0"_a,
        "output"_a, "gates"_a, "cell_states"_a, "reverse"_a = false, "stream"_a = 0,
        "One LSTM layer in one direction over a (T, B, I) sequence: output (T, B, H) = h_t, "
        "gates (T, B, 4H) = the activations (saved for lstm_backward), cell_states = c_t.");
  m.def("lstm_backward", &lstm_backward, "input"_a, "w_ih"_a, "w_hh"_a, "h0"_a, "c0"_a, "output"_a,
        "gates"_a, "cell_states"_a, "grad_output"_a, "grad_h"_a, "grad_c"_a, "grad_input"_a,
        "grad_w_ih"_a, "grad_w_hh"_a, "grad_bias"_a, "reverse"_a = false, "accumulate"_a = false,
        "stream"_a = 0,
        "Backward through time of lstm_forward's call; grad_h / grad_c hold d loss / d h_n, "
        "d c_n on entry and d loss / d h0, d c0 on return. Overwrites gates.");
  m.def("sum_channels", &sum_channels, "x"_a, "out"_a, "stream"_a = 0,
        "out[c] = sum over n, h, w of x[n, c, h, w].");
  m.def("sum_rows", &sum_rows, "x"_a, "out"_a, "stream"_a = 0, "out[j] = sum_i x[i, j].");
  m.def(
      "gemm_kernel_name",
      [](const std::string& dtype) {
        NNK_CHECK_VALUE(dtype == "float32" || dtype == "float64",
                        "dtype must be 'float32' or 'float64'");
        return std::string(dtype == "float32" ? cpu::gemm_kernel_name<float>()
                                              : cpu::gemm_kernel_name<double>());
      },
      "dtype"_a = "float32");
  m.def(
      "fma_peak_gflops",
      [](bool fp64, int threads, double seconds) {
        NNK_CHECK_VALUE(seconds > 0 && seconds < 60, "seconds must be in (0, 60)");
        py::gil_scoped_release nogil;
        return cpu::fma_peak_gflops(fp64, threads, seconds);
      },
      "fp64"_a = false, "threads"_a = 0, "seconds"_a = 0.2,
      "Measured FMA throughput of the active CPU path, GFLOP/s.");
  m.def(
      "copy_bandwidth_gbs",
      [](int64_t bytes, int reps, int threads) {
        NNK_CHECK_VALUE(bytes > 0 && bytes <= (int64_t(1) << 34), "bytes must be in (0, 16 GiB]");
        NNK_CHECK_VALUE(reps >= 1 && reps <= 1000, "reps must be in [1, 1000]");
        py::gil_scoped_release nogil;
        return cpu::copy_bandwidth_gbs(bytes, reps, threads);
      },
      "bytes"_a = int64_t(256) << 20, "reps"_a = 8, "threads"_a = 0,
      "Memory bandwidth of a non-temporal copy on the CPU, GB/s of read + written bytes.");
}
