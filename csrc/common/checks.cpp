#include "common/checks.h"

#include <Python.h>

#include <algorithm>
#include <cstring>

#include "common/dlpack.h"

namespace nnk {
namespace py = pybind11;

void throw_not_implemented(const std::string& msg) {
  PyErr_SetString(PyExc_NotImplementedError, msg.c_str());
  throw py::error_already_set();
}

std::string dtype_str(const TensorView& v) {
  const DLDataType t{v.dl_code, v.dl_bits, v.dl_lanes};
  if (t.lanes != 1) return str_cat("a vector dtype with ", t.lanes, " lanes");
  switch (t.code) {
    case kDLInt:
      return str_cat("int", int(t.bits));
    case kDLUInt:
      return str_cat("uint", int(t.bits));
    case kDLFloat:
      return str_cat("float", int(t.bits));
    case kDLBfloat:
      return str_cat("bfloat", int(t.bits));
    case kDLBool:
      return "bool";
    default:
      return str_cat("dtype code ", int(t.code), " with ", int(t.bits), " bits");
  }
}

static DType dl_dtype(DLDataType t) {
  if (t.lanes != 1) return DType::unsupported;
  if (t.code == kDLFloat && t.bits == 16) return DType::f16;
  if (t.code == kDLFloat && t.bits == 32) return DType::f32;
  if (t.code == kDLFloat && t.bits == 64) return DType::f64;
  if (t.code == kDLBfloat && t.bits == 16) return DType::bf16;
  return DType::unsupported;
}

TensorView view_of(py::handle obj, const char* name) {
  NNK_CHECK_TYPE(obj && PyCapsule_CheckExact(obj.ptr()), name,
                 " must be passed as a DLPack capsule, got ",
                 py::str(py::type::of(obj)).cast<std::string>());
  const char* cap_name = PyCapsule_GetName(obj.ptr());
  const DLTensor* t = nullptr;
  bool readonly = false;
  if (cap_name && std::strcmp(cap_name, "dltensor") == 0) {
    auto* m = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(obj.ptr(), "dltensor"));
    if (m) t = &m->dl_tensor;
  } else if (cap_name && std::strcmp(cap_name, "dltensor_versioned") == 0) {
    auto* m = static_cast<DLManagedTensorVersioned*>(
        PyCapsule_GetPointer(obj.ptr(), "dltensor_versioned"));
    if (m) {
      NNK_CHECK_VALUE(m->version.major == 1, name, ": DLPack major version ", m->version.major,
                      " is not supported (expected 1)");
      t = &m->dl_tensor;
      readonly = (m->flags & kDLPackFlagReadOnly) != 0;
    }
  }
  if (!t) {
    PyErr_Clear();
    NNK_CHECK_VALUE(false, name, ": capsule '", cap_name ? cap_name : "",
                    "' is not an unconsumed DLPack tensor");
  }
  TensorView v;
  NNK_CHECK_VALUE(t->ndim >= 0 && t->ndim <= kMaxDims, name, " has ", t->ndim,
                  " dimensions; at most ", kMaxDims, " are supported");
  v.ndim = t->ndim;
  v.data = static_cast<char*>(t->data) + t->byte_offset;
  v.dtype = dl_dtype(t->dtype);
  v.dl_code = t->dtype.code;
  v.dl_bits = t->dtype.bits;
  v.dl_lanes = t->dtype.lanes;
  v.readonly = readonly;
  v.device_id = t->device.device_id;
  switch (t->device.device_type) {
    case kDLCPU:
    case kDLCUDAHost:
      v.device = Device::cpu;
      break;
    case kDLCUDA:
      v.device = Device::cuda;
      break;
    default:
      v.device = Device::unsupported;
  }
  int64_t running = 1;
  for (int d = v.ndim - 1; d >= 0; --d) {
    v.shape[d] = t->shape[d];
    v.strides[d] = t->strides ? t->strides[d] : running;
    running *= t->shape[d];
  }
  // (N, C, H, W): a size-1 H or W may carry any stride (torch's contiguity checks ignore it, and
  // torch hands such strides out, e.g. x.transpose(2, 3) of a (N, C, 1, W) tensor). The kernels
  // read the pixel stride from W's stride and test layouts with H's, so give them the values
  // every dense layout has (contiguous and channels_last alike): W's stride = H's when W == 1,
  // H's = W * W's when H == 1. (One pixel, H == W == 1: left as given.)
  if (v.ndim == 4) {
    if (v.shape[3] == 1 && v.shape[2] > 1) v.strides[3] = v.strides[2];
    if (v.shape[2] == 1 && v.shape[3] > 1) v.strides[2] = v.shape[3] * v.strides[3];
  }
  return v;
}

