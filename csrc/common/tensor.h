// TensorView: a borrowed, strided view of memory that some Python object (a torch tensor, a
// numpy array) owns. Kernels receive raw pointers + sizes + element strides taken from it; they
// never allocate tensor memory that Python sees (destination-passing style).
#pragma once
#include <cstdint>

namespace nnk {

constexpr int kMaxDims = 8;

enum class DType { f16, bf16, f32, f64, i64, unsupported };  // i64: class targets
enum class Device { cpu, cuda, unsupported };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::f16:
      return "float16";
    case DType::bf16:
      return "bfloat16";
    case DType::f32:
      return "float32";
    case DType::f64:
      return "float64";
    case DType::i64:
      return "int64";
    default:
      return "an unsupported dtype";
  }
}

inline int dtype_size(DType t) {
  switch (t) {
    case DType::f16:
    case DType::bf16:
      return 2;
    case DType::f32:
      return 4;
    case DType::f64:
    case DType::i64:
      return 8;
    default:
      return 0;
  }
}

// A default-constructed view stands for an absent optional argument: data null, no dims, strides
// 0, so kernels can take view.ptr<T>() as "or null" directly. Views come from torch tensors (read
// through their Python attributes) or DLPack capsules (numpy arrays): common/checks.h, view_of.
struct TensorView {
  void* data = nullptr;
  DType dtype = DType::unsupported;
  uint8_t dl_code = 0, dl_bits = 0;  // the producer's DLPack dtype, for error messages
  uint16_t dl_lanes = 1;
  Device device = Device::unsupported;
  int device_id = 0;
  int ndim = 0;
  int64_t shape[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};  // in elements, any sign
  bool readonly = false;
  void* owner = nullptr;  // the Python object the view came from (borrowed), for messages

  int64_t size(int d) const { return shape[d < 0 ? d + ndim : d]; }
  int64_t stride(int d) const { return strides[d < 0 ? d + ndim : d]; }
  int64_t numel() const {
    int64_t n = 1;
    for (int d = 0; d < ndim; ++d) n *= shape[d];
    return n;
  }
  template <class T>
  T* ptr() const {
    return static_cast<T*>(data);
  }

  // [lo, hi) byte range this view can touch; empty (lo == hi) when numel() == 0.
  void byte_extent(uintptr_t* lo, uintptr_t* hi) const {
    const auto base = reinterpret_cast<uintptr_t>(data);
    if (numel() == 0) {
      *lo = *hi = base;
      return;
    }
    int64_t neg = 0, pos = 0;
    for (int d = 0; d < ndim; ++d) {
      const int64_t span = (shape[d] - 1) * strides[d];
      (span < 0 ? neg : pos) += span;
    }
    const int64_t es = dtype_size(dtype);
    *lo = base + neg * es;
    *hi = base + pos * es + es;
  }
};

// True when two views may touch a common byte (conservative: overlapping extents).
inline bool may_overlap(const TensorView& a, const TensorView& b) {
  uintptr_t alo, ahi, blo, bhi;
  a.byte_extent(&alo, &ahi);
  b.byte_extent(&blo, &bhi);
  return alo < bhi && blo < ahi;
}

// True when no two distinct indices of the view address the same element (writes cannot race).
bool is_non_overlapping(const TensorView& v);

// An (N, C, S) strided view of one of batch normalization's activations (S = the flattened spatial
// dims: 1 for (N, C), L, or H*W), the form both backends' batch_norm kernels take.
template <class T>
struct View3 {
  T* p = nullptr;
  int64_t N = 0, C = 0, S = 0;
  int64_t sn = 0, sc = 0, ss = 0;  // element strides of n, c, s
};

// With S == 1 ((N, C) inputs) the batch dim is taken as the spatial one: (1, C, N), ss = sn.
// Applied to every operand of a call (it depends on the shape only), it gives the kernels one row
// of N values per channel, or N pixels of C channels.
template <class T>
inline View3<T> normalised(View3<T> v) {
  if (v.S == 1 && v.N != 1) {
    v.S = v.N;
    v.ss = v.sn;
    v.N = 1;
    v.sn = 0;
  }
  return v;
}

}  // namespace nnk
