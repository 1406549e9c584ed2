// signature_check.cpp — proves at compile time that the fake exports every NVML symbol gpuslot
// binds, each with the exact C signature gpuslot's loader casts it to.
//
// Both sides are generated from src/nvml/nvml_entry_points.def (STYLE.md rule 3): a symbol added
// there without an implementation here, or implemented with a different prototype (a 16-byte
// process record where 24 is expected, say), is a build error rather than a test that passes on
// the fake and corrupts memory on a real driver. Nothing in this file emits code.
#include <type_traits>

#include "nvml_exports.h"

namespace fake_nvml::signature_check {

#define GPUSLOT_NVML_SLOT(slot, signature, required) using slot##_sig = signature;
#define GPUSLOT_NVML_SYMBOL(slot, symbol)                                     \
  static_assert(std::is_same_v<decltype(&::symbol), slot##_sig*>,            \
                "fake NVML: " #symbol " is missing or differs from the signature of slot " #slot \
                " in src/nvml/nvml_entry_points.def");
#include "nvml/nvml_entry_points.def"
#undef GPUSLOT_NVML_SYMBOL
#undef GPUSLOT_NVML_SLOT

}  // namespace fake_nvml::signature_check
