// report.cpp — the human lease table (`gpuslot leases`, `status`); the documents and lines it
// shares with the library live in src/api/report.cpp.
#include "cli/report.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>

#include "gpuslot/units.hpp"

namespace gpuslot::cli {

namespace {

std::int64_t unix_ms_now() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

std::string age_text(std::int64_t since_ms) {
  const std::int64_t seconds = std::max<std::int64_t>(0, (unix_ms_now() - since_ms) / 1000);
  if (seconds < 120) return std::to_string(seconds) + "s";
  if (seconds < 7200) return std::to_string(seconds / 60) + "m";
  return std::to_string(seconds / 3600) + "h";
}

}  // namespace

void print_lease_table(const std::vector<LeaseRecord>& leases, const Snapshot* snapshot) {
  std::printf("  %-18s %-10s %8s %-6s %10s %10s %6s %s\n", "ID", "USER", "PID", "GPU", "RESERVED", "IN USE", "AGE", "COMMAND");
  for (const auto& lease : leases) {
    std::string gpus;
    for (std::size_t i = 0; i < lease.gpu_uuids.size(); ++i) {
      const GpuInfo* gpu = snapshot != nullptr ? snapshot->find_uuid(lease.gpu_uuids[i]) : nullptr;
      gpus += (gpus.empty() ? "" : ",") +
              (gpu != nullptr ? std::to_string(gpu->nvml_index) : (i < lease.nvml_indices.size() ? std::to_string(lease.nvml_indices[i]) : "?"));
    }
    std::string age = age_text(lease.taken_at_ms);
    if (lease.expires_at_ms) age += "*";  // held by `pick --hold` until its expiry
    // pid 0 without an expiry: a batch lease whose shepherd has not taken it over yet.
    const std::string pid = lease.holder_pid == 0 && !lease.expires_at_ms ? "pending" : std::to_string(lease.holder_pid);
    std::printf("  %-18s %-10s %8s %-6s %10s %10s %6s %s\n", lease.id.c_str(), lease.user.c_str(), pid.c_str(),
                gpus.c_str(), format_size(lease.reserved_bytes).c_str(),
                snapshot != nullptr ? format_size(lease.in_use_bytes).c_str() : "?", age.c_str(), lease.command.c_str());
  }
}

}  // namespace gpuslot::cli
