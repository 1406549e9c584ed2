// cmd_device.cpp — `gpuslot device [SPEC]`: resolve a service's device setting
// (`…_DEVICE=auto|cuda|cuda:N|cpu|GPU-<uuid>`) to what the service should pass its framework:
// `cuda:N` (the CUDA ordinal inside this process's visibility) or `cpu`.
//
// Semantics, as the services that motivated it behave:
//   auto    a GPU if the driver is there and one is visible (the best by policy), else cpu;
//           GPUs present but none with --mem room is "nothing fits" (exit 1), not a silent cpu.
//   cuda    a GPU is required: the best one; no driver is exit 3.
//   cuda:N  exactly that ordinal; it must exist (exit 2) and have --mem room (exit 1).
//   GPU-…   that GPU, printed as its ordinal; it must be visible.
//   cpu     cpu, without touching NVML.
#include <cstdio>
#include <cstdlib>

#include "cli/commands.hpp"
#include "cli/report.hpp"
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
  std::string spec_text = options.spec;
  std::string source = "argument";
  if (spec_text.empty()) {
    const char* from_env = std::getenv(options.env_name.c_str());
    if (from_env != nullptr && *from_env != '\0') {
      spec_text = from_env;
      source = options.env_name;
    } else {
      spec_text = "auto";
      source = "default";
    }
  }
  auto parsed = parse_device_spec(spec_text);
  if (!parsed) {
    Error error = std::move(parsed).error();
    if (source != "argument") error.message += " (from " + source + ")";
    throw CommandError(std::move(error));
  }
  const DeviceSpec spec = *parsed;
  Requirements requirements;
  if (options.mem) requirements.memory_bytes = value_or_throw(parse_size_bytes(*options.mem));
  requirements.strategy = value_or_throw(parse_strategy(options.strategy));

  if (spec.kind == DeviceSpec::Kind::cpu) {
    say("device cpu requested (" + source + "): using cpu");
    std::printf("cpu\n");
    return;
  }
  auto snapshot_result = context.snapshot();
  if (!snapshot_result) {
    if (spec.kind == DeviceSpec::Kind::automatic && snapshot_result.error().code == Errc::nvml_unavailable) {
      say("no NVIDIA driver: " + snapshot_result.error().message);
      say("auto: using cpu");
      std::printf("cpu\n");
      return;
    }
    throw CommandError(std::move(snapshot_result).error());
  }
  const Snapshot& snapshot = *snapshot_result;
  Visibility visibility = context.visibility(snapshot);
  // Inside a Slurm job a visible GPU the job was not granted is no more usable than a hidden one.
  // (The other lines are word for word those of the library's resolve_device, src/api.)
  const std::vector<unsigned> usable = visibility.candidates();
  const std::string not_granted =
      !visibility.visible.empty() && visibility.slurm ? visibility.slurm->label() + " was granted none" : "";
  if (spec.kind == DeviceSpec::Kind::automatic && usable.empty()) {
    say(snapshot.gpus.empty()   ? "no NVIDIA GPU on this host"
        : !not_granted.empty() ? "no GPU for this process: " + not_granted
                               : "no GPU is visible to this process (CUDA_VISIBLE_DEVICES)");
    say("auto: using cpu");
    std::printf("cpu\n");
    return;
  }
  if (usable.empty()) {
    throw CommandError(make_error(Errc::nvml_unavailable, "device " + spec_text + " needs a GPU, but " +
                                                              (snapshot.gpus.empty()   ? std::string("this host has none")
                                                               : !not_granted.empty() ? not_granted
                                                                                      : "CUDA_VISIBLE_DEVICES hides every GPU")));
  }
  if (visibility.ambiguity) throw CommandError(make_error(Errc::bad_input, *visibility.ambiguity));

  const std::string restriction =
      spec.kind == DeviceSpec::Kind::cuda_ordinal || spec.kind == DeviceSpec::Kind::uuid ? spec_text : std::string();
  const Visibility candidates = restrict_to_device(restriction, snapshot, visibility);  // bad specs fail here, before output
  for (unsigned index : usable) say(memory_line(snapshot.gpus[index]));
  visibility = candidates;
  const Decision decision = value_or_throw(select_gpus(requirements, snapshot, visibility, context.reservations(snapshot)));
  for (const auto& warning : decision.warnings) print_warning(context, warning);
  if (!decision.fits()) {
    for (unsigned index : visibility.candidates()) {
      say(verdict_line(snapshot.gpus[index], decision.verdicts[index], context.visibility(snapshot)));
    }
    print_error(decision.summary);
    context.exit_code = exit_code_of(Errc::nothing_fits);
    return;
  }
  const unsigned chosen = decision.chosen.front();
  const Visibility full = context.visibility(snapshot);
  const unsigned ordinal = full.cuda_ordinal_of(chosen).value_or(0);
  say("chosen: cuda:" + std::to_string(ordinal) + " = GPU " + std::to_string(chosen) + " (" + snapshot.gpus[chosen].name +
      "), " + decision.verdicts[chosen].reason + " [" + spec_text + " from " + source + "]");
  std::printf("cuda:%u\n", ordinal);
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
