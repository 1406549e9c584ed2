// cli/commands.hpp — one add_<command> per subcommand, and the requirement flags that pick, run
// and batch share (one definition, so `--mem` means the same everywhere).
#pragma once

#include <CLI/CLI.hpp>
#include <optional>
#include <string>

#include "cli/context.hpp"
#include "gpuslot/policy.hpp"

namespace gpuslot::cli {

struct RequirementOptions {
  std::optional<std::string> mem;
  std::string gpus = "1";  // text: to_requirements checks it, with a message that says what is accepted
  std::string exclude;
  std::string strategy = "most-free";
  std::optional<std::string> max_util;
  std::string device;  // restrict to one device spec (cuda:N, GPU-…)

  void add_to(CLI::App& command);
  // Validates the flags (Errc::bad_input with the flag named) into Requirements.
  Requirements to_requirements() const;
};

void add_status(CLI::App& app, Context& context);
void add_pick(CLI::App& app, Context& context);
void add_device(CLI::App& app, Context& context);
void add_run(CLI::App& app, Context& context);
void add_leases(CLI::App& app, Context& context);
void add_batch(CLI::App& app, Context& context);

// The reservation of a launch without --mem: GPUSLOT_DEFAULT_MEM, else 2G (a CUDA context plus
// a small model). Used by run and batch.
std::string default_reservation();

// Restricts `visibility` to the GPU a --device spec names (cuda:N or GPU-…); `auto`/`cuda` leave
// it as is; `cpu` is refused for commands that need a GPU. The visibility layer's
// restrict_to_device, named "--device", with its error thrown as a CommandError.
Visibility restrict_to_device(const std::string& spec, const Snapshot& snapshot, Visibility visibility);

}  // namespace gpuslot::cli
