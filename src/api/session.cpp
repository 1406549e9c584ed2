// session.cpp — the state every facade call shares, and the leases kept for the process's life.
#include "api/session.hpp"

#include <unistd.h>

#include <mutex>

#include "api/lease_state.hpp"
#include "cli/report.hpp"

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

Result<Visibility> restrict_to_device(const std::string& spec_text, const Snapshot& snapshot, Visibility visibility) {
  // Which GPUs an integer CUDA_VISIBLE_DEVICES names on a mixed host is CUDA's guess, not ours.
  if (visibility.restricted && visibility.ambiguity) return make_error(Errc::bad_input, *visibility.ambiguity);
  if (spec_text.empty()) return visibility;
  auto parsed = parse_device_spec(spec_text);
  if (!parsed) return std::move(parsed).error();
  const DeviceSpec spec = *parsed;
  auto only = [&visibility, &spec_text](unsigned index) -> Result<Visibility> {
    if (visibility.slurm && !visibility.is_candidate(index)) {
      return make_error(Errc::bad_input, "device " + spec_text + " is GPU " + std::to_string(index) + ", which " +
                                             visibility.slurm->label() + " was not granted");
    }
    visibility.visible = {index};
    visibility.restricted = true;
    visibility.restricted_by = "device " + spec_text;
    return visibility;
  };
  switch (spec.kind) {
    case DeviceSpec::Kind::automatic:
    case DeviceSpec::Kind::cuda_any: return visibility;
    case DeviceSpec::Kind::cpu:
      return make_error(Errc::bad_input, "device cpu asks for no GPU; expected auto, cuda, cuda:N or GPU-<uuid>");
    case DeviceSpec::Kind::cuda_ordinal:
      if (visibility.ambiguity) return make_error(Errc::bad_input, *visibility.ambiguity);
      if (spec.ordinal >= visibility.visible.size()) {
        const std::size_t count = visibility.visible.size();
        return make_error(Errc::bad_input, "device cuda:" + std::to_string(spec.ordinal) + " does not exist: " +
                                               std::to_string(count) + " GPU" + (count == 1 ? " is" : "s are") + " visible" +
                                               (visibility.slurm ? " in " + visibility.slurm->label() : "") +
                                               " (cuda:0 to cuda:" + std::to_string(count == 0 ? 0 : count - 1) + ")");
      }
      return only(visibility.visible[spec.ordinal]);
    case DeviceSpec::Kind::uuid: {
      auto index = nvml_index_of_uuid_prefix(snapshot, spec.uuid_prefix);
      if (!index) return std::move(index).error();
      if (!visibility.is_visible(*index)) {
        return make_error(Errc::bad_input, "device " + spec_text + " is GPU " + std::to_string(*index) +
                                               ", which CUDA_VISIBLE_DEVICES hides from this process");
      }
      return only(*index);
    }
  }
  return visibility;
}

void explain(const Decision& decision, const Snapshot& snapshot, const Visibility& visibility,
             const std::vector<std::string>& extra_warnings, Explanation* explanation) {
  if (explanation == nullptr) return;
  explanation->summary = decision.summary;
  explanation->waiting_cannot_help = !decision.fits() && decision.impossible;
  explanation->gpu_lines.clear();
  for (const auto& verdict : decision.verdicts) {
    if (verdict.nvml_index < snapshot.gpus.size()) {
      explanation->gpu_lines.push_back(cli::verdict_line(snapshot.gpus[verdict.nvml_index], verdict, visibility));
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
