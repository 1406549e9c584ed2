// cmd_device.cpp — `gpuslot device [SPEC]`: resolve a service's device setting
// (`…_DEVICE=auto|cuda|cuda:N|cpu|GPU-<uuid>`) to what the service should pass its framework:
// `cuda:N` (the CUDA ordinal inside this process's visibility) or `cpu`.
//
// The rules and the lines are those of the library's resolve_device: both call
// api/device_resolution.cpp, which lists the semantics. Exit codes (exit_code_of): nothing fits 1,
// a bad or nonexistent device 2, no driver or no GPU where one is needed 3.
#include <cstdio>

#include "api/device_resolution.hpp"
#include "cli/commands.hpp"
#include "gpuslot/units.hpp"

namespace gpuslot::cli {

namespace {

struct DeviceOptions {
  std::string spec;
  std::string env_name = "GPUSLOT_DEVICE";
  std::optional<std::string> mem;
  std::string strategy = "most-free";
};

void say(const std::string& line) { std::fprintf(stderr, "%s\n", line.c_str()); }

void run_device(Context& context, const DeviceOptions& options) {
  const api::DeviceSetting setting = value_or_throw(
      api::read_device_setting(options.spec.empty() ? std::nullopt : std::optional<std::string>(options.spec), options.env_name));
  Requirements requirements;
  if (options.mem) requirements.memory_bytes = value_or_throw(parse_size_bytes(*options.mem));
  requirements.strategy = value_or_throw(parse_strategy(options.strategy));

  api::DeviceResolver resolver;
  resolver.snapshot = [&context] { return context.snapshot(); };
  resolver.visibility = [&context](const Snapshot& snapshot) { return context.visibility(snapshot); };  // prints a Slurm note
  resolver.say = say;
  resolver.decide = [&context, &requirements](const Snapshot& snapshot, const Visibility& candidates) -> Result<Decision> {
    auto decision = select_gpus(requirements, snapshot, candidates, context.reservations(snapshot));
    if (decision) {
      for (const auto& warning : decision->warnings) print_warning(context, warning);
    }
    return decision;
  };
  const api::ResolvedDevice resolved = value_or_throw(api::resolve_device_setting(setting, resolver));
  if (resolved.device.empty()) {
    print_error(resolved.decision->summary);
    context.exit_code = exit_code_of(Errc::nothing_fits);
    return;
  }
  std::printf("%s\n", resolved.device.c_str());
}

}  // namespace

void add_device(CLI::App& app, Context& context) {
  auto options = std::make_shared<DeviceOptions>();
  CLI::App* command = app.add_subcommand("device", "Resolve a device setting (auto, cuda, cuda:N, cpu, GPU-<uuid>) to cuda:N or cpu");
  command->add_option("spec", options->spec, "The setting; default: $GPUSLOT_DEVICE (or --env NAME), else auto");
  command->add_option("--env", options->env_name, "Read the setting from this variable (e.g. a service's ASR_DEVICE)");
  command->add_option("--mem", options->mem, "Memory the service needs on the GPU (e.g. 8G)");
  command->add_option("--strategy", options->strategy, "most-free (default), least-used, least-busy or pack");
  command->callback([&context, options] { context.action = [&context, options] { run_device(context, *options); }; });
}

}  // namespace gpuslot::cli
