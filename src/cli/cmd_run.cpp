// cmd_run.cpp — `gpuslot run [requirements] [--wait [TIMEOUT]] -- CMD…`: take a lease, start CMD
// on the chosen GPUs, watch what it really uses, forward signals, return its status.
//
// Why it is built this way:
// - The lease is taken before the child exists and released after it is reaped, so the room is
//   promised for the whole window in which a model is still loading (the seed race).
// - gpuslot never changes its own environment; the child's is built from a copy (threads share
//   the environment, and CUDA reads it once at start).
// - Signals: a terminal's Ctrl-C already reaches the child (same process group), so only signals
//   *sent* to gpuslot (kill, a scheduler) are forwarded — a job is never interrupted twice.
// - The child is waited for through a pidfd, so its exit is seen at once while gpuslot still
//   wakes every second to compare its GPU memory with the reservation.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "cli/commands.hpp"
#include "gpuslot/units.hpp"

extern char** environ;

namespace gpuslot::cli {

namespace {

struct RunOptions {
  RequirementOptions requirements;
  std::optional<std::string> wait;  // present: wait; value: timeout ("" = forever)
  std::string export_format = "index";
  bool enforce = false;
  std::vector<std::string> command;
};

volatile sig_atomic_t g_child = 0;

void forward_signal(int signal_number, siginfo_t* info, void*) {
  // SI_USER/SI_QUEUE/SI_TKILL (<= 0): sent by a process; SI_KERNEL: the terminal, which already
  // delivered it to the child in our process group.
  if (g_child > 0 && info != nullptr && info->si_code <= 0) ::kill(pid_t(g_child), signal_number);
}

constexpr int kForwarded[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2};

sigset_t forwarded_set() {
  sigset_t set;
  sigemptyset(&set);
  for (int signal_number : kForwarded) sigaddset(&set, signal_number);
  return set;
}

void install_forwarding() {
  struct sigaction action {};
  action.sa_sigaction = forward_signal;
  action.sa_flags = SA_SIGINFO | SA_RESTART;
  sigemptyset(&action.sa_mask);
  for (int signal_number : kForwarded) sigaction(signal_number, &action, nullptr);
}

std::string command_text(const std::vector<std::string>& command) {
  std::string text;
  for (const auto& word : command) text += (text.empty() ? "" : " ") + word;
  return text.size() > 200 ? text.substr(0, 197) + "..." : text;
}

// Memory the child's process tree uses on the leased GPUs, per the lease accounting.
std::optional<std::uint64_t> child_usage(Context& context, const LeaseRecord& record) {
  auto snapshot = context.snapshot();
  if (!snapshot) return std::nullopt;
  std::vector<LeaseRecord> mine{record};
  Ledger::outstanding(mine, *snapshot);
  return mine.front().in_use_bytes;
}

int wait_for_child(Context& context, pid_t child, const LeaseRecord& record, bool enforce) {
  const int pidfd = int(::syscall(SYS_pidfd_open, child, 0));
  bool warned = false;
  bool stopping = false;
  const std::uint64_t allowed = record.reserved_bytes * record.gpu_uuids.size();
  for (;;) {
    int status = 0;
    const pid_t done = ::waitpid(child, &status, WNOHANG);
    if (done == child) {
      if (pidfd >= 0) ::close(pidfd);
      if (WIFEXITED(status)) return WEXITSTATUS(status);
      if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
      return 1;
    }
    if (pidfd >= 0) {
      pollfd descriptor{pidfd, POLLIN, 0};
      // Readable means the child exited: reap it (and release the lease) before anything else.
      if (::poll(&descriptor, 1, 1000) > 0 && (descriptor.revents & POLLIN) != 0) continue;
    } else {
      ::poll(nullptr, 0, 100);
    }
    if (record.reserved_bytes == 0 || stopping) continue;
    const auto used = child_usage(context, record);
    if (!used || *used <= allowed) continue;
    if (enforce) {
      print_error("stopping '" + record.command + "': it uses " + format_gib(*used) + " of GPU memory, above its " +
                  format_gib(allowed) + " reservation (--enforce)");
      ::kill(child, SIGTERM);
      stopping = true;
    } else if (!warned) {
      print_warning(context, "'" + record.command + "' uses " + format_gib(*used) + " of GPU memory, above its " +
                                 format_gib(allowed) + " reservation; other launches may run out of memory (reserve more with --mem)");
      warned = true;
    }
  }
}

void run_run(Context& context, RunOptions& options) {
  if (options.command.empty()) {
    throw CommandError(make_error(Errc::bad_input, "run needs a command: gpuslot run [options] -- CMD [ARGS...]"));
  }
  if (options.export_format != "index" && options.export_format != "uuid") {
    throw CommandError(make_error(Errc::bad_input, "invalid --export '" + options.export_format + "': expected index or uuid"));
  }
  if (!options.requirements.mem) options.requirements.mem = default_reservation();
  ReserveRequest request;
  request.requirements = options.requirements.to_requirements();
  request.command = command_text(options.command);
  std::optional<std::chrono::milliseconds> timeout;
  if (options.wait && *options.wait != "forever") timeout = value_or_throw(parse_duration(*options.wait));

  Ledger* ledger = value_or_throw(context.ledger());
  auto snapshot_source = [&context] { return context.snapshot(); };
  auto visibility_of = [&](const Snapshot& s) { return restrict_to_device(options.requirements.device, s, context.visibility(s)); };
  std::vector<std::string> warnings;
  Reservation reservation =
      options.wait ? value_or_throw(ledger->reserve_waiting(
                         request, snapshot_source, visibility_of, timeout,
                         [](const std::string& reason) { std::fprintf(stderr, "gpuslot: waiting: %s\n", reason.c_str()); }, &warnings))
                   : value_or_throw(ledger->reserve(request, snapshot_source, visibility_of, &warnings));
  for (const auto& warning : warnings) print_warning(context, warning);
  for (const auto& warning : reservation.decision.warnings) print_warning(context, warning);
  if (!reservation.lease) {
    std::string hint = reservation.decision.impossible ? "" : " (add --wait to wait for room)";
    throw CommandError(make_error(Errc::nothing_fits, reservation.decision.summary + hint));
  }

  const LeaseRecord record = reservation.lease->record();
  const ChildGpuEnv gpu_env = child_gpu_env(reservation.snapshot, reservation.decision.chosen,
                                            options.export_format == "uuid" ? ExportFormat::uuid : ExportFormat::index);
  auto settings = gpu_env.set;
  settings.emplace_back("GPUSLOT_LEASE_ID", record.id);
  std::vector<std::string> environment = child_environment(environ, settings);
  std::vector<char*> envp;
  for (auto& entry : environment) envp.push_back(entry.data());
  envp.push_back(nullptr);
  std::vector<char*> argv;
  for (auto& word : options.command) argv.push_back(word.data());
  argv.push_back(nullptr);

  std::fflush(nullptr);
  // Signals stay blocked from before the fork until the child's pid is known, so a SIGTERM sent
  // at launch is delivered (and forwarded) afterwards instead of being lost.
  const sigset_t forwarded = forwarded_set();
  sigset_t previous;
  sigprocmask(SIG_BLOCK, &forwarded, &previous);
  install_forwarding();
  const pid_t child = ::fork();
  if (child < 0) {
    sigprocmask(SIG_SETMASK, &previous, nullptr);
    throw CommandError(make_error(Errc::state, std::string("cannot start the command: ") + std::strerror(errno)));
  }
  if (child == 0) {
    struct sigaction defaults {};
    defaults.sa_handler = SIG_DFL;
    for (int signal_number : kForwarded) sigaction(signal_number, &defaults, nullptr);
    sigprocmask(SIG_SETMASK, &previous, nullptr);
    ::execvpe(argv[0], argv.data(), envp.data());
    const int error = errno;
    std::fprintf(stderr, "gpuslot: cannot run '%s': %s\n", argv[0], std::strerror(error));
    ::_exit(error == ENOENT ? 127 : 126);  // the shell's conventions
  }
  g_child = child;
  sigprocmask(SIG_SETMASK, &previous, nullptr);
  context.exit_code = wait_for_child(context, child, record, options.enforce);
  g_child = 0;
  reservation.lease->release();
}

}  // namespace

void add_run(CLI::App& app, Context& context) {
  auto options = std::make_shared<RunOptions>();
  CLI::App* command = app.add_subcommand("run", "Reserve GPU room, run a command there, release when it exits");
  options->requirements.add_to(*command);
  command->add_option("--wait", options->wait, "Wait for room (optionally at most TIMEOUT, e.g. 10m; exit 124 after)")
      ->expected(1);
  command->add_option("--export", options->export_format, "How the child sees its GPUs: index (default, with PCI_BUS_ID order) or uuid");
  command->add_flag("--enforce", options->enforce, "Stop the command if it uses more GPU memory than reserved");
  // The command itself never reaches the parser: app.cpp splits it off (see split_command).
  command->callback([&context, options] {
    options->command = context.command;
    context.action = [&context, options] { run_run(context, *options); };
  });
}

}  // namespace gpuslot::cli
