// api/report.hpp — how snapshots and decisions are shown, as values: the status JSON (a stable
// interface, DESIGN.md "status --json"), the per-GPU memory line, the --explain lines, and the
// decision and lease JSON. Below both the command line (which prints them) and the library
// facade (which returns them), so `gpuslot status --json` and `gpuslot.status()` are built by
// one function and cannot drift apart. No printing here: cli/report.cpp prints.
#pragma once

#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "gpuslot/inventory.hpp"
#include "gpuslot/lease.hpp"
#include "gpuslot/policy.hpp"
#include "gpuslot/visibility.hpp"

namespace gpuslot::report {

// `status --json`: driver_version, gpus[] (index, uuid, name, pci_bus_id, minor_number,
// memory{total, used, free, reserved, available}, utilization{gpu, memory}, temperature_c,
// power_mw, healthy, visible, cuda_ordinal, slurm_granted, processes[], leases[]), recommended,
// slurm (null outside a Slurm job, else {job_id, source, listed, numbers, granted, matched_by,
// note}). Unknown values are null; slurm_granted is null outside a Slurm job.
// `leases_by_gpu`, when given, is spliced in per NVML index (the lease layer owns its format).
nlohmann::json status_json(const Snapshot& snapshot, const Visibility& visibility, const Decision& recommendation,
                           const nlohmann::json& leases_by_gpu = nlohmann::json::object());

// "GPU 1 (NVIDIA GeForce RTX 4090): total 23.99 GiB, used 0.23 GiB, free 23.76 GiB"
std::string memory_line(const GpuInfo& gpu);

// "GPU 0 (NVIDIA GeForce RTX 4090): too little memory: 2.76 GiB available, 8 GiB requested"
std::string verdict_line(const GpuInfo& gpu, const GpuVerdict& verdict, const Visibility& visibility);

// The decision as JSON (pick --format json).
nlohmann::json decision_json(const Decision& decision, const Snapshot& snapshot, const Visibility& visibility);

// One lease as JSON (leases --json, and inside status --json per GPU).
nlohmann::json lease_json(const LeaseRecord& lease);

// {"<nvml index>": [lease, …]} for status_json.
nlohmann::json leases_by_gpu(const std::vector<LeaseRecord>& leases, const Snapshot& snapshot);

// The text every --json output prints (indented 2): strings from outside (command lines, paths)
// may hold bytes that are not UTF-8, which become U+FFFD instead of an exception.
inline std::string json_text(const nlohmann::json& json) {
  return json.dump(2, ' ', false, nlohmann::json::error_handler_t::replace);
}

}  // namespace gpuslot::report
