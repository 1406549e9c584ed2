// cli/report.hpp — how the command line shows snapshots, decisions and leases: the builders of
// api/report.hpp (shared with the library facade), and the human lease table printed here.
#pragma once

#include <vector>

#include "api/report.hpp"

namespace gpuslot::cli {

using report::decision_json;
using report::json_text;
using report::lease_json;
using report::leases_by_gpu;
using report::memory_line;
using report::status_json;
using report::verdict_line;

// The human lease table: ID, USER, PID, GPU, RESERVED, IN USE, AGE, COMMAND.
void print_lease_table(const std::vector<LeaseRecord>& leases, const Snapshot* snapshot);

}  // namespace gpuslot::cli
