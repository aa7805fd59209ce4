// Device discovery. The CUDA runtime is linked statically and opens the driver lazily, so these
// answer "no GPU" (rather than failing to import) on machines without a driver.
#include "cuda/common.cuh"
#include "cuda/cuda_api.h"

namespace nnk {
namespace cuda {

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

std::string compiled_archs() {
#if defined(NNK_CUDA_ARCHS)
  return NNK_CUDA_ARCHS;
#else
  return "";
#endif
}

}  // namespace cuda
}  // namespace nnk
