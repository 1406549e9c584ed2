// cmd_status.cpp — `gpuslot status`: every GPU, every process, every lease, and a
// recommendation with the exact export line to use it.
#include <poll.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdio>

#include "cli/commands.hpp"
#include "cli/report.hpp"
#include "gpuslot/units.hpp"

namespace gpuslot::cli {

namespace {

struct StatusOptions {
  bool json = false;
  std::optional<std::string> watch;
};

volatile std::sig_atomic_t g_stop = 0;
void on_stop_signal(int) { g_stop = 1; }

// The marker: green under half full, yellow under 90 %, red above, and words without colour so
// the meaning survives NO_COLOR and pipes.
std::string load_marker(const GpuInfo& gpu, bool color) {
  if (!gpu.healthy) return color ? "\033[31mLOST\033[0m" : "LOST";
  if (!gpu.memory_total_bytes || !gpu.memory_used_bytes || *gpu.memory_total_bytes == 0) return "  ? ";
  const double ratio = double(*gpu.memory_used_bytes) / double(*gpu.memory_total_bytes);
  const char* word = ratio < 0.5 ? "free" : ratio < 0.9 ? "busy" : "full";
  if (!color) return word;
  const char* code = ratio < 0.5 ? "\033[32m" : ratio < 0.9 ? "\033[33m" : "\033[31m";
  return std::string(code) + word + "\033[0m";
}

std::string percent(const std::optional<unsigned>& value) { return value ? std::to_string(*value) + "%" : "N/A"; }

// "Slurm job 12 granted GPUs 1,2 (SLURM_JOB_GPUS='1,2', matched by /dev/nvidiaN minor number)"
std::string slurm_line(const SlurmGrant& grant) {
  std::string granted;
  for (unsigned index : grant.granted) granted += (granted.empty() ? "" : ",") + std::to_string(index);
  std::string line = grant.label() + " granted ";
  line += grant.granted.empty() ? std::string("no GPU") : (grant.granted.size() == 1 ? "GPU " : "GPUs ") + granted;
  switch (grant.matched_by) {
    case SlurmGrant::Match::minor_number:
      line += " (" + grant.source + "=" + quote_for_message(grant.listed) + ", matched by /dev/nvidiaN minor number)";
      break;
    case SlurmGrant::Match::cuda_visible_devices: line += " (as CUDA_VISIBLE_DEVICES shows)"; break;
    case SlurmGrant::Match::none: break;
  }
  return line;
}

void print_table(Context& context, const Snapshot& snapshot, const Visibility& visibility, const Decision& recommendation,
                 const std::vector<LeaseRecord>& leases) {
  const bool color = context.color_stdout();
  std::printf("driver %s, CUDA %s, %zu GPU%s\n", snapshot.driver_version.value_or("N/A").c_str(),
              snapshot.cuda_driver_version
                  ? (std::to_string(*snapshot.cuda_driver_version / 1000) + "." + std::to_string(*snapshot.cuda_driver_version % 1000 / 10)).c_str()
                  : "N/A",
              snapshot.gpus.size(), snapshot.gpus.size() == 1 ? "" : "s");
  if (visibility.note) std::printf("note: %s\n", visibility.note->c_str());
  if (visibility.ambiguity) std::printf("note: %s\n", visibility.ambiguity->c_str());
  if (visibility.slurm) {
    std::printf("%s\n", slurm_line(*visibility.slurm).c_str());
    if (visibility.slurm->note) std::printf("note: %s\n", visibility.slurm->note->c_str());
  }
  // Inside a Slurm job a last column says which GPUs the job was granted.
  const bool in_slurm_job = visibility.slurm.has_value();
  std::printf("%-4s %-5s %-28s %21s %11s %11s %5s %5s %6s %-6s%s\n", "GPU", "LOAD", "NAME", "MEMORY USED / TOTAL",
              "FREE", "AVAILABLE", "UTIL", "TEMP", "POWER", "CUDA", in_slurm_job ? " SLURM" : "");
  for (const auto& gpu : snapshot.gpus) {
    const GpuVerdict& verdict = recommendation.verdicts[gpu.nvml_index];
    std::string cuda = "hidden";
    if (auto ordinal = visibility.cuda_ordinal_of(gpu.nvml_index)) cuda = visibility.ambiguity ? "?" : "cuda:" + std::to_string(*ordinal);
    std::string marker = load_marker(gpu, color);
    const int pad = 5 - int(load_marker(gpu, false).size());  // colour codes take no columns
    if (!gpu.healthy) {
      std::printf("%-4u %s%*s %-28.28s unhealthy: %s\n", gpu.nvml_index, marker.c_str(), pad, "", gpu.name.c_str(),
                  gpu.health_error.c_str());
      continue;
    }
    char memory[64] = "N/A";
    if (gpu.memory_total_bytes && gpu.memory_used_bytes) {
      std::snprintf(memory, sizeof memory, "%.2f / %.2f GiB", double(*gpu.memory_used_bytes) / double(kGiB),
                    double(*gpu.memory_total_bytes) / double(kGiB));
    }
    const char* granted = !in_slurm_job ? "" : visibility.is_candidate(gpu.nvml_index) ? " granted" : " -";
    std::printf("%-4u %s%*s %-28.28s %21s %11s %11s %5s %5s %6s %-6s%s\n", gpu.nvml_index, marker.c_str(), pad, "",
                gpu.name.c_str(), memory, gpu.memory_free_bytes ? format_gib(*gpu.memory_free_bytes).c_str() : "N/A",
                verdict.available_bytes ? format_gib(*verdict.available_bytes).c_str() : "N/A",
                percent(gpu.utilization_gpu_percent).c_str(),
                gpu.temperature_c ? (std::to_string(*gpu.temperature_c) + "C").c_str() : "N/A",
                gpu.power_mw ? (std::to_string(*gpu.power_mw / 1000) + "W").c_str() : "N/A", cuda.c_str(), granted);
    for (const auto& process : gpu.processes) {
      std::printf("       pid %-8d %-10s %11s  %s\n", int(process.pid), process.user.value_or("?").c_str(),
                  process.used_bytes ? format_gib(*process.used_bytes).c_str() : "N/A",
                  process.command.value_or("(not visible from here)").c_str());
    }
  }
  if (!leases.empty()) {
    std::printf("leases:\n");
    print_lease_table(leases, &snapshot);
  }
  if (recommendation.fits()) {
    const unsigned best = recommendation.chosen.front();
    const ChildGpuEnv env = child_gpu_env(snapshot, {best}, ExportFormat::index);
    std::string exports;
    for (const auto& [name, value] : env.set) {
      if (name == "CUDA_VISIBLE_DEVICES" || name == "CUDA_DEVICE_ORDER") exports += " " + name + "=" + value;
    }
    std::printf("recommended: GPU %u (%s available): export%s\n", best,
                format_gib(recommendation.verdicts[best].available_bytes.value_or(0)).c_str(), exports.c_str());
  } else {
    std::printf("recommended: none (%s)\n", recommendation.summary.c_str());
  }
}

void show_once(Context& context, const StatusOptions& options) {
  const Snapshot snapshot = value_or_throw(context.snapshot());
  const Visibility visibility = context.visibility(snapshot);
  std::vector<LeaseRecord> leases;
  const OutstandingReservations reserved = context.reservations(snapshot, &leases);
  const Decision recommendation = value_or_throw(select_gpus(Requirements{}, snapshot, visibility, reserved));
  if (options.json) {
    std::printf("%s\n", json_text(status_json(snapshot, visibility, recommendation, leases_by_gpu(leases, snapshot))).c_str());
  } else {
    print_table(context, snapshot, visibility, recommendation, leases);
  }
  std::fflush(stdout);
}

void run_status(Context& context, const StatusOptions& options) {
  if (!options.watch) {
    show_once(context, options);
    return;
  }
  auto interval = parse_duration(*options.watch);
  if (!interval || interval->count() < 100 || interval->count() > 86'400'000) {
    throw CommandError(make_error(Errc::bad_input, "invalid --watch " + quote_for_message(*options.watch) +
                                                       ": expected seconds between 0.1 and 86400"));
  }
  std::signal(SIGINT, on_stop_signal);
  std::signal(SIGTERM, on_stop_signal);
  while (g_stop == 0) {
    if (context.color_stdout() && !options.json) std::printf("\033[H\033[2J");
    show_once(context, options);
    poll(nullptr, 0, int(interval->count()));  // interrupted at once by the signal
  }
}

}  // namespace

void add_status(CLI::App& app, Context& context) {
  auto options = std::make_shared<StatusOptions>();
  CLI::App* command = app.add_subcommand("status", "Show every GPU, its processes and leases, and the GPU to use now");
  command->add_flag("--json", options->json, "Machine-readable output (stable format)");
  command->add_option("--watch", options->watch, "Refresh every SECONDS until interrupted");
  command->callback([&context, options] { context.action = [&context, options] { run_status(context, *options); }; });
}

}  // namespace gpuslot::cli
