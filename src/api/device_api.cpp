// device_api.cpp — resolve_device: a service's `…_DEVICE=auto|cuda|cuda:N|cpu|GPU-<uuid>` setting
// resolved in-process, with the rules and the stderr lines of `gpuslot device`
// (src/cli/cmd_device.cpp; tests/python/test_resolve_device.py checks both agree case by case).
// The one difference is deliberate: with a memory request the choice is also reserved for the
// life of the calling process, which a command that exits at once cannot do.
#include <cstdlib>
#include <exception>

#include "api/lease_state.hpp"
#include "api/session.hpp"
#include "cli/report.hpp"

namespace gpuslot {

Result<DeviceResolution> resolve_device(const DeviceRequest& request, Explanation* explanation) {
  try {
    if (explanation != nullptr) *explanation = {};
    DeviceResolution resolution;
    auto say = [&resolution, &request](std::string line) {
      if (request.on_log) request.on_log(line, false);
      resolution.log.push_back(std::move(line));
    };
    auto warn = [&request, explanation](const std::string& line) {
      if (request.on_log) request.on_log(line, true);
      if (explanation != nullptr) explanation->warnings.push_back(line);
    };
    auto cpu = [&resolution, &say](std::string why) {
      say(std::move(why));
      resolution.device = "cpu";
      return resolution;
    };

    std::string spec_text;
    std::string source = "argument";
    if (request.spec) {
      spec_text = *request.spec;
    } else {
      const char* from_env = request.env.empty() ? nullptr : std::getenv(request.env.c_str());
      if (from_env != nullptr && *from_env != '\0') {
        spec_text = from_env;
        source = request.env;
      } else {
        spec_text = "auto";
        source = "default";
      }
    }
    auto parsed = parse_device_spec(spec_text);
    if (!parsed) {
      Error error = std::move(parsed).error();
      if (source != "argument") error.message += " (from " + source + ")";
      return error;
    }
    const DeviceSpec spec = *parsed;
    if (spec.kind == DeviceSpec::Kind::cpu) return cpu("device cpu requested (" + source + "): using cpu");

    auto snapshot_result = api::snapshot();
    if (!snapshot_result) {
      if (spec.kind == DeviceSpec::Kind::automatic && snapshot_result.error().code == Errc::nvml_unavailable) {
        say("no NVIDIA driver: " + snapshot_result.error().message);
        return cpu("auto: using cpu");
      }
      return std::move(snapshot_result).error();
    }
    const Snapshot& snapshot = *snapshot_result;
    const Visibility visibility = current_visibility(snapshot);
    if (visibility.slurm && visibility.slurm->note) warn(*visibility.slurm->note);
    // Inside a Slurm job a visible GPU the job was not granted is no more usable than a hidden one.
    const std::vector<unsigned> usable = visibility.candidates();
    const std::string not_granted =
        !visibility.visible.empty() && visibility.slurm ? visibility.slurm->label() + " was granted none" : "";
    if (spec.kind == DeviceSpec::Kind::automatic && usable.empty()) {
      say(snapshot.gpus.empty()   ? "no NVIDIA GPU on this host"
          : !not_granted.empty() ? "no GPU for this process: " + not_granted
                                 : "no GPU is visible to this process (CUDA_VISIBLE_DEVICES)");
      return cpu("auto: using cpu");
    }
    if (usable.empty()) {
      return make_error(Errc::nvml_unavailable, "device " + spec_text + " needs a GPU, but " +
                                                    (snapshot.gpus.empty()   ? std::string("this host has none")
                                                     : !not_granted.empty() ? not_granted
                                                                            : "CUDA_VISIBLE_DEVICES hides every GPU"));
    }
    if (visibility.ambiguity) return make_error(Errc::bad_input, *visibility.ambiguity);

    const std::string restriction =
        spec.kind == DeviceSpec::Kind::cuda_ordinal || spec.kind == DeviceSpec::Kind::uuid ? spec_text : std::string();
    auto candidates = api::restrict_to_device(restriction, snapshot, visibility);
    if (!candidates) return std::move(candidates).error();
    for (unsigned index : usable) say(cli::memory_line(snapshot.gpus[index]));

    Requirements requirements;
    requirements.memory_bytes = request.memory_bytes;
    requirements.strategy = request.strategy;
    std::vector<std::string> warnings;
    Decision decision;
    std::unique_ptr<HeldLease> held;
    auto ledger = api::ledger();
    if (request.memory_bytes > 0) {
      // Select and reserve atomically, on the snapshot already read.
      if (!ledger) return std::move(ledger).error();
      ReserveRequest reserve;
      reserve.requirements = requirements;
      reserve.command = request.command.empty() ? api::default_command("resolve_device") : request.command;
      const Visibility narrowed = *candidates;
      auto reservation = ledger->reserve(
          reserve, [&snapshot]() -> Result<Snapshot> { return snapshot; },
          [&narrowed](const Snapshot&) { return narrowed; }, &warnings);
      if (!reservation) return std::move(reservation).error();
      decision = std::move(reservation->decision);
      held = std::move(reservation->lease);
    } else {
      // Nothing to reserve: decide on what others hold, as the command does.
      OutstandingReservations outstanding;
      if (ledger) {
        std::vector<LeaseRecord> leases = ledger->live_leases(&warnings);
        outstanding = Ledger::outstanding(leases, snapshot);
      } else {
        warnings.push_back("leases not counted: " + ledger.error().message);
      }
      auto decided = select_gpus(requirements, snapshot, *candidates, outstanding);
      if (!decided) return std::move(decided).error();
      decision = std::move(*decided);
    }
    for (const auto& line : warnings) warn(line);
    for (const auto& line : decision.warnings) warn(line);
    if (explanation != nullptr) {
      std::vector<std::string> said = std::move(explanation->warnings);
      api::explain(decision, snapshot, visibility, {}, explanation);
      explanation->warnings = std::move(said);
    }
    if (!decision.fits()) {
      // As the command prints them: the candidates' verdicts only.
      std::vector<std::string> verdicts;
      for (unsigned index : candidates->candidates()) {
        verdicts.push_back(cli::verdict_line(snapshot.gpus[index], decision.verdicts[index], visibility));
        if (request.on_log) request.on_log(verdicts.back(), false);
      }
      if (explanation != nullptr) explanation->gpu_lines = std::move(verdicts);
      return make_error(Errc::nothing_fits, decision.summary);
    }
    const unsigned chosen = decision.chosen.front();
    const unsigned ordinal = visibility.cuda_ordinal_of(chosen).value_or(0);
    say("chosen: cuda:" + std::to_string(ordinal) + " = GPU " + std::to_string(chosen) + " (" + snapshot.gpus[chosen].name +
        "), " + decision.verdicts[chosen].reason + " [" + spec_text + " from " + source + "]");
    resolution.device = "cuda:" + std::to_string(ordinal);
    resolution.nvml_index = chosen;
    resolution.uuid = snapshot.gpus[chosen].uuid;
    if (held) {
      resolution.lease_id = held->record().id;
      auto state = std::make_unique<GpuLease::State>();
      state->held = std::move(held);
      state->nvml_indices = {chosen};
      state->uuids = {snapshot.gpus[chosen].uuid};
      state->cuda_ordinals = {ordinal};
      GpuLease(std::move(state)).hold_until_exit();
    }
    return resolution;
  } catch (const std::exception& e) {
    return make_error(Errc::internal, std::string("internal error: ") + e.what());
  }
}

}  // namespace gpuslot
