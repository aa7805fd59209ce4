// Bindings of the fused softmax-cross-entropy: the per-row kernel and the CPU target check.
#include "bindings/binding.h"
#include "cpu/cross_entropy.h"

namespace nnk {
namespace {

// (rows, C) with unit stride along C (rows at any stride).
void check_rows(const TensorView& v, const char* name, int64_t rows, int64_t C) {
  check_shape(v, name, {rows, C});
  NNK_CHECK_VALUE(C <= 1 || rows == 0 || v.strides[1] == 1, name,
                  " must have unit stride along the classes, got strides (", v.strides[0], ", ",
                  v.strides[1], ")");
}

// Class targets: (rows,) int64, contiguous, on ref's device.
TensorView class_target(const TensorView& t, int64_t rows, const TensorView& ref) {
  NNK_CHECK_TYPE(t.dtype == DType::i64, "target must hold class indices as int64 (torch.long), got ",
                 dtype_str(t));
  NNK_CHECK_VALUE(t.device == ref.device && t.device_id == ref.device_id, "target is on ",
                  device_str(t), " but input is on ", device_str(ref));
  check_shape(t, "target", {rows});
  NNK_CHECK_VALUE(rows <= 1 || t.strides[0] == 1, "target must be contiguous");
  return t;
}

// Validates class targets (CPU) before any kernel indexes with them and returns the 'mean'
// denominator: the sum of weight[target] over the rows whose target is not ignore_index.
py::object cross_entropy_check_targets(Call& c) {
  const TensorView probe = c.tensor(0);
  NNK_CHECK_VALUE(probe.ndim == 1, "target must be 1-D here, got shape ", shape_str(probe));
  const TensorView t = class_target(probe, probe.shape[0], probe);
  NNK_CHECK_VALUE(t.device == Device::cpu, "cross_entropy_check_targets runs on CPU tensors");
  const int64_t C = c.i64(1, 0), ignore_index = c.i64(2, -100);
  TensorView w = c.tensor_or_none(3);
  if (c.given(3)) {
    check_float(w, "weight");
    check_shape(w, "weight", {C});
    NNK_CHECK_VALUE(C <= 1 || w.strides[0] == 1, "weight must be contiguous");
    NNK_CHECK_VALUE(w.device == t.device, "weight and target must be on the same device");
  } else {
    w.dtype = DType::f32;  // no weights: either instance does
  }
  double total = 0;
  int64_t bad = -1;
  run(
      w, double(t.shape[0]),
      [&](auto tag) {
        using T = decltype(tag);
        bad = cpu::cross_entropy_check_targets<T>(t.ptr<const int64_t>(), t.shape[0], C,
                                                  ignore_index, w.ptr<const T>(), &total);
      },
      no_cuda);
  NNK_CHECK_VALUE(bad < 0, "target[", bad, "] = ", bad >= 0 ? t.ptr<const int64_t>()[bad] : 0,
                  " is not a class index in [0, ", C, ") nor ignore_index (", ignore_index, ")");
  return py::float_(total);
}
NNK_BINDING(cross_entropy_check_targets, "target, num_classes, ignore_index=-100, weight=None",
            "Raises ValueError for a class index outside [0, C) that is not ignore_index; returns "
            "the sum of weight[target] over the other rows (the 'mean' denominator). CPU.");

// loss[i] = the loss of row i (weighted, unreduced); grad_input (nullable) = grad_scale * d(sum
// loss)/dx (CUDA: divided by *grad_scale_divisor when given), possibly in place of input. Class
// targets must have been validated (cross_entropy_check_targets on CPU; on CUDA the Python layer
// checks them, and the kernel never indexes with a bad one).
py::object cross_entropy_forward(Call& c) {
  const TensorView x = c.tensor(0);
  check_float(x, "input", Dtypes::logits);
  check_ndim(x, "input", {2});
  const int64_t rows = x.shape[0], C = x.shape[1];
  check_rows(x, "input", rows, C);
  NNK_CHECK_VALUE(c.given(1) != c.given(2),
                  "give exactly one of target (class indices) and soft_target (probabilities)");
  const double smoothing = c.f64(7, 0.0), grad_scale = c.f64(8, 1.0);
  NNK_CHECK_VALUE(smoothing >= 0 && smoothing <= 1, "label_smoothing must be in [0, 1], got ",
                  smoothing);
  TensorView target, soft, weight, grad;
  if (c.given(1)) target = class_target(c.tensor(1), rows, x);
  if (c.given(2)) {
    soft = c.tensor(2);
    check_like(soft, "soft_target", x, "input");
    check_rows(soft, "soft_target", rows, C);
  }
  if (c.given(3)) {
    weight = c.tensor(3);
    check_vector(weight, "weight", C, x, "input");
  }
  const TensorView loss = c.output(4);
  check_vector(loss, "loss", rows, x, "input");
  check_output(loss, "loss");
  check_no_overlap(loss, "loss", x, "input");
  if (c.given(5)) {
    grad = c.output(5);
    check_like(grad, "grad_input", x, "input");
    check_rows(grad, "grad_input", rows, C);
    check_output(grad, "grad_input");
    // grad_input may be input itself (linear_cross_entropy's chunk buffer): each element is read
    // before it is overwritten. Any other overlap is an error.
    const bool in_place = grad.data == x.data && grad.strides[0] == x.strides[0];
    if (!in_place) check_no_overlap(grad, "grad_input", x, "input");
    check_no_overlap(grad, "grad_input", loss, "loss");
    if (soft.ndim) check_no_overlap(grad, "grad_input", soft, "soft_target");
  }
  const float* divisor = nullptr;
  if (c.given(9)) {
    NNK_CHECK_VALUE(x.device == Device::cuda, "grad_scale_divisor is for CUDA inputs only");
    const TensorView d = c.tensor(9);
    NNK_CHECK_TYPE(d.dtype == DType::f32 && d.device == x.device && d.numel() == 1,
                   "grad_scale_divisor must be one float32 value on the input's device");
    divisor = d.ptr<const float>();
  }
  CrossEntropyArgs a;
  a.x = x.data;
  a.dtype = x.dtype;
  a.rows = rows, a.C = C, a.ldx = x.strides[0];
  a.target = target.ptr<const int64_t>();
  a.ignore_index = c.i64(6, -100);
  a.soft = soft.data;
  a.ldt = soft.strides[0];
  a.weight = weight.data;
  a.smoothing = smoothing;
  a.loss = loss.data;
  a.grad = grad.data;
  a.ldg = grad.strides[0];
  a.grad_scale = grad_scale;
  a.grad_scale_divisor = divisor;
  run(
      x, double(rows) * double(C), [&](auto t) { cpu::cross_entropy_forward<decltype(t)>(a); },
      [&](auto s) { cuda::cross_entropy_forward(a, s.device, s.stream); });
  return py::none();
}
NNK_BINDING(cross_entropy_forward,
            "input, target, soft_target, weight, loss, grad_input, ignore_index=-100, "
            "label_smoothing=0.0, grad_scale=1.0, grad_scale_divisor=None",
            "Per-row softmax cross-entropy of input (rows, C) and, when grad_input is given, "
            "grad_scale / grad_scale_divisor * d(sum of the row losses)/d input, in one pass.");

}  // namespace
}  // namespace nnk
