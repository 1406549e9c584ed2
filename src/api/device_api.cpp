// device_api.cpp — resolve_device: a service's `…_DEVICE=auto|cuda|cuda:N|cpu|GPU-<uuid>` setting
// resolved in-process by the function behind `gpuslot device` (api/device_resolution.cpp), so the
// rules and the stderr lines are the same (tests/python/test_resolve_device.py checks them case by
// case). The one difference is deliberate: with a memory request the choice is also reserved for
// the life of the calling process, which a command that exits at once cannot do.
#include <exception>

#include "api/device_resolution.hpp"
#include "api/lease_state.hpp"
#include "api/session.hpp"

namespace gpuslot {

Result<DeviceResolution> resolve_device(const DeviceRequest& request, Explanation* explanation) {
  try {
    if (explanation != nullptr) *explanation = {};
    DeviceResolution resolution;
    auto warn = [&request, explanation](const std::string& line) {
      if (request.on_log) request.on_log(line, true);
      if (explanation != nullptr) explanation->warnings.push_back(line);
    };
    auto setting = api::read_device_setting(request.spec, request.env);
    if (!setting) return std::move(setting).error();

    Visibility visibility;  // this process's, for the explanation
    std::unique_ptr<HeldLease> held;
    api::DeviceResolver resolver;
    resolver.snapshot = [] { return api::snapshot(); };
    resolver.visibility = [&](const Snapshot& snapshot) {
      visibility = current_visibility(snapshot);
      if (visibility.slurm && visibility.slurm->note) warn(*visibility.slurm->note);
      return visibility;
    };
    resolver.say = [&resolution, &request](const std::string& line) {
      if (request.on_log) request.on_log(line, false);
      resolution.log.push_back(line);
    };
    resolver.decide = [&](const Snapshot& snapshot, const Visibility& candidates) -> Result<Decision> {
      Requirements requirements;
      requirements.memory_bytes = request.memory_bytes;
      requirements.strategy = request.strategy;
      std::vector<std::string> warnings;
      Decision decision;
      auto ledger = api::ledger();
      if (request.memory_bytes > 0) {
        // Select and reserve atomically, on the snapshot already read.
        if (!ledger) return std::move(ledger).error();
        ReserveRequest reserve;
        reserve.requirements = requirements;
        reserve.command = request.command.empty() ? api::default_command("resolve_device") : request.command;
        auto reservation = ledger->reserve(
            reserve, [&snapshot]() -> Result<Snapshot> { return snapshot; },
            [&candidates](const Snapshot&) { return candidates; }, &warnings);
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
        auto decided = select_gpus(requirements, snapshot, candidates, outstanding);
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
      return decision;
    };

    auto resolved = api::resolve_device_setting(*setting, resolver);
    if (!resolved) return std::move(resolved).error();
    if (!resolved->nvml_index) {
      if (resolved->device == "cpu") {
        resolution.device = "cpu";
        return resolution;
      }
      // Nothing fits. As the command prints them: the candidates' verdicts only.
      if (explanation != nullptr) explanation->gpu_lines = std::move(resolved->verdict_lines);
      return make_error(Errc::nothing_fits, resolved->decision->summary);
    }
    resolution.device = resolved->device;
    resolution.nvml_index = *resolved->nvml_index;
    resolution.uuid = resolved->uuid;
    if (held) {
      resolution.lease_id = held->record().id;
      auto state = std::make_unique<GpuLease::State>();
      state->held = std::move(held);
      state->nvml_indices = {*resolved->nvml_index};
      state->uuids = {resolved->uuid};
      state->cuda_ordinals = {resolved->cuda_ordinal};
      GpuLease(std::move(state)).hold_until_exit();
    }
    return resolution;
  } catch (const std::exception& e) {
    return make_error(Errc::internal, std::string("internal error: ") + e.what());
  }
}

}  // namespace gpuslot
