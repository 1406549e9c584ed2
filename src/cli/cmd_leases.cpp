// cmd_leases.cpp — `gpuslot leases [--json] [--release ID]`: every live reservation on the host.
#include <cstdio>

#include "cli/commands.hpp"
#include "cli/report.hpp"

namespace gpuslot::cli {

namespace {

struct LeasesOptions {
  bool json = false;
  std::optional<std::string> release;  // given, even empty: release (an empty id is refused)
};

void run_leases(Context& context, const LeasesOptions& options) {
  Ledger* ledger = value_or_throw(context.ledger());
  if (options.release) {
    if (auto released = ledger->release(*options.release); !released) throw CommandError(released.error());
    std::printf("released %s\n", options.release->c_str());
    return;
  }
  std::vector<std::string> warnings;
  std::vector<LeaseRecord> leases = ledger->live_leases(&warnings);
  for (const auto& warning : warnings) print_warning(context, warning);
  // In-use figures need NVML; without it the leases are still listed.
  auto snapshot = context.snapshot();
  if (snapshot) Ledger::outstanding(leases, *snapshot);
  if (options.json) {
    nlohmann::json list = nlohmann::json::array();
    for (const auto& lease : leases) {
      nlohmann::json entry = lease_json(lease);
      if (!snapshot) entry["in_use"] = nullptr;  // unknown without NVML, as the table's "?"
      list.push_back(std::move(entry));
    }
    std::printf("%s\n", json_text(nlohmann::json{{"state_dir", ledger->directory()}, {"leases", list}}).c_str());
    return;
  }
  if (leases.empty()) {
    std::printf("no leases in %s\n", ledger->directory().c_str());
    return;
  }
  print_lease_table(leases, snapshot ? &*snapshot : nullptr);
}

}  // namespace

void add_leases(CLI::App& app, Context& context) {
  auto options = std::make_shared<LeasesOptions>();
  CLI::App* command = app.add_subcommand("leases", "List every live GPU reservation on this host");
  command->add_flag("--json", options->json, "Machine-readable output");
  command->add_option("--release", options->release, "Remove lease ID (its holder or root only)");
  command->callback([&context, options] { context.action = [&context, options] { run_leases(context, *options); }; });
}

}  // namespace gpuslot::cli
