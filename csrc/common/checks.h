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

// A view of the DLPack capsule `obj` (not consumed: the producer keeps ownership, and the capsule
// stays alive for the duration of the call). `name` is used in error messages.
TensorView view_of(pybind11::handle obj, const char* name);

// "(2, 3, 4)"
std::string shape_str(const TensorView& v);
// The dtype as the producer named it: "float32", "int64", "bool", ...
std::string dtype_str(const TensorView& v);

// `v` must have one of the given ranks.
void check_ndim(const TensorView& v, const char* name, std::initializer_list<int> ranks);
// `v` must have exactly this shape.
void check_shape(const TensorView& v, const char* name, std::initializer_list<int64_t> shape);
// `v` must be floating point and of a dtype this build computes on its device.
void check_float(const TensorView& v, const char* name);
// `v` must have the same dtype and device as `ref`.
void check_like(const TensorView& v, const char* name, const TensorView& ref, const char* ref_name);
// `out` must be writable, must not write one element twice, and must not overlap `input`.
void check_output(const TensorView& out, const char* name);
void check_no_overlap(const TensorView& out, const char* name, const TensorView& input,
                      const char* input_name);

}  // namespace nnk
