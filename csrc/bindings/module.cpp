// nnkernels._C: the module. Process-level functions (ISA, threads, CUDA facts, the torch hand-off,
// the machine's measured peaks) are defined here with pybind11; every kernel entry point comes
// from its op's bindings/<op>.cpp through the registry of binding.h.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "bindings/binding.h"
#include "common/isa.h"
#include "common/threading.h"
#include "common/workspace.h"
#include "cpu/gemm.h"
#include "cpu/peak.h"
#include "cuda/cuda_api.h"

namespace py = pybind11;
using namespace pybind11::literals;

namespace nnk {
namespace {

Isa isa_arg(const std::string& name) {
  Isa isa;
  NNK_CHECK_VALUE(isa_from_name(name.c_str(), &isa), "unknown ISA '", name,
                  "'; expected one of avx512, avx2, baseline");
  return isa;
}

Device device_arg(const std::string& name) {
  NNK_CHECK_VALUE(name == "cpu" || name == "cuda", "device must be 'cpu' or 'cuda', got '", name,
                  "'");
  return name == "cpu" ? Device::cpu : Device::cuda;
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
      "name"_a,
      "Force a CPU path no higher than best_isa() ('scalar' names the baseline path too).");

  m.def(
      "_emulate_avx512_tiles",
      [](bool on) {
#if defined(NNK_X86)
        cpu::set_emulated_avx512_tiles(on);
#endif
      },
      "on"_a, "Test hook: on an AVX2 CPU, run the GEMM at the AVX-512 kernels' tiles and blocks.");

  m.def(
      "_set_stream_min_bytes", [](long long bytes) { set_stream_min_bytes(bytes); }, "bytes"_a,
      "Test hook: write outputs of at least `bytes` with non-temporal stores (0: the last-level "
      "cache's size, the default), so that tests reach those paths on any machine.");

  // Threads
  m.def(
      "set_num_threads",
      [](int n) {
        NNK_CHECK_VALUE(n >= 1, "num_threads must be >= 1, got ", n);
        set_user_num_threads(n);
      },
      "n"_a, "Use n threads in every kernel (instead of following torch.get_num_threads()).");
  m.def(
      "follow_torch_threads", [] { set_user_num_threads(0); },
      "Follow torch.get_num_threads() again (the default).");
  m.def(
      "get_num_threads",
      [] {
        const int user = user_num_threads();
        const int torch_n = torch_num_threads();
        return user > 0 ? user : torch_n > 0 ? torch_n : num_threads();
      },
      "The threads the next kernel call will use.");
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

  // The torch hand-off and the dtype rules
  m.def("register_torch", &register_torch, "tensor_type"_a, "to_dlpack"_a, "get_num_threads"_a,
        "current_stream"_a,
        "Called once by nnkernels/_native.py: the torch objects the kernels' hand-off reads.");
  m.def(
      "supported_dtypes",
      [](const std::string& device, const std::string& ops) {
        Dtypes set;
        NNK_CHECK_VALUE(dtypes_from_name(ops, &set),
                        "ops must be 'floating', 'logits' or 'gemm', got '", ops, "'");
        std::vector<std::string> out;
        const Device dev = device_arg(device);
        for (DType d : {DType::f16, DType::bf16, DType::f32, DType::f64})
          if (supported(set, dev, d)) out.push_back(dtype_name(d));
        return out;
      },
      "device"_a, "ops"_a = "floating",
      "The dtypes the kernels compute on 'cpu' or 'cuda': 'floating' every op, 'logits' "
      "cross-entropy's inputs, 'gemm' matmul's and linear's operands.");

  // Kernels: one entry point per bindings/<op>.cpp registration
  define_bindings(m);

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
      "gemm_bf16_kernel_name", [] { return std::string(cpu::gemm_bf16_kernel_name()); },
      "The kernel bfloat16 products run: amx, avx512bf16 or widen_f32 (float32 copies).");
  m.def(
      "_set_gemm_bf16_kernel",
      [](const std::string& name) {
        NNK_CHECK_VALUE(cpu::set_gemm_bf16_kernel(name.c_str()), "bfloat16 GEMM kernel '", name,
                        "' is unknown or not supported by this CPU");
      },
      "name"_a, "Test hook: run bfloat16 products on at most the named kernel ('': the best).");
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
