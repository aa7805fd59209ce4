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

// ------------------------------------------------------------------------------ torch hand-off

namespace {

struct Torch {
  PyTypeObject* tensor = nullptr;
  PyObject* get_num_threads = nullptr;
  PyObject* current_stream = nullptr;      // torch._C._cuda_getCurrentRawStream, or None
  PyObject* to_dlpack = nullptr;           // torch._C._to_dlpack
  const DLPackExchangeAPI* api = nullptr;  // DLPack's C exchange table (torch >= 2.9), or null
  // Interned attribute and method names.
  PyObject *s_dtype, *s_shape, *s_is_neg, *s_device;
};
Torch g_torch;

PyObject* intern(const char* s) { return PyUnicode_InternFromString(s); }

// obj.<name>() with no arguments; a new reference (throws when it raised).
PyObject* call_method(PyObject* obj, PyObject* name) {
  PyObject* r = PyObject_VectorcallMethod(name, &obj, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET, nullptr);
  if (!r) throw py::error_already_set();
  return r;
}

PyObject* get_attr(PyObject* obj, PyObject* name) {
  PyObject* r = PyObject_GetAttr(obj, name);
  if (!r) throw py::error_already_set();
  return r;
}

// The int64s of a tuple (torch.Size or the tuple of stride()) into out[0..n).
int tuple_ints(PyObject* t, int64_t* out, const char* name) {
  const Py_ssize_t n = PyTuple_GET_SIZE(t);
  NNK_CHECK_VALUE(n <= kMaxDims, name, " has ", n, " dimensions; at most ", kMaxDims,
                  " are supported");
  for (Py_ssize_t i = 0; i < n; ++i) {
    out[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(t, i));
    if (out[i] == -1 && PyErr_Occurred()) throw py::error_already_set();
  }
  return int(n);
}

// The device, dtype and shape of a torch tensor read through its attributes: the slow path, for
// tensors torch cannot export (meta, ...), so that the message can name what came.
TensorView describe_tensor(PyObject* obj, const char* name, const std::string& why) {
  TensorView v;
  v.owner = obj;
  const std::string dev = device_str(v);
  NNK_CHECK_IMPLEMENTED(dev.rfind("cpu", 0) != 0 && dev.rfind("cuda", 0) != 0, name,
                        " cannot be read by the kernels (", why, ")");
  PyObject* shape = get_attr(obj, g_torch.s_shape);
  v.ndim = tuple_ints(shape, v.shape, name);
  Py_DECREF(shape);
  return v;  // device unsupported, dtype from the owner: check_float names both
}

DType dl_dtype(DLDataType t) {
  if (t.lanes != 1) return DType::unsupported;
  if (t.code == kDLFloat && t.bits == 16) return DType::f16;
  if (t.code == kDLFloat && t.bits == 32) return DType::f32;
  if (t.code == kDLFloat && t.bits == 64) return DType::f64;
  if (t.code == kDLBfloat && t.bits == 16) return DType::bf16;
  if (t.code == kDLInt && t.bits == 64) return DType::i64;
  return DType::unsupported;
}

TensorView view_of_dltensor(const DLTensor* t, bool readonly, const char* name) {
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
  return v;
}

TensorView view_of_capsule(PyObject* obj, const char* name) {
  const char* cap_name = PyCapsule_GetName(obj);
  const DLTensor* t = nullptr;
  bool readonly = false;
  if (cap_name && std::strcmp(cap_name, "dltensor") == 0) {
    auto* m = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(obj, "dltensor"));
    if (m) t = &m->dl_tensor;
  } else if (cap_name && std::strcmp(cap_name, "dltensor_versioned") == 0) {
    auto* m =
        static_cast<DLManagedTensorVersioned*>(PyCapsule_GetPointer(obj, "dltensor_versioned"));
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
  return view_of_dltensor(t, readonly, name);
}

// A torch tensor: DLPack's C exchange function where torch has it (a DLTensor filled on the stack,
// no Python call, no allocation), else one call of torch._C._to_dlpack (its capsule released
// right away: the caller's tensor keeps the memory alive); plus the negative bit, which DLPack
// does not carry.
TensorView view_of_tensor(PyObject* obj, const char* name, bool output) {
  TensorView v;
  if (g_torch.api) {
    DLTensor t;
    if (g_torch.api->dltensor_from_py_object_no_sync(obj, &t) != 0) {
      const py::error_already_set err;  // not exportable (meta, sparse, ...)
      return describe_tensor(obj, name, err.what());
    }
    v = view_of_dltensor(&t, false, name);
  } else {
    PyObject* cap = PyObject_CallOneArg(g_torch.to_dlpack, obj);
    if (!cap) {
      const py::error_already_set err;
      return describe_tensor(obj, name, err.what());
    }
    v = view_of_capsule(cap, name);
    Py_DECREF(cap);
  }
  v.owner = obj;
  if (output) return v;
  PyObject* neg = call_method(obj, g_torch.s_is_neg);
  const bool negative = neg == Py_True;
  Py_DECREF(neg);
  // A lazily negated view (the imaginary part of a conjugated tensor) holds -x in memory.
  NNK_CHECK_IMPLEMENTED(!negative, name, " is a lazily negated view (is_neg() is True); pass ",
                        name, ".resolve_neg()");
  return v;
}

}  // namespace

