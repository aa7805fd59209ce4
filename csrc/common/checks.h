// Argument checks for the binding layer. Every entry point validates its views with these before
// any kernel runs; a violation raises a Python ValueError / TypeError / NotImplementedError whose
// message names the argument, what was expected and what came. Kernels then trust their inputs.
#pragma once
#include <pybind11/pybind11.h>

#include <initializer_list>
#include <sstream>
#include <string>

#include "common/tensor.h"

namespace nnk {

template <class... Args>
std::string str_cat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

[[noreturn]] void throw_not_implemented(const std::string& msg);

#define NNK_CHECK_VALUE(cond, ...)                                           \
  do {                                                                       \
    if (!(cond)) throw ::pybind11::value_error(::nnk::str_cat(__VA_ARGS__)); \
  } while (0)
#define NNK_CHECK_TYPE(cond, ...)                                           \
  do {                                                                      \
    if (!(cond)) throw ::pybind11::type_error(::nnk::str_cat(__VA_ARGS__)); \
  } while (0)
#define NNK_CHECK_IMPLEMENTED(cond, ...)                                    \
  do {                                                                      \
    if (!(cond)) ::nnk::throw_not_implemented(::nnk::str_cat(__VA_ARGS__)); \
  } while (0)

// torch's objects the hand-off uses, given once at import (nnkernels/_native.py): the Tensor type,
// torch._C._to_dlpack, and callables for the thread count and the current CUDA stream (None where
// torch has no CUDA). Before that (or without torch) only DLPack capsules pass.
void register_torch(pybind11::handle tensor_type, pybind11::handle to_dlpack,
                    pybind11::handle get_num_threads, pybind11::handle current_stream);
// torch.get_num_threads() (0 when torch is not registered) and torch's current raw stream on a
// CUDA device (0 when unknown); call with the GIL held.
int torch_num_threads();
uintptr_t torch_cuda_stream(int device);

// A view of `obj`: a torch.Tensor (exported through DLPack's C exchange table, or one call of
// torch._C._to_dlpack on older torch; the tensor, which the caller holds, keeps the memory alive)
// or a DLPack capsule (not consumed: the producer keeps ownership, and the capsule stays alive for
// the duration of the call). `name` is used in error messages. An input with torch's negative bit
// set (a lazily negated view, which holds -x in memory) is refused; for an output (which the
// Python layer allocates afresh) that check, a torch call of its own, is skipped.
TensorView view_of(pybind11::handle obj, const char* name, bool output = false);

// "(2, 3, 4)"
std::string shape_str(const TensorView& v);
// The dtype as the producer named it: "float32", "int64", "bool", ...
std::string dtype_str(const TensorView& v);
// The device as the producer named it: "cpu", "cuda:1", "meta", ...
std::string device_str(const TensorView& v);

// The one table of what the kernels compute, per device. Every op computes `floating`; the
// cross-entropy logits also `logits` (float16 / bfloat16 storage with float32 math, CUDA only);
// the GEMM's entry points (gemm, linear, linear_backward, sum_rows) `gemm`, which on the CPU adds
// bfloat16 (cpu::gemm_bf16).
enum class Dtypes { floating, logits, gemm };
// "floating", "logits" or "gemm" -> the set (false when the name is none of them).
bool dtypes_from_name(const std::string& name, Dtypes* out);
bool supported(Dtypes set, Device device, DType dtype);
// "float32 and float64"
std::string supported_names(Dtypes set, Device device);

// `v` must have one of the given ranks.
void check_ndim(const TensorView& v, const char* name, std::initializer_list<int> ranks);
// `v` must have exactly this shape.
void check_shape(const TensorView& v, const char* name, std::initializer_list<int64_t> shape);
// `v` must be floating point, on a supported device, of a dtype `set` computes there.
void check_float(const TensorView& v, const char* name, Dtypes set = Dtypes::floating);
// `v` must have the same dtype and device as `ref`.
void check_like(const TensorView& v, const char* name, const TensorView& ref, const char* ref_name);
// `out` must be writable, must not write one element twice, and must not overlap `input`.
void check_output(const TensorView& out, const char* name);
void check_no_overlap(const TensorView& out, const char* name, const TensorView& input,
                      const char* input_name);
// A (n,) vector with ref's dtype and device and unit stride (a bias, per-channel coefficients).
void check_vector(const TensorView& v, const char* name, int64_t n, const TensorView& ref,
                  const char* ref_name);

// (dim a, dim b) of v flatten into one index (size-1 dims never matter).
bool flattens(const TensorView& v, int a, int b);
// The element stride of dims (a, b) flattened into one (flattens(v, a, b) holds). A size-1 dim b
// may carry any stride (torch's contiguity checks ignore it): step by a's then.
int64_t flat_stride(const TensorView& v, int a, int b);

}  // namespace nnk
