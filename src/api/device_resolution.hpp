// api/device_resolution.hpp — resolving a service's device setting
// (`…_DEVICE=auto|cuda|cuda:N|cpu|GPU-<uuid>`) to what it passes its framework: `cuda:N` or `cpu`,
// with the lines that say why. The one implementation behind `gpuslot device` (cli/cmd_device.cpp)
// and the library's resolve_device (api/device_api.cpp); they differ only in how they get a
// snapshot, report a Slurm note and decide (the library may also reserve), which they pass in.
//
// Semantics, as the services that motivated it behave:
//   auto    a GPU if the driver is there and one is usable (the best by policy), else cpu;
//           GPUs present but none with room is "nothing fits", not a silent cpu.
//   cuda    a GPU is required: the best one; no driver is Errc::nvml_unavailable.
//   cuda:N  exactly that ordinal; it must exist (bad_input) and have room (nothing fits).
//   GPU-…   that GPU, named by its ordinal; it must be visible.
//   cpu     cpu, without touching NVML.
#pragma once

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "gpuslot/error.hpp"
#include "gpuslot/inventory.hpp"
#include "gpuslot/policy.hpp"
#include "gpuslot/visibility.hpp"

namespace gpuslot::api {

// The setting to resolve and where it came from.
struct DeviceSetting {
  std::string text;    // as written
  std::string source;  // "argument", the variable's name, or "default"
  DeviceSpec spec;
};

// `spec` if given, else the variable `env_name` (when set and not empty), else "auto".
// Errc::bad_input for an invalid setting, naming the variable it came from.
Result<DeviceSetting> read_device_setting(const std::optional<std::string>& spec, const std::string& env_name);

// What the caller supplies.
struct DeviceResolver {
  std::function<Result<Snapshot>()> snapshot;                 // one NVML pass (not called for cpu)
  std::function<Visibility(const Snapshot&)> visibility;      // this process's; reports a Slurm note
  // Chooses among `candidates` (the visibility narrowed to the setting's GPU), reserving if it
  // must, and reports the decision's warnings.
  std::function<Result<Decision>(const Snapshot&, const Visibility& candidates)> decide;
  std::function<void(const std::string&)> say;                // one line of the account (stderr)
};

struct ResolvedDevice {
  std::string device;                   // "cpu", "cuda:N", or "" when nothing fits
  std::optional<unsigned> nvml_index;   // the chosen GPU
  std::string uuid;                     // the chosen GPU's
  unsigned cuda_ordinal = 0;
  std::optional<Decision> decision;     // when one was made
  std::vector<std::string> verdict_lines;  // nothing fits: the candidates' verdicts (already said)
};

// Resolves `setting`. Lines said, in order: why cpu; or the memory line of every usable GPU,
// then (nothing fits) each candidate's verdict, or "chosen: cuda:N = GPU i (name), reason
// [text from source]". Errors: no GPU where one is needed (nvml_unavailable), an invalid or
// unusable device (bad_input), a failed snapshot or decision.
Result<ResolvedDevice> resolve_device_setting(const DeviceSetting& setting, const DeviceResolver& resolver);

}  // namespace gpuslot::api