void register_torch(py::handle tensor_type, py::handle to_dlpack, py::handle get_num_threads,
                    py::handle current_stream) {
  NNK_CHECK_TYPE(PyType_Check(tensor_type.ptr()), "tensor_type must be a type");
  Torch& t = g_torch;
  t.tensor = reinterpret_cast<PyTypeObject*>(tensor_type.inc_ref().ptr());
  t.to_dlpack = to_dlpack.inc_ref().ptr();
  PyObject* api = PyObject_GetAttrString(tensor_type.ptr(), "__dlpack_c_exchange_api__");
  if (api && PyCapsule_IsValid(api, "dlpack_exchange_api")) {
    const auto* table =
        static_cast<const DLPackExchangeAPI*>(PyCapsule_GetPointer(api, "dlpack_exchange_api"));
    if (table->header.version.major == 1 && table->dltensor_from_py_object_no_sync &&
        table->current_work_stream)
      t.api = table;  // the capsule lives on the type, as long as the process
  }
  Py_XDECREF(api);
  PyErr_Clear();
  t.get_num_threads = get_num_threads.inc_ref().ptr();
  t.current_stream = current_stream.is_none() ? nullptr : current_stream.inc_ref().ptr();
  t.s_dtype = intern("dtype");
  t.s_shape = intern("shape");
  t.s_is_neg = intern("is_neg");
  t.s_device = intern("device");
}

int torch_num_threads() {
  if (!g_torch.get_num_threads) return 0;
  PyObject* r = PyObject_CallNoArgs(g_torch.get_num_threads);
  if (!r) throw py::error_already_set();
  const long n = PyLong_AsLong(r);
  Py_DECREF(r);
  return n > 0 ? int(n) : 0;
}

uintptr_t torch_cuda_stream(int device) {
  if (g_torch.api) {
    void* stream = nullptr;
    if (g_torch.api->current_work_stream(kDLCUDA, device, &stream) != 0)
      throw py::error_already_set();
    return reinterpret_cast<uintptr_t>(stream);
  }
  if (!g_torch.current_stream) return 0;
  PyObject* d = PyLong_FromLong(device);
  PyObject* r = PyObject_CallOneArg(g_torch.current_stream, d);
  Py_DECREF(d);
  if (!r) throw py::error_already_set();
  const uintptr_t s = reinterpret_cast<uintptr_t>(PyLong_AsVoidPtr(r));
  Py_DECREF(r);
  return s;
}

