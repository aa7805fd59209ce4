// Bindings of the fused softmax-cross-entropy: the per-row kernel and the CPU target check.
#include <cmath>
#include <string>
#include <vector>

#include "bindings/binding.h"
#include "common/cross_entropy_args.h"

namespace nnk {

// The kernels (cpu/cross_entropy.cpp).
namespace cpu {

// The index of the first target outside [0, C) that is not ignore_index, or -1; *total gets
// sum over the other rows of weight[target] (1 without weights): the 'mean' denominator.
template <class T>
int64_t cross_entropy_check_targets(const int64_t* target, int64_t rows, int64_t C,
                                    int64_t ignore_index, const T* weight, double* total);

// T is a.dtype's type.
template <class T>
void cross_entropy_forward(const CrossEntropyArgs& a);

}  // namespace cpu

// The CUDA backend (cuda/cross_entropy.cu): the same pass, on `stream` of `device`.
namespace cuda {
void cross_entropy_forward(const CrossEntropyArgs& a, int device, void* stream);
}  // namespace cuda

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
  NNK_CHECK_TYPE(t.dtype == DType::i64,
                 "target must hold class indices as int64 (torch.long), got ", dtype_str(t));
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

// The loss of input (rows, C) and, when grad_input is given, grad_scale / grad_scale_divisor *
// d(the loss)/d input, in one pass over each row (grad_input may be input itself:
// linear_cross_entropy's chunk buffer). reduction 'none': loss (rows,) holds each row's loss
// (weighted). 'mean' / 'sum' (CPU): loss is 0-d, the binding sums the rows in float64 and, for
// 'mean', divides the loss and the gradient by the summed weights of the targets that count (the
// rows for probability targets), as torch does. On the CPU class targets are checked here before
// the kernel reads any (a ValueError naming target[i]); on CUDA the Python layer checks them and
// passes the 'mean' denominator as grad_scale_divisor (a device scalar, no host sync).
py::object cross_entropy_forward(Call& c) {
  const TensorView x = c.tensor(0);
  check_float(x, "input", Dtypes::logits);
  check_ndim(x, "input", {2});
  const int64_t rows = x.shape[0], C = x.shape[1];
  check_rows(x, "input", rows, C);
  NNK_CHECK_VALUE(c.given(1) != c.given(2),
                  "give exactly one of target (class indices) and soft_target (probabilities)");
  const int64_t ignore_index = c.i64(6, -100);
  const double smoothing = c.f64(7, 0.0), grad_scale = c.f64(9, 1.0);
  NNK_CHECK_VALUE(smoothing >= 0 && smoothing <= 1, "label_smoothing must be in [0, 1], got ",
                  smoothing);
  const std::string reduction = c.given(8) ? py::str(c.handle(8)).cast<std::string>() : "none";
  NNK_CHECK_VALUE(reduction == "none" || reduction == "mean" || reduction == "sum",
                  "reduction must be one of 'none', 'mean', 'sum', got '", reduction, "'");
  const bool reduce = reduction != "none";
  NNK_CHECK_IMPLEMENTED(!reduce || x.device == Device::cpu,
                        "cross_entropy_forward on CUDA writes per-row losses (reduction 'none')");
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
  check_like(loss, "loss", x, "input");
  if (reduce)
    NNK_CHECK_VALUE(loss.ndim == 0, "loss must be 0-d for reduction '", reduction, "', got shape ",
                    shape_str(loss));
  else
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
  if (c.given(10)) {
    NNK_CHECK_VALUE(x.device == Device::cuda, "grad_scale_divisor is for CUDA inputs only");
    const TensorView d = c.tensor(10);
    NNK_CHECK_TYPE(d.dtype == DType::f32 && d.device == x.device && d.numel() == 1,
                   "grad_scale_divisor must be one float32 value on the input's device");
    divisor = d.ptr<const float>();
  }
  CrossEntropyArgs a;
  a.x = x.data;
  a.dtype = x.dtype;
  a.rows = rows, a.C = C, a.ldx = x.strides[0];
  a.target = target.ptr<const int64_t>();
  a.ignore_index = ignore_index;
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
      x, double(rows) * double(C),
      [&](auto t) {
        using T = decltype(t);
        // CPU: the targets are checked (and the 'mean' denominator summed) before the kernel.
        double denom = double(rows);
        if (target.data) {
          const int64_t bad = cpu::cross_entropy_check_targets<T>(
              target.ptr<const int64_t>(), rows, C, ignore_index, weight.ptr<const T>(), &denom);
          if (bad >= 0)
            throw py::value_error(str_cat("target[", bad, "] = ", target.ptr<const int64_t>()[bad],
                                          " is not a class index in [0, ", C,
                                          ") nor ignore_index (", ignore_index, ")"));
        }
        std::vector<T> rows_loss;  // per-row losses of a reduced call (not tensor memory)
        if (reduce) {
          rows_loss.resize(size_t(rows));
          a.loss = rows_loss.data();
          if (reduction == "mean") a.grad_scale = denom != 0 ? grad_scale / denom : INFINITY;
        }
        cpu::cross_entropy_forward<T>(a);
        if (reduce) {
          double sum = 0;
          for (const T v : rows_loss) sum += double(v);
          *loss.ptr<T>() = T(reduction == "mean" ? sum / denom : sum);
        }
      },
      [&](auto s) { cuda::cross_entropy_forward(a, s.device, s.stream); });
  return py::none();
}
NNK_BINDING(cross_entropy_forward,
            "input, target, soft_target, weight, loss, grad_input, ignore_index=-100, "
            "label_smoothing=0.0, reduction='none', grad_scale=1.0, grad_scale_divisor=None",
            "Softmax cross-entropy of input (rows, C) and, when grad_input is given, its gradient "
            "(times grad_scale / grad_scale_divisor), in one pass per row. reduction 'none': "
            "per-row losses; 'mean' / 'sum' (CPU): the reduced loss in a 0-d loss, the gradient "
            "of it.");

}  // namespace
}  // namespace nnk
