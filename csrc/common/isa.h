// Runtime CPU ISA dispatch. The best path the CPU (and OS) supports is chosen once, at import;
// NNKERNELS_ISA (read by the Python package) or set_isa() may force a lower one.
#pragma once

namespace nnk {

enum class Isa : int { scalar = 0, avx2 = 1, avx512 = 2 };

const char* isa_name(Isa isa);
bool isa_from_name(const char* name, Isa* out);
// Highest ISA this CPU and OS support and this build compiled.
Isa best_isa();
Isa active_isa();
// Returns false (and changes nothing) when `isa` is above best_isa().
bool set_isa(Isa isa);

}  // namespace nnk
