// cmd_pick.cpp — `gpuslot pick`: print the GPUs a request would get, and why.
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "cli/commands.hpp"
#include "cli/report.hpp"
#include "gpuslot/units.hpp"

namespace gpuslot::cli {

void RequirementOptions::add_to(CLI::App& command) {
  command.add_option("--mem", mem, "Memory needed on each GPU: 512M, 8G, 8GiB, 0.5G (bare number = MiB)");
  command.add_option("--gpus", gpus, "Number of GPUs (default 1)");
  command.add_option("--exclude", exclude, "GPUs never to use: NVML indices or UUIDs, comma-separated");
  command.add_option("--strategy", strategy, "most-free (default), least-used, least-busy or pack");
  command.add_option("--max-util", max_util, "Pass over GPUs busier than this utilization percent");
  command.add_option("--device", device, "Only this device: cuda:N, GPU-<uuid>, auto or cuda");
}

std::string default_reservation() {
  const char* configured = std::getenv("GPUSLOT_DEFAULT_MEM");
  if (configured == nullptr || *configured == '\0') return "2G";
  // Checked here, so that the error names the variable rather than a --mem nobody typed.
  if (auto parsed = parse_size_bytes(configured); !parsed) {
    throw CommandError(make_error(Errc::bad_input, "GPUSLOT_DEFAULT_MEM: " + parsed.error().message));
  }
  return configured;
}

namespace {

// A whole number from `least` to `most` given to `flag`; the option is read as text so that "-1"
// or "lots" get this message rather than the parser's "Could not convert".
unsigned whole_number(const std::string& text, const char* flag, unsigned least, unsigned most, const char* accepted) {
  unsigned long value = 0;
  const bool digits = !text.empty() && text.size() <= 9 && text.find_first_not_of("0123456789") == std::string::npos;
  if (digits) value = std::stoul(text);
  if (!digits || value < least || value > most) {
    throw CommandError(make_error(Errc::bad_input, std::string("invalid ") + flag + " '" + text + "': expected " + accepted));
  }
  return unsigned(value);
}

}  // namespace

Requirements RequirementOptions::to_requirements() const {
  Requirements requirements;
  if (mem) requirements.memory_bytes = value_or_throw(parse_size_bytes(*mem));
  requirements.gpu_count = whole_number(gpus, "--gpus", 1, 1024, "a whole number from 1 to 1024");
  if (!exclude.empty()) requirements.exclude = value_or_throw(parse_exclude_list(exclude));
  requirements.strategy = value_or_throw(parse_strategy(strategy));
  if (max_util) requirements.max_utilization = whole_number(*max_util, "--max-util", 0, 100, "a percent, 0 to 100");
  return requirements;
}

Visibility restrict_to_device(const std::string& spec_text, const Snapshot& snapshot, Visibility visibility) {
  return value_or_throw(gpuslot::restrict_to_device(spec_text, snapshot, std::move(visibility), "--device"));
}

namespace {

std::string shell_quote(const std::string& value) {
  if (value.find_first_not_of("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.,:/") == std::string::npos) return value;
  std::string quoted = "'";
  for (char c : value) quoted += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return quoted + "'";
}

struct PickOptions {
  RequirementOptions requirements;
  std::string format = "index";
  std::optional<std::string> hold;  // given, even empty: hold (an empty or zero one is refused)
  bool explain = false;
};

void run_pick(Context& context, PickOptions options) {
  // A hold reserves, so without --mem it reserves what `run` would.
  if (options.hold && !options.requirements.mem) options.requirements.mem = default_reservation();
  const Requirements requirements = options.requirements.to_requirements();
  if (options.format != "index" && options.format != "uuid" && options.format != "env" && options.format != "json") {
    throw CommandError(make_error(Errc::bad_input, "invalid --format '" + options.format + "': expected index, uuid, env or json"));
  }
  Snapshot snapshot;
  Decision decision;
  if (!options.hold) {
    snapshot = value_or_throw(context.snapshot());
    decision = value_or_throw(select_gpus(requirements, snapshot,
                                          restrict_to_device(options.requirements.device, snapshot, context.visibility(snapshot)),
                                          context.reservations(snapshot)));
  } else {
    // --hold: select and reserve atomically, for a launch the calling shell makes next. The lease
    // lives by its expiry (this process exits at once) and ends early once the memory shows up
    // in the calling shell's process tree.
    ReserveRequest request;
    request.requirements = requirements;
    request.hold = value_or_throw(parse_duration(*options.hold));
    if (request.hold->count() <= 0) {
      throw CommandError(make_error(Errc::bad_input, "invalid --hold '" + *options.hold +
                                                         "': expected a duration above zero, such as 60s or 10m"));
    }
    request.owner_pid = ::getppid();
    request.owner_session = ::getsid(0);
    request.command = "pick --hold " + *options.hold;
    Ledger* ledger = value_or_throw(context.ledger());
    std::vector<std::string> warnings;
    Reservation reservation = value_or_throw(ledger->reserve(
        request, [&context] { return context.snapshot(); },
        [&](const Snapshot& s) { return restrict_to_device(options.requirements.device, s, context.visibility(s)); }, &warnings));
    for (const auto& warning : warnings) print_warning(context, warning);
    snapshot = std::move(reservation.snapshot);
    decision = std::move(reservation.decision);
    if (reservation.lease) std::fprintf(stderr, "gpuslot: holding lease %s for %s\n", reservation.lease->record().id.c_str(), options.hold->c_str());
  }
  const Visibility visibility = context.visibility(snapshot);  // ordinals as this process numbers them

  if (options.explain) {
    for (const auto& verdict : decision.verdicts) {
      std::fprintf(stderr, "%s\n", verdict_line(snapshot.gpus[verdict.nvml_index], verdict, visibility).c_str());
    }
  }
  for (const auto& warning : decision.warnings) print_warning(context, warning);
  if (options.format == "json") {
    std::printf("%s\n", json_text(decision_json(decision, snapshot, visibility)).c_str());
  }
  if (!decision.fits()) {
    print_error(decision.summary);
    context.exit_code = exit_code_of(Errc::nothing_fits);
    return;
  }
  if (options.format == "index" || options.format == "uuid") {
    std::string line;
    for (unsigned index : decision.chosen) {
      line += (line.empty() ? "" : ",") + (options.format == "index" ? std::to_string(index) : snapshot.gpus[index].uuid);
    }
    std::printf("%s\n", line.c_str());
  } else if (options.format == "env") {
    // `eval "$(gpuslot pick --format env)"`: the one function that builds a child's GPU
    // environment, printed as shell assignments.
    const ChildGpuEnv env = child_gpu_env(snapshot, decision.chosen, ExportFormat::index);
    std::string line = "export";
    for (const auto& [name, value] : env.set) line += " " + name + "=" + shell_quote(value);
    std::printf("%s\n", line.c_str());
  }
}

}  // namespace

void add_pick(CLI::App& app, Context& context) {
  auto options = std::make_shared<PickOptions>();
  CLI::App* command = app.add_subcommand("pick", "Print the GPU(s) that best fit a request (exit 1 if none fits now)");
  options->requirements.add_to(*command);
  command->add_option("--format", options->format, "index (default), uuid, env or json");
  command->add_option("--hold", options->hold, "Reserve the choice for this long (e.g. 60s) for a launch that follows");
  command->add_flag("--explain", options->explain, "Print one line per GPU on stderr: taken, or why passed over");
  command->callback([&context, options] { context.action = [&context, options] { run_pick(context, *options); }; });
}

}  // namespace gpuslot::cli