TensorView view_of(py::handle h, const char* name, bool output) {
  PyObject* obj = h.ptr();
  TensorView v;
  if (obj && g_torch.tensor && PyObject_TypeCheck(obj, g_torch.tensor)) {
    v = view_of_tensor(obj, name, output);
  } else if (obj && PyCapsule_CheckExact(obj)) {
    v = view_of_capsule(obj, name);
  } else {
    NNK_CHECK_TYPE(false, name, " must be a torch.Tensor (or a DLPack capsule), got ",
                   obj ? Py_TYPE(obj)->tp_name : "nothing");
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

// ------------------------------------------------------------------------------------ messages

namespace {

// str(owner.<attr>) without a "torch." prefix ("float32", "cuda:0"), for torch tensors.
std::string owner_attr_str(const TensorView& v, PyObject* attr) {
  PyObject* a = PyObject_GetAttr(static_cast<PyObject*>(v.owner), attr);
  PyObject* s = a ? PyObject_Str(a) : nullptr;
  std::string out = s ? PyUnicode_AsUTF8(s) : "?";
  Py_XDECREF(s);
  Py_XDECREF(a);
  if (!s) PyErr_Clear();
  if (out.rfind("torch.", 0) == 0) out = out.substr(6);
  return out;
}

}  // namespace

std::string dtype_str(const TensorView& v) {
  if (v.owner) return owner_attr_str(v, g_torch.s_dtype);
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
    case 5:  // kDLComplex
      return str_cat("complex", int(t.bits));
    default:
      return str_cat("dtype code ", int(t.code), " with ", int(t.bits), " bits");
  }
}

std::string device_str(const TensorView& v) {
  if (v.owner) return owner_attr_str(v, g_torch.s_device);
  switch (v.device) {
    case Device::cpu:
      return "cpu";
    case Device::cuda:
      return str_cat("cuda:", v.device_id);
    default:
      return "an unsupported device";
  }
}

std::string shape_str(const TensorView& v) {
  std::ostringstream os;
  os << "(";
  for (int d = 0; d < v.ndim; ++d) os << (d ? ", " : "") << v.shape[d];
  os << (v.ndim == 1 ? ",)" : ")");
  return os.str();
}

// ------------------------------------------------------------------------------ dtype support

bool supported(Dtypes set, Device device, DType dtype) {
  switch (device) {
    case Device::cpu:
      return dtype == DType::f32 || dtype == DType::f64 ||
             (set == Dtypes::gemm && dtype == DType::bf16);
    case Device::cuda:
      return dtype == DType::f32 ||
             (set == Dtypes::logits && (dtype == DType::f16 || dtype == DType::bf16));
    default:
      return false;
  }
}

bool dtypes_from_name(const std::string& name, Dtypes* out) {
  const std::pair<const char*, Dtypes> names[] = {
      {"floating", Dtypes::floating}, {"logits", Dtypes::logits}, {"gemm", Dtypes::gemm}};
  for (const auto& [n, set] : names)
    if (name == n) {
      *out = set;
      return true;
    }
  return false;
}

std::string supported_names(Dtypes set, Device device) {
  std::string out;
  int n = 0;
  for (DType d : {DType::f16, DType::bf16, DType::f32, DType::f64})
    if (supported(set, device, d)) ++n;
  int i = 0;
  for (DType d : {DType::f16, DType::bf16, DType::f32, DType::f64}) {
    if (!supported(set, device, d)) continue;
    out += (i == 0 ? "" : i + 1 == n ? " and " : ", ");
    out += dtype_name(d);
    ++i;
  }
  return out;
}

// ------------------------------------------------------------------------------------- checks

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

void check_float(const TensorView& v, const char* name, Dtypes set) {
  if (v.dtype != DType::unsupported && supported(set, v.device, v.dtype)) return;  // fast path
  const std::string dt = dtype_str(v);
  const bool floating = dt.rfind("float", 0) == 0 || dt.rfind("bfloat", 0) == 0 ||
                        dt.rfind("complex", 0) == 0;  // float8_*, complex64, ...: not computed
  NNK_CHECK_TYPE(floating, name, " must be a floating-point tensor, got dtype ", dt);
  NNK_CHECK_IMPLEMENTED(v.device != Device::unsupported, name, " is on device '", device_str(v),
                        "'; nnkernels supports cpu and cuda");
#if !defined(NNK_WITH_CUDA)
  NNK_CHECK_IMPLEMENTED(v.device != Device::cuda, name,
                        " is a CUDA tensor but this nnkernels build has no CUDA kernels "
                        "(rebuild with nvcc on the PATH, or NNKERNELS_CUDA=ON)");
#endif
  const char* dev = v.device == Device::cuda ? "cuda" : "cpu";
  NNK_CHECK_IMPLEMENTED(false, name, " has dtype ", dt, "; nnkernels on ", dev, " supports ",
                        supported_names(set, v.device));
}

void check_like(const TensorView& v, const char* name, const TensorView& ref,
                const char* ref_name) {
  NNK_CHECK_VALUE(v.device == ref.device && v.device_id == ref.device_id, name, " is on ",
                  device_str(v), " but ", ref_name, " is on ", device_str(ref),
                  "; they must be on one device");
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

void check_vector(const TensorView& v, const char* name, int64_t n, const TensorView& ref,
                  const char* ref_name) {
  check_like(v, name, ref, ref_name);
  check_shape(v, name, {n});
  NNK_CHECK_VALUE(n <= 1 || v.strides[0] == 1, name, " must be contiguous");
}

bool flattens(const TensorView& v, int a, int b) {
  return v.shape[a] <= 1 || v.shape[b] <= 1 || v.strides[a] == v.shape[b] * v.strides[b];
}

int64_t flat_stride(const TensorView& v, int a, int b) {
  return v.shape[b] == 1 ? v.strides[a] : v.strides[b];
}

}  // namespace nnk
