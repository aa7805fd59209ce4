#include "common/isa.h"

#include <atomic>
#include <cstring>
#include <initializer_list>

#if defined(NNK_X86)
#include <cpuid.h>
#endif

namespace nnk {

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512:
      return "avx512";
    case Isa::avx2:
      return "avx2";
    default:
      return "baseline";
  }
}

bool isa_from_name(const char* name, Isa* out) {
  if (std::strcmp(name, "scalar") == 0) name = "baseline";
  for (Isa i : {Isa::baseline, Isa::avx2, Isa::avx512})
    if (std::strcmp(name, isa_name(i)) == 0) {
      *out = i;
      return true;
    }
  return false;
}

#if defined(NNK_X86)
unsigned long long xcr0() {
  unsigned eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<unsigned long long>(edx) << 32) | eax;
}

static Isa detect() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return Isa::baseline;
  const bool fma = c & (1u << 12), osxsave = c & (1u << 27), avx = c & (1u << 28);
  if (!(osxsave && avx && fma)) return Isa::baseline;
  const unsigned long long xcr0 = ::nnk::xcr0();
  if ((xcr0 & 0x6) != 0x6) return Isa::baseline;  // OS saves XMM and YMM state
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return Isa::baseline;
  const bool avx2 = b & (1u << 5);
  if (!avx2) return Isa::baseline;
  // The AVX-512 unit is compiled with F, DQ, BW and VL (Skylake-SP, Ice Lake, Zen 4 and later).
  const bool f = b & (1u << 16), dq = b & (1u << 17), bw = b & (1u << 30), vl = b & (1u << 31);
  const bool os_zmm = (xcr0 & 0xe6) == 0xe6;  // opmask, ZMM_Hi256, Hi16_ZMM state
  if (f && dq && bw && vl && os_zmm) return Isa::avx512;
  return Isa::avx2;
}
#else
static Isa detect() { return Isa::baseline; }
#endif

Isa best_isa() {
  static const Isa best = detect();
  return best;
}

static std::atomic<int> g_active{-1};

Isa active_isa() {
  int a = g_active.load(std::memory_order_relaxed);
  if (a < 0) {
    a = static_cast<int>(best_isa());
    g_active.store(a, std::memory_order_relaxed);
  }
  return static_cast<Isa>(a);
}

bool set_isa(Isa isa) {
  if (static_cast<int>(isa) > static_cast<int>(best_isa())) return false;
  g_active.store(static_cast<int>(isa), std::memory_order_relaxed);
  return true;
}

}  // namespace nnk
