// cli/context.hpp — what every command shares: global options, the NVML library (opened at most
// once), the snapshot (taken at most once per decision), and how to print.
#pragma once

#include <atomic>
#include <cstdio>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "gpuslot/inventory.hpp"
#include "gpuslot/lease.hpp"
#include "gpuslot/nvml.hpp"
#include "gpuslot/policy.hpp"
#include "gpuslot/visibility.hpp"

namespace gpuslot::cli {

struct GlobalOptions {
  std::string simulate;  // --simulate HOST.json: use the bundled fake NVML with this host
};

class Context {
 public:
  GlobalOptions options;
  int exit_code = 0;
  std::function<void()> action;  // set by the chosen subcommand's parse callback
  std::vector<std::string> command;  // `run … -- CMD ARGS`: CMD ARGS, split off before parsing

  // Applies --simulate (points the fake NVML at the host file, picks the bundled library and a
  // private default state directory). Call once, after parsing, before anything else.
  void prepare(const char* argv0);

  // NVML, opened once; Errc::nvml_unavailable when there is no driver.
  Result<std::shared_ptr<NvmlLibrary>> nvml();

  // A fresh Snapshot (one NVML pass).
  Result<Snapshot> snapshot(bool with_processes = true);

  // Visibility of this process's environment on `snapshot`: CUDA_VISIBLE_DEVICES and, inside a
  // Slurm job, the job's grant. A note about the grant (a fallback, no GPU granted) is printed
  // as a warning the first time only: a waiting `run` asks again on every attempt.
  Visibility visibility(const Snapshot& snapshot) const;

  // The host's lease ledger (state directory opened and checked once). Errc::state if unusable.
  Result<Ledger*> ledger();

  // Live leases and what they still hold back on each GPU of `snapshot`. An unusable state
  // directory is reported as a warning here: showing GPUs must not depend on it.
  OutstandingReservations reservations(const Snapshot& snapshot, std::vector<LeaseRecord>* leases = nullptr);

  bool color_stdout() const { return color_stdout_; }
  bool color_stderr() const { return color_stderr_; }

  // Path of the bundled fake NVML next to this binary (for --simulate).
  std::string bundled_fake_nvml() const;

 private:
  Result<std::shared_ptr<NvmlLibrary>> open_capturing_simulation_errors();
  std::string nvml_path_;
  std::string exe_dir_;
  std::shared_ptr<NvmlLibrary> nvml_;
  std::optional<Ledger> ledger_;
  std::optional<Error> ledger_error_;
  std::optional<Error> nvml_error_;
  bool color_stdout_ = false;
  bool color_stderr_ = false;
  mutable std::atomic<bool> slurm_note_shown_{false};
};

// Prints "gpuslot: <message>" on stderr (one line).
void print_error(const std::string& message);
void print_warning(const Context& context, const std::string& message);

}  // namespace gpuslot::cli
