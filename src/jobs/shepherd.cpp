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
#include <set>
#include <sstream>

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

// Appends the status line ("exit N", "signal N", "error N MESSAGE") to the run file in one write.
void write_status(int run_fd, const std::string& line) { write_all(run_fd, line + "\n"); }

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
  write_all(lock_fd, "pid " + std::to_string(::getpid()) + "\n");

  if (auto moved = lease.reassign(::getpid()); !moved) {
    write_status(lock_fd, "error 70 " + moved.error().message);
    lease.release();
    ::_exit(0);
  }

  std::vector<char*> envp;
  for (const auto& entry : environment) envp.push_back(const_cast<char*>(entry.c_str()));
  envp.push_back(nullptr);
  std::vector<std::string> words = job.argv;
  if (words.empty()) words = direct_argv(job.shell).value_or(std::vector<std::string>{"/bin/sh", "-c", job.shell});
  const bool search_path = words[0].find('/') == std::string::npos;
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
  const int rc = search_path ? ::posix_spawnp(&child, argv[0], &actions, &attributes, argv.data(), envp.data())
                             : ::posix_spawn(&child, argv[0], &actions, &attributes, argv.data(), envp.data());
  if (rc != 0) {
    const int code = (rc == ENOENT) ? 127 : 126;
    std::string message = "cannot start " + words[0] + ": " + std::strerror(rc);
    if (!job.cwd.empty() && rc == ENOENT) message += " (or cwd " + job.cwd + " is gone)";
    const int err = ::open(files.err.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (err >= 0) {
      write_all(err, "gpuslot: " + message + "\n");
      ::close(err);
    }
    write_status(lock_fd, "error " + std::to_string(code) + " " + message);
    lease.release();
    ::_exit(0);
  }
  int status = 0;
  while (::waitpid(child, &status, 0) < 0 && errno == EINTR) {
  }
  write_status(lock_fd, WIFSIGNALED(status) ? "signal " + std::to_string(WTERMSIG(status))
                                                 : "exit " + std::to_string(WEXITSTATUS(status)));
  lease.release();
  ::_exit(0);
}

}  // namespace

AttemptFiles attempt_files(const std::string& logs_dir, const std::string& name, unsigned attempt) {
  const std::string base = logs_dir + "/" + name + "." + std::to_string(attempt);
  return {base + ".run", base + ".out", base + ".err"};
}

std::optional<std::vector<std::string>> direct_argv(const std::string& line) {
  static const std::set<std::string> kShellWords = {
      "!", ".", ":", "[", "[[", "alias", "bg", "break", "case", "cd", "command", "continue", "do", "done", "echo",
      "elif", "else", "esac", "eval", "exec", "exit", "export", "fc", "fg", "fi", "for", "function", "getopts",
      "hash", "if", "in", "jobs", "kill", "let", "local", "printf", "pwd", "read", "readonly", "return", "select",
      "set", "shift", "source", "test", "then", "time", "times", "trap", "type", "typeset", "ulimit", "umask",
      "unalias", "unset", "until", "wait", "while"};
  std::vector<std::string> words;
  std::string word;
  for (char c : line) {
    const bool plain = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
                       c == '_' || c == '.' || c == '/' || c == ',' || c == ':' || c == '+' || c == '%' || c == '@' ||
                       c == '=' || c == '^';
    if (c == ' ' || c == '\t') {
      if (!word.empty()) words.push_back(std::move(word));
      word.clear();
    } else if (plain) {
      word += c;
    } else {
      return std::nullopt;  // quoting, expansion, redirection, operators, globs, comments: the shell's job
    }
  }
  if (!word.empty()) words.push_back(std::move(word));
  if (words.empty() || kShellWords.count(words[0]) != 0 || words[0].find('=') != std::string::npos) return std::nullopt;
  return words;
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

std::optional<AttemptOutcome> read_outcome(const std::string& run_path) {
  const std::string text = read_tail(run_path, 8192);
  std::istringstream lines(text);
  for (std::string line; std::getline(lines, line);) {
    std::istringstream fields(line);
    std::string kind;
    int value = 0;
    if (!(fields >> kind >> value) || (kind != "exit" && kind != "signal" && kind != "error")) continue;
    AttemptOutcome outcome;
    if (kind == "signal") {
      outcome.signal = value;
    } else {
      outcome.exit_code = value;
      if (kind == "error") {
        std::getline(fields >> std::ws, outcome.error);
        if (outcome.error.empty()) outcome.error = "could not start";
      }
    }
    return outcome;
  }
  return std::nullopt;
}

bool attempt_alive(const std::string& lock_path) {
  const int fd = ::open(lock_path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) return false;
  const bool locked = ::flock(fd, LOCK_SH | LOCK_NB) != 0 && errno == EWOULDBLOCK;
  ::close(fd);
  return locked;
}

pid_t shepherd_pid(const std::string& run_path) {
  const std::string text = read_tail(run_path, 8192);
  return text.rfind("pid ", 0) == 0 ? pid_t(std::atol(text.c_str() + 4)) : 0;
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
