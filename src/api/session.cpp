// session.cpp — the state every facade call shares, and the leases kept for the process's life.
#include "api/session.hpp"

#include <unistd.h>

#include <mutex>

#include "api/lease_state.hpp"
#include "api/report.hpp"

namespace gpuslot::api {

namespace {

std::mutex g_nvml_mutex;
std::shared_ptr<NvmlLibrary>& nvml_slot() {
  // Kept for the life of the process (NvmlLibrary::open caches only while in use), and never
  // destroyed: a wait abandoned on a helper thread (lease_api.cpp) may still read GPUs while the
  // process runs its exit handlers.
  static auto* library = new std::shared_ptr<NvmlLibrary>();
  return *library;
}

// Leases held until exit. Released at exit by the registry's destructor in the owning process
// (the kernel would drop the locks anyway; removing the files spares readers a stale entry).
struct ProcessHolds {
  std::mutex mutex;
  std::vector<std::unique_ptr<GpuLease::State>> states;
  ~ProcessHolds() {
    for (auto& state : states) state->release();
  }
};
ProcessHolds& process_holds() {
  static ProcessHolds holds;
  return holds;
}

}  // namespace

Result<std::shared_ptr<NvmlLibrary>> nvml() {
  std::lock_guard<std::mutex> lock(g_nvml_mutex);
  if (nvml_slot()) return nvml_slot();
  auto library = NvmlLibrary::open();
  if (!library) return std::move(library).error();
  nvml_slot() = *library;
  return nvml_slot();
}

Result<Snapshot> snapshot() {
  auto library = nvml();
  if (!library) return std::move(library).error();
  return take_snapshot(**library, /*with_processes=*/true);
}

Result<Ledger> ledger() {
  // Opened per call: cheap (a mkdir and an lstat), and it follows GPUSLOT_STATE_DIR as it is now.
  auto directory = open_state_directory();
  if (!directory) return std::move(directory).error();
  return Ledger(std::move(*directory));
}

std::string default_command(const std::string& what) {
  const ProcessIdentity self = identify_process(::getpid());
  std::string command = what + ": " + self.command.value_or("pid " + std::to_string(::getpid()));
  return command.size() > 200 ? command.substr(0, 197) + "..." : command;
}

void explain(const Decision& decision, const Snapshot& snapshot, const Visibility& visibility,
             const std::vector<std::string>& extra_warnings, Explanation* explanation) {
  if (explanation == nullptr) return;
  explanation->summary = decision.summary;
  explanation->waiting_cannot_help = !decision.fits() && decision.impossible;
  explanation->gpu_lines.clear();
  for (const auto& verdict : decision.verdicts) {
    if (verdict.nvml_index < snapshot.gpus.size()) {
      explanation->gpu_lines.push_back(report::verdict_line(snapshot.gpus[verdict.nvml_index], verdict, visibility));
    }
  }
  explanation->warnings = extra_warnings;
  explanation->warnings.insert(explanation->warnings.end(), decision.warnings.begin(), decision.warnings.end());
}

void hold_for_process(std::unique_ptr<GpuLease::State> state) {
  ProcessHolds& holds = process_holds();
  std::lock_guard<std::mutex> lock(holds.mutex);
  holds.states.push_back(std::move(state));
}

std::size_t release_process_holds() {
  ProcessHolds& holds = process_holds();
  std::vector<std::unique_ptr<GpuLease::State>> states;
  {
    std::lock_guard<std::mutex> lock(holds.mutex);
    states.swap(holds.states);
  }
  std::size_t released = 0;
  for (auto& state : states) {
    if (state->held) ++released;
    state->release();
  }
  return released;
}

}  // namespace gpuslot::api