std::string shape_str(const TensorView& v) {
  std::ostringstream os;
  os << "(";
  for (int d = 0; d < v.ndim; ++d) os << (d ? ", " : "") << v.shape[d];
  os << (v.ndim == 1 ? ",)" : ")");
  return os.str();
}

void check_ndim(const TensorView& v, const char* name, std::initializer_list<int> ranks) {
  if (std::find(ranks.begin(), ranks.end(), v.ndim) != ranks.end()) return;
  std::ostringstream want;
  int i = 0;
  for (int r : ranks) want << (i++ ? " or " : "") << r;
  NNK_CHECK_VALUE(false, name, " must be ", want.str(), "-D, got a ", v.ndim, "-D tensor of shape ",
                  shape_str(v));
}

void check_shape(const TensorView& v, const char* name, std::initializer_list<int64_t> shape) {
  bool ok = static_cast<int>(shape.size()) == v.ndim;
  int d = 0;
  for (int64_t s : shape) ok = ok && v.shape[d++] == s;
  if (ok) return;
  std::ostringstream want;
  want << "(";
  d = 0;
  for (int64_t s : shape) want << (d++ ? ", " : "") << s;
  want << (shape.size() == 1 ? ",)" : ")");
  NNK_CHECK_VALUE(false, name, " must have shape ", want.str(), ", got ", shape_str(v));
}

void check_float(const TensorView& v, const char* name) {
  NNK_CHECK_VALUE(v.device != Device::unsupported, name,
                  " lives on a device nnkernels does not support (only CPU and CUDA)");
  NNK_CHECK_TYPE(v.dtype != DType::unsupported, name,
                 " must be a floating-point tensor (float32 or float64), got ", dtype_str(v));
  if (v.device == Device::cpu) {
    NNK_CHECK_IMPLEMENTED(v.dtype == DType::f32 || v.dtype == DType::f64, name, " has dtype ",
                          dtype_str(v), ": the CPU kernels support float32 and float64");
  } else {
    NNK_CHECK_IMPLEMENTED(v.dtype == DType::f32, name, " has dtype ", dtype_str(v),
                          ": the CUDA kernels support float32");
  }
}

void check_like(const TensorView& v, const char* name, const TensorView& ref,
                const char* ref_name) {
  NNK_CHECK_VALUE(v.device == ref.device && v.device_id == ref.device_id, name, " and ", ref_name,
                  " must be on the same device");
  NNK_CHECK_TYPE(v.dtype == ref.dtype, name, " has dtype ", dtype_str(v), " but ", ref_name,
                 " has dtype ", dtype_str(ref), "; they must match");
}

bool is_non_overlapping(const TensorView& v) {
  if (v.numel() <= 1) return true;
  // Sort the non-trivial dims by |stride|; each must step past everything the smaller ones span.
  int64_t st[kMaxDims], sz[kMaxDims];
  int n = 0;
  for (int d = 0; d < v.ndim; ++d) {
    if (v.shape[d] == 1) continue;
    st[n] = v.strides[d] < 0 ? -v.strides[d] : v.strides[d];
    sz[n++] = v.shape[d];
  }
  for (int i = 1; i < n; ++i)  // insertion sort, n <= 8
    for (int j = i; j > 0 && st[j] < st[j - 1]; --j) {
      std::swap(st[j], st[j - 1]);
      std::swap(sz[j], sz[j - 1]);
    }
  int64_t span = 1;  // elements spanned by the dims sorted so far
  for (int i = 0; i < n; ++i) {
    if (st[i] < span) return false;
    span = st[i] * (sz[i] - 1) + span;
  }
  return true;
}

void check_output(const TensorView& out, const char* name) {
  NNK_CHECK_VALUE(!out.readonly, name, " is read-only");
  NNK_CHECK_VALUE(is_non_overlapping(out), name,
                  " has overlapping memory (e.g. an expanded tensor); it cannot be written");
}

void check_no_overlap(const TensorView& out, const char* name, const TensorView& input,
                      const char* input_name) {
  NNK_CHECK_VALUE(!may_overlap(out, input), name, " must not share memory with ", input_name);
}

}  // namespace nnk
