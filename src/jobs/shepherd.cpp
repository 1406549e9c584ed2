// shepherd.cpp — one attempt of one job, from fork to status file.
#include "jobs/shepherd.hpp"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

namespace gpuslot::jobs_internal {

namespace {

constexpr int kJobSignals[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGPIPE, SIGCHLD, SIGUSR1, SIGUSR2};

void write_all(int fd, const std::string& text) {
  std::size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;
    done += std::size_t(n);
  }
}

// Status file: one line, "exit N", "signal N" or "error N MESSAGE". Written to a temp name and
// renamed, so it is either absent or complete.
void write_status(const std::string& path, const std::string& line) {
  const std::string temp = path + ".tmp";
  const int fd = ::open(temp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return;
  write_all(fd, line + "\n");
  ::close(fd);
  ::rename(temp.c_str(), path.c_str());
}

[[noreturn]] void run_shepherd(const JobSpec& job, const std::vector<std::string>& environment, HeldLease& lease,
                               const AttemptFiles& files, int lock_fd) {
  // The job gets the signals the scheduler forwards; the shepherd must outlive it to record how
  // it ended, so it ignores them itself.
  for (int signal_number : {SIGINT, SIGTERM, SIGHUP, SIGQUIT}) ::signal(signal_number, SIG_IGN);
  ::signal(SIGCHLD, SIG_DFL);
  sigset_t none;
  sigemptyset(&none);
  ::sigprocmask(SIG_SETMASK, &none, nullptr);  // the scheduler blocks signals for its signalfd
  ::setpgid(0, 0);
  write_all(lock_fd, std::to_string(::getpid()) + "\n");

  if (auto moved = lease.reassign(::getpid()); !moved) {
    write_status(files.status, "error 70 " + moved.error().message);
    lease.release();
    ::_exit(0);
  }

  std::vector<char*> envp;
  for (const auto& entry : environment) envp.push_back(const_cast<char*>(entry.c_str()));
  envp.push_back(nullptr);
  std::vector<std::string> words = job.argv.empty() ? std::vector<std::string>{"/bin/sh", "-c", job.shell} : job.argv;
  std::vector<char*> argv;
  for (auto& word : words) argv.push_back(word.data());
  argv.push_back(nullptr);

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, 1, files.out.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 0644);
  posix_spawn_file_actions_addopen(&actions, 2, files.err.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 0644);
  if (!job.cwd.empty()) posix_spawn_file_actions_addchdir_np(&actions, job.cwd.c_str());
  posix_spawnattr_t attributes;
  posix_spawnattr_init(&attributes);
  sigset_t defaults;
  sigemptyset(&defaults);
  for (int signal_number : kJobSignals) sigaddset(&defaults, signal_number);
  sigset_t empty;
  sigemptyset(&empty);
  posix_spawnattr_setsigdefault(&attributes, &defaults);
  posix_spawnattr_setsigmask(&attributes, &empty);
  posix_spawnattr_setflags(&attributes, POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK);

  pid_t child = 0;
  const int rc = job.argv.empty() ? ::posix_spawn(&child, argv[0], &actions, &attributes, argv.data(), envp.data())
                                  : ::posix_spawnp(&child, argv[0], &actions, &attributes, argv.data(), envp.data());
  if (rc != 0) {
    const int code = (rc == ENOENT) ? 127 : 126;
    std::string message = "cannot start " + words[0] + ": " + std::strerror(rc);
    if (!job.cwd.empty() && rc == ENOENT) message += " (or cwd " + job.cwd + " is gone)";
    const int err = ::open(files.err.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (err >= 0) {
      write_all(err, "gpuslot: " + message + "\n");
      ::close(err);
    }
    write_status(files.status, "error " + std::to_string(code) + " " + message);
    lease.release();
    ::_exit(0);
  }
  int status = 0;
  while (::waitpid(child, &status, 0) < 0 && errno == EINTR) {
  }
  write_status(files.status, WIFSIGNALED(status) ? "signal " + std::to_string(WTERMSIG(status))
                                                 : "exit " + std::to_string(WEXITSTATUS(status)));
  lease.release();
  ::_exit(0);
}

}  // namespace

AttemptFiles attempt_files(const std::string& logs_dir, const std::string& name, unsigned attempt) {
  const std::string base = logs_dir + "/" + name + "." + std::to_string(attempt);
  return {base + ".lock", base + ".status", base + ".out", base + ".err"};
}

Result<pid_t> start_shepherd(const JobSpec& job, const std::vector<std::string>& environment, HeldLease& lease,
                             const AttemptFiles& files, int lock_fd, const std::vector<int>& close_in_child) {
  const pid_t pid = ::fork();
  if (pid < 0) return make_error(Errc::state, std::string("cannot fork a job: ") + std::strerror(errno));
  if (pid == 0) {
    // Only async-signal-safe work would be strictly required after fork in a threaded process;
    // the scheduler is single-threaded, so the shepherd may allocate.
    for (int fd : close_in_child) ::close(fd);
    run_shepherd(job, environment, lease, files, lock_fd);
  }
  ::setpgid(pid, pid);  // also set here, so a signal sent right after fork reaches its group
  return pid;
}

std::optional<AttemptOutcome> read_outcome(const std::string& status_path) {
  const std::string text = read_tail(status_path, 4096);
  if (text.empty()) return std::nullopt;
  AttemptOutcome outcome;
  char kind[16] = {};
  int value = 0;
  int consumed = 0;
  if (std::sscanf(text.c_str(), "%15s %d %n", kind, &value, &consumed) < 2) {
    outcome.exit_code = 70;
    outcome.error = "unreadable status file " + status_path;
    return outcome;
  }
  const std::string what = kind;
  if (what == "signal") {
    outcome.signal = value;
  } else {
    outcome.exit_code = value;
    if (what == "error") {
      outcome.error = text.substr(std::size_t(consumed));
      while (!outcome.error.empty() && outcome.error.back() == '\n') outcome.error.pop_back();
    }
  }
  return outcome;
}

bool attempt_alive(const std::string& lock_path) {
  const int fd = ::open(lock_path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) return false;
  const bool locked = ::flock(fd, LOCK_SH | LOCK_NB) != 0 && errno == EWOULDBLOCK;
  ::close(fd);
  return locked;
}

pid_t shepherd_pid(const std::string& lock_path) {
  const std::string text = read_tail(lock_path, 64);
  return text.empty() ? 0 : pid_t(std::atol(text.c_str()));
}

std::string read_tail(const std::string& path, std::size_t max_bytes) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) return "";
  struct stat info {};
  std::string text;
  if (::fstat(fd, &info) == 0 && S_ISREG(info.st_mode)) {
    const off_t size = info.st_size;
    const off_t start = size > off_t(max_bytes) ? size - off_t(max_bytes) : 0;
    text.resize(std::size_t(size - start));
    const ssize_t n = ::pread(fd, text.data(), text.size(), start);
    text.resize(n > 0 ? std::size_t(n) : 0);
  }
  ::close(fd);
  return text;
}

}  // namespace gpuslot::jobs_internal
