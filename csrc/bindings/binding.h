// The machinery of the binding layer, shared by every csrc/bindings/<op>.cpp.
//
// An entry point is a function `py::object f(Call& c)` registered with
//   NNK_BINDING(f, "input, weight, bias, out, groups=1", "docstring");
// It reads its arguments from `c` by position in that signature (c.tensor(0), c.i64(4, 1), ...),
// checks them (common/checks.h) and runs its kernel through run(). Python calls entry points
// through one vectorcall trampoline (binding.cpp), without pybind11's overload dispatch: on a
// small layer that dispatch cost more than the kernel. Arguments may be passed by keyword too.
//
// run() is the one dispatch helper: it picks the backend from the reference view, owns the
// no-CUDA-build check, the thread count, torch's current CUDA stream, the GIL release and the
// CPU dtype switch, so no entry point repeats them.
#pragma once
#include <pybind11/pybind11.h>

#include <array>
#include <cstdint>

#include "common/checks.h"
#include "common/threading.h"

namespace nnk {
namespace py = pybind11;

constexpr int kMaxParams = 24;

// A parsed signature: parameter names and which ones are required (no "=default").
struct Params {
  const char* op;
  int n = 0;
  std::string names[kMaxParams];
  bool required[kMaxParams] = {};
};

class Call {
 public:
  Call(const Params& p, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames);

  const char* name(int i) const { return p_.names[i].c_str(); }
  // Whether parameter i was passed and is not None.
  bool given(int i) const { return a_[i] && a_[i] != Py_None; }
  py::handle handle(int i) const { return a_[i]; }

  TensorView tensor(int i) const { return view_of(a_[i], name(i)); }
  // An output the binding writes (see view_of: no negative-bit check).
  TensorView output(int i) const { return view_of(a_[i], name(i), true); }
  // The empty view (data null) when absent or None.
  TensorView tensor_or_none(int i) const { return given(i) ? tensor(i) : TensorView(); }
  double f64(int i, double fallback) const;
  int64_t i64(int i, int64_t fallback) const;
  bool flag(int i, bool fallback) const;
  // A sequence of exactly N ints (an int is repeated N times).
  template <size_t N>
  std::array<int64_t, N> ints(int i) const {
    std::array<int64_t, N> out{};
    ints_into(i, out.data(), N);
    return out;
  }

 private:
  void ints_into(int i, int64_t* out, size_t n) const;
  const Params& p_;
  PyObject* a_[kMaxParams] = {};
};

struct Binding {
  const char* name;
  const char* signature;  // "a, b, out, alpha=1.0, ..."
  const char* doc;
  py::object (*fn)(Call&);
};
// Registers an entry point (at static-initialisation time); define_bindings adds them all to the
// module at import.
bool add_binding(const Binding& b);
void define_bindings(py::module_& m);

#define NNK_BINDING(fn, signature, doc) \
  static const bool nnk_binding_##fn = ::nnk::add_binding({#fn, signature, doc, &fn})

// An integer constant the Python side needs (a workspace size): NNK_CONSTANT(NAME, value) makes
// nnkernels._C.NAME, exported like the entry points.
bool add_constant(const char* name, int64_t value);
#define NNK_CONSTANT(name, value) \
  static const bool nnk_constant_##name = ::nnk::add_constant(#name, value)

// ------------------------------------------------------------------------------------ dispatch

// For the duration of a CPU kernel call on this thread: torch's thread count, unless the user set
// one with nnkernels.set_num_threads (common/threading.h).
class ThreadsForCall {
 public:
  ThreadsForCall() { set_call_threads(user_num_threads() > 0 ? 0 : torch_num_threads()); }
  ~ThreadsForCall() { set_call_threads(0); }
  ThreadsForCall(const ThreadsForCall&) = delete;
  ThreadsForCall& operator=(const ThreadsForCall&) = delete;
};

struct CudaStream {
  int device;
  void* stream;  // torch's current stream on `device`
};

// Runs an op's kernel on the device of `ref` (a view check_float has accepted): on the CPU
// cpu(T()) with T = float or double (ref's dtype); on CUDA cuda(CudaStream). `work` is about the
// number of element operations: a CPU call releases the GIL only when there is enough work for
// other Python threads to gain from it (a release and re-acquire cost ~0.15 us, a tiny layer's
// whole kernel a few). `cuda` is a generic lambda, so a build without CUDA never instantiates it
// (its check_float already rejected CUDA views); pass no_cuda for a CPU-only entry point.
constexpr double kReleaseGilWork = 1 << 15;

// fn() on the CPU with the call's thread count, without the GIL when `work` is large enough.
template <class F>
void run_cpu(double work, F&& fn) {
  const ThreadsForCall threads;
  if (work < kReleaseGilWork) return fn();
  py::gil_scoped_release nogil;
  fn();
}

template <class Cpu, class Cuda>
void run(const TensorView& ref, double work, Cpu&& cpu, Cuda&& cuda) {
  if (ref.device == Device::cuda) {
#if defined(NNK_WITH_CUDA)
    const CudaStream s{ref.device_id, reinterpret_cast<void*>(torch_cuda_stream(ref.device_id))};
    py::gil_scoped_release nogil;
    cuda(s);
#else
    (void)cuda;
#endif
    return;
  }
  run_cpu(work, [&] {
    if (ref.dtype == DType::f32)
      cpu(float());
    else
      cpu(double());
  });
}

// run() for an entry point that also has a bfloat16 CPU kernel (check_float's gemm set): bf16()
// on the CPU for a bfloat16 ref.
template <class Bf16, class Cpu, class Cuda>
void run(const TensorView& ref, double work, Bf16&& bf16, Cpu&& cpu, Cuda&& cuda) {
  if (ref.device == Device::cpu && ref.dtype == DType::bf16) return run_cpu(work, bf16);
  run(ref, work, cpu, cuda);
}

inline constexpr auto no_cuda = [](auto) {};

// v with its last two dims swapped (a transposed view, no copy).
inline TensorView transposed(TensorView v) {
  if (v.ndim >= 2) {
    std::swap(v.shape[v.ndim - 1], v.shape[v.ndim - 2]);
    std::swap(v.strides[v.ndim - 1], v.strides[v.ndim - 2]);
  }
  return v;
}

}  // namespace nnk
