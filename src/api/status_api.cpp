// status_api.cpp — `gpuslot status --json` for in-process callers. The document is built by the
// same function the command uses (api/report.cpp status_json), so the two cannot drift apart.
#include <exception>

#include "api/session.hpp"
#include "api/report.hpp"

namespace gpuslot {

Result<std::string> status_json(std::vector<std::string>* warnings) {
  try {
    auto snapshot = api::snapshot();
    if (!snapshot) return std::move(snapshot).error();
    const Visibility visibility = current_visibility(*snapshot);
    std::vector<LeaseRecord> leases;
    OutstandingReservations outstanding;
    std::vector<std::string> found;
    if (auto ledger = api::ledger()) {
      leases = ledger->live_leases(&found);
      outstanding = Ledger::outstanding(leases, *snapshot);
    } else {
      found.push_back("leases not counted: " + ledger.error().message);  // showing GPUs must not depend on it
    }
    if (warnings != nullptr) *warnings = std::move(found);
    auto recommendation = select_gpus(Requirements{}, *snapshot, visibility, outstanding);
    if (!recommendation) return std::move(recommendation).error();
    return report::json_text(report::status_json(*snapshot, visibility, *recommendation, report::leases_by_gpu(leases, *snapshot)));
  } catch (const std::exception& e) {
    return make_error(Errc::internal, std::string("internal error: ") + e.what());
  }
}

}  // namespace gpuslot
