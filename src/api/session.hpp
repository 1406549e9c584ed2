// api/session.hpp — what every facade call shares: NVML opened once per process, the ledger of
// the state directory the environment names, this process's visibility and command line, and
// the per-GPU explanation lines. Internal to the api layer.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "gpuslot/gpuslot.hpp"

namespace gpuslot::api {

// NVML, opened on first use and kept for the life of the process (never shut down: see
// ARCHITECTURE.md). A failed open is retried on the next call.
Result<std::shared_ptr<NvmlLibrary>> nvml();

// A fresh Snapshot with process lists (the ledger needs them to credit loaded memory).
Result<Snapshot> snapshot();

// The state directory named by the environment now (GPUSLOT_STATE_DIR, /run/gpuslot, /tmp/gpuslot).
Result<Ledger> ledger();

// "<what>: <this process's command line>", shown by `gpuslot leases`.
std::string default_command(const std::string& what);

// Fills `explanation` (if not null) from a decision: summary, one verdict line per GPU as
// `--explain` prints it, the decision's warnings plus `extra_warnings`.
void explain(const Decision& decision, const Snapshot& snapshot, const Visibility& visibility,
             const std::vector<std::string>& extra_warnings, Explanation* explanation);

// Keeps a lease until the process exits (the registry behind GpuLease::hold_until_exit).
void hold_for_process(std::unique_ptr<GpuLease::State> state);
std::size_t release_process_holds();

}  // namespace gpuslot::api
