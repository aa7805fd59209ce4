// Runtime CPU ISA dispatch. The best path the CPU (and OS) supports is chosen once, at import;
// NNKERNELS_ISA (read by the Python package) or set_isa() may force a lower one.
//
// The paths: baseline (no ISA flags: 16-byte GCC/Clang vectors, SSE2 on x86-64 and NEON on
// aarch64), avx2 (AVX2 + FMA) and avx512 (F, VL, BW, DQ). A source with SIMD loops (one that
// includes common/simd.h) is compiled once per path by CMake, with -DNNK_ISA=<path> and that path's
// flags, and defines its loops in namespace nnk::<path>; code compiled once (the drivers) reaches
// them through NNK_PER_ISA / NNK_ISA_CALL below, the one place the paths are switched on.
#pragma once

namespace nnk {

enum class Isa : int { baseline = 0, avx2 = 1, avx512 = 2 };

const char* isa_name(Isa isa);
// Also accepts "scalar", the name the baseline path had before it was named for what it is.
bool isa_from_name(const char* name, Isa* out);
// Highest ISA this CPU and OS support and this build compiled.
Isa best_isa();
Isa active_isa();
// Returns false (and changes nothing) when `isa` is above best_isa().
bool set_isa(Isa isa);
#if defined(NNK_X86)
// XCR0: the register states the OS saves (xgetbv 0); callers check it holds AVX / AVX-512 / AMX.
unsigned long long xcr0();
#endif

}  // namespace nnk

// NNK_PER_ISA(declaration): the declaration in the namespace of every compiled path.
// NNK_ISA_CALL(call): `call` evaluated in the namespace of the active path.
#if defined(NNK_X86)
#define NNK_PER_ISA(...) \
  namespace baseline {   \
  __VA_ARGS__;           \
  }                      \
  namespace avx2 {       \
  __VA_ARGS__;           \
  }                      \
  namespace avx512 {     \
  __VA_ARGS__;           \
  }
#define NNK_ISA_CALL(...)                                                 \
  (::nnk::active_isa() == ::nnk::Isa::avx512 ? ::nnk::avx512::__VA_ARGS__ \
   : ::nnk::active_isa() == ::nnk::Isa::avx2 ? ::nnk::avx2::__VA_ARGS__   \
                                             : ::nnk::baseline::__VA_ARGS__)
#else
#define NNK_PER_ISA(...) \
  namespace baseline {   \
  __VA_ARGS__;           \
  }
#define NNK_ISA_CALL(...) (::nnk::baseline::__VA_ARGS__)
#endif
