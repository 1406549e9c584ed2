// cmd_run.cpp — `gpuslot run [requirements] [--wait [TIMEOUT]] -- CMD…`: take a lease, start CMD
// on the chosen GPUs, watch what it really uses, forward signals, return its status.
//
// Why it is built this way:
// - The lease is taken before the child exists and released after it is reaped, so the room is
//   promised for the whole window in which a model is still loading (the seed race).
// - gpuslot never changes its own environment; the child's is built from a copy (threads share
//   the environment, and CUDA reads it once at start).
// - Signals: a terminal's Ctrl-C already reaches the child (same process group), so only signals
//   *sent* to gpuslot (kill, a scheduler) are forwarded — a job is never interrupted twice. They
//   go to the child at once and then, as a terminal's would, to every process below it: a job
//   started through a script (`gpuslot run -- ./train.sh`) is the script's child, and the script
//   alone would die and leave it running. gpuslot is the child subreaper of its job, so a process
//   whose parent died is still found below gpuslot.
// - --enforce stops the whole job the same way: SIGTERM to every process of it, SIGKILL to what is
//   left kStopGrace later or when the child has exited.
// - The child is waited for through a pidfd, so its exit is seen at once while gpuslot still
//   wakes every second to compare its GPU memory with the reservation.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <set>

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
// Signals forwarded to the child that are still to reach the processes below it (a bit each),
// and a pipe that wakes the waiting loop for them: /proc cannot be walked in a signal handler.
std::atomic<int> g_for_the_tree{0};  // lock-free: set from the handler, taken whole by the loop
static_assert(std::atomic<int>::is_always_lock_free);
int g_wake[2] = {-1, -1};

// What the job's processes get a signal for: the ones that end it. SIGUSR1/SIGUSR2 mean what the
// child makes of them, so they go to the child alone.
bool ends_the_job(int signal_number) {
  return signal_number == SIGINT || signal_number == SIGTERM || signal_number == SIGHUP || signal_number == SIGQUIT;
}

void forward_signal(int signal_number, siginfo_t* info, void*) {
  // SI_USER/SI_QUEUE/SI_TKILL (<= 0): sent by a process; SI_KERNEL: the terminal, which already
  // delivered it to the child in our process group.
  if (g_child <= 0 || info == nullptr || info->si_code > 0) return;
  const int saved = errno;
  ::kill(pid_t(g_child), signal_number);
  if (ends_the_job(signal_number)) {
    g_for_the_tree.fetch_or(1 << signal_number);
    const char wake = 's';
    [[maybe_unused]] const ssize_t ignored = ::write(g_wake[1], &wake, 1);
  }
  errno = saved;
}

constexpr int kForwarded[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2};

// How long a job stopped by --enforce has between SIGTERM and SIGKILL.
constexpr std::chrono::seconds kStopGrace{5};

// Sends `signal_number` to every process below the child (twice over, for those forked while the
// first pass was signalling), and to the child itself with `and_child`.
// Each process gets the signal once: a second SIGINT or SIGTERM means "force quit" to many.
void signal_job(pid_t child, int signal_number, bool and_child) {
  if (and_child) ::kill(child, signal_number);
  std::set<pid_t> signalled{child};
  for (int pass = 0; pass < 2; ++pass) {
    for (pid_t pid : descendants_of(::getpid())) {
      if (signalled.insert(pid).second) ::kill(pid, signal_number);
    }
  }
}

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
  using Clock = std::chrono::steady_clock;
  const int pidfd = int(::syscall(SYS_pidfd_open, child, 0));
  bool warned = false;
  std::optional<Clock::time_point> kill_at;  // set once --enforce has sent SIGTERM
  const std::uint64_t allowed = record.reserved_bytes * record.gpu_uuids.size();
  // Signals forwarded to the child are due to the rest of the job too, also when the child
  // has already died of one (a script dies at once; its children are ours now).
  auto forward_to_the_tree = [&] {
    if (const int pending = g_for_the_tree.exchange(0); pending != 0) {
      for (int signal_number : kForwarded) {
        if ((pending & (1 << signal_number)) != 0) signal_job(child, signal_number, false);
      }
    }
  };
  for (;;) {
    // Reap the child, and any orphan of the job that was handed to us (child subreaper).
    int status = 0;
    pid_t done = 0;
    while ((done = ::waitpid(-1, &status, WNOHANG)) > 0 && done != child) {
    }
    if (done == child) {
      g_child = 0;  // reaped: its pid may be anyone's now
      if (pidfd >= 0) ::close(pidfd);
      forward_to_the_tree();
      if (kill_at) signal_job(child, SIGKILL, false);  // what is left of a job being stopped
      if (WIFEXITED(status)) return WEXITSTATUS(status);
      if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
      return 1;
    }
    forward_to_the_tree();
    if (kill_at && Clock::now() >= *kill_at) {
      signal_job(child, SIGKILL, true);
      kill_at = Clock::time_point::max();
    }
    pollfd descriptors[2] = {{pidfd, POLLIN, 0}, {g_wake[0], POLLIN, 0}};
    // Readable pidfd: the child exited; reap it (and release the lease) before anything else.
    const int ready = ::poll(descriptors, 2, pidfd >= 0 ? 1000 : 100);
    if (ready > 0 && (descriptors[1].revents & POLLIN) != 0) {
      char drained[64];
      while (::read(g_wake[0], drained, sizeof drained) > 0) {
      }
    }
    if (ready != 0 || kill_at) continue;
    const auto used = child_usage(context, record);
    if (!used || *used <= allowed) continue;
    if (enforce) {
      print_error("stopping '" + record.command + "': it uses " + format_gib(*used) + " of GPU memory, above its " +
                  format_gib(allowed) + " reservation (--enforce); SIGKILL in " +
                  std::to_string(kStopGrace.count()) + " s if it has not exited");
      signal_job(child, SIGTERM, true);
      kill_at = Clock::now() + kStopGrace;
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
  if (::pipe2(g_wake, O_CLOEXEC | O_NONBLOCK) != 0) {
    throw CommandError(make_error(Errc::state, std::string("cannot start the command: ") + std::strerror(errno)));
  }
  ::prctl(PR_SET_CHILD_SUBREAPER, 1);  // the job's orphans stay below us (see the top of this file)
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
      ->expected(0, 1);  // `--wait=` (an empty TIMEOUT) reaches parse_duration, which says what it accepts
  command->add_option("--export", options->export_format, "How the child sees its GPUs: index (default, with PCI_BUS_ID order) or uuid");
  command->add_flag("--enforce", options->enforce, "Stop the command if it uses more GPU memory than reserved");
  // The command itself never reaches the parser: app.cpp splits it off (see split_command).
  command->callback([&context, options] {
    options->command = context.command;
    context.action = [&context, options] { run_run(context, *options); };
  });
}

}  // namespace gpuslot::cli
