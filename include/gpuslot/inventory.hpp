// gpuslot/inventory.hpp — Snapshot: one immutable reading of every GPU on the host.
//
// A Snapshot is taken in one NVML pass and then handed on as a plain value; nothing above this
// layer calls NVML. Unknown readings are std::nullopt, never 0 (a 0 % utilisation that was not
// measured would make a busy GPU look idle). A GPU whose NVML calls fail stays in the list with
// `healthy = false` and the error, so the tool can show it rather than crash on it.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <sys/types.h>
#include <vector>

#include "gpuslot/error.hpp"

namespace gpuslot {

class NvmlLibrary;

// One compute process NVML lists on a GPU.
struct GpuProcess {
  pid_t pid = 0;
  std::optional<std::uint64_t> used_bytes;  // nullopt when NVML reports "not available"
  std::optional<std::string> user;          // from /proc; nullopt if the pid is not visible here
  std::optional<std::string> command;       // (another PID namespace, or already gone)
};

struct GpuInfo {
  unsigned nvml_index = 0;
  std::string uuid;        // "GPU-…" as NVML prints it; empty only if NVML could not say
  std::string name;        // "NVIDIA GeForce RTX 4090"; empty if unknown
  std::string pci_bus_id;  // "00000000:01:00.0"; empty if unknown
  std::optional<unsigned> minor_number;  // N of /dev/nvidiaN (how Slurm names GPUs); nullopt if unknown
  std::optional<std::uint64_t> memory_total_bytes;
  std::optional<std::uint64_t> memory_used_bytes;
  std::optional<std::uint64_t> memory_free_bytes;
  std::optional<std::uint64_t> memory_reserved_bytes;  // driver/firmware carve-out (memory v2 only)
  std::optional<unsigned> utilization_gpu_percent;
  std::optional<unsigned> utilization_memory_percent;
  std::optional<unsigned> temperature_c;
  std::optional<unsigned> power_mw;
  std::vector<GpuProcess> processes;
  bool healthy = true;
  std::string health_error;  // NVML's message when !healthy ("GPU is lost (NVML error 15) …")
};

struct Snapshot {
  std::optional<std::string> driver_version;
  std::optional<int> cuda_driver_version;  // 12040 means CUDA 12.4
  std::vector<GpuInfo> gpus;               // in NVML index order (PCI bus order)
  std::chrono::system_clock::time_point taken_at{};

  const GpuInfo* find_uuid(std::string_view uuid) const;
};

// Reads every GPU once through `nvml`. Fails only if the device count cannot be read; per-GPU
// failures are recorded in that GpuInfo. `with_processes` = false skips the process lists and
// the /proc lookups (for commands that do not show or account them).
Result<Snapshot> take_snapshot(NvmlLibrary& nvml, bool with_processes = true);

// User name and command line of a pid read from /proc (nullopt where not visible).
struct ProcessIdentity {
  std::optional<std::string> user;
  std::optional<std::string> command;
};
ProcessIdentity identify_process(pid_t pid);

// The name of user `uid`: /etc/passwd read directly, else NSS (LDAP, sssd), else the number.
std::string user_name_of(uid_t uid);

}  // namespace gpuslot
