// cmd_batch.cpp — `gpuslot batch FILE`: run a jobs file over the GPUs; `--status JOURNAL`.
//
// The scheduling lives in the jobs layer; this file reads the jobs file, prints what happens
// (a live line on a terminal, plain log lines otherwise) and the summary.
#include <limits.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <iostream>
#include <iterator>
#include <sstream>

#include "cli/commands.hpp"
#include "cli/report.hpp"
#include "gpuslot/jobs.hpp"
#include "gpuslot/units.hpp"

namespace gpuslot::cli {

namespace {

constexpr std::size_t kSummaryRows = 40;  // above this, the summary lists only jobs that did not succeed

struct BatchCliOptions {
  RequirementOptions requirements;
  std::string file;
  std::string journal;
  std::string status_journal;
  bool resume = false;
  std::string order;
  bool json = false;
  std::optional<unsigned> retries;
  std::vector<int> oom_exit_codes;
  unsigned max_running = 0;
  std::string export_format = "index";
  // --executor slurm
  std::string executor = "local";
  std::string partition, account;
  std::vector<std::string> sbatch_args;
  std::string poll_interval, gpu_wait;
};

std::string read_jobs_text(const std::string& file) {
  std::string text;
  if (file == "-") {
    text.assign(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
    return text;
  }
  std::ifstream stream(file, std::ios::binary);
  if (!stream) {
    throw CommandError(make_error(Errc::bad_input, "cannot read jobs file " + quote_for_message(file) + ": " + std::strerror(errno)));
  }
  text.assign(std::istreambuf_iterator<char>(stream), std::istreambuf_iterator<char>());
  return text;
}

std::uint64_t fnv1a(std::string_view text, std::uint64_t hash = 1469598103934665603ull) {
  for (unsigned char c : text) {
    hash ^= c;
    hash *= 1099511628211ull;
  }
  return hash;
}

std::string clock_time(double unix_seconds) {
  const std::time_t seconds = std::time_t(unix_seconds);
  std::tm local{};
  ::localtime_r(&seconds, &local);
  char text[16];
  std::strftime(text, sizeof text, "%H:%M:%S", &local);
  return text;
}

std::string duration_text(const JobStatus& job) {
  if (!job.started_at) return "";
  const double end = job.ended_at.value_or(std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count());
  const double seconds = std::max(0.0, end - *job.started_at);
  char text[32];
  if (seconds < 60) std::snprintf(text, sizeof text, "%.1fs", seconds);
  else std::snprintf(text, sizeof text, "%dm%02ds", int(seconds) / 60, int(seconds) % 60);
  return text;
}

std::string gpus_text(const JobStatus& job) {
  std::string text;
  for (unsigned index : job.gpu_indices) text += (text.empty() ? "" : ",") + std::to_string(index);
  if (!job.slurm_node.empty()) return job.slurm_node + ":" + (text.empty() ? "?" : text);  // Slurm: node:GPUs
  return text.empty() ? "-" : text;
}

std::string exit_text(const JobStatus& job) {
  if (job.signal) return "sig " + std::to_string(*job.signal);
  if (job.exit_code) return std::to_string(*job.exit_code);
  return "-";
}

std::string one_line(std::string text) {
  for (char& c : text) {
    if (c == '\n' || c == '\r' || c == '\t') c = ' ';
  }
  return text;
}

nlohmann::json job_json(const JobStatus& job, const std::string& logs_dir) {
  nlohmann::json object{{"name", job.spec.name},
                        {"state", job_state_name(job.state)},
                        {"command", job.spec.display_command()},
                        {"gpus", job.gpu_indices},
                        {"gpu_uuids", job.gpu_uuids},
                        {"attempts", job.attempts},
                        {"oom_failures", job.oom_failures},
                        {"exit_code", nullptr},
                        {"signal", nullptr},
                        {"started_at", nullptr},
                        {"ended_at", nullptr},
                        {"reason", job.reason},
                        {"last_output", job.tail},
                        {"slurm_job_id", nullptr},
                        {"slurm_node", nullptr}};
  if (!job.slurm_job_id.empty()) object["slurm_job_id"] = job.slurm_job_id;
  if (!job.slurm_node.empty()) object["slurm_node"] = job.slurm_node;
  if (job.exit_code) object["exit_code"] = *job.exit_code;
  if (job.signal) object["signal"] = *job.signal;
  if (job.started_at) object["started_at"] = *job.started_at;
  if (job.ended_at) object["ended_at"] = *job.ended_at;
  object["stdout"] = nullptr;
  object["stderr"] = nullptr;
  if (job.attempts > 0) {
    // A log that stayed empty is not kept (its inode is the next attempt's): null then.
    const std::string base = logs_dir + "/" + job.spec.name + "." + std::to_string(job.attempts);
    for (const char* stream : {"stdout", "stderr"}) {
      const std::string path = base + (stream[3] == 'o' ? ".out" : ".err");
      if (::access(path.c_str(), F_OK) == 0) object[stream] = path;
    }
  }
  return object;
}

void print_table(const std::vector<JobStatus>& jobs, bool only_unsuccessful) {
  // A batch sent to Slurm shows each job's Slurm job id; its GPU column is NODE:GPUS.
  const bool slurm = std::any_of(jobs.begin(), jobs.end(), [](const JobStatus& job) { return !job.slurm_job_id.empty(); });
  const int gpu_width = slurm ? 12 : 5;
  std::printf("%-24s %-9s %s%-*s %8s %6s %8s  %s\n", "JOB", "STATE", slurm ? "SLURM JOB  " : "", gpu_width, "GPU", "ATTEMPTS",
              "EXIT", "TIME", "REASON");
  for (const auto& job : jobs) {
    if (only_unsuccessful && job.state == JobState::succeeded) continue;
    const std::string slurm_id = slurm ? (job.slurm_job_id.empty() ? std::string("-") : job.slurm_job_id) : std::string();
    std::printf("%-24s %-9s %s%s%-*s %8u %6s %8s  %s\n", job.spec.name.c_str(), job_state_name(job.state),
                slurm ? (slurm_id + std::string(slurm_id.size() < 10 ? 10 - slurm_id.size() : 0, ' ')).c_str() : "",
                slurm ? " " : "", gpu_width, gpus_text(job).c_str(), job.attempts, exit_text(job).c_str(),
                duration_text(job).c_str(), one_line(job.reason).c_str());
    if (job.state == JobState::failed && !job.tail.empty()) {
      std::istringstream lines(job.tail);
      for (std::string line; std::getline(lines, line);) std::printf("    | %s\n", line.c_str());
    }
  }
}

// Prints the run as it goes: a live line on a terminal, one plain line per transition otherwise.
class Printer final : public BatchObserver {
 public:
  Printer(bool tty, bool slurm) : tty_(tty), slurm_(slurm) {}

  void on_event(const BatchEvent& event) override {
    const JobStatus& job = *event.job;
    std::string line;
    switch (event.kind) {
      case BatchEvent::Kind::started:
        if (tty_) return;
        line = "started " + job.spec.name + " " +
               (job.slurm_job_id.empty() ? "on GPU " + gpus_text(job) : event.detail) + " (attempt " + std::to_string(job.attempts) + ")";
        break;
      case BatchEvent::Kind::submitted:
        if (tty_) return;
        line = "submitted " + job.spec.name + " " + event.detail + " (attempt " + std::to_string(job.attempts) + ")";
        break;
      case BatchEvent::Kind::succeeded:
        if (tty_) return;
        line = "succeeded " + job.spec.name + " in " + duration_text(job);
        break;
      case BatchEvent::Kind::adopted:
        line = "adopted " + job.spec.name + " (" + (slurm_ ? event.detail : "still running on GPU " + gpus_text(job)) + ")";
        break;
      case BatchEvent::Kind::failed:
      case BatchEvent::Kind::never_fits:
      case BatchEvent::Kind::dependency_failed: line = "FAILED " + job.spec.name + ": " + event.detail; break;
      case BatchEvent::Kind::oom_requeued:
      case BatchEvent::Kind::failure_requeued:
      case BatchEvent::Kind::lost_requeued:
      case BatchEvent::Kind::interrupted: line = "requeued " + job.spec.name + ": " + event.detail; break;
    }
    clear_live();
    std::fprintf(stderr, "[%s] %s\n", clock_time(now()).c_str(), one_line(line).c_str());
    if (tty_) draw(last_);
  }

  void on_progress(const BatchProgress& progress) override {
    last_ = progress;
    if (!tty_) return;
    const double t = now();
    if (t - drawn_at_ < 0.1 && progress.running > 0) return;
    drawn_at_ = t;
    draw(progress);
  }

  void finish() { clear_live(); }

 private:
  static double now() { return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count(); }

  void clear_live() {
    if (tty_ && live_) std::fputs("\r\033[K", stderr);
    live_ = false;
  }

  void draw(const BatchProgress& progress) {
    if (!tty_) return;
    std::string line = "batch: " + std::to_string(progress.succeeded + progress.failed) + "/" + std::to_string(progress.total) +
                       " done, " + std::to_string(progress.running) + " running, " + std::to_string(progress.waiting) +
                       " waiting, " + std::to_string(progress.failed) + " failed";
    for (const auto& gpu : progress.gpus) {
      if (gpu.jobs == 0) continue;
      line += " | GPU" + std::to_string(gpu.nvml_index) + " " + std::to_string(gpu.jobs) + "×" + format_gib(gpu.reserved_bytes);
    }
    if (progress.running == 0 && !progress.waiting_reason.empty()) line += " | " + progress.waiting_reason;
    std::fprintf(stderr, "\r\033[K%s", one_line(line).substr(0, 200).c_str());
    std::fflush(stderr);
    live_ = true;
  }

  bool tty_;
  bool slurm_;
  bool live_ = false;
  double drawn_at_ = 0;
  BatchProgress last_;
};

void run_status(const BatchCliOptions& options) {
  const auto jobs = value_or_throw(read_journal(options.status_journal));
  const std::string logs_dir = logs_directory_of(options.status_journal);
  if (options.json) {
    nlohmann::json list = nlohmann::json::array();
    for (const auto& job : jobs) list.push_back(job_json(job, logs_dir));
    std::printf("%s\n", json_text(nlohmann::json{{"journal", options.status_journal}, {"logs", logs_dir}, {"jobs", list}}).c_str());
    return;
  }
  std::size_t counts[4] = {};
  for (const auto& job : jobs) ++counts[int(job.state)];
  print_table(jobs, false);
  std::printf("%zu jobs: %zu succeeded, %zu failed, %zu running, %zu queued (logs: %s)\n", jobs.size(), counts[2], counts[3],
              counts[1], counts[0], logs_dir.c_str());
}

// True for --executor slurm. The Slurm options need it, and local placement options mean
// nothing to it: Slurm chooses the node and the GPUs.
bool check_executor(const BatchCliOptions& options) {
  if (options.executor != "local" && options.executor != "slurm") {
    throw CommandError(make_error(Errc::bad_input, "invalid --executor " + quote_for_message(options.executor) + ": expected local or slurm"));
  }
  const bool slurm = options.executor == "slurm";
  const std::pair<const char*, bool> slurm_only[] = {
      {"--partition", !options.partition.empty()}, {"--account", !options.account.empty()},
      {"--sbatch-arg", !options.sbatch_args.empty()}, {"--poll-interval", !options.poll_interval.empty()},
      {"--gpu-wait", !options.gpu_wait.empty()}};
  if (!options.order.empty() && options.order != "largest-first" && options.order != "file") {
    throw CommandError(make_error(Errc::bad_input, "invalid --order " + quote_for_message(options.order) + ": expected largest-first or file"));
  }
  for (const auto& [flag, given] : slurm_only) {
    if (given && !slurm) throw CommandError(make_error(Errc::bad_input, std::string(flag) + " needs --executor slurm"));
  }
  if (slurm && !options.requirements.exclude.empty()) {
    throw CommandError(make_error(Errc::bad_input, "--exclude cannot be used with --executor slurm: Slurm chooses the GPUs "
                                                   "(to avoid nodes: --sbatch-arg=--exclude=NODES)"));
  }
  if (slurm && !options.order.empty()) {
    throw CommandError(make_error(Errc::bad_input, "--order cannot be used with --executor slurm: Slurm orders and places the jobs "
                                                   "(every job is submitted at once)"));
  }
  if (slurm && options.requirements.strategy != "pack") {
    throw CommandError(make_error(Errc::bad_input, "--strategy cannot be used with --executor slurm: Slurm chooses the GPUs"));
  }
  return slurm;
}

SlurmOptions slurm_options(const BatchCliOptions& options) {
  SlurmOptions slurm;
  slurm.partition = options.partition;
  slurm.account = options.account;
  slurm.sbatch_args = options.sbatch_args;
  auto duration = [](const std::string& text, const char* flag, std::chrono::milliseconds fallback) {
    if (text.empty()) return fallback;
    auto parsed = parse_duration(text);
    if (!parsed) throw CommandError(make_error(Errc::bad_input, std::string(flag) + ": " + parsed.error().message));
    return *parsed;
  };
  slurm.poll_interval = std::max(duration(options.poll_interval, "--poll-interval", slurm.poll_interval), std::chrono::milliseconds(100));
  slurm.gpu_wait = duration(options.gpu_wait, "--gpu-wait", slurm.gpu_wait);
  // The jobs run this very binary on the nodes (which must see it at the same path, as they see
  // the journal's logs folder).
  char path[PATH_MAX];
  const ssize_t length = ::readlink("/proc/self/exe", path, sizeof path - 1);
  if (length <= 0) throw CommandError(make_error(Errc::state, std::string("cannot find the gpuslot binary: ") + std::strerror(errno)));
  slurm.gpuslot_path.assign(path, std::size_t(length));
  return slurm;
}

void run_batch_command(Context& context, const BatchCliOptions& options) {
  if (!options.status_journal.empty()) {
    if (!options.file.empty()) {
      throw CommandError(make_error(Errc::bad_input, "batch --status JOURNAL takes no jobs file (got " + quote_for_message(options.file) + ")"));
    }
    run_status(options);
    return;
  }
  if (options.file.empty()) {
    throw CommandError(make_error(Errc::bad_input, "batch needs a jobs file (FILE, or - for stdin), or --status JOURNAL"));
  }
  Requirements requirements = options.requirements.to_requirements();
  if (!options.requirements.device.empty()) {
    throw CommandError(make_error(Errc::bad_input, "batch does not take --device; use --exclude or CUDA_VISIBLE_DEVICES to limit the GPUs"));
  }
  if (options.export_format != "index" && options.export_format != "uuid") {
    throw CommandError(make_error(Errc::bad_input, "invalid --export '" + options.export_format + "': expected index or uuid"));
  }
  const bool slurm = check_executor(options);
  JobDefaults defaults;
  defaults.memory_bytes = options.requirements.mem ? requirements.memory_bytes
                                                   : value_or_throw(parse_size_bytes(default_reservation()));
  defaults.gpus = requirements.gpu_count;
  if (options.retries) defaults.oom_retries = *options.retries;

  auto parsed = parse_jobs(read_jobs_text(options.file), defaults);
  if (!parsed) {
    Error error = parsed.error();
    error.message = (options.file == "-" ? std::string("stdin") : options.file) + ", " + error.message;
    throw CommandError(error);
  }
  std::uint64_t hash = 1469598103934665603ull;
  for (const auto& job : *parsed) hash = fnv1a(job_to_json(job) + "\n", hash);

  BatchOptions batch;
  batch.journal_path = !options.journal.empty() ? options.journal
                       : options.file == "-"    ? std::string("gpuslot-batch.db")
                                                : options.file + ".gpuslot.db";
  batch.resume = options.resume;
  batch.jobs_source = options.file;
  batch.jobs_hash = hash;
  batch.strategy = requirements.strategy;
  batch.exclude = requirements.exclude;
  batch.export_format = options.export_format == "uuid" ? ExportFormat::uuid : ExportFormat::index;
  batch.oom_exit_codes = options.oom_exit_codes;
  batch.max_running = options.max_running;
  if (!options.order.empty()) batch.order = options.order == "file" ? JobOrder::file : JobOrder::largest_first;

  Printer printer(::isatty(STDERR_FILENO) == 1 && !options.json, slurm);
  std::fprintf(stderr, "batch: %zu jobs from %s; journal %s%s\n", parsed->size(),
               options.file == "-" ? "stdin" : options.file.c_str(), batch.journal_path.c_str(), slurm ? "; executor slurm" : "");
  Result<BatchResult> result = make_error(Errc::internal, "batch did not run");
  if (slurm) {
    // The submitting host needs neither GPUs nor NVML: Slurm places the jobs.
    batch.executor = BatchExecutor::slurm;
    batch.slurm = slurm_options(options);
    result = run_slurm_batch(std::move(*parsed), batch, printer);
  } else {
    Ledger* ledger = value_or_throw(context.ledger());
    value_or_throw(context.nvml());  // a batch needs GPUs: fail now, not per job
    SnapshotSource snapshots = [&context]() { return context.snapshot(); };
    VisibilityOf visibility = [&context](const Snapshot& snapshot) {
      Visibility seen = context.visibility(snapshot);
      if (seen.restricted && seen.ambiguity) throw CommandError(make_error(Errc::bad_input, *seen.ambiguity));
      return seen;
    };
    result = run_batch(std::move(*parsed), batch, *ledger, snapshots, visibility, printer);
  }
  printer.finish();
  if (!result) throw CommandError(result.error());

  const std::string logs_dir = logs_directory_of(batch.journal_path);
  std::size_t succeeded = 0, failed = 0, queued = 0;
  for (const auto& job : result->jobs) {
    succeeded += job.state == JobState::succeeded;
    failed += job.state == JobState::failed;
    queued += job.state == JobState::queued || job.state == JobState::running;
  }
  if (options.json) {
    nlohmann::json list = nlohmann::json::array();
    for (const auto& job : result->jobs) list.push_back(job_json(job, logs_dir));
    std::printf("%s\n", json_text(nlohmann::json{{"journal", batch.journal_path},
                                                 {"logs", logs_dir},
                                                 {"interrupted", result->interrupted},
                                                 {"succeeded", succeeded},
                                                 {"failed", failed},
                                                 {"not_run", queued},
                                                 {"jobs", list}})
                             .c_str());
  } else {
    const bool brief = result->jobs.size() > kSummaryRows;
    if (!brief || failed + queued > 0) print_table(result->jobs, brief);
    if (brief && succeeded > 0) std::printf("(%zu succeeded jobs not listed: gpuslot batch --status %s)\n", succeeded, batch.journal_path.c_str());
    std::string interrupted;
    if (result->interrupted) {
      interrupted = ", interrupted (gpuslot batch " + options.file + (slurm ? " --executor slurm" : "") + " --resume continues)";
      std::string in_slurm;  // what was submitted stays in the cluster's hands
      for (const auto& job : result->jobs) {
        if (job.state == JobState::running && !job.slurm_job_id.empty()) in_slurm += " " + job.slurm_job_id;
      }
      if (!in_slurm.empty()) interrupted += "; submitted jobs stay in Slurm (to stop them: scancel" + in_slurm + ")";
    }
    std::printf("batch: %zu jobs, %zu succeeded, %zu failed%s; journal %s, logs %s\n", result->jobs.size(), succeeded, failed,
                interrupted.c_str(), batch.journal_path.c_str(), logs_dir.c_str());
  }
  context.exit_code = result->interrupted ? 130 : result->all_succeeded() ? 0 : 1;
}

}  // namespace

void add_batch(CLI::App& app, Context& context) {
  auto options = std::make_shared<BatchCliOptions>();
  options->requirements.strategy = "pack";
  CLI::App* command = app.add_subcommand("batch", "Run a jobs file over the GPUs: placed by memory, out-of-memory retried, journaled");
  command->add_option("file", options->file, "Jobs file: one shell command per line, or JSON Lines; - for stdin");
  options->requirements.add_to(*command);
  command->add_flag("--resume", options->resume, "Continue the batch its journal describes (after a crash or Ctrl-C); a start stopped before it wrote its journal begins again");
  command->add_option("--journal", options->journal, "Journal path (default: FILE.gpuslot.db; logs beside it in FILE.gpuslot.logs)");
  command->add_option("--retries", options->retries, "Out-of-memory retries per job (default 3; a job's own \"retries\" wins)");
  command->add_option("--oom-exit-code", options->oom_exit_codes, "An exit code that means out of GPU memory (repeatable)");
  command->add_option("--order", options->order,
                      "Which queued jobs get free room first: largest-first (default: more GPUs, then more memory; "
                      "packs mixed sizes best) or file");
  command->add_option("--max-running", options->max_running, "At most N jobs at once (default: as many as fit)");
  command->add_option("--export", options->export_format, "How children see their GPUs: index (with PCI_BUS_ID order) or uuid");
  command->add_option("--status", options->status_journal, "Show every job of JOURNAL (read-only; safe while it runs)");
  command->add_option("--executor", options->executor, "Where jobs run: local (this host's GPUs, default) or slurm (one sbatch job each)");
  command->add_option("--partition", options->partition, "Slurm partition (--executor slurm)");
  command->add_option("--account", options->account, "Slurm account (--executor slurm)");
  command->add_option("--sbatch-arg", options->sbatch_args, "One more sbatch option, e.g. --sbatch-arg=--time=2:00:00 (repeatable; --executor slurm)");
  command->add_option("--poll-interval", options->poll_interval, "Between squeue calls (default 10s; --executor slurm)");
  command->add_option("--gpu-wait", options->gpu_wait, "How long a started Slurm job waits for room on its GPUs before it counts as out of memory (default 60s)");
  command->add_flag("--json", options->json, "Machine-readable summary on stdout");
  command->callback([&context, options] { context.action = [&context, options] { run_batch_command(context, *options); }; });
}

}  // namespace gpuslot::cli
