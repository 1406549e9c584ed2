// gpuslot/policy.hpp — the selection policy: a pure function from what is asked, what the GPUs
// show and what others have reserved, to a Decision that explains itself GPU by GPU.
//
// No I/O, no clock, no NVML: everything arrives as a value, so every rule is unit-tested with
// hand-made snapshots (tests/unit/policy).
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "gpuslot/error.hpp"
#include "gpuslot/inventory.hpp"
#include "gpuslot/visibility.hpp"

namespace gpuslot {

enum class Strategy {
  most_free,   // most available bytes (default)
  least_used,  // lowest used/total memory ratio
  least_busy,  // lowest SM utilisation
  pack,        // smallest available memory that still fits: keeps big GPUs free
};

Result<Strategy> parse_strategy(std::string_view text);
const char* strategy_name(Strategy strategy) noexcept;

struct Requirements {
  std::uint64_t memory_bytes = 0;           // needed on each chosen GPU (0 = any GPU)
  unsigned gpu_count = 1;
  std::vector<std::string> exclude;         // NVML indices ("3") or UUIDs / unique UUID prefixes
  std::optional<unsigned> max_utilization;  // percent; GPUs busier than this are passed over
  Strategy strategy = Strategy::most_free;
};

// Parses `--exclude 0,3,GPU-8f2c` into tokens (validated later against a Snapshot).
Result<std::vector<std::string>> parse_exclude_list(std::string_view text);

// Bytes already promised to other holders on one GPU but not yet visible in NVML's "used".
// Keyed by NVML index; filled by the lease layer (empty when nothing is reserved).
using OutstandingReservations = std::map<unsigned, std::uint64_t>;

struct GpuVerdict {
  unsigned nvml_index = 0;
  bool chosen = false;
  bool eligible = false;                     // passed every filter
  std::optional<std::uint64_t> available_bytes;  // free − outstanding reservations
  std::uint64_t reserved_bytes = 0;          // outstanding reservations counted against it
  std::string reason;                        // "chosen: most available memory (23.76 GiB)" / "excluded"
};

struct Decision {
  std::vector<unsigned> chosen;        // NVML indices, best first; empty when nothing fits
  std::vector<GpuVerdict> verdicts;    // one per GPU in the snapshot, NVML index order
  std::vector<std::string> warnings;   // e.g. "GPU 3 has only 1.20 GiB available"
  std::string summary;                 // one line: what was chosen and why, or why nothing fits
  bool impossible = false;             // nothing fits and waiting cannot help (too big, too many)

  bool fits() const { return !chosen.empty(); }
};

// Chooses GPUs. Filters out GPUs that are not visible, excluded, unhealthy, without memory
// readings, busier than max_utilization, or lacking `memory_bytes` after reservations; scores
// the rest by strategy; ties go to the lowest NVML index. Errc::bad_input if an exclude token
// names no GPU or the request can never be met (more GPUs than visible). A request that is valid
// but does not fit now is a Decision with no `chosen` (not an error).
Result<Decision> select_gpus(const Requirements& requirements, const Snapshot& snapshot,
                             const Visibility& visibility,
                             const OutstandingReservations& reservations = {});

// The threshold under which a chosen GPU earns a warning (still chosen).
inline constexpr std::uint64_t kLowMemoryWarningBytes = 2ull * 1024 * 1024 * 1024;

}  // namespace gpuslot
